"""Intermediate activations of a graph on calibration feeds: ONNX Runtime runs the fp32 graph with
the asked-for tensors added as outputs. SmoothQuant's channel maxima and GPTQ's input Hessians are
both statistics of what this yields."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..export.graph_info import EXTERNAL_DATA_THRESHOLD, save_graph


def activations(model: onnx.ModelProto, tensors: list[str], feeds: Iterable[Mapping[str, np.ndarray]],
                threads: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """Per feed, ``{tensor: value}`` for each of ``tensors`` (``model`` is left as it is)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None)
                              for t in tensors if t not in present)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        if probe.ByteSize() < EXTERNAL_DATA_THRESHOLD:
            session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        else:
            session = ort.InferenceSession(os.fspath(save_graph(probe, Path(tmp) / "probe.onnx")), opts,
                                           providers=["CPUExecutionProvider"])
        del probe
        inputs = [i.name for i in session.get_inputs()]
        for feed in feeds:
            yield dict(zip(tensors, session.run(tensors, {n: feed[n] for n in inputs})))
