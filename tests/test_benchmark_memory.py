"""Benchmark memory figures: device-wide GPU memory (total - free) is None on the CPU, host RSS is measured,
and the report labels each figure by what it counts."""
from __future__ import annotations

import pytest
import torch

from benchmarks.load import gpu_memory_used, memory_summary
from benchmarks.report import markdown, memory_rows
from benchmarks.timing import PeakMemory, device_memory_used


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU answers")
def test_device_memory_is_none_on_the_cpu_and_host_rss_is_measured():
    assert device_memory_used("cpu") is None and device_memory_used(torch.device("cpu")) is None
    assert device_memory_used("cuda") is None  # no GPU here: no figure rather than a wrong one
    with PeakMemory("cpu") as memory:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        memory.sample()
    figures = memory.as_dict()
    assert figures["kind"] == "cpu_rss" and block.sum() > 0
    assert figures["device_peak_bytes"] is None and figures["device_start_bytes"] is None
    assert figures["torch_max_allocated_bytes"] is None
    assert figures["peak_bytes"] - figures["start_bytes"] >= 32 * 2**20


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU answers")
def test_load_generator_reports_no_gpu_memory_without_a_gpu():
    assert gpu_memory_used(0) is None
    assert memory_summary([], 10.0) is None
    summary = memory_summary([(0.0, 100.0), (3.0, 120.0), (6.0, 130.0), (9.0, 125.0)], 10.0)
    assert (summary["start"], summary["end"], summary["max"], summary["growth_after_first_quarter"]) == \
        (100.0, 125.0, 130.0, 5.0)


def _memory(kind: str) -> dict:
    gpu = kind == "cuda_device_used"
    return {"kind": kind, "peak_bytes": 9 * 2**30 if gpu else 700 * 2**20, "start_bytes": 2**30 if gpu else 2**28,
            "device_peak_bytes": 9 * 2**30 if gpu else None, "device_start_bytes": 2**30 if gpu else None,
            "torch_max_allocated_bytes": 3 * 2**30 if gpu else None}


def test_report_labels_each_memory_figure():
    rows = dict(memory_rows())
    assert list(rows) == ["peak memory", "peak device memory (total − free)",
                          "torch max allocated (secondary: torch tensors only)"]
    cpu, gpu = _memory("cpu_rss"), _memory("cuda_device_used")
    assert rows["peak memory"](cpu) == "700 MiB (host RSS)"
    assert rows["peak device memory (total − free)"](cpu) == "–"
    assert rows["torch max allocated (secondary: torch tensors only)"](cpu) == "–"
    assert rows["peak memory"](gpu) == "9 GiB (GPU, device-wide total − free)"
    assert rows["peak device memory (total − free)"](gpu) == "9 GiB (+8 GiB over start)"
    assert rows["torch max allocated (secondary: torch tensors only)"](gpu) == "3 GiB"
    old = {"kind": "cuda_max_allocated", "peak_bytes": 2**30, "start_bytes": 0}  # a latency.json from before
    assert rows["peak device memory (total − free)"](old) == "–" and rows["peak memory"](old).startswith("1 GiB")

    result = {"config": {"pipeline": "instantid", "model": "tiny", "resolution": [128, 128], "batch": 1, "steps": 2,
                         "runs": 1, "warmup": 0},
              "machine": {"cpu": "cpu", "cpu_cores": 2, "gpus": [], "versions": {}}, "date": "today",
              "command": "python -m benchmarks.latency", "stages": ["end_to_end"], "speedups": {},
              "backends": [{"name": "onnxruntime", "available": True, "cold_start_s": 1.0, "memory": cpu,
                            "stages": {"end_to_end": None}},
                           {"name": "tensorrt", "available": True, "cold_start_s": 2.0, "memory": gpu,
                            "stages": {"end_to_end": None}}]}
    table = markdown(result)
    assert "| peak memory | 700 MiB (host RSS) | 9 GiB (GPU, device-wide total − free) |" in table
    assert "| peak device memory (total − free) | – | 9 GiB (+8 GiB over start) |" in table
    assert "| torch max allocated (secondary: torch tensors only) | – | 3 GiB |" in table
