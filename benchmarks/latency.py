r"""Latency of the PyTorch baseline and every requested runtime backend, per stage, in one run.

examples:
  python -m benchmarks.latency --build build/tiny --steps 4 --runs 3 --out bench/   # baseline vs ONNX Runtime
  python -m benchmarks.latency --build build/tiny --backend onnxruntime[,tensorrt,torch] \
      --baseline torch --pipeline instantid --steps 4 --resolution 128 --batch 1 \
      --runs 5 --warmup 1 --out results/tiny [--sweep-resolution 64,128 --sweep-batch 1,2]

For each backend (the baseline first): load the pipeline, run one request (cold start = load to
first image), then time every stage (benchmarks.stages) `--runs` times after `--warmup` untimed
calls: median and p90 seconds, CUDA events on a GPU, perf_counter on the CPU; peak memory over
the whole backend (GPU: device-wide total - free from cudaMemGetInfo, sampled after loading, after
the first request and by a thread, so TensorRT's own allocations count; torch's max allocated only as
a secondary figure; CPU: sampled RSS, device figures None). A backend that cannot load is
reported as "unavailable: <reason>", a stage that fails as "error: <reason>": neither stops the
run. The floor (benchmarks.flops: FLOPs / measured matmul peak) gives measured / floor per stage.

Writes OUT/latency.json (every number, the machine, the command), OUT/latency.md (tables) and
OUT/latency.png (stacked stage bars), plus OUT/sweep.png with a sweep. latency.json (seconds, bytes):

    schema "instantrt-latency/1", date (UTC ISO), command, machine {cpu, cpu_cores, memory_bytes,
    gpus, cuda, platform, python, versions {torch, onnxruntime, tensorrt*, diffusers, ...}},
    config {pipeline, model, resolution [H, W], batch, steps, runs, warmup, guidance, build,
    weights, baseline_device, baseline_dtype, loop, threads}, stages [names, in order],
    backends [{name, available, reason, device, load_s, cold_start_s, memory {kind ('cuda_device_used'
      | 'cpu_rss'), peak_bytes, start_bytes, device_peak_bytes, device_start_bytes (total - free; None on
      the CPU), torch_max_allocated_bytes (secondary; None on the CPU)}, stages {stage: {median, p90, mean, min, max, runs [s]} | null}, stage_errors
      {stage: message}, latents_rel_to_baseline, notes [..], sweep [{resolution, batch, stage,
      median, p90, ...} | {resolution, batch, error}]}],
    floor {flops {stage: FLOPs}, peak {device, dtype, n, seconds, flops_per_s}, floor_s {stage: s}}
      | null, ratios {backend: {stage: median / floor}}, speedups {backend: {stage: baseline / it}}
"""
from __future__ import annotations

import argparse
import gc
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks.stages import STAGES, BaselineRunner, RuntimeRunner, Workload, build_analyzer
from benchmarks.timing import PeakMemory, machine_info, summarize, time_runs, timed
from runtime.console import Parser, UsageError, backend_choice, run_command
from runtime.pipelines import PIPELINES

SCHEMA = "instantrt-latency/1"
SWEEP_STAGES = ("denoise_loop", "end_to_end")


@dataclass
class BackendResult:
    """Everything measured for one backend ('baseline' or a runtime backend name). Seconds, bytes."""

    name: str
    available: bool
    reason: str | None = None
    device: str | None = None
    load_s: float | None = None
    cold_start_s: float | None = None
    memory: dict | None = None
    stages: dict[str, dict | None] = field(default_factory=dict)  # stage -> Stats dict, None = n/a
    stage_errors: dict[str, str] = field(default_factory=dict)
    latents_rel_to_baseline: float | None = None
    notes: list[str] = field(default_factory=list)
    sweep: list[dict] = field(default_factory=list)


def _error(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".strip()


def _time_stages(result: BackendResult, stages: dict, runs: int, warmup: int, device) -> None:
    for stage in STAGES:
        fn = stages.get(stage)
        if fn is None:
            result.stages[stage] = None
            continue
        try:
            result.stages[stage] = asdict(summarize(time_runs(fn, runs, warmup, device)))
        except Exception as error:  # one stage failing must not stop the others
            result.stages[stage] = None
            result.stage_errors[stage] = _error(error)


def _sweep(runner, work: Workload, points: list[tuple[int, int]], runs: int, warmup: int) -> list[dict]:
    rows = []
    for resolution, batch in points:
        point = Workload(work.pipeline, resolution, resolution, batch, work.steps, work.guidance, work.seed)
        try:
            stages = runner.stages(point)
            for stage in SWEEP_STAGES:
                stats = summarize(time_runs(stages[stage], runs, warmup, runner.device))
                rows.append({"resolution": resolution, "batch": batch, "stage": stage, **asdict(stats)})
        except Exception as error:
            rows.append({"resolution": resolution, "batch": batch, "error": _error(error)})
    return rows


def say(name: str, text: str) -> None:
    """One progress line per stage of the run on stderr, e.g. 'baseline: 5 runs of 7 stages...'."""
    print(f"{name}: {text}", file=sys.stderr, flush=True)


def measure_backend(name: str, make_runner, work: Workload, runs: int, warmup: int, device,
                    sweep_points: list[tuple[int, int]] = ()) -> tuple[BackendResult, torch.Tensor | None]:
    """Load, cold start, time every stage (and the sweep) for one backend; (result, final latents)."""
    result = BackendResult(name, available=False)
    say(name, "loading...")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    latents = None
    with PeakMemory(device) as memory:
        begin = time.perf_counter()
        try:
            runner = make_runner()
        except Exception as error:  # missing backend, engines, build...: reported, not raised
            result.reason = _error(error)
            say(name, f"unavailable: {result.reason}")
            return result, None
        result.available, result.device = True, str(runner.device)
        result.load_s = time.perf_counter() - begin
        memory.sample()  # engines, weights and contexts are resident now
        say(name, f"loaded in {result.load_s:.1f} s; first request (cold start)...")
        try:
            stages = runner.stages(work)
            timed(stages["end_to_end"], runner.device)
            result.cold_start_s = time.perf_counter() - begin
            memory.sample()  # activations, scratch, captured graphs of the first request
        except Exception as error:
            result.available, result.reason = False, f"first request failed: {_error(error)}"
            say(name, result.reason)
            return result, None
        say(name, f"cold start {result.cold_start_s:.1f} s; warm-up {warmup} + {runs} runs of {len(stages)} stages...")
        _time_stages(result, stages, runs, warmup, runner.device)
        latents = None if runner.latents is None else runner.latents.detach().float().cpu()
        if sweep_points:
            say(name, f"sweep of {len(sweep_points)} (resolution, batch) points...")
            result.sweep = _sweep(runner, work, sweep_points, runs, warmup)
        result.notes.extend(runner.notes)
        del runner, stages
    result.memory = memory.as_dict()
    return result, latents


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _backends(text: str) -> str:
    """--backend: each comma-separated name checked (runtime.console.backend_choice); 'none' kept."""
    return ",".join(name if name == "none" else backend_choice(name) for name in
                    (part.strip() for part in text.split(",")) if name)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (module docstring); a --build that is not a build is a UsageError."""
    parser = Parser(prog="python -m benchmarks.latency", description=__doc__.split("\n\n")[0],
                    epilog=__doc__.split("\n\n", 1)[1].split("\n\n")[0])
    parser.add_argument("--build", type=Path, help="build directory (python -m export.build --out); without it "
                        "only the baseline runs")
    parser.add_argument("--backend", default="onnxruntime", type=_backends,
                        help="comma-separated runtime backends: onnxruntime, tensorrt, tensorrt-rtx, torch, ... "
                        "('none' for the baseline alone; torch: the build's torch.export programs when it has "
                        "them, else the export wrappers built from --weights / random init)")
    parser.add_argument("--trust-torch-programs", action="store_true",
                        help="--backend torch: load the build's torch.export programs (they unpickle, so a crafted "
                        "program runs code: only for a build you made or trust)")
    parser.add_argument("--baseline", default="torch", choices=("torch", "none"),
                        help="the PyTorch (diffusers) baseline every backend is compared with, or none")
    parser.add_argument("--pipeline", default="instantid", choices=tuple(PIPELINES), help="pipeline to time")
    parser.add_argument("--model", help="tiny | sdxl (default: the build's model, else tiny)")
    parser.add_argument("--weights", type=Path, help="baseline checkpoints folder (default: BUILD/weights if "
                        "present, else seeded random weights)")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps per request")
    parser.add_argument("--resolution", type=int, default=None, help="pixels, square (default: model's)")
    parser.add_argument("--batch", type=int, default=1, help="images per request (CFG doubles the rows)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs of every stage (median, p90 of these)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of every stage before the timed ones")
    parser.add_argument("--device", default=None, help="baseline device (default cuda if present)")
    parser.add_argument("--fp32", action="store_true", help="baseline in fp32 on a GPU too")
    parser.add_argument("--loop", default="auto", choices=("auto", "graph", "step-graphs", "eager"),
                        help="runtime loop mode (graph modes need a GPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (set_num_threads) and ONNX Runtime (intra-op); default: theirs. "
                        "On a shared CPU use 1: spinning thread pools under contention cost 10x")
    parser.add_argument("--sweep-resolution", type=_ints, default=[],
                        help="also time the loop and end to end at these square sizes, e.g. 512,768,1024")
    parser.add_argument("--sweep-batch", type=_ints, default=[],
                        help="also time the loop and end to end at these batch sizes, e.g. 1,2,4")
    parser.add_argument("--no-floor", action="store_true", help="skip the FLOP count and matmul peak")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG plots (JSON and markdown only)")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for latency.json, latency.md and latency.png (created)")
    args = parser.parse_args(argv)
    if args.build is not None and not (args.build / "manifest.json").is_file():
        raise UsageError(f"--build {args.build} is not a build directory (no manifest.json): build one with "
                         f"python -m export.build --model tiny --stage onnx --out {args.build}, or leave --build "
                         "out to time the baseline alone")
    if args.runs < 1 or args.warmup < 0 or args.steps < 1:
        raise UsageError("--runs and --steps must be at least 1 and --warmup at least 0")
    return args


def _model_and_weights(args) -> tuple[str, Path | None]:
    model = args.model
    if model is None and args.build is not None and (args.build / "manifest.json").is_file():
        from engine.manifest import load_manifest

        model = load_manifest(args.build).model
    weights = args.weights
    if weights is None and args.build is not None and (args.build / "weights").is_dir():
        weights = args.build / "weights"
    return model or "tiny", weights


def _floor(model: str, work: Workload, device) -> dict:
    from benchmarks.flops import floor_seconds, measure_matmul_peak, stage_flops

    counted = stage_flops(model, work.pipeline, work.height, work.width, work.batch, work.steps)
    peak = measure_matmul_peak(device)
    return {"flops": counted.flops, "peak": asdict(peak), "floor_s": floor_seconds(counted.flops, peak.flops_per_s)}


def derived(backends: list[dict], floor: dict | None) -> tuple[dict, dict]:
    """(ratios {backend: {stage: median / floor}}, speedups {backend: {stage: baseline median / median}})."""
    ratios, speedups = {}, {}
    base = next((b for b in backends if b["name"] == "baseline" and b["available"]), None)
    for backend in backends:
        if not backend["available"]:
            continue
        medians = {s: v["median"] for s, v in backend["stages"].items() if v}
        if floor:
            ratios[backend["name"]] = {s: m / floor["floor_s"][s] for s, m in medians.items()
                                       if floor["floor_s"].get(s)}
        if base is not None and backend is not base:
            speedups[backend["name"]] = {s: base["stages"][s]["median"] / m for s, m in medians.items()
                                         if base["stages"].get(s) and m > 0}
    return ratios, speedups


def _save_partial(out: Path, results: list[BackendResult]) -> None:
    """OUT/latency.partial.json after every backend: what survives a run killed by a time limit."""
    import json

    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "latency.partial.json").write_text(json.dumps([asdict(r) for r in results], indent=2))


def run(args: argparse.Namespace) -> dict:
    """Measure everything the arguments ask for; returns the JSON-ready result."""
    model, weights = _model_and_weights(args)
    from export.specs import get_spec

    if args.threads:
        torch.set_num_threads(args.threads)

    size = args.resolution or get_spec(model).default_resolution
    work = Workload(args.pipeline, size, size, args.batch, args.steps)
    base_device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if args.fp32 or not base_device.startswith("cuda") else torch.float16
    points = [(r, b) for r in (args.sweep_resolution or [size]) for b in (args.sweep_batch or [args.batch])]
    points = points if (args.sweep_resolution or args.sweep_batch) else []
    # imported before any clock starts (runtime.pipelines is, at the top): the cold start of the first
    # backend must not pay for the process's imports
    import benchmarks.pipelines  # noqa: F401
    analyzer = build_analyzer(args.build)
    results, latents = [], {}
    if args.baseline == "torch":
        result, latents["baseline"] = measure_backend(
            "baseline", lambda: BaselineRunner(args.pipeline, model, weights, base_device, dtype, analyzer),
            work, args.runs, args.warmup, base_device, points)
        results.append(result)
        _save_partial(args.out, results)
    for backend in [b.strip() for b in args.backend.split(",") if b.strip() and b.strip() != "none"]:
        if args.build is None:
            results.append(BackendResult(backend, False, reason="no --build directory given"))
            continue
        device = "cuda" if torch.cuda.is_available() else "cpu"
        result, latents[backend] = measure_backend(
            backend, lambda: RuntimeRunner(args.pipeline, args.build, backend, loop_mode=args.loop,
                                           threads=args.threads, model=model, weights=weights, dtype=dtype,
                                           device=device if backend == "torch" else None,
                                           trust_programs=args.trust_torch_programs),
            work, args.runs, args.warmup, device, points)
        base = latents.get("baseline")
        if base is not None and latents[backend] is not None and base.shape == latents[backend].shape:
            result.latents_rel_to_baseline = float((latents[backend] - base).norm() / base.norm())
        results.append(result)
        _save_partial(args.out, results)
    backends = [asdict(r) for r in results]
    if not args.no_floor:
        say("floor", "counting FLOPs and measuring the matmul peak...")
    floor = None if args.no_floor else _floor(model, work, base_device)
    ratios, speedups = derived(backends, floor)
    return {"schema": SCHEMA, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m benchmarks.latency " + shlex.join(sys.argv[1:] if args._argv is None
                                                                     else args._argv),
            "machine": machine_info(),
            "config": {"pipeline": args.pipeline, "model": model, "resolution": [size, size], "batch": args.batch,
                       "steps": args.steps, "runs": args.runs, "warmup": args.warmup, "guidance": work.guidance,
                       "build": str(args.build) if args.build else None, "weights": str(weights) if weights else
                       "random", "baseline_device": base_device, "baseline_dtype": str(dtype).removeprefix("torch."),
                       "loop": args.loop, "threads": args.threads or torch.get_num_threads()},
            "stages": list(STAGES), "backends": backends, "floor": floor, "ratios": ratios, "speedups": speedups}


def main(argv: list[str] | None = None) -> int:
    """Run, then write latency.json / latency.md / latency.png under --out; prints the table. A user
    mistake is one `error:` line and status 2 (runtime.console)."""
    return run_command(_main, argv)


def _main(argv: list[str]) -> int:
    from benchmarks.report import write_outputs

    args = parse_args(argv)
    args._argv = argv
    result = run(args)
    paths = write_outputs(result, args.out, plot=not args.no_plot)
    (args.out / "latency.partial.json").unlink(missing_ok=True)
    print(paths["markdown"].read_text())
    for path in paths.values():
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
