"""Conventions every `lmsan` command follows: -h and --help, --version, choices checked at parse
time, help text that survives rich markup, one style of flags, defaults shown by typer, exit codes
at the end of each command's help. Torch-free: only the command line is built."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import typer
from lmsan.auditor import __version__
from lmsan.auditor.cli import app
from rich.text import Text
from typer.testing import CliRunner

runner = CliRunner()

# The commands whose options this file holds to every convention (the modules app.py, report.py,
# render.py, tune.py and the export / threshold commands of screen.py).
OWN = {
    ("version",), ("keygen",), ("verify",), ("report",), ("export",), ("threshold",), ("tune",),
    ("tune", "train"), ("tune", "prompt"), ("tune", "export"), ("tune", "classify"),
}


def _walk(cmd: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    out = [(path, cmd)]
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        out += _walk(sub, (*path, name))
    return out


COMMANDS = _walk(typer.main.get_command(app))
OWN_COMMANDS = [(p, c) for p, c in COMMANDS if p in OWN]


def _options(cmd: Any) -> list[Any]:
    return [p for p in cmd.params if getattr(p, "opts", None) and p.param_type_name == "option"]


def test_every_own_command_is_in_the_app() -> None:
    assert {p for p, _ in OWN_COMMANDS} == OWN
    assert len(COMMANDS) > len(OWN)  # the walk reaches the other groups' commands too


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=lambda p: " ".join(p) or "lmsan")
def test_dash_h_is_help_on_every_command(path: tuple[str, ...]) -> None:
    short = runner.invoke(app, [*path, "-h"])
    assert short.exit_code == 0, short.output
    assert "Usage:" in short.output and "--help" in short.output
    long = runner.invoke(app, [*path, "--help"])
    assert long.exit_code == 0 and long.output == short.output


def test_version_option_and_command() -> None:
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output == f"lmsan {__version__}\n"
    r = runner.invoke(app, ["version"])
    assert r.exit_code == 0 and r.output == f"lmsan {__version__}\n"
    # through the console script, eager: no command needed, and it does not import torch
    r2 = subprocess.run(["lmsan", "--version"], capture_output=True, text=True)
    assert r2.returncode == 0 and r2.stdout == f"lmsan {__version__}\n", r2.stderr
    code = textwrap.dedent(
        """
        import sys
        from lmsan.auditor.cli import app
        try:
            app(["--version"])
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        assert "torch" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _help_texts(cmd: Any) -> list[tuple[str, str]]:
    texts = [("(command)", cmd.help or "")]
    texts += [("/".join(p.opts), p.help or "") for p in cmd.params if getattr(p, "help", None)]
    return texts


def _lost_to_markup(text: str) -> bool:
    """True when rich markup would drop part of `text` (a lower-case [tag] not escaped)."""
    return Text.from_markup(text).plain != text.replace("\\[", "[")


def test_no_help_text_of_own_commands_loses_bracketed_text() -> None:
    lost = [
        (" ".join(path), name, text)
        for path, cmd in OWN_COMMANDS
        for name, text in _help_texts(cmd)
        if _lost_to_markup(text)
    ]
    assert lost == []
    # and the rendered help shows it: the soft prompt's shape, the .npy file's shape
    r = runner.invoke(app, ["export", "-h"], terminal_width=300)
    assert "[length, embedding width]" in r.output
    r = runner.invoke(app, ["tune", "prompt", "-h"], terminal_width=300)
    assert "[length, emb] float32" in r.output


def test_markup_check_sees_a_dropped_tag() -> None:
    assert _lost_to_markup("a .npy array [length, width] of floats")
    assert not _lost_to_markup("the [CLS] token, (0, 1], a \\[length, width] array")


@pytest.mark.parametrize(
    "args, choice",
    [
        (["tune", "train", "bb", "--task", "nope", "--data", "d", "--out", "o"], "--task"),
        (["tune", "train", "bb", "--task", "rte", "--data", "d", "--out", "o",
          "--method", "lora"], "--method"),
        (["tune", "train", "bb", "--task", "rte", "--data", "d", "--out", "o",
          "--reparam", "lstm"], "--reparam"),
        (["tune", "train", "bb", "--task", "rte", "--data", "d", "--out", "o",
          "--target", "tokens"], "--target"),
        (["threshold", "b", "c.txt", "--provider", "tpu"], "--provider"),
        (["threshold", "b", "c.txt", "--format", "xml"], "--format"),
        (["report", "r.json", "--format", "pdf"], "--format"),
        (["keygen", "--kind", "rsa"], "--kind"),
    ],
)
def test_fixed_choices_are_checked_when_parsing(args: list[str], choice: str) -> None:
    """A bad choice is a usage error (exit 4) naming the option, before any file is read."""
    r = subprocess.run(["lmsan", *args], capture_output=True, text=True)
    assert r.returncode == 4, (r.returncode, r.stdout, r.stderr)
    assert choice in r.stderr and "Traceback" not in r.stderr


def test_choices_match_the_library() -> None:
    tuning = pytest.importorskip("lmsan.auditor.tuning")  # imports torch
    from lmsan.auditor.cli import tune

    assert tuple(o.value for o in tune.TaskOption) == tuning.TASKS
    assert tuple(o.value for o in tune.MethodOption) == tuning.METHODS
    assert tuple(o.value for o in tune.ReparamOption) == tuning.REPARAMS
    assert tuple(o.value for o in tune.HeadOption) == tuning.HEAD_POSITIONS


def test_own_options_follow_one_style() -> None:
    problems = []
    for path, cmd in OWN_COMMANDS:
        where = " ".join(path)
        for p in _options(cmd):
            name = "/".join(p.opts)
            help_text = p.help or ""
            if p.secondary_opts and p.default is not True:  # --x/--no-x only when on by default
                problems.append(f"{where} {name}: --no- form of a flag that is off by default")
            if re.search(r"\(default\b|\bDefault:", help_text):
                problems.append(f"{where} {name}: default given in prose")
            if name == "--threads" and (p.default != 0 or "0 = all cores" not in help_text):
                problems.append(f"{where} {name}: not 0 = all cores")
            if name == "--out" and not re.search(r"\b(file|folder)\b", help_text, re.I):
                problems.append(f"{where} {name}: does not say file or folder")
    assert problems == []


def test_own_commands_end_their_help_with_the_exit_codes() -> None:
    for path, cmd in OWN_COMMANDS:
        last = (cmd.help or "").strip().split("\n\n")[-1]
        assert re.match(r"Exit( codes:)? 0\b", last.strip()), (path, last)
