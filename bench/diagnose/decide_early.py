"""How many of the zoo's PV-keeping seeds could `--decide-early` decide after epoch 2?

With ``decide_early`` a seed is measured at the check epoch (``abort_epoch`` = 2) and decided
there when a candidate already passes rules 1-3 (range, collapse, new). A target can only pass
when its epoch-2 distance already exceeds its T_L (it is a candidate at that epoch). This reads
``bench/results/zoo_detect.jsonl`` (per-epoch training distances as the zoo run recorded them)
and the shipped presets, and counts, for every seed that kept a PV, whether a kept target was a
candidate at epoch 2: an upper bound on the flags decided early, since the epoch-2 concentration
was not recorded. It also counts the clean-model seeds that trained all 4 epochs: each is
measured once more at epoch 2 under ``decide_early`` (a forward pass over the evaluation sample).

The zoo's models are evaluation models of the shipped presets: a development reading.

Run: python bench/diagnose/decide_early.py
"""

from __future__ import annotations

from collections import defaultdict

from zoo_reading import shipped_presets, t_l_of, zoo_rows


def main() -> None:
    presets = shipped_presets()
    t_l = t_l_of(presets)
    rows = zoo_rows()
    kept: dict[tuple[str, int], list[float]] = defaultdict(list)  # epoch-2 distance / T_L
    full_clean = set()
    for r in rows:
        if r["preset"] not in presets:
            continue
        for c in r.get("candidates", []):
            ed = c.get("epoch_distance") or []
            if len(ed) < 4:  # abandoned after epoch 2: never measured early either
                continue
            if c.get("accepted"):
                kept[(r["model"], c["seed"])].append(ed[1] / t_l(r["preset"], c["target"]))
            elif r["label"] == "clean":
                full_clean.add((r["model"], c["seed"]))
    print("| model | seed | best kept target's epoch-2 distance / T_L |")
    print("|---|---|---|")
    for (m, s), v in sorted(kept.items(), key=lambda kv: max(kv[1])):
        print(f"| {m} | {s} | {max(v):.2f} |")
    early = sum(max(v) > 1.0 for v in kept.values())
    print(f"\nPV-keeping seeds with a kept target already a candidate at epoch 2: {early} of "
          f"{len(kept)} (at most these are decided after 2 of 4 epochs)")
    print(f"clean-model seeds that trained 4 epochs (each measured once more at epoch 2): "
          f"{len(full_clean)}")


if __name__ == "__main__":
    main()
