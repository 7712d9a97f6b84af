"""Per-call cost of longrope's cache pick: Where over two cos/sin cache pairs (before) vs offset positions into one doubled pair (now)."""
import numpy as np, onnx, onnxruntime as ort, time, sys
from onnx import helper as h, TensorProto as T, numpy_helper as nh
half = 48
for maxp in (4096, 32768, 131072):
    c = [nh.from_array(np.random.rand(maxp, half).astype(np.float32), n) for n in ("ct", "ce", "st", "se")]
    cond = [h.make_node("ReduceMax", ["pos"], ["m"], keepdims=0), h.make_node("Greater", ["m", "orig"], ["cond"])]
    orig = nh.from_array(np.array(4096, np.int64), "orig")
    before = h.make_graph(cond + [h.make_node("Where", ["cond", "ct", "ce"], ["cos"]), h.make_node("Where", ["cond", "st", "se"], ["sin"]),
                          h.make_node("Gather", ["cos", "pos"], ["gc"]), h.make_node("Gather", ["sin", "pos"], ["gs"])],
                          "b", [h.make_tensor_value_info("pos", T.INT64, [1, 1])], [h.make_tensor_value_info("gc", T.FLOAT, None), h.make_tensor_value_info("gs", T.FLOAT, None)], c + [orig])
    d = [nh.from_array(np.random.rand(2 * maxp, half).astype(np.float32), n) for n in ("cd", "sd")]
    off = nh.from_array(np.array(maxp, np.int64), "off")
    now = h.make_graph(cond + [h.make_node("Cast", ["cond"], ["ci"], to=T.INT64), h.make_node("Mul", ["ci", "off"], ["sh"]), h.make_node("Add", ["pos", "sh"], ["p2"]),
                       h.make_node("Gather", ["cd", "p2"], ["gc"]), h.make_node("Gather", ["sd", "p2"], ["gs"])],
                       "n", [h.make_tensor_value_info("pos", T.INT64, [1, 1])], [h.make_tensor_value_info("gc", T.FLOAT, None), h.make_tensor_value_info("gs", T.FLOAT, None)], d + [orig, off])
    so = ort.SessionOptions(); so.intra_op_num_threads = 2
    S = {k: ort.InferenceSession(h.make_model(g, opset_imports=[h.make_opsetid("", 18)]).SerializeToString(), so, providers=["CPUExecutionProvider"]) for k, g in (("where", before), ("offset", now))}
    pos = np.array([[100]], np.int64)
    res = {k: [] for k in S}
    for r in range(7):
        for k, s in S.items():
            t = time.perf_counter()
            for _ in range(50): s.run(None, {"pos": pos})
            res[k].append((time.perf_counter() - t) / 50 * 1e3)
    print(f"max_positions {maxp}: " + ", ".join(f"{k} {np.median(v):.3f} ms" for k, v in res.items()), flush=True)
