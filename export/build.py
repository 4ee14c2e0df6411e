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
from dataclasses import dataclass
from pathlib import Path

import torch

from export import components as comps
from export import inputs as export_inputs
from export.cli import ArgumentParser, UserError, run
from export.report import Row, component_line, quiet_libraries, say, summary_table
from export.assets import model_facts, write_model_facts, write_scheduler_config, write_tokenizers
from export.onnx_export import OPSET, export_component, trace_sizes
from export.checkpoint_dims import PARTS, checkpoint_spec, count_cross_attn_layers
from export.sources import PIPELINE_COMPONENTS, PIPELINE_PARTS, Sources, pipeline_components
from export.specs import SPECS, get_spec
from export.tiny import write_tiny
from export.torch_programs import program_entry

PIPELINES = tuple(PIPELINE_COMPONENTS)
EPILOG = """examples:
  python -m export.build --model tiny                      # the tiny test model: export + engines, ~4 min on a CPU
  python -m export.build --model tiny --stage onnx --precision fp16 --out build/tiny-fp16
  python -m export.build --model sdxl --pipeline instantid --weights ~/models --face-models ~/models/antelopev2
  python -m export.build --model sdxl --base ~/ckpt/juggernaut.safetensors --lora style.safetensors:0.8
  python -m export.build --model sdxl --random-init --stage onnx   # real architecture, random weights
  python -m export.build --model tiny --stage engines --backend tensorrt-rtx   # engines of an existing export

A second run with the same arguments keeps every component whose inputs did not change (--force: export all)."""
TINY_MODELS = ("tiny", "tiny-sd15")  # without --weights, export.tiny writes their checkpoints first


@dataclass
class Options:
    """Everything the CLI decides (see `parse_args`)."""

    model: str
    pipelines: tuple[str, ...]
    out: Path
    weights: Path | None = None
    random_init: bool = False
    face_models: Path | None = None
    stage: str = "all"
    backend: str | None = None
    precision: str = "fp32"
    attention: str = "stacked"
    vae_fp16_fix: bool = False
    components: tuple[str, ...] | None = None
    loras: tuple = ()  # export.lora.LoraSpec, fused into the UNet and text encoders
    base: str | None = None        # --base: hub id, diffusers folder or single .safetensors
    instantid: str | None = None   # --instantid: hub id or folder (ControlNetModel/, ip-adapter.bin)
    ip_adapter: str | None = None  # --ip-adapter: hub id, folder (h94/IP-Adapter layout) or adapter file
    controlnets: tuple = ()        # --controlnet NAME=PATH: export.controlnets.ControlNetSource
    force: bool = False            # re-export components whose inputs are unchanged

    def model_spec(self):
        """The model's spec with the sources --base / --instantid / --ip-adapter name."""
        from export.weights import with_sources

        return with_sources(get_spec(self.model), self.base, self.instantid, self.ip_adapter)

    def source_records(self) -> dict:
        """{'base' | 'instantid' | 'ip_adapter': what was given (file + sha256, folder files, or hub id)}."""
        from export.weights import source_record

        given = {"base": self.base, "instantid": self.instantid, "ip_adapter": self.ip_adapter}
        return {key: source_record(value, "--" + key.replace("_", "-")) for key, value in given.items() if value}

    def names(self) -> list[str]:
        """The components to export/build: the pipelines' (or the `components` subset), in build order."""
        names = components_for(get_spec(self.model), self.pipelines) + [c.component for c in self.controlnets]
        if self.components is None:
            return names
        unknown = sorted(set(self.components) - set(names))
        if unknown:
            raise UserError(f"--components {' '.join(unknown)}: not part of pipelines {list(self.pipelines)} of "
                            f"--model {self.model}; choose from {' '.join(names)}")
        return [name for name in names if name in self.components]


def components_for(spec, pipelines) -> list[str]:
    """Component names of `spec`'s pipelines (less the text encoders its family lacks), deduplicated, in
    a fixed (manifest) order."""
    wanted = {name for pipeline in pipelines for name in pipeline_components(spec, pipeline)}
    return [name for name in COMPONENTS if name in wanted]


COMPONENTS = ("text_encoder", "text_encoder_2", "image_encoder", "face_detector", "arcface", "face_proj",
              "image_proj", "image_proj_plus", "controlnet", "unet_instantid", "unet_ip_adapter",
              "unet_ip_adapter_plus", "vae_decoder")  # every component, in build (and manifest) order
FACE_MODELS = ("face_detector", "arcface")


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
        weights = write_tiny(out / "weights", spec=get_spec(options.model))
    if not options.random_init:  # every missing checkpoint in one message, before any loading
        export_inputs.check_available(spec, names, weights, options.face_models, options.vae_fp16_fix)
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
            flags=export_inputs.component_flags(name, _precision_of(name, options), options, flags, programs_only),
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
            programs[name] = program_entry(made, out, name, flags["torch"], _precision_of(name, options), made_from,
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
                             export_flags={**flags, "precision": _precision_of(name, options),
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


def _precision_of(name: str, options: Options) -> str:
    if name in ("face_detector", "arcface"):
        return "fp32"
    if name == "vae_decoder" and not options.vae_fp16_fix:
        return "fp32"
    return options.precision


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


def parse_args(argv: list[str] | None = None) -> Options:
    """Command line -> Options (defaults: all pipelines, out build/<model>, stage all)."""
    parser = ArgumentParser(prog="python -m export.build", description=__doc__.split("\n\n")[0] + "\n\n"
                            + __doc__.split("\n\n")[1], epilog=EPILOG)
    parser.add_argument("--model", required=True, choices=sorted(SPECS),
                        help="tiny / tiny-sd15: seeded test models written on the fly (no download); sdxl / sd15: "
                             "the real checkpoints (--weights, the hub cache, or --random-init)")
    parser.add_argument("--pipeline", default="all", choices=[*PIPELINES, "all"],
                        help="which pipeline's components to export; all: every pipeline the model's family has")
    parser.add_argument("--weights", type=Path, metavar="DIR",
                        help="folder laid out as the hub repositories (default: the hub cache; for tiny: write the "
                             "tiny model to <out>/weights)")
    parser.add_argument("--base", metavar="HUB_ID|FOLDER|FILE",
                        help="the SDXL base: a hub id, a diffusers folder, or one .safetensors in the original "
                             "(SGM / A1111 / ComfyUI) layout, read offline with the shipped configs")
    parser.add_argument("--instantid", metavar="HUB_ID|FOLDER",
                        help="InstantID: a hub id or folder holding ControlNetModel/ and ip-adapter.bin")
    parser.add_argument("--ip-adapter", metavar="HUB_ID|FOLDER|FILE",
                        help="IP-Adapter: a hub id or folder laid out as h94/IP-Adapter, or one adapter file "
                             "(plain or Plus, told by its tensors)")
    parser.add_argument("--random-init", action="store_true", help="real architecture, random weights")
    parser.add_argument("--face-models", type=Path, metavar="DIR",
                        help="antelopev2 folder (scrfd_10g_bnkps.onnx, glintr100.onnx)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="build directory (default build/<model>)")
    parser.add_argument("--components", nargs="+", metavar="NAME",
                        help=f"only these components of the pipelines (default: all of them); one of "
                             f"{', '.join(COMPONENTS)}, or controlnet_NAME of a --controlnet")
    parser.add_argument("--stage", default="all", choices=["onnx", "torch", "engines", "all"],
                        help="onnx: ONNX + assets; torch: torch.export programs (torch backend) + assets; "
                             "engines: TensorRT plans from the ONNX; all: onnx then engines")
    parser.add_argument("--backend", choices=["tensorrt", "tensorrt-rtx"],
                        help="engine backend (default: detect; a CPU-only machine builds with tensorrt-rtx)")
    parser.add_argument("--precision", choices=["fp16", "fp32"],
                        help="weights and activations (default: fp32 for the tiny models, fp16 otherwise; the face "
                             "models and the VAE without --vae-fp16-fix stay fp32)")
    parser.add_argument("--attention", default="stacked", choices=["stacked", "unfused", "fused"],
                        help="decoupled attention in the UNet (export.attention): 'stacked' (default: one "
                             "masked MHA with doubled heads, fused by TensorRT into one kernel), 'unfused' "
                             "(two SDPAs: two fused kernels), 'fused' (concatenated keys, a softmax per "
                             "segment: TensorRT fuses none of it)")
    parser.add_argument("--vae-fp16-fix", action="store_true", help="use the fp16-safe VAE (decoder in fp16)")
    parser.add_argument("--controlnet", action="append", default=[], metavar="NAME=HUB_ID|FOLDER",
                        help="an extra SDXL ControlNet (canny, depth, pose, ...) beside the IdentityNet, exported as "
                             "controlnet_NAME; repeatable (export/controlnets.py)")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                        help="fuse a LoRA (kohya or diffusers/PEFT .safetensors) into the UNet and text encoders "
                             "before export; repeatable, scale default 1.0")
    parser.add_argument("--force", action="store_true",
                        help="export every selected component again, even those whose inputs are unchanged")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="the traceback of an error, and the engine builder's warnings")
    args = parser.parse_args(argv)
    if args.face_models is not None and not args.face_models.is_dir():
        parser.error(f"--face-models {args.face_models} is not a folder: pass the folder holding insightface's "
                     "antelopev2 files (scrfd_10g_bnkps.onnx, glintr100.onnx)")
    if args.weights is not None and not args.weights.is_dir():
        parser.error(f"--weights {args.weights} is not a folder; omit it to use the hub cache")
    if args.weights is not None and args.random_init:
        parser.error("--weights and --random-init exclude each other")
    from export.lora import LoraSpec

    loras = tuple(LoraSpec.parse(text) for text in args.lora)
    for lora in loras:
        if not lora.path.is_file():
            parser.error(f"--lora {lora.path} is not a file")
    from export.controlnets import ControlNetSourceError, ControlNetSource, check_sources

    try:
        controlnets = tuple(ControlNetSource.parse(text) for text in args.controlnet)
        check_sources(controlnets, args.model, get_spec(args.model))
        for source in controlnets:
            source.folder()
    except ControlNetSourceError as error:
        parser.error(str(error))
    options = Options(
        model=args.model, pipelines=_pipelines(parser, args.model, args.pipeline),
        out=args.out or Path("build") / args.model, weights=args.weights, random_init=args.random_init,
        face_models=args.face_models, stage=args.stage, backend=args.backend,
        precision=args.precision or ("fp32" if args.model.startswith("tiny") else "fp16"), attention=args.attention,
        vae_fp16_fix=args.vae_fp16_fix, components=tuple(args.components) if args.components else None,
        loras=loras, base=args.base, instantid=args.instantid, ip_adapter=args.ip_adapter, controlnets=controlnets,
        force=args.force)
    options.names()  # unknown --components: fail before any work
    _check_sources(parser, options, args.random_init)
    return options


def _pipelines(parser, model: str, pipeline: str) -> tuple[str, ...]:
    """--pipeline as the pipelines to build: 'all' is every pipeline the model's family has."""
    family = get_spec(model).pipelines
    if pipeline == "all":
        return tuple(family)
    if pipeline not in family:
        parser.error(f"--model {model} has no {pipeline} pipeline: choose --pipeline {' | '.join(family)} or all"
                     + (" (InstantID's adapter and IdentityNet are SDXL models)" if pipeline == "instantid" else ""))
    return (pipeline,)


def _check_sources(parser, options: Options, random_init: bool) -> None:
    """Fail before any work on a --base / --instantid / --ip-adapter that cannot be used."""
    from export.single_file import SingleFileError
    from export.weights import SourceError, WeightsNotFound

    given = [flag for flag, value in (("--base", options.base), ("--instantid", options.instantid),
                                      ("--ip-adapter", options.ip_adapter)) if value]
    if given and random_init:
        parser.error(f"{' and '.join(given)} and --random-init exclude each other")
    try:
        spec = options.model_spec()
    except (SourceError, SingleFileError, WeightsNotFound) as error:
        parser.error(str(error))
    if options.ip_adapter and Path(options.ip_adapter).is_file():  # one adapter file: plain or Plus
        plus = spec.ip_adapter_plus_source != get_spec(options.model).ip_adapter_plus_source
        pipeline = "ip-adapter-plus" if plus else "ip-adapter"
        if pipeline not in options.pipelines:
            parser.error(f"--ip-adapter {options.ip_adapter} is {'an IP-Adapter Plus' if plus else 'a plain IP-Adapter'}"
                         f" checkpoint, used by --pipeline {pipeline} (or all), not by {list(options.pipelines)}")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (2 and one `error:` line for a user mistake: export.cli)."""
    return run(_main, argv)


def _main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("export", "engine"):  # our progress notes; the graph libraries' INFO chatter stays off
        logging.getLogger(name).setLevel(logging.INFO)
    options = parse_args(argv)
    quiet_libraries(verbose="-v" in argv or "--verbose" in argv)
    if options.model == "tiny":
        torch.set_num_threads(1)  # tiny graphs are overhead-bound; OpenMP spinning on a shared CPU is 50x slower
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
