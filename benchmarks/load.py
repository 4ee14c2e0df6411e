"""Load generator for `python -m runtime.serve`: N concurrent clients for M seconds.

    python -m benchmarks.load --url http://127.0.0.1:8000 --clients 8 --seconds 60 --out load.json

Each client posts one request, waits for the answer, and posts the next (closed loop). Reports
throughput, latency percentiles of the successful answers, answers by status, and the server's
resident memory over time (from /metrics `process_resident_memory_bytes`, or psutil with --pid)
and, with --gpu N (a server on this machine), GPU N's device-wide used memory over time (NVML:
pynvml when importable, else nvidia-smi; no CUDA context is created here), which counts what
TensorRT allocates outside torch; `gpu_used_mb` is None without --gpu or a readable GPU.
Exit status 1 when any request failed (a non-200 answer or a transport error).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import io
import json
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

RSS_PATTERN = re.compile(r"^process_resident_memory_bytes\s+(\S+)$", re.M)


def default_photo(pipeline: str) -> bytes:
    """A JPEG: scikit-image's astronaut (one face; REFERENCE.md) for a face pipeline, else its cat."""
    from PIL import Image

    from runtime.pipelines import pipeline_entry

    try:
        import skimage.data
    except ImportError:
        raise SystemExit("no default photo: scikit-image (which ships them) is not installed; pass --image PATH") from None

    rgb = skimage.data.astronaut() if pipeline_entry(pipeline).face else skimage.data.chelsea()
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def request_body(args) -> dict:
    """The JSON body every client sends."""
    photo = args.image.read_bytes() if args.image else default_photo(args.pipeline)
    body = {"prompt": args.prompt, "image": base64.b64encode(photo).decode(), "steps": args.steps,
            "seed": 0, "format": args.format}
    if args.width:
        body.update(width=args.width, height=args.height or args.width)
    return body


def percentiles(latencies: list[float]) -> dict[str, float]:
    """Latency summary in milliseconds (empty dict when there are none)."""
    if not latencies:
        return {}
    values = np.asarray(latencies) * 1000
    return {"p50": float(np.percentile(values, 50)), "p90": float(np.percentile(values, 90)),
            "p99": float(np.percentile(values, 99)), "mean": float(values.mean()), "max": float(values.max())}


async def _client(http, url: str, body: dict, until: float, records: list) -> None:
    while time.monotonic() < until:
        start = time.monotonic()
        try:
            response = await http.post(url, json=body)
            status = str(response.status_code)
        except Exception as error:  # noqa: BLE001 - a transport error is a result too
            status = type(error).__name__
        records.append((start, time.monotonic() - start, status))


async def _sample_rss(http, base: str, pid: int | None, until: float, t0: float, samples: list,
                      every_s: float) -> None:
    process = None
    if pid is not None:
        import psutil

        process = psutil.Process(pid)
    while time.monotonic() < until:
        try:
            if process is not None:
                rss = process.memory_info().rss
            else:
                match = RSS_PATTERN.search((await http.get(base + "/metrics")).text)
                rss = float(match.group(1)) if match else None
            if rss is not None:
                samples.append((round(time.monotonic() - t0, 2), round(rss / 2**20, 1)))
        except Exception:  # noqa: BLE001 - a missed sample is not a failed request
            pass
        await asyncio.sleep(every_s)


def gpu_memory_used(index: int) -> int | None:
    """Device-wide used bytes of GPU `index` (NVML's numbering, as nvidia-smi's), read through NVML
    (pynvml when importable, else `nvidia-smi`); None when neither can read it (no GPU here)."""
    try:
        import pynvml
    except ImportError:
        pynvml = None
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used)
        except Exception:  # noqa: BLE001 - no driver, no such GPU: no figure
            return None
    try:
        answer = subprocess.run(["nvidia-smi", f"--id={index}", "--query-gpu=memory.used",
                                 "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
        return int(float(answer.stdout.strip().splitlines()[0]) * 2**20) if answer.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


async def _sample_gpu(index: int, until: float, t0: float, samples: list, every_s: float) -> None:
    while time.monotonic() < until:
        used = await asyncio.to_thread(gpu_memory_used, index)
        if used is not None:
            samples.append((round(time.monotonic() - t0, 2), round(used / 2**20, 1)))
        await asyncio.sleep(every_s)


def memory_summary(samples: list[tuple[float, float]], seconds: float) -> dict | None:
    """{start, end, max, growth_after_first_quarter, samples} of (t seconds, MiB) samples; None without any."""
    if not samples:
        return None
    values = [mb for _, mb in samples]
    settled = [mb for t, mb in samples if t >= seconds * 0.25]  # after warm-up of caches/allocators
    return {"start": values[0], "end": values[-1], "max": max(values),
            "growth_after_first_quarter": round(settled[-1] - settled[0], 1) if len(settled) > 1 else None,
            "samples": samples}


async def run(args) -> dict:
    """Drive the load and return the report dict."""
    import httpx

    body = request_body(args)
    url = f"{args.url.rstrip('/')}/v1/{args.pipeline}"
    limits = httpx.Limits(max_connections=args.clients + 2, max_keepalive_connections=args.clients + 2)
    async with httpx.AsyncClient(timeout=args.timeout_s, limits=limits) as http:
        ready = await http.get(args.url.rstrip("/") + "/readyz")
        if ready.status_code != 200:
            raise SystemExit(f"{args.url} is not ready ({ready.status_code} {ready.text}): wait for warm-up")
        t0 = time.monotonic()
        until = t0 + args.seconds
        records: list = []
        samples: list = []
        tasks = [_client(http, url, body, until, records) for _ in range(args.clients)]
        tasks.append(_sample_rss(http, args.url.rstrip("/"), args.pid, until + 0.5, t0, samples, args.sample_s))
        gpu_samples: list = []
        if args.gpu is not None:
            tasks.append(_sample_gpu(args.gpu, until + 0.5, t0, gpu_samples, args.sample_s))
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - t0
    statuses = Counter(status for _, _, status in records)
    ok = [latency for _, latency, status in records if status == "200"]
    return {
        "date": datetime.date.today().isoformat(),
        "command": "python -m benchmarks.load " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "url": args.url, "pipeline": args.pipeline, "clients": args.clients, "seconds": round(elapsed, 2),
        "request": {k: v for k, v in body.items() if k != "image"},
        "requests": len(records), "ok": len(ok),
        "throughput_rps": round(len(ok) / elapsed, 3),
        "latency_ms": {k: round(v, 1) for k, v in percentiles(ok).items()},
        "answers_by_status": dict(statuses),
        "errors": len(records) - len(ok),
        "rss_mb": memory_summary(samples, args.seconds) or {"start": None, "end": None, "max": None,
                                                            "growth_after_first_quarter": None, "samples": []},
        "gpu_used_mb": memory_summary(gpu_samples, args.seconds),  # device-wide (NVML); None: not measured
    }


def parser() -> argparse.ArgumentParser:
    """Flags of `python -m benchmarks.load`."""
    from runtime.pipelines import PIPELINES

    p = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--out", type=Path, help="write the report JSON here (it is printed either way)")
    p.add_argument("--pipeline", default="ip-adapter", choices=tuple(PIPELINES))
    p.add_argument("--image", type=Path, help="photo to send (default: scikit-image's astronaut / cat)")
    p.add_argument("--prompt", default="a portrait, oil painting")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--format", default="png", choices=["png", "jpeg", "webp"])
    p.add_argument("--timeout-s", type=float, default=300)
    p.add_argument("--pid", type=int, help="sample this process's RSS with psutil instead of /metrics")
    p.add_argument("--gpu", type=int, help="also sample this local GPU's device-wide used memory (NVML index)")
    p.add_argument("--sample-s", type=float, default=1.0, help="RSS / GPU memory sampling period")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit status 1 when any request failed."""
    args = parser().parse_args(argv)
    report = asyncio.run(run(args))
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    summary = {k: report[k] for k in ("requests", "ok", "throughput_rps", "latency_ms", "answers_by_status")}
    gpu = report["gpu_used_mb"]
    print(json.dumps({**summary, "rss_mb": {k: v for k, v in report["rss_mb"].items() if k != "samples"},
                      "gpu_used_mb": None if gpu is None else {k: v for k, v in gpu.items() if k != "samples"}}))
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
