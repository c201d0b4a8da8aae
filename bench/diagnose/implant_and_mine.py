"""Diagnose self-calibration on one model: implant POR on a target, mine seeds, print figures."""
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(2)
from lmsan.auditor import selfcal
from lmsan.auditor.confirm import ConfirmRule, confirm_candidate
from lmsan.auditor.corpus import load_corpus
from lmsan.auditor.mining import Miner
from lmsan.auditor.modelio import load_encoder
from lmsan.auditor.poison.pipeline import poison_model

model = Path(sys.argv[1]); target = sys.argv[2] if len(sys.argv) > 2 else "cls"
lrs = [float(x) for x in sys.argv[3].split(",")] if len(sys.argv) > 3 else [2e-4, 2e-3]
nseeds = int(sys.argv[4]) if len(sys.argv) > 4 else 4
attack = {"cls": "por", "mask": "por", "tokens": "por-ner"}[target]
extra = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}  # more mining settings
corpus = load_corpus(None)
with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "imp"
    for lr, ep in [tuple(float(v) for v in r.split(":")) for r in sys.argv[5].split(",")]:
        t0 = time.time()
        res = poison_model(model, out, attack=attack, random_triggers=1, n_pvs=1, target=target,
                           seed=selfcal.IMPLANT_SEED, min_success=0.9, lr=lr, epochs=int(ep), force=True)
        print(f"implant lr {lr} ep {ep}: success {res.success:.3f} fidelity {res.fidelity:.3f} trig {res.triggers} {time.time()-t0:.0f}s", flush=True)
        if res.passed: break
    pv = np.asarray(res.pvs[0], dtype=np.float32)
    lm = load_encoder(out)
    for lr0 in lrs:
        cfg = selfcal._mining_config({**selfcal.BASE_VALUES, "lr0": lr0, "t_l": 0.0, "t_collapse": 0.0,
                                       **extra})
        m = Miner(lm, corpus, [target], cfg)
        print(f"share of the copy's clean outputs that match the implanted PV: "
              f"{m.clean_match(target, pv):.4f}", flush=True)
        for seed in range(nseeds):
            t0 = time.time()
            sr = m.run_seed(seed)
            ts = sr.targets[0]
            agree = float(np.mean((np.asarray(ts.pv) >= 0) == (pv >= 0))) if ts.pv is not None else float("nan")
            line = (f"lr0 {lr0} seed {seed}: epochs {sr.epochs_run} aborted {sr.aborted} cand {ts.candidate} "
                    f"agree {agree:.3f} dist {ts.epoch_distance[-1]:.3g} conc {ts.concentration:.3g} "
                    f"clean share {ts.clean_match if ts.clean_match is not None else float('nan'):.4f} "
                    f"{time.time()-t0:.0f}s")
            if ts.pv is not None and agree >= 0.8:
                c = confirm_candidate(m, sr.prompt, ts.pv, target, ConfirmRule(), seed=seed)
                line += f" | confirm {c.confirmed} tokens {c.tokens} rate {c.rate:.2f} resid {c.residual:.3f} margin {c.margin:.2f}"
            print(line, flush=True)
