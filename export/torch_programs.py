"""Component -> `torch.export` program (`<build>/torch/<component>.pt2`): the torch backend's artefact.

A GPU without TensorRT runs the runtime over torch: each component's wrapper (export/components.py,
the engines' exact I/O) is exported once at build time with `torch.export`, dynamic along the same
named axes as the ONNX graph, and saved with its weights. The runtime loads it with
`torch.export.load` (runtime/sessions.py `open_session(..., "torch")`): no diffusers, no
transformers, no checkpoint at serving time, and the loop stays capturable in CUDA graphs.

Axis names map to `torch.export.Dim`s: one `batch` root (min 1; `2B` is 2*batch), and one root per
side counting 64-pixel units, so `latent_height/4` is (64 / 8 / 4) * units — every size the
engines' profiles allow (multiples of 64 px) is one program.
"""
from __future__ import annotations

import inspect
import time
from pathlib import Path

import torch

from engine.profiles import TEXT_CHUNK, TEXT_TOKENS_AXIS, parse_dim
from export.components import Component, example_inputs

PIXEL_UNIT = 64          # sizes are multiples of 64 px (runtime.pipelines.PIXEL_MULTIPLE)
MAX_UNITS = 64           # up to 4096 px per side
MAX_BATCH = 32           # rows of the batch axis
MAX_TEXT_CHUNKS = 16     # prompt chunks of 77 tokens
EXAMPLE_SIZES = {"batch": 2, "height": 2 * PIXEL_UNIT, "width": 3 * PIXEL_UNIT}  # no axis at 0/1 (specialised)


class ProgramExportError(RuntimeError):
    """torch.export could not capture the component with its dynamic axes."""


def dynamic_shapes(component: Component):
    """torch.export `dynamic_shapes` for the wrapper's forward: one {axis: Dim expression} per input
    (None for a fully static input), grouped as the forward's signature takes them (*residuals)."""
    roots = {"batch": torch.export.Dim("batch", min=1, max=MAX_BATCH),
             "height": torch.export.Dim("height_units", min=1, max=MAX_UNITS),
             "width": torch.export.Dim("width_units", min=1, max=MAX_UNITS),
             TEXT_TOKENS_AXIS: TEXT_CHUNK * torch.export.Dim("text_chunks", min=1, max=MAX_TEXT_CHUNKS)}

    def axis(dim):
        if isinstance(dim, int):
            return None
        expr = parse_dim(dim)
        if expr.base == TEXT_TOKENS_AXIS:  # prompt tokens: 77 per chunk
            if expr.coef != 1 or expr.div != 1:
                raise ProgramExportError(f"{component.name}: text axis '{dim}' scales the prompt tokens")
            return roots[TEXT_TOKENS_AXIS]
        if expr.base == "batch":
            if expr.div != 1:
                raise ProgramExportError(f"{component.name}: batch axis '{dim}' divides the batch")
            factor = expr.coef
        else:  # pixels = PIXEL_UNIT * units; the axis = pixels * coef / div
            if (PIXEL_UNIT * expr.coef) % expr.div:
                raise ProgramExportError(f"{component.name}: axis '{dim}' is not a whole multiple of "
                                         f"{PIXEL_UNIT}-pixel units")
            factor = PIXEL_UNIT * expr.coef // expr.div
        return roots[expr.base] if factor == 1 else factor * roots[expr.base]

    shapes = [({i: axis(d) for i, d in enumerate(io.shape) if axis(d) is not None} or None) for io in component.inputs]
    parameters = list(inspect.signature(component.module.forward).parameters.values())
    if parameters and parameters[-1].kind == inspect.Parameter.VAR_POSITIONAL:
        fixed = len(parameters) - 1
        return (*shapes[:fixed], tuple(shapes[fixed:]))
    return tuple(shapes)


def export_program(component: Component, path: Path) -> float:
    """Export `component` with torch.export (dynamic axes) and save it to `path` (.pt2); returns seconds.

    Raises ProgramExportError with torch's reason when the module cannot be captured.
    """
    start = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = example_inputs(component, EXAMPLE_SIZES)
    try:
        program = torch.export.export(component.module, example, dynamic_shapes=dynamic_shapes(component),
                                      strict=False)
    except Exception as error:  # torch raises many kinds (UserError, ConstraintViolationError, ...)
        raise ProgramExportError(f"torch.export of {component.name} failed ({type(error).__name__}: "
                                 f"{str(error).splitlines()[0] if str(error) else ''}); export ONNX only "
                                 "(--stage onnx) and run it with onnxruntime or TensorRT") from error
    partial = path.with_name(f".{path.stem}.partial.pt2")  # torch wants the .pt2 suffix
    torch.export.save(program, partial)
    partial.replace(path)
    return time.perf_counter() - start


def io_specs(component: Component) -> dict:
    """The I/O contract recorded with the program: {'inputs': [[name, dtype, dims]], 'outputs': ...}."""
    def spec(io):
        return [io.name, io.dtype_name, list(io.shape)]
    return {"inputs": [spec(io) for io in component.inputs], "outputs": [spec(io) for io in component.outputs]}


def parameter_count(component: Component) -> int:
    """The weights the program carries: the module's parameters (each shared tensor once)."""
    seen, count = set(), 0
    for parameter in component.module.parameters():
        if parameter.data_ptr() not in seen:
            seen.add(parameter.data_ptr())
            count += parameter.numel()
    return count


def program_entry(component: Component, build_dir: Path, name: str, torch_version: str, precision: str,
                  made_from: dict, sha256) -> dict:
    """Export `component` to <build_dir>/torch/<name>.pt2; returns its manifest entry (torch_programs):
    path, sha256 (`sha256(path)`), size, parameter count, versions, the inputs it was made from, I/O."""
    path = Path(build_dir) / "torch" / f"{name}.pt2"
    seconds = export_program(component, path)
    return {"path": f"torch/{name}.pt2", "sha256": sha256(path), "size_bytes": path.stat().st_size,
            "torch": torch_version, "precision": precision, "export_seconds": round(seconds, 2),
            "params": parameter_count(component), "made_from": made_from, **io_specs(component)}
