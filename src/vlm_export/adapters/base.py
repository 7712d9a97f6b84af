"""The adapter contract: what an architecture family declares so the generic stages can act.

An adapter is the only code that knows a model's internals. It loads a model folder and turns
the model into three ``nn.Module`` stages with fixed, named inputs and outputs:

* ``vision_encoder``: ``pixel_values [images, 3, H, W]`` -> ``image_features [images, ...]``
* ``projector``: ``image_features`` -> ``image_embeds [images, tokens_per_image, hidden]``
* ``lm_decoder``: ``input_ids, image_embeds [n, hidden], attention_mask, position_ids,
  past_key_values.{i}.key/value`` -> ``logits, present.{i}.key/value``

How image features enter the text is declared by a :class:`PromptLayout`; the decoder graph
embeds the ids itself and splices image rows at placeholder positions (see ``decoder.py``), so
the token-embedding matrix ships once, inside the decoder, tied to the LM head where the model
ties them.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..runtime.prompt import PromptLayout


@dataclass(frozen=True)
class DecoderSpec:
    """What the runtime needs to know about the decoder's KV cache."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int


@dataclass
class LoadedModel:
    """A model folder loaded by an adapter, with everything later stages need."""

    adapter: "VLMAdapter"
    path: Path
    model: nn.Module  # the original, as its authors would run it (reference for end-to-end parity)
    tokenizer: Any
    image_processor: Any
    config: Any


@dataclass
class Stages:
    """The three split modules, each taking and returning plain tensors in declared order."""

    vision_encoder: nn.Module
    projector: nn.Module
    lm_decoder: nn.Module


class VLMAdapter(abc.ABC):
    """Base class for one architecture family. Subclass, set ``name``, register with
    :func:`vlm_export.adapters.register`.
    """

    name: ClassVar[str]
    #: ``model_type`` values in a folder's config.json that this adapter handles
    model_types: ClassVar[tuple[str, ...]]
    #: one-line description shown by ``vlm-export build --help`` and in the unknown-arch error
    description: ClassVar[str] = ""

    # ---- loading -------------------------------------------------------------------------
    @abc.abstractmethod
    def load(self, path: Path) -> LoadedModel:
        """Load the model, tokenizer and image processor from a folder (fp32, eval mode)."""

    # ---- the split -----------------------------------------------------------------------
    @abc.abstractmethod
    def stages(self, loaded: LoadedModel) -> Stages:
        """The three modules, sharing weights with ``loaded.model``."""

    @abc.abstractmethod
    def prompt_layout(self, loaded: LoadedModel) -> PromptLayout:
        """How prompt ids are laid out around image placeholders."""

    @abc.abstractmethod
    def decoder_spec(self, loaded: LoadedModel) -> DecoderSpec:
        """KV-cache geometry and text-model limits."""

    @abc.abstractmethod
    def image_size(self, loaded: LoadedModel) -> tuple[int, int]:
        """(height, width) of ``pixel_values`` after preprocessing."""

    # ---- the reference -------------------------------------------------------------------
    @abc.abstractmethod
    def reference_generate(
        self,
        loaded: LoadedModel,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        max_new_tokens: int,
        eos_token_ids: list[int],
    ) -> list[int]:
        """Greedy new tokens from the ORIGINAL model's own generate (not our split modules):
        this is what proves the split itself faithful."""

    # ---- optional knobs ------------------------------------------------------------------
    def tolerances(self) -> dict[str, float]:
        """Per-stage overrides of the default parity tolerances (see compare.policy)."""
        return {}

    def image_feature_dims(self, loaded: LoadedModel) -> dict[int, str]:
        """Dynamic dims of ``image_features`` other than dim 0 (images). Default: none."""
        return {}
