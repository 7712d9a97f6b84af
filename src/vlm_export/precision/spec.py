"""Precision per stage: parsing ``--precision`` and checking it against the stages a model declares.

The stages are the adapter's (any number, any names), each declaring the precisions it allows
(``StageSpec.precisions``); a plan names stages (or the shorthands below) and is resolved against
those declarations once the model is loaded, before anything is exported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from ..contract import StageSpec
from ..errors import BuildError

#: fp32: as exported; fp16: fp16 weights and maths with fp32 islands; int8: W8A8 Q/DQ, calibrated;
#: w8 / w4: weight-only block-wise int8 / int4 (MatMulNBits rounds activations to int8 inside its
#: kernel at accuracy level 4; the dequantize form for TensorRT is w4 only, W4A16: fp16 activations)
#: - for the memory-bound decoder
KNOWN = ("fp32", "fp16", "int8", "w8", "w4")
#: shorthands for the usual stage names
ALIASES = {"vision": "vision_encoder", "decoder": "lm_decoder"}


@dataclass(frozen=True)
class PrecisionPlan:
    """Precision per named stage; ``default`` for every stage not named that follows it
    (``StageSpec.follows_default``; the others stay fp32 unless named)."""

    choices: tuple[tuple[str, str], ...] = ()
    default: str = "fp32"

    @classmethod
    def of_stages(cls, choices: Mapping[str, str], default: str = "fp32") -> "PrecisionPlan":
        return cls(tuple(sorted(choices.items())), default)

    def of(self, stage: str, follows_default: bool = True) -> str:
        return dict(self.choices).get(stage, self.default if follows_default else "fp32")

    def resolve(self, stages: Sequence[StageSpec]) -> dict[str, str]:
        """Stage name -> precision for every stage, in order; BuildError on a stage the model does
        not have or a precision a stage does not allow."""
        names = [s.name for s in stages]
        unknown = [name for name, _ in self.choices if name not in names]
        if unknown:
            raise BuildError(f"unknown stage(s) {', '.join(unknown)} in --precision; this model's stages: "
                             f"{', '.join(names)} (shorthands: {', '.join(f'{k}={v}' for k, v in ALIASES.items())})")
        valid = "; ".join(f"{s.name}: {'/'.join(s.precisions)}" for s in stages)
        if self.default != "fp32":
            unsupported = [s.name for s in stages if self.default not in s.precisions and s.follows_default
                           and s.name not in dict(self.choices)]
            if unsupported:
                raise BuildError(f"precision {self.default!r} is not available for {', '.join(unsupported)}; "
                                 f"valid: {valid} (set stages separately, e.g. vision=fp16,decoder=w4)")
        resolved = {s.name: self.of(s.name, s.follows_default) for s in stages}
        for spec in stages:
            if resolved[spec.name] not in spec.precisions:
                raise BuildError(f"precision {resolved[spec.name]!r} is not valid for {spec.name}; valid: {valid}")
        return resolved

    def __str__(self) -> str:
        parts = [f"{stage}={p}" for stage, p in self.choices]
        return ",".join(([self.default] if self.default != "fp32" or not parts else []) + parts)


def parse_precision(text: str | None) -> PrecisionPlan:
    """``fp16`` for every stage, ``vision=int8,projector=fp16,decoder=w4`` (others stay fp32), or both:
    ``fp16,decoder=w4`` (every stage not named fp16).
    Stage names are checked when the model's stages are known (``PrecisionPlan.resolve``)."""
    if not text:
        return PrecisionPlan()
    text = text.strip()
    if "=" not in text and "," not in text:
        _known(text, text)
        return PrecisionPlan(default=text)
    chosen, default = {}, None
    for part in text.split(","):
        if not part.strip():
            raise BuildError(f"precision {text!r} has an empty entry (a comma too many); "
                             "write e.g. decoder=w4 or fp16,decoder=w4")
        if "=" not in part:  # a bare precision: every stage not named (fp16,decoder=w4)
            if default is not None:
                raise BuildError(f"precision {text!r} gives two precisions for every stage ({default} and "
                                 f"{part.strip()}); give one, and STAGE=PRECISION for the others")
            default = part.strip()
            _known(default, part)
            continue
        stage, _, value = part.partition("=")
        stage, value = stage.strip(), value.strip()
        if not stage:
            raise BuildError(f"no stage named in precision {part!r}; write STAGE=PRECISION, e.g. decoder=w4")
        _known(value, part)
        name = ALIASES.get(stage, stage)
        if name in chosen and chosen[name] != value:
            raise BuildError(f"precision {text!r} names the {name} stage twice ({chosen[name]} and {value}); "
                             "give each stage one precision")
        chosen[name] = value
    return PrecisionPlan.of_stages(chosen, default or "fp32")


def _known(value: str, part: str) -> None:
    if value not in KNOWN:
        raise BuildError(f"precision {value!r} in {part!r} is not one of {', '.join(KNOWN)}")
