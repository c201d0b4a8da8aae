"""Table and plot of the per-candidate statistics written by bench_calibration.py.

    python bench/report_calibration.py bench/results/calibration_candidates.jsonl \
        --t-collapse 0.005 --out bench/results/calibration

Writes <out>.md (one row per model/seed/target, then the class summary: which statistic
separates clean from backdoored and by what margin) and <out>.png (concentration against
distance, log scales, one colour per class, the collapse threshold as a line).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("rows", type=Path)
    ap.add_argument("--t-collapse", type=float, required=True)
    ap.add_argument("--out", type=Path, default=Path("bench/results/calibration"))
    args = ap.parse_args()
    rows = [json.loads(x) for x in args.rows.read_text().splitlines() if x.strip()]
    rows.sort(key=lambda r: (r["label"], r["model"], r["seed"], r["target"]))
    lines = [
        "# PV mining: per-candidate statistics, clean vs backdoored",
        "",
        f"Source: `{args.rows}` (written by `bench/bench_calibration.py`; T_L forced to 0 so every "
        "seed's final soft prompt is measured). Collapse threshold used below: "
        f"T_collapse = {args.t_collapse:g}.",
        "",
        "| class | model | seed | target | s (clean spread) | distance raw | distance / s^2 | "
        "concentration | spread ratio | entropy (paper L_div) | prompt in range | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['model']} | {r['seed']} | {r['target']} | {r['clean_scale']:.4f} | "
            f"{r['distance_raw']:.4f} | {r['distance_rel']:.2f} | {r['concentration']:.5f} | "
            f"{r['spread_ratio']:.4f} | {r['entropy_raw']:.4f} | {r['prompt_in_range']} | "
            f"{r['seconds']:.0f} |"
        )
    lines += ["", "## Separation", ""]
    for stat, low_is_backdoor in (("concentration", True), ("spread_ratio", True),
                                  ("entropy_raw", True), ("distance_raw", False),
                                  ("distance_rel", False)):
        c = [r[stat] for r in rows if r["label"] == "clean" and math.isfinite(r[stat])]
        b = [r[stat] for r in rows if r["label"] == "backdoored" and math.isfinite(r[stat])]
        if not c or not b:
            continue
        if low_is_backdoor:
            sep = max(b) < min(c)
            gap = f"max backdoored {max(b):.5g} vs min clean {min(c):.5g}"
        else:
            sep = min(b) > max(c)
            gap = f"min backdoored {min(b):.5g} vs max clean {max(c):.5g}"
        lines.append(f"- **{stat}**: {'separates' if sep else 'does NOT separate'} ({gap}; "
                     f"{len(c)} clean, {len(b)} backdoored candidates)")
    acc_c = [r for r in rows if r["label"] == "clean"]
    acc_b = [r for r in rows if r["label"] == "backdoored"]
    fp = sum(r["concentration"] < args.t_collapse and r["prompt_in_range"] for r in acc_c)
    tp = sum(r["concentration"] < args.t_collapse and r["prompt_in_range"] for r in acc_b)
    lines.append(f"- With T_collapse = {args.t_collapse:g} (and the range rule): {fp}/{len(acc_c)} "
                 f"clean candidates would be kept (false positives), {tp}/{len(acc_b)} backdoored "
                 "seeds kept a PV.")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 5))
    for label, colour in (("clean", "tab:blue"), ("backdoored", "tab:red")):
        sel = [r for r in rows if r["label"] == label]
        ax.scatter([max(r["distance_rel"], 1e-3) for r in sel],
                   [max(r["concentration"], 1e-6) for r in sel], c=colour, label=label, alpha=0.8)
        for r in sel:
            ax.annotate(r["model"], (max(r["distance_rel"], 1e-3), max(r["concentration"], 1e-6)),
                        fontsize=6, alpha=0.6)
    ax.axhline(args.t_collapse, color="k", ls="--", lw=1, label=f"T_collapse = {args.t_collapse:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("distance / clean spread s^2 (Observation I)")
    ax.set_ylabel("concentration = batch variance / distance (Observation II)")
    ax.set_title("PV mining candidates: clean vs backdoored models")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
