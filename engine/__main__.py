"""`python -m engine [build] BUILD_DIR [...]`: build the TensorRT engines of an exported build directory
(python -m export.build writes it), keeping the plans that are current.

`python -m engine refit BUILD_DIR --component NAME (--from NEW_BUILD_DIR | --onnx NEW.onnx)`: put the
weights of another export of the same model (a new base, a LoRA fused with --lora) into a plan built
with --refittable, without rebuilding it. `python -m engine fusion BUILD_DIR|FILE.onnx`: which attention
layers the builder fuses (engine.fusion).

A mistake (a folder that holds no export, an unknown component, a bad range) is one `error:` line
and exit status 2; -v / --verbose keeps the traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from engine.backend import BackendError
from engine.build_all import build_all
from engine.manifest import ManifestError
from engine.profiles import Geometry, ProfileError, parse_range
from export.cli import ArgumentParser, UserError, run

BUILD_EXAMPLES = """examples:
  python -m engine build/tiny                                   # every exported component, default profiles
  python -m engine build build/tiny --backend tensorrt-rtx --static 1x1024x1024
  python -m engine build/sdxl --components unet_instantid --height 768:1024:1280 --force
  python -m engine refit build/sdxl --component unet_instantid --from build/sdxl-lora
  python -m engine fusion build/tiny                            # what the builder fuses

Commands: build (the default), refit, fusion; python -m engine refit --help for refit's flags."""
REFIT_EXAMPLES = """examples:
  python -m engine refit build/sdxl --component unet_instantid --from build/sdxl-lora
  python -m engine refit build/sdxl --component unet_instantid --onnx /tmp/unet_instantid.onnx

The plan must have been built with --refittable; exit status 0: refitted, 1: these weights cannot be
refitted into that plan (rebuild it), 2: a mistake, or no GPU to refit on (the plan is proved anyway)."""

SHOW_CHANGED = 12  # changed weights listed by `refit`


def parse_static(text: str) -> Geometry:
    """'BxHxW' (e.g. '1x1024x1024') -> Geometry.fixed(B, H, W)."""
    try:
        batch, height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--static wants BxHxW, e.g. 1x1024x1024, not '{text}'") from None
    return Geometry.fixed(batch, height, width)


def range_arg(text: str):
    """'MIN:OPT:MAX' or 'N' -> Range (argparse type)."""
    try:
        return parse_range(text)
    except ProfileError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def geometry_from(args) -> Geometry:
    """--static, or --batch/--height/--width/--decode-batch, and --text-tokens, over the defaults of Geometry()."""
    ranges = {key: getattr(args, key) for key in ("batch", "height", "width", "decode_batch", "text_tokens")
              if getattr(args, key, None) is not None}
    if args.static is not None:
        if set(ranges) - {"decode_batch", "text_tokens"}:
            raise ProfileError("--static sets batch, height and width: drop --batch/--height/--width")
        return Geometry(args.static.batch, args.static.height, args.static.width,
                        ranges.get("decode_batch", Geometry().decode_batch),
                        ranges.get("text_tokens", Geometry().text_tokens))
    return Geometry(**ranges)


def new_onnx_of(args) -> tuple[Path, dict | None]:
    """(the new ONNX, its export flags or None) from --onnx, or from --from's manifest for --component."""
    from engine.manifest import load_manifest
    from engine.refit import RefitError

    if args.onnx is not None:
        if not args.onnx.is_file():
            raise UserError(f"--onnx {args.onnx} is not a file: pass the component's new ONNX (python -m export.build "
                            f"... --components {args.component} --stage onnx writes one)")
        return args.onnx, None
    entry = load_manifest(args.from_build).components.get(args.component)
    if entry is None or entry.onnx is None:
        raise RefitError(f"{args.from_build} has no ONNX of '{args.component}': export it there first "
                         f"(python -m export.build ... --components {args.component} --stage onnx "
                         f"--out {args.from_build})")
    return args.from_build / entry.onnx.path, entry.onnx.export_flags


def refit_main(argv: list[str]) -> int:
    """`python -m engine refit ...`: prove the refit plan on any machine, refit on a GPU; the exit code
    is 0 when refitted, 1 when the new weights cannot be refitted, 2 when only a GPU is missing."""
    from engine.backend import detect_gpu
    from engine.refit import RefitError, prove_refit, refit_component

    parser = ArgumentParser(prog="python -m engine refit", epilog=REFIT_EXAMPLES,
                            description="refit a --refittable plan with another export's weights")
    parser.add_argument("build_dir", type=Path, help="build/<model> whose engine is refitted")
    parser.add_argument("--component", required=True, help="e.g. unet_instantid, unet_ip_adapter")
    parser.add_argument("-v", "--verbose", action="store_true", help="the traceback of an error")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from", dest="from_build", type=Path, metavar="NEW_BUILD_DIR",
                        help="a build directory exported from the new weights (same model and settings)")
    source.add_argument("--onnx", type=Path, metavar="NEW.onnx", help="the component's new ONNX file")
    parser.add_argument("--backend", choices=["tensorrt", "tensorrt-rtx"], help="engine backend (default: detect)")
    args = parser.parse_args(argv)
    for folder in [args.build_dir] + ([args.from_build] if args.from_build is not None else []):
        _require_build(folder)
    from engine.manifest import load_manifest

    known = list(load_manifest(args.build_dir).components)
    if args.component not in known:
        raise UserError(f"--component {args.component}: {args.build_dir} has no such component; choose from "
                        f"{' '.join(known)}")
    try:
        new_onnx, export_flags = new_onnx_of(args)
        plan = prove_refit(args.build_dir, args.component, new_onnx, args.backend)
        print(f"refit plan for {args.component}: {plan.summary()}")
        for name in plan.changed[:SHOW_CHANGED]:
            print(f"  changed: {name}")
        if len(plan.changed) > SHOW_CHANGED:
            print(f"  ... and {len(plan.changed) - SHOW_CHANGED} more")
        if detect_gpu() is None:
            print("error: the plan checks out, but refitting needs an NVIDIA GPU (engines are deserialized on the "
                  "device): run this command on the GPU machine", file=sys.stderr)
            return 2
        result = refit_component(args.build_dir, args.component, new_onnx, args.backend, export_flags)
    except (RefitError, FileNotFoundError) as error:  # these weights cannot go into that plan
        print(f"error: {error}", file=sys.stderr)
        return 1
    except ManifestError as error:
        raise UserError(str(error)) from error
    print(f"refitted {result.weights_set} weights in {result.seconds} s: {result.plan_bytes} bytes, "
          f"sha256 {result.plan_sha256[:12]}")
    return 0


def _require_build(folder: Path) -> None:
    """A UserError unless `folder` holds an export (manifest.json)."""
    if not Path(folder).is_dir():
        raise UserError(f"{folder} is not a folder: pass a build directory written by python -m export.build "
                        "(e.g. build/tiny: python -m export.build --model tiny --stage onnx)")
    if not (Path(folder) / "manifest.json").is_file():
        raise UserError(f"{folder} holds no export (no manifest.json): export into it first "
                        f"(python -m export.build --model <model> --stage onnx --out {folder})")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run build_all (or `refit`, `fusion`), return the exit code (2 and one `error:`
    line for a mistake: export.cli)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["refit"]:
        return run(refit_main, argv[1:])
    if argv[:1] == ["fusion"]:
        from engine.fusion import main as fusion_main

        return run(fusion_main, argv[1:])
    return run(build_main, argv[1:] if argv[:1] == ["build"] else argv)


def build_main(argv: list[str]) -> int:
    """`python -m engine [build] BUILD_DIR ...`."""
    parser = ArgumentParser(prog="python -m engine", description=__doc__.split("\n\n")[0], epilog=BUILD_EXAMPLES)
    parser.add_argument("build_dir", type=Path, help="build/<model> with manifest.json and onnx/ "
                                                     "(python -m export.build writes it)")
    parser.add_argument("--components", nargs="+", metavar="NAME",
                        help="only these components (default: every one with an ONNX in the manifest)")
    parser.add_argument("--backend", choices=["tensorrt", "tensorrt-rtx"],
                        help="engine backend (default: detect; a CPU-only machine builds with tensorrt-rtx)")
    parser.add_argument("--static", type=parse_static, metavar="BxHxW",
                        help="one fixed serving size instead of batch 1-4, 512-1536 px (default: the ranges below)")
    for name, default in (("batch", "1:1:4"), ("height", "512:1024:1536"), ("width", "512:1024:1536")):
        parser.add_argument(f"--{name}", type=range_arg, metavar="MIN:OPT:MAX",
                            help=f"{name} range of the profiles (default {default}; one value: fixed)")
    parser.add_argument("--decode-batch", type=range_arg, metavar="MIN:OPT:MAX",
                        help="images per VAE decoder call (default 1: the runtime decodes one at a time; "
                             "the scratch pool every engine shares is sized for the largest)")
    parser.add_argument("--text-tokens", type=range_arg, metavar="MIN:OPT:MAX",
                        help="prompt tokens the UNet takes, multiples of 77 (default 77:77:231: prompts up to 3 "
                             "chunks of 75 tokens; longer ones are truncated with a warning)")
    parser.add_argument("--opt-level", type=int, default=3, choices=range(6), metavar="0-5",
                        help="builder optimisation level")
    parser.add_argument("--workspace-gb", type=float, help="workspace memory limit (default: the builder's)")
    parser.add_argument("--compute-capabilities", nargs="+", metavar="SM",
                        help="ahead-of-time targets, e.g. sm86 sm89 (tensorrt-rtx)")
    parser.add_argument("--refittable", action="store_true",
                        help="weights can be refitted from another checkpoint later (plain REFIT: NVIDIA "
                             "documents it may drop a GEMM bias; prefer rebuilding)")
    parser.add_argument("--strip-plan", action="store_true",
                        help="leave weights out of the plans (REFIT_IDENTICAL) to ship them small; the "
                             "runtime refuses such plans until engine.refit.refill_stripped puts the "
                             "weights back from the ONNX on the target GPU")
    parser.add_argument("--timing-cache", metavar="FILE",
                        help="timing cache file (tensorrt; default BUILD_DIR/engines/timing.cache)")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("-v", "--verbose", action="store_true", help="log builder warnings; the traceback of an error")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(name)s: %(message)s")
    _require_build(args.build_dir)
    try:
        build_all(args.build_dir, args.components, args.backend, geometry=geometry_from(args),
                  opt_level=args.opt_level, workspace_gb=args.workspace_gb, refittable=args.refittable,
                  strip_plan=args.strip_plan, compute_capabilities=args.compute_capabilities,
                  timing_cache=args.timing_cache, force=args.force)
    except (ManifestError, ProfileError, BackendError):
        raise  # a mistake: one error line, exit 2 (export.cli)
    except (RuntimeError, ValueError, FileNotFoundError) as error:  # the build failed; our errors say why
        if args.verbose:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
