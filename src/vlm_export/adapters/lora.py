"""Merging a PEFT adapter (LoRA, LoHa, LoKr, IA3, ...) into a loaded model before the split.

The PEFT adapter must have been made on the FULL model that the architecture adapter loads
(e.g. the whole ``LlavaForConditionalGeneration``), the usual recipe::

    model = LlavaForConditionalGeneration.from_pretrained(base)
    model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"], ...))
    ...train...; model.save_pretrained(adapter_dir)

(an adapter made on the language model alone has keys that load nowhere in the full model and is
refused). The merge is proved rather than trusted: every stage runs on its example inputs with the
adapter layers in place and again on the merged weights, and the largest difference per stage is
recorded (and checked) in :class:`LoraMerge`, which the build writes to its manifest.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import AdapterError, ModelLoadError, first_line
from .base import LoadedModel
from .split import split

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT reads the first that exists


@dataclass(frozen=True)
class LoraMerge:
    """What was merged, and the proof that the merged weights compute what the adapter did."""

    path: str
    peft_type: str
    target_modules: list[str]
    rank: int | None
    sha256: dict[str, str]  # adapter file name -> digest
    max_abs: dict[str, float]  # per stage: max |adapter layers in place - merged weights|
    effect: dict[str, float]  # per stage: max |adapter layers in place - base model|
    changed: bool  # False for a no-op adapter (e.g. LoRA B still zero: never trained)
    # adapted layers' weights that were shared with another module (a tied LM head and input embedding) and got
    # a copy of their own before the merge; the merged model is untied there (its config says so)
    untied: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _read_config(adapter_dir: Path):
    from peft import PeftConfig

    if not adapter_dir.is_dir():
        raise ModelLoadError(f"LoRA adapter folder {adapter_dir} does not exist; pass the folder save_pretrained wrote")
    if not (adapter_dir / CONFIG_FILE).is_file():
        named = sorted(p.parent.name for p in adapter_dir.glob(f"*/{CONFIG_FILE}"))
        if named:  # PEFT saves an adapter not named "default" in a subfolder of its name
            raise ModelLoadError(f"{adapter_dir} holds no adapter itself but named ones in {', '.join(named)}: pass "
                                 f"one of those folders (e.g. {adapter_dir / named[0]})")
        raise ModelLoadError(f"{adapter_dir / CONFIG_FILE} is missing: pass a PEFT adapter folder (save_pretrained output)")
    if not any((adapter_dir / name).is_file() for name in WEIGHT_FILES):
        raise ModelLoadError(f"{adapter_dir} has no adapter weights ({' or '.join(WEIGHT_FILES)}); re-save the adapter")
    try:
        return PeftConfig.from_pretrained(str(adapter_dir))
    except Exception as e:  # JSON errors, unknown peft_type, fields of another PEFT version, ...
        raise ModelLoadError(f"cannot read {adapter_dir / CONFIG_FILE} ({first_line(e)}); re-save the adapter") from None


def _model_names(name: str) -> set[str]:
    """The model names a path or hub id stands for: its last component, and the repo name of a
    Hugging Face cache folder (``.../models--org--name/snapshots/<sha>``)."""
    parts = [p for p in re.split(r"[/\\]", name.strip()) if p]
    names = {parts[-1].lower()} if parts else set()
    names |= {p.split("--")[-1].lower() for p in parts if p.startswith("models--")}
    return names


def _check_base(config, loaded: LoadedModel, adapter_dir: Path) -> None:
    recorded = config.base_model_name_or_path
    if not recorded:  # nothing recorded (e.g. made on a model built from a config): nothing to check
        return
    if Path(recorded).is_absolute() and Path(recorded).exists() and Path(recorded).resolve() == loaded.path.resolve():
        return
    ours = set().union(*(_model_names(str(p)) for p in (loaded.path, loaded.path.resolve(),
                                                      getattr(loaded.config, "_name_or_path", "") or "")))
    if _model_names(recorded) & ours:
        return
    raise AdapterError(
        f"the adapter in {adapter_dir} was made on {recorded!r} (base_model_name_or_path in {CONFIG_FILE}), "
        f"not on the model in {loaded.path}; pass that model, or --lora-any-base to merge it anyway"
    )


def _inject(loaded: LoadedModel, config, adapter_dir: Path):
    """The model with the adapter layers injected (in place) and its weights loaded, every key used."""
    from peft import PeftModel

    config.inference_mode = True
    try:
        peft_model = PeftModel(loaded.model, config)
    except ValueError as e:  # NoMatchingPeftModuleError (a ValueError) when target_modules match nothing
        raise AdapterError(
            f"the adapter in {adapter_dir} does not fit the model in {loaded.path} ({first_line(e)}); "
            f"check target_modules in {CONFIG_FILE}"
        ) from None
    device = next(loaded.model.parameters()).device
    try:
        # load_adapter, not PeftModel.from_pretrained: only it returns the load result, and PEFT
        # loads with strict=False, so keys that load nowhere are otherwise silently dropped
        result = peft_model.load_adapter(str(adapter_dir), "default", torch_device=str(device))
    except Exception as e:
        # load_state_dict lists every size mismatch in one multi-line RuntimeError: say the first
        m = re.search(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[.*?\])\) "
                      r"from checkpoint, the shape in current model is torch\.Size\((\[.*?\])\)", str(e))
        if m is None:  # corrupt or truncated safetensors, unreadable .bin (also RuntimeErrors)
            raise ModelLoadError(
                f"cannot read the adapter weights in {adapter_dir} ({first_line(e)}); re-save the adapter"
            ) from None
        ours, theirs = json.loads(m[3]), json.loads(m[2])
        vocab = _vocabulary(loaded.model)
        differ = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b] if len(ours) == len(theirs) else []
        if vocab is not None and len(differ) == 1 and ours[differ[0]] == vocab:  # the usual cause: added tokens
            raise AdapterError(
                f"the adapter in {adapter_dir} was trained on a vocabulary of {theirs[differ[0]]} tokens but the model "
                f"in {loaded.path} has {vocab} ({m[1]}): its embeddings were resized after tokens were added; pass the "
                "model saved after resize_token_embeddings, with its tokenizer"
            ) from None
        raise AdapterError(
            f"the adapter in {adapter_dir} does not fit the model in {loaded.path}: {m[1]} is {m[2]} in the "
            f"adapter but {m[3]} in the model ({str(e).count('size mismatch')} tensor(s) mismatch); "
            "use the model the adapter was trained on"
        ) from None
    # an adapter made on a sub-model (e.g. the language model alone) has keys that load nowhere;
    # adapter layers the file does not fill would keep their random initialisation
    full = f"train it with get_peft_model on the full {type(loaded.model).__name__}"
    if result.unexpected_keys:
        keys = result.unexpected_keys
        raise AdapterError(f"{len(keys)} weights of the adapter in {adapter_dir} load nowhere in the model "
                           f"(e.g. {keys[0]!r}): it was made on another module tree; {full}")
    if result.missing_keys:
        keys = result.missing_keys
        raise AdapterError(f"{len(keys)} adapter layers get no weight from the adapter in {adapter_dir} "
                           f"(e.g. {keys[0]!r}): the file is incomplete or made on another module tree; {full}")
    return peft_model


def _vocabulary(model: torch.nn.Module) -> int | None:
    """Rows of the model's input embedding, where it says which module that is."""
    try:
        return int(model.get_input_embeddings().weight.shape[0])
    except (AttributeError, NotImplementedError):
        return None


def _untie_adapted(peft_model) -> list[str]:
    """Give each adapted layer's weights a copy of their own where another module holds the same tensor
    (an LM head tied to the input embedding): a merge adds the layer's delta into its weight, and a shared
    one would change the other module too, or take both modules' deltas, which the adapter never did.
    Trainable-token layers are left shared: their merge writes rows rather than adding, and PEFT ties the
    head's to the embedding's on purpose. The stage proof still checks every merge."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    root = peft_model.get_base_model()
    holders: dict[int, set[int]] = {}
    for module in root.modules():
        for p in module.parameters(recurse=False):
            holders.setdefault(id(p), set()).add(id(module))
    untied = []
    for name, module in root.named_modules():
        if not isinstance(module, BaseTunerLayer) or isinstance(module, TrainableTokensLayer):
            continue
        base = module.get_base_layer()
        for pname, p in list(base.named_parameters(recurse=False)):
            if len(holders.get(id(p), ())) > 1:
                setattr(base, pname, torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
                untied.append(f"{name}.{pname}")
    return untied


def _say_untied(model: torch.nn.Module) -> None:
    """Set ``tie_word_embeddings`` false where a merge left a model's LM head and input embedding apart
    (an untied copy above, or a head replaced by a modules_to_save copy), so that nothing that rebuilds
    the model from its config (a saved LM for the peers' runtimes) ties them back."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if not isinstance(module, PreTrainedModel):
            continue
        try:
            inputs, outputs = module.get_input_embeddings(), module.get_output_embeddings()
        except (NotImplementedError, AttributeError):
            continue
        if getattr(inputs, "weight", None) is None or getattr(outputs, "weight", None) is None:
            continue
        if inputs.weight is not outputs.weight:  # PEFT may have cleared the top config's flag already, not the text's
            for config in (module.config, module.config.get_text_config(decoder=True)):
                if getattr(config, "tie_word_embeddings", False):
                    config.tie_word_embeddings = False


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for item in (out or ()) for t in _flat(item)] if isinstance(out, (tuple, list)) else []


def _run(stages, inputs: dict) -> dict[str, list[torch.Tensor]]:
    with torch.no_grad():
        return {s.name: _flat(s.module(*inputs[s.name])) for s in stages}


def _max_abs(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((float((x.float() - y.float()).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def merge_lora(loaded: LoadedModel, adapter_dir: Path, *, check_base: bool = True,
               tolerance: float = 1e-4) -> tuple[LoadedModel, LoraMerge]:
    """Merge the PEFT adapter in ``adapter_dir`` into ``loaded.model`` and prove the merge.

    PEFT edits the module tree in place, so ``loaded.model`` IS the merged model afterwards (and
    may hold adapter layers after an error): use the returned LoadedModel, reload after an error.
    """
    adapter_dir = Path(adapter_dir)
    try:
        import peft  # noqa: F401  (an optional dependency: only --lora needs it)
    except ImportError:
        raise AdapterError("merging an adapter (--lora) needs the peft package: pip install 'peft>=0.13'") from None
    config = _read_config(adapter_dir)
    kind = str(getattr(config.peft_type, "value", config.peft_type))  # "LORA", not "PeftType.LORA"
    if config.is_prompt_learning or config.is_adaption_prompt:
        raise AdapterError(
            f"the adapter in {adapter_dir} is {kind}, which adds prompt tokens instead of changing "
            "weights and cannot be merged; only weight adapters (LoRA, LoHa, LoKr, IA3, ...) can be exported"
        )
    if check_base:
        _check_base(config, loaded, adapter_dir)
    sha256 = {name: _sha256(adapter_dir / name) for name in (CONFIG_FILE, *WEIGHT_FILES) if (adapter_dir / name).is_file()}

    with warnings.catch_warnings():  # PEFT/transformers deprecation chatter; the load is checked above
        warnings.simplefilter("ignore")
        peft_model = _inject(loaded, config, adapter_dir)
        untied = _untie_adapted(peft_model)
        # the stages share the model's submodules, so they run through the injected adapter layers
        stages = split(loaded)
        inputs = {s.name: s.example_inputs for s in stages}  # the same inputs for all three runs
        adapted = _run(stages, inputs)
        with peft_model.disable_adapter():
            base = _run(stages, inputs)
        try:
            model = peft_model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaN weights
        except (NotImplementedError, ValueError, TypeError, AttributeError, RuntimeError) as e:
            raise AdapterError(f"the {kind} adapter in {adapter_dir} cannot be merged ({first_line(e)})") from None
        _say_untied(model)
    merged = dataclasses.replace(loaded, model=model)
    after = _run(split(merged), inputs)  # split again: the stages must hold the merged plain layers

    max_abs = {name: _max_abs(adapted[name], after[name]) for name in adapted}
    effect = {name: _max_abs(adapted[name], base[name]) for name in adapted}
    # relative above 1: logits and hidden states of large models reach the hundreds
    limit = {name: tolerance * max([1.0] + [float(t.abs().max()) for t in outs if t.numel()])
             for name, outs in adapted.items()}
    for name in adapted:
        if max_abs[name] > limit[name]:
            raise AdapterError(
                f"the merged weights of the adapter in {adapter_dir} change the {name} stage's output by "
                f"{max_abs[name]:.3g} (limit {limit[name]:.3g}) against the unmerged adapter: this adapter does not merge exactly"
            )
    targets = config.target_modules
    return merged, LoraMerge(
        path=str(adapter_dir.resolve()),
        peft_type=kind,
        target_modules=[targets] if isinstance(targets, str) else sorted(targets or []),
        rank=getattr(config, "r", None),
        sha256=sha256,
        max_abs=max_abs,
        effect=effect,
        changed=any(effect[name] > limit[name] for name in adapted),
        untied=untied,
    )
