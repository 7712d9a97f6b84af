"""The judge: tolerances per stage and output, applied to measured metrics.

A failing verdict names every failing stage and output with its numbers, so a user knows which
stage drifted instead of only seeing a different answer at the end.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .metrics import ExactMetrics, TensorMetrics, TokenMetrics

#: task-accuracy drop allowed for a reduced-precision build against the fp32 PyTorch reference
DEFAULT_MAX_ACCURACY_DROP_POINTS = 1.0


#: how much further from PyTorch in float64 than PyTorch's own fp32 output a graph's fp32 output may be and still
#: count as the same arithmetic (``Tolerance.check_exact``). Independent fp32 implementations round differently
#: (summation order, fused kernels, vectorised exp/erf): over the 30 tiny test models' builds (486 outputs, both
#: decoder forms; 2026-12-05), ONNX Runtime's distance from float64 was 1.4x PyTorch fp32's at the median, 3.3x at
#: the 99th percentile, 5.4x at most. An export error is not a small multiple of the model's own rounding
FLOAT64_SPREAD = 10.0


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

    @property
    def elementwise(self) -> bool:
        """An fp32-style gate (a bound on every element), which PyTorch in float64 can arbitrate; the
        reduced precisions' gates bound only the direction."""
        return math.isfinite(self.atol)

    def check_exact(self, m: ExactMetrics) -> list[str]:
        """The same gate with PyTorch in float64 as the yardstick: the candidate may be up to FLOAT64_SPREAD
        times as far from the float64 output as PyTorch's own fp32 output is, plus the gate (an fp32 graph
        cannot be asked to be nearer PyTorch's fp32 rounding than that rounding is to the exact answer; a
        model that magnifies rounding magnifies the graph's too). Cosine deficits go as the error squared."""
        c, r = m.candidate, m.reference
        allowed = FLOAT64_SPREAD * r.max_abs + self.atol + self.rtol * c.ref_max_abs
        problems = []
        if not c.max_abs <= allowed:
            problems.append(f"max abs error {c.max_abs:.3g} from float64, PyTorch fp32's {r.max_abs:.3g}: more than "
                            f"{FLOAT64_SPREAD:g}x that + the gate = {allowed:.3g}")
        deficit = FLOAT64_SPREAD ** 2 * (1 - r.cosine) + (1 - self.min_cosine)
        if not 1 - c.cosine <= deficit:
            problems.append(f"cosine {c.cosine:.6f} with float64, PyTorch fp32's {r.cosine:.6f}: below "
                            f"{1 - deficit:.6f}")
        return problems


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
#: the parity entries of the decoder stage (each image stage is its own entry, under its own name)
DECODER_ENTRIES = ("prefill", "decode")


@dataclass
class ParityPolicy:
    #: per parity entry (an image stage's name, prefill, decode); an entry not named gets the fp32 default
    tolerances: dict[str, Tolerance] = field(default_factory=dict)
    #: greedy tokens must equal the original model's for fp32 builds
    require_identical_tokens: bool = True
    #: an fp32 entry's tolerance, and any entry's not named
    fp32: Tolerance = field(default_factory=Tolerance)

    @classmethod
    def for_precisions(cls, precisions: dict[str, str], decoder_stage: str,
                       fp32: Tolerance = Tolerance()) -> "ParityPolicy":
        """Default gates for the build's precision per stage (stage name -> precision); greedy
        tokens must be identical only when every stage is fp32. ``fp32``: the element-wise gate of the
        fp32 stages (a user's --fp32-atol / --fp32-rtol)."""
        def gate(precision: str) -> Tolerance:
            return fp32 if precision == "fp32" else PRECISION_TOLERANCES[precision]

        tolerances = {stage: gate(p) for stage, p in precisions.items() if stage != decoder_stage}
        tolerances.update({entry: gate(precisions[decoder_stage]) for entry in DECODER_ENTRIES})
        return cls(tolerances=tolerances, require_identical_tokens=all(p == "fp32" for p in precisions.values()),
                   fp32=fp32)

    def tolerance(self, entry: str) -> Tolerance:
        return self.tolerances.get(entry, self.fp32)

    def with_overrides(self, overrides: dict[str, dict[str, float]]) -> "ParityPolicy":
        tol = dict(self.tolerances)
        for stage, fields in overrides.items():
            tol[stage] = replace(tol.get(stage, self.fp32), **fields)
        return replace(self, tolerances=tol)

    def problems(self, entry: str, output: str, metrics: TensorMetrics,
                 exact: dict[str, dict[str, list[ExactMetrics]]] | None = None) -> list[str]:
        """Why one output of one entry fails (empty: it passes). An element-wise failure measured against
        PyTorch in float64 too (``exact``: per recorded call) passes when every call passes
        ``Tolerance.check_exact`` (the graph within FLOAT64_SPREAD x PyTorch fp32's own distance from float64 on
        that call, plus the gate); otherwise its failure says both distances on the first call that fails."""
        tol = self.tolerance(entry)
        problems = tol.check(metrics)
        measured = (exact or {}).get(entry, {}).get(output)
        if problems and measured and tol.elementwise:
            beyond = next((found for found in map(tol.check_exact, measured) if found), [])
            if not beyond:
                return []
            problems = [f"{p} (against PyTorch in float64: {'; '.join(beyond)})" for p in problems]
        return problems

    def needs_exact(self, stages: dict[str, dict[str, TensorMetrics]]) -> list[str]:
        """The entries with an output failing an element-wise gate: what PyTorch in float64 may arbitrate."""
        return [entry for entry, outputs in stages.items()
                if self.tolerance(entry).elementwise and any(self.tolerance(entry).check(m) for m in outputs.values())]

    def passed_by_float64(self, stages: dict[str, dict[str, TensorMetrics]],
                          exact: dict[str, dict[str, list[ExactMetrics]]]) -> list[str]:
        """``entry/output`` for each output that failed its gate against PyTorch fp32 and passed against float64."""
        return [f"{entry}/{output}" for entry, outputs in stages.items() for output, m in outputs.items()
                if output in exact.get(entry, {}) and self.tolerance(entry).check(m)
                and not self.problems(entry, output, m, exact)]

    def judge(self, stages: dict[str, dict[str, TensorMetrics]],
              tokens: dict[str, list[TokenMetrics]],
              exact: dict[str, dict[str, list[ExactMetrics]]] | None = None) -> list[str]:
        """Every failure as one line; empty when the build passes. ``exact``: entries also measured
        against PyTorch in float64, per recorded call (``problems``)."""
        failures = []
        for stage, outputs in stages.items():
            for output, metrics in outputs.items():
                failures += [f"{stage}/{output}: {p}" for p in self.problems(stage, output, metrics, exact)]
        if self.require_identical_tokens:
            bound = self.near_tie_bound(stages)
            for comparison, runs in tokens.items():
                for run in runs:
                    if run.identical or self.near_tie(run, bound):
                        continue
                    failures.append(f"end-to-end {comparison}: greedy tokens differ from token "
                                    f"{run.first_divergence} for prompt {run.prompt!r}{_not_a_tie(run, bound)}")
        return failures

    def near_tie_bound(self, stages: dict[str, dict[str, TensorMetrics]]) -> float | None:
        """Twice the logits error the decode step's gate allows (its element-wise bound on the measured logits'
        scale): two tokens whose logits are nearer than that may swap under any graph the gate accepts. None where
        the decode gate bounds only the direction, or its logits were not measured."""
        tol, logits = self.tolerance("decode"), stages.get("decode", {}).get("logits")
        return 2 * tol.allowed(logits) if logits is not None and tol.elementwise else None

    def near_tie(self, run: TokenMetrics, bound: float | None) -> bool:
        """A divergence this policy passes: an fp32 build's, where at every departure measured (every one along
        the reference's tokens where the run was ``followed``) the candidate's own token led the reference's by
        at most ``bound`` (``near_tie_bound``)."""
        return (self.require_identical_tokens and not run.identical and bound is not None and bool(run.departures)
                and all(margin is not None and margin <= bound for _, margin in run.departures))

    def near_ties(self, stages: dict[str, dict[str, TensorMetrics]],
                  tokens: dict[str, list[TokenMetrics]]) -> list[str]:
        """Each greedy divergence passed as a near tie (``near_tie_bound``), one line each."""
        bound = self.near_tie_bound(stages)
        return [f"{comparison}: {run.prompt!r} from token {run.first_divergence} ({_departed(run)} <= {bound:.3g})"
                for comparison, runs in tokens.items() for run in runs if self.near_tie(run, bound)]


def _departed(run: TokenMetrics, shown: int = 5) -> str:
    """Where and by how much a run departs: "margin 0.002 at token 3", "margins 0.002, 0.001 at tokens 3, 9" (the
    first ``shown``, then how many more)."""
    many, first = "s" if len(run.departures) > 1 else "", run.departures[:shown]
    more = f" and {len(run.departures) - shown} more" if len(run.departures) > shown else ""
    margins = ", ".join("unmeasured" if m is None else f"{m:.3g}" for _, m in first)
    return f"margin{many} {margins} at token{many} {', '.join(str(at) for at, _ in first)}{more}"


def _not_a_tie(run: TokenMetrics, bound: float | None) -> str:
    """Why a divergence is no near tie, as a parenthesis for its failure line ("" where nothing was measured)."""
    if not run.departures:
        return " (along the reference's tokens it chose the same ones: not reproduced)" if run.followed else ""
    along = " along the reference's tokens" if run.followed else ""
    limit = "" if bound is None else f"; twice the logits error the decode gate allows is {bound:.3g}"
    return f" (its own token led the reference's{along}: {_departed(run)}, in log-probability{limit}: not a near tie)"


@dataclass(frozen=True)
class AccuracyGate:
    """Task accuracy of each candidate may be at most ``max_drop_points`` below the reference's,
    measured on the same questions. Greedy tokens of a reduced-precision build may move; whether
    its answers got worse is what this judges."""

    max_drop_points: float = DEFAULT_MAX_ACCURACY_DROP_POINTS

    def drops(self, reference, candidates) -> dict[str, float]:
        # rounded: 100 x (0.90 - 0.89) is 1.0000000000000009, which must not fail a 1-point limit
        return {c.backend: round(100.0 * (reference.accuracy - c.accuracy), 9) for c in candidates}

    def judge(self, reference, candidates) -> list[str]:
        return [f"task accuracy: {c.backend} {100 * c.accuracy:.1f}% vs {reference.backend} "
                f"{100 * reference.accuracy:.1f}% on the same {c.questions} {c.dataset} questions, a drop of "
                f"{drop:.1f} points (at most {self.max_drop_points:g} allowed)"
                for c, drop in zip(candidates, self.drops(reference, candidates).values())
                if drop > self.max_drop_points]
