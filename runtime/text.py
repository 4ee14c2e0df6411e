"""CLIP tokenization and prompt encoding for the runtime, from a tokenizer folder's `tokenizer.json`
(no transformers).

`ClipTokenizer` equals transformers' CLIPTokenizer with padding="max_length", truncation=True, 77
tokens: BOS, the BPE tokens (truncated), EOS, then the folder's pad token. `PromptEncoder` runs the
build's text encoder sessions (SDXL's two or SD1.5's one) into the UNet's text conditioning.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

SDXL_TOKENIZERS = ("tokenizer", "tokenizer_2")  # a build that predates the `tokenizers` model fact


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


class PromptEncoder:
    """Prompts -> the UNet's text conditioning through the build's text encoder sessions, LRU-cached.

    encoders / tokenizers: one per text encoder, in order (SDXL: text_encoder, text_encoder_2; SD1.5:
    text_encoder). Each session maps input_ids (1, 77) int64 to hidden_states (1, 77, C_i); the
    tokens are those concatenated along the width (1, 77, ΣC_i), the pooled embedding is the last
    encoder's `text_embeds` (1, P), or (1, 0) when no encoder has one (SD1.5: no added conditioning).
    zero_negative: the model's force_zeros_for_empty_prompt (SDXL: a missing negative prompt is zeros;
    SD1.5: the empty prompt "" encoded).
    """

    def __init__(self, encoders: list, tokenizers: list[ClipTokenizer], device, zero_negative: bool = True,
                 cache_size: int = 16):
        if len(encoders) != len(tokenizers) or not encoders:
            raise ValueError(f"{len(encoders)} text encoders but {len(tokenizers)} tokenizers: the build's model "
                             "facts list one tokenizer per text encoder; re-export it")
        self.encoders, self.tokenizers, self.device = list(encoders), list(tokenizers), device
        self.zero_negative, self.cache_size = zero_negative, cache_size
        self._cache: OrderedDict[str, tuple] = OrderedDict()

    def __call__(self, prompt: str) -> tuple:
        """(text tokens (1, 77, C), pooled (1, P) or (1, 0)) for one prompt, on the device; cached."""
        cached = self._cache.get(prompt)
        if cached is None:
            hidden, pooled = [], None
            for encoder, tokenizer in zip(self.encoders, self.tokenizers):
                out = encoder.run({"input_ids": torch.from_numpy(tokenizer([prompt]))})
                hidden.append(out["hidden_states"].to(self.device))
                pooled = out.get("text_embeds", pooled)
            tokens = torch.cat(hidden, dim=-1)  # a copy: TensorRT outputs are reused buffers
            pooled = tokens.new_zeros(1, 0) if pooled is None else pooled.to(self.device).clone()
            cached = self._cache[prompt] = (tokens, pooled)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(prompt)
        return cached

    def __contains__(self, prompt: str) -> bool:
        """Whether `prompt`'s encoding is cached."""
        return prompt in self._cache

    def __len__(self) -> int:
        """How many prompt encodings are cached (at most cache_size)."""
        return len(self._cache)

    def rows(self, prompts: list[str], negative_prompts: list[str] | None) -> tuple:
        """(tokens, pooled, negative tokens, negative pooled), one row per prompt (negatives: one per prompt,
        or None for the model's default negative)."""
        encoded = [self(p) for p in prompts]
        tokens, pooled = torch.cat([e[0] for e in encoded]), torch.cat([e[1] for e in encoded])
        if negative_prompts is None and self.zero_negative:
            return tokens, pooled, torch.zeros_like(tokens), torch.zeros_like(pooled)
        negatives = [self(p) for p in (negative_prompts or [""] * len(prompts))]
        return tokens, pooled, torch.cat([e[0] for e in negatives]), torch.cat([e[1] for e in negatives])


def build_tokenizers(assets) -> list[ClipTokenizer]:
    """The build's tokenizers, one per text encoder, from the model fact `tokenizers` (assets/<name>/;
    SDXL's two when a build predates the fact). assets: runtime.assets.Assets."""
    return [ClipTokenizer(assets.find(name)) for name in assets.value("tokenizers", list(SDXL_TOKENIZERS))]


def prompt_encoder(assets, open_session, device, cache_size: int = 16) -> PromptEncoder:
    """The build's PromptEncoder: one text encoder session per tokenizer named by the model facts
    (tokenizer -> text_encoder, tokenizer_2 -> text_encoder_2), opened with `open_session(component)`,
    and the model's force_zeros_for_empty_prompt (SDXL's True when a build predates the fact)."""
    names = assets.value("tokenizers", list(SDXL_TOKENIZERS))
    return PromptEncoder([open_session(name.replace("tokenizer", "text_encoder")) for name in names],
                         build_tokenizers(assets), device, bool(assets.value("force_zeros_for_empty_prompt", True)),
                         cache_size)
