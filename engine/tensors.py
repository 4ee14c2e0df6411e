"""The build directory's tensor vocabulary: one tensor spec, one dtype map, one ONNX I/O reader.

    TensorSpec("sample", "float16", ("2B", 4, "latent_height", "latent_width"), min=..., opt=..., max=...)
    torch_dtype("float16") -> torch.float16     dtype_name(torch.float16) -> "float16"
    onnx_dtype(10) -> "float16"                 onnx_enum("float16") -> 10
    trt_dtype(trt.DataType.HALF) -> "float16"   ort_dtype("tensor(float16)") -> "float16"
    onnx_io("build/tiny/onnx/unet.onnx") -> OnnxIO(inputs, outputs, external_data)

Manifests, builds, export wrappers and runtime sessions all describe a named tensor with `TensorSpec`,
and translate element types through `DTYPES`. Importing this module loads nothing but the standard
library: torch and onnx are imported by the functions that need them, so the runtime imports it at
the top without pulling in the exporter or the TensorRT builder.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Shape = tuple  # of int (a fixed size) | str (an axis name, engine/profiles.py; '' unnamed) | None (unknown)


@dataclass(frozen=True)
class DType:
    """One element type in every vocabulary of the build directory.

    name: numpy-style, as manifests write it (and torch's attribute name); onnx: the TensorProto /
    onnx_ir.DataType value; ort: ONNX Runtime's type string; trt: the tensorrt.DataType member (None:
    TensorRT has no such type).
    """

    name: str
    onnx: int
    ort: str
    trt: str | None


DTYPES = (
    DType("float32", 1, "tensor(float)", "FLOAT"), DType("uint8", 2, "tensor(uint8)", "UINT8"),
    DType("int8", 3, "tensor(int8)", "INT8"), DType("uint16", 4, "tensor(uint16)", None),
    DType("int16", 5, "tensor(int16)", None), DType("int32", 6, "tensor(int32)", "INT32"),
    DType("int64", 7, "tensor(int64)", "INT64"), DType("bool", 9, "tensor(bool)", "BOOL"),
    DType("float16", 10, "tensor(float16)", "HALF"), DType("float64", 11, "tensor(double)", None),
    DType("bfloat16", 16, "tensor(bfloat16)", "BF16"), DType("float8_e4m3fn", 17, "tensor(float8e4m3fn)", "FP8"),
    DType("int4", 22, "tensor(int4)", "INT4"),
)
_BY_NAME = {d.name: d for d in DTYPES}
_BY_ONNX = {d.onnx: d for d in DTYPES}
_BY_ORT = {d.ort: d for d in DTYPES}
_BY_TRT = {d.trt: d for d in DTYPES if d.trt}


def dtype_name(dtype) -> str:
    """The numpy-style name ('float16') of a name or a torch.dtype."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in _BY_NAME:
        raise TypeError(f"unknown element type {dtype!r}; the build directory knows {sorted(_BY_NAME)}")
    return name


def torch_dtype(dtype):
    """The torch.dtype of a name ('float16') or of a torch.dtype (returned as is)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, dtype_name(dtype), None)
    if not isinstance(value, torch.dtype):
        raise TypeError(f"torch {torch.__version__} has no dtype '{dtype}'; the runtime cannot hold such a tensor")
    return value


def onnx_dtype(elem_type: int) -> str:
    """The numpy-style name of an ONNX TensorProto element type (10 -> 'float16')."""
    if elem_type in _BY_ONNX:
        return _BY_ONNX[elem_type].name
    import onnx

    return onnx.TensorProto.DataType.Name(elem_type).lower()


def onnx_enum(dtype) -> int:
    """The ONNX TensorProto element type (also onnx_ir.DataType's value) of a name or torch.dtype."""
    return _BY_NAME[dtype_name(dtype)].onnx


def ort_dtype(type_string: str) -> str:
    """The numpy-style name of an ONNX Runtime type string ('tensor(float)' -> 'float32')."""
    if type_string not in _BY_ORT:
        raise TypeError(f"ONNX Runtime type {type_string} is none the runtime feeds ({sorted(_BY_ORT)})")
    return _BY_ORT[type_string].name


def trt_dtype(dtype) -> str:
    """The numpy-style name of a TensorRT DataType (HALF -> 'float16'; unlisted ones lower-cased: 'fp4')."""
    found = _BY_TRT.get(dtype.name)
    return found.name if found else dtype.name.lower()


@dataclass(frozen=True, eq=False)
class TensorSpec:
    """A named tensor of the contract: an ONNX graph's or an engine's input or output.

    dtype: a numpy-style name ('float16') in manifests and builds, a torch.dtype where the holder hands
        it to torch (export wrappers, runtime sessions); `dtype_name` / `torch_dtype` give either, and
        specs that differ only in the dtype's vocabulary are equal.
    shape: dims: ints, axis names (engine/profiles.py); '' or None for an unnamed unknown size.
    min / opt / max: the shapes an engine accepts, over all its profiles (None: not recorded, or an
        output whose axis names do not determine its size; ask the execution context then).
    """

    name: str
    dtype: Any
    shape: Shape
    min: tuple[int, ...] | None = None
    opt: tuple[int, ...] | None = None
    max: tuple[int, ...] | None = None

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def torch_dtype(self):
        return torch_dtype(self.dtype)

    def _key(self) -> tuple:
        return self.name, self.dtype_name, tuple(self.shape), self.min, self.opt, self.max

    def __eq__(self, other) -> bool:
        return isinstance(other, TensorSpec) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


_SPEC_FIELDS = {f.name for f in dataclasses.fields(TensorSpec)}


def spec_from_dict(d: dict) -> TensorSpec:
    """A TensorSpec from its manifest JSON ({'name', 'dtype', 'shape'} and, for engines, 'min'/'opt'/'max')."""
    def shape(key):
        return None if d.get(key) is None else tuple(d[key])
    return TensorSpec(d["name"], d["dtype"], tuple(d["shape"]), shape("min"), shape("opt"), shape("max"))


def json_fields(pairs: list[tuple[str, Any]]) -> dict:
    """`dataclasses.asdict` dict_factory for manifests: a TensorSpec's dtype as its name, its shape range
    left out when it has none (an ONNX graph's I/O); every other dataclass as is."""
    fields = dict(pairs)
    if set(fields) != _SPEC_FIELDS:
        return fields
    fields["dtype"] = dtype_name(fields["dtype"])
    return {key: value for key, value in fields.items() if value is not None or key not in ("min", "opt", "max")}


@dataclass(frozen=True)
class OnnxIO:
    """An ONNX graph's inputs (initializers excluded) and outputs, and its external data file names
    (beside the .onnx file, sorted)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    external_data: tuple[str, ...]


def onnx_io(model) -> OnnxIO:
    """The I/O of an ONNX model: a path (read without its weights) or a loaded onnx.ModelProto.

    Dims keep their axis names; a dim with neither size nor name is ''.
    """
    if isinstance(model, (str, Path)):
        import onnx

        model = onnx.load(str(model), load_external_data=False)
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    external = sorted({e.value for t in graph.initializer for e in t.external_data if e.key == "location"})

    def spec(value) -> TensorSpec:
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim)
        return TensorSpec(value.name, onnx_dtype(tensor.elem_type), dims)

    return OnnxIO(tuple(spec(v) for v in graph.input if v.name not in initializers),
                  tuple(spec(v) for v in graph.output), tuple(external))
