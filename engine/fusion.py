"""Which attentions of an ONNX graph the TensorRT builder fuses into MHA kernels, from its own log.

    python -m engine.fusion BUILD_DIR | MODEL.onnx [--log BUILDER_LOG] [--size PX] [--opt-level N]
        [--backend tensorrt-rtx|tensorrt] [--save-log FILE]

"Fused" is what the builder reports, not what the graph was meant to be: while it builds, the
TensorRT-RTX builder logs, at VERBOSE severity, one line per ONNX node it folds into a fused
attention kernel:

    Found /unet/down_blocks.1/attentions.0/transformer_blocks.0/attn2/Softmax to be part of self-attention pattern.

(TensorRT-RTX 1.7; the same line for the pattern's two MatMuls.) A Softmax that the builder
leaves out runs as its own softmax kernel between two plain GEMMs. The report counts the
Softmax nodes of the graph (in the UNet every Softmax is an attention's) against those lines.
The pattern match does not depend on `ProfilingVerbosity` or the optimisation level; engines are
built by `engine.build.build_engine`, the same call the build directory's engines come from.

Measured on the tiny UNets (17 attn1 + 17 decoupled attn2 layers, tests/test_engine_fusion.py):
`--attention stacked` 34/34 fused, `unfused` 51/51, `fused` (concatenated keys, a softmax per
segment) 17/51: only the self-attentions, none of the decoupled cross-attentions.

With a BUILD_DIR every `onnx/unet*.onnx` is built (one at a time, plans thrown away). `--log`
reads a saved VERBOSE builder log instead of building (e.g. of the full-scale SDXL UNet, whose
build needs ~21 GB of memory; `--save-log` writes one). Exit status 1 when any Softmax is left
unfused.
"""
from __future__ import annotations

import re
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from engine.backend import Backend, load_backend

PATTERN = re.compile(r"Found (?P<node>\S+) to be part of self-attention pattern")


@dataclass(frozen=True)
class FusionReport:
    """Softmax nodes of one ONNX graph and how many the builder fused into attention kernels.

    onnx: the graph's path; total: its Softmax nodes; fused: those the builder reported as part
    of a self-attention pattern; unfused: names of the others, in graph order; backend: who built.
    """

    onnx: str
    total: int
    fused: int
    unfused: tuple[str, ...]
    backend: str = ""

    @property
    def complete(self) -> bool:
        """True when every Softmax of the graph runs inside a fused attention kernel."""
        return self.fused == self.total

    def line(self) -> str:
        """'unet_instantid.onnx: 34/34 Softmax fused into attention kernels (tensorrt-rtx 1.7.1)'."""
        by = f" ({self.backend})" if self.backend else ""
        return f"{Path(self.onnx).name}: {self.fused}/{self.total} Softmax fused into attention kernels{by}"


def softmax_nodes(onnx_path: str | Path) -> list[str]:
    """Names of the Softmax nodes of the main graph, in graph order (weights are not loaded)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    names = [node.name for node in graph.node if node.op_type == "Softmax"]
    if any(not name for name in names):
        raise ValueError(f"{onnx_path} has unnamed Softmax nodes; the builder log names nodes, so "
                         "export with node names (torch.onnx.export names every node)")
    return names


def fused_nodes(builder_log: Iterable[str]) -> set[str]:
    """ONNX node names the builder log reports as 'part of self-attention pattern'."""
    return {m.group("node") for line in builder_log for m in PATTERN.finditer(line)}


def report_from_log(onnx_path: str | Path, builder_log: Iterable[str], backend: str = "") -> FusionReport:
    """The FusionReport of `onnx_path` from the lines of a VERBOSE builder log of that graph."""
    names, fused = softmax_nodes(onnx_path), fused_nodes(builder_log)
    unfused = tuple(name for name in names if name not in fused)
    return FusionReport(str(onnx_path), len(names), len(names) - len(unfused), unfused, backend)


@contextmanager
def verbose_log(backend: Backend) -> Iterator[list[str]]:
    """Collect the process-wide TensorRT logger's VERBOSE lines while inside the block."""
    logger = backend.logger()
    logger.verbose = []
    try:
        yield logger.verbose
    finally:
        logger.verbose = None


def build_report(onnx_path: str | Path, backend: Backend | str | None = None, size: int = 1024,
                 opt_level: int = 3, save_log: str | Path | None = None) -> FusionReport:
    """Build `onnx_path` (one profile fixed at batch 1, size x size px; the plan is discarded) and
    report its fusion from the builder's log. backend: a Backend, its name, or None (detect).
    Raises what engine.build.build_engine raises (parse and build errors name the cause)."""
    from engine.build import build_engine
    from engine.manifest import describe_onnx
    from engine.profiles import Geometry, profile_for

    backend = backend if isinstance(backend, Backend) else load_backend(backend)
    onnx_path = Path(onnx_path)
    inputs = {t.name: t.shape for t in describe_onnx(onnx_path).inputs}
    profile = profile_for(inputs, Geometry.fixed(1, size, size))
    with tempfile.TemporaryDirectory() as folder, verbose_log(backend) as lines:
        build_engine(onnx_path, Path(folder) / "engines" / "probe.plan", [profile], backend, opt_level=opt_level)
    if save_log is not None:
        Path(save_log).write_text("\n".join(lines) + "\n")
    return report_from_log(onnx_path, lines, f"{backend.name} {backend.version}")


def graphs_of(path: Path) -> list[Path]:
    """A .onnx file itself, or a build directory's onnx/unet*.onnx."""
    if path.is_file():
        return [path]
    found = sorted((path / "onnx").glob("unet*.onnx"))
    if not found:
        raise SystemExit(f"{path} is neither an ONNX file nor a build directory with onnx/unet*.onnx; "
                         "export one with: python -m export.build --model tiny --stage onnx")
    return found


def main(argv: list[str] | None = None) -> int:
    """CLI (see module docstring): one report line per graph, then the unfused Softmax names."""
    from export.cli import ArgumentParser

    parser = ArgumentParser(prog="python -m engine fusion", description=__doc__.split("\n")[0],
                            epilog="examples:\n  python -m engine fusion build/tiny\n"
                                   "  python -m engine fusion build/sdxl/onnx/unet_instantid.onnx --size 1024 "
                                   "--save-log unet.log")
    parser.add_argument("path", type=Path, help="build directory or .onnx file")
    parser.add_argument("--log", type=Path, help="saved VERBOSE builder log of the (single) graph: no build")
    parser.add_argument("--save-log", type=Path, help="write the builder's VERBOSE log here (single graph)")
    parser.add_argument("--backend", default=None, help="tensorrt-rtx | tensorrt (default: detect)")
    parser.add_argument("--size", type=int, default=1024, help="image size of the build profile, pixels")
    parser.add_argument("--opt-level", type=int, default=3, help="builder optimisation level 0-5")
    args = parser.parse_args(argv)
    graphs = graphs_of(args.path)
    if (args.log or args.save_log) and len(graphs) != 1:
        raise SystemExit(f"--log/--save-log need one graph; {args.path} has {len(graphs)}: pass one .onnx")
    incomplete = False
    for graph in graphs:
        if args.log:
            report = report_from_log(graph, args.log.read_text().splitlines())
        else:
            report = build_report(graph, args.backend, args.size, args.opt_level, args.save_log)
        print(report.line())
        for name in report.unfused:
            print(f"  not fused: {name}")
        incomplete |= not report.complete
    return 1 if incomplete else 0


if __name__ == "__main__":
    sys.exit(main())
