"""Loading Hugging Face folders with errors a user can act on."""
from __future__ import annotations

import logging
from pathlib import Path

from ..errors import AdapterError, ModelLoadError, first_line
from ..runtime.images import load_image_processor


def load_hf_parts(model_cls, path: Path, *, processor: bool = True):
    """(model fp32 eval with eager attention, tokenizer, image processor or None).

    Eager attention because SDPA's ``is_causal`` cannot be traced with a dynamic sequence length
    (see env-notes); the maths is the same, so the reference stays the original model. Mixture-of-experts
    layers as batched matmuls for the same reason: transformers' default grouped matmul is a custom op
    torch.onnx cannot export (its ``eager`` loop branches on data); the experts' maths is the same.
    A longrope rotary picks its factors per row (``longrope_per_row``): for one row, the same maths.
    """
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # our own progress bars say what runs
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        model = model_cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                          experts_implementation="batched_mm")
    except Exception as e:  # from_pretrained raises OSError, SafetensorError, ValueError, ...
        raise ModelLoadError(
            f"cannot load the model weights in {path} ({first_line(e)}); check the folder is a complete "
            "save_pretrained output"
        ) from None
    model.eval()
    _check_generation_config(path)
    longrope_per_row(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer in {path} ({first_line(e)}); save it beside the model") from None
    image_processor = None
    if processor:
        try:
            image_processor = load_image_processor(path)
        except Exception as e:
            raise ModelLoadError(
                f"cannot load the image processor in {path} ({first_line(e)}); save preprocessor_config.json beside the model"
            ) from None
    return model, tokenizer, image_processor


def _check_generation_config(path: Path) -> None:
    """A generation_config.json that cannot be read: transformers' from_pretrained logs it and generates with
    the defaults (other end-of-sequence tokens, no sampling settings), so the build would silently decode
    otherwise than the model's author set; refused instead."""
    from transformers import GenerationConfig

    if not (path / "generation_config.json").is_file():
        return
    try:
        GenerationConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - JSON, unknown values, unreadable file: all the user's to fix
        raise ModelLoadError(f"cannot read {path / 'generation_config.json'} ({first_line(e)}); fix it, or delete it "
                             "to generate with the model config's defaults") from None


def load_processor(processor_cls, path: Path, image_token_id: int | None = None):
    """The model's own processor (``processor_cls.from_pretrained``), or a ModelLoadError saying what to
    save; with ``image_token_id`` (the model config's), an AdapterError where the processor's differs."""
    try:
        processor = processor_cls.from_pretrained(path)
    except Exception as e:
        raise ModelLoadError(f"cannot load the {processor_cls.__name__} in {path} ({first_line(e)}); save the model's "
                             "processor beside it (processor.save_pretrained)") from None
    if image_token_id is not None and processor.image_token_id != image_token_id:
        raise AdapterError(f"the processor's image token {processor.image_token!r} is id {processor.image_token_id}, "
                           f"the model's config says {image_token_id}")
    return processor


def run_processor(processor, path: Path, **inputs):
    """The model's own processor (or image processor) on a load-time probe; an AdapterError in one line
    where it fails (a tokenizer whose image token the processor cannot read, a broken config): Hugging
    Face cannot prepare this checkpoint's inputs either."""
    try:
        return processor(**inputs)
    except Exception as e:  # noqa: BLE001 - any failure of the user's processor files is theirs to fix
        raise AdapterError(f"the model's own {type(processor).__name__} in {path} fails on a probe image and prompt "
                           f"({first_line(e)}): Hugging Face cannot prepare inputs for this checkpoint either; fix "
                           "its processor / tokenizer files (image token, preprocessor_config.json)") from None


def processor_chat_template(path: Path) -> str | None:
    """The chat template saved for the model's processor (``chat_template.json``, or the processor's own
    ``chat_template.jinja``), which its ``apply_chat_template`` uses; None where there is none or no
    processor loads (a folder saved without one)."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path)
    except Exception:  # noqa: BLE001 - no processor is no processor template; the tokenizer's stays
        return None
    template = getattr(processor, "chat_template", None)
    return template if isinstance(template, str) and template.strip() else None


#: set on a rotary module whose longrope factors ``longrope_per_row`` made per row
PER_ROW_LONGROPE = "_vlm_export_longrope_per_row"


def longrope_per_row(model) -> int:
    """Make every longrope rotary of ``model`` pick its short or long factors per row; returns how many.

    Hugging Face's longrope (Phi-3, Phi-4-mini) picks them per call by the largest position in the whole
    batch (``original_max_position_embeddings``), so a served row's answer would change when a batch-mate
    passes the switch. Per row, each row rotates with the factors its own positions pick, which for one row
    is exactly Hugging Face's maths (``torch.where`` on the row's largest position, then the module's own
    cos/sin with its ``attention_scaling``); the reference and the export both run it. A rotary with one
    rope type per attention type (a dict) is left as it is; ``decoder.longrope_switch`` then says so."""
    import types

    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    count = 0
    for module in model.modules():
        if getattr(module, "rope_type", None) != "longrope" or not isinstance(
                getattr(module, "original_inv_freq", None), torch.Tensor):
            continue
        switch = module.config.rope_parameters["original_max_position_embeddings"]
        long_inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](module.config, module.original_inv_freq.device,
                                                           seq_len=switch + 1)
        module.register_buffer("long_inv_freq_rows", long_inv_freq, persistent=False)  # follows .to(device)
        module.longrope_switch = int(switch)
        module.forward = types.MethodType(_longrope_rows_forward, module)
        setattr(module, PER_ROW_LONGROPE, True)
        count += 1
    return count


def _longrope_rows_forward(self, x, position_ids):
    import torch

    long_rows = (position_ids.amax(dim=-1, keepdim=True) + 1 > self.longrope_switch).unsqueeze(-1)  # (batch, 1, 1)
    inv_freq = torch.where(long_rows, self.long_inv_freq_rows.to(x.device), self.original_inv_freq.to(x.device))
    freqs = position_ids[..., None].float() * inv_freq.float()  # (batch, sequence, half)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)
