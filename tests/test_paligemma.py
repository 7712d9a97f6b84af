"""PaliGemma 1 and 2 (PaliGemmaForConditionalGeneration), prefix LMs: the prompt as its own processor lays it
out, the whole prompt attending to itself both ways in the prefill (Hugging Face's token_type_ids 0) and the
answer causally, positions from 1, no prefix reuse. Each build's parity (every stage, HF generate's tokens alone
and batched, both decoder forms) is test_export_core's."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import fp32_gate, random_photo
MODELS = ["paligemma2", "paligemma"]



def _hf(model_dir):
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    model = PaliGemmaForConditionalGeneration.from_pretrained(model_dir, attn_implementation="eager").eval()
    return AutoProcessor.from_pretrained(model_dir), model


@pytest.mark.parametrize("name", MODELS)
def test_prompt_ids_pixels_and_prefill_are_hugging_faces(tiny_build, tiny_model_dir, name):
    """Ids and pixels equal to PaliGemmaProcessor's ("<image>" x N per image, BOS, the prompt, a newline), for
    one image and two; the prefill's logits (fused and standard form) equal to HF's with the processor's
    token_type_ids, which make the prompt attend both ways (without them HF's eager mask is causal, and
    the logits differ by far more than the fp32 gate)."""
    from vlm_export.runtime.load import open_build

    build = tiny_build(name).path
    processor, model = _hf(tiny_model_dir(name))
    pipes = [open_build(build, form=form) for form in ("onnxruntime", "standard")]
    for prompt, images in (("caption en", [random_photo(1)]), ("answer en what is left of the cat?", [random_photo(2), random_photo(3)])):
        theirs = processor(text="<image>" * len(images) + prompt, images=[images], return_tensors="pt")
        assert theirs["token_type_ids"].eq(0).all()
        for pipe in pipes:
            ids = pipe.prompt_ids(prompt, len(images))
            assert ids == theirs["input_ids"][0].tolist()
            np.testing.assert_array_equal(pipe.pixel_values(images), theirs["pixel_values"].numpy())
        inputs = {k: v for k, v in theirs.items() if k != "labels"}
        with torch.no_grad():
            both_ways = model(**inputs).logits[0, -1].numpy()
            causal = model(**{k: v for k, v in inputs.items() if k != "token_type_ids"}).logits[0, -1].numpy()
        assert np.abs(both_ways - causal).max() > 1e-3
        for pipe in pipes:
            logits, _ = pipe.prefill(ids, pipe.encode_images(pipe.pixel_values(images)))
            np.testing.assert_allclose(logits, both_ways, atol=fp32_gate(both_ways), rtol=0,
                                           err_msg=pipe.decoder.backend)


def test_no_prefix_is_reused_and_the_manifest_says_why(tiny_build):
    """Every prompt token's K/V depends on the whole prompt: the scheme gives no prefix keys, so the prefix
    cache reuses nothing and the answers are the same with it on; the fusion pass leaves the attention as
    exported and says so; the standard graph keeps to what TensorRT documents."""
    from vlm_export.engines.check import check_build
    from vlm_export.export.fuse import NOT_CAUSAL
    from vlm_export.runtime.generate import GenerationConfig, GenerationRequest, generate, generate_batch
    from vlm_export.runtime.load import open_build
    from vlm_export.runtime.prefix_cache import PrefixCache

    build = tiny_build("paligemma2").path
    manifest = json.loads((build / "manifest.json").read_text())
    assert manifest["scheme"]["geometry"]["prefill_blocks"] == "prompt"
    fusion = manifest["graphs"]["lm_decoder"]["fusion"]
    assert fusion["fusions"]["attention"] == 0 and f"attention left unfused: {NOT_CAUSAL}" in fusion["notes"]
    assert check_build(build).violations == []

    pipe = open_build(build)
    config = GenerationConfig(max_new_tokens=8)
    requests = [("caption en", [random_photo(k)]) for k in range(3)] + [("caption en", [random_photo(0)])]
    expected = [generate(pipe, p, i, config).token_ids for p, i in requests]
    pipe.prefix_cache = cache = PrefixCache(64 << 20)
    assert pipe.prefix_keys(pipe.prompt_ids("caption en", 1), np.zeros((4, 64), np.float32)) is None
    assert [generate(pipe, p, i, config).token_ids for p, i in requests] == expected
    assert [r.token_ids for r in generate_batch(pipe, [GenerationRequest(p, i, config) for p, i in requests])] \
        == expected
    assert cache.hits == 0 and len(cache) == 0
