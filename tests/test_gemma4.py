"""Gemma 4 (the ``gemma4`` adapter): patches of any image size pooled into cells, a text model whose layers differ in
K/V heads and head size, whose last layers share earlier layers' K/V, with per-layer input embeddings and image blocks
attending both ways on its sliding layers. The build itself (parity of every stage, HF generate's tokens alone and
batched on the default samples) is test_export_core's."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import (TWO_IMAGE_TURNS, check_answers_equal_hf_generate, check_patch_rows_equal_hf,
                      check_served_as_in_process, check_text_model_is_a_causal_lm, photos, requests_of_every_size)
from vlm_export.errors import AdapterError

#: (height, width): the largest (70 cells of 2 x 2 patches), wide, tall, tiny, square, odd
SIZES = [(300, 200), (20, 50), (70, 20), (3, 3), (64, 64), (41, 33)]


def _load(folder):
    from vlm_export.adapters import adapter_for

    return adapter_for(folder).load(folder)


def test_each_layers_kv_shape_is_declared_and_shared_layers_keep_none(tiny_build):
    """The full-attention layers' K/V (1 head of 32) differ from the sliding ones' (2 of 16): the geometry lists each
    layer's, the decoder's inputs and outputs take them, and the last two layers (which read layers 2's and 3's K/V)
    have no cache of their own."""
    from vlm_export.contract import DecoderGeometry
    from vlm_export.runtime.load import open_build

    build = tiny_build("gemma4")
    geometry = DecoderGeometry.from_dict(build.manifest["scheme"]["geometry"])
    assert geometry.num_layers == 4 and geometry.layer_kv == ((2, 16), (2, 16), (1, 32), (2, 16))
    assert geometry.prefill_blocks == "images"
    inputs = {t["name"]: t["shape"] for t in build.manifest["graphs"]["lm_decoder"]["inputs"]}
    assert inputs["past_key_values.2.value"] == ["batch", 1, "past_sequence", 32]
    assert inputs["past_key_values.3.key"] == ["batch", 2, "past_sequence", 16]
    assert "past_key_values.4.key" not in inputs
    pipe = open_build(build.path)
    feeds = pipe.scheme.prefill_feeds([[5, 6], [7]], pipe.scheme.empty_image_input())
    assert feeds["past_key_values.2.key"].shape == (2, 1, 0, 32) and feeds["past_key_values.1.key"].shape == (2, 2, 0, 16)
    assert geometry.kv_bytes(10) == 2 * 10 * (3 * 2 * 16 + 32) * 4


def test_fused_form_fuses_the_norms_and_says_why_not_the_attention(tiny_build):
    """Gemma 4's norms (x * (mean(x²) + eps) ** -0.5, one Pow) become ONNX Runtime's norm kernels, every one: each of the
    six layers' five (around attention and MLP, after the per-layer input; the one after the attention's residual Add
    with it), the q norms of six layers and the k and v norms of the four that project K/V, the final one; the
    attention stays as exported (image blocks attend both ways, the kernel masks causally), which the manifest says."""
    fusion = tiny_build("gemma4").manifest["graphs"]["lm_decoder"]["fusion"]
    assert fusion["made"] and fusion["fusions"]["skip_rms_norm"] == 6, fusion
    assert fusion["fusions"]["rms_norm"] + fusion["fusions"]["skip_rms_norm"] == 6 * 5 + 6 + 4 * 2 + 1, fusion
    assert fusion["fusions"]["attention"] == 0 and "both ways" in fusion["kv_copied_because"]


def test_layer_kv_round_trips_and_is_checked():
    """``layer_kv`` is left out of a uniform geometry's manifest form (earlier readers keep reading it), kept in a
    mixed one's, and refused where it does not give each layer's shape starting with layer 0's."""
    from vlm_export.contract import DecoderGeometry

    base = dict(num_layers=2, num_kv_heads=2, head_dim=16, hidden_size=64, vocab_size=100, max_position_embeddings=64)
    assert "layer_kv" not in DecoderGeometry(**base).to_dict()
    mixed = DecoderGeometry(**base, layer_kv=[[2, 16], [1, 32]])  # JSON's lists
    assert DecoderGeometry.from_dict(mixed.to_dict()) == mixed and mixed.kv_shape(1) == (1, 32)
    for wrong in ([(2, 16)], [(1, 32), (2, 16)]):
        with pytest.raises(ValueError, match="layer_kv"):
            DecoderGeometry(**base, layer_kv=wrong)


def test_image_rows_equal_hf_for_every_size(tiny_model_dir):
    """The split tower (cells averaged as consecutive runs of patches) and projector on a padded batch of images of
    every size give Hugging Face's ``get_image_features`` on the processor's own rows (padded to the most cells, each
    image's soft tokens with the padding stripped)."""
    loaded = _load(tiny_model_dir("gemma4"))
    layout = loaded.adapter.prompt_layout(loaded)
    flat, _, _, _ = check_patch_rows_equal_hf(loaded, photos(SIZES, len(SIZES)))
    counts = [layout.image_tiles.tokens(grid) for grid in layout.image_tiles.grids(flat)]
    assert counts == list(flat["num_soft_tokens_per_image"]) and max(counts) <= layout.tokens_per_image == 70


def test_prompt_ids_and_patches_are_the_processors(tiny_build, tiny_model_dir):
    """Each image written as Gemma4Processor writes it (begin-of-image, a soft token per cell, end-of-image: its own
    ``replace_image_token`` on the image processor's counts, the templated text tokenized without more special tokens,
    as its ``apply_chat_template`` does); the image path's rows hold each image's patches from the
    image processor, each at its (x, y) place, and nothing else."""
    from types import SimpleNamespace

    from transformers import AutoImageProcessor, AutoTokenizer, Gemma4Processor

    from vlm_export.runtime.load import open_build

    folder = tiny_model_dir("gemma4")
    pipe = open_build(tiny_build("gemma4").path)
    images = photos(SIZES, 2)
    tokenizer, image_processor = AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
    theirs = image_processor(images=images, return_tensors="np")
    # Gemma4Processor needs torchvision to load (its video processor): its method called as it calls it
    processor = SimpleNamespace(boi_token=tokenizer.boi_token, eoi_token=tokenizer.eoi_token,
                                image_token=tokenizer.image_token)
    text = tokenizer.apply_chat_template(TWO_IMAGE_TURNS, add_generation_prompt=True, tokenize=False)
    parts = text.split(tokenizer.image_token)
    strings = [Gemma4Processor.replace_image_token(processor, theirs, k) for k in range(len(images))]
    assert pipe.prompt_ids(TWO_IMAGE_TURNS, images) == tokenizer(
        parts[0] + "".join(s + p for s, p in zip(strings, parts[1:])), add_special_tokens=False)["input_ids"]
    ours = pipe.pixel_values(images)
    for k in range(len(images)):
        real = ours["patch_mask"][k].astype(bool)
        places = theirs["image_position_ids"][k]
        index = {(int(x), int(y)): i for i, (x, y) in enumerate(places) if x >= 0}
        order = [index[(int(c), int(r))] for r, c in ours["patch_positions"][k][real]]
        assert len(order) == len(index)
        np.testing.assert_array_equal(ours["pixel_values"][k][real], theirs["pixel_values"][k][order])
        assert not ours["pixel_values"][k][~real].any()


def test_answers_equal_hf_generate_alone_and_batched(tiny_build, tiny_model_dir):
    """Images of every size (prompts past the 8-token window), alone and two at once, and text alone: greedy answers =
    Hugging Face generate's (its bidirectional image blocks on the sliding layers), alone and decoded together in one
    batch of left-padded prompts."""
    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build("gemma4").path)
    check_answers_equal_hf_generate(pipe, _load(tiny_model_dir("gemma4")), requests_of_every_size(SIZES))


def test_causal_gemma4_fuses_the_layers_that_write_kv(tiny_build, tiny_model_dir):
    """Where images attend causally (E2B's and E4B's config), the attention of the four layers that write K/V
    becomes GroupQueryAttention (the sliding ones' window in the kernel); the two KV-shared layers read what those
    kernels wrote as it is - a slice of the mask's width, heads grouped by reshapes for a step (no repeat_kv copy
    of the cache), a mask made row by row - so the cache is one shared buffer; the answers of the fused form = Hugging Face generate's, alone and
    batched on that buffer (rows of different lengths, longer than the window)."""
    import onnx

    from vlm_export.contract.scheme import KV_IN_PLACE
    from vlm_export.runtime.load import open_build

    build = tiny_build("gemma4-causal")
    fusion = build.manifest["graphs"]["lm_decoder"]["fusion"]
    assert fusion["fusions"]["attention"] == 4, fusion
    notes = " ".join(fusion["notes"])
    assert "2 attention(s) of KV-shared layers read an earlier layer's K/V as its kernel wrote them" in notes, notes
    assert "3 of 4 attentions apply their sliding window of 8 tokens in the kernel" in notes, notes
    assert fusion["kv_in_place"] and not fusion["kv_copied_because"], fusion
    fused = onnx.load(str(build.path / build.manifest["graphs"]["lm_decoder"]["forms"]["fused"]["file"]),
                      load_external_data=False)
    assert KV_IN_PLACE in {p.key for p in fused.metadata_props}
    presents = {o for n in fused.graph.node if n.op_type == "GroupQueryAttention" for o in n.output[1:]}
    readers = [n.op_type for n in fused.graph.node if set(n.input) & presents]
    assert readers == ["Slice"] * 4, readers  # a shared layer reads its producer's K and V: no repeat_kv copy left
    assert build.manifest["scheme"]["geometry"].get("prefill_blocks", "") == ""
    pipe = open_build(build.path)
    assert pipe.kv_in_place
    check_answers_equal_hf_generate(pipe, _load(tiny_model_dir("gemma4-causal")),
                                    requests_of_every_size(SIZES[:2] + SIZES[4:5]))


def test_a_w8_causal_gemma4_passes_its_gates_on_one_buffer(tiny_model_dir, tmp_path):
    """``decoder=w8`` of the causal Gemma 4: its fused form (GroupQueryAttention where K/V are written, the shared
    layers reading them on one buffer) quantized to MatMulNBits passes the build's parity gates and answers the
    sample prompts as Hugging Face does; the build runs it in place. (The fixture's q/k norm weights give its
    attention a trained model's temperature: with Hugging Face's unit ones every layer magnified rounding ~3x.)"""
    from vlm_export.build import BuildOptions, build
    from vlm_export.precision.convert import PrecisionOptions
    from vlm_export.precision.spec import parse_precision
    from vlm_export.runtime.load import open_build

    # the per-layer projections read 8 inputs: no block of the asymmetric scheme divides them
    options = BuildOptions(precision=parse_precision("decoder=w8"), parity_new_tokens=8,
                           precision_options=PrecisionOptions(weight_scheme="zero-point"))
    result = build(tiny_model_dir("gemma4-causal"), tmp_path / "w8", options)
    decoder = result.manifest["graphs"]["lm_decoder"]
    assert decoder["precision"] == "w8" and decoder["fusion"]["kv_in_place"], decoder
    assert result.manifest["targets"]["onnxruntime"]["lm_decoder"] == "fused"
    assert not result.manifest["parity"]["failures"], result.manifest["parity"]
    assert open_build(result.path).kv_in_place


def test_served_answers_equal_in_process(tiny_build, tmp_path):
    """Served by a real tritonserver over gRPC (tall, wide and small images, three requests at once, a conversation's
    second turn): every answer ``generate``'s in process."""
    check_served_as_in_process(tiny_build("gemma4").path, tmp_path, [(40, 52), (400, 30), (16, 200)])


def test_every_graph_passes_tensorrts_checks(tiny_build):
    """Nothing in the tower, the projector or the decoder (mixed K/V shapes, the per-layer embeddings) that TensorRT
    10's parser is known to refuse."""
    from vlm_export.engines.check import check_build

    report = check_build(tiny_build("gemma4").path)
    assert report.violations == [], report.violations[:3]


def test_text_model_is_gemma4s_causal_lm(tiny_model_dir, tmp_path):
    """The LM written for the peers is Gemma 4's own causal LM (shared K/V layers, per-layer embeddings, the soft
    cap), with the same logits on text."""
    check_text_model_is_a_causal_lm(tiny_model_dir("gemma4"), tmp_path / "lm", "gemma4_text")


@pytest.mark.parametrize("change, needle", [
    ({"text_sizes": {"use_bidirectional_attention": "all"}}, "attends both ways everywhere"),
    ({"cell": 1}, "pools cells of 1 patch"),
])
def test_a_gemma4_without_a_reference_is_refused(tmp_path, change, needle):
    """An embedding model (every token attending both ways), and a tower that pools nothing (Hugging Face's own forward
    then keeps an image's padding instead of its patches): refused in one line at load."""
    from tiny_models import make_tiny_gemma4

    folder = make_tiny_gemma4(tmp_path / "model", **change)
    with pytest.raises(AdapterError, match=needle) as caught:
        _load(folder)
    assert "\n" not in str(caught.value)


def test_quantized_lookups_are_the_tables_dequantized(tiny_build, tmp_path):
    """``--embeddings w8`` on Gemma 4's w8 decoder: its two lookup tables (the token embeddings, tied to the
    head, which by then reads its own quantized copy; the per-layer input embeddings) become GatherBlockQuantized,
    the graph a third of its size, and its logits are those of the same w8 graph with each table replaced by its
    dequantized values - the rewrite is exact; what the rounding costs is the build's gates' to judge (on this random
    tiny model the prefill cosine falls below them)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from vlm_export.precision.convert import PrecisionOptions, make_variant
    from vlm_export.precision.weight_only import quantize_blocks
    from vlm_export.runtime.load import open_build

    build = tiny_build("gemma4")
    src = build.path / "graphs" / "lm_decoder.onnx"
    made = {}
    for lookups in (False, True):
        made[lookups] = make_variant("w8", src, tmp_path / f"w8-{lookups}.onnx",
                                     PrecisionOptions(weight_scheme="zero-point", embeddings="w8" if lookups else "fp32"))
    tables = made[True].details["lookup_tables"]
    assert sorted(tables) == ["lm_head.weight", "text_model.embed_tokens_per_layer.weight"], tables
    assert made[False].details["lookup_tables"].startswith("fp32")
    plain = onnx.load(tmp_path / "w8-False.onnx")
    for init in plain.graph.initializer:
        if init.name in tables:
            t = tables[init.name]
            values = numpy_helper.to_array(init)
            dequantized = quantize_blocks(values.T, 8, t["block_size"], "zero-point").dequantize().T
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(dequantized), init.name))
    assert (tmp_path / "w8-True.onnx").stat().st_size < (tmp_path / "w8-False.onnx").stat().st_size / 2
    scheme = open_build(build.path).scheme
    feeds = scheme.prefill_feeds([[1, 44, 3738, 5, 9, 17], [1, 71, 8]], scheme.empty_image_input())
    quantized = ort.InferenceSession(str(tmp_path / "w8-True.onnx"), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(plain.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in quantized.get_outputs()]
    for name, got, want in zip(names, quantized.run(None, feeds), reference.run(names, feeds)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=name)


def test_an_audio_tower_is_let_go_at_load(tmp_path):
    """E2B and E4B ship an audio tower: the adapter lets it go at load (audio is not supported; nothing reads it), and
    Hugging Face's own generate, the reference, still answers an image prompt without it."""
    import torch

    from tiny_models import make_tiny_gemma4
    from vlm_export.runtime.images import ImageLimits, processed_images

    folder = make_tiny_gemma4(tmp_path / "model", audio=True)
    loaded = _load(folder)
    assert loaded.config.audio_config is not None  # the checkpoint has one
    assert loaded.model.model.audio_tower is None and loaded.model.model.embed_audio is None

    layout = loaded.adapter.prompt_layout(loaded)
    flat = processed_images(loaded.image_processor, photos(SIZES, 1), ImageLimits())
    arranged = {k: torch.from_numpy(v) for k, v in layout.image_tiles.arranged(dict(flat)).items()
                if k in ("pixel_values", "patch_positions", "patch_mask")}
    tokens = int(flat["num_soft_tokens_per_image"][0])
    tok = loaded.tokenizer
    ids = tok(f"{tok.boi_token}{tok.image_token * tokens}{tok.eoi_token} What is it?")["input_ids"]
    assert len(loaded.adapter.reference_generate(loaded, torch.tensor([ids]), arranged, 4, [-1])) == 4
