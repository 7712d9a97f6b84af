"""The contract every layer shares, at the bottom of the package: what a stage is, what limits a
build has, how a prompt is laid out, and how a decoder is fed (the decoding scheme).

Nothing here imports torch or any other layer of vlm-export (only numpy and ``errors``), so the
runtime inside a Triton python model, the repository renderer and the TensorRT profile code read
the same declarations the adapters wrote at build time.

* :class:`StageSpec` / :class:`TensorSpec`: a stage's name, kind (``image`` stages run once per
  request on its images, in order; the ``decoder`` stage runs per token), named inputs and outputs
  with dtypes and named dynamic dims, and the precisions it allows.
* :class:`DecodingScheme`: how the decoder stage is fed and what state it carries between steps
  for a batch of sequences (registered by name; the manifest stores the name and parameters).
* :class:`Limits`, :class:`PromptLayout` (and :class:`ImageText`, the prompt as an image-path input),
  :class:`DecoderGeometry`.

An encoder-decoder LM adds one ``encoder`` stage that its scheme names and the runtime runs once
per prefill (``encdec.EncoderDecoderScheme``).
"""
from .geometry import DecoderGeometry, LayerState
from .layout import LAYOUTS, AnyResTiles, ImageCrops, ImagePatches, ImageSlices, ImageText, ImageTiles, PromptLayout
from .limits import Limits
from .scheme import DecodeBatch, DecodingScheme, Range, register_scheme, registered_schemes, scheme_from_dict
from .stages import (DECODER, DECODER_PRECISIONS, ENCODER, IMAGE, IMAGE_PRECISIONS, StageSpec, TensorSpec, check_chain,
                     check_image_text, image_stages, prompt_inputs, stages_from_manifest)
from . import anyres, canvas, cross, encdec, mrope, patches, spliced, xdrope  # noqa: F401  (register the built-in schemes)

__all__ = [
    "DecoderGeometry", "LayerState", "LAYOUTS", "AnyResTiles", "ImageCrops", "ImagePatches", "ImageSlices", "ImageText", "ImageTiles", "PromptLayout", "Limits", "DecodeBatch", "DecodingScheme",
    "Range",
    "register_scheme", "registered_schemes", "scheme_from_dict", "IMAGE", "ENCODER", "DECODER", "StageSpec", "TensorSpec",
    "image_stages", "prompt_inputs", "check_image_text", "stages_from_manifest", "check_chain", "IMAGE_PRECISIONS",
    "DECODER_PRECISIONS",
]
