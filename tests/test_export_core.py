"""Export core: every registered adapter builds, each stage matches PyTorch, and the ONNX
Runtime build generates the original model's own greedy tokens."""
from __future__ import annotations

import itertools
import json

import numpy as np
import onnx
import pytest
import torch

from conftest import TINY_MODELS, fp32_bound, recorded_notes, tiny_samples
from vlm_export.adapters import adapter_for, registered
from vlm_export.manifest import read_manifest, verify_hashes
from vlm_export.runtime.generate import GenerationConfig, generate
from vlm_export.runtime.load import open_build

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_every_registered_adapter_is_exercised(tiny_model_dir):
    covered = {adapter_for(tiny_model_dir(name)).name for name in TINY_MODELS}
    assert covered == set(registered()), f"adapters without a tiny test model: {set(registered()) - covered}"


#: decoders export/fuse.py matches nothing of (none today: GPT-J's rotary, on the heads before their
#: transpose, stays unfused, but its attention and LayerNorms fuse); the manifest's notes would say why
UNFUSED: set[str] = set()
#: towers whose attention export/image_fuse.py leaves as exported, the reason in the manifest's notes: GOT-OCR 2.0's
#: SAM-style attention (heads folded into the batch, a decomposed relative-position bias added to the scores)
UNFUSED_TOWERS = {"got_ocr2"}


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_build_parity_per_stage(tiny_build, name):
    result = tiny_build(name)
    assert result.failures == []
    report = json.loads((result.path / "report.json").read_text())
    assert report["passed"]
    stages = report["stages"]
    image_stages = [s["name"] for s in result.manifest["stages"] if s["kind"] == "image"]
    encoder_stages = [s["name"] for s in result.manifest["stages"] if s["kind"] == "encoder"]  # bars: test_encdec
    # the decoder in the onnxruntime target's (fused) form, and in the standard form TensorRT reads;
    # a decoder the fusion pass cannot match ships its standard graph alone, the reason recorded
    fusion = result.manifest["graphs"]["lm_decoder"]["fusion"]
    assert fusion["made"] == (name not in UNFUSED), fusion
    forms = ("prefill", "decode", "prefill (standard form)", "decode (standard form)")[:4 if fusion["made"] else 2]
    if not fusion["made"]:
        assert fusion["reason"] and fusion["notes"], fusion
    # an image (or encoder) stage with attention in ONNX Runtime's form too (export/image_fuse.py): its standard
    # graph judged beside it; every tower attention of every family matches the pattern (no notes) but
    # UNFUSED_TOWERS' (notes saying why)
    graphs = result.manifest["graphs"]
    fused_stages = [s for s in (*image_stages, *encoder_stages) if "fused" in (graphs[s].get("forms") or {})]
    assert all(bool(graphs[s]["fusion"]["notes"]) == (name in UNFUSED_TOWERS and s == "vision_encoder")
               for s in image_stages if "fusion" in graphs[s]), name
    assert set(stages) == {*image_stages, *encoder_stages, *forms, *(f"{s} (standard form)" for s in fused_stages)}
    for stage in forms:
        logits = stages[stage]["logits"]
        assert logits["max_abs"] <= fp32_bound(logits["ref_max_abs"]), logits
        assert logits["cosine"] > 0.99999
    for stage in [*image_stages, *(f"{s} (standard form)" for s in fused_stages if s in image_stages)]:
        for name, metrics in stages[stage].items():  # every image stage's every output, in both forms
            assert metrics["max_abs"] <= 1e-4, (stage, name, metrics)
    # greedy tokens identical to the original model's own HF generate, for the split modules in PyTorch and for
    # the ONNX Runtime build, on every sample (conftest.tiny_samples: with and without images; two images where the
    # model takes them), and for the build with every sample batched at once
    for candidate in ("torch_split", "onnxruntime", "onnxruntime batched"):
        runs = report["end_to_end"][candidate]
        assert len(runs) == len(tiny_samples(result.manifest["limits"]["max_images"]))
        for run in runs:
            assert run["identical"], run
            assert len(run["reference"]) > 0
    assert "PASSED" in (result.path / "report.md").read_text()
    # what each step cost: every stage's export and the parity runs among them, each timed
    steps = {c["step"]: c for c in report["cost"]["steps"]}
    assert {f"exporting {s['name']} to ONNX" for s in result.manifest["stages"]} <= set(steps)
    assert any(step.startswith("parity end to end") for step in steps)
    assert all(c["seconds"] >= 0 and (c["peak_bytes"] is None or c["peak_bytes"] > 50e6) for c in steps.values())
    assert "## Build cost" in (result.path / "report.md").read_text()


@pytest.mark.parametrize("name", ["llava-llama", "prefix-llama"])
def test_manifest_and_graphs(tiny_build, name):
    path = tiny_build(name).path
    manifest = read_manifest(path)
    assert verify_hashes(path, manifest) == []
    assert manifest["limits"]["max_image_tokens"] == manifest["limits"]["max_images"] * manifest["limits"]["tokens_per_image"]
    assert manifest["generation"]["eos_token_ids"] == [2]
    assert manifest["scheme"]["name"] == "spliced"
    layers = manifest["scheme"]["geometry"]["num_layers"]
    # every stage's declaration is what its graph really takes and returns
    assert [s["name"] for s in manifest["stages"]] == list(manifest["graphs"])
    for stage in manifest["stages"]:
        graph = manifest["graphs"][stage["name"]]
        for kind in ("inputs", "outputs"):
            assert [(t["name"], t["dtype"], t["dims"]) for t in stage[kind]] == \
                [(t["name"], t["dtype"], t["shape"]) for t in graph[kind]], (stage["name"], kind)
    dec = manifest["graphs"]["lm_decoder"]
    names = [i["name"] for i in dec["inputs"]]
    assert names[:4] == ["input_ids", "image_embeds", "attention_mask", "position_ids"]
    assert len(names) == 4 + 2 * layers
    shapes = {i["name"]: i["shape"] for i in dec["inputs"] + dec["outputs"]}
    assert shapes["input_ids"] == ["batch", "sequence"]
    assert shapes["past_key_values.0.key"][::2] == ["batch", "past_sequence"]
    assert shapes["present.1.value"][2] == "total_sequence"
    assert shapes["logits"][:2] == ["batch", 1]  # last position only
    assert manifest["graphs"]["vision_encoder"]["inputs"][0]["shape"][0] == "images"
    for graph in manifest["graphs"].values():
        onnx.checker.check_model(str(path / graph["file"]))
    # no leftovers from the atomic write
    assert not [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]


def test_onnxruntime_generate_equals_hf_generate(tiny_build, tiny_model_dir):
    """The public generate() (prompt text + image file) against LlavaForConditionalGeneration.generate."""
    from skimage import data
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    from PIL import Image

    build = tiny_build("llava-llama").path
    src = tiny_model_dir("llava-llama")
    image = Image.fromarray(data.rocket())  # not among the build's parity samples
    pipe = open_build(build)
    result = generate(pipe, "What is shown here?", [image], GenerationConfig(max_new_tokens=32))

    model = LlavaForConditionalGeneration.from_pretrained(src).eval()
    tok, proc = AutoTokenizer.from_pretrained(src), AutoImageProcessor.from_pretrained(src)
    ids = torch.tensor([pipe.prompt_ids("What is shown here?", 1)])
    pixels = torch.from_numpy(proc(images=[image.convert("RGB")], return_tensors="np")["pixel_values"])
    with torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                             max_new_tokens=32, do_sample=False, eos_token_id=2, pad_token_id=2)
    expected = [t for t in out[0, ids.shape[1]:].tolist()]
    if 2 in expected:
        expected = expected[: expected.index(2)]
    assert result.token_ids == expected
    assert result.text == tok.decode(expected, skip_special_tokens=True)
    assert result.prompt_tokens == ids.shape[1]


def test_sampling_is_seeded_and_top_p_narrows(tiny_build):
    pipe = open_build(tiny_build("llava-llama").path)
    greedy = generate(pipe, "Tell me a story.", [], GenerationConfig(max_new_tokens=12))
    a = generate(pipe, "Tell me a story.", [], GenerationConfig(max_new_tokens=12, temperature=1.5, seed=7))
    b = generate(pipe, "Tell me a story.", [], GenerationConfig(max_new_tokens=12, temperature=1.5, seed=7))
    c = generate(pipe, "Tell me a story.", [], GenerationConfig(max_new_tokens=12, temperature=1.5, seed=8))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids  # random tiny model: near-flat logits, so seeds differ
    # a tiny nucleus keeps only the top token: sampling becomes greedy; so does top_p 0 (OpenAI's API takes it),
    # top-k 1 and min-p 1 (the logits have no ties); a wide top-k and a small min-p keep the sampled answer
    for narrowing in (dict(top_p=1e-6), dict(top_p=0.0), dict(top_k=1), dict(min_p=1.0)):
        narrow = generate(pipe, "Tell me a story.", [], GenerationConfig(max_new_tokens=12, temperature=1.0, seed=3,
                                                                         **narrowing))
        assert narrow.token_ids == greedy.token_ids, narrowing
    wide = generate(pipe, "Tell me a story.", [], GenerationConfig(max_new_tokens=12, temperature=1.5, seed=7,
                                                                   top_k=10**6, min_p=1e-12))
    assert wide.token_ids == a.token_ids


def test_stop_strings_and_finish_reasons(tiny_build):
    from vlm_export.runtime.generate import GenerationResult, TokenEvent, stream

    pipe = open_build(tiny_build("llava-llama").path)
    full = generate(pipe, "Say something.", [], GenerationConfig(max_new_tokens=16))
    assert full.finish_reason == "length" and full.completion_tokens == 16
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    events = list(stream(pipe, "Say something.", [], GenerationConfig(max_new_tokens=16, stop=(stop,))))
    final = events[-1]
    assert isinstance(final, GenerationResult) and final.finish_reason == "stop"
    assert final.text == full.text[: full.text.find(stop)]
    assert "".join(e.text for e in events if isinstance(e, TokenEvent)) == final.text


@pytest.mark.parametrize("stop", [(), ("日本",), ("本 t",)])
def test_streamed_text_waits_for_whole_characters_of_a_byte_fallback_tokenizer(stop):
    """A Llama 2 tokenizer (LLaVA-1.5's) writes a character outside its vocabulary as one token per UTF-8
    byte, and decodes a partial one as one U+FFFD per byte so far: the stream holds the whole run back,
    so no U+FFFD goes out and the pieces add up to the text, a stop string across such a character too."""
    from tiny_models import make_sentencepiece_tokenizer
    from vlm_export.runtime.generate import TextStream

    tok = make_sentencepiece_tokenizer()
    text = "a cat 😀 on 日本 the table"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert sum(t.startswith("<0x") for t in tok.convert_ids_to_tokens(ids)) == 10  # 4 + 3 + 3 bytes
    stream, pieces = TextStream(tok, stop), []
    for token in ids:
        event = stream.push(token)
        pieces += [event.text] if event else []
        if stream.stopped:
            break
    pieces += [e.text for e in [stream.flush()] if e]
    expected = text[:text.find(stop[0])] if stop else text
    assert stream.text == expected and "".join(pieces) == expected
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_streamed_text_is_decoded_incrementally_and_equals_the_whole_decode(kind):
    """The stream decodes each token with the few before it for context, not the whole answer again:
    its text is the tokenizer's decode of every token (the space a SentencePiece tokenizer strips at a
    sequence's start kept mid-text, characters split over tokens joined, newlines and runs of spaces
    as written) and the pieces add up to it; on random ids too (bytes that never make a character: a
    byte-fallback tokenizer's run of them decoded whole, as the whole decode does)."""
    from tiny_models import make_sentencepiece_tokenizer, smollm2_tokenizer_dir
    from transformers import AutoTokenizer

    from vlm_export.runtime.generate import TextStream, byte_fallback_ids

    tok = make_sentencepiece_tokenizer() if kind == "sentencepiece" else AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    read: list[int] = []

    class Counting:  # the tokenizer, noting how many tokens each decode reads
        def decode(self, ids, **kw):
            read.append(len(ids))
            return tok.decode(ids, **kw)

        def __getattr__(self, name):
            return getattr(tok, name)

    def streamed(ids: list[int]) -> str:
        stream, pieces = TextStream(Counting(), ()), []
        for token in ids:
            pieces += [e.text for e in [stream.push(token)] if e]
        pieces += [e.text for e in [stream.flush()] if e]
        assert "".join(pieces) == stream.text
        return stream.text

    texts = ["A cat sat on the table.\nThen   it left, \u65e5\u672c\u8a9e \U0001f600 caf\u00e9!",
             " leading space, tabs\t\tand a trailing one "]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"] * 4
        assert len(ids) > 40 and streamed(ids) == tok.decode(ids, skip_special_tokens=True)
    # the context and the unread tokens, not the whole answer: at most a run of byte tokens (a byte-fallback
    # tokenizer's 9 for three CJK characters) and the few around it
    runs = [len(list(run)) for text in texts for is_byte, run in
            itertools.groupby(tok(text, add_special_tokens=False)["input_ids"], lambda t: t in byte_fallback_ids(tok))
            if is_byte]
    longest_run = max(runs, default=0)
    assert max(read) <= max(6, longest_run + 6)
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.integers(0, len(tok), 60).tolist()
        assert streamed(ids) == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_a_tokens_bytes_are_its_part_of_the_text(kind):
    """Each token's text (a logprob's ``token``) keeps the space it starts with, and its bytes - a byte
    token's, or part of a character from a byte-level vocabulary, where the text alone is U+FFFD - join
    into the text's UTF-8 (a SentencePiece tokenizer's first space included)."""
    from tiny_models import make_sentencepiece_tokenizer, smollm2_tokenizer_dir
    from transformers import AutoTokenizer

    from vlm_export.runtime.generate import token_text

    tok = make_sentencepiece_tokenizer() if kind == "sentencepiece" else AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    text = " a cat \U0001f600 on \u65e5\u672c \u2014 caf\u00e9"
    pieces = [token_text(tok, i) for i in tok(text, add_special_tokens=False)["input_ids"]]
    assert any("\ufffd" in p.text for p in pieces)  # some are parts of characters
    assert b"".join(bytes(p.bytes) for p in pieces).decode() == text
    assert [p.text for p in pieces if "\ufffd" not in p.text] == [bytes(p.bytes).decode() for p in pieces
                                                                  if "\ufffd" not in p.text]


def test_stage_graphs_run_other_shapes(tiny_build):
    """Dynamic dims really are dynamic: 3 images at once, a prefill of 1 token, batch 3 decode."""
    pipe = open_build(tiny_build("llava-llama").path)
    rng = np.random.default_rng(0)
    feats = pipe.runners["vision_encoder"].infer({"pixel_values": rng.standard_normal((3, 3, 32, 32), dtype=np.float32)})
    assert feats["image_features"].shape[0] == 3
    scheme, no_images = pipe.scheme, pipe.scheme.empty_image_input()
    out = pipe.decode(scheme.prefill_feeds([[5]], no_images))
    assert out["logits"].shape == (1, 1, 49152)
    out = pipe.decode(scheme.prefill_feeds([[5, 6]] * 3, no_images))
    out = pipe.decode(scheme.step_feeds(scheme.prefill_state(out, [2, 2, 2]), np.array([7] * 3)))
    assert out["logits"].shape == (3, 1, 49152)


@pytest.mark.parametrize("form", ["onnxruntime", "tensorrt"])
def test_a_generated_image_token_is_text_as_in_hugging_face(tiny_build, tiny_model_dir, form):
    """A model may generate its own image token; a decode step (no image rows) embeds it as the token
    it is, as Hugging Face's generate does, in both graph forms (a placeholder past the rows indexed
    outside the image table before)."""
    from transformers import LlavaForConditionalGeneration

    pipe = open_build(tiny_build("llava-llama").path, form=form)
    scheme = pipe.scheme
    text = pipe.prompt_ids("Tell me a story.", 0)
    out = pipe.decode(scheme.prefill_feeds([text], scheme.empty_image_input()))
    step = pipe.decode(scheme.step_feeds(scheme.prefill_state(out, [len(text)]), np.array([scheme.image_token_id])))
    model = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir("llava-llama"), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([text + [scheme.image_token_id]])).logits[0, -1].numpy()
    np.testing.assert_allclose(step["logits"][0, -1], expected, atol=1e-4)


def test_verify_reruns_parity(tiny_build):
    from vlm_export.build import BuildOptions, verify

    result = verify(tiny_build("prefix-llama").path, BuildOptions(parity_new_tokens=8))
    assert result.failures == []


def test_parity_runs_onnx_runtime_only_after_the_pytorch_weights_are_freed(tiny_build, monkeypatch):
    """The reference side is recorded first, then the model's weights go (so the model and a session of
    the decoder never hold memory together); every form still gets the reference's numbers."""
    import vlm_export.build as build_module
    from vlm_export.build import BuildOptions, verify

    released, opened = [], []

    def release(loaded, reference):
        release_weights(loaded, reference)
        released.append(loaded)

    def open_after_release(*args, **kwargs):
        opened.append((kwargs.get("form"), kwargs.get("stage_forms")))
        assert released, "an ONNX Runtime form opened while the PyTorch model still held its weights"
        return open_build(*args, **kwargs)

    path = tiny_build("llava-llama").path  # built before the patches (its build goes the same way)
    release_weights = build_module.release_weights
    monkeypatch.setattr(build_module, "release_weights", release)
    monkeypatch.setattr(build_module, "open_build", open_after_release)
    result = verify(path, BuildOptions(parity_new_tokens=8))
    assert result.failures == []
    # the standard form of every stage that ships one beside its fused form (the tower's and the decoder's), then the
    # candidate
    assert opened == [("onnxruntime", {"vision_encoder": "standard", "lm_decoder": "standard"}), ("onnxruntime", None)]
    assert all(p.numel() == 0 for p in released[0].model.parameters())
    report = json.loads((path / "report.json").read_text())
    assert {"prefill", "decode", "prefill (standard form)", "decode (standard form)"} <= set(report["stages"])
    assert not (path / build_module.PARITY_SCRATCH).exists()  # the recorded arrays are gone


def test_the_references_arrays_wait_on_disk_each_written_once(tmp_path):
    from vlm_export.compare.parity import ArrayStore

    store = ArrayStore(tmp_path)
    present = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    empty = np.zeros((1, 3, 0, 4), np.float32)  # a prefill's past: no positions yet
    prefill = store.put({"past": empty, "present": present})
    step = store.put({"past": present})  # the prefill's present fed back as the step's past
    assert step["past"] == prefill["present"] and len(list(tmp_path.glob("*.npy"))) == 2
    store.forget()  # the next sample: the same object may now be a new array, written anew
    assert store.put({"again": present})["again"] != prefill["present"]
    back = ArrayStore.get(prefill)
    assert back["past"].shape == (1, 3, 0, 4) and np.array_equal(back["present"], present)


def test_verify_flags_graphs_changed_since_the_build(tiny_build, tmp_path):
    import shutil

    from vlm_export.build import BuildOptions, verify

    copy = tmp_path / "build"
    shutil.copytree(tiny_build("prefix-llama").path, copy)
    graph = onnx.load(str(copy / "graphs" / "projector.onnx"))
    onnx.helper.set_model_props(graph, {"edited": "by hand"})  # still a valid graph, different bytes
    onnx.save(graph, str(copy / "graphs" / "projector.onnx"))
    result = verify(copy, BuildOptions(parity_new_tokens=4))
    assert result.failures == ["graphs/projector.onnx changed since the build (sha256 mismatch)"]


def test_llava_tokens_per_image_follow_the_tower(tiny_model_dir):
    """CLIP's positions include a CLS token, SigLIP's do not: the adapter counts what the tower emits
    (less the first token for "default"), never the family."""
    from transformers import AutoConfig

    for name, want in (("llava-llama", 16), ("llava-siglip-qwen3", 16), ("llava-qwen2-full-multilayer", 17),
                       ("llava-gemma3", 36)):
        path = tiny_model_dir(name)
        adapter = adapter_for(path)
        loaded = adapter.load(path)
        assert adapter.prompt_layout(loaded).tokens_per_image == want, name
        v = AutoConfig.from_pretrained(path).vision_config
        assert (v.image_size // v.patch_size) ** 2 == want - (1 if "full" in name else 0)


@pytest.mark.parametrize("name", ["llava-gemma3", "llava-llama2-tokenizer"])
def test_prompt_ids_equal_the_llava_processors_own(tiny_build, tiny_model_dir, name):
    """A checkpoint saved as llava-hf saves one (LlavaProcessor, a chat template over typed content parts
    that writes "<image>" itself): the build's prompt ids for one turn, for a conversation and for text
    outside the vocabulary (bytes, for the Llama 2 tokenizer) are the ones the model's own processor
    makes, its BOS included; a text LM's template (SmolLM2's) keeps string turns."""
    from PIL import Image
    from transformers import AutoProcessor

    from vlm_export.datasets import load_split

    assert open_build(tiny_build(name).path).layout.chat_parts
    assert not open_build(tiny_build("llava-llama").path).layout.chat_parts
    processor = AutoProcessor.from_pretrained(tiny_model_dir(name))
    pipe = open_build(tiny_build(name).path)
    image = Image.open(load_split("test", 1)[0].image).convert("RGB")
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is it?"}]}]
    chat = turn + [{"role": "assistant", "content": [{"type": "text", "text": "circle"}]},
                   {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And \u3053\u308c, \U0001f600?\n"}]}]
    for messages in (turn, chat):
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        images = [image] * sum(p["type"] == "image" for m in messages for p in m["content"])
        want = processor(text=text, images=images, return_tensors="np")["input_ids"][0].tolist()
        assert want[0] == processor.tokenizer.bos_token_id
        assert pipe.prompt_ids(messages, len(images)) == want
    assert pipe.prompt_ids("What shape is it?", 1) == pipe.prompt_ids(turn, 1)


def test_prompt_ids_follow_the_processor_without_a_template_and_beside_a_tokenizers_own(tiny_model_dir, tmp_path):
    """The llava-hf checkpoint's folder two other ways: no chat template at all (the processor tokenizes the
    plain text with its tokenizer's BOS), and the processor's template in chat_template.json beside a
    text-only one in tokenizer_config.json (LlavaProcessor renders with its own): ids as the processor's;
    without a template, a raw prompt that writes the image token where each image goes, as the processor
    takes it (refused where a template places the images)."""
    import shutil

    from PIL import Image
    from transformers import AutoProcessor

    from vlm_export.errors import InputError
    from vlm_export.runtime.prompt import build_prompt_ids

    image, question = Image.new("RGB", (40, 30), (200, 30, 30)), "What shape is it?"
    plain, beside = tmp_path / "plain", tmp_path / "beside"
    for folder in (plain, beside):
        shutil.copytree(tiny_model_dir("llava-gemma3"), folder)
    (plain / "chat_template.jinja").unlink()
    template = (beside / "chat_template.jinja").read_text()
    (beside / "chat_template.jinja").unlink()
    (beside / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    config = json.loads((beside / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    (beside / "tokenizer_config.json").write_text(json.dumps(config))

    for folder in (plain, beside):
        processor = AutoProcessor.from_pretrained(folder)
        if folder == plain:
            assert not processor.chat_template
            text = f"{processor.image_token}\n{question}"
        else:
            assert processor.chat_template == template and processor.tokenizer.chat_template != template
            text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                  "text": question}]}], add_generation_prompt=True)
        want = processor(text=text, images=[image], return_tensors="np")["input_ids"][0].tolist()
        assert want[0] == processor.tokenizer.bos_token_id
        adapter = adapter_for(folder)
        loaded = adapter.load(folder)
        assert build_prompt_ids(loaded.tokenizer, adapter.prompt_layout(loaded), question, 1) == want, folder.name
        # a raw prompt that writes the image token where each image goes (LLaVA-1.5's "USER: <image>\n..."):
        # as written where no template lays it out, as the processor takes it; refused where one does
        raw = f"USER: {processor.image_token}\n{question} ASSISTANT:"
        layout = adapter.prompt_layout(loaded)
        if folder == plain:
            for prompt, images in ((raw, [image]), (raw.replace("\n", f" and {processor.image_token}\n"), [image] * 2)):
                want = processor(text=prompt, images=images, return_tensors="np")["input_ids"][0].tolist()
                assert build_prompt_ids(loaded.tokenizer, layout, prompt, len(images)) == want
            with pytest.raises(InputError, match=r"writes the image token '<image>' 1 time\(s\) for 2 image\(s\)"):
                build_prompt_ids(loaded.tokenizer, layout, raw, 2)
        else:
            with pytest.raises(InputError, match="contains the image token '<image>' itself.*chat template places"):
                build_prompt_ids(loaded.tokenizer, layout, raw, 1)


def test_the_kv_geometry_is_the_cache_the_lm_writes():
    """Read from one token's cache, not the config's spelling: Falcon's multi-query keeps one KV head (its
    config has no such count), an ALiBi LM (BLOOM) has no position table to bound the sequence, and a
    state-space LM (Mamba) keeps no keys and values at all, a hybrid (Falcon-H1) more than them: refused in
    one line."""
    from transformers import AutoConfig, AutoModel

    from vlm_export.adapters.decoder import text_geometry
    from vlm_export.errors import AdapterError

    def geometry(model_type, **kw):
        cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, **kw)
        return text_geometry(cfg, AutoModel.from_config(cfg).eval())

    falcon = geometry("falcon", num_hidden_layers=3, num_attention_heads=4, multi_query=True,
                      new_decoder_architecture=False)
    assert (falcon.num_layers, falcon.num_kv_heads, falcon.head_dim, falcon.max_position_embeddings) == (3, 1, 8, 2048)
    bloom = geometry("bloom", n_layer=2, n_head=4)
    assert (bloom.num_kv_heads, bloom.head_dim, bloom.max_position_embeddings) == (4, 8, None)
    with pytest.raises(AdapterError, match=r"^the language model \(mamba\) returned a DynamicCache whose layers do not "
                                           r"all hold one token's keys, not a transformer's KV cache .*not supported here "
                                           r"\(the qwen3_5 and lfm3_vl adapters .*\)$"):
        geometry("mamba", num_hidden_layers=2, state_size=4)
    # a hybrid (Falcon-H1: Mamba-2 mixers beside attention) caches one token's keys per layer too, and its
    # conv and recurrent state beside them: refused here, not in the exporter's tracer
    with pytest.raises(AdapterError, match=r"^the language model \(falcon_h1\) keeps conv_states, recurrent_states "
                                           r"beside its keys and values \(a hybrid of attention and state-space or "
                                           r"linear-attention layers\), not a transformer's KV cache .*not supported here "
                                           r"\(the qwen3_5 and lfm3_vl adapters .*\)$"):
        geometry("falcon_h1", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                 intermediate_size=64)
    # a model whose own forward fails (Helium's o_proj is hidden x hidden, so a head size other than hidden / heads
    # breaks it): said as that, not as a cache of the wrong kind
    with pytest.raises(AdapterError, match=r"^the language model \(helium\) fails to run one token with a cache in "
                                           r"PyTorch \(RuntimeError: mat1 and mat2 shapes cannot be multiplied"):
        geometry("helium", num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    # DeepSeek-V3's latent attention caches keys of 16 (8 without rotary + 8 with) and values of 8 per head
    with pytest.raises(AdapterError, match=r"^the language model \(deepseek_v3\) keeps values of another shape than "
                                           r"its keys \(keys \(\d+, 1, 16\), values \[\(\d+, 1, 8\)\].*not supported$"):
        geometry("deepseek_v3", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
                 n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16,
                 qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)


@pytest.mark.parametrize("family", ["cohere", "gemma2", "gptj", "falcon-mq"])
def test_a_wrapped_causal_lms_logits_are_its_own_forwards(tmp_path, family):
    """A model that calls a whole causal LM (PrefixVLM here, BLIP-2 the same way) samples from that LM's
    own logits: Cohere scales them (x 1/16), Gemma 2 soft-caps them (a cap set low enough to bite), and
    GPT-J / Falcon keep their base model under another name than Llama's ``model``. The decoder stage
    gives those logits at prefill and at a decode step on its own cache."""
    from tiny_models import make_tiny_prefix
    from vlm_export.adapters.prefix import PrefixAdapter

    adapter = PrefixAdapter()
    loaded = adapter.load(make_tiny_prefix(tmp_path / family, family=family))
    lm = loaded.model.text
    if family == "gemma2":
        lm.config.final_logit_softcapping = 0.05
    decoder = adapter.stages(loaded)[-1].module
    geometry = adapter.geometry(loaded)
    ids = torch.tensor([[1, 100, 200, 300, 400, 500]])
    empty = torch.zeros(0, geometry.hidden_size)
    past = [torch.zeros(1, geometry.num_kv_heads, 0, geometry.head_dim)] * (2 * geometry.num_layers)
    with torch.no_grad():
        expected = lm(input_ids=ids).logits
        prefill, *present = decoder(ids[:, :5], empty, torch.ones(1, 5, dtype=torch.long), torch.arange(5)[None], *past)
        step, *_ = decoder(ids[:, 5:], empty, torch.ones(1, 6, dtype=torch.long), torch.tensor([[5]]), *present)
    torch.testing.assert_close(prefill[:, -1], expected[:, 4], rtol=0, atol=1e-5)
    torch.testing.assert_close(step[:, -1], expected[:, 5], rtol=0, atol=1e-5)
    if family == "gemma2":
        assert expected.abs().max() <= 0.05  # the cap is applied (the tiny model's raw logits reach ~0.6)


@pytest.mark.parametrize("tower, tokens", [("vit", 16), ("dinov2", 16), ("dinov2-registers", 18)])
def test_llava_with_a_vit_or_dinov2_tower_counts_the_tokens_it_emits(tmp_path, tower, tokens):
    """ViT and DINOv2 towers declare no position count (they interpolate theirs) and DINOv2 may add
    register tokens, which HF's LLaVA keeps ("default" drops only the first token): the adapter
    counts what the tower emits, which is what HF's LLaVA splices. The registers' tower is built
    and proven end to end."""
    from transformers import LlavaForConditionalGeneration

    from tiny_models import make_tiny_llava
    from vlm_export.build import BuildOptions, build

    path = make_tiny_llava(tmp_path / "model", tower=tower)
    adapter = adapter_for(path)
    loaded = adapter.load(path)
    assert adapter.prompt_layout(loaded).tokens_per_image == tokens
    hf = LlavaForConditionalGeneration.from_pretrained(path).eval()
    with torch.no_grad():
        features = hf.model.get_image_features(torch.zeros(1, 3, 32, 32), vision_feature_layer=-2,
                                               vision_feature_select_strategy="default")
    features = getattr(features, "pooler_output", features)  # transformers 5 returns the projections there
    features = features[0] if isinstance(features, (list, tuple)) else features
    assert features.reshape(-1, features.shape[-1]).shape[0] == tokens
    if tower == "dinov2-registers":
        assert build(path, tmp_path / "build", BuildOptions(max_sequence=128, parity_new_tokens=8)).failures == []


def test_llava_reading_the_towers_embeddings_output_builds(tmp_path):
    """vision_feature_layer 0 (the tower's embeddings, before any layer): transformers' own forward
    asks the tower for hidden states only where that value is truthy, so it fails at 0; the
    reference names the same layer as a list, and the build's parity holds against it."""
    from tiny_models import make_tiny_llava
    from vlm_export.build import BuildOptions, build

    path = make_tiny_llava(tmp_path / "model", feature_layer=0, strategy="full")
    result = build(path, tmp_path / "build", BuildOptions(max_sequence=128, parity_new_tokens=8))
    assert result.failures == []


def test_llava_with_a_variable_resolution_tower_is_llava_pixtrals(tmp_path):
    """A LLaVA with a Pixtral tower (its tokens per image vary with each image) is the llava_pixtral adapter's, which
    refuses this one in a line (LLaVA's "default" feature strategy: no class token to drop); the llava adapter, asked
    by name, refuses the tower in a line."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, PixtralVisionConfig

    from tiny_models import IMAGE_TOKEN_ID, _save_tokenizer_and_processor, _text_config
    from vlm_export.errors import AdapterError

    vision = PixtralVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2, head_dim=16)
    cfg = LlavaConfig(vision_config=vision, text_config=_text_config("llama"), image_token_id=IMAGE_TOKEN_ID)
    LlavaForConditionalGeneration(cfg).save_pretrained(tmp_path)
    _save_tokenizer_and_processor(tmp_path, 32)
    assert adapter_for(tmp_path).name == "llava_pixtral"
    with pytest.raises(AdapterError, match="a Pixtral tower gives no class token to drop") as e:
        adapter_for(tmp_path).load(tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(AdapterError, match="'pixtral' vision tower made .* not one row of tokens per image") as e:
        adapter_for(tmp_path, "llava").load(tmp_path)
    assert "\n" not in str(e.value)


def test_checkpoints_hugging_face_cannot_run_are_refused_at_load(tiny_model_dir, tmp_path):
    """Refused in one line before any export (Hugging Face's own forward fails on each): an image token
    added to the tokenizer without resizing the embeddings, a processor whose images are not the
    size the vision tower takes (its size wrong, or no resizing), a vision_feature_layer the tower
    does not have, and a processor writing another count of image tokens than the tower has features."""
    import shutil

    from vlm_export.errors import AdapterError

    oov = tmp_path / "oov"
    shutil.copytree(tiny_model_dir("llava-llama"), oov)
    config = json.loads((oov / "config.json").read_text())
    config["image_token_id"] = config["text_config"]["vocab_size"]
    (oov / "config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=r"outside the language model's \d+ token embeddings.*resize_token_embeddings"):
        adapter_for(oov).load(oov)

    resized = tmp_path / "resized"
    shutil.copytree(tiny_model_dir("llava-llama"), resized)
    processor = json.loads((resized / "preprocessor_config.json").read_text())
    processor["crop_size"] = {"height": 48, "width": 48}
    processor["size"] = {"shortest_edge": 48}
    (resized / "preprocessor_config.json").write_text(json.dumps(processor))
    with pytest.raises(AdapterError, match=r"makes 48x48 images but the vision tower takes 32x32 \(vision_config.image_size\); fix size") as e:
        adapter_for(resized).load(resized)
    assert "\n" not in str(e.value)
    processor.update(crop_size={"height": 32, "width": 32}, size={"shortest_edge": 32}, do_resize=False,
                     do_center_crop=False)  # the size is right, but nothing resizes to it
    (resized / "preprocessor_config.json").write_text(json.dumps(processor))
    with pytest.raises(AdapterError, match="makes 61x97 images .* it does not resize .*: set do_resize true"):
        adapter_for(resized).load(resized)
    saved_with_processor = tmp_path / "hf"  # transformers 5 keeps the image processor in processor_config.json
    shutil.copytree(tiny_model_dir("llava-gemma3"), saved_with_processor)
    processor = json.loads((saved_with_processor / "processor_config.json").read_text())
    processor["image_processor"].update(crop_size={"height": 64, "width": 64}, size={"shortest_edge": 64})
    (saved_with_processor / "processor_config.json").write_text(json.dumps(processor))
    with pytest.raises(AdapterError, match=r'makes 64x64 images .* in its processor_config.json \("image_processor"\)'):
        adapter_for(saved_with_processor).load(saved_with_processor)

    layers = json.loads((tiny_model_dir("llava-llama") / "config.json").read_text())["vision_config"]["num_hidden_layers"]
    for bad in (layers + 1, -(layers + 2), [layers + 3]):  # HF's forward: IndexError
        wrong = tmp_path / f"layer{bad}"
        shutil.copytree(tiny_model_dir("llava-llama"), wrong)
        config = json.loads((wrong / "config.json").read_text())
        config["vision_feature_layer"] = bad
        (wrong / "config.json").write_text(json.dumps(config))
        with pytest.raises(AdapterError, match=rf"vision_feature_layer .* {layers}-layer vision tower has {layers + 1}") as e:
            adapter_for(wrong).load(wrong)
        assert "\n" not in str(e.value)

    # a LlavaProcessor writing another count of image tokens than the tower's features (HF: "Image features and
    # image tokens do not match"): the processor's own settings named, with the ones that fit
    for change in ({"num_additional_image_tokens": 0}, {"patch_size": 16}, {"vision_feature_select_strategy": "full"}):
        wrong = tmp_path / f"processor-{next(iter(change))}"
        shutil.copytree(tiny_model_dir("llava-gemma3"), wrong)
        processor = json.loads((wrong / "processor_config.json").read_text())
        (wrong / "processor_config.json").write_text(json.dumps({**processor, **change}))
        with pytest.raises(AdapterError, match=r"LlavaProcessor .* writes \d+ image tokens per image .* tower gives 36 "
                           r"features .*: set patch_size 8, num_additional_image_tokens 1, vision_feature_select_strategy "
                           r"'default' in processor_config.json") as e:
            adapter_for(wrong).load(wrong)
        assert "\n" not in str(e.value)
    assert adapter_for(tiny_model_dir("llava-gemma3")).load(tiny_model_dir("llava-gemma3"))  # its own settings fit


def test_an_lm_whose_token_embeddings_are_narrower_than_its_hidden_size_is_refused(tmp_path):
    """OPT-350m projects 512-wide word embeddings to its 1024 hidden size: image embeddings (hidden
    wide) cannot take token positions (HF's masked_scatter cuts them up silently). One line, no folder."""
    from transformers import OPTConfig

    from tiny_models import _blip_text_tokenizer, _padded_vocab, _save_tiny_blip2
    from vlm_export.build import BuildOptions, build
    from vlm_export.errors import AdapterError

    tok = _blip_text_tokenizer()
    text = OPTConfig(vocab_size=_padded_vocab(len(tok)), hidden_size=64, word_embed_proj_dim=32, ffn_dim=128,
                     num_hidden_layers=1, num_attention_heads=4, do_layer_norm_before=False,
                     eos_token_id=2, bos_token_id=1, pad_token_id=2)
    _save_tiny_blip2(tmp_path / "model", tok, text, 0, 4)
    with pytest.raises(AdapterError, match="token embeddings are 32 wide but its hidden size .* is 64") as e:
        build(tmp_path / "model", tmp_path / "build", BuildOptions(max_sequence=128))
    assert "\n" not in str(e.value) and not (tmp_path / "build").exists()


def test_a_checkpoint_without_a_chat_template_gets_the_one_given(tiny_model_dir, tmp_path):
    """A llava-hf checkpoint saved without its chat template: the build says so and sends prompts as
    written; ``--chat-template FILE`` gives the one the model was trained with: the prompt ids are
    then its processor's own with that template, the build keeps it (the manifest's source, for
    verify's reference, and the tokenizer folder), and a template that is empty, does not render,
    or goes to a model whose prompts take none is refused in one line before any export."""
    import shutil

    from PIL import Image
    from transformers import AutoProcessor

    from tiny_models import LLAVA_HF_CHAT_TEMPLATE
    from vlm_export.adapters.reference import open_reference
    from vlm_export.build import BuildOptions, build
    from vlm_export.datasets import load_split
    from vlm_export.errors import AdapterError, BuildError

    model = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir("llava-gemma3"), model)
    for f in model.glob("chat_template.*"):
        f.unlink()
    assert not AutoProcessor.from_pretrained(model).chat_template
    progress = recorded_notes()
    plain = build(model, tmp_path / "plain", BuildOptions(parity_new_tokens=2), progress)
    assert any("ships no chat template" in n and "--chat-template FILE" in n for n in progress.lines)
    pipe = open_build(plain.path)
    assert pipe.tokenizer.decode(pipe.prompt_ids("What shape is it?", 1)).endswith("<image>\nWhat shape is it?")

    template = tmp_path / "llava.jinja"
    template.write_text(LLAVA_HF_CHAT_TEMPLATE)
    result = build(model, tmp_path / "templated", BuildOptions(parity_new_tokens=2, chat_template=template))
    assert result.manifest["source"]["chat_template"] == LLAVA_HF_CHAT_TEMPLATE and result.manifest["parity"]["passed"]
    pipe, processor = open_build(result.path), AutoProcessor.from_pretrained(model)
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is it?"}]}]
    image = Image.open(load_split("test", 1)[0].image).convert("RGB")
    text = processor.apply_chat_template(turn, add_generation_prompt=True, chat_template=LLAVA_HF_CHAT_TEMPLATE)
    want = processor(text=text, images=[image], return_tensors="np")["input_ids"][0].tolist()
    assert pipe.prompt_ids(turn, 1) == want and pipe.layout.chat_parts
    assert open_reference(result.path).prompt_ids(turn, 1) == want  # verify's reference makes the same prompt

    for bad, why in (("", "is empty"), ("{% for m in messages %}{{ m['role'] }", "does not render a user turn")):
        template.write_text(bad)
        with pytest.raises(AdapterError, match=why) as e:
            build(model, tmp_path / "bad", BuildOptions(chat_template=template))
        assert "\n" not in str(e.value) and not (tmp_path / "bad").exists()
    template.write_text(LLAVA_HF_CHAT_TEMPLATE)
    with pytest.raises(BuildError, match="blip2 models take their prompts as written.*drop --chat-template"):
        build(tiny_model_dir("blip2-opt"), tmp_path / "bad", BuildOptions(chat_template=template))
    assert not (tmp_path / "bad").exists()


def test_images_that_do_not_fit_the_lms_positions_are_refused_before_export(tmp_path):
    """A tower of 256 tokens per image before an LM of 512 positions: the parity sample with two
    images cannot fit (ONNX Runtime's fused attention would refuse it mid-build, its rotary table
    ending at 512). The build says so in one line before any export, naming --max-images 1, under
    which every sample fits."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    from tiny_models import IMAGE_TOKEN_ID, _save_tokenizer_and_processor, _text_config
    from vlm_export.build import BuildOptions, _check_samples_fit, build, verify
    from vlm_export.compare.parity import default_samples
    from vlm_export.contract import Limits
    from vlm_export.errors import BuildError

    text = _text_config("llama")
    text.max_position_embeddings = 512
    vision = CLIPVisionConfig(image_size=64, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2)
    model = tmp_path / "model"
    LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                              image_token_id=IMAGE_TOKEN_ID)).save_pretrained(model)
    _save_tokenizer_and_processor(model, 64)
    with pytest.raises(BuildError, match=r"'two-images' \(2 image\(s\), 5\d\d prompt tokens\) does not fit this build's "
                                         r"max_sequence of 512 with 8 new tokens .*build with --max-images 1") as e:
        build(model, tmp_path / "build", BuildOptions(parity_new_tokens=8))
    assert "\n" not in str(e.value) and not (tmp_path / "build").exists()
    # a max_sequence too short for the text alone: raising it is the fix (with one image fewer, within 512)
    with pytest.raises(BuildError, match=r"'text-only' \(0 image\(s\), \d+ prompt tokens\) does not fit this build's "
                                         r"max_sequence of 16 .*: raise --max-sequence to \d+ and build with "
                                         r"--max-images 1$"):
        build(model, tmp_path / "build", BuildOptions(parity_new_tokens=8, max_sequence=16))
    # verify refuses the same before any parity work, naming its own option
    built = tmp_path / "built"
    build(model, built, BuildOptions(parity_new_tokens=4, max_images=1, samples=default_samples(1)[:1]))
    with pytest.raises(BuildError, match=r"with 600 new tokens .*lower --parity-tokens to \d+") as e:
        verify(built, BuildOptions(parity_new_tokens=600))
    assert "\n" not in str(e.value)
    adapter = adapter_for(model)
    loaded = adapter.load(model)
    one = Limits(max_batch=1, max_images=1, max_sequence=512, tokens_per_image=256)
    _check_samples_fit(default_samples(1), loaded, adapter.prompt_layout(loaded), adapter.scheme(loaded),
                       one, 8)  # fits: no error


class _CachesOnFirstCall(torch.nn.Module):
    """Keeps a tensor on itself at its first forward, as transformers' longrope rotary does."""

    def forward(self, x):
        if getattr(self, "scale", None) is None:
            self.scale = torch.full((x.shape[-1],), 2.0)
        return x * self.scale


class _BranchesOnValues(torch.nn.Module):
    def forward(self, x):
        return x * 2 if x.max() > 0 else x  # a branch on data: torch.export cannot trace it


class _Bf16OnPurpose(torch.nn.Module):
    """Computes part of its forward in bfloat16 whatever its inputs' dtype, as Falcon's ALiBi does
    (``slopes.bfloat16() * positions``): values bfloat16 rounding changes, then a reduction in bf16."""

    def forward(self, x):
        slopes = torch.tensor([0.3, 0.7, 1.1, 1.9]).bfloat16()
        y = (slopes * x.bfloat16() + x.bfloat16().exp()).softmax(-1)
        return y.float() * 1000 + x


def _toy_stage(module):
    from vlm_export.adapters.base import Stage
    from vlm_export.contract import IMAGE, StageSpec, TensorSpec

    spec = StageSpec("toy", IMAGE, (TensorSpec("x", "float32", ("rows", 4)),), (TensorSpec("y", "float32", ("rows", 4)),))
    return Stage(spec, module, (torch.ones(2, 4),))


def test_the_exports_cleanup_keeps_a_tiny_epsilon_and_drops_exact_no_ops():
    """onnxscript's no-op rules took ``+ 1e-8`` for ``+ 0`` (Helium's RMSNorm epsilon: NaN logits for a token
    whose hidden state is all zeros); ours drop only exact zeros and ones."""
    import onnxruntime as ort

    from vlm_export.export.onnx_export import _optimize

    class Norm(torch.nn.Module):
        def forward(self, x):
            variance = x.pow(2).mean(-1, keepdim=True)
            return (x * torch.rsqrt(variance + 1e-8) + 0.0) * 1.0

    x = torch.zeros(2, 3, 8)
    x[1] = torch.randn(3, 8)
    program = torch.onnx.export(Norm().eval(), (x,), dynamo=True, optimize=False, verbose=False)
    _optimize(program.model)
    ops = [node.op_type for node in program.model.graph]
    assert ops.count("Add") == 1 and ops.count("Mul") == 1, ops  # the epsilon stays; + 0, * 1 go
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(out, Norm()(x).numpy(), rtol=1e-5, atol=1e-6)  # zeros stay zeros, not NaN


def test_export_leaves_the_module_as_it_was(tmp_path):
    """What a traced forward caches on a module is not kept: it would be a fake tensor, and every later
    eager call - the PyTorch reference the graph is judged against - would compute with it."""
    from vlm_export.export.onnx_export import export_stage

    module = _CachesOnFirstCall()
    export_stage(_toy_stage(module), tmp_path)
    assert "scale" not in vars(module)
    assert torch.equal(module(torch.ones(1, 4)), torch.full((1, 4), 2.0))


class _Projects(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(1237, 4))  # a shape no other tensor here has

    def forward(self, x):
        return (x @ self.weight.T)[:, :4] + 0


def test_an_export_keeps_no_reference_to_the_modules_weights(tmp_path):
    """Once the module is gone, so are its weights: the build frees the PyTorch model before ONNX Runtime
    opens the graphs (onnxscript's rewriter kept the last graph it matched, and every weight with it)."""
    import gc

    from vlm_export.export.onnx_export import export_stage

    module = _Projects()
    export_stage(_toy_stage(module), tmp_path)
    del module
    gc.collect()
    alive = [t for t in gc.get_objects() if type(t) in (torch.Tensor, torch.nn.Parameter)
             and tuple(t.shape) in ((1237, 4), (4, 1237))]
    assert alive == []


def test_bfloat16_arithmetic_a_model_asks_for_runs_in_onnx_runtime_as_in_pytorch(tmp_path):
    """ONNX Runtime's CPU provider has no bfloat16 Mul/Add/Exp/Softmax: the export computes them in fp32
    and rounds each result to bfloat16, which is what PyTorch's CPU kernels do, so the values agree to
    the bit (a Falcon-with-ALiBi LLaVA failed to load before)."""
    import onnxruntime as ort

    from vlm_export.export.onnx_export import export_stage

    module = _Bf16OnPurpose()
    path = export_stage(_toy_stage(module), tmp_path)
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32) * 5
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    assert np.array_equal(got, want), np.abs(got - want).max()
    bf16_ops = {n.op_type for n in onnx.load(path).graph.node if n.op_type != "Cast"}
    assert {"Mul", "Add", "Exp", "Softmax"} <= bf16_ops  # the arithmetic is still there, now in fp32


def test_an_untraceable_stage_says_why_in_one_clean_line(tmp_path, capfd):
    from vlm_export.errors import ExportError
    from vlm_export.export.onnx_export import export_stage

    with pytest.raises(ExportError) as caught:
        export_stage(_toy_stage(_BranchesOnValues()), tmp_path)
    message = str(caught.value)
    assert message.startswith("exporting the toy stage to ONNX failed: ") and "data-dependent" in message, message
    assert "\n" not in message and "\x1b[" not in message  # torch's colour codes and its wrapper's text gone
    assert "GraphModule" not in capfd.readouterr().err  # no FX graph dumped on the user's terminal


class _ComplexRotary(torch.nn.Module):
    """Llama 4's rotary in small: positions turned into complex numbers and multiplied in."""

    def forward(self, x):
        freqs = torch.polar(torch.ones_like(x[..., ::2]), x[..., ::2]).unsqueeze(1)  # as Llama 4's freqs_cis
        pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2)).unsqueeze(1)
        return torch.view_as_real(pairs * freqs).flatten(-2).squeeze(1)


def test_complex_arithmetic_is_named_in_the_export_error(tmp_path):
    from vlm_export.errors import ExportError
    from vlm_export.export.onnx_export import export_stage

    with pytest.raises(ExportError) as caught:
        export_stage(_toy_stage(_ComplexRotary()), tmp_path)
    message = str(caught.value)
    assert message.startswith("exporting the toy stage to ONNX failed: ") and message.endswith(
        "; the model computes with complex numbers (e.g. Llama 4's rotary: torch.polar / view_as_complex), which "
        "ONNX cannot represent: not supported"), message


def test_ctrl_c_during_an_export_waits_for_it_to_return(capfd):
    """torch's tracer can abort the process from C++ when interrupted; the first Ctrl-C is held until
    the export returns, then raised (the build's cleanup runs), a second one stops at once."""
    import os
    import signal
    import threading

    from vlm_export.export.onnx_export import _interrupt_after

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    # Python's own handler, as in a terminal (a job started in the background ignores SIGINT: left alone)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _held_then_raised(capfd)
    finally:
        signal.signal(signal.SIGINT, outer)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with _interrupt_after():
            os.kill(os.getpid(), signal.SIGINT)  # ignored, as the process asked
    finally:
        signal.signal(signal.SIGINT, outer)


def _held_then_raised(capfd):
    import os
    import signal

    from vlm_export.export.onnx_export import _interrupt_after

    finished = []
    with pytest.raises(KeyboardInterrupt):
        with _interrupt_after():
            os.kill(os.getpid(), signal.SIGINT)
            finished.append("the export went on")
    assert finished == ["the export went on"]
    assert "Ctrl-C again to stop at once" in capfd.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        with _interrupt_after():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # the second: raised here, at once
            finished.append("not reached")
    assert finished == ["the export went on"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
