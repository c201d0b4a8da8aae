"""The `lmsan` command line. Thin: parse options, call one library function, render, exit.

The typer app, the consoles and the error-to-exit-code mapping. Each group of commands lives in
its own module of this package and registers itself on `app` (see `__init__`).

Errors map to exit codes here only: an `LmsanError` a command raises is printed and ends the
command with its `exit_code` (`_Commands.invoke`, `fail`); click's usage errors exit 4 (`main`).
"""

from __future__ import annotations

import sys
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from .. import __version__
from ..errors import EXIT_ERROR, EXIT_USAGE, LmsanError


class _Commands(TyperGroup):
    """The command group: turns an `LmsanError` out of any command into its exit code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except LmsanError as exc:
            raise fail(exc) from None


app = typer.Typer(
    name="lmsan",
    cls=_Commands,
    help="LMSanitizer auditor: find task-agnostic backdoors (POR, NeuBA, BToP) in pretrained "
    "Transformer encoders, and screen text for their triggers.\n\n"
    "Exit codes: 0 clean/valid, 1 backdoor found/invalid, 2 input error, 3 nothing scanned, "
    "4 usage error.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # -h as well as --help, on this app and (inherited through click's context) every command
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console(stderr=False)
err_console = Console(stderr=True)


def fail(exc: LmsanError) -> typer.Exit:
    """Print `exc` as an error and return the `typer.Exit` with its exit code."""
    # escaped: a message may hold brackets (pip install "lmsan[ray]") that are not markup
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    return typer.Exit(exc.exit_code)


def _print_version(value: bool) -> None:
    if value:
        console.print(f"lmsan {__version__}", highlight=False)
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        is_eager=True,
        callback=_print_version,
        help="Print the lmsan version and exit.",
    ),
) -> None:
    """LMSanitizer auditor."""


@app.command()
def version() -> None:
    """Print the lmsan version (as --version does).

    Exit 0.
    """
    console.print(f"lmsan {__version__}", highlight=False)


def main() -> None:
    """Console entry point: maps click's usage errors to exit 4, our input errors to 2."""
    try:  # recent typer vendors click
        from typer._click.exceptions import UsageError
    except ImportError:  # pragma: no cover - older typer uses click itself
        from click.exceptions import UsageError  # type: ignore[assignment]

    try:
        rv = app(standalone_mode=False)
    except UsageError as exc:
        exc.show()
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except LmsanError as exc:  # raised outside a command (while parsing)
        sys.exit(fail(exc).exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)


__all__ = ["app", "main", "console", "err_console", "fail", "EXIT_ERROR"]
