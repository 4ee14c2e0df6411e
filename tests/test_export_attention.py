"""Fused decoupled attention: exact against the reference in PyTorch and in the exported graphs.

- the two fused formulas equal SDPA(q, k_t, v_t) + λ·SDPA(q, k_i, v_i) on random tensors;
- a UNet with fused processors equals the same UNet with the reference `DecoupledAttnProcessor`
  and with diffusers' `IPAdapterAttnProcessor2_0`, for λ ∈ {0, 0.5, 1} and a per-layer λ vector;
- the default export (`--attention stacked`, what the build records) is one masked MHA per
  cross-attention layer (scale on Q before the scores MatMul, an additive mask, ONE Softmax, one
  PV MatMul, no control flow), the shape TensorRT fuses (tests/test_engine_fusion.py);
- `--attention fused` keeps its concatenated-keys shape (one scores MatMul, two Softmax);
- the default form (unet_component's default), `fused` and `unfused` export the same I/O as the
  default build and match the diffusers UNet in ONNX Runtime (the default build itself is checked
  against diffusers in tests/test_export_parity.py).
"""
from __future__ import annotations

import copy
import functools
import random
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from fixtures_tiny import ort_session, relative_error, run_onnx

from export import loaders
from export.adapters import DecoupledAttnProcessor, attach_ip_adapter, cross_attention_layers, set_ip_scale
from export.attention import (
    FusedDecoupledAttnProcessor,
    Layout,
    concat_decoupled_attention,
    fuse_decoupled_attention,
    set_layer_scales,
    stacked_decoupled_attention,
)
from export.components import example_inputs, unet_component
from export.onnx_export import export_component, trace_sizes
from export.specs import TINY

FORMULAS = {"concat": concat_decoupled_attention, "stacked": stacked_decoupled_attention}
SCALES = [0.0, 0.5, 1.0, "per-layer"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("formula", FORMULAS)
@pytest.mark.parametrize("scale", [0.0, 0.7, torch.tensor(1.3)])
@pytest.mark.parametrize("t", [77, 154, 231])
def test_formulas_equal_two_sdpa_calls(formula, scale, t):
    """Both forms equal the two SDPA calls for every text length 77·k (the text axis is dynamic)."""
    generator = torch.Generator().manual_seed(random.randrange(2**31))
    b, h, n, d, k = 2, 3, 50, 8, 16

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    q, kt, vt, ki, vi = rand(b, h, n, d), rand(b, h, t, d), rand(b, h, t, d), rand(b, h, k, d), rand(b, h, k, d)
    expected = F.scaled_dot_product_attention(q, kt, vt) + scale * F.scaled_dot_product_attention(q, ki, vi)
    out = FORMULAS[formula](q, kt, vt, ki, vi, scale, Layout(d**-0.5, h, k))
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)


def _unets(variant: str, tokens: int = 16):
    """(reference UNet with DecoupledAttnProcessor, fused UNet, its fused layers), random tiny weights."""
    unet = loaders.load_unet(TINY, random_init=True)
    layers = attach_ip_adapter(unet, loaders.random_ip_state(unet, seed=random.randrange(2**31)), tokens)
    fused = copy.deepcopy(unet)
    return unet, layers, fused, fuse_decoupled_attention(fused, variant)


def _diffusers_unet(unet, scales, tokens: int = 16):
    """`unet` (with reference processors) rebuilt with diffusers' IPAdapterAttnProcessor2_0, same weights."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    unet = copy.deepcopy(unet)
    processors = dict(unet.attn_processors)
    for name, scale in zip(cross_attention_layers(unet), scales):
        ours = processors[name]
        theirs = IPAdapterAttnProcessor2_0(ours.to_k_ip.out_features, ours.to_k_ip.in_features, (tokens,), float(scale))
        theirs.to_k_ip[0].weight.data.copy_(ours.to_k_ip.weight)
        theirs.to_v_ip[0].weight.data.copy_(ours.to_v_ip.weight)
        processors[name] = theirs
    unet.set_attn_processor(processors)
    return unet


def _scales(scale, count: int) -> list[float]:
    return torch.rand(count).mul(1.5).tolist() if scale == "per-layer" else [float(scale)] * count


@torch.no_grad()
@pytest.mark.parametrize("variant", ["concat", "stacked"])
def test_fused_unet_equals_reference_and_diffusers_processors(variant):
    unet, layers, fused, fused_layers = _unets(variant)
    sample = torch.randn(2, 4, 16, 24)
    context = torch.randn(2, 77 + 16, TINY.cross_attention_dim)
    added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}
    for scale in SCALES:
        scales = _scales(scale, len(layers))
        set_ip_scale(layers, scales)
        set_ip_scale(fused_layers, scales)
        reference = unet(sample, 500, context, added_cond_kwargs=added).sample
        out = fused(sample, 500, context, added_cond_kwargs=added).sample
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # diffusers' deprecation note on concatenated ip tokens
            theirs = _diffusers_unet(unet, scales)(sample, 500, context, added_cond_kwargs=added).sample
        assert relative_error(out, reference) <= 1e-5, (variant, scale)
        assert relative_error(out, theirs) <= 1e-5, (variant, scale)
        if scale == 0.0:  # λ = 0: the ip tokens are irrelevant
            noise = torch.cat([context[:, :77], torch.randn(2, 16, TINY.cross_attention_dim)], dim=1)
            assert relative_error(fused(sample, 500, noise, added_cond_kwargs=added).sample, out) <= 1e-6


def test_processor_checks_and_layer_scales():
    layers = [FusedDecoupledAttnProcessor(8, 4, 16) for _ in range(3)]
    set_layer_scales(layers, torch.tensor([0.1, 0.2, 0.3]))
    assert [float(layer.scale) for layer in layers] == pytest.approx([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        set_layer_scales(layers, torch.ones(4))
    with pytest.raises(ValueError, match="unknown fused attention variant"):
        FusedDecoupledAttnProcessor(8, 4, 16, variant="flash")
    with pytest.raises(ValueError, match="--attention unfused"):  # more image tokens than one prompt chunk
        FusedDecoupledAttnProcessor(8, 4, 78, variant="stacked")
    with pytest.raises(ValueError, match="attach_ip_adapter first"):
        fuse_decoupled_attention(loaders.load_unet(TINY, random_init=True))


def _producers(graph) -> dict:
    return {output: node for node in graph.node for output in node.output}


def _constant(name: str, producers: dict, initializers: dict) -> float | None:
    if name in initializers:
        return float(onnx.numpy_helper.to_array(initializers[name]))
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        return float(onnx.numpy_helper.to_array(node.attribute[0].t))
    return None


def _attn2_layers(path) -> tuple[dict, dict, dict]:
    """(attn2 nodes by block prefix, output -> producer, initializers) of an exported tiny UNet."""
    graph = onnx.load(str(path)).graph
    assert not {"If", "Loop", "Scan"} & {node.op_type for node in graph.node}
    layers = {}
    for node in graph.node:
        if "/attn2/" in node.name and "/to_" not in node.name:
            layers.setdefault(node.name.split("/attn2/")[0], []).append(node)
    assert len(layers) == len(cross_attention_layers(_tiny_unet())) == 17
    return layers, _producers(graph), {t.name: t for t in graph.initializer}


def _check_scaled_query(prefix: str, scores, producers: dict, initializers: dict) -> None:
    """The scores MatMul reads Mul(Q, d^-½): the layer's scale as one constant, on Q."""
    scaled_query = producers[scores.input[0]]
    assert scaled_query.op_type == "Mul", prefix
    scale = [v for v in (_constant(i, producers, initializers) for i in scaled_query.input) if v is not None]
    attn = _tiny_unet().get_submodule(prefix.removeprefix("/unet/").replace("/", ".") + ".attn2")
    assert scale == [pytest.approx(attn.scale)], prefix


@functools.cache
def _tiny_unet():
    """A tiny UNet (random weights) for the layers' attention scales and count."""
    return loaders.load_unet(TINY, random_init=True)


def test_default_export_is_one_masked_mha_per_layer(tiny_onnx_fp32):
    """Per attn2 layer: Mul(Q2, d^-½) -> MatMul with K2ᵀ -> Add(mask) -> ONE Softmax -> MatMul."""
    from engine.manifest import load_manifest

    manifest = load_manifest(tiny_onnx_fp32)
    for name in ("unet_instantid", "unet_ip_adapter", "unet_ip_adapter_plus"):
        assert manifest.components[name].onnx.export_flags["attention"] == "stacked", name
    layers, producers, initializers = _attn2_layers(tiny_onnx_fp32 / "onnx" / "unet_instantid.onnx")
    for prefix, nodes in layers.items():
        ops = [n.op_type for n in nodes]
        assert ops.count("Softmax") == 1 and ops.count("MatMul") == 2, (prefix, ops)
        scores = next(n for n in nodes if n.op_type == "MatMul")
        _check_scaled_query(prefix, scores, producers, initializers)
        assert producers[producers[scores.input[0]].input[0]].op_type == "Concat", prefix  # [Q; Q]
        softmax = next(n for n in nodes if n.op_type == "Softmax")
        masked = producers[softmax.input[0]]
        assert masked.op_type == "Add" and scores.output[0] in masked.input, prefix


def test_concat_export_has_one_scores_matmul_and_two_softmax(exported_variants):
    """`--attention fused`: Mul(Q, d^-½) -> MatMul with [K_t; K_i]ᵀ -> 2 Softmax -> MatMul."""
    _, paths = exported_variants
    layers, producers, initializers = _attn2_layers(paths["fused"])
    for prefix, nodes in layers.items():
        ops = [n.op_type for n in nodes]
        assert ops.count("Softmax") == 2 and ops.count("MatMul") == 2, (prefix, ops)
        scores = next(n for n in nodes if n.op_type == "MatMul")
        _check_scaled_query(prefix, scores, producers, initializers)
        keys = producers[scores.input[1]]
        assert keys.op_type == "Transpose" and producers[keys.input[0]].op_type == "Concat", prefix


@pytest.fixture(scope="module")
def exported_variants(tmp_path_factory):
    """The tiny InstantID UNet exported by unet_component's default and with 'fused' and 'unfused'
    (fp32), random weights."""
    folder = tmp_path_factory.mktemp("attention_variants")
    unet = loaders.load_unet(TINY, random_init=True)
    _, state = loaders.load_instantid_adapter(TINY, unet, random_init=True)
    attach_ip_adapter(unet, state, 16)
    paths = {}
    for variant in ("default", "fused", "unfused"):
        args = () if variant == "default" else (variant,)
        component = unet_component("unet_instantid", copy.deepcopy(unet), 16, *args)
        paths[variant] = folder / f"{variant}.onnx"
        export_component(component, paths[variant], trace_sizes(TINY.trace_resolution))
    return unet, paths


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["default", "fused", "unfused"])
def test_attention_exports_match_diffusers(variant, exported_variants, tiny_onnx_fp32):
    unet, paths = exported_variants
    session = ort_session(paths[variant])
    default = ort_session(tiny_onnx_fp32 / "onnx" / "unet_instantid.onnx")
    assert [(i.name, i.shape, i.type) for i in session.get_inputs()] == [
        (i.name, i.shape, i.type) for i in default.get_inputs()]
    component = unet_component("probe", copy.deepcopy(unet), 16, "unfused")
    feeds = {io.name: t.numpy() for io, t in zip(component.inputs, example_inputs(
        component, {"batch": 1, "height": 64, "width": 192}, seed=random.randrange(2**31)))}
    for scale in SCALES:
        scales = _scales(scale, feeds["ip_scale"].shape[0])
        feeds["ip_scale"] = np.asarray(scales, np.float32)
        theirs = _diffusers_unet(unet, scales)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = theirs(torch.from_numpy(feeds["sample"]), torch.from_numpy(feeds["timestep"]),
                              torch.cat([torch.from_numpy(feeds["text_tokens"]), torch.from_numpy(feeds["ip_tokens"])], 1),
                              added_cond_kwargs={"text_embeds": torch.from_numpy(feeds["text_embeds"]),
                                                 "time_ids": torch.from_numpy(feeds["time_ids"])},
                              down_block_additional_residuals=[torch.from_numpy(feeds[f"down_residual_{i}"])
                                                               for i in range(9)],
                              mid_block_additional_residual=torch.from_numpy(feeds["mid_residual"])).sample
        error = relative_error(run_onnx(session, feeds)["noise_pred"], expected.numpy())
        print(f"{variant} λ={scale}: rel {error:.2e}")
        assert error <= 1e-4, (variant, scale)


def test_reference_processor_is_what_unfused_exports():
    unet = loaders.load_unet(TINY, random_init=True)
    attach_ip_adapter(unet, loaders.random_ip_state(unet), 4)
    component = unet_component("unet_ip_adapter", unet, 4, "unfused")
    assert all(isinstance(layer, DecoupledAttnProcessor) for layer in component.module.ip_layers)
    assert component.inputs[4].name == "ip_scale" and component.inputs[4].shape == (17,)
