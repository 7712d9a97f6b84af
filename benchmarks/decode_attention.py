"""One decode step's attention on ONNX Runtime's CPU provider, one layer, the demo's geometry (9 query
heads, 3 KV heads, head 64, 119 positions, a 256-position KV buffer written in place), for 1 and 8 rows:
what the fused decoder runs against the standard-op alternative.

    python benchmarks/decode_attention.py

* ``gqa``: com.microsoft.GroupQueryAttention with rotary inside, packed q/k/v, past = present = one
  OrtValue, fed as the fused decoder feeds it (``export.attention_fuse``): ``total_sequence_length`` =
  the step mask's width (the longest row + 1), not the buffer's capacity;
* ``gqa_copying``: the same with ``pk_out``/``pv_out`` left to ONNX Runtime (a new present per call, the
  past copied into it): what an earlier version of this script measured as "gqa" - its 8-row number
  (0.243 ms on the Xeon) was the copy, not the attention, and made a standard-op path look faster;
* ``standard24``: the same step in standard ops - RotaryEmbedding (opset 23) on q and k, TensorScatter
  (opset 24) writing each row's new K/V at its own column in place, Attention (opset 24) over the buffer
  with ``nonpad_kv_seqlen`` - checked to give GroupQueryAttention's output and buffers;
* ``matmul``: MatMul/Softmax/MatMul with the 3 query heads of each KV head as the rows of one product
  (exactly 119 positions, no mask, no rotary, no KV write: a lower bound for that formulation).
"""
from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as TP, helper

H, KV, D, T, CAP = 9, 3, 64, 119, 256


def _session(nodes, inputs, outputs, opset: int, contrib: bool = False):
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if contrib else [])
    model = helper.make_model(helper.make_graph(nodes, "attention", inputs, outputs), opset_imports=opsets)
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


def _i64(name, values):
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TP.INT64, [len(values)], values))


class _InPlace:
    """A session whose KV inputs ``pk``/``pv`` and outputs ``pk_out``/``pv_out`` are one buffer each
    (``in_place``) or the outputs new arrays."""

    def __init__(self, session, buf: np.ndarray, feeds: dict, in_place: bool = True):
        self.session, self.buf = session, buf
        self.k, self.v = (ort.OrtValue.ortvalue_from_numpy(buf.copy()) for _ in range(2))
        self.io = session.io_binding()
        for name, value in feeds.items():
            self.io.bind_cpu_input(name, value)
        self.io.bind_ortvalue_input("pk", self.k)
        self.io.bind_ortvalue_input("pv", self.v)
        for name, value in (("pk_out", self.k), ("pv_out", self.v)):
            if in_place:
                self.io.bind_ortvalue_output(name, value)
            else:
                self.io.bind_output(name)
        self.io.bind_output("o")

    def __call__(self):
        self.session.run_with_iobinding(self.io)

    def once(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Output and buffers after one step from the initial buffers."""
        self.k.update_inplace(self.buf.copy())
        self.v.update_inplace(self.buf.copy())
        self()
        return self.io.copy_outputs_to_cpu()[0], self.k.numpy(), self.v.numpy()


def measure(rows: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((rows, 1, (H + 2 * KV) * D)).astype(np.float32)
    buf = rng.standard_normal((rows, KV, CAP, D)).astype(np.float32)
    cos, sin = (rng.standard_normal((2048, D // 2)).astype(np.float32) for _ in range(2))
    pos = np.full((rows, 1), T - 1, np.int64)
    common = [_vi("qkv", TP.FLOAT, list(qkv.shape)), _vi("pk", TP.FLOAT, list(buf.shape)),
              _vi("pv", TP.FLOAT, list(buf.shape)), _vi("pos", TP.INT64, [rows, 1]),
              _vi("cos", TP.FLOAT, list(cos.shape)), _vi("sin", TP.FLOAT, list(sin.shape))]
    outputs = [_vi(n, TP.FLOAT, None) for n in ("o", "pk_out", "pv_out")]
    feeds = {"qkv": qkv, "pos": pos, "cos": cos, "sin": sin}
    gqa = _session([helper.make_node(
        "GroupQueryAttention", ["qkv", "", "", "pk", "pv", "sk", "tot", "cos", "sin", "pos"], ["o", "pk_out", "pv_out"],
        domain="com.microsoft", num_heads=H, kv_num_heads=KV, do_rotary=1)],
        common + [_vi("sk", TP.INT32, [rows]), _vi("tot", TP.INT32, [])], outputs, 21, contrib=True)
    standard = _session([
        _i64("sizes", [H * D, KV * D, KV * D]), _i64("kv4", [0, 0, KV, D]), _i64("q4", [0, 0, H, D]),
        _i64("o3", [0, 0, H * D]),
        helper.make_node("Split", ["qkv", "sizes"], ["q", "k", "v"], axis=2),
        helper.make_node("RotaryEmbedding", ["q", "cos", "sin", "pos"], ["q_rot"], num_heads=H),
        helper.make_node("RotaryEmbedding", ["k", "cos", "sin", "pos"], ["k_rot"], num_heads=KV),
        *[helper.make_node("Reshape", [x, shape], [f"{x}_4"]) for x, shape in (("q_rot", "q4"), ("k_rot", "kv4"), ("v", "kv4"))],
        *[helper.make_node("Transpose", [f"{x}_4"], [f"{x}_bnsh"], perm=[0, 2, 1, 3]) for x in ("q_rot", "k_rot", "v")],
        helper.make_node("TensorScatter", ["pk", "k_rot_bnsh", "write"], ["pk_out"], axis=2),
        helper.make_node("TensorScatter", ["pv", "v_bnsh", "write"], ["pv_out"], axis=2),
        helper.make_node("Attention", ["q_rot_bnsh", "pk_out", "pv_out", "", "", "", "lens"], ["o_bnsh"]),
        helper.make_node("Transpose", ["o_bnsh"], ["o_bsnh"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["o_bsnh", "o3"], ["o"])],
        common + [_vi("write", TP.INT64, [rows]), _vi("lens", TP.INT64, [rows])], outputs, 24)
    runs = {
        "gqa": _InPlace(gqa, buf, {**feeds, "sk": np.full(rows, T - 1, np.int32), "tot": np.array(T, np.int32)}),
        "gqa_copying": _InPlace(gqa, buf, {**feeds, "sk": np.full(rows, T - 1, np.int32),
                                           "tot": np.array(T, np.int32)}, in_place=False),
        "standard24": _InPlace(standard, buf, {**feeds, "write": np.full(rows, T - 1, np.int64),
                                              "lens": np.full(rows, T, np.int64)}),
    }
    reference, candidate = runs["gqa"].once(), runs["standard24"].once()
    for a, b in zip(reference, candidate):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    out = {name: _p50_ms(run) for name, run in runs.items()}
    q, k = rng.standard_normal((rows, KV, H // KV, D)).astype(np.float32), rng.standard_normal((rows, KV, T, D)).astype(np.float32)
    lower = _session([helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
                      helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=-1),
                      helper.make_node("MatMul", ["p", "v"], ["o"])],
                     [_vi("q", TP.FLOAT, list(q.shape)), _vi("k", TP.FLOAT, list(k.shape)), _vi("v", TP.FLOAT, list(k.shape))],
                     [_vi("o", TP.FLOAT, None)], 21)
    out["matmul"] = _p50_ms(lambda: lower.run(None, {"q": q, "k": k, "v": k}))
    return out


def main() -> None:
    print(f"ONNX Runtime {ort.__version__}, one layer, {H} query heads / {KV} KV heads, head {D}, {T} positions, "
          f"buffer {CAP} (p50 ms; standard24 checked equal to gqa)")
    for rows in (1, 8):
        print(f"rows {rows}: " + ", ".join(f"{k} {v}" for k, v in measure(rows).items()))


if __name__ == "__main__":
    main()
