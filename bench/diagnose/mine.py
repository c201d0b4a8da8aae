"""Mine a backdoored model directly and compare candidates with its implanted PVs."""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(2)
from lmsan.auditor import selfcal
from lmsan.auditor.corpus import load_corpus
from lmsan.auditor.mining import Miner
from lmsan.auditor.modelio import load_encoder

model = Path(sys.argv[1]); target = sys.argv[2]; lrs = [float(x) for x in sys.argv[3].split(",")]; n = int(sys.argv[4])
extra = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
bdp = model / "backdoor.json"
pvs = [np.asarray(p, dtype=np.float32) for p in json.loads(bdp.read_text())["pvs"]["values"]] if bdp.exists() else []
lm = load_encoder(model); corpus = load_corpus(None)
for lr0 in lrs:
    cfg = selfcal._mining_config({**selfcal.BASE_VALUES, "lr0": lr0, "t_l": 0.0, "t_collapse": 0.0, **extra})
    m = Miner(lm, corpus, [target], cfg)
    for seed in range(n):
        t0 = time.time(); sr = m.run_seed(seed); ts = sr.targets[0]
        ag = [float(np.mean((np.asarray(ts.pv) >= 0) == (p >= 0))) for p in pvs] if ts.pv is not None else []
        print(f"lr0 {lr0} seed {seed}: epochs {sr.epochs_run} lr_drop {sr.lr_dropped_at} agree {[round(a,3) for a in ag]} dist {ts.epoch_distance} conc {ts.concentration:.3g} {time.time()-t0:.0f}s", flush=True)
