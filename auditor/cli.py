"""The `lmsan` command line. Thin: parse options, call one library function, render, exit.

Each group of commands lives in its own module (cli_audit, cli_report, cli_poison, cli_screen)
and registers itself on `app`; they are imported at the bottom of this file.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from . import __version__
from .errors import EXIT_ERROR, EXIT_USAGE, LmsanError

app = typer.Typer(
    name="lmsan",
    help="LMSanitizer auditor: find task-agnostic backdoors (POR, NeuBA, BToP) in pretrained "
    "Transformer encoders, and screen text for their triggers.\n\n"
    "Exit codes: 0 clean/valid, 1 backdoor found/invalid, 2 input error, 3 nothing scanned, "
    "4 usage error.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=False)
err_console = Console(stderr=True)


def fail(exc: LmsanError) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
    return typer.Exit(exc.exit_code)


@app.callback()
def _root() -> None:
    """LMSanitizer auditor."""


@app.command()
def version() -> None:
    """Print the lmsan version."""
    console.print(f"lmsan {__version__}")


def main() -> None:
    try:
        app()
    except LmsanError as exc:  # raised outside a command's own handler
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(exc.exit_code)
    except SystemExit as exc:
        # click reports usage errors with exit code 2; our contract says 4.
        if exc.code == 2 and not getattr(exc, "_lmsan", False):
            sys.exit(EXIT_USAGE)
        raise


# Command modules register themselves on `app`.
from . import cli_audit, cli_poison, cli_report, cli_screen  # noqa: E402,F401

__all__ = ["app", "main", "console", "err_console", "fail", "EXIT_ERROR"]
