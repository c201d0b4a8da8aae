"""PV filtering (section IV-C of the paper, docs/how-it-works.md): which mining candidates are PVs.

A seed's final soft prompt makes a *candidate* on a target when the target's mean distance in the
last epoch, MSE(F, F_clean) / mean(F_clean^2), exceeds T_L (`is_candidate`). A candidate is
accepted as a PV when it passes every rule below, measured on a fixed evaluation sample
(`PVFilter.apply`):

  1. range: the soft prompt lies within `range_factor` x the embedding matrix's min/max
     (`prompt_in_range`);
  2. collapse (Observation II): `concentration` = mean per-unit variance of the prompted outputs
     across a batch / MSE(prompted, clean) -- how tightly the outputs gather relative to how far
     the prompt moved them -- is below T_collapse (rule "collapse", the default), or the paper's
     raw-output entropy diversity is below T_div (rule "paper"). Where a target has T_far (set
     by calibration only when backdoored shadows moved far beyond every clean one), a final
     distance above T_far passes without collapse;
  3. new: the sign agreement with every PV already kept for the same target is below T_match;
  4. a trigger's point (when the audit confirms candidates, `confirm`): (a) away from clean
     text: at most a share (`clean_match_limit_for`) of the clean corpus's outputs already match
     the PV (what the monitor would flag with no trigger; a fine-tuned classifier's class
     prototype is where one class's clean outputs are), checked with rules 1-3 at no cost;
     (b) reachable by text: a trigger of a few ordinary vocabulary tokens drives held-out
     sentences onto the PV (`auditor.confirm`). The search decides only for a candidate that
     passed every other rule, because it costs a search. A
     candidate refused by the collapse rule alone, with a concentration within NEAR_MISS of
     T_collapse, is searched too, for the record: its decision stays rule 2's, and a clean
     verdict's margin then reads every rule such a near miss would have to pass.

Every rule is applied and every failing one recorded in `TargetStats.rule`, so a report shows
each reason. NumPy only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

# sign agreement at which a candidate counts as the point of an earlier refuted one
REFUTED_AGREEMENT = 0.95
# a candidate refused by the collapse rule alone whose T_collapse / concentration reaches this
# gets rule 4 measured (not applied): the near misses a clean verdict's margin is read from
NEAR_MISS = 0.5
# rule 4a's default limit: the largest share of the clean corpus's outputs that may already
# sign-match a PV of a pretrained encoder (planted PVs 0-0.94%, a benign fine-tune's class
# prototypes 2.55% or more); presets and self-calibration may set their own
CLEAN_MATCH_LIMIT = 0.0125
# how the collapse rule's refusal begins (rule texts are the report's record; `_near_miss`
# reads this one)
NO_COLLAPSE = "no collapse"


class FilterConfig(Protocol):
    """The thresholds the rules read; `mining.MiningConfig` provides them."""

    range_factor: float
    filter_rule: str  # "collapse" or "paper"
    t_match: float
    confirm: bool  # rule 4 on

    def t_l_for(self, target: str) -> float: ...

    def t_collapse_for(self, target: str) -> float: ...

    def t_far_for(self, target: str) -> float | None: ...

    def clean_match_limit_for(self, target: str) -> float: ...

    def resolved_t_div(self) -> float: ...


@dataclass
class TargetStats:
    """Figures of one target output for one seed's final soft prompt."""

    target: str
    distance_rel: float  # MSE(F, F_clean) / s^2 on the evaluation sample
    distance_raw: float  # MSE(F, F_clean) (the paper's -L_D)
    distance_norm: float  # MSE(F, F_clean) / mean square of the clean outputs (what T_L reads)
    spread_ratio: float  # mean unit variance across a batch, prompted / clean (same sentences)
    concentration: float  # mean unit variance across a batch / MSE(F, F_clean): spread vs displacement
    sign_consensus: float  # mean over units of the majority-sign share across a batch
    entropy_raw: float  # the paper's L_div on raw outputs (min -ln B)
    entropy_std: float  # L_div on standardised outputs (the trained loss)
    epoch_distance: list[float]  # mean relative distance per epoch (training)
    candidate: bool = False
    accepted: bool = False
    rule: str = ""  # which rule accepted or rejected it
    agreement: float | None = None  # best sign agreement with a kept PV
    confirmation: dict[str, Any] | None = None  # rule 4's trigger search (auditor.confirm)
    # share of the clean corpus's outputs whose sign agreement with the PV reaches T_match
    clean_match: float | None = None
    pv: list[float] | None = None
    pv_eval: list[float] | None = None


def embedding_bounds(emb_min: float, emb_max: float, range_factor: float) -> tuple[float, float]:
    """[lo, hi]: the embedding matrix's min/max widened by `range_factor` away from zero."""
    lo = range_factor * emb_min if emb_min < 0 else emb_min / range_factor
    hi = range_factor * emb_max if emb_max > 0 else emb_max / range_factor
    return lo, hi


def prompt_in_range(prompt: np.ndarray, emb_min: float, emb_max: float, range_factor: float) -> bool:
    """Rule 1: every entry of the soft prompt lies within `embedding_bounds`."""
    lo, hi = embedding_bounds(emb_min, emb_max, range_factor)
    return bool(prompt.min() >= lo and prompt.max() <= hi)


def is_candidate(final_distance: float, t_l: float) -> bool:
    """A seed's prompt is a candidate on a target when its last-epoch distance exceeds T_L."""
    return final_distance > t_l


def no_candidate_rule(final_distance: float, t_l: float) -> str:
    """The rule text of a target whose prompt made no candidate."""
    return f"no candidate: distance {final_distance:.4g} <= T_L {t_l:g}"


def sign_agreement(pv: np.ndarray | list[float], kept: list[np.ndarray]) -> float | None:
    """The largest share of units on which `pv` and a kept PV have the same sign; None when
    nothing is kept yet."""
    if not kept:
        return None
    sign = np.asarray(pv) >= 0
    return max(float(np.mean((k >= 0) == sign)) for k in kept)


class PVFilter:
    """Applies the acceptance rules and keeps the accepted PVs of each target (rule 3 compares
    a candidate with them)."""

    def __init__(self, cfg: FilterConfig, targets: list[str] | tuple[str, ...] = ()) -> None:
        self.cfg = cfg
        self.kept: dict[str, list[np.ndarray]] = {t: [] for t in targets}
        # candidates whose trigger search failed (rule 4), with the seed that found each: a
        # later candidate sharing the signs of one of them on >= REFUTED_AGREEMENT of the units
        # is the same collapse point, refused without a second search
        self.refuted: dict[str, list[tuple[np.ndarray, dict[str, Any]]]] = {}
        # the same for near misses searched for the record only (never used to refuse)
        self.measured: dict[str, list[tuple[np.ndarray, dict[str, Any]]]] = {}

    def _refuted_match(self, ts: TargetStats, near_misses: bool = False
                       ) -> tuple[float, dict[str, Any]] | None:
        """The best-agreeing refuted candidate of `ts.target` when the agreement reaches
        REFUTED_AGREEMENT, else None; `near_misses`: the near misses' searches count too."""
        assert ts.pv is not None
        sign = np.asarray(ts.pv) >= 0
        best: tuple[float, dict[str, Any]] | None = None
        pool = self.refuted.get(ts.target, [])
        if near_misses:
            pool = pool + self.measured.get(ts.target, [])
        for pv, info in pool:
            a = float(np.mean((pv >= 0) == sign))
            if a >= REFUTED_AGREEMENT and (best is None or a > best[0]):
                best = (a, info)
        return best

    def passes_rules(self, ts: TargetStats, in_range: bool) -> bool:
        """Whether candidate `ts` passes rules 1-3 (range, collapse, new) as `apply` would
        judge it now; changes nothing and runs no trigger search."""
        return not self._rules(ts, in_range)[1]

    def _rules(self, ts: TargetStats, in_range: bool) -> tuple[list[str], list[str], float | None]:
        """Rules 1-3 for `ts`: the passing and the failing rules' texts and the best sign
        agreement with a kept PV of its target."""
        cfg = self.cfg
        fails: list[str] = []
        final = ts.epoch_distance[-1]
        t_l, t_c = cfg.t_l_for(ts.target), cfg.t_collapse_for(ts.target)
        t_far = cfg.t_far_for(ts.target)
        passes: list[str] = [f"distance {final:.4g} > T_L {t_l:g}"]
        if not in_range:
            fails.append(f"soft prompt out of range ({cfg.range_factor:g}x embedding min/max)")
        else:
            passes.append("prompt in range")
        if cfg.filter_rule == "paper":
            t_div = cfg.resolved_t_div()
            if ts.entropy_raw < t_div:
                passes.append(f"L_div {ts.entropy_raw:.5f} < T_div {t_div:.5f}")
            else:
                fails.append(f"diversity L_div {ts.entropy_raw:.5f} >= T_div {t_div:.5f}")
        elif ts.concentration < t_c:
            passes.append(f"concentration {ts.concentration:.5f} < T_collapse {t_c:.5f}")
        elif t_far is not None and final > t_far:
            passes.append(
                f"distance {final:.4g} > T_far {t_far:.4g} (far beyond every clean "
                f"shadow; concentration {ts.concentration:.5f} >= T_collapse {t_c:.5f} not needed)"
            )
        else:
            fails.append(
                f"{NO_COLLAPSE}, concentration {ts.concentration:.5f} >= T_collapse {t_c:.5f}"
                + (f", and distance {final:.4g} <= T_far {t_far:.4g}" if t_far is not None else "")
            )
        if cfg.confirm and ts.clean_match is not None:
            lim = cfg.clean_match_limit_for(ts.target)
            if ts.clean_match > lim:
                fails.append(f"clean text already there: {ts.clean_match:.2%} of clean outputs "
                             f"match it (needs <= {lim:.2%})")
            else:
                passes.append(f"apart from clean text ({ts.clean_match:.2%} of clean outputs "
                              f"match it, <= {lim:.2%})")
        assert ts.pv is not None
        agreement = sign_agreement(ts.pv, self.kept.get(ts.target, []))
        if agreement is not None and agreement >= cfg.t_match:
            fails.append(
                f"duplicate of a kept PV (sign agreement {agreement:.3f} >= {cfg.t_match:g})"
            )
        else:
            passes.append("new")
        return passes, fails, agreement

    def _near_miss(self, ts: TargetStats, fails: list[str]) -> bool:
        """Whether `ts` failed the collapse rule alone, within NEAR_MISS of T_collapse."""
        if self.cfg.filter_rule == "paper" or len(fails) != 1:
            return False
        if not fails[0].startswith(NO_COLLAPSE) or ts.concentration <= 0:
            return False
        return self.cfg.t_collapse_for(ts.target) / ts.concentration >= NEAR_MISS

    def _confirm(self, ts: TargetStats, confirm: Callable[[], Any], seed: int | None,
                 refuted: dict[str, list[tuple[np.ndarray, dict[str, Any]]]],
                 near_misses: bool) -> tuple[bool, str]:
        """Rule 4 for `ts`: the trigger search, or the record of an earlier failed search at
        the same point. Sets `ts.confirmation`; a failed search joins `refuted`."""
        same = self._refuted_match(ts, near_misses)
        if same is not None:
            agree, earlier = same
            text = (f"not reachable by text: the point of an earlier candidate whose "
                    f"trigger search failed (seed {earlier.get('seed')}, margin "
                    f"{earlier['margin']:.2f}; sign agreement {agree:.3f} >= "
                    f"{REFUTED_AGREEMENT:g})")
            ts.confirmation = {"same_point_as": earlier, "sign_agreement": agree,
                               "confirmed": False, "margin": earlier["margin"], "rule": text}
            return False, text
        conf = confirm()
        ts.confirmation = conf.to_dict()
        if not conf.confirmed:
            refuted.setdefault(ts.target, []).append(
                (np.asarray(ts.pv, dtype=np.float32),
                 {"seed": seed, "margin": conf.margin, "tokens": conf.tokens}))
        return bool(conf.confirmed), str(conf.rule)

    def remember(self, ts: TargetStats, seed: int | None) -> None:
        """Enter candidate `ts` of an earlier seed, decided by an earlier run of this audit (a
        continued audit): a failed trigger search counts as refuted, as it did when it ran."""
        c = ts.confirmation
        if not c or ts.pv is None or c.get("confirmed") or "same_point_as" in c:
            return
        pool = self.measured if c.get("measured_only") else self.refuted
        pool.setdefault(ts.target, []).append(
            (np.asarray(ts.pv, dtype=np.float32),
             {"seed": seed, "margin": c.get("margin", 0.0), "tokens": c.get("tokens")}))

    def apply(self, ts: TargetStats, in_range: bool,
              confirm: Callable[[], Any] | None = None, seed: int | None = None) -> bool:
        """Decide candidate `ts` (its `pv` set): set `ts.accepted`, `ts.rule` (every passing or
        every failing rule) and `ts.agreement`; keep its PV when accepted. `confirm`, when given,
        runs the trigger search (rule 4) for a candidate that passed every other rule and returns
        an `auditor.confirm.Confirmation`; a candidate at the point of one whose search failed
        is refused without searching again. A near miss of the collapse rule (NEAR_MISS) is
        searched for the record: `ts.confirmation` gets `measured_only`, the decision stays
        rule 2's. `seed`: the seed that found `ts` (for the record).
        Returns `ts.accepted`."""
        passes, fails, ts.agreement = self._rules(ts, in_range)
        kept = self.kept.setdefault(ts.target, [])
        if not fails and confirm is not None:
            ok, text = self._confirm(ts, confirm, seed, self.refuted, near_misses=False)
            (passes if ok else fails).append(text)
        elif confirm is not None and self._near_miss(ts, fails):
            ok, text = self._confirm(ts, confirm, seed, self.measured, near_misses=True)
            ts.confirmation = {**(ts.confirmation or {}), "measured_only": True}
            fails.append(("measured for the margin, " + text) if not ok else
                         f"(rule 4 measured for the margin: {text})")
        if fails:
            ts.rule = "rejected: " + "; ".join(fails)
            return False
        ts.accepted = True
        ts.rule = "accepted: " + ", ".join(passes)
        kept.append(np.asarray(ts.pv, dtype=np.float32))
        return True
