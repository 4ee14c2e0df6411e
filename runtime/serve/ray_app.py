"""Scale-out on Ray Serve: the same pipelines, schemas and error answers, one replica per GPU.

    python -m runtime.serve.ray_app --build build/sdxl --backend tensorrt --port 8000
    serve run runtime.serve.ray_app:build_app build=build/tiny                  # Ray's own CLI

Each replica opens the build's pipelines once and runs them on its own GPU (`num_gpus=1` when the
cluster has GPUs; CPU replicas with ONNX Runtime otherwise). `@serve.batch` gathers the requests
that reach a replica within `batch_wait_ms`; they are grouped by key as in the single-machine
server and run one group at a time (the GPU is one resource). Ray's autoscaler adds replicas while
more than `target_ongoing` requests per replica are in flight, up to one per GPU; beyond
`max_queued` waiting requests Ray answers 503 instead of queueing without bound.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from runtime.serve.app import error_response, respond
from runtime.serve.inputs import Limits, pipeline_kwargs, read_fields, validate
from runtime.serve.schemas import BadRequest
from runtime.serve.served import load_pipelines


@serve.deployment(max_ongoing_requests=8)
class PipelineDeployment:
    """One replica: the build's pipelines, batched per replica, answering the HTTP API of app.py
    (POST /v1/<pipeline>, GET /healthz, /readyz)."""

    def __init__(self, build: str, backend: str = "onnxruntime", pipelines: tuple[str, ...] = (),
                 limits: Limits | None = None, warmup_steps: int | None = None, warmup_size: int | None = None,
                 threads: int | None = None, max_batch: int = 4, batch_wait_ms: float = 5.0):
        self.run_batch.set_max_batch_size(max_batch)
        self.run_batch.set_batch_wait_timeout_s(batch_wait_ms / 1000)
        self.limits = limits or Limits()
        self.pipelines = load_pipelines(build, backend, pipelines, warmup_steps, warmup_size, threads)
        for served in self.pipelines.values():
            served.warmup()  # Ray routes to a replica only after its constructor returned: ready

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.005)
    async def run_batch(self, items: list[tuple[str, tuple, dict]]) -> list[Any]:
        """[(pipeline, key, kwargs)] -> per item: list of images or the exception; by key, one group at a time."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, (_, key, _) in enumerate(items):
            groups[key].append(index)
        results: list[Any] = [None] * len(items)
        for key, indices in groups.items():
            served = self.pipelines[items[indices[0]][0]]
            outputs = await asyncio.to_thread(lambda: list(served.run_batch(key, [items[i][2] for i in indices])))
            for index, output in zip(indices, outputs):
                results[index] = output
        return results

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/")
        if request.method == "GET" and path.endswith(("/healthz", "/readyz")):
            return JSONResponse({"status": "ready", "pipelines": list(self.pipelines)})
        name = path.rsplit("/", 1)[-1]
        if request.method != "POST" or name not in self.pipelines:
            return error_response(name, BadRequest(f"POST /v1/<pipeline>, one of: {', '.join(self.pipelines)}",
                                                   404, "no_pipeline"))
        started = time.perf_counter()
        timings: dict[str, float] = {}
        try:
            request_model, images = validate(name, await read_fields(request, self.limits))
            t0 = time.perf_counter()
            served = self.pipelines[name]
            kwargs, key = await asyncio.to_thread(pipeline_kwargs, name, request_model, images, self.limits,
                                                  served.default_size, served.info.get("default_resolution", 1024))
            timings["decode"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            output = await self.run_batch((name, key, kwargs))
            timings["run"] = time.perf_counter() - t0
            if isinstance(output, BaseException):
                raise output
            return await asyncio.to_thread(respond, name, request_model, output, timings, started)
        except Exception as error:  # noqa: BLE001 - every failure becomes a JSON answer
            return error_response(name, error)


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
    batch_wait_ms, max_side, warmup_size, threads. Reads the cluster's GPU count from Ray.
    """
    import ray

    if "build" not in args:
        raise ValueError("pass build=DIR (a directory made by python -m export.build)")
    gpus = float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0
    max_batch = int(args.get("max_batch", 4))
    options = deployment_options(gpus, _int(args.get("max_replicas")), max_queued=int(args.get("max_queued", 32)),
                                 max_batch=max_batch)
    limits = Limits(max_side=int(args.get("max_side", 2048)))
    pipelines = tuple(n for n in str(args.get("pipelines", "")).split(",") if n)
    deployment = PipelineDeployment.options(**options)
    app = deployment.bind(str(args["build"]), args.get("backend", "onnxruntime"), pipelines, limits,
                          _int(args.get("warmup_steps")), _int(args.get("warmup_size")), _int(args.get("threads")),
                          max_batch, float(args.get("batch_wait_ms", 5.0)))
    return app


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
    args = parser.parse_args(argv)
    ray.init(address=args.address, include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app({"build": args.build, "backend": args.backend, "pipelines": args.pipelines,
                         "max_replicas": args.max_replicas, "max_queued": args.max_queued,
                         "max_side": args.max_side}), route_prefix="/", name="instantrt")
    print(f"serving {args.build} on http://{args.host}:{args.port} (Ctrl+C to stop)", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
