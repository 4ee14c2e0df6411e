"""The baseline's prompt encoding: runtime.text's PromptEncoder (long prompts in 77-token chunks,
A1111/compel weighting, compel's padding) over the baseline's torch text encoders and transformers
tokenizers, so runtime and baseline encode every prompt the same way. No compel needed.
"""
from __future__ import annotations

import numpy as np
import torch

from runtime.text import DEFAULT_MAX_TEXT_TOKENS, PromptEncoder


class HFTokenizer:
    """A transformers CLIPTokenizer as runtime.text's chunking reads a tokenizer (ClipTokenizer's interface)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.max_length = tokenizer, tokenizer.model_max_length
        self.bos_id, self.eos_id, self.pad_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id

    def __call__(self, prompt: str) -> np.ndarray:
        """One prompt -> (1, 77) int64: BOS, tokens (truncated), EOS, pad."""
        return self.tokenizer([prompt], padding="max_length", max_length=self.max_length, truncation=True,
                              return_tensors="np").input_ids.astype(np.int64)

    def ids(self, text: str) -> list[int]:
        """The BPE token ids of `text`, without BOS/EOS, untruncated."""
        return self.tokenizer.encode(text, add_special_tokens=False, truncation=False, verbose=False)

    def token(self, token_id: int) -> str:
        return self.tokenizer.convert_ids_to_tokens(token_id)


class TorchTextSession:
    """A torch CLIP text encoder as a runtime Session is called: run({"input_ids"}) -> hidden_states
    (penultimate, or the last hidden state) and, with a projection, text_embeds."""

    def __init__(self, encoder: torch.nn.Module, penultimate: bool, device):
        self.encoder, self.penultimate, self.device = encoder, penultimate, device
        self.output_names = ("hidden_states", "text_embeds") if hasattr(encoder, "text_projection") \
            else ("hidden_states",)

    @torch.no_grad()
    def run(self, feeds: dict) -> dict[str, torch.Tensor]:
        out = self.encoder(feeds["input_ids"].to(self.device), output_hidden_states=self.penultimate)
        hidden = out.hidden_states[-2] if self.penultimate else out.last_hidden_state
        return {"hidden_states": hidden, **({"text_embeds": out.text_embeds} if "text_embeds" in self.output_names
                                            else {})}


def torch_prompt_encoder(text_stack, spec, device, max_text_tokens: int | None = DEFAULT_MAX_TEXT_TOKENS
                         ) -> PromptEncoder:
    """A PromptEncoder over `text_stack` (export.loaders.TextStack) for `spec` (its text_context and
    force_zeros_for_empty_prompt); max_text_tokens: the runtime's default limit (231), None for none."""
    penultimate = spec.text_context == "penultimate"
    pairs = text_stack.pairs()
    return PromptEncoder([TorchTextSession(encoder, penultimate, device) for _, encoder in pairs],
                         [HFTokenizer(tokenizer) for tokenizer, _ in pairs], device,
                         spec.force_zeros_for_empty_prompt, max_text_tokens=max_text_tokens)
