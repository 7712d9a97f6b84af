"""Example inputs and named dynamic dims for the three stages, derived from the adapter's
declarations. Every dynamic dim's example size is >= 2: torch.export specialises a dim whose
example is 0 or 1 (see env-notes)."""
from __future__ import annotations

import torch

from ..adapters.base import LoadedModel, Stages
from ..adapters.decoder import decoder_input_names, decoder_output_names
from .onnx_export import StageGraph

EXAMPLE_IMAGES = 2
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST = 2, 3, 4


def stage_graphs(loaded: LoadedModel, stages: Stages) -> list[StageGraph]:
    adapter = loaded.adapter
    spec = adapter.decoder_spec(loaded)
    h, w = adapter.image_size(loaded)
    gen = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(EXAMPLE_IMAGES, 3, h, w, generator=gen)
    with torch.no_grad():
        features = stages.vision_encoder(pixel_values).contiguous()  # a strided view would export sym_stride
    feature_dims = {0: "images", **adapter.image_feature_dims(loaded)}

    layout = adapter.prompt_layout(loaded)
    ids = torch.randint(0, min(spec.vocab_size, 1000), (EXAMPLE_BATCH, EXAMPLE_SEQ), generator=gen)
    ids[ids == layout.image_token_id] = 0
    ids[0, 1] = ids[1, 2] = layout.image_token_id  # two placeholders -> two rows of image_embeds
    image_embeds = torch.randn(2, spec.hidden_size, generator=gen)
    total = EXAMPLE_PAST + EXAMPLE_SEQ
    past = []
    for _ in range(spec.num_layers * 2):
        past.append(torch.randn(EXAMPLE_BATCH, spec.num_kv_heads, EXAMPLE_PAST, spec.head_dim, generator=gen))
    decoder_inputs = (
        ids,
        image_embeds,
        torch.ones(EXAMPLE_BATCH, total, dtype=torch.int64),
        torch.arange(EXAMPLE_PAST, total).repeat(EXAMPLE_BATCH, 1),
        *past,
    )
    in_names, out_names = decoder_input_names(spec.num_layers), decoder_output_names(spec.num_layers)
    kv_in = {n: {0: "batch", 2: "past_sequence"} for n in in_names[4:]}
    kv_out = {n: {0: "batch", 2: "total_sequence"} for n in out_names[1:]}
    return [
        StageGraph("vision_encoder", stages.vision_encoder, (pixel_values,), ["pixel_values"],
                   ["image_features"], {"pixel_values": {0: "images"}}, {"image_features": {0: "images"}}),
        StageGraph("projector", stages.projector, (features,), ["image_features"], ["image_embeds"],
                   {"image_features": feature_dims}, {"image_embeds": {0: "images"}}),
        StageGraph(
            "lm_decoder", stages.lm_decoder, decoder_inputs, in_names, out_names,
            {
                "input_ids": {0: "batch", 1: "sequence"},
                "image_embeds": {0: "image_tokens"},
                "attention_mask": {0: "batch", 1: "total_sequence"},
                "position_ids": {0: "batch", 1: "sequence"},
                **kv_in,
            },
            {"logits": {0: "batch"}, **kv_out},
        ),
    ]
