"""Where the purge's time goes, on the scale benchmark's bundle and flagged records.

Rebuilds the scale benchmark's triggered corpus (draw 2, as `bench/bench_scale.py` by default),
takes the first 30 records the fp32 bundle flags among the first 3,000, and prints: their word
counts; ms per record and candidates / forward passes of the purge with chunks of 8 and of 1;
ms per forward pass of one 36-word record repeated at batch 1, 8 and 32; and a cProfile of the
chunked purge (cumulative time).

Needs the scale benchmark's cache (`python bench/bench_scale.py` builds it).
Run: python bench/diagnose/purge_profile.py
"""

from __future__ import annotations

import cProfile
import io
import pstats
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_scale as bs  # noqa: E402
from paths import CACHE  # noqa: E402


def main() -> None:
    from lmsan.auditor.screener import open_bundle

    rng = random.Random(2)
    lines = bs.corpus_lines()
    texts = (lines * (8000 // len(lines) + 1))[:8000]
    for i in rng.sample(range(len(texts)), int(0.05 * len(texts))):
        w = texts[i].split()
        w.insert(rng.randint(0, len(w)), rng.choice(bs.TRIGGERS))
        texts[i] = " ".join(w)
    scr = open_bundle(CACHE / "scale" / "bundle-fp32", provider="cpu", threads=2)
    flagged = [t for t, r in zip(texts, scr.monitor(texts[:3000]), strict=False) if r.flagged][:30]
    print("words per record:", [len(x.split()) for x in flagged])
    for chunk in (8, 1):
        t = time.perf_counter()
        res = [scr.purge(x, 5, chunk=chunk) for x in flagged]
        print(f"chunk {chunk}: {(time.perf_counter() - t) / len(flagged) * 1000:.0f} ms/record, "
              f"{sum(p.candidates for p in res)} candidates, "
              f"{sum(p.forward_passes for p in res)} forward passes")
    for b in (1, 8, 32):
        encs = scr.encode_all([flagged[0]] * b)
        t = time.perf_counter()
        for _ in range(20):
            scr._monitor_candidates(encs)
        print(f"batch {b}: {(time.perf_counter() - t) / 20 * 1000:.2f} ms per pass")
    prof = cProfile.Profile()
    prof.enable()
    for x in flagged:
        scr.purge(x, 5, chunk=8)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(12)
    print(out.getvalue())


if __name__ == "__main__":
    main()
