"""Extra ControlNets beside the IdentityNet (canny, depth, pose, ...): per-request controls, their control
images, and one session that runs several ControlNets and sums their residuals.

    pipe(photo, "a portrait", controls=[Control("canny", "photo.png", scale=0.5, preprocess="canny")])

A build has them when it was exported with `--controlnet NAME=PATH` (export/controlnets.py): components
`controlnet_<NAME>`, whose context is the text tokens. What the runtime does, as diffusers'
StableDiffusionXLControlNetPipeline with a MultiControlNetModel does it:
  - a control image is loaded (RGB), optionally turned into a canny map on the host (`cv2.Canny(rgb, low,
    high)`, 100 / 200 by default as diffusers' and InstantID's examples; replicated to 3 channels), then
    resized to the output W x H with PIL's Lanczos filter and scaled to [0, 1] with no normalisation —
    diffusers' control image processor (VaeImageProcessor(do_normalize=False): resize, then /255);
  - each ControlNet runs with its own image and scale; the residuals are summed in order (the IdentityNet's
    first, then the controls' as given): ((r0 + r1) + r2), as MultiControlNetModel sums them.
`MultiControlNet` is that sum as one `Session`, so the denoising loop (eager, whole-loop graph, per-step
graphs) runs it unchanged: `bind` binds every member and sums into fixed, aligned residual buffers (torch
adds on the current stream: capturable, no host reads), which the UNet's context binds as its inputs.
Its feeds are the IdentityNet's (unprefixed), `text_tokens`, and per extra ControlNet
`<component>/control_image` and `<component>/conditioning_scale`.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.tensors import TensorSpec
from runtime.session_base import Session
from runtime.streams import aligned_empty

PREFIX = "controlnet_"
PREPROCESS = ("none", "canny")
CANNY_LOW, CANNY_HIGH = 100, 200  # diffusers' / InstantID's canny thresholds
MAX_CONTROLS = 4


class ControlError(ValueError):
    """A control the build or the request cannot use; the message says what to give."""


@dataclass(frozen=True)
class Control:
    """One extra ControlNet of a request.

    name: the build's ControlNet (component controlnet_<name>), e.g. 'canny'. image: the control image
    (path, bytes, PIL image or RGB array): a control map as it is (preprocess='none'), or a photo whose canny
    map is computed on the host (preprocess='canny', thresholds low / high). scale: its conditioning scale.
    Requests are equal (share a loop) when their controls agree on everything but the image.
    """

    name: str
    image: object = field(default=None, compare=False, repr=False)
    scale: float = 1.0
    preprocess: str = "none"
    low: int = CANNY_LOW
    high: int = CANNY_HIGH

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ControlError(f"a control's name must be the build's ControlNet name (e.g. 'canny'), got {self.name!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not 0.0 <= self.scale <= 4.0:
            raise ControlError(f"control {self.name!r}: scale must be a number in 0..4, got {self.scale!r}")
        object.__setattr__(self, "scale", float(self.scale))
        if self.preprocess not in PREPROCESS:
            raise ControlError(f"control {self.name!r}: preprocess must be one of {', '.join(PREPROCESS)} "
                               f"('none': the image is the control map; 'canny': compute it from a photo), "
                               f"got {self.preprocess!r}")
        for key in ("low", "high"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1000:
                raise ControlError(f"control {self.name!r}: {key} (a canny threshold) must be a whole number in "
                                   f"0..1000, got {value!r}")
        if self.low > self.high:
            raise ControlError(f"control {self.name!r}: low={self.low} is above high={self.high}: give low <= high")

    @property
    def component(self) -> str:
        return PREFIX + self.name


def as_controls(value) -> tuple[Control, ...]:
    """Controls from Control objects, dicts ({name, image, scale?, preprocess?, low?, high?}) or 'NAME=PATH[...]'
    strings (`parse_control`), one or a list; ControlError naming what is wrong."""
    if value is None:
        return ()
    items = [value] if isinstance(value, (Control, dict, str)) else list(value)
    controls = []
    for item in items:
        if isinstance(item, Control):
            controls.append(item)
        elif isinstance(item, dict):
            unknown = sorted(set(item) - {"name", "image", "scale", "preprocess", "low", "high"})
            if unknown or "name" not in item:
                raise ControlError(f"a control is {{name, image, scale, preprocess, low, high}} (name required), got "
                                   f"keys {sorted(item)}")
            controls.append(Control(**item))
        elif isinstance(item, str):
            controls.append(parse_control(item))
        else:
            raise ControlError(f"a control is a Control, a dict or 'NAME=PATH[:SCALE[:PREPROCESS]]', got "
                               f"{type(item).__name__}")
    names = [c.name for c in controls]
    if len(set(names)) != len(names):
        raise ControlError(f"each ControlNet can be given once per request, got {names}")
    if len(controls) > MAX_CONTROLS:
        raise ControlError(f"{len(controls)} controls, at most {MAX_CONTROLS}")
    return tuple(controls)


def parse_control(text: str) -> Control:
    """The CLI form 'NAME=PATH[:SCALE[:PREPROCESS]]', PREPROCESS 'none', 'canny' or 'canny/LOW/HIGH'
    (e.g. 'canny=photo.png:0.5:canny', 'depth=depth.png:0.7') -> Control; ControlError otherwise."""
    name, sep, rest = text.partition("=")
    if not sep or not rest:
        raise ControlError(f"--control {text}: give NAME=PATH[:SCALE[:PREPROCESS]] (e.g. canny=photo.png:0.5:canny)")
    parts, options = rest.split(":"), {}
    if parts[-1].split("/")[0] in PREPROCESS and len(parts) > 1:
        preprocess = parts.pop().split("/")
        options["preprocess"] = preprocess[0]
        if len(preprocess) != 1:
            try:
                options["low"], options["high"] = (int(v) for v in preprocess[1:])
            except ValueError:
                raise ControlError(f"--control {text}: the canny thresholds are canny/LOW/HIGH, e.g. canny/100/200") \
                    from None
    if len(parts) > 1:
        try:
            options["scale"] = float(parts[-1])
            parts.pop()
        except ValueError:
            pass
    return Control(name, ":".join(parts), **options)


def check_controls(controls: Sequence[Control], available: Collection[str], build_dir) -> None:
    """ControlError when a control names no ControlNet of the build (listing them), or the build has none."""
    if controls and not available:
        raise ControlError(f"{build_dir} has no extra ControlNets, so controls {[c.name for c in controls]} cannot "
                           "run: export them with python -m export.build ... --controlnet NAME=PATH")
    unknown = [c.name for c in controls if c.name not in available]
    if unknown:
        raise ControlError(f"unknown control {', '.join(map(repr, unknown))}: this build's ControlNets are "
                           f"{', '.join(sorted(available))}")


def build_controlnets(manifest) -> dict[str, str]:
    """{name: component} of the build's extra ControlNets: components controlnet_<name> (ONNX, engines) and
    metadata `controlnets` (also a --stage torch build's)."""
    found = {name[len(PREFIX):]: name for name in manifest.components if name.startswith(PREFIX)}
    found.update(manifest.metadata.get("controlnets", {}))
    return dict(sorted(found.items()))


def canny_map(rgb: np.ndarray, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> np.ndarray:
    """(H, W, 3) uint8 RGB photo -> (H, W, 3) uint8 canny map (cv2.Canny(rgb, low, high) on every channel)."""
    import cv2

    edges = cv2.Canny(np.ascontiguousarray(rgb), low, high)
    return np.repeat(edges[:, :, None], 3, axis=2)


def control_image_tensor(image, height: int, width: int) -> torch.Tensor:
    """A control map (path, bytes, PIL, RGB array) -> (1, 3, H, W) float32 in [0, 1], as diffusers' control
    image processor: RGB, PIL resize to W x H with Lanczos (none at that size already), /255."""
    from PIL import Image

    from runtime.images import load_image

    pil = Image.fromarray(load_image(image))
    if pil.size != (width, height):
        pil = pil.resize((width, height), resample=Image.Resampling.LANCZOS)
    pixels = np.asarray(pil, dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None]


def control_tensor_of(control: Control, height: int, width: int) -> torch.Tensor:
    """One control's (1, 3, H, W) float32 input: canny map of its photo first where preprocess='canny'."""
    from runtime.images import load_image

    image = control.image
    if image is None:
        raise ControlError(f"control {control.name!r} has no image: give the control map, or a photo with "
                           "preprocess='canny'")
    if control.preprocess == "canny":
        image = canny_map(load_image(image), control.low, control.high)
    return control_image_tensor(image, height, width)


def control_feeds(components: Sequence[str], images: Sequence[torch.Tensor], scales: Sequence[float],
                  text_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """MultiControlNet's feeds of the extra ControlNets: text_tokens (R, T, C), and per component its
    control image (R, 3, H, W) and conditioning_scale (1,) float32."""
    feeds = {"text_tokens": text_tokens}
    for component, image, scale in zip(components, images, scales):
        feeds[f"{component}/control_image"] = image
        feeds[f"{component}/conditioning_scale"] = torch.tensor([float(scale)], device=image.device)
    return feeds


class _Residuals(dict):
    """Summed residual buffers (name -> tensor); `members` keeps the members' own output buffers, so
    another binding (per-step graphs) can share them too."""

    members: list = []


class MultiControlNet(Session):
    """Several ControlNet sessions as one: the residuals of `identitynet` (or None) and of `extras` (their
    components, in order) summed. Feeds: see the module docstring."""

    def __init__(self, identitynet: Session | None, extras: Sequence[Session]):
        self.members = ([] if identitynet is None else [identitynet]) + list(extras)
        if not self.members:
            raise ValueError("MultiControlNet needs at least one ControlNet session")
        self.identitynet, self.extras = identitynet, list(extras)
        first = self.members[0]
        self.name = "+".join(s.name for s in self.members)
        self.device, self.cuda, self.memory = first.device, first.cuda, getattr(first, "memory", None)
        self.capturable = all(s.capturable for s in self.members)
        inputs = list(identitynet.inputs) if identitynet is not None else [
            i for i in first.inputs if i.name not in ("control_image", "conditioning_scale")]
        if self.extras and "text_tokens" not in {i.name for i in inputs}:
            inputs.append(self.extras[0].input("text_tokens"))
        for extra in self.extras:
            for key in ("control_image", "conditioning_scale"):
                spec = extra.input(key)
                inputs.append(TensorSpec(f"{extra.name}/{key}", spec.dtype, spec.shape, min=spec.min, max=spec.max))
        self.inputs, self.outputs = tuple(inputs), tuple(first.outputs)

    def _member_feeds(self, feeds: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = []
        for session in self.members:
            if session is self.identitynet:
                out.append({name: feeds[name] for name in session.input_names})
                continue
            own = {name: feeds[f"{session.name}/{name}"] for name in ("control_image", "conditioning_scale")}
            out.append({name: own[name] if name in own else feeds[name] for name in session.input_names})
        return out

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """feeds -> the summed residuals (name -> tensor), members run in order."""
        total = None
        for session, own in zip(self.members, self._member_feeds(feeds)):
            residuals = session.run(own)
            total = dict(residuals) if total is None else {k: total[k] + residuals[k] for k in total}
        return total

    def bind(self, feeds: Mapping[str, torch.Tensor], in_place: Collection[str] = (),
             outputs: Mapping[str, torch.Tensor] | None = None) -> "_BoundMulti":
        """Every member bound (`Session.bind`) at its feeds; the sum written into fixed aligned buffers
        (`outputs`' when given, e.g. another step's, and its members' buffers shared too)."""
        shared = getattr(outputs, "members", None) or [None] * len(self.members)
        bound = []
        try:
            for session, own, given in zip(self.members, self._member_feeds(feeds), shared):
                names = {name for name in own if own[name] is feeds.get(name) and name in in_place}
                names |= {name for name in ("control_image", "conditioning_scale")
                          if session is not self.identitynet and f"{session.name}/{name}" in in_place}
                bound.append(session.bind(own, in_place=names, outputs=given))
        except BaseException:
            for member in bound:
                getattr(member, "release", lambda: None)()
            raise
        return _BoundMulti(self, bound, outputs)


class _BoundMulti:
    """The members' bindings and the summed residual buffers a CUDA graph reads (`output_buffers`)."""

    def __init__(self, multi: MultiControlNet, bound: list, outputs=None):
        self.multi, self.bound, self.name = multi, bound, multi.name
        self.output_buffers = _Residuals()
        self.output_buffers.members = [getattr(b, "output_buffers", None) for b in bound]
        self._outputs = outputs
        if self.output_buffers.members[0]:  # TensorRT: shapes known now, so the UNet binds the sums in place
            self._buffers(self.output_buffers.members[0])

    def _buffers(self, first: Mapping[str, torch.Tensor]) -> _Residuals:
        if not dict.__len__(self.output_buffers):
            for name, tensor in first.items():
                given = (self._outputs or {}).get(name)
                usable = given is not None and given.shape == tensor.shape and given.dtype == tensor.dtype
                self.output_buffers[name] = given if usable else aligned_empty(tuple(tensor.shape), tensor.dtype,
                                                                                tensor.device)
        return self.output_buffers

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        results = [member.run(own) for member, own in zip(self.bound, self.multi._member_feeds(feeds))]
        buffers = self._buffers(results[0])
        for name, buffer in buffers.items():
            torch.add(results[0][name], results[1][name], out=buffer) if len(results) > 1 else buffer.copy_(
                results[0][name])
            for more in results[2:]:
                buffer.add_(more[name])
        return dict(buffers)

    def capture_blocker(self, stream) -> str | None:
        for member in self.bound:
            blocker = getattr(member, "capture_blocker", None)
            reason = None if blocker is None else blocker(stream)
            if reason:
                return reason
        return None

    def release(self) -> None:
        for member in self.bound:
            getattr(member, "release", lambda: None)()


# -- what the pipelines call (runtime/pipelines/sdxl.py) ------------------------------------------------

def prepare_controls(request, available: Mapping[str, str], build_dir, height: int, width: int) -> tuple:
    """A request's controls -> ((component, scale, control image (1, 3, H, W) float32), ...) at the output size
    H x W; ValueError (unknown name, none built) naming the build's ControlNets, ImageError for an image that
    cannot be read."""
    controls = getattr(request, "controls", ()) or ()
    try:
        check_controls(controls, available, build_dir)
    except ControlError as error:
        raise ValueError(str(error)) from None  # the server's 422 invalid_request, the CLI's error line
    return tuple((available[c.name], c.scale, control_tensor_of(c, height, width)) for c in controls)


def stacked_control_feeds(prepared: Sequence, text_tokens: torch.Tensor, cfg: bool, device) -> dict[str, torch.Tensor]:
    """The extra ControlNets' feeds of requests stacked in one loop call (their controls agree on names and
    scales): each control image repeated per image, twice with CFG ([negative rows, positive rows])."""
    first = prepared[0].controls
    images = []
    for index in range(len(first)):
        image = torch.cat([r.controls[index][2].to(device).expand(r.num_images, -1, -1, -1) for r in prepared])
        images.append(torch.cat([image, image]) if cfg else image)
    return control_feeds([c[0] for c in first], images, [c[1] for c in first], text_tokens)
