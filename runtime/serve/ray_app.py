"""Scale-out on Ray Serve: every replica runs the single-machine server's ASGI app (runtime/serve/app.py),
mounted with `serve.ingress`, so routes, validation, batching, metrics and error answers are that app's.

    python -m runtime.serve.ray_app --build build/sdxl --backend tensorrt --port 8000
    serve run runtime.serve.ray_app:build_app build=build/tiny                  # Ray's own CLI

Each replica opens the build's pipelines once and runs them on its own GPU (`num_gpus=1` when the
cluster has GPUs; CPU replicas with ONNX Runtime otherwise). The app's own queue gathers the requests
that reach a replica within `batch_wait_ms` into batches of equal settings. A replica's start-up
returns only once its pipelines are warmed up, so Ray never routes to a cold replica, and a build that
cannot load fails the replica. Ray's autoscaler adds replicas while more than `target_ongoing`
requests per replica are in flight, up to one per GPU; beyond `max_queued` waiting requests Ray
answers 503 instead of queueing without bound.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from ray import serve

from runtime.serve.app import ServeConfig, create_app
from runtime.serve.inputs import Limits


class WarmBeforeStartup:
    """An ASGI app's wrapper whose lifespan start-up completes once the app is ready (its pipelines
    loaded and warmed up): create_app warms up in a background thread and is routable at once, which
    suits one process behind a /readyz probe, while Ray routes to a replica as soon as its start-up
    ends. A failed warm-up fails the start-up (and so the replica). Everything else passes through."""

    def __init__(self, app, failures: list[BaseException]):
        self.app, self.failures = app, failures

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_when_warm(message: dict) -> None:
            if message["type"] == "lifespan.startup.complete":
                state = self.app.state.serve
                while not state.ready and not self.failures:
                    await asyncio.sleep(0.05)
                if self.failures:
                    error = self.failures[0]
                    message = {"type": "lifespan.startup.failed", "message": f"{type(error).__name__}: {error}"}
            await send(message)

        await self.app(scope, receive, send_when_warm)


def replica_app(build: str, backend: str, pipelines: tuple[str, ...], config: ServeConfig,
                warmup_steps: int | None = None, warmup_size: int | None = None, threads: int | None = None,
                trust_programs: bool = False) -> WarmBeforeStartup:
    """The ASGI app of one replica: `create_app` over the build's pipelines (runtime.serve.served), its
    start-up ending after warm-up."""
    from runtime.serve.served import load_pipelines

    failures: list[BaseException] = []
    app = create_app(config, lambda: load_pipelines(build, backend, pipelines, warmup_steps, warmup_size, threads,
                                                    trust_programs=trust_programs), failures.append)
    return WarmBeforeStartup(app, failures)


def deployment_options(gpus: float, max_replicas: int | None = None, target_ongoing: float = 2.0,
                       max_queued: int = 32, max_batch: int = 4) -> dict:
    """Ray options: one replica per GPU (num_gpus=1) when there are GPUs, else CPU replicas;
    autoscaling from 1 to max_replicas (default: the GPU count, or 1 on CPU)."""
    replicas = max_replicas or max(1, int(gpus))
    return dict(
        ray_actor_options={"num_gpus": 1, "num_cpus": 1} if gpus >= 1 else {"num_cpus": 1},
        autoscaling_config={"min_replicas": 1, "max_replicas": replicas, "target_ongoing_requests": target_ongoing,
                            "upscale_delay_s": 10, "downscale_delay_s": 120},
        max_ongoing_requests=max(2 * max_batch, int(2 * target_ongoing)),
        max_queued_requests=max_queued,
    )


def build_app(args: dict[str, Any]):
    """Application builder (`serve run runtime.serve.ray_app:build_app build=DIR backend=...`).

    args: build (required), backend, pipelines ('a,b'), max_replicas, max_queued, max_batch,
    batch_wait_ms, max_side, warmup_steps, warmup_size, threads, trust_torch_programs (1 to load the
    build's torch.export programs with backend=torch). Reads the cluster's GPU count from Ray.
    Returns the bound deployment: `serve.ingress` over `replica_app`, built on each replica.
    """
    import ray

    if "build" not in args:
        raise ValueError("pass build=DIR (a directory made by python -m export.build)")
    build = str(args["build"])
    gpus = float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0
    max_batch = int(args.get("max_batch", 4))
    options = deployment_options(gpus, _int(args.get("max_replicas")), max_queued=int(args.get("max_queued", 32)),
                                 max_batch=max_batch)
    # Ray bounds what reaches a replica (max_ongoing_requests) and queues the rest: the app's own
    # queue holds all of it, so the app never answers 429 below Ray's limit.
    config = ServeConfig(max_queue=options["max_ongoing_requests"], max_batch=max_batch,
                         batch_wait_ms=float(args.get("batch_wait_ms", 5.0)),
                         limits=Limits(max_side=int(args.get("max_side", 2048))),
                         private_paths=(build, str(Path(build).resolve())))
    settings = (build, args.get("backend", "onnxruntime"), tuple(n for n in str(args.get("pipelines", "")).split(",") if n),
                config, _int(args.get("warmup_steps")), _int(args.get("warmup_size")), _int(args.get("threads")),
                str(args.get("trust_torch_programs", "")).lower() in ("1", "true", "yes"))

    def asgi_app():  # evaluated on each replica as it starts
        return replica_app(*settings)

    deployment = serve.deployment(serve.ingress(asgi_app)(), name="PipelineDeployment", **options)
    return deployment.bind()


def _int(value) -> int | None:
    return None if value in (None, "") else int(value)


def main(argv: list[str] | None = None) -> int:
    """`python -m runtime.serve.ray_app`: start (or join, with --address) Ray, run the app, block."""
    import ray

    parser = argparse.ArgumentParser(prog="python -m runtime.serve.ray_app", description=__doc__.split("\n")[0])
    parser.add_argument("--build", type=Path, required=True)
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--pipelines", default="")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--address", default=None, help="an existing Ray cluster (default: start a local one)")
    parser.add_argument("--max-replicas", type=int, default=None)
    parser.add_argument("--max-queued", type=int, default=32)
    parser.add_argument("--max-side", type=int, default=2048)
    parser.add_argument("--trust-torch-programs", action="store_true",
                        help="--backend torch: load the build's torch.export programs (they unpickle)")
    args = parser.parse_args(argv)
    ray.init(address=args.address, include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app({"build": args.build, "backend": args.backend, "pipelines": args.pipelines,
                         "max_replicas": args.max_replicas, "max_queued": args.max_queued,
                         "max_side": args.max_side, "trust_torch_programs": int(args.trust_torch_programs)}),
              route_prefix="/", name="instantrt")
    print(f"serving {args.build} on http://{args.host}:{args.port} (Ctrl+C to stop)", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
