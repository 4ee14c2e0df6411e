"""`python -m export.build`'s command line: the flags, their checks (before anything heavy loads) and
the Options they make (export.build runs them)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from export.cli import ArgumentParser, UserError
from export.pipelines import PIPELINE_COMPONENTS, pipeline_components
from export.specs import SPECS, get_spec

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
    verbose: bool = False          # -v: tracebacks, the builder's warnings

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



def precision_of(name: str, options: Options) -> str:
    """The precision component `name` is exported in: the face models always fp32, the VAE decoder fp32
    unless --vae-fp16-fix, the rest as --precision."""
    if name in ("face_detector", "arcface"):
        return "fp32"
    if name == "vae_decoder" and not options.vae_fp16_fix:
        return "fp32"
    return options.precision


def parse_args(argv: list[str] | None = None) -> Options:
    """Command line -> Options (defaults: all pipelines, out build/<model>, stage all)."""
    parser = ArgumentParser(prog="python -m export.build", description=_description(), epilog=EPILOG)
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
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file: pass the folder to write the build into (default build/<model>)")
    if args.weights is not None and args.random_init:
        parser.error("--weights and --random-init exclude each other")
    loras = ()
    if args.lora:
        from export.lora import LoraSpec

        loras = tuple(LoraSpec.parse(text) for text in args.lora)
    for lora in loras:
        if not lora.path.is_file():
            parser.error(f"--lora {lora.path} is not a file")
    controlnets = ()
    if args.controlnet:  # export.controlnets loads torch: only when asked for
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
        force=args.force, verbose=args.verbose)
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
    from export.weights import SourceError, WeightsNotFound

    given = [flag for flag, value in (("--base", options.base), ("--instantid", options.instantid),
                                      ("--ip-adapter", options.ip_adapter)) if value]
    if not given:
        return
    if random_init:
        parser.error(f"{' and '.join(given)} and --random-init exclude each other")
    from export.single_file import SingleFileError  # loads torch
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



def _description() -> str:
    """The first two paragraphs of export.build's docstring (what it does, what a second run keeps)."""
    from export import build

    return "\n\n".join(build.__doc__.split("\n\n")[:2])
