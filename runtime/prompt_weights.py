"""Prompt weighting syntax -> (text, weight) fragments, as A1111 and compel write it; no dependencies.

    (text:1.3)   text at weight 1.3                          (A1111)
    (text)       text x 1.1;  [text]  text / 1.1             (A1111)
    (text)1.3    text at weight 1.3                          (compel)
    word+ word++ x 1.1 per '+';  word- word--  x 0.9 per '-' (compel; also after a group: (a b)--)
    \\( \\) \\[ \\]  literal brackets

Groups nest and their weights multiply: `(a (b:1.5):0.5)` gives a at 0.5 and b at 0.75. A bracket
without its partner (`a (red cat`, `a red) cat`) is literal text, as compel reads it; nothing here
raises. Where the two syntaxes disagree the table above decides: compel reads a bare `(text)` as
weight 1 and `[text]` literally; A1111 has no `word+`. compel's `.blend()`, `.and()`, `.swap()` are
not parsed (they stay text). Adjacent fragments of equal weight are merged with a space, as compel
merges them, so `parse_prompt("a red cat")` is `[("a red cat", 1.0)]`.

How the weights act on the text encoders' hidden states (compel's algorithm) is runtime.text's
`encode_weighted`.
"""
from __future__ import annotations

import re

UP = 1.1              # (text), text+
A1111_DOWN = 1 / 1.1  # [text]
COMPEL_DOWN = 0.9     # text-
_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_COLON_WEIGHT = re.compile(r":\s*(\d+(?:\.\d*)?|\.\d+)\s*$")
_WORD_END = re.compile(r"[^\s,.;:!?()\[\]\"]+$")  # the word a trailing '+'/'-' run weights
_PAIRS = {"(": ")", "[": "]"}
_ESCAPED = "()[]\\"


def parse_prompt(prompt: str) -> list[tuple[str, float]]:
    """A prompt -> its fragments [(text, weight), ...] in order; [("", 1.0)] for an empty prompt.

    Texts are stripped and never empty (except that one); weights are >= 0 floats."""
    pieces: list[tuple[str, float]] = []
    _walk(prompt, 0, len(prompt), 1.0, _match_brackets(prompt), pieces)
    merged: list[tuple[str, float]] = []
    for text, weight in pieces:
        text = text.strip()
        if not text:
            continue
        if merged and merged[-1][1] == weight:
            merged[-1] = (f"{merged[-1][0]} {text}", weight)
        else:
            merged.append((text, weight))
    return merged or [("", 1.0)]


def has_weights(fragments: list[tuple[str, float]]) -> bool:
    """Whether any fragment's weight differs from 1."""
    return any(weight != 1.0 for _, weight in fragments)


def _match_brackets(prompt: str) -> dict[int, int]:
    """Index of each balanced '(' / '[' -> index of its partner; escaped and unpaired brackets are left out."""
    pairs, stack, index = {}, [], 0
    while index < len(prompt):
        char = prompt[index]
        if char == "\\" and index + 1 < len(prompt) and prompt[index + 1] in _ESCAPED:
            index += 2
            continue
        if char in _PAIRS:
            stack.append(index)
        elif char in _PAIRS.values():
            if stack and _PAIRS[prompt[stack[-1]]] == char:
                pairs[stack.pop()] = index
            elif char in [_PAIRS[prompt[i]] for i in stack]:  # close the nearest partner, inner ones stay literal
                while _PAIRS[prompt[stack[-1]]] != char:
                    stack.pop()
                pairs[stack.pop()] = index
        index += 1
    return pairs


def _sign_run(prompt: str, start: int, end: int) -> tuple[float, int]:
    """A run of '+' (x1.1 each) or '-' (x0.9 each) at `start` that ends a word: (factor, its length);
    (1.0, 0) when there is none (the run must not run into a letter or digit: `a+b` is text)."""
    if start >= end or prompt[start] not in "+-":
        return 1.0, 0
    sign, stop = prompt[start], start
    while stop < end and prompt[stop] == sign:
        stop += 1
    if stop < end and prompt[stop].isalnum():
        return 1.0, 0
    return (UP if sign == "+" else COMPEL_DOWN) ** (stop - start), stop - start


def _walk(prompt: str, start: int, end: int, weight: float, pairs: dict[int, int],
          pieces: list[tuple[str, float]]) -> None:
    """Append the (text, weight) pieces of prompt[start:end] read at `weight`."""
    text: list[str] = []

    def flush():
        if text:
            pieces.append(("".join(text), weight))
            text.clear()

    index = start
    while index < end:
        char = prompt[index]
        if char == "\\" and index + 1 < end and prompt[index + 1] in _ESCAPED:
            text.append(prompt[index + 1])
            index += 2
        elif index in pairs and pairs[index] < end:
            flush()
            close, inner_end, after = pairs[index], pairs[index], pairs[index] + 1
            if char == "[":
                factor = A1111_DOWN
            elif match := _COLON_WEIGHT.search(prompt, index + 1, close):
                factor, inner_end = float(match.group(1)), match.start()
            elif match := _NUMBER.match(prompt, after, end):
                factor, after = float(match.group()), match.end()
            else:
                factor, run = _sign_run(prompt, after, end)
                factor, after = (factor, after + run) if run else (UP, after)
            _walk(prompt, index + 1, inner_end, weight * factor, pairs, pieces)
            index = after
        elif char in "+-" and text and (word := _WORD_END.search("".join(text))):
            factor, run = _sign_run(prompt, index, end)
            if not run:
                text.append(char)
                index += 1
                continue
            joined = "".join(text)
            text[:] = list(joined[:word.start()])
            flush()
            pieces.append((word.group(), weight * factor))
            index += run
        else:
            text.append(char)
            index += 1
    flush()
