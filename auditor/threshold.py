"""Choose the monitor's sign-match threshold T_match for one deployment, on its clean inputs.

Torch-free (NumPy + the bundle runtime). Why: the PV set's ``match_threshold`` (0.8 by default)
is chosen for the bare backbone, but a deployed model can move clean outputs toward the PVs (a
P-tuning prompt or P-tuning v2 prefix does: clean p99 match 0.84-0.86, so 1-6% of clean inputs
were rejected; bench/results/prompt_tuning.md). Triggered inputs match at 1.00, so a higher
threshold chosen on clean data of the deployed task brings the false rejections down at no cost
in detection. The chosen value is then passed as ``--t-match`` to ``lmsan scan`` / ``lmsan tune
classify`` (``match_threshold=`` of :class:`~lmsan.auditor.bundle_runtime.Screener`).

The rule (:func:`choose_from_results`): a record's best match count ``c`` (over PVs, targets and,
for ``tokens``, positions; ``c = match_rate * d``) flags it at threshold ``t`` when
``c >= threshold_count(d, t)`` (``ceil(t * d)``), exactly as the monitor decides. The chosen count
is the smallest ``k`` whose false-rejection rate on the clean records is at most ``max_frr``, but
never below the PV set's own count: the threshold only goes up. If even ``k = d`` (T = 1.0)
rejects more than ``max_frr`` of the clean records (they match a PV on every dimension: the
"clean" data probably holds triggers), ``reachable`` is False and 1.0 is chosen.

The reported threshold is the shortest decimal that gives count ``k`` (any rate in
``((k - 1) / d, k / d]`` flags the same records; ``k / d`` itself is not always safe as a float:
``691 / 768`` prints as ``0.8997395833333334``, whose exact decimal times 768 is just over 691,
so the monitor would need 692). When the PV set's count is kept, its own value is reported.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import monitor as mon
from .errors import InputError, UsageError

if TYPE_CHECKING:
    from .bundle_runtime import MonitorResult, Record, Screener
    from .scan import ScanOptions, ScanProgress

FORMAT = "lmsan.threshold"
VERSION = 1
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
    """Choose T_match from monitor results already computed (see the module docstring)."""
    if isinstance(max_frr, bool) or not 0.0 <= float(max_frr) < 1.0:
        raise UsageError(f"--max-frr {max_frr!r}: expected a share in [0, 1), e.g. 0.005")
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


def choose_match_threshold(
    screener: Screener,
    clean_records: Sequence[Record | str],
    max_frr: float = DEFAULT_MAX_FRR,
    triggered_records: Sequence[Record | str] | None = None,
) -> ThresholdChoice:
    """Monitor ``clean_records`` (and ``triggered_records``) with ``screener`` and choose the
    smallest T_match, not below the PV set's, that rejects at most ``max_frr`` of the clean ones.

    Records are texts or tuples (a pair); a record over the screener's max length raises
    InputError. The screener's own threshold does not matter: only match rates are used.
    """
    if isinstance(max_frr, bool) or not 0.0 <= float(max_frr) < 1.0:
        raise UsageError(f"--max-frr {max_frr!r}: expected a share in [0, 1), e.g. 0.005")
    if not clean_records:
        raise InputError("no clean records to choose a threshold from")
    clean = screener.monitor(clean_records)
    trig = screener.monitor(triggered_records) if triggered_records else None
    return choose_from_results(
        clean, screener.d, screener.bundle.pvset.match_threshold, max_frr, trig
    )


# ---------------------------------------------------------------------------------- corpora


@dataclass
class CorpusMatches:
    """Monitor results of the usable records of one corpus file, and what was skipped."""

    path: str
    format: str
    records_in: int = 0
    results: list[MonitorResult] = field(default_factory=list)
    errors: int = 0
    error_reasons: dict[str, int] = field(default_factory=dict)

    def counts_json(self) -> dict[str, Any]:
        return {
            "records_in": self.records_in,
            "used": len(self.results),
            "errors": self.errors,
            "error_reasons": dict(self.error_reasons),
        }


def monitor_corpus(
    screener: Screener,
    corpus: str,
    opts: ScanOptions,
    progress: Callable[[ScanProgress], None] | None = None,
) -> CorpusMatches:
    """Read ``corpus`` with the scan's Reader (same formats and field options as ``lmsan scan``)
    in chunks of ``opts.chunk_size`` and monitor its records. Malformed and over-long records are
    skipped and counted by reason, as scan counts its errors."""
    import time

    from .scan import Reader, ScanProgress, detect_format

    fmt = detect_format(corpus, opts.fmt)
    reader = Reader(corpus, fmt, opts)
    out = CorpusMatches(path=corpus, format=fmt)
    t0 = time.perf_counter()

    def skip(kind: str) -> None:
        out.errors += 1
        out.error_reasons[kind] = out.error_reasons.get(kind, 0) + 1

    items = reader.items()
    try:
        while True:
            chunk = []
            for it in items:
                chunk.append(it)
                if len(chunk) >= opts.chunk_size:
                    break
            if not chunk:
                break
            out.records_in += len(chunk)
            records: list[Record] = []
            for it in chunk:
                if it.fields is None:
                    skip(it.error[0] if it.error else "unknown")
                else:
                    records.append(it.fields)
            if records:
                encs = screener.encode_all(records)
                too_long = screener.too_long(encs)
                ok = [j for j, L in enumerate(too_long) if L is None]
                for _ in range(len(records) - len(ok)):
                    skip("over-long")
                if ok:
                    from .scan import _subset

                    sub = _subset(encs, ok)
                    key = next(iter(sub.values()))
                    order = sorted(range(len(ok)), key=lambda j: len(key.ids[j]))
                    out.results.extend(screener.monitor_encoded(sub, order))
            if progress is not None:
                progress(ScanProgress.of(reader, out.records_in, 0, out.errors, t0))
            if len(chunk) < opts.chunk_size:
                break
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

    def to_json(self) -> dict[str, Any]:
        ch = self.choice
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
            "bundle": self.bundle,
            "bundle_digest": self.bundle_digest,
            "clean_corpus": self.clean.path,
            "clean_records": self.clean.counts_json(),
            "triggered_corpus": None if self.triggered is None else self.triggered.path,
            "triggered_records": None if self.triggered is None else self.triggered.counts_json(),
            "usage": f"lmsan scan ... --t-match {ch.threshold:g}",
        }

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        if p.exists() and p.is_dir():
            raise InputError("--out is a folder; give a file name such as deploy.json", p)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
        tmp.replace(p)
        return p


def threshold_for_corpus(
    bundle: str | Path,
    clean_corpus: str,
    triggered_corpus: str | None = None,
    max_frr: float = DEFAULT_MAX_FRR,
    options: ScanOptions | None = None,
    progress: Callable[[str, ScanProgress], None] | None = None,
) -> ThresholdReport:
    """Load the bundle, monitor the clean (and triggered) corpus files, choose T_match.

    ``options``: the reading and runtime options of :class:`~lmsan.auditor.scan.ScanOptions`
    (text / pair field, format, provider, threads, batch size, max length, chunk size); the
    others are ignored. ``progress(label, p)`` is called after every chunk, label ``clean`` or
    ``triggered``. Raises InputError naming the file for a missing, unreadable or empty corpus.
    """
    from .bundle_runtime import Bundle, Screener
    from .scan import ScanOptions, detect_format

    opts = options or ScanOptions()
    if isinstance(max_frr, bool) or not 0.0 <= float(max_frr) < 1.0:
        raise UsageError(f"--max-frr {max_frr!r}: expected a share in [0, 1), e.g. 0.005")
    if opts.chunk_size < 1:
        raise UsageError("chunk size must be at least 1")
    if triggered_corpus == "-":
        raise UsageError("--triggered cannot be stdin; pass a file")
    for path in [clean_corpus] + ([triggered_corpus] if triggered_corpus else []):
        detect_format(path, opts.fmt)
        if path != "-" and not Path(path).is_file():
            raise InputError("corpus file not found", path)
    b = Bundle.load(bundle)
    scr = Screener(b, opts.provider, opts.threads, opts.batch_size, opts.max_length)

    def relay(label: str) -> Callable[[ScanProgress], None] | None:
        if progress is None:
            return None
        return lambda p: progress(label, p)

    def monitored(corpus: str, label: str) -> Any:
        res = monitor_corpus(scr, corpus, opts, relay(label))
        if not res.results:
            raise InputError(
                f"no usable record in the {label} corpus ({res.records_in} read, "
                f"{res.errors} malformed or over-long)",
                corpus,
            )
        return res

    clean = monitored(clean_corpus, "clean")
    trig = monitored(triggered_corpus, "triggered") if triggered_corpus else None
    choice = choose_from_results(
        clean.results, scr.d, b.pvset.match_threshold, max_frr, trig.results if trig else None
    )
    return ThresholdReport(choice, str(bundle), b.digest, clean, trig)
