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
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from .geometry import DecoderGeometry
from .limits import Limits
from .stages import StageSpec, TensorSpec

Range = tuple[int, int, int]
Feeds = Mapping[str, np.ndarray]

#: model metadata key (value "1") of a decoder graph that runs on ONE preallocated KV buffer bound
#: as both its past input and its present output (export/attention_fuse.py): its attention reads
#: each row's length from the attention mask, not the past's shape. The runtime then keeps the
#: running rows in a :class:`SlotBatch`.
KV_IN_PLACE = "vlm_export.kv_in_place"


@dataclass
class DecodeBatch:
    """Decoder state of the running rows (see the module docstring for the layout)."""

    caches: dict[str, np.ndarray]
    mask: np.ndarray  # [rows, length] int64, 1 where the growing caches hold a real position
    positions: np.ndarray  # [rows] int64, position id of each row's next token (its real length; past it where
    #                        images take fewer positions than tokens: contract/mrope.py)
    growing: tuple[str, ...] = ()  # caches padded along seq_axis
    seq_axis: int = 2
    #: caches that do not grow but differ in length between rows (a cross-attention scheme's image
    #: K/V: rows with different numbers of images; an encoder-decoder's cross K/V and encoder mask:
    #: prompts of different lengths on the encoder axis): name -> the axis padded on the RIGHT with
    #: zeros when rows join; the scheme's own masks hide the padding
    padded: dict[str, int] = field(default_factory=dict)

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
        for name, axis in self.padded.items():
            size = max(a.caches[name].shape[axis], b.caches[name].shape[axis])
            a, b = a._pad_right(name, axis, size), b._pad_right(name, axis, size)
        caches = {n: np.concatenate([a.caches[n], b.caches[n]]) for n in a.caches}
        return replace(a, caches=caches, mask=np.concatenate([a.mask, b.mask]),
                       positions=np.concatenate([a.positions, b.positions]))

    def _pad_right(self, name: str, axis: int, size: int) -> "DecodeBatch":
        cache = self.caches[name]
        if cache.shape[axis] == size:
            return self
        pad = [(0, 0)] * cache.ndim
        pad[axis] = (0, size - cache.shape[axis])
        return replace(self, caches={**self.caches, name: np.pad(cache, pad)})

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

    @property
    def position_nbytes(self) -> int:
        """Bytes one position of one row takes in the growing caches (what ``row_caches`` copies per position)."""
        return sum(self.caches[n][0].nbytes // max(self.caches[n].shape[self.seq_axis], 1) for n in self.growing)

    def row_caches(self, row: int) -> dict[str, np.ndarray]:
        """Row ``row``'s growing caches, its real positions only (left-aligned, contiguous): what a
        prefix cache keeps of a prefilled prompt (or of a finished row: its prompt and answer)."""
        real = np.flatnonzero(self.mask[row])
        return {name: np.ascontiguousarray(np.take(self.caches[name][row], real, axis=self.seq_axis - 1))
                for name in self.growing}

    def trim(self) -> "DecodeBatch":
        used = np.flatnonzero(self.mask.any(axis=0))
        start = int(used[0]) if used.size else self.length
        if start == 0:
            return self
        caches = dict(self.caches)
        for name in self.growing:
            caches[name] = np.ascontiguousarray(np.take(caches[name], np.arange(start, self.length), axis=self.seq_axis))
        return replace(self, caches=caches, mask=self.mask[:, start:])


@dataclass
class SlotBatch:
    """Decoder state of the running rows in ONE preallocated buffer per cache, [slots, ..., capacity,
    ...] (the position axis ``seq_axis``), that the decoder reads as its past and writes as its
    present in place (a graph with :data:`KV_IN_PLACE`): no per-step copy of the cache.

    Each row owns a slot; its positions are LEFT-aligned at columns [0, length) with no holes, so a
    step writes each row's new token at its own column ``length`` (the decoder reads every row's
    length off the step's attention mask: ones on [0, length + 1), zeros after; an all-zero row is
    an idle slot, which the decoder leaves as it is). A prefilled row joins by copying its real
    columns into a free slot once; a row that leaves frees its slot for the next one to join (its
    stale columns are never read: a row reads only its own [0, length)). The buffer grows (one
    copy) only when more rows run at once than it has slots, or a joining row may grow past its
    capacity; each row's ``reserve`` (prompt + max new tokens) sizes it when it joins.

    State that does not grow (a cross-attention scheme's image K/V and masks: ``DecodeBatch.padded``)
    is held per slot too, padded on the RIGHT along its own axis to the widest row that joined; the
    scheme's masks hide the padding, and an idle slot's stale values only reach its own, unread, row.

    A row's next position is its length plus its slot's ``offsets`` entry: 0, except where the
    scheme's positions run behind the tokens (M-RoPE's images: ``contract/mrope.py``), kept from the
    prefill's state when the row joins.

    ``keep``/``join``/``advanced`` return the next state, which shares the buffer with this one:
    the previous state is not to be used after them.
    """

    caches: dict[str, np.ndarray]  # name -> [slots, ..., capacity, ...]; a ``padded`` one: [slots, ...]
    lengths: np.ndarray  # [slots] int64, real positions held by each slot (0: free)
    slots: np.ndarray  # [rows] int64, the slot of each running row, in row order
    seq_axis: int = 2
    #: the runtime's binding of these buffers to the decoder (opaque here), reused while they are
    #: the same arrays; a grown buffer starts without one
    bound: Any = None

    #: caches that do not grow, as ``DecodeBatch.padded``: name -> the axis padded on the right
    padded: dict[str, int] = field(default_factory=dict)

    #: [slots] int64: each slot's next position minus its length (empty: all 0)
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    #: capacities are rounded up to a multiple of this (fewer regrowths for rows of near lengths)
    CAPACITY_STEP: ClassVar[int] = 64

    @classmethod
    def empty(cls, seq_axis: int = 2) -> "SlotBatch":
        return cls({}, np.zeros(0, np.int64), np.zeros(0, np.int64), seq_axis)

    @property
    def rows(self) -> int:
        return int(self.slots.shape[0])

    @property
    def growing_buffers(self) -> dict[str, np.ndarray]:
        """The buffers written in place, one position per step (the caches not ``padded``)."""
        return {name: buffer for name, buffer in self.caches.items() if name not in self.padded}

    @property
    def capacity(self) -> int:
        return int(next(iter(self.growing_buffers.values())).shape[self.seq_axis]) if self.growing_buffers else 0

    @property
    def positions(self) -> np.ndarray:
        """[rows] the position id of each row's next token (its length, plus its slot's offset)."""
        return self.lengths[self.slots] + self._offsets()[self.slots]

    def _offsets(self) -> np.ndarray:
        return np.pad(self.offsets, (0, len(self.lengths) - len(self.offsets)))

    def step_mask(self) -> np.ndarray:
        """[slots, longest + 1] int64: a step's attention mask, ones on each running slot's
        [0, length + 1) (its columns and the new token), an idle slot all zero."""
        lengths = self.lengths[self.slots]
        width = int(lengths.max()) + 1 if self.rows else 1
        mask = np.zeros((len(self.lengths), width), np.int64)
        mask[self.slots] = np.arange(width)[None, :] <= lengths[:, None]
        return mask

    def by_slot(self, values: np.ndarray, fill) -> np.ndarray:
        """[slots, ...]: ``values`` ([rows, ...], in row order) at their rows' slots, ``fill`` elsewhere."""
        values = np.asarray(values)
        out = np.full((len(self.lengths), *values.shape[1:]), fill, dtype=values.dtype)
        out[self.slots] = values
        return out

    def advanced(self, bound: Any = None) -> "SlotBatch":
        """The state after a step wrote one position per running row (in place); ``bound``: the
        binding that step used."""
        lengths = self.lengths.copy()
        lengths[self.slots] += 1
        return replace(self, lengths=lengths, bound=bound)

    def keep(self, rows: Sequence[int]) -> "SlotBatch":
        """Only the given rows (in that order); the others' slots are free."""
        slots = self.slots[np.asarray(rows, dtype=np.int64)]
        lengths = np.zeros_like(self.lengths)
        lengths[slots] = self.lengths[slots]
        return replace(self, lengths=lengths, slots=slots)

    def join(self, other: DecodeBatch, reserve: Sequence[int]) -> "SlotBatch":
        """The rows of both, self's first: ``other``'s rows (a prefill's state, right-aligned and
        masked as DecodeBatch lays them out) copied into free slots. ``reserve[i]``: the most
        positions row i of ``other`` will hold."""
        if set(other.caches) != set(other.growing) | set(other.padded) or other.seq_axis != self.seq_axis:
            raise ValueError("a SlotBatch holds caches that grow along one position axis, or are padded along one")
        if self.caches and other.padded != self.padded:
            raise ValueError(f"rows with fixed state {sorted(other.padded)} cannot join rows with "
                             f"{sorted(self.padded)}")
        real = other.mask.astype(bool)
        lengths = real.sum(axis=1)
        free = np.setdiff1d(np.arange(len(self.lengths)), self.slots)
        need = max(int(np.max(reserve, initial=0)), int(lengths.max(initial=0)), self.capacity)
        if other.rows > len(free) or need > self.capacity:
            state = self._grown(other, self.rows + other.rows, -(-need // self.CAPACITY_STEP) * self.CAPACITY_STEP)
        else:
            state = self
        state = state._fitting(other)
        free = np.setdiff1d(np.arange(len(state.lengths)), state.slots)[:other.rows]
        for name, buffer in state.growing_buffers.items():
            for i, slot in enumerate(free):
                rows_cache = np.compress(real[i], other.caches[name][i], axis=self.seq_axis - 1)
                index = [slice(None)] * (buffer.ndim - 1)
                index[self.seq_axis - 1] = slice(0, int(lengths[i]))
                buffer[slot][tuple(index)] = rows_cache
        for name in other.padded:
            buffer, values = state.caches[name], other.caches[name]
            for i, slot in enumerate(free):
                buffer[slot] = 0
                buffer[slot][tuple(slice(0, n) for n in values.shape[1:])] = values[i]
        out_lengths, offsets = state.lengths.copy(), state._offsets()
        out_lengths[free], offsets[free] = lengths, np.asarray(other.positions) - lengths
        return replace(state, lengths=out_lengths, slots=np.concatenate([state.slots, free]), offsets=offsets)

    def _fitting(self, other: DecodeBatch) -> "SlotBatch":
        """This state with its fixed (``padded``) caches holding every slot of the buffer, each as wide
        as ``other``'s along its padded axis (zeros added on the right; one copy when they grow)."""
        caches = dict(self.caches)
        for name, axis in other.padded.items():
            values, old = other.caches[name], self.caches.get(name)
            shape = [len(self.lengths), *values.shape[1:]]
            if old is not None:
                shape[axis] = max(shape[axis], old.shape[axis])
                if list(old.shape) == shape:
                    continue
            buffer = np.zeros(shape, dtype=values.dtype)
            if old is not None:
                buffer[tuple(slice(0, n) for n in old.shape)] = old
            caches[name] = buffer
        return replace(self, caches=caches, padded=dict(other.padded))

    @property
    def position_nbytes(self) -> int:
        """Bytes one position of one row takes in the caches (``DecodeBatch.position_nbytes``)."""
        return sum(b[0].nbytes // max(b.shape[self.seq_axis], 1) for b in self.growing_buffers.values())

    def row_caches(self, row: int) -> dict[str, np.ndarray]:
        """Row ``row``'s growing caches, its [0, length) columns, copied (its slot is reused after it
        leaves): what a prefix cache keeps of a finished row (``DecodeBatch.row_caches``' layout)."""
        slot = int(self.slots[row])
        index = (slice(None),) * (self.seq_axis - 1) + (slice(0, int(self.lengths[slot])),)
        return {name: np.ascontiguousarray(buffer[slot][index]) for name, buffer in self.growing_buffers.items()}

    def _grown(self, like: DecodeBatch, slots: int, capacity: int) -> "SlotBatch":
        """A copy with at least ``slots`` slots and ``capacity`` positions (the running rows kept)."""
        slots = max(slots, len(self.lengths))
        caches = dict(self.caches)  # fixed ones: given every slot by _fitting
        for name in like.growing:
            cache = like.caches[name]
            shape = list(cache.shape)
            shape[0], shape[self.seq_axis] = slots, capacity
            buffer = np.zeros(shape, dtype=cache.dtype)  # calloc'd: columns never written take no memory
            if name in self.caches:
                old = self.caches[name]
                index = [slice(0, n) for n in old.shape]
                index[self.seq_axis] = slice(0, int(self.lengths.max(initial=0)))  # stale or unused after
                buffer[tuple(index)] = old[tuple(index)]
            caches[name] = buffer
        lengths = np.zeros(slots, np.int64)
        lengths[:len(self.lengths)] = self.lengths
        return replace(self, caches=caches, lengths=lengths, bound=None)


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

    @property
    def image_input_sources(self) -> tuple[str, ...]:
        """The tensors of the image path (stage outputs or preprocessed inputs, by name) that
        ``image_input_from_values`` reads: what a served image path must hand back. By default the
        ``image_input`` output alone."""
        return (self.image_input.name,) if self.image_input is not None else ()

    @property
    def processor_inputs(self) -> tuple[TensorSpec, ...]:
        """Image-processor outputs the scheme reads that no image stage does (LLaVA-NeXT's image sizes): preprocessed
        with the image path's inputs and handed to ``image_input_from_values`` with them."""
        return ()

    def image_input_from_values(self, values: Mapping[str, np.ndarray]):
        """The decoder's image input from every tensor the image path made for one request's images
        (its preprocessed inputs included, by name); by default the ``image_input`` output alone. A
        scheme whose image input also needs a preprocessed tensor (which tiles of an image are real)
        overrides this."""
        return self.image_input_from(values[self.image_input.name])

    @abc.abstractmethod
    def join_image_inputs(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        """One request's image input from its images' inputs made one by one (in order)."""

    @abc.abstractmethod
    def check_prompt(self, prompt_ids: Sequence[int], image_input: np.ndarray) -> None:
        """InputError when the prompt and the images do not fit together."""

    def penalty_context(self, prompt_ids: Sequence[int]) -> list[int]:
        """The ids a repetition penalty and a no-repeat n-gram rule look back over before the first new
        token, as Hugging Face's logits processors see them (``input_ids`` of its generate): the
        prompt, image tokens included, for a decoder-only LM."""
        return list(prompt_ids)

    #: how many ids at the end of ``penalty_context`` Hugging Face's generate produced itself and counts as
    #: new tokens (its ``min_new_tokens``): an encoder-decoder's forced BOS, which it generates after the
    #: start token while the scheme feeds it with the prompt. 0 for a decoder-only LM.
    forced_new_tokens = 0

    # ---- running a batch ---------------------------------------------------------------
    # A prefill is one decoder call for any number of new prompts (up to the build's max_batch) of
    # any lengths, from an empty state: prefill_feeds(rows, batch_image_inputs([each row's])), the
    # decoder, then prefill_state(outputs, [len(r) for r in rows], feeds) and next_logits(outputs). Rows
    # are laid out as the module docstring says (left-padded, masked), so the state joins a
    # running DecodeBatch as is.
    @abc.abstractmethod
    def batch_image_inputs(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        """One prefill's image input from its rows' image inputs (one per row, in row order; a
        row without images gives ``empty_image_input()``)."""

    @abc.abstractmethod
    def prefill_feeds(self, rows: Sequence[Sequence[int]], image_input: np.ndarray,
                      encoded: Feeds | None = None) -> dict[str, np.ndarray]:
        """Decoder feeds for ONE prefill of ``rows`` (prompt ids, any lengths, at least one token
        each) from an empty state. The decoder's own tokens are laid out as the module docstring
        says: shorter rows padded on the left, the padding masked and never an image placeholder,
        each row's positions counting from its first real token. (A scheme with an
        ``encoder_stage`` feeds ``rows`` to the encoder instead, laid out as it declares - the
        encoder-decoder's right-padded - and its decoder runs on tokens of its own.)
        ``image_input`` holds the images of every row, in row order (``batch_image_inputs``).
        ``encoded``: the encoder stage's outputs for ``encoder_feeds(rows, image_input)``, for a
        scheme with an ``encoder_stage`` (None otherwise)."""

    # ---- an encoder stage run once per prefill (encoder-decoder LMs; contract/encdec.py) -------
    # A scheme with an encoder stage names it here; the runtime (VLMPipeline.prefill_inputs) runs
    # that stage ONCE per prefill on encoder_feeds(rows, image_input) and hands its outputs to
    # prefill_feeds(..., encoded=...); decode steps never run it (what they need of its outputs is
    # fixed per-row state in the DecodeBatch).
    #: the encoder stage's name in the manifest (None: the decoder reads the prompt itself)
    encoder_stage: ClassVar[str | None] = None

    def encoder_feeds(self, rows: Sequence[Sequence[int]], image_input: np.ndarray) -> dict[str, np.ndarray]:
        """The encoder stage's feeds for ONE prefill of ``rows`` (only where ``encoder_stage``)."""
        raise NotImplementedError(f"the {self.name} scheme has no encoder stage")

    def encoder_dim_ranges(self, limits: Limits) -> list[dict[str, Range]]:
        """The encoder stage's dynamic dims per TensorRT optimization profile (only where ``encoder_stage``)."""
        raise NotImplementedError(f"the {self.name} scheme has no encoder stage")

    def length_problem(self, prompt_tokens: int, max_new_tokens: int, limits: Limits) -> str | None:
        """Why a prompt of ``prompt_tokens`` (the user's, as built by the prompt layout) with
        ``max_new_tokens`` does not fit the build's limits (None: it fits). By default prompt and
        new tokens share one sequence; a scheme whose decoder does not hold the prompt (an
        encoder-decoder's) bounds each on its own."""
        if prompt_tokens + max_new_tokens > limits.max_sequence:
            return (f"the prompt is {prompt_tokens} tokens; with max_tokens {max_new_tokens} it exceeds this build's "
                    f"max_sequence of {limits.max_sequence}: shorten the prompt or lower max_tokens")
        return None

    def prefill_state(self, outputs: Feeds, lengths: Sequence[int], feeds: Feeds | None = None) -> DecodeBatch:
        """The state after ``prefill_feeds(rows)``: ``lengths`` are the rows' prompt lengths, in row
        order; ``feeds`` the prefill's own feeds (a scheme whose state holds inputs the decoder does
        not return, such as cross-attention K/V, needs them). The padding's cache slots are zero
        (whatever the graph computed there) and masked."""
        lengths = [int(n) for n in lengths]
        if not lengths or min(lengths) < 1:
            raise ValueError(f"a prefill's rows have at least one token each, got lengths {lengths}")
        return self.state_after_prefill(outputs, lengths, feeds)

    @abc.abstractmethod
    def state_after_prefill(self, outputs: Feeds, lengths: list[int], feeds: Feeds | None = None) -> DecodeBatch:
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

    # ---- running a batch on one in-place KV buffer (SlotBatch) ---------------------------------
    # A decoder graph with KV_IN_PLACE runs a step on the SlotBatch's buffers bound as both its past
    # inputs and its present outputs: decoder(slot_step_feeds(batch, tokens)) writing each present
    # into its past's buffer (in_place_caches), then batch.advanced(), and next_logits(outputs)
    # holds one row per slot (batch.slots picks the running rows'). A scheme that cannot (its
    # state is not only caches growing by one position per step) returns {} and runs DecodeBatch.
    def in_place_caches(self) -> dict[str, str]:
        """{present output: the past input whose buffer it is written into}; {} when this scheme
        has no in-place form."""
        return {}

    def slot_step_feeds(self, batch: SlotBatch, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """Decoder feeds for one new token per running row (``tokens [rows]``, row order) of a
        SlotBatch: one row per slot, idle slots fed a masked-out pad."""
        raise NotImplementedError(f"the {self.name} scheme has no in-place KV form")

    # ---- continuing a prefill from a cached prefix (runtime/prefix_cache.py) --------------------
    # Where a decoder's state after the first P prompt tokens depends on those tokens alone (and the
    # image rows they hold), a prompt that starts as an earlier one did can skip them: its state after
    # P comes from a cache, and the prefill runs on the rest, ONE row per call:
    # continue_feeds(prefix_state(cached, P), ids[P:], the rest's image input), the decoder, then
    # prefill_state(outputs, [len(ids)], feeds). A scheme that cannot (its KV depends on more than
    # the prefix: cross-attention to the images, an encoder's output) keeps prefix_keys None.
    def prefix_keys(self, prompt_ids: Sequence[int], image_input: np.ndarray) -> np.ndarray | None:
        """[len(prompt_ids)] int64: what position i of this prompt holds, as far as the state after it
        goes (two prompts whose keys agree on [0, P) have the same state after P); None: this scheme
        cannot continue a prefill from a cached prefix."""
        return None

    def generated_keys(self, tokens: Sequence[int]) -> np.ndarray | None:
        """The keys (as ``prefix_keys`` makes them) of tokens decode steps fed after a prompt, so a
        finished row's prompt and answer can be kept together: a conversation's next turn starts
        with both. None: the state after them is not kept."""
        return None

    def prefix_state(self, caches: Mapping[str, np.ndarray], length: int) -> DecodeBatch:
        """One row's state after its first ``length`` prompt tokens, from ``DecodeBatch.row_caches``
        of an earlier prompt with the same first ``length`` keys (longer ones are cut)."""
        raise NotImplementedError(f"the {self.name} scheme cannot continue a prefill from a cached prefix")

    def continue_feeds(self, prefix: DecodeBatch, prompt_ids: Sequence[int],
                       image_input: np.ndarray) -> dict[str, np.ndarray]:
        """Decoder feeds for the rest of ONE prompt after ``prefix`` (``prefix_state``): ``prompt_ids``
        the whole prompt, ``image_input`` its whole image input (the scheme takes the part after)."""
        raise NotImplementedError(f"the {self.name} scheme cannot continue a prefill from a cached prefix")

    def decode_lengths(self, prompt_tokens: int, new_tokens: int) -> tuple[int, int]:
        """(the decoder's self-attention cache length, the length of the prompt-sized state that
        does not grow) halfway through generating ``new_tokens`` after a prompt of
        ``prompt_tokens``: where a benchmark times a decode step (``synthetic_batch``). By default
        the decoder holds the prompt and the new tokens."""
        length = prompt_tokens + new_tokens // 2
        return length, length

    @abc.abstractmethod
    def synthetic_batch(self, rows: int, length: int, rng: np.random.Generator,
                        fixed_length: int | None = None) -> DecodeBatch:
        """A state of random caches (benchmarks time a decode step at a given length): self-attention
        caches of ``length`` positions; ``fixed_length`` (None: ``length``) sizes any fixed state that
        follows the prompt's length (an encoder's output), where the scheme has one."""
