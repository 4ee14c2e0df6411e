"""The runtime's pipelines and their one registry: served name -> pipeline class, request type, options.

    from runtime.pipelines import PIPELINES, InstantIDPipeline, IPAdapterPipeline
    entry = PIPELINES["ip-adapter-plus"]
    pipe = entry.open("build/tiny")                       # IPAdapterPipeline(..., plus=True)
    images = pipe(entry.request_type("ref.jpg", "a cat"))  # or pipe("ref.jpg", "a cat", steps=20)

The CLI (`--pipeline`), the server (its endpoints, the build's pipelines), the OpenAPI document
and the benchmarks read the names, classes and request types from here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from runtime.pipelines.instantid import InstantIDPipeline, control_tensor, face_conditioning
from runtime.pipelines.ip_adapter import IPAdapterPipeline
from runtime.pipelines.sdxl import PROMPT_CACHE_SIZE, Generation, NonFiniteError, Prepared
from runtime.requests import (PIXEL_MULTIPLE, GenerateRequest, InstantIDRequest, IPAdapterRequest, LoopSettings,
                              RequestError, ResolutionError)

__all__ = ["PIPELINES", "PIPELINE_NAMES", "PIXEL_MULTIPLE", "PROMPT_CACHE_SIZE", "Generation", "GenerateRequest",
           "IPAdapterPipeline", "IPAdapterRequest", "InstantIDPipeline", "InstantIDRequest", "LoopSettings",
           "NonFiniteError", "PipelineEntry", "Prepared", "RequestError", "ResolutionError", "control_tensor",
           "face_conditioning", "pipeline_entry"]


@dataclass(frozen=True)
class PipelineEntry:
    """One pipeline a build can have.

    name: the CLI's --pipeline value and the HTTP endpoint (/v1/<name>). pipeline: its class;
    options: keyword arguments its `from_build` needs (name, value pairs). request_type: its request.
    face: its image is a face photo (the output size follows the photo; warm-ups need a real face).
    """

    name: str
    pipeline: type
    request_type: type[GenerateRequest]
    options: tuple[tuple[str, Any], ...] = ()
    face: bool = False

    @property
    def unet(self) -> str:
        """The build's UNet component of this pipeline: a build has the pipeline when its manifest lists it."""
        return self.pipeline.unet_for(**dict(self.options))

    def open(self, build_dir: str | os.PathLike, backend: str = "onnxruntime", **kwargs):
        """The pipeline over `build_dir` (kwargs: the class's `from_build` options)."""
        return self.pipeline.from_build(build_dir, backend, **dict(self.options), **kwargs)


PIPELINES: dict[str, PipelineEntry] = {entry.name: entry for entry in (
    PipelineEntry("instantid", InstantIDPipeline, InstantIDRequest, face=True),
    PipelineEntry("ip-adapter", IPAdapterPipeline, IPAdapterRequest),
    PipelineEntry("ip-adapter-plus", IPAdapterPipeline, IPAdapterRequest, options=(("plus", True),)),
)}
PIPELINE_NAMES = tuple(PIPELINES)


def pipeline_entry(name: str) -> PipelineEntry:
    """The registry entry of `name`; ValueError naming the pipelines there are."""
    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}: choose one of {', '.join(PIPELINES)}")
    return PIPELINES[name]
