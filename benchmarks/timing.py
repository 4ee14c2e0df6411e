"""Timers, run statistics, peak memory and a description of the machine, for the latency harness.

Peak memory on a GPU is device-wide (total - free, `device_memory_used`), so it includes what
TensorRT allocates outside torch; torch's max_memory_allocated is kept only as a secondary figure.

Times are seconds. On CUDA a call is bracketed by CUDA events on the current stream (then
synchronised), so the GPU timeline between the start and the end of the call is measured,
host gaps included; on the CPU by `time.perf_counter`.
"""
from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

import torch


@dataclass
class Stats:
    """Summary of K timed runs (seconds): median, p90 (nearest rank), mean, min, max and every run."""

    median: float
    p90: float
    mean: float
    min: float
    max: float
    runs: list[float]


def summarize(times: list[float]) -> Stats:
    """Stats of a non-empty list of seconds."""
    if not times:
        raise ValueError("no timed runs: use --runs >= 1")
    ordered = sorted(times)
    n = len(ordered)
    median = ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])
    p90 = ordered[min(n - 1, max(0, -(-9 * n // 10) - 1))]  # nearest rank: ceil(0.9 n)
    return Stats(median, p90, sum(ordered) / n, ordered[0], ordered[-1], list(times))


def is_cuda(device: str | torch.device) -> bool:
    """True for a CUDA device (string or torch.device)."""
    return torch.device(device).type == "cuda"


def timed(fn: Callable[[], object], device: str | torch.device = "cpu") -> tuple[float, object]:
    """(seconds, result) of one call of `fn()`; CUDA events on a CUDA device, else perf_counter."""
    if is_cuda(device):
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3, result
    begin = time.perf_counter()
    result = fn()
    return time.perf_counter() - begin, result


def time_runs(fn: Callable[[], object], runs: int, warmup: int, device: str | torch.device = "cpu") -> list[float]:
    """Seconds of `runs` calls of `fn()` after `warmup` untimed calls."""
    for _ in range(warmup):
        timed(fn, device)
    return [timed(fn, device)[0] for _ in range(runs)]


def device_memory_used(device: str | torch.device = "cuda") -> int | None:
    """Bytes in use on a CUDA device, device-wide: total - free (`torch.cuda.mem_get_info`, i.e.
    cudaMemGetInfo). Unlike `torch.cuda.max_memory_allocated` it counts what TensorRT allocates itself
    (engine weights, execution contexts, its scratch), ONNX Runtime's CUDA EP, the CUDA context and
    other processes on the GPU. None on the CPU (or without CUDA)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(device)
    return int(total - free)


class PeakMemory:
    """Peak memory while the `with` block runs.

    CUDA (kind 'cuda_device_used'): peak_bytes is the peak of `device_memory_used` (device-wide total -
    free), sampled on entry, on exit, at every `sample()` call (the harness calls it after loading and
    after the first request) and every `interval` seconds by a thread; start_bytes is its value on entry,
    so peak - start is what the block added. torch_max_allocated_bytes (secondary, labelled as such):
    torch's own allocator peak, which misses TensorRT's engine weights and activations.
    CPU (kind 'cpu_rss'): the process's peak resident set, sampled the same way (psutil); the device
    figures (device_peak_bytes, device_start_bytes, torch_max_allocated_bytes) are None.
    """

    def __init__(self, device: str | torch.device = "cpu", interval: float = 0.01):
        self.device, self.interval = torch.device(device), interval
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.kind = "cuda_device_used" if self.cuda else "cpu_rss"
        self.peak_bytes = self.start_bytes = 0
        self.torch_max_allocated_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process = None

    def _read(self) -> int:
        if self.cuda:
            return device_memory_used(self.device)
        return self._process.memory_info().rss

    def sample(self) -> int:
        """Take one sample now (also done by the thread); returns it in bytes."""
        value = self._read()
        self.peak_bytes = max(self.peak_bytes, value)
        return value

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import psutil

            self._process = psutil.Process()
        self.start_bytes = self.peak_bytes = self._read()

        def sample():
            while not self._stop.wait(self.interval):
                self.sample()

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        if self.cuda:
            self.torch_max_allocated_bytes = int(torch.cuda.max_memory_allocated(self.device))

    def as_dict(self) -> dict:
        """{'kind', 'peak_bytes', 'start_bytes', 'device_peak_bytes', 'device_start_bytes',
        'torch_max_allocated_bytes'}: the device figures are None on the CPU."""
        device = self.kind == "cuda_device_used"
        return {"kind": self.kind, "peak_bytes": int(self.peak_bytes), "start_bytes": int(self.start_bytes),
                "device_peak_bytes": int(self.peak_bytes) if device else None,
                "device_start_bytes": int(self.start_bytes) if device else None,
                "torch_max_allocated_bytes": self.torch_max_allocated_bytes}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU model, usable cores, memory, GPU name(s) and the versions of the libraries that matter."""
    info = {"cpu": _cpu_model(), "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        import psutil

        info["memory_bytes"] = psutil.virtual_memory().total
    except ImportError:
        info["memory_bytes"] = None
    info["gpus"] = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                    if torch.cuda.is_available() else [])
    info["cuda"] = torch.version.cuda
    packages = ("torch", "onnxruntime", "onnxruntime-gpu", "tensorrt", "tensorrt-cu12", "tensorrt-rtx-cu12",
                "tensorrt_rtx_cu12", "diffusers", "transformers", "numpy")
    info["versions"] = {name: version for name in packages if (version := _version(name))}
    return info
