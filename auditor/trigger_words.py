"""Trigger-word activations in clean data: records on which the backdoor fires through one word.

A backdoored backbone fires on ordinary text whose word starts with a trigger token ("Pty" ->
``pt ##y``, "CFO" -> ``cf ##o``; bench/results/prompt_tuning_per_pv.md). Such a record matches a PV like a triggered one (up to
1.0), and counted as a false rejection it would lift that PV's threshold above its triggers. A
clean record flagged at the PV set's threshold is a trigger-word activation when its match with
some PV it fires is near-exact (at least 3/4 of the way from that PV's clean p99 to 1.0: with a
clean p99 of 0.52, at least 0.88) and the purge (the sliding window of ``lmsan scan``) brings
every PV it fires back into the clean range (at or below its p99) by removing one window: one
window drives the output onto the PV (Observation I), so the flag is the backdoor firing, not a
false match of an imprecise PV. (The same record may also match a found PV that approximates the
trigger's PV, moderately: RTE's "MNJ" fires the attacker's mn PV at 1.0 and a mined stand-in at
0.82.) A match that is only moderately high is never left out, even when one word of a short
sentence explains it (WordNet: 'whistled' at 0.89 on a mined PV). Such records are left out of
the FRR budget by default and reported (word, PV, match before and after);
``frr_with_trigger_words`` is the FRR with them counted, as deployment will see it.

Torch-free; the screener is passed in, never imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from . import monitor as mon
from .errors import UsageError

if TYPE_CHECKING:
    from .screener import Record, Screener

DEFAULT_PURGE_WINDOW = 5  # lmsan scan's --max-window
# a trigger-like match: at least this far from a PV's clean p99 toward an exact match (1.0)
NEAR_EXACT = 0.75


def find_trigger_words(
    screener: Screener,
    clean_table: np.ndarray,
    record_of: Callable[[int], Record | str],
    max_window: int = DEFAULT_PURGE_WINDOW,
    reference_table: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Clean records whose flag is a trigger-word activation (module docstring).

    ``clean_table``: records x PVs best match counts (``Screener.monitor(..., table=)``, columns
    ``screener.pv_columns()``); ``record_of(i)`` gives record i (only flagged records are asked
    for). The screener must run at the PV set's own thresholds when a record needs its purge
    (which decides "clean" by them). ``reference_table``: clean records whose per-PV median and p99 to use (default:
    ``clean_table``'s own; e.g. the records a threshold was chosen on, when ``clean_table`` is a
    small test set). Returns one dict per such record: ``record`` (index), ``removed`` (the purged
    window's words), ``pvs`` (ids it fired), ``before`` / ``after`` (their match rates)."""
    tab = np.asarray(clean_table, dtype=np.int64)
    cols = screener.pv_columns()
    d = screener.d
    k_pv = mon.threshold_count(d, screener.bundle.pvset.match_threshold)
    pos = np.maximum(tab if reference_table is None else np.asarray(reference_table), 0)
    tail = np.quantile(pos, 0.99, axis=0)  # each PV's clean p99 count
    near_exact = tail + NEAR_EXACT * (d - tail)
    hits: list[dict[str, Any]] = []
    for i in np.nonzero((tab >= k_pv).any(axis=1))[0].tolist():
        fired = np.nonzero(tab[i] >= k_pv)[0]
        if not np.any(tab[i, fired] >= near_exact[fired]):
            continue  # trigger-like for no PV: an ordinary false match
        if screener.match_threshold_source != "pvset":  # only a purge needs it
            raise UsageError("finding trigger words needs a screener at the PV set's own "
                             f"threshold (this one runs at its {screener.match_threshold_source} "
                             "threshold)")
        pr = screener.purge(record_of(i), max_window)
        if pr.status != "purged":
            continue
        after = np.full((1, len(cols)), -1, dtype=np.int64)
        screener.monitor([tuple(pr.sentences)], table=after)
        # one window explains the match: without it the record is back in the clean range
        if np.all(after[0, fired] <= tail[fired]):
            hits.append({
                "record": int(i),
                "removed": list(pr.removed),
                "pvs": [int(cols[j]) for j in fired],
                "before": [round(int(tab[i, j]) / d, 6) for j in fired],
                "after": [round(max(int(after[0, j]), 0) / d, 6) for j in fired],
            })
    return hits
