"""The adapter contract: what an architecture family declares so the generic stages can act.

An adapter is the only code that knows a model's internals. It loads a model folder and turns
the model into ordered :class:`Stage` s (any number, any names: each an ``nn.Module`` with its
:class:`~vlm_export.contract.StageSpec` and example inputs), the last one the decoder, plus the
:class:`~vlm_export.contract.DecodingScheme` that says how the decoder is fed, and the
:class:`~vlm_export.contract.PromptLayout` that says where images go in the text. Everything
after the build reads those declarations from the manifest.
"""
from __future__ import annotations

import abc
import contextlib
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, ContextManager

import torch
from torch import nn

from ..contract import DecoderGeometry, DecodingScheme, ImageText, PromptLayout, StageSpec
from ..errors import AdapterError
from .loading import processor_chat_template, run_processor


@dataclass
class LoadedModel:
    """A model folder loaded by an adapter, with everything later stages need."""

    adapter: "VLMAdapter"
    path: Path
    model: nn.Module  # the original, as its authors would run it (reference for end-to-end parity)
    tokenizer: Any
    image_processor: Any
    config: Any
    #: the model's own processor (text + images), where the reference builds its inputs with it
    processor: Any = None
    #: the tokenizer of the image path's prompt reader (InstructBLIP's Q-Former), if the model has one
    image_text_tokenizer: Any = None


@dataclass
class Stage:
    """One split module: its declaration, the module (sharing weights with the loaded model) and
    the example inputs it is exported from (every dynamic dim >= 2: torch.export specialises 0 and 1)."""

    spec: StageSpec
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    #: entered around the export only (a traceable stand-in for what torch.export cannot trace, exact
    #: within the build's limits); the PyTorch reference runs the module as it is
    export_context: Callable[[], ContextManager] = contextlib.nullcontext

    @property
    def name(self) -> str:
        return self.spec.name


class VLMAdapter(abc.ABC):
    """Base class for one architecture family. Subclass, set ``name``, register with
    :func:`vlm_export.adapters.register`.
    """

    name: ClassVar[str]
    #: ``model_type`` values in a folder's config.json that this adapter handles
    model_types: ClassVar[tuple[str, ...]]
    #: one-line description shown by ``vlm-export adapters`` and in the unknown-arch error
    description: ClassVar[str] = ""
    #: most images one prompt may carry, where the model takes fewer than a build asks for (BLIP-2: one)
    max_images: ClassVar[int | None] = None
    #: the prompt that asks this model for a caption, where the model has one (Florence-2's task token);
    #: the build records it and ``eval`` on a captioning folder uses it when no prompt is given
    caption_prompt: ClassVar[str | None] = None

    @classmethod
    def handles(cls, config: dict) -> bool:
        """Whether this adapter takes a folder whose config.json (``config``) has one of its
        ``model_types``: several adapters may share a model type (BLIP-2 with a decoder-only or
        an encoder-decoder LM) and tell their configs apart here."""
        return True

    @classmethod
    def refusal(cls, config: dict) -> str:
        """Why :meth:`handles` refused ``config`` (one clause, for the error that lists every adapter of
        its model type)."""
        return f"{cls.name} does not take it"

    # ---- loading -------------------------------------------------------------------------
    @abc.abstractmethod
    def load(self, path: Path) -> LoadedModel:
        """Load the model, tokenizer and image processor from a folder (fp32, eval mode)."""

    # ---- the split -----------------------------------------------------------------------
    @abc.abstractmethod
    def stages(self, loaded: LoadedModel) -> list[Stage]:
        """The stages in order: image stages first (each reads pixels or an earlier stage's
        output), the decoder last (fed as :meth:`scheme` says)."""

    @abc.abstractmethod
    def scheme(self, loaded: LoadedModel) -> DecodingScheme:
        """How the decoder is fed and what state it carries."""

    @abc.abstractmethod
    def prompt_layout(self, loaded: LoadedModel) -> PromptLayout:
        """How prompt ids are laid out around image placeholders."""

    @abc.abstractmethod
    def geometry(self, loaded: LoadedModel) -> DecoderGeometry:
        """KV-cache geometry and text-model limits."""

    # ---- the reference -------------------------------------------------------------------
    @abc.abstractmethod
    def reference_generate(
        self,
        loaded: LoadedModel,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        max_new_tokens: int,
        eos_token_ids: list[int],
        prompt: str = "",
    ) -> list[int]:
        """Greedy new tokens from the ORIGINAL model's own generate (not our split modules):
        this is what proves the split itself faithful. ``input_ids`` are ours (built as
        :meth:`prompt_layout` says); ``prompt`` is the text they came from, for adapters whose
        reference builds its inputs with the model's own processor instead."""

    # ---- optional knobs ------------------------------------------------------------------
    def generation_config(self, loaded: LoadedModel):
        """The generation config the model's own ``generate`` decodes with (its stop ids are the build's):
        the top-level model's by default, or its text model's where it has no config of its own. An
        architecture whose ``generate`` hands over to its language model's (BLIP-2's) says so here."""
        return getattr(loaded.model, "generation_config", None) or getattr(getattr(loaded.model, "text", None),
                                                                           "generation_config", None)

    def image_text(self, loaded: LoadedModel) -> ImageText | None:
        """How the prompt becomes image-stage inputs (``role="prompt"``), for models whose image
        path reads the prompt; its tokenizer is ``loaded.image_text_tokenizer``."""
        return None

    def fp32_modules(self, loaded: LoadedModel) -> dict[str, tuple[str, ...]]:
        """Per stage, the names of modules the model keeps in fp32 in half precision (Hugging Face's
        ``_keep_in_fp32_modules``): the fp16 pass keeps the nodes exported from them fp32 too."""
        return {}

    def tolerances(self) -> dict[str, dict[str, float]]:
        """Per-stage overrides of the default parity tolerances (see compare.policy)."""
        return {}

    def write_text_model(self, loaded: LoadedModel, out: Path) -> Path | None:
        """Write the language model alone (text only: its decoder layers, embeddings and LM head)
        as a standalone ``AutoModelForCausalLM`` folder with the tokenizer, so runtimes that take
        a causal-LM checkpoint (the bench's peers) can run the same LM. Returns ``out``, or None
        for an architecture whose LM is not a standard causal LM (the default)."""
        return None


def check_image_size(loaded: LoadedModel, size: tuple[int, int], options: dict | None = None) -> None:
    """The image processor must make the images the vision stage takes: Hugging Face refuses any other
    size at the first forward, so a checkpoint whose preprocessor_config.json disagrees with its vision
    config is refused here, before anything is exported. The probe is not square, as photos are not.
    ``options``: what the model's processor passes its image processor (the layout's tiles' ``options``)."""
    from PIL import Image

    probe = [Image.new("RGB", (97, 61))]
    pixels = run_processor(loaded.image_processor, loaded.path, images=probe, return_tensors="np", **(options or {}))
    made = tuple(int(d) for d in pixels["pixel_values"].shape[-2:])
    if made != tuple(size):
        resizes = getattr(loaded.image_processor, "do_resize", True) is not False
        fix = "fix size / crop_size" if resizes else "it does not resize (do_resize false): set do_resize true"
        raise AdapterError(f"the image processor in {loaded.path} makes {made[0]}x{made[1]} images but the vision "
                           f"tower takes {size[0]}x{size[1]} (vision_config.image_size); {fix} in its "
                           f"{_image_processor_file(loaded.path)}")


def _image_processor_file(folder: Path) -> str:
    """Where a folder keeps its image processor's settings: preprocessor_config.json, or (transformers 5
    saves it there) the "image_processor" entry of processor_config.json."""
    if not (Path(folder) / "preprocessor_config.json").exists() and (Path(folder) / "processor_config.json").exists():
        return 'processor_config.json ("image_processor")'
    return "preprocessor_config.json"


def read_chat_template(path: Path) -> str:
    """A chat template from a file: Jinja text (``chat_template.jinja``), or the ``chat_template`` of
    a JSON file (``chat_template.json``, as HF processors save it). AdapterError, one line, on a
    missing, empty or unreadable file."""
    import json

    path = Path(path)
    try:
        text = path.read_text()
        if path.suffix == ".json":
            data = json.loads(text)
            if not isinstance(data, dict) or "chat_template" not in data:
                raise AdapterError(f"{path} has no \"chat_template\" key; give a chat_template.json as processors "
                                   "save it, or the Jinja template itself")
            text = data["chat_template"]
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise AdapterError(f"cannot read the chat template {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                           "give a Jinja file or a chat_template.json") from None
    if not isinstance(text, str) or not text.strip():
        raise AdapterError(f"the chat template {path} is empty; give the Jinja template the model was trained with")
    return text


def set_chat_template(tokenizer, template: str, source: str = "the chat template") -> None:
    """Give ``tokenizer`` ``template`` (the one the model was trained with, where its checkpoint ships
    none), proved to render a user turn in both content forms a template may take; AdapterError, one
    line, when it cannot."""
    tokenizer.chat_template = template
    turns = ([{"role": "user", "content": "vlm-export probe"}],
             [{"role": "user", "content": [{"type": "text", "text": "vlm-export probe"}]}])
    errors = []
    for turn in turns:
        try:
            tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
            return
        except Exception as e:  # noqa: BLE001 - Jinja's syntax and runtime errors alike; said below
            errors.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
    raise AdapterError(f"{source} does not render a user turn: {errors[-1]}; fix the template")


def chat_template_takes_parts(tokenizer, image_token: str) -> bool:
    """Whether the tokenizer's chat template reads each message's content as typed parts and writes
    ``image_token`` for an image part itself - the processor templates HF ships with LLaVA checkpoints,
    which render a string content as nothing - rather than one string per turn (a text LM's template,
    which renders a list as its Python repr). Asked of the template itself with a probe conversation."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    probe = "vlm-export probe"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": probe}]}],
            add_generation_prompt=True, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot take parts: it takes strings
        return False
    return isinstance(text, str) and probe in text and text.count(image_token) == 1 and "'type'" not in text


def save_causal_lm(text_config, base_model: nn.Module, lm_head: nn.Module, tokenizer, out: Path,
                   generation_config=None, renamed: dict[str, str] | None = None) -> Path:
    """A standalone causal-LM folder from a VLM's parts: the class ``AutoModelForCausalLM``
    picks for ``text_config`` (the model's own text config), its base model and head loaded
    strictly from ``base_model`` and ``lm_head`` (so a part that does not fit fails loudly),
    fp32, saved with ``tokenizer`` beside it. ``renamed``: parts of ``base_model``'s parameter
    names that the causal LM's class calls otherwise (old -> new)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(text_config)
    config.architectures = None  # from_config fills in the causal-LM class on save
    # tied as the VLM's head is, whatever the text config says (Qwen3-VL-MoE's says tied, its VLM's head is not):
    # loading the head into a tied LM would overwrite its token embeddings
    config.tie_word_embeddings = lm_head.weight.data_ptr() == base_model.get_input_embeddings().weight.data_ptr()
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = base_model.state_dict()
    for old, new in (renamed or {}).items():
        state = {name.replace(old, new): value for name, value in state.items()}
    lm.base_model.load_state_dict(state)
    lm.get_output_embeddings().load_state_dict(lm_head.state_dict())
    if generation_config is not None:
        lm.generation_config = copy.deepcopy(generation_config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lm.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def check_image_token(loaded: "LoadedModel", token: str) -> None:
    """The image token's text must be one token of the tokenizer, of the config's ``image_token_id``: else the image
    rows would land elsewhere than Hugging Face puts them. AdapterError saying what to save otherwise."""
    ids = loaded.tokenizer(token, add_special_tokens=False)["input_ids"]
    if ids != [loaded.config.image_token_id]:
        raise AdapterError(f"the tokenizer in {loaded.path} makes {token} the ids {ids} but the model's config says "
                           f"image_token_id {loaded.config.image_token_id}: save the model's own tokenizer beside it")


def processor_setting(path: Path, name: str):
    """A setting of the processor as saved (processor_config.json), None where none is saved."""
    file = path / "processor_config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text()).get(name)
    except (OSError, ValueError) as e:
        raise AdapterError(f"cannot read {file} ({e}); save the model's processor again") from None


def use_saved_chat_template(tokenizer, path: Path) -> None:
    """Give ``tokenizer`` the processor's chat template saved in ``path``, where there is one and it differs. Read
    from the saved template file where there is one: SmolVLM's and InternVL's processors do not load without
    torchvision (their video processors); else from the processor (``processor_chat_template``)."""
    files = [path / name for name in ("chat_template.jinja", "chat_template.json") if (path / name).is_file()]
    template = read_chat_template(files[0]) if files else processor_chat_template(path)
    if template and template != getattr(tokenizer, "chat_template", None):
        set_chat_template(tokenizer, template, f"the processor's chat template in {path}")
