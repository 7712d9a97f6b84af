"""Triton python model: encoded image bytes (PNG/JPEG, raw or base64) -> every image-processor
output the image stages read (this model's config outputs: pixel_values, and for tiled models such
as mllama aspect_ratio_ids and aspect_ratio_mask), with the build's own image processor."""
import sys

# The served models never use torch (the deploy image has none). Where it is installed (a development venv)
# transformers would import it all the same: hidden here, each stub starts as it does in the image, about 3.5 CPU-s
# sooner and 300 MB smaller (measured on this model and preprocess's).
sys.modules.setdefault("torch", None)
import json

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers.utils import logging as hf_logging

from vlm_export.contract import TensorSpec
from vlm_export.contract.layout import image_arrangement
from vlm_export.model_repository.python_models.common import image_limits, image_payload, model_dirs, parameter
from vlm_export.runtime.images import load_image_processor, processed_images
from vlm_export.runtime.pipeline import as_declared


class TritonPythonModel:
    def initialize(self, args):
        _, version_dir, config = model_dirs(args)
        self.limits = image_limits(config)
        # the build's PromptLayout.image_tiles: how its processor's outputs become the image path's inputs
        self.arrangement = image_arrangement(json.loads(parameter(config, "image_arrangement", "{}")))
        # the outputs as declared (the renderer took them from the stage graphs): images axis first
        self.outputs = [TensorSpec(t["name"], np.dtype(pb_utils.triton_string_to_numpy(t["data_type"])).name,
                                   ("images", *(t["reshape"].get("shape", []) if "reshape" in t else t["dims"])))
                        for t in config["output"]]
        hf_logging.set_verbosity_error()
        self.processor = load_image_processor(version_dir / "processor")  # as the build made its pixels

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                raw = pb_utils.get_input_tensor_by_name(request, "images").as_numpy().reshape(-1)
                # as the model's processor calls its image processor (InternVL's crop_to_patches)
                out = processed_images(self.processor, [image_payload(bytes(b)) for b in raw], self.limits,
                                       self.arrangement)
                if self.arrangement is not None:
                    out = self.arrangement.arranged(dict(out))
                responses.append(pb_utils.InferenceResponse(
                    [pb_utils.Tensor(t.name, as_declared(out[t.name], t)) for t in self.outputs]))
            except Exception as e:  # a bad image fails its own request only
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
        return responses
