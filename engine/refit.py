"""Refit a built engine with a new checkpoint's weights, without rebuilding it.

The ONNX parser names each engine weight after the ONNX initializer (or Constant node output)
it came from, so a new checkpoint exported by the same exporter maps onto the engine by name:

1. engine weight specs: `engine_weight_specs(refitter)` on a GPU (Refitter.get_all_weights and
   the prototypes' dtype/count), or `network_weight_specs(old_onnx)` anywhere (the names the
   parser gives weights, with the old ONNX's dtype/shape; no GPU needed).
2. `plan_refit(specs, new_onnx, old_onnx)` pairs every engine weight with a new value and lists
   what is missing or has the wrong dtype/shape, and (given the old ONNX) every initializer whose
   value changed but that is no engine weight (one the parser folded: a refit would miss it);
   `.check()` raises a readable RefitError. `topology_difference(old, new)` refuses a new ONNX whose
   graph is not the old one (another architecture or other export settings).
3. `refit_engine(plan, new_onnx)` (GPU only) sets them with Refitter.set_named_weights, refits,
   and writes the refitted plan WITH its weights (SerializationFlag.EXCLUDE_WEIGHTS cleared: a
   weight-stripped engine would otherwise serialise weight-less again). The caller records the
   new checksums in the manifest; `refill_stripped(build_dir, component)` does both for a plan
   built with --strip-plan (REFIT_IDENTICAL, refilled from the ONNX it was built from), after
   which the runtime loads it. `refit_component(build_dir, component, new_onnx)` refits a built
   component from another export of the same model (a new base, a LoRA fused with `--lora`) and
   records the new ONNX and plan in the manifest (`python -m engine refit`).

Weights the parser rewrites (folded BatchNorm, RNN gates) are not named after an initializer and
show up as missing: rebuild those engines instead.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from engine.backend import Backend, detect_gpu, load_backend
from engine.build import parser_error, trt_dtype
from engine.manifest import atomic_write, load_manifest, onnx_dtype, record_onnx, update_manifest

SHOW = 8  # names listed per problem in an error message


class RefitError(RuntimeError):
    """A refit cannot proceed: missing or mismatched weights, no GPU, or a non-refittable plan."""


@dataclass(frozen=True)
class WeightSpec:
    """One engine weight: name, numpy dtype name, shape (None when only the count is known)."""

    name: str
    dtype: str
    shape: tuple[int, ...] | None
    count: int


@dataclass
class RefitPlan:
    """New values for every engine weight, and what could not be matched.

    weights: engine weight name -> contiguous array with the engine's dtype and element count.
    missing: engine weights the new ONNX lacks. mismatched: "name: engine ... vs onnx ..." lines.
    unused: ONNX weights the engine does not have (information only: shape constants and such).
    changed: ONNX weights whose values differ from the old ONNX (when plan_refit was given it).
    unmapped: changed ONNX weights that are no engine weight: a refit would leave them old.
    """

    weights: dict[str, np.ndarray] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every engine weight has a new value of the right dtype and shape, and every
        changed ONNX weight is an engine weight."""
        return not self.missing and not self.mismatched and not self.unmapped

    def summary(self) -> str:
        """One line: how many engine weights get values, how many changed, and the problems."""
        text = f"{len(self.weights)} engine weights matched by name, dtype and shape"
        if self.changed or self.unmapped:
            text += f"; {len(self.changed)} ONNX weights changed value, {len(self.unmapped)} of them unmapped"
        return text + f"; {len(self.missing)} missing, {len(self.mismatched)} mismatched"

    def check(self, source: str = "the new ONNX") -> "RefitPlan":
        """Return self if complete, else raise RefitError listing missing and mismatched weights."""
        if self.complete:
            return self
        lines = []
        if self.missing:
            lines.append(f"{len(self.missing)} engine weight(s) have no value in {source}: "
                         + ", ".join(self.missing[:SHOW]) + (" ..." if len(self.missing) > SHOW else ""))
        if self.mismatched:
            lines.append(f"{len(self.mismatched)} weight(s) changed dtype or shape:\n    "
                         + "\n    ".join(self.mismatched[:SHOW]))
        if self.unmapped:
            lines.append(f"{len(self.unmapped)} weight(s) of {source} changed value but are no engine weight "
                         "(the parser folded them): " + ", ".join(self.unmapped[:SHOW])
                         + (" ..." if len(self.unmapped) > SHOW else ""))
        raise RefitError("cannot refit: " + "\n  ".join(lines) + "\nThe checkpoint does not match the "
                         "engine's architecture or export settings: rebuild the engine instead.")


def _onnx_tensors(onnx_path: str | Path, load_values: bool):
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(onnx_path), load_external_data=load_values)
    tensors = list(model.graph.initializer)
    for node in model.graph.node:  # Constant nodes become engine weights named by their output
        for attribute in node.attribute:
            if node.op_type == "Constant" and attribute.name == "value":
                tensor = onnx.TensorProto()
                tensor.CopyFrom(attribute.t)
                tensor.name = node.output[0]
                tensors.append(tensor)
    for tensor in tensors:
        yield tensor, (numpy_helper.to_array(tensor) if load_values else None)


def onnx_weight_specs(onnx_path: str | Path) -> dict[str, WeightSpec]:
    """Name -> WeightSpec for every initializer and Constant of an ONNX (external data not read)."""
    specs = {}
    for tensor, _ in _onnx_tensors(onnx_path, load_values=False):
        shape = tuple(tensor.dims)
        specs[tensor.name] = WeightSpec(tensor.name, onnx_dtype(tensor.data_type), shape, int(np.prod(shape)))
    return specs


def onnx_weights(onnx_path: str | Path) -> dict[str, np.ndarray]:
    """Name -> value for every initializer and Constant of an ONNX, external data loaded."""
    return {tensor.name: value for tensor, value in _onnx_tensors(onnx_path, load_values=True)}


def _graph_signature(onnx_path: str | Path) -> list[tuple]:
    """Inputs, outputs and nodes (op, inputs, outputs, attributes other than weights) of an ONNX graph."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph

    def attributes(node):
        return tuple((a.name, onnx.helper.get_attribute_value(a)) for a in node.attribute
                     if a.type not in (onnx.AttributeProto.TENSOR, onnx.AttributeProto.TENSORS))

    return ([("input", value.name, str(value.type)) for value in graph.input]
            + [("output", value.name, str(value.type)) for value in graph.output]
            + [(node.op_type, tuple(node.input), tuple(node.output), attributes(node)) for node in graph.node])


def topology_difference(old_onnx: str | Path, new_onnx: str | Path) -> str | None:
    """None when both ONNX graphs have the same inputs, outputs and nodes (weights aside), else the
    first difference in words: a refit keeps the engine's graph and changes only its weights."""
    old, new = _graph_signature(old_onnx), _graph_signature(new_onnx)
    if old == new:
        return None
    if len(old) != len(new):
        return f"the graphs differ in size: {len(old)} inputs, outputs and nodes vs {len(new)}"
    index = next(i for i, (a, b) in enumerate(zip(old, new)) if a != b)
    return f"the graphs differ first at {old[index][:3]} vs {new[index][:3]}"


def network_weight_specs(onnx_path: str | Path, backend: Backend | str | None = None) -> dict[str, WeightSpec]:
    """The weights an engine built from `onnx_path` carries, by name, found without a GPU.

    Parses the ONNX into a network and keeps the ONNX tensors the network holds as named
    weights (INetworkDefinition.mark_weights_refittable succeeds only for those).
    """
    backend = backend if isinstance(backend, Backend) else load_backend(backend)
    if not backend.caps.refit_individual:
        raise RefitError(f"{backend.name} {backend.version} cannot list network weights without a GPU "
                         "(no INetworkDefinition.mark_weights_refittable); use engine_weight_specs on a GPU")
    trt = backend.trt
    logger = backend.logger()
    network = trt.Builder(logger).create_network(backend.network_flags())
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise parser_error(parser, Path(onnx_path), backend)
    return {name: spec for name, spec in onnx_weight_specs(onnx_path).items()
            if network.mark_weights_refittable(name)}


def engine_weight_specs(refitter, backend: Backend) -> dict[str, WeightSpec]:
    """Name -> WeightSpec (dtype and count; no shape) of a deserialized engine's refittable weights."""
    specs = {}
    for name in refitter.get_all_weights():
        prototype = refitter.get_weights_prototype(name)
        specs[name] = WeightSpec(name, trt_dtype(prototype.dtype), None, int(prototype.size))
    return specs


def plan_refit(engine_specs: dict[str, WeightSpec], new_onnx: str | Path | dict[str, np.ndarray],
               old_onnx: str | Path | dict[str, np.ndarray] | None = None) -> RefitPlan:
    """Pair every engine weight with its value in the new ONNX (a path, or name -> array).

    old_onnx (the ONNX the engine was built from): also list the weights whose values changed, and
    those of them that are no engine weight (`unmapped`: a refit could not apply them).
    Returns a RefitPlan; call `.check()` to raise on missing, mismatched or unmapped weights.
    """
    values = onnx_weights(new_onnx) if isinstance(new_onnx, (str, Path)) else new_onnx
    plan = RefitPlan(unused=sorted(set(values) - set(engine_specs)))
    if old_onnx is not None:
        old = onnx_weights(old_onnx) if isinstance(old_onnx, (str, Path)) else old_onnx
        plan.changed = sorted(name for name, value in values.items() if name not in old
                              or old[name].shape != value.shape or old[name].dtype != value.dtype
                              or not np.array_equal(old[name], value))
        plan.unmapped = [name for name in plan.changed if name not in engine_specs]
    for name, spec in sorted(engine_specs.items()):
        if name not in values:
            plan.missing.append(name)
            continue
        value = values[name]
        shape_ok = tuple(value.shape) == spec.shape if spec.shape is not None else value.size == spec.count
        if str(value.dtype) != spec.dtype or not shape_ok:
            wanted = list(spec.shape) if spec.shape is not None else f"{spec.count} values"
            plan.mismatched.append(f"{name}: engine {spec.dtype} {wanted} vs onnx {value.dtype} {list(value.shape)}")
            continue
        plan.weights[name] = np.ascontiguousarray(value)
    return plan


@dataclass(frozen=True)
class RefitResult:
    """What a refit changed: weights set, the new plan's size/sha256, seconds taken."""

    weights_set: int
    plan_bytes: int
    plan_sha256: str
    seconds: float


def refit_engine(plan_path: str | Path, new_onnx: str | Path, backend: Backend | str | None = None,
                 *, out_path: str | Path | None = None) -> RefitResult:
    """Refit a refittable plan with the weights of `new_onnx` and write it (GPU required).

    plan_path: a plan built with refittable=True (or strip_plan=True, refilled from its ONNX).
    out_path: where to write the refitted plan (default: over plan_path).
    Raises RefitError without a GPU, for a non-refittable plan, or when weights do not match.
    """
    backend = backend if isinstance(backend, Backend) else load_backend(backend)
    trt = backend.trt
    if detect_gpu() is None:
        raise RefitError("refitting needs an NVIDIA GPU: engines are deserialized on the device. "
                         "Without one, check the weight map with "
                         "plan_refit(network_weight_specs(old_onnx), new_onnx).check().")
    start = time.perf_counter()
    logger = backend.logger()
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
    if engine is None:
        raise RefitError(f"{plan_path} could not be loaded: {' '.join(logger.errors[-3:])}")
    if not engine.refittable:
        raise RefitError(f"{plan_path} was built without refittable=True; rebuild it refittable")
    refitter = trt.Refitter(engine, logger)
    plan = plan_refit(engine_weight_specs(refitter, backend), new_onnx).check(str(new_onnx))
    for name, value in plan.weights.items():
        if not refitter.set_named_weights(name, trt.Weights(value)):
            raise RefitError(f"the refitter rejected weight '{name}': {' '.join(logger.errors[-2:])}")
    missing = list(refitter.get_missing_weights())
    if missing:
        raise RefitError(f"the refitter still needs {missing[:SHOW]}; rebuild the engine")
    if not refitter.refit_cuda_engine():
        raise RefitError(f"refit failed: {' '.join(logger.errors[-3:])}")
    serialized = serialize_with_weights(engine, backend)
    atomic_write(Path(out_path or plan_path), memoryview(serialized))
    return RefitResult(len(plan.weights), serialized.nbytes, hashlib.sha256(memoryview(serialized)).hexdigest(),
                       round(time.perf_counter() - start, 3))


def serialize_with_weights(engine, backend: Backend):
    """Serialise an engine with its weights in, also one built with STRIP_PLAN (whose default
    serialisation config excludes them); refit information is kept as the default config has it."""
    if not backend.caps.serialization_config:
        return engine.serialize()
    config = engine.create_serialization_config()
    config.clear_flag(backend.trt.SerializationFlag.EXCLUDE_WEIGHTS)
    return engine.serialize_with_config(config)


def prove_refit(build_dir: str | Path, component: str, new_onnx: str | Path,
                backend: Backend | str | None = None) -> RefitPlan:
    """The refit plan of `component` in `build_dir` for `new_onnx`, checked without a GPU.

    The graphs must be the same (topology_difference), and plan_refit over the weights the parser
    gives the old ONNX (network_weight_specs) must be complete: every engine weight gets a value of
    its dtype and shape, and every weight whose value changed is an engine weight.
    Returns the plan (its `changed` names what a refit will rewrite); RefitError otherwise.
    """
    build_dir = Path(build_dir)
    components = load_manifest(build_dir).components
    entry = components.get(component)
    if entry is None or entry.onnx is None:
        raise RefitError(f"{build_dir} has no ONNX of '{component}' to refit (components: "
                         f"{', '.join(components) or 'none'})")
    old_onnx = build_dir / entry.onnx.path
    difference = topology_difference(old_onnx, new_onnx)
    if difference:
        raise RefitError(f"{new_onnx} is not the graph '{component}' was built from ({difference}): another "
                         "architecture or export settings cannot be refitted; build its engines instead")
    return plan_refit(network_weight_specs(old_onnx, backend), new_onnx, old_onnx).check(str(new_onnx))


def refill_stripped(build_dir: str | Path, component: str, backend: Backend | str | None = None) -> RefitResult:
    """Put the weights back into a plan built with --strip-plan, from the ONNX it was built from,
    and record the weighted plan in manifest.json (strip_plan cleared), so the runtime loads it.

    GPU required (see refit_engine). Raises RefitError when the component has no such plan.
    """
    build_dir = Path(build_dir)
    manifest = load_manifest(build_dir)
    entry = manifest.components.get(component)
    if entry is None or entry.engine is None or entry.onnx is None or not entry.engine.flags.strip_plan:
        raise RefitError(f"{build_dir} has no plan of '{component}' built with --strip-plan to refill")
    result = refit_engine(build_dir / entry.engine.path, build_dir / entry.onnx.path, backend)

    def change(current) -> None:
        record = current.components[component].engine
        current.components[component].engine = replace(
            record, flags=replace(record.flags, strip_plan=False), plan_bytes=result.plan_bytes,
            plan_sha256=result.plan_sha256)

    update_manifest(build_dir, manifest.model, change)
    return result


def _external_data(onnx_path: Path) -> list[str]:
    """The external data file names an ONNX refers to (relative to its folder), in first-use order."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    names = [entry.value for tensor in model.graph.initializer
             if tensor.data_location == onnx.TensorProto.EXTERNAL
             for entry in tensor.external_data if entry.key == "location"]
    return list(dict.fromkeys(names))


def _copy_onnx(source: Path, target: Path) -> None:
    """Copy an ONNX and its external data beside `target` (data first, the graph last, each atomically)."""
    for name in _external_data(source):
        temporary = target.parent / f".{name}.refit"
        shutil.copyfile(source.parent / name, temporary)
        os.replace(temporary, target.parent / name)
    temporary = target.with_name(f".{target.name}.refit")
    shutil.copyfile(source, temporary)
    os.replace(temporary, target)


def refit_component(build_dir: str | Path, component: str, new_onnx: str | Path,
                    backend: Backend | str | None = None, export_flags: dict | None = None) -> RefitResult:
    """Refit the built plan of `component` with the weights of `new_onnx` (another export of the same model:
    a new base, or the base with a LoRA fused by `--lora`), then put that ONNX in the build in place of the
    old one and record both in manifest.json, so the runtime and the rebuild check see one model.

    export_flags: how `new_onnx` was exported (its build's manifest record; default: the old flags).
    GPU required (see refit_engine). RefitError when the plan is not refittable, the graphs differ
    (another architecture or export settings), or a weight does not map.
    """
    build_dir, new_onnx = Path(build_dir), Path(new_onnx)
    manifest = load_manifest(build_dir)
    entry = manifest.components.get(component)
    if entry is None or entry.engine is None or entry.onnx is None:
        raise RefitError(f"{build_dir} has no built engine of '{component}' (components with engines: "
                         f"{', '.join(n for n, c in manifest.components.items() if c.engine) or 'none'})")
    if not (entry.engine.flags.refittable or entry.engine.flags.strip_plan):
        raise RefitError(f"the '{component}' plan was built without --refittable: rebuild it with "
                         f"python -m engine {build_dir} --components {component} --refittable --force")
    old_onnx = build_dir / entry.onnx.path
    prove_refit(build_dir, component, new_onnx, backend)
    result = refit_engine(build_dir / entry.engine.path, new_onnx, backend)
    _copy_onnx(new_onnx, old_onnx)
    flags = entry.onnx.export_flags if export_flags is None else export_flags
    onnx_record = record_onnx(build_dir, manifest.model, component, old_onnx, export_flags=flags)

    def change(current) -> None:
        record = current.components[component].engine
        current.components[component].engine = replace(
            record, onnx_sha256=onnx_record.sha256, plan_bytes=result.plan_bytes, plan_sha256=result.plan_sha256)

    update_manifest(build_dir, manifest.model, change)
    return result
