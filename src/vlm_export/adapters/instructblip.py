"""InstructBLIP: Hugging Face ``InstructBlipForConditionalGeneration`` with a decoder-only LM (Vicuna/Llama-style:
``instructblip``) or a Flan-T5 (``instructblip_t5``).

BLIP-2's layout (see ``blip2.py``) with one difference that reaches every layer: the Q-Former also
reads the instruction, tokenized by a BERT tokenizer of its own (``qformer_input_ids``), and its
text tokens attend together with the queries. So the image path depends on the prompt: the
``qformer`` stage takes the prompt's tokens as inputs (``role="prompt"``), declared by
:meth:`image_text` so the runtime, the served ensemble and the image cache make and key them
without model code. The same image asked two different things is encoded twice.
"""
from __future__ import annotations

import torch
from torch import nn

from ..contract import ImageText, TensorSpec
from . import register
from .base import LoadedModel, Stage
from .blip2 import QFormerAdapterBase, VisionEncoder
from .blip2_t5 import T5LanguageModel
from .decoder import image_path_stages

IDS, MASK = "qformer_input_ids", "qformer_attention_mask"
#: the prompt's token dim in the qformer graph (a TensorRT profile bounds it by max_length)
TOKENS = "qformer_tokens"
EXAMPLE_TOKENS = 5


class InstructQFormerProjector(nn.Module):
    """(image_features, instruction ids, their mask) -> queries + instruction through the Q-Former
    -> the queries' rows -> language_projection, exactly as get_image_features."""

    def __init__(self, query_tokens: nn.Parameter, qformer: nn.Module, language_projection: nn.Module):
        super().__init__()
        self.query_tokens = query_tokens
        self.qformer = qformer
        self.language_projection = language_projection

    def forward(self, image_features, qformer_input_ids, qformer_attention_mask):
        queries = self.query_tokens.expand(image_features.shape[0], -1, -1)
        query_mask = torch.ones(queries.shape[:-1], dtype=torch.long, device=image_features.device)
        image_mask = torch.ones(image_features.shape[:-1], dtype=torch.long, device=image_features.device)
        out = self.qformer(input_ids=qformer_input_ids, attention_mask=torch.cat([query_mask, qformer_attention_mask], 1),
                           query_embeds=queries, encoder_hidden_states=image_features,
                           encoder_attention_mask=image_mask, return_dict=True).last_hidden_state
        return self.language_projection(out[:, : queries.shape[1]])


@register
class InstructBlipAdapter(QFormerAdapterBase):
    name = "instructblip"
    model_types = ("instructblip",)
    description = ("Hugging Face InstructBlipForConditionalGeneration (ViT + instruction-aware Q-Former + a "
                   "decoder-only HF LM: Vicuna/Llama, ...)")
    model_cls = "InstructBlipForConditionalGeneration"
    processor_cls = "InstructBlipProcessor"

    def image_text(self, loaded: LoadedModel) -> ImageText:
        # the Q-Former's text embeddings have max_position_embeddings positions (the queries take none)
        return ImageText("image_text_tokenizer", IDS, MASK, loaded.config.qformer_config.max_position_embeddings)

    def image_stages(self, loaded: LoadedModel) -> list[Stage]:
        m = loaded.model
        text = self.image_text(loaded)
        gen = torch.Generator().manual_seed(2)
        vocab = min(loaded.config.qformer_config.vocab_size, 1000)
        ids = torch.randint(1, vocab, (2, EXAMPLE_TOKENS), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0  # a shorter prompt padded on the right: the mask is a real input, not folded away
        dims = ("images", TOKENS)
        inputs = [(TensorSpec(IDS, "int64", dims, "prompt"), ids), (TensorSpec(MASK, "int64", dims, "prompt"), mask)]
        qformer = InstructQFormerProjector(m.query_tokens, m.qformer, m.language_projection)
        return image_path_stages(VisionEncoder(m.vision_model), qformer, self.image_size(loaded),
                                 projector_name="qformer", projector_inputs=inputs,
                                 projector_dim_ranges={TOKENS: (1, min(32, text.max_length), text.max_length)},
                                 projector_follows_default=False)


@register
class InstructBlipT5Adapter(T5LanguageModel, InstructBlipAdapter):
    """InstructBLIP with a Flan-T5 (the same model type; ``handles`` picks by the LM, as for BLIP-2): the
    instruction-aware image path above, then the T5's encoder and decoder (``blip2_t5.T5LanguageModel``)."""
    name = "instructblip_t5"
    description = ("Hugging Face InstructBlipForConditionalGeneration with an encoder-decoder LM (Flan-T5): ViT + "
                   "instruction-aware Q-Former + T5 encoder (once per prompt) + T5 decoder")
