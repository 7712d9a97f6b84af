"""One decode step's attention on ONNX Runtime's CPU provider, one layer, the demo's geometry (9 query
heads, 3 KV heads, head 64, 119 positions): GroupQueryAttention on a shared KV buffer (what the fused
decoder runs) against the standard ONNX alternatives, for 1 and 8 rows.

    python benchmarks/decode_attention.py

* ``gqa``: com.microsoft.GroupQueryAttention, packed q/k/v, past = present = one buffer of 256 positions;
* ``matmul``: MatMul/Softmax/MatMul with the 3 query heads of each KV head as the rows of one product
  (exactly 119 positions, no mask, no rotary: a lower bound for that formulation);
* ``attention24``: ONNX Attention (opset 24) over the 256-position buffer with ``nonpad_kv_seqlen``;
* ``tensorscatter``: ONNX TensorScatter (opset 24) writing each row's new K at its own position, past and
  present bound to one OrtValue (in place) - the KV write the standard form would need beside Attention.

Issue 14's batched-step profile found GroupQueryAttention the part of a decode step that grows most with
rows; this measures what a standard-op decode attention would buy before building one.
"""
from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as TP, helper

H, KV, D, T, CAP = 9, 3, 64, 119, 256


def _session(graph, opset: int, contrib: bool = False):
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if contrib else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 11 if opset >= 24 else 10
    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads, o.log_severity_level = 2, 1, 3
    return ort.InferenceSession(model.SerializeToString(), o, providers=["CPUExecutionProvider"])


def _p50_ms(call, n: int = 300) -> float:
    for _ in range(20):
        call()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return round(1000 * float(np.median(times)), 4)


def _vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def measure(rows: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    out = {}
    qkv = rng.standard_normal((rows, 1, (H + 2 * KV) * D)).astype(np.float32)
    buf = rng.standard_normal((rows, KV, CAP, D)).astype(np.float32)
    g = helper.make_graph([helper.make_node("GroupQueryAttention", ["qkv", "", "", "pk", "pv", "sk", "tot"],
                                            ["o", "k", "v"], domain="com.microsoft", num_heads=H, kv_num_heads=KV)],
                          "gqa", [_vi("qkv", TP.FLOAT, list(qkv.shape)), _vi("pk", TP.FLOAT, list(buf.shape)),
                                  _vi("pv", TP.FLOAT, list(buf.shape)), _vi("sk", TP.INT32, [rows]), _vi("tot", TP.INT32, [])],
                          [_vi(n, TP.FLOAT, None) for n in ("o", "k", "v")])
    s = _session(g, 21, contrib=True)
    feeds = {"qkv": qkv, "pk": buf, "pv": buf.copy(), "sk": np.full(rows, T - 1, np.int32), "tot": np.array(CAP, np.int32)}
    out["gqa"] = _p50_ms(lambda: s.run(None, feeds))
    q, k = rng.standard_normal((rows, KV, H // KV, D)).astype(np.float32), rng.standard_normal((rows, KV, T, D)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
                           helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=-1),
                           helper.make_node("MatMul", ["p", "v"], ["o"])], "matmul",
                          [_vi("q", TP.FLOAT, list(q.shape)), _vi("k", TP.FLOAT, list(k.shape)), _vi("v", TP.FLOAT, list(k.shape))],
                          [_vi("o", TP.FLOAT, None)])
    s2 = _session(g, 21)
    out["matmul"] = _p50_ms(lambda: s2.run(None, {"q": q, "k": k, "v": k}))
    q4 = rng.standard_normal((rows, H, 1, D)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Attention", ["q", "k", "v", "", "", "", "lens"], ["o"])], "attention",
                          [_vi("q", TP.FLOAT, list(q4.shape)), _vi("k", TP.FLOAT, list(buf.shape)),
                           _vi("v", TP.FLOAT, list(buf.shape)), _vi("lens", TP.INT64, [rows])], [_vi("o", TP.FLOAT, None)])
    s3 = _session(g, 24)
    feeds3 = {"q": q4, "k": buf, "v": buf, "lens": np.full(rows, T, np.int64)}
    out["attention24"] = _p50_ms(lambda: s3.run(None, feeds3))
    g = helper.make_graph([helper.make_node("TensorScatter", ["past", "upd", "idx"], ["present"], axis=-2)], "scatter",
                          [_vi("past", TP.FLOAT, list(buf.shape)), _vi("upd", TP.FLOAT, [rows, KV, 1, D]),
                           _vi("idx", TP.INT64, [rows])], [_vi("present", TP.FLOAT, None)])
    s4 = _session(g, 24)
    cache = ort.OrtValue.ortvalue_from_numpy(buf.copy())
    io = s4.io_binding()
    io.bind_ortvalue_input("past", cache)
    io.bind_cpu_input("upd", np.ones((rows, KV, 1, D), np.float32))
    io.bind_cpu_input("idx", np.full(rows, T - 1, np.int64))
    io.bind_ortvalue_output("present", cache)  # one buffer: written in place
    out["tensorscatter"] = _p50_ms(lambda: s4.run_with_iobinding(io))
    return out


def main() -> None:
    print(f"ONNX Runtime {ort.__version__}, one layer, {H} query heads / {KV} KV heads, head {D}, {T} positions (p50 ms)")
    for rows in (1, 8):
        print(f"rows {rows}: " + ", ".join(f"{k} {v}" for k, v in measure(rows).items()))


if __name__ == "__main__":
    main()
