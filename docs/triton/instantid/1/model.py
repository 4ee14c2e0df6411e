"""Triton Inference Server Python-backend model wrapping the runtime pipeline (see docs/serving.md).

Model repository layout:
    model_repository/instantid/config.pbtxt
    model_repository/instantid/1/model.py        # this file

The build directory, backend and pipeline come from config.pbtxt `parameters`. Requests carry the
encoded photo (TYPE_STRING bytes) and the generation parameters as tensors; they are validated by
the same pydantic schema and decoded by the same code as `python -m runtime.serve`, so a request
Triton accepts is one the HTTP server accepts. Triton's dynamic batcher hands `execute` several
requests at once; they are grouped by batch key, and each group runs as one stacked denoising loop
on this instance's GPU (`ServedPipeline.run_batch`).
"""
from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend

from runtime.serve.inputs import Limits, resolve_request
from runtime.serve.schemas import REQUEST_MODELS, BadRequest
from runtime.serve.served import load_pipelines

# Triton input name -> request field; every input except IMAGE is optional (schema defaults apply).
INPUTS = {"PROMPT": "prompt", "NEGATIVE_PROMPT": "negative_prompt", "STEPS": "steps", "GUIDANCE": "guidance",
          "IP_SCALE": "ip_scale", "CONTROLNET_SCALE": "controlnet_scale", "SEED": "seed", "WIDTH": "width",
          "HEIGHT": "height", "SCHEDULER": "scheduler", "FACE_INDEX": "face_index"}


class TritonPythonModel:
    """initialize: open + warm up the pipeline on this instance's GPU; execute: one response per request."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.name = params.get("pipeline", "instantid")
        self.limits = Limits(max_side=int(params.get("max_side", 2048)))
        backend = params.get("backend", "tensorrt")
        # One pipeline per model instance, on the GPU Triton gave the instance (instance_group KIND_GPU).
        device = f"cuda:{args['model_instance_device_id']}" if backend != "onnxruntime" else None
        served = load_pipelines(params["build_dir"], backend, [self.name], device=device,
                                warmup_steps=int(params["warmup_steps"]) if "warmup_steps" in params else None)
        self.served = served[self.name]
        self.served.warmup()

    def _fields(self, request) -> tuple[dict, bytes]:
        fields = {}
        for tensor_name, field in INPUTS.items():
            tensor = pb_utils.get_input_tensor_by_name(request, tensor_name)
            if tensor is None:
                continue
            value = tensor.as_numpy().reshape(-1)[0]
            fields[field] = value.decode() if isinstance(value, bytes) else value.item()
        image = pb_utils.get_input_tensor_by_name(request, "IMAGE")
        if image is None:
            raise BadRequest("IMAGE (the encoded photo bytes, TYPE_STRING) is required")
        return fields, bytes(image.as_numpy().reshape(-1)[0])

    def execute(self, requests):
        responses = [None] * len(requests)
        groups = defaultdict(list)  # batch key -> [(index, request)]
        for index, request in enumerate(requests):
            try:
                fields, photo = self._fields(request)
                params = REQUEST_MODELS[self.name].model_validate(fields)
                params.check()
                generate, key = resolve_request(self.name, params, {"image": photo}, self.limits,
                                                self.served.default_size,
                                                self.served.info.get("default_resolution", 1024))
                groups[key].append((index, generate))
            except Exception as error:  # noqa: BLE001 - pydantic ValidationError, BadRequest
                responses[index] = _error(error)
        for key, members in groups.items():
            outputs = self.served.run_batch(key, [generate for _, generate in members])
            for (index, _), output in zip(members, outputs):
                if isinstance(output, BaseException):
                    responses[index] = _error(output)
                else:
                    pixels = np.stack([np.asarray(image, dtype=np.uint8) for image in output])  # (N, H, W, 3)
                    responses[index] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("IMAGES", pixels)])
        return responses

    def finalize(self):
        self.served = None


def _error(error: BaseException):
    """A failed request's response: INVALID_ARG for what the client must fix, INTERNAL otherwise."""
    invalid = isinstance(error, ValueError) or type(error).__name__ in ("NoFaceError", "FaceIndexError")
    code = pb_utils.TritonError.INVALID_ARG if invalid else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(error), code))
