"""Decoding schemes: how the decoder stage is fed and what state it carries, for a batch of
sequences.

A scheme is a small registered class (one file per scheme, like adapters). The adapter picks one
and gives its parameters; the manifest stores ``{"name": ..., "geometry": ..., **params}``; the
runtime, parity, calibration, TensorRT profiles and the served model call its methods and never
ask which scheme it is. A new fusion family (cross-attention, encoder-decoder) is one new class.

The state of the running rows is a :class:`DecodeBatch`: named caches with the batch on axis 0.
Caches that grow by one position per step (self-attention K/V) are aligned on the RIGHT: every
row's newest position is the last column, shorter rows are padded on the left with zeros that
the attention mask hides. So a row can join after its own prefill and leave at any step, and the
batch's length is the longest row's. (Zeros, not garbage: a masked slot gets weight exactly 0,
and 0 x 0 stays 0, where a NaN would not.)

A prefill takes several new prompts of different lengths in ONE decoder call, laid out the same
way: shorter prompts are padded on the LEFT (so every row's last column is its newest position),
the padding hidden by the mask, its ids never an image placeholder, each row's position ids
counting from its own first real token (:func:`left_padded`). Padded query positions attend to
no key, which a runtime may answer with garbage or NaN (the exported graphs' masks add float32's
lowest value, not -inf, so ONNX Runtime's CPU provider gives finite garbage there, fp16 variant
included; fused attention kernels need not). Whatever the graph wrote there, the state keeps
zeros under the mask (:meth:`DecodeBatch.zero_masked`), and the logits are read at the last
column, a real position of every row.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from .geometry import DecoderGeometry
from .limits import Limits
from .stages import StageSpec, TensorSpec

Range = tuple[int, int, int]
Feeds = Mapping[str, np.ndarray]


@dataclass
class DecodeBatch:
    """Decoder state of the running rows (see the module docstring for the layout)."""

    caches: dict[str, np.ndarray]
    mask: np.ndarray  # [rows, length] int64, 1 where the growing caches hold a real position
    positions: np.ndarray  # [rows] int64, position id of each row's next token (= its real length)
    growing: tuple[str, ...] = ()  # caches padded along seq_axis
    seq_axis: int = 2

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def _pad_left(self, width: int) -> "DecodeBatch":
        extra = width - self.length
        if extra == 0:
            return self
        caches = dict(self.caches)
        for name in self.growing:
            pad = [(0, 0)] * caches[name].ndim
            pad[self.seq_axis] = (extra, 0)
            caches[name] = np.pad(caches[name], pad)
        return replace(self, caches=caches, mask=np.pad(self.mask, ((0, 0), (extra, 0))))

    def join(self, other: "DecodeBatch") -> "DecodeBatch":
        """The rows of both, self's first."""
        if self.rows == 0:
            return other
        width = max(self.length, other.length)
        a, b = self._pad_left(width), other._pad_left(width)
        caches = {n: np.concatenate([a.caches[n], b.caches[n]]) for n in a.caches}
        return replace(a, caches=caches, mask=np.concatenate([a.mask, b.mask]),
                       positions=np.concatenate([a.positions, b.positions]))

    def keep(self, rows: Sequence[int]) -> "DecodeBatch":
        """Only the given rows (in that order), with the columns no kept row uses dropped."""
        index = np.asarray(rows, dtype=np.int64)
        kept = replace(self, caches={n: v[index] for n, v in self.caches.items()}, mask=self.mask[index],
                       positions=self.positions[index])
        return kept.trim()

    def zero_masked(self) -> "DecodeBatch":
        """The growing caches with every masked slot set to 0 (the layout's contract), whatever a
        graph wrote there (a padded prefill's padding: garbage, or NaN on some runtimes)."""
        if self.mask.all():
            return self
        caches = dict(self.caches)
        for name in self.growing:
            cache = caches[name]
            shape = [1] * cache.ndim
            shape[0], shape[self.seq_axis] = self.rows, self.length
            caches[name] = np.where(self.mask.reshape(shape).astype(bool), cache, np.zeros((), cache.dtype))
        return replace(self, caches=caches)

    def trim(self) -> "DecodeBatch":
        used = np.flatnonzero(self.mask.any(axis=0))
        start = int(used[0]) if used.size else self.length
        if start == 0:
            return self
        caches = dict(self.caches)
        for name in self.growing:
            caches[name] = np.ascontiguousarray(np.take(caches[name], np.arange(start, self.length), axis=self.seq_axis))
        return replace(self, caches=caches, mask=self.mask[:, start:])


def left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask, position_ids)``, each ``[rows, longest]`` int64, for prompts of
    any lengths laid out as a prefill takes them: padded on the left with ``pad_id`` (mask 0,
    position 0), each row's positions counting 0, 1, ... from its first real token."""
    lengths = [len(r) for r in rows]
    if not rows or min(lengths) < 1:
        raise ValueError(f"a prefill takes at least one prompt of at least one token, got lengths {lengths}")
    mask = left_padded_mask(lengths)
    ids = np.full(mask.shape, pad_id, dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, mask.shape[1] - len(row):] = row
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, positions


def left_padded_mask(lengths: Sequence[int]) -> np.ndarray:
    """``[rows, longest]`` int64: 1 on each row's last ``lengths[i]`` columns (the prefill layout)."""
    width = max(lengths)
    return (np.arange(width)[None, :] >= width - np.asarray(lengths, dtype=np.int64)[:, None]).astype(np.int64)


_REGISTRY: dict[str, type["DecodingScheme"]] = {}


def register_scheme(cls: type["DecodingScheme"]) -> type["DecodingScheme"]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a decoding scheme named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def registered_schemes() -> dict[str, type["DecodingScheme"]]:
    return dict(_REGISTRY)


def scheme_from_dict(d: dict[str, Any]) -> "DecodingScheme":
    params = dict(d)
    name = params.pop("name")
    if name not in _REGISTRY:
        raise ValueError(f"unknown decoding scheme {name!r}; this vlm-export knows {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](DecoderGeometry.from_dict(params.pop("geometry")), **params)


class DecodingScheme(abc.ABC):
    """How a decoder is fed. Subclass, set ``name``, decorate with :func:`register_scheme`."""

    name: ClassVar[str]
    #: the decoder stage's name in the manifest
    decoder_stage: ClassVar[str] = "lm_decoder"

    def __init__(self, geometry: DecoderGeometry):
        self.geometry = geometry

    # ---- declarations ------------------------------------------------------------------
    @abc.abstractmethod
    def params(self) -> dict[str, Any]:
        """The constructor's keyword arguments besides the geometry (stored in the manifest)."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "geometry": self.geometry.to_dict(), **self.params()}

    @property
    @abc.abstractmethod
    def image_input(self) -> TensorSpec | None:
        """What the image stages deliver to the decoder (None: the scheme takes no images)."""

    @abc.abstractmethod
    def decoder_spec(self, precisions: tuple[str, ...]) -> StageSpec:
        """The decoder stage's named inputs and outputs."""

    @abc.abstractmethod
    def dim_ranges(self, limits: Limits) -> list[dict[str, Range]]:
        """The decoder's dynamic dims per TensorRT optimization profile (prefill first, then decode)."""

    # ---- the image input ---------------------------------------------------------------
    @abc.abstractmethod
    def empty_image_input(self) -> np.ndarray:
        """The image input of a request without images."""

    @abc.abstractmethod
    def image_input_from(self, stage_output: np.ndarray) -> np.ndarray:
        """The decoder's image input from the last image stage's output for one request's images."""

    @abc.abstractmethod
    def join_image_inputs(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        """One request's image input from its images' inputs made one by one (in order)."""

    @abc.abstractmethod
    def check_prompt(self, prompt_ids: Sequence[int], image_input: np.ndarray) -> None:
        """InputError when the prompt and the images do not fit together."""

    # ---- running a batch ---------------------------------------------------------------
    # A prefill is one decoder call for any number of new prompts (up to the build's max_batch) of
    # any lengths, from an empty state: prefill_feeds(rows, batch_image_inputs([each row's])), the
    # decoder, then prefill_state(outputs, [len(r) for r in rows]) and next_logits(outputs). Rows
    # are laid out as the module docstring says (left-padded, masked), so the state joins a
    # running DecodeBatch as is.
    @abc.abstractmethod
    def batch_image_inputs(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        """One prefill's image input from its rows' image inputs (one per row, in row order; a
        row without images gives ``empty_image_input()``)."""

    @abc.abstractmethod
    def prefill_feeds(self, rows: Sequence[Sequence[int]], image_input: np.ndarray) -> dict[str, np.ndarray]:
        """Decoder feeds for ONE prefill of ``rows`` (prompt ids, any lengths, at least one token
        each) from an empty state: shorter rows padded on the left, the padding masked and never an
        image placeholder, each row's positions counting from its first real token.
        ``image_input`` holds the images of every row, in row order (``batch_image_inputs``)."""

    def prefill_state(self, outputs: Feeds, lengths: Sequence[int]) -> DecodeBatch:
        """The state after ``prefill_feeds(rows)``: ``lengths`` are the rows' prompt lengths, in row
        order. The padding's cache slots are zero (whatever the graph computed there) and masked."""
        lengths = [int(n) for n in lengths]
        if not lengths or min(lengths) < 1:
            raise ValueError(f"a prefill's rows have at least one token each, got lengths {lengths}")
        return self.state_after_prefill(outputs, lengths)

    @abc.abstractmethod
    def state_after_prefill(self, outputs: Feeds, lengths: list[int]) -> DecodeBatch:
        """``prefill_state``'s work (called with the lengths checked): a scheme implements this."""

    @abc.abstractmethod
    def step_feeds(self, batch: DecodeBatch, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """Decoder feeds for one new token per row (``tokens [rows]``)."""

    @abc.abstractmethod
    def advance(self, batch: DecodeBatch, outputs: Feeds) -> DecodeBatch:
        """The state after a step."""

    @abc.abstractmethod
    def next_logits(self, outputs: Feeds) -> np.ndarray:
        """``[rows, vocab]``: the logits of each row's newest position (after a prefill: its last
        prompt token, the last column, real in every row)."""

    @abc.abstractmethod
    def synthetic_batch(self, rows: int, length: int, rng: np.random.Generator) -> DecodeBatch:
        """A state of random caches (benchmarks time a decode step at a given length)."""
