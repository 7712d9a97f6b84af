"""torch -> ONNX for one stage: capture with named dynamic dims, save (external data past 2 GB),
check with the ONNX checker, and describe the graph's I/O for the manifest."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch

from ..adapters.base import Stage
from ..errors import ExportError
from .graph_info import check_graph, save_graph


def _dynamic_shapes(stage: Stage):
    """torch.export's dynamic_shapes: one entry per forward argument; varargs are ONE entry holding a tuple."""
    import inspect

    params = list(inspect.signature(stage.module.forward).parameters.values())
    specs = [{axis: torch.export.Dim.DYNAMIC for axis in t.dynamic_axes()} or None for t in stage.spec.inputs]
    if params and params[-1].kind is inspect.Parameter.VAR_POSITIONAL:
        fixed = len(params) - 1
        return tuple(specs[:fixed]) + (tuple(specs[fixed:]),)
    return tuple(specs)


def _rename_dims(model: onnx.ModelProto, stage: Stage) -> None:
    """Give the exporter's symbols (s0, s1 + s2, ...) the names declared by the stage."""
    wanted = {t.name: t.dynamic_axes() for t in (*stage.spec.inputs, *stage.spec.outputs)}
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


def export_stage(stage: Stage, out_dir: Path, opset: int = 18) -> Path:
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
                input_names=stage.spec.input_names,
                output_names=stage.spec.output_names,
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
    check_graph(save_graph(model, path))
    return path
