"""Stage declarations: what each exported graph takes and returns, by name.

An adapter declares its stages in order (any number, any names); the build records them in the
manifest, and every later layer (export, precision, parity, TensorRT profiles, the Triton
repository, the served model, the bench) iterates over them instead of naming them.

``image`` stages run once per request on its images, in the declared order; each input is an
output of the image processor named like it (``role="pixels"``: ``pixel_values``, and where a
model's processor makes more, e.g. mllama's ``aspect_ratio_ids`` / ``aspect_ratio_mask``, each by its
key; the images on axis 0, leading per-prompt axes folded into it), an output of an earlier stage with the same name
(``role="upstream"``), or the request's prompt tokenized as the build's :class:`ImageText` says
(``role="prompt"``: InstructBLIP's Q-Former reads the instruction, so its image path depends on the
prompt). The one ``decoder`` stage is fed by the decoding scheme; so is an ``encoder`` stage, which
an encoder-decoder scheme declares (``DecodingScheme.encoder_stage``) and the runtime runs once per
prefill, between the image stages and the decoder (``contract/encdec.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from .layout import ImageText

IMAGE, ENCODER, DECODER = "image", "encoder", "decoder"
KINDS = (IMAGE, ENCODER, DECODER)
INPUT_ROLES = ("pixels", "upstream", "prompt", "decoder")
IMAGE_INPUT_ROLES = ("pixels", "upstream", "prompt")
#: every stage can stay as exported
FP32 = "fp32"


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor. ``dims``: ints are fixed sizes, strings name dynamic dims (equal names,
    equal sizes; a TensorRT profile gives each name a range)."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]
    role: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims), "role": self.role}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["dims"]), d.get("role", ""))

    def dynamic_axes(self) -> dict[int, str]:
        return {axis: dim for axis, dim in enumerate(self.dims) if isinstance(dim, str)}


@dataclass(frozen=True)
class StageSpec:
    name: str
    kind: str  # IMAGE, ENCODER or DECODER
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    #: precisions this stage may be converted to (fp32 always); the precision layer knows what each means
    precisions: tuple[str, ...] = (FP32,)
    #: ranges of dynamic dims that no build limit bounds (name -> (min, opt, max)), for TensorRT profiles
    dim_ranges: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    #: whether a precision given for every stage (``--precision fp16``) applies here; False keeps
    #: the stage fp32 unless named (BLIP-2's Q-Former: Hugging Face keeps it fp32 too)
    follows_default: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"stage {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if FP32 not in self.precisions:
            raise ValueError(f"stage {self.name!r}: every stage allows fp32 (as exported)")

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def per_token(self) -> bool:
        """Called back to back once per generated token (its runtime may keep its threads spinning)."""
        return self.kind == DECODER

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs], "precisions": list(self.precisions),
                "dim_ranges": {k: list(v) for k, v in self.dim_ranges.items()}, "follows_default": self.follows_default}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StageSpec":
        return cls(d["name"], d["kind"], tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
                   tuple(TensorSpec.from_dict(t) for t in d["outputs"]), tuple(d["precisions"]),
                   {k: tuple(v) for k, v in d.get("dim_ranges", {}).items()}, d.get("follows_default", True))


def image_stages(stages: Iterable[StageSpec]) -> list[StageSpec]:
    return [s for s in stages if s.kind == IMAGE]


def check_chain(stages: list[StageSpec], image_input: str) -> None:
    """The image stages must form a chain: every ``upstream`` input made by an earlier stage, and
    the decoder's image input made by one of them. ValueError naming what is wrong."""
    made = set()
    for stage in image_stages(stages):
        for t in stage.inputs:
            if t.role == "upstream" and t.name not in made:
                raise ValueError(f"stage {stage.name!r} reads {t.name!r}, which no earlier stage outputs")
            if t.role not in IMAGE_INPUT_ROLES:
                raise ValueError(f"image stage {stage.name!r}: input {t.name!r} has role {t.role!r}; "
                                 f"image stages take {', '.join(map(repr, IMAGE_INPUT_ROLES))} inputs")
        made.update(stage.output_names)
    for stage in stages:
        if stage.kind == ENCODER and any(t.role in IMAGE_INPUT_ROLES for t in stage.inputs):
            raise ValueError(f"encoder stage {stage.name!r} is fed by the decoding scheme (role 'decoder'), "
                             "not by the image path")
    decoders = [s for s in stages if s.kind == DECODER]
    if len(decoders) != 1 or stages[-1].kind != DECODER:
        raise ValueError("a build has exactly one decoder stage, declared last")
    if image_stages(stages) and image_input not in made:
        raise ValueError(f"no image stage outputs {image_input!r}, the decoder's image input")


def prompt_inputs(stages: Iterable[StageSpec]) -> list[TensorSpec]:
    """The image path's inputs made from the prompt (empty when images alone decide it)."""
    return [t for s in image_stages(stages) for t in s.inputs if t.role == "prompt"]


def check_image_text(stages: Iterable[StageSpec], image_text: "ImageText | None") -> None:
    """The image stages' prompt inputs must be exactly what the ImageText declaration makes
    (nothing when there is none). ValueError naming the difference."""
    wanted = {t.name for t in prompt_inputs(stages)}
    made = {image_text.ids, image_text.mask} if image_text else set()
    if wanted != made:
        raise ValueError(f"the image stages read {sorted(wanted) or 'nothing'} from the prompt, but the image_text "
                         f"declaration makes {sorted(made) or 'nothing'}")


def stages_from_manifest(manifest: dict[str, Any]) -> list[StageSpec]:
    return [StageSpec.from_dict(d) for d in manifest["stages"]]


#: the usual precision choices (the precision layer gives each its meaning): weight-only w8/w4 are
#: for the memory-bound decoder
IMAGE_PRECISIONS = ("fp32", "fp16", "int8")
DECODER_PRECISIONS = ("fp32", "fp16", "int8", "w8", "w4")
