"""Image-prompt adapters: the token projectors and the decoupled cross-attention they feed.

- `Resampler`: InstantID's face tokens (512-d ArcFace -> 16 tokens) and IP-Adapter Plus
  (257 CLIP hidden states -> 16 tokens). Parameter names match the published checkpoints.
- `ImageProj`: IP-Adapter plain (projected CLIP embedding -> 4 tokens).
- `DecoupledAttnProcessor`: per cross-attention layer
  `to_out(SDPA(q, k_txt, v_txt) + scale * SDPA(q, to_k_ip(f), to_v_ip(f)))`, the reference
  formulation; the exported UNet fuses it (see `export.attention`).
- `attach_ip_adapter`: installs those processors on a diffusers UNet from an `ip_adapter` state
  dict keyed `'{i}.to_k_ip.weight'` with `i` the index in `unet.attn_processors` order.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from export.specs import ImageProjConfig, ResamplerConfig


class PerceiverAttention(nn.Module):
    """Latents attend over cat(x, latents); softmax in fp32, scale split over q and k."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        inner = dim_head * heads
        self.dim_head, self.heads = dim_head, heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x (B, N, dim), latents (B, Q, dim) -> (B, Q, dim)."""
        x = self.norm1(x)
        latents = self.norm2(latents)
        q = self._heads(self.to_q(latents))
        k, v = self.to_kv(torch.cat((x, latents), dim=1)).chunk(2, dim=-1)
        k, v = self._heads(k), self._heads(v)
        scale = 1.0 / math.sqrt(math.sqrt(self.dim_head))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
        out = (weight @ v).transpose(1, 2)
        return self.to_out(out.reshape(out.shape[0], out.shape[1], -1))


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class Resampler(nn.Module):
    """Perceiver resampler: (B, N, embedding_dim) -> (B, num_queries, output_dim)."""

    def __init__(self, config: ResamplerConfig):
        super().__init__()
        self.config = config
        self.latents = nn.Parameter(torch.randn(1, config.num_queries, config.dim) / config.dim**0.5)
        self.proj_in = nn.Linear(config.embedding_dim, config.dim)
        self.proj_out = nn.Linear(config.dim, config.output_dim)
        self.norm_out = nn.LayerNorm(config.output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(config.dim, config.dim_head, config.heads),
                           _feed_forward(config.dim, config.ff_mult)])
            for _ in range(config.depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, embedding_dim) or (B, embedding_dim) -> tokens (B, num_queries, output_dim)."""
        if x.ndim == 2:
            x = x[:, None, :]
        latents = self.latents.expand(x.shape[0], -1, -1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class ImageProj(nn.Module):
    """IP-Adapter plain projection: (B, embed_dim) -> (B, num_tokens, cross_attention_dim)."""

    def __init__(self, config: ImageProjConfig):
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.embed_dim, config.num_tokens * config.cross_attention_dim)
        self.norm = nn.LayerNorm(config.cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """image_embeds (B, embed_dim) -> tokens (B, num_tokens, cross_attention_dim)."""
        tokens = self.proj(image_embeds).reshape(-1, self.config.num_tokens, self.config.cross_attention_dim)
        return self.norm(tokens)


class DecoupledAttnProcessor(nn.Module):
    """Cross-attention over text tokens plus a scaled attention over the last `num_tokens` tokens.

    The context passed to the layer is `cat(text_tokens, ip_tokens)` (B, T + num_tokens, C);
    `scale` is a float or a 0-d tensor (per-layer control; 0 reproduces the plain UNet).
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int, num_tokens: int, scale: float = 1.0):
        super().__init__()
        self.num_tokens = num_tokens
        self.scale = scale
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        if hidden_states.ndim != 3 or attention_mask is not None or attn.group_norm is not None:
            raise NotImplementedError("decoupled attention supports SDXL transformer cross-attention only")
        text, ip_tokens = encoder_hidden_states[:, : -self.num_tokens], encoder_hidden_states[:, -self.num_tokens:]
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        query = _split_heads(attn.to_q(hidden_states), attn.heads)
        out = F.scaled_dot_product_attention(query, _split_heads(attn.to_k(text), attn.heads),
                                             _split_heads(attn.to_v(text), attn.heads))
        ip_out = F.scaled_dot_product_attention(query, _split_heads(self.to_k_ip(ip_tokens), attn.heads),
                                                _split_heads(self.to_v_ip(ip_tokens), attn.heads))
        out = _merge_heads(out + self.scale * ip_out).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def cross_attention_layers(unet) -> list[str]:
    """Processor names of the cross-attention (attn2) layers in `unet.attn_processors` order.

    Their positions in that order are the odd indices used by the adapter checkpoints.
    """
    return [name for name in unet.attn_processors if name.endswith("attn2.processor")]


def _layer_hidden_size(unet, name: str) -> int:
    module = unet.get_submodule(name.removesuffix(".processor"))
    return module.to_q.out_features


def attach_ip_adapter(unet, ip_state: dict[str, torch.Tensor], num_tokens: int,
                      scale: float | Sequence[float] = 1.0) -> list[DecoupledAttnProcessor]:
    """Install decoupled attention on every attn2 layer of `unet` from an `ip_adapter` state dict.

    ip_state: `'{i}.to_k_ip.weight'` / `'{i}.to_v_ip.weight'` (hidden, cross_dim), `i` = index in
    `unet.attn_processors` order. Returns the processors of the attn2 layers, in order. Missing or
    extra keys are an error naming them (a checkpoint for another UNet).
    """
    names = list(unet.attn_processors)
    processors, used = {}, set()
    cross_dim = unet.config.cross_attention_dim
    for index, name in enumerate(names):
        if not name.endswith("attn2.processor"):
            processors[name] = unet.attn_processors[name]
            continue
        hidden = _layer_hidden_size(unet, name)
        proc = DecoupledAttnProcessor(hidden, cross_dim, num_tokens)
        keys = (f"{index}.to_k_ip.weight", f"{index}.to_v_ip.weight")
        missing = [k for k in keys if k not in ip_state]
        if missing:
            raise ValueError(f"adapter checkpoint lacks {missing} for layer {name}: it was made for another UNet")
        proc.to_k_ip.weight.data.copy_(ip_state[keys[0]])
        proc.to_v_ip.weight.data.copy_(ip_state[keys[1]])
        used.update(keys)
        processors[name] = proc
    extra = sorted(set(ip_state) - used)
    if extra:
        raise ValueError(f"adapter checkpoint has {len(extra)} keys this UNet has no layer for, e.g. {extra[:3]}")
    unet.set_attn_processor(dict(processors))
    layers = [processors[name] for name in names if name.endswith("attn2.processor")]
    set_ip_scale(layers, scale)
    param = next(unet.parameters())
    for proc in layers:
        proc.to(device=param.device, dtype=param.dtype)
    return layers


def set_ip_scale(layers: Sequence[DecoupledAttnProcessor], scale: float | Sequence[float]) -> None:
    """Set λ on every layer (a float) or per layer (a sequence as long as `layers`)."""
    scales = [float(scale)] * len(layers) if isinstance(scale, (int, float)) else [float(s) for s in scale]
    if len(scales) != len(layers):
        raise ValueError(f"ip_scale has {len(scales)} values but the UNet has {len(layers)} cross-attention layers")
    for proc, value in zip(layers, scales):
        proc.scale = value
