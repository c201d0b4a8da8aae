"""`lmsan tune ...`: prompt-tune a task on a frozen backbone, and protect the deployed model.

lmsan tune train BACKBONE --task wordnet-topic --data DIR --out TASK   # P-tuning / v2 (peft)
lmsan tune prompt TASK --out prompt.npy       # the P-tuning prompt for `lmsan export --prompt`
lmsan tune export TASK --pvs PVSET --out BUNDLE   # P-tuning: prompt; v2: prefix baked in
lmsan tune classify BUNDLE TASK [TEXT ...]    # monitor + purge + classify, torch-free
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..errors import LmsanError
from .app import app, console, err_console, fail

tune_app = typer.Typer(
    help="Prompt-tune a downstream task on a frozen backbone (P-tuning, P-tuning v2 with peft) "
    "and protect the deployed model (bundle with the task prompt, monitor, purge).\n\n"
    "Exit codes: 0 done, 2 input error, 4 usage error.",
    no_args_is_help=True,
)
app.add_typer(tune_app, name="tune")

EXIT_CODES = "Exit 0 done, 2 input error, 4 usage error."
THREADS_HELP = "CPU threads (0 = all cores)."


# The choices of `lmsan tune train` (the same values as tuning.TASKS, METHODS, REPARAMS and
# HEAD_POSITIONS, which import torch and so cannot be read when the command line is built).
class TaskOption(str, Enum):
    wordnet_topic = "wordnet-topic"
    rte = "rte"
    conll04 = "conll04"


class MethodOption(str, Enum):
    ptuning = "ptuning"
    ptuning_v2 = "ptuning-v2"


class ReparamOption(str, Enum):
    mlp = "mlp"
    none = "none"


class HeadOption(str, Enum):
    cls = "cls"
    mask = "mask"


@tune_app.command("train")
def train(
    backbone: Path = typer.Argument(..., help="Hugging Face encoder folder (frozen backbone)."),
    task: TaskOption = typer.Option(
        ..., "--task", help="wordnet-topic (4 verb classes), rte (pairs) or conll04 (tokens)."
    ),
    data: Path = typer.Option(
        ...,
        "--data",
        help="Data folder holding wordnet/examples.tsv, rte/{train,validation}.jsonl and "
        "conll04/{train.txt,dev.txt,test.bio}.",
    ),
    out: Path = typer.Option(..., "--out", help="Task folder to write (peft adapter + head)."),
    method: MethodOption = typer.Option(
        MethodOption.ptuning,
        "--method",
        help="ptuning (input prompt) or ptuning-v2 (prefix at every layer).",
    ),
    reparam: ReparamOption = typer.Option(
        ReparamOption.mlp,
        "--reparam",
        help="P-tuning prompt: mlp (peft PromptEncoder) or none (plain prompt embeddings).",
    ),
    prompt_length: int = typer.Option(
        16, "--prompt-length", help="Virtual tokens / prefix length."
    ),
    epochs: int = typer.Option(3, "--epochs", help="Passes over the training split."),
    lr: float = typer.Option(5e-3, "--lr", help="Adam learning rate of the prompt / prefix."),
    head_lr: float = typer.Option(5e-3, "--head-lr", help="Adam learning rate of the head."),
    batch_size: int = typer.Option(16, "--batch-size", help="Examples per step."),
    max_length: int = typer.Option(
        128, "--max-length", help="Training inputs are truncated to this many tokens."
    ),
    train_limit: int | None = typer.Option(
        None, "--train-limit", help="Train on a seeded random subset of at most N examples."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of initialisation, split and batch order."),
    target: HeadOption = typer.Option(
        HeadOption.cls,
        "--target",
        help=escape(
            "Position the classification head reads (sentence and pair tasks): cls, or mask = "
            "the [MASK] of the template '{sentence} [MASK]' on the last text (prompt-based "
            "classification, what BToP attacks; protect it with a PV set that has mask PVs)."
        ),
    ),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out folder."),
    threads: int = typer.Option(0, "--threads", help="torch " + THREADS_HELP),
) -> None:
    """Train a P-tuning / P-tuning v2 model of a task on a frozen backbone.

    Exit 0 trained, 2 input error, 4 usage error.
    """
    from .. import tuning

    cfg = tuning.TrainConfig(
        method=method.value,
        reparam=reparam.value,
        prompt_length=prompt_length,
        epochs=epochs,
        lr=lr,
        head_lr=head_lr,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        train_limit=train_limit,
        target=target.value,
    )
    try:
        res = tuning.train_task_folder(
            backbone, task.value, data, out, cfg, force=force, threads=threads,
            progress=_training_bar,
        )
    except LmsanError as exc:
        raise fail(exc) from None
    info = res.handle.info
    table = Table(title=f"{escape(task.value)} / {method.value}", show_header=False)
    table.add_row("task folder", escape(str(out)))
    table.add_row("train examples", str(info["train_examples"]))
    table.add_row("steps", str(info["steps"]))
    table.add_row("final loss", f"{info['final_loss']:.4f}")
    table.add_row("test " + ("accuracy" if res.kind == "sequence" else "span F1"), f"{res.score:.2f}")
    table.add_row("seconds", f"{info['seconds']:.1f}")
    console.print(table)


@contextmanager
def _training_bar() -> Iterator[Callable[[int, int, float], None]]:
    """A progress bar of the training steps on stderr (shown on a terminal only)."""
    with Progress(
        TextColumn("training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=err_console,
        disable=not sys.stderr.isatty(),
    ) as bar:
        job = bar.add_task("train", total=None, loss="-")

        def progress(step: int, total: int, loss: float) -> None:
            bar.update(job, completed=step, total=total, loss=f"{loss:.3f}")

        yield progress


@tune_app.command("prompt")
def prompt(
    task_dir: Path = typer.Argument(..., help="Task / peft adapter folder (P-tuning)."),
    out: Path = typer.Option(
        ..., "--out", help=escape("The .npy file to write ([length, emb] float32).")
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file."),
) -> None:
    """Write the P-tuning prompt (after peft's MLP) as .npy for `lmsan export --prompt`.

    Exit 0 written, 2 input error, 4 usage error.
    """
    from .. import tuning

    try:
        res = tuning.extract_prompt(task_dir, out, force=force)
    except LmsanError as exc:
        raise fail(exc) from None
    console.print(f"wrote {escape(str(res.path))} {list(res.shape)} ({res.peft_type})")
    if not res.position_matches_bundle:
        err_console.print(f"[bold yellow]warning:[/] {escape(res.note)}")


@tune_app.command("export")
def export(
    task_dir: Path = typer.Argument(..., help="Task folder written by `lmsan tune train`."),
    pvs: Path = typer.Option(..., "--pvs", help="PV set file (or signed audit report)."),
    out: Path = typer.Option(..., "--out", help="Bundle folder to write."),
    backbone: Path | None = typer.Option(
        None,
        "--backbone",
        help="Backbone folder.",
        show_default="the path recorded in the task",
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle."),
    pvs_at_head: bool = typer.Option(
        False,
        "--pvs-at-head",
        help=escape(
            "Match every PV at the position the task head reads ([CLS], [MASK] or the tokens), "
            "whatever position it was mined on: a trigger drives the whole sequence to its PV. "
            "A token task's PVs mined on [CLS] also stay at [CLS]. "
            "Pooler PVs are dropped and near-duplicates (sign agreement >= 0.95) merged."
        ),
    ),
) -> None:
    """Export the protected bundle of a task: the backbone with the task prompt (P-tuning) or the
    trained prefix baked in as constants (P-tuning v2), validated against torch.

    Exit 0 bundle written, 2 input error (including a failed validation), 4 usage error.
    """
    from lmsan.export.task_bundle import export_task_bundle

    try:
        res = export_task_bundle(
            task_dir, pvs, out, backbone_dir=backbone, force=force, pvs_at_head=pvs_at_head
        )
    except LmsanError as exc:
        raise fail(exc) from None
    v = res.validation
    console.print(
        f"wrote {escape(str(res.path))} ({res.method}); validation: max |ORT - torch| "
        f"{v['max_abs_diff_target']:.2e}, monitor decisions identical: {v['decisions_identical']}"
    )


@tune_app.command("classify")
def classify(
    bundle: Path = typer.Argument(..., help="Bundle written by `lmsan tune export`."),
    task_dir: Path = typer.Argument(..., help="The task folder (for its head and labels)."),
    text: list[str] = typer.Argument(
        None,
        help="Texts to classify; a pair as 'premise ||| hypothesis'.",
        show_default="the lines of standard input",
    ),
    max_window: int = typer.Option(5, "--max-window", help="Longest purge window (words)."),
    threads: int = typer.Option(0, "--threads", help="ONNX Runtime " + THREADS_HELP),
    t_match: float | None = typer.Option(
        None,
        "--t-match",
        metavar="FLOAT",
        help="Sign-match threshold T_match in (0, 1]: overrides the bundle's PV-set threshold "
        "(e.g. the value `lmsan threshold` chose on clean task data).",
    ),
    t_match_file: Path | None = typer.Option(
        None,
        "--t-match-file",
        metavar="FILE",
        help="The file `lmsan threshold --out` wrote for this bundle: its per-PV thresholds "
        "(--per-pv), else its single T_match. Refused for another bundle; not with --t-match.",
    ),
) -> None:
    """Monitor, purge and classify texts with the protected bundle (torch-free).

    Exit 0 classified (rejected inputs are listed as such), 2 input error, 4 usage error.
    """
    from .. import tuning
    from .options import thresholds_from_options

    try:
        # a usage error before any other file is read
        thresholds = thresholds_from_options(t_match, t_match_file)
        lines = text or [ln.rstrip("\n") for ln in sys.stdin if ln.strip()]
        res = tuning.classify_texts(
            bundle, task_dir, lines, max_window=max_window, threads=threads,
            thresholds=thresholds,
        )
    except LmsanError as exc:
        raise fail(exc) from None
    table = Table()
    for col in ("input", "status", "removed", "prediction"):
        table.add_column(col)
    labels = res.labels
    for r, p in zip(res.records, res.predictions, strict=True):
        if p.prediction is None:
            shown = "rejected"
        elif isinstance(p.prediction, int):
            shown = labels[p.prediction]
        else:
            shown = " ".join(labels[t] if t >= 0 else "?" for t in p.prediction)
        table.add_row(escape(" ||| ".join(r)), p.status, escape(" ".join(p.removed)), escape(shown))
    console.print(table)
