r"""Serve a build directory over HTTP (uvicorn, one process, one GPU worker thread).

examples:
  python -m runtime.serve --build build/tiny --port 8000
  curl --fail-with-body -F image=@build/tiny/astronaut.png -F prompt="a portrait" -F steps=4 \
      -o out.png http://127.0.0.1:8000/v1/instantid
  python -m runtime.serve --build build/sdxl --backend tensorrt --max-queue 32 --max-batch 2

See docs/serving.md for the endpoints, the request fields and the error table. Each request is
logged as one line (method, path, status, time in ms) unless --no-access-log.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from runtime.console import Parser, UsageError, backend_choice, check_backend, run_command


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The serve flags (shared with `python -m runtime serve`)."""
    from runtime.pipelines import PIPELINES

    parser.add_argument("--build", type=Path, required=True, help="build directory (python -m export.build --out)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 to accept remote clients)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    parser.add_argument("--backend", default="onnxruntime", type=backend_choice,
                        help="onnxruntime (CPU or GPU) | tensorrt | tensorrt-rtx (NVIDIA GPU, the build's engines) | "
                        "torch (the build's torch.export programs)")
    parser.add_argument("--pipelines", default="", help=f"comma-separated subset of {','.join(PIPELINES)} "
                        "(default: every pipeline the build has)")
    parser.add_argument("--max-queue", type=int, default=16, help="waiting requests beyond this get 429")
    parser.add_argument("--max-batch", type=int, default=4, help="compatible requests per worker turn")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long to wait for batch partners")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="per-request limit (504 beyond)")
    parser.add_argument("--body-timeout-s", type=float, default=30.0,
                        help="limit from a request's headers to the end of its body (408 beyond)")
    parser.add_argument("--header-timeout-s", type=float, default=10.0,
                        help="limit for a request's headers to arrive (408 and the connection closed beyond)")
    parser.add_argument("--shutdown-grace-s", type=float, default=30.0,
                        help="on SIGTERM, how long the running batch may take to finish (queued requests get 503)")
    parser.add_argument("--max-body-mb", type=float, default=20.0, help="request body limit (413 beyond)")
    parser.add_argument("--max-image-pixels", type=int, default=25_000_000, help="input photo limit (413 beyond)")
    parser.add_argument("--max-side", type=int, default=None,
                        help="largest output side served (422 beyond); default: the least of 2048, the engines' "
                        "profile and (ONNX Runtime) what --memory-gb holds for one image")
    parser.add_argument("--max-cost", type=float, default=200.0,
                        help="largest request cost in megapixel-steps: width x height / 1024^2 x steps x num_images "
                        "(422 beyond; 200 = 50 steps of four 1024x1024 images)")
    parser.add_argument("--memory-gb", type=float, default=None,
                        help="ONNX Runtime: memory a run may use for its attention (422 for sizes that need more); "
                        "default: found at start-up (MemAvailable, cgroup, rlimits) less the weights")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="steps of the warm-up generation (default: the requests' default, 30, where the loop "
                        "is captured in a CUDA graph, so the first request replays it; else 2)")
    parser.add_argument("--warmup-size", type=int, default=None, help="default: the model's resolution")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: ONNX Runtime's choice, one per core)")
    parser.add_argument("--trust-torch-programs", action="store_true",
                        help="--backend torch: load the build's torch.export programs. They unpickle, so a crafted "
                        "program runs code at start-up: use only with a build you made or trust")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="server log level (the access log is at info)")
    parser.add_argument("--no-access-log", dest="access_log", action="store_false",
                        help="do not log one line per request (method, path, status, time in ms)")
    return parser


def add_subcommand(commands) -> argparse.ArgumentParser:
    """Register `serve` on the subparsers of `python -m runtime` (runtime/__main__.py)."""
    return add_arguments(commands.add_parser("serve", help="HTTP service over a build (docs/serving.md)",
                                             description=__doc__.split("\n\n")[0],
                                             epilog=__doc__.split("\n\n", 1)[1]))


def serve(args: argparse.Namespace) -> int:
    """Build the app from parsed flags and run uvicorn until interrupted (SIGTERM: queued requests
    503, the running batch finishes). Returns 1 when the pipelines fail to load or warm up."""
    from runtime.serve.app import ServeConfig, create_app
    from runtime.serve.capacity import limits_for
    from runtime.serve.served import available_pipelines, load_pipelines
    from runtime.serve.server import build_server

    if not (args.build / "manifest.json").is_file():
        print(f"error: {args.build} is not a build directory (no manifest.json): build one with "
              f"python -m export.build --model tiny --stage onnx --out {args.build}", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.pipelines.split(",") if n.strip()]
    have = available_pipelines(args.build)
    if any(name not in have for name in names):
        raise UsageError(f"--pipelines {args.pipelines}: {args.build} has {', '.join(have) or 'no pipeline'}: choose "
                         "among them, or export the others (python -m export.build --pipeline NAME)")
    check_backend(args.backend)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    limits = limits_for(args.build, args.backend, names, args.max_side,
                        args.memory_gb, args.max_batch, max_body_bytes=int(args.max_body_mb * 2**20),
                        max_image_pixels=args.max_image_pixels, max_cost=args.max_cost)
    config = ServeConfig(max_queue=args.max_queue, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                         timeout_s=args.timeout_s, limits=limits, body_timeout_s=args.body_timeout_s,
                         private_paths=(str(args.build), str(args.build.resolve())))
    failed: list[BaseException] = []

    def stop(error: BaseException) -> None:  # a build that cannot load or warm up never will: exit
        failed.append(error)
        server.should_exit = True

    app = create_app(config, lambda: load_pipelines(args.build, args.backend, names, args.warmup_steps,
                                                    args.warmup_size, args.threads,
                                                    trust_programs=args.trust_torch_programs), stop)
    server = build_server(app, args.host, args.port, args.log_level, header_timeout_s=args.header_timeout_s,
                          grace_s=args.shutdown_grace_s,
                          before_shutdown=lambda: app.state.serve.begin_shutdown(args.shutdown_grace_s),
                          access_log=args.access_log)
    server.run()
    if failed:
        print(f"error: start-up failed: {type(failed[0]).__name__}: {failed[0]} (the log above has the traceback)",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m runtime.serve` (a user mistake: one `error:` line, status 2)."""
    parser = Parser(prog="python -m runtime.serve", description=__doc__.split("\n\n")[0],
                    epilog=__doc__.split("\n\n", 1)[1])
    return run_command(lambda args: serve(add_arguments(parser).parse_args(args)), argv)


if __name__ == "__main__":
    sys.exit(main())
