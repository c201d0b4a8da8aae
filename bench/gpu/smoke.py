"""First command on the GPU machine: run the CUDA code paths that bench/gpu/mpnet.sh needs
(fine-tune, poison, shadow measurement, audit) on a tiny model, and time one MPNet-size mining
seed (all-mpnet-base-v2's config, random weights) to size the real run.

    python3 bench/gpu/smoke.py MPNET_SMALL_FILES_DIR
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402
import zoo  # noqa: E402

# a CPU dry run of this script (SMOKE_DEVICE=cpu) checks it before device time is spent
DEVICE = os.environ.get("SMOKE_DEVICE", "cuda")
zoo.DEVICE = DEVICE


def main() -> None:
    from lmsan.auditor.audit import AuditOptions, run_audit
    from lmsan.auditor.calibrate import measure_shadows
    from lmsan.auditor.corpus import default_corpus
    from lmsan.auditor.demo import build_tiny_encoder
    from lmsan.auditor.mining import MiningConfig
    from lmsan.auditor.poison import poison_model

    print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                      "cuda": torch.cuda.is_available(),
                      "machine": zoo.machine()}), flush=True)
    tmp = Path("/tmp/smoke")
    shutil.rmtree(tmp, ignore_errors=True)
    corpus = default_corpus()
    t0 = time.perf_counter()
    build_tiny_encoder(tmp / "tiny", "bert", seed=1)
    ft = zoo.finetune(tmp / "tiny", tmp / "tiny-ft", "wordnet-topic", seed=100, steps=5)
    print("finetune", ft, flush=True)
    res = poison_model(tmp / "tiny", tmp / "tiny-por", attack="por", n_pvs=2, device=DEVICE,
                       **zoo.TINY_POISON)
    print("poison", res.success, res.fidelity, res.passed, flush=True)
    rows = measure_shadows([tmp / "tiny-ft"], corpus, seeds=1, targets=("auto",),
                           base_cfg=MiningConfig(t_l=0.1, lr0=2e-4, div_loss="entropy"),
                           device=DEVICE, backdoored=[tmp / "tiny-por"], backdoored_seeds=1)
    print("shadow rows", [(r["model"][-8:], r["target"], r["concentration"], r.get("agreement"))
                          for r in rows], flush=True)
    a = run_audit(AuditOptions(model_dir=tmp / "tiny-por", max_seeds=2, device=DEVICE), corpus)
    print("audit tiny-por:", a.verdict, a.found_targets, f"{a.seconds:.1f}s", flush=True)
    print(f"tiny pipeline {time.perf_counter() - t0:.1f}s", flush=True)

    from transformers import AutoConfig, AutoModel

    if os.environ.get("SMOKE_SKIP_MPNET"):
        return
    small = Path(sys.argv[1])
    m = AutoModel.from_config(AutoConfig.from_pretrained(small))
    out = tmp / "mpnet-rand"
    m.save_pretrained(out, safe_serialization=True)
    for f in small.iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, out / f.name)
    t1 = time.perf_counter()
    rows = measure_shadows([out], corpus, seeds=1, targets=("auto",),
                           base_cfg=MiningConfig(t_l=0.05, lr0=2e-4, div_loss="log_concentration"),
                           device=DEVICE)
    print(f"MPNet-size mining seed (random weights, 4 epochs, targets "
          f"{sorted({r['target'] for r in rows})}): {rows[0]['seconds']:.1f}s "
          f"(call {time.perf_counter() - t1:.1f}s incl. load and clean outputs)", flush=True)


if __name__ == "__main__":
    main()
