"""The judge: tolerances per stage and output, applied to measured metrics.

A failing verdict names every failing stage and output with its numbers, so a user knows which
stage drifted instead of only seeing a different answer at the end.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .metrics import TensorMetrics, TokenMetrics

#: task-accuracy drop allowed for a reduced-precision build against the fp32 PyTorch reference
DEFAULT_MAX_ACCURACY_DROP_POINTS = 1.0


@dataclass(frozen=True)
class Tolerance:
    atol: float = 1e-4
    rtol: float = 1e-4  # relative to the largest reference magnitude of that output
    min_cosine: float = 0.99999

    def allowed(self, m: TensorMetrics) -> float:
        return self.atol + self.rtol * m.ref_max_abs

    def check(self, m: TensorMetrics) -> list[str]:
        problems = []
        if not m.max_abs <= self.allowed(m):  # also catches NaN
            problems.append(f"max abs error {m.max_abs:.3g} > {self.allowed(m):.3g}")
        if not m.cosine >= self.min_cosine:
            problems.append(f"cosine {m.cosine:.6f} < {self.min_cosine}")
        return problems


# fp32 export vs fp32 PyTorch: only op-ordering noise is expected
DEFAULT_TOLERANCES = {
    "vision_encoder": Tolerance(),
    "projector": Tolerance(),
    "prefill": Tolerance(),
    "decode": Tolerance(),
}


INF = float("inf")
# reduced precisions are judged by direction (cosine), not by element-wise error; their real gate is
# task accuracy (vlm-export eval), since greedy tokens may legitimately move
PRECISION_TOLERANCES = {
    "fp32": Tolerance(),
    "fp16": Tolerance(atol=INF, rtol=0.0, min_cosine=0.999),
    # w8 is not "nearly fp32": ONNX Runtime's MatMulNBits kernel also rounds activations to int8
    # per block (accuracy level 4), so its logits drift like w4's (demo: cosine 0.9976 with every
    # easy-vqa answer unchanged); task accuracy is its real gate
    "w8": Tolerance(atol=INF, rtol=0.0, min_cosine=0.99),
    "int8": Tolerance(atol=INF, rtol=0.0, min_cosine=0.99),
    "w4": Tolerance(atol=INF, rtol=0.0, min_cosine=0.99),
}
# which build stage's precision governs each parity stage
PARITY_STAGE_OF = {"vision_encoder": "vision_encoder", "projector": "projector", "prefill": "lm_decoder",
                   "decode": "lm_decoder"}


@dataclass
class ParityPolicy:
    tolerances: dict[str, Tolerance] = field(default_factory=lambda: dict(DEFAULT_TOLERANCES))
    #: greedy tokens must equal the original model's for fp32 builds
    require_identical_tokens: bool = True

    @classmethod
    def for_plan(cls, plan) -> "ParityPolicy":
        """Default gates for a PrecisionPlan; greedy tokens must be identical only when all is fp32."""
        tolerances = {stage: PRECISION_TOLERANCES[plan.of(build_stage)] for stage, build_stage in PARITY_STAGE_OF.items()}
        return cls(tolerances=tolerances, require_identical_tokens=plan.all_fp32)

    def with_overrides(self, overrides: dict[str, dict[str, float]]) -> "ParityPolicy":
        tol = dict(self.tolerances)
        for stage, fields in overrides.items():
            tol[stage] = replace(tol.get(stage, Tolerance()), **fields)
        return replace(self, tolerances=tol)

    def judge(self, stages: dict[str, dict[str, TensorMetrics]],
              tokens: dict[str, list[TokenMetrics]]) -> list[str]:
        """Every failure as one line; empty when the build passes."""
        failures = []
        for stage, outputs in stages.items():
            tol = self.tolerances.get(stage, Tolerance())
            for output, metrics in outputs.items():
                for problem in tol.check(metrics):
                    failures.append(f"{stage}/{output}: {problem}")
        if self.require_identical_tokens:
            for comparison, runs in tokens.items():
                for run in runs:
                    if not run.identical:
                        failures.append(f"end-to-end {comparison}: greedy tokens differ from token "
                                        f"{run.first_divergence} for prompt {run.prompt!r}")
        return failures


@dataclass(frozen=True)
class AccuracyGate:
    """Task accuracy of each candidate may be at most ``max_drop_points`` below the reference's,
    measured on the same questions. Greedy tokens of a reduced-precision build may move; whether
    its answers got worse is what this judges."""

    max_drop_points: float = DEFAULT_MAX_ACCURACY_DROP_POINTS

    def drops(self, reference, candidates) -> dict[str, float]:
        return {c.backend: 100.0 * (reference.accuracy - c.accuracy) for c in candidates}

    def judge(self, reference, candidates) -> list[str]:
        return [f"task accuracy: {c.backend} {100 * c.accuracy:.1f}% vs {reference.backend} "
                f"{100 * reference.accuracy:.1f}% on the same {c.questions} {c.dataset} questions, a drop of "
                f"{drop:.1f} points (at most {self.max_drop_points:g} allowed)"
                for c, drop in zip(candidates, self.drops(reference, candidates).values())
                if drop > self.max_drop_points]
