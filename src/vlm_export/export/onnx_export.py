"""torch -> ONNX for one stage: capture with named dynamic dims, save (external data past 2 GB),
check with the ONNX checker, and describe the graph's I/O for the manifest."""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from ..errors import ExportError

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
# protobuf cannot serialise a model over 2 GiB in one file
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


@dataclass
class StageGraph:
    """One stage ready to export: module, example inputs and the names of everything."""

    name: str
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    #: input name -> {axis: dim name}; equal names mean equal sizes
    dynamic_dims: dict[str, dict[int, str]] = field(default_factory=dict)
    #: output name -> {axis: dim name}, used to name the output dims in the graph
    output_dims: dict[str, dict[int, str]] = field(default_factory=dict)


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: list[int | str]  # ints are fixed, strings are named dynamic dims

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": self.shape}


def _dynamic_shapes(stage: StageGraph):
    """torch.export's dynamic_shapes: one entry per forward argument; varargs are ONE entry holding a tuple."""
    import inspect

    params = list(inspect.signature(stage.module.forward).parameters.values())
    specs = [{axis: torch.export.Dim.DYNAMIC for axis in stage.dynamic_dims.get(n, {})} or None
             for n in stage.input_names]
    if params and params[-1].kind is inspect.Parameter.VAR_POSITIONAL:
        fixed = len(params) - 1
        return tuple(specs[:fixed]) + (tuple(specs[fixed:]),)
    return tuple(specs)


def _rename_dims(model: onnx.ModelProto, stage: StageGraph) -> None:
    """Give the exporter's symbols (s0, s1 + s2, ...) the names declared by the stage."""
    wanted = {**stage.dynamic_dims, **stage.output_dims}
    rename: dict[str, str] = {}
    for value in list(model.graph.input) + list(model.graph.output):
        for axis, dim_name in wanted.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            if dim.dim_param and dim.dim_param not in rename:
                rename[dim.dim_param] = dim_name
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


def export_stage(stage: StageGraph, out_dir: Path, opset: int = 18) -> Path:
    """Export one stage to ``out_dir/<name>.onnx`` and run the ONNX checker on it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stage.name}.onnx"
    stage.module.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            program = torch.onnx.export(
                stage.module,
                stage.example_inputs,
                dynamo=True,
                input_names=stage.input_names,
                output_names=stage.output_names,
                dynamic_shapes=_dynamic_shapes(stage),
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
    except Exception as e:  # torch.export raises many types; the first line says which op failed
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"exporting the {stage.name} stage to ONNX failed: {type(e).__name__}: {first}") from e
    model = program.model_proto
    _rename_dims(model, stage)
    external = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    if external:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{stage.name}.onnx.data", size_threshold=1024)
    else:
        onnx.save_model(model, path)
    check_graph(path)
    return path


def check_graph(path: Path) -> None:
    try:
        onnx.checker.check_model(os.fspath(path), full_check=False)
    except Exception as e:
        raise ExportError(f"{path} fails the ONNX checker: {str(e).splitlines()[0]}") from None


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
