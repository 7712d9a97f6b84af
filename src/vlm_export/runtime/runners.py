"""One runner contract for every backend: named numpy arrays in, named numpy arrays out.

Parity checks, benchmarks, the generation loop and the Triton python models all talk to a
stage through this contract, so swapping PyTorch for ONNX Runtime (or TensorRT, or a remote
Triton model) changes nothing above it. Modelled on Polygraphy's runners.
"""
from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import RunnerError

Feeds = Mapping[str, np.ndarray]


class Runner(abc.ABC):
    """Runs one stage. ``input_names``/``output_names`` fix the order of tensors."""

    backend: str = "?"

    def __init__(self, name: str, input_names: list[str], output_names: list[str]):
        self.name, self.input_names, self.output_names = name, list(input_names), list(output_names)

    def infer(self, feeds: Feeds) -> dict[str, np.ndarray]:
        """Run once; every input in ``input_names`` must be present (extra feeds are ignored)."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise RunnerError(f"{self.backend} runner for {self.name}: missing inputs {missing}")
        return self._run(feeds)

    @abc.abstractmethod
    def _run(self, feeds: Feeds) -> dict[str, np.ndarray]:
        """The backend's call; ``feeds`` holds every input."""


class TorchRunner(Runner):
    """The PyTorch reference: the same split module that was exported, in fp32 on the CPU."""

    backend = "torch"

    def __init__(self, name, module, input_names, output_names):
        super().__init__(name, input_names, output_names)
        self.module = module.eval()

    def _run(self, feeds: Feeds) -> dict[str, np.ndarray]:
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.input_names]
        with torch.no_grad():
            out = self.module(*args)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {n: t.detach().cpu().numpy() for n, t in zip(self.output_names, out)}


class OrtRunner(Runner):
    """ONNX Runtime on the CPU provider (or any provider list given).

    ``spin``: whether the session's worker threads busy-wait after a call (ONNX Runtime's default).
    Right for the decoder, called again within microseconds; wrong for the once-per-request image
    stages, whose spinning threads then compete with the prefill that follows on the same cores
    (measured on the demo, 2 cores: time to first token 203 ms spinning, 150 ms not; the decoder
    not spinning costs 10% per token). Callers pass the stage's ``StageSpec.per_token``.
    """

    backend = "onnxruntime"

    def __init__(self, name: str, path: Path, threads: int | None = None,
                 providers: list[str] | None = None, spin: bool = False):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.spin = spin
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(os.fspath(path), opts,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as e:
            raise RunnerError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0]}; rebuild the graph") from None
        super().__init__(name, [i.name for i in self.session.get_inputs()],
                         [o.name for o in self.session.get_outputs()])

    def _run(self, feeds: Feeds) -> dict[str, np.ndarray]:
        try:
            out = self.session.run(self.output_names, {n: feeds[n] for n in self.input_names})
        except Exception as e:
            raise RunnerError(f"ONNX Runtime failed on {self.name}: {str(e).splitlines()[0]}") from None
        return dict(zip(self.output_names, out))
