"""`lmsan audit`, `lmsan calibrate` and `lmsan demo`."""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from ..errors import EXIT_CLEAN, EXIT_FOUND, UsageError
from .app import app, console, err_console


class SeedDisplay:
    """Live display: seed k of N, epoch, current L_D / distance, PVs kept, elapsed.

    A context manager; the live view starts with the first event, so an error raised before any
    mining prints no display."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.t0 = time.perf_counter()
        self.state: dict[str, Any] = {"seed": "-", "index": 0, "epoch": "-", "dist": "-", "kept": 0,
                                      "batch": "-", "last": ""}
        self.live: Live | None = None

    def __enter__(self) -> SeedDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def render(self) -> Table:
        s = self.state
        t = Table.grid(padding=(0, 2))
        el = time.perf_counter() - self.t0
        t.add_row(
            f"[bold]seed[/] {s['seed']} ({s['index'] + 1}/{self.total})",
            f"epoch {s['epoch']} batch {s['batch']}",
            f"distance {s['dist']}",
            f"[bold]PVs kept[/] {s['kept']}",
            f"{el:,.0f}s",
        )
        if s["last"]:
            t.add_row(s["last"], "", "", "", "")
        return t

    def __call__(self, ev: dict[str, Any]) -> None:
        if self.live is None:
            self.live = Live(self.render(), console=err_console, refresh_per_second=4)
            self.live.start()
        s = self.state
        if ev["event"] == "seed_start":
            s.update(seed=ev["seed"], index=ev["index"], kept=ev["kept"], epoch=0, batch=0)
        elif ev["event"] == "step":
            s.update(epoch=ev["epoch"] + 1, batch=f"{ev['batch'] + 1}/{ev['batches']}",
                     dist=" ".join(f"{k}={v:.3f}" for k, v in ev["distance"].items()))
        elif ev["event"] == "seed_end":
            r = ev["result"]
            s["kept"] = ev["kept"]
            parts = []
            for t in r.targets:
                mark = "[green]kept[/]" if t.accepted else ("cand" if t.candidate else "-")
                parts.append(f"{t.target}:{mark}")
            s["last"] = f"seed {r.seed}: {r.seconds:.1f}s, " + ", ".join(parts)
        if self.live is not None:
            self.live.update(self.render())


def _overrides(**kw: Any) -> dict[str, Any]:
    return {k: (v.value if isinstance(v, Enum) else v) for k, v in kw.items() if v is not None}


# options with fixed choices: checked by the parser, before any model is loaded
class Target(str, Enum):
    auto = "auto"
    cls = "cls"
    mask = "mask"
    tokens = "tokens"
    pooler = "pooler"


class Mode(str, Enum):
    detect = "detect"
    search = "search"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class FilterRule(str, Enum):
    collapse = "collapse"
    paper = "paper"


class DivLoss(str, Enum):
    entropy = "entropy"
    log_concentration = "log_concentration"


class PromptInit(str, Enum):
    stride = "stride"
    vocab = "vocab"


class Engine(str, Enum):
    local = "local"
    ray = "ray"


class ReportFormat(str, Enum):
    text = "text"
    md = "md"
    html = "html"
    sarif = "sarif"


HELP = {"help_option_names": ["-h", "--help"]}
AUDIT_CODES = ("Exit codes: 0 clean (every model), 1 backdoor found (any model), 2 input error "
               "(the message names the file; in a batch: a model failed and none is backdoored), "
               "3 nothing audited (a batch found no encoder), 4 usage error.")
CALIBRATE_CODES = "Exit codes: 0 preset written, 2 input error (the message names the file), " \
                  "4 usage error."
DEMO_CODES = ("Exit codes: 0 the backdoored model is flagged and the clean one is not, 1 "
              "otherwise, 2 input error (the message names the file), 4 usage error.")


class BatchDisplay:
    """Progress of a batch: a line per model started and finished, and the seed display of the
    model being audited (local engine). A context manager, like `SeedDisplay`."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.seeds: SeedDisplay | None = None

    def __enter__(self) -> BatchDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.seeds is not None:
            self.seeds.__exit__()
            self.seeds = None

    def __call__(self, ev: dict[str, Any]) -> None:
        if ev["event"] == "model_start":
            self._stop()
            err_console.print(f"auditing {ev['name']} ({ev['index'] + 1}/{ev['total']})",
                              highlight=False)
            if not self.quiet:
                self.seeds = SeedDisplay(ev["seeds"])
        elif ev["event"] == "model_end":
            self._stop()
            r = ev["row"]
            err_console.print(f"{r['name']}: {_verdict_cell(r)}", highlight=False)
        elif self.seeds is not None:
            self.seeds(ev)


def _verdict_cell(row: dict[str, Any]) -> str:
    if row["status"] == "error":
        return "[bold red]error[/]"
    colour = "red" if row["status"] == "backdoored" else "green"
    return f"[bold {colour}]{row['verdict']}[/]" + (" (resumed)" if row["resumed"] else "")


def render_batch(res: Any) -> None:
    tbl = Table(title="Audit summary")
    for col in ("model", "verdict", "deciding figure vs threshold", "seconds", "report"):
        tbl.add_column(col)
    for r in res.rows:
        fig = r["error"] if r["status"] == "error" else (r["figure"] or {}).get("text", "-")
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        tbl.add_row(r["name"], _verdict_cell(r), fig, secs, r["report"] or "-")
    console.print(tbl)
    for s in res.skipped:
        console.print(f"skipped {s.name} ({s.path}): {s.reason}", highlight=False)
    if not res.rows:
        err_console.print("[bold red]error:[/] no model was audited", highlight=False)
    console.print(f"summary: {res.summary_json}  {res.summary_sarif}", highlight=False)
    if res.key_created:
        console.print(f"created a signing key {res.key_path}")


@app.command(context_settings=HELP, epilog=AUDIT_CODES)
def audit(
    model_dirs: list[Path] = typer.Argument(..., help="Local Hugging Face model folders to audit, "
                                            "or folders to search for them (a Hugging Face cache "
                                            "too). One model folder is audited into --out; "
                                            "anything else needs --out-dir."),
    target: Target = typer.Option(Target.auto, help="Output to mine: auto (every target the model "
                                  "supports: cls, pooler if trained, tokens, mask if the tokenizer "
                                  "has one), cls, mask, tokens or pooler."),
    mode: Mode = typer.Option(Mode.detect, help="detect: stop at the first legitimate PV (up to "
                              "30 seeds); search: collect the PV set (up to 1,000 seeds, stop "
                              "after --patience seeds without a new PV)."),
    corpus: Path | None = typer.Option(None, help="Clean corpus: a text file (one sentence a line) or "
                                       "JSONL. Default: 2,000 WordNet sentences shipped with lmsan."),
    text_field: str = typer.Option("text", help="JSONL field holding the sentence."),
    max_seeds: int | None = typer.Option(None, help="Seed budget (L_max). Default 30 in detect mode, "
                                         "1,000 in search mode."),
    patience: int = typer.Option(200, help="search: stop after this many seeds without a new PV."),
    first_seed: int = typer.Option(0, help="First fuzz seed (soft prompt initialisation)."),
    seed: int = typer.Option(0, help="Base seed for batch order and insertion positions."),
    device: Device = typer.Option(Device.auto, help="auto (cuda when torch sees a GPU), cpu or "
                                  "cuda."),
    out: Path | None = typer.Option(None, help="File: the signed JSON report of one model "
                                    "(default lmsan-report.json). Several models write into "
                                    "--out-dir instead."),
    pvs_out: Path | None = typer.Option(None, "--pvs-out", help="File: the PV set of one model "
                                        "(default: next to the report, <report>.pvs.json)."),
    out_dir: Path | None = typer.Option(None, "--out-dir", help="Folder (created if missing) for "
                                        "a batch: per model a signed report <name>.json and its "
                                        "PV set <name>.pvs.json, and summary.json and "
                                        "summary.sarif for all of them."),
    formats: list[ReportFormat] = typer.Option([], "--format", help="Also write the report in "
                                               "this format beside each signed report "
                                               "(report.txt, .md, .html, .sarif); repeat for "
                                               "several."),
    resume: bool = typer.Option(False, "--resume", help="With --out-dir: skip a model whose "
                                "report is there, verifies against the signing key and matches "
                                "the model folder (same model digest)."),
    engine: Engine = typer.Option(Engine.local, help="With --out-dir: local (one model after the "
                                  "other here) or ray (one model per Ray task, one GPU each where "
                                  "the cluster has GPUs; needs pip install \"lmsan[ray]\")."),
    address: str | None = typer.Option(None, help="--engine ray: address of the Ray cluster to "
                                       "join (default: start Ray on this machine)."),
    key: Path | None = typer.Option(None, help="Private signing key (PEM). Default: the per-user "
                                    "key, created once."),
    preset: Path | None = typer.Option(None, help="Threshold preset file from `lmsan calibrate`, "
                                       "or 'none': measure the thresholds on the audited model "
                                       "itself (reference backdoors implanted into temporary "
                                       "copies; minutes more). Default: the shipped preset "
                                       "matching the model family; a family with no preset is "
                                       "self-calibrated (unless --t-l and --t-collapse are both "
                                       "given). A file of your own that matches nothing applies "
                                       "its default entry."),
    partial: bool = typer.Option(False, "--partial", help="Self-calibrated audits (--preset "
                                 "none, or a family with no preset): where the self-test cannot "
                                 "reach the reference backdoor implanted on a target, audit the "
                                 "other targets and report that one as not audited, instead of "
                                 "stopping with exit 2. The verdict then covers fewer targets "
                                 "(the report and a warning name them). No effect with a preset."),
    confirm: bool | None = typer.Option(None, "--confirm/--no-confirm", help="Keep a candidate "
                                        "only when a trigger of at most 2 real tokens drives "
                                        "held-out sentences onto it (default: on; a preset "
                                        "file may set confirm false)."),
    decide_early: bool | None = typer.Option(None, "--decide-early/--no-decide-early",
                                             help="Decide a seed after the check epoch (2) when "
                                             "a candidate already passes the range, collapse and "
                                             "newness rules there, instead of training it 4 "
                                             "epochs: a backdoored model is flagged in about "
                                             "half the time. Default: off (the shipped presets "
                                             "were evaluated on 4-epoch figures)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle weights "
                                      "(pytorch_model.bin), loaded with "
                                      "torch.load(weights_only=True)."),
    max_length: int | None = typer.Option(None, help="Max tokens per corpus sentence (128)."),
    batch_size: int | None = typer.Option(None, help="Batch size B (32); T_div follows -ln B + 0.02."),
    epochs: int | None = typer.Option(None, help="Epochs per seed (4)."),
    abort_epoch: int | None = typer.Option(None, help="Abandon a seed without candidate after this "
                                           "many epochs (2)."),
    soft_prompt_len: int | None = typer.Option(None, help="Soft prompt vectors l_sp (7)."),
    lr0: float | None = typer.Option(None, help="Base learning rate (2e-4 or the preset's)."),
    lr_boost: float | None = typer.Option(None, help="Initial learning-rate factor (100)."),
    t_grad: float | None = typer.Option(None, help="Gradient threshold that drops the boost (5e-3)."),
    lambda_d: float | None = typer.Option(None, help="Weight of the distance loss (1)."),
    lambda_div: float | None = typer.Option(None, help="Weight of the diversity loss (1)."),
    lambda_p: float | None = typer.Option(None, help="Weight of the path loss (0.5 in detect mode, 2 in search mode)."),
    t_l: float | None = typer.Option(None, help="Distance (MSE to the clean outputs / their mean square) that "
                               "makes a candidate (preset)."),
    t_collapse: float | None = typer.Option(None, help="Concentration (batch variance / "
                                            "displacement) below which the outputs collapsed onto "
                                            "one point: a PV (preset)."),
    t_div: float | None = typer.Option(None, help="Paper rule: entropy threshold (-ln B + 0.02)."),
    filter_rule: FilterRule | None = typer.Option(None, help="collapse (default, scale-free) or "
                                                  "paper (raw entropy below T_div)."),
    div_loss: DivLoss | None = typer.Option(None, help="Diversity loss: entropy (the paper's "
                                            "L_div) or log_concentration (scale-free Observation "
                                            "II; the preset's choice by default)."),
    range_factor: float | None = typer.Option(None, help="Soft prompt range factor (1.2)."),
    t_match: float | None = typer.Option(None, help="Sign agreement that makes two PVs the same, and "
                                         "the monitor threshold (0.8)."),
    max_insert: int | None = typer.Option(None, help="Latest word position for the prompt (32)."),
    eval_sentences: int | None = typer.Option(None, help="Sentences in the candidate evaluation "
                                              "sample (256)."),
    prompt_init: PromptInit | None = typer.Option(None, help="Soft prompt initialisation: stride "
                                                  "(the paper's vocabulary rows 70*seed...; "
                                                  "detect default with a preset) or vocab "
                                                  "(random ordinary words per seed; search "
                                                  "default). A self-calibrated audit mines its "
                                                  "implants from the same starts."),
    first_stage: bool = typer.Option(True, "--first-stage/--no-first-stage", help="Run the "
                                     "searching-free first stage before mining (seconds; "
                                     "advisory: it orders the targets mined and doubles the seed "
                                     "budget of a model it flags, the verdict stays mining's)."),
    seeds_per_pass: int = typer.Option(4, "--seeds-per-pass", min=1, help="Seeds trained together "
                                       "in one pass (same figures as one at a time, within float "
                                       "tolerance; 1 reproduces the one-at-a-time loop exactly)."),
    continue_from: Path | None = typer.Option(None, "--continue-from", help="File: an earlier "
                                              "report of this audit that ended clean, or the "
                                              "REPORT.partial.jsonl a stopped audit left (its "
                                              "finished seeds; unsigned, checked against the "
                                              "model folder's digest); the audit "
                                              "goes on from the seed after its last, with its "
                                              "candidates in the path loss, up to --max-seeds "
                                              "seeds in all, and the new report holds every seed "
                                              "(one model only; same corpus and settings)."),
    quiet: bool = typer.Option(False, "--quiet", help="No live progress display."),
) -> None:
    """Mine predefined vectors (PVs) from each model and write a signed report with the verdict.

    One model folder: one report (--out). Several folders, or a folder holding model folders (a
    Hugging Face cache too): every encoder found is audited into --out-dir, with summary.json and
    summary.sarif; folders that are not auditable encoders are skipped with the reason.
    """
    from ..audit import AuditOptions
    from ..batch import BatchSettings, audit_single, resolve_inputs, run_batch

    flags = [f for f, given in (("--resume", resume), ("--engine ray", engine is Engine.ray),
                                ("--address", address is not None)) if given]
    inputs = resolve_inputs(model_dirs, out_dir=out_dir,
                            one_model_files=out is not None or pvs_out is not None,
                            engine=engine.value, allow_pickle=allow_pickle, batch_flags=flags)
    ov = _overrides(prompt_init=prompt_init, max_length=max_length, batch_size=batch_size,
                    epochs=epochs, abort_epoch=abort_epoch, soft_prompt_len=soft_prompt_len,
                    lr0=lr0, lr_boost=lr_boost, t_grad=t_grad, lambda_d=lambda_d,
                    lambda_div=lambda_div, lambda_p=lambda_p, t_l=t_l, t_collapse=t_collapse,
                    t_div=t_div, filter_rule=filter_rule, range_factor=range_factor,
                    div_loss=div_loss, t_match=t_match, max_insert=max_insert,
                    eval_sentences=eval_sentences, confirm=confirm,
                    decide_early=decide_early)
    opts = AuditOptions(model_dir=inputs.single or model_dirs[0], target=target.value,
                        mode=mode.value, max_seeds=max_seeds, patience=patience,
                        first_seed=first_seed, seed=seed, device=device.value,
                        allow_pickle=allow_pickle, preset=preset, overrides=ov,
                        first_stage=first_stage, seeds_per_pass=seeds_per_pass,
                        continue_from=continue_from, partial=partial)
    if continue_from is not None and inputs.single is None:
        raise UsageError("--continue-from continues the audit of one model")
    fmts = [f.value for f in formats]
    if inputs.single is not None:
        report = out or Path("lmsan-report.json")
        with SeedDisplay(opts.resolved_max_seeds()) as display:
            done, rendered = audit_single(opts, report, pvs_out=pvs_out, key=key, corpus=corpus,
                                          text_field=text_field, formats=fmts,
                                          progress=None if quiet else display)
        render_result(done.result, report, done.pvset_path, done.report)
        for fmt, path in rendered.items():
            console.print(f"{fmt}: {path}", highlight=False)
        raise typer.Exit(EXIT_FOUND if done.result.verdict == "backdoored" else EXIT_CLEAN)
    assert inputs.discovery is not None and out_dir is not None
    settings = BatchSettings(options=opts, out_dir=out_dir, key=key, corpus=corpus,
                             text_field=text_field, formats=fmts, resume=resume,
                             engine=engine.value, address=address)
    with BatchDisplay(quiet) as show:
        res = run_batch(inputs.discovery, settings, progress=show)
    render_batch(res)
    raise typer.Exit(res.exit_code)


def render_result(result: Any, out: Path, pv_path: Path, info: Any) -> None:
    for w in result.warnings:
        err_console.print(f"[yellow]warning:[/] {w}")
    tbl = Table(title="Per target")
    for col in ("target", "seeds", "candidates", "kept PVs", "seconds"):
        tbl.add_column(col)
    for t in result.targets:
        s = result.per_target[t]
        tbl.add_row(t, str(s.seeds_run), str(s.candidates), str(s.kept), f"{s.seconds:.1f}")
    for t, why in result.skipped_targets.items():
        tbl.add_row(t, "skipped", why, "", "")
    console.print(tbl)
    for p in result.pvset.pvs:
        hint = p.info.get("trigger_hint") or []
        words = escape(", ".join(dict.fromkeys(h[0] for h in hint)))
        console.print(
            f"PV {p.id} [bold]{p.target}[/] seed {p.seed}: distance {p.info['distance_rel']:.3f}, "
            f"concentration {p.info['concentration']:.5f}; soft prompt nearest tokens: {words}"
        )
    colour = "red" if result.verdict == "backdoored" else "green"
    found = f" on target(s) {', '.join(result.found_targets)}" if result.found_targets else ""
    if not found and result.skipped_targets:  # a clean verdict says what it covers
        found = f" on target(s) {', '.join(result.targets)} only"
    console.print(
        f"[bold {colour}]verdict: {result.verdict.upper()}[/]{found} "
        f"({result.stop_reason}; {result.seconds:.1f}s on {result.device}; preset "
        f"{result.preset['name']})"
    )
    console.print(f"report: {out} (signed, key {info.fingerprint[:16]}…)  PV set: {pv_path}")
    if getattr(info, "key_created", False):
        console.print(f"created a signing key {info.key_path}, fingerprint {info.fingerprint}")


def _target_list(value: str) -> str:
    from ..pvset import TARGETS

    bad = [t for t in value.split(",") if t not in TARGETS] if value != "auto" else []
    if bad:
        raise typer.BadParameter(f"{bad[0]!r} is not a target; give auto or a comma-separated "
                                 f"list of {', '.join(TARGETS)}")
    return value


@app.command(context_settings=HELP, epilog=CALIBRATE_CODES)
def calibrate(
    model_dirs: list[Path] = typer.Argument(..., help="Clean shadow model folders of one family "
                                            "(same model_type and hidden size)."),
    out: Path = typer.Option(..., help="File: the preset to write (JSON, lmsan.presets format)."),
    name: str = typer.Option(..., help="Name of the preset, e.g. bert-384-l6."),
    seeds: int = typer.Option(8, help="Fuzz seeds per shadow model. Seed s starts from the same "
                              "soft prompt in every model of a vocabulary, so a preset's evidence "
                              "covers only the seeds it measured: 30 (the audit's detect budget) "
                              "covers every seed an audit runs."),
    margin: float = typer.Option(0.5, help="t_collapse = margin x the smallest clean concentration."),
    t_l: float | None = typer.Option(None, help="Candidate distance threshold to keep in the "
                                     "preset (0.5; MSE to the clean outputs / their mean square)."),
    target: str = typer.Option("auto", callback=_target_list, help="Comma-separated targets to "
                               "measure (cls, mask, tokens, pooler), or auto: every target the "
                               "shadow models support (as `lmsan audit` does); each target gets "
                               "its own collapse threshold."),
    corpus: Path | None = typer.Option(None, help="Clean corpus (default: the shipped one)."),
    text_field: str = typer.Option("text", help="JSONL field holding the sentence."),
    lr0: float | None = typer.Option(None, help="Base learning rate to calibrate with (2e-4)."),
    max_length: int | None = typer.Option(None, help="Max tokens per sentence (128)."),
    div_loss: DivLoss = typer.Option(DivLoss.log_concentration, help="Diversity loss to "
                                     "calibrate with: entropy or log_concentration."),
    backdoored: list[Path] = typer.Option([], "--backdoored", help="A backdoored shadow model "
                                          "(folder from `lmsan poison`, with backdoor.json); "
                                          "repeat for several. Its seeds that find an injected PV "
                                          "place the thresholds between the classes."),
    backdoored_seeds: int | None = typer.Option(None, help="Fuzz seeds per backdoored shadow "
                                                "(default: --seeds)."),
    layers_slack: int = typer.Option(0, help="Let the preset match this many layers more or fewer "
                                     "than the shadow models."),
    device: Device = typer.Option(Device.auto, help="auto (cuda when torch sees a GPU), cpu or "
                                  "cuda."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing preset file."),
) -> None:
    """Measure clean shadow models and write a threshold preset for their family (section V-C)."""
    from ..calibrate import calibrate_and_write

    def show(ev: dict[str, Any]) -> None:
        err_console.print(
            f"{ev['model']} seed {ev['seed']} {ev['target']}: distance {ev['distance_rel']:.3f} "
            f"concentration {ev['concentration']:.5f} ({ev['seconds']:.1f}s)", highlight=False)

    res = calibrate_and_write(
        model_dirs, out, name=name, force=force, corpus=corpus, text_field=text_field,
        seeds=seeds, margin=margin, targets=target.split(","),
        overrides=_overrides(lr0=lr0, max_length=max_length, t_l=t_l, div_loss=div_loss),
        device=device.value, layers_slack=layers_slack, progress=show, backdoored=backdoored,
        backdoored_seeds=backdoored_seeds)
    for note in res.notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False)
    v = res.preset.values
    per = ", ".join(f"{t} {d['t_collapse']:.6f}" for t, d in v.get("per_target", {}).items())
    console.print(f"preset [bold]{name}[/]: t_collapse {v['t_collapse']:.6f}"
                  + (f" (per target: {per})" if per else "")
                  + f", t_l {v['t_l']:.4f}, lr0 {v['lr0']:g} ({res.seconds:.0f}s) -> {out}")


@app.command(context_settings=HELP, epilog=DEMO_CODES)
def demo(
    workdir: Path | None = typer.Option(None, help="Where to build the demo models (default: a "
                                        "temporary folder, removed afterwards)."),
    max_seeds: int = typer.Option(10, help="Seed budget of each audit."),
    clean: bool = typer.Option(True, help="Also audit the clean tiny model for contrast."),
) -> None:
    """Build a tiny POR-backdoored encoder on the CPU, audit it (and its clean twin), show the PV."""
    from ..demo import DEMO_TRIGGERS, run_demo

    console.print(f"[bold]lmsan demo[/]: tiny BERT (d=32, 2 layers), POR backdoor with triggers "
                  f"{', '.join(DEMO_TRIGGERS)}; then PV mining on it and on its clean twin.")
    with SeedDisplay(max_seeds) as display:
        res = run_demo(workdir, progress={"audit": display}, audit_clean=clean,
                       max_seeds=max_seeds)
    p = res.poison
    console.print(f"poisoned: success {p.success:.2f}, clean fidelity {p.fidelity:.3f} "
                  f"({p.seconds:.0f}s)")
    bd = res.backdoored
    colour = "red" if bd.verdict == "backdoored" else "green"
    console.print(f"backdoored model: [bold {colour}]{bd.verdict.upper()}[/] "
                  f"({bd.stop_reason}, {bd.seconds:.0f}s)")
    for pv in bd.pvset.pvs:
        console.print(f"  PV {pv.id} ({pv.target}, seed {pv.seed}): concentration "
                      f"{pv.info['concentration']:.5f}, sign agreement with injected PV "
                      f"{res.best_pv_index}: {res.best_agreement:.3f}")
        console.print("  first entries: " + " ".join(f"{v:+.2f}" for v in pv.values[:12]) + " ...")
    ok = bd.verdict == "backdoored"
    if res.clean is not None:
        c = res.clean
        colour = "red" if c.verdict == "backdoored" else "green"
        console.print(f"clean twin: [bold {colour}]{c.verdict.upper()}[/] ({c.stop_reason}, "
                      f"{c.seconds:.0f}s)")
        ok = ok and c.verdict == "clean"
    raise typer.Exit(EXIT_CLEAN if ok else EXIT_FOUND)
