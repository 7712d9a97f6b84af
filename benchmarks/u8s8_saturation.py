"""What ONNX Runtime's U8S8 kernels on an x86 CPU without VNNI/AMX would do to a build's int8 image stages.

    python benchmarks/u8s8_saturation.py BUILD [--images DIR] [--json OUT]

On x86, ONNX Runtime turns an int8 Q/DQ graph's activations into uint8 and fuses each MatMul/Gemm into a
U8S8 integer GEMM. Without VNNI/AMX that kernel multiplies bytes with ``vpmaddubsw``, which adds each pair
of neighbouring u8 x s8 products in int16 and saturates past 32767 (ONNX Runtime's quantization docs; the
decoder's U8S8 MatMuls measured 22% error on a row on an AVX2-only EPYC). This script computes, in numpy,
for each weight MatMul/Gemm of each int8 image stage (variant format QDQ): the exact int32 product of its
codes and the product with every pair saturated, on the activations of real images run through the
build's own preprocessing and image stages. It prints, per stage, how many MatMuls would saturate, the
share of their outputs touched and the worst error against the largest output. Convolutions are not
emulated. Nothing here depends on this machine's CPU; vlm-export's runners run such graphs with their
Q/DQ pairs as written on those CPUs (``cpu.u8s8_saturates``), so this is what that avoids.
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


def saturation(x: np.ndarray, scale: float, zero: int, codes: np.ndarray) -> tuple[float, float]:
    """(share of outputs changed, worst error / largest |output|) of ``vpmaddubsw`` against the exact sum."""
    a = np.clip(np.round(x.reshape(-1, x.shape[-1]) / scale) + zero, -128, 127).astype(np.int64) + 128  # uint8
    w = codes
    if w.shape[0] % 2:
        a, w = np.pad(a, ((0, 0), (0, 1)), constant_values=128), np.pad(w, ((0, 1), (0, 0)))
    exact = a @ w
    pairs = a[:, 0::2, None] * w[None, 0::2, :] + a[:, 1::2, None] * w[None, 1::2, :]
    saturated = np.clip(pairs, -32768, 32767).sum(1)
    output = exact - 128 * w.sum(0)[None, :]  # the int8 product, the uint8 shift taken back out
    error = np.abs(saturated - exact)
    return float((error > 0).mean()), float(error.max() / max(np.abs(output).max(), 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("build", type=Path)
    parser.add_argument("--images", type=Path, help="a folder of images (default: scikit-image's sample photos)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    manifest = read_manifest(args.build)
    pipe = open_build(args.build)
    feeds: dict[str, dict] = {}
    pipe.run_image_stages(pipe.pixel_values(_images(args.images)), observe=lambda spec, f, _: feeds.setdefault(spec.name, f))
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
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
