"""Precision per stage: parsing ``--precision`` and the choices each stage allows."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import BuildError

STAGES = ("vision_encoder", "projector", "lm_decoder")
ALIASES = {"vision": "vision_encoder", "vision_encoder": "vision_encoder", "projector": "projector",
           "decoder": "lm_decoder", "lm_decoder": "lm_decoder"}
#: fp32: as exported; fp16: fp16 weights and maths with fp32 islands; int8: W8A8 Q/DQ, calibrated;
#: w8 / w4: weight-only block-wise int8 / int4 (MatMulNBits), activations fp32 - for the memory-bound decoder
CHOICES = {
    "vision_encoder": ("fp32", "fp16", "int8"),
    "projector": ("fp32", "fp16", "int8"),
    "lm_decoder": ("fp32", "fp16", "int8", "w8", "w4"),
}


@dataclass(frozen=True)
class PrecisionPlan:
    vision_encoder: str = "fp32"
    projector: str = "fp32"
    lm_decoder: str = "fp32"

    def of(self, stage: str) -> str:
        return getattr(self, stage)

    def to_dict(self) -> dict[str, str]:
        return {s: self.of(s) for s in STAGES}

    @property
    def all_fp32(self) -> bool:
        return all(self.of(s) == "fp32" for s in STAGES)

    def __str__(self) -> str:
        return ",".join(f"{s}={self.of(s)}" for s in STAGES)


def parse_precision(text: str | None) -> PrecisionPlan:
    """``fp16`` for every stage, or ``vision=int8,projector=fp16,decoder=w4`` (others stay fp32)."""
    if not text:
        return PrecisionPlan()
    text = text.strip()
    valid = "; ".join(f"{s}: {'/'.join(c)}" for s, c in CHOICES.items())
    if "=" not in text:
        unsupported = [s for s in STAGES if text not in CHOICES[s]]
        if unsupported:
            raise BuildError(f"precision {text!r} is not available for {', '.join(unsupported)}; valid: {valid} "
                             "(set stages separately, e.g. vision=fp16,projector=fp16,decoder=w4)")
        return PrecisionPlan(text, text, text)
    chosen = {}
    for part in text.split(","):
        stage, _, value = part.partition("=")
        stage, value = ALIASES.get(stage.strip()), value.strip()
        if stage is None:
            raise BuildError(f"unknown stage in precision {part!r}; stages: vision, projector, decoder")
        if value not in CHOICES[stage]:
            raise BuildError(f"precision {value!r} is not valid for {stage}; valid: {valid}")
        chosen[stage] = value
    return PrecisionPlan(**chosen)
