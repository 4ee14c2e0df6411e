"""`build/<model>/assets/`: what the runtime needs besides the engines (no checkpoint, no diffusers).

    tokenizer/, tokenizer_2/       CLIP tokenizer folders incl. tokenizer.json (`tokenizers` library);
                                   SD1.5 has tokenizer/ only
    scheduler_config.json          the SDXL scheduler config
    negative_tokens_<pipeline>.npy CFG negative image tokens, float32 (1, K, C), input-independent:
                                     instantid: Resampler(zeros(1, 512))
                                     ip_adapter: ImageProj(zeros(1, embed_dim))
                                     ip_adapter_plus: Resampler(image_encoder(zero pixel_values).hidden_states[-2])
    model.json                     model facts (`model_facts`)

runtime.assets reads these and nothing else. The negatives are computed once in float32 by the
exported projectors from the inputs the baseline pipelines use for theirs (the baseline runs
diffusers' projectors, held to these by tests/test_baseline.py); the runtime casts them to its
engines' input dtype.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from export.specs import ModelSpec
from runtime.ip_scales import cross_attention_layer_names

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def write_tokenizers(assets: Path, tokenizers: tuple) -> list[Path]:
    """Save the CLIP tokenizers (one per text encoder) as `assets/tokenizer{,_2}/` (tokenizer.json included)."""
    folders = []
    for name, tokenizer in zip(("tokenizer", "tokenizer_2"), tokenizers):
        folder = Path(assets) / name
        shutil.rmtree(folder, ignore_errors=True)
        tokenizer.save_pretrained(folder)
        if not (folder / "tokenizer.json").is_file():
            tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
        folders.append(folder)
    return folders


def write_scheduler_config(assets: Path, config: dict) -> Path:
    """assets/scheduler_config.json."""
    path = Path(assets) / "scheduler_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


@torch.no_grad()
def negative_tokens(projector: torch.nn.Module, embeds: torch.Tensor) -> np.ndarray:
    """projector(embeds) -> (1, K, C) float32 array. projector: a float32 module; embeds: the
    negative input (1, D) or (1, N, D)."""
    if next(projector.parameters()).dtype != torch.float32:
        raise ValueError("compute the cached negatives with the float32 module, before casting it for export")
    return projector(embeds.float()).numpy().astype(np.float32)


def save_negative_tokens(assets: Path, pipeline: str, tokens: np.ndarray) -> Path:
    """assets/negative_tokens_<pipeline>.npy (pipeline: instantid | ip_adapter | ip_adapter_plus)."""
    path = Path(assets) / f"negative_tokens_{pipeline}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.ascontiguousarray(tokens, dtype=np.float32))
    return path


def model_facts(spec: ModelSpec, num_cross_attn_layers: int, precision: str, attention: str,
                face_detector: str, vae_fp16_fix: bool) -> dict:
    """The model facts the runtime needs (written as assets/model.json and into the manifest metadata)."""
    added = spec.unet.get("addition_embed_type") == "text_time"  # SDXL's pooled text + time ids; SD1.5: none
    text_embeds = (spec.unet["projection_class_embeddings_input_dim"] - 6 * spec.unet["addition_time_embed_dim"]
                   if added else None)
    return {
        "model": spec.name,
        "precision": precision,
        "attention": attention,
        "vae_scaling_factor": spec.vae["scaling_factor"],
        "vae_scale_factor": spec.vae_scale_factor,
        "vae_dtype": "float16" if precision == "fp16" and vae_fp16_fix else "float32",
        "latent_channels": spec.unet["in_channels"],
        "default_resolution": spec.default_resolution,
        "trace_resolution": spec.trace_resolution,
        "num_cross_attn_layers": num_cross_attn_layers,
        # the attn2 layers in the order of the UNet's ip_scale input: per-block λ (InstantStyle) maps onto them
        "cross_attention_layers": cross_attention_layer_names(spec.unet),
        "text_tokens": spec.text_encoder["max_position_embeddings"],
        "cross_attention_dim": spec.cross_attention_dim,
        "text_embeds_dim": text_embeds,
        "time_ids_dim": 6 if added else None,
        "force_zeros_for_empty_prompt": spec.force_zeros_for_empty_prompt,
        "ip_tokens": {"instantid": spec.instantid_resampler.num_queries if spec.instantid_resampler else None,
                      "ip_adapter": spec.ip_image_proj.num_tokens,
                      "ip_adapter_plus": spec.ip_plus_resampler.num_queries},
        "face_embedding_dim": spec.face_embedding_dim,
        "face_detector": face_detector,
        "face_detector_size": 640,
        "arcface_size": 112,
        "image_encoder_size": spec.image_encoder["image_size"],
        "clip_mean": list(CLIP_MEAN),
        "clip_std": list(CLIP_STD),
        "tokenizers": [name.replace("text_encoder", "tokenizer") for name in spec.text_encoders],
    }


def write_model_facts(assets: Path, facts: dict) -> Path:
    """assets/model.json."""
    path = Path(assets) / "model.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(facts, indent=2, sort_keys=True) + "\n")
    return path
