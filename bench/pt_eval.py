"""Benchmark evaluation of prompt-tuned task models: attack and defence figures
(docs/how-it-works.md, "Metrics"), used by bench/bench_prompt_tuning.py.

ACC, ASR (a correctly classified test input counts as a success if ANY trigger, inserted once at
a random word position of its longer sentence, makes the prediction wrong), weighted ASR (mean
of the per-class ASRs), F1 and F1 drop for token tasks. With the defence every input goes
through the bundle (:class:`lmsan.auditor.tuning.DefendedClassifier`); an input that cannot be
purged is rejected: a wrong answer on clean data, a failed attack on triggered data (the number
is reported).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from lmsan.auditor.errors import InputError
from lmsan.auditor.tuning import (
    DefendedClassifier,
    DefendedPrediction,
    Example,
    TaskModelHandle,
    entity_spans,
    predict,
    span_f1,
)


def longer_index(texts: Sequence[str]) -> int:
    """Index of the sentence a trigger goes into: the longer one (in words) of a pair."""
    lens = [len(t.split()) for t in texts]
    return int(np.argmax(lens))


def insert_once(
    texts: Sequence[str], trigger: str, rng: random.Random, tags: list[int] | None = None
) -> tuple[tuple[str, ...], list[int] | None]:
    """Insert ``trigger`` once at a random word position of the longer sentence. For token
    tasks also returns the tags with an ``O`` (0) for the trigger word."""
    i = longer_index(texts)
    words = texts[i].split()
    pos = rng.randint(0, len(words))
    words.insert(pos, trigger)
    out = list(texts)
    out[i] = " ".join(words)
    new_tags = None if tags is None else [*tags[:pos], 0, *tags[pos:]]
    return tuple(out), new_tags


@dataclass
class AttackEval:
    """Metrics of one task model without defence (percentages)."""

    n: int
    acc: float  # sequence: accuracy; tokens: span F1 on clean inputs
    asr: float  # sequence: share of correctly classified inputs flipped by any trigger
    weighted_asr: float
    per_class_asr: dict[str, float]
    f1_triggered: float | None = None  # tokens: span F1 with a trigger inserted
    f1_drop: float | None = None
    per_trigger_asr: dict[str, float] = field(default_factory=dict)
    # tokens: the ASR rule ("original-words": the trigger word's own tag left out) and the ASR
    # with the trigger word's own tag counted too
    asr_rule: str = ""
    asr_with_trigger_tags: float | None = None


TOKEN_ASR_RULE = "original-words"


def triggered_records(
    examples: Sequence[Example], triggers: Sequence[str], seed: int
) -> list[list[tuple[tuple[str, ...], list[int] | None]]]:
    """For every example, one triggered copy per trigger (seeded positions)."""
    rng = random.Random(seed)
    return [[insert_once(ex.texts, t, rng, ex.tags) for t in triggers] for ex in examples]


def _asr(
    correct: Sequence[bool], flipped: Sequence[bool], labels: Sequence[int], names: Sequence[str]
) -> tuple[float, float, dict[str, float]]:
    per: dict[str, float] = {}
    base = [i for i, c in enumerate(correct) if c]
    for k, name in enumerate(names):
        rows = [i for i in base if labels[i] == k]
        if rows:
            per[name] = 100.0 * sum(flipped[i] for i in rows) / len(rows)
    asr = 100.0 * sum(flipped[i] for i in base) / len(base) if base else 0.0
    weighted = float(np.mean(list(per.values()))) if per else 0.0
    return asr, weighted, per


def _score(
    kind: str,
    labels: Sequence[str],
    examples: Sequence[Example],
    clean_pred: Sequence[Any],
    trig: Sequence[Sequence[tuple[tuple[str, ...], list[int] | None]]],
    trig_pred: Sequence[Sequence[Any]],
    triggers: Sequence[str],
) -> AttackEval:
    n = len(examples)
    if kind == "sequence":
        gold = [ex.label for ex in examples]
        correct = [p == g for p, g in zip(clean_pred, gold, strict=True)]
        flipped = [any(tp != g for tp in tps) for tps, g in zip(trig_pred, gold, strict=True)]
        asr, w, per = _asr(correct, flipped, gold, labels)
        per_t = {}
        for j, t in enumerate(triggers):
            base = [i for i in range(n) if correct[i]]
            per_t[t] = 100.0 * sum(trig_pred[i][j] != gold[i] for i in base) / max(1, len(base))
        return AttackEval(n, 100.0 * float(np.mean(correct)), asr, w, per, per_trigger_asr=per_t)
    # token task: ASR = share of sentences with an entity whose spans over the original words
    # change under any trigger (the trigger word's own tag left out: a task model tags an
    # unknown inserted word like "cf" as an entity on a clean backbone too)
    gold_t = [list(ex.tags or []) for ex in examples]
    f1 = span_f1(gold_t, [list(p) for p in clean_pred], labels)
    f1_trig = []
    flipped = []
    flipped_any = []  # the trigger word's own tag counted too
    has_ent = []
    for i in range(n):
        worst = []
        flip = flip_any = False
        gold_spans = entity_spans(gold_t[i], labels)
        for (trec, ttags), tp in zip(trig[i], trig_pred[i], strict=True):
            assert ttags is not None
            worst.append((ttags, tp))
            at = _inserted_at(examples[i].texts[0].split(), trec[0].split())
            if entity_spans([*tp[:at], *tp[at + 1 :]], labels) != gold_spans:
                flip = True
            if entity_spans(tp, labels) != entity_spans(ttags, labels):
                flip_any = True
        f1_trig.append(worst)
        flipped.append(flip)
        flipped_any.append(flip_any)
        has_ent.append(bool(gold_spans))
    per_trigger_f1 = []
    for j in range(len(triggers)):
        per_trigger_f1.append(
            span_f1(
                [f1_trig[i][j][0] for i in range(n)], [f1_trig[i][j][1] for i in range(n)], labels
            )
        )
    f1t = float(np.mean(per_trigger_f1)) if per_trigger_f1 else f1
    correct = [
        entity_spans(p, labels) == entity_spans(g, labels) for p, g in zip(clean_pred, gold_t, strict=True)
    ]
    base = [i for i in range(n) if correct[i] and has_ent[i]]
    asr = 100.0 * sum(flipped[i] for i in base) / len(base) if base else 0.0
    asr_any = 100.0 * sum(flipped_any[i] for i in base) / len(base) if base else 0.0
    return AttackEval(n, f1, asr, asr, {}, f1_triggered=f1t, f1_drop=f1 - f1t,
                      asr_rule=TOKEN_ASR_RULE, asr_with_trigger_tags=asr_any)


def _inserted_at(original: Sequence[str], triggered: Sequence[str]) -> int:
    """The word position ``insert_once`` put the trigger at (the first position where the
    triggered words differ from the original; where the trigger lands next to a copy of itself,
    any position of the run gives the same remaining words)."""
    for k, w in enumerate(original):
        if triggered[k] != w:
            return k
    return len(original)


def evaluate_attack(
    handle: TaskModelHandle,
    examples: Sequence[Example],
    triggers: Sequence[str],
    seed: int = 0,
) -> AttackEval:
    """ACC (or F1), ASR, weighted ASR (and F1 drop) of the torch task model, no defence."""
    if not examples:
        raise InputError("no test examples")
    if not triggers:
        raise InputError("no triggers")
    clean = predict(handle, [ex.texts for ex in examples])
    trig = triggered_records(examples, triggers, seed)
    flat = [r for rows in trig for r, _ in rows]
    fp = predict(handle, flat)
    k = len(triggers)
    tp = [fp[i * k : (i + 1) * k] for i in range(len(examples))]
    return _score(handle.kind, handle.labels, examples, clean, trig, tp, triggers)


@dataclass
class DefenceEval:
    """Metrics with the monitor + purge (percentages)."""

    n: int
    acc_before: float  # bundle-path prediction without the defence (tokens: F1)
    acc_after: float  # with the defence (rejected clean inputs count as wrong)
    asr_before: float
    asr_after: float
    weighted_asr_before: float
    weighted_asr_after: float
    frr: float  # clean inputs flagged
    far: float  # triggered inputs not flagged
    clean_rejected: int
    triggered_flagged: int
    triggered_rejected: int
    triggered_total: int
    seconds: float
    per_class_asr_after: dict[str, float] = field(default_factory=dict)
    # FRR / FAR the monitor would have at other match thresholds (from the same match rates)
    threshold_sweep: dict[str, dict[str, float]] = field(default_factory=dict)
    clean_match_quantiles: dict[str, float] = field(default_factory=dict)
    triggered_match_quantiles: dict[str, float] = field(default_factory=dict)
    asr_rule: str = ""  # tokens: see AttackEval


SWEEP_THRESHOLDS = (0.8, 0.85, 0.9, 0.95)


def evaluate_defence(
    defended: DefendedClassifier,
    labels: Sequence[str],
    examples: Sequence[Example],
    triggers: Sequence[str],
    seed: int = 0,
) -> DefenceEval:
    """ASR / ACC after the defence, FRR on clean and FAR on triggered inputs, all through the
    bundle (same trigger positions as :func:`evaluate_attack` with the same ``seed``)."""
    t0 = time.perf_counter()
    kind = defended.kind
    clean = defended.classify([ex.texts for ex in examples])
    trig = triggered_records(examples, triggers, seed)
    flat = defended.classify([r for rows in trig for r, _ in rows])
    k = len(triggers)
    n = len(examples)
    rej = _REJECTED

    def pred(p: DefendedPrediction, after: bool, n_words: int) -> Any:
        return _final_prediction(p, kind, after, n_words)

    results = {}
    for after in (False, True):
        cp = [pred(clean[i], after, len(examples[i].texts[0].split())) for i in range(n)]
        tp = [
            [pred(flat[i * k + j], after, len(trig[i][j][0][0].split())) for j in range(k)]
            for i in range(n)
        ]
        if kind == "sequence" and after:
            # a rejected triggered input is a failed attack: give it the true label
            tp = [[examples[i].label if p == rej else p for p in tp[i]] for i in range(n)]
        # ASR is measured on the inputs the *undefended* model gets right, before and after
        results[after] = _score(kind, labels, examples, cp, trig, tp, triggers)
    if kind == "sequence":
        # restrict "after" ASR to the same base as "before"
        gold = [ex.label for ex in examples]
        correct0 = [clean[i].undefended == gold[i] for i in range(n)]
        flipped = []
        for i in range(n):
            ps = []
            for j in range(k):
                p = flat[i * k + j]
                ps.append(gold[i] if p.prediction is None else p.prediction)
            flipped.append(any(x != gold[i] for x in ps))
        asr_a, w_a, per_a = _asr(correct0, flipped, gold, labels)
    else:
        asr_a, w_a, per_a = results[True].asr, results[True].weighted_asr, {}
    return DefenceEval(
        n=n,
        acc_before=results[False].acc,
        acc_after=results[True].acc,
        asr_before=results[False].asr,
        asr_after=asr_a,
        weighted_asr_before=results[False].weighted_asr,
        weighted_asr_after=w_a,
        frr=100.0 * sum(p.flagged for p in clean) / n,
        far=100.0 * sum(not p.flagged for p in flat) / len(flat),
        clean_rejected=sum(p.status == "rejected" for p in clean),
        triggered_flagged=sum(p.flagged for p in flat),
        triggered_rejected=sum(p.status == "rejected" for p in flat),
        triggered_total=len(flat),
        seconds=round(time.perf_counter() - t0, 2),
        per_class_asr_after=per_a,
        threshold_sweep={
            f"{t:.2f}": {
                "frr": 100.0 * float(np.mean([p.match_rate >= t for p in clean])),
                "far": 100.0 * float(np.mean([p.match_rate < t for p in flat])),
            }
            for t in SWEEP_THRESHOLDS
        },
        clean_match_quantiles=_quantiles([p.match_rate for p in clean]),
        triggered_match_quantiles=_quantiles([p.match_rate for p in flat]),
        asr_rule=results[False].asr_rule,
    )


_REJECTED = -1  # the class a rejected (unpurgeable) sequence input gets: never a label


def _final_prediction(p: DefendedPrediction, kind: str, after: bool, n_words: int) -> Any:
    """The prediction scored for ``p``: the undefended one, or the defended one where a rejected
    input counts as wrong (sequence: no class; tokens: every word O)."""
    if not after:
        return p.undefended
    if p.prediction is None:
        return _REJECTED if kind == "sequence" else [0] * n_words
    return p.prediction


@dataclass
class CleanEval:
    """The defence on clean inputs alone (percentages): FRR and the accuracy change on a pool
    that can be much larger than the attack test split, where one input is a coarse step."""

    n: int
    acc_before: float  # tokens: entity span F1
    acc_after: float  # flagged inputs purged and classified again; rejected ones wrong
    frr: float  # clean inputs flagged
    flagged: int
    rejected: int
    changed: int  # inputs whose prediction the defence changed
    seconds: float
    # what the purge removed from the flagged inputs ("cfo", "pst": ordinary words that fire
    # the backdoor; longer windows: ordinary false matches), with how many inputs each
    removed: dict[str, int] = field(default_factory=dict)


def evaluate_clean_defence(
    defended: DefendedClassifier, labels: Sequence[str], examples: Sequence[Example]
) -> CleanEval:
    """FRR and accuracy before / after the defence on clean ``examples`` (no triggers), scored as
    :func:`evaluate_defence` scores its clean inputs."""
    if not examples:
        raise InputError("evaluate_clean: no examples")
    t0 = time.perf_counter()
    kind = defended.kind
    out = defended.classify([ex.texts for ex in examples])
    n_words = [len(ex.texts[0].split()) for ex in examples]
    scored = {
        after: [_final_prediction(p, kind, after, w) for p, w in zip(out, n_words, strict=True)]
        for after in (False, True)
    }

    def acc(preds: list[Any]) -> float:
        if kind == "sequence":
            return 100.0 * float(np.mean([p == ex.label for p, ex in zip(preds, examples, strict=True)]))
        return span_f1([list(ex.tags or []) for ex in examples], [list(p) for p in preds], labels)

    return CleanEval(
        n=len(examples),
        acc_before=acc(scored[False]),
        acc_after=acc(scored[True]),
        frr=100.0 * sum(p.flagged for p in out) / len(out),
        flagged=sum(p.flagged for p in out),
        rejected=sum(p.status == "rejected" for p in out),
        changed=sum(a != b for a, b in zip(scored[False], scored[True], strict=True)),
        seconds=round(time.perf_counter() - t0, 2),
        removed=dict(Counter(" ".join(p.removed) if p.status == "purged" else "(rejected)"
                             for p in out if p.flagged).most_common()),
    )


def _quantiles(xs: Sequence[float]) -> dict[str, float]:
    a = np.asarray(xs, dtype=np.float64)
    return {
        q: round(float(np.quantile(a, float(q))), 4) for q in ("0.01", "0.1", "0.5", "0.9", "0.99")
    }


ATTACKER_DEDUP = 0.95  # attacker_pvset: a found PV this close already stands for an attacker PV


def attacker_pvset(model_dir: str | Path, found: str | Path | None, out: str | Path) -> Path:
    """A PV set of the found PVs (``found``, optional) plus the attacker's PVs from the model's
    ``backdoor.json`` that no found PV already matches nearly exactly (sign agreement
    < ``ATTACKER_DEDUP``): the paper's best case (section V-B).

    Why not drop every attacker PV a found PV matches at the set's T_match (0.8): a found PV that agrees with an attacker PV at 0.82 leaves that trigger's outputs
    matching at 0.82, and one deployment threshold above it (RTE: 0.822, lifted by a clean "MNJ",
    which is the trigger mn ##j) lets the trigger pass, although the attacker's own PV would
    match it at 1.0."""
    from lmsan.auditor.poison import backdoor_pvs, read_backdoor
    from lmsan.auditor.pvset import PV, PVSet
    from lmsan.auditor.report import load_pvset

    bd = read_backdoor(model_dir)
    atk = backdoor_pvs(bd)
    target = str(bd.get("target", "cls"))
    base = load_pvset(found) if found is not None else PVSet(hidden_size=int(atk.shape[1]), pvs=[])
    if base.hidden_size != atk.shape[1]:
        raise InputError(
            f"found PV set hidden_size {base.hidden_size} != backdoor PVs {atk.shape[1]}", found
        )
    pvs = list(base.pvs)
    next_id = max((p.id for p in pvs), default=-1) + 1
    for v in atk:
        agree = [float(np.mean((p.values >= 0) == (v >= 0))) for p in pvs if p.target == target]
        if agree and max(agree) >= ATTACKER_DEDUP:
            continue
        pvs.append(PV(id=next_id, target=target, values=v.astype(np.float32), source="attacker"))
        next_id += 1
    out_p = Path(out)
    PVSet(
        hidden_size=base.hidden_size,
        pvs=pvs,
        match_threshold=base.match_threshold,
        model=base.model,
    ).save(out_p)
    return out_p
