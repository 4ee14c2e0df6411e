"""PyTorch wrappers with the exact engine I/O, one per exported component.

I/O contract (names are part of DESIGN.md's contract; axis names follow engine/profiles.py;
"float" = the build precision: float16 for `--precision fp16`, float32 for fp32; the scalar
controls `timestep`, `ip_scale`, `conditioning_scale` are float32 in every build):

component        inputs                                          outputs
text_encoder     input_ids int64 (batch, 77)                     hidden_states float (batch, 77, 768)  [penultimate layer]
text_encoder_2   input_ids int64 (batch, 77)                     hidden_states float (batch, 77, 1280) [penultimate],
                                                                 text_embeds float (batch, 1280)       [projected EOS]
image_encoder    pixel_values float (batch, 3, 224, 224)         image_embeds float (batch, 1024),
                                                                 hidden_states float (batch, 257, 1280) [penultimate]
face_proj        face_embedding float (batch, 512)               face_tokens float (batch, 16, 2048)   [InstantID Resampler]
image_proj       image_embeds float (batch, 1024)                ip_tokens float (batch, 4, 2048)      [IP-Adapter ImageProj]
image_proj_plus  hidden_states float (batch, 257, 1280)          ip_tokens float (batch, 16, 2048)     [IP-Adapter Plus Resampler]
controlnet       sample float (2B, 4, latent_height, latent_width),                     down_residual_0..8 float, mid_residual float:
                 timestep float32 (1,), face_tokens float (2B, 16, 2048),               (2B, 320, lh, lw) x3, (2B, 320, lh/2, lw/2),
                 control_image float (2B, 3, height, width) RGB in [0, 1],              (2B, 640, lh/2, lw/2) x2, (2B, 640, lh/4, lw/4),
                 text_embeds float (2B, 1280), time_ids float (2B, 6),                  (2B, 1280, lh/4, lw/4) x2; mid (2B, 1280, lh/4, lw/4)
                 conditioning_scale float32 (1,)                                        (every residual already x conditioning_scale)
unet_<pipeline>  sample, timestep, text_tokens float (2B, text_tokens, 2048) [both encoders' hidden_states
                 concatenated; 77·k tokens for a prompt of k chunks, a dynamic axis (engine.profiles.TEXT_TOKENS_AXIS)],
                 ip_tokens float (2B, K, 2048) [K = 16 instantid / 4 ip_adapter / 16 ip_adapter_plus],
                 ip_scale float32 (L,) [λ per cross-attention layer, L = 70 for SDXL], text_embeds, time_ids,
                 down_residual_0..8, mid_residual [as the controlnet outputs; zeros without a ControlNet]
                 -> noise_pred float (2B, 4, latent_height, latent_width)
vae_decoder      latents (batch, 4, latent_height, latent_width) [already divided by the VAE scaling factor]
                 -> image (batch, 3, height, width) in about [-1, 1]; float32 unless the fp16-fix VAE
face_detector    image float32 (1, 3, 640, 640); SCRFD: score_8/16/32, bbox_*, kps_*; YuNet: cls_*, obj_*, bbox_*, kps_*
arcface          crops float32 (batch, 3, 112, 112) -> embedding float32 (batch, 512)   [raw, not L2-normalised]

The sizes shown are SDXL's; the tiny model has the same names with its own widths. SD1.5 (`sd15`,
`tiny-sd15`): text_encoder only, its `hidden_states` the last (final-layer-normed) hidden state
(77, 768) = the UNet's text_tokens; the UNet has no text_embeds / time_ids inputs, 12 down
residuals and 16 cross-attention layers. `2B` rows are
[negative, positive] pairs for classifier-free guidance. Pipelines: `instantid` uses
text_encoder(_2), face_detector, arcface, face_proj, controlnet, unet_instantid, vae_decoder;
`ip-adapter` (`-plus`) uses text_encoder(_2), image_encoder, image_proj(_plus),
unet_ip_adapter(_plus), vae_decoder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.profiles import TEXT_CHUNK, TEXT_TOKENS_AXIS, parse_dim
from engine.tensors import TensorSpec
from export.adapters import cross_attention_layers
from export.attention import fuse_decoupled_attention, set_layer_scales

TEXT_TOKENS = TEXT_CHUNK   # the text encoders' input ids: one prompt chunk
TRACE_TEXT_TOKENS = 2 * TEXT_CHUNK  # the text axis where `sizes` has none: 2 chunks, so no size-1 multiple


@dataclass
class Component:
    """A module whose forward(*inputs) returns the outputs, in the order of `outputs`."""

    name: str
    module: nn.Module
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def dim_value(dim: int | str, sizes: dict[str, int]) -> int:
    """Size of one axis for base sizes {'batch', 'height', 'width'} (pixels) and optionally 'text_tokens'
    (else TRACE_TEXT_TOKENS), e.g. 'latent_height/2'."""
    if isinstance(dim, int):
        return dim
    expr = parse_dim(dim)
    return expr.value({TEXT_TOKENS_AXIS: TRACE_TEXT_TOKENS, **sizes}[expr.base], dim)


def example_inputs(component: Component, sizes: dict[str, int], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs for `component` at base sizes {'batch', 'height', 'width'}.

    input_ids: BOS, random tokens, an EOS (the largest id) at a random position, then pad id 0;
    timestep in [0, 1000); scales in [0, 1]; time_ids the SDXL micro-conditioning; the rest N(0, 1)
    (control_image in [0, 1]).
    """
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for spec in component.inputs:
        shape = tuple(dim_value(d, sizes) for d in spec.shape)
        if spec.name == "input_ids":
            tensors.append(_token_ids(shape, generator))
        elif spec.name == "timestep":
            tensors.append(torch.randint(0, 1000, shape, generator=generator).to(spec.dtype))
        elif spec.name in ("ip_scale", "conditioning_scale", "control_image"):
            tensors.append(torch.rand(shape, generator=generator).to(spec.dtype))
        elif spec.name == "time_ids":
            row = torch.tensor([sizes["height"], sizes["width"], 0, 0, sizes["height"], sizes["width"]])
            tensors.append(row.expand(shape).to(spec.dtype).clone())
        else:
            tensors.append(torch.randn(shape, generator=generator).to(spec.dtype))
    return tuple(tensors)


def _token_ids(shape: tuple[int, int], generator: torch.Generator, vocab: int = 49408) -> torch.Tensor:
    bos, eos = vocab - 2, vocab - 1
    ids = torch.randint(1, bos, shape, generator=generator)
    ids[:, 0] = bos
    for row in ids:
        end = int(torch.randint(2, shape[1], (1,), generator=generator))
        row[end] = eos
        row[end + 1:] = 0  # tokenizer_2's pad token '!': the EOS stays the unique largest id
    return ids


# ---- wrappers --------------------------------------------------------------------------------

class TextEncoder(nn.Module):
    """input_ids (batch, 77) -> penultimate (SDXL) or last (SD1.5) hidden states (batch, 77, C)
    [, text_embeds (batch, P)]."""

    def __init__(self, encoder: nn.Module, pooled: bool, penultimate: bool = True):
        super().__init__()
        self.encoder, self.pooled, self.penultimate = encoder, pooled, penultimate

    def forward(self, input_ids):
        out = self.encoder(input_ids, output_hidden_states=self.penultimate)
        hidden = out.hidden_states[-2] if self.penultimate else out.last_hidden_state
        return (hidden, out.text_embeds) if self.pooled else hidden


class ImageEncoder(nn.Module):
    """pixel_values (batch, 3, 224, 224) -> image_embeds (batch, P), penultimate hidden (batch, 257, C)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixel_values):
        out = self.encoder(pixel_values, output_hidden_states=True)
        return out.image_embeds, out.hidden_states[-2]


class Projector(nn.Module):
    """Resampler / ImageProj: (batch, D) or (batch, N, D) -> tokens (batch, K, C)."""

    def __init__(self, projector: nn.Module, add_token_axis: bool):
        super().__init__()
        self.projector, self.add_token_axis = projector, add_token_axis

    def forward(self, embeds):
        return self.projector(embeds[:, None, :] if self.add_token_axis else embeds)


class ControlNet(nn.Module):
    """IdentityNet with the conditioning scale as an input; returns 9 down residuals + the mid one."""

    def __init__(self, controlnet: nn.Module):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, face_tokens, control_image, text_embeds, time_ids, conditioning_scale):
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=face_tokens, controlnet_cond=control_image,
                                    conditioning_scale=conditioning_scale.to(sample.dtype),
                                    added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                                    return_dict=False)
        return (*down, mid)


class UNet(nn.Module):
    """SDXL (or SD1.5) UNet with decoupled attention: λ per layer and ControlNet residuals are inputs;
    text_embeds and time_ids only where the UNet has added conditioning (SDXL)."""

    def __init__(self, unet: nn.Module, ip_layers: list):
        super().__init__()
        self.unet, self.ip_layers = unet, ip_layers
        self.added = _added_conditioning(unet.config)

    def forward(self, sample, timestep, text_tokens, ip_tokens, ip_scale, *rest):
        set_layer_scales(self.ip_layers, ip_scale.to(sample.dtype))
        added, residuals = ({"text_embeds": rest[0], "time_ids": rest[1]}, rest[2:]) if self.added else (None, rest)
        try:
            return self.unet(sample, timestep, encoder_hidden_states=torch.cat((text_tokens, ip_tokens), dim=1),
                             added_cond_kwargs=added,
                             down_block_additional_residuals=list(residuals[:-1]),
                             mid_block_additional_residual=residuals[-1], return_dict=False)[0]
        finally:
            for layer in self.ip_layers:  # do not keep traced tensors in the processors
                layer.scale = 1.0


class VaeDecoder(nn.Module):
    """latents / scaling_factor (batch, 4, h, w) -> image (batch, 3, 8h, 8w) in about [-1, 1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


# ---- components ------------------------------------------------------------------------------

def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _eager_attention(encoder: nn.Module) -> None:
    """Trace CLIP with transformers' eager attention: its SDPA path passes a boolean causal mask
    that the TorchScript exporter turns into a float32 mask, which silently makes every layer of an
    fp16 encoder float32. Eager attention (additive mask in the model dtype) is the same math."""
    encoder.set_attn_implementation("eager")


def text_encoder_component(name: str, encoder: nn.Module, penultimate: bool = True) -> Component:
    """text_encoder (CLIPTextModel) or text_encoder_2 (CLIPTextModelWithProjection); `hidden_states` is
    the penultimate layer (SDXL) or, with penultimate=False, the last hidden state (SD1.5).

    Switches `encoder` to eager attention (see `_eager_attention`).
    """
    _eager_attention(encoder)
    dtype, config = _dtype(encoder), encoder.config
    pooled = hasattr(encoder, "text_projection")
    outputs = [TensorSpec("hidden_states", dtype, ("batch", TEXT_TOKENS, config.hidden_size))]
    if pooled:
        outputs.append(TensorSpec("text_embeds", dtype, ("batch", config.projection_dim)))
    return Component(name, TextEncoder(encoder, pooled, penultimate).eval(),
                     (TensorSpec("input_ids", torch.int64, ("batch", TEXT_TOKENS)),), tuple(outputs))


def image_encoder_component(encoder: nn.Module) -> Component:
    """CLIPVisionModelWithProjection -> image_embeds + penultimate hidden states (eager attention)."""
    _eager_attention(encoder)
    dtype, config = _dtype(encoder), encoder.config
    tokens = (config.image_size // config.patch_size) ** 2 + 1
    return Component("image_encoder", ImageEncoder(encoder).eval(),
                     (TensorSpec("pixel_values", dtype, ("batch", 3, config.image_size, config.image_size)),),
                     (TensorSpec("image_embeds", dtype, ("batch", config.projection_dim)),
                      TensorSpec("hidden_states", dtype, ("batch", tokens, config.hidden_size))))


def projector_component(name: str, projector: nn.Module, input_name: str, input_dims: tuple,
                        output_name: str) -> Component:
    """face_proj / image_proj / image_proj_plus; input_dims without the batch axis."""
    dtype = _dtype(projector)
    config = projector.config
    tokens = getattr(config, "num_queries", getattr(config, "num_tokens", None))
    width = getattr(config, "output_dim", getattr(config, "cross_attention_dim", None))
    return Component(name, Projector(projector, add_token_axis=len(input_dims) == 1).eval(),
                     (TensorSpec(input_name, dtype, ("batch", *input_dims)),),
                     (TensorSpec(output_name, dtype, ("batch", tokens, width)),))


def _down_residual_dims(config) -> list[tuple]:
    """(channels, height axis, width axis) of the 9 down residuals of an SDXL-style UNet/ControlNet."""
    channels = list(config.block_out_channels)
    dims, level = [], 0
    dims.append((channels[0], level))
    for index, out in enumerate(channels):
        dims.extend([(out, level)] * config.layers_per_block)
        if index < len(channels) - 1:
            level += 1
            dims.append((out, level))
    return [(c, _latent("latent_height", lvl), _latent("latent_width", lvl)) for c, lvl in dims]


def _latent(axis: str, level: int) -> str:
    return axis if level == 0 else f"{axis}/{2 ** level}"


def residual_ios(config, dtype: torch.dtype) -> tuple[TensorSpec, ...]:
    """down_residual_0..N-1 and mid_residual, (2B, C, latent_height/2^k, latent_width/2^k)."""
    down = _down_residual_dims(config)
    ios = [TensorSpec(f"down_residual_{i}", dtype, ("2B", *d)) for i, d in enumerate(down)]
    channels = config.block_out_channels[-1]
    ios.append(TensorSpec("mid_residual", dtype, ("2B", channels, *down[-1][1:])))
    return tuple(ios)


def _added_conditioning(config) -> bool:
    """SDXL's pooled text_embeds + time_ids (addition_embed_type 'text_time'); SD1.5 has none."""
    return getattr(config, "addition_embed_type", None) == "text_time"


def _conditioning(config, dtype) -> dict[str, TensorSpec]:
    latent = ("2B", config.in_channels, "latent_height", "latent_width")
    ios = {"sample": TensorSpec("sample", dtype, latent), "timestep": TensorSpec("timestep", torch.float32, (1,))}
    if _added_conditioning(config):
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        ios.update(text_embeds=TensorSpec("text_embeds", dtype, ("2B", pooled)),
                   time_ids=TensorSpec("time_ids", dtype, ("2B", 6)))
    return ios


def controlnet_component(controlnet: nn.Module, num_face_tokens: int) -> Component:
    """IdentityNet: face tokens as context, conditioning_scale as an input."""
    dtype, config = _dtype(controlnet), controlnet.config
    c = _conditioning(config, dtype)
    inputs = (c["sample"], c["timestep"],
              TensorSpec("face_tokens", dtype, ("2B", num_face_tokens, config.cross_attention_dim)),
              TensorSpec("control_image", dtype, ("2B", 3, "height", "width")),
              c["text_embeds"], c["time_ids"], TensorSpec("conditioning_scale", torch.float32, (1,)))
    return Component("controlnet", ControlNet(controlnet).eval(), inputs, residual_ios(config, dtype))


def unet_component(name: str, unet: nn.Module, num_ip_tokens: int, attention: str = "stacked") -> Component:
    """UNet with decoupled attention already attached (`attach_ip_adapter`).

    attention (what the TensorRT builder makes of each decoupled layer, see export.attention):
    'stacked' (default: head-stacked masked MHA, one fused attention kernel), 'unfused' (the
    reference DecoupledAttnProcessor: two SDPA calls, two fused kernels) or 'fused' (concatenated
    keys, a softmax per segment: no fused kernel; the name is the ONNX graph's, not TensorRT's).
    """
    from export.adapters import DecoupledAttnProcessor

    if attention == "unfused":
        layers = [unet.attn_processors[n] for n in cross_attention_layers(unet)]
        if not all(isinstance(p, DecoupledAttnProcessor) for p in layers):
            raise ValueError("the UNet has no decoupled attention: call export.adapters.attach_ip_adapter first")
    elif attention in ("fused", "stacked"):
        layers = fuse_decoupled_attention(unet, "concat" if attention == "fused" else "stacked")
    else:
        raise ValueError(f"attention must be 'fused', 'stacked' or 'unfused', got {attention!r}")
    dtype, config = _dtype(unet), unet.config
    c = _conditioning(config, dtype)
    inputs = (c["sample"], c["timestep"],
              TensorSpec("text_tokens", dtype, ("2B", TEXT_TOKENS_AXIS, config.cross_attention_dim)),
              TensorSpec("ip_tokens", dtype, ("2B", num_ip_tokens, config.cross_attention_dim)),
              TensorSpec("ip_scale", torch.float32, (len(layers),)),
              *(c[name] for name in ("text_embeds", "time_ids") if name in c), *residual_ios(config, dtype))
    outputs = (TensorSpec("noise_pred", dtype, ("2B", config.out_channels, "latent_height", "latent_width")),)
    return Component(name, UNet(unet, layers).eval(), inputs, outputs)


def vae_decoder_component(vae: nn.Module) -> Component:
    """AutoencoderKL decoder (input already divided by the scaling factor)."""
    dtype, config = _dtype(vae), vae.config
    latents = ("batch", config.latent_channels, "latent_height", "latent_width")
    return Component("vae_decoder", VaeDecoder(vae).eval(), (TensorSpec("latents", dtype, latents),),
                     (TensorSpec("image", dtype, ("batch", config.out_channels, "height", "width")),))
