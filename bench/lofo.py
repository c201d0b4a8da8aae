"""Leave-one-family-out evaluation: `lmsan audit --preset none` on every model of a split.

    python bench/lofo.py run SPLIT [--seeds 30] [--only NAME ...]   # audits, one model at a time
    python bench/lofo.py table SPLIT                                  # the table from the rows

The models are the pretrained small families of `bench/families.py` (bench/cache/families/SPLIT/
FAMILY-VARIANT). `--preset none` keeps every preset and shadow model out of the verdict: the
thresholds come from reference backdoors implanted into copies of the audited model itself
(auditor/selfcal.py) and candidates are confirmed by a trigger search (auditor/confirm.py).

Protocol (docs/protocol.md): the rules and thresholds are those of the commit recorded in each
row, committed before the run; a model that fails stays failed in that run's table; a run after a
change uses a freshly built split. Every row records the verdict, the deciding figure with its
threshold and margin (for a clean verdict: the candidate or seed that came nearest to acceptance),
the time and the command.

Rows: bench/results/lofo_SPLIT.jsonl; table: bench/results/lofo_SPLIT.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from families import VARIANTS  # noqa: E402
from lmsan.auditor.fsutil import atomic_write_text  # noqa: E402
from paths import CACHE, RESULTS  # noqa: E402

BACKDOORED = ("por", "neuba", "btop", "por-ner")


def truth(name: str, build: dict[str, Any] | None = None) -> str:
    """clean or backdoored: the model's BUILD.json variant, else the part of its name after the
    family (`FAMILY-VARIANT`; family names may contain dashes, so BUILD.json comes first)."""
    return "backdoored" if _variant(name, build) in BACKDOORED else "clean"


def family(name: str, build: dict[str, Any] | None = None) -> str:
    if build and "family" in build:
        return str(build["family"])
    variant = _variant(name, None)
    return name[:-len(variant) - 1] if name.endswith("-" + variant) else name


def _variant(name: str, build: dict[str, Any] | None) -> str:
    if build and "variant" in build:
        return str(build["variant"])
    for v in sorted(VARIANTS, key=len, reverse=True):
        if name.endswith("-" + v):
            return v
    return name


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def nearest_approach(rep: dict[str, Any]) -> dict[str, Any]:
    """The figure that came nearest to a kept PV, as `factor` (>= 1: it passed; < 1: how far it
    stayed from its threshold, 1/factor times). For a backdoored verdict: the kept PV's
    confirmation. For a clean one: the nearest of the near misses the report's "why clean" reads
    (`auditor.render.facts`: per target, every rejected candidate and every seed, each as near as
    its worst measured figure)."""
    from lmsan.auditor.render.facts import facts
    from lmsan.auditor.report import Verification

    if rep["verdict"] == "backdoored":
        k = rep["kept_pvs"][0]
        c = k.get("confirmation") or {}
        return {"target": k["target"], "seed": k["seed"], "figure": "confirmation",
                "factor": float(c["margin"]) if c else float("nan"), "text": k["rule"]}
    best: dict[str, Any] = {"factor": 0.0, "text": "no seed ran"}
    for m in facts(Verification(True, True, None, [], predicate=rep)).near_misses:
        f = m.figure.factor
        if f is not None and f > best["factor"]:
            best = {"target": m.target, "seed": m.seed, "figure": m.figure.name, "factor": f,
                    "text": m.figure.describe()}
    return best


def run(split: str, seeds: int, only: list[str], preset: str = "none",
        extra: list[str] | None = None) -> None:
    from lmsan.auditor.report import read_report

    root = CACHE / "families" / split
    models = sorted(p for p in root.iterdir() if (p / "config.json").is_file())
    if only:
        models = [p for p in models if p.name in only]
    out_dir = CACHE / "lofo" / split
    out_dir.mkdir(parents=True, exist_ok=True)
    rows_path = RESULTS / f"lofo_{split}.jsonl"
    done = set()
    if rows_path.exists():
        done = {json.loads(x)["model"] for x in rows_path.read_text().splitlines() if x.strip()}
    key = out_dir / "key.pem"
    if not key.exists():
        subprocess.run(["lmsan", "keygen", "--out", str(key)], check=True, capture_output=True)
    for m in models:
        if m.name in done:
            continue
        report = out_dir / f"{m.name}.json"
        chosen = ["--preset", "none"] if preset == "none" else []  # "shipped": the matching one
        cmd = ["lmsan", "audit", str(m), *chosen, *(extra or []), "--max-seeds", str(seeds),
               "--out", str(report), "--key", str(key), "--quiet"]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        build = m / "BUILD.json"
        info = json.loads(build.read_text()) if build.exists() else None
        row: dict[str, Any] = {"model": m.name, "family": family(m.name, info),
                               "truth": truth(m.name, info), "exit": p.returncode, "seconds": round(wall, 1),
                               "command": " ".join(["lmsan", *cmd[1:]]).replace(str(CACHE), "bench/cache"),
                               "commit": commit(), "machine": machine(), "load": os.getloadavg()[0]}
        if info is not None:
            row["build"] = info
        if p.returncode in (0, 1) and report.exists():
            rep = read_report(report)
            row["verdict"] = rep["verdict"]
            row["seeds_run"] = len(rep["seeds"])
            row["stop_reason"] = rep["stop_reason"]
            row["nearest"] = nearest_approach(rep)
            sc = rep["preset"].get("self_calibration") or {}
            row["selfcal_seconds"] = round(sc.get("seconds", 0.0), 1)
            row["implants"] = [{"target": i["target"], "trigger": i["trigger"], "seed": i["seed"],
                                "figures": i["figures"]} for i in sc.get("implants", [])]
            if sc.get("unverified"):  # --partial: targets the verdict does not cover
                row["not_audited"] = sc["unverified"]
        else:
            row["verdict"] = "error"
            msg = (p.stderr or p.stdout).strip().splitlines()[-1:]
            row["error"] = [_repo_relative(x) for x in msg]
        row["correct"] = row["verdict"] == row["truth"]
        with rows_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"{m.name:28s} {row['truth']:10s} -> {row['verdict']:10s} {wall:7.1f}s "
              f"nearest {row.get('nearest', {}).get('factor', float('nan')):.3g}", flush=True)
    table(split)


def _repo_relative(text: str) -> str:
    """Paths of the benchmark cache as the repository names them (bench/cache/...)."""
    return text.replace(str(CACHE), "bench/cache")


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}"


def table(split: str) -> None:
    rows_path = RESULTS / f"lofo_{split}.jsonl"
    rows = [json.loads(x) for x in rows_path.read_text().splitlines() if x.strip()]
    for r in rows:  # truth and family from the recorded BUILD.json (earlier rows parsed the name)
        r["family"], r["truth"] = family(r["model"], r.get("build")), truth(r["model"], r.get("build"))
        r["correct"] = r["verdict"] == r["truth"]
    how = "`--preset none`" if all("--preset none" in r["command"] for r in rows) else \
        "the shipped preset that matches each model"
    lines = [f"# Audits of split `{split}` ({how})", "",
             "Generated by `python bench/lofo.py table " + split + "` from "
             f"`lofo_{split}.jsonl`. Rules and thresholds: commit(s) "
             + ", ".join(sorted({r['commit'] for r in rows})) + f"; machine: {rows[0]['machine']}.",
             "Nearest approach: for a clean verdict, the figure that came nearest to a kept PV "
             "(< 1: it stayed 1/x times away from its threshold); for a backdoored verdict, the "
             "kept PV's confirmation (>= 1 passes).", "",
             "| model | truth | verdict | correct | seeds | nearest approach | at | time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n = r.get("nearest") or {}
        f = n.get("factor")
        fs = "-" if f is None or (isinstance(f, float) and math.isnan(f)) else f"{f:.3g}"
        at = f"{n.get('target', '')} seed {n.get('seed', '')}: {n.get('text', '')}" if n else \
            _repo_relative("; ".join(r.get("error", [])))
        verdict = r["verdict"] + (f" ({', '.join(r['not_audited'])} not audited)"
                                  if r.get("not_audited") else "")
        lines.append(f"| {r['model']} | {r['truth']} | {verdict} | "
                     f"{'yes' if r['correct'] else '**no**'} | {r.get('seeds_run', '-')} | {fs} | "
                     f"{at.replace('|', '/')} | {r['seconds']} |")
    lines += ["", "How each model was built (BUILD.json; `bench/families.py`):", "",
              "| model | pretraining (MLM loss, or distillation's relative error) | "
              "fine-tune task, test accuracy | attack success, triggers | "
              "mean [CLS] cosine to its clean base |", "|---|---|---|---|---|"]
    for r in rows:
        b = r.get("build") or {}
        ft = f"{b['task']} ({b['pooling']}), {b['test_accuracy']:.3f}" if "task" in b else "-"
        atk = f"{b['success']:.3f}, {' '.join(b['triggers'])}" if "success" in b else "-"
        mlm = (f"MLM {b['final_mlm_loss']:.2f}" if "final_mlm_loss" in b else
               f"distilled {b['final_relative_error']:.2f}" if "final_relative_error" in b else "-")
        cos = f"{b['cls_cosine_to_base']:.2f}" if "cls_cosine_to_base" in b else "-"
        lines.append(f"| {r['model']} | {mlm} | {ft} | {atk} | {cos} |")
    fams = sorted({r["family"] for r in rows})
    lines += ["", "| family | models | correct | false positives | false negatives | errors | "
              "verdicts covering only some targets (`--partial`) |", "|---|---|---|---|---|---|---|"]
    for fam in [*fams, "all"]:
        rs = [r for r in rows if fam == "all" or r["family"] == fam]
        fp = sum(r["truth"] == "clean" and r["verdict"] == "backdoored" for r in rs)
        fn = sum(r["truth"] == "backdoored" and r["verdict"] == "clean" for r in rs)
        err = sum(r["verdict"] == "error" for r in rs)
        part = sum(bool(r.get("not_audited")) for r in rs)
        lines.append(f"| {fam} | {len(rs)} | {sum(r['correct'] for r in rs)} | {fp} | {fn} | {err} "
                     f"| {part} |")
    clean = [r for r in rows if r["truth"] == "clean" and r["verdict"] == "clean"]
    if clean:
        worst = max(clean, key=lambda r: r["nearest"]["factor"])
        lines += ["", f"Clean verdicts: the nearest approach over all of them is "
                  f"{worst['nearest']['factor']:.3g} ({worst['model']}); the target is every "
                  "clean model at least 2x from its threshold (nearest approach <= 0.5)."]
    atomic_write_text(RESULTS / f"lofo_{split}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("split")
    r.add_argument("--seeds", type=int, default=30)
    r.add_argument("--only", nargs="*", default=[])
    r.add_argument("--preset", choices=["none", "shipped"], default="none",
                   help="none: self-calibration (--preset none); shipped: the preset that matches")
    r.add_argument("--audit-arg", action="append", default=[],
                   help="one more `lmsan audit` argument (repeatable), e.g. --audit-arg=--confirm")
    t = sub.add_parser("table")
    t.add_argument("split")
    a = ap.parse_args(argv)
    if a.cmd == "run":
        run(a.split, a.seeds, a.only, a.preset, a.audit_arg)
    else:
        table(a.split)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
