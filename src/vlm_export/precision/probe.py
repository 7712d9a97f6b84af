"""Intermediate activations of a graph on calibration feeds: ONNX Runtime runs the fp32 graph with
the asked-for tensors added as outputs. SmoothQuant's channel maxima and GPTQ's input second
moments are both statistics of what this yields. Statistics of tensors too large to fetch (an image
stage's attention scores) are computed inside the graph instead (``tensor_ranges``, ``waiting``)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..cpu import QDQ_AS_WRITTEN
from ..errors import ExportError
from ..export.graph_info import save_graph, saved_inline
from ..memory import available_bytes


class ActivationProbe:
    """One ONNX Runtime session over ``model`` with ``tensors`` as extra outputs (``model`` is left as it
    was); ``run`` fetches any of them, so several passes (GPTQ's, a few layers at a time) share one
    session. A context manager: the graph is written to a temporary folder for the session's life.
    ``emulate_qdq``: Q/DQ pairs run as written, not fused into integer kernels (a graph TensorRT
    serves: see ``runtime.runners.OrtRunner``). ``source_dir``: the folder of a ``model`` loaded without
    its external data (the session's copy of the graph gets those bytes from there, file to file). ``nodes``:
    nodes added to the session's graph (statistics computed inside it, so that only they are fetched); ``rewire``:
    tensor -> the name the graph's own nodes read instead (one of ``nodes``' outputs), in the session's graph."""

    def __init__(self, model: onnx.ModelProto, tensors: Iterable[str], threads: int = 2, emulate_qdq: bool = False,
                 source_dir: Path | None = None, nodes: Iterable[onnx.NodeProto] = (),
                 rewire: Mapping[str, str] | None = None):
        import onnxruntime as ort

        nodes = list(nodes)
        present = {o.name for o in model.graph.output}
        added = [helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in dict.fromkeys(tensors)
                 if t not in present]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.log_severity_level = 3
        # every fetched tensor is a graph output, which the memory planner cannot reuse, and feeds of other shapes
        # (images of other sizes) grow ONNX Runtime's arena, which never gives memory back: without it each run's
        # buffers are freed after the run
        opts.enable_cpu_mem_arena = False
        if emulate_qdq:
            opts.add_session_config_entry(*QDQ_AS_WRITTEN)
        # The session reads the graph from a temporary file. Below the external-data threshold the file
        # is written from ``model`` itself, its extra outputs added for the write only: a copy of the
        # model, protobuf's ByteSize and a serialised copy for a session from bytes cost ~5x the graph
        # in memory. Past it (or with weights already in a file) save_graph rewrites the tensors to point at
        # its data file, which would change the caller's: it writes a copy.
        self._tmp = tempfile.TemporaryDirectory()
        path = Path(self._tmp.name) / "probe.onnx"
        if saved_inline(model):
            with _edited(model.graph, added, nodes, rewire or {}):
                save_graph(model, path)
        else:
            probe = onnx.ModelProto()
            probe.CopyFrom(model)
            with _edited(probe.graph, added, nodes, rewire or {}):
                save_graph(probe, path, source_dir)
            del probe
        self.session = ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def run(self, feeds: Iterable[Mapping[str, np.ndarray]], tensors: list[str]) -> Iterator[dict[str, np.ndarray]]:
        """Per feed, ``{tensor: value}`` for each of ``tensors``."""
        for feed in feeds:
            yield dict(zip(tensors, self.session.run(tensors, {n: feed[n] for n in self.inputs})))

    def close(self) -> None:
        self.session = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "ActivationProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def _edited(graph: onnx.GraphProto, outputs: list, nodes: list[onnx.NodeProto], rewire: Mapping[str, str]):
    """``graph`` with ``outputs`` and ``nodes`` added and its own nodes' inputs renamed as ``rewire`` says, for the
    ``with`` block only."""
    renamed = []
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rewire:
                renamed.append((node, i, name))
                node.input[i] = rewire[name]
    count, outputs_count = len(graph.node), len(graph.output)
    graph.output.extend(outputs)
    graph.node.extend(nodes)
    try:
        yield
    finally:
        del graph.output[outputs_count:]
        del graph.node[count:]
        for node, i, name in renamed:
            node.input[i] = name


def activations(model: onnx.ModelProto, tensors: list[str], feeds: Iterable[Mapping[str, np.ndarray]],
                threads: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """Per feed, ``{tensor: value}`` for each of ``tensors`` (``model`` is left as it is): one pass."""
    with ActivationProbe(model, tensors, threads) as probe:
        yield from probe.run(feeds, tensors)


def default_budget() -> int:
    """Bytes a measurement may hold at once (GPTQ's second moments, the int8 ranking's activations):
    a quarter of the memory available now, at most 8 GiB, at least 256 MiB. "Available" as the build's
    memory check reads it (reclaimable page cache counted, a container's limit obeyed): free pages
    alone made the sample depend on what the page cache held, and ignored a container's limit."""
    available = available_bytes()
    if available is None:  # not Linux
        available = 4 << 30
    return int(min(8 << 30, max(256 << 20, available // 4)))


#: the zero that in-graph statistics are multiplied by (``waiting``)
ZERO = helper.make_node("Constant", [], ["probe_zero"], name="probe_zero", value_float=0.0)


def waiting(tensor: str, statistic: str, out: str) -> list[onnx.NodeProto]:
    """``out = tensor + 0 x statistic``: the same values, which the graph's own readers of ``tensor`` read instead
    (``ActivationProbe(rewire=...)``), so that ONNX Runtime computes the statistic before going on past ``tensor``
    and frees it as it would. Its order (by data only; DEFAULT and PRIORITY_BASED alike) otherwise puts every
    statistic appended to a graph after the whole stage, holding every tensor they read until then: a tower's scores
    and softmax of every layer (4.7 GB more for HunyuanOCR's at 1,156 patches; 21 GB and counting at its calibration
    image of 3,348, measured). Needs ``ZERO`` among the added nodes."""
    return [helper.make_node("Mul", [statistic, ZERO.output[0]], [f"{out}_nothing"], name=f"{out}_nothing"),
            helper.make_node("Add", [tensor, f"{out}_nothing"], [out], name=out)]


def range_nodes(tensors: list[str], prefix: str = "probe_range"
                ) -> tuple[list[onnx.NodeProto], list[tuple[str, str]], dict[str, str]]:
    """Nodes computing each tensor's smallest and largest value (scalars), their outputs in ``tensors``' order, and
    the rewiring that makes the graph wait for both (``waiting``)."""
    nodes, outputs, rewire = [ZERO], [], {}
    for i, t in enumerate(tensors):
        base = f"{prefix}_{i}"
        low, high = f"{base}_min", f"{base}_max"
        nodes += [helper.make_node("ReduceMin", [t], [low], name=low, keepdims=0),
                  helper.make_node("ReduceMax", [t], [high], name=high, keepdims=0),
                  helper.make_node("Add", [low, high], [f"{base}_both"], name=f"{base}_both"),
                  *waiting(t, f"{base}_both", f"{base}_after")]
        outputs.append((low, high))
        rewire[t] = f"{base}_after"
    return nodes, outputs, rewire


def tensor_ranges(model: onnx.ModelProto, tensors: Iterable[str], feeds: Iterable[Mapping[str, np.ndarray]],
                  threads: int = 2, source_dir: Path | None = None) -> dict[str, tuple[np.float32, np.float32]]:
    """Each of ``tensors``' smallest and largest value over every feed (minmax calibration's range), computed inside
    the graph so that only two scalars per tensor are fetched and the graph's memory stays one run's: ONNX
    Runtime's own MinMax calibrator fetches a reduction of every tensor appended at the end of the graph, which
    holds every layer's activations to the end of the run (past 15 GB for HunyuanOCR's tower on one 3,348-patch
    image, measured; its ``CalibMaxIntermediateOutputs`` does not bound that)."""
    tensors = list(dict.fromkeys(tensors))
    nodes, outputs, rewire = range_nodes(tensors)
    names = [name for pair in outputs for name in pair]
    low = dict.fromkeys(tensors, np.float32(np.inf))
    high = dict.fromkeys(tensors, np.float32(-np.inf))
    with ActivationProbe(model, names, threads, source_dir=source_dir, nodes=nodes, rewire=rewire) as probe:
        for got in probe.run(feeds, names):
            for t, (lo, hi) in zip(tensors, outputs):
                low[t] = min(low[t], np.float32(got[lo]))
                high[t] = max(high[t], np.float32(got[hi]))
    unseen = [t for t in tensors if low[t] > high[t]]
    if unseen:
        raise ExportError(f"no calibration input reached {', '.join(unseen[:3])}: no int8 range to calibrate")
    return {t: (low[t], high[t]) for t in tensors}


def row_sample_nodes(widths: Mapping[str, int], per_feed: int, prefix: str = "probe_rows"
                     ) -> tuple[list[onnx.NodeProto], list[str], dict[str, str]]:
    """Nodes taking, of each tensor (``widths``: tensor -> its last dimension), every k-th of its rows (as a
    ``[-1, width]`` matrix; k = ceil(rows / ``per_feed``): at most ``per_feed`` rows, evenly spread), their outputs
    in ``widths``' order, and the rewiring that makes the graph wait for each sample (``waiting``)."""
    nodes = [ZERO, helper.make_node("Constant", [], [f"{prefix}_per_feed"], name=f"{prefix}_per_feed",
                                    value_ints=[per_feed]),
             helper.make_node("Constant", [], [f"{prefix}_spare"], name=f"{prefix}_spare", value_ints=[per_feed - 1]),
             helper.make_node("Constant", [], [f"{prefix}_one"], name=f"{prefix}_one", value_ints=[1]),
             helper.make_node("Constant", [], [f"{prefix}_zero"], name=f"{prefix}_zero", value_ints=[0]),
             helper.make_node("Constant", [], [f"{prefix}_end"], name=f"{prefix}_end", value_ints=[np.iinfo(np.int64).max])]
    outputs, rewire = [], {}
    for i, (t, width) in enumerate(widths.items()):
        base = f"{prefix}_{i}"
        nodes += [helper.make_node("Constant", [], [f"{base}_shape"], name=f"{base}_shape", value_ints=[-1, width]),
                  helper.make_node("Reshape", [t, f"{base}_shape"], [f"{base}_matrix"], name=f"{base}_matrix"),
                  helper.make_node("Shape", [f"{base}_matrix"], [f"{base}_dims"], name=f"{base}_dims"),
                  helper.make_node("Gather", [f"{base}_dims", f"{prefix}_zero"], [f"{base}_rows"], name=f"{base}_rows",
                                   axis=0),
                  helper.make_node("Add", [f"{base}_rows", f"{prefix}_spare"], [f"{base}_up"], name=f"{base}_up"),
                  helper.make_node("Div", [f"{base}_up", f"{prefix}_per_feed"], [f"{base}_k"], name=f"{base}_k"),
                  helper.make_node("Max", [f"{base}_k", f"{prefix}_one"], [f"{base}_step"], name=f"{base}_step"),
                  helper.make_node("Slice", [f"{base}_matrix", f"{prefix}_zero", f"{prefix}_end", f"{prefix}_zero",
                                             f"{base}_step"], [base], name=base),
                  helper.make_node("ReduceMax", [base], [f"{base}_max"], name=f"{base}_max", keepdims=0),
                  *waiting(t, f"{base}_max", f"{base}_after")]
        outputs.append(base)
        rewire[t] = f"{base}_after"
    return nodes, outputs, rewire


def sampled_rows(model: onnx.ModelProto, widths: Mapping[str, int], feeds: Iterable[Mapping[str, np.ndarray]],
                 per_feed: int, threads: int = 2, source_dir: Path | None = None) -> dict[str, np.ndarray]:
    """Of each tensor (``widths``: tensor -> its last dimension), an even sample of at most ``per_feed`` rows of each
    feed's, all-zero (padded) rows left out, the feeds' samples stacked. Sampled inside the graph
    (``row_sample_nodes``): fetching the tensors whole holds every one of them to the end of the run (a large
    tower's every MatMul input: 2.8 GB for HunyuanOCR's at 3,348 patches)."""
    nodes, outputs, rewire = row_sample_nodes(widths, per_feed)
    parts: dict[str, list[np.ndarray]] = {t: [] for t in widths}
    with ActivationProbe(model, outputs, threads, source_dir=source_dir, nodes=nodes, rewire=rewire) as probe:
        for got in probe.run(feeds, outputs):
            for t, out in zip(widths, outputs):
                x = got[out]
                parts[t].append(x[np.abs(x).max(axis=1, initial=0.0) > 0].astype(np.float32))
    return {t: np.concatenate(p) for t, p in parts.items()}
