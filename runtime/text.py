"""CLIP tokenization and prompt encoding for the runtime, from a tokenizer folder's `tokenizer.json`
(no transformers): long prompts in 77-token chunks and weighted fragments, as compel encodes them.

`ClipTokenizer` equals transformers' CLIPTokenizer with padding="max_length", truncation=True, 77
tokens: BOS, the BPE tokens (truncated), EOS, then the folder's pad token; `ids` gives the BPE
tokens of a text without truncation. `PromptEncoder` runs the build's text encoder sessions (SDXL's
two or SD1.5's one) into the UNet's text conditioning:

- the prompt's weighting syntax (runtime.prompt_weights) gives fragments; each encoder tokenizes
  them, splits the tokens into chunks of at most 75 (BOS + tokens + EOS + pad = 77; a chunk ends at
  the last sentence end '.', else phrase end '.,;:', else word end within its 75), encodes every
  chunk, and concatenates the hidden states along the token axis: (1, 77·k, C);
- weights act as compel's do: a chunk with weights is empty + (z - empty)·w per token (empty: the
  empty prompt's encoding); a fragment below 1 is also lerped towards the prompt without it
  (compel's DownweightMode.REMOVE: our encoder graphs take no attention mask), by tan((1-w)·π/2);
  every chunk keeps its own EOS embedding (compel's default split mode, SENTENCES);
- the pooled embedding (SDXL text_encoder_2's `text_embeds`) is that of the prompt's text without
  its weighting syntax (the fragments joined), truncated to 77 tokens: compel's pooled embedding of
  a prompt without syntax (compel itself pools the raw string, parentheses and numbers included);
- at most `max_chunks` chunks (what the UNet's `text_tokens` axis takes, `text_capacity`): the last
  kept chunk takes the next 75 tokens, the rest is dropped and reported as a warning.

This equals compel's `Compel(..., truncate_long_prompts=False, downweight_mode=DownweightMode.REMOVE)`
(SDXL: returned_embeddings_type=PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED per encoder, as
CompelForSDXL) and its pad_conditioning_tensors_to_same_length for rows of different lengths.
"""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tokenizers import Tokenizer

from runtime.prompt_weights import has_weights, parse_prompt

SDXL_TOKENIZERS = ("tokenizer", "tokenizer_2")  # a build that predates the `tokenizers` model fact
CHUNK = 77                 # one text encoder call: BOS + 75 tokens + EOS (+ pad)
DEFAULT_MAX_TEXT_TOKENS = 231  # a dynamic text axis with no recorded range (ONNX Runtime): engine.profiles' default
_SENTENCE, _PHRASE = (".</w>",), (".</w>", ",</w>", ";</w>", ":</w>")


def _special(config: dict, key: str, default: str) -> str:
    value = config.get(key, default)
    return value["content"] if isinstance(value, dict) else value


class ClipTokenizer:
    """Prompts -> input_ids (N, max_length) int64; `ids(text)` -> the text's BPE token ids."""

    def __init__(self, folder: Path, max_length: int = CHUNK):
        folder = Path(folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        pad = _special(config, "pad_token", "<|endoftext|>")
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._plain = Tokenizer.from_file(str(folder / "tokenizer.json"))  # no truncation, no padding
        self.pad_id = self.tokenizer.token_to_id(pad)
        self.bos_id = self.tokenizer.token_to_id(_special(config, "bos_token", "<|startoftext|>"))
        self.eos_id = self.tokenizer.token_to_id(_special(config, "eos_token", "<|endoftext|>"))
        if None in (self.pad_id, self.bos_id, self.eos_id):
            raise ValueError(f"{folder}: the pad/bos/eos tokens are not all in the vocabulary; re-export the tokenizer")
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(length=max_length, pad_id=self.pad_id, pad_token=pad)
        self.max_length = max_length

    def __call__(self, prompts: str | list[str]) -> np.ndarray:
        """One prompt or a list -> (N, max_length) int64 token ids."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return np.array([e.ids for e in self.tokenizer.encode_batch(prompts)], dtype=np.int64)

    def ids(self, text: str) -> list[int]:
        """The BPE token ids of `text`, without BOS/EOS, untruncated."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def token(self, token_id: int) -> str:
        """The vocabulary entry of one id (word ends carry '</w>')."""
        return self._plain.id_to_token(token_id)


class Chunks(NamedTuple):
    """A tokenized prompt: ids and weights (k, 77); tokens: its BPE token count; dropped: how many of
    them did not fit `max_chunks`."""

    ids: np.ndarray
    weights: np.ndarray
    tokens: int
    dropped: int


def _split_point(tokenizer, ids: list[int], body: int) -> int:
    """compel's SENTENCES split: after the last '.' within `body` tokens, else the last phrase end, else
    the last word end, else `body`."""
    if len(ids) <= body:
        return body
    texts = [tokenizer.token(i) for i in ids[:body]]
    for accept in (lambda t: t in _SENTENCE, lambda t: t in _PHRASE, lambda t: t.endswith("</w>")):
        for index in range(body - 1, -1, -1):
            if accept(texts[index]):
                return index + 1
    return body


def chunk_tokens(tokenizer, fragments: list[tuple[str, float]], max_chunks: int | None) -> Chunks:
    """Fragments -> chunks of BOS + at most 75 tokens + EOS + pad, with per-token weights (1 on the
    markers and pads); the last allowed chunk takes the next 75 tokens and the rest is dropped."""
    ids, weights = [], []
    for text, weight in fragments:
        fragment = tokenizer.ids(text)
        ids += fragment
        weights += [float(weight)] * len(fragment)
    body, total = tokenizer.max_length - 2, len(ids)
    rows, row_weights, dropped = [], [], 0
    while True:
        last = max_chunks is not None and len(rows) == max_chunks - 1
        split = body if last else _split_point(tokenizer, ids, body)
        chunk = [tokenizer.bos_id, *ids[:split], tokenizer.eos_id]
        pad = tokenizer.max_length - len(chunk)
        rows.append(chunk + [tokenizer.pad_id] * pad)
        row_weights.append([1.0, *weights[:split], 1.0] + [1.0] * pad)
        ids, weights = ids[split:], weights[split:]
        if not ids:
            break
        if last:
            dropped = len(ids)
            break
    return Chunks(np.array(rows, dtype=np.int64), np.array(row_weights, dtype=np.float32), total, dropped)


def encode_weighted(tokenizer, encode: Callable[[np.ndarray], torch.Tensor], fragments: list[tuple[str, float]],
                    max_chunks: int | None) -> tuple[torch.Tensor, Chunks]:
    """compel's weighted embedding of `fragments` through one text encoder.

    encode: input_ids (1, 77) int64 -> hidden states (1, 77, C) (any device; compute is float32).
    Returns (hidden (1, 77·k, C) float32, the base prompt's Chunks)."""
    empty = encode(np.array([[tokenizer.bos_id, tokenizer.eos_id] + [tokenizer.pad_id] * (tokenizer.max_length - 2)],
                            dtype=np.int64)).float()

    def embed(chunks: Chunks) -> torch.Tensor:
        out = []
        for ids, weights in zip(chunks.ids, chunks.weights):
            z = encode(ids[None]).float()
            if not (weights == 1).all():
                w = torch.as_tensor(weights, device=z.device)[None, :, None]
                z = torch.where(w == 1, z, empty + (z - empty) * w)
            out.append(z)
        return torch.cat(out, dim=1)

    chunks = chunk_tokens(tokenizer, fragments, max_chunks)
    base = embed(chunks)
    embeddings, lerp = [base], [1.0]
    for index, (_, weight) in enumerate(fragments):
        if weight >= 1:
            continue
        without = embed(chunk_tokens(tokenizer, fragments[:index] + fragments[index + 1:], max_chunks))
        while without.shape[1] < base.shape[1]:  # compel's padding with empty chunks
            without = torch.cat([without, empty], dim=1)
        embeddings.append(without[:, :base.shape[1]])
        lerp.append(math.tan((1.0 - max(1e-5, weight)) * math.pi / 2))
    if len(embeddings) > 1:
        lerp_weights = torch.tensor(lerp, device=base.device) / sum(lerp)
        base = sum(e * w for e, w in zip(embeddings, lerp_weights))
    return base, chunks


class Encoded(NamedTuple):
    """One prompt's conditioning: tokens (1, 77·k, C), pooled (1, P) or (1, 0), the truncation warning or None."""

    tokens: torch.Tensor
    pooled: torch.Tensor
    warning: str | None


class PromptEncoder:
    """Prompts -> the UNet's text conditioning through the build's text encoder sessions, LRU-cached.

    encoders / tokenizers: one per text encoder, in order (SDXL: text_encoder, text_encoder_2; SD1.5:
    text_encoder). Each session maps input_ids (1, 77) int64 to hidden_states (1, 77, C_i); the
    tokens are those concatenated along the width (1, 77·k, ΣC_i), k chunks (module docstring); the
    pooled embedding is the last encoder's `text_embeds` (1, P), or (1, 0) when no encoder has one.
    zero_negative: the model's force_zeros_for_empty_prompt (SDXL: a missing negative prompt is zeros;
    SD1.5: the empty prompt "" encoded). max_text_tokens: what the UNet takes (`text_capacity`; None:
    no limit); raise_hint: how to raise it, for the truncation warning ('{needed}' becomes the text tokens
    the prompt needs).
    """

    def __init__(self, encoders: list, tokenizers: list[ClipTokenizer], device, zero_negative: bool = True,
                 cache_size: int = 16, max_text_tokens: int | None = None, raise_hint: str = ""):
        if len(encoders) != len(tokenizers) or not encoders:
            raise ValueError(f"{len(encoders)} text encoders but {len(tokenizers)} tokenizers: the build's model "
                             "facts list one tokenizer per text encoder; re-export it")
        self.encoders, self.tokenizers, self.device = list(encoders), list(tokenizers), device
        self.zero_negative, self.cache_size = zero_negative, cache_size
        self.max_text_tokens, self.raise_hint = max_text_tokens, raise_hint
        self.max_chunks = None if max_text_tokens is None else max(1, max_text_tokens // CHUNK)
        self._cache: OrderedDict[str, tuple[tuple, str | None]] = OrderedDict()  # prompt -> ((tokens, pooled), warning)

    def __call__(self, prompt: str) -> tuple:
        """(text tokens (1, 77·k, C), pooled (1, P) or (1, 0)) for one prompt, on the device; cached (the same
        tuple while it stays in the cache)."""
        return self._cached(prompt)[0]

    def encode(self, prompt: str) -> Encoded:
        """One prompt's Encoded (tokens, pooled, truncation warning), on the device; LRU-cached."""
        (tokens, pooled), warning = self._cached(prompt)
        return Encoded(tokens, pooled, warning)

    def _cached(self, prompt: str) -> tuple[tuple, str | None]:
        cached = self._cache.get(prompt)
        if cached is None:
            tokens, pooled, warning = self._encode(prompt)
            cached = self._cache[prompt] = ((tokens, pooled), warning)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(prompt)
        return cached

    def _encode(self, prompt: str) -> Encoded:
        fragments = parse_prompt(prompt)
        hidden, pooled, warning, dtype = [], None, None, None
        for encoder, tokenizer in zip(self.encoders, self.tokenizers):
            outputs: dict[bytes, dict] = {}

            def run(ids: np.ndarray) -> dict:  # one session call per distinct chunk
                key = ids.tobytes()
                if key not in outputs:  # a copy: TensorRT outputs are reused buffers
                    outputs[key] = {k: v.to(self.device).clone() for k, v in
                                    encoder.run({"input_ids": torch.from_numpy(ids)}).items()}
                return outputs[key]

            tokens, chunks = encode_weighted(tokenizer, lambda ids: run(ids)["hidden_states"], fragments,
                                             self.max_chunks)
            hidden.append(tokens)
            dtype = dtype or next(iter(outputs.values()))["hidden_states"].dtype
            if chunks.dropped and warning is None:
                warning = self._warning(prompt, chunks, len(chunk_tokens(tokenizer, fragments, None).ids))
            if "text_embeds" in encoder.output_names:
                pooled = run(tokenizer(" ".join(text for text, _ in fragments)))["text_embeds"]
        width = max(h.shape[1] for h in hidden)  # (equal unless the tokenizers split differently)
        hidden = [torch.cat([h, *[self._empty(i)] * ((width - h.shape[1]) // CHUNK)], dim=1)
                  for i, h in enumerate(hidden)]
        tokens = torch.cat(hidden, dim=-1).to(dtype)
        pooled = tokens.new_zeros(1, 0) if pooled is None else pooled
        return Encoded(tokens, pooled, warning)

    def _empty(self, index: int) -> torch.Tensor:
        """Encoder `index`'s encoding of the empty prompt (1, 77, C_i)."""
        tokenizer = self.tokenizers[index]
        ids = np.array([[tokenizer.bos_id, tokenizer.eos_id] + [tokenizer.pad_id] * (CHUNK - 2)], dtype=np.int64)
        return self.encoders[index].run({"input_ids": torch.from_numpy(ids)})["hidden_states"].to(self.device).float()

    def _warning(self, prompt: str, chunks: Chunks, needed_chunks: int) -> str:
        shown = prompt if len(prompt) <= 40 else prompt[:37] + "..."
        return (f"prompt {shown!r} truncated: {chunks.dropped} of its {chunks.tokens} tokens were dropped; this "
                f"build's UNet takes {self.max_text_tokens} text tokens ({self.max_chunks} chunk(s) of up to 75 "
                f"prompt tokens), the whole prompt needs {needed_chunks * CHUNK}. Shorten the prompt, or raise the "
                f"limit: {self.raise_hint.replace('{needed}', str(needed_chunks * CHUNK))}".rstrip(": "))

    def __contains__(self, prompt: str) -> bool:
        """Whether `prompt`'s encoding is cached."""
        return prompt in self._cache

    def __len__(self) -> int:
        """How many prompt encodings are cached (at most cache_size)."""
        return len(self._cache)

    def rows(self, prompts: list[str], negative_prompts: list[str] | None) -> tuple:
        """(tokens, pooled, negative tokens, negative pooled), one row per prompt (negatives: one per prompt,
        or None for the model's default negative): tokens (N, T, C), pooled (N, P). Rows shorter than the
        longest are padded with the empty prompt's encoding, chunk by chunk (compel's
        pad_conditioning_tensors_to_same_length); a zero negative has the positives' length."""
        encoded = [self.encode(p) for p in prompts]
        negatives = self._negatives(prompts, negative_prompts)
        width = max(e.tokens.shape[1] for e in encoded + (negatives or []))
        empty = self.encode("").tokens

        def padded(e: Encoded) -> torch.Tensor:
            return torch.cat([e.tokens, *[empty] * ((width - e.tokens.shape[1]) // CHUNK)], dim=1)

        tokens, pooled = torch.cat([padded(e) for e in encoded]), torch.cat([e.pooled for e in encoded])
        if negatives is None:
            return tokens, pooled, torch.zeros_like(tokens), torch.zeros_like(pooled)
        return tokens, pooled, torch.cat([padded(e) for e in negatives]), torch.cat([e.pooled for e in negatives])

    def warnings(self, prompts: list[str], negative_prompts: list[str] | None) -> list[str]:
        """The truncation warnings of `rows(prompts, negative_prompts)`, each once; [] when nothing was cut."""
        every = [self.encode(p) for p in prompts] + (self._negatives(prompts, negative_prompts) or [])
        return list(dict.fromkeys(e.warning for e in every if e.warning))

    def _negatives(self, prompts: list[str], negative_prompts: list[str] | None) -> list[Encoded] | None:
        if negative_prompts is None and self.zero_negative:
            return None
        return [self.encode(p) for p in (negative_prompts or [""] * len(prompts))]


def text_capacity(unet) -> tuple[int | None, bool]:
    """(how many text tokens the UNet session's `text_tokens` input takes, whether that axis is dynamic).

    A static axis (a build that predates the dynamic text axis) is its size; a dynamic one the engine
    profile's max where the manifest records one (TensorRT), else DEFAULT_MAX_TEXT_TOKENS."""
    spec = unet.input("text_tokens")
    dim = spec.shape[1]
    if isinstance(dim, int) and dim > 0:
        return dim, False
    if spec.max is not None:
        return int(spec.max[1]), True
    return DEFAULT_MAX_TEXT_TOKENS, True


def build_tokenizers(assets) -> list[ClipTokenizer]:
    """The build's tokenizers, one per text encoder, from the model fact `tokenizers` (assets/<name>/;
    SDXL's two when a build predates the fact). assets: runtime.assets.Assets."""
    return [ClipTokenizer(assets.find(name)) for name in assets.value("tokenizers", list(SDXL_TOKENIZERS))]


def prompt_encoder(assets, open_session, device, cache_size: int = 16, max_text_tokens: int | None = None,
                   raise_hint: str = "") -> PromptEncoder:
    """The build's PromptEncoder: one text encoder session per tokenizer named by the model facts
    (tokenizer -> text_encoder, tokenizer_2 -> text_encoder_2), opened with `open_session(component)`,
    and the model's force_zeros_for_empty_prompt (SDXL's True when a build predates the fact)."""
    names = assets.value("tokenizers", list(SDXL_TOKENIZERS))
    return PromptEncoder([open_session(name.replace("tokenizer", "text_encoder")) for name in names],
                         build_tokenizers(assets), device, bool(assets.value("force_zeros_for_empty_prompt", True)),
                         cache_size, max_text_tokens, raise_hint)
