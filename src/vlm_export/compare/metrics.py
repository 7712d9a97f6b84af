"""Parity metrics as plain dataclasses: measured here, judged in policy.py."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class TensorMetrics:
    """Error of one output against the reference, aggregated over samples (worst case)."""

    max_abs: float
    mean_abs: float
    cosine: float  # lowest cosine similarity seen
    ref_max_abs: float  # scale of the reference, for relative tolerances
    samples: int = 1

    @classmethod
    def of(cls, ref: np.ndarray, out: np.ndarray) -> "TensorMetrics":
        if ref.shape != out.shape:
            raise ValueError(f"shape mismatch: reference {ref.shape} vs {out.shape}")
        r, o = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
        if r.size == 0:
            return cls(0.0, 0.0, 1.0, 0.0)
        diff = np.abs(r - o)
        denom = np.linalg.norm(r) * np.linalg.norm(o)
        cos = float(r @ o / denom) if denom > 0 else float(np.array_equal(r, o))
        return cls(float(diff.max()), float(diff.mean()), cos, float(np.abs(r).max()))

    def merge(self, other: "TensorMetrics") -> "TensorMetrics":
        n = self.samples + other.samples
        # np.maximum / np.minimum keep a NaN from either side (Python's max/min drop it when it comes second)
        return TensorMetrics(
            float(np.maximum(self.max_abs, other.max_abs)),
            (self.mean_abs * self.samples + other.mean_abs * other.samples) / n,
            float(np.minimum(self.cosine, other.cosine)),
            float(np.maximum(self.ref_max_abs, other.ref_max_abs)),
            n,
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ExactMetrics:
    """One fp32 output against PyTorch in float64 on the same feeds (the exact answer, as nearly as the
    model's own code computes it): how far PyTorch's fp32 output is from it, and how far the candidate's is.
    Each TensorMetrics has the float64 output as its reference."""

    reference: TensorMetrics  # PyTorch fp32
    candidate: TensorMetrics  # the graph

    def merge(self, other: "ExactMetrics") -> "ExactMetrics":
        return ExactMetrics(self.reference.merge(other.reference), self.candidate.merge(other.candidate))

    def to_dict(self) -> dict:
        return {"reference": self.reference.to_dict(), "candidate": self.candidate.to_dict()}


@dataclass
class TokenMetrics:
    """Greedy tokens of a candidate against a reference generation."""

    prompt: str
    reference: list[int]
    candidate: list[int]
    #: where the candidate parts from the reference: each position at which it chooses another token than the
    #: reference's, with how far its own token led the reference's in its logits there (their log-probabilities'
    #: difference; None where not measured). Every such position where the candidate was also run along the
    #: reference's tokens (teacher forcing: ``followed``), else the first divergence only; empty where identical
    #: or not measured
    departures: tuple[tuple[int, float | None], ...] = ()
    followed: bool = False

    @property
    def margin(self) -> float | None:
        """At the first divergence, how far the candidate's own token led the reference's (None: not measured)."""
        return self.departures[0][1] if self.departures else None

    @property
    def first_divergence(self) -> int | None:
        """Index of the first differing token, or None when the sequences are equal."""
        for i, (a, b) in enumerate(zip(self.reference, self.candidate)):
            if a != b:
                return i
        return None if len(self.reference) == len(self.candidate) else min(len(self.reference), len(self.candidate))

    @property
    def identical(self) -> bool:
        return self.first_divergence is None

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "reference": self.reference, "candidate": self.candidate,
                "first_divergence": self.first_divergence, "identical": self.identical, "margin": self.margin,
                "departures": [{"token": at, "margin": margin} for at, margin in self.departures],
                "followed": self.followed}
