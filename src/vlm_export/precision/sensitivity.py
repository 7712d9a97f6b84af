"""Which MatMuls of an int8 decoder stay fp32 (issue 16, item 4): the fewest that bring its logits
within the int8 gate on the calibration pairs.

Per-token int8 loses unevenly: on the demo's SmolLM2 the MLP down projections, whose input (the
SwiGLU product) keeps large channels after smoothing, rank first (2.2-6.1% of their output per token
with round-to-nearest weights, 2.6% at most with GPTQ's; most other projections ~1.5-2%), and keeping
them fp32 is what moves the logits (all 120 MatMuls int8, round to nearest: last-token logits cosine
0.965 at worst on 24 held-out prompts; the 16 worst kept fp32: 0.989, mean 0.9976). So, like
Polygraphy's ``debug precision`` (which bisects a TensorRT network's layers into higher precision
until the outputs match) but in two cheap steps:

1. **Rank** every quantizable MatMul by the error per-token int8 makes in its own output, measured on
   the calibration pairs' real activations of the smoothed graph (one ONNX Runtime pass; the
   quantization is simulated in numpy, the same arithmetic as the int8 kernels): the mean over
   tokens of ``|Y - Y_int8| / |Y|``. Per token, not over the whole tensor, so that a few tokens with
   huge activations (the first token's "attention sink") do not outweigh all the others.
2. **Choose** how many of the worst to keep fp32: the int8 graph is built and run on the calibration
   pairs with 0, then a step more, of the worst kept fp32, until its logits' lowest cosine to the
   fp32 graph's reaches ``TARGET_COSINE``, at most ``MAX_SHARE`` of the MatMuls (past that, int8 buys
   little speed; one of a stage with two or three); where none reaches it, the best one found is used
   and the build's gate judges it.

Why no finer search: keeping one MatMul fp32 alone (leave-one-out over the demo's 40 worst, GPTQ codes)
moved the calibration pairs' worst cosine anywhere from 0.929 to 0.996, from 0.988 with none kept: the
int8 errors partly cancel, so a search over sets would fit the calibration pairs, not the model.

An int8 image stage (static per-tensor activations, ONNX Runtime's ``quantize_static``) gets the same
two steps on its own outputs (``activations="per-tensor"``): its MatMuls and Gemms ranked by the error
one scale per tensor (the calibrated range) makes in their output - attention's MatMuls of two
activations too, which the static quantizer rounds on both sides - then the fewest of the worst kept
fp32 that bring the stage's outputs to ``TARGET_COSINE`` (the stage's own int8 gate) on the calibration
pairs. Convolutions (a ViT's patch embedding) are not ranked: they stay int8.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ExportError
from .probe import ZERO, ActivationProbe, default_budget, sampled_rows, tensor_ranges, waiting
from .smoothquant import int8_weights

#: the int8 gate's logits cosine (compare.policy), aimed at on the calibration pairs
TARGET_COSINE = 0.99
#: at most this share of the quantizable MatMuls stays fp32
MAX_SHARE = 0.25
#: the counts tried go up in steps of this share of the MatMuls (at least one)
STEP_SHARE = 1 / 16
#: calibration tokens the ranking samples per MatMul input (all of the demo's 16 prompts)
MAX_ROWS = 2048


@dataclass
class Fallback:
    """What ``choose`` kept fp32 and what it measured on the way (recorded in the manifest)."""

    kept: list[str]  # MatMul names, worst first
    setting: str  # "auto" or the count asked for
    target_cosine: float | None
    trials: list[dict] = field(default_factory=list)  # {"fp32_matmuls": n, "min_cosine": c} per count tried
    errors: dict[str, float] = field(default_factory=dict)  # the kept MatMuls' own int8 output error

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "Fallback":
        return cls(list(data["kept"]), str(data["setting"]), data.get("target_cosine"), list(data.get("trials", [])),
                   dict(data.get("errors", {})))


#: how the ranked layers' activations are quantized: per token at run time (an int8 decoder's
#: SmoothQuant form) or one calibrated scale per tensor (an image stage's static Q/DQ)
ACTIVATIONS = ("per-token", "per-tensor")


def _int8(x: np.ndarray, largest) -> np.ndarray:
    """``x`` after symmetric int8 with ``scale = largest / 127`` (per row or one for all)."""
    scale = np.maximum(np.asarray(largest, np.float32) / 127, np.finfo(np.float32).tiny)
    return np.clip(np.rint(x / scale), -127, 127) * scale


def _flag(node: onnx.NodeProto, name: str) -> bool:
    return any(a.name == name and a.i for a in node.attribute)


def weight_kn(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto], source_dir: Path | None = None
              ) -> np.ndarray:
    """The constant weight of a MatMul or Gemm as ``[K, N]`` (``x @ w``): a Gemm's B transposed
    where ``transB`` says so; one kept in an external data file read from ``source_dir``, alone."""
    w = numpy_helper.to_array(inits[node.input[1]], os.fspath(source_dir or "")).astype(np.float32)
    return w.T if node.op_type == "Gemm" and _flag(node, "transB") else w


def _width(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]) -> int:
    """K of ``weight_kn``, from the initializer's dims (its data not read)."""
    dims = inits[node.input[1]].dims
    return dims[1] if node.op_type == "Gemm" and _flag(node, "transB") else dims[0]


#: what ``static_layers`` takes and how the candidates are written (``convert.keep_quantizers_apart``):
#: part of an image stage's calibration cache key, so that a fallback chosen otherwise is chosen again
STATIC_INT8_KEY = "ranked=matmul+gemm+attention qdq=per-reader"


def static_layers(model: onnx.ModelProto, keep: Iterable[str] = ()) -> list[onnx.NodeProto]:
    """What an image stage's static int8 quantizes and its fallback ranks: the MatMuls and Gemms with a
    2-D float initializer as their weight (B; ``weight_kn`` reads it), and the MatMuls of two
    activations (attention's scores and its weighted sum), whose inputs are both quantized too."""
    inits = {i.name: i for i in model.graph.initializer}
    keep = set(keep)

    def weighted(n) -> bool:
        return (len(n.input) > 1 and n.input[1] in inits and len(inits[n.input[1]].dims) == 2
                and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT)

    return [n for n in model.graph.node if n.name not in keep and (
        (n.op_type == "MatMul" or n.op_type == "Gemm" and not _flag(n, "transA")) and weighted(n)
        or n.op_type == "MatMul" and not any(i in inits for i in n.input))]


def matmul_errors(model: onnx.ModelProto, matmuls: list[onnx.NodeProto], feeds: Iterable[Mapping[str, np.ndarray]],
                  threads: int = 2, budget: int | None = None,
                  weights: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
                  activations: str = "per-token",
                  ranges: Mapping[str, tuple[float, float]] | None = None,
                  source_dir: Path | None = None) -> dict[str, float]:
    """Per MatMul (or Gemm) of ``matmuls`` (of the smoothed ``model``), the mean over calibration tokens
    of the relative error int8 makes in its output: activations quantized as ``activations`` says
    (``ACTIVATIONS``; per tensor: with the largest magnitude seen on the feeds as its range, minmax
    calibration's), a constant 2-D weight per channel as ``weights`` gives it (codes, scales; GPTQ's) or
    rounded to nearest. One pass keeps an even sample of each feed's tokens (``MAX_ROWS`` in all, fewer
    where every input's rows would not fit ``budget`` bytes; sampled inside the graph: ``probe.sampled_rows``), so
    that each weight is quantized once. A MatMul of two activations (per tensor only: an image stage's attention)
    is measured on whole outputs, inside the graph (``_pair_errors``). Per tensor, the ranges are ``ranges`` (the
    calibrated minmax ranges) where they have the tensor, else measured first (``probe.tensor_ranges``).
    ``source_dir``: the folder of a ``model`` loaded without its external data (its weights read from there)."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations {activations!r} is not one of {', '.join(ACTIVATIONS)}")
    feeds = list(feeds)
    budget = budget or default_budget()
    inits = {i.name: i for i in model.graph.initializer}
    weighted = [n for n in matmuls if n.input[1] in inits]
    pairs = [n for n in matmuls if n.input[1] not in inits]
    if pairs and activations != "per-tensor":
        raise ValueError("a MatMul of two activations is ranked with per-tensor activations only")
    widths = {n.input[0]: _width(n, inits) for n in weighted}
    largest = {}
    if activations == "per-tensor":  # each input's calibrated range (minmax's), over every token, not a sample
        needed = sorted({*widths, *(t for n in pairs for t in n.input[:2])})
        missing = [t for t in needed if t not in (ranges or {})]
        ranges = {**(ranges or {}), **(tensor_ranges(model, missing, feeds, threads, source_dir) if missing else {})}
        largest = {t: max(-float(ranges[t][0]), float(ranges[t][1])) for t in needed}
    errors = _pair_errors(model, pairs, feeds, threads, largest, source_dir) if pairs else {}
    if not weighted:
        return errors
    tensors = sorted(widths)
    rows = max(16, min(MAX_ROWS, budget // (4 * max(sum(widths.values()), 1))))
    per_feed = max(1, -(-rows // max(len(feeds), 1)))
    xs = sampled_rows(model, {t: widths[t] for t in tensors}, feeds, per_feed, threads, source_dir)
    if not all(len(x) for x in xs.values()):
        raise ExportError("no calibration tokens reached the MatMuls to rank their int8 error")
    quantized = {name: _int8(x, np.abs(x).max(axis=1, keepdims=True) if activations == "per-token"
                             else largest[name]) for name, x in xs.items()}
    for node in weighted:
        w = weight_kn(node, inits, source_dir)
        y = xs[node.input[0]] @ w
        norm = np.linalg.norm(y, axis=1)
        live = norm > 0
        codes, scales = (weights or {}).get(node.name) or int8_weights(w)
        err = np.linalg.norm(y - quantized[node.input[0]] @ (codes.astype(np.float32) * scales), axis=1)
        errors[node.name] = float((err[live] / norm[live]).mean()) if live.any() else 0.0
    return errors


def _pair_errors(model: onnx.ModelProto, pairs: list[onnx.NodeProto], feeds: list[Mapping[str, np.ndarray]],
                 threads: int, largest: Mapping[str, float], source_dir: Path | None = None) -> dict[str, float]:
    """Per MatMul of two activations (an image stage's attention: its scores and their use), the mean over the feeds
    of the relative error of rounding both sides per tensor (``largest``: each side's largest magnitude over every
    feed, its range), on whole outputs. A tower's attention scores are heads x patches² per layer - gigabytes for a
    large tower on a large image, tens of them for all layers - so nothing that size is fetched: the stage runs over
    the feeds with the errors computed inside the graph (``_error_nodes``), only scalars coming out, each pair's
    error computed before the stage goes on past it, so that ONNX Runtime frees its operands as it would (memory:
    about one run's)."""
    nodes, outputs, rewire = _error_nodes(pairs, largest)
    sums: dict[str, list[tuple[float, float]]] = {node.name: [] for node in pairs}
    with ActivationProbe(model, outputs, threads, source_dir=source_dir, nodes=nodes, rewire=rewire) as probe:
        for got in probe.run(feeds, outputs):
            for node, (error, norm) in zip(pairs, zip(outputs[::2], outputs[1::2])):
                sums[node.name].append((float(got[error]), float(got[norm])))
    relative = {name: [math.sqrt(error / norm) for error, norm in measured if norm > 0] for name, measured in sums.items()}
    return {name: float(np.mean(values)) if values else 0.0 for name, values in relative.items()}


def _error_nodes(pairs: list[onnx.NodeProto], largest: Mapping[str, float]
                 ) -> tuple[list[onnx.NodeProto], list[str], dict[str, str]]:
    """Nodes computing, per pair ``y = a @ b`` (its own output), ``||y - q(a) @ q(b)||²`` and ``||y||²`` (q: ``_int8``
    with ``largest`` as the range, the same arithmetic in ONNX: Round is half to even as numpy's rint), their
    outputs (error and norm for each pair in order), and the rewiring that makes the graph wait for them (y's own
    readers read ``y + 0 x (error + norm)``: ``probe.waiting``)."""
    clip = [helper.make_node("Constant", [], [f"int8_rank_{end}"], name=f"int8_rank_{end}", value_float=float(v))
            for end, v in (("low", -127.0), ("high", 127.0))]
    nodes, outputs, scales, rewire = [*clip, ZERO], [], {}, {}

    def quantized(t: str) -> str:
        if t not in scales:
            i = len(scales)
            scale = float(np.maximum(np.float32(largest[t]) / np.float32(127), np.finfo(np.float32).tiny))
            base = f"int8_rank_q{i}"
            nodes.extend([helper.make_node("Constant", [], [f"{base}_scale"], name=f"{base}_scale", value_float=scale),
                          helper.make_node("Div", [t, f"{base}_scale"], [f"{base}_scaled"], name=f"{base}_scaled"),
                          helper.make_node("Round", [f"{base}_scaled"], [f"{base}_round"], name=f"{base}_round"),
                          helper.make_node("Clip", [f"{base}_round", "int8_rank_low", "int8_rank_high"],
                                           [f"{base}_codes"], name=f"{base}_codes"),
                          helper.make_node("Mul", [f"{base}_codes", f"{base}_scale"], [base], name=base)])
            scales[t] = base
        return scales[t]

    for i, node in enumerate(pairs):
        base, y = f"int8_rank_pair{i}", node.output[0]
        nodes += [helper.make_node("MatMul", [quantized(node.input[0]), quantized(node.input[1])], [f"{base}_q"],
                                   name=f"{base}_q"),
                  helper.make_node("Sub", [y, f"{base}_q"], [f"{base}_diff"], name=f"{base}_diff"),
                  helper.make_node("ReduceSumSquare", [f"{base}_diff"], [f"{base}_error"], name=f"{base}_error",
                                   keepdims=0),
                  helper.make_node("ReduceSumSquare", [y], [f"{base}_norm"], name=f"{base}_norm", keepdims=0),
                  helper.make_node("Add", [f"{base}_error", f"{base}_norm"], [f"{base}_both"], name=f"{base}_both"),
                  *waiting(y, f"{base}_both", f"{base}_after")]
        outputs += [f"{base}_error", f"{base}_norm"]
        rewire[y] = f"{base}_after"
    return nodes, outputs, rewire


def _cosines(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    worst = 1.0
    for r, c in zip(reference, candidate):
        r, c = r.astype(np.float64).ravel(), c.astype(np.float64).ravel()
        denom = np.linalg.norm(r) * np.linalg.norm(c)
        worst = min(worst, float(r @ c / denom) if denom > 0 else float(np.array_equal(r, c)))
    return worst


def _outputs(model: onnx.ModelProto, outputs: Sequence[str], feeds: list[Mapping[str, np.ndarray]], threads: int,
             emulate_qdq: bool = False, source_dir: Path | None = None) -> list[np.ndarray]:
    """Each feed's ``outputs``, one after another (``_cosines`` pairs them with another run's)."""
    with ActivationProbe(model, outputs, threads, emulate_qdq, source_dir) as probe:
        return [values[name] for values in probe.run(feeds, list(outputs)) for name in outputs]


def counts(total: int) -> list[int]:
    """The fp32 counts ``auto`` tries, in order: 0, then steps of ``STEP_SHARE`` up to ``MAX_SHARE``, and
    at least one where there are two or more (a LLaVA projector's two MatMuls: a quarter of 2 is none)."""
    cap = max(int(total * MAX_SHARE), 1 if total >= 2 else 0)
    step = max(1, math.ceil(total * STEP_SHARE))
    return sorted(set(range(0, cap + 1, step)) | {cap})


@dataclass
class Ranking:
    """What ``rank`` measured on the fp32 graph: each ranked MatMul's int8 output error, and the graph's outputs on
    the calibration feeds, which ``search``'s trials are judged against (None where a count was asked for)."""

    errors: dict[str, float]
    outputs: list[str]
    reference: list[np.ndarray] | None

    @property
    def worst_first(self) -> list[str]:
        return sorted(self.errors, key=lambda name: -self.errors[name])


def rank(smoothed: onnx.ModelProto, matmuls: list[onnx.NodeProto], feeds: list[Mapping[str, np.ndarray]],
         setting: str | int = "auto", output: str | Sequence[str] = "logits", threads: int = 2, note=None,
         weights: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None, activations: str = "per-token",
         ranges: Mapping[str, tuple[float, float]] | None = None, source_dir: Path | None = None) -> Ranking:
    """``choose``'s first step, the only one that reads ``smoothed``: ``matmuls`` ranked by their int8 output error
    (``matmul_errors``, with ``weights``, ``activations``, ``ranges`` and ``source_dir``) and, for ``setting``
    ``auto``, ``output`` on the feeds. Nothing of ``smoothed`` is kept (names and arrays only), so a caller can free it
    before the trials (an image stage: 1.7 GB for HunyuanOCR's tower, beside ONNX Runtime's quantizer's own copy)."""
    outputs = [output] if isinstance(output, str) else list(output)
    if note:
        note(f"ranking {len(matmuls)} MatMuls by their int8 output error on {len(feeds)} calibration inputs")
    errors = matmul_errors(smoothed, matmuls, feeds, threads, weights=weights, activations=activations,
                           ranges=ranges, source_dir=source_dir)
    reference = _outputs(smoothed, outputs, feeds, threads, source_dir=source_dir) if setting == "auto" else None
    return Ranking(errors, outputs, reference)


def search(ranking: Ranking, quantize, feeds: list[Mapping[str, np.ndarray]], setting: str | int = "auto",
           threads: int = 2, note=None, emulate_qdq: bool = False, at_most_all: bool = False
           ) -> tuple[onnx.ModelProto, Fallback]:
    """``choose``'s second step: the int8 graphs ``quantize(kept)`` makes, with 0, then more of the worst MatMuls
    kept fp32, judged against ``ranking.reference`` until one reaches ``TARGET_COSINE`` (``setting`` ``auto``), or
    the one with the ``setting`` worst kept (a count; more than there are is refused, or all of them with
    ``at_most_all``)."""
    ranked, errors, outputs = ranking.worst_first, ranking.errors, ranking.outputs

    def candidate(count: int) -> onnx.ModelProto:
        return quantize(ranked[:count])

    def fallback(count: int, trials: list[dict]) -> Fallback:
        return Fallback(ranked[:count], str(setting), TARGET_COSINE if setting == "auto" else None, trials,
                        {name: round(errors[name], 5) for name in ranked[:count]})

    if setting != "auto":
        count = int(setting)
        if at_most_all:
            count = min(count, len(ranked))
        if not 0 <= count <= len(ranked):
            raise ExportError(f"cannot keep {count} MatMuls fp32: the decoder has {len(ranked)} quantizable ones")
        return candidate(count), fallback(count, [])
    best, trials = None, []  # (cosine, count); one candidate in memory at a time
    for count in counts(len(ranked)):
        model = candidate(count)
        cosine = _cosines(ranking.reference, _outputs(model, outputs, feeds, threads, emulate_qdq))
        trials.append({"fp32_matmuls": count, "min_cosine": round(cosine, 5)})
        if note:
            note(f"{count} of {len(ranked)} MatMuls fp32: lowest {'/'.join(outputs)} cosine {cosine:.4f} "
                 f"(target {TARGET_COSINE})")
        if best is None or cosine > best[0]:
            best = (cosine, count)
        if cosine >= TARGET_COSINE:
            return model, fallback(count, trials)
        del model
    return candidate(best[1]), fallback(best[1], trials)  # none reached the target: the best one, made again


def choose(smoothed: onnx.ModelProto, quantize, matmuls: list[onnx.NodeProto], feeds: list[Mapping[str, np.ndarray]],
           setting: str | int = "auto", output: str | Sequence[str] = "logits", threads: int = 2,
           note=None, weights: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
           emulate_qdq: bool = False, activations: str = "per-token",
           at_most_all: bool = False, ranges: Mapping[str, tuple[float, float]] | None = None,
           source_dir: Path | None = None) -> tuple[onnx.ModelProto, Fallback]:
    """The int8 graph with the fewest of ``matmuls`` kept fp32 that reaches ``TARGET_COSINE`` on every
    one of ``output`` (``setting`` ``auto``), or with the ``setting`` worst kept fp32 (a count; more
    than there are is refused, or all of them with ``at_most_all``): ``rank`` then ``search``. ``quantize(kept)``
    returns the int8 graph of ``smoothed`` with the named layers kept fp32, with the int8 weights ``weights``
    (``matmul_errors``, as are ``activations`` and ``ranges``) ranks by (a new model). ``note(text)`` is told each
    trial. ``source_dir``: the folder of a ``smoothed`` loaded without its external data (its weights are read from
    there, one at a time, and copied file to file for the sessions, never loaded whole). ``emulate_qdq``: the
    candidates are judged with their Q/DQ pairs run as written (a graph only TensorRT serves). The graph returned is
    the last one ``quantize`` made (a caller writing each candidate to one file finds the chosen one there)."""
    ranking = rank(smoothed, matmuls, feeds, setting, output, threads, note, weights, activations, ranges, source_dir)
    return search(ranking, quantize, feeds, setting, threads, note, emulate_qdq, at_most_all)
