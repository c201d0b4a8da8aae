"""How a bundle turns text into the backbone's input, and picks the target rows of its output.

Torch-free (``tokenizers`` + NumPy), the same in export validation and in scan: the text is
tokenized with the bundle's tokenizer (special tokens added, no truncation), the ids are looked up
in ``embeddings.npy``, the soft prompt (if any) is inserted right after the first special token
(position 1 when the encoding starts with ``[CLS]``/``<s>``, else position 0), and the batch is
right-padded (pad rows are the pad token's embedding, attention 0).

Target positions: ``cls`` = the first special token (position 0 for BERT/RoBERTa); ``pooler`` =
``pooler_output``; ``tokens`` = every ordinary token (not special, not prompt, not padding; any
token over the threshold flags the record); ``mask`` = the mask token of the template
``f"{sentence} {mask_token}"`` (for a pair, the template is applied to the second sentence).
Targets that read plain text (cls, pooler, tokens) share one input form (``plain``); ``mask``
needs the template and so its own (``template``). A clean record therefore costs one forward pass
per input form, which is one for every PV set that ``lmsan audit`` writes (one target).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .bundle import Bundle
from .errors import UsageError

PLAIN_TARGETS = ("cls", "pooler", "tokens")

Record = tuple[str, ...]  # one sentence, or two for a pair
TargetRows = tuple[np.ndarray, np.ndarray, np.ndarray]  # rows [m, d], record of each, token index


@dataclass
class Encoded:
    """A batch ready for the backbone (before padding to a rectangle)."""

    ids: list[list[int]]
    special: list[list[int]]  # 1 where the token is special
    target_pos: list[int]  # mask / cls position (in the token sequence, before the prompt)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, idx: Sequence[int]) -> Encoded:
        return Encoded(
            [self.ids[i] for i in idx],
            [self.special[i] for i in idx],
            [self.target_pos[i] for i in idx],
        )


def subset(encs: dict[str, Encoded], idx: Sequence[int]) -> dict[str, Encoded]:
    """The records ``idx`` of every input form."""
    return {f: e.subset(idx) for f, e in encs.items()}


def reads_form(target: str, form: str) -> bool:
    """Whether ``target``'s rows come from the forward pass of input form ``form``."""
    return (target == "mask") == (form == "template")


def _insert_at(sp: list[int]) -> int:
    """Where the soft prompt goes: after a leading special token, else at the start."""
    return 1 if sp and sp[0] else 0


class InputEncoder:
    """Tokenizes records, builds ``inputs_embeds`` / ``attention_mask`` and picks target rows."""

    def __init__(self, bundle: Bundle, max_length: int | None = None) -> None:
        limit = bundle.manifest.max_positions
        if max_length is None:
            max_length = limit
        if max_length < 2:
            raise UsageError("--max-length must be at least 2")
        if max_length > limit:
            raise UsageError(f"--max-length {max_length} exceeds the model's {limit} positions")
        self.bundle = bundle
        self.max_length = max_length

    def forms(self) -> list[str]:
        """Input forms needed by the targets: 'plain' and/or 'template'."""
        t = self.bundle.manifest.targets
        out = []
        if any(x in PLAIN_TARGETS for x in t):
            out.append("plain")
        if "mask" in t:
            out.append("template")
        return out

    def _apply_template(self, rec: Record, template: str | None = None) -> Record:
        man = self.bundle.manifest
        tmpl = template if template is not None else man.mask_template
        assert tmpl is not None and man.special_tokens.mask_token is not None
        last = tmpl.format(sentence=rec[-1], mask_token=man.special_tokens.mask_token)
        return (*rec[:-1], last)

    def encode(
        self, records: Sequence[Record], form: str = "plain", template: str | None = None
    ) -> Encoded:
        """Token ids, special-token masks and target positions of ``records`` in ``form``
        ('plain', or 'template': the mask template on the last text; ``template`` overrides the
        manifest's, e.g. for a task head on [MASK] under a PV set without mask PVs)."""
        tok = self.bundle.tokenizer
        if form == "template":
            records = [self._apply_template(r, template) for r in records]
        inputs: list[Any] = [r[0] if len(r) == 1 else (r[0], r[1]) for r in records]
        encs = tok.encode_batch(inputs, add_special_tokens=True)
        ids = [e.ids for e in encs]
        special = [e.special_tokens_mask for e in encs]
        st = self.bundle.manifest.special_tokens
        pos: list[int] = []
        for e_ids, sp in zip(ids, special, strict=True):
            if form == "template":
                mids = [i for i, t in enumerate(e_ids) if t == st.mask_id]
                pos.append(mids[-1] if mids else -1)
            else:
                pos.append(next((i for i, s in enumerate(sp) if s), 0))
        return Encoded(ids, special, pos)

    def encode_all(self, records: Sequence[Record]) -> dict[str, Encoded]:
        return {form: self.encode(records, form) for form in self.forms()}

    def lengths(self, enc: Encoded) -> list[int]:
        return [len(i) + self.bundle.manifest.prompt_length for i in enc.ids]

    def too_long(self, encs: dict[str, Encoded]) -> list[int | None]:
        """Per record: its longest token count when over ``max_length``, else None."""
        n = len(next(iter(encs.values())))
        out: list[int | None] = [None] * n
        for enc in encs.values():
            for i, L in enumerate(self.lengths(enc)):
                if L > self.max_length:
                    out[i] = max(L, out[i] or 0)
        return out

    def build_inputs(self, enc: Encoded, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """``inputs_embeds`` float32 [B, L, emb] and ``attention_mask`` int64 [B, L] for ``rows``
        (embedding lookup, soft prompt inserted, right padding)."""
        emb = self.bundle.embeddings
        prompt = self.bundle.prompt
        lp = 0 if prompt is None else prompt.shape[0]
        seqs = [enc.ids[r] for r in rows]
        L = max(len(s) for s in seqs) + lp
        B = len(seqs)
        st = self.bundle.manifest.special_tokens
        ids = np.full((B, L - lp), st.pad_id, dtype=np.int64)
        mask = np.zeros((B, L), dtype=np.int64)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = s
            mask[b, : len(s) + lp] = 1
        tok_emb = np.asarray(emb[ids.reshape(-1)]).reshape(B, L - lp, -1)
        if prompt is None:
            return np.ascontiguousarray(tok_emb, dtype=np.float32), mask
        x = np.empty((B, L, tok_emb.shape[2]), dtype=np.float32)
        for b, r in enumerate(rows):
            k = _insert_at(enc.special[r])
            x[b, :k] = tok_emb[b, :k]
            x[b, k : k + lp] = prompt
            x[b, k + lp :] = tok_emb[b, k:]
        return x, mask

    def target_rows(
        self, enc: Encoded, rows: Sequence[int], outs: dict[str, np.ndarray], target: str
    ) -> TargetRows:
        """Target output rows [m, d], the record (batch index) of each row, and token index."""
        lp = self.bundle.manifest.prompt_length
        hs = outs["last_hidden_state"]
        if target == "pooler":
            n = len(rows)
            return outs["pooler_output"], np.arange(n), np.zeros(n, dtype=np.int64)
        if target in ("cls", "mask"):
            pos = []
            for r in rows:
                p = enc.target_pos[r]
                if p < 0:
                    p = 0  # template lost its mask token: cannot happen with the tokenizer's own
                pos.append(p + lp if (lp and p >= _insert_at(enc.special[r])) else p)
            idx = np.arange(len(rows))
            return hs[idx, np.asarray(pos)], idx, np.zeros(len(rows), dtype=np.int64)
        # tokens: every ordinary token
        bi: list[int] = []
        ti: list[int] = []
        tok_idx: list[int] = []
        for b, r in enumerate(rows):
            sp = enc.special[r]
            k = _insert_at(sp)
            j = 0
            for i, s in enumerate(sp):
                if not s:
                    bi.append(b)
                    ti.append(i + lp if (lp and i >= k) else i)
                    tok_idx.append(j)
                    j += 1
        if not bi:
            return (
                np.zeros((0, hs.shape[2]), np.float32),
                np.zeros(0, np.int64),
                np.zeros(0, np.int64),
            )
        return hs[np.asarray(bi), np.asarray(ti)], np.asarray(bi), np.asarray(tok_idx)
