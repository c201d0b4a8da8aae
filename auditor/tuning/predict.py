"""Running a task model: torch predictions, and the defended pipeline as deployed.

The defended pipeline (:class:`DefendedClassifier`) is torch-free: every input goes through the
bundle, one forward pass gives the monitor's decision AND the classifier input (the head is
applied in NumPy to the bundle's own backbone output); a flagged input is purged with the
sliding window and the purged text is classified; an input that cannot be purged is rejected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..bundle import MASK_TEMPLATE
from ..errors import InputError
from .encode import encode_records, word_first_tokens
from .model import HEAD_POSITIONS, TaskModelHandle
from .store import (
    ADAPTER_WEIGHTS,
    HEAD_FILE,
    read_prompt_embeddings_numpy,
    read_task_meta,
)

if TYPE_CHECKING:
    from ..threshold import Thresholds


def predict(
    handle: TaskModelHandle, records: Sequence[Sequence[str]], batch_size: int = 32
) -> list[Any]:
    """Torch predictions: a class per record (sequence tasks) or a tag per whitespace word of
    the first text (token tasks; -1 for a word without a token)."""
    import torch

    m = handle.module
    out: list[Any] = []
    order = sorted(range(len(records)), key=lambda i: sum(len(t) for t in records[i]))
    res: dict[int, Any] = {}
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            rows = order[s : s + batch_size]
            b = encode_records(
                handle.tokenizer, [records[i] for i in rows], handle.pad_id, handle.mask_token
            )
            pos = torch.tensor(b.target_pos, dtype=torch.long) if handle.kind == "sequence" else None
            logits = m(torch.from_numpy(b.ids), torch.from_numpy(b.mask), pos).float().numpy()
            for j, r in enumerate(rows):
                res[r] = _decode(
                    logits[j], b.word_starts[j], handle.kind, m.prompt_len_in_sequence()
                )
    out = [res[i] for i in range(len(records))]
    return out


def _decode(logits: np.ndarray, starts: list[int], kind: str, shift: int) -> Any:
    if kind == "sequence":
        return int(np.argmax(logits))
    tags = []
    for t in starts:
        if t < 0:
            tags.append(-1)
        else:
            tags.append(int(np.argmax(logits[t + shift if t >= 1 else t])))
    return tags


class DefendedClassifier:
    """The deployed, protected model: the bundle (backbone with the task prompt/prefix, monitor,
    purge) + the task head applied in NumPy to the bundle's own backbone output. Torch-free."""

    def __init__(
        self,
        screener: Any,
        head_weight: np.ndarray,
        head_bias: np.ndarray,
        kind: str,
        max_window: int = 5,
        target: str = "cls",
    ):
        self.scr = screener
        self.w = np.asarray(head_weight, dtype=np.float32)
        self.b = np.asarray(head_bias, dtype=np.float32)
        self.kind = kind
        self.max_window = max_window
        self.target = target
        man = screener.bundle.manifest
        if self.w.shape[1] != man.hidden_size:
            raise InputError(
                f"head width {self.w.shape[1]} != bundle hidden size {man.hidden_size}"
            )
        if target not in HEAD_POSITIONS or (target == "mask" and kind != "sequence"):
            raise InputError(f"target {target!r} is not a head position of a {kind} task")
        if target == "mask" and (
            man.special_tokens.mask_id is None or man.special_tokens.mask_token is None
        ):
            raise InputError("the task head reads [MASK] but the bundle's tokenizer has none")
        if "mask" in man.targets and man.mask_template != MASK_TEMPLATE:
            raise InputError(
                f"the bundle's mask template {man.mask_template!r} is not the one task models "
                f"are trained with ({MASK_TEMPLATE!r})"
            )

    @classmethod
    def open(
        cls,
        bundle: str | Path,
        task_dir: str | Path,
        max_window: int = 5,
        threads: int = 1,
        match_threshold: float | None = None,
        per_pv_thresholds: dict[int, float] | None = None,
        thresholds: Thresholds | None = None,
    ) -> DefendedClassifier:
        """``thresholds``: the deployment's match thresholds (default: the PV set's); a thresholds
        file chosen for another bundle is refused. ``match_threshold`` / ``per_pv_thresholds``
        build them from a T_match (e.g. chosen by
        :func:`lmsan.auditor.threshold.choose_match_threshold` on clean task inputs) and PV id ->
        T_match (:func:`~lmsan.auditor.threshold.choose_per_pv`); not together with
        ``thresholds``."""
        from safetensors.numpy import load_file

        from ..screener import open_bundle
        from ..threshold import Thresholds

        if thresholds is None:
            thresholds = Thresholds(match_threshold, per_pv_thresholds)
        elif match_threshold is not None or per_pv_thresholds is not None:
            raise ValueError("give thresholds or match_threshold/per_pv_thresholds, not both")
        meta = read_task_meta(task_dir)
        scr = open_bundle(bundle, provider="cpu", threads=threads, batch_size=32, thresholds=thresholds)
        man = scr.bundle.manifest
        if meta["method"] == "ptuning" and man.prompt_length != meta["prompt_length"]:
            raise InputError(
                f"bundle prompt length {man.prompt_length} != task prompt length {meta['prompt_length']}: "
                "export the bundle with this task's prompt",
                bundle,
            )
        if meta["method"] == "ptuning-v2" and "prefix" not in str(man.model.get("prefix", "")):
            raise InputError(
                "the bundle has no baked P-tuning v2 prefix; export it with `lmsan tune export`",
                bundle,
            )
        tdir = Path(task_dir)
        if meta["method"] == "ptuning":
            mine = read_prompt_embeddings_numpy(tdir)
            if scr.bundle.prompt is None or not np.array_equal(
                np.asarray(scr.bundle.prompt, dtype=np.float32), mine.astype(np.float32)
            ):
                raise InputError(
                    "the bundle's prompt.npy is not this task's prompt: export the bundle with "
                    "this task's prompt",
                    bundle,
                )
        else:
            from ..bundle import sha256_of

            if man.model.get("task_digest") != sha256_of(tdir / ADAPTER_WEIGHTS):
                raise InputError(
                    "the bundle's baked prefix comes from another task folder "
                    "(task_digest differs): export the bundle from this task",
                    bundle,
                )
        head = load_file(str(tdir / HEAD_FILE))
        return cls(scr, head["weight"], head["bias"], meta["kind"], max_window, meta["target"])

    def _logits_and_decisions(
        self, records: Sequence[tuple[str, ...]]
    ) -> tuple[list[Any], list[Any]]:
        scr = self.scr
        # the forms the monitor needs, plus the one the head reads (one forward per form)
        encs = dict(scr.encode_all(list(records)))
        pform = "template" if self.target == "mask" else "plain"
        if pform not in encs:
            encs[pform] = scr.encode(
                list(records), pform, MASK_TEMPLATE if pform == "template" else None
            )
        enc = encs[pform]
        for i, L in enumerate(scr.too_long(encs)):
            if L is not None:
                raise InputError(f"record {i}: {L} tokens exceed the max length {scr.max_length}")
        n = len(records)
        order = sorted(range(n), key=lambda i: len(enc.ids[i]))
        preds: list[Any] = [None] * n
        decisions: list[Any] = [None] * n
        lp = scr.bundle.manifest.prompt_length
        for s in range(0, n, scr.batch_size):
            rows = order[s : s + scr.batch_size]
            per_target = {}
            outs: dict[str, np.ndarray] = {}
            for form, e in encs.items():
                o = scr.forward(e, rows)
                if form == pform:
                    outs = o
                for t in scr.bundle.manifest.targets:
                    if (t == "mask") == (form == "template"):
                        per_target[t] = scr.target_rows(e, rows, o, t)
            for r, d in zip(rows, scr.decide(per_target, len(rows)), strict=True):
                decisions[r] = d
            hs = outs["last_hidden_state"]
            if self.kind == "sequence":
                # the head's vector: [CLS] (plain form) or [MASK] (template form), shifted past
                # a P-tuning prompt exactly as the monitor's cls / mask targets are
                vec, _, _ = scr.target_rows(enc, rows, outs, "mask" if pform == "template" else "cls")
                logits_seq = vec @ self.w.T + self.b
            for j, r in enumerate(rows):
                if self.kind == "sequence":
                    preds[r] = int(np.argmax(logits_seq[j]))
                else:
                    text = records[r][0]
                    e = scr.bundle.tokenizer.encode(text, add_special_tokens=True)
                    starts = word_first_tokens(text, e.offsets, e.special_tokens_mask)
                    logits = hs[j] @ self.w.T + self.b
                    preds[r] = [
                        int(np.argmax(logits[t + lp if t >= 1 else t])) if t >= 0 else -1
                        for t in starts
                    ]
        return preds, decisions

    def classify(self, records: Sequence[Sequence[str]]) -> list[DefendedPrediction]:
        """Monitor, purge flagged inputs, classify. One forward pass for a clean input."""
        recs = [tuple(r) for r in records]
        preds, dec = self._logits_and_decisions(recs)
        out: list[DefendedPrediction] = []
        flagged = [i for i, d in enumerate(dec) if d.flagged]
        results: dict[int, DefendedPrediction] = {
            i: DefendedPrediction(
                preds[i], False, "clean", recs[i], (), preds[i], dec[i].match_rate
            )
            for i in range(len(recs))
            if not dec[i].flagged
        }
        purged_recs: list[tuple[str, ...]] = []
        purged_idx: list[int] = []
        purge_info: dict[int, Any] = {}
        for i in flagged:
            pr = self.scr.purge(recs[i], max_window=self.max_window)
            purge_info[i] = pr
            if pr.status == "purged":
                purged_recs.append(tuple(pr.sentences))
                purged_idx.append(i)
            else:
                results[i] = DefendedPrediction(
                    None, True, "rejected", recs[i], (), preds[i], dec[i].match_rate
                )
        if purged_recs:
            pp, _ = self._logits_and_decisions(purged_recs)
            for i, p in zip(purged_idx, pp, strict=True):
                pr = purge_info[i]
                pred = p
                if self.kind == "tokens":
                    pred = _realign(recs[i][0], pr.removed, p)
                results[i] = DefendedPrediction(
                    pred,
                    True,
                    "purged",
                    tuple(pr.sentences),
                    tuple(pr.removed),
                    preds[i],
                    dec[i].match_rate,
                )
        out = [results[i] for i in range(len(recs))]
        return out


def _realign(original: str, removed: Sequence[str], purged_pred: list[int]) -> list[int]:
    """Token task: tags of the original words from the purged text's tags (removed words: O)."""
    gone = set(removed)
    it = iter(purged_pred)
    return [0 if w in gone else next(it, 0) for w in original.split()]


@dataclass
class DefendedPrediction:
    prediction: Any  # class / tags; None when rejected (unpurgeable)
    flagged: bool
    status: str  # clean | purged | rejected
    text: tuple[str, ...]  # what was classified
    removed: tuple[str, ...]
    undefended: Any  # the prediction without the defence (same forward pass)
    match_rate: float = 0.0  # the monitor's best match rate on the input as given


@dataclass
class ClassifiedTexts:
    """Texts through the defended pipeline (what ``lmsan tune classify`` shows)."""

    records: list[tuple[str, ...]]
    predictions: list[DefendedPrediction]
    labels: list[str]  # the task's label names (class / tag index -> name)


def classify_texts(
    bundle: str | Path,
    task_dir: str | Path,
    lines: Sequence[str],
    *,
    max_window: int = 5,
    threads: int = 1,
    thresholds: Thresholds | None = None,
) -> ClassifiedTexts:
    """Monitor, purge and classify ``lines`` (a pair written ``premise ||| hypothesis``) with the
    bundle and the task folder's head, at ``thresholds`` (default: the PV set's; thresholds chosen
    for another bundle are refused)."""
    if not lines:
        raise InputError("no text given (arguments or stdin)")
    recs = [tuple(s.strip() for s in ln.split("|||")) for ln in lines]
    meta = read_task_meta(task_dir)
    dc = DefendedClassifier.open(
        bundle, task_dir, max_window=max_window, threads=threads, thresholds=thresholds
    )
    return ClassifiedTexts(recs, dc.classify(recs), list(meta["labels"]))
