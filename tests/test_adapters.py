"""The baseline's decoupled attention and token projectors against diffusers' implementations."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

from export import loaders
from export.adapters import Resampler, attach_ip_adapter, cross_attention_layers, set_ip_scale
from export.specs import TINY, ResamplerConfig


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def unet_and_state():
    unet = loaders.load_unet(TINY, random_init=True)
    return unet, loaders.random_ip_state(unet)


def _inputs(batch=2, tokens=16, size=16):
    g = torch.Generator().manual_seed(0)
    return dict(
        sample=torch.randn(batch, 4, size, size, generator=g),
        timestep=torch.tensor(500.0),
        text=torch.randn(batch, 77, 64, generator=g),
        ip=torch.randn(batch, tokens, 64, generator=g),
        added={"text_embeds": torch.randn(batch, 32, generator=g),
               "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]] * batch)},
    )


def _diffusers_ip_unet(unet, ip_state, tokens, scales):
    """The same UNet with diffusers' IPAdapterAttnProcessor2_0 on every attn2 layer."""
    unet = copy.deepcopy(unet)
    processors, layer = {}, 0
    for index, name in enumerate(unet.attn_processors):
        if not name.endswith("attn2.processor"):
            processors[name] = AttnProcessor2_0()
            continue
        hidden = ip_state[f"{index}.to_k_ip.weight"].shape[0]
        proc = IPAdapterAttnProcessor2_0(hidden, unet.config.cross_attention_dim, num_tokens=(tokens,),
                                         scale=scales[layer])
        proc.to_k_ip[0].weight.data.copy_(ip_state[f"{index}.to_k_ip.weight"])
        proc.to_v_ip[0].weight.data.copy_(ip_state[f"{index}.to_v_ip.weight"])
        processors[name] = proc
        layer += 1
    unet.set_attn_processor(processors)
    return unet


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0, "per-layer"])
@torch.no_grad()
def test_decoupled_attention_matches_diffusers(unet_and_state, scale):
    base, ip_state = unet_and_state
    n_layers = len(cross_attention_layers(base))
    scales = (torch.linspace(0, 1.2, n_layers).tolist() if scale == "per-layer" else [scale] * n_layers)
    x = _inputs()
    context = torch.cat([x["text"], x["ip"]], dim=1)
    ours = copy.deepcopy(base)
    attach_ip_adapter(ours, ip_state, num_tokens=16, scale=scales)
    got = ours(x["sample"], x["timestep"], encoder_hidden_states=context, added_cond_kwargs=x["added"]).sample
    reference = _diffusers_ip_unet(base, ip_state, 16, scales)
    want = reference(x["sample"], x["timestep"], encoder_hidden_states=(x["text"], [x["ip"]]),
                     added_cond_kwargs=x["added"]).sample
    assert rel(got, want) < 1e-5
    plain = base(x["sample"], x["timestep"], encoder_hidden_states=x["text"], added_cond_kwargs=x["added"]).sample
    if scale == 0.0:
        assert rel(got, plain) < 1e-6  # λ = 0 is the plain UNet
    else:
        assert rel(got, plain) > 1e-3  # the image tokens matter


def test_ip_scale_vector_must_match_the_layer_count(unet_and_state):
    base, ip_state = unet_and_state
    unet = copy.deepcopy(base)
    layers = attach_ip_adapter(unet, ip_state, num_tokens=16)
    assert len(layers) == 17
    with pytest.raises(ValueError, match="has 3 values but the UNet has 17"):
        set_ip_scale(layers, [0.1, 0.2, 0.3])


def test_checkpoint_for_another_unet_is_rejected(unet_and_state):
    base, ip_state = unet_and_state
    broken = dict(ip_state)
    broken.pop("1.to_v_ip.weight")
    with pytest.raises(ValueError, match="lacks.*another UNet"):
        attach_ip_adapter(copy.deepcopy(base), broken, num_tokens=16)


@torch.no_grad()
def test_resampler_matches_diffusers_plus_projection():
    """Our Resampler, keyed as the published checkpoints, equals diffusers' converted projection."""
    torch.manual_seed(0)
    # diffusers' converter assumes 64-d heads and depth 4, as every published checkpoint has
    resampler = Resampler(ResamplerConfig(dim=128, depth=4, dim_head=64, heads=2, num_queries=16,
                                          embedding_dim=512, output_dim=64)).eval()
    for param in resampler.parameters():  # leave no zero/one-initialised tensors
        param.data.add_(torch.randn_like(param) * 0.05)
    unet = loaders.load_unet(TINY, random_init=True)
    converted = unet._convert_ip_adapter_image_proj_to_diffusers(resampler.state_dict(), low_cpu_mem_usage=False).eval()
    embedding = torch.randn(3, 1, 512)
    assert rel(resampler(embedding), converted(embedding)) < 1e-5
