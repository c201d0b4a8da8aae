"""Would abandoning a seed after its first epoch lose PVs? Read from the zoo's recorded seeds.

The audit abandons a seed after epoch 2 (``abort_epoch``) when no target's mean epoch distance
exceeds its T_L. A rule that abandoned after epoch 1 would halve the time of every clean seed.
This reads ``bench/results/zoo_detect.jsonl`` (every candidate's per-epoch distances, as the zoo
run recorded them) and the shipped presets, and prints, for every kept PV, its epoch-1 and
epoch-2 distances as multiples of its target's T_L, and how many kept PVs an epoch-1 check at
T_L x f would have abandoned (a seed survives when any of its targets passes).

The zoo's models are evaluation models of the shipped presets: this is a development reading,
not a calibration of a new rule.

Run: python bench/diagnose/early_abandon.py
"""

from __future__ import annotations

from collections import defaultdict

from zoo_reading import shipped_presets, t_l_of, zoo_rows


def main() -> None:
    presets = shipped_presets()
    t_l = t_l_of(presets)
    rows = zoo_rows()
    seeds: dict[tuple[str, int], dict[str, tuple[float, float]]] = defaultdict(dict)
    kept: list[tuple[str, int, str]] = []
    clean_models = {r["model"] for r in rows if r["label"] == "clean"}
    for r in rows:
        if r["preset"] not in presets:
            continue
        for c in r.get("candidates", []):
            ed = c.get("epoch_distance") or []
            if len(ed) < 2:
                continue
            tl = t_l(r["preset"], c["target"])
            seeds[(r["model"], c["seed"])][c["target"]] = (ed[0] / tl, ed[1] / tl)
            if c.get("accepted"):
                kept.append((r["model"], c["seed"], c["target"]))
    print("| model | seed | target | epoch 1 / T_L | epoch 2 / T_L | best target at epoch 1 |")
    print("|---|---|---|---|---|---|")
    for m, s, t in sorted(kept, key=lambda k: seeds[k[:2]][k[2]][0]):
        e1, e2 = seeds[(m, s)][t]
        best = max(v[0] for v in seeds[(m, s)].values())
        print(f"| {m} | {s} | {t} | {e1:.2f} | {e2:.2f} | {best:.2f} |")
    seeds_kept = {(m, s) for m, s, _ in kept}
    print()
    clean = [k for k in seeds if k[0] in clean_models]
    # a clean seed abandoned after epoch 2 today costs 2 epochs; after epoch 1, one
    ab2 = [k for k in clean if max(v[1] for v in seeds[k].values()) <= 1.0]
    print("| epoch-1 check at T_L x | kept-PV seeds abandoned | clean-model seeds abandoned "
          "at epoch 1 | of those abandoned at epoch 2 today |")
    print("|---|---|---|---|")
    for f in (1.0, 0.5, 0.25, 0.1):
        lost = [k for k in seeds_kept if max(v[0] for v in seeds[k].values()) <= f]
        early = [k for k in ab2 if max(v[0] for v in seeds[k].values()) <= f]
        print(f"| {f:g} | {len(lost)} of {len(seeds_kept)} | {len(early)} | {len(ab2)} |")


if __name__ == "__main__":
    main()
