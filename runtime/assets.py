"""A build directory's `assets/` and manifest metadata, read without torch models or diffusers.

    assets = Assets.open("build/tiny")
    assets.tokenizers()          # (ClipTokenizer, ClipTokenizer) from assets/tokenizer, tokenizer_2
    assets.scheduler_config()    # assets/scheduler_config.json (diffusers scheduler config dict)
    assets.vae_scaling_factor    # the model fact vae_scaling_factor (0.13025 for SDXL)
    assets.constant("negative_tokens_instantid")   # assets/<name>.npy (cached negatives), or None
    assets.value("default_resolution")             # model facts: assets/model.json + manifest metadata

These are the files export.assets writes; a missing one raises AssetError saying how to re-export.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.manifest import load_manifest, verify_onnx
from runtime.ip_scales import cross_attention_layer_names
from runtime.text import ClipTokenizer


class AssetError(FileNotFoundError):
    """A build directory lacks an asset the runtime needs."""


@dataclass
class Assets:
    """build_dir/assets plus manifest metadata (`metadata`: the exporter's dict)."""

    build_dir: Path
    metadata: dict[str, Any] = field(default_factory=dict)
    model: str = "tiny"
    manifest: Any = None

    @classmethod
    def open(cls, build_dir: str | os.PathLike, manifest=None) -> Assets:
        """Assets of a build directory (reads manifest.json unless a Manifest is given)."""
        manifest = manifest or load_manifest(build_dir)
        facts_file = Path(build_dir) / "assets" / "model.json"
        facts = json.loads(facts_file.read_text()) if facts_file.is_file() else {}
        return cls(Path(build_dir), {**facts, **manifest.metadata}, manifest.model, manifest)

    @property
    def folder(self) -> Path:
        return self.build_dir / "assets"

    def _missing(self, what: str) -> AssetError:
        return AssetError(f"{self.build_dir} has no {what}; re-export: "
                          f"python -m export.build --model {self.model} --stage onnx --out {self.build_dir}")

    def find(self, name: str) -> Path:
        """assets/<name>; AssetError naming the re-export command when it is absent."""
        path = self.folder / name
        if not path.exists():
            raise self._missing(f"assets/{name}")
        return path

    def tokenizers(self) -> tuple[ClipTokenizer, ClipTokenizer]:
        """The two SDXL CLIP tokenizers (77 tokens; they differ in the pad token)."""
        return ClipTokenizer(self.find("tokenizer")), ClipTokenizer(self.find("tokenizer_2"))

    def scheduler_config(self) -> dict:
        """The diffusers scheduler_config.json dict (for runtime.schedulers.build_scheduler)."""
        return json.loads(self.find("scheduler_config.json").read_text())

    @property
    def vae_scaling_factor(self) -> float:
        """Latents are divided by this before the VAE decoder (SDXL: 0.13025): the model fact the
        exporter writes to assets/model.json and the manifest metadata."""
        if "vae_scaling_factor" not in self.metadata:
            raise self._missing("vae_scaling_factor in assets/model.json or the manifest metadata")
        return float(self.metadata["vae_scaling_factor"])

    def value(self, key: str, default=None):
        """A metadata value (e.g. 'default_resolution'), or `default`."""
        return self.metadata.get(key, default)

    def cross_attention_layers(self) -> list[str]:
        """The UNet's attn2 layer names in the order of its `ip_scale` input (the model fact
        `cross_attention_layers`; for an older build, derived from assets/unet/config.json when present).
        AssetError naming the re-export command when neither is there."""
        names = self.metadata.get("cross_attention_layers")
        if names:
            return list(names)
        config = self.folder / "unet" / "config.json"
        if config.is_file():
            return cross_attention_layer_names(json.loads(config.read_text()))
        raise self._missing("cross_attention_layers in assets/model.json (the UNet's layer names, which per-block "
                            "ip_scale needs)")

    def constant(self, name: str) -> torch.Tensor | None:
        """A cached tensor assets/<name>.npy (export.assets.save_negative_tokens); None if absent."""
        path = self.folder / f"{name}.npy"
        return torch.from_numpy(np.load(path)) if path.is_file() else None

    def engine_range(self, component: str, input_name: str = "sample") -> tuple[tuple, tuple] | None:
        """(min shape, max shape) of an engine input over its profiles, or None (no engine / no range)."""
        entry = self.manifest.components.get(component) if self.manifest is not None else None
        if entry is None or entry.engine is None:
            return None
        tensor = next((t for t in entry.engine.inputs if t.name == input_name), None)
        if tensor is None or tensor.min is None or tensor.max is None:
            return None
        return tuple(tensor.min), tuple(tensor.max)

    def face_analyzer(self, verify_sha256: bool = True):
        """FaceAnalyzer over onnx/face_detector.onnx (YuNet or SCRFD, told apart by its outputs) and
        onnx/arcface.onnx, on ONNX Runtime (CPU), each checked against its manifest sha256 first
        (verify_sha256=False: skip the hashing). FileNotFoundError saying how to export them;
        ManifestError for a file that does not match."""
        from runtime.face import ArcFace, FaceAnalyzer, SCRFDDetector, YuNetDetector

        paths = {}
        for component in ("face_detector", "arcface"):
            entry = self.manifest.components.get(component)
            if entry is None or entry.onnx is None:
                raise AssetError(f"{self.build_dir} has no {component}: export it (python -m export.build --model "
                                 f"{self.model} --pipeline instantid --out {self.build_dir}) or pass face_analyzer=")
            paths[component] = verify_onnx(self.build_dir, component, entry.onnx, self.model, verify_sha256)[0]
        outputs = {t.name for t in self.manifest.components["face_detector"].onnx.outputs}
        detector = YuNetDetector if "cls_8" in outputs else SCRFDDetector
        return FaceAnalyzer(detector(paths["face_detector"]), ArcFace(paths["arcface"]))
