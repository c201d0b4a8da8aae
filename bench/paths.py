"""Where the benchmarks find their data and keep their caches (all inside the repository)."""

from __future__ import annotations

import os
from pathlib import Path

BENCH = Path(__file__).resolve().parent
DATA = Path(os.environ.get("LMSAN_BENCH_DATA", BENCH / "data"))  # rte/, conll04/, wordnet/
CACHE = Path(os.environ.get("LMSAN_BENCH_CACHE", BENCH / "cache"))  # git-ignored build outputs
RESULTS = BENCH / "results"
