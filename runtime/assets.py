"""A build directory's `assets/` and manifest metadata, read without torch models or diffusers.

    assets = Assets.open("build/tiny")
    assets.tokenizers()          # (ClipTokenizer, ClipTokenizer) from assets/tokenizer, tokenizer_2
    assets.scheduler_config()    # diffusers scheduler_config.json dict
    assets.vae_scaling_factor    # float (0.13025 for SDXL)
    assets.constant("negative_tokens_instantid")   # cached input-independent tensors, or None
    assets.value("default_resolution")             # model facts: assets/model.json + manifest metadata

Where a value is looked for is listed in one place per value (`_CANDIDATES`), so a build made by
an older exporter still opens; a missing file raises AssetError saying how to re-export.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime.text import ClipTokenizer

_CANDIDATES = {
    "tokenizer": ("tokenizer",),
    "tokenizer_2": ("tokenizer_2",),
    "scheduler": ("scheduler_config.json", "scheduler/scheduler_config.json"),
    "vae": ("vae_config.json", "vae/config.json"),
}
SDXL_VAE_SCALING = 0.13025


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
        from engine.manifest import load_manifest

        manifest = manifest or load_manifest(build_dir)
        facts_file = Path(build_dir) / "assets" / "model.json"
        facts = json.loads(facts_file.read_text()) if facts_file.is_file() else {}
        return cls(Path(build_dir), {**facts, **manifest.metadata}, manifest.model, manifest)

    @property
    def folder(self) -> Path:
        return self.build_dir / "assets"

    def find(self, what: str, names: tuple[str, ...] | None = None) -> Path:
        """The first existing assets/<candidate> for `what`; AssetError naming the re-export command."""
        for name in names or _CANDIDATES[what]:
            path = self.folder / name
            if path.exists():
                return path
        raise AssetError(f"{self.folder} has no {what} (looked for {list(names or _CANDIDATES[what])}); re-export: "
                         f"python -m export.build --model {self.model} --stage onnx --out {self.build_dir}")

    def tokenizers(self) -> tuple[ClipTokenizer, ClipTokenizer]:
        """The two SDXL CLIP tokenizers (77 tokens; they differ in the pad token)."""
        return ClipTokenizer(self.find("tokenizer")), ClipTokenizer(self.find("tokenizer_2"))

    def scheduler_config(self) -> dict:
        """The diffusers scheduler_config.json dict (for runtime.schedulers.build_scheduler)."""
        if isinstance(self.metadata.get("scheduler_config"), dict):
            return dict(self.metadata["scheduler_config"])
        return json.loads(self.find("scheduler").read_text())

    @property
    def vae_scaling_factor(self) -> float:
        """Latents are divided by this before the VAE decoder (SDXL: 0.13025)."""
        for key in ("vae_scaling_factor", "scaling_factor"):
            if key in self.metadata:
                return float(self.metadata[key])
        vae = self.metadata.get("vae")
        if isinstance(vae, dict) and "scaling_factor" in vae:
            return float(vae["scaling_factor"])
        try:
            return float(json.loads(self.find("vae").read_text())["scaling_factor"])
        except AssetError:
            return SDXL_VAE_SCALING

    def value(self, key: str, default=None):
        """A metadata value (e.g. 'default_resolution'), or `default`."""
        return self.metadata.get(key, default)

    def constant(self, name: str) -> torch.Tensor | None:
        """A cached tensor assets/<name>.npy or a key of assets/constants.safetensors; None if absent."""
        path = self.folder / f"{name}.npy"
        if path.is_file():
            return torch.from_numpy(np.load(path))
        for file in sorted(self.folder.glob("*.safetensors")) if self.folder.is_dir() else ():
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                if name in handle.keys():
                    return handle.get_tensor(name)
        return None

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
        from engine.manifest import verify_onnx
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
