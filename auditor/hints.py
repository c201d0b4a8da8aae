"""Trigger hints: the vocabulary tokens nearest to each vector of a mined soft prompt.

A soft prompt that forces a PV sits near the trigger's embedding, so its nearest vocabulary tokens
hint at the trigger. Only tokens a text can contain are candidates: special tokens ([CLS], [PAD],
<s>, ...), placeholder slots ([unused12], <unused3>, madeupword0001) and tokens that decode to
nothing are left out, because untrained rows such as the [unusedN] slots crowd around any vector
and say nothing about a trigger. A token is shown as the text it decodes to (RoBERTa's "Ġword"
and SentencePiece's "▁word" read "word"); a WordPiece continuation keeps its "##" so that
"##y" still reads as the end of a word.

Torch-free: the inputs are arrays (a torch tensor is read through `.detach().cpu()`).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

# Placeholder rows of common vocabularies: BERT's [unusedN], <unusedN>, fairseq's madeupwordN.
PLACEHOLDER = re.compile(r"^(\[unused\d+\]|<unused\d+>|madeupword\d+)$", re.IGNORECASE)


def _array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def readable_token(tokenizer: Any, token: str) -> str:
    """The text `token` stands for ('' when it stands for none): byte-level and SentencePiece
    markers decoded, a WordPiece continuation ('##y') kept as it is."""
    if token.startswith("##"):
        return token if len(token) > 2 else ""
    try:
        text = tokenizer.convert_tokens_to_string([token])
    except Exception:  # noqa: BLE001 - a tokenizer that cannot decode one token: show it raw
        text = token
    text = text.strip()
    if not text or "\ufffd" in text:  # nothing, or a partial UTF-8 byte of byte-level BPE
        return ""
    return text


def usable_token(tokenizer: Any, token_id: int, special_ids: set[int]) -> str:
    """The readable text of `token_id`, or '' when it is special, a placeholder or empty."""
    if token_id in special_ids:
        return ""
    token = tokenizer.convert_ids_to_tokens(int(token_id))
    if not isinstance(token, str) or not token or PLACEHOLDER.match(token):
        return ""
    return readable_token(tokenizer, token)


def nearest_tokens(prompt: Any, embeddings: Any, tokenizer: Any, k: int = 3) -> list[list[str]]:
    """Per soft-prompt vector (rows of `prompt`, [L, d]), the `k` nearest usable vocabulary
    tokens by cosine similarity with the rows of `embeddings` ([V, d]), nearest first, as
    readable text. Fewer than `k` only when the vocabulary has fewer usable tokens."""
    p = _array(prompt)
    w = _array(embeddings)
    pn = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    wn = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    sims = pn @ wn.T
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    seen: dict[int, str] = {}  # token id -> readable text ('' = not usable), decoded once
    out: list[list[str]] = []
    for row in sims:
        order = np.argsort(-row, kind="stable")
        words: list[str] = []
        for i in order:
            i = int(i)
            if i not in seen:
                seen[i] = usable_token(tokenizer, i, special)
            if seen[i] and seen[i] not in words:
                words.append(seen[i])
                if len(words) == k:
                    break
        out.append(words)
    return out


__all__ = ["PLACEHOLDER", "nearest_tokens", "readable_token", "usable_token"]
