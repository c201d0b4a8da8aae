"""Sign-match kernel benchmark: native best_match against NumPy and the memory-bandwidth bound.

For each d (default 384 and 768) it builds float32 rows [n, d] (default n = 1M) and 6 packed PVs
and times, on the same data:

- ``native``: ``monitor.best_match_native`` (fused pack + XOR/popcount + argmax), 1 thread and
  all cores;
- ``numpy reference``: ``monitor.best_match_python`` (the reference the tests compare against:
  ``np.packbits`` + XOR + ``np.bitwise_count``, in blocks of 65,536 rows);
- ``numpy naive``: the direct NumPy monitor, ``((x >= 0)[:, None] == pv_signs).sum(-1)`` per
  block, then argmax;
- the bandwidth bound: the fastest of ``np.sum(x)``, ``np.max(x)`` and ``np.copyto`` (which
  reads and writes) of the same array, i.e. the measured time to stream the floats once.

Prints a table and writes ``bench/results/kernel.json`` and ``kernel.md`` (machine, command,
date). Not a test: run it by hand, e.g. ``python bench/bench_kernel.py``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from lmsan.auditor import monitor as m
from paths import RESULTS


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def numpy_naive(x: np.ndarray, pv_signs: np.ndarray, thr: int, block: int = 8192) -> np.ndarray:
    """The direct NumPy monitor: sign equality counts against each PV, then argmax."""
    n = len(x)
    idx = np.empty(n, dtype=np.int32)
    cnt = np.empty(n, dtype=np.int32)
    for s in range(0, n, block):
        counts = ((x[s : s + block] >= 0)[:, None, :] == pv_signs[None]).sum(-1, dtype=np.int32)
        idx[s : s + block] = counts.argmax(1)
        cnt[s : s + block] = counts.max(1)
    return cnt >= thr


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", "", "x86_64"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    mem_gib = None
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem_gib = round(kib / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    native = m._native()
    return {
        "cpu": model,
        "logical_cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "simd": [f for f in ("avx2", "avx512f", "avx512bw", "popcnt") if f in flags],
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "native_kernel": native.kernel(),
        "note": "2 logical cores shared with other processes; timings are best-of-N wall clock",
    }


def run(n: int, d: int, k: int, repeats: int, rng: np.random.Generator) -> dict[str, Any]:
    x = rng.standard_normal((n, d), dtype=np.float32)
    pv_vals = rng.standard_normal((k, d)).astype(np.float32)
    x[::100] = pv_vals[rng.integers(0, k, size=len(x[::100]))] + 0.3 * x[::100]  # 1% triggered
    pvs = m.pack_signs_python(pv_vals)
    thr = m.threshold_count(d)
    gb = x.nbytes / 1e9

    ref = m.best_match_python(x, pvs, d, thr)
    for threads in (1, 0):
        got = m.best_match_native(x, pvs, d, thr, threads=threads)
        for a, b in zip(got, ref, strict=True):
            if not np.array_equal(a, b):
                raise SystemExit(f"native and reference disagree at d={d}, threads={threads}")
    naive_flags = numpy_naive(x, pv_vals >= 0, thr)
    if not np.array_equal(naive_flags, ref[2]):
        raise SystemExit(f"naive NumPy and reference disagree at d={d}")

    out = np.empty_like(x)
    t: dict[str, float] = {
        "native_1_thread": best_of(lambda: m.best_match_native(x, pvs, d, thr, threads=1), repeats),
        "native_all_cores": best_of(
            lambda: m.best_match_native(x, pvs, d, thr, threads=0), repeats
        ),
        "numpy_reference": best_of(
            lambda: m.best_match_python(x, pvs, d, thr), max(1, repeats // 2)
        ),
        "numpy_naive": best_of(lambda: numpy_naive(x, pv_vals >= 0, thr), 1),
        "read_np_sum": best_of(lambda: np.sum(x), repeats),
        "read_np_max": best_of(lambda: np.max(x), repeats),
        "read_write_copyto": best_of(lambda: np.copyto(out, x), repeats),
    }
    # In-cache batches, as the scan calls the monitor: one call per forward-pass batch.
    batch = x[:256].copy()
    calls = 2000
    t["batch256_native_per_call"] = (
        best_of(lambda: [m.best_match(batch, pvs, d, thr) for _ in range(calls)], repeats) / calls
    )
    t["batch256_reference_per_call"] = best_of(
        lambda: [m.best_match_python(batch, pvs, d, thr) for _ in range(calls // 10)], 1
    ) / (calls // 10)
    bound = min(t["read_np_sum"], t["read_np_max"], t["read_write_copyto"])
    native = t["native_1_thread"]
    return {
        "rows": n,
        "d": d,
        "pvs": k,
        "gigabytes": round(gb, 3),
        "flagged": int(ref[2].sum()),
        "seconds": {key: float(f"{v:.4g}") for key, v in t.items()},
        "bandwidth_bound_seconds": round(bound, 4),
        "native_gb_per_s": round(gb / native, 2),
        "speedup_vs_numpy_reference": round(t["numpy_reference"] / native, 1),
        "speedup_vs_numpy_naive": round(t["numpy_naive"] / native, 1),
        "native_over_bound": round(native / bound, 2),
        # The reference over the fastest measured pass over the floats (bound or native): no
        # kernel that reads the floats once can beat the reference by much more than this.
        "reference_over_fastest_read": round(
            t["numpy_reference"] / min(bound, native, t["native_all_cores"]), 1
        ),
        "native_all_cores_over_bound": round(t["native_all_cores"] / bound, 2),
        "batch256_speedup_vs_numpy_reference": round(
            t["batch256_reference_per_call"] / t["batch256_native_per_call"], 1
        ),
        "target_20x_reference_met": t["numpy_reference"] / native >= 20,
        "target_20x_naive_met": t["numpy_naive"] / native >= 20,
        "target_within_3x_bound_met": native / bound <= 3,
    }


def markdown(report: dict[str, Any]) -> str:
    mach = report["machine"]
    lines = [
        "# Sign-match kernel benchmark",
        "",
        f"- command: `{report['command']}`",
        f"- date: {report['date']}",
        f"- machine: {mach['cpu']}, {mach['logical_cores']} logical cores, "
        f"{mach['memory_gib']} GiB, SIMD {', '.join(mach['simd'])}; native kernel "
        f"`{mach['native_kernel']}`; NumPy {mach['numpy']}, Python {mach['python']}",
        f"- {mach['note']}",
        "",
        "| rows x d | native 1 thr (s) | native all (s) | NumPy ref (s) | NumPy naive (s) "
        "| bound (s) | native GB/s | x ref | x naive | native / bound |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        s = r["seconds"]
        lines.append(
            f"| {r['rows']:,} x {r['d']} | {s['native_1_thread']:.3f} | {s['native_all_cores']:.3f} "
            f"| {s['numpy_reference']:.3f} | {s['numpy_naive']:.3f} | {r['bandwidth_bound_seconds']:.3f} "
            f"| {r['native_gb_per_s']} | {r['speedup_vs_numpy_reference']} "
            f"| {r['speedup_vs_numpy_naive']} | {r['native_over_bound']} |"
        )
    lines += [
        "",
        "In-cache batches of 256 rows (one call per forward-pass batch, as `lmsan scan` does), "
        "through the public `monitor.best_match` (input checks included):",
        "",
        "| d | native per call (us) | NumPy ref per call (us) | x ref |",
        "|---|---|---|---|",
    ]
    for r in report["results"]:
        s = r["seconds"]
        lines.append(
            f"| {r['d']} | {s['batch256_native_per_call'] * 1e6:.1f} "
            f"| {s['batch256_reference_per_call'] * 1e6:.1f} "
            f"| {r['batch256_speedup_vs_numpy_reference']} |"
        )
    lines += [
        "",
        "Bound = fastest of np.sum, np.max and np.copyto over the same array (time to stream the "
        "floats once). NumPy ref = `monitor.best_match_python` (packbits + XOR + bitwise_count); "
        "NumPy naive = sign-equality counts `((x >= 0)[:, None] == pv_signs).sum(-1)`.",
        "",
        "Targets: >= 20x the NumPy reference, within 3x of the bound:",
    ]
    for r in report["results"]:
        lines.append(
            f"- d={r['d']}: 20x reference {'met' if r['target_20x_reference_met'] else 'NOT met'} "
            f"({r['speedup_vs_numpy_reference']}x; {r['speedup_vs_numpy_naive']}x the naive "
            f"NumPy monitor), within 3x of bound "
            f"{'met' if r['target_within_3x_bound_met'] else 'NOT met'} ({r['native_over_bound']}x)"
        )
    lines += [
        "",
        "Reading: the NumPy reference is itself vectorised (packbits + bitwise_count) and takes "
        "only "
        + ", ".join(f"{r['reference_over_fastest_read']}x (d={r['d']})" for r in report["results"])
        + " the time of the fastest measured pass over the floats, so no kernel that reads the floats once can be 20x faster "
        "than it on this machine; the native kernel reaches the bound (a ratio below 1 means "
        "it streams the floats faster than np.sum/np.max/np.copyto, i.e. those are a loose "
        "bound). Against the naive NumPy monitor the gap is larger. Shared 2-core machine: "
        "expect +-20% between runs.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows per matrix")
    ap.add_argument("--dims", type=int, nargs="+", default=[384, 768], help="hidden sizes d")
    ap.add_argument("--pvs", type=int, default=6, help="number of PVs")
    ap.add_argument("--repeats", type=int, default=3, help="best of N for the fast timings")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    ap.add_argument("--out", type=Path, default=RESULTS / "kernel.json", help="results JSON")
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    results = []
    for d in args.dims:
        r = run(args.rows, d, args.pvs, args.repeats, rng)
        results.append(r)
        s = r["seconds"]
        print(
            f"{r['rows']:>9,} x {d:<4} native {s['native_1_thread']:.3f}s "
            f"(all cores {s['native_all_cores']:.3f}s, {r['native_gb_per_s']} GB/s)  "
            f"ref {s['numpy_reference']:.3f}s ({r['speedup_vs_numpy_reference']}x)  "
            f"naive {s['numpy_naive']:.3f}s ({r['speedup_vs_numpy_naive']}x)  "
            f"bound {r['bandwidth_bound_seconds']:.3f}s (native/bound {r['native_over_bound']})",
            flush=True,
        )
    report = {
        "benchmark": "sign-match kernel (best_match)",
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    md = markdown(report)
    args.out.with_suffix(".md").write_text(md)
    print()
    print(md)


if __name__ == "__main__":
    main()
