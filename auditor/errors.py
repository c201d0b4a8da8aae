"""Errors with the exit-code contract of the CLI.

Exit codes: 0 clean / valid, 1 backdoor found / invalid, 2 error in the input (the message
names the file or field), 3 nothing scanned, 4 usage error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

EXIT_CLEAN = 0
EXIT_FOUND = 1
EXIT_ERROR = 2
EXIT_NOTHING = 3
EXIT_USAGE = 4


class LmsanError(Exception):
    """An error caused by the input; the CLI prints the message and exits with `exit_code`."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, path: object | None = None) -> None:
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


class InputError(LmsanError):
    """A file, folder or field given by the user is missing, unreadable or malformed."""


class FormatError(InputError):
    """A file written by lmsan (PV set, report, bundle manifest) fails validation."""


class UsageError(LmsanError):
    """Options that contradict each other or are out of range."""

    exit_code = EXIT_USAGE


def check_header(data: Any, fmt: str, version: int, bad: Callable[[str], FormatError]) -> None:
    """Raise ``bad(msg)`` unless ``data`` (parsed JSON) is an object whose ``format`` field is
    ``fmt`` and whose ``version`` field is ``version``: the header of every lmsan file."""
    if not isinstance(data, dict):
        raise bad("top level is not an object")
    if data.get("format") != fmt:
        raise bad(f"field 'format' is {data.get('format')!r}, expected {fmt!r}")
    if data.get("version") != version:
        raise bad(f"field 'version' is {data.get('version')!r}, this lmsan reads {version}")
