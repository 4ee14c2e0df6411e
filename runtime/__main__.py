r"""Command line: generate images from a build directory, or serve them over HTTP.

examples:
  python -m runtime generate --build build/tiny --face build/tiny/astronaut.png --prompt "a portrait" \
      --steps 4 --out out.png
  python -m runtime serve --build build/tiny --port 8000          # HTTP service (docs/serving.md)
  python -m runtime generate --pipeline ip-adapter-plus --build build/tiny --image ref.jpg \
      --prompt "a cat" --steps 20 --num-images 2 --out cat.png      # writes cat-0.png, cat-1.png

Errors a user can fix (a bad flag, no face, a size the engines or the memory cannot run, a missing
build or backend, NaN output) print one line `error: ...` saying what to do and exit with status 2
(-v shows the traceback). The request is checked against the build before any model loads.
"""
from __future__ import annotations

import argparse
import sys
import time
import typing
from pathlib import Path

from engine.manifest import load_manifest
from runtime.console import Parser, StepProgress, backend_choice, check_backend, run_command
from runtime.ip_scales import BlockScaleError, BlockScales
from runtime.requests import RequestError, request_fields
from runtime.sessions import program_timings, torch_sessions

GENERATE_EXAMPLES = """examples:
  python -m runtime generate --build build/tiny --face build/tiny/astronaut.png --prompt "a portrait" \\
      --steps 4 --out out.png                  # InstantID (the tiny build: python -m export.tiny / make demo)
  python -m runtime generate --build build/tiny --pipeline ip-adapter --image cat.jpg --prompt "a cat" \\
      --width 256 --height 256 --num-images 2 --out cat.png      # writes cat-0.png, cat-1.png
"""


def parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m runtime`."""
    from runtime.pipelines import PIPELINES

    root = Parser(prog="python -m runtime", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                  verbose=False)
    commands = root.add_subparsers(dest="command", required=True, metavar="{generate,serve}")
    gen = commands.add_parser("generate", help="generate images", description="Generate images from a build: "
                              "one request, written as PNG (the request flags are runtime/requests.py's fields).",
                              epilog=GENERATE_EXAMPLES)
    gen.add_argument("--build", type=Path, required=True, help="build directory (python -m export.build --out)")
    gen.add_argument("--pipeline", choices=tuple(PIPELINES),
                     help="default: the first of these the build has (an SD1.5 build has no instantid)")
    gen.add_argument("--out", type=Path, required=True, help="output PNG; with several images, NAME-i.png")
    gen.add_argument("--sheet", type=Path, default=None,
                     help="instantid: also write a contact sheet PNG here: the photo with the detected box and "
                     "landmarks, the keypoint control image, the ArcFace crop and the (first) output")
    gen.add_argument("--backend", default="onnxruntime", type=backend_choice,
                     help="onnxruntime (CPU or GPU) | tensorrt | tensorrt-rtx (NVIDIA GPU, the build's engines) | "
                     "torch (the build's torch.export programs)")
    gen.add_argument("--loop", choices=("auto", "graph", "step-graphs", "eager"), default="auto",
                     help="denoising loop on a GPU: one CUDA graph, a graph per step, or eager (auto: the fastest "
                     "the backend allows)")
    gen.add_argument("--trust-torch-programs", action="store_true",
                     help="--backend torch: load the build's torch.export programs. They unpickle, so a crafted "
                     "program runs code: use only with a build you made or trust")
    add_request_arguments(gen.add_argument_group("request (runtime/requests.py)"), PIPELINES.values())
    from runtime.serve.__main__ import add_subcommand

    add_subcommand(commands)  # `serve`: HTTP service over a build (runtime/serve, docs/serving.md)
    return root


def add_request_arguments(group, entries) -> None:
    """One flag per field of the pipelines' request types (`--field-name` and the field's own
    `Param.flags`), with its type, choices and help from runtime/requests.py. Every default is None:
    the chosen pipeline's own default applies, and the help says it per pipeline."""
    entries = list(entries)
    owners: dict[str, list] = {}
    for entry in entries:
        for spec in request_fields(entry.request_type):
            owners.setdefault(spec.name, []).append((entry.name, spec))
    for name, specs in owners.items():
        spec = specs[0][1]
        options = dict(dest=name, default=None, help=_flag_help(specs, len(entries)), metavar=name.upper())
        if spec.param.choices is not None:
            options.update(choices=spec.param.choices(), metavar=None)
        options["type"] = _cli_type(spec)
        if spec.param.controls:  # repeatable: --control NAME=PATH[:SCALE[:PREPROCESS]]
            options.update(action="append", metavar="NAME=PATH[:SCALE[:none|canny[/LOW/HIGH]]]")
        if spec.required:
            options["required"] = True
        group.add_argument(f"--{name.replace('_', '-')}", *spec.param.flags, **options)


def _flag_help(specs: list, every: int) -> str:
    """The field's help (per pipeline where the pipelines differ), its default(s) and, when not every
    pipeline has it, which do."""
    def per_pipeline(text_of) -> str:
        texts: dict[str, list[str]] = {}
        for name, spec in specs:
            texts.setdefault(text_of(spec), []).append(name)
        if len(texts) == 1:
            return next(iter(texts))
        return "; ".join(f"{', '.join(names)}: {text}" for text, names in texts.items())

    text = per_pipeline(lambda spec: spec.param.help)
    if not specs[0][1].required:
        text += f" (default: {per_pipeline(lambda spec: _shown(spec.default))})"
    if len(specs) < every:
        text += f" [{', '.join(name for name, _ in specs)} only]"
    return text.replace("%", "%%")


def _shown(value) -> str:
    return "none" if value is None else str(value)


def _cli_type(spec):
    """The argparse type of a field: per-layer scales, int, float or text (images are paths)."""
    if spec.param.per_layer:
        return _scale
    if spec.param.image:
        return str
    if spec.param.controls:
        return _control
    members = typing.get_args(spec.type) or (spec.type,)
    return next((kind for kind in (int, float) if kind in members), str)


def _scale(text: str):
    """'0.8' -> 0.8; '0.5,0.6,...' -> a list (one value per cross-attention layer); other text (a
    preset name, JSON of a block dict) as given: the request reads and checks it before anything loads."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        return text
    return values[0] if len(values) == 1 else values


def _control(text: str):
    """'canny=photo.png:0.5:canny' -> runtime.controlnets.Control (argparse says what is wrong otherwise)."""
    from runtime.controlnets import ControlError, parse_control

    try:
        return parse_control(text)
    except ControlError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def cli_request(args: argparse.Namespace):
    """The parsed flags -> (registry entry, its request object); RequestError for a flag the pipeline
    has no field for, or a value its request refuses."""
    from runtime.pipelines import PIPELINES

    entry = PIPELINES[args.pipeline or default_pipeline(args.build)]
    fields = {spec.name for spec in request_fields(entry.request_type)}
    given = {name: value for name, value in vars(args).items() if name in _request_names() and value is not None}
    foreign = sorted(set(given) - fields)
    if foreign:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in foreign)
        raise RequestError(f"{flags}: not a field of {entry.name}'s request: leave it out, or choose another "
                           f"--pipeline")
    return entry, entry.request_type(**given)


def write_sheet(pipe, request, image, path: Path) -> Path:
    """The contact sheet (runtime.face.sheet) of an InstantID request and its first image, as PNG at
    `path`. The face is found again exactly as the pipeline found it (same photo, size and index)."""
    from runtime.face.sheet import contact_sheet
    from runtime.images import load_image, resize_for_instantid
    from runtime.pipelines import face_conditioning

    resolution = int(pipe.assets.value("default_resolution", 1024))
    face, kps_image = face_conditioning(pipe.face_analyzer, request.image, request.pose_image, request.width,
                                        request.height, resolution, request.face_index)
    photo = resize_for_instantid(load_image(request.image))  # the frame the face's pixels are in
    contact_sheet(photo, face, kps_image, image).save(path)
    return path


def default_pipeline(build: Path) -> str:
    """The first pipeline of the registry the build has, as the server finds them (instantid unless the
    build lacks it, e.g. an SD1.5 build)."""
    from runtime.serve.served import available_pipelines

    return next(iter(available_pipelines(build)), "instantid")


def _request_names() -> set[str]:
    from runtime.pipelines import PIPELINES

    return {spec.name for entry in PIPELINES.values() for spec in request_fields(entry.request_type)}


def check_before_loading(build: Path, backend: str, entry, request) -> None:
    """What the build alone can refuse, before any model loads: a per-layer ip_scale of the wrong
    length, and (runtime.serve.capacity.check_run) a size outside the engines' profile or beyond the
    memory ONNX Runtime's attention needs. RequestError says what to change."""
    from runtime.controlnets import ControlError, build_controlnets, check_controls
    from runtime.serve.capacity import check_run

    manifest = load_manifest(build)
    metadata = manifest.metadata
    try:
        check_controls(getattr(request, "controls", ()), build_controlnets(manifest), build)
    except ControlError as error:
        raise RequestError(str(error)) from None
    scale, layers = getattr(request, "ip_scale", None), metadata.get("num_cross_attn_layers")
    if isinstance(scale, (list, tuple)) and layers is not None and len(scale) != int(layers):
        raise RequestError(f"--ip-scale has {len(scale)} values but this build's UNet has {layers} cross-attention "
                           "layers: give one number, or one per layer")
    if isinstance(scale, BlockScales) and metadata.get("cross_attention_layers"):  # its blocks exist in this UNet
        try:
            scale.layer_scales(metadata["cross_attention_layers"])
        except BlockScaleError as error:
            raise RequestError(f"--ip-scale: {error}") from None
    width, height = request.width, request.height
    if width is None and entry.face:  # InstantID: the (pose) photo's size at the model's resolution
        width, height = _photo_size(request.pose_image or request.image, int(metadata.get("default_resolution", 1024)))
    elif width is None:
        width = height = int(metadata.get("default_resolution", 1024))
    if width is not None:
        check_run(build, backend, entry.name, width, height, request.num_images, request.guidance)


def _photo_size(photo, resolution: int) -> tuple[int | None, int | None]:
    """InstantID's output size for a photo path (runtime.images.model_size), or (None, None) when the
    photo cannot be read yet (the pipeline then says why) or is not a path."""
    from PIL import Image

    from runtime.images import ImageError, model_size

    if not isinstance(photo, (str, Path)):
        return None, None
    try:
        with Image.open(photo) as image:
            return model_size(*image.size, resolution)
    except (OSError, ValueError, ImageError):
        return None, None


def _log_to_stderr(name: str) -> None:
    """INFO records of logger `name` as bare lines on stderr (once)."""
    import logging

    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("  %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def generate(args) -> list[Path]:
    """Run one request; returns the written files."""
    entry, request = cli_request(args)
    if args.sheet is not None and not entry.face:
        raise RequestError(f"--sheet shows the face analysis of an InstantID request: leave it out for {entry.name}")
    check_before_loading(args.build, args.backend, entry, request)
    check_backend(args.backend)
    if args.backend == "torch":  # the slow start of this backend: say it, and a line per program as it opens
        print(f"loading {entry.name}'s torch programs from {args.build} (torch.export.load deserialises each graph: "
              "seconds per component on a CPU)...", file=sys.stderr, flush=True)
        _log_to_stderr("runtime.sessions")
    pipe = entry.open(args.build, args.backend, loop_mode=args.loop, trust_programs=args.trust_torch_programs)
    progress = StepProgress()
    generation = pipe(request, progress=progress, return_latents=True)
    progress.finish()
    images = generation.images
    for warning in generation.warnings:  # e.g. a prompt truncated to the UNet's text axis
        print(f"warning: {warning}", file=sys.stderr)
    for line in program_timings(torch_sessions(pipe), args.verbose):  # --backend torch: where its time went
        print(line, file=sys.stderr)
    pipe.save_runtime_caches()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.sheet is not None:
        args.sheet.parent.mkdir(parents=True, exist_ok=True)
        write_sheet(pipe, request, images[0], args.sheet)
    if len(images) == 1:
        paths = [args.out]
    else:
        paths = [args.out.with_name(f"{args.out.stem}-{i}{args.out.suffix or '.png'}") for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for errors the user can fix, runtime.console)."""
    return run_command(_main, argv)


def _main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.command == "serve":
        from runtime.serve.__main__ import serve

        return serve(args)
    start = time.perf_counter()
    paths = generate(args)
    for path in paths:
        print(path)
    print(f"{len(paths)} image(s) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
