"""One request type per pipeline (runtime/requests.py): the HTTP handler, the CLI and the Python API
build the same request object and make the same denoising-loop call on the real tiny build; a field
declared once appears in the Python API, the CLI, the HTTP schema and the batch key."""
from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import time

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from runtime.requests import (GenerateRequest, InstantIDRequest, IPAdapterRequest, RequestError, ResolutionError,
                              loop_settings, param, request_fields)

FIELDS = dict(steps=2, guidance=4.0, ip_scale=0.7, controlnet_scale=0.6, seed=7, width=128, height=128,
              scheduler="euler_a", negative_prompt="blurry")
PROMPT = "a portrait, oil painting"


class LoopSpy:
    """Records each call of the real pipelines' stacked loop (`run`: the prepared requests) and of the
    denoising loop itself (`DenoiseLoop.run`: plan and inputs), then runs them."""

    def __init__(self, monkeypatch):
        from runtime.loop import DenoiseLoop
        from runtime.pipelines.sdxl import _SDXLPipeline

        self.requests, self.loops = [], []
        pipeline_run, loop_run = _SDXLPipeline.run, DenoiseLoop.run

        def run(pipe, prepared, *args, **kwargs):
            self.requests.append([p.request for p in prepared])
            return pipeline_run(pipe, prepared, *args, **kwargs)

        def loop(denoise, plan, inputs, *args):
            self.loops.append((plan, inputs))
            return loop_run(denoise, plan, inputs, *args)

        monkeypatch.setattr(_SDXLPipeline, "run", run)
        monkeypatch.setattr(DenoiseLoop, "run", loop)

    def last(self):
        return self.requests[-1], self.loops[-1]


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG")
    return buffer.getvalue()


def _http(tiny_build, photo: np.ndarray):
    """POST /v1/instantid on the app over the build's real InstantID pipeline."""
    from starlette.testclient import TestClient

    from runtime.serve.app import ServeConfig, create_app
    from runtime.serve.inputs import Limits
    from runtime.serve.served import load_pipelines

    app = create_app(ServeConfig(limits=Limits(max_side=512)),
                     lambda: load_pipelines(tiny_build, names=["instantid"], threads=1, warmup_steps=1,
                                            warmup_size=128))
    with TestClient(app) as client:
        for _ in range(600):
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.1)
        body = {"prompt": PROMPT, "image": base64.b64encode(_png(photo)).decode(), "output": "json", **FIELDS}
        answer = client.post("/v1/instantid", json=body)
    assert answer.status_code == 200, answer.text


def _cli(tiny_build, photo_path, out):
    from runtime.__main__ import main

    flags = [f"--{name.replace('_', '-')}={value}" for name, value in FIELDS.items()]
    assert main(["generate", "--build", str(tiny_build), "--face", str(photo_path), "--prompt", PROMPT,
                 "--out", str(out), *flags]) == 0


def _assert_same_loop_call(one, other) -> None:
    (plan, inputs), (other_plan, other_inputs) = one, other
    assert torch.equal(plan.timesteps, other_plan.timesteps)
    for name in ("latents", "step_noise", "guidance"):  # euler_a draws noise at every step
        assert torch.equal(getattr(inputs, name), getattr(other_inputs, name)), name
    for feeds, other_feeds in ((inputs.unet_feeds, other_inputs.unet_feeds),
                               (inputs.controlnet_feeds, other_inputs.controlnet_feeds)):
        assert feeds.keys() == other_feeds.keys()
        for name in feeds:
            assert torch.equal(feeds[name], other_feeds[name]), name


def test_one_instantid_request_from_http_cli_and_python(tiny_build, tmp_path, monkeypatch):
    """The same InstantID request sent over HTTP, on the command line and as a Python call reaches the
    pipeline as equal request objects and makes one identical denoising-loop call (plan, latents,
    guidance, every UNet and ControlNet feed bit for bit)."""
    from runtime.images import load_image
    from runtime.pipelines import InstantIDPipeline

    photo = skimage.data.astronaut()
    photo_path = tmp_path / "face.png"
    photo_path.write_bytes(_png(photo))
    spy = LoopSpy(monkeypatch)

    _http(tiny_build, photo)
    http_requests, http_loop = spy.last()
    _cli(tiny_build, photo_path, tmp_path / "out.png")
    cli_requests, cli_loop = spy.last()
    pipe = InstantIDPipeline.from_build(tiny_build, threads=1)
    pipe(photo, PROMPT, **FIELDS)
    api_requests, api_loop = spy.last()
    pipe(InstantIDRequest(photo, PROMPT, **FIELDS))
    object_requests, object_loop = spy.last()

    expected = InstantIDRequest(photo, PROMPT, **FIELDS)
    assert http_requests == cli_requests == api_requests == object_requests == [expected]
    assert http_requests[0].ip_scale == 0.7 and cli_requests[0].controlnet_scale == 0.6
    for request in (http_requests[0], cli_requests[0]):  # images compare apart: decoded, or a path
        assert np.array_equal(load_image(request.image), photo)
    assert loop_settings(expected, 128, 128).values == (
        ("steps", 2), ("guidance", 4.0), ("ip_scale", 0.7), ("scheduler", "euler_a"), ("controls", ()),
        ("controlnet_scale", 0.6), ("control_guidance_start", 0.0), ("control_guidance_end", 1.0))
    for loop in (cli_loop, api_loop, object_loop):
        _assert_same_loop_call(http_loop, loop)
    assert http_loop[1].latents.shape == (1, 4, 16, 16) and http_loop[1].unet_feeds["text_tokens"].shape[0] == 2


def test_request_checks_say_what_to_give():
    with pytest.raises(RequestError, match="steps=0 is outside 1..150"):
        InstantIDRequest("p.jpg", "x", steps=0)
    with pytest.raises(RequestError, match="scheduler 'heun' is not one of euler"):
        IPAdapterRequest("p.jpg", "x", scheduler="heun")
    with pytest.raises(RequestError, match="give both width and height"):
        IPAdapterRequest("p.jpg", "x", width=128)
    with pytest.raises(ResolutionError, match="e.g. to 128x128"):
        IPAdapterRequest("p.jpg", "x", width=100, height=128)
    with pytest.raises(RequestError, match="ip_scale=5.0 is outside 0..4"):
        InstantIDRequest("p.jpg", "x", ip_scale=[0.5, 5])
    with pytest.raises(TypeError, match="unexpected keyword argument 'controlnet_scale'"):
        IPAdapterRequest("p.jpg", "x", controlnet_scale=0.5)
    scaled = InstantIDRequest("p.jpg", "x", ip_scale=[1, 0.5])
    assert scaled.ip_scale == (1.0, 0.5) and hash(scaled) == hash(dataclasses.replace(scaled, image="q.jpg"))
    assert InstantIDRequest("p", "x").ip_scale == 0.8 and IPAdapterRequest("p", "x").ip_scale == 0.6


@dataclasses.dataclass(frozen=True)
class StrengthRequest(IPAdapterRequest):
    """IP-Adapter with one field more, declared once (what adding a request field is)."""

    strength: float = param(0.5, ge=0.0, le=1.0, loop=True, help="how strongly the reference image is followed")


def test_a_field_declared_once_appears_everywhere():
    """The new field is a Python argument with its bounds, a CLI flag with its help and default, an
    HTTP schema property with its bounds, and a loop setting (so part of the server's batch key)."""
    from runtime.__main__ import add_request_arguments
    from runtime.pipelines import IPAdapterPipeline, PipelineEntry
    from runtime.serve.schemas import http_model

    assert StrengthRequest("p.jpg", "x", strength=0.25).strength == 0.25
    with pytest.raises(RequestError, match="strength=2.0 is outside 0..1"):
        StrengthRequest("p.jpg", "x", strength=2)

    parser = argparse.ArgumentParser()
    add_request_arguments(parser, [PipelineEntry("strength", IPAdapterPipeline, StrengthRequest)])
    assert parser.parse_args(["--image", "p", "--prompt", "x", "--strength", "0.3"]).strength == 0.3
    assert "how strongly the reference image is followed (default: 0.5)" in " ".join(parser.format_help().split())

    schema = http_model(StrengthRequest).model_json_schema()["properties"]["strength"]
    assert (schema["minimum"], schema["maximum"], schema["default"]) == (0.0, 1.0, 0.5)
    assert schema["description"] == "how strongly the reference image is followed"

    one, other = StrengthRequest("p", "x"), StrengthRequest("p", "x", strength=0.9)
    assert loop_settings(one, 64, 64).strength == 0.5 and loop_settings(one, 64, 64) != loop_settings(other, 64, 64)


def test_every_field_of_every_pipeline_is_derived():
    """The registry's request types, field by field: a CLI flag, an HTTP property with the same default."""
    from runtime.__main__ import parser
    from runtime.pipelines import PIPELINES
    from runtime.serve.schemas import REQUEST_MODELS

    flags = parser()._subparsers._group_actions[0].choices["generate"]._option_string_actions
    for name, entry in PIPELINES.items():
        properties = REQUEST_MODELS[name].model_json_schema()["properties"]
        assert issubclass(entry.request_type, GenerateRequest)
        for spec in request_fields(entry.request_type):
            assert f"--{spec.name.replace('_', '-')}" in flags, spec.name
            assert spec.name in properties, spec.name
            if not spec.required and not spec.param.image:
                assert properties[spec.name]["default"] == (
                    list(spec.default) if isinstance(spec.default, tuple) else spec.default), spec.name
