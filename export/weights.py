"""Find checkpoint files: a local folder laid out like the hub repositories, or the hub cache.

With `weights_dir`, `Source("InstantX/InstantID", "ip-adapter.bin")` is looked up at
`weights_dir/InstantID/ip-adapter.bin`. Without it, the file comes from the Hugging Face hub
(its local cache first); offline, the error names what is missing and the flags to pass.
"""
from __future__ import annotations

from pathlib import Path

from export.specs import Source


class WeightsNotFound(FileNotFoundError):
    """A checkpoint file or folder is neither in the given folder nor obtainable from the hub."""


def _hint(source: Source) -> str:
    return (f"download {source.repo_id}/{source.path or ''} and pass --weights DIR with it at "
            f"DIR/{source.repo_name}/{source.path}, or use --random-init for random weights")


def resolve(source: Source, weights_dir: Path | None = None, *, folder: bool = False,
            patterns: tuple[str, ...] = ("*.json", "*.safetensors", "*.txt")) -> Path:
    """Local path of `source` (a file, or a folder when `folder=True`).

    weights_dir: folder holding `<repo name>/<path>`; None means the hub (cache first).
    patterns: for folders fetched from the hub, which files to fetch.
    Raises WeightsNotFound with the path looked at and what to do.
    """
    if weights_dir is not None:
        path = Path(weights_dir) / source.repo_name / source.path
        if (path.is_dir() if folder else path.is_file()):
            return path
        raise WeightsNotFound(f"{path} not found: {_hint(source)}")
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        if folder:
            allow = [f"{source.path}/{p}" if source.path else p for p in patterns]
            root = snapshot_download(source.repo_id, allow_patterns=allow)
            path = Path(root) / source.path
        else:
            path = Path(hf_hub_download(source.repo_id, source.path))
    except Exception as error:  # offline, gated, unknown repo: all mean "not obtainable here"
        raise WeightsNotFound(f"{source.repo_id}/{source.path} is not in the hub cache and could not be "
                              f"downloaded ({type(error).__name__}): {_hint(source)}") from error
    if not path.exists():
        raise WeightsNotFound(f"{source.repo_id} has no {source.path}: {_hint(source)}")
    return path
