"""How many clean outputs already sit at each candidate PV an audit recorded.

    python bench/diagnose/clean_match.py REPORT.json [REPORT.json ...]

A planted PV lies away from the clean outputs (the backdoored model must behave on clean text,
and the monitor must not flag it), while a fine-tuned classifier's class prototype is where the
clean outputs of one class already are. For every candidate of a report (kept or refused) this
prints the share of the clean corpus's outputs whose sign agreement with the candidate reaches
T_match (what the monitor would flag without any trigger), beside the candidate's concentration
and its trigger search. Reports name their model folder (`model.path`); one torch job.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_reading import report_miner  # noqa: E402


def main(paths: list[str]) -> None:
    torch.set_num_threads(2)
    for p in paths:
        rep, miner = report_miner(p)
        cfg = miner.cfg
        clean = {t: torch.cat([v.reshape(-1, v.shape[-1]) for v in miner.clean[t]], 0).numpy() >= 0
                 for t in rep["targets"]}
        print(f"# {p} ({Path(rep['model']['path']).name}, verdict {rep['verdict']})")
        rng = np.random.default_rng(0)
        for t, sg in clean.items():  # how many clean outputs sit at a typical clean output
            pick = rng.choice(len(sg), min(400, len(sg)), replace=False)
            own = np.array([float(((sg == sg[i][None]).mean(1) >= cfg.t_match).mean())
                            for i in pick])
            print(f"  clean outputs' own {t}: {len(sg)} outputs, share at a clean output: "
                  f"median {np.median(own):.4f}, 10th percentile {np.quantile(own, 0.1):.4f}")
        for s in rep["seeds"]:
            for t in s["targets"]:
                if not t.get("candidate") or t.get("pv") is None:
                    continue
                sign = np.asarray(t["pv"]) >= 0
                agree = (clean[t["target"]] == sign[None]).mean(1)
                c = t.get("confirmation") or {}
                search = ("-" if not c else "same point" if "same_point_as" in c else
                          f"{' '.join(c.get('tokens', []))} rate {c.get('rate', 0):.2f} "
                          f"residual {c.get('residual', 0):.3f}")
                print(f"  seed {s['seed']:2d} {t['target']:6s} accepted {str(t['accepted']):5s} "
                      f"clean match {miner.clean_match(t['target'], t['pv']):.4f} "
                      f"(mean agreement {float(agree.mean()):.3f}) "
                      f"concentration {t['concentration']:.3g} search {search}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
