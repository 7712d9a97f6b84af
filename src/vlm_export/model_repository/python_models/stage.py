"""Triton python model: one exported stage graph (an image stage or the decoder) on ONNX
Runtime. Used by the ``python`` target, which loads on any Triton (the CPU one in
nvidia-pytriton included). Dynamically batched requests are concatenated along dim 0, run
once and split back."""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from vlm_export.model_repository.python_models.common import check_files, instance_device, model_dirs, parameter
from vlm_export.runtime.runners import OrtRunner


class TritonPythonModel:
    def initialize(self, args):
        _, version_dir, config = model_dirs(args)
        check_files(version_dir, config)
        self.batched = config.get("max_batch_size", 0) > 0
        threads = int(parameter(config, "intra_op_threads", "0")) or None
        # on a GPU: the graph's fp16 / int8 and its shape range, for ONNX Runtime's TensorRT provider (the renderer's)
        profile = parameter(config, "trt_profiles")
        self.runner = OrtRunner(args["model_name"], version_dir / "model.onnx", threads=threads,
                                spin=parameter(config, "spin", "0") == "1", device=instance_device(args),
                                fp16=parameter(config, "fp16", "0") == "1", int8=parameter(config, "int8", "0") == "1",
                                trt_profiles=json.loads(profile) if profile else None)

    def execute(self, requests):
        feeds = [{n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.runner.input_names}
                 for r in requests]
        try:
            if self.batched and len(feeds) > 1:
                sizes = [len(f[self.runner.input_names[0]]) for f in feeds]
                merged = self.runner.infer({n: np.concatenate([f[n] for f in feeds]) for n in self.runner.input_names})
                cuts = np.cumsum(sizes)[:-1]
                parts = {n: np.split(v, cuts) for n, v in merged.items()}
                outputs = [{n: parts[n][i] for n in parts} for i in range(len(feeds))]
            else:
                outputs = [self.runner.infer(f) for f in feeds]
        except Exception as e:  # one failed run fails this batch only; the model keeps serving
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))) for _ in requests]
        return [pb_utils.InferenceResponse([pb_utils.Tensor(n, np.ascontiguousarray(v)) for n, v in out.items()])
                for out in outputs]
