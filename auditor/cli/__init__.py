"""The `lmsan` command line. Thin: parse options, call one library function, render, exit.

`app` holds the typer application and the error-to-exit-code mapping; each command group is a
module of this package that registers its commands on `app` when imported here.
"""

from __future__ import annotations

from . import audit, poison, render, report, screen, tune  # noqa: F401  (register the commands)
from .app import app, main

__all__ = ["app", "main"]
