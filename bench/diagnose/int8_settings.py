"""How the int8 bundle's quantization settings change the monitor's decisions.

On the scale benchmark's model and corpus (`bench/bench_scale.py`: the POR-backdoored 3-layer
MiniLM, its fp32 bundle, 4,000 records with draw 1 of the triggered records), the fp32 model is
quantized two ways: ONNX Runtime's `quantize_dynamic` defaults (per-tensor int8 weights of every
MatMul) and the settings `lmsan export --quantize int8` uses (`export.quantize.quantize_onnx`:
per channel, 7 bits, feed-forward output projections kept fp32). For each it prints the decision
agreement with fp32, the flagged count, and how many of the 384 [CLS] signs the best PV match
count moves (mean and max over records), with records/s.

Run (the scale benchmark's cache built): python bench/diagnose/int8_settings.py
"""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_scale import TRIGGERS, build_model, corpus_lines  # noqa: E402
from paths import CACHE  # noqa: E402


def main() -> None:
    import onnxruntime as ort
    from lmsan.auditor.screener import open_bundle
    from lmsan.export.quantize import quantize_onnx, same_decision
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _, fp32, _, _ = build_model(CACHE / "scale")
    lines = corpus_lines()
    texts = (lines * (4000 // len(lines) + 1))[:4000]
    rng = random.Random(1)
    for i in rng.sample(range(len(texts)), int(0.05 * len(texts))):
        w = texts[i].split()
        w.insert(rng.randint(0, len(w)), rng.choice(TRIGGERS))
        texts[i] = " ".join(w)
    ref = open_bundle(fp32, provider="cpu", threads=2)
    table_ref = np.zeros((len(texts), len(ref.pv_columns())), np.int64)
    a = ref.monitor(texts, table=table_ref)
    work = Path(tempfile.mkdtemp(prefix="lmsan-int8-"))
    src = fp32 / "model.onnx"
    variants = {
        "quantize_dynamic defaults": lambda dst: quantize_dynamic(
            str(src), str(dst), weight_type=QuantType.QInt8),
        "lmsan export --quantize int8": lambda dst: quantize_onnx(src, dst),
    }
    print(f"fp32 flags {sum(r.flagged for r in a)} of {len(texts)} records")
    print("| settings | agreement | flagged | mean / max sign-count change | records/s |")
    print("|---|---|---|---|---|")
    for name, make in variants.items():
        dst = work / f"{len(name)}.onnx"
        make(dst)
        s = open_bundle(fp32, provider="cpu", threads=2)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
        s.session = ort.InferenceSession(str(dst), sess_options=opts,
                                         providers=["CPUExecutionProvider"])
        table = np.zeros_like(table_ref)
        s.monitor(texts[:32])
        t = time.perf_counter()
        b = s.monitor(texts, table=table)
        sec = time.perf_counter() - t
        same = sum(same_decision(x, y) for x, y in zip(a, b, strict=True))
        diff = np.abs(table_ref - table).max(1)
        print(f"| {name} | {100 * same / len(texts):.2f}% | {sum(r.flagged for r in b)} | "
              f"{diff.mean():.2f} / {diff.max()} | {len(texts) / sec:.0f} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
