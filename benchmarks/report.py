"""Tables and plots of a latency result (the dict `benchmarks.latency.run` returns / latency.json holds).

    python -m benchmarks.report results/tiny/latency.json      # rewrites latency.md / .png beside it
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from runtime.console import Parser, UsageError, run_command

# stages that add up to one request (denoise_step is inside denoise_loop; end_to_end is the sum)
STACKED = ("face_analysis", "text_encoding", "image_tokens", "denoise_loop", "vae_decode")
# what end_to_end runs, each of them also timed alone (face analysis is outside end_to_end)
IN_END_TO_END = ("text_encoding", "image_tokens", "denoise_loop", "vae_decode")
MIN_RUNS = 3  # fewer samples per stage: medians and p90s are single samples, said so in the table
COLORS = {"face_analysis": "#8c8c8c", "text_encoding": "#4c72b0", "image_tokens": "#dd8452",
          "denoise_loop": "#55a868", "vae_decode": "#c44e52"}


def fmt_seconds(seconds: float | None) -> str:
    """0.00123 -> '1.23 ms'; None -> '–'."""
    if seconds is None:
        return "–"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale or unit == "µs":
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds:.3g} s"


def fmt_bytes(value: int | None) -> str:
    """Bytes -> '1.2 GiB'."""
    if value is None:
        return "–"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value} B"


MEMORY_KINDS = {"cuda_device_used": "GPU, device-wide total − free", "cpu_rss": "host RSS"}


def memory_rows() -> list[tuple[str, object]]:
    """(row label, cell(memory dict | None) -> str) of the memory rows. 'peak memory' is the primary figure
    labelled with its kind; the device rows are device-wide used (total − free: what TensorRT allocates
    outside torch counts), '–' on the CPU; torch's max allocated is secondary (torch tensors only)."""
    def primary(memory):
        if not memory:
            return "–"
        return f"{fmt_bytes(memory['peak_bytes'])} ({MEMORY_KINDS.get(memory['kind'], memory['kind'])})"

    def device(memory):
        if not memory or memory.get("device_peak_bytes") is None:
            return "–"
        added = memory["device_peak_bytes"] - memory["device_start_bytes"]
        return f"{fmt_bytes(memory['device_peak_bytes'])} (+{fmt_bytes(added)} over start)"

    def torch_allocated(memory):
        return fmt_bytes(memory.get("torch_max_allocated_bytes")) if memory else "–"

    return [("peak memory", primary), ("peak device memory (total − free)", device),
            ("torch max allocated (secondary: torch tensors only)", torch_allocated)]


def _median(backend: dict, stage: str) -> float | None:
    return (backend["stages"].get(stage) or {}).get("median")


def unaccounted(backend: dict) -> float | None:
    """end_to_end median − the sum of the medians of the stages it runs (each timed alone), seconds;
    None when any of them is missing. Positive: work outside the timed stages (host preparation,
    tokenisation, copies between stages); negative: the stages share work or overlap when run as one
    request, or run-to-run noise."""
    total, parts = _median(backend, "end_to_end"), [_median(backend, s) for s in IN_END_TO_END]
    if total is None or any(p is None for p in parts):
        return None
    return total - sum(parts)


def consistency_notes(result: dict) -> list[str]:
    """Sentences for figures that would read as contradictions: too few runs, a loop median below
    one step's median."""
    config, notes = result["config"], []
    if config["runs"] < MIN_RUNS:
        notes.append(f"{config['runs']} timed run(s) per stage: too few for a median or a p90 (p90 shown as –), "
                     f"each figure is one or two samples; use --runs {MIN_RUNS} or more to compare stages.")
    for backend in result["backends"]:
        if not backend["available"]:
            continue
        step, loop = _median(backend, "denoise_step"), _median(backend, "denoise_loop")
        if step and loop and loop < step:
            notes.append(f"{backend['name']}: the {config['steps']}-step loop's median is below one step's: the "
                         "two are timed apart and the difference is within this machine's noise.")
    return notes


def _header(result: dict) -> str:
    config, machine = result["config"], result["machine"]
    gpus = ", ".join(machine["gpus"]) or "no GPU"
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    return (f"{config['pipeline']} · {config['model']} · {config['resolution'][0]}x{config['resolution'][1]} px · "
            f"batch {config['batch']} · {config['steps']} steps · {config['runs']} runs (warm-up "
            f"{config['warmup']}) · {result['date']}\n\nMachine: {machine['cpu']} ({machine['cpu_cores']} cores), "
            f"{gpus}; {versions}\n\nCommand: `{result['command']}`")


def _cell(backend: dict, stage: str, single: bool = False) -> str:
    stats = backend["stages"].get(stage)
    if stats:
        return f"{fmt_seconds(stats['median'])} ({'–' if single else fmt_seconds(stats['p90'])})"
    error = backend.get("stage_errors", {}).get(stage)
    return f"error: {error}" if error else "n/a"


def markdown(result: dict) -> str:
    """The latency table (median (p90) per stage and backend, speedup vs the baseline), memory, cold
    start, the floor table (FLOPs, floor seconds, measured / floor) and unavailable backends."""
    backends = [b for b in result["backends"] if b["available"]]
    floor = result.get("floor")
    lines = [_header(result), ""]
    head = ["stage"] + [f"{b['name']} median (p90)" for b in backends]
    head += [f"{name} speedup" for name in result.get("speedups", {})]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    single = result["config"]["runs"] < MIN_RUNS
    for stage in result["stages"]:
        row = [stage] + [_cell(b, stage, single) for b in backends]
        row += [f"{s[stage]:.2f}x" if stage in s else "–" for s in result.get("speedups", {}).values()]
        lines.append("| " + " | ".join(row) + " |")
    pad = ["–"] * len(result.get("speedups", {}))
    gaps = [unaccounted(b) for b in backends]
    if any(g is not None for g in gaps):
        lines.append("| end_to_end − (" + " + ".join(IN_END_TO_END) + ") | " + " | ".join(
            ["–" if g is None else ("+" if g >= 0 else "−") + fmt_seconds(abs(g)) for g in gaps] + pad) + " |")
    lines.append("| cold start (load → first image) | " + " | ".join(
        [fmt_seconds(b["cold_start_s"]) for b in backends] + pad) + " |")
    for label, cell in memory_rows():
        lines.append(f"| {label} | " + " | ".join([cell(b.get("memory")) for b in backends] + pad) + " |")
    for backend in result["backends"]:
        if backend["available"] and backend.get("latents_rel_to_baseline") is not None:
            rel = backend["latents_rel_to_baseline"]
            lines.append(f"\n{backend['name']}: final latents ‖Δ‖/‖baseline‖ = {rel:.2e}")
        if backend["available"] and backend.get("notes"):
            lines.append(f"\n{backend['name']} notes: " + "; ".join(backend["notes"]))
    lines += ["", "Each stage is timed alone from ready inputs; end_to_end is one whole request (face analysis "
              "excluded). Their difference row: positive is work outside the timed stages (host preparation, "
              "tokenisation, copies between stages), negative is work the stages share or overlap when run "
              "together, or noise."]
    lines += [f"\nNote: {note}" for note in consistency_notes(result)]
    unavailable = [b for b in result["backends"] if not b["available"]]
    for backend in unavailable:
        lines.append(f"\n{backend['name']}: unavailable: {backend['reason']}")
    if floor:
        peak = floor["peak"]
        lines += ["", f"Floor: FLOPs / matmul peak {peak['flops_per_s'] / 1e12:.3g} TFLOP/s ({peak['dtype']}, "
                  f"{peak['n']}³ on {peak['device']}); ratio = measured median / floor.", ""]
        head = ["stage", "GFLOP", "floor"] + [f"{name} ×floor" for name in result["ratios"]]
        lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for stage in result["stages"]:
            if stage not in floor["flops"]:
                continue
            row = [stage, f"{floor['flops'][stage] / 1e9:.4g}", fmt_seconds(floor["floor_s"][stage])]
            row += [f"{r[stage]:.3g}" if stage in r else "–" for r in result["ratios"].values()]
            lines.append("| " + " | ".join(row) + " |")
    sweep = [(b["name"], row) for b in backends for row in b.get("sweep", [])]
    if sweep:
        lines += ["", "Sweep (median (p90)):", "", "| backend | resolution | batch | stage | time |",
                  "| --- | --- | --- | --- | --- |"]
        for name, row in sweep:
            value = f"error: {row['error']}" if "error" in row else \
                f"{fmt_seconds(row['median'])} ({fmt_seconds(row['p90'])})"
            lines.append(f"| {name} | {row['resolution']} | {row['batch']} | {row.get('stage', '–')} | {value} |")
    return "\n".join(lines) + "\n"


def plot_stages(result: dict, path: Path) -> Path:
    """Write `stage_figure(result)` to `path` (PNG)."""
    return _save(stage_figure(result), path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stage_figure(result: dict):
    """A matplotlib Figure: stacked per-stage bars (median seconds, each stage timed alone) for every
    available backend and the floor; a hatched segment: end-to-end time outside the timed stages;
    black ticks: the measured face analysis + end-to-end median (one whole request)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = []
    for backend in (b for b in result["backends"] if b["available"]):
        total, gap = _median(backend, "end_to_end"), unaccounted(backend)
        parts = {s: _median(backend, s) or 0.0 for s in STACKED}
        parts["outside the timed stages"] = max(gap or 0.0, 0.0)
        bars.append((backend["name"], parts, total and total + (_median(backend, "face_analysis") or 0.0)))
    if result.get("floor"):
        floor = result["floor"]["floor_s"]
        bars.append(("floor", {s: floor.get(s, 0.0) for s in STACKED}, floor.get("end_to_end")))
    fig, ax = plt.subplots(figsize=(1.6 * len(bars) + 4, 4.5))
    names = [name for name, _, _ in bars]
    bottoms = [0.0] * len(bars)
    for stage in (*STACKED, "outside the timed stages"):
        heights = [parts.get(stage, 0.0) for _, parts, _ in bars]
        if stage not in COLORS and not any(heights):
            continue
        ax.bar(names, heights, bottom=bottoms, width=0.6, label=stage,
               **({"color": COLORS[stage]} if stage in COLORS else {"color": "white", "edgecolor": "#555555",
                                                                    "hatch": "//"}))
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ticks = [(index, total) for index, (_, _, total) in enumerate(bars) if total]
    for number, (index, total) in enumerate(ticks):
        ax.plot([index - 0.35, index + 0.35], [total, total], color="black", lw=1.5,
                label="measured: face analysis + end-to-end" if number == 0 else None)
    config = result["config"]
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"{config['pipeline']} · {config['model']} · {config['resolution'][0]}x{config['resolution'][1]} · "
                 f"batch {config['batch']} · {config['steps']} steps: where one request's time goes", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def sweep_plot(result: dict, path: Path) -> Path | None:
    """Write `sweep_figure(result)` to `path`; None without a sweep."""
    fig = sweep_figure(result)
    return None if fig is None else _save(fig, path)


def sweep_figure(result: dict):
    """End-to-end median vs resolution, one line per backend and batch (a Figure); None without a sweep."""
    rows = [(b["name"], r) for b in result["backends"] if b["available"] for r in b.get("sweep", [])
            if r.get("stage") == "end_to_end"]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({(name, r["batch"]) for name, r in rows}):
        points = sorted((r["resolution"], r["median"]) for name, r in rows if (name, r["batch"]) == key)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{key[0]} batch {key[1]}")
    config = result["config"]
    ax.set_xlabel("resolution (px, square)")
    ax.set_ylabel("end-to-end seconds (median)")
    ax.set_title(f"{config['pipeline']} · {config['model']} · {config['steps']} steps: end-to-end time vs size",
                 fontsize=9)
    ax.legend(fontsize=8)
    return fig


def write_outputs(result: dict, out: Path, plot: bool = True) -> dict[str, Path]:
    """Write latency.json, latency.md and (unless plot=False) latency.png (+ sweep.png) under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "latency.json", "markdown": out / "latency.md"}
    paths["json"].write_text(json.dumps(result, indent=2))
    paths["markdown"].write_text(markdown(result))
    if plot:
        paths["plot"] = plot_stages(result, out / "latency.png")
        swept = sweep_plot(result, out / "sweep.png")
        if swept:
            paths["sweep_plot"] = swept
    return paths


def main(argv: list[str] | None = None) -> int:
    """Re-render the table and plots of a latency.json. A user mistake is one `error:` line and status
    2 (runtime.console)."""
    return run_command(_main, argv)


def _main(argv: list[str]) -> int:
    parser = Parser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0],
                    epilog="examples:\n  python -m benchmarks.report results/tiny/latency.json   "
                    "# rewrites latency.md / latency.png beside it\n")
    parser.add_argument("latency_json", type=Path, help="a latency.json written by python -m benchmarks.latency")
    source = parser.parse_args(argv).latency_json
    try:
        result = json.loads(source.read_text())
        result["config"], result["backends"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UsageError(f"{source} is not a latency.json written by python -m benchmarks.latency ({error}): give "
                         "the latency.json of a benchmarks.latency --out folder") from None
    for path in write_outputs(result, source.parent).values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
