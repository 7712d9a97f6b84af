"""What a saved ONNX graph takes and returns, and its size: read without torch and without
loading weights (the repository renderer checks Triton configs against it)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx

from ..errors import ExportError

# protobuf cannot serialise a model over 2 GiB in one file
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
}


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: list[int | str]  # ints are fixed, strings are named dynamic dims

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": self.shape}


def graph_io(path: Path) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """Inputs and outputs of a saved graph, dims as ints or names (no weights loaded)."""
    model = onnx.load(os.fspath(path), load_external_data=False)

    def info(v) -> TensorInfo:
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        return TensorInfo(v.name, ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), shape)

    inits = {i.name for i in model.graph.initializer}
    return [info(v) for v in model.graph.input if v.name not in inits], [info(v) for v in model.graph.output]


def graph_bytes(path: Path) -> int:
    """Size on disk including external data files next to the graph."""
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return total + (data.stat().st_size if data.exists() else 0)


def check_graph(path: Path) -> None:
    try:
        onnx.checker.check_model(os.fspath(path), full_check=False)
    except Exception as e:
        raise ExportError(f"{path} fails the ONNX checker: {str(e).splitlines()[0]}") from None


def topological_order(nodes: list[onnx.NodeProto], available: set[str], what: str = "graph") -> list[onnx.NodeProto]:
    """``nodes`` in Kahn's order, keeping their given order wherever the dependencies allow;
    ``available``: the names that exist before any node runs (graph inputs, initializers)."""
    ready = set(available) | {""}
    pending, ordered = list(nodes), []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = sorted({i for n in rest for i in n.input if i not in ready})[:3]
            raise ExportError(f"{what} has a cycle or a missing input: nothing produces {missing}")
        pending = rest
    return ordered


def save_graph(model: onnx.ModelProto, path: Path) -> Path:
    """Write ``model`` to ``path``; past EXTERNAL_DATA_THRESHOLD its weights go to ``<name>.data``
    beside it (protobuf's 2 GB limit). A stale data file is removed first: onnx appends to it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if model.ByteSize() > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, os.fspath(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, os.fspath(path))
    return path
