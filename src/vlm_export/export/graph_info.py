"""What a saved ONNX graph takes and returns, and its size: read without torch and without
loading weights (the repository renderer checks Triton configs against it)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ExportError, first_line

# protobuf cannot serialise a model over 2 GiB in one file
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# tensors this large or larger go to the external data file (onnx's own default threshold)
EXTERNAL_TENSOR_MIN_BYTES = 1024
# each external tensor starts on a page: ONNX Runtime can then map it instead of reading it
EXTERNAL_DATA_ALIGNMENT = 4096
_COPY_CHUNK = 64 << 20

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
    """Inputs and outputs of a saved graph, dims as ints or names (no weights loaded); ExportError for a
    file that is not one (damaged bytes)."""
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends: the file is not an ONNX model
        raise ExportError(f"{path} is not a readable ONNX graph ({first_line(e)}): it is damaged; copy the build "
                          "again or rebuild") from None

    def info(v) -> TensorInfo:
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        return TensorInfo(v.name, ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), shape)

    inits = {i.name for i in model.graph.initializer}
    return [info(v) for v in model.graph.input if v.name not in inits], [info(v) for v in model.graph.output]


def set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    """Set one of the graph's metadata properties (what runners read from the session), keeping the others."""
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, key: value})


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


def reads(node: onnx.NodeProto) -> list[str]:
    """What ``node`` reads: its inputs and, for a node with subgraphs (If, Loop, Scan), the outer names its
    subgraphs' nodes read (what they do not make or take themselves)."""
    names = list(node.input)
    for attribute in node.attribute:
        for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
            own = {i.name for i in sub.input} | {t.name for t in sub.initializer} | {o for n in sub.node for o in n.output}
            names += [i for n in sub.node for i in reads(n) if i not in own]
    return names


def live_nodes(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` without those whose outputs nothing reads, repeatedly: neither another node (an ``If``'s branches'
    outer reads included, ``reads``) nor the graph's ``outputs``."""
    while True:
        used = {i for n in nodes for i in reads(n)} | outputs
        alive = [n for n in nodes if any(o in used for o in n.output if o)]
        if len(alive) == len(nodes):
            return nodes
        nodes = alive


def topological_order(nodes: list[onnx.NodeProto], available: set[str], what: str = "graph") -> list[onnx.NodeProto]:
    """``nodes`` in Kahn's order, keeping their given order wherever the dependencies allow;
    ``available``: the names that exist before any node runs (graph inputs, initializers). A node with
    subgraphs waits for the outer names they read too."""
    ready = set(available) | {""}
    pending, ordered = list(nodes), []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in reads(node)):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = sorted({i for n in rest for i in reads(n) if i not in ready})[:3]
            raise ExportError(f"{what} has a cycle or a missing input: nothing produces {missing}")
        pending = rest
    return ordered


def _external(tensor: onnx.TensorProto, source_dir: Path | None) -> tuple[Path, int, int]:
    """(file, offset, length) of a tensor whose bytes live in an external data file; a relative
    location is relative to ``source_dir`` (the folder of the graph it was loaded from)."""
    info = {e.key: e.value for e in tensor.external_data}
    location = Path(info["location"])
    if not location.is_absolute():
        if source_dir is None:
            raise ExportError(f"tensor {tensor.name} keeps its weights in {location}, but the graph's folder is unknown")
        location = Path(source_dir) / location
    if "length" in info:
        length = int(info["length"])
    else:  # the whole rest of the file (onnx writes the length; other writers may not)
        length = location.stat().st_size - int(info.get("offset", 0))
    return location, int(info.get("offset", 0)), length


def uses_external_data(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def read_tensor(tensor: onnx.TensorProto, source_dir: Path | None = None) -> np.ndarray:
    """A tensor's value; external data is read from its file without loading it into the proto
    (``numpy_helper.to_array`` would store the whole tensor in the proto as well)."""
    if not uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    path, offset, length = _external(tensor, source_dir)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    if dtype.kind not in "fiub" or tensor.data_type == onnx.TensorProto.BFLOAT16:
        raise ExportError(f"tensor {tensor.name}: reading external {dtype} data is not supported here")
    values = np.fromfile(path, dtype=dtype, count=length // dtype.itemsize, offset=offset)
    if values.size != int(np.prod(tensor.dims, dtype=np.int64)):
        raise ExportError(f"{path} ends before tensor {tensor.name}'s data does; export the graph again")
    return values.reshape(tuple(tensor.dims))


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the weights the proto itself holds. Not ``ModelProto.ByteSize()``: protobuf's upb
    serialises the whole model to count it, ~4x the model's size in memory at its peak."""
    return sum(len(t.raw_data) for t in model.graph.initializer if not uses_external_data(t))


def all_weight_bytes(model: onnx.ModelProto, source_dir: Path | None) -> int:
    """Bytes of every weight of ``model``: those the proto holds and those in its external data files (a graph
    loaded without them; ``source_dir``: its folder)."""
    return weight_bytes(model) + _external_bytes(model, source_dir)


def set_external_data(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, length: int) -> bytes:
    """A length-delimited protobuf field's tag and length."""
    return _varint(number << 3 | 2) + _varint(length)


_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5  # field numbers in onnx.proto


def _write_one_tensor_at_a_time(model: onnx.ModelProto, path: Path, source_dir: Path | None = None) -> None:
    """The file ``onnx.save_model`` writes, in less memory. protobuf serialises a whole model into one
    buffer and copies it into Python: ~5x the weights at the peak (2.6 GB for the demo's 540 MB decoder).
    Here the model without its initializers is serialised, then each initializer as an occurrence of
    the ``graph`` field of its own: a protobuf parser merges the occurrences of a message field
    (MergeFrom), so onnx, ONNX Runtime and TensorRT read the same model; one tensor is in memory twice
    at a time, not the model. A tensor kept in an external data file (``source_dir``: the folder its
    location is relative to) is read from there as it is written, into the file itself."""
    head, graph = onnx.ModelProto(), onnx.GraphProto()
    for fd, value in model.ListFields():
        if fd.name != "graph":
            _copy_field(head, fd, value)
    for fd, value in model.graph.ListFields():
        if fd.name != "initializer":
            _copy_field(graph, fd, value)
    with open(path, "wb") as f:
        f.write(head.SerializeToString())
        body = graph.SerializeToString()
        f.write(_field(_MODEL_GRAPH, len(body)) + body)
        for tensor in model.graph.initializer:
            if uses_external_data(tensor):
                tensor = _with_data_inline(tensor, source_dir)
            data = tensor.SerializeToString()
            inner = _field(_GRAPH_INITIALIZER, len(data))
            f.write(_field(_MODEL_GRAPH, len(inner) + len(data)) + inner)
            f.write(data)


def _with_data_inline(tensor: onnx.TensorProto, source_dir: Path | None) -> onnx.TensorProto:
    """A copy of an external tensor holding its bytes (the model's own tensor is left as it is)."""
    file, offset, length = _external(tensor, source_dir)
    inline = onnx.TensorProto()
    inline.CopyFrom(tensor)
    inline.data_location = onnx.TensorProto.DEFAULT
    del inline.external_data[:]
    with open(file, "rb") as f:
        f.seek(offset)
        inline.raw_data = f.read(length)
    if len(inline.raw_data) != length:
        raise ExportError(f"{file} ends before tensor {tensor.name}'s data does; export the graph again")
    return inline


def _external_bytes(model: onnx.ModelProto, source_dir: Path | None) -> int:
    return sum(_external(t, source_dir)[2] for t in model.graph.initializer if uses_external_data(t))


def _copy_field(message, fd, value) -> None:
    if fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED:  # protobuf >= 6 / older
        getattr(message, fd.name).extend(value)
    elif fd.type == fd.TYPE_MESSAGE:
        getattr(message, fd.name).CopyFrom(value)
    else:
        setattr(message, fd.name, value)


def saved_inline(model: onnx.ModelProto) -> bool:
    """Whether ``save_graph`` writes ``model`` as one file, leaving its tensors as they are (else it
    moves its weights to a data file and rewrites the tensors to point there)."""
    return not any(uses_external_data(t) for t in model.graph.initializer) and \
        weight_bytes(model) <= EXTERNAL_DATA_THRESHOLD


def save_graph(model: onnx.ModelProto, path: Path, source_dir: Path | None = None) -> Path:
    """Write ``model`` to ``path``: one file while its weights fit under EXTERNAL_DATA_THRESHOLD
    (protobuf's 2 GB limit), whether the proto holds them or some live in external files - a graph
    loaded with ``load_external_data=False`` (``source_dir``: its folder), read one tensor at a time
    as it is written. Past the threshold, its weights go to ``<name>.data`` beside it (each tensor of
    EXTERNAL_TENSOR_MIN_BYTES or more, page-aligned), external ones copied file to file in chunks,
    never through memory whole, and the proto is changed to point at the new file. (Tensors spilled
    to a scratch file under an absolute path, with no ``source_dir``, always go to the data file.)
    A stale data file is replaced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    inits = model.graph.initializer
    # a graph loaded without its data (or exported through a scratch file) that fits in one file is
    # written as one, each external tensor read from its file as it is written
    if saved_inline(model) or (source_dir is not None and
                               all_weight_bytes(model, source_dir) <= EXTERNAL_DATA_THRESHOLD):
        if data.exists():
            data.unlink()
        _write_one_tensor_at_a_time(model, path, source_dir)
        return path
    sources = [_external(t, source_dir) if uses_external_data(t) else None for t in inits]
    if any(src is not None and src[0].resolve() == data.resolve() for src in sources):
        raise ExportError(f"{path} would overwrite the external data its own weights are read from; write elsewhere")
    with open(data, "wb") as out:
        for tensor, source in zip(inits, sources):
            if source is None and len(tensor.raw_data) < EXTERNAL_TENSOR_MIN_BYTES:
                continue  # small constants stay in the graph
            out.write(b"\0" * (-out.tell() % EXTERNAL_DATA_ALIGNMENT))
            offset = out.tell()
            if source is None:
                out.write(tensor.raw_data)
                tensor.ClearField("raw_data")
            else:
                with open(source[0], "rb") as src:
                    src.seek(source[1])
                    left = source[2]
                    while left:
                        chunk = src.read(min(left, _COPY_CHUNK))
                        if not chunk:
                            raise ExportError(f"{source[0]} ends before tensor {tensor.name}'s data does; "
                                              "export the graph again")
                        out.write(chunk)
                        left -= len(chunk)
            set_external_data(tensor, data.name, offset, out.tell() - offset)
    onnx.save_model(model, os.fspath(path))
    return path

