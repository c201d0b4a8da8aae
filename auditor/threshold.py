"""The monitor's sign-match thresholds for one deployment: the :class:`Thresholds` in force, and
how ``lmsan threshold`` chooses T_match on the deployment's clean inputs.

Torch-free (NumPy + the monitor); a screener is passed in, never imported. Why choose: the PV set's
``match_threshold`` (0.8 by default) is chosen for the bare backbone, but a deployed model can move
clean outputs toward the PVs (a P-tuning prompt or P-tuning v2 prefix does: clean p99 match
0.84-0.86, so 1-6% of clean inputs are rejected at 0.8; bench/results/prompt_tuning.md). Triggered
inputs match at 1.00, so a higher threshold chosen on clean data of the deployed task brings the
false rejections down at no cost in detection. The chosen value is deployed as ``--t-match``
(``Thresholds(match=...)``), or per PV as ``--t-match-file`` (``Thresholds.load``);
:class:`Thresholds` lives in :mod:`lmsan.auditor.thresholds` (re-exported here), which the
screener imports without importing this module.

The rule (:func:`choose_from_results`): a record's best match count ``c`` (over PVs, targets and,
for ``tokens``, positions; ``c = match_rate * d``) flags it at threshold ``t`` when
``c >= threshold_count(d, t)`` (``ceil(t * d)``), exactly as the monitor decides. The chosen count
is the smallest ``k`` whose false-rejection rate on the clean records is at most ``max_frr``, but
never below the PV set's own count: the threshold only goes up. If even ``k = d`` (T = 1.0)
rejects more than ``max_frr`` of the clean records (they match a PV on every dimension: the
"clean" data probably holds triggers), ``reachable`` is False and 1.0 is chosen.

Trigger words in the clean data (:mod:`lmsan.auditor.trigger_words`): clean records on which the
backdoor fires through one word are left out of the FRR budget by default and reported;
``frr_with_trigger_words`` is the FRR with them counted, as deployment will see it.

The reported threshold is the shortest decimal that gives count ``k`` (any rate in
``((k - 1) / d, k / d]`` flags the same records; ``k / d`` itself is not always safe as a float:
``691 / 768`` prints as ``0.8997395833333334``, whose exact decimal times 768 is just over 691,
so the monitor would need 692). When the PV set's count is kept, its own value is reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from . import monitor as mon
from .errors import InputError, UsageError
from .thresholds import FORMAT as FORMAT  # re-exported: the names callers import from here
from .thresholds import VERSION as VERSION
from .thresholds import Thresholds as Thresholds
from .thresholds import check_match_threshold as check_match_threshold
from .thresholds import check_per_pv_thresholds as check_per_pv_thresholds
from .trigger_words import find_trigger_words

if TYPE_CHECKING:
    from .screener import MonitorResult, Record, Screener

SWEEP_THRESHOLDS = (0.80, 0.85, 0.90, 0.95)
DEFAULT_MAX_FRR = 0.005


@dataclass
class SweepPoint:
    """FRR / FAR at one threshold (shares in [0, 1]; ``far`` None without triggered records)."""

    threshold: float
    count: int  # match count that flags a record: ceil(threshold * d)
    frr: float  # clean records flagged
    far: float | None  # triggered records NOT flagged


@dataclass
class ThresholdChoice:
    """The chosen T_match and the figures behind it (rates are shares in [0, 1])."""

    threshold: float  # the T_match to deploy (--t-match)
    count: int  # the match count it needs, of d
    d: int
    reachable: bool  # False: even 1.0 rejects more than max_frr of the clean records
    max_frr: float
    frr: float  # clean records flagged at `threshold`
    pvset_threshold: float
    frr_pvset: float  # clean records flagged at the PV set's threshold
    far: float | None  # triggered records not flagged at `threshold` (None: none given)
    far_pvset: float | None
    clean_records: int
    triggered_records: int
    clean_quantiles: dict[str, float]  # best match rate: p50, p99, max
    triggered_quantiles: dict[str, float] | None  # min, p1, p50
    sweep: list[SweepPoint] = field(default_factory=list)
    trigger_words: list[dict[str, Any]] = field(default_factory=list)  # left out (trigger_words module)
    frr_with_trigger_words: float | None = None  # FRR at `threshold` with them counted

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def match_counts(results: Sequence[MonitorResult], d: int) -> np.ndarray:
    """Each record's best match count; -1 for a record with no target row (never flagged)."""
    return np.asarray(
        [-1 if r.pv is None else int(round(r.match_rate * d)) for r in results], dtype=np.int64
    )


def rate_for_count(k: int, d: int) -> float:
    """The shortest decimal rate ``t`` with ``threshold_count(d, t) == k`` (1 <= k <= d)."""
    if not 1 <= k <= d:
        raise ValueError(f"count {k} is outside 1..{d}")
    if k == d:
        return 1.0
    for digits in range(1, 16):
        scale = 10**digits
        m = (k * scale) // d  # floor(k / d) at this precision: <= k / d
        if m * d > (k - 1) * scale:  # and > (k - 1) / d
            t = m / scale
            if mon.threshold_count(d, t) == k:
                return t
    return k / d  # pragma: no cover - some precision up to 15 digits always fits


def check_max_frr(max_frr: float) -> None:
    if isinstance(max_frr, bool) or not 0.0 <= float(max_frr) < 1.0:
        raise UsageError(f"--max-frr {max_frr!r}: expected a share in [0, 1), e.g. 0.005")


def _pv_targets(screener: Screener, cols: Sequence[int]) -> list[str]:
    """The target of each PV id in ``cols`` (a match table's columns)."""
    by_id = {p.id: p.target for p in screener.bundle.pvset.pvs}
    return [by_id[i] for i in cols]


def _share(mask: np.ndarray) -> float:
    return float(mask.mean()) if mask.size else 0.0


def _quantiles(rates: np.ndarray, qs: dict[str, float]) -> dict[str, float]:
    return {name: round(float(np.quantile(rates, q)), 6) for name, q in qs.items()}


def choose_from_results(
    clean: Sequence[MonitorResult],
    d: int,
    pvset_threshold: float,
    max_frr: float = DEFAULT_MAX_FRR,
    triggered: Sequence[MonitorResult] | None = None,
) -> ThresholdChoice:
    """Choose T_match from monitor results already computed (the rule: module docstring)."""
    check_max_frr(max_frr)
    if not clean:
        raise InputError("no clean records to choose a threshold from")
    c = match_counts(clean, d)
    n = int(c.size)
    t_counts = match_counts(triggered, d) if triggered else None
    # flagged(k) = #(c >= k) must be <= allowed; with the counts sorted in descending order that
    # holds exactly when k exceeds the (allowed + 1)-th largest count
    allowed = math.floor(float(max_frr) * n + 1e-9)
    desc = np.sort(c)[::-1]
    k_min = 1 if allowed >= n else max(1, int(desc[allowed]) + 1)
    reachable = k_min <= d
    k_pv = mon.threshold_count(d, pvset_threshold)
    if not reachable:
        k, threshold = d, 1.0
    elif k_min <= k_pv:
        k, threshold = k_pv, float(pvset_threshold)
    else:
        k, threshold = k_min, rate_for_count(k_min, d)

    def frr_at(count: int) -> float:
        return _share(c >= count)

    def far_at(count: int) -> float | None:
        return None if t_counts is None else _share(t_counts < count)

    points = {round(t, 6) for t in SWEEP_THRESHOLDS} | {threshold, float(pvset_threshold)}
    sweep = []
    for t in sorted(points):
        kt = mon.threshold_count(d, t)
        sweep.append(SweepPoint(t, kt, frr_at(kt), far_at(kt)))
    rates = np.asarray([r.match_rate for r in clean], dtype=np.float64)
    tq = None
    if triggered:
        trates = np.asarray([r.match_rate for r in triggered], dtype=np.float64)
        tq = _quantiles(trates, {"min": 0.0, "p1": 0.01, "p50": 0.5})
    return ThresholdChoice(
        threshold=threshold,
        count=k,
        d=d,
        reachable=reachable,
        max_frr=float(max_frr),
        frr=frr_at(k),
        pvset_threshold=float(pvset_threshold),
        frr_pvset=frr_at(k_pv),
        far=far_at(k),
        far_pvset=far_at(k_pv),
        clean_records=n,
        triggered_records=0 if t_counts is None else int(t_counts.size),
        clean_quantiles=_quantiles(rates, {"p50": 0.5, "p99": 0.99, "max": 1.0}),
        triggered_quantiles=tq,
        sweep=sweep,
    )


@dataclass
class PerPVChoice:
    """One T_match per PV (``lmsan threshold --per-pv``; rates are shares in [0, 1]).

    Why: one T_match for the whole set is raised by the PV whose clean matches are highest (an
    imprecise mined PV), and then a trigger whose outputs match its own, exact PV at 0.82 is no
    longer flagged (bench/results/prompt_tuning_calibrated.md). Per PV, each PV keeps the lowest
    threshold its own clean matches allow.

    The rule: the FRR budget is split evenly over the K PVs (``max_frr / K`` each); PV j gets the
    smallest count, not below the PV set's, that flags at most that share of the clean records
    on its own. A clean record is flagged when any PV reaches its count, so the FRR of the whole
    set is at most the sum of the PVs' shares: ``max_frr`` (the union bound).
    """

    thresholds: dict[int, float]  # PV id -> T_match to deploy (--t-match-file)
    counts: dict[int, int]
    d: int
    reachable: bool  # False: some PV rejects more than its share even at 1.0
    max_frr: float
    frr: float  # clean records flagged with every PV at its threshold
    far: float | None  # triggered records not flagged (None: none given)
    pvset_threshold: float
    frr_pvset: float
    far_pvset: float | None
    clean_records: int
    triggered_records: int
    per_pv: list[dict[str, Any]] = field(default_factory=list)  # id, target, figures per PV
    trigger_words: list[dict[str, Any]] = field(default_factory=list)  # left out (trigger_words module)
    frr_with_trigger_words: float | None = None  # FRR at the thresholds with them counted

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def choose_per_pv(
    clean_table: np.ndarray,
    pv_ids: Sequence[int],
    d: int,
    pvset_threshold: float,
    max_frr: float = DEFAULT_MAX_FRR,
    triggered_table: np.ndarray | None = None,
    pv_targets: Sequence[str] | None = None,
) -> PerPVChoice:
    """Per-PV T_match from match tables (records x PVs best match counts, -1 = no row; see
    :meth:`~lmsan.auditor.screener.Screener.monitor_encoded`). See :class:`PerPVChoice`."""
    check_max_frr(max_frr)
    c = np.asarray(clean_table, dtype=np.int64)
    if c.ndim != 2 or c.shape[1] != len(pv_ids) or not len(pv_ids):
        raise InputError("the match table must have one column per PV and at least one PV")
    n, k_pvs = c.shape
    if not n:
        raise InputError("no clean records to choose a threshold from")
    t = None if triggered_table is None else np.asarray(triggered_table, dtype=np.int64)
    k_pv = mon.threshold_count(d, pvset_threshold)
    allowed = math.floor(float(max_frr) * n / k_pvs + 1e-9)
    counts: list[int] = []
    reachable = True
    for j in range(k_pvs):
        desc = np.sort(c[:, j])[::-1]
        k_min = 1 if allowed >= n else max(1, int(desc[allowed]) + 1)
        if k_min > d:
            reachable = False
            counts.append(d)
        else:
            counts.append(max(k_min, k_pv))
    cv = np.asarray(counts, dtype=np.int64)
    rates = {
        pid: (float(pvset_threshold) if cnt == k_pv else rate_for_count(int(cnt), d))
        for pid, cnt in zip(pv_ids, counts, strict=True)
    }

    def flagged(table: np.ndarray, thr: np.ndarray) -> np.ndarray:
        return np.asarray((table >= thr[None, :]).any(axis=1))

    base = np.full(k_pvs, k_pv, dtype=np.int64)
    per_pv = []
    for j, pid in enumerate(pv_ids):
        col = c[:, j]
        entry: dict[str, Any] = {
            "id": int(pid),
            "target": None if pv_targets is None else pv_targets[j],
            "threshold": rates[pid],
            "count": int(counts[j]),
            "frr_alone": _share(col >= counts[j]),
            "clean_match_p99": round(float(np.quantile(np.maximum(col, 0), 0.99)) / d, 6),
            "clean_match_max": round(float(max(int(col.max()), 0)) / d, 6),
        }
        if t is not None and t.size:
            entry["triggered_flagged_by_it"] = _share(t[:, j] >= counts[j])
        per_pv.append(entry)
    return PerPVChoice(
        thresholds=rates,
        counts={int(p): int(x) for p, x in zip(pv_ids, counts, strict=True)},
        d=d,
        reachable=reachable,
        max_frr=float(max_frr),
        frr=_share(flagged(c, cv)),
        far=None if t is None else _share(~flagged(t, cv)),
        pvset_threshold=float(pvset_threshold),
        frr_pvset=_share(flagged(c, base)),
        far_pvset=None if t is None else _share(~flagged(t, base)),
        clean_records=int(n),
        triggered_records=0 if t is None else int(t.shape[0]),
        per_pv=per_pv,
    )


def _keep_mask(n: int, hits: Sequence[dict[str, Any]]) -> np.ndarray:
    keep = np.ones(n, dtype=bool)
    keep[[h["record"] for h in hits]] = False
    if not keep.any():
        raise InputError("every clean record is a trigger-word activation: no clean record left "
                         "to choose a threshold from")
    return keep


def _clean_table(screener: Screener, records: Sequence[Record | str]) -> tuple[
        list[MonitorResult], np.ndarray]:
    tab = np.full((len(records), len(screener.pv_columns())), -1, dtype=np.int64)
    return screener.monitor(records, table=tab), tab


def per_pv_with_trigger_words(
    screener: Screener,
    clean_table: np.ndarray,
    hits: list[dict[str, Any]],
    max_frr: float,
    triggered_table: np.ndarray | None,
) -> PerPVChoice:
    """:func:`choose_per_pv` on the clean records less the trigger-word activations ``hits``
    (:func:`find_trigger_words`), with those recorded on the choice."""
    cols = screener.pv_columns()
    keep = _keep_mask(clean_table.shape[0], hits)
    ch = choose_per_pv(
        clean_table[keep], cols, screener.d, screener.bundle.pvset.match_threshold, max_frr,
        triggered_table, _pv_targets(screener, cols),
    )
    cv = np.asarray([ch.counts[int(c)] for c in cols], dtype=np.int64)
    ch.trigger_words = hits
    ch.frr_with_trigger_words = _share(np.asarray((clean_table >= cv[None, :]).any(axis=1)))
    return ch


def single_with_trigger_words(
    screener: Screener,
    clean: Sequence[MonitorResult],
    hits: list[dict[str, Any]],
    max_frr: float,
    triggered: Sequence[MonitorResult] | None,
) -> ThresholdChoice:
    """:func:`choose_from_results` on the clean records less the trigger-word activations
    ``hits`` (:func:`find_trigger_words`), with those recorded on the choice."""
    keep = _keep_mask(len(clean), hits)
    ch = choose_from_results(
        [r for r, k in zip(clean, keep, strict=True) if k], screener.d,
        screener.bundle.pvset.match_threshold, max_frr, triggered,
    )
    ch.trigger_words = hits
    ch.frr_with_trigger_words = _share(match_counts(clean, screener.d) >= ch.count)
    return ch


def choose_per_pv_thresholds(
    screener: Screener,
    clean_records: Sequence[Record | str],
    max_frr: float = DEFAULT_MAX_FRR,
    triggered_records: Sequence[Record | str] | None = None,
    keep_trigger_words: bool = False,
) -> PerPVChoice:
    """Monitor ``clean_records`` (and ``triggered_records``) with ``screener`` and choose one
    T_match per PV (:class:`PerPVChoice`). Records are texts or tuples (a pair). Trigger-word
    activations among the clean records are left out of the budget unless
    ``keep_trigger_words`` (:mod:`lmsan.auditor.trigger_words`)."""
    check_max_frr(max_frr)
    if not clean_records:
        raise InputError("no clean records to choose a threshold from")
    _, tab = _clean_table(screener, clean_records)
    trig = _clean_table(screener, triggered_records)[1] if triggered_records else None
    hits = [] if keep_trigger_words else find_trigger_words(screener, tab, clean_records.__getitem__)
    return per_pv_with_trigger_words(screener, tab, hits, max_frr, trig)


def choose_match_threshold(
    screener: Screener,
    clean_records: Sequence[Record | str],
    max_frr: float = DEFAULT_MAX_FRR,
    triggered_records: Sequence[Record | str] | None = None,
    keep_trigger_words: bool = False,
) -> ThresholdChoice:
    """Monitor ``clean_records`` (and ``triggered_records``) with ``screener`` and choose the
    smallest T_match, not below the PV set's, that rejects at most ``max_frr`` of the clean ones.

    Records are texts or tuples (a pair); a record over the screener's max length raises
    InputError. The choice uses match rates only, but recognising a trigger-word activation needs
    a purge at the PV set's own threshold: a screener at another one raises UsageError when a
    clean record needs that check (they are left out of the budget unless ``keep_trigger_words``,
    see :mod:`lmsan.auditor.trigger_words`).
    """
    check_max_frr(max_frr)
    if not clean_records:
        raise InputError("no clean records to choose a threshold from")
    clean, tab = _clean_table(screener, clean_records)
    trig = screener.monitor(triggered_records) if triggered_records else None
    hits = [] if keep_trigger_words else find_trigger_words(screener, tab, clean_records.__getitem__)
    return single_with_trigger_words(screener, clean, hits, max_frr, trig)


def records_for_frr(max_frr: float) -> int:
    """Clean records needed before an FRR of ``max_frr`` can be shown at 95% confidence when
    none of them is flagged (the rule of three: 3 / n)."""
    return 0 if max_frr <= 0 else math.ceil(3.0 / max_frr)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def choice_warnings(choice: ThresholdChoice, per_pv: PerPVChoice | None = None) -> dict[str, str]:
    """What a deployment should know about a choice, by kind (in the order to show them):
    ``records`` (too few clean records to show ``max_frr``, the rule of three),
    ``trigger_words`` (clean records that fire the backdoor, left out of the budget),
    ``per_pv_far`` / ``per_pv_unreachable`` (of the per-PV choice), ``far`` (triggered records
    the chosen T_match misses), ``unreachable`` (even 1.0 rejects more than ``max_frr``)."""
    ch, pp = choice, per_pv
    out: dict[str, str] = {}
    need = records_for_frr(ch.max_frr)
    if ch.clean_records < need:
        out["records"] = (
            f"{ch.clean_records:,} clean records cannot show an FRR of {100 * ch.max_frr:g}%: with "
            f"none of them flagged the 95% upper bound is {300 / ch.clean_records:.2g}% (rule of "
            f"three); give at least {need:,} held-out clean records (on the prompt-tuning "
            "benchmark, thresholds chosen on 400 at 0.5% flagged 0-0.9% of about 1,460 further "
            "clean inputs)"
        )
    if ch.trigger_words:
        out["trigger_words"] = (
            f"{len(ch.trigger_words)} clean record(s) fire the backdoor through one word: the "
            f"deployed monitor flags them, so the FRR with them is "
            f"{_pct(ch.frr_with_trigger_words)}%"
            + (f" ({_pct(pp.frr_with_trigger_words)}% per PV)" if pp is not None else "")
            + "; --keep-trigger-words counts them in the budget"
        )
    if pp is not None and pp.far:
        out["per_pv_far"] = (
            f"{_pct(pp.far)}% of the triggered records are not flagged with the per-PV thresholds"
        )
    if pp is not None and not pp.reachable:
        out["per_pv_unreachable"] = (
            "some PV flags more than its share of the clean records even at 1.0; check the clean "
            "corpus for triggers"
        )
    if ch.far:
        out["far"] = (
            f"{_pct(ch.far)}% of the triggered records are not flagged at {ch.threshold:g}"
        )
    if not ch.reachable:
        out["unreachable"] = (
            f"even T_match 1.0 flags {_pct(ch.frr)}% of the clean records (> {_pct(ch.max_frr)}%): "
            "they match a PV on every dimension; check the clean corpus for triggers"
        )
    return out
