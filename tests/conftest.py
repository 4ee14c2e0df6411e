"""Shared fixtures: the real face models folder and the tiny model folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytest_plugins = ["fixtures_tiny"]


def shared_models_dir() -> Path | None:
    """Folder of real face models: $INSTANTRT_SHARED_MODELS, else ../shared/models; None if absent."""
    env = os.environ.get("INSTANTRT_SHARED_MODELS")
    for candidate in ([Path(env)] if env else []) + [REPO.parent / "shared" / "models"]:
        if (candidate / "yunet_s_640_640.onnx").is_file():
            return candidate
    return None


@pytest.fixture(scope="session")
def real_models() -> Path:
    """Real YuNet/MobileFaceNet folder, or skip with the reason."""
    folder = shared_models_dir()
    if folder is None:
        pytest.skip("real face models not found: set INSTANTRT_SHARED_MODELS or place them in ../shared/models")
    return folder


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """The tiny model written once per session in the real checkpoint formats."""
    from export.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("tiny_weights"))
