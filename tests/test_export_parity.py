"""Correctness rung 1: every exported tiny component in ONNX Runtime vs its PyTorch module.

fp32 graphs: ‖Δ‖/‖ref‖ ≤ 1e-4; fp16 graphs: ≤ 1e-2 against the float32 module (the error of
fp16 weights and activations together); never NaN. Inputs are fresh random draws every run (the
seed is in the failure message) at a size other than the trace size (batch 3, 192×128 px), so the
dynamic axes are exercised too.

fp16 graphs are checked twice: as ONNX Runtime runs them (its CPU provider lacks float16 kernels
for most ops and wraps those nodes in Casts, which its optimiser may fold or merge), and through
`fp16_emulation.emulate_fp16`, which evaluates the graph exactly as typed — float32 arithmetic
inside each op (as GPU fp16 kernels accumulate in fp32), every float16-typed value rounded to
float16 where it is produced, float32 islands (Resampler softmax) left float32. Both must pass.
"""
from __future__ import annotations

import random

import fp16_emulation
import numpy as np
import pytest
import torch
from fixtures_tiny import ort_session, relative_error, run_onnx

from export import loaders
from export.adapters import cross_attention_layers
from engine.tensors import TensorSpec, ort_dtype, torch_dtype
from export.components import Component, dim_value, example_inputs
from export.specs import TINY

SIZES = {"batch": 3, "height": 192, "width": 128}       # not the trace size (batch 2, 128²)
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny modules on a shared CPU: threads only spin
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def builds(tiny_onnx_fp32, tiny_onnx_fp16):
    return {"fp32": tiny_onnx_fp32, "fp16": tiny_onnx_fp16}


@pytest.fixture(scope="module")
def weights(tiny_onnx_fp32):
    return tiny_onnx_fp32 / "weights"


def feeds_for(session, seed: int, sizes=SIZES) -> dict[str, np.ndarray]:
    """Random float32/int64 inputs for an ONNX session, from its input names and axis names."""
    inputs = tuple(TensorSpec(i.name, torch.float32 if "float" in i.type else torch_dtype(ort_dtype(i.type)),
                              tuple(i.shape))
                   for i in session.get_inputs())
    tensors = example_inputs(Component("feeds", None, inputs, ()), sizes, seed)
    return {io.name: t.numpy() for io, t in zip(inputs, tensors)}


def emulated_fp16(path, feeds: dict) -> dict[str, np.ndarray]:
    """Outputs of the fp16 graph at `path` evaluated as typed (see module docstring)."""
    import onnx

    model = onnx.load(str(path))
    half = {i.name for i in model.graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
    session = fp16_emulation.session(fp16_emulation.emulate_fp16(model))
    feeds = {k: (v.astype(np.float16).astype(np.float32) if k in half else v) for k, v in feeds.items()}
    return run_onnx(session, feeds)


def run_build(build: str, path, feeds: dict) -> dict[str, dict[str, np.ndarray]]:
    """{'fp32': outputs} or {'fp16': ORT's run, 'fp16 emulated': the exact-as-typed run}."""
    runs = {build: run_onnx(ort_session(path), feeds)}
    if build == "fp16":
        runs["fp16 emulated"] = emulated_fp16(path, feeds)
    return runs


def check(build: str, name: str, outputs: dict, reference: dict, seed: int) -> None:
    tolerance = TOLERANCE[build.split()[0]]
    for key, ref in reference.items():
        ref = ref.detach().float().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref, np.float32)
        value = outputs[key]
        assert value.shape == ref.shape, f"{name}.{key}: shape {value.shape} != {ref.shape}"
        assert not np.isnan(value).any(), f"{build} {name}.{key} has NaN (seed {seed})"
        error = relative_error(value, ref)
        print(f"{build} {name}.{key}: rel {error:.2e}")
        assert error <= tolerance, f"{build} {name}.{key}: rel error {error:.2e} > {tolerance} (seed {seed})"


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


# ---- references: the modules themselves, called as the baseline calls them ------------------------

@torch.no_grad()
def reference(name: str, weights, feeds: dict) -> dict:
    if name in ("text_encoder", "text_encoder_2"):
        stack = loaders.load_text_stack(TINY, weights)
        out = getattr(stack, name)(_t(feeds["input_ids"]), output_hidden_states=True)
        return {"hidden_states": out.hidden_states[-2], **({"text_embeds": out[0]} if name.endswith("2") else {})}
    if name == "image_encoder":
        out = loaders.load_image_encoder(TINY, weights)(_t(feeds["pixel_values"]), output_hidden_states=True)
        return {"image_embeds": out.image_embeds, "hidden_states": out.hidden_states[-2]}
    if name == "face_proj":
        resampler, _ = loaders.load_instantid_adapter(TINY, loaders.load_unet(TINY, weights), weights)
        return {"face_tokens": resampler(_t(feeds["face_embedding"]).reshape(-1, 1, 512))}
    if name in ("image_proj", "image_proj_plus"):
        plus = name.endswith("plus")
        projector, _ = loaders.load_ip_adapter(TINY, loaders.load_unet(TINY, weights), plus, weights)
        return {"ip_tokens": projector(_t(feeds["hidden_states" if plus else "image_embeds"]))}
    if name == "controlnet":
        controlnet = loaders.load_controlnet(TINY, weights)
        down, mid = controlnet(_t(feeds["sample"]), _t(feeds["timestep"]), encoder_hidden_states=_t(feeds["face_tokens"]),
                               controlnet_cond=_t(feeds["control_image"]),
                               conditioning_scale=float(feeds["conditioning_scale"][0]),
                               added_cond_kwargs={"text_embeds": _t(feeds["text_embeds"]),
                                                  "time_ids": _t(feeds["time_ids"])}, return_dict=False)
        return {**{f"down_residual_{i}": d for i, d in enumerate(down)}, "mid_residual": mid}
    if name.startswith("unet_"):
        unet = diffusers_ip_unet(name, weights, feeds["ip_scale"])
        return {"noise_pred": call_unet(unet, feeds)}
    if name == "vae_decoder":
        return {"image": loaders.load_vae(TINY, weights).decode(_t(feeds["latents"])).sample}
    raise KeyError(name)


def diffusers_ip_unet(name: str, weights, scales) -> torch.nn.Module:
    """The tiny UNet with diffusers' own IPAdapterAttnProcessor2_0 on every attn2 layer, λ per layer."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    unet = loaders.load_unet(TINY, weights)
    if name == "unet_instantid":
        _, state = loaders.load_instantid_adapter(TINY, unet, weights)
        tokens = TINY.instantid_resampler.num_queries
    else:
        plus = name.endswith("plus")
        _, state = loaders.load_ip_adapter(TINY, unet, plus, weights)
        tokens = TINY.ip_plus_resampler.num_queries if plus else TINY.ip_image_proj.num_tokens
    processors, layer = dict(unet.attn_processors), 0
    for index, key in enumerate(processors):
        if key in cross_attention_layers(unet):
            weight = state[f"{index}.to_k_ip.weight"]
            proc = IPAdapterAttnProcessor2_0(weight.shape[0], weight.shape[1], (tokens,), float(scales[layer]))
            proc.to_k_ip[0].weight.data.copy_(weight)
            proc.to_v_ip[0].weight.data.copy_(state[f"{index}.to_v_ip.weight"])
            processors[key], layer = proc, layer + 1
    assert layer == len(scales)
    unet.set_attn_processor(processors)
    return unet


@torch.no_grad()
def call_unet(unet, feeds: dict) -> torch.Tensor:
    import warnings

    down = [_t(feeds[f"down_residual_{i}"]) for i in range(9)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' deprecation note on concatenated ip tokens
        return unet(_t(feeds["sample"]), _t(feeds["timestep"]),
                    encoder_hidden_states=torch.cat([_t(feeds["text_tokens"]), _t(feeds["ip_tokens"])], dim=1),
                    added_cond_kwargs={"text_embeds": _t(feeds["text_embeds"]), "time_ids": _t(feeds["time_ids"])},
                    down_block_additional_residuals=down, mid_block_additional_residual=_t(feeds["mid_residual"]),
                    return_dict=False)[0]


# ---- tests ----------------------------------------------------------------------------------------

TORCH_COMPONENTS = ["text_encoder", "text_encoder_2", "image_encoder", "face_proj", "image_proj", "image_proj_plus",
                    "controlnet", "unet_instantid", "unet_ip_adapter", "unet_ip_adapter_plus", "vae_decoder"]


@pytest.mark.parametrize("name", TORCH_COMPONENTS)
def test_component_matches_its_pytorch_module(name, builds, weights):
    seed = random.randrange(2**31)
    feeds = feeds_for(ort_session(builds["fp32"] / "onnx" / f"{name}.onnx"), seed)
    expected = reference(name, weights, feeds)
    for build in builds:
        for run, outputs in run_build(build, builds[build] / "onnx" / f"{name}.onnx", feeds).items():
            check(run, name, outputs, expected, seed)


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0, "per-layer"])
def test_fused_unet_equals_diffusers_ip_adapter_unet_for_every_scale(scale, builds, weights):
    seed = random.randrange(2**31)
    name = "unet_instantid"
    feeds = feeds_for(ort_session(builds["fp32"] / "onnx" / f"{name}.onnx"), seed)
    layers = feeds["ip_scale"].shape[0]
    feeds["ip_scale"] = (np.random.default_rng(seed).uniform(0, 1.5, layers) if scale == "per-layer"
                         else np.full(layers, scale)).astype(np.float32)
    expected = {"noise_pred": call_unet(diffusers_ip_unet(name, weights, feeds["ip_scale"]), feeds)}
    for build in builds:
        for run, outputs in run_build(build, builds[build] / "onnx" / f"{name}.onnx", feeds).items():
            check(run, f"{name}[λ={scale}]", outputs, expected, seed)


def test_zero_scale_reproduces_the_plain_unet(builds, weights):
    seed = random.randrange(2**31)
    session = ort_session(builds["fp32"] / "onnx" / "unet_ip_adapter.onnx")
    feeds = feeds_for(session, seed)
    feeds["ip_scale"][:] = 0.0
    plain = loaders.load_unet(TINY, weights)  # no adapter at all: the ip tokens must not matter
    with torch.no_grad():
        expected = plain(_t(feeds["sample"]), _t(feeds["timestep"]), encoder_hidden_states=_t(feeds["text_tokens"]),
                         added_cond_kwargs={"text_embeds": _t(feeds["text_embeds"]), "time_ids": _t(feeds["time_ids"])},
                         down_block_additional_residuals=[_t(feeds[f"down_residual_{i}"]) for i in range(9)],
                         mid_block_additional_residual=_t(feeds["mid_residual"]), return_dict=False)[0]
    check("fp32", "unet_ip_adapter[λ=0] vs plain UNet", run_onnx(session, feeds), {"noise_pred": expected}, seed)


def test_face_models_match_the_given_files(builds, weights):
    import cv2

    import onnxruntime as ort

    from export.face_models import packaged_yunet_bytes
    from runtime.face.models import loadable_onnx

    seed = random.randrange(2**31)
    rng = np.random.default_rng(seed)
    for build in builds:  # face models stay float32 in every build
        crops = rng.uniform(-1, 1, (3, 3, 112, 112)).astype(np.float32)
        arcface = ort_session(builds[build] / "onnx" / "arcface.onnx")
        original = ort_session(weights / "antelopev2" / "glintr100.onnx")
        expected = original.run(None, {original.get_inputs()[0].name: crops})[0]
        check(build, "arcface", run_onnx(arcface, {"crops": crops}), {"embedding": expected}, seed)

        image = rng.uniform(0, 255, (1, 3, 640, 640)).astype(np.float32)
        detector = ort_session(builds[build] / "onnx" / "face_detector.onnx")
        outputs = run_onnx(detector, {"image": image})
        # the given file, minimally edited (per-tensor block_size zeroed, the runtime's fix) so ONNX Runtime takes it
        original = ort.InferenceSession(loadable_onnx(packaged_yunet_bytes()), providers=["CPUExecutionProvider"])
        check(build, "face_detector", outputs, dict(zip(outputs, original.run(list(outputs), {"input": image}))), seed)
        net = cv2.dnn.readNetFromONNX(np.frombuffer(packaged_yunet_bytes(), np.uint8))  # OpenCV: the unmodified file
        net.setInput(image)
        for name, value in zip(outputs, net.forward(list(outputs))):  # another runtime: its own conv kernels
            assert relative_error(outputs[name], value.reshape(outputs[name].shape)) <= 3e-4, (name, seed)


@pytest.mark.parametrize("name", TORCH_COMPONENTS)
def test_fp16_graphs_carry_fp16_weights_and_typed_values(name, builds):
    """fp16 components hold their weights in float16 (the VAE stays float32); every value is typed."""
    import onnx

    for build, path in builds.items():
        model = onnx.load(str(path / "onnx" / f"{name}.onnx"))
        sizes = {}
        for tensor in model.graph.initializer:
            count = int(np.prod(tensor.dims))
            sizes[tensor.data_type] = sizes.get(tensor.data_type, 0) + count
        floats = sizes.get(onnx.TensorProto.FLOAT16, 0) + sizes.get(onnx.TensorProto.FLOAT, 0)
        half = sizes.get(onnx.TensorProto.FLOAT16, 0) / floats
        want_half = build == "fp16" and name != "vae_decoder"
        assert (half > 0.99) if want_half else (half == 0.0), f"{build} {name}: {half:.1%} of weights are fp16"
        assert fp16_emulation.untyped_outputs(model) == [], f"{build} {name} has values of unknown type"


def test_shapes_follow_the_dynamic_axes(builds):
    session = ort_session(builds["fp32"] / "onnx" / "controlnet.onnx")
    feeds = feeds_for(session, 0, {"batch": 1, "height": 256, "width": 64})
    outputs = run_onnx(session, feeds)
    for info in session.get_outputs():
        want = tuple(dim_value(d, {"batch": 1, "height": 256, "width": 64}) for d in info.shape)
        assert outputs[info.name].shape == want, info.name
