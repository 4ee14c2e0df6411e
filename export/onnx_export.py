"""Component -> clean ONNX file: trace, optimise, name every axis, save (one external-data file > 2 GB).

Steps of `export_component`:
1. torch.onnx.export (TorchScript tracer, opset 17) of the wrapper at the trace size, with the
   component's input/output names and dynamic axes; weights keep the module's dtype, so an
   fp16 module gives an FP16-typed graph (what strongly typed TensorRT takes as precision).
2. Graph hygiene on the ONNX IR (`optimize`): constant folding with ONNX shape inference,
   common-subexpression elimination (the tracer repeats every shape computation), dead-code
   removal.
3. Every graph input and output gets exactly the component's dims (ints and axis names from
   engine/profiles.py), whatever names the tracer guessed.
4. Saved as `<name>.onnx`; when the weights pass 1.8 GB they go into ONE `<name>.onnx.data`
   file beside it (protobuf's 2 GB limit). Large graphs are processed lazily from disk.
"""
from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import onnx_ir as ir
import torch

from engine.tensors import onnx_enum
from export.components import Component, example_inputs

OPSET = 17
EXTERNAL_DATA_BYTES = int(1.8 * 2**30)


class ExportError(RuntimeError):
    """The traced graph does not have the component's I/O contract."""


def trace_sizes(resolution: int, batch: int = 2) -> dict[str, int]:
    """Base sizes for tracing: batch rows (B = batch / 2 for the CFG-paired `2B` axes) and pixels."""
    return {"batch": batch, "height": resolution, "width": resolution}


def export_component(component: Component, path: Path, sizes: dict[str, int], opset: int = OPSET) -> float:
    """Export `component` to `path` (an .onnx file); returns seconds taken.

    sizes: base sizes {'batch', 'height', 'width'} of the trace inputs (see `trace_sizes`); the
    graph stays dynamic along every named axis. Raises ExportError if the traced graph lost an
    input or output.
    """
    start = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = example_inputs(component, _rows(component, sizes))
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{component.name}.") as tmp:
        raw = Path(tmp) / "traced.onnx"
        _trace(component, example, raw, opset)
        model = ir.load(raw)
        finish_graph(model, component)
        save_model(model, path)
    return time.perf_counter() - start


def _rows(component: Component, sizes: dict[str, int]) -> dict[str, int]:
    """Trace every component with `sizes['batch']` rows: CFG-paired (`2B`) components at B = rows/2.

    Two rows, never one: the tracer may specialise size-1 axes. Half the rows also halves the
    (slow, fp16-on-CPU) trace of the SDXL UNet and ControlNet.
    """
    paired = any(d == "2B" for io in component.inputs for d in io.shape)
    return {**sizes, "batch": max(1, sizes["batch"] // 2)} if paired else sizes


def _dynamic_axes(component: Component) -> dict[str, dict[int, str]]:
    axes = {}
    for io in (*component.inputs, *component.outputs):
        named = {i: d for i, d in enumerate(io.shape) if isinstance(d, str)}
        if named:
            axes[io.name] = named
    return axes


def _trace(component: Component, example: tuple, path: Path, opset: int) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python control flow on shapes, deprecations
        torch.onnx.export(component.module, example, str(path), dynamo=False, opset_version=opset,
                          input_names=[io.name for io in component.inputs],
                          output_names=[io.name for io in component.outputs],
                          dynamic_axes=_dynamic_axes(component), do_constant_folding=True)


def finish_graph(model: ir.Model, component: Component) -> None:
    """Optimise in place (fold constants, drop dead nodes, infer shapes) and set the exact I/O dims."""
    optimize(model)
    graph = model.graph
    graph.name = component.name
    for values, ios, kind in ((graph.inputs, component.inputs, "input"), (graph.outputs, component.outputs, "output")):
        names = [v.name for v in values]
        expected = [io.name for io in ios]
        if names != expected:
            raise ExportError(f"{component.name}: traced graph {kind}s {names} differ from the contract {expected}; "
                              "an unused input was dropped by the tracer or the wrapper returns another order")
        for value, io in zip(values, ios):
            if value.dtype != ir.DataType(onnx_enum(io.dtype)):
                raise ExportError(f"{component.name}: {kind} {io.name} is {value.dtype}, the contract says "
                                  f"{io.dtype_name}")
            value.shape = ir.Shape(io.shape)
    for node in graph:  # the tracer's doc strings hold source lines of this machine: not deterministic
        node.doc_string = None


def optimize(model: ir.Model) -> None:
    """Constant folding with shape inference, common subexpressions merged, dead nodes removed.

    (onnxscript's full `optimize` adds pattern rewrites that take minutes on a UNet and buy
    nothing TensorRT does not do itself.)
    """
    from onnx_ir.passes.common import CommonSubexpressionEliminationPass, RemoveUnusedNodesPass
    from onnxscript.optimizer import fold_constants

    fold_constants(model, onnx_shape_inference=True)
    CommonSubexpressionEliminationPass()(model)
    RemoveUnusedNodesPass()(model)


def weights_bytes(model: ir.Model) -> int:
    """Total bytes of the model's initializers."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_model(model: ir.Model, path: Path) -> None:
    """Save; weights over EXTERNAL_DATA_BYTES go to one `<file>.data` beside the model.

    Tensors held in node attributes (Constant values), and every initializer of a model saved
    inline, are read into memory first: a traced model over 2 GB keeps them in files of the
    trace's temporary folder, which `ir.save` would reference, not copy (a full-scale UNet then
    fails to parse once that folder is gone).
    """
    path = Path(path)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    materialize_attribute_tensors(model)
    if weights_bytes(model) > EXTERNAL_DATA_BYTES:
        ir.save(model, path, external_data=data.name)
    else:  # everything inline: no initializer may keep pointing at the trace's files either
        for value in model.graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                value.const_value = ir.Tensor(value.const_value.numpy(), name=value.const_value.name)
        ir.save(model, path)


def materialize_attribute_tensors(model: ir.Model) -> int:
    """Replace every external (file-backed) tensor in a node attribute, subgraphs included, by an
    in-memory copy; returns how many were replaced."""
    replaced = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for name, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                tensor = attr.value
                node.attributes[name] = ir.AttrTensor(name, ir.Tensor(tensor.numpy(), name=tensor.name))
                replaced += 1
            elif attr.type == ir.AttributeType.TENSORS and any(isinstance(t, ir.ExternalTensor) for t in attr.value):
                tensors = [ir.Tensor(t.numpy(), name=t.name) if isinstance(t, ir.ExternalTensor) else t
                           for t in attr.value]
                node.attributes[name] = ir.AttrTensors(name, tensors)
                replaced += 1
    return replaced
