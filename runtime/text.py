"""CLIP tokenization for the runtime, from a tokenizer folder's `tokenizer.json` (no transformers).

Equal to transformers' CLIPTokenizer with padding="max_length", truncation=True, 77 tokens:
BOS, the BPE tokens (truncated), EOS, then the folder's pad token.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


class ClipTokenizer:
    """Prompts -> input_ids (N, max_length) int64."""

    def __init__(self, folder: Path, max_length: int = 77):
        folder = Path(folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        pad = config.get("pad_token", "<|endoftext|>")
        pad = pad["content"] if isinstance(pad, dict) else pad
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        pad_id = self.tokenizer.token_to_id(pad)
        if pad_id is None:
            raise ValueError(f"{folder}: pad token {pad!r} is not in the vocabulary; re-export the tokenizer")
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad)
        self.max_length = max_length

    def __call__(self, prompts: str | list[str]) -> np.ndarray:
        """One prompt or a list -> (N, max_length) int64 token ids."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return np.array([e.ids for e in self.tokenizer.encode_batch(prompts)], dtype=np.int64)
