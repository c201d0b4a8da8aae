"""Per-candidate statistics of PV mining on clean and backdoored models (calibration evidence).

Runs fuzz seeds on each model with candidate detection forced on (T_L = 0, no early abort, so
every seed's final soft prompt is measured) and appends one JSON line per (model, seed, target)
to the output file, with distance, entropy (paper), spread ratio, concentration and sign
consensus. Resumable: (model, seed, target) rows already in the file are skipped.

    python bench/bench_calibration.py --model clean:minilm6=PATH --model backdoored:por6=PATH \
        --seeds 4 --out bench/results/calibration_candidates.jsonl
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", action="append", required=True,
                    help="LABEL:NAME=PATH, LABEL clean or backdoored (repeatable)")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--targets", default="cls")
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="MiningConfig field=value")
    ap.add_argument("--out", type=Path, default=Path("bench/results/calibration_candidates.jsonl"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from lmsan.auditor.corpus import default_corpus
    from lmsan.auditor.mining import Miner, MiningConfig
    from lmsan.auditor.modelio import load_encoder

    done = set()
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["model"], r["seed"], r["target"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    models = []
    for spec in args.model:
        label, rest = spec.split(":", 1)
        name, path = rest.split("=", 1)
        models.append((label, name, path))
    targets = args.targets.split(",")
    miners = {}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for label, name, path in models:  # interleave models so early rows cover all of them
            if all((name, seed, t) in done for t in targets):
                continue
            if name not in miners:
                lm = load_encoder(path)
                cfg = MiningConfig(max_length=args.max_length, t_l=0.0)
                for kv in args.set:
                    k, v = kv.split("=", 1)
                    setattr(cfg, k, type(getattr(cfg, k))(v))
                miners[name] = Miner(lm, default_corpus(), targets, cfg)
            m = miners[name]
            res = m.run_seed(seed)
            injected = None
            bd = Path(path) / "backdoor.json"
            if bd.exists():
                import numpy as np

                injected = np.asarray(json.loads(bd.read_text())["pvs"]["values"]) >= 0
            for ts in res.targets:
                agree = None
                if injected is not None and ts.pv_eval is not None:
                    agree = float(((np.asarray(ts.pv_eval) >= 0) == injected).mean(1).max())
                row = {k: v for k, v in asdict(ts).items() if k not in ("pv", "pv_eval")}
                row.update(model=name, label=label, seed=seed, injected_agreement=agree,
                           config=" ".join(args.set) or "default", seconds=res.seconds,
                           prompt_in_range=res.prompt_in_range, prompt_min=res.prompt_min,
                           prompt_max=res.prompt_max, lr_dropped_at=res.lr_dropped_at,
                           clean_scale=m.scale[ts.target], trigger_hint=res.trigger_hint,
                           machine=f"{platform.processor() or platform.machine()}, "
                           f"{torch.get_num_threads()} threads", time=time.strftime("%Y-%m-%dT%H:%M:%S"))
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{name:12s} {label:10s} seed {seed} {ts.target}: {res.seconds:6.1f}s "
                      f"d_rel {ts.distance_rel:9.3f} spread {ts.spread_ratio:9.4f} "
                      f"conc {ts.concentration:8.5f} cons {ts.sign_consensus:.3f} "
                      f"H {ts.entropy_raw:.4f} agree {agree}", flush=True)


if __name__ == "__main__":
    main()
