r"""What the IdentityNet's step window saves: FLOPs at full SDXL geometry and measured loop time, side by side.

examples:
  python -m benchmarks.control_window --build build/tiny --out benchmarks/results/control-window
  python -m benchmarks.control_window --build build/tiny --ends 1.0,0.6,0.5 --steps 10 --size 256 --runs 5 \
      --backend onnxruntime --flops-model sdxl --flops-resolution 1024 --flops-steps 30

For each control_guidance_end (start 0): the FLOPs of the denoising loop of `--flops-model` at
`--flops-resolution`² with CFG, one image, `--flops-steps` steps (benchmarks.flops on meta-device modules:
steps x UNet + in-window steps x IdentityNet), and the time of the InstantID pipeline's denoising loop
(`pipe.run(..., decode=False)`: the loop and its input stacking) on the build with `--backend`, a
synthetic face (no face analysis), `--runs` timed runs after one warm-up per window, the windows
interleaved run by run so drift hits them alike; median and p90. The IdentityNet's session calls are
counted and must equal the window's steps.

Writes OUT/control_window.json (every number, the machine, the command), OUT/control_window.md (the
table) and OUT/control_window.png (time and FLOPs relative to the full window) when matplotlib is there.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.flops import stage_flops
from benchmarks.timing import machine_info, summarize
from runtime.control_window import control_window

SCHEMA = "instantrt-control-window/1"


def window_flops(model: str, resolution: int, steps: int, ends: list[float]) -> list[dict]:
    """Per end: the loop's FLOPs (UNet steps + in-window IdentityNet steps) and the share saved."""
    rows = []
    for end in ends:
        flops = stage_flops(model, "instantid", resolution, resolution, 1, steps, 0.0, end)
        rows.append({"end": end, "controlnet_steps": flops.controlnet_steps, "loop_flops": flops.flops["denoise_loop"],
                     "unet_step_flops": flops.flops["unet_step"], "controlnet_step_flops": flops.flops["controlnet_step"]})
    full = rows[0]["loop_flops"] if ends[0] == 1.0 else stage_flops(model, "instantid", resolution, resolution, 1,
                                                                     steps).flops["denoise_loop"]
    for row in rows:
        row["flops_saved"] = 1.0 - row["loop_flops"] / full
    return rows


def window_times(build: Path, backend: str, size: int, steps: int, ends: list[float], runs: int,
                 threads: int | None) -> list[dict]:
    """Per end: loop seconds (median, p90, runs) of the InstantID pipeline and its IdentityNet calls per run."""
    from runtime.face import draw_kps
    from runtime.pipelines import InstantIDPipeline

    options = {"threads": threads} if threads else {}
    pipe = InstantIDPipeline.from_build(build, backend, **options)
    embedding = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    kps = np.array([[0.35, 0.4], [0.65, 0.4], [0.5, 0.55], [0.38, 0.72], [0.62, 0.72]], np.float32) * size
    kps_image = draw_kps(size, size, kps)
    prepared = {end: pipe.prepare_embedding(embedding, kps_image, "a portrait photo", steps=steps, seed=1,
                                            control_guidance_end=end) for end in ends}
    calls = []
    session = pipe.controlnet
    run = session.run
    session.run = lambda feeds: calls.append(1) or run(feeds)  # counts the IdentityNet's steps
    try:
        counted = {}
        for end in ends:  # warm-up, and the IdentityNet's calls of one run
            calls.clear()
            pipe.run([prepared[end]], decode=False)
            counted[end] = len(calls)
        times: dict[float, list[float]] = {end: [] for end in ends}
        for _ in range(runs):
            for end in ends:
                start = time.perf_counter()
                pipe.run([prepared[end]], decode=False)
                times[end].append(time.perf_counter() - start)
    finally:
        session.run = run
    rows = []
    for end in ends:
        window = control_window(steps, 0.0, end)
        expected = steps if window is None else sum(window)
        if counted[end] != expected:
            raise RuntimeError(f"end={end}: the IdentityNet ran {counted[end]} times, its window has {expected} steps")
        stats = summarize(times[end])
        rows.append({"end": end, "controlnet_steps": counted[end], "median_s": stats.median, "p90_s": stats.p90,
                     "runs_s": times[end]})
    full = rows[0]["median_s"]
    for row in rows:
        row["time_saved"] = 1.0 - row["median_s"] / full
    return rows


def markdown(result: dict) -> str:
    config, flops = result["config"], {row["end"]: row for row in result["flops"]}
    lines = [f"IdentityNet window: control_guidance_start 0, control_guidance_end as given. Loop time: "
             f"{config['backend']}, {Path(config['build']).name} build, {config['size']}² px, {config['steps']} "
             f"steps, CFG, median of {config['runs']} interleaved runs ({result['machine'].get('cpu', '?')}, "
             f"{result['machine'].get('cpu_cores', '?')} cores). FLOPs: {config['flops_model']} at "
             f"{config['flops_resolution']}², {config['flops_steps']} steps, CFG.", "",
             "| end | IdentityNet steps (timed) | loop median | p90 | time saved | IdentityNet steps "
             f"({config['flops_steps']}) | loop TFLOP | FLOPs saved |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["times"]:
        f = flops[row["end"]]
        lines.append(f"| {row['end']:g} | {row['controlnet_steps']}/{config['steps']} | {row['median_s'] * 1e3:.1f} ms | "
                     f"{row['p90_s'] * 1e3:.1f} ms | {row['time_saved']:.1%} | {f['controlnet_steps']}/"
                     f"{config['flops_steps']} | {f['loop_flops'] / 1e12:.1f} | {f['flops_saved']:.1%} |")
    f = result["flops"][0]
    lines += ["", f"Per step at {config['flops_resolution']}²: UNet {f['unet_step_flops'] / 1e12:.2f} TFLOP, "
              f"IdentityNet {f['controlnet_step_flops'] / 1e12:.2f} TFLOP "
              f"({f['controlnet_step_flops'] / (f['unet_step_flops'] + f['controlnet_step_flops']):.0%} of a step)."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ends = [f"{row['end']:g}" for row in result["times"]]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = np.arange(len(ends))
    ax.bar(x - 0.2, [1 - row["time_saved"] for row in result["times"]], 0.4, label="loop time (measured)")
    ax.bar(x + 0.2, [1 - row["flops_saved"] for row in result["flops"]], 0.4, label="loop FLOPs (SDXL 1024²)")
    ax.set_xticks(x, ends)
    ax.set_xlabel("control_guidance_end")
    ax.set_ylabel("relative to end = 1")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.control_window", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--build", type=Path, required=True, help="an InstantID build (python -m export.build)")
    parser.add_argument("--backend", default="onnxruntime", help="runtime backend (default: onnxruntime)")
    parser.add_argument("--ends", default="1.0,0.6,0.5", help="control_guidance_end values, the first the reference")
    parser.add_argument("--steps", type=int, default=10, help="timed loop steps (default 10)")
    parser.add_argument("--size", type=int, default=256, help="timed output size in px, square (default 256)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per window (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: its own)")
    parser.add_argument("--flops-model", default="sdxl", help="model whose FLOPs are counted (default sdxl)")
    parser.add_argument("--flops-resolution", type=int, default=1024, help="FLOPs at this size² (default 1024)")
    parser.add_argument("--flops-steps", type=int, default=30, help="FLOPs of this many steps (default 30)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON, Markdown and plot")
    args = parser.parse_args(argv)
    ends = [float(value) for value in args.ends.split(",")]
    for end in ends:
        control_window(args.steps, 0.0, end)  # ValueError for an end outside (0, 1]
    result = {"schema": SCHEMA, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": "python -m benchmarks.control_window " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "machine": machine_info(),
              "config": {"build": str(args.build), "backend": args.backend, "steps": args.steps, "size": args.size,
                         "runs": args.runs, "threads": args.threads, "flops_model": args.flops_model,
                         "flops_resolution": args.flops_resolution, "flops_steps": args.flops_steps},
              "flops": window_flops(args.flops_model, args.flops_resolution, args.flops_steps, ends),
              "times": window_times(args.build, args.backend, args.size, args.steps, ends, args.runs, args.threads)}
    table = markdown(result)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "control_window.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "control_window.md").write_text(table)
        plot(result, args.out / "control_window.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
