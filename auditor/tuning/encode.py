"""Encoding task inputs exactly as the bundle runtime does: special tokens, no truncation, one
segment (token types all 0; a pair is ``[CLS] a [SEP] b [SEP]``), right-padded. A head on
``[MASK]`` reads the mask token of the monitor's template on the last text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..bundle import MASK_TEMPLATE
from ..errors import InputError


@dataclass
class Batch:
    """Token ids (right-padded), attention mask and, for token tasks, the position of the first
    sub-token of every whitespace word (in the token sequence, before the prompt) per row."""

    ids: np.ndarray  # int64 [B, S]
    mask: np.ndarray  # int64 [B, S]
    word_starts: list[list[int]]
    # sequence tasks: the position the head reads per row (0 = [CLS]; the [MASK] for target mask)
    target_pos: list[int] = field(default_factory=list)


def word_first_tokens(
    text: str, offsets: Sequence[tuple[int, int]], special: Sequence[int]
) -> list[int]:
    """Index of the first token of every whitespace word of ``text`` (-1 when a word got no
    token), from the tokenizer's character offsets."""
    spans = []
    pos = 0
    for w in text.split():
        s = text.index(w, pos)
        spans.append((s, s + len(w)))
        pos = s + len(w)
    out = [-1] * len(spans)
    wi = 0
    for ti, ((a, b), sp) in enumerate(zip(offsets, special, strict=True)):
        if sp or b <= a:
            continue
        while wi < len(spans) and a >= spans[wi][1]:
            wi += 1
        if wi < len(spans) and spans[wi][0] <= a < spans[wi][1] and out[wi] < 0:
            out[wi] = ti
    return out


_PLAIN: dict[int, tuple[Any, Any]] = {}


def _plain_backend(tokenizer: Any) -> Any:
    """A copy of the fast tokenizer's backend with padding and truncation off (a saved
    tokenizer.json may carry them, and the bundle runtime turns them off too)."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    hit = _PLAIN.get(id(backend))
    if hit is not None and hit[0] is backend:
        return hit[1]
    plain = Tokenizer.from_str(backend.to_str())
    plain.no_padding()
    plain.no_truncation()
    _PLAIN[id(backend)] = (backend, plain)
    return plain


def mask_token_of(tokenizer: Any) -> tuple[str, int]:
    """The tokenizer's mask token and its id (InputError when it has none)."""
    tokenizer_mask = getattr(tokenizer, "mask_token", None)
    mid = getattr(tokenizer, "mask_token_id", None)
    if not isinstance(tokenizer_mask, str) or not isinstance(mid, int):
        raise InputError("target 'mask' needs a tokenizer with a mask token")
    return tokenizer_mask, mid


def apply_mask_template(records: Sequence[Sequence[str]], mask_token: str) -> list[tuple[str, ...]]:
    """The monitor's ``mask`` form of each record: the template on the last text."""
    return [
        (*r[:-1], MASK_TEMPLATE.format(sentence=r[-1], mask_token=mask_token)) for r in records
    ]


def encode_records(
    tokenizer: Any,
    records: Sequence[Sequence[str]],
    pad_id: int,
    mask_token: tuple[str, int] | None = None,
) -> Batch:
    """Encode texts or pairs like the bundle runtime does (special tokens, no truncation, one
    segment), right-padded. ``tokenizer`` is a ``tokenizers.Tokenizer`` or a transformers fast
    tokenizer (its ``backend_tokenizer`` is used). ``mask_token`` (token, id): apply the mask
    template to each record and read the head at its last mask token (target ``mask``)."""
    backend = _plain_backend(tokenizer)
    if mask_token is not None:
        records = apply_mask_template(records, mask_token[0])
    inputs: list[Any] = [r[0] if len(r) == 1 else (r[0], r[1]) for r in records]
    encs = backend.encode_batch(inputs, add_special_tokens=True)
    L = max(len(e.ids) for e in encs)
    ids = np.full((len(encs), L), pad_id, dtype=np.int64)
    mask = np.zeros((len(encs), L), dtype=np.int64)
    starts: list[list[int]] = []
    pos: list[int] = []
    for b, (e, r) in enumerate(zip(encs, records, strict=True)):
        ids[b, : len(e.ids)] = e.ids
        mask[b, : len(e.ids)] = 1
        if len(r) == 1 and mask_token is None:
            starts.append(word_first_tokens(r[0], e.offsets, e.special_tokens_mask))
        else:
            starts.append([])
        if mask_token is None:
            pos.append(0)
        else:
            hits = [i for i, t in enumerate(e.ids) if t == mask_token[1]]
            if not hits:
                raise InputError(f"record {b}: the mask template lost its mask token")
            pos.append(hits[-1])
    return Batch(ids, mask, starts, pos)
