"""Decoupled cross-attention as attention that TensorRT fuses: text and image-prompt tokens in one MHA.

The reference (`export.adapters.DecoupledAttnProcessor`, diffusers' `IPAdapterAttnProcessor2_0`)
computes, per cross-attention (attn2) layer and per head,

    out = softmax(Q K_tᵀ · s) V_t + λ · softmax(Q K_iᵀ · s) V_i        s = d^-½

with two separate SDPA calls that each read Q. This module has two exact, branch-free rewrites
(λ is a tensor, so λ = 0 is the plain UNet, no `if`); `python -m export.build --attention
stacked|unfused|fused` picks the UNet's form (`unfused` is the reference processor itself):

`stacked` (`--attention stacked`, the default): both attentions stacked along the head axis as one
    standard masked MHA
    Q2 = [Q; Q] (2h heads), K2 = [K_t; pad(K_i)], V2 = [V_t; pad(λ V_i)] padded to T keys
    (T = 77·k >= K; the padding and the mask are sized from K_t's shape, so the text axis stays
    dynamic), additive mask -inf on the padding, O = softmax((Q2·s) K2ᵀ + mask) V2,
    out = O[:h] + O[h:]
  The MatMul -> Add(mask) -> Softmax -> MatMul pattern (the mask is applied inside the fused
  kernel); the cost is attending over the padding.

`concat` (`--attention fused`): keys and values of both token sets concatenated,
    S = (Q·s) [K_t; K_i]ᵀ                    (B, h, N, T+K)   one MatMul, Q read once
    P = [softmax(S[..., :T]) | λ·softmax(S[..., T:])]          softmax per segment
    out = P [V_t; V_i]                       (B, h, N, d)
  Fewest ONNX nodes and FLOPs, but no attention pattern TensorRT knows.

What the TensorRT-RTX 1.7 builder makes of one decoupled layer (its VERBOSE log says "Found <node>
to be part of self-attention pattern" per fused node; `python -m engine.fusion` counts them, and
tests/test_engine_fusion.py asserts them on the tiny UNets, whose 17 attn1 self-attentions fuse
in every form):

    form       Softmax per layer   fused by the builder          tiny UNet: fused/total Softmax
    stacked    1                   one fused MHA kernel          34/34
    unfused    2                   two fused MHA kernels         51/51
    concat     2                   none: 2 GEMMs + 2 softmaxes   17/51

Both rewrites put the scale on Q before the first MatMul. Between the two fusable forms (stacked:
one kernel over 2h heads and T keys; unfused: two kernels over T and K keys) a GPU decides.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from engine.profiles import TEXT_CHUNK
from export.adapters import DecoupledAttnProcessor, _merge_heads, _split_heads

VARIANTS = ("concat", "stacked")


MIN_TEXT_TOKENS = TEXT_CHUNK  # one prompt chunk: the text axis T is 77·k, k >= 1


class Layout(NamedTuple):
    """Static facts of one layer, as Python numbers so they become graph constants, not shape ops.
    The text token count T is not one: it is the text keys' (dynamic) length, 77·k for k prompt chunks."""

    scale: float       # d^-½
    heads: int
    ip_tokens: int     # K


def concat_decoupled_attention(query: torch.Tensor, text_key: torch.Tensor, text_value: torch.Tensor,
                               ip_key: torch.Tensor, ip_value: torch.Tensor, ip_scale, layout: Layout) -> torch.Tensor:
    """Segment-softmax form. query (B, h, N, d); text_* (B, h, T, d); ip_* (B, h, K, d); ip_scale: float
    or 0-d tensor λ. Returns (B, h, N, d) = SDPA(q, k_t, v_t) + λ·SDPA(q, k_i, v_i). The segments are
    cut from the end (the last K scores), so T stays a free axis."""
    keys = torch.cat((text_key, ip_key), dim=2)
    values = torch.cat((text_value, ip_value), dim=2)
    scores = (query * layout.scale) @ keys.transpose(-1, -2)
    text_probs = torch.softmax(scores[..., :-layout.ip_tokens], dim=-1)
    ip_probs = torch.softmax(scores[..., -layout.ip_tokens:], dim=-1) * ip_scale
    return torch.cat((text_probs, ip_probs), dim=-1) @ values


def stacked_decoupled_attention(query: torch.Tensor, text_key: torch.Tensor, text_value: torch.Tensor,
                                ip_key: torch.Tensor, ip_value: torch.Tensor, ip_scale, layout: Layout) -> torch.Tensor:
    """Head-stacked masked form; same arguments and result as `concat_decoupled_attention`, for T >= K
    (T is 77·k, K at most 77: `FusedDecoupledAttnProcessor` checks it). The image keys and values are
    padded with zeros to T rows and the padding masked with -inf; both are sized from the text keys'
    shape, so one graph serves every T."""
    scale, heads, ip_tokens = layout
    padding = torch.zeros_like(text_key[:, :, ip_tokens:])                          # (B, h, T - K, d)
    keys = torch.cat((text_key, torch.cat((ip_key, padding), dim=2)), dim=1)        # (B, 2h, T, d)
    values = torch.cat((text_value, torch.cat((ip_value * ip_scale, padding), dim=2)), dim=1)
    row = torch.zeros_like(text_key[:1, :1, :, :1]).transpose(-1, -2)                # (1, 1, 1, T) zeros
    ip_row = torch.cat((row[..., :ip_tokens], row[..., ip_tokens:] + float("-inf")), dim=-1)
    mask = torch.cat((row.expand(1, heads, 1, -1), ip_row.expand(1, heads, 1, -1)), dim=1).to(query.dtype)
    scores = (torch.cat((query, query), dim=1) * scale) @ keys.transpose(-1, -2) + mask
    out = torch.softmax(scores, dim=-1) @ values
    return out[:, :heads] + out[:, heads:]


_ATTENTION = {"concat": concat_decoupled_attention, "stacked": stacked_decoupled_attention}


class FusedDecoupledAttnProcessor(nn.Module):
    """Drop-in for `DecoupledAttnProcessor` (same weights `to_k_ip`/`to_v_ip`, same `scale`)
    computing both attentions as one operation (`variant`: 'concat' or 'stacked')."""

    def __init__(self, hidden_size: int, cross_attention_dim: int, num_tokens: int, scale=1.0,
                 variant: str = "stacked"):
        super().__init__()
        if variant not in _ATTENTION:
            raise ValueError(f"unknown fused attention variant {variant!r}: choose one of {VARIANTS}")
        if variant == "stacked" and num_tokens > MIN_TEXT_TOKENS:
            raise ValueError(f"{num_tokens} image tokens: the stacked form pads them to the text tokens (at least "
                             f"{MIN_TEXT_TOKENS}); export this adapter with --attention unfused")
        self.num_tokens, self.scale, self.variant = num_tokens, scale, variant
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        """hidden_states (B, N, hidden); encoder_hidden_states (B, T + num_tokens, C), T = 77·k text tokens
        -> (B, N, hidden)."""
        if hidden_states.ndim != 3 or attention_mask is not None or attn.group_norm is not None:
            raise NotImplementedError("fused decoupled attention supports SDXL transformer cross-attention only")
        text = encoder_hidden_states[:, : -self.num_tokens]
        ip_tokens = encoder_hidden_states[:, -self.num_tokens:]
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        heads = attn.heads
        out = _ATTENTION[self.variant](
            _split_heads(attn.to_q(hidden_states), heads),
            _split_heads(attn.to_k(text), heads), _split_heads(attn.to_v(text), heads),
            _split_heads(self.to_k_ip(ip_tokens), heads), _split_heads(self.to_v_ip(ip_tokens), heads),
            self.scale, Layout(attn.scale, heads, self.num_tokens))
        out = attn.to_out[1](attn.to_out[0](_merge_heads(out).to(hidden_states.dtype)))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def fuse_decoupled_attention(unet, variant: str = "stacked") -> list[FusedDecoupledAttnProcessor]:
    """Replace every `DecoupledAttnProcessor` of `unet` by a fused one sharing its weights and scale.

    Call after `attach_ip_adapter`; the context is then T text + num_tokens image tokens (T free). Returns the
    fused processors in attn2 order (what the
    `ip_scale` input indexes). Raises ValueError when the UNet has no decoupled layers.
    """
    processors = dict(unet.attn_processors)
    fused = []
    for name, proc in processors.items():
        if isinstance(proc, DecoupledAttnProcessor):
            new = FusedDecoupledAttnProcessor(proc.to_k_ip.out_features, proc.to_k_ip.in_features, proc.num_tokens,
                                              proc.scale, variant)
            new.to_k_ip, new.to_v_ip = proc.to_k_ip, proc.to_v_ip
            processors[name] = new
            fused.append(new)
    if not fused:
        raise ValueError("the UNet has no decoupled attention layers: call export.adapters.attach_ip_adapter first")
    unet.set_attn_processor(processors)
    return fused


def set_layer_scales(layers: Sequence[nn.Module], ip_scale: torch.Tensor) -> None:
    """Give layer i the 0-d tensor `ip_scale[i]` as λ (traced, so λ stays a graph input).

    ip_scale: (num_layers,) tensor. Raises ValueError on a length mismatch.
    """
    if ip_scale.shape != (len(layers),):
        raise ValueError(f"ip_scale must have shape ({len(layers)},), one value per cross-attention layer; "
                         f"got {tuple(ip_scale.shape)}")
    for index, layer in enumerate(layers):
        layer.scale = ip_scale[index]
