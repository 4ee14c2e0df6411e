"""Evaluate an FP16-typed ONNX graph exactly as typed, on a CPU without fp16 kernels.

ONNX Runtime's CPU provider lacks float16 kernels for most ops; it wraps such nodes in Casts and
may fold or merge those casts, so what it computes is not pinned down. `emulate_fp16` instead
rewrites the graph so that plain float32 ONNX Runtime (graph optimisations off) computes:

- every float16 initializer / constant widened to float32 (exact: fp16 ⊂ fp32);
- every op in float32 (as GPU fp16 kernels accumulate in fp32);
- every value the graph types as float16 rounded to float16 right where it is produced
  (Cast to float16 and back, which ONNX Runtime must not remove with optimisations disabled);
- Cast(to=float16) nodes kept as that rounding; float32 islands (e.g. the Resampler softmax)
  stay float32.

So each tensor holds exactly a float16 value wherever the graph says float16: the graph's
precision is checked, not ONNX Runtime's kernel coverage.
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper, numpy_helper

HALF, SINGLE = TensorProto.FLOAT16, TensorProto.FLOAT


def _widen_tensor(tensor: onnx.TensorProto) -> onnx.TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype("float32"), tensor.name)


def emulate_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """float32 graph computing `model` with float16 rounding at every float16 value (see module doc)."""
    model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type == HALF:
            graph.initializer[index].CopyFrom(_widen_tensor(tensor))
    nodes = []
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == HALF:
                attribute.t.CopyFrom(_widen_tensor(attribute.t))
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == HALF:
                attribute.i = SINGLE
        rounding = []
        for position, output in enumerate(node.output):
            if types.get(output) == HALF:
                wide = f"{output}__fp32"
                node.output[position] = wide
                rounding += [helper.make_node("Cast", [wide], [f"{output}__fp16"], to=HALF),
                             helper.make_node("Cast", [f"{output}__fp16"], [output], to=SINGLE)]
        nodes += [node, *rounding]
    del graph.node[:]
    graph.node.extend(nodes)
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.tensor_type.elem_type == HALF:
            value.type.tensor_type.elem_type = SINGLE
    return model


def untyped_outputs(model: onnx.ModelProto) -> list[str]:
    """Node outputs whose element type shape inference cannot tell (they would escape the rounding)."""
    graph = onnx.shape_inference.infer_shapes(model).graph
    typed = {v.name for v in (*graph.value_info, *graph.output) if v.type.tensor_type.elem_type}
    return [o for node in graph.node for o in node.output if o and o not in typed]


def session(model: onnx.ModelProto):
    """ONNX Runtime CPU session with every graph optimisation off (keeps the rounding casts)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
