"""The scores ``lmsan tune train`` reports on a task's test split: accuracy for sentence and pair
tasks, micro entity-level span F1 (exact span and type, BIO tags) for token tasks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InputError
from .data import Example
from .model import TaskModelHandle
from .predict import predict


def entity_spans(tags: Sequence[int], labels: Sequence[str]) -> set[tuple[int, int, str]]:
    """Entity spans of a BIO tag sequence (an I- without a matching B- starts a span)."""
    out = set()
    start, typ = -1, ""
    for i, t in enumerate([*tags, 0]):
        name = labels[t] if 0 <= t < len(labels) else "O"
        if name.startswith("I-") and start >= 0 and name[2:] == typ:
            continue
        if start >= 0:
            out.add((start, i, typ))
            start = -1
        if name.startswith(("B-", "I-")):
            start, typ = i, name[2:]
    return out


def span_f1(
    gold: Sequence[Sequence[int]], pred: Sequence[Sequence[int]], labels: Sequence[str]
) -> float:
    """Micro entity-level F1 (exact span and type), in percent."""
    tp = fp = fn = 0
    for g, p in zip(gold, pred, strict=True):
        gs, ps = entity_spans(g, labels), entity_spans(p, labels)
        tp += len(gs & ps)
        fp += len(ps - gs)
        fn += len(gs - ps)
    if tp == 0:
        return 0.0
    prec, rec = tp / (tp + fp), tp / (tp + fn)
    return 100.0 * 2 * prec * rec / (prec + rec)


def evaluate_clean(handle: TaskModelHandle, examples: Sequence[Example]) -> float:
    """Accuracy (sequence tasks) or entity span F1 (token tasks) in percent, no trigger."""
    if not examples:
        raise InputError("no test examples")
    pred = predict(handle, [ex.texts for ex in examples])
    if handle.kind == "sequence":
        return 100.0 * float(np.mean([p == ex.label for p, ex in zip(pred, examples, strict=True)]))
    return span_f1([list(ex.tags or []) for ex in examples], pred, handle.labels)
