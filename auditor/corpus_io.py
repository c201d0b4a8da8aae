"""Reading corpora and writing scan outputs, record by record.

Inputs: ``.txt`` (a line is a record), ``.jsonl`` (``text_field``, optional ``pair_field``),
``.csv`` / ``.tsv`` (header row; the same field options name columns), ``.parquet`` (pyarrow,
imported only for parquet), ``-`` for stdin (``fmt`` says its format; txt by default).

A :class:`Reader` streams :class:`Item` s in chunks (memory is bounded by the chunk, not by the
corpus). Malformed records (invalid UTF-8, invalid JSON, not an object, missing field, not a
string, empty, over-long) are Items with an error kind and reason, never an exception.
:class:`JsonlWriter` and :class:`PurgedWriter` (the purged corpus in the input's format) append
and can be truncated back to a checkpoint's sizes.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .errors import InputError, UsageError
from .fsutil import atomic_write_bytes

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
    get: Callable[[str], Any], names: list[str]
) -> tuple[tuple[str, ...] | None, tuple[str, str] | None]:
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

    def __init__(
        self, path: str, fmt: str, text_field: str = "text", pair_field: str | None = None
    ) -> None:
        self.path = path
        self.fmt = fmt
        self.fields = [text_field] + ([pair_field] if pair_field else [])
        self.skipped = 0
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
            fields, err = _fields_of(obj.get, self.fields)
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
        for name in self.fields:
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

            fields, err = _fields_of(get, self.fields)
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
        for name in self.fields:
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
                fields, err = _fields_of(row.get, self.fields)
                yield Item(n, fields, err, raw=row)

    def chunks(self, size: int, skip: int = 0) -> Iterator[list[Item]]:
        """The records in lists of ``size`` (the last one shorter), after skipping the first
        ``skip`` (``skipped`` counts the ones skipped, fewer when the corpus is shorter)."""
        items = self.items()
        self.skipped = 0
        while True:
            chunk: list[Item] = []
            for it in items:
                if self.skipped < skip:
                    self.skipped += 1
                    continue
                chunk.append(it)
                if len(chunk) >= size:
                    break
            if not chunk:
                return
            yield chunk
            if len(chunk) < size:
                return

    def items(self) -> Iterator[Item]:
        return {
            "txt": self._items_txt,
            "jsonl": self._items_jsonl,
            "csv": self._items_csv,
            "tsv": self._items_csv,
            "parquet": self._items_parquet,
        }[self.fmt]()


# ---------------------------------------------------------------------------------- writing


def purged_name(fmt: str) -> str:
    """The purged corpus's name in ``out`` for input format ``fmt``."""
    return "purged.parquet" if fmt == "parquet" else f"purged.{fmt}"


class PurgedWriter:
    """Writes the purged corpus in the input's format."""

    def __init__(self, out: Path, fmt: str, reader: Reader) -> None:
        self.fmt = fmt
        self.reader = reader
        self.name = purged_name(fmt)
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
            truncate_to(self.path, size)
            self._fh = open(self.path, "a", encoding="utf-8", newline="")  # noqa: SIM115

    def _csv_writer(self) -> Any:
        assert self._fh is not None
        return csv.writer(
            self._fh, delimiter="\t" if self.fmt == "tsv" else ",", lineterminator="\n"
        )

    def write(self, item: Item, purged: tuple[str, ...] | None) -> None:
        """Write a clean record (``purged`` None) unchanged, or a purged one."""
        names = self.reader.fields
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
            buf = pa.BufferOutputStream()
            pq.write_table(table, buf)
            atomic_write_bytes(self.path / f"part-{chunk:06d}.parquet", buf.getvalue().to_pybytes())
            self._rows = []
        elif self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def size(self) -> int | None:
        return None if self.fmt == "parquet" else self.path.stat().st_size

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def truncate_to(path: Path, size: int) -> None:
    """Cut an output back to the size a checkpoint recorded (InputError when it is shorter)."""
    if not path.exists():
        raise InputError(f"cannot resume: {path.name} is missing", path.parent)
    if path.stat().st_size < size:
        raise InputError(
            f"cannot resume: {path.name} is shorter than the checkpoint says", path.parent
        )
    with open(path, "r+b") as f:
        f.truncate(size)


class JsonlWriter:
    """Appends one JSON object a line; ``open(size)`` continues a file cut back to ``size``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[str] | None = None

    def open(self, size: int | None) -> None:
        if size is None:
            self._fh = open(self.path, "w", encoding="utf-8")  # noqa: SIM115
        else:
            truncate_to(self.path, size)
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
