"""`lmsan scan --engine ray`: the same outputs as the local scan, byte for byte, in every format,
and still after an actor is killed mid-run."""

from __future__ import annotations

import csv
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import screen_fixtures as sf
from lmsan.auditor.scan import RUN_FIELDS, ScanOptions, scan
from lmsan.auditor.scan_core import ChunkResult
from lmsan.auditor.scan_ray import RayRunner, ScreenActor
from test_scan import mixed_lines

ray = pytest.importorskip("ray")  # the optional extra; the no-ray path is tested in test_scan

KILL_MARKER = "LMSAN_TEST_KILL_MARKER"  # read by the test's own actor below, never by lmsan
KILL_CHUNK = 2


class KillOnceActor(ScreenActor):
    """Kills its own process (SIGKILL) on chunk KILL_CHUNK the first time any actor reaches it."""

    def screen(self, chunk: int, records: list[Any]) -> ChunkResult:
        marker = Path(os.environ[KILL_MARKER])
        if chunk == KILL_CHUNK and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().screen(chunk, records)


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A local Ray instance with 2 CPUs; yields the kill marker's path (absent until a kill)."""
    marker = tmp_path_factory.mktemp("ray") / "killed"
    os.environ[KILL_MARKER] = str(marker)
    # the test actor is shipped by value (the workers cannot import this test module)
    ray.cloudpickle.register_pickle_by_value(__import__(__name__))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield marker
    ray.shutdown()
    os.environ.pop(KILL_MARKER, None)


def _outputs(out: Path) -> dict[str, bytes]:
    """Every output file's bytes (parquet parts too); summary.json without its run fields."""
    files: dict[str, bytes] = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name != "checkpoint.json":
            files[str(p.relative_to(out))] = p.read_bytes()
    summary = json.loads(files.pop("summary.json"))
    for k in RUN_FIELDS:
        summary.pop(k)
    files["summary.json"] = json.dumps(summary, sort_keys=True).encode()
    return files


def _corpora(tmp: Path) -> list[tuple[Path, dict[str, Any]]]:
    lines, _ = mixed_lines(30, 10, seed=4)
    txt = tmp / "c.txt"
    raw = "\n".join(lines[:15]).encode() + b"\n\n" + b"caf\xe9\n" + ("word " * 200).encode()
    txt.write_bytes(raw + b"\n" + "\n".join(lines[15:]).encode() + b"\n")
    jsonl = tmp / "c.jsonl"
    rows = [json.dumps({"id": i, "a": t, "b": lines[-i - 1]}) for i, t in enumerate(lines)]
    rows[5] = "{not json"
    jsonl.write_text("\n".join(rows) + "\n")
    tsv = tmp / "c.tsv"
    with open(tsv, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["id", "text"])
        w.writerows([i, t] for i, t in enumerate(lines))
        w.writerow([99])
    out = [(txt, {}), (jsonl, {"text_field": "a", "pair_field": "b"}), (tsv, {})]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(41)), "text": [*lines, None]}), tmp / "c.parquet")
    return [*out, (tmp / "c.parquet", {})]


@pytest.fixture(scope="module")
def bundle(cls_bundle: Path) -> Path:
    return cls_bundle


def test_ray_scan_is_byte_identical_to_local(
    ray_local: Path, bundle: Path, tmp_path: Path
) -> None:
    for corpus, fields in _corpora(tmp_path):
        base = dict(purge=True, chunk_size=6, batch_size=4, provider="cpu", threads=1, **fields)
        local = scan(bundle, str(corpus), tmp_path / f"{corpus.suffix}-local", ScanOptions(**base))
        remote = scan(bundle, str(corpus), tmp_path / f"{corpus.suffix}-ray",
                      ScanOptions(engine="ray", **base))
        assert remote.run == {"engine": "ray", "threads": 1, "actors": 2, "threads_per_actor": 1}
        assert remote.records_in == local.records_in and remote.to_json()["accounted"]
        assert remote.flagged == local.flagged > 0
        a = _outputs(tmp_path / f"{corpus.suffix}-local")
        b = _outputs(tmp_path / f"{corpus.suffix}-ray")
        assert sorted(a) == sorted(b) and len(a) >= 4
        for name in a:
            assert a[name] == b[name], (corpus.name, name)


def test_killed_actor_loses_and_duplicates_nothing(
    ray_local: Path, bundle: Path, tmp_path: Path
) -> None:
    lines, triggered = mixed_lines(40, 14, seed=6)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(lines) + "\n")
    opts = dict(purge=True, chunk_size=5, batch_size=4, provider="cpu")
    local = scan(bundle, str(corpus), tmp_path / "local", ScanOptions(**opts))
    ray_opts = ScanOptions(engine="ray", **opts)
    screener = ray_opts.open_screener(bundle)
    runner = RayRunner(bundle, ray_opts, screener, actor_cls=KillOnceActor)
    assert not ray_local.exists()
    remote = scan(bundle, str(corpus), tmp_path / "ray", ray_opts, runner=runner)
    assert ray_local.exists()  # an actor died on chunk KILL_CHUNK (its pid is in the marker)
    assert remote.records_in == len(lines) == local.records_in
    assert remote.flagged == len(triggered) == local.flagged
    flagged = [json.loads(x) for x in (tmp_path / "ray" / "flagged.jsonl").read_text().splitlines()]
    assert [f["record"] for f in flagged] == sorted(triggered)  # each once, in order
    assert _outputs(tmp_path / "local") == _outputs(tmp_path / "ray")
    assert sf.TRIGGER not in (tmp_path / "ray" / "purged.txt").read_text().split()
