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
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("rows", type=Path)
    ap.add_argument(
        "--t-collapse",
        action="append",
        required=True,
        help="FAMILY=VALUE: collapse threshold of the family's preset (repeatable)",
    )
    ap.add_argument(
        "--t-l",
        action="append",
        required=True,
        help="FAMILY=VALUE: distance threshold (T_L, distance / mean square)",
    )
    ap.add_argument(
        "--family",
        action="append",
        required=True,
        help="MODEL=FAMILY (repeatable): which preset family a model belongs to",
    )
    ap.add_argument(
        "--msq",
        action="append",
        default=[],
        help="MODEL=VALUE: mean square of the clean outputs, for rows that carry no "
        "distance_norm",
    )
    ap.add_argument("--out", type=Path, default=Path("bench/results/calibration"))
    args = ap.parse_args()
    rows = [json.loads(x) for x in args.rows.read_text().splitlines() if x.strip()]
    fam = dict(x.split("=", 1) for x in args.family)
    tcol = {k: float(v) for k, v in (x.split("=", 1) for x in args.t_collapse)}
    tl = {k: float(v) for k, v in (x.split("=", 1) for x in args.t_l)}
    msq = {k: float(v) for k, v in (x.split("=", 1) for x in args.msq)}
    for r in rows:
        r["family"] = fam.get(r["model"], "?")
        r["config"] = r.get("config") or "div_loss=entropy (paper)"
        if r.get("distance_norm") is None and r["model"] in msq:
            r["distance_norm"] = r["distance_raw"] / msq[r["model"]]
            r["epoch_norm"] = [d * 1.0 for d in r["epoch_distance"]]
    rows.sort(key=lambda r: (r["family"], r["config"], r["label"], r["model"], r["seed"]))
    lines = [
        "# PV mining: per-candidate statistics, clean vs backdoored",
        "",
        f"Source: `{args.rows}` (written by `bench/bench_calibration.py`; T_L forced to 0 so every "
        "seed's final soft prompt is measured). `agree` = best sign agreement of the found output "
        "with an injected PV (backdoored models).",
        "",
        "| family | mining config | class | model | seed | distance raw | distance / mean sq. | "
        "distance / s^2 | concentration | spread ratio | entropy (paper L_div) | agree | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        dn = r.get("distance_norm")
        ag = r.get("injected_agreement")
        lines.append(
            f"| {r['family']} | {r['config']} | {r['label']} | {r['model']} | {r['seed']} | "
            f"{r['distance_raw']:.4f} | {dn if dn is None else round(dn, 3)} | "
            f"{r['distance_rel']:.2f} | {r['concentration']:.5f} | {r['spread_ratio']:.4f} | "
            f"{r['entropy_raw']:.4f} | {ag if ag is None else round(ag, 3)} | {r['seconds']:.0f} |"
        )
    lines += ["", "## Decisions with each family's preset (final prompt of every seed)", ""]
    for r in rows:
        f = r["family"]
        if f not in tcol or r.get("distance_norm") is None:
            continue
        keep = r["distance_norm"] > tl[f] and r["concentration"] < tcol[f] and r["prompt_in_range"]
        ok = keep == (r["label"] == "backdoored")
        lines.append(
            f"- {f} / {r['config']} / {r['model']} seed {r['seed']} ({r['label']}): "
            f"distance {r['distance_norm']:.3f} vs T_L {tl[f]:g}, concentration "
            f"{r['concentration']:.5f} vs T_collapse {tcol[f]:g} -> "
            f"{'PV kept' if keep else 'no PV'} ({'right' if ok else 'WRONG'})"
        )
    lines += ["", "## Separation per family and mining config", ""]
    groups = sorted({(r["family"], r["config"]) for r in rows})
    for g in groups:
        grp = [r for r in rows if (r["family"], r["config"]) == g]
        for stat, low_is_backdoor in (
            ("concentration", True),
            ("spread_ratio", True),
            ("entropy_raw", True),
            ("distance_norm", False),
        ):
            c = [r[stat] for r in grp if r["label"] == "clean" and r.get(stat) is not None]
            b = [r[stat] for r in grp if r["label"] == "backdoored" and r.get(stat) is not None]
            if not c or not b:
                continue
            if low_is_backdoor:
                sep = max(b) < min(c)
                gap = f"max backdoored {max(b):.5g} vs min clean {min(c):.5g}"
            else:
                sep = min(b) > max(c)
                gap = f"min backdoored {min(b):.5g} vs max clean {max(c):.5g}"
            lines.append(
                f"- {g[0]}, {g[1]}: **{stat}** {'separates' if sep else 'does NOT separate'} ({gap}; "
                f"{len(c)} clean, {len(b)} backdoored candidates)"
            )
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
        sel = [r for r in sel if r.get("distance_norm") is not None]
        ax.scatter(
            [max(r["distance_norm"], 1e-4) for r in sel],
            [max(r["concentration"], 1e-6) for r in sel],
            c=colour,
            label=label,
            alpha=0.8,
        )
        for r in sel:
            ax.annotate(
                f"{r['model']} s{r['seed']}",
                (max(r["distance_norm"], 1e-4), max(r["concentration"], 1e-6)),
                fontsize=6,
                alpha=0.7,
            )
    for f, v in tcol.items():
        ax.axhline(v, ls="--", lw=1, label=f"T_collapse {f} = {v:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("distance / mean square of clean outputs (Observation I)")
    ax.set_ylabel("concentration = batch variance / distance (Observation II)")
    ax.set_title("PV mining candidates: clean vs backdoored models")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
