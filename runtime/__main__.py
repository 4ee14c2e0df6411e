"""Command line: generate images from a build directory, or serve them over HTTP.

    python -m runtime generate --build build/tiny --face photo.jpg --prompt "a portrait" --out out.png
    python -m runtime serve --build build/tiny --port 8000          # HTTP service (runtime/serve)
    python -m runtime generate --pipeline ip-adapter-plus --build build/tiny --image ref.jpg \
        --prompt "a cat" --steps 20 --num-images 2 --out cat.png      # writes cat-0.png, cat-1.png

Errors a user can fix (no face, size outside the engine profile, missing build, NaN output) print
one line saying what to do and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

PIPELINES = ("instantid", "ip-adapter", "ip-adapter-plus")


def _scale(text: str):
    """'0.8' -> 0.8; '0.5,0.6,...' -> a list (one value per cross-attention layer)."""
    values = [float(v) for v in text.split(",")]
    return values[0] if len(values) == 1 else values


def parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m runtime`."""
    from runtime.schedulers import SCHEDULERS

    root = argparse.ArgumentParser(prog="python -m runtime", description=__doc__.split("\n")[0])
    commands = root.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate images")
    gen.add_argument("--build", type=Path, required=True, help="build directory (python -m export.build --out)")
    gen.add_argument("--pipeline", choices=PIPELINES, default="instantid")
    gen.add_argument("--face", "--image", dest="image", required=True,
                     help="identity photo (instantid) or reference image (ip-adapter)")
    gen.add_argument("--pose", help="instantid: a second photo whose face sets the pose")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--out", type=Path, required=True, help="output PNG; with several images, NAME-i.png")
    gen.add_argument("--backend", default="onnxruntime", help="onnxruntime | tensorrt | tensorrt-rtx | torch")
    gen.add_argument("--steps", type=int, default=30)
    gen.add_argument("--guidance", type=float, default=5.0)
    gen.add_argument("--ip-scale", type=_scale, default=None,
                     help="λ: one value, or comma-separated per layer (default 0.8 instantid, 0.6 ip-adapter)")
    gen.add_argument("--controlnet-scale", type=float, default=0.8)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--scheduler", choices=SCHEDULERS, default="euler")
    gen.add_argument("--loop", choices=("auto", "graph", "step-graphs", "eager"), default="auto")
    gen.add_argument("--trust-torch-programs", action="store_true",
                     help="--backend torch: load the build's torch.export programs. They unpickle, so a crafted "
                     "program runs code: use only with a build you made or trust")
    from runtime.serve.__main__ import add_subcommand

    add_subcommand(commands)  # `serve`: HTTP service over a build (runtime/serve, docs/serving.md)
    return root


def generate(args) -> list[Path]:
    """Run one request; returns the written files."""
    from runtime.pipelines import InstantIDPipeline, IPAdapterPipeline

    common = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                  guidance=args.guidance, seed=args.seed, width=args.width, height=args.height,
                  num_images=args.num_images, scheduler=args.scheduler)
    if args.pipeline == "instantid":
        pipe = InstantIDPipeline.from_build(args.build, args.backend, loop_mode=args.loop,
                                            trust_programs=args.trust_torch_programs)
        images = pipe(args.image, pose_image=args.pose, controlnet_scale=args.controlnet_scale,
                      ip_scale=0.8 if args.ip_scale is None else args.ip_scale, **common)
    else:
        pipe = IPAdapterPipeline.from_build(args.build, args.backend, plus=args.pipeline.endswith("plus"),
                                            loop_mode=args.loop, trust_programs=args.trust_torch_programs)
        images = pipe(args.image, ip_scale=0.6 if args.ip_scale is None else args.ip_scale, **common)
    pipe.save_runtime_caches()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if len(images) == 1:
        paths = [args.out]
    else:
        paths = [args.out.with_name(f"{args.out.stem}-{i}{args.out.suffix or '.png'}") for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for errors the user can fix)."""
    args = parser().parse_args(argv)
    if args.command == "serve":
        from runtime.serve.__main__ import serve

        return serve(args)
    from engine.cache import EngineCheckError
    from engine.manifest import ManifestError
    from runtime.face import NoFaceError
    from runtime.images import ImageError
    from runtime.pipelines import NonFiniteError, ResolutionError
    from runtime.sessions import SessionError

    start = time.perf_counter()
    try:
        paths = generate(args)
    except (NoFaceError, ResolutionError, NonFiniteError, SessionError, EngineCheckError, ManifestError,
            ImageError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    print(f"{len(paths)} image(s) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
