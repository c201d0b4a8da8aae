"""`lmsan scan`: screen a corpus with an exported bundle, streaming, resumable, torch-free.

The corpus (:mod:`lmsan.auditor.corpus_io`: txt, jsonl, csv, tsv, parquet, stdin) is read in
chunks of ``chunk_size`` records; within a chunk, records are sorted by token count and batched,
and results are written in input order. Every input record ends up in exactly one of: clean,
flagged, errors (``records_in = clean + flagged + errors``). Malformed records are errors with a
reason; the scan goes on.

Outputs in ``out``:
- ``flagged.jsonl``: one line per flagged record (record number, text, best PV, match rate,
  target, and with ``purge`` the purge outcome: removed words, span, purged text);
- ``errors.jsonl``: one line per malformed record (record number, kind, reason);
- with ``purge``: the purged corpus in the input's format (``purged.txt`` / ``.jsonl`` /
  ``.csv`` / ``.tsv``, or ``purged.parquet/`` holding one part file per chunk): clean records
  unchanged, flagged records purged. **Unpurgeable records (no clean candidate up to
  ``max_window``) and malformed records are dropped** from the purged corpus: it holds only text
  the monitor passed. They are listed in ``flagged.jsonl`` / ``errors.jsonl``;
- ``summary.json``: the counts, error reasons, throughput, provider, monitor implementation and
  the words removed most often, and the match threshold T_match in force (``match_threshold``,
  with ``match_threshold_source``: ``pvset``, ``option`` for ``--t-match`` or ``per-pv`` for a
  per-PV ``--t-match-file``);
- ``checkpoint.json``: after every chunk (outputs flushed and fsynced first) the number of
  records fully written, each output file's size and the running counts. ``resume`` truncates
  every output to the checkpoint's sizes and skips that many input records, so a scan killed at
  any point continues without losing or duplicating a record. The checkpoint also records what
  the outputs depend on (bundle digest, the corpus's path and SHA-256 of its bytes, options, the
  thresholds in force, the execution provider and the monitor implementation); a resume with
  anything else different is refused, and so is ``resume`` without a checkpoint when ``out``
  already holds outputs (they would be overwritten).

The work is split in two: :func:`~lmsan.auditor.scan_core.screen_chunk` turns a chunk's records into a
:class:`~lmsan.auditor.scan_core.ChunkResult` (monitor decisions, purges; pure data, no I/O) and the scan loop writes the
results in input order and checkpoints. The local engine runs :func:`screen_chunk` in this
process; ``engine="ray"`` (:mod:`lmsan.auditor.scan_ray`) runs it in a pool of Ray actors and
the same loop writes the same bytes. The summary fields in :data:`RUN_FIELDS` describe the run
(timings, engine), not its result: everything else in ``summary.json``, and every other output,
is the same whichever engine ran the scan.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .corpus_io import Item, JsonlWriter, PurgedWriter, Reader, detect_format, purged_name
from .errors import EXIT_CLEAN, EXIT_FOUND, EXIT_NOTHING, InputError, UsageError
from .fsutil import atomic_write_json
from .scan_core import (
    ChunkResult,
    LocalRunner,
    Runner,
    ScanOptions,
)
from .screener import MonitorResult, PurgeResult, Screener

CHECKPOINT = "checkpoint.json"
CHECKPOINT_VERSION = 2
# summary.json fields that describe the run (how long, on what engine), not its result
RUN_FIELDS = ("seconds", "throughput_records_per_s", "load_seconds", "run")
# The ScanSummary counters a checkpoint saves and a resumed scan starts from.
CHECKPOINT_COUNTS = (
    "records_in",
    "clean",
    "flagged",
    "purged",
    "unpurgeable",
    "errors",
    "forward_passes",
    "purge_forward_passes",
)
UNPURGEABLE_POLICY = (
    "unpurgeable and malformed records are dropped from the purged corpus and listed in "
    "flagged.jsonl / errors.jsonl"
)


@dataclass
class ScanProgress:
    records: int
    flagged: int
    errors: int
    seconds: float
    bytes_read: int | None
    bytes_total: int | None
    records_total: int | None

    @classmethod
    def of(cls, reader: Reader, records: int, flagged: int, errors: int, t0: float) -> ScanProgress:
        """Progress after `records` records of `reader` (bytes only when its size is known)."""
        return cls(records=records, flagged=flagged, errors=errors,
                   seconds=time.perf_counter() - t0,
                   bytes_read=reader.bytes_read if reader.bytes_total is not None else None,
                   bytes_total=reader.bytes_total, records_total=reader.records_total)


@dataclass
class ScanSummary:
    records_in: int = 0
    clean: int = 0
    flagged: int = 0
    purged: int = 0
    unpurgeable: int = 0
    errors: int = 0
    error_reasons: dict[str, int] = field(default_factory=dict)
    error_examples: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    throughput_records_per_s: float = 0.0
    load_seconds: float = 0.0
    provider: str = ""
    implementation: str = ""
    match_threshold: float = 0.0  # the T_match in force
    match_threshold_source: str = ""  # "pvset", "option" (--t-match) or "per-pv"
    forward_passes: int = 0
    purge_forward_passes: int = 0
    top_removed_words: list[tuple[str, int]] = field(default_factory=list)
    resumed_from: int = 0
    input: str = ""
    format: str = ""
    bundle: str = ""
    bundle_digest: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    unpurgeable_policy: str = UNPURGEABLE_POLICY
    complete: bool = False
    run: dict[str, Any] = field(default_factory=dict)  # engine (and Ray address, actors)

    @property
    def exit_code(self) -> int:
        if self.clean + self.flagged == 0:
            return EXIT_NOTHING
        return EXIT_FOUND if self.flagged else EXIT_CLEAN

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["top_removed_words"] = [[w, n] for w, n in self.top_removed_words]
        d["accounted"] = self.records_in == self.clean + self.flagged + self.errors
        return d

    def count_error(self, item: Item) -> dict[str, Any]:
        """Count a malformed record; its line of errors.jsonl."""
        kind, reason = item.error or ("unknown", "unknown error")
        self.errors += 1
        self.error_reasons[kind] = self.error_reasons.get(kind, 0) + 1
        line = {"record": item.record, "kind": kind, "reason": reason}
        if len(self.error_examples) < 20:
            self.error_examples.append(line)
        return line


# ---------------------------------------------------------------------------------- checkpoint


def corpus_digest(corpus: str) -> str:
    """``sha256:<hex>`` of the corpus file's bytes: what a resume must find again (size and
    mtime would miss an edit that keeps both, and change on a copy that keeps the content)."""
    h = hashlib.sha256()
    with open(corpus, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def fingerprint(
    corpus: str, fmt: str, digest: str, opts: ScanOptions, screener: Screener
) -> dict[str, Any]:
    """What a scan's outputs depend on: a resume must match it exactly."""
    fp: dict[str, Any] = {
        "bundle_digest": digest,
        "corpus": corpus if corpus == "-" else str(Path(corpus).resolve()),
        "format": fmt,
        "text_field": opts.text_field,
        "pair_field": opts.pair_field,
        "purge": opts.purge,
        "max_window": opts.max_window,
        "max_length": opts.max_length,
        "chunk_size": opts.chunk_size,
        # the rate in force, not the option: --t-match at the PV set's value is the same scan
        "match_threshold": screener.match_threshold,
        # a CUDA run and a CPU run, or the native and the NumPy monitor, may differ in a last
        # float bit near the threshold: a resume continues on the same ones
        "provider": screener.provider,
        "implementation": screener.implementation,
    }
    per_pv = screener.thresholds.per_pv_json()
    if per_pv is not None:
        fp["per_pv_thresholds"] = per_pv
    if corpus != "-":
        fp["corpus_sha256"] = corpus_digest(corpus)
    return fp


def read_checkpoint(path: Path, fp: dict[str, Any], pvset_threshold: float) -> dict[str, Any]:
    """The checkpoint at ``path``, refused (InputError) unless it was written for ``fp``."""
    try:
        ckpt = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot resume: checkpoint is not valid JSON ({exc})", path) from None
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
        raise InputError("cannot resume: unknown checkpoint version", path)
    old = ckpt.get("fingerprint")
    old = old if isinstance(old, dict) else {}
    # a fingerprint without a match threshold is a scan at the PV set's
    old = {"match_threshold": pvset_threshold, **old}
    if old != fp:
        diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
        raise InputError(
            "cannot resume: the checkpoint was written for a different scan (differs in: "
            + ", ".join(diff)
            + "); run without --resume to start over",
            path,
        )
    return ckpt


def save_checkpoint(path: Path, data: dict[str, Any]) -> None:
    """Replace the checkpoint atomically (the outputs it describes are already on disk)."""
    atomic_write_json(path, data)


class Outputs:
    """The scan's output files in ``out``: opened fresh or cut back to a checkpoint."""

    def __init__(self, out: Path, fmt: str, reader: Reader, purge: bool) -> None:
        self.flagged = JsonlWriter(out / "flagged.jsonl")
        self.errors = JsonlWriter(out / "errors.jsonl")
        self.purged = PurgedWriter(out, fmt, reader) if purge else None
        self.names = ["flagged.jsonl", "errors.jsonl"] + ([self.purged.name] if self.purged else [])

    def open(self, ckpt: dict[str, Any] | None) -> None:
        """Fresh files, or (resuming from ``ckpt``) each file cut back to its recorded size."""
        files: dict[str, Any] = {} if ckpt is None else ckpt["files"]
        chunks = 0 if ckpt is None else int(ckpt["chunks_done"])
        self.flagged.open(files.get("flagged.jsonl"))
        self.errors.open(files.get("errors.jsonl"))
        if self.purged is not None:
            self.purged.open(files.get(self.purged.name), chunks)

    def end_chunk(self, chunk: int) -> None:
        self.flagged.sync()
        self.errors.sync()
        if self.purged is not None:
            self.purged.end_chunk(chunk)

    def sizes(self) -> dict[str, int | None]:
        return {
            "flagged.jsonl": self.flagged.size(),
            "errors.jsonl": self.errors.size(),
            **({self.purged.name: self.purged.size()} if self.purged else {}),
        }

    def close(self) -> None:
        self.flagged.close()
        self.errors.close()
        if self.purged is not None:
            self.purged.close()


def make_runner(bundle: str | Path, screener: Screener, opts: ScanOptions) -> Runner:
    """The runner of ``opts.engine`` (Ray is imported only for ``ray``)."""
    if opts.engine == "ray":
        from .scan_ray import RayRunner

        return RayRunner(bundle, opts, screener)
    return LocalRunner(screener, opts)


# ---------------------------------------------------------------------------------- scanning


def _open_out(out_dir: Path, opts: ScanOptions, fmt: str) -> None:
    """Check ``out`` before anything is written; refuse a resume that has nothing to resume."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError("--out exists and is not a folder", out_dir)
    if opts.resume and not (out_dir / CHECKPOINT).is_file():
        names = ["flagged.jsonl", "errors.jsonl", purged_name(fmt), "summary.json"]
        present = [n for n in names if (out_dir / n).exists()]
        if present:
            raise InputError(
                "cannot resume: there is no checkpoint.json, and the folder holds outputs of "
                f"another scan ({', '.join(present)}); run without --resume to replace them",
                out_dir,
            )
    out_dir.mkdir(parents=True, exist_ok=True)


def scan(
    bundle: str | Path,
    corpus: str,
    out: str | Path,
    options: ScanOptions | None = None,
    progress: Callable[[ScanProgress], None] | None = None,
    runner: Runner | None = None,
) -> ScanSummary:
    """Scan ``corpus`` with the bundle; write the outputs into ``out``; return the summary.

    ``runner``: screens the chunks (default: :func:`make_runner` of ``options.engine``)."""
    opts = options or ScanOptions()
    opts.check()
    if opts.resume and corpus == "-":
        raise UsageError("--resume needs a corpus file: stdin cannot be read again")
    fmt = detect_format(corpus, opts.fmt)
    if corpus != "-" and not Path(corpus).is_file():
        raise InputError("corpus file not found", corpus)
    t_load = time.perf_counter()
    screener = opts.open_screener(bundle)
    load_seconds = time.perf_counter() - t_load
    digest = screener.bundle.digest
    out_dir = Path(out)
    _open_out(out_dir, opts, fmt)
    fp = fingerprint(corpus, fmt, digest, opts, screener)
    ckpt_path = out_dir / CHECKPOINT
    ckpt = None
    if opts.resume and ckpt_path.is_file():
        ckpt = read_checkpoint(ckpt_path, fp, screener.bundle.pvset.match_threshold)
    reader = opts.reader(corpus, fmt)
    if runner is None:
        try:
            runner = make_runner(bundle, screener, opts)
        except BaseException:
            reader.close()
            raise
    run_info: dict[str, Any] = {
        "engine": opts.engine, "threads": opts.threads, **getattr(runner, "info", {})
    }

    summary = ScanSummary(
        provider=screener.provider,
        implementation=screener.implementation,
        match_threshold=screener.match_threshold,
        match_threshold_source=screener.match_threshold_source,
        input=corpus,
        format=fmt,
        bundle=str(bundle),
        bundle_digest=digest,
        load_seconds=load_seconds,
        options=opts.to_json(),
        run=run_info,
    )
    removed_words: Counter[str] = Counter()
    outputs = Outputs(out_dir, fmt, reader, opts.purge)
    outputs.open(ckpt)
    done = chunks_done = 0
    prior_seconds = 0.0
    if ckpt is not None:
        done = int(ckpt["records_done"])
        chunks_done = int(ckpt["chunks_done"])
        for k in CHECKPOINT_COUNTS:
            setattr(summary, k, int(ckpt["counts"][k]))
        summary.error_reasons = dict(ckpt["error_reasons"])
        summary.error_examples = list(ckpt["error_examples"])
        removed_words.update(ckpt["removed_words"])
        prior_seconds = float(ckpt.get("seconds", 0.0))
        summary.resumed_from = done
    else:
        (out_dir / "summary.json").unlink(missing_ok=True)
    summary.outputs = outputs.names + ["summary.json", CHECKPOINT]
    t0 = time.perf_counter()
    to_skip = done
    try:
        for chunk, res in runner.run(reader.chunks(opts.chunk_size, skip=to_skip)):
            if (res.provider, res.implementation) != (screener.provider, screener.implementation):
                raise UsageError(
                    f"a worker ran on {res.provider} / {res.implementation}, not "
                    f"{screener.provider} / {screener.implementation} as this scan does"
                )
            _write_chunk(chunk, res, opts, summary, removed_words, outputs)
            done += len(chunk)
            outputs.end_chunk(chunks_done)
            chunks_done += 1
            summary.forward_passes += res.forward_passes
            summary.purge_forward_passes += res.purge_forward_passes
            save_checkpoint(ckpt_path, {
                "version": CHECKPOINT_VERSION,
                "fingerprint": fp,
                "records_done": done,
                "chunks_done": chunks_done,
                "files": outputs.sizes(),
                "counts": {k: getattr(summary, k) for k in CHECKPOINT_COUNTS},
                "error_reasons": summary.error_reasons,
                "error_examples": summary.error_examples,
                "removed_words": dict(removed_words),
                "seconds": prior_seconds + (time.perf_counter() - t0),
                "complete": False,
            })
            if progress is not None:
                progress(ScanProgress.of(reader, done, summary.flagged, summary.errors, t0))
    finally:
        runner.close()
        reader.close()
        outputs.close()
    if reader.skipped < to_skip:
        raise InputError(
            f"cannot resume: the corpus has {reader.skipped} records but the checkpoint says "
            f"{to_skip} were scanned",
            corpus,
        )
    summary.seconds = prior_seconds + (time.perf_counter() - t0)
    scanned = summary.records_in
    summary.throughput_records_per_s = scanned / summary.seconds if summary.seconds > 0 else 0.0
    summary.top_removed_words = removed_words.most_common(20)
    summary.complete = True
    if ckpt_path.exists():
        final = json.loads(ckpt_path.read_text(encoding="utf-8"))
        final["complete"] = True
        save_checkpoint(ckpt_path, final)
    atomic_write_json(out_dir / "summary.json", summary.to_json())
    return summary


def _flagged_json(
    item: Item, r: MonitorResult, p: PurgeResult | None, opts: ScanOptions
) -> dict[str, Any]:
    """The line of flagged.jsonl of a flagged record (and its purge)."""
    assert item.fields is not None
    rec: dict[str, Any] = {"record": item.record, "text": item.fields[0]}
    if opts.pair_field:
        rec["pair"] = item.fields[1]
    rec.update({"pv": r.pv, "match_rate": round(r.match_rate, 6), "target": r.target})
    if r.token is not None:
        rec["token"] = r.token
    if p is None:
        return rec
    rec["purge"] = p.status
    if p.status == "purged":
        assert p.span is not None
        rec["removed"] = list(p.removed)
        rec["span"] = {"sentence": p.span[0], "start": p.span[1], "end": p.span[2]}
        rec["window"] = p.window
        rec["purged_text"] = p.sentences[0]
        if opts.pair_field:
            rec["purged_pair"] = p.sentences[1]
        if p.after is not None:
            rec["match_rate_after"] = round(p.after.match_rate, 6)
    rec["purge_forward_passes"] = p.forward_passes
    return rec


def _write_chunk(
    chunk: list[Item],
    res: ChunkResult,
    opts: ScanOptions,
    summary: ScanSummary,
    removed_words: Counter[str],
    outputs: Outputs,
) -> None:
    """Write one screened chunk's records in input order and count them."""
    for i, err in res.errors.items():
        chunk[i].error = err
        chunk[i].fields = None
    for i, it in enumerate(chunk):
        summary.records_in += 1
        if it.error is not None or it.fields is None:
            outputs.errors.write(summary.count_error(it))
            continue
        r = res.results[i]
        if not r.flagged:
            summary.clean += 1
            if outputs.purged is not None:
                outputs.purged.write(it, None)
            continue
        summary.flagged += 1
        p = res.purges.get(i)
        if p is not None and p.status == "purged":
            summary.purged += 1
            removed_words.update(p.removed)
            if outputs.purged is not None:
                outputs.purged.write(it, tuple(p.sentences))
        elif p is not None:
            summary.unpurgeable += 1
        outputs.flagged.write(_flagged_json(it, r, p, opts))
