"""The torch-free screening runtime: an ONNX Runtime session over a bundle, the PV monitor, and
the sliding-window purge.

Never imports torch or transformers: ``tokenizers`` + NumPy + ONNX Runtime only (a test runs a
scan with torch made unimportable). The parts: :func:`open_session` (the ORT session on the
requested provider), :class:`~lmsan.auditor.encoding.InputEncoder` (text -> backbone input,
target rows), :class:`PVMatcher` (target rows -> the monitor's decision, at the deployment's
:class:`~lmsan.auditor.threshold.Thresholds`), and :class:`Screener`, which runs them in batches
and purges flagged records.
"""

from __future__ import annotations

import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import monitor as mon
from .bundle import Bundle
from .encoding import Encoded, InputEncoder, Record, TargetRows, reads_form, subset
from .errors import InputError, UsageError
from .thresholds import Thresholds

PROVIDERS = ("auto", "cpu", "cuda")
# Purge candidates monitored per forward pass: candidates go in span order and the purge stops
# at the first chunk holding a clean one (a trigger early in the record costs one small pass).
PURGE_CHUNK = 8
# Padded tokens per forward pass in a monitoring batch (rows x longest row). Records are sorted
# by length, so short ones go many to a pass and long ones few: a fixed row count would pad a
# batch of long records to the longest of them and run attention over the padding.
BATCH_TOKENS = 1024

__all__ = [
    "PROVIDERS",
    "Encoded",
    "MonitorResult",
    "PVMatcher",
    "PurgeResult",
    "Record",
    "Screener",
    "open_bundle",
    "load_bundle",
    "open_session",
    "word_key",
]


@dataclass
class MonitorResult:
    """The monitor's decision on one record."""

    flagged: bool
    pv: int | None  # id of the best-matching PV (None when the record has no target row)
    match_rate: float  # best match count / d
    target: str
    token: int | None = None  # for target 'tokens': index of the best token (among ordinary tokens)


@dataclass
class PurgeResult:
    """The outcome of the sliding-window purge of one flagged record."""

    status: str  # "purged" or "unpurgeable"
    sentences: list[str]  # the purged record (the original when unpurgeable)
    removed: tuple[str, ...] = ()
    span: tuple[int, int, int] | None = None  # (sentence, start word, end word) of the window
    window: int | None = None
    forward_passes: int = 0
    candidates: int = 0
    after: MonitorResult | None = None


def _is_punct(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def word_key(word: str) -> str:
    """The purge's identity of a whitespace word: case-folded with leading and trailing
    punctuation stripped ("CFO." and "cfo" are one word); a word of punctuation only is itself."""
    a, b = 0, len(word)
    while a < b and _is_punct(word[a]):
        a += 1
    while b > a and _is_punct(word[b - 1]):
        b -= 1
    return word[a:b].casefold() or word


def load_bundle(path: str | Path) -> Bundle:
    """Load and verify the bundle folder ``path`` (InputError naming a file given instead)."""
    if Path(path).is_file():
        raise InputError(
            "is a file, not a bundle folder (give the folder `lmsan export` wrote)", path
        )
    return Bundle.load(path)


# ---------------------------------------------------------------------------------- session


def ort_providers(provider: str) -> list[str]:
    """The ORT providers to ask for: ``auto`` (CUDA when listed, else CPU), ``cpu``, ``cuda``."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        if "CUDAExecutionProvider" not in avail:
            raise UsageError(
                "--provider cuda: onnxruntime has no CUDAExecutionProvider "
                f"(available: {', '.join(avail)}); install onnxruntime-gpu"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if provider == "auto":
        if "CUDAExecutionProvider" in avail:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]
    raise UsageError(f"--provider {provider!r}: expected one of {', '.join(PROVIDERS)}")


def open_session(onnx_path: Path, provider: str = "auto", threads: int = 0) -> Any:
    """An ORT session of ``onnx_path``. ``auto`` uses CUDA only when onnxruntime lists it AND the
    created session really runs on it (``get_providers()[0]``), else CPU; ``cuda`` fails unless
    CUDA is active. ``threads``: intra-op threads (0 = ORT's default, all cores)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # Every batch has its own (batch, length) shape: ORT's arena and per-shape memory
    # patterns would keep growing over a long scan. Plain allocations keep memory flat.
    opts.enable_cpu_mem_arena = False
    opts.enable_mem_pattern = False
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    provs = ort_providers(provider)
    session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=provs)
    active = session.get_providers()
    if "CUDAExecutionProvider" in provs and (not active or active[0] != "CUDAExecutionProvider"):
        if provider == "cuda":
            raise UsageError(
                "--provider cuda: the ONNX Runtime session did not activate CUDA "
                f"(active: {', '.join(active)})"
            )
        # CUDA was listed but could not start (no driver/device): run on CPU (the session's
        # providers, reported in the scan summary, say so)
        session = ort.InferenceSession(
            str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
    return session


# ---------------------------------------------------------------------------------- monitor


class PVMatcher:
    """The bundle's PVs, packed per target, and their threshold counts for one deployment."""

    def __init__(self, bundle: Bundle, thresholds: Thresholds) -> None:
        man = bundle.manifest
        pvset = bundle.pvset
        self.targets = list(man.targets)
        self.d = man.hidden_size
        thresholds.check_pv_ids({p.id for p in pvset.pvs})
        self.thresholds = thresholds
        self.match_threshold = thresholds.rate(pvset.match_threshold)  # the single rate in force
        self.threshold = mon.threshold_count(self.d, self.match_threshold)
        self.pvs_by_target: dict[str, tuple[np.ndarray, list[int]]] = {}
        self.thresholds_by_target: dict[str, np.ndarray] = {}
        for t in self.targets:
            pvs = pvset.for_target(t)
            packed = mon.pack_signs(np.stack([p.values for p in pvs]).astype(np.float32))
            ids = [p.id for p in pvs]
            self.pvs_by_target[t] = (packed, ids)
            self.thresholds_by_target[t] = thresholds.counts(self.d, ids, pvset.match_threshold)

    def pv_columns(self) -> list[int]:
        """The PV ids of the columns of a match table (:meth:`table_rows`)."""
        return [i for t in self.targets for i in self.pvs_by_target[t][1]]

    def decide(self, per_target: dict[str, TargetRows], n: int) -> list[MonitorResult]:
        """Combine target rows into one result per record: flagged when any row reaches a PV's
        threshold; the reported PV is the one with the largest margin (count - its threshold)
        over targets and rows, which with one threshold for all PVs is the best match."""
        best_count = np.full(n, -1, dtype=np.int64)
        best_margin = np.full(n, np.iinfo(np.int64).min, dtype=np.int64)
        best_pv: list[int | None] = [None] * n
        best_target = [self.targets[0]] * n
        best_tok: list[int | None] = [None] * n
        flagged = np.zeros(n, dtype=bool)
        for target, (xs, rec, tok) in per_target.items():
            if xs.shape[0] == 0:
                continue
            packed, ids = self.pvs_by_target[target]
            thr = self.thresholds_by_target[target]
            idx, cnt, flg = mon.best_match(
                np.ascontiguousarray(xs, dtype=np.float32), packed, self.d, thr
            )
            cnt = cnt.astype(np.int64)
            margin = cnt - np.where(idx >= 0, thr[np.maximum(idx, 0)], 0)
            if xs.shape[0] == n and np.array_equal(rec, np.arange(n)):
                better = margin > best_margin  # one row per record: vectorised
                best_count[better] = cnt[better]
                best_margin[better] = margin[better]
                for b in np.nonzero(better)[0].tolist():
                    best_pv[b] = ids[int(idx[b])] if idx[b] >= 0 else None
                    best_target[b] = target
                    best_tok[b] = int(tok[b]) if target == "tokens" else None
                flagged |= flg.astype(bool)
                continue
            for row in range(xs.shape[0]):
                b = int(rec[row])
                if int(margin[row]) > best_margin[b]:
                    best_count[b] = int(cnt[row])
                    best_margin[b] = int(margin[row])
                    best_pv[b] = ids[int(idx[row])] if idx[row] >= 0 else None
                    best_target[b] = target
                    best_tok[b] = int(tok[row]) if target == "tokens" else None
                if flg[row]:
                    flagged[b] = True
        return [
            MonitorResult(
                flagged=bool(flagged[b]),
                pv=best_pv[b],
                match_rate=max(0, int(best_count[b])) / self.d,
                target=best_target[b],
                token=best_tok[b],
            )
            for b in range(n)
        ]

    def table_rows(self, per_target: dict[str, TargetRows], n: int) -> np.ndarray:
        """Each record's best match count with each PV (over the rows of that PV's target):
        int64 [n, len(pv_columns())], -1 where the record has no row of the target."""
        out = np.full((n, len(self.pv_columns())), -1, dtype=np.int64)
        col = 0
        for t in self.targets:
            packed, ids = self.pvs_by_target[t]
            xs, rec, _ = per_target.get(t, (np.zeros((0, self.d), np.float32), None, None))
            if xs.shape[0]:
                counts = mon.match_counts(
                    mon.pack_signs(np.ascontiguousarray(xs, dtype=np.float32)), packed, self.d
                ).astype(np.int64)
                # a view of out's columns: ufunc.at writes through it
                np.maximum.at(out[:, col : col + len(ids)], np.asarray(rec), counts)
            col += len(ids)
        return out


# ---------------------------------------------------------------------------------- screener


class Screener:
    """ORT session + monitor + purge over one bundle.

    ``provider`` / ``threads``: see :func:`open_session`. ``thresholds``: the deployment's
    match thresholds (default: the PV set's ``match_threshold`` for every PV; see
    :mod:`lmsan.auditor.threshold` for choosing them on clean data of the deployment); a
    thresholds file chosen for another bundle is refused.
    """

    def __init__(
        self,
        bundle: Bundle,
        provider: str = "auto",
        threads: int = 0,
        batch_size: int = 32,
        max_length: int | None = None,
        thresholds: Thresholds | None = None,
        batch_tokens: int | None = None,
    ) -> None:
        batch_tokens = BATCH_TOKENS if batch_tokens is None else batch_tokens
        if batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if batch_tokens < 1:
            raise UsageError("--batch-tokens must be at least 1")
        if threads < 0:
            raise UsageError("--threads must be 0 (all cores) or more")
        if thresholds is not None:
            thresholds.check_bundle(bundle.digest, bundle.path)
        self.bundle = bundle
        self.encoder = InputEncoder(bundle, max_length)
        self.batch_size = batch_size
        self.batch_tokens = batch_tokens
        self.session = open_session(bundle.onnx_path, provider, threads)
        self.provider = self.session.get_providers()[0]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.matcher = PVMatcher(bundle, thresholds or Thresholds())
        self.forward_passes = 0
        self.implementation = mon.implementation()

    # the deployment's thresholds, as the matcher applies them
    @property
    def thresholds(self) -> Thresholds:
        return self.matcher.thresholds

    @property
    def match_threshold(self) -> float:
        return self.matcher.match_threshold

    @property
    def match_threshold_source(self) -> str:
        return self.matcher.thresholds.source

    @property
    def per_pv_thresholds(self) -> dict[int, float] | None:
        return self.matcher.thresholds.per_pv

    @property
    def threshold(self) -> int:
        return self.matcher.threshold

    @property
    def d(self) -> int:
        return self.matcher.d

    @property
    def pvs_by_target(self) -> dict[str, tuple[np.ndarray, list[int]]]:
        return self.matcher.pvs_by_target

    @property
    def max_length(self) -> int:
        return self.encoder.max_length

    # the encoder's steps, for callers that run their own batches
    def forms(self) -> list[str]:
        return self.encoder.forms()

    def encode(
        self, records: Sequence[Record], form: str = "plain", template: str | None = None
    ) -> Encoded:
        return self.encoder.encode(records, form, template)

    def encode_all(self, records: Sequence[Record]) -> dict[str, Encoded]:
        return self.encoder.encode_all(records)

    def too_long(self, encs: dict[str, Encoded]) -> list[int | None]:
        return self.encoder.too_long(encs)

    def build_inputs(self, enc: Encoded, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        return self.encoder.build_inputs(enc, rows)

    def target_rows(
        self, enc: Encoded, rows: Sequence[int], outs: dict[str, np.ndarray], target: str
    ) -> TargetRows:
        return self.encoder.target_rows(enc, rows, outs, target)

    def decide(self, per_target: dict[str, TargetRows], n: int) -> list[MonitorResult]:
        return self.matcher.decide(per_target, n)

    def pv_columns(self) -> list[int]:
        return self.matcher.pv_columns()

    # ------------------------------------------------------------------ forward

    def run(self, x: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """One ORT forward pass."""
        outs = self.session.run(self.output_names, {"inputs_embeds": x, "attention_mask": mask})
        self.forward_passes += 1
        return dict(zip(self.output_names, outs, strict=True))

    def forward(self, enc: Encoded, rows: Sequence[int]) -> dict[str, np.ndarray]:
        """One ORT run over the encoded records ``rows`` (right-padded); returns the outputs."""
        return self.run(*self.build_inputs(enc, rows))

    def _target_rows_of(
        self, encs: dict[str, Encoded], rows: Sequence[int]
    ) -> dict[str, TargetRows]:
        """One forward pass per input form over ``rows``; the rows of every target."""
        per_target: dict[str, TargetRows] = {}
        for form, enc in encs.items():
            outs = self.forward(enc, rows)
            for t in self.bundle.manifest.targets:
                if reads_form(t, form):
                    per_target[t] = self.target_rows(enc, rows, outs, t)
        return per_target

    # ------------------------------------------------------------------ monitor

    def monitor_encoded(
        self,
        encs: dict[str, Encoded],
        order: Sequence[int] | None = None,
        table: np.ndarray | None = None,
    ) -> list[MonitorResult]:
        """Monitor pre-encoded records (one Encoded per input form), batching ``order``.

        ``table``: an int64 [n, len(pv_columns())] array to fill with each record's best match
        count per PV (for per-PV thresholds, :func:`lmsan.auditor.threshold.choose_per_pv`)."""
        n = len(next(iter(encs.values())))
        order = list(range(n)) if order is None else list(order)
        results: list[MonitorResult | None] = [None] * n
        for rows in self.batches(encs, order):
            per_target = self._target_rows_of(encs, rows)
            for r, res in zip(rows, self.decide(per_target, len(rows)), strict=True):
                results[r] = res
            if table is not None:
                table[np.asarray(rows)] = self.matcher.table_rows(per_target, len(rows))
        return [r for r in results if r is not None]

    def batches(self, encs: dict[str, Encoded], order: Sequence[int]) -> list[list[int]]:
        """``order`` cut into consecutive forward passes of at most ``batch_size`` records and
        at most ``batch_tokens`` padded tokens (records x the longest record of the pass, over
        every input form); a record longer than the budget goes alone."""
        longest = np.zeros(len(next(iter(encs.values()))), dtype=np.int64)
        for enc in encs.values():
            longest = np.maximum(longest, self.encoder.lengths(enc))
        out: list[list[int]] = []
        rows: list[int] = []
        width = 0
        for r in order:
            w = max(width, int(longest[r]))
            if rows and (len(rows) >= self.batch_size or w * (len(rows) + 1) > self.batch_tokens):
                out.append(rows)
                rows, w = [], int(longest[r])
            rows.append(r)
            width = w
        if rows:
            out.append(rows)
        return out

    def monitor_records(
        self, records: Sequence[Record], table: np.ndarray | None = None
    ) -> tuple[list[MonitorResult | None], list[int | None]]:
        """Monitor records, batched by length, skipping the ones over ``max_length``. Returns
        the result of each record (None when skipped) and the token count of each skipped one
        (None for the others). ``table``: as for :meth:`monitor_encoded`, one row per record
        (left at -1 for a skipped one)."""
        results: list[MonitorResult | None] = [None] * len(records)
        if not records:
            return results, []
        encs = self.encode_all(records)
        too_long = self.too_long(encs)
        ok = [i for i, L in enumerate(too_long) if L is None]
        if ok:
            sub = subset(encs, ok)
            key = next(iter(sub.values()))
            order = sorted(range(len(ok)), key=lambda k: len(key.ids[k]))
            sub_table = None if table is None else np.full((len(ok), table.shape[1]), -1, np.int64)
            for k, r in zip(ok, self.monitor_encoded(sub, order, sub_table), strict=True):
                results[k] = r
            if table is not None and sub_table is not None:
                table[np.asarray(ok)] = sub_table
        return results, too_long

    def monitor(
        self, records: Sequence[Record | str], table: np.ndarray | None = None
    ) -> list[MonitorResult]:
        """Monitor texts or pairs, batched by length; results in input order (``table``: see
        :meth:`monitor_encoded`).

        Raises InputError for a record longer than ``max_length`` tokens.
        """
        recs = [(r,) if isinstance(r, str) else tuple(r) for r in records]
        if not recs:
            return []
        encs = self.encode_all(recs)
        for i, L in enumerate(self.too_long(encs)):
            if L is not None:
                raise InputError(f"record {i}: {L} tokens exceed the max length {self.max_length}")
        key = next(iter(encs.values()))
        order = sorted(range(len(recs)), key=lambda i: len(key.ids[i]))
        return self.monitor_encoded(encs, order, table)

    # ------------------------------------------------------------------ purge

    def purge(
        self, record: Record | str, max_window: int = 5, chunk: int | None = PURGE_CHUNK
    ) -> PurgeResult:
        """Sliding-window trigger removal for one (flagged) record.

        For w = 1..max_window: the candidates of window w (all occurrences of the window's
        words removed from every sentence; ``monitor.purge_candidates`` on the words' keys,
        :func:`word_key`: "CFO." is an occurrence of "cfo") are monitored in span order,
        ``chunk`` candidates per forward pass and input form, and the purge stops at the first
        that comes back clean: that is the purged record. ``chunk=None`` monitors all of a
        window's candidates in one pass, ``chunk=1`` one candidate per pass (the baseline of
        the benchmark); the result is the same, only the work differs. A candidate that would
        leave a sentence with no word, or that is over the max length, is never the purge.
        Words are whitespace-split, so the purged text is the kept words joined by single
        spaces. No clean candidate up to ``max_window``: ``unpurgeable``.
        """
        if chunk is not None and chunk < 1:
            raise UsageError("purge chunk must be at least 1")
        rec = (record,) if isinstance(record, str) else tuple(record)
        words = [s.split() for s in rec]
        # occurrences are matched on a word's key (case-folded, outer punctuation stripped): a
        # trigger written twice as "cf" and "cf." would otherwise survive the removal of "cf"
        keys = [[word_key(x) for x in s] for s in words]
        passes0 = self.forward_passes
        ncand = 0
        for w in range(1, max_window + 1):
            cands = _purge_candidates(words, keys, w)
            step = len(cands) if chunk is None else chunk
            for a in range(0, len(cands), max(1, step)):
                part = cands[a : a + step]
                ncand += len(part)
                texts = [tuple(" ".join(s) for s in c.purged) for c in part]
                encs = self.encode_all(texts)
                fits = [i for i, tl in enumerate(self.too_long(encs)) if tl is None]
                if not fits:
                    continue
                res = self._monitor_candidates(subset(encs, fits))
                for i, r in zip(fits, res, strict=True):
                    if not r.flagged:
                        c = part[i]
                        return PurgeResult(
                            status="purged",
                            sentences=list(texts[i]),
                            removed=c.removed,
                            span=(c.sentence, c.start, c.end),
                            window=w,
                            forward_passes=self.forward_passes - passes0,
                            candidates=ncand,
                            after=r,
                        )
        return PurgeResult(
            status="unpurgeable",
            sentences=list(rec),
            forward_passes=self.forward_passes - passes0,
            candidates=ncand,
        )

    def _monitor_candidates(self, encs: dict[str, Encoded]) -> list[MonitorResult]:
        """All candidates in one forward pass per form (no --batch-size split: the design
        evaluates one window length at once; candidates are as many as the record's words)."""
        n = len(next(iter(encs.values())))
        return self.decide(self._target_rows_of(encs, list(range(n))), n)


def _purge_candidates(
    words: list[list[str]], keys: list[list[str]], w: int
) -> list[mon.PurgeCandidate]:
    """The window-``w`` candidates of a record on its word keys, with the words themselves
    (the span's original spellings, the kept words); none that empties a sentence."""
    cands = []
    for c in mon.purge_candidates(keys, w):
        gone = set(c.removed)
        kept = [
            [x for x, k in zip(ws, ks, strict=True) if k not in gone]
            for ws, ks in zip(words, keys, strict=True)
        ]
        if all(len(s) > 0 for s in kept):
            span = words[c.sentence][c.start : c.end]
            cands.append(
                mon.PurgeCandidate(c.sentence, c.start, c.end, tuple(dict.fromkeys(span)), kept)
            )
    return cands


def open_bundle(
    path: str | Path,
    provider: str = "auto",
    threads: int = 0,
    batch_size: int = 32,
    max_length: int | None = None,
    thresholds: Thresholds | None = None,
    batch_tokens: int | None = None,
) -> Screener:
    """Load and verify a bundle and open its ORT session at ``thresholds`` (default: the PV
    set's), refusing thresholds chosen for another bundle."""
    return Screener(
        load_bundle(path), provider, threads, batch_size, max_length, thresholds, batch_tokens
    )
