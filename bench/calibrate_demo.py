"""The `tiny-bert-demo` preset: `lmsan calibrate` on two clean tiny BERTs that the demo never uses.

Builds the shadows with `lmsan.auditor.demo.build_tiny_bert` (seeds 1 and 2; the demo and the
tests build seed 1234), calibrates them with the demo preset's mining values over SEEDS seeds
each, and writes bench/results/preset_tiny_bert_demo.json; `python bench/install_presets.py
bench/results/preset_tiny_bert_demo.json` then ships it. About a minute on two CPU cores.

    python bench/calibrate_demo.py [--seeds 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lmsan.auditor.fsutil import atomic_write_text  # noqa: E402
from paths import RESULTS  # noqa: E402

# the demo preset's mining values: T_L, the soft prompt's learning rate, the diversity loss, the
# sentence length of the tiny word-level vocabulary
VALUES = {"t_l": 0.1, "lr0": 2e-3, "div_loss": "entropy", "max_length": 48}
SHADOW_SEEDS = (1, 2)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, default=16, help="fuzz seeds per clean shadow")
    a = ap.parse_args(argv)
    import torch
    from lmsan.auditor.calibrate import calibrate
    from lmsan.auditor.corpus import default_corpus
    from lmsan.auditor.demo import build_tiny_bert

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [build_tiny_bert(Path(tmp) / f"clean{s}", seed=s) for s in SHADOW_SEEDS]
        res = calibrate(dirs, default_corpus(), name="tiny-bert-demo", seeds=a.seeds,
                        overrides=VALUES,
                        progress=lambda e: print(json.dumps({k: e.get(k) for k in (
                            "model", "seed", "target", "concentration")}), flush=True))
        names = {str(d): f"build_tiny_bert(seed={s})" for d, s in zip(dirs, SHADOW_SEEDS, strict=True)}
    p = res.preset
    p.evidence["shadow_models"] = [names.get(m, m) for m in p.evidence["shadow_models"]]
    p.evidence["note"] = ("tiny randomly initialised BERTs (lmsan.auditor.demo.build_tiny_bert); "
                          "the demo and tests use seed 1234, never a shadow")
    p.evidence["command"] = f"python bench/calibrate_demo.py --seeds {a.seeds}"
    p.evidence["measure_seconds"] = round(time.perf_counter() - t0, 1)
    out = RESULTS / "preset_tiny_bert_demo.json"
    atomic_write_text(out, json.dumps({"format": "lmsan.presets", "version": 1,
                                       "presets": [p.to_json()]}, indent=1) + "\n")
    print(json.dumps(p.values))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
