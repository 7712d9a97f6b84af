"""A build's stages behind runners, plus what turns a request into their inputs: image
preprocessing, prompt ids, the image stages run in their declared order, and the decoding
scheme that feeds the decoder. No model code: everything comes from the manifest (or, for the
PyTorch reference, from the adapter's declarations)."""
from __future__ import annotations

from typing import Callable, Mapping, Sequence, Union

import numpy as np

from ..contract import DecodingScheme, Limits, PromptLayout, StageSpec, TensorSpec, check_image_text, image_stages
from ..contract.scheme import DecodeBatch, SlotBatch
from ..errors import InputError
from .chat import Prompt
from .images import ImageInput, ImageLimits, image_grids, image_name, load_image, processed_images  # noqa: F401
from .prefix_cache import PrefixCache
from .prompt import ImageTextEncoder, build_prompt_ids
from .runners import Runner

#: called with (stage spec, its feeds, its outputs) for every image stage run (parity, calibration)
StageObserver = Callable[[StageSpec, dict, dict], None]
#: a request's preprocessed images: the one pixels array where the image path reads one (LLaVA, BLIP-2),
#: else the image processor's outputs it reads, by name (mllama: pixel_values, aspect_ratio_ids,
#: aspect_ratio_mask); the images are on axis 0 of each
Pixels = Union[np.ndarray, Mapping[str, np.ndarray]]


def pixel_inputs(stages: Sequence[StageSpec]) -> list[TensorSpec]:
    """The image path's inputs made by the image processor (``role="pixels"``; each named after the
    processor output it is), in declared order, each once."""
    found: dict[str, TensorSpec] = {}
    for spec in image_stages(stages):
        for t in spec.inputs:
            if t.role == "pixels":
                found.setdefault(t.name, t)
    return list(found.values())


def as_declared(value, spec: TensorSpec) -> np.ndarray:
    """A processor output as the stage input ``spec`` declares it: leading axes the declaration does
    not have are folded into its first (images) axis (a processor that nests images per prompt
    gives ``[1, images, ...]`` for one request), in the declared dtype."""
    value = np.asarray(value)
    extra = value.ndim - len(spec.dims)
    if extra > 0:
        value = value.reshape(-1, *value.shape[extra + 1:])
    return np.ascontiguousarray(value, dtype=np.dtype(spec.dtype))


def pixels_by_name(pixels: Pixels, stages: Sequence[StageSpec]) -> dict[str, np.ndarray]:
    """``pixels`` as the image path's feeds by name (a lone array is its one pixels input)."""
    if isinstance(pixels, Mapping):
        return dict(pixels)
    names = [t.name for t in pixel_inputs(stages)]
    if len(names) != 1:
        raise ValueError(f"this image path reads {len(names)} preprocessed inputs ({', '.join(names)}): pass them by name")
    return {names[0]: pixels}


def count_images(pixels: Pixels) -> int:
    """Images of the image path (tiles, where images are tiled) in ``pixels``."""
    if isinstance(pixels, Mapping):
        return len(pixels["pixel_values"] if "pixel_values" in pixels else next(iter(pixels.values())))
    return len(pixels)


def concat_pixels(parts: Sequence[Pixels]) -> Pixels:
    """The images of several requests' pixels, in order, as one batch of images."""
    if isinstance(parts[0], Mapping):
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    return np.concatenate(list(parts))


def image_limits_for(stages: Sequence[StageSpec], max_pixels: int | None = None,
                     max_bytes: int | None = None) -> ImageLimits:
    """Image limits derived from the pixels input of the image path (explicit values win)."""
    pixels = [t for s in image_stages(stages) for t in s.inputs if t.role == "pixels"]
    size = pixels[0].dims[-2:] if pixels else ()
    if len(size) == 2 and all(isinstance(d, int) for d in size):
        return ImageLimits.for_input(*size, max_pixels, max_bytes)
    return ImageLimits(max_pixels or ImageLimits.max_pixels, max_bytes or ImageLimits.max_bytes)


#: the generation settings a build records from its checkpoint (``manifest["generation"]``) and every
#: generation on it applies unless a request sets its own (``GenerationConfig.with_defaults``)
GENERATION_DEFAULTS = ("repetition_penalty", "no_repeat_ngram_size", "min_new_tokens", "min_length", "suppress_tokens",
                       "begin_suppress_tokens", "sequence_bias", "bad_words_ids")


class VLMPipeline:
    """The image stages, then the decoder, behind runners; and the request plumbing.

    ``runners`` holds one runner per stage that runs here; a served model may hold only the
    decoder (its images go through the server's image path instead).

    ``image_text`` makes the image path's prompt inputs, for builds whose image stages read the
    prompt (then every image call needs the request's prompt)."""

    def __init__(self, runners: Mapping[str, Runner], stages: Sequence[StageSpec], scheme: DecodingScheme,
                 tokenizer, image_processor, layout: PromptLayout, limits: Limits, eos_token_ids: list[int],
                 image_text: ImageTextEncoder | None = None,
                 generation_defaults: Mapping[str, float | int] | None = None, encodes_images_alone: bool = False):
        self.runners = dict(runners)
        self.stages = list(stages)
        self.image_text = image_text
        # what a request's image may be before it is decoded (a served model sets its own)
        self.image_limits = image_limits_for(self.stages)
        check_image_text(self.stages, image_text.spec if image_text else None)
        self.scheme = scheme
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.layout, self.limits = layout, limits
        self.eos_token_ids = list(eos_token_ids)
        #: the checkpoint's repetition penalty / no-repeat n-gram size (``GenerationConfig.with_defaults``)
        self.generation_defaults = dict(generation_defaults or {})
        #: prompts' K/V kept for later prompts that start the same way (``runtime.prefix_cache``; None:
        #: off). Every generation on this pipeline (``runtime.generate.Scheduler``) reads and fills it.
        self.prefix_cache: PrefixCache | None = None
        #: a request's images go through the image path one per call (``runtime.generate.image_input_for``), as a
        #: served model's image cache sends them: set where an image stage runs a fused form whose attention takes
        #: ONNX Runtime's tiled kernel only when nothing in the batch is padded (images of different sizes together
        #: would take the exported attention: memory in the square of the patches, and rows that differ to
        #: rounding from the same image's alone, which a prefix cache keys on)
        self.encodes_images_alone = encodes_images_alone

    @property
    def decoder(self) -> Runner:
        return self.runners[self.scheme.decoder_stage]

    @property
    def backend(self) -> str:
        return self.decoder.backend

    @property
    def image_stages(self) -> list[StageSpec]:
        return image_stages(self.stages)

    # ---- request -> tensors ------------------------------------------------------------------
    def preprocess(self, images: Sequence[ImageInput]) -> dict[str, np.ndarray]:
        """Every image-processor output the image path (and the scheme) reads (``role="pixels"``), by name, as
        declared; the image processor called as the model's processor calls it (``processed_images``)."""
        return self._declared(processed_images(self.image_processor, list(images), self.image_limits,
                                               self.layout.image_tiles))

    def _declared(self, out: Mapping) -> dict[str, np.ndarray]:
        if self.layout.image_tiles is not None:  # the processor's outputs as the image path reads them
            out = self.layout.image_tiles.arranged(dict(out))
        feeds = {}
        for spec in (*pixel_inputs(self.stages), *self.scheme.processor_inputs):
            if spec.name not in out:
                raise ValueError(f"the image processor gives no {spec.name!r} (it gives {', '.join(out)}), which the "
                                 "image path or the decoding scheme reads")
            feeds.setdefault(spec.name, as_declared(out[spec.name], spec))
        return feeds

    def pixel_values(self, images: Sequence[ImageInput]) -> Pixels:
        """A request's preprocessed images: the one pixels array where the image path reads one, else
        every processor output it reads, by name (``Pixels``)."""
        return self._pixels(self.preprocess(images))

    def pixel_values_and_grids(self, images: Sequence[ImageInput]) -> tuple[Pixels, list[tuple[int, int]]]:
        """``pixel_values`` and each image's grid of tiles from ONE preprocessing (``PromptLayout.image_tiles``:
        the grids make the prompt's ids)."""
        tiles = self.layout.image_tiles
        out = processed_images(self.image_processor, list(images), self.image_limits, tiles)
        return self._pixels(self._declared(out)), tiles.grids(out)

    @staticmethod
    def _pixels(feeds: dict[str, np.ndarray]) -> Pixels:
        if not feeds:
            raise InputError("this build has no image path: send the prompt without images")
        return next(iter(feeds.values())) if len(feeds) == 1 else feeds

    def prompt_ids(self, prompt: Prompt, images: int | Sequence[ImageInput],
                   grids: Sequence[tuple[int, int]] | None = None) -> list[int]:
        """Token ids of one prompt or conversation (see ``runtime.chat``) with its ``images`` (or their
        number, where the build does not cut images into tiles). Where it does, the ids follow each image's
        grid: ``grids`` where the caller has them (``pixel_values_and_grids``), else read by preprocessing."""
        n_images = images if isinstance(images, int) else len(images)
        if n_images > self.limits.max_images:
            raise InputError(f"{n_images} images given; this build takes at most {self.limits.max_images} per prompt")
        if self.layout.tiled and grids is None:
            if isinstance(images, int) and images:
                raise ValueError("this build cuts each image into tiles, so a prompt's ids depend on its images' "
                                 "sizes: pass the images, not their number")
            grids = image_grids(self.image_processor, list(images or []), self.image_limits, self.layout.image_tiles)
        return build_prompt_ids(self.tokenizer, self.layout, prompt, n_images, grids)

    def check_length(self, prompt_tokens: int, max_new_tokens: int) -> None:
        problem = self.scheme.length_problem(prompt_tokens, max_new_tokens, self.limits)
        if problem:
            raise InputError(problem)

    @property
    def reads_prompt(self) -> bool:
        """Whether the image path's output depends on the prompt too (then the prompt is part of
        any key that caches it)."""
        return self.image_text is not None

    def image_text_feeds(self, prompt: Prompt | None, n_images: int) -> dict[str, np.ndarray]:
        """The image path's prompt inputs for ``n_images`` images ({} when it reads none)."""
        if self.image_text is None:
            return {}
        if prompt is None:
            raise ValueError("this build's image stages read the prompt: pass prompt= with the pixels")
        return self.image_text.feeds(prompt, n_images)

    # ---- stages ------------------------------------------------------------------------------
    def run_image_stages(self, pixel_values: Pixels, observe: StageObserver | None = None,
                         prompt: Prompt | None = None) -> dict[str, np.ndarray]:
        """Every image stage in order; returns every tensor made on the way (pixels included).
        ``prompt``: the request's prompt, for image stages that read it."""
        values = {**pixels_by_name(pixel_values, self.stages),
                  **self.image_text_feeds(prompt, count_images(pixel_values))}
        for spec in self.image_stages:
            feeds = {t.name: values[t.name] for t in spec.inputs}
            out = self.runners[spec.name].infer(feeds)
            if observe is not None:
                observe(spec, feeds, out)
            values.update(out)
        return values

    def encode_images(self, pixel_values: Pixels | None, observe: StageObserver | None = None,
                      prompt: Prompt | None = None):
        """The decoder's image input for one request's images (the scheme's empty input without);
        ``observe`` sees every image stage's feeds and outputs on the way."""
        if pixel_values is None or count_images(pixel_values) == 0:
            return self.scheme.empty_image_input()
        return self.scheme.image_input_from_values(self.run_image_stages(pixel_values, observe, prompt))

    def decode(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One decoder call with feeds made by the scheme (prefill or step)."""
        return self.decoder.infer(feeds)

    @property
    def kv_in_place(self) -> bool:
        """Whether decode steps can run on one preallocated KV buffer written in place
        (``contract.scheme.SlotBatch``): the scheme has that form and the decoder's graph and runner
        can (the fused graph on ONNX Runtime's CPU provider) - and the caller has not asked the
        decoder to keep its caches as device arrays (``Runner.keep_on_device``: the copying path,
        each step's present fed back as the next past without a host copy)."""
        return bool(self.scheme.in_place_caches()) and self.decoder.kv_in_place and not self.decoder.kept

    def decode_in_place(self, feeds: Mapping[str, np.ndarray], bound=None) -> tuple[dict[str, np.ndarray], object]:
        """One decode step with feeds from ``scheme.slot_step_feeds``: the present caches are written
        into the past's buffers. Returns (the other outputs, the buffers' binding: pass it back with
        the same buffers; ``Runner.infer_in_place``)."""
        return self.decoder.infer_in_place(feeds, self.scheme.in_place_caches(), bound)

    def running(self, state: DecodeBatch, reserve: Sequence[int], batch: "DecodeBatch | SlotBatch | None" = None,
                in_place: bool = True):
        """``batch`` (None: no rows yet) with a prefill's rows joined: in the in-place buffer where
        ``kv_in_place`` and ``in_place`` (``reserve[i]``: the most positions row i will hold), else as
        a DecodeBatch."""
        if in_place and self.kv_in_place:
            return (batch or SlotBatch.empty(state.seq_axis)).join(state, reserve)
        return state if batch is None else batch.join(state)

    def step(self, batch: "DecodeBatch | SlotBatch", tokens: np.ndarray):
        """One decode step of every running row, ``tokens [rows]`` in row order: (logits [rows, vocab],
        the state after). A SlotBatch is written in place, a DecodeBatch replaced by the present."""
        scheme = self.scheme
        if isinstance(batch, SlotBatch):
            out, bound = self.decode_in_place(scheme.slot_step_feeds(batch, tokens), batch.bound)
            batch = batch.advanced(bound)
            return scheme.next_logits(out)[batch.slots], batch
        out = self.decode(scheme.step_feeds(batch, tokens))
        return scheme.next_logits(out), scheme.advance(batch, out)

    def prefill_inputs(self, rows: Sequence[Sequence[int]], image_input, observe: StageObserver | None = None):
        """The decoder's feeds for ONE prefill of ``rows`` (``image_input``: the rows' joined, as
        ``scheme.batch_image_inputs`` makes it). Where the scheme has an encoder stage, that stage
        runs here, once for the whole prefill (``observe`` sees its feeds and outputs); decode
        steps never run it."""
        scheme = self.scheme
        if scheme.encoder_stage is None:
            return scheme.prefill_feeds(rows, image_input)
        feeds = scheme.encoder_feeds(rows, image_input)
        encoded = self.runners[scheme.encoder_stage].infer(feeds)
        if observe is not None:
            observe(next(s for s in self.stages if s.name == scheme.encoder_stage), feeds, encoded)
        return scheme.prefill_feeds(rows, image_input, encoded=encoded)

    def prefill(self, prompt_ids: Sequence[int], image_input: np.ndarray):
        """(logits [vocab] of the last prompt position, the state of this one row)."""
        logits, state = self.prefill_batch([prompt_ids], [image_input])
        return logits[0], state

    def prefix_keys(self, prompt_ids: Sequence[int], image_input: np.ndarray) -> np.ndarray | None:
        """What each prompt position holds for the prefix cache (``DecodingScheme.prefix_keys``); None
        where no prefix can be reused: no cache, a scheme without the form, or a decoder that
        cannot prefill on a past (a TensorRT engine)."""
        if self.prefix_cache is None or not self.decoder.continues_prefill:
            return None
        return self.scheme.prefix_keys(prompt_ids, image_input)

    def prefill_continuing(self, prefix: DecodeBatch, prompt_ids: Sequence[int], image_input: np.ndarray):
        """ONE row's prefill after the state of its first ``prefix.length`` tokens (a cached prefix):
        (logits [1, vocab] of its last prompt position, the row's state over the whole prompt)."""
        feeds = self.scheme.continue_feeds(prefix, prompt_ids, image_input)
        out = self.decode(feeds)
        return self.scheme.next_logits(out), self.scheme.prefill_state(out, [len(prompt_ids)], feeds)

    def prefill_batch(self, rows: Sequence[Sequence[int]], image_inputs: Sequence[np.ndarray]):
        """ONE decoder call for several new prompts of any lengths (each row's image input in
        ``image_inputs``, in row order): (logits [rows, vocab] of each row's last prompt position,
        the state of these rows, padding zeroed and masked; see ``contract.scheme``)."""
        scheme = self.scheme
        feeds = self.prefill_inputs(rows, scheme.batch_image_inputs(image_inputs))
        out = self.decode(feeds)
        return scheme.next_logits(out), scheme.prefill_state(out, [len(r) for r in rows], feeds)
