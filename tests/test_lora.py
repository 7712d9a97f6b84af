"""Merging a PEFT adapter before the split: the merge is proved per stage, and every way an
adapter can fail to fit the model is one clear line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

from vlm_export.adapters import adapter_for  # noqa: E402
from vlm_export.adapters.lora import merge_lora  # noqa: E402
from vlm_export.adapters.reference import split  # noqa: E402
from vlm_export.errors import AdapterError, ModelLoadError  # noqa: E402

BASE = "llava-llama"
# transformers' deprecation chatter when PEFT wraps a model (is_gradient_checkpointing)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _load(path: Path):
    return adapter_for(path).load(path)


def _save_lora(model, out: Path, init_lora_weights=False) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init_lora_weights)
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def base_dir(tiny_model_dir) -> Path:
    return tiny_model_dir(BASE)


@pytest.fixture(scope="module")
def lora_dir(base_dir, tmp_path_factory) -> Path:
    """A trained-looking LoRA (B non-zero, so it changes outputs) made the usual way: on the full VLM."""
    from transformers import LlavaForConditionalGeneration

    return _save_lora(LlavaForConditionalGeneration.from_pretrained(base_dir), tmp_path_factory.mktemp("lora"))


@pytest.fixture
def adapter(lora_dir, tmp_path) -> Path:
    """A copy of the adapter that a test may spoil."""
    return Path(shutil.copytree(lora_dir, tmp_path / "adapter"))


def _edit_config(adapter: Path, **changes) -> None:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))


def _outputs(loaded) -> dict[str, list[torch.Tensor]]:
    with torch.no_grad():
        out = {}
        for s in split(loaded):
            o = s.module(*s.example_inputs)
            out[s.name] = [o] if isinstance(o, torch.Tensor) else list(o)
        return out


def _error(exc_type, loaded, adapter: Path, **kw) -> str:
    with pytest.raises(exc_type) as info:
        merge_lora(loaded, adapter, **kw)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_merge_is_proved_and_leaves_a_plain_model(base_dir, lora_dir):
    from peft.tuners.tuners_utils import BaseTunerLayer

    base_out = _outputs(_load(base_dir))
    merged, record = merge_lora(_load(base_dir), lora_dir)

    stage_names = [s.name for s in split(merged)]
    assert list(record.max_abs) == stage_names
    assert all(v < 1e-4 for v in record.max_abs.values()), record.max_abs
    assert record.changed and max(record.effect.values()) > 1e-3
    assert (record.peft_type, record.rank, record.target_modules) == ("LORA", 4, ["q_proj", "v_proj"])
    assert set(record.sha256) == {"adapter_config.json", "adapter_model.safetensors"}
    assert all(len(h) == 64 for h in record.sha256.values())
    json.dumps(record.to_dict())  # the manifest stores it

    # a plain transformers model: no PEFT wrapper, no adapter layers or weights, no peft_config
    assert type(merged.model).__name__ == "LlavaForConditionalGeneration"
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.model.modules())
    assert not any("lora_" in k for k in merged.model.state_dict())
    assert not hasattr(merged.model, "peft_config")

    # the adapter did something: the merged model's outputs are not the base model's
    merged_out = _outputs(merged)
    for name in ("vision", "decoder"):
        stage = next(n for n in stage_names if name in n)
        assert (merged_out[stage][0] - base_out[stage][0]).abs().max() > 1e-3, stage


def test_untrained_adapter_merges_but_is_flagged_unchanged(base_dir, tmp_path):
    from transformers import LlavaForConditionalGeneration

    noop = _save_lora(LlavaForConditionalGeneration.from_pretrained(base_dir), tmp_path / "noop", init_lora_weights=True)
    _, record = merge_lora(_load(base_dir), noop)
    assert not record.changed
    assert max(record.effect.values()) == 0.0 and max(record.max_abs.values()) == 0.0


@pytest.mark.parametrize("kind", ["LOHA", "IA3"])
def test_other_mergeable_adapter_families(base_dir, tmp_path, kind):
    from peft import IA3Config, LoHaConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    config = {"LOHA": LoHaConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False),
              "IA3": IA3Config(target_modules=["q_proj", "fc2"], feedforward_modules=["fc2"], init_ia3_weights=False)}[kind]
    torch.manual_seed(0)
    get_peft_model(LlavaForConditionalGeneration.from_pretrained(base_dir), config).save_pretrained(tmp_path / kind)
    _, record = merge_lora(_load(base_dir), tmp_path / kind)
    assert record.peft_type == kind and record.changed
    assert all(v < 1e-4 for v in record.max_abs.values()), record.max_abs


@pytest.fixture(scope="module")
def tied_base_dir(tmp_path_factory) -> Path:
    """A LLaVA whose LM head is its input embedding (tie_word_embeddings), as Gemma's, Qwen2's small ones are."""
    from tiny_models import make_tiny_llava

    return make_tiny_llava(tmp_path_factory.mktemp("tied") / "llava", text_sizes={"tie_word_embeddings": True})


@pytest.mark.parametrize("targets", [
    {"target_modules": ["embed_tokens", "q_proj"]},  # LoRA on the embedding: the head must not take it
    {"target_modules": ["lm_head"]},  # on the head: the embedding must not take it
    {"target_modules": ["lm_head", "embed_tokens"]},  # on both: each its own delta, not both deltas twice
    {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},  # a trained copy of the head
], ids=["embedding", "head", "both", "head-saved"])
def test_adapter_on_a_tied_head_or_embedding_merges_untied(tied_base_dir, tmp_path, targets):
    """Merging adds into a layer's weight; a tied weight would carry it to the other module. Once refused as
    "does not merge exactly" (the proof's difference 6-580); now the adapted layer gets its own copy, the merge
    is exact, and the config says untied, so the LM saved for the peers' runtimes keeps both weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    torch.manual_seed(0)
    model = get_peft_model(LlavaForConditionalGeneration.from_pretrained(tied_base_dir),
                           LoraConfig(r=4, init_lora_weights=False, **targets))
    with torch.no_grad():  # a trained-looking copy of the head
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "adapter")
    loaded = _load(tied_base_dir)
    assert loaded.model.get_input_embeddings().weight is loaded.model.get_output_embeddings().weight
    merged, record = merge_lora(loaded, tmp_path / "adapter")
    assert record.changed and all(v < 1e-4 for v in record.max_abs.values()), record.max_abs
    assert bool(record.untied) == ("modules_to_save" not in targets), record.untied
    m = merged.model
    embedding, head = m.get_input_embeddings().weight, m.get_output_embeddings().weight
    assert embedding is not head and not torch.equal(embedding, head)
    assert not m.config.get_text_config(decoder=True).tie_word_embeddings
    saved = adapter_for(tied_base_dir).write_text_model(merged, tmp_path / "lm")
    lm = AutoModelForCausalLM.from_pretrained(saved)
    assert torch.equal(lm.get_input_embeddings().weight, embedding)
    assert torch.equal(lm.get_output_embeddings().weight, head)


def test_base_name_check(base_dir, adapter):
    # a hub id whose tail is the model folder's name is the same model
    _edit_config(adapter, base_model_name_or_path=f"some-org/{base_dir.name}")
    merge_lora(_load(base_dir), adapter)

    _edit_config(adapter, base_model_name_or_path="some-org/another-model-7b")
    message = _error(AdapterError, _load(base_dir), adapter)
    assert "'some-org/another-model-7b'" in message and "--lora-any-base" in message
    merge_lora(_load(base_dir), adapter, check_base=False)  # what --lora-any-base does


def test_target_modules_that_match_nothing(base_dir, adapter):
    _edit_config(adapter, target_modules=["nope_proj"])
    message = _error(AdapterError, _load(base_dir), adapter)
    assert "nope_proj" in message and "target_modules" in message


def test_adapter_of_a_model_with_another_hidden_size(base_dir, tmp_path):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig.from_pretrained(base_dir)
    cfg.text_config.hidden_size = 96
    other = _save_lora(LlavaForConditionalGeneration(cfg), tmp_path / "other")
    message = _error(AdapterError, _load(base_dir), other)
    assert "does not fit" in message and "[4, 96] in the adapter but [4, 64] in the model" in message


def test_adapter_trained_after_tokens_were_added(base_dir, tmp_path):
    """The usual fine-tune adds tokens, resizes the embeddings and trains LoRA on them too: against the model
    before the resize the refusal says so; against the resized model saved beside it the merge is proved."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    resized = Path(shutil.copytree(base_dir, tmp_path / "resized"))
    model = LlavaForConditionalGeneration.from_pretrained(base_dir)
    model.resize_token_embeddings(model.get_input_embeddings().weight.shape[0] + 8, mean_resizing=False)
    model.save_pretrained(resized)
    torch.manual_seed(0)
    get_peft_model(model, LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
                   ).save_pretrained(tmp_path / "adapter")
    message = _error(AdapterError, _load(base_dir), tmp_path / "adapter", check_base=False)
    assert "trained on a vocabulary of" in message and "resize_token_embeddings" in message, message
    _, record = merge_lora(_load(resized), tmp_path / "adapter", check_base=False)
    assert record.changed and all(v < 1e-4 for v in record.max_abs.values()), record.max_abs


def test_keys_that_load_nowhere(base_dir, adapter):
    from safetensors.torch import load_file, save_file

    weights = adapter / "adapter_model.safetensors"
    # what an adapter made on the language model alone looks like from the full model
    save_file({k.replace("model.language_model.", ""): v for k, v in load_file(weights).items()}, weights)
    message = _error(AdapterError, _load(base_dir), adapter)
    assert "load nowhere" in message and "get_peft_model on the full LlavaForConditionalGeneration" in message


def test_incomplete_weights(base_dir, adapter):
    from safetensors.torch import load_file, save_file

    weights = adapter / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if "layers.1." not in k}, weights)
    message = _error(AdapterError, _load(base_dir), adapter)
    assert "get no weight" in message and "incomplete" in message


def test_missing_folder_config_and_weights(base_dir, lora_dir, adapter, tmp_path):
    loaded = _load(base_dir)  # the model is untouched by these early checks
    assert "does not exist" in _error(ModelLoadError, loaded, tmp_path / "nowhere")
    (adapter / "adapter_model.safetensors").unlink()
    assert "has no adapter weights" in _error(ModelLoadError, loaded, adapter)
    (adapter / "adapter_config.json").unlink()
    assert "adapter_config.json is missing" in _error(ModelLoadError, loaded, adapter)
    shutil.copytree(lora_dir, tmp_path / "named" / "my-task")  # where PEFT saves an adapter named my-task
    message = _error(ModelLoadError, loaded, tmp_path / "named")
    assert "named ones in my-task" in message and str(tmp_path / "named" / "my-task") in message, message


@pytest.mark.parametrize("spoil", ["garbage", "truncated", "bin"])
def test_corrupt_weights(base_dir, adapter, spoil):
    weights = adapter / "adapter_model.safetensors"
    data = weights.read_bytes()
    if spoil == "bin":  # the older pickle format, read by torch.load
        weights.unlink()
        (adapter / "adapter_model.bin").write_bytes(b"not a pickle")
    else:
        weights.write_bytes(b"not a safetensors file" if spoil == "garbage" else data[: len(data) // 2])
    message = _error(ModelLoadError, _load(base_dir), adapter)
    assert "cannot read the adapter weights" in message


def test_corrupt_config(base_dir, adapter):
    (adapter / "adapter_config.json").write_text("{not json")
    assert "cannot read" in _error(ModelLoadError, _load(base_dir), adapter)


def test_prompt_adapter_cannot_be_merged(base_dir, adapter):
    from peft import PromptTuningConfig

    PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4).save_pretrained(adapter)
    message = _error(AdapterError, _load(base_dir), adapter, check_base=False)
    assert "is PROMPT_TUNING" in message and "cannot be merged" in message


def test_inexact_merge_names_the_stage(base_dir, lora_dir, monkeypatch):
    from peft.tuners.lora import LoraModel

    real = LoraModel.merge_and_unload

    def spoiled(self, *args, **kwargs):  # a merge that gets the LM head wrong
        model = real(self, *args, **kwargs)
        with torch.no_grad():
            model.lm_head.weight.add_(0.5)
        return model

    monkeypatch.setattr(LoraModel, "merge_and_unload", spoiled)
    message = _error(AdapterError, _load(base_dir), lora_dir)
    assert "decoder stage" in message and "does not merge exactly" in message
