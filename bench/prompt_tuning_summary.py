"""One summary of the prompt-tuning benchmark runs: every attack and backbone in the shape of
the paper's Tables II and III, and the targets counted over all of them.

    python bench/prompt_tuning_summary.py [--out bench/results/prompt_tuning_summary]

Reads the result files of bench/bench_prompt_tuning.py listed in SOURCES (it runs nothing and
measures nothing itself; every figure is the mean over the seeds of a committed result file) and
writes OUT.md and OUT.json. A source that is missing is named in the output, not skipped silently.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from paths import RESULTS


class Source(NamedTuple):
    backbone: str  # the table's label for the backdoored backbone
    stem: str  # result file stem under bench/results
    variant: str  # defence variant (PV set @ threshold rule) of that file
    pvset: str  # "found" or "found+attacker": the two PV sets evaluated
    note: str  # what the variant is
    tasks: tuple[str, ...] | None = None  # only these tasks' rows of the file (None: all)


# The deployments counted, one per backbone and PV set. NeuBA's search set is read at
# the head (--pvs-at-head), the deployment `lmsan tune export --pvs-at-head` makes; its [CLS]-only
# variant is listed too but kept out of the totals (it is the same PV set's weaker deployment).
SOURCES = [
    Source("MiniLM-3 POR", "prompt_tuning_per_pv_tw", "found+attacker@per-pv", "found+attacker",
           "search set (4 PVs) + attacker PVs no found PV matches at >= 0.95"),
    Source("MiniLM-3 POR", "prompt_tuning_por_at_head", "found@per-pv", "found",
           "search set, every PV at the head (--pvs-at-head; CoNLL04: at every token only, "
           "without the [CLS] copies)"),
    Source("MiniLM-3 NeuBA", "prompt_tuning_neuba", "found+attacker@per-pv", "found+attacker",
           "search set's [CLS] PVs + attacker PVs"),
    Source("MiniLM-3 NeuBA", "prompt_tuning_neuba_at_head", "found@per-pv", "found",
           "search set, every PV at the head (--pvs-at-head; CoNLL04: at every token only, "
           "without the [CLS] copies)"),
    Source("MiniLM-3 BToP", "prompt_tuning_btop", "found+attacker@per-pv", "found+attacker",
           "search set's [MASK] PVs + attacker PVs; heads on [MASK]"),
    Source("MiniLM-3 BToP", "prompt_tuning_btop", "found@per-pv", "found",
           "search set's [MASK] PVs; heads on [MASK]"),
    Source("MiniLM-3 POR-NER", "prompt_tuning_porner", "found+attacker@per-pv", "found+attacker",
           "search set's token PVs + attacker PVs no found PV matches at >= 0.95; CoNLL04 heads"),
    Source("MiniLM-3 POR-NER", "prompt_tuning_porner", "found@per-pv", "found",
           "search set's token PVs; CoNLL04 heads"),
    Source("MiniLM-6 POR", "prompt_tuning_por6", "found+attacker@per-pv", "found+attacker",
           "search set at the head + attacker PVs no found PV matches at >= 0.95; WordNet",
           ("wordnet-topic",)),
    Source("MiniLM-6 POR", "prompt_tuning_por6", "found@per-pv", "found",
           "search set, every PV at the head (--pvs-at-head); WordNet", ("wordnet-topic",)),
    # the same 8-seed search set on RTE (seed 0, P-tuning: one RTE defence with 6 triggers took
    # 26 min on a 2-core CPU) and CoNLL04 (3 seeds) with --pvs-at-head for token heads: every
    # PV at every token and at [CLS]
    Source("MiniLM-6 POR", "prompt_tuning_por6_rte", "found+attacker@per-pv", "found+attacker",
           "search set at the head + attacker PVs; RTE"),
    Source("MiniLM-6 POR", "prompt_tuning_por6_rte", "found@per-pv", "found",
           "search set, every PV at the head; RTE"),
    Source("MiniLM-6 POR", "prompt_tuning_por6_conll04", "found+attacker@per-pv",
           "found+attacker", "search set + attacker PVs at every token and at [CLS]; CoNLL04"),
    Source("MiniLM-6 POR", "prompt_tuning_por6_conll04", "found@per-pv", "found",
           "search set at every token and at [CLS]; CoNLL04"),
    Source("MiniLM-6 NeuBA", "prompt_tuning_neuba6", "found+attacker@per-pv", "found+attacker",
           "search set (2 seeds) at the head + attacker PVs no found PV matches at >= 0.95; "
           "CoNLL04: PVs at tokens and [CLS]"),
    Source("MiniLM-6 NeuBA", "prompt_tuning_neuba6", "found@per-pv", "found",
           "search set (2 seeds), every PV at the head; CoNLL04: PVs at tokens and [CLS]"),
    Source("MiniLM-6 BToP", "prompt_tuning_btop6", "found+attacker@per-pv", "found+attacker",
           "search set's [MASK] PVs (2 seeds) + attacker PVs; heads on [MASK]"),
]
EXTRA = [  # listed for comparison, not counted in the totals
    Source("MiniLM-3 NeuBA", "prompt_tuning_neuba", "found@per-pv", "found",
           "search set's [CLS] PVs only (no --pvs-at-head)"),
    # prompt_tuning_por6_conll04 measures the same search set with the PVs also kept at [CLS]
    Source("MiniLM-6 POR", "prompt_tuning_por6", "found+attacker@per-pv", "found+attacker",
           "CoNLL04 seed 0, PVs at every token only (without the [CLS] copies)",
           ("conll04",)),
    Source("MiniLM-6 POR", "prompt_tuning_por6", "found@per-pv", "found",
           "CoNLL04 seed 0, PVs at every token only (without the [CLS] copies)",
           ("conll04",)),
]


def mean(xs: list[float]) -> float:
    return float(np.mean(xs)) if xs else float("nan")


def settings(src: Source, data: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per (task, method, seed) row of the file that has the variant."""
    out = []
    for r in data["rows"]:
        d = r.get("defence", {}).get(src.variant)
        if d is None or (src.tasks is not None and r["task"] not in src.tasks):
            continue
        out.append({"task": r["task"], "method": r["method"], "seed": r["seed"], "d": d,
                    "clean": r[next(k for k in r if k not in
                                    ("task", "method", "seed", "defence", data["attack"]))],
                    "bd": r[data["attack"]]})
    return out


def counts(ss: list[dict[str, Any]]) -> dict[str, Any]:
    d = [s["d"] for s in ss]
    pool = [x["pool"] for x in d if "pool" in x]
    return {
        "settings": len(d),
        "asr_ok": sum(x["asr_after"] <= 1.0 for x in d),
        "acc_ok": sum(abs(x["acc_after"] - x["acc_before"]) <= 0.2 for x in d),
        "frr_ok": sum(x["frr"] <= 0.5 for x in d),
        "pooled": len(pool),
        "frr_pool_ok": sum(x["frr"] <= 0.5 for x in pool),
        "acc_pool_ok": sum(abs(x["acc_after"] - x["acc_before"]) <= 0.2 for x in pool),
        "asr_before": mean([x["asr_before"] for x in d]),
        "asr_after": mean([x["asr_after"] for x in d]),
        "acc_change": mean([x["acc_after"] - x["acc_before"] for x in d]),
        "abs_acc_change": mean([abs(x["acc_after"] - x["acc_before"]) for x in d]),
        "frr": mean([x["frr"] for x in d]),
        "far": mean([x["far"] for x in d]),
        "frr_pool": mean([x["frr"] for x in pool]),
        "acc_change_pool": mean([x["acc_after"] - x["acc_before"] for x in pool]),
        "abs_acc_change_pool": mean([abs(x["acc_after"] - x["acc_before"]) for x in pool]),
    }


def frac(k: int, n: int) -> str:
    return f"{k}/{n}" if n else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS / "prompt_tuning_summary"), help="Output stem.")
    args = ap.parse_args()
    loaded: dict[str, dict[str, Any]] = {}
    missing: list[str] = []
    for src in SOURCES + EXTRA:
        p = RESULTS / f"{src.stem}.json"
        if src.stem in loaded or src.stem in missing:
            continue
        if p.is_file():
            loaded[src.stem] = json.loads(p.read_text())
        else:
            missing.append(src.stem)

    per_src: list[tuple[Source, list[dict[str, Any]], bool]] = []
    for src, counted in [(s, True) for s in SOURCES] + [(s, False) for s in EXTRA]:
        if src.stem in loaded:
            ss = settings(src, loaded[src.stem])
            if ss:
                per_src.append((src, ss, counted))
            else:
                missing.append(f"{src.stem} [{src.variant}]")

    lines = [
        "# Prompt-tuned models under every attack: summary (paper Tables II and III, reduced)",
        "",
        "Made by `python bench/prompt_tuning_summary.py` from the result files below (means over "
        "seeds; each file names its command, machine and time). Nothing is re-measured here.",
        "",
    ]
    if missing:
        lines += [f"Not in this summary (no result file or no such variant): "
                  f"{', '.join(missing)}.", ""]
    for stem, data in loaded.items():  # a mined set that kept nothing is no deployment
        note = data.get("found_pvset", {}).get("note")
        if note:
            lines += [f"`{stem}`: {note} (mined: {data['found_pvset'].get('seeds_run')} "
                      f"seeds, {data['found_pvset'].get('seconds')} s).", ""]

    # Table II: accuracy of the task models, clean vs backdoored backbone, and ASR without defence
    lines += [
        "## Table II: task accuracy on the clean / backdoored backbone and ASR without defence (%)",
        "",
        "conll04: entity span F1. ASR: share of the correctly classified test inputs whose "
        "prediction some trigger makes wrong (token task: whose entity spans change).",
        "",
        "| backbone | method | task | seeds | ACC clean | ACC backdoored | ASR (backdoored) "
        "| ASR (clean backbone) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    seen: set[tuple[str, str, str]] = set()
    t2 = []
    for src, ss, _ in per_src:
        for method in ("ptuning", "ptuning-v2"):
            for task in ("wordnet-topic", "rte", "conll04"):
                key = (src.backbone, method, task)
                sel = [s for s in ss if s["method"] == method and s["task"] == task]
                if not sel or key in seen:
                    continue
                seen.add(key)
                row = {
                    "backbone": src.backbone, "method": method, "task": task,
                    "seeds": sorted(s["seed"] for s in sel),
                    "acc_clean": mean([s["clean"]["acc"] for s in sel]),
                    "acc_backdoored": mean([s["bd"]["acc"] for s in sel]),
                    "asr": mean([s["bd"]["asr"] for s in sel]),
                    "asr_clean_backbone": mean([s["clean"]["asr"] for s in sel]),
                }
                t2.append(row)
                lines.append(
                    f"| {src.backbone} | {method} | {task} | {len(sel)} | {row['acc_clean']:.2f} "
                    f"| {row['acc_backdoored']:.2f} | {row['asr']:.2f} "
                    f"| {row['asr_clean_backbone']:.2f} |"
                )

    # Table III: ASR with / without defence per deployment
    lines += [
        "",
        "## Table III: ASR without / with the monitor and purge, and its cost (%)",
        "",
        "Per deployment (backbone x PV set x threshold rule), over its settings (task x method x "
        "seed). FRR test: clean test inputs flagged (RTE and CoNLL04: 100 per setting, one input "
        "= 1 point); FRR pool: a held-out clean pool of about 340-1470 labelled inputs per "
        "setting that neither trained the task model nor chose its thresholds; ACC change: "
        "after - before the defence, mean (and mean of |change|).",
        "",
        "| backbone | PV set | deployment | settings | ASR before -> after | ASR <= 1% "
        "| FAR | ACC change test (abs) | FRR test | FRR pool | ACC change pool (abs) "
        "| \\|ACC change\\| <= 0.2 test / pool | FRR <= 0.5% test / pool | in totals |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    t3 = []
    for src, ss, counted in per_src:
        c = counts(ss)
        t3.append({**src._asdict(), **c, "in_totals": counted})
        lines.append(
            f"| {src.backbone} | {src.pvset} | {src.note} (`{src.stem}`) | {c['settings']} "
            f"| {c['asr_before']:.1f} -> {c['asr_after']:.2f} | {frac(c['asr_ok'], c['settings'])} "
            f"| {c['far']:.2f} | {c['acc_change']:+.2f} ({c['abs_acc_change']:.2f}) "
            f"| {c['frr']:.2f} | {c['frr_pool']:.2f} "
            f"| {c['acc_change_pool']:+.2f} ({c['abs_acc_change_pool']:.2f}) "
            f"| {frac(c['acc_ok'], c['settings'])} / {frac(c['acc_pool_ok'], c['pooled'])} "
            f"| {frac(c['frr_ok'], c['settings'])} / {frac(c['frr_pool_ok'], c['pooled'])} "
            f"| {'yes' if counted else 'no'} |"
        )

    # per task for the ASR target: where the misses are
    lines += ["", "ASR after defence <= 1%, by task (deployments in the totals):", "",
              "| PV set | " + " | ".join(("wordnet-topic", "rte", "conll04")) + " |",
              "|---|---|---|---|"]
    for pv in ("found", "found+attacker"):
        cells = []
        for task in ("wordnet-topic", "rte", "conll04"):
            d = [s["d"] for src, ss, counted in per_src if counted and src.pvset == pv
                 for s in ss if s["task"] == task]
            cells.append(frac(sum(x["asr_after"] <= 1.0 for x in d), len(d)))
        lines.append(f"| {pv} | " + " | ".join(cells) + " |")

    totals = {}
    lines += ["", "## Targets, over every setting of the deployments in the totals", ""]
    for pv in ("found+attacker", "found", "both"):
        ss = [s for src, sss, counted in per_src if counted and (pv == "both" or src.pvset == pv)
              for s in sss]
        c = counts(ss)
        totals[pv] = c
        n = c["settings"]
        lines += [
            f"**{pv}** ({n} settings):",
            "",
            f"- ASR after defence <= 1%: {frac(c['asr_ok'], n)} "
            f"({100 * c['asr_ok'] / max(1, n):.0f}%; target >= 80%)",
            f"- accuracy change within 0.2 points: {frac(c['acc_ok'], n)} on the test split, "
            f"{frac(c['acc_pool_ok'], c['pooled'])} on the held-out pool; mean |change| "
            f"{c['abs_acc_change']:.2f} test / {c['abs_acc_change_pool']:.2f} pool "
            "(paper: 0.075 average)",
            f"- FRR <= 0.5%: {frac(c['frr_ok'], n)} on the test split, "
            f"{frac(c['frr_pool_ok'], c['pooled'])} on the held-out pool; mean FRR "
            f"{c['frr']:.2f}% test / {c['frr_pool']:.2f}% pool",
            "",
        ]
    lines += [
        "Sources: " + ", ".join(f"`bench/results/{s}.md`" for s in loaded) + ".",
    ]
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(
        {"command": "python bench/prompt_tuning_summary.py", "sources": sorted(loaded),
         "missing": missing, "table_ii": t2, "table_iii": t3, "totals": totals}, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
