"""The figures of rule 4 (trigger confirmation) for every trigger the audits' reports recorded,
and for triggers named on the command line (a backdoored model's planted ones), recomputed from
the models.

    python bench/diagnose/trigger_figures.py REPORT.json [REPORT.json ...] [--also WORD,WORD]

For each target record with a confirmation it re-runs every trigger length tried (and each
`--also` word, tokenized) on the same held-out sentences and prints:

  rate      share of outputs whose sign agreement with the candidate reaches T_match
  landing   share of the clean corpus's outputs (sentences without the trigger's tokens) that
            sign-match the triggered outputs' mean: the figure rule 4 decides on with the rate
  angle     the residual recorded beside them (auditor.confirm.residual): by angle from the
            clean mean, what earlier versions decided on
  squared   mean ||F_trig - PV||^2 / ||F_clean - PV||^2 (the residual of the first versions)

Reports name their model folder (`model.path`); the folder must still exist. One torch job.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from lmsan.auditor.confirm import ConfirmRule, residual, search_and_test_rows
from lmsan.auditor.mining import Miner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_reading import report_miner  # noqa: E402


def figures(miner: Miner, target: str, pv: np.ndarray, ids: list[int], seed: int) -> dict:
    _, test_idx = search_and_test_rows(miner, ConfirmRule(), seed)  # the audit's held-out rows
    w = miner.emb.weight.detach()
    pv_t = torch.as_tensor(pv, dtype=torch.float32)
    with torch.no_grad():
        f = miner._forward_prompted(test_idx, w[torch.tensor(ids)],
                                    np.random.default_rng([seed, 31]))[target]
        c = miner._clean_batch(test_idx, target)
    agree = ((f >= 0) == (pv_t >= 0)).float().mean(1)
    landing = miner.clean_match(target, f.mean(0).numpy(), without=ids)
    squared = (((f - pv_t) ** 2).sum(1) / ((c - pv_t) ** 2).sum(1).clamp_min(1e-30)).mean()
    return {"rate": float((agree >= miner.cfg.t_match).float().mean()),
            "squared": float(squared), "angle": float(residual(f, c, pv_t)),
            "landing": float(landing)}


def main(argv: list[str]) -> None:
    torch.set_num_threads(2)
    also = [w for i, a in enumerate(argv) if i and argv[i - 1] == "--also" for w in a.split(",")]
    paths = [a for i, a in enumerate(argv) if a != "--also" and not (i and argv[i - 1] == "--also")]
    for p in paths:
        rep, miner = report_miner(p)
        tok = miner.lm.tokenizer
        print(f"# {p} ({Path(rep['model']['path']).name}, verdict {rep['verdict']})")
        seen = set()
        for s in rep["seeds"]:
            for t in s["targets"]:
                c = t.get("confirmation")
                if not c or not c.get("tried") or t.get("pv") is None:
                    continue
                pv = np.asarray(t["pv"], dtype=np.float32)
                trigs = [(tr["tokens"], tr) for tr in c["tried"]]
                trigs += [(tok.tokenize(w), None) for w in also]
                for toks, tr in trigs:
                    key = (s["seed"], t["target"], tuple(toks))
                    if key in seen:
                        continue
                    seen.add(key)
                    ids = tok.convert_tokens_to_ids(toks)
                    fg = figures(miner, t["target"], pv, ids, s["seed"])
                    origin = "searched" if tr is not None else "--also"
                    print(f"  seed {s['seed']:2d} {t['target']:6s} {' '.join(toks):28s} "
                          f"{origin:8s} rate {fg['rate']:.2f} landing {fg['landing']:.4f} "
                          f"angle residual {fg['angle']:.3f} squared {fg['squared']:.3f}",
                          flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
