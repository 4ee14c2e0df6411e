r"""`python -m benchmarks <benchmark> ...`: the benchmark commands under one name.

benchmarks:
  latency   per-stage latency of the PyTorch baseline and the runtime backends (latency.json/.md/.png)
  flops     FLOPs of every stage and the device's matmul peak: the physical floor
  load      N concurrent clients against a running server (python -m runtime.serve)
  report    rewrite latency.md / latency.png from a latency.json
  control_window  what the IdentityNet's step window saves: loop FLOPs and measured loop time

examples:
  python -m benchmarks latency --build build/tiny --steps 4 --runs 3 --out bench/
  python -m benchmarks flops --model sdxl --resolution 1024 --peak
  python -m benchmarks load --url http://127.0.0.1:8000 --clients 4 --seconds 30
  python -m benchmarks report bench/latency.json

`python -m benchmarks <benchmark> --help` (or python -m benchmarks.<benchmark> --help) for its flags.
"""
from __future__ import annotations

import sys

from runtime.console import UsageError, run_command

COMMANDS = ("latency", "flops", "load", "report", "control_window")


def main(argv: list[str] | None = None) -> int:
    """Dispatch to benchmarks.<benchmark>.main with the remaining arguments; --help lists them."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in ("-h", "--help"):
        return run_command(_usage, argv)
    if not argv or argv[0] not in COMMANDS:
        what = "no benchmark given" if not argv else f"unknown benchmark {argv[0]!r}"
        return run_command(lambda _: _refuse(f"{what}: choose one of {', '.join(COMMANDS)} "
                                             "(see python -m benchmarks --help)"), argv)
    from importlib import import_module

    return import_module(f"benchmarks.{argv[0]}").main(argv[1:])


def _usage(_argv) -> int:
    print(f"usage: python -m benchmarks {{{','.join(COMMANDS)}}} [args]\n\n{__doc__.strip()}", flush=True)
    return 0


def _refuse(message: str) -> int:
    raise UsageError(message)


if __name__ == "__main__":
    sys.exit(main())
