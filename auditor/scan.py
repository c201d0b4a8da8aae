"""`lmsan scan`: screen a corpus with an exported bundle, streaming, resumable, torch-free.

Inputs: ``.txt`` (a line is a record), ``.jsonl`` (``text_field``, optional ``pair_field``),
``.csv`` / ``.tsv`` (header row; the same field options name columns), ``.parquet`` (pyarrow,
imported only for parquet), ``-`` for stdin (``fmt`` says its format; txt by default).

The corpus is read in chunks of ``chunk_size`` records (memory is bounded by the chunk, not by the
corpus); within a chunk, records are sorted by token count and batched, and results are written
in input order. Every input record ends up in exactly one of: clean, flagged, errors
(``records_in = clean + flagged + errors``). Malformed records (invalid UTF-8, invalid JSON, not
an object, missing field, not a string, empty, over-long) are errors with a reason; the scan goes
on.

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
  with ``match_threshold_source``: ``pvset`` or ``option`` for ``--t-match``);
- ``checkpoint.json``: after every chunk (outputs flushed and fsynced first) the number of
  records fully written, each output file's size and the running counts. ``resume`` truncates
  every output to the checkpoint's sizes and skips that many input records, so a scan killed at
  any point continues without losing or duplicating a record. The checkpoint also records what
  the outputs depend on (bundle digest, corpus path, size and mtime, options, the T_match in
  force); a resume with anything else different is refused.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from .bundle_runtime import (
    Bundle,
    Encoded,
    MonitorResult,
    PurgeResult,
    Screener,
    check_match_threshold,
)
from .errors import EXIT_CLEAN, EXIT_FOUND, EXIT_NOTHING, InputError, UsageError

FORMATS = ("txt", "jsonl", "csv", "tsv", "parquet")
SUFFIXES = {
    ".txt": "txt",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}
MAX_RECORD_BYTES = 1 << 20  # a record over 1 MiB is an over-long error before tokenization
CHECKPOINT = "checkpoint.json"
CHECKPOINT_VERSION = 1
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
KILL_HOOK = (
    "LMSAN_TEST_KILL_AFTER_CHUNKS"  # tests: SIGKILL after writing chunk N, before its checkpoint
)
UNPURGEABLE_POLICY = (
    "unpurgeable and malformed records are dropped from the purged corpus and listed in "
    "flagged.jsonl / errors.jsonl"
)


@dataclass
class ScanOptions:
    text_field: str = "text"
    pair_field: str | None = None
    purge: bool = False
    max_window: int = 5
    batch_size: int = 32
    threads: int = 0
    max_length: int | None = None
    resume: bool = False
    provider: str = "auto"
    fmt: str | None = None  # input format; default from the suffix (txt for stdin)
    chunk_size: int = 2048
    # T_match for this deployment (--t-match); None: the PV set's match_threshold
    match_threshold: float | None = None
    # PV id -> T_match for this deployment (--t-match-file of `lmsan threshold --per-pv`)
    per_pv_thresholds: dict[int, float] | None = None
    # the bundle digest the thresholds file was written for: a scan of another bundle is refused
    thresholds_digest: str | None = None


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
    def of(cls, reader: Any, records: int, flagged: int, errors: int, t0: float) -> ScanProgress:
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
    match_threshold_source: str = ""  # "pvset" or "option" (--t-match)
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


# ---------------------------------------------------------------------------------- reading


@dataclass
class Item:
    """One input record: its fields, or the reason it is malformed."""

    record: int  # 1-based position in the input
    fields: tuple[str, ...] | None
    error: tuple[str, str] | None = None  # (kind, reason)
    raw: Any = None  # what the purged-corpus writer needs to write the record back


def _check_text(v: Any, name: str) -> tuple[str | None, tuple[str, str] | None]:
    if v is None:
        return None, ("missing-field", f"missing field {name!r}")
    if not isinstance(v, str):
        return None, ("not-a-string", f"field {name!r} is {type(v).__name__}, not a string")
    if any("\udc80" <= ch <= "\udcff" for ch in v):
        return None, ("invalid-utf8", f"field {name!r} is not valid UTF-8")
    if not v.strip():
        return None, ("empty", f"field {name!r} is empty")
    if len(v) > MAX_RECORD_BYTES:
        return None, (
            "over-long",
            f"field {name!r} has {len(v)} characters (limit {MAX_RECORD_BYTES})",
        )
    return v, None


def _fields_of(
    get: Callable[[str], Any], opts: ScanOptions
) -> tuple[tuple[str, ...] | None, tuple[str, str] | None]:
    names = [opts.text_field] + ([opts.pair_field] if opts.pair_field else [])
    out = []
    for n in names:
        v, err = _check_text(get(n), n)
        if err:
            return None, err
        assert v is not None
        out.append(v)
    return tuple(out), None


class Reader:
    """Streams Items from a corpus; ``bytes_read`` tracks progress for files."""

    def __init__(self, path: str, fmt: str, opts: ScanOptions) -> None:
        self.path = path
        self.fmt = fmt
        self.opts = opts
        self.bytes_read = 0
        self.bytes_total: int | None = None
        self.records_total: int | None = None
        self.header: list[str] | None = None
        self.schema: Any = None
        self._fh: IO[bytes] | None = None
        if path != "-":
            p = Path(path)
            if not p.is_file():
                raise InputError("corpus file not found", p)
            self.bytes_total = p.stat().st_size
        if fmt == "parquet":
            self._open_parquet()
        elif fmt in ("csv", "tsv"):
            self._open_csv()

    def _binary(self) -> IO[bytes]:
        if self._fh is None:
            self._fh = sys.stdin.buffer if self.path == "-" else open(self.path, "rb")  # noqa: SIM115
        return self._fh

    def close(self) -> None:
        if self._fh is not None and self.path != "-":
            self._fh.close()

    # txt / jsonl: binary lines, decoded one by one (an invalid line is one error)
    def _lines(self) -> Iterator[tuple[int, bytes]]:
        fh = self._binary()
        n = 0
        for line in fh:
            n += 1
            self.bytes_read += len(line)
            yield n, line.rstrip(b"\n").rstrip(b"\r")

    def _decode(self, n: int, raw: bytes) -> tuple[str | None, Item | None]:
        if len(raw) > MAX_RECORD_BYTES:
            return None, Item(
                n, None, ("over-long", f"{len(raw)} bytes (limit {MAX_RECORD_BYTES})")
            )
        try:
            return raw.decode("utf-8"), None
        except UnicodeDecodeError as exc:
            return None, Item(n, None, ("invalid-utf8", f"invalid UTF-8 at byte {exc.start}"))

    def _items_txt(self) -> Iterator[Item]:
        for n, raw in self._lines():
            text, bad = self._decode(n, raw)
            if bad:
                yield bad
                continue
            assert text is not None
            v, err = _check_text(text, "line")
            if err:
                yield Item(n, None, ("empty", "empty line") if err[0] == "empty" else err)
            else:
                yield Item(n, (text,), raw=text)

    def _items_jsonl(self) -> Iterator[Item]:
        for n, raw in self._lines():
            text, bad = self._decode(n, raw)
            if bad:
                yield bad
                continue
            assert text is not None
            if not text.strip():
                yield Item(n, None, ("empty", "empty line"))
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                yield Item(
                    n, None, ("invalid-json", f"invalid JSON ({exc.msg} at column {exc.colno})")
                )
                continue
            if not isinstance(obj, dict):
                yield Item(n, None, ("not-an-object", "the line is not a JSON object"))
                continue
            fields, err = _fields_of(obj.get, self.opts)
            yield Item(n, fields, err, raw=(text, obj))

    def _open_csv(self) -> None:
        text = io.TextIOWrapper(
            self._binary(), encoding="utf-8", errors="surrogateescape", newline=""
        )
        self._text = text
        self._csv = csv.reader(text, delimiter="\t" if self.fmt == "tsv" else ",")
        try:
            header = next(self._csv)
        except StopIteration:
            raise InputError("empty file: no header row", self.path) from None
        except csv.Error as exc:
            raise InputError(f"cannot read the header row ({exc})", self.path) from None
        self.header = header
        for name in [self.opts.text_field] + (
            [self.opts.pair_field] if self.opts.pair_field else []
        ):
            if name not in header:
                raise InputError(
                    f"no column {name!r} in the header (columns: {', '.join(header)}); "
                    "use --text-field / --pair-field",
                    self.path,
                )

    def _items_csv(self) -> Iterator[Item]:
        assert self.header is not None
        col = {name: i for i, name in enumerate(self.header)}
        n = 0
        while True:
            try:
                row = next(self._csv)
            except StopIteration:
                return
            except csv.Error as exc:
                n += 1
                yield Item(n, None, ("invalid-csv", f"malformed CSV row ({exc})"))
                continue
            n += 1
            self.bytes_read = self._fh.tell() if self._fh is not None and self.path != "-" else 0

            def get(name: str, row: list[str] = row) -> Any:
                i = col[name]
                return row[i] if i < len(row) else None

            fields, err = _fields_of(get, self.opts)
            yield Item(n, fields, err, raw=row)

    def _open_parquet(self) -> None:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise InputError(
                "reading .parquet needs pyarrow (pip install lmsan[parquet])", self.path
            ) from None
        if self.path == "-":
            raise UsageError("parquet cannot be read from stdin; pass a file")
        try:
            self._pq = pq.ParquetFile(self.path)
        except Exception as exc:  # noqa: BLE001 - any arrow error is bad input
            raise InputError(f"not a readable parquet file ({exc})", self.path) from None
        self.schema = self._pq.schema_arrow
        self.records_total = self._pq.metadata.num_rows
        for name in [self.opts.text_field] + (
            [self.opts.pair_field] if self.opts.pair_field else []
        ):
            if name not in self.schema.names:
                raise InputError(
                    f"no column {name!r} (columns: {', '.join(self.schema.names)}); "
                    "use --text-field / --pair-field",
                    self.path,
                )

    def _items_parquet(self) -> Iterator[Item]:
        n = 0
        for batch in self._pq.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                n += 1
                fields, err = _fields_of(row.get, self.opts)
                yield Item(n, fields, err, raw=row)

    def items(self) -> Iterator[Item]:
        return {
            "txt": self._items_txt,
            "jsonl": self._items_jsonl,
            "csv": self._items_csv,
            "tsv": self._items_csv,
            "parquet": self._items_parquet,
        }[self.fmt]()


# ---------------------------------------------------------------------------------- writing


class PurgedWriter:
    """Writes the purged corpus in the input's format."""

    def __init__(self, out: Path, fmt: str, reader: Reader, opts: ScanOptions) -> None:
        self.fmt = fmt
        self.opts = opts
        self.reader = reader
        self.name = "purged.parquet" if fmt == "parquet" else f"purged.{fmt}"
        self.path = out / self.name
        self._fh: IO[str] | None = None
        self._rows: list[dict[str, Any]] = []

    def open(self, size: int | None, chunks_done: int) -> None:
        if self.fmt == "parquet":
            self.path.mkdir(exist_ok=True)
            for part in self.path.glob("part-*.parquet"):
                if size is None or int(part.stem.split("-")[1]) >= chunks_done:
                    part.unlink()
            return
        if size is None:
            self._fh = open(self.path, "w", encoding="utf-8", newline="")  # noqa: SIM115
            if self.fmt in ("csv", "tsv"):
                assert self.reader.header is not None
                self._csv_writer().writerow(self.reader.header)
        else:
            _truncate(self.path, size)
            self._fh = open(self.path, "a", encoding="utf-8", newline="")  # noqa: SIM115

    def _csv_writer(self) -> Any:
        assert self._fh is not None
        return csv.writer(
            self._fh, delimiter="\t" if self.fmt == "tsv" else ",", lineterminator="\n"
        )

    def write(self, item: Item, purged: tuple[str, ...] | None) -> None:
        """Write a clean record (``purged`` None) unchanged, or a purged one."""
        names = [self.opts.text_field] + ([self.opts.pair_field] if self.opts.pair_field else [])
        if self.fmt == "txt":
            assert self._fh is not None
            self._fh.write((purged[0] if purged else item.raw) + "\n")
        elif self.fmt == "jsonl":
            assert self._fh is not None
            line, obj = item.raw
            if purged is None:
                self._fh.write(line + "\n")
            else:
                obj = dict(obj)
                for n, v in zip(names, purged, strict=True):
                    obj[n] = v
                self._fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
        elif self.fmt in ("csv", "tsv"):
            row = list(item.raw)
            if purged is not None:
                assert self.reader.header is not None
                for n, v in zip(names, purged, strict=True):
                    row[self.reader.header.index(n)] = v
            self._csv_writer().writerow(row)
        else:
            rec = dict(item.raw)
            if purged is not None:
                for n, v in zip(names, purged, strict=True):
                    rec[n] = v
            self._rows.append(rec)

    def end_chunk(self, chunk: int) -> None:
        if self.fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pylist(self._rows, schema=self.reader.schema)
            tmp = self.path / f".part-{chunk:06d}.tmp"
            pq.write_table(table, tmp)
            os.replace(tmp, self.path / f"part-{chunk:06d}.parquet")
            self._rows = []
        elif self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def size(self) -> int | None:
        return None if self.fmt == "parquet" else self.path.stat().st_size

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def _truncate(path: Path, size: int) -> None:
    if not path.exists():
        raise InputError(f"cannot resume: {path.name} is missing", path.parent)
    if path.stat().st_size < size:
        raise InputError(
            f"cannot resume: {path.name} is shorter than the checkpoint says", path.parent
        )
    with open(path, "r+b") as f:
        f.truncate(size)


class JsonlWriter:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[str] | None = None

    def open(self, size: int | None) -> None:
        if size is None:
            self._fh = open(self.path, "w", encoding="utf-8")  # noqa: SIM115
        else:
            _truncate(self.path, size)
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, obj: dict[str, Any]) -> None:
        assert self._fh is not None
        self._fh.write(json.dumps(obj, ensure_ascii=False) + "\n")

    def sync(self) -> None:
        assert self._fh is not None
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def size(self) -> int:
        return self.path.stat().st_size

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- scanning


def detect_format(corpus: str, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise UsageError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
        return fmt
    if corpus == "-":
        return "txt"
    suffix = Path(corpus).suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(
            f"unknown corpus type {suffix or '(no suffix)'!r}: expected "
            + ", ".join(sorted(SUFFIXES))
            + " (or pass --format)",
            corpus,
        )
    return SUFFIXES[suffix]


def _fingerprint(
    corpus: str, fmt: str, bundle_digest: str, opts: ScanOptions, match_threshold: float
) -> dict[str, Any]:
    fp: dict[str, Any] = {
        "bundle_digest": bundle_digest,
        "corpus": corpus if corpus == "-" else str(Path(corpus).resolve()),
        "format": fmt,
        "text_field": opts.text_field,
        "pair_field": opts.pair_field,
        "purge": opts.purge,
        "max_window": opts.max_window,
        "max_length": opts.max_length,
        "chunk_size": opts.chunk_size,
        # the rate in force, not the option: --t-match at the PV set's value is the same scan
        "match_threshold": match_threshold,
    }
    if opts.per_pv_thresholds is not None:
        fp["per_pv_thresholds"] = {str(k): v for k, v in sorted(opts.per_pv_thresholds.items())}
    if corpus != "-":
        st = Path(corpus).stat()
        fp["corpus_size"] = st.st_size
        fp["corpus_mtime_ns"] = st.st_mtime_ns
    return fp


def _subset(encs: dict[str, Encoded], idx: list[int]) -> dict[str, Encoded]:
    return {
        f: Encoded(
            [e.ids[i] for i in idx], [e.special[i] for i in idx], [e.target_pos[i] for i in idx]
        )
        for f, e in encs.items()
    }


def scan(
    bundle: str | Path,
    corpus: str,
    out: str | Path,
    options: ScanOptions | None = None,
    progress: Callable[[ScanProgress], None] | None = None,
) -> ScanSummary:
    """Scan ``corpus`` with the bundle; write the outputs into ``out``; return the summary."""
    opts = options or ScanOptions()
    if opts.max_window < 1:
        raise UsageError("--max-window must be at least 1")
    if opts.chunk_size < 1:
        raise UsageError("chunk size must be at least 1")
    if opts.resume and corpus == "-":
        raise UsageError("--resume needs a corpus file: stdin cannot be read again")
    check_match_threshold(opts.match_threshold)
    fmt = detect_format(corpus, opts.fmt)
    if corpus != "-" and not Path(corpus).is_file():
        raise InputError("corpus file not found", corpus)
    t_load = time.perf_counter()
    b = Bundle.load(bundle)
    screener = Screener(
        b, opts.provider, opts.threads, opts.batch_size, opts.max_length, opts.match_threshold,
        opts.per_pv_thresholds,
    )
    load_seconds = time.perf_counter() - t_load
    digest = b.digest
    if opts.thresholds_digest is not None and opts.thresholds_digest != digest:
        raise InputError(
            f"the thresholds file was chosen for another bundle ({opts.thresholds_digest}); this "
            f"bundle is {digest}: run `lmsan threshold` on it",
            bundle,
        )
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError("--out exists and is not a folder", out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(corpus, fmt, digest, opts, screener.match_threshold)
    ckpt_path = out_dir / CHECKPOINT
    ckpt: dict[str, Any] | None = None
    if opts.resume and ckpt_path.is_file():
        try:
            ckpt = json.loads(ckpt_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(
                f"cannot resume: checkpoint is not valid JSON ({exc})", ckpt_path
            ) from None
        if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
            raise InputError("cannot resume: unknown checkpoint version", ckpt_path)
        old = ckpt.get("fingerprint")
        old = old if isinstance(old, dict) else {}
        if "match_threshold" not in old:
            # a checkpoint from before --t-match: it ran at the PV set's threshold
            old = {**old, "match_threshold": b.pvset.match_threshold}
        if old != fingerprint:
            diff = sorted(
                k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k)
            )
            raise InputError(
                "cannot resume: the checkpoint was written for a different scan (differs in: "
                + ", ".join(diff)
                + "); run without --resume to start over",
                ckpt_path,
            )

    reader = Reader(corpus, fmt, opts)
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
        options={k: v for k, v in asdict(opts).items() if k != "resume"},
    )
    removed_words: Counter[str] = Counter()
    flagged_w = JsonlWriter(out_dir / "flagged.jsonl")
    errors_w = JsonlWriter(out_dir / "errors.jsonl")
    purged_w = PurgedWriter(out_dir, fmt, reader, opts) if opts.purge else None
    done = 0
    chunks_done = 0
    prior_seconds = 0.0
    if ckpt is not None:
        files = ckpt["files"]
        flagged_w.open(files["flagged.jsonl"])
        errors_w.open(files["errors.jsonl"])
        if purged_w is not None:
            purged_w.open(files.get(purged_w.name), int(ckpt["chunks_done"]))
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
        flagged_w.open(None)
        errors_w.open(None)
        if purged_w is not None:
            purged_w.open(None, 0)
        (out_dir / "summary.json").unlink(missing_ok=True)
    outputs = ["flagged.jsonl", "errors.jsonl"] + ([purged_w.name] if purged_w else [])
    summary.outputs = outputs + ["summary.json", CHECKPOINT]
    kill_after = int(os.environ.get(KILL_HOOK, "0") or 0)
    last_passes = screener.forward_passes

    def checkpoint() -> None:
        data = {
            "version": CHECKPOINT_VERSION,
            "fingerprint": fingerprint,
            "records_done": done,
            "chunks_done": chunks_done,
            "files": {
                "flagged.jsonl": flagged_w.size(),
                "errors.jsonl": errors_w.size(),
                **({purged_w.name: purged_w.size()} if purged_w else {}),
            },
            "counts": {k: getattr(summary, k) for k in CHECKPOINT_COUNTS},
            "error_reasons": summary.error_reasons,
            "error_examples": summary.error_examples,
            "removed_words": dict(removed_words),
            "seconds": prior_seconds + (time.perf_counter() - t0),
            "complete": False,
        }
        _write_json_atomic(ckpt_path, data)

    t0 = time.perf_counter()
    items = reader.items()
    skipped = 0
    to_skip = done
    try:
        while True:
            chunk: list[Item] = []
            for it in items:
                if skipped < to_skip:
                    skipped += 1
                    continue
                chunk.append(it)
                if len(chunk) >= opts.chunk_size:
                    break
            if not chunk:
                break
            _process_chunk(
                chunk, screener, opts, summary, removed_words, flagged_w, errors_w, purged_w
            )
            done += len(chunk)
            flagged_w.sync()
            errors_w.sync()
            if purged_w is not None:
                purged_w.end_chunk(chunks_done)
            chunks_done += 1
            summary.forward_passes += screener.forward_passes - last_passes
            last_passes = screener.forward_passes
            if kill_after and chunks_done == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)  # test hook: written, not checkpointed
            checkpoint()
            if progress is not None:
                progress(ScanProgress.of(reader, done, summary.flagged, summary.errors, t0))
            if len(chunk) < opts.chunk_size:
                break
    finally:
        reader.close()
        flagged_w.close()
        errors_w.close()
        if purged_w is not None:
            purged_w.close()
    if skipped < to_skip:
        raise InputError(
            f"cannot resume: the corpus has {skipped} records but the checkpoint says {to_skip} were "
            "scanned",
            corpus,
        )
    summary.seconds = prior_seconds + (time.perf_counter() - t0)
    scanned = summary.records_in
    summary.throughput_records_per_s = scanned / summary.seconds if summary.seconds > 0 else 0.0
    summary.top_removed_words = removed_words.most_common(20)
    summary.complete = True
    checkpoint_data = (
        json.loads(ckpt_path.read_text(encoding="utf-8")) if ckpt_path.exists() else None
    )
    if checkpoint_data is not None:
        checkpoint_data["complete"] = True
        _write_json_atomic(ckpt_path, checkpoint_data)
    _write_json_atomic(out_dir / "summary.json", summary.to_json())
    return summary


def _record_json(item: Item, opts: ScanOptions) -> dict[str, Any]:
    assert item.fields is not None
    d: dict[str, Any] = {"record": item.record, "text": item.fields[0]}
    if opts.pair_field:
        d["pair"] = item.fields[1]
    return d


def _process_chunk(
    chunk: list[Item],
    screener: Screener,
    opts: ScanOptions,
    summary: ScanSummary,
    removed_words: Counter[str],
    flagged_w: JsonlWriter,
    errors_w: JsonlWriter,
    purged_w: PurgedWriter | None,
) -> None:
    valid = [i for i, it in enumerate(chunk) if it.fields is not None]
    results: dict[int, MonitorResult] = {}
    purges: dict[int, PurgeResult] = {}
    if valid:
        records = [chunk[i].fields for i in valid]
        encs = screener.encode_all(records)  # type: ignore[arg-type]
        too_long = screener.too_long(encs)
        ok: list[int] = []
        for j, L in enumerate(too_long):
            if L is None:
                ok.append(j)
            else:
                chunk[valid[j]].error = (
                    "over-long",
                    f"{L} tokens exceed the max length {screener.max_length}",
                )
                chunk[valid[j]].fields = None
        if ok:
            sub = _subset(encs, ok)
            key = next(iter(sub.values()))
            order = sorted(range(len(ok)), key=lambda k: len(key.ids[k]))
            res = screener.monitor_encoded(sub, order)
            for k, r in zip(ok, res, strict=True):
                results[valid[k]] = r
        if opts.purge:
            before = screener.forward_passes
            for i, r in results.items():
                if r.flagged:
                    fields = chunk[i].fields
                    assert fields is not None
                    purges[i] = screener.purge(fields, opts.max_window)
            summary.purge_forward_passes += screener.forward_passes - before
    for i, it in enumerate(chunk):
        summary.records_in += 1
        if it.error is not None or it.fields is None:
            kind, reason = it.error or ("unknown", "unknown error")
            summary.errors += 1
            summary.error_reasons[kind] = summary.error_reasons.get(kind, 0) + 1
            if len(summary.error_examples) < 20:
                summary.error_examples.append({"record": it.record, "kind": kind, "reason": reason})
            errors_w.write({"record": it.record, "kind": kind, "reason": reason})
            continue
        r = results[i]
        if not r.flagged:
            summary.clean += 1
            if purged_w is not None:
                purged_w.write(it, None)
            continue
        summary.flagged += 1
        rec = _record_json(it, opts)
        rec.update({"pv": r.pv, "match_rate": round(r.match_rate, 6), "target": r.target})
        if r.token is not None:
            rec["token"] = r.token
        p = purges.get(i)
        if p is not None:
            rec["purge"] = p.status
            if p.status == "purged":
                summary.purged += 1
                removed_words.update(p.removed)
                assert p.span is not None
                rec["removed"] = list(p.removed)
                rec["span"] = {"sentence": p.span[0], "start": p.span[1], "end": p.span[2]}
                rec["window"] = p.window
                rec["purged_text"] = p.sentences[0]
                if opts.pair_field:
                    rec["purged_pair"] = p.sentences[1]
                if p.after is not None:
                    rec["match_rate_after"] = round(p.after.match_rate, 6)
                if purged_w is not None:
                    purged_w.write(it, tuple(p.sentences))
            else:
                summary.unpurgeable += 1
            rec["purge_forward_passes"] = p.forward_passes
        flagged_w.write(rec)
