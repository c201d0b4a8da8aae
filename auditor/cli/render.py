"""`lmsan report`: a signed audit report as text, Markdown, HTML or SARIF. Torch-free."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path

import typer
from rich.markup import escape

from ..errors import EXIT_CLEAN, EXIT_FOUND, InputError, LmsanError
from .app import app, err_console, fail


class ReportFormat(str, Enum):
    text = "text"
    md = "md"
    html = "html"
    sarif = "sarif"


@app.command("report")
def report_cmd(
    report: Path = typer.Argument(..., help="The signed audit report (JSON) from `lmsan audit`."),
    fmt: ReportFormat = typer.Option(
        ReportFormat.text,
        "--format",
        help="text, md (fits a pull-request comment), html (one self-contained file with "
        "charts) or sarif (SARIF 2.1.0, for code-scanning tools).",
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="File to write (replaced atomically).",
        show_default="standard output",
    ),
    pub: Path | None = typer.Option(
        None,
        "--pub",
        help="Public key (PEM) the report must be signed with, as for `lmsan verify`.",
    ),
    model: Path | None = typer.Option(
        None,
        "--model",
        help="Model folder that must still match the report's manifest, as for `lmsan verify`.",
    ),
    allow_unverified: bool = typer.Option(
        False,
        "--allow-unverified",
        help="Render a report that fails verification anyway, under an UNVERIFIED banner in "
        "every format (the exit code stays 1).",
    ),
) -> None:
    """Render a signed audit report for reading: verdict, why, deciding figures, kept PVs.

    The report is verified first, as `lmsan verify` does; one that fails is refused.

    Exit 0 rendered a verified report, 1 it fails verification, 2 unreadable input, 4 usage.
    """
    from ..fsutil import atomic_write_text
    from ..render import load_verified, render

    try:
        verified = load_verified(report, model_dir=model, pub=pub)
    except LmsanError as exc:
        raise fail(exc) from None
    if not verified.valid and not allow_unverified:
        err_console.print(
            f"[bold red]error:[/] {escape(str(report))}: the report fails verification; not rendered "
            "(--allow-unverified renders it under an UNVERIFIED banner)",
            highlight=False,
            soft_wrap=True,
            markup=True,
        )
        for problem in verified.problems:
            err_console.print(f"  - {problem}", highlight=False, soft_wrap=True, markup=False)
        raise typer.Exit(EXIT_FOUND)
    text = render(verified, fmt.value)
    if out is None:
        try:
            sys.stdout.write(text)
        except UnicodeEncodeError:  # a terminal that cannot show every token: write UTF-8
            sys.stdout.flush()
            sys.stdout.buffer.write(text.encode("utf-8"))
        sys.stdout.flush()
    else:
        try:
            if out.is_dir():
                raise InputError("is a folder, expected a file to write", out)
            if not out.parent.is_dir():
                raise InputError("folder for the output does not exist", out.parent)
            atomic_write_text(out, text)
        except OSError as exc:
            raise fail(InputError(f"cannot write ({exc.strerror or exc})", out)) from None
        except LmsanError as exc:
            raise fail(exc) from None
        err_console.print(f"wrote {out} ({fmt.value})", highlight=False, markup=False)
    if not verified.valid:
        err_console.print(
            f"UNVERIFIED: {report} fails verification; rendered because of --allow-unverified",
            style="bold red",
            highlight=False,
            markup=False,
        )
        raise typer.Exit(EXIT_FOUND)
    raise typer.Exit(EXIT_CLEAN)
