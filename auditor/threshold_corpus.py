"""``lmsan threshold``: choose a deployment's T_match from clean (and triggered) corpus files.

Torch-free. The corpora are read as ``lmsan scan`` reads them (same formats and field options,
:mod:`lmsan.auditor.corpus_io`), monitored with the bundle's screener at the PV set's
thresholds, and the rule of :mod:`lmsan.auditor.threshold` chooses the threshold.
:class:`ThresholdReport` is what the command shows and writes (``--out``, the file that
``--t-match-file`` reads back as :class:`~lmsan.auditor.threshold.Thresholds`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .corpus_io import detect_format
from .errors import EXIT_CLEAN, EXIT_FOUND, InputError, UsageError
from .fsutil import atomic_write_json
from .scan import ScanOptions, ScanProgress
from .screener import MonitorResult, Record, Screener
from .threshold import (
    DEFAULT_MAX_FRR,
    FORMAT,
    VERSION,
    PerPVChoice,
    ThresholdChoice,
    Thresholds,
    check_max_frr,
    choice_warnings,
    per_pv_with_trigger_words,
    single_with_trigger_words,
)
from .trigger_words import find_trigger_words


@dataclass
class CorpusMatches:
    """Monitor results of the usable records of one corpus file, and what was skipped."""

    path: str
    format: str
    records_in: int = 0
    results: list[MonitorResult] = field(default_factory=list)
    tables: list[np.ndarray] = field(default_factory=list)  # per-PV match counts (per_pv=True)
    flagged: dict[int, Record] = field(default_factory=dict)  # index in results -> record, of
    # the records the screener flags (per_pv=True; for find_trigger_words)
    errors: int = 0
    error_reasons: dict[str, int] = field(default_factory=dict)

    def counts_json(self) -> dict[str, Any]:
        return {
            "records_in": self.records_in,
            "used": len(self.results),
            "errors": self.errors,
            "error_reasons": dict(self.error_reasons),
        }

    def skip(self, kind: str) -> None:
        self.errors += 1
        self.error_reasons[kind] = self.error_reasons.get(kind, 0) + 1


def monitor_corpus(
    screener: Screener,
    corpus: str,
    opts: ScanOptions,
    progress: Callable[[ScanProgress], None] | None = None,
    per_pv: bool = False,
) -> CorpusMatches:
    """Read ``corpus`` as ``lmsan scan`` does, in chunks of ``opts.chunk_size``, and monitor its
    records. Malformed and over-long records are skipped and counted by reason, as scan counts
    its errors. ``per_pv``: also keep each record's best match count per PV (``tables``)."""
    fmt = detect_format(corpus, opts.fmt)
    reader = opts.reader(corpus, fmt)
    out = CorpusMatches(path=corpus, format=fmt)
    t0 = time.perf_counter()
    try:
        for chunk in reader.chunks(opts.chunk_size):
            out.records_in += len(chunk)
            records: list[Record] = []
            for it in chunk:
                if it.fields is None:
                    out.skip(it.error[0] if it.error else "unknown")
                else:
                    records.append(it.fields)
            if records:
                cols = len(screener.pv_columns())
                tab = np.full((len(records), cols), -1, dtype=np.int64) if per_pv else None
                res, _ = screener.monitor_records(records, tab)
                ok = [j for j, r in enumerate(res) if r is not None]
                kept = [r for r in res if r is not None]
                for _ in range(len(records) - len(ok)):
                    out.skip("over-long")
                if tab is not None and ok:
                    out.tables.append(tab[ok])
                    for k, (j, r) in enumerate(zip(ok, kept, strict=True)):
                        if r.flagged:
                            out.flagged[len(out.results) + k] = records[j]
                out.results.extend(kept)
            if progress is not None:
                progress(ScanProgress.of(reader, out.records_in, 0, out.errors, t0))
    finally:
        reader.close()
    return out


@dataclass
class ThresholdReport:
    """What ``lmsan threshold`` computes and writes (``--out``)."""

    choice: ThresholdChoice
    bundle: str
    bundle_digest: str
    clean: CorpusMatches
    triggered: CorpusMatches | None = None
    per_pv: PerPVChoice | None = None  # --per-pv

    @property
    def exit_code(self) -> int:
        """1 when even T_match 1.0 rejects more than ``max_frr`` of the clean records."""
        return EXIT_CLEAN if self.choice.reachable else EXIT_FOUND

    def warnings(self) -> dict[str, str]:
        """See :func:`~lmsan.auditor.threshold.choice_warnings`."""
        return choice_warnings(self.choice, self.per_pv)

    def to_json(self) -> dict[str, Any]:
        ch = self.choice
        extra: dict[str, Any] = {}
        if self.per_pv is not None:
            pp = self.per_pv
            extra = {
                "per_pv_thresholds": {str(k): v for k, v in pp.thresholds.items()},
                "per_pv_rule": "max_frr split evenly over the PVs (union bound)",
                "per_pv_reachable": pp.reachable,
                "frr_per_pv": pp.frr,
                "far_per_pv": pp.far,
                "frr_per_pv_with_trigger_words": pp.frr_with_trigger_words,
                "per_pv": pp.per_pv,
            }
        return {
            "format": FORMAT,
            "version": VERSION,
            "match_threshold": ch.threshold,
            "match_count": ch.count,
            "hidden_size": ch.d,
            "reachable": ch.reachable,
            "max_frr": ch.max_frr,
            "frr": ch.frr,
            "far": ch.far,
            "pvset_match_threshold": ch.pvset_threshold,
            "frr_pvset": ch.frr_pvset,
            "far_pvset": ch.far_pvset,
            "clean_quantiles": ch.clean_quantiles,
            "triggered_quantiles": ch.triggered_quantiles,
            "sweep": [asdict(p) for p in ch.sweep],
            "trigger_words": ch.trigger_words,
            "frr_with_trigger_words": ch.frr_with_trigger_words,
            "bundle": self.bundle,
            "bundle_digest": self.bundle_digest,
            "clean_corpus": self.clean.path,
            "clean_records": self.clean.counts_json(),
            "triggered_corpus": None if self.triggered is None else self.triggered.path,
            "triggered_records": None if self.triggered is None else self.triggered.counts_json(),
            **extra,
            "usage": f"lmsan scan ... --t-match {ch.threshold:g}"
            + ("  (per-PV thresholds: --t-match-file THIS_FILE)" if extra else ""),
        }

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        if p.exists() and p.is_dir():
            raise InputError("--out is a folder; give a file name such as deploy.json", p)
        p.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_json(p, self.to_json())


def threshold_for_corpus(
    bundle: str | Path,
    clean_corpus: str,
    triggered_corpus: str | None = None,
    max_frr: float = DEFAULT_MAX_FRR,
    options: ScanOptions | None = None,
    progress: Callable[[str, ScanProgress], None] | None = None,
    per_pv: bool = False,
    keep_trigger_words: bool = False,
) -> ThresholdReport:
    """Load the bundle, monitor the clean (and triggered) corpus files, choose T_match.
    Trigger-word activations in the clean corpus are left out of the FRR budget and reported
    unless ``keep_trigger_words`` (see :mod:`lmsan.auditor.threshold`).

    ``options``: the reading and runtime options of :class:`~lmsan.auditor.scan.ScanOptions`
    (text / pair field, format, provider, threads, batch size, max length, chunk size); the
    others are ignored and the screener runs at the PV set's thresholds. ``progress(label, p)``
    is called after every chunk, label ``clean`` or ``triggered``. Raises InputError naming the
    file for a missing, unreadable or empty corpus.
    """
    opts = options or ScanOptions()
    check_max_frr(max_frr)
    opts.check()
    if triggered_corpus == "-":
        raise UsageError("--triggered cannot be stdin; pass a file")
    for path in [clean_corpus] + ([triggered_corpus] if triggered_corpus else []):
        detect_format(path, opts.fmt)
        if path != "-" and not Path(path).is_file():
            raise InputError("corpus file not found", path)
    scr = replace(opts, thresholds=Thresholds()).open_screener(bundle)

    def relay(label: str) -> Callable[[ScanProgress], None] | None:
        if progress is None:
            return None
        return lambda p: progress(label, p)

    def monitored(corpus: str, label: str) -> CorpusMatches:
        tables = per_pv or (label == "clean" and not keep_trigger_words)
        res = monitor_corpus(scr, corpus, opts, relay(label), per_pv=tables)
        if not res.results:
            raise InputError(
                f"no usable record in the {label} corpus ({res.records_in} read, "
                f"{res.errors} malformed or over-long)",
                corpus,
            )
        return res

    clean = monitored(clean_corpus, "clean")
    trig = monitored(triggered_corpus, "triggered") if triggered_corpus else None
    hits: list[dict[str, Any]] = []
    if not keep_trigger_words:
        hits = find_trigger_words(scr, np.concatenate(clean.tables), clean.flagged.__getitem__)
    choice = single_with_trigger_words(
        scr, clean.results, hits, max_frr, trig.results if trig else None
    )
    pp = None
    if per_pv:
        pp = per_pv_with_trigger_words(
            scr, np.concatenate(clean.tables), hits, max_frr,
            np.concatenate(trig.tables) if trig else None,
        )
    return ThresholdReport(choice, str(bundle), scr.bundle.digest, clean, trig, pp)
