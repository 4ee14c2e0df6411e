"""Lean runtime: sessions over ONNX Runtime / TensorRT engines, on-device schedulers, the
CUDA-graphed denoising loop, face analysis and the InstantID / IP-Adapter pipelines.

Import-light on purpose: `import runtime` loads nothing; import the submodule you need
(`runtime.pipelines`, `runtime.sessions`, ...). Never imports diffusers or transformers.
"""
