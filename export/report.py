"""What `python -m export.build` prints: one line per component as it finishes (exported, or unchanged
and kept), the summary table, and no repeated library chatter.

`quiet_libraries(verbose)` silences what repeats on every component and says nothing to a user:
diffusers' "modules that should be kept in float32: []" (an empty list), the per-model "Loading
weights" / "Writing model shards" bars of transformers, torch.onnx's TracerWarnings, and the
TensorRT builder's warnings (`engine.trt`; `-v` shows them). Hub download bars and every other
warning stay.
"""
from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass

EMPTY_FP32_LIST = re.compile(r"should be kept in float32: \[\]")
_QUIET = False


@dataclass
class Row:
    """One line of the summary table (params: the weights in the ONNX graph or program)."""

    component: str
    params: int
    onnx_bytes: int
    load_seconds: float     # loading / random-initialising the PyTorch modules
    export_seconds: float   # trace + graph cleanup + save
    peak_rss_gb: float      # process peak so far
    status: str = "exported"  # "exported (<why>)" | "unchanged, kept"


class _DropMessages(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_libraries(verbose: bool = False) -> None:
    """Filter the known noisy messages (see the module docstring); `verbose` keeps the builder's. Loads
    diffusers and transformers: call it once they are needed anyway; calling it again does nothing."""
    global _QUIET
    if _QUIET:
        return
    _QUIET = True
    logging.getLogger("engine.trt").setLevel(logging.INFO if verbose else logging.ERROR)
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.get_logger("diffusers").addFilter(_DropMessages(EMPTY_FP32_LIST))
        for handler in logging.getLogger("diffusers").handlers:
            handler.addFilter(_DropMessages(EMPTY_FP32_LIST))
    except ImportError:
        pass
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # per-model "Loading weights" / "Writing model shards"
        from huggingface_hub.utils import enable_progress_bars

        enable_progress_bars()  # ...which also turned off the hub's download bars: those stay
    except ImportError:
        pass
    try:
        from torch.jit import TracerWarning

        warnings.filterwarnings("ignore", category=TracerWarning)
    except ImportError:
        pass


def component_line(index: int, total: int, row: Row) -> str:
    """'[ 3/13] image_encoder         exported in 0.4 s (load 0.1 s)' or '... unchanged, kept'."""
    head = f"[{index:>{len(str(total))}}/{total}] {row.component:<22}"
    if row.status.startswith("unchanged"):
        return f"{head}{row.status}"
    return f"{head}{row.status} in {row.export_seconds:.1f} s (load {row.load_seconds:.1f} s)"


def say(line: str) -> None:
    """Print a progress line now (stdout, flushed: make and pipes show it as it happens)."""
    print(line, flush=True)


def summary_table(rows: list[Row]) -> str:
    """Plain-text table: component, params, file MB (ONNX or program), load s, export s, peak RSS so
    far, status."""
    from engine.build_all import format_count

    header = ("component", "params", "file MB", "load s", "export s", "peak RSS GB", "status")
    lines = [(r.component, format_count(r.params), f"{r.onnx_bytes / 1e6:.1f}", f"{r.load_seconds:.1f}",
              f"{r.export_seconds:.1f}", f"{r.peak_rss_gb:.1f}", r.status) for r in rows]
    kept = sum(r.status.startswith("unchanged") for r in rows)
    total = ("total", format_count(sum(r.params for r in rows)), f"{sum(r.onnx_bytes for r in rows) / 1e6:.1f}",
             f"{sum(r.load_seconds for r in rows):.1f}", f"{sum(r.export_seconds for r in rows):.1f}",
             f"{max((r.peak_rss_gb for r in rows), default=0):.1f}",
             f"{len(rows) - kept} exported, {kept} kept")
    table = [header, *lines, total]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) if i in (0, len(header) - 1) else c.rjust(w)
                      for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in table]
    text.insert(1, "  ".join("-" * w for w in widths))
    text.insert(len(text) - 1, text[1])
    return "\n".join(text)

