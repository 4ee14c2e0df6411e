"""Where each component comes from: load its PyTorch module(s) through export.loaders and wrap them.

`Sources(spec, ...).make(name)` returns an `export.components.Component` (a torch wrapper) or,
for the face models, a function `export(path) -> seconds` that cleans the given ONNX file.
Projector components also write their cached CFG negative tokens into the assets folder.
Modules are loaded per component and dropped after it, so at most one big model is in memory.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from export import components as comps
from export import face_models, loaders
from export.adapters import attach_ip_adapter
from export.assets import negative_tokens, save_negative_tokens
from export.checkpoint_dims import checkpoint_spec, count_cross_attn_layers  # noqa: F401 (re-exported)
from export.pipelines import (PIPELINE_COMPONENTS, PIPELINE_PARTS, UnsupportedComponent,  # noqa: F401 (re-exported)
                              model_components, pipeline_components)
from export.specs import ModelSpec

log = logging.getLogger("export")

@dataclass
class Sources:
    """Loads modules for one model at one precision; see the module docstring.

    `spec` is sized from the checkpoints (export.checkpoint_dims) when `weights_dir` is given.
    """

    spec: ModelSpec
    weights_dir: Path | None
    random_init: bool
    dtype: torch.dtype
    assets: Path
    attention: str = "stacked"
    face_models_dir: Path | None = None
    vae_fp16_fix: bool = False
    loras: tuple = ()  # export.lora.LoraSpec: fused into the UNet and text encoders once loaded
    _text: object = field(default=None, repr=False)
    _scratch: list = field(default_factory=list, repr=False)  # temporary folders, removed by release()

    def __post_init__(self) -> None:
        if self.weights_dir is not None:  # sizes from the files (the hub's are read by export.build per pipeline)
            self.spec = checkpoint_spec(self.spec, self.weights_dir, self.random_init)

    def _kw(self, dtype: torch.dtype | None = None) -> dict:
        return {"weights_dir": self.weights_dir, "random_init": self.random_init, "dtype": dtype or self.dtype}

    def make(self, name: str):
        """The Component (or face-model export function) called `name`."""
        makers = {"text_encoder": self._text_encoder, "text_encoder_2": self._text_encoder,
                  "image_encoder": self._image_encoder, "face_detector": self._face_detector,
                  "arcface": self._arcface, "face_proj": self._face_proj, "image_proj": self._image_proj,
                  "image_proj_plus": self._image_proj, "controlnet": self._controlnet,
                  "unet_instantid": self._unet, "unet_ip_adapter": self._unet, "unet_ip_adapter_plus": self._unet,
                  "vae_decoder": self._vae_decoder}
        if name not in makers:
            raise ValueError(f"unknown component {name!r}: choose from {sorted(makers)}")
        supported = model_components(self.spec)
        if name not in supported:
            pipelines = [p for p in self.spec.pipelines if name in PIPELINE_COMPONENTS[p]] or self.spec.pipelines
            raise UnsupportedComponent(
                f"{self.spec.name} has no {name} (its pipelines: {', '.join(self.spec.pipelines)}): build "
                f"--pipeline {pipelines[0]} --components {' '.join(pipeline_components(self.spec, pipelines[0]))}")
        return makers[name](name)

    def release(self) -> None:
        """Drop cached modules and the scratch folders of random-init stand-ins."""
        import shutil

        self._text = None
        for folder in self._scratch:
            shutil.rmtree(folder, ignore_errors=True)
        self._scratch.clear()

    # -- text -----------------------------------------------------------------------------------
    def _text_stack(self):
        if self._text is None:
            self._text = loaders.load_text_stack(self.spec, **self._kw())
            if self.loras:
                from export.lora import fuse_loras

                fuse_loras({name: getattr(self._text, name) for name in self.spec.text_encoders}, self.loras)
        return self._text

    def _text_encoder(self, name: str) -> comps.Component:
        stack = self._text_stack()
        encoder = getattr(stack, name)
        if name == self.spec.text_encoders[-1]:
            self._text = None  # all are made: let the stack go once this one is exported
        return comps.text_encoder_component(name, encoder, penultimate=self.spec.text_context == "penultimate")

    def tokenizers(self) -> tuple:
        """One tokenizer per text encoder ((tokenizer, tokenizer_2) for SDXL) as loaded from the weights
        (or written from open_clip's vocabulary)."""
        return loaders.load_tokenizers(self.spec, self.weights_dir, self.random_init)

    def scheduler_config(self) -> dict:
        """The scheduler_config.json dict."""
        return loaders.load_scheduler_config(self.spec, self.weights_dir, self.random_init)

    # -- image prompt ----------------------------------------------------------------------------
    def _image_encoder(self, name: str) -> comps.Component:
        return comps.image_encoder_component(loaders.load_image_encoder(self.spec, **self._kw()))

    def _image_proj(self, name: str) -> comps.Component:
        plus = name == "image_proj_plus"
        projector, _ = loaders.load_ip_adapter(self.spec, _NoUNet(self.spec), plus, **self._kw(torch.float32))
        if plus:
            encoder = loaders.load_image_encoder(self.spec, **self._kw(torch.float32))
            size = self.spec.image_encoder["image_size"]
            with torch.no_grad():  # the baseline's negative: the encoder on zero pixel_values
                zero = encoder(torch.zeros(1, 3, size, size), output_hidden_states=True).hidden_states[-2]
            del encoder
            save_negative_tokens(self.assets, "ip_adapter_plus", negative_tokens(projector, zero))
            return comps.projector_component(name, projector.to(self.dtype), "hidden_states",
                                             (zero.shape[1], projector.config.embedding_dim), "ip_tokens")
        embed_dim = projector.config.embed_dim
        save_negative_tokens(self.assets, "ip_adapter", negative_tokens(projector, torch.zeros(1, embed_dim)))
        return comps.projector_component(name, projector.to(self.dtype), "image_embeds", (embed_dim,), "ip_tokens")

    # -- InstantID -------------------------------------------------------------------------------
    def _face_proj(self, name: str) -> comps.Component:
        resampler, _ = loaders.load_instantid_adapter(self.spec, _NoUNet(self.spec), **self._kw(torch.float32))
        dim = resampler.config.embedding_dim
        save_negative_tokens(self.assets, "instantid", negative_tokens(resampler, torch.zeros(1, dim)))
        return comps.projector_component(name, resampler.to(self.dtype), "face_embedding", (dim,), "face_tokens")

    def _face_folder(self) -> Path:
        if self.face_models_dir is None and self.random_init:
            from export.tiny_face import write_tiny_face_models

            folder = Path(tempfile.mkdtemp(prefix="face_models_"))
            log.warning("no --face-models: using random-weight antelopev2 stand-ins (export.tiny_face)")
            write_tiny_face_models(folder)
            self.face_models_dir = folder
            self._scratch.append(folder)
        return loaders.face_models_dir(self.spec, self.weights_dir, self.face_models_dir)

    def _face_detector(self, name: str):
        kind = self.spec.default_face_detector
        source = None if kind == "yunet" else self._face_folder() / self.spec.face_detector_file
        return lambda path: face_models.export_face_detector(kind, path, source)

    def _arcface(self, name: str):
        source = self._face_folder() / self.spec.face_recognizer_file
        return lambda path: face_models.export_arcface(source, path)

    def _controlnet(self, name: str) -> comps.Component:
        controlnet = loaders.load_controlnet(self.spec, **self._kw())
        return comps.controlnet_component(controlnet, self.spec.instantid_resampler.num_queries)

    # -- UNet + VAE ------------------------------------------------------------------------------
    def _unet(self, name: str) -> comps.Component:
        unet = loaders.load_unet(self.spec, **self._kw())
        if self.loras:
            from export.lora import fuse_loras

            fuse_loras({"unet": unet}, self.loras, unet.config)
        if name == "unet_instantid":
            _, ip_state = loaders.load_instantid_adapter(self.spec, unet, **self._kw())
            tokens = self.spec.instantid_resampler.num_queries
        else:
            plus = name == "unet_ip_adapter_plus"
            _, ip_state = loaders.load_ip_adapter(self.spec, unet, plus, **self._kw())
            tokens = self.spec.ip_plus_resampler.num_queries if plus else self.spec.ip_image_proj.num_tokens
        attach_ip_adapter(unet, ip_state, tokens)
        return comps.unet_component(name, unet, tokens, self.attention)

    def _vae_decoder(self, name: str) -> comps.Component:
        dtype = self.dtype if self.vae_fp16_fix else torch.float32
        vae = loaders.load_vae(self.spec, fp16_fix=self.vae_fp16_fix, **self._kw(dtype))
        return comps.vae_decoder_component(vae)


class _NoUNet:
    """Stands in for the UNet when only an adapter's projector is needed: it has no attention
    layers, so `random_init` makes no IP weights (the projector's seed does not depend on them)."""

    def __init__(self, spec: ModelSpec):
        self.config = SimpleNamespace(cross_attention_dim=spec.cross_attention_dim)
        self.attn_processors: dict = {}
