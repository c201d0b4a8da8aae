"""Searching-free first stage: long-tail statistics of clean outputs (forward passes only).

A task-agnostic backdoor trains the encoder to send any input holding a trigger to a predefined
vector (PV) at one output (the [CLS], the pooler, the [MASK] of a template, every token). The
poisoned inputs are a small set of samples that all share one target, so training on them is
long-tailed learning: a few output features are pulled hard towards the PV's values, and that
pull leaks onto clean inputs. Two consequences can be read from ~500 clean sentences without
searching for a trigger (the observation behind LT-Defense, Xu et al., NeurIPS 2024; the figures
and their thresholds here are our own):

- head-feature rate: the share of output units whose sign is the same on (almost) every clean
  sentence. A unit the backdoor drives towards a PV entry keeps that sign whatever the input;
  in a clean encoder most units change sign with the content.
- alikeness: the mean pairwise cosine of the clean outputs. The shared pull makes clean outputs
  more alike.

Both are read per target: "cls", "pooler" (only where the checkpoint carries trained pooler
weights), "mask" (the [MASK] of the template f"{sentence} {mask}", as mining reads it) and
"tokens" (the mean of the ordinary-token outputs of each sentence). Every sentence gets the mask
template (where the tokenizer has a mask token) so one forward pass serves every target.

A target is suspicious when both figures reach their thresholds (both symptoms of the long tail);
the verdict is suspicious when any target is. The thresholds are fixed numbers chosen on
calibration models (bench/bench_first_stage.py names them) and not tuned per model:

- "tokens" and "mask" decide. On clean pretrained MiniLM encoders (2 and 4 layers) the mean token
  output has a head-feature rate of 0.02-0.09 and an alikeness of 0.51-0.55, the [MASK] output
  0.18-0.56 and 0.62-0.95; on tiny random BERTs 0.34-0.47 / 0.76-0.86 (tokens) and 0.31-0.38 /
  0.65-0.76 (mask). Backdoored copies reached 0.50-0.94 / 0.85-0.96 (tokens) and 0.56-0.81 /
  0.85-0.94 (mask), whatever output the backdoor was planted at: the pull leaks onto the other
  outputs. The raw figures depend on the family (a random tiny BERT's clean tokens sit close to a
  backdoored MiniLM's), so the tokens head-feature threshold (0.48) has a thin margin on both
  sides of the calibration models.
- "cls" and "pooler" are measured and reported but do not decide (threshold None): in those
  encoders their clean outputs are already nearly constant (alikeness > 0.999, head-feature rate
  0.9-1.0), so there is no room above the clean values, and a backdoor at the [CLS] moved them
  down rather than up.

A suspicious verdict is evidence, not proof, and an unremarkable one does not clear a model. On
held-out MiniLM models (bench/results/first_stage.md) it flagged POR and NeuBA on the 3-layer
truncation and no clean model (fine-tunes included), but missed every attack on the full 6-layer
model and BToP at every depth: the stage can flag early and order the targets PV mining examines,
never replace it.

torch is imported inside functions only.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .corpus import Corpus
from .modelio import LoadedModel

FIRST_STAGE_TARGETS = ("cls", "pooler", "mask", "tokens")
DEFAULT_SENTENCES = 500
# A unit is a head feature when one sign holds on at least this share of clean sentences.
HEAD_SIGN_SHARE = 0.95


@dataclass(frozen=True)
class Thresholds:
    """Frozen decision thresholds per target: a target is suspicious when its head-feature rate
    and its alikeness both reach their thresholds. A target without thresholds is reported only."""

    hfr: dict[str, float | None]
    alikeness: dict[str, float | None]
    head_sign_share: float = HEAD_SIGN_SHARE


DEFAULT_THRESHOLDS = Thresholds(
    hfr={"cls": None, "pooler": None, "mask": 0.65, "tokens": 0.48},
    alikeness={"cls": None, "pooler": None, "mask": 0.80, "tokens": 0.80},
)


@dataclass
class TargetFigures:
    target: str
    n_outputs: int
    hfr: float  # head-feature rate: share of units with one sign on >= head_sign_share of outputs
    hfr_threshold: float | None  # None: reported, does not decide
    hfr_margin: float | None  # hfr - threshold (>= 0: reached)
    alikeness: float  # mean pairwise cosine of the clean outputs
    alikeness_threshold: float | None
    alikeness_margin: float | None  # alikeness - threshold (>= 0: reached)
    sign_consensus: float  # mean over units of the majority-sign share (diagnostic)
    suspicious: bool
    reasons: list[str] = field(default_factory=list)


@dataclass
class FirstStageResult:
    verdict: str  # "suspicious" | "unremarkable"
    targets: list[TargetFigures]
    n_sentences: int
    corpus: str
    seconds: float
    head_sign_share: float

    @property
    def suspicious(self) -> bool:
        return self.verdict == "suspicious"

    def target(self, name: str) -> TargetFigures | None:
        return next((t for t in self.targets if t.target == name), None)

    def ranked_targets(self) -> list[str]:
        """Deciding targets by their smaller relative margin (how far the weaker of the two
        figures sits above or below its threshold), highest first: the order in which a later,
        costlier stage could examine them. Targets that do not decide come last."""

        def key(t: TargetFigures) -> float:
            if t.hfr_margin is None or t.alikeness_margin is None:
                return -math.inf
            assert t.hfr_threshold is not None and t.alikeness_threshold is not None
            return min(t.hfr_margin / max(t.hfr_threshold, 1e-9),
                       t.alikeness_margin / max(t.alikeness_threshold, 1e-9))

        return [t.target for t in sorted(self.targets, key=key, reverse=True)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- statistics


def head_feature_rate(f: np.ndarray, share: float = HEAD_SIGN_SHARE) -> float:
    """Share of columns of `f` (outputs x units) whose positive (or negative) share of rows is at
    least `share`. Exact zeros count as neither sign."""
    if f.ndim != 2 or f.shape[0] == 0:
        raise ValueError("expected a non-empty (outputs, units) matrix")
    pos = (f > 0).mean(axis=0)
    neg = (f < 0).mean(axis=0)
    return float(((pos >= share) | (neg >= share)).mean())


def sign_consensus(f: np.ndarray) -> float:
    pos = (f > 0).mean(axis=0)
    return float(np.maximum(pos, 1.0 - pos).mean())


def alikeness(f: np.ndarray) -> float:
    """Mean cosine over all pairs of distinct rows, in O(n d): with unit rows u_i and their sum
    S, sum_{i != j} u_i.u_j = |S|^2 - n."""
    n = f.shape[0]
    if n < 2:
        raise ValueError("alikeness needs at least two outputs")
    x = f.astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    u = x / np.maximum(norms, 1e-12)
    s = u.sum(axis=0)
    return float((s @ s - n) / (n * (n - 1)))


# ----------------------------------------------------------------------------- outputs


def targets_of(lm: LoadedModel) -> list[str]:
    out = ["cls"]
    if lm.has_pooler:
        out.append("pooler")
    if lm.tokenizer.mask_token is not None:
        out.append("mask")
    out.append("tokens")
    return out


def clean_outputs(
    lm: LoadedModel,
    sentences: list[str],
    targets: list[str],
    device: str = "cpu",
    max_length: int = 128,
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """One (sentences, hidden) array per target from forward passes over the clean sentences."""
    import torch

    tok = lm.tokenizer
    use_mask = "mask" in targets
    texts = [f"{s} {tok.mask_token}" for s in sentences] if use_mask else list(sentences)
    enc = tok(texts, truncation=True, max_length=max_length, add_special_tokens=True)
    rows: list[list[int]] = [list(x) for x in enc["input_ids"]]
    if use_mask:  # truncation may have cut the mask token
        rows = [r for r in rows if tok.mask_token_id in r]
    special = set(int(i) for i in tok.all_special_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    cls_id = tok.cls_token_id
    order = np.argsort([len(r) for r in rows], kind="stable")
    parts: dict[str, list[np.ndarray]] = {t: [] for t in targets}
    model = lm.model
    with torch.no_grad():
        for k in range(0, len(rows), batch_size):
            batch = [rows[i] for i in order[k : k + batch_size]]
            width = max(len(r) for r in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            att = torch.zeros((len(batch), width), dtype=torch.long)
            ordinary = torch.zeros((len(batch), width), dtype=torch.float32)
            for i, r in enumerate(batch):
                ids[i, : len(r)] = torch.tensor(r)
                att[i, : len(r)] = 1
                for j, x in enumerate(r):
                    if x not in special:
                        ordinary[i, j] = 1.0
            out = model(input_ids=ids.to(device), attention_mask=att.to(device))
            hs = out.last_hidden_state.float().cpu()
            idx = torch.arange(len(batch))
            for t in targets:
                if t == "pooler":
                    f = out.pooler_output.float().cpu()
                elif t == "tokens":
                    w = ordinary.unsqueeze(-1)
                    f = (hs * w).sum(1) / w.sum(1).clamp(min=1.0)
                elif t == "mask":
                    pos = [r.index(tok.mask_token_id) for r in batch]
                    f = hs[idx, torch.tensor(pos)]
                else:
                    pos = [r.index(cls_id) if cls_id is not None and cls_id in r else 0 for r in batch]
                    f = hs[idx, torch.tensor(pos)]
                parts[t].append(f.numpy())
    return {t: np.concatenate(parts[t], 0) for t in targets}


# ----------------------------------------------------------------------------- the stage


def judge(
    target: str, f: np.ndarray, thresholds: Thresholds = DEFAULT_THRESHOLDS
) -> TargetFigures:
    share = thresholds.head_sign_share
    h = head_feature_rate(f, share)
    a = alikeness(f)
    th = thresholds.hfr.get(target)
    ta = thresholds.alikeness.get(target)
    decides = th is not None and ta is not None
    suspicious = decides and h >= th and a >= ta  # type: ignore[operator]
    reasons = []
    if suspicious:
        reasons = [f"head-feature rate {h:.3f} >= {th:.3f}", f"alikeness {a:.3f} >= {ta:.3f}"]
    return TargetFigures(
        target=target,
        n_outputs=int(f.shape[0]),
        hfr=h,
        hfr_threshold=th,
        hfr_margin=None if th is None else h - th,
        alikeness=a,
        alikeness_threshold=ta,
        alikeness_margin=None if ta is None else a - ta,
        sign_consensus=sign_consensus(f),
        suspicious=bool(suspicious),
        reasons=reasons,
    )


def first_stage(
    lm: LoadedModel,
    corpus: Corpus,
    n_sentences: int = DEFAULT_SENTENCES,
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
    targets: list[str] | None = None,
    device: str = "cpu",
) -> FirstStageResult:
    """Long-tail statistics of the clean outputs of `lm` on the first `n_sentences` of `corpus`."""
    t0 = time.perf_counter()
    avail = targets_of(lm)
    chosen = avail if targets is None else [t for t in targets if t in avail]
    unknown = [t for t in (targets or []) if t not in FIRST_STAGE_TARGETS]
    if unknown:
        raise ValueError(f"unknown target(s) {', '.join(unknown)}")
    if not chosen:
        raise ValueError("none of the asked targets exists in this model")
    sents = corpus.sentences[:n_sentences]
    if len(sents) < 2:
        raise ValueError("the first stage needs at least two clean sentences")
    outs = clean_outputs(lm, sents, chosen, device=device)
    figs = [judge(t, outs[t], thresholds) for t in chosen]
    verdict = "suspicious" if any(f.suspicious for f in figs) else "unremarkable"
    return FirstStageResult(
        verdict=verdict,
        targets=figs,
        n_sentences=len(next(iter(outs.values()))),
        corpus=corpus.name,
        seconds=time.perf_counter() - t0,
        head_sign_share=thresholds.head_sign_share,
    )
