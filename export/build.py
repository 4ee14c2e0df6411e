"""`python -m export.build`: export every component of a pipeline to ONNX, write assets and the
manifest, then (optionally) build the engines.

A component whose ONNX is already in the build folder and whose inputs are unchanged (the same
checkpoint files by sha256, precision, attention form, LoRAs, exporter code and library versions:
export.inputs) is kept, not exported again; `--force` re-exports it. Before any work, every
checkpoint the selected components read is looked for, and one error lists what is missing.

    python -m export.build --model tiny|sdxl|tiny-sd15|sd15 [...]   (--help lists every flag, with examples)

Writes build/<model>/onnx/<component>.onnx, build/<model>/assets/ (export.assets) and
build/<model>/manifest.json (engine.manifest). `--model tiny` (and `tiny-sd15`) without `--weights` first writes
the tiny checkpoints to <out>/weights and loads them through the normal loaders. Precision
defaults to fp32 for the tiny models and fp16 otherwise; `--pipeline all` is every pipeline the
model's family has (SD1.5: the IP-Adapters). I/O names: export/components.py. Every size (widths,
depths, token counts, the model facts) is read from the checkpoint files (export.checkpoint_dims);
the spec gives the hub ids, defaults and the `--random-init` architecture.

`--base`, `--instantid` and `--ip-adapter` replace the spec's sources (export.weights.with_sources):
a hub id, a local folder laid out as that hub repository, or (`--base`) one `.safetensors` in the
original SGM/A1111 layout read with the shipped configs (export.single_file) or (`--ip-adapter`) one
adapter file; the rest still comes from `--weights` or the hub. Each value's files and sha256 go into
the manifest's export flags.

`--controlnet NAME=PATH` (repeatable, SDXL family) adds an extra ControlNet beside the IdentityNet
(canny, depth, pose, ...) as the component `controlnet_<NAME>` (export/controlnets.py), with its source and
sha256 in the manifest; the InstantID and IP-Adapter pipelines sum its residuals with theirs.

`--stage torch` writes build/<model>/torch/<component>.pt2 instead of ONNX: `torch.export`
programs for the runtime's torch backend (GPUs without TensorRT; export/torch_programs.py). The
face models stay ONNX (ONNX Runtime or TensorRT run them under every backend).
"""
from __future__ import annotations

import logging
import resource
import sys
import time
from pathlib import Path

from export import inputs as export_inputs
from export.cli import UserError, run
from export.options import (COMPONENTS, FACE_MODELS, PIPELINES, TINY_MODELS, Options,  # noqa: F401 (re-exported)
                            components_for, parse_args, precision_of)
from export.pipelines import PIPELINE_PARTS, pipeline_components
from export.report import Row, component_line, quiet_libraries, say, summary_table
from export.specs import get_spec

# torch, diffusers and the ONNX tooling load in export_onnx: a mistake on the command line is answered
# before them (seconds, not a minute on a busy machine)

def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def export_onnx(options: Options) -> list[Row]:
    """Export the selected components (ONNX, or torch.export programs with --stage torch), assets and
    manifest entries, keeping those whose inputs are unchanged; returns the summary rows."""
    from engine.manifest import load_manifest, record_onnx, update_manifest

    spec = options.model_spec()
    out = Path(options.out)
    manifest = load_manifest(out) if (out / "manifest.json").is_file() else None
    if manifest is not None and manifest.model != spec.name:
        raise UserError(f"{out} holds an export of --model {manifest.model}, not {spec.name}: pass another --out")
    names = options.names()
    extra_controlnets = [c for c in options.controlnets if c.component in names]  # export.controlnets does them
    names = [name for name in names if name not in {c.component for c in extra_controlnets}]
    programs_only = options.stage == "torch"
    if programs_only:
        names = [name for name in names if name not in FACE_MODELS]
    weights = options.weights
    if options.model in TINY_MODELS and weights is None and not options.random_init:
        from export.tiny import write_tiny

        quiet_libraries(options.verbose)  # saving the tiny checkpoints goes through diffusers / transformers
        say(f"{options.model} checkpoints (seeded random weights, the real formats): {out / 'weights'}")
        weights = write_tiny(out / "weights", spec=get_spec(options.model))
    if not options.random_init:  # every missing checkpoint in one message, before any loading
        export_inputs.check_available(spec, names, weights, options.face_models, options.vae_fp16_fix)
    import torch

    from export import components as comps
    from export.assets import model_facts, write_model_facts, write_scheduler_config, write_tokenizers
    from export.checkpoint_dims import PARTS, checkpoint_spec, count_cross_attn_layers
    from export.onnx_export import OPSET, export_component, trace_sizes
    from export.sources import Sources
    from export.torch_programs import program_entry

    quiet_libraries(options.verbose)
    if options.model == "tiny":
        torch.set_num_threads(1)  # tiny graphs are overhead-bound; OpenMP spinning on a shared CPU is 50x slower
    # sizes from the files, not the spec: a local folder is read whole (cheap: configs and tensor
    # shapes), the hub only for the selected pipelines' checkpoints
    parts = PARTS if weights is not None else tuple(
        dict.fromkeys(part for pipeline in options.pipelines for part in PIPELINE_PARTS[pipeline]))
    spec = checkpoint_spec(spec, weights, options.random_init, parts)
    dtype = torch.float16 if options.precision == "fp16" else torch.float32
    sources = Sources(spec, weights, options.random_init, dtype, out / "assets", options.attention,
                      options.face_models, options.vae_fp16_fix, loras=options.loras)
    sizes = trace_sizes(spec.trace_resolution)
    flags = {"precision": options.precision, "attention": options.attention, "opset": OPSET,
             "trace_resolution": spec.trace_resolution, "torch": torch.__version__.split("+")[0],
             "weights": "random-init" if options.random_init else ("tiny" if options.weights is None and
                                                                   spec.name == "tiny" else "checkpoints")}
    if options.loras:  # a rebuild knows which LoRAs were fused (file, sha256, scale)
        flags["loras"] = [lora.record() for lora in options.loras]
    flags.update(options.source_records())  # and which base / adapter files were used
    digests = export_inputs.DigestCache(out / ".export_digests.json")
    exporter = export_inputs.exporter_version()
    rows, programs = [], {}
    total = len(names) + len(extra_controlnets)
    say(f"{'torch.export' if programs_only else 'ONNX'} export of {spec.name} ({options.precision}) to {out}: "
        f"{total} components")
    for index, name in enumerate(names, 1):
        made_from = export_inputs.component_inputs(
            spec, name, weights_dir=weights, face_dir=options.face_models, random_init=options.random_init,
            flags=export_inputs.component_flags(name, precision_of(name, options), options, flags, programs_only),
            digests=digests, exporter=exporter)
        reason = "forced" if options.force else export_inputs.why_export(manifest, name, made_from, out, digests,
                                                                         programs_only)
        if reason is None:
            rows.append(_kept_row(manifest, name, programs_only))
            say(component_line(index, total, rows[-1]))
            continue
        path = out / "onnx" / f"{name}.onnx"
        start = time.perf_counter()
        made = sources.make(name)
        loaded = time.perf_counter() - start
        status = f"exported ({reason})"
        if programs_only:
            programs[name] = program_entry(made, out, name, flags["torch"], precision_of(name, options), made_from,
                                           digests.sha256)
            del made
            rows.append(Row(name, programs[name]["params"], programs[name]["size_bytes"], loaded,
                            programs[name]["export_seconds"], _peak_rss_gb(), status))
            say(component_line(index, total, rows[-1]))
            continue
        if isinstance(made, comps.Component):
            seconds = export_component(made, path, sizes)
        else:  # a face model: cleaned from its ONNX file
            seconds = made(path)
        del made
        record = record_onnx(out, spec.name, name, path, export_seconds=round(seconds, 2),
                             export_flags={**flags, "precision": precision_of(name, options),
                                           "made_from": made_from})
        export_inputs.remember_onnx_digest(out, spec.name, name, record, digests)
        rows.append(Row(name, record.params, record.size_bytes, loaded, seconds, _peak_rss_gb(), status))
        say(component_line(index, total, rows[-1]))
    digests.save()
    sources.release()
    if extra_controlnets and programs_only:
        from export.controlnets import controlnet_programs

        made = controlnet_programs(out, spec.name, extra_controlnets, spec.unet, dtype, flags["torch"], options.precision)
        for offset, (name, entry) in enumerate(made.items()):
            programs[name] = entry
            rows.append(Row(name, entry["params"], entry["size_bytes"], 0.0, entry["export_seconds"], _peak_rss_gb()))
            say(component_line(len(names) + offset + 1, total, rows[-1]))
    if extra_controlnets and not programs_only:
        from export.controlnets import export_controlnets

        for offset, (name, params, loaded, seconds) in enumerate(export_controlnets(
                out, spec.name, extra_controlnets, spec.unet, dtype, sizes, {**flags, "precision": options.precision})):
            rows.append(Row(name, params, (out / "onnx" / f"{name}.onnx").stat().st_size, loaded, seconds,
                            _peak_rss_gb()))
            say(component_line(len(names) + offset + 1, total, rows[-1]))
    write_scheduler_config(out / "assets", sources.scheduler_config())
    write_tokenizers(out / "assets", sources.tokenizers())
    facts = model_facts(spec, count_cross_attn_layers(spec.unet), options.precision, options.attention,
                        spec.default_face_detector, options.vae_fp16_fix)
    write_model_facts(out / "assets", facts)

    def change(manifest) -> None:
        pipelines = {**manifest.metadata.get("pipelines", {}),
                     **{p.replace("-", "_"): pipeline_components(spec, p) for p in options.pipelines}}
        manifest.metadata.update(facts)
        manifest.metadata["pipelines"] = dict(sorted(pipelines.items()))
        manifest.metadata["assets"] = "assets"
        if programs:
            manifest.metadata["torch_programs"] = {**manifest.metadata.get("torch_programs", {}), **programs}

    update_manifest(out, spec.name, change)
    return rows


def _kept_row(manifest, name: str, programs_only: bool) -> Row:
    if programs_only:
        entry = manifest.metadata["torch_programs"][name]
        return Row(name, entry.get("params", 0), entry["size_bytes"], 0.0, 0.0, _peak_rss_gb(), "unchanged, kept")
    record = manifest.components[name].onnx
    return Row(name, record.params, record.size_bytes, 0.0, 0.0, _peak_rss_gb(), "unchanged, kept")


def build_engines(options: Options) -> None:
    """Run the engine package's build_all on the exported directory."""
    try:
        from engine.build_all import build_all
    except ImportError as error:
        raise UserError(f"--stage engines needs the engine package ({error}); export with --stage onnx") from None
    from engine.profiles import Geometry, Range

    if not (Path(options.out) / "manifest.json").is_file():
        raise UserError(f"{options.out} holds no export (no manifest.json): export first with python -m export.build "
                        f"--model {options.model} --out {options.out} (--stage all exports, then builds the engines)")
    spec = get_spec(options.model)
    size = spec.default_resolution
    sizes = Range(max(64, size // 2 // 64 * 64), size, size * 3 // 2 // 64 * 64)
    names = options.names()
    if options.components is None:  # and the ControlNets an earlier --controlnet export left in the build
        from engine.manifest import load_manifest

        names += [c for c in load_manifest(options.out).metadata.get("controlnets", {}).values() if c not in names]
    build_all(options.out, names, options.backend,
              geometry=Geometry(height=sizes, width=sizes))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (2 and one `error:` line for a user mistake: export.cli)."""
    return run(_main, argv)


def _main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("export", "engine"):  # our progress notes; the graph libraries' INFO chatter stays off
        logging.getLogger(name).setLevel(logging.INFO)
    options = parse_args(argv)
    logging.getLogger("engine.trt").setLevel(logging.INFO if options.verbose else logging.ERROR)  # builder chatter
    if options.stage in ("onnx", "all"):
        rows = export_onnx(options)
        print(summary_table(rows))
        print(f"wrote {options.out}/onnx, {options.out}/assets, {options.out}/manifest.json")
    if options.stage == "torch":
        print(summary_table(export_onnx(options)))
        print(f"wrote {options.out}/torch, {options.out}/assets, {options.out}/manifest.json")
    if options.stage in ("engines", "all"):
        build_engines(options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
