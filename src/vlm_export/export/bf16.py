"""bfloat16 arithmetic computed in fp32, rounded back to bfloat16.

Some models compute a few values in bfloat16 on purpose whatever the model's dtype (Falcon's ALiBi:
``slopes.bfloat16() * positions``, to match the original training code). ONNX Runtime's CPU provider
has bfloat16 kernels for Cast and little else, so such a graph does not load there. Each node that
reads a bfloat16 tensor is rewritten to read it widened to fp32 (exact) and, where it wrote bfloat16,
to round its fp32 result back to bfloat16: the arithmetic PyTorch's CPU kernels do for bfloat16 (they
compute in fp32 and round once), so the graph's values stay the ones the PyTorch reference computes.
A graph with no bfloat16 tensor is returned untouched; the extra Casts cost nothing measurable where
there is one (a few small tensors per call)."""
from __future__ import annotations

import onnx
from onnx import helper

BF16, FP32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT

#: nodes that convert types themselves (their bfloat16 side has CPU kernels), or hold sub-graphs
_KEPT = {"Cast", "CastLike", "If", "Loop", "Scan"}


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    types.update({i.name: i.data_type for i in g.initializer})
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
    return types


def _has_bf16(model: onnx.ModelProto) -> bool:
    g = model.graph
    return any(i.data_type == BF16 for i in g.initializer) or any(
        a.name == "to" and a.i == BF16 for n in g.node if n.op_type == "Cast" for a in n.attribute) or any(
        v.type.tensor_type.elem_type == BF16 for v in (*g.input, *g.value_info))


def compute_bf16_in_fp32(model: onnx.ModelProto) -> int:
    """Rewrite ``model`` in place (see the module docstring); returns how many nodes were rewritten."""
    if not _has_bf16(model):
        return 0
    types = _elem_types(model)
    if any(t not in types for n in model.graph.node for t in n.output if t):
        # the exporter writes value_info for its intermediate values; infer whatever it did not
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        types = {**_elem_types(inferred), **types}
    nodes: list[onnx.NodeProto] = []
    rewritten = 0
    for node in model.graph.node:
        wide = [i for i in node.input if i and types.get(i) == BF16]
        if node.op_type in _KEPT or node.domain not in ("", "ai.onnx") or not wide:
            nodes.append(node)
            continue
        rewritten += 1
        base = node.name or f"bf16_node_{rewritten}"
        renamed = {name: f"{base}_{name}_fp32" for name in dict.fromkeys(wide)}
        nodes += [helper.make_node("Cast", [name], [wide_name], name=f"{wide_name}_cast", to=FP32)
                  for name, wide_name in renamed.items()]
        narrowed = [o for o in node.output if o and types.get(o) == BF16]
        for k, name in enumerate(node.input):
            if name in renamed:
                node.input[k] = renamed[name]
        for k, name in enumerate(node.output):
            if name in narrowed:
                node.output[k] = f"{base}_{name}_fp32"
        nodes.append(node)
        nodes += [helper.make_node("Cast", [f"{base}_{name}_fp32"], [name], name=f"{base}_{name}_round", to=BF16)
                  for name in narrowed]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return rewritten
