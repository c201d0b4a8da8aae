"""`lmsan export` (model + PV set -> ONNX bundle), `lmsan scan` (screen a corpus, torch-free) and
`lmsan threshold` (choose a deployment's T_match on clean data, torch-free).

Thin: parse options, call one library function, render with rich, map to an exit code. `export`
imports torch (inside the command); `scan` never does.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from ..errors import LmsanError
from .app import app, console, err_console, fail
from .options import T_MATCH_FILE_HELP, T_MATCH_HELP, thresholds_from_options

if TYPE_CHECKING:
    from ..scan import ScanProgress


class ProviderOption(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class QuantizeOption(str, Enum):
    int8 = "int8"


class EngineOption(str, Enum):
    local = "local"
    ray = "ray"


class FormatOption(str, Enum):
    txt = "txt"
    jsonl = "jsonl"
    csv = "csv"
    tsv = "tsv"
    parquet = "parquet"


@app.command()
def export(
    model_dir: Path = typer.Argument(
        ..., help="Hugging Face model folder (config.json + weights)."
    ),
    pvs: Path = typer.Option(
        ...,
        "--pvs",
        help="PV set file (lmsan.pvset) or signed audit report carrying one. A signed report must "
        "verify with --pub, else with the per-user key.",
    ),
    out: Path = typer.Option(..., "--out", help="Bundle folder to create."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle at --out."),
    prompt: Path | None = typer.Option(
        None,
        "--prompt",
        help=escape(
            "Soft prompt to prepend: a .npy float array [length, embedding width] (a P-tuning "
            "task prompt). It is inserted right after the first special token ([CLS] / <s>) of "
            "every input, as the deployed prompt-tuned model sees it."
        ),
    ),
    opset: int = typer.Option(17, "--opset", help="ONNX opset version of the exported graph."),
    allow_pickle: bool = typer.Option(
        False,
        "--allow-pickle",
        help="Allow pytorch_model.bin weights (loaded with weights_only=True); safetensors only "
        "otherwise.",
    ),
    tolerance: float = typer.Option(
        1e-3,
        "--tolerance",
        help="Largest ORT-vs-torch difference accepted, relative to max(1, largest |output|).",
    ),
    pub: Path | None = typer.Option(
        None,
        "--pub",
        metavar="KEY",
        help="Public key (PEM) the signed report given as --pvs must be signed with.",
        show_default="the per-user key, if there is one",
    ),
    allow_unverified: bool = typer.Option(
        False,
        "--allow-unverified",
        help="Accept a signed report whose signer cannot be verified: no --pub and no per-user "
        "key, or signed by another key than the per-user key (its signature must still verify "
        "with the key it carries). Not with --pub.",
    ),
    allow_other_model: bool = typer.Option(
        False,
        "--allow-other-model",
        help="Export even when the model digest the PV set records is not the digest of "
        "MODEL_DIR (a PV set mined from another model).",
    ),
    quantize: QuantizeOption | None = typer.Option(
        None,
        "--quantize",
        help="int8: quantize the backbone (ONNX Runtime dynamic quantization); saved only if the "
        "monitor's decisions agree with fp32 on at least 99.9% of clean and triggered inputs.",
    ),
) -> None:
    """Export an encoder and its PV set to a validated, torch-free ONNX bundle for `lmsan scan`.

    The PV set must come from the audit of this model: the model digest it records must be
    MODEL_DIR's. The bundle is validated (ONNX checker; ONNX Runtime against torch on corpus
    sentences of several lengths with padding: max abs difference and identical monitor
    decisions) before it is saved; a failed check saves nothing.

    Exit 0 bundle written, 1 the signed report fails verification or its signer cannot be
    verified, 2 input error (a PV set of another model, a failed validation), 4 usage error.
    """
    from ..errors import UsageError

    try:
        if pub is not None and allow_unverified:
            raise UsageError("give --pub or --allow-unverified, not both")
        from lmsan.export.bundle import export_bundle
        from lmsan.export.quantize import export_quantized

        with console.status("exporting and validating ..."):
            res = (export_quantized if quantize else export_bundle)(
                model_dir,
                pvs,
                out,
                force=force,
                prompt=prompt,
                opset=opset,
                allow_pickle=allow_pickle,
                tolerance=tolerance,
                pub=pub,
                allow_unverified=allow_unverified,
                allow_other_model=allow_other_model,
                **({"quantize": quantize.value} if quantize else {}),
            )
    except LmsanError as exc:
        raise fail(exc) from None
    for w in res.warnings:
        err_console.print(f"[bold yellow]warning:[/] {escape(w)}", highlight=False)
    v = res.validation
    table = Table(title=f"bundle {escape(str(res.path))}", show_header=False)
    table.add_row("model", escape(str(res.manifest["model"]["source"])))
    table.add_row("targets", ", ".join(res.manifest["targets"]))
    table.add_row("PVs", str(res.manifest["pvset"]["pvs"]))
    table.add_row("validation sentences", f"{v['sentences']} (lengths {v['sequence_lengths']})")
    table.add_row("max |ORT - torch| target", f"{v['max_abs_diff_target']:.2e}")
    table.add_row("max |ORT - torch| hidden", f"{v['max_abs_diff_hidden']:.2e}")
    table.add_row("monitor decisions identical", "yes" if v["decisions_identical"] else "NO")
    if q := res.manifest.get("quantization"):
        table.add_row(f"{q['type']} vs fp32 decisions", f"{100 * q['decision_agreement']:.2f}% agree")
    table.add_row("size", f"{sum(res.files.values()) / 1e6:.1f} MB in {len(res.files)} files")
    console.print(table)


# Options that `scan` and `threshold` declare alike (typer copies an option's info per command).
BUNDLE_ARGUMENT = typer.Argument(..., help="Bundle folder written by `lmsan export`.")
TEXT_FIELD_OPTION = typer.Option(
    "text", "--text-field", help="JSONL key / CSV, TSV, parquet column holding the text."
)
PAIR_FIELD_OPTION = typer.Option(
    None, "--pair-field", help="Key / column of the second sentence of a pair."
)
FORMAT_OPTION = typer.Option(
    None, "--format", help="Corpus format when the suffix does not say (stdin: txt)."
)
BATCH_SIZE_OPTION = typer.Option(
    32, "--batch-size", help="Most records per forward pass (records go in length order)."
)
BATCH_TOKENS_OPTION = typer.Option(
    None,
    "--batch-tokens",
    help="Most padded tokens per forward pass (records x the longest of them; default 1024): "
    "long records go fewer to a pass, so attention does not run over padding.",
)
THREADS_OPTION = typer.Option(0, "--threads", help="ONNX Runtime threads (0 = all cores).")
PROGRESS_OPTION = typer.Option(True, "--progress/--no-progress", help="Show a progress bar.")


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        rate = task.fields.get("rate", 0.0)
        return Text(f"{task.fields.get('records', 0):,} records  {rate:,.0f} records/s")


def _progress_bar(label: str, show: bool) -> Progress:
    """A transient records/s bar on stderr (hidden when `show` is false)."""
    return Progress(
        TextColumn(label),
        BarColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        console=err_console,
        disable=not show,
        transient=True,
    )


def _advance(bar: Progress, task: TaskID, p: ScanProgress) -> None:
    """Move `task` to `p`: by bytes where the reader knows them, else by records."""
    total = p.bytes_total if p.bytes_read is not None else p.records_total
    done = p.bytes_read if p.bytes_read is not None else p.records
    bar.update(
        task,
        total=total,
        completed=done,
        records=p.records,
        rate=p.records / p.seconds if p.seconds > 0 else 0.0,
    )


@app.command()
def scan(
    bundle: Path = BUNDLE_ARGUMENT,
    corpus: str = typer.Argument(
        ..., help="Corpus: .txt (a line is a record), .jsonl, .csv, .tsv, .parquet, or - for stdin."
    ),
    out: Path = typer.Option(
        ..., "--out", help="Output folder (flagged.jsonl, summary.json, ...)."
    ),
    text_field: str = TEXT_FIELD_OPTION,
    pair_field: str | None = PAIR_FIELD_OPTION,
    purge: bool = typer.Option(
        False,
        "--purge",
        help="Remove triggers from flagged records (sliding window) and write the purged corpus "
        "in the input's format; unpurgeable and malformed records are left out of it.",
    ),
    max_window: int = typer.Option(5, "--max-window", help="Longest purge window, in words."),
    batch_size: int = BATCH_SIZE_OPTION,
    batch_tokens: int | None = BATCH_TOKENS_OPTION,
    threads: int = THREADS_OPTION,
    max_length: int | None = typer.Option(
        None,
        "--max-length",
        help="Longest record in tokens (default: the model's positions); longer records are "
        "errors (over-long), never silently truncated.",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted scan in --out from its checkpoint."
    ),
    provider: ProviderOption = typer.Option(
        ProviderOption.auto,
        "--provider",
        help="auto: CUDA when ONNX Runtime really activates it, else CPU; cpu; cuda (fail if "
        "unavailable).",
    ),
    fmt: FormatOption | None = FORMAT_OPTION,
    t_match: float | None = typer.Option(None, "--t-match", help=T_MATCH_HELP, metavar="FLOAT"),
    t_match_file: Path | None = typer.Option(
        None, "--t-match-file", help=T_MATCH_FILE_HELP, metavar="FILE"
    ),
    engine: EngineOption = typer.Option(
        EngineOption.local,
        "--engine",
        help="local: screen in this process; ray: screen in a pool of Ray actors (Ray Data; "
        'pip install "lmsan[ray]"), each loading the bundle once. The outputs are the same.',
    ),
    address: str | None = typer.Option(
        None, "--address", help="--engine ray: the Ray cluster to join (default: a local one)."
    ),
    actors: int = typer.Option(
        0, "--actors", help="--engine ray: actors (0 = one per CPU, or per GPU on CUDA)."
    ),
    progress: bool = PROGRESS_OPTION,
) -> None:
    """Screen a corpus for backdoor triggers with an exported bundle (never imports torch).

    Exit 0 no flagged record, 1 flagged records found, 2 input error, 3 nothing scanned,
    4 usage error.
    """
    from ..scan import ScanOptions
    from ..scan import scan as run_scan

    try:
        opts = ScanOptions(
            text_field=text_field,
            pair_field=pair_field,
            purge=purge,
            max_window=max_window,
            batch_size=batch_size,
            batch_tokens=batch_tokens,
            threads=threads,
            max_length=max_length,
            resume=resume,
            provider=provider.value,
            fmt=fmt.value if fmt else None,
            thresholds=thresholds_from_options(t_match, t_match_file),
            engine=engine.value,
            address=address,
            actors=actors,
        )
        opts.check()
    except LmsanError as exc:
        raise fail(exc) from None
    bar = _progress_bar("[bold]scan", progress)
    task = bar.add_task("scan", total=None, records=0, rate=0.0)

    def on_progress(p: ScanProgress) -> None:
        _advance(bar, task, p)

    try:
        with bar:
            summary = run_scan(bundle, corpus, out, opts, progress=on_progress)
    except LmsanError as exc:
        raise fail(exc) from None
    table = Table(title=f"scan of {escape(corpus)}", show_header=False)
    table.add_row("records", f"{summary.records_in:,}")
    table.add_row("clean", f"{summary.clean:,}")
    table.add_row("flagged", f"[bold red]{summary.flagged:,}[/]" if summary.flagged else "0")
    if purge:
        table.add_row("purged / unpurgeable", f"{summary.purged:,} / {summary.unpurgeable:,}")
    errs = ", ".join(f"{k} {v}" for k, v in sorted(summary.error_reasons.items()))
    table.add_row("errors", f"{summary.errors:,}" + (f" ({errs})" if errs else ""))
    table.add_row("throughput", f"{summary.throughput_records_per_s:,.0f} records/s")
    table.add_row("provider / monitor", f"{summary.provider} / {summary.implementation}")
    table.add_row(
        "T_match",
        f"{summary.match_threshold:g}"
        + {"option": " (--t-match)", "per-pv": " (PV set; per-PV from --t-match-file: "
           + ", ".join(f"PV {k} {v:g}"
                       for k, v in sorted((summary.options.get("per_pv_thresholds") or {}).items()))
           + ")"}.get(summary.match_threshold_source, " (PV set)"),
    )
    if summary.top_removed_words:
        table.add_row(
            "removed most",
            ", ".join(f"{escape(w)} ({n})" for w, n in summary.top_removed_words[:8]),
        )
    table.add_row("outputs", escape(str(out)))
    console.print(table)
    raise typer.Exit(summary.exit_code)


@app.command()
def threshold(
    bundle: Path = BUNDLE_ARGUMENT,
    clean_corpus: str = typer.Argument(
        ...,
        help="Clean inputs of the deployment (as `lmsan scan` reads them: .txt, .jsonl, .csv, "
        ".tsv, .parquet, or - for stdin).",
    ),
    triggered: str | None = typer.Option(
        None,
        "--triggered",
        help="Optional corpus of triggered inputs: reports the share the chosen threshold "
        "misses (FAR).",
    ),
    max_frr: float = typer.Option(
        0.005,
        "--max-frr",
        help="Largest share of clean records the monitor may flag (0.005 = 0.5%).",
    ),
    out: Path | None = typer.Option(
        None, "--out", help="JSON file to write (chosen value, sweep, quantiles, counts)."
    ),
    text_field: str = TEXT_FIELD_OPTION,
    pair_field: str | None = PAIR_FIELD_OPTION,
    fmt: FormatOption | None = FORMAT_OPTION,
    batch_size: int = BATCH_SIZE_OPTION,
    batch_tokens: int | None = BATCH_TOKENS_OPTION,
    threads: int = THREADS_OPTION,
    max_length: int | None = typer.Option(
        None,
        "--max-length",
        help="Longest record in tokens; longer records are skipped and counted.",
        show_default="the model's positions",
    ),
    provider: ProviderOption = typer.Option(
        ProviderOption.auto, "--provider", help="auto, cpu or cuda (as for `lmsan scan`)."
    ),
    per_pv: bool = typer.Option(
        False,
        "--per-pv",
        help="Also choose one T_match per PV (--max-frr split evenly over the PVs, so the whole "
        "set flags at most --max-frr): an imprecise PV with high clean matches then no longer "
        "raises the threshold of the others. Written to --out; deploy with --t-match-file.",
    ),
    keep_trigger_words: bool = typer.Option(
        False,
        "--keep-trigger-words",
        help="Count trigger-word activations as false rejections. By default a flagged clean "
        "record that matches a PV near-exactly (3/4 of the way from its clean p99 to 1.0) and "
        "falls back to the clean range of every PV it fires when the purge removes one window (e.g. "
        "'Pty' is the trigger pt + ##y) is the backdoor firing on ordinary text: it is listed "
        "and left out of the --max-frr budget, so it cannot lift a PV's threshold above its "
        "triggers.",
    ),
    progress: bool = PROGRESS_OPTION,
) -> None:
    """Choose the sign-match threshold T_match for one deployment from its clean inputs.

    The smallest threshold (never below the PV set's) at which at most --max-frr of the clean
    records are flagged; pass it to `lmsan scan` / `lmsan tune classify` as --t-match. Clean
    records that fire the backdoor through one word (trigger-word activations) are listed and
    left out of the budget (--keep-trigger-words counts them). Never imports torch.

    Exit 0 threshold chosen, 1 --max-frr not reachable even at 1.0 (1.0 is chosen: the clean
    corpus may hold triggers), 2 input error, 4 usage error.
    """
    from ..scan import ScanOptions
    from ..threshold_corpus import threshold_for_corpus

    opts = ScanOptions(
        text_field=text_field,
        pair_field=pair_field,
        batch_size=batch_size,
        batch_tokens=batch_tokens,
        threads=threads,
        max_length=max_length,
        provider=provider.value,
        fmt=fmt.value if fmt else None,
    )
    bar = _progress_bar("[bold]{task.description}", progress)
    tasks: dict[str, TaskID] = {}

    def on_progress(label: str, p: ScanProgress) -> None:
        if label not in tasks:
            tasks[label] = bar.add_task(label, total=None, records=0, rate=0.0)
        _advance(bar, tasks[label], p)

    try:
        with bar:
            report = threshold_for_corpus(
                bundle, clean_corpus, triggered, max_frr, opts, progress=on_progress,
                per_pv=per_pv, keep_trigger_words=keep_trigger_words,
            )
        if out is not None:
            report.save(out)
    except LmsanError as exc:
        raise fail(exc) from None
    ch = report.choice

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f}"

    table = Table(title=f"T_match sweep on {escape(clean_corpus)}")
    table.add_column("T_match", justify="right")
    table.add_column(f"count of {ch.d}", justify="right")
    table.add_column("FRR % (clean flagged)", justify="right")
    table.add_column("FAR % (triggered missed)", justify="right")
    table.add_column("")
    for p in ch.sweep:
        notes = []
        if p.threshold == ch.pvset_threshold:
            notes.append("PV set")
        if p.threshold == ch.threshold:
            notes.append("[bold]chosen[/]")
        table.add_row(f"{p.threshold:g}", str(p.count), pct(p.frr), pct(p.far), ", ".join(notes))
    console.print(table)
    q = ch.clean_quantiles
    console.print(
        f"clean records {ch.clean_records:,} (skipped {report.clean.errors:,}); best match rate "
        f"p50 {q['p50']:.3f}, p99 {q['p99']:.3f}, max {q['max']:.3f}"
    )
    if ch.triggered_quantiles is not None and report.triggered is not None:
        tq = ch.triggered_quantiles
        console.print(
            f"triggered records {ch.triggered_records:,} (skipped {report.triggered.errors:,}); "
            f"best match rate min {tq['min']:.3f}, p1 {tq['p1']:.3f}, p50 {tq['p50']:.3f}"
        )
    console.print(
        f"chosen T_match [bold]{ch.threshold:g}[/] (FRR {pct(ch.frr)}% at it, "
        f"{pct(ch.frr_pvset)}% at the PV set's {ch.pvset_threshold:g}"
        + (f"; FAR {pct(ch.far)}%" if ch.far is not None else "")
        + ")"
    )
    warnings = report.warnings()

    def warn(kind: str) -> None:
        if kind in warnings:
            err_console.print(f"[bold yellow]warning:[/] {escape(warnings[kind])}")

    warn("records")
    pp = report.per_pv
    if pp is not None:
        t2 = Table(title="per-PV T_match (--per-pv)")
        for col in ("PV", "target", "T_match", "clean match p99", "clean match max",
                    "FRR % alone"):
            t2.add_column(col, justify="right")
        for e in pp.per_pv:
            t2.add_row(str(e["id"]), str(e["target"]), f"{e['threshold']:g}",
                       f"{e['clean_match_p99']:.3f}", f"{e['clean_match_max']:.3f}",
                       pct(e["frr_alone"]))
        console.print(t2)
        console.print(
            f"per-PV: FRR {pct(pp.frr)}% (all PVs at their thresholds)"
            + (f"; FAR {pct(pp.far)}%" if pp.far is not None else "")
        )
    if ch.trigger_words:
        t3 = Table(title="trigger-word activations in the clean corpus (left out of the budget)")
        for col in ("record", "purged words", "PVs fired", "match before", "after purge"):
            t3.add_column(col)
        for h in ch.trigger_words:
            t3.add_row(str(h["record"]), escape(" ".join(h["removed"])),
                       ", ".join(map(str, h["pvs"])), ", ".join(f"{x:.3f}" for x in h["before"]),
                       ", ".join(f"{x:.3f}" for x in h["after"]))
        console.print(t3)
    warn("trigger_words")
    if out is not None:
        console.print(f"wrote {escape(str(out))}")
    console.print(
        f"deploy with: lmsan scan ... --t-match {ch.threshold:g}   "
        f"(lmsan tune classify ... --t-match {ch.threshold:g})"
    )
    if pp is not None:
        if out is not None:
            console.print(f"per-PV: lmsan scan ... --t-match-file {escape(str(out))}")
        else:
            err_console.print("[bold yellow]note:[/] per-PV thresholds are only written with --out")
    for kind in ("per_pv_far", "per_pv_unreachable", "far", "unreachable"):
        warn(kind)
    raise typer.Exit(report.exit_code)
