"""ONNX -> TensorRT engines for the build directory (see DESIGN.md, "The build directory").

Modules: tensors (the tensor spec, dtype map and ONNX I/O reader every package shares), backend
(tensorrt / tensorrt-rtx adapter and capabilities), profiles (geometry and the dynamic-axis naming
convention), build (one engine), build_all (every component, cached), manifest (manifest.json
records), cache (rebuild decisions, load-time checks), refit, fusion.

Import-light on purpose: `import engine` loads nothing, so the runtime imports `engine.manifest`,
`engine.cache` and `engine.tensors` without the builder or its progress bars; no module imports
TensorRT until a backend is loaded.
"""
