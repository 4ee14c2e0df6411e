"""`python -m benchmarks latency|flops|report ...`: the benchmark commands under one name.

    python -m benchmarks latency --build build/tiny --backend onnxruntime --steps 4 --resolution 128 --out results
    python -m benchmarks flops --model sdxl --resolution 1024 --peak
    python -m benchmarks report results/latency.json
"""
from __future__ import annotations

import sys

COMMANDS = ("latency", "flops", "report")


def main(argv: list[str] | None = None) -> int:
    """Dispatch to benchmarks.<command>.main with the remaining arguments."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m benchmarks {{{'|'.join(COMMANDS)}}} [args]  (see --help of each)", file=sys.stderr)
        return 2
    from importlib import import_module

    return import_module(f"benchmarks.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
