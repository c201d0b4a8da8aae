"""`lmsan scan --engine ray`: the chunks of a scan screened by a pool of Ray actors.

The corpus is read in this process by the same :class:`~lmsan.auditor.corpus_io.Reader` as the
local scan: Ray Data's own readers number, decode and reject records differently (a bad UTF-8
line, a JSON line that is not an object, a CSV row short of a column are per-record errors
here, with the record's number), and the outputs must be the local scan's byte for byte. The
chunks (``chunk_size`` records, as the local scan cuts them) go to Ray Data with
``ray.data.from_items``, one row per chunk, in windows of ``WINDOW_CHUNKS_PER_ACTOR`` chunks per
actor, and ``map_batches`` runs :class:`ScreenActor` on an actor pool: each actor loads and
verifies the bundle once (ORT session + native monitor) and runs
:func:`~lmsan.auditor.scan_core.screen_chunk` on whole chunks, purge included, so every record is
batched with the same neighbours as in the local scan and gets the same result. Each actor asks
for one GPU when the scan runs on CUDA, else one CPU.

The results come back to this process, which writes them in input order with the local scan's
writer and checkpoint. An actor that dies mid-chunk is restarted and its chunk retried by Ray
Data (``max_restarts``/``max_task_retries`` -1); a chunk's result is written once, when it comes
back, and a window is checked to have returned every one of its chunks exactly once, so a lost
worker neither loses nor duplicates a record.

Ray is an optional extra: ``pip install "lmsan[ray]"``.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from .corpus_io import Item
from .scan_core import ChunkResult, ScanOptions, require_ray, screen_chunk
from .screener import Screener

WINDOW_CHUNKS_PER_ACTOR = 8  # chunks in flight per actor (one Ray Data run per window)


class ScreenActor:
    """One Ray actor: the bundle opened once, whole chunks screened (monitor and purge)."""

    def __init__(self, bundle: str, opts: ScanOptions, threads: int) -> None:
        self.opts = opts
        self.screener = opts.open_screener(bundle, threads=threads)

    def screen(self, chunk: int, records: list[Any]) -> ChunkResult:
        """Screen one chunk (an override point for tests)."""
        return screen_chunk(records, self.screener, self.opts)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = [
            pickle.dumps(self.screen(int(k), pickle.loads(payload)))
            for k, payload in zip(batch["chunk"], batch["records"], strict=True)
        ]
        return {"chunk": batch["chunk"], "result": np.array(out, dtype=object)}


class RayRunner:
    """Screens a scan's chunks on Ray (see the module docstring).

    ``screener``: the driver's screener, opened on the scan's provider; the actors run on the
    same provider (one GPU each on CUDA). ``actor_cls``: the actor class (a
    :class:`ScreenActor`)."""

    def __init__(
        self,
        bundle: str | Path,
        opts: ScanOptions,
        screener: Screener,
        actor_cls: type[ScreenActor] = ScreenActor,
    ) -> None:
        require_ray()
        import ray

        self._started = False
        if not ray.is_initialized():
            env = {k: v for k, v in os.environ.items() if k.startswith("LMSAN_")}
            ray.init(
                address=opts.address,
                logging_level=logging.ERROR,
                log_to_driver=False,
                runtime_env={"env_vars": env} if env else None,
            )
            self._started = True
        self.bundle = str(Path(bundle).resolve())
        self.opts = opts
        self.actor_cls = actor_cls
        res = ray.cluster_resources()
        self.cuda = screener.provider == "CUDAExecutionProvider"
        if self.cuda:
            slots = max(1, int(res.get("GPU", 0)))
            self.actors = opts.actors or slots
            self.threads = opts.threads
            self.num_cpus, self.num_gpus = 1.0, 1.0
        else:
            cpus = max(1, int(res.get("CPU", 1)))
            self.actors = opts.actors or cpus
            self.threads = opts.threads or max(1, cpus // self.actors)
            self.num_cpus, self.num_gpus = float(min(self.threads, cpus)), 0.0
        self.info: dict[str, Any] = {"actors": self.actors, "threads_per_actor": self.threads}
        if opts.address:
            self.info["address"] = opts.address

    def _window(self, window: list[list[Item]]) -> Iterator[tuple[list[Item], ChunkResult]]:
        """Screen one window of chunks; yield them in order as their results arrive."""
        import ray

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.verbose_progress = False
        rows = [
            {"chunk": k, "records": pickle.dumps([it.fields for it in c])}
            for k, c in enumerate(window)
        ]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            self.actor_cls,
            fn_constructor_args=(self.bundle, self.opts, self.threads),
            batch_size=1,
            # actors restart and their tasks retry without limit: Ray Data's defaults for an
            # actor pool (max_restarts / max_task_retries -1)
            compute=ray.data.ActorPoolStrategy(size=min(self.actors, len(rows))),
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus or None,
        )
        got: dict[int, ChunkResult] = {}
        nxt = 0
        for row in ds.iter_rows():
            k = int(row["chunk"])
            if k in got or k < nxt:
                continue  # a retried chunk that came back twice: its first result stands
            got[k] = pickle.loads(row["result"])
            while nxt in got:
                yield window[nxt], got.pop(nxt)
                nxt += 1
        if nxt != len(window):
            raise RuntimeError(
                f"Ray returned {nxt} of {len(window)} chunks in order (missing chunk {nxt})"
            )

    def run(self, chunks: Iterable[list[Item]]) -> Iterator[tuple[list[Item], ChunkResult]]:
        it = iter(chunks)
        size = max(1, self.actors * WINDOW_CHUNKS_PER_ACTOR)
        while window := list(islice(it, size)):
            yield from self._window(window)

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False
