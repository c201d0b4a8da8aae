"""Readable renderings of a signed audit report: text, Markdown, HTML and SARIF. Torch-free.

`load_verified(path)` verifies a report (the same checks as `lmsan verify`) and keeps the result
with the decoded predicate; `render(verified, fmt)` returns the report in one format as a string.
Every format names the verdict, and a report that fails verification renders only under an
UNVERIFIED banner. The functions return strings and never print.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import FormatError
from ..report import Verification, verify_report_bytes
from ..signing import PublicKey
from .facts import BACKDOORED, CLEAN, UNKNOWN, Facts, facts
from .html import render_html
from .sarif import render_sarif
from .text import render_md, render_text

FORMATS = ("text", "md", "html", "sarif")
SUFFIXES = {"text": ".txt", "md": ".md", "html": ".html", "sarif": ".sarif"}


@dataclass
class VerifiedReport:
    """A report after verification: `verification.valid` says whether it can be trusted."""

    verification: Verification
    path: str = ""
    model_dir: str | None = None

    @property
    def valid(self) -> bool:
        return self.verification.valid

    @property
    def problems(self) -> list[str]:
        return self.verification.problems


def load_verified(
    path: str | Path,
    model_dir: str | Path | None = None,
    pub: str | Path | PublicKey | None = None,
) -> VerifiedReport:
    """Verify the report at `path` (with `model_dir` and `pub` as `verify_report` takes them).

    Raises InputError when a file cannot be read and FormatError when it is not a signed lmsan
    report at all (not JSON, or JSON without a DSSE envelope); a report that is readable but fails
    verification comes back with `valid` False and its problems listed.
    """
    p = Path(path)
    from ..report import read_report_bytes

    raw = read_report_bytes(p)
    v = verify_report_bytes(raw, p, model_dir=model_dir, pub=pub)
    if v.predicate is None:
        env = json.loads(raw.decode("utf-8"))  # verify_report_bytes has parsed it already
        if not isinstance(env, dict) or not isinstance(env.get("payload"), str) or not isinstance(
            env.get("signatures"), list
        ):
            raise FormatError("not a signed lmsan report (no DSSE envelope with a payload)", p)
    return VerifiedReport(v, str(path), str(model_dir) if model_dir is not None else None)


def report_facts(verified: VerifiedReport) -> Facts:
    return facts(verified.verification, verified.path, verified.model_dir)


def render(verified: VerifiedReport, fmt: str) -> str:
    """The report in format `fmt` (one of FORMATS) as a string."""
    fx = report_facts(verified)
    if fmt == "text":
        return render_text(fx)
    if fmt == "md":
        return render_md(fx)
    if fmt == "html":
        return render_html(fx)
    if fmt == "sarif":
        return render_sarif(fx)
    raise ValueError(f"unknown report format {fmt!r}; expected one of {', '.join(FORMATS)}")


__all__ = [
    "FORMATS",
    "SUFFIXES",
    "BACKDOORED",
    "CLEAN",
    "UNKNOWN",
    "Facts",
    "VerifiedReport",
    "load_verified",
    "render",
    "report_facts",
]
