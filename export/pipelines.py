"""Which components each pipeline has and which checkpoint parts size it: plain data, no torch, so the
command line can check `--pipeline` / `--components` before anything heavy loads (export.sources
re-exports these names)."""
from __future__ import annotations

from export.specs import ModelSpec

PIPELINE_PARTS = {  # which checkpoint files size each pipeline (export.checkpoint_dims.PARTS)
    "instantid": ("unet", "vae", "text", "controlnet", "instantid"),
    "ip-adapter": ("unet", "vae", "text", "image_encoder", "ip_adapter"),
    "ip-adapter-plus": ("unet", "vae", "text", "image_encoder", "ip_adapter_plus"),
}

PIPELINE_COMPONENTS = {
    "instantid": ["text_encoder", "text_encoder_2", "face_detector", "arcface", "face_proj", "controlnet",
                  "unet_instantid", "vae_decoder"],
    "ip-adapter": ["text_encoder", "text_encoder_2", "image_encoder", "image_proj", "unet_ip_adapter", "vae_decoder"],
    "ip-adapter-plus": ["text_encoder", "text_encoder_2", "image_encoder", "image_proj_plus",
                        "unet_ip_adapter_plus", "vae_decoder"],
}


class UnsupportedComponent(ValueError):
    """The model family has no such pipeline or component (e.g. InstantID or text_encoder_2 for SD1.5)."""


def pipeline_components(spec: ModelSpec, pipeline: str) -> list[str]:
    """The components of `pipeline` for `spec`'s family: PIPELINE_COMPONENTS less the text encoders it
    lacks (SD1.5 has no text_encoder_2). UnsupportedComponent when the family has no such pipeline."""
    if pipeline not in spec.pipelines:
        raise UnsupportedComponent(f"{spec.name} has no {pipeline} pipeline (it has {', '.join(spec.pipelines)}): "
                                   f"use --pipeline {spec.pipelines[0]}" + (
                                       " (InstantID's adapter and IdentityNet are SDXL models)"
                                       if pipeline == "instantid" else ""))
    return [name for name in PIPELINE_COMPONENTS[pipeline]
            if not name.startswith("text_encoder") or name in spec.text_encoders]


def model_components(spec: ModelSpec) -> list[str]:
    """Every component of `spec`'s pipelines, deduplicated, in PIPELINE_COMPONENTS order."""
    names = [name for pipeline in spec.pipelines for name in pipeline_components(spec, pipeline)]
    return list(dict.fromkeys(names))
