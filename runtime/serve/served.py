"""The pipelines a server runs, behind one small protocol, and how a batch of requests is run.

A `ServedPipeline` wraps anything callable as the runtime pipelines are:
`pipe(request) -> list[PIL.Image]` for the pipeline's request object (runtime/requests.py;
`runtime.pipelines.InstantIDPipeline` / `IPAdapterPipeline`, or a test double), plus a warm-up.

Batches: requests with one key (the pipeline and the request's loop settings: size, steps,
scheduler, guidance, scales; `runtime.requests.LoopSettings`) share ONE denoising loop: each is prepared on its own (face analysis, prompts, image tokens: a bad photo
fails only its request), then their rows are stacked into one engine call per step (`pipe.run`),
in as few calls as the engine profile's batch allows, and each request gets its own images (its
own seed, prompt and pose) or its own error. A pipeline without `prepare`/`run` (a test double) is
called once per request.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from engine.manifest import load_manifest
from runtime.pipelines import PIPELINES

WARMUP_STEPS_EAGER = 2  # nothing is captured: two steps run every stage once
BUILD_PIPELINES = {name: entry.unet for name, entry in PIPELINES.items()}  # served name -> the build's UNet
SHARED_COMPONENTS = ("text_encoder", "text_encoder_2", "vae_decoder", "image_encoder")  # same graph in every pipeline


@dataclass
class ServedPipeline:
    """One endpoint's pipeline.

    name: a name of `runtime.pipelines.PIPELINES`. pipe: the callable above.
    default_size: output side when a request gives no size; None = from the photo (InstantID's resize).
    warmup: runs one small generation (loads kernels, captures graphs); raises on a broken build.
    """

    name: str
    pipe: Callable[..., list]
    default_size: int | None = None
    warmup: Callable[[], None] = lambda: None
    info: dict[str, Any] = field(default_factory=dict)

    def run_batch(self, key, payloads: Sequence, stops: Sequence[Callable[[], bool]] | None = None) -> Iterator:
        """Request objects of one key -> per request, in order: list of PIL images, or the exception it
        raised. A generator, so the queue answers each request as soon as its images exist.

        stops: per request, True once nobody waits for it any more (`BatchQueue`): such a request is
        not prepared, and a stacked loop whose requests all stop ends between two denoising steps
        (their results are `DenoiseCancelled`)."""
        from runtime.loop import DenoiseCancelled  # torch: only where pipelines run

        def attempt(i: int, call: Callable[[], Any]) -> Any:
            if stops is not None and stops[i]():
                return DenoiseCancelled("skipped: nobody waits for this request any more")
            return _attempt(call)

        if not (hasattr(self.pipe, "prepare") and hasattr(self.pipe, "run")):
            for i, request in enumerate(payloads):
                yield attempt(i, lambda: self.pipe(request))
            return
        prepared = [attempt(i, lambda: self.pipe.prepare(request)) for i, request in enumerate(payloads)]
        ready = [i for i, p in enumerate(prepared) if not isinstance(p, BaseException)]
        results: dict[int, Any] = {i: p for i, p in enumerate(prepared) if isinstance(p, BaseException)}
        answered = 0

        def in_order():  # every result whose predecessors are all answered
            nonlocal answered
            while answered in results:
                yield results.pop(answered)
                answered += 1

        yield from in_order()  # requests that failed to prepare are answered at once
        groups: dict[Any, list[int]] = {}  # one key may still prepare to different settings (prompt lengths)
        for i in ready:
            groups.setdefault(prepared[i].settings, []).append(i)
        for group in groups.values():
            for chunk in _chunks(group, [prepared[i].num_images for i in group],
                                 self.pipe.max_images(prepared[group[0]].settings)):
                # the stacked loop stops only when every request in it is unwanted
                should_stop = None if stops is None else (lambda chunk=chunk: all(stops[i]() for i in chunk))
                outcome = _attempt(lambda: self.pipe.run([prepared[i] for i in chunk], should_stop=should_stop))
                for n, i in enumerate(chunk):
                    result = outcome if isinstance(outcome, BaseException) else outcome[n]
                    results[i] = result if isinstance(result, BaseException) else Images(
                        result.images, getattr(result, "warnings", ()))
                yield from in_order()


class Images(list):
    """One request's answer: its PIL images (a list) and `warnings` for the user (e.g. a prompt truncated to
    the UNet's text axis), which the HTTP answer carries."""

    def __init__(self, images=(), warnings=()):
        super().__init__(images)
        self.warnings = list(warnings)


def _attempt(call: Callable[[], Any]) -> Any:
    """call()'s result, or the exception it raised (kept for that request only)."""
    try:
        return call()
    except Exception as error:  # noqa: BLE001 - returned to that request only
        return error


def _chunks(indices: list[int], sizes: list[int], limit: int | None) -> Iterator[list[int]]:
    """Consecutive groups of `indices` whose sizes sum to at most `limit` (a request larger than the
    limit goes alone, and the pipeline reports its size error)."""
    group, total = [], 0
    for index, size in zip(indices, sizes):
        if group and limit is not None and total + size > limit:
            yield group
            group, total = [], 0
        group.append(index)
        total += size
    if group:
        yield group


def warmup_call(pipe, entry, size: int, steps: int) -> Callable[[], None]:
    """One generation of `size` x `size` px and `steps` steps through every stage a request runs. A face
    pipeline generates from a real face photo (scikit-image's astronaut, shipped in its wheel), so a
    build whose face models are missing or broken fails here instead of passing as ready."""
    def warmup() -> None:
        if entry.face:
            import skimage.data

            image = skimage.data.astronaut()
        else:
            image = np.full((size, size, 3), 127, np.uint8)
        pipe(entry.request_type(image, "warm-up", steps=steps, width=size, height=size, seed=0))
    return warmup


def available_pipelines(build_dir: str | os.PathLike) -> list[str]:
    """Served names whose UNet the build's manifest.json lists."""
    components = load_manifest(Path(build_dir)).components
    return [name for name, unet in BUILD_PIPELINES.items() if unet in components]


def load_pipelines(build_dir: str | os.PathLike, backend: str = "onnxruntime", names: Sequence[str] = (),
                   warmup_steps: int | None = None, warmup_size: int | None = None, threads: int | None = None,
                   device: str | None = None, trust_programs: bool = False) -> dict[str, ServedPipeline]:
    """Open the runtime pipelines of a build (all it has, or `names`) as ServedPipelines.

    device: e.g. 'cuda:1' for TensorRT backends (default: the runtime's); threads: ONNX Runtime;
    trust_programs: backend 'torch' only, load the build's torch.export programs (they unpickle).
    warmup_steps: steps of the warm-up generation; None: the requests' default step count where the
        denoising loop captures CUDA graphs (a graph is captured per step count and size, so the first
        request at the served settings replays instead of capturing), else WARMUP_STEPS_EAGER.

    Raises ValueError naming what the build has when a requested pipeline is missing.
    """
    from runtime.requests import field_default

    have = available_pipelines(build_dir)
    names = list(names) or have
    missing = [n for n in names if n not in have]
    if missing or not names:
        raise ValueError(f"{build_dir} has no {', '.join(missing) or 'pipeline'} (it has: {', '.join(have) or 'none'}): "
                         "export them (python -m export.build --pipeline ...) or choose with --pipelines")
    served = {}
    options = {"threads": threads, "trust_programs": trust_programs, **({"device": device} if device else {})}
    shared: dict = {}  # sessions every pipeline of the build has in common: loaded once
    for name in names:
        options["sessions"] = dict(shared)
        entry = PIPELINES[name]
        pipe = entry.open(build_dir, backend, **options)
        options["memory"] = pipe.memory  # one TensorRT scratch buffer for all (the worker runs one at a time)
        for component in SHARED_COMPONENTS:
            if component not in shared and hasattr(pipe, component):
                shared[component] = getattr(pipe, component)
        resolution = int(pipe.assets.value("default_resolution", 1024))
        size = warmup_size or resolution
        # a CUDA graph is captured per step count and size: warm up at the requests' default steps
        steps = warmup_steps or (field_default(entry.request_type, "steps") if pipe.loop.can_capture
                                 else WARMUP_STEPS_EAGER)
        served[name] = ServedPipeline(name, pipe, None if entry.face else resolution,
                                      warmup_call(pipe, entry, size, steps),
                                      {"backend": pipe.backend, "model": pipe.manifest.model,
                                       "default_resolution": resolution,
                                       "controlnets": sorted(getattr(pipe, "controlnets", {}))})  # for `controls`
    return served
