"""benchmarks/device_check.sh in its reduced CPU mode: every step runs, and what it returns fits the
device's limits (at most 8 files, 16 MiB each, plain names, no deeper than two folders)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_FILES, MAX_FILE_BYTES = 8, 16 * 2**20
NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def test_device_check_rehearsal(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, MODEL="tiny", RES="64", STEPS="2", RUNS="1", LOOP="auto", BUDGET_S="240",
               PYTHON=sys.executable, OUT=str(out), WORK=str(work), WHEELS=str(tmp_path / "no-wheels"))
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "device_check.sh")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    first = run.stdout.splitlines()[0]
    assert first == ("device check: times the torch backend with the 'auto' loop vs the diffusers baseline, "
                     "fp32, tiny 64², 2 steps")

    steps = dict(line.split("\t")[:2] for line in (out / "steps.tsv").read_text().splitlines()[1:])
    assert steps == {name: "ok" for name in ("machine", "imports", "weights", "build", "register", "latency",
                                              "gpu_tests")}

    returned = [p for p in out.rglob("*") if p.is_file()]
    assert sorted(p.name for p in returned) == ["device_check.md", "latency.json", "latency.md", "logs.tar.gz",
                                                "steps.tsv"]
    assert len(returned) <= MAX_FILES
    for path in returned:
        assert path.stat().st_size <= MAX_FILE_BYTES and NAME.match(path.name)
        assert len(path.relative_to(out).parts) <= 3

    report = json.loads((out / "latency.json").read_text())
    torch_backend = next(b for b in report["backends"] if b.get("latents_rel_to_baseline") is not None)
    assert torch_backend["latents_rel_to_baseline"] < 1e-5  # one random init: runtime == baseline
    table = (out / "device_check.md").read_text()
    assert "| latency | ok |" in table and "denoise_loop" in table
