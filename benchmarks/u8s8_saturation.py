"""What ONNX Runtime's U8S8 kernels on an x86 CPU without VNNI/AMX would do to a build's int8 image stages.

    python benchmarks/u8s8_saturation.py BUILD [--images DIR] [--questions N] [--json OUT]

On x86, ONNX Runtime turns an int8 Q/DQ graph's activations into uint8 and fuses each MatMul/Gemm into a
U8S8 integer GEMM. Without VNNI/AMX that kernel multiplies bytes with ``vpmaddubsw``, which adds each pair
of neighbouring u8 x s8 products in int16 and saturates past 32767 (ONNX Runtime's quantization docs; the
decoder's U8S8 MatMuls measured 22% error on a row on an AVX2-only EPYC). This script computes, in numpy,
for each weight MatMul/Gemm of each int8 image stage (variant format QDQ): the exact int32 product of its
codes and the product with every pair saturated, on the activations of real images run through the
build's own preprocessing and image stages. It prints, per stage, how many MatMuls would saturate, the
share of their outputs touched and the worst error against the largest output. Convolutions are not
emulated. ``--questions N``: the whole image path is also run with every such MatMul saturating (ONNX's
reference evaluator, each one replaced by an emulating op), and the build answers N easy-vqa questions
(evenly spread over the test split) both ways: the stage outputs' cosine and the answers that change.
Nothing here depends on this machine's CPU; vlm-export's runners run such graphs with their Q/DQ pairs
as written on those CPUs (``cpu.u8s8_saturates``), so this is what that avoids.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from vlm_export.manifest import read_manifest
from vlm_export.runtime.load import open_build


def _images(folder: Path | None):
    from PIL import Image

    if folder is not None:
        return [Image.open(p).convert("RGB") for p in sorted(folder.iterdir()) if p.suffix.lower() in (".png", ".jpg", ".jpeg")]
    from skimage import data

    return [Image.fromarray(getattr(data, name)()).convert("RGB") for name in ("chelsea", "coffee", "astronaut", "rocket")]


def _weight_matmuls(model: onnx.ModelProto):
    """(node, activation tensor before its QuantizeLinear, activation scale and zero point, int8 weight
    codes as [K, N]) of each MatMul/Gemm reading a Q/DQ activation and a constant int8 weight."""
    inits = {t.name: t for t in model.graph.initializer}
    made_by = {o: n for n in model.graph.node for o in n.output}

    def constant(name):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        node = made_by.get(name)
        return numpy_helper.to_array(node.attribute[0].t) if node is not None and node.op_type == "Constant" else None

    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        a, b = (made_by.get(i) for i in node.input[:2])
        if a is None or b is None or a.op_type != "DequantizeLinear" or b.op_type != "DequantizeLinear":
            continue
        q, codes = made_by.get(a.input[0]), constant(b.input[0])
        if q is None or q.op_type != "QuantizeLinear" or codes is None or codes.ndim != 2:
            continue
        if node.op_type == "Gemm" and any(at.name == "transB" and at.i for at in node.attribute):
            codes = codes.T
        zero = constant(a.input[2]) if len(a.input) > 2 else np.int8(0)
        yield node, q.input[0], float(constant(a.input[1])), int(zero), codes.astype(np.int64)


def _codes(x: np.ndarray, scale: float, zero: int) -> np.ndarray:
    """The activation's uint8 codes as ONNX Runtime's x86 kernels take them (int8 code + 128), as rows."""
    return np.clip(np.round(x.reshape(-1, x.shape[-1]) / scale) + zero, -128, 127).astype(np.int64) + 128


def _saturated_sum(a: np.ndarray, w: np.ndarray, budget: int = 1 << 25) -> np.ndarray:
    """``a @ w`` with each pair of neighbouring products added in int16, saturating (``vpmaddubsw``), then
    summed in int32; columns a few at a time (the pairs of a ViT-B MLP would take gigabytes at once)."""
    if w.shape[0] % 2:
        a, w = np.pad(a, ((0, 0), (0, 1)), constant_values=128), np.pad(w, ((0, 1), (0, 0)))
    step = max(1, budget // max(1, a.shape[0] * w.shape[0] // 2))
    out = np.empty((a.shape[0], w.shape[1]), np.int64)
    for j in range(0, w.shape[1], step):
        wj = w[:, j:j + step]
        out[:, j:j + step] = np.clip(a[:, 0::2, None] * wj[None, 0::2, :] + a[:, 1::2, None] * wj[None, 1::2, :],
                                     -32768, 32767).sum(1)
    return out


def saturation(x: np.ndarray, scale: float, zero: int, codes: np.ndarray) -> tuple[float, float]:
    """(share of outputs changed, worst error / largest |output|) of ``vpmaddubsw`` against the exact sum."""
    a = _codes(x, scale, zero)
    exact = a @ codes
    output = exact - 128 * codes.sum(0)[None, :]  # the int8 product, the uint8 shift taken back out
    error = np.abs(_saturated_sum(a, codes) - exact)
    return float((error > 0).mean()), float(error.max() / max(np.abs(output).max(), 1))


class SaturatingRunner:
    """An image stage's int8 graph with each weight MatMul/Gemm computed as ``vpmaddubsw`` would
    (ONNX's reference evaluator; the rest of the graph as written). A runner: ``infer(feeds)``."""

    def __init__(self, path: Path):
        from onnx import helper
        from onnx.reference import ReferenceEvaluator
        from onnx.reference.op_run import OpRun

        class SaturatingMatMul(OpRun):
            op_domain = "vlm_export.emulate"

            def _run(self, x, scale, zero, codes, weight_scale, bias=None):
                a, w = _codes(x, scale, zero), codes.astype(np.int64)
                y = (_saturated_sum(a, w) - 128 * w.sum(0)[None, :]) * (scale * weight_scale.reshape(1, -1))
                y = y.astype(np.float32).reshape(*x.shape[:-1], w.shape[1])
                return (y if bias is None else y + bias,)

        model = onnx.load(str(path))
        replaced = {}
        for node, x, scale, zero, codes in _weight_matmuls(model):
            made_by = {o: n for n in model.graph.node for o in n.output}
            weight_dq = made_by[node.input[1]]
            weight_scale = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == weight_dq.input[1]))
            names = [f"{node.name}_emu_{k}" for k in ("scale", "zero", "codes", "wscale")]
            model.graph.initializer.extend([
                numpy_helper.from_array(np.float32(scale), names[0]), numpy_helper.from_array(np.int64(zero), names[1]),
                numpy_helper.from_array(codes, names[2]), numpy_helper.from_array(weight_scale.astype(np.float32), names[3])])
            bias = list(node.input[2:3]) if node.op_type == "Gemm" else []
            replaced[node.name] = helper.make_node("SaturatingMatMul", [x, *names, *bias], list(node.output),
                                                   domain="vlm_export.emulate", name=f"{node.name}_saturating")
        nodes = [replaced.get(n.name, n) for n in model.graph.node]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        model.opset_import.append(helper.make_opsetid("vlm_export.emulate", 1))
        for opset in model.opset_import:  # the evaluator has DequantizeLinear from 19 on (the same for int8)
            if opset.domain in ("", "ai.onnx") and opset.version < 19:
                opset.version = 19
        self.evaluator = ReferenceEvaluator(model, new_ops=[SaturatingMatMul])
        self.outputs = [o.name for o in model.graph.output]

    def infer(self, feeds):
        return dict(zip(self.outputs, self.evaluator.run(None, dict(feeds))))


def _cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def end_to_end(build: Path, stages: list[str], pixel_values, questions: int) -> dict:
    """The image path's outputs and ``questions`` easy-vqa answers, as built and with ``stages`` saturating."""
    from vlm_export.compare.accuracy import answer_all
    from vlm_export.datasets import load_items
    from vlm_export.progress import Progress

    exact, saturated = open_build(build), open_build(build)
    for stage in stages:
        saturated.runners[stage] = SaturatingRunner(exact.runners[stage].path)
    want, got = exact.run_image_stages(pixel_values), saturated.run_image_stages(pixel_values)
    cosines = {spec.name: {t.name: _cosine(want[t.name], got[t.name]) for t in spec.outputs} for spec in exact.image_stages}
    out = {"cosines": cosines}
    if questions:
        name, items = load_items("easy-vqa", "test", spread=questions)
        results = answer_all({"as built": exact, "saturating": saturated}, name, items, Progress())
        out["answers"] = {label: {k: v for k, v in r.to_dict().items() if k != "answers"}
                          for label, r in zip(("as built", "saturating"), results)}
        out["changed"] = sum(a != b for a, b in zip(results[0].answers, results[1].answers))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("build", type=Path)
    parser.add_argument("--images", type=Path, help="a folder of images (default: scikit-image's sample photos)")
    parser.add_argument("--questions", type=int, default=0, help="easy-vqa questions to answer both ways (0: none)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    manifest = read_manifest(args.build)
    pipe = open_build(args.build)
    feeds: dict[str, dict] = {}
    pixel_values = pipe.pixel_values(_images(args.images))
    pipe.run_image_stages(pixel_values, observe=lambda spec, f, _: feeds.setdefault(spec.name, f))
    results = {}
    for stage, entry in manifest["graphs"].items():
        if (entry.get("variant") or {}).get("format") != "QDQ":
            continue
        model = onnx.load(str(args.build / entry["file"]))
        targets = list(_weight_matmuls(model))
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        probe.graph.output.extend(onnx.ValueInfoProto(name=x) for x in dict.fromkeys(t[1] for t in targets))
        options = ort.SessionOptions()
        options.add_session_config_entry("session.disable_quant_qdq", "1")  # the activations as TensorRT sees them
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds[stage])))
        rows = [(node.name, codes.shape[0], *saturation(values[x], scale, zero, codes))
                for node, x, scale, zero, codes in targets]
        hit = [r for r in rows if r[2] > 0]
        results[stage] = {"matmuls": len(rows), "saturating": len(hit),
                          "worst": sorted(({"node": n, "K": k, "outputs_touched": t, "max_error_vs_max_output": e}
                                           for n, k, t, e in rows), key=lambda r: -r["max_error_vs_max_output"])[:5]}
        print(f"{stage}: {len(hit)} of {len(rows)} int8 MatMuls would saturate on x86 without VNNI/AMX"
              + (f"; outputs touched up to {max(r[2] for r in hit):.1%}, worst error {max(r[3] for r in hit):.1%} "
                 "of the largest output" if hit else ""))
    if not results:
        raise SystemExit(f"{args.build} has no int8 image stage (Q/DQ): nothing here runs on U8S8 kernels")
    saturating = [stage for stage, r in results.items() if r["saturating"]]
    if saturating:
        whole = end_to_end(args.build, saturating, pixel_values, args.questions)
        for stage, outputs in whole["cosines"].items():
            print(f"{stage} with saturation: " + ", ".join(f"{name} cosine {c:.5f}" for name, c in outputs.items()))
        if "answers" in whole:
            print(f"easy-vqa, {args.questions} questions: {whole['changed']} answers change; "
                  + ", ".join(f"{k} {v['correct']}/{v['questions']} right" for k, v in whole["answers"].items()))
        results["end_to_end"] = whole
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
