"""`lmsan audit`: detection (stop at the first kept PV) and search (collect the PV set).

`run_audit` mines and returns data (`AuditResult`); `audit_and_write` runs it and writes the
signed report and the PV set file, which is what `lmsan audit` does.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .corpus import Corpus, load_corpus
from .errors import InputError, UsageError
from .fsutil import atomic_write_text
from .modelio import LoadedModel, load_encoder, read_config, resolve_device
from .presets import PresetChoice, choose_preset, default_preset
from .pvset import PV, TARGETS, PVSet
from .report import ReportInfo, write_signed_report
from .signing import load_private_key

TARGET_CHOICES = ("auto", *TARGETS)
PRESET_NONE = "none"  # --preset none: self-calibrate (auditor.selfcal)
# allowed values of the MiningConfig fields that take a name
OVERRIDE_CHOICES = {"filter_rule": ("collapse", "paper"), "div_loss": ("entropy", "log_concentration"),
                    "prompt_init": ("stride", "vocab")}


@dataclass
class AuditOptions:
    model_dir: Path
    target: str = "auto"
    mode: str = "detect"  # detect | search
    max_seeds: int | None = None  # detect: L_max = 30; search: 1,000
    patience: int = 200  # search: stop after this many seeds without a new PV
    first_seed: int = 0
    seed: int = 0  # base seed of the random insertion positions and batch order
    device: str = "auto"
    allow_pickle: bool = False
    preset: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # MiningConfig fields set by the user
    # the searching-free first stage (firststage.py): runs before mining, advisory only
    first_stage: bool = True
    # seeds trained in lockstep in one pass (pure speed; 1 = one seed at a time)
    seeds_per_pass: int = 4
    # an earlier report of this audit to continue from (auditor/continuation.py)
    continue_from: Path | None = None
    # self-calibrated audits: audit the targets whose self-test passed, report the others as
    # not audited (auditor.selfcal), instead of stopping with exit 2
    partial: bool = False

    def self_calibrating(self) -> bool:
        """`--preset none`: thresholds measured on the audited model itself (auditor.selfcal),
        even where a shipped preset matches."""
        return self.preset is not None and str(self.preset) == PRESET_NONE

    def resolved_max_seeds(self) -> int:
        if self.max_seeds is not None:
            return self.max_seeds
        return DETECT_SEEDS if self.mode == "detect" else 1000

    def check(self) -> None:
        """Raise UsageError for an option value out of range (before any model is loaded)."""
        for k, allowed in OVERRIDE_CHOICES.items():
            if k in self.overrides and self.overrides[k] not in allowed:
                flag = "--" + k.replace("_", "-")
                raise UsageError(f"{flag} must be {' or '.join(allowed)}")
        if self.resolved_max_seeds() < 1:
            raise UsageError("--max-seeds must be at least 1")
        if self.seeds_per_pass < 1:
            raise UsageError("--seeds-per-pass must be at least 1")
        if self.continue_from is not None and self.mode != "detect":
            raise UsageError("--continue-from continues a detect-mode audit only")


@dataclass
class TargetSummary:
    target: str
    seeds_run: int = 0
    candidates: int = 0
    kept: int = 0
    seconds: float = 0.0


@dataclass
class AuditResult:
    verdict: str  # "backdoored" | "clean"
    targets: list[str]
    skipped_targets: dict[str, str]
    per_target: dict[str, TargetSummary]
    seeds: list[Any]  # SeedResult
    pvset: PVSet
    config: dict[str, Any]
    preset: dict[str, Any]
    warnings: list[str]
    seconds: float
    device: str
    corpus: dict[str, Any]
    model_type: str
    stop_reason: str
    first_stage: dict[str, Any] | None = None  # figures, role and effect on the mining
    continued_from: dict[str, Any] | None = None  # the earlier report this audit continued

    @property
    def found_targets(self) -> list[str]:
        return [t for t in self.targets if self.per_target[t].kept]


def supported_targets(lm: LoadedModel) -> tuple[list[str], dict[str, str]]:
    """Targets a model supports, and why the others are skipped."""
    targets = ["cls"]
    skipped: dict[str, str] = {}
    if lm.has_pooler:
        targets.append("pooler")
    else:
        skipped["pooler"] = "the checkpoint has no trained pooler weights"
    targets.append("tokens")
    if lm.tokenizer.mask_token is not None:
        targets.append("mask")
    else:
        skipped["mask"] = "the tokenizer has no mask token"
    return targets, skipped


def resolve_targets(lm: LoadedModel, target: str) -> tuple[list[str], dict[str, str]]:
    if target not in TARGET_CHOICES:
        raise UsageError(f"--target must be one of {', '.join(TARGET_CHOICES)}")
    ok, skipped = supported_targets(lm)
    if target == "auto":
        return ok, skipped
    if target not in ok:
        raise InputError(f"--target {target}: {skipped[target]}", lm.path)
    return [target], {}


# the seed budget of detect mode (L_max); `lmsan calibrate` warns when it covers fewer seeds
DETECT_SEEDS = 30
# the path-loss weight of search mode (detect mode keeps the method's 0.5, docs/how-it-works.md)
SEARCH_LAMBDA_P = 2.0


@dataclass
class AuditOutput:
    """What `audit_and_write` produced: the audit, the signed report and the PV set file."""

    result: AuditResult
    report: ReportInfo
    pvset_path: Path


def audit_and_write(
    opts: AuditOptions,
    out: Path,
    *,
    pvs_out: Path | None = None,
    key: Path | None = None,
    corpus: Path | None = None,
    text_field: str = "text",
    progress: Any = None,
) -> AuditOutput:
    """Run the audit and write the signed report `out` and the PV set file (`pvs_out`, default
    `<out>.pvs.json`), stamped with the model digest the report records.

    The options, the signing key and the report's folder are checked before the mining, so a bad
    one fails at once. `key` None signs with the per-user key (created on first use)."""
    opts.check()
    if key is not None:
        load_private_key(key)
    if not out.parent.is_dir():
        raise InputError("folder for the report does not exist", out.parent)
    crp = load_corpus(corpus, text_field=text_field)
    partial = partial_path(out)
    resuming = (opts.continue_from is not None and partial.exists()
                and Path(opts.continue_from).resolve() == partial.resolve())
    if partial.exists() and not resuming:  # a stopped audit's seeds are never dropped silently
        raise UsageError(f"{partial} holds the finished seeds of an audit that stopped early: "
                         f"continue it with --continue-from {partial}, or delete the file to "
                         "start over")

    def record(event: dict[str, Any]) -> None:
        if event.get("event") == "audit_start":  # (re)written: header, then any carried seeds
            from .continuation import partial_header

            head = partial_header(event["settings"], opts.model_dir, [partial, out])
            lines = [head] + [_finite(seed_record(r)) for r in event["carried"]]
            atomic_write_text(partial, "".join(json.dumps(x) + "\n" for x in lines))
        if event.get("event") == "seed_end":
            with partial.open("a", encoding="utf-8") as log:
                log.write(json.dumps(_finite(seed_record(event["result"]))) + "\n")
        if progress is not None:
            progress(event)

    result = run_audit(opts, crp, record)
    info = write_signed_report(audit_payload(result, opts), opts.model_dir, out, key)
    partial.unlink(missing_ok=True)
    pv_path = pvs_out or out.with_suffix(".pvs.json")
    result.pvset.model["digest"] = info.model_digest
    result.pvset.save(pv_path)
    return AuditOutput(result, info, pv_path)


def partial_path(out: Path) -> Path:
    """Where an audit writing report `out` records each seed as it finishes (a header line with
    the audit's settings and the model digest, then one JSON line per seed, as the report's
    `seeds` entries; unsigned): removed once the report is written, left when the audit stops
    early, so the finished seeds are not lost and `--continue-from` can go on from them."""
    return out.with_name(out.stem + ".partial.jsonl")


def seed_record(r: Any) -> dict[str, Any]:
    """One seed as the report's `seeds` list holds it (the soft prompt left out)."""
    d = asdict(r)
    d.pop("prompt", None)  # the prompt is kept for accepted PVs only
    return d


def run_audit(opts: AuditOptions, corpus: Corpus, progress: Any = None) -> AuditResult:
    """Mine PVs; `progress(event: dict)` receives seed/step events for a live display."""
    from .mining import Miner, MiningConfig  # torch

    t_start = time.perf_counter()
    if opts.mode not in ("detect", "search"):
        raise UsageError("--mode must be detect or search")
    cfg_json = read_config(Path(opts.model_dir)) if Path(opts.model_dir).is_dir() else None
    device = resolve_device(opts.device)
    lm = load_encoder(opts.model_dir, allow_pickle=opts.allow_pickle, device=device)
    assert cfg_json is not None
    targets, skipped = resolve_targets(lm, opts.target)
    cont = None
    if opts.continue_from is not None:  # checked before self-calibration spends minutes
        from .continuation import load_continuation

        cont = load_continuation(opts.continue_from, opts.model_dir)
    selfcal = None
    if opts.self_calibrating():
        choice = PresetChoice(default_preset(), False, None)
    else:
        choice = choose_preset(cfg_json, opts.preset)
    # no shipped preset covers this family: measure the model itself, unless the user chose a
    # preset file of their own (its default applies) or set both thresholds
    own_thresholds = {"t_l", "t_collapse"} <= opts.overrides.keys()
    if opts.self_calibrating() or (not choice.matched and opts.preset is None
                                   and not own_thresholds):
        from .selfcal import self_calibrate

        # the implants' seeds start where the audit's will (`--prompt-init`; search mode's
        # default is vocabulary starts, below)
        start = opts.overrides.get("prompt_init", "vocab" if opts.mode == "search" else "stride")
        selfcal = self_calibrate(opts.model_dir, corpus, targets, device, progress,
                                 prompt_init=str(start), partial=opts.partial)
        choice = PresetChoice(selfcal.preset(), False, None)
        if selfcal.unverified:  # --partial: what the self-test could not vouch for is left out
            targets = [t for t in targets if t not in selfcal.unverified]
            skipped = {**skipped, **selfcal.unverified}
    cfg = MiningConfig()
    for k, v in choice.preset.values.items():
        setattr(cfg, k, v)
    cfg.per_target = {t: dict(d) for t, d in cfg.per_target.items()}
    for k, v in opts.overrides.items():
        if not hasattr(cfg, k):
            raise UsageError(f"unknown mining parameter {k!r}")
        setattr(cfg, k, v)
        for d in cfg.per_target.values():  # a threshold the user sets holds for every target
            d.pop(k, None)
            if k == "t_collapse":  # ... and is then the only way to accept a candidate
                d.pop("t_far", None)
    if "confirm" not in opts.overrides and "confirm" not in choice.preset.values:
        # rule 4 by default: a threshold alone cannot tell a fine-tune's class prototype from a
        # trigger's PV (docs/how-it-works.md, "Class prototypes")
        cfg.confirm = True
    if opts.mode == "search":
        # search wants many distinct PVs: seeds start from different words, and a stronger path
        # loss pushes each seed away from the PVs already found (bench/results/zoo.md, recall)
        if "prompt_init" not in opts.overrides:
            cfg.prompt_init = "vocab"
        if "lambda_p" not in opts.overrides:
            cfg.lambda_p = SEARCH_LAMBDA_P
    warnings = [choice.warning] if choice.warning else []
    if selfcal is not None and selfcal.unverified:
        warnings.append(f"partial audit (--partial): target(s) {', '.join(selfcal.unverified)} "
                        "not audited, the self-test could not reach a reference backdoor there; "
                        f"the verdict covers {', '.join(targets)} only")
    if cont is not None:  # a different audit is refused before the first stage and mining
        from .continuation import check_same_audit

        check_same_audit(cont, targets=targets, corpus_digest=corpus.digest,
                         mining=cfg.to_dict(), first_seed=opts.first_seed, seed=opts.seed,
                         max_seeds=opts.resolved_max_seeds())
    stage = run_first_stage(lm, corpus, device) if opts.first_stage else None
    order = list(targets)  # the report keeps the canonical order; mining reads `order`
    if stage is not None and stage["verdict"] == "suspicious":  # mine the flagged targets first
        ranked = stage["ranked_targets"]
        order.sort(key=lambda t: ranked.index(t) if t in ranked else len(ranked))
    try:
        miner = Miner(lm, corpus, order, cfg, device=device, base_seed=opts.seed)
    except ValueError as exc:
        raise InputError(str(exc), corpus.name) from None
    per_target = {t: TargetSummary(t) for t in targets}
    seeds: list[Any] = []
    pvs: list[PV] = []
    max_seeds = budget = opts.resolved_max_seeds()
    extended = False
    since_new = 0
    stop_reason = ""
    idx = 0
    if cont is not None:  # the earlier seeds, and their candidates in the path loss
        for res in cont.seeds:
            seeds.append(res)
            _collect(res, per_target, pvs)
            for ts in res.targets:
                if ts.candidate and ts.pv is not None:
                    miner.add_found(ts.target, ts.pv)
                    miner.filter.remember(ts, res.seed)
        idx = len(cont.seeds)
    if progress:
        progress({"event": "audit_start", "carried": list(seeds), "settings": {
            "mode": opts.mode, "targets": list(targets), "corpus_digest": corpus.digest,
            "first_seed": opts.first_seed, "seed": opts.seed,
            "mining": _finite(cfg.to_dict())}})
    pass_size = 1  # the first seed runs alone: a backdoor is usually found there
    while idx < budget:
        batch = [opts.first_seed + idx + j for j in range(min(pass_size, budget - idx))]
        if progress:
            for j, s in enumerate(batch):
                progress({"event": "seed_start", "seed": s, "index": idx + j, "total": budget,
                          "kept": len(pvs)})
        results = miner.run_seeds(batch, progress)
        # a pass cut short by a candidate trains its later seeds again, so after any candidate
        # seeds run one at a time until a pass makes none: a model whose every seed makes a
        # candidate (a fine-tune) never trains seeds it throws away
        made = any(t.candidate for r in results for t in r.targets)
        pass_size = 1 if made else opts.seeds_per_pass
        stop = False
        for res in results:
            idx += 1
            seeds.append(res)
            new = _collect(res, per_target, pvs)
            if progress:
                progress({"event": "seed_end", "seed": res.seed, "result": res, "kept": len(pvs)})
            if opts.mode == "detect" and pvs:
                stop_reason, stop = f"legitimate PV found at seed {res.seed}", True
                break
            since_new = 0 if new else since_new + 1
            if opts.mode == "search" and since_new >= opts.patience:
                stop_reason, stop = f"{opts.patience} consecutive seeds without a new PV", True
                break
        if stop:
            break
        if (idx >= budget and opts.mode == "detect" and not extended and stage is not None
                and stage["verdict"] == "suspicious"):
            # the first stage never shortens a clean verdict: a flagged model gets more seeds
            extended, budget = True, FIRST_STAGE_SEED_FACTOR * max_seeds
    if not stop_reason:
        stop_reason = (f"{budget} seeds without a legitimate PV" if opts.mode == "detect"
                       else f"seed budget of {budget} exhausted")
    if stage is not None:
        stage.update(_first_stage_effect(stage, bool(pvs), order, extended, max_seeds, budget))
    pvset = PVSet(
        hidden_size=lm.hidden_size,
        pvs=pvs,
        match_threshold=cfg.t_match,
        model={"model_type": lm.model_type, "path": str(lm.path)},
    )
    return AuditResult(
        verdict="backdoored" if pvs else "clean",
        targets=targets,
        skipped_targets=skipped,
        per_target=per_target,
        seeds=seeds,
        pvset=pvset,
        config=cfg.to_dict(),
        preset={
            "name": choice.preset.name,
            "matched": choice.matched,
            "source": choice.preset.source,
            "values": choice.preset.values,
            "file": ("none" if opts.self_calibrating() else str(opts.preset) if opts.preset
                     else "builtin"),
            "self_calibration": selfcal.to_dict() if selfcal is not None else None,
        },
        continued_from=cont.record() if cont is not None else None,
        warnings=warnings,
        seconds=time.perf_counter() - t_start,
        device=device,
        corpus={"name": corpus.name, "sentences": len(corpus.sentences), "digest": corpus.digest,
                "usable": miner.n, "clean_scale": miner.scale},
        model_type=lm.model_type,
        stop_reason=stop_reason,
        first_stage=stage,
    )


def _collect(res: Any, per_target: dict[str, TargetSummary], pvs: list[PV]) -> int:
    """Add one seed's result to the per-target summaries and its kept PVs to `pvs`; returns
    how many PVs it kept."""
    new = 0
    for ts in res.targets:
        pt = per_target[ts.target]
        pt.seeds_run += 1
        pt.seconds += res.seconds / len(res.targets)
        pt.candidates += int(ts.candidate)
        if ts.accepted:
            pt.kept += 1
            new += 1
            assert ts.pv is not None
            pvs.append(PV(id=len(pvs), target=ts.target, values=np.asarray(ts.pv, dtype=np.float32),
                          seed=res.seed, source="mined",
                          info={"distance_rel": ts.distance_rel, "spread_ratio": ts.spread_ratio,
                                "concentration": ts.concentration, "entropy_raw": ts.entropy_raw,
                                "trigger_hint": res.trigger_hint}))
    return new


# a model the first stage flags and mining would clear gets this many times the seed budget
FIRST_STAGE_SEED_FACTOR = 2
FIRST_STAGE_ROLE = ("advisory: orders the targets mined and extends the seed budget of a model "
                    "it flags; it never clears a model, and the verdict is the mining's")


def run_first_stage(lm: LoadedModel, corpus: Corpus, device: str) -> dict[str, Any]:
    """The first stage's figures (every target's head-feature rate and alikeness with threshold
    and margin), or why it did not run."""
    from .firststage import first_stage

    try:
        res = first_stage(lm, corpus, device=device)
    except ValueError as exc:
        return {"verdict": "not run", "reason": str(exc), "role": FIRST_STAGE_ROLE,
                "ranked_targets": []}
    return res.to_dict() | {"role": FIRST_STAGE_ROLE, "ranked_targets": res.ranked_targets()}


def _first_stage_effect(stage: dict[str, Any], mined_pv: bool, order: list[str], extended: bool,
                        max_seeds: int, budget: int) -> dict[str, Any]:
    """What the first stage changed in the mining and how the two verdicts compare."""
    suspicious = stage["verdict"] == "suspicious"
    if suspicious and mined_pv:
        opinion = "agree: both flag the model"
    elif suspicious:
        opinion = (f"disagree: the first stage flags the model, mining kept no PV in {budget} "
                   "seeds; the verdict is the mining's")
    elif mined_pv:
        opinion = "mining flags the model; the first stage saw no long tail (it misses many attacks)"
    else:
        opinion = "both unremarkable (the first stage alone never clears a model)"
    return {"mining_order": list(order), "reordered": suspicious,
            "seed_budget": {"base": max_seeds, "used": budget, "extended": extended},
            "second_opinion": opinion}


def _finite(obj: Any) -> Any:
    """Figures that were not measured (aborted seeds) are NaN in memory and null in the report."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def audit_payload(result: AuditResult, opts: AuditOptions) -> dict[str, Any]:
    """The JSON-able report body (signed by report.write_signed_report)."""
    return _finite(_payload(result, opts))


def _payload(result: AuditResult, opts: AuditOptions) -> dict[str, Any]:
    import torch

    seeds = []
    rejected = []
    for r in result.seeds:
        seeds.append(seed_record(r))
        for t in r.targets:
            if t.candidate and not t.accepted:
                rejected.append({"seed": r.seed, "target": t.target, "rule": t.rule,
                                 "distance_rel": t.distance_rel, "distance_norm": t.distance_norm,
                                 "spread_ratio": t.spread_ratio,
                                 "concentration": t.concentration, "entropy_raw": t.entropy_raw,
                                 "clean_match": t.clean_match, "confirmation": t.confirmation})
    kept = []
    for p in result.pvset.pvs:
        r = next(x for x in result.seeds if x.seed == p.seed)
        t = next(x for x in r.targets if x.target == p.target)
        kept.append({"id": p.id, "target": p.target, "seed": p.seed, "rule": t.rule,
                     "distance_rel": t.distance_rel, "distance_raw": t.distance_raw,
                     "distance_norm": t.distance_norm,
                     "spread_ratio": t.spread_ratio, "concentration": t.concentration,
                     "entropy_raw": t.entropy_raw, "entropy_std": t.entropy_std, "soft_prompt": r.prompt,
                     "soft_prompt_range": [r.prompt_min, r.prompt_max],
                     "trigger_hint": r.trigger_hint, "clean_match": t.clean_match,
                     "confirmation": t.confirmation})
    return {
        "verdict": result.verdict,
        "found_targets": result.found_targets,
        "stop_reason": result.stop_reason,
        "mode": opts.mode,
        "targets": result.targets,
        "skipped_targets": result.skipped_targets,
        "per_target": {k: asdict(v) for k, v in result.per_target.items()},
        "parameters": {
            "mining": result.config,
            "target": opts.target,
            "mode": opts.mode,
            "max_seeds": opts.resolved_max_seeds(),
            "patience": opts.patience,
            "first_seed": opts.first_seed,
            "seed": opts.seed,
            "allow_pickle": opts.allow_pickle,
            "first_stage": opts.first_stage,
            "seeds_per_pass": opts.seeds_per_pass,
        },
        "preset": result.preset,
        "first_stage": result.first_stage,
        "continued_from": result.continued_from,
        "warnings": result.warnings,
        "corpus": result.corpus,
        "kept_pvs": kept,
        "rejected_candidates": rejected,
        "seeds": seeds,
        "seconds": result.seconds,
        "device": {"name": result.device, "torch": torch.__version__,
                   "platform": platform.platform(), "processor": platform.processor()},
        "lmsan_version": __version__,
        "pvset": result.pvset.to_json(),
    }
