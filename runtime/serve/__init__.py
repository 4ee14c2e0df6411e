"""HTTP serving of the runtime pipelines: `python -m runtime.serve --build DIR` (see docs/serving.md).

Import-light: importing this package loads no pipeline, starlette or prometheus module."""
