"""Load generator for `python -m runtime.serve`: N concurrent clients for M seconds.

examples:
  python -m benchmarks.load --url http://127.0.0.1:8000 --clients 8 --seconds 60 --out load.json
  python -m benchmarks.load --pipeline instantid --width 256 --height 256 --steps 4 --seconds 30

Each client posts one request, waits for the answer, and posts the next (closed loop). Reports
throughput, latency percentiles of the successful answers, answers by status, and the server's
resident memory over time (from /metrics `process_resident_memory_bytes`, or psutil with --pid)
and, with --gpu N (a server on this machine), GPU N's device-wide used memory over time (NVML:
pynvml when importable, else nvidia-smi; no CUDA context is created here), which counts what
TensorRT allocates outside torch; `gpu_used_mb` is None without --gpu or a readable GPU.
Failed requests are counted by kind (`errors_by_kind`: the HTTP status and the server's error kind,
or the transport error's name) with one sample message each. Exit status 1 when any request failed
(a non-200 answer or a transport error); 2 for a user mistake (an unreachable server, a pipeline it
does not serve, a missing photo).
"""
from __future__ import annotations

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

from runtime.console import Parser, UsageError, run_command

RSS_PATTERN = re.compile(r"^process_resident_memory_bytes\s+(\S+)$", re.M)


def default_photo(pipeline: str) -> bytes:
    """A JPEG: scikit-image's astronaut (one face; REFERENCE.md) for a face pipeline, else its cat."""
    from PIL import Image

    from runtime.pipelines import pipeline_entry

    try:
        import skimage.data
    except ImportError:
        raise UsageError("no default photo: scikit-image (which ships them) is not installed; pass --image PATH") from None

    rgb = skimage.data.astronaut() if pipeline_entry(pipeline).face else skimage.data.chelsea()
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def request_body(args) -> dict:
    """The JSON body every client sends."""
    if args.image is not None and not args.image.is_file():
        raise UsageError(f"--image {args.image}: no such file: give the path of a photo (JPEG/PNG)")
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
    """Closed loop until `until`: records (start, seconds, status, kind, message) per request; kind
    and message are the server's error (status != '200') or the transport error's."""
    while time.monotonic() < until:
        start = time.monotonic()
        kind = message = None
        try:
            response = await http.post(url, json=body)
            status = str(response.status_code)
            if response.status_code != 200:
                kind, message = error_of(response)
        except Exception as error:  # noqa: BLE001 - a transport error is a result too
            status = kind = type(error).__name__
            message = str(error) or kind
        records.append((start, time.monotonic() - start, status, kind, message))


def error_of(response) -> tuple[str, str]:
    """(kind, message) of a server's error answer ({"error": {"kind", "message"}}), else the reason
    phrase and the body's start."""
    try:
        error = response.json()["error"]
        return str(error.get("kind", response.reason_phrase)), str(error.get("message", ""))
    except (ValueError, KeyError, TypeError, AttributeError):
        return response.reason_phrase or "error", response.text[:300]


def errors_by_kind(records: list) -> dict[str, dict]:
    """'<status> <kind>' (or the transport error's name) -> {count, sample message}, most frequent first."""
    found: dict[str, dict] = {}
    for _, _, status, kind, message in records:
        if status == "200":
            continue
        key = status if status == kind else f"{status} {kind}"
        entry = found.setdefault(key, {"count": 0, "sample": message})
        entry["count"] += 1
    return dict(sorted(found.items(), key=lambda item: -item[1]["count"]))


async def check_server(http, base: str, pipeline: str) -> None:
    """UsageError unless the server at `base` answers, serves `pipeline` and is ready."""
    import httpx

    try:
        ready = await http.get(base + "/readyz")
        schema = await http.get(base + "/v1/schema")
    except httpx.TransportError as error:
        raise UsageError(f"could not reach {base} ({type(error).__name__}: {error or 'no answer'}): start the server "
                         "(python -m runtime.serve --build DIR) or pass its --url") from None
    if ready.status_code != 200:
        raise UsageError(f"{base} is not ready ({ready.status_code} {ready.text[:300]}): wait for its warm-up")
    served = schema.json().get("pipelines") if schema.status_code == 200 else None
    names = list(served) if isinstance(served, (dict, list)) else None
    if names and pipeline not in names:
        raise UsageError(f"{base} serves {', '.join(names)}, not {pipeline}: pass --pipeline {names[0]}")


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
        await check_server(http, args.url.rstrip("/"), args.pipeline)
        size = f"{body['width']}x{body['height']}" if "width" in body else "the server's default size"
        print(f"load: {args.clients} client(s) for {args.seconds:g} s, pipeline {args.pipeline} ({url}), "
              f"{args.steps} steps, {size}...", file=sys.stderr, flush=True)
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
    statuses = Counter(record[2] for record in records)
    ok = [latency for _, latency, status, _, _ in records if status == "200"]
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
        "errors_by_kind": errors_by_kind(records),
        "rss_mb": memory_summary(samples, args.seconds) or {"start": None, "end": None, "max": None,
                                                            "growth_after_first_quarter": None, "samples": []},
        "gpu_used_mb": memory_summary(gpu_samples, args.seconds),  # device-wide (NVML); None: not measured
    }


def parser() -> Parser:
    """Flags of `python -m benchmarks.load`."""
    from runtime.pipelines import PIPELINES

    p = Parser(prog="python -m benchmarks.load", description=__doc__.split("\n")[0],
               epilog=__doc__.split("\n\n")[1])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of the server")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients, each posting its next request "
                   "when its answer arrives")
    p.add_argument("--seconds", type=float, default=60, help="how long the clients keep posting")
    p.add_argument("--out", type=Path, help="write the report JSON here (it is printed either way)")
    p.add_argument("--pipeline", default="ip-adapter", choices=tuple(PIPELINES), help="the endpoint: /v1/PIPELINE")
    p.add_argument("--image", type=Path, help="photo to send (default: scikit-image's astronaut / cat)")
    p.add_argument("--prompt", default="a portrait, oil painting", help="prompt of every request")
    p.add_argument("--steps", type=int, default=4, help="denoising steps of every request")
    p.add_argument("--width", type=int, help="output width in px (default: the server's default size)")
    p.add_argument("--height", type=int, help="output height in px (default: --width)")
    p.add_argument("--format", default="png", choices=["png", "jpeg", "webp"], help="image format of the answers")
    p.add_argument("--timeout-s", type=float, default=300, help="per-request client timeout")
    p.add_argument("--pid", type=int, help="sample this process's RSS with psutil instead of /metrics")
    p.add_argument("--gpu", type=int, help="also sample this local GPU's device-wide used memory (NVML index)")
    p.add_argument("--sample-s", type=float, default=1.0, help="RSS / GPU memory sampling period")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit status 1 when any request failed, 2 for a user mistake (runtime.console)."""
    return run_command(_main, argv)


def _main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    report = asyncio.run(run(args))
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    summary = {k: report[k] for k in ("requests", "ok", "throughput_rps", "latency_ms", "answers_by_status",
                                      "errors_by_kind")}
    gpu = report["gpu_used_mb"]
    print(json.dumps({**summary, "rss_mb": {k: v for k, v in report["rss_mb"].items() if k != "samples"},
                      "gpu_used_mb": None if gpu is None else {k: v for k, v in gpu.items() if k != "samples"}}))
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
