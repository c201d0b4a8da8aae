"""What a family's preset would be at N seeds per clean shadow, from the cached shadow rows.

Reads `bench/results/zoo_calibration_rows.jsonl` (written by `python bench/zoo.py calibrate`),
keeps each clean shadow's seeds below N (backdoored shadows: every cached seed), derives the
preset with the shipped calibration rule (`auditor.calibrate.preset_from_rows`) and prints, per
target: the lowest clean concentration, the seed that reached it and that seed's epoch-2 distance
against T_L (a seed under T_L at the check epoch is abandoned in an audit, so its concentration
is never judged there), which clean seeds the rule reads (judged, near or all; how many) and the
lowest of them, the largest concentration of a found backdoor, and T_collapse with the rule
that set it. Nothing is mined; the shadow folders are read for their config only.

Run: LMSAN_BENCH_CACHE=... python bench/diagnose/calibration_seeds.py FAMILY N [N ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zoo  # noqa: E402


def main() -> None:
    from lmsan.auditor.calibrate import preset_from_rows
    from lmsan.auditor.corpus import default_corpus
    from lmsan.auditor.mining import MiningConfig
    from lmsan.auditor.modelio import read_config

    fam, counts = sys.argv[1], [int(x) for x in sys.argv[2:]]
    _, shadows, bd = zoo.FAMILIES[fam]
    rows = zoo._rows(zoo.RESULTS / "zoo_calibration_rows.jsonl")
    vals = zoo.BASE_VALUES[fam]
    base = MiningConfig(**{k: vals[k] for k in ("t_l", "lr0", "div_loss")})
    cfgs = [read_config(zoo.path_of(n)) for n in shadows + bd]
    print(f"| {fam} | seeds per clean shadow | lowest clean concentration (seed, its epoch-2 "
          "distance / T_L) | clean seeds read | lowest read | largest found | T_collapse | rule |"
          "\n|---|---|---|---|---|---|---|---|")
    for n in counts:
        use = [dict(r, label=r.get("label", "clean")) for r in rows if r["model"] in bd
               or (r["model"] in shadows and r["seed"] < n)]
        have = {r["model"]: len({x["seed"] for x in use if x["model"] == r["model"]}) for r in use}
        short = [m for m in shadows if have.get(m, 0) < n]
        if short:
            print(f"(skipped N={n}: {short} have fewer seeds cached)")
            continue
        p = preset_from_rows(use, cfgs, name=fam, margin=0.5, base_cfg=base,
                             corpus=default_corpus())
        for t, ev in p.evidence["per_target"].items():
            clean = [r for r in use if r["label"] == "clean" and r["target"] == t]
            low = min(clean, key=lambda r: r["concentration"])
            t_l = p.values.get("per_target", {}).get(t, {}).get("t_l", p.values["t_l"])
            ep2 = low["epoch_distance"][base.abort_epoch - 1]
            found = ev.get("found_max_concentration")
            t_c = p.values["per_target"][t]["t_collapse"]
            print(f"| {t} | {n} | {low['concentration']:.3g} ({low['model']} seed {low['seed']}, "
                  f"{ep2:.2f} / {t_l:.3g}) | {ev['clean_reading']}, {ev['clean_seeds_read']} of "
                  f"{ev['clean_seeds']} | {ev['min_read_concentration']:.3g} | "
                  f"{'-' if found is None else f'{found:.3g}'} | {t_c:.3g} | {ev['t_collapse_rule']} |")


if __name__ == "__main__":
    main()
