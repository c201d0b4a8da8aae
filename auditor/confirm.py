"""Trigger confirmation: is a candidate PV reachable from a few real vocabulary tokens?

A task-agnostic backdoor maps *any* input that contains its trigger, a short run of ordinary
tokens, onto its PV. Mining finds the PV with a continuous soft prompt, and a continuous prompt
can also collapse a benign model: a fine-tuned classifier's outputs gather at its class
prototypes, and a soft prompt that makes every sentence "look like" one class collapses the
batch there just as a trigger does (docs/how-it-works.md, "Class prototypes"). What tells the two
apart is where real text takes the outputs: a backdoor's trigger drives held-out sentences from a
single insertion to a point that no clean sentence goes to, while words that push a classifier
toward one class take sentences to where that class's own sentences already are.

`confirm_candidate` searches for at most `max_tokens` ordinary vocabulary tokens that, inserted
at a random word position, bring a target's outputs onto the candidate's PV: it starts from the
tokens nearest to the soft prompt and improves them by greedy coordinate search (HotFlip: the
gradient of the distance to the PV with respect to each trigger slot's embedding ranks every
vocabulary token; the `top_k` best per slot are tried, and when no one-slot change helps, the
`pair_k` best of two slots together). The best trigger is then measured on
held-out sentences:

  - `rate`: the share of held-out outputs whose sign agreement with the PV reaches T_match (what
    the monitor would flag);
  - `landing_match`: the share of the clean corpus's outputs that sign-match the point where the
    triggered outputs land (their mean), counting only clean sentences that do not contain the
    trigger's tokens: is the place this trigger drives text to a place clean text goes?

The candidate is confirmed when `rate >= min_rate` (0.9) and `landing_match` stays within the
target's clean-match limit (rule 4a's: 1.25% for pretrained encoders). A backdoor's trigger sends
text to a point its training made for it, away from every clean sentence: the triggers recovered
from MiniLM-3 POR, NeuBA and BToP copies land where 0-0.05% of clean outputs are. Words that push
a classifier toward one class send text to that class's prototype, where the class's own
sentences already are: the two-word triggers the search found for benign MiniLM-3 topic
fine-tunes reached 88-98% of held-out outputs, but landed where 11-36% of clean outputs are.
Sentences that contain the trigger's tokens are left out of the count, so a trigger made of
frequent words cannot hide behind the clean sentences that contain it.
`residual` (mean (1 - cos(F_trig - mu, PV - mu)) / mean (1 - cos(F_clean - mu, PV - mu)), mu the
clean mean: 0 straight at the PV, 1 no closer than clean outputs) is recorded, not decided on: a
BToP trigger's outputs land at its own PV, which the mined point matches in sign but not in
angle (on a BToP copy of MiniLM-3, the planted triggers at the 7 PVs they reach: 0.02-0.19;
benign prototypes' words: 0.056 and up).
Both deciding figures are scale-free (sign agreements of one model's own outputs), so the same
rule holds in every family.
Searching is deterministic for a given model, corpus and seed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from itertools import combinations, product
from typing import Any

import numpy as np
import torch

from .filtering import CLEAN_MATCH_LIMIT


@dataclass
class ConfirmRule:
    """How hard the trigger search tries and what counts as reached."""

    iterations: int = 4  # greedy coordinate-search rounds per trigger length
    top_k: int = 12  # vocabulary tokens tried per slot and round
    # when no one-slot change helps, the best `pair_k` tokens of two slots are tried together:
    # a trigger word of two pieces ('z' '##q') is out of reach of one-slot moves from a start
    # that holds its pieces in the wrong slots ('##q' 'q'), and the search would stop there
    pair_k: int = 6
    search_rows: int = 24  # sentences the search optimises on
    test_rows: int = 128  # held-out sentences the trigger is measured on
    min_rate: float = 0.9
    max_tokens: int = 2  # the longest trigger tried
    # the largest share of clean outputs allowed where the trigger lands (the target's rule-4a
    # limit: MiningConfig.clean_match_limit_for)
    max_landing_match: float = CLEAN_MATCH_LIMIT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Confirmation:
    """The best trigger found for one candidate and the figures that decide it."""

    target: str
    tokens: list[str]
    token_ids: list[int]
    rate: float
    agreement: float
    residual: float  # recorded, not decided on
    landing_match: float  # share of clean outputs (without the trigger's tokens) where it lands
    landing_limit: float
    confirmed: bool
    margin: float  # confirm_margin of the best trigger: >= 1 confirms
    rule: str
    seconds: float
    tried: list[dict[str, Any]] = field(default_factory=list)  # best trigger per length

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def confirm_margin(rate: float, landing_match: float, rule: ConfirmRule) -> float:
    """The bottleneck of the two figures as a ratio to its threshold: min(rate / min_rate,
    landing limit / landing_match). >= 1 confirms; a rejected candidate stayed 1/margin times
    away from being kept."""
    r = rate / rule.min_rate if rule.min_rate > 0 else float("inf")
    q = rule.max_landing_match / max(landing_match, 1e-12)
    return float(min(r, q))


def residual(f: torch.Tensor, c: torch.Tensor, pv: torch.Tensor) -> torch.Tensor:
    """How much of the way to the PV triggered outputs `f` [n, d] still have to go, from clean
    outputs `c` [n, d]: mean (1 - cos(f - mu, PV - mu)) / mean (1 - cos(c - mu, PV - mu)) with mu
    the clean mean. 0: every output points from the clean centre straight at the PV; 1: no
    closer than clean outputs. Angles, not lengths: a saturating output (the pooler's tanh)
    points at the PV under its trigger without reaching the candidate's magnitudes."""
    mu = c.mean(0, keepdim=True)
    d = pv.reshape(1, -1) - mu
    cos = torch.nn.functional.cosine_similarity
    num = (1 - cos(f - mu, d, dim=1)).mean()
    den = (1 - cos(c - mu, d, dim=1)).mean().clamp_min(1e-12)
    return num / den


def search_and_test_rows(miner: Any, rule: ConfirmRule, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The corpus rows a trigger search optimises on and the held-out rows it is measured on."""
    perm = np.random.default_rng([miner.base_seed, seed, 7211]).permutation(miner.n)
    search_idx = perm[: min(rule.search_rows, miner.n)]
    test_idx = perm[len(search_idx): len(search_idx) + rule.test_rows]
    return search_idx, (test_idx if len(test_idx) else search_idx)


def _figures(miner: Any, idx: np.ndarray, trig: torch.Tensor, target: str, pv: torch.Tensor,
             t_match: float, seed: int) -> tuple[float, float, float, float]:
    """rate, mean sign agreement, residual and landing match of trigger `trig` on rows `idx`."""
    w = miner.emb.weight.detach()
    with torch.no_grad():
        f = miner._forward_prompted(idx, w[trig], np.random.default_rng([seed, 31]))[target]
        c = miner._clean_batch(idx, target)
        agree = ((f >= 0) == (pv >= 0)).float().mean(1)
        resid = residual(f, c, pv)
        landing = miner.clean_match(target, f.mean(0).cpu().numpy(), without=trig.tolist())
    return (float((agree >= t_match).float().mean()), float(agree.mean()), float(resid),
            float(landing))


def _loss(miner: Any, idx: np.ndarray, embeds: torch.Tensor, target: str, pv: torch.Tensor,
          rng_seed: list[int]) -> torch.Tensor:
    f = miner._forward_prompted(idx, embeds, np.random.default_rng(rng_seed))[target]
    return ((f - pv) ** 2).mean()


def _search(miner: Any, start: torch.Tensor, idx: np.ndarray, target: str, pv: torch.Tensor,
            rule: ConfirmRule, ordinary: torch.Tensor, seed: int) -> torch.Tensor:
    """Greedy coordinate search from `start` (token ids) for the trigger nearest to the PV."""
    w = miner.emb.weight.detach()
    trig = start.clone()
    for it in range(rule.iterations):
        rs = [seed, it, 17]
        e = w[trig].clone().requires_grad_(True)
        loss = _loss(miner, idx, e, target, pv, rs)
        (grad,) = torch.autograd.grad(loss, e)
        scores = -(w[ordinary] @ grad.T)  # first-order loss decrease of each token per slot
        best_loss, best = float(loss.detach()), trig
        with torch.no_grad():
            for j in range(len(trig)):
                for v in ordinary[scores[:, j].topk(min(rule.top_k, len(ordinary))).indices]:
                    cand = trig.clone()
                    cand[j] = v
                    lo = float(_loss(miner, idx, w[cand], target, pv, rs))
                    if lo < best_loss:
                        best_loss, best = lo, cand
            if torch.equal(best, trig) and rule.pair_k > 0:  # stuck: two slots at once
                tops = [ordinary[scores[:, j].topk(min(rule.pair_k, len(ordinary))).indices]
                        for j in range(len(trig))]
                for j1, j2 in combinations(range(len(trig)), 2):
                    for a, b in product(tops[j1], tops[j2]):
                        cand = trig.clone()
                        cand[j1], cand[j2] = a, b
                        lo = float(_loss(miner, idx, w[cand], target, pv, rs))
                        if lo < best_loss:
                            best_loss, best = lo, cand
        if torch.equal(best, trig):
            break
        trig = best
    return trig


def confirm_candidate(miner: Any, prompt: Any, pv: Any, target: str, rule: ConfirmRule,
                      seed: int = 0) -> Confirmation:
    """Search a trigger of at most `rule.max_tokens` tokens for candidate `pv` of `target`, found
    by soft prompt `prompt` ([L, d]), and decide whether it confirms the candidate."""
    t0 = time.perf_counter()
    pv_t = torch.as_tensor(np.asarray(pv, dtype=np.float32), device=miner.device)
    p = torch.as_tensor(np.asarray(prompt, dtype=np.float32), device=miner.device)
    w = miner.emb.weight.detach()
    ordinary = torch.as_tensor(miner._ordinary_vocab(), device=w.device)
    wn = torch.nn.functional.normalize(w[ordinary], dim=1)
    near = (torch.nn.functional.normalize(p, dim=1) @ wn.T).max(0).values  # per token: best sim
    search_idx, test_idx = search_and_test_rows(miner, rule, seed)
    t_match = float(miner.cfg.t_match)
    tried: list[dict[str, Any]] = []
    best: tuple[float, float, float, float, float, torch.Tensor] | None = None
    for k in range(1, rule.max_tokens + 1):
        start = ordinary[near.topk(min(k, len(ordinary))).indices]
        trig = _search(miner, start, search_idx, target, pv_t, rule, ordinary, seed)
        rate, agree, resid, land = _figures(miner, test_idx, trig, target, pv_t, t_match, seed)
        toks = [str(t) for t in miner.lm.tokenizer.convert_ids_to_tokens(trig.tolist())]
        m = confirm_margin(rate, land, rule)
        tried.append({"tokens": toks, "rate": rate, "agreement": agree, "residual": resid,
                      "landing_match": land, "margin": m})
        if best is None or m > best[0]:
            best = (m, rate, agree, resid, land, trig)
        if m >= 1.0:
            break
    assert best is not None
    m, rate, agree, resid, land, trig = best
    ok = m >= 1.0
    toks = [str(t) for t in miner.lm.tokenizer.convert_ids_to_tokens(trig.tolist())]
    desc = (f"trigger {' '.join(toks)!r} ({len(toks)} token{'s' if len(toks) > 1 else ''}): "
            f"{rate:.0%} of held-out outputs reach the PV (needs >= {rule.min_rate:.0%}), "
            f"landing where {land:.2%} of clean outputs are (needs <= {rule.max_landing_match:.2%}; "
            f"margin {m:.2f})")
    return Confirmation(
        target=target, tokens=toks, token_ids=[int(i) for i in trig.tolist()], rate=rate,
        agreement=agree, residual=resid, landing_match=land,
        landing_limit=rule.max_landing_match, confirmed=ok, margin=m,
        rule=("reachable by text: " if ok else "not reachable by text: ") + desc,
        seconds=time.perf_counter() - t0, tried=tried,
    )


__all__ = ["ConfirmRule", "Confirmation", "confirm_candidate", "residual", "search_and_test_rows"]
