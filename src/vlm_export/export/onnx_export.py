"""torch -> ONNX for one stage: capture with named dynamic dims, save (external data past 2 GB),
check with the ONNX checker, and describe the graph's I/O for the manifest."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import onnx
import torch

from ..adapters.base import Stage
from ..errors import ExportError, first_line
from .bf16 import compute_bf16_in_fp32
from . import graph_info
from .graph_info import check_graph, save_graph


#: torch's loggers that print during an export (progress notes, and warnings a failed trace repeats)
QUIET_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes")


def _dynamic_shapes(stage: Stage):
    """torch.export's dynamic_shapes: one entry per forward argument; varargs are ONE entry holding a tuple
    (none where no input fills them)."""
    import inspect

    params = list(inspect.signature(stage.module.forward).parameters.values())
    specs = [{axis: torch.export.Dim.DYNAMIC for axis in t.dynamic_axes()} or None for t in stage.spec.inputs]
    if params and params[-1].kind is inspect.Parameter.VAR_POSITIONAL:
        fixed = len(params) - 1
        return tuple(specs[:fixed]) + ((tuple(specs[fixed:]),) if len(specs) > fixed else ())
    return tuple(specs)


def _cleanup_rules():
    """The onnxscript rewrite rules that tidy a transformer graph: no-op arithmetic, cast/reshape/transpose
    chains, full-range slices, shape materialisation. torch.onnx's own ``optimize=True`` runs ~60 rules
    (conv/batch-norm/clip/scatter fusions too) by a generic matcher: on the demo's 30-layer decoder that
    took ~60 of the export's ~125 s on 2 cores for the same graph as these 19 (same op counts, 1,932
    nodes) in ~7 s. ONNX Runtime's session optimizer does the conv/batch-norm fusions anyway."""
    from onnxscript.rewriter.rules import common as r

    return [*_exact_no_op_rules(), r.dropout_inference_rule, r.dropout_zero_rule, r.cast_cast_rule,
            r.no_op_cast_rule, r.no_op_expand_rule, r.no_op_transpose_rule, r.reshape_reshape_rule,
            r.transpose_transpose_rule, r.unsqueeze_unsqueeze_rule,
            r.squeeze_reshape_1d_rule, r.collapse_slice_rule, r.collapse_slice2_rule,
            r.materialize_reshape_shape_rule, r.cast_constant_of_shape_rule,
            r.cast_constant_of_shape_without_value_rule]


def _exact_no_op_rules():
    """``x + 0``, ``x - 0``, ``x * 1``, ``x / 1`` -> ``x`` for constants that are exactly 0 or 1. onnxscript's own
    rules match their constant within ``math.isclose``'s ``abs_tol=1e-8`` (and ``rel_tol=1e-5``), so they took
    ``variance + 1e-8`` (Helium's RMSNorm epsilon) for ``variance + 0``: a token whose hidden state is all zeros
    then divided by zero (NaN logits) where PyTorch adds the epsilon."""
    from onnxscript.rewriter import RewriteRule
    from onnxscript.rewriter._ir_utils import get_numpy_value

    def identity(op, x, c):
        return op.Identity(x)

    def exactly(value):
        def check(context, x, c, **_):
            const = get_numpy_value(c)
            # a single element that does not widen x's rank by broadcasting
            fits = const is not None and const.size == 1 and (
                const.ndim == 0 or (x.shape is not None and const.ndim <= len(x.shape)))
            return bool(fits and const.item() == value)
        return check

    patterns = {"Add": (lambda op, x, c: op.Add(x, c), 0), "Sub": (lambda op, x, c: op.Sub(x, c), 0),
                "Mul": (lambda op, x, c: op.Mul(x, c), 1), "Div": (lambda op, x, c: op.Div(x, c), 1)}
    rules = []
    for name, (pattern, value) in patterns.items():
        rule = RewriteRule(pattern, identity, exactly(value), name=f"exact_no_op_{name}")
        rules += rule.commute() if name in ("Add", "Mul") else [rule]
    return rules


def _optimize(model) -> None:
    """onnxscript's optimize_ir pipeline (inline, fold constants + rewrite twice, drop unused, lift
    constants to initializers, dedupe initializers, common subexpressions) with the trimmed rule set."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript import optimizer, rewriter

    folding = optimizer._constant_folding  # the pass class itself is not re-exported
    rules = _cleanup_rules()
    try:
        ir.passes.Sequential(
            common.InlinePass(),
            ir.passes.PassManager([folding.FoldConstantsPass(
                shape_inference=True, input_size_limit=folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                output_size_limit=folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT),
                rewriter.RewritePass(rules), common.RemoveUnusedNodesPass()], steps=2, early_stop=True),
            common.RemoveUnusedNodesPass(),
            common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            common.DeduplicateInitializersPass(),
            common.CommonSubexpressionEliminationPass(),
        )(model)
    finally:
        _forget_matched_graph(rules)


def _forget_matched_graph(rules) -> None:
    """onnxscript's rules are module globals, and each one's matcher keeps the last graph it matched
    (``_graph``, ``_match``): through it, every weight of the last exported module, so PyTorch's weights
    would outlive the model (a checkpoint read memory-mapped stays mapped while any one of them lives).
    Cleared (tests/test_export_core.py checks the weights go)."""
    for rule in rules:
        state = vars(getattr(rule, "_matcher", None) or rule)
        for name in ("_graph", "_match", "_current_node", "_tracer"):
            if name in state:
                state[name] = None  # a match sets each again before reading it


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


@contextlib.contextmanager
def _module_kept_as_it_was(module: torch.nn.Module):
    """torch.export runs the forward on fake tensors. A module that caches a tensor on itself during a
    forward (transformers' longrope rotary computes ``long_inv_freq`` at its first call and keeps it as a
    plain attribute) would keep a fake one, and every later eager call - the PyTorch reference the export
    is judged against - would compute with garbage past the original context. So each submodule's plain
    tensor attributes and buffer slots are put back as they were before the trace."""
    saved = [(m, {k: v for k, v in vars(m).items() if isinstance(v, torch.Tensor)}, dict(m._buffers))
             for m in module.modules()]
    try:
        yield
    finally:
        for m, tensors, buffers in saved:
            for name in [k for k, v in vars(m).items() if isinstance(v, torch.Tensor) and k not in tensors]:
                del m.__dict__[name]
            m.__dict__.update(tensors)
            m._buffers.clear()
            m._buffers.update(buffers)


@contextlib.contextmanager
def _interrupt_after():
    """Ctrl-C inside torch.export's tracer can abort the whole process from C++ ("trying to set the
    current FakeTensorMode, but one already exists": a core dump, no cleanup). So the first Ctrl-C is
    held until the export returns, then raised; a second one interrupts at once, as before."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield  # no signals here, or none wanted (a process started in the background, nohup)
        return
    pressed = []

    def hold(signum, frame):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(signum)
        print("\nstopping once this graph's export returns (Ctrl-C again to stop at once)", file=sys.__stderr__)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


def _innermost(e: BaseException) -> BaseException:
    """The exception that says why: torch.onnx wraps torch.export's, which wraps the tracer's."""
    seen = {id(e)}
    while e.__cause__ is not None and id(e.__cause__) not in seen:
        e = e.__cause__
        seen.add(id(e))
    return e


def export_stage(stage: Stage, out_dir: Path, opset: int = 18) -> Path:
    """Export one stage to ``out_dir/<name>.onnx`` and run the ONNX checker on it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stage.name}.onnx"
    stage.module.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings(), _module_kept_as_it_was(stage.module), stage.export_context():
            warnings.simplefilter("ignore")
            for name in QUIET_LOGGERS:
                logging.getLogger(name).setLevel(logging.ERROR)
            # a failed trace prints the partial FX graph (hundreds of lines) to stderr; the error below says why
            with contextlib.redirect_stderr(io.StringIO()), _interrupt_after():
                program = torch.onnx.export(
                    stage.module,
                    stage.example_inputs,
                    dynamo=True,
                    input_names=stage.spec.input_names,
                    output_names=stage.spec.output_names,
                    dynamic_shapes=_dynamic_shapes(stage),
                    opset_version=opset,
                    optimize=False,  # _optimize below: the same graph in a fraction of the time
                    verbose=False,
                )
            _optimize(program.model)
    except Exception as e:  # torch.export raises many types; the innermost one's first line says why
        cause = _innermost(e)
        # ONNX has no complex tensors: say what in the model needs them (the exporter names an aten op only)
        why = ("; the model computes with complex numbers (e.g. Llama 4's rotary: torch.polar / view_as_complex), "
               "which ONNX cannot represent: not supported" if "complex" in first_line(cause).lower() else "")
        raise ExportError(f"exporting the {stage.name} stage to ONNX failed: {first_line(cause)}{why}") from e
    # The weights go to a data file straight from the module's tensors, one at a time, and the proto is
    # finished without them: ``model_proto`` would copy every weight into the proto first (a 567M-parameter
    # decoder's export peaked at its fp32 weights again; a 7B one's would at 28 GB more). Past protobuf's
    # 2 GB that data file is the graph's own; below, a scratch file that save_graph reads one tensor at a
    # time into the one-file graph.
    import onnx_ir

    large = _weight_bytes(program.model) > graph_info.EXTERNAL_DATA_THRESHOLD
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{stage.name}.") as scratch:
        written = path if large else Path(scratch) / path.name
        written.with_name(written.name + ".data").unlink(missing_ok=True)
        onnx_ir.save(program.model, written, external_data=written.name + ".data",
                     size_threshold_bytes=graph_info.EXTERNAL_TENSOR_MIN_BYTES,
                     alignment=graph_info.EXTERNAL_DATA_ALIGNMENT, align_threshold=0)
        del program
        model = onnx.load(os.fspath(written), load_external_data=False)
        compute_bf16_in_fp32(model)  # bfloat16 arithmetic the model asks for, in a form ONNX Runtime's CPU runs
        _rename_dims(model, stage)
        if large:
            onnx.save_model(model, os.fspath(path))  # its tensors already point at the data file
        else:
            save_graph(model, path, source_dir=written.parent)
    check_graph(path)
    return path


def _weight_bytes(model) -> int:
    """Bytes of an ONNX IR model's initializers, without materialising them."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
