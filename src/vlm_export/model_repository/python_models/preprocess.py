"""Triton python model: encoded image bytes (PNG/JPEG, raw or base64) -> pixel_values, with the
build's own image processor."""
import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoImageProcessor
from transformers.utils import logging as hf_logging

from vlm_export.model_repository.python_models.common import image_limits, image_payload, model_dirs
from vlm_export.runtime.images import image_name, load_image


class TritonPythonModel:
    def initialize(self, args):
        _, version_dir, config = model_dirs(args)
        self.limits = image_limits(config)
        hf_logging.set_verbosity_error()
        self.processor = AutoImageProcessor.from_pretrained(version_dir / "processor")

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                raw = pb_utils.get_input_tensor_by_name(request, "images").as_numpy().reshape(-1)
                images = [load_image(image_payload(bytes(b)), self.limits, image_name(i, b"", len(raw)))
                          for i, b in enumerate(raw)]
                pixels = np.asarray(self.processor(images=images, return_tensors="np")["pixel_values"], np.float32)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("pixel_values", pixels)]))
            except Exception as e:  # a bad image fails its own request only
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
        return responses
