"""What every scan engine shares: the options of a scan (:class:`ScanOptions`) and the screening
of one chunk (:func:`screen_chunk` -> :class:`ChunkResult`, pure data, no I/O).

:mod:`lmsan.auditor.scan` reads the corpus, hands its chunks to a :class:`Runner` and writes the
results in input order; :class:`LocalRunner` screens in this process,
:class:`lmsan.auditor.scan_ray.RayRunner` in a pool of Ray actors.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .corpus_io import Item, Reader
from .errors import UsageError
from .screener import MonitorResult, PurgeResult, Record, Screener, load_bundle
from .thresholds import Thresholds

ENGINES = ("local", "ray")
RAY_EXTRA = 'pip install "lmsan[ray]"'


def require_ray() -> None:
    """UsageError naming the extra when Ray (with Ray Data) is not installed."""
    if importlib.util.find_spec("ray") is None:
        raise UsageError(f"--engine ray needs Ray Data: {RAY_EXTRA}")


# ScanOptions fields that choose how the scan runs, not what it finds (summary["run"])
RUN_OPTIONS = ("engine", "address", "actors", "threads")


@dataclass
class ScanOptions:
    """How to read the corpus, run the screener and what to write: the options of ``lmsan scan``
    (``lmsan threshold`` uses the reading and runtime ones)."""

    text_field: str = "text"
    pair_field: str | None = None
    purge: bool = False
    max_window: int = 5
    batch_size: int = 32
    batch_tokens: int | None = None  # None: the screener's BATCH_TOKENS
    threads: int = 0
    max_length: int | None = None
    resume: bool = False
    provider: str = "auto"
    fmt: str | None = None  # input format; default from the suffix (txt for stdin)
    chunk_size: int = 2048
    # the deployment's match thresholds (--t-match / --t-match-file); default: the PV set's
    thresholds: Thresholds = field(default_factory=Thresholds)
    # how the chunks are screened (never part of the outputs): "local" (this process) or "ray"
    engine: str = "local"
    address: str | None = None  # Ray cluster to join (default: a local instance)
    actors: int = 0  # Ray actors (0: one per CPU of the cluster, one per GPU with CUDA)

    def check(self) -> None:
        """UsageError for an option out of range (the screener checks its own)."""
        if self.max_window < 1:
            raise UsageError("--max-window must be at least 1")
        if self.chunk_size < 1:
            raise UsageError("chunk size must be at least 1")
        if self.engine not in ENGINES:
            raise UsageError(f"--engine {self.engine!r}: expected one of {', '.join(ENGINES)}")
        if self.actors < 0:
            raise UsageError("--actors must be 0 (one per CPU or GPU) or more")
        if self.engine == "ray":
            require_ray()

    def open_screener(self, bundle: str | Path, threads: int | None = None) -> Screener:
        """Load and verify the bundle; open a screener with these runtime options (``threads``
        overrides ``self.threads``)."""
        return Screener(
            load_bundle(bundle), self.provider, self.threads if threads is None else threads,
            self.batch_size, self.max_length, self.thresholds, self.batch_tokens,
        )

    def reader(self, corpus: str, fmt: str) -> Reader:
        return Reader(corpus, fmt, self.text_field, self.pair_field)

    def to_json(self) -> dict[str, Any]:
        """The options as the summary records them (the thresholds as given, flat)."""
        skip = ("resume", "thresholds", *RUN_OPTIONS)
        d = {k: v for k, v in asdict(self).items() if k not in skip}
        t = self.thresholds
        d["match_threshold"] = t.match
        d["per_pv_thresholds"] = None if t.per_pv is None else dict(t.per_pv)
        d["thresholds_digest"] = t.bundle_digest
        return d


@dataclass
class ChunkResult:
    """What screening one chunk found (no I/O): keyed by the record's index in the chunk."""

    results: dict[int, MonitorResult] = field(default_factory=dict)
    purges: dict[int, PurgeResult] = field(default_factory=dict)
    errors: dict[int, tuple[str, str]] = field(default_factory=dict)  # over-long records
    forward_passes: int = 0
    purge_forward_passes: int = 0
    provider: str = ""
    implementation: str = ""


def screen_chunk(
    records: Sequence[Record | None], screener: Screener, opts: ScanOptions
) -> ChunkResult:
    """Monitor (and with ``opts.purge`` purge) the valid records (None: malformed) of a chunk.
    Records are sorted by token count and batched (similar lengths share a forward pass), and
    the results are keyed back by position."""
    out = ChunkResult(provider=screener.provider, implementation=screener.implementation)
    passes0 = screener.forward_passes
    valid = [i for i, f in enumerate(records) if f is not None]
    if valid:
        res, too_long = screener.monitor_records([f for f in records if f is not None])
        for j, (r, L) in enumerate(zip(res, too_long, strict=True)):
            if r is not None:
                out.results[valid[j]] = r
            else:
                out.errors[valid[j]] = (
                    "over-long",
                    f"{L} tokens exceed the max length {screener.max_length}",
                )
        if opts.purge:
            before = screener.forward_passes
            for i, r in out.results.items():
                if r.flagged:
                    fields = records[i]
                    assert fields is not None
                    out.purges[i] = screener.purge(fields, opts.max_window)
            out.purge_forward_passes = screener.forward_passes - before
    out.forward_passes = screener.forward_passes - passes0
    return out


class Runner(Protocol):
    """Screens a stream of chunks; yields each chunk with its result, in input order."""

    def run(self, chunks: Iterable[list[Item]]) -> Iterator[tuple[list[Item], ChunkResult]]: ...

    def close(self) -> None: ...


class LocalRunner:
    """Screens chunks in this process with one screener."""

    def __init__(self, screener: Screener, opts: ScanOptions) -> None:
        self.screener = screener
        self.opts = opts

    def run(self, chunks: Iterable[list[Item]]) -> Iterator[tuple[list[Item], ChunkResult]]:
        for chunk in chunks:
            yield chunk, screen_chunk([it.fields for it in chunk], self.screener, self.opts)

    def close(self) -> None:
        pass
