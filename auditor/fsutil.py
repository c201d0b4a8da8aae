"""Writing files and folders so that a reader never sees half of one.

Every file lmsan writes (report, PV set, presets, thresholds, scan outputs, keys) goes through
`atomic_write_bytes` / `atomic_write_text` / `atomic_write_json`: the data lands in a temporary
file beside the target, is flushed to disk, and replaces the target in one `os.replace`. Every
folder (bundles, poisoned models, task models) is built in `staged_dir` and moved into place only
when complete, so an interrupted run leaves the previous folder, or nothing, never a mix.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | Path, data: bytes, *, mode: int | None = None) -> Path:
    """Write `data` to `path` atomically. With `mode` (e.g. 0o600) the temporary file is created
    with those permissions, so the content is never briefly readable by others."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(tmp, flags, 0o666 if mode is None else mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)  # in case umask or an inherited ACL interfered
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


def atomic_write_text(path: str | Path, text: str, *, mode: int | None = None) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_write_json(
    path: str | Path, data: Any, *, indent: int | None = 1, sort_keys: bool = False
) -> Path:
    """JSON in UTF-8 with a final newline, written atomically."""
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n"
    return atomic_write_text(path, text)


@contextlib.contextmanager
def staged_dir(out: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out`; on success it becomes `out`.

    With `replace`, an existing `out` is removed just before the move (the caller has already
    decided that overwriting is allowed); without it an existing `out` raises FileExistsError.
    On any error the temporary folder is removed and `out` is left as it was.
    """
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=str(target.parent)))
    try:
        yield tmp
        for p in [tmp, *tmp.rglob("*")]:  # mkdtemp makes 0700; give the result normal modes
            with contextlib.suppress(OSError):
                os.chmod(p, 0o755 if p.is_dir() else 0o644)
        if target.exists():
            if not replace:
                raise FileExistsError(str(target))
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
