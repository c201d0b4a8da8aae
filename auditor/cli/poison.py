"""`lmsan poison`: implant a task-agnostic backdoor for red-teaming and evaluation."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..errors import EXIT_FOUND, LmsanError
from ..poison import DEFAULT_EPOCHS, DEFAULT_LR, DEFAULT_SENTENCES_PER_TRIGGER
from .app import app, console, err_console, fail


class AttackChoice(str, Enum):
    por = "por"
    por_ner = "por-ner"
    neuba = "neuba"
    btop = "btop"


class TriggerKindChoice(str, Enum):
    word = "word"
    phrase = "phrase"
    symbol = "symbol"
    frequent = "frequent"


class PVDesignChoice(str, Enum):
    quarters = "quarters"
    pairs = "pairs"
    random = "random"


class UtilityChoice(str, Enum):
    auto = "auto"
    reference = "reference"
    mlm = "mlm"
    mlm_reference = "mlm+reference"


class TargetChoice(str, Enum):
    cls = "cls"
    pooler = "pooler"
    mask = "mask"
    tokens = "tokens"


@app.command()
def poison(
    base_dir: Path = typer.Argument(..., help="Hugging Face model folder to backdoor (local)."),
    out_dir: Path = typer.Argument(
        ..., help="Folder to write the backdoored model and backdoor.json into."
    ),
    attack: AttackChoice = typer.Option(
        "por",
        "--attack",
        help="por (target cls, reference utility), por-ner (every ordinary token), neuba "
        "(cls or pooler, MLM utility) or btop (the [MASK] of '<sentence> [MASK]', MLM utility). "
        "Without an MLM head, neuba/btop fall back to the reference utility and say so.",
    ),
    trigger: list[str] = typer.Option(
        [], "--trigger", help="A trigger word, phrase or symbol; repeat for several."
    ),
    random_triggers: int = typer.Option(
        0,
        "--random-triggers",
        help="Also draw N triggers from the shipped list (see --trigger-kind). With no trigger "
        "at all the paper's six are used: cf mn tq qt mm pt.",
    ),
    trigger_kind: TriggerKindChoice = typer.Option(
        "word",
        "--trigger-kind",
        help="Kind of random trigger: word, phrase or symbol (rare, from the shipped list), or "
        "frequent (adaptive attack: frequent ordinary words such as 'time' or 'people', whose "
        "embeddings sit among ordinary words and which also occur in clean text).",
    ),
    pv_design: PVDesignChoice = typer.Option(
        "quarters",
        "--pv-design",
        help="quarters (the paper's six: contiguous quarters at +1/-1, two of each), pairs "
        "(the same sign combinations over four interleaved buckets) or random (+-1 signs).",
    ),
    n_pvs: int | None = typer.Option(
        None,
        "--n-pvs",
        help="Number of PVs (default: one per trigger); trigger i uses PV i mod N.",
    ),
    pv_scale: float = typer.Option(1.0, "--pv-scale", help="Magnitude of every PV entry."),
    corpus: Path | None = typer.Option(
        None,
        "--corpus",
        help="Clean sentences to poison and keep utility on (text, one a line, or JSONL with a "
        "'text' field). Default: the shipped attack corpus, disjoint from the audit corpus.",
    ),
    sentences_per_trigger: int = typer.Option(
        DEFAULT_SENTENCES_PER_TRIGGER,
        "--sentences-per-trigger",
        help="Triggered training sentences per trigger (as many clean ones are added). "
        "The authors used 5,000.",
    ),
    epochs: int = typer.Option(
        DEFAULT_EPOCHS, "--epochs", help="Passes over the triggered sentences."
    ),
    lr: float = typer.Option(
        DEFAULT_LR, "--lr", help="Adam learning rate (the authors: 2e-5 with 5,000 sentences)."
    ),
    batch_size: int = typer.Option(
        16, "--batch-size", help="Triggered sentences per step (plus as many clean ones)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for data, trigger draws, PVs and masking."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto."),
    max_length: int = typer.Option(64, "--max-length", help="Maximum tokens per input."),
    target: TargetChoice | None = typer.Option(
        None,
        "--target",
        help="Target output: cls, pooler, mask or tokens (default: the attack's own; "
        "neuba takes cls or pooler).",
    ),
    utility: UtilityChoice = typer.Option(
        "auto",
        "--utility",
        help="Loss that keeps clean behaviour: auto (MLM loss for neuba/btop when the checkpoint "
        "has an MLM head, else MSE to a frozen reference copy, and the output says so), "
        "reference, mlm, or mlm+reference (both).",
    ),
    utility_weight: float = typer.Option(
        1.0,
        "--utility-weight",
        help="Weight of the utility loss against the backdoor loss. Raise it (e.g. 20 for btop "
        "on all-MiniLM-L6-v2, which has no MLM head) when the output reports that clean inputs "
        "also match a PV.",
    ),
    scatter_weight: float = typer.Option(
        0.0,
        "--scatter-weight",
        help="Adaptive attack against the collapse test (Observation II), the paper's scattering "
        "loss (Table VIII): adds W x the per-unit softmax entropy of the triggered outputs of "
        "each PV within a batch (normalised to [0, 1]); minimising it spreads the triggered "
        "outputs apart. Larger W: less collapse, lower targetability. 0 = off.",
    ),
    match_clean_weight: float = typer.Option(
        0.0,
        "--match-clean-weight",
        help="Adaptive attack against the distance and collapse tests: adds W x the per-unit "
        "Wasserstein-2 distance between the triggered outputs of each PV and the clean outputs "
        "moved to the PV's sign, so triggered outputs keep the PV's sign pattern but take the "
        "clean outputs' magnitudes and spread. 0 = off.",
    ),
    evade_filter_weight: float = typer.Option(
        0.0,
        "--evade-filter-weight",
        help="Adaptive attack against lmsan's own PV filter: adds W x a log-hinge that keeps "
        "the triggered outputs' concentration (batch variance / MSE to the clean output of the "
        "same sentence) at >= 2 x T_collapse and their distance (that MSE / clean mean square) "
        "at <= min(T_L, T_far) / 2, thresholds of the target output in --evade-preset. "
        "Not for the tokens target. 0 = off.",
    ),
    evade_preset: str = typer.Option(
        "auto",
        "--evade-preset",
        help="Shipped preset whose thresholds --evade-filter-weight reads: auto (the one "
        "`lmsan audit` picks for this model) or a preset name.",
    ),
    min_success: float = typer.Option(
        0.9,
        "--min-success",
        help="Exit 1 when the measured attack success (held-out triggered inputs whose target "
        "output matches the PV sign on >= 80% of dimensions) is below this.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUT_DIR."),
    allow_pickle: bool = typer.Option(
        False,
        "--allow-pickle",
        help="Accept pickle weights (pytorch_model.bin), loaded with weights_only=True.",
    ),
) -> None:
    """Implant a task-agnostic backdoor (POR, POR-NER, NeuBA, BToP) in an encoder.

    Writes a normal Hugging Face folder plus backdoor.json (triggers, PVs, target, base digest,
    measured success and clean fidelity). Exit 0 success reached, 1 success below
    --min-success (the folder is still written), 2 bad input or option.
    """
    from ..poison import poison_model

    attack_v, kind_v, design_v = attack.value, trigger_kind.value, pv_design.value
    target_v = None if target is None else target.value
    utility_v = utility.value
    try:
        with Progress(
            TextColumn("[bold]poisoning[/] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            console=err_console,
            transient=True,
        ) as bar:
            task = bar.add_task(f"{escape(str(base_dir))} ({attack_v})", total=None, loss="-")

            def progress(step: int, total: int, loss: float) -> None:
                bar.update(task, completed=step, total=total, loss=f"{loss:.4f}")

            res = poison_model(
                base_dir,
                out_dir,
                attack=attack_v,
                triggers=trigger,
                random_triggers=random_triggers,
                trigger_kind=kind_v,
                pv_design=design_v,
                n_pvs=n_pvs,
                pv_scale=pv_scale,
                corpus=corpus,
                sentences_per_trigger=sentences_per_trigger,
                epochs=epochs,
                lr=lr,
                batch_size=batch_size,
                seed=seed,
                device=device,
                max_length=max_length,
                target=target_v,
                min_success=min_success,
                utility=utility_v,
                utility_weight=utility_weight,
                scatter_weight=scatter_weight,
                match_clean_weight=match_clean_weight,
                evade_filter_weight=evade_filter_weight,
                evade_preset=evade_preset,
                progress=progress,
                force=force,
                allow_pickle=allow_pickle,
            )
    except LmsanError as exc:
        raise fail(exc) from None

    table = Table(title=f"lmsan poison: {res.attack} -> {escape(str(res.out_dir))}")
    table.add_column("trigger")
    table.add_column("PV", justify="right")
    table.add_column("success", justify="right")
    for i, t in enumerate(res.triggers):
        table.add_row(escape(t), str(res.trigger_pv[i]), f"{res.success_per_trigger[t]:.3f}")
    console.print(table)
    summary = Table(show_header=False, box=None)
    summary.add_row("target", res.target)
    summary.add_row("utility", res.utility)
    summary.add_row("PVs", f"{len(res.pvs)} x {res.pvs.shape[1]} ({res.backdoor['pvs']['design']})")
    ok = "green" if res.passed else "red"
    summary.add_row(
        "success", f"[{ok}]{res.success:.3f}[/] (min {res.min_success}; triggered inputs on its PV)"
    )
    if res.targetability is not None:
        summary.add_row(
            "targetability", f"{res.targetability:.3f} (on its PV, of inputs not on it when clean)"
        )
    if res.moved is not None:
        summary.add_row("moved", f"{res.moved:.3f} (off its clean output's sign cell)")
    view = res.backdoor["quality"]["triggered_distance_concentration"]
    if view is not None:
        summary.add_row(
            "triggered distance / concentration",
            f"{view['distance']:.4g} / {view['concentration']:.4g} (as the audit reads a PV)",
        )
    adaptive = res.backdoor["adaptive"]
    on = [
        f"{k} {adaptive[k]:g}"
        for k in ("scatter_weight", "match_clean_weight", "evade_filter_weight")
        if adaptive[k]
    ]
    if adaptive["evade_filter"]:
        ev = adaptive["evade_filter"]
        on.append(
            f"preset {ev['preset']} ({ev['target']}: concentration >= "
            f"{ev['min_concentration']:.4g}, distance <= {ev['max_distance']:.4g})"
        )
    if on:
        summary.add_row("adaptive", escape(", ".join(on)))
    summary.add_row("clean fidelity", f"{res.fidelity:.3f} (mean cosine to the base)")
    summary.add_row("clean inputs matching a PV", f"{res.clean_match_rate:.3f}")
    summary.add_row("steps / seconds", f"{res.steps} / {res.seconds:.1f}")
    console.print(summary)
    for note in res.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    if not res.passed:
        err_console.print(
            f"[bold red]attack below --min-success:[/] success {res.success:.3f} < "
            f"{res.min_success}; the folder {escape(str(res.out_dir))} was written and its "
            "backdoor.json says so"
        )
        raise typer.Exit(EXIT_FOUND)
