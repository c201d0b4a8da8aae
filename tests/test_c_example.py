"""The C ABI works without Python: build native/examples/monitor_example.c against the core and run it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "native" / "src").glob("*.cpp"))
EXAMPLE = ROOT / "native" / "examples" / "monitor_example.c"


def _compiler(env: str, *names: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env]
    return next((p for p in map(shutil.which, names) if p), None)


CC = _compiler("CC", "cc", "gcc", "clang")
CXX = _compiler("CXX", "c++", "g++", "clang++")
needs_compilers = pytest.mark.skipif(not (CC and CXX), reason="no C and C++ compiler on PATH")


def _run_example(exe: Path) -> None:
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "row 1: pv 1 count 62 flagged 1" in proc.stdout
    assert "purge: 4 candidates" in proc.stdout
    assert proc.stdout.rstrip().endswith("OK")


@needs_compilers
def test_c_example_compiled_directly(tmp_path: Path) -> None:
    assert CC and CXX
    include = ROOT / "native" / "include"
    objs = []
    for src in SOURCES:
        obj = tmp_path / (src.stem + ".o")
        cmd = [CXX, "-std=c++17", "-O2", "-Wall", "-Werror", "-I", str(include), "-c", str(src)]
        subprocess.run([*cmd, "-o", str(obj)], check=True, timeout=300)
        objs.append(str(obj))
    main_obj = tmp_path / "monitor_example.o"
    cflags = ["-std=c99", "-O2", "-Wall", "-Werror", "-pedantic", "-I", str(include)]
    subprocess.run([CC, *cflags, "-c", str(EXAMPLE), "-o", str(main_obj)], check=True, timeout=120)
    exe = tmp_path / "monitor_example"
    subprocess.run([CXX, str(main_obj), *objs, "-pthread", "-o", str(exe)], check=True, timeout=120)
    _run_example(exe)


@needs_compilers
@pytest.mark.skipif(shutil.which("cmake") is None, reason="no cmake on PATH")
def test_c_example_built_with_cmake_outside_scikit_build(tmp_path: Path) -> None:
    build = tmp_path / "build"
    subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    subprocess.run(
        ["cmake", "--build", str(build), "--target", "monitor_example"],
        check=True,
        capture_output=True,
        timeout=600,
    )
    _run_example(build / "monitor_example")
