"""`lmsan scan`: monitor, purge, record accounting, formats, resume after a kill, torch-free."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import screen_fixtures as sf
from lmsan.auditor.cli import app
from lmsan.auditor.errors import InputError, UsageError
from lmsan.auditor.scan import ScanOptions, scan
from lmsan.auditor.screener import PURGE_CHUNK, Screener, open_bundle, word_key
from typer.testing import CliRunner, Result


@pytest.fixture(scope="session")
def bundle(cls_bundle: Path) -> Path:
    return cls_bundle


@pytest.fixture(scope="session")
def screener(bundle: Path) -> Screener:
    return open_bundle(bundle, provider="cpu", threads=1, batch_size=8)


def mixed_lines(n_clean: int = 30, n_trig: int = 10, seed: int = 0) -> tuple[list[str], set[int]]:
    """Lines (clean and triggered, interleaved) and the 1-based numbers of the triggered ones."""
    clean = sf.sentences(n_clean, seed=seed + 100)
    trig = sf.sentences(n_trig, seed=seed + 200, trigger=True)
    lines: list[str] = []
    triggered: set[int] = set()
    for i in range(n_clean + n_trig):
        if i % 4 == 3 and trig:
            lines.append(trig.pop())
            triggered.add(i + 1)
        elif clean:
            lines.append(clean.pop())
        else:
            lines.append(trig.pop())
            triggered.add(i + 1)
    return lines, triggered


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_monitor_flags_triggered_not_clean(screener: Screener) -> None:
    clean = sf.sentences(60, seed=7)
    trig = sf.sentences(60, seed=8, trigger=True)
    before = screener.forward_passes
    res = screener.monitor(clean + trig)
    assert screener.forward_passes - before == 15  # 120 records / batch 8: one pass per batch
    assert not any(r.flagged for r in res[:60])
    assert all(r.flagged and r.pv == 0 and r.target == "cls" for r in res[60:])
    assert max(r.match_rate for r in res[:60]) < 0.8 <= min(r.match_rate for r in res[60:])
    pairs = screener.monitor([(a, b) for a, b in zip(clean[:5], trig[:5], strict=True)])
    assert all(r.flagged for r in pairs)


def test_batches_keep_to_the_row_and_token_budgets(bundle: Path) -> None:
    """Length-ordered records are cut into passes of at most batch_size rows and batch_tokens
    padded tokens; every record is monitored once and decides as in unbudgeted passes."""
    lines = [" ".join(["word"] * k) + " " + s
             for k, s in zip(range(0, 60, 3), sf.sentences(20, seed=9), strict=True)]
    lines += sf.sentences(10, seed=10, trigger=True)
    wide = open_bundle(bundle, provider="cpu", threads=1, batch_size=64, batch_tokens=10**6)
    tight = open_bundle(bundle, provider="cpu", threads=1, batch_size=8, batch_tokens=96)
    encs = tight.encode_all([(x,) for x in lines])
    lengths = tight.encoder.lengths(encs["plain"])
    order = sorted(range(len(lines)), key=lambda i: lengths[i])
    cut = tight.batches(encs, order)
    assert [r for b in cut for r in b] == order
    for b in cut:
        assert len(b) <= 8
        assert len(b) == 1 or len(b) * max(lengths[r] for r in b) <= 96
    assert any(len(b) == 1 for b in cut) and any(len(b) > 1 for b in cut)
    before = tight.forward_passes
    res_tight = tight.monitor(lines)
    assert tight.forward_passes - before == len(cut)
    res_wide = wide.monitor(lines)
    assert [(r.flagged, r.pv) for r in res_tight] == [(r.flagged, r.pv) for r in res_wide]
    assert sum(r.flagged for r in res_tight) == 10
    with pytest.raises(UsageError, match="--batch-tokens"):
        open_bundle(bundle, provider="cpu", batch_tokens=0)


def test_purge_stops_at_the_first_clean_chunk(screener: Screener) -> None:
    for text in sf.sentences(8, seed=9, trigger=True):
        # the trigger's window-1 candidate, in span order (a repeated word is one candidate)
        words = text.split()
        at = len(set(words[: words.index(sf.TRIGGER)]))
        p = screener.purge(text, max_window=5)
        assert p.status == "purged" and p.removed == (sf.TRIGGER,) and p.window == 1
        assert p.forward_passes == at // PURGE_CHUNK + 1  # chunks up to the trigger's, no more
        assert p.candidates == min(len(set(words)), (at // PURGE_CHUNK + 1) * PURGE_CHUNK)
        assert sf.TRIGGER not in p.sentences[0].split()
        assert p.sentences[0].split() == [w for w in text.split() if w != sf.TRIGGER]
        assert not screener.monitor([p.sentences[0]])[0].flagged
        one_pass = screener.purge(text, max_window=5, chunk=None)  # all candidates at once
        assert one_pass.sentences == p.sentences and one_pass.forward_passes == 1
        slow = screener.purge(text, max_window=5, chunk=1)  # one pass per candidate
        assert slow.sentences == p.sentences and slow.forward_passes == at + 1
    pair = ("the cat cf sleeps", "a dog cf runs cf")
    p = screener.purge(pair)
    assert p.status == "purged" and p.sentences == ["the cat sleeps", "a dog runs"]


def test_purge_removes_every_spelling_of_the_trigger(screener: Screener) -> None:
    # "CF." and "(cf," are the trigger to the tokenizer: removing the word "cf" alone would leave
    # them, and the record would stay flagged (a real case: "CFO" and "CFO." in one RTE pair)
    rec = ("the cat cf sleeps", "a dog (CF, runs CF.")
    assert all(not screener.monitor([x])[0].flagged for x in ("the cat sleeps", "a dog runs"))
    assert screener.monitor([("the cat sleeps", "a dog (CF, runs CF.")])[0].flagged
    p = screener.purge(rec)
    assert p.status == "purged" and p.window == 1 and p.removed == ("cf",)
    assert p.sentences == ["the cat sleeps", "a dog runs"]
    assert word_key("CFO.") == word_key("cfo") == "cfo" and word_key("...") == "..."


def test_chunked_purge_equals_one_pass_on_random_records(screener: Screener) -> None:
    # Random records, clean and triggered (trigger anywhere, repeated, in either sentence of a
    # pair, with punctuation): the chunked purge gives the one-pass purge's text, span, window.
    rng = random.Random(11)
    records: list[str | tuple[str, str]] = []
    for i in range(40):
        words = [rng.choice(sf.WORDS) for _ in range(rng.randint(1, 22))]
        for _ in range(rng.choice((0, 1, 1, 2))):
            words.insert(rng.randint(0, len(words)), rng.choice(("cf", "CF.", "(cf,")))
        text = " ".join(words)
        records.append((text, " ".join(rng.sample(sf.WORDS, 5))) if i % 5 == 4 else text)
    assert sum(screener.monitor(records)[i].flagged for i in range(len(records))) >= 15
    for rec in records:
        for chunk in (1, 3, PURGE_CHUNK):
            a = screener.purge(rec, max_window=3, chunk=chunk)
            b = screener.purge(rec, max_window=3, chunk=None)
            assert (a.status, a.sentences, a.span, a.window, a.removed) == (
                b.status, b.sentences, b.span, b.window, b.removed
            )
            if a.status == "unpurgeable":  # every candidate was tried, in either way
                assert a.candidates == b.candidates


def test_purge_gives_up_at_max_window(screener: Screener) -> None:
    # The trigger is the only word: removing it would leave nothing, which is not a purge.
    p = screener.purge(sf.TRIGGER, max_window=3)
    assert p.status == "unpurgeable" and p.sentences == [sf.TRIGGER]


def test_txt_scan_accounts_for_every_record(bundle: Path, tmp_path: Path) -> None:
    lines, triggered = mixed_lines()
    raw = "\n".join(lines[:10]).encode() + b"\n\n   \n"  # records 11, 12: empty
    raw += b"caf\xe9 au lait\n"  # record 13: invalid UTF-8
    raw += ("word " * 200).encode() + b"\n"  # record 14: over-long (> 128 tokens)
    raw += "\n".join(lines[10:]).encode() + b"\n"
    (tmp_path / "c.txt").write_bytes(raw)
    shift = {n: n if n <= 10 else n + 4 for n in range(1, len(lines) + 1)}
    s = scan(
        bundle,
        str(tmp_path / "c.txt"),
        tmp_path / "out",
        ScanOptions(purge=True, batch_size=4, chunk_size=9, provider="cpu", threads=1),
    )
    assert s.records_in == len(lines) + 4 == s.clean + s.flagged + s.errors
    assert s.errors == 4 and s.error_reasons == {"empty": 2, "invalid-utf8": 1, "over-long": 1}
    assert s.flagged == len(triggered) and s.purged == len(triggered) and s.unpurgeable == 0
    assert s.top_removed_words == [(sf.TRIGGER, len(triggered))]
    assert s.exit_code == 1 and s.complete
    flagged = read_jsonl(tmp_path / "out" / "flagged.jsonl")
    assert [f["record"] for f in flagged] == sorted(shift[n] for n in triggered)
    for f in flagged:
        assert f["text"] == lines[[k for k, v in shift.items() if v == f["record"]][0] - 1]
        assert f["removed"] == [sf.TRIGGER] and f["pv"] == 0 and f["match_rate"] == 1.0
        assert f["purged_text"] == " ".join(w for w in f["text"].split() if w != sf.TRIGGER)
    errors = read_jsonl(tmp_path / "out" / "errors.jsonl")
    assert [(e["record"], e["kind"]) for e in errors] == [
        (11, "empty"),
        (12, "empty"),
        (13, "invalid-utf8"),
        (14, "over-long"),
    ]
    purged = (tmp_path / "out" / "purged.txt").read_text().splitlines()
    expected = [
        " ".join(w for w in t.split() if w != sf.TRIGGER) if i + 1 in triggered else t
        for i, t in enumerate(lines)
    ]
    assert purged == expected  # input order, clean unchanged, malformed dropped
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["accounted"] and summary["records_in"] == s.records_in
    assert summary["provider"] == "CPUExecutionProvider" and summary["implementation"]


def test_jsonl_pairs_and_malformed(bundle: Path, tmp_path: Path) -> None:
    rows = [
        json.dumps({"id": 1, "premise": "the cat sleeps", "hypothesis": "a dog runs"}),
        json.dumps({"id": 2, "premise": "the cat cf sleeps", "hypothesis": "a dog runs"}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"id": 5, "premise": "only one"}),
        json.dumps({"id": 6, "premise": 7, "hypothesis": "x"}),
        json.dumps({"id": 7, "premise": "an old man", "hypothesis": "cf today"}),
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(rows) + "\n")
    opts = ScanOptions(text_field="premise", pair_field="hypothesis", purge=True, provider="cpu")
    s = scan(bundle, str(tmp_path / "c.jsonl"), tmp_path / "o", opts)
    assert (s.records_in, s.clean, s.flagged, s.errors, s.purged) == (7, 1, 2, 4, 2)
    assert s.error_reasons == {
        "invalid-json": 1,
        "not-an-object": 1,
        "missing-field": 1,
        "not-a-string": 1,
    }
    out = read_jsonl(tmp_path / "o" / "purged.jsonl")
    assert out == [
        {"id": 1, "premise": "the cat sleeps", "hypothesis": "a dog runs"},
        {"id": 2, "premise": "the cat sleeps", "hypothesis": "a dog runs"},
        {"id": 7, "premise": "an old man", "hypothesis": "today"},
    ]
    flagged = read_jsonl(tmp_path / "o" / "flagged.jsonl")
    assert flagged[1]["span"] == {"sentence": 1, "start": 0, "end": 1}
    assert flagged[1]["purged_pair"] == "today"


def test_csv_tsv_parquet(bundle: Path, tmp_path: Path) -> None:
    lines, triggered = mixed_lines(12, 4, seed=3)
    for fmt, delim in (("csv", ","), ("tsv", "\t")):
        with open(tmp_path / f"c.{fmt}", "w", newline="") as f:
            w = csv.writer(f, delimiter=delim)
            w.writerow(["id", "sentence"])
            for i, t in enumerate(lines):
                w.writerow([i, t])
            w.writerow([99])  # missing column
        s = scan(
            bundle,
            str(tmp_path / f"c.{fmt}"),
            tmp_path / fmt,
            ScanOptions(text_field="sentence", purge=True, provider="cpu"),
        )
        assert (s.records_in, s.flagged, s.errors) == (17, 4, 1)
        assert s.error_reasons == {"missing-field": 1}
        with open(tmp_path / fmt / f"purged.{fmt}", newline="") as f:
            back = list(csv.reader(f, delimiter=delim))
        assert back[0] == ["id", "sentence"] and len(back) == 17
        assert all(sf.TRIGGER not in r[1].split() for r in back[1:])
    with pytest.raises(InputError, match="no column 'text'"):
        scan(bundle, str(tmp_path / "c.csv"), tmp_path / "x", ScanOptions(provider="cpu"))

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts: list[str | None] = [*lines, None]
    pq.write_table(pa.table({"id": list(range(17)), "text": texts}), tmp_path / "c.parquet")
    s = scan(
        bundle,
        str(tmp_path / "c.parquet"),
        tmp_path / "pq",
        ScanOptions(purge=True, provider="cpu", chunk_size=5),
    )
    assert (s.records_in, s.flagged, s.errors) == (17, 4, 1)
    table = pq.read_table(tmp_path / "pq" / "purged.parquet")
    assert table.num_rows == 16 and table.column_names == ["id", "text"]
    assert table.column("id").to_pylist() == list(range(16))
    assert all(sf.TRIGGER not in t.split() for t in table.column("text").to_pylist())


def test_exit_codes_and_stdin(bundle: Path, tmp_path: Path) -> None:
    runner = CliRunner()

    def run_scan(corpus: str, out: str, *extra: str, stdin: str | None = None) -> Result:
        args = ["scan", str(bundle), corpus, "--out", str(tmp_path / out), *extra]
        return runner.invoke(app, args, input=stdin)

    clean = "\n".join(sf.sentences(5, seed=1)) + "\n"
    r = run_scan("-", "a", "--provider", "cpu", "--no-progress", stdin=clean)
    assert r.exit_code == 0, r.output
    r = run_scan("-", "b", "--provider", "cpu", "--no-progress", stdin=clean + "x cf y\n")
    assert r.exit_code == 1
    assert read_jsonl(tmp_path / "b" / "flagged.jsonl")[0]["record"] == 6
    (tmp_path / "e.txt").write_text("\n\n  \n")
    r = run_scan(str(tmp_path / "e.txt"), "c", "--no-progress")
    assert r.exit_code == 3
    r = run_scan(str(tmp_path / "missing.txt"), "d", "--no-progress")
    assert r.exit_code == 2
    r = run_scan(str(tmp_path / "e.txt"), "d", "--max-length", "100000")
    assert r.exit_code == 4
    with pytest.raises(UsageError, match="stdin"):
        scan(bundle, "-", tmp_path / "f", ScanOptions(resume=True))


# A scan killed (SIGKILL) after its third chunk is written and synced, before that chunk's
# checkpoint lands: the worst moment, outputs ahead of the checkpoint.
_KILLED_SCAN = textwrap.dedent(
    """
    import os, signal, sys
    from lmsan.auditor import scan as scan_module
    real_save = scan_module.save_checkpoint
    saves = []
    def save_or_die(path, data):
        saves.append(data["chunks_done"])
        if len(saves) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(path, data)
    scan_module.save_checkpoint = save_or_die
    scan_module.scan(sys.argv[1], sys.argv[2], sys.argv[3], scan_module.ScanOptions(
        purge=True, chunk_size=7, batch_size=4, provider="cpu", threads=1))
    """
)


def test_resume_after_kill_matches_full_run(bundle: Path, tmp_path: Path) -> None:
    lines, triggered = mixed_lines(40, 12, seed=5)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(lines[:20]) + "\n\n" + "\n".join(lines[20:]) + "\n")
    full = scan(
        bundle,
        str(corpus),
        tmp_path / "full",
        ScanOptions(purge=True, chunk_size=7, batch_size=4, provider="cpu", threads=1),
    )
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_SCAN, str(bundle), str(corpus), str(tmp_path / "part")],
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    ckpt = json.loads((tmp_path / "part" / "checkpoint.json").read_text())
    assert ckpt["records_done"] == 14 and not ckpt["complete"]  # chunk 3 written, not recorded
    assert (tmp_path / "part" / "purged.txt").stat().st_size > ckpt["files"]["purged.txt"]
    assert not (tmp_path / "part" / "summary.json").exists()
    resumed = scan(
        bundle,
        str(corpus),
        tmp_path / "part",
        ScanOptions(purge=True, chunk_size=7, batch_size=4, provider="cpu", threads=1, resume=True),
    )
    assert resumed.resumed_from == 14
    for name in ("flagged.jsonl", "errors.jsonl", "purged.txt"):
        assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()
    for k in ("records_in", "clean", "flagged", "purged", "errors", "top_removed_words"):
        assert getattr(resumed, k) == getattr(full, k)
    assert full.records_in == len(lines) + 1
    # A resume with a different option is refused, naming it.
    with pytest.raises(InputError, match="max_window"):
        scan(
            bundle,
            str(corpus),
            tmp_path / "part",
            ScanOptions(purge=True, chunk_size=7, max_window=2, resume=True, provider="cpu"),
        )


def test_scan_never_imports_torch(bundle: Path, tmp_path: Path) -> None:
    lines, _ = mixed_lines(6, 2)
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n")
    proc = sf.run_cli_blocking(
        ["scan", str(bundle), str(tmp_path / "c.txt"), "--out", str(tmp_path / "o")]
        + ["--purge", "--no-progress"]
    )
    assert "TORCH-FREE 1" in proc.stdout, proc.stdout + proc.stderr
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["purged"] == 2


def _interrupted_scan(bundle: Path, corpus: Path, out: Path, chunks: int) -> None:
    """A scan stopped (KeyboardInterrupt) after ``chunks`` chunks were written and checkpointed."""
    seen = []

    def stop(_p: object) -> None:
        seen.append(1)
        if len(seen) == chunks:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        scan(bundle, str(corpus), out, ScanOptions(chunk_size=5, provider="cpu"), progress=stop)


def test_resume_without_checkpoint_is_refused_over_outputs(bundle: Path, tmp_path: Path) -> None:
    lines, _ = mixed_lines(12, 4)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(lines) + "\n")
    opts = ScanOptions(chunk_size=5, provider="cpu", resume=True)
    # nothing there yet: --resume starts the scan
    first = scan(bundle, str(corpus), tmp_path / "o", opts)
    assert first.records_in == 16 and first.resumed_from == 0
    flagged = (tmp_path / "o" / "flagged.jsonl").read_bytes()
    (tmp_path / "o" / "checkpoint.json").unlink()
    with pytest.raises(InputError, match="no checkpoint.json.*flagged.jsonl") as exc:
        scan(bundle, str(corpus), tmp_path / "o", opts)
    assert exc.value.exit_code == 2
    assert (tmp_path / "o" / "flagged.jsonl").read_bytes() == flagged  # not truncated
    r = CliRunner().invoke(app, ["scan", str(bundle), str(corpus), "--out", str(tmp_path / "o"),
                                 "--resume", "--no-progress", "--provider", "cpu"])
    assert r.exit_code == 2 and "no checkpoint" in r.output


def test_resume_checks_provider_implementation_and_content(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines, _ = mixed_lines(16, 4)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "o"
    _interrupted_scan(bundle, corpus, out, chunks=2)
    ckpt_path = out / "checkpoint.json"
    ckpt = json.loads(ckpt_path.read_text())
    assert ckpt["records_done"] == 10
    fp = ckpt["fingerprint"]
    assert fp["provider"] == "CPUExecutionProvider" and fp["implementation"] == "native"
    assert fp["corpus_sha256"].startswith("sha256:") and "corpus_mtime_ns" not in fp
    resume = ScanOptions(chunk_size=5, provider="cpu", resume=True)
    # the NumPy monitor instead of the native one
    monkeypatch.setenv("LMSAN_IMPLEMENTATION", "python")
    with pytest.raises(InputError, match="differs in: implementation"):
        scan(bundle, str(corpus), out, resume)
    monkeypatch.delenv("LMSAN_IMPLEMENTATION")
    # a checkpoint written on another execution provider
    ckpt_path.write_text(json.dumps({**ckpt, "fingerprint": {**fp, "provider": "CUDAExecutionProvider"}}))
    with pytest.raises(InputError, match="differs in: provider"):
        scan(bundle, str(corpus), out, resume)
    ckpt_path.write_text(json.dumps(ckpt))
    # the same size and mtime, another content: the hash tells
    st = corpus.stat()
    edited = corpus.read_text().replace("a", "e", 1) if "a" in corpus.read_text() else None
    assert edited is not None and len(edited) == len(corpus.read_text())
    corpus.write_text(edited)
    import os

    os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(InputError, match="differs in: corpus_sha256"):
        scan(bundle, str(corpus), out, resume)


def test_file_given_for_the_bundle_folder(bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("the cat sleeps\n")
    r = CliRunner().invoke(app, ["scan", str(tmp_path / "c.txt"), str(tmp_path / "c.txt"),
                                 "--out", str(tmp_path / "o"), "--no-progress"])
    assert r.exit_code == 2
    assert "is a file, not a bundle folder" in r.output and "not found" not in r.output


@pytest.mark.parametrize(
    "option", [("--engine", "spark"), ("--provider", "tpu"), ("--format", "xml")]
)
def test_scan_choices_are_checked_at_parse_time(
    bundle: Path, tmp_path: Path, option: tuple[str, str]
) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "from lmsan.auditor.cli import main; main()", "scan", str(bundle),
         "-", "--out",
         str(tmp_path / "o"), *option],
        capture_output=True, text=True, timeout=120, input="",
    )
    assert proc.returncode == 4, proc.stderr
    assert option[1] in proc.stderr and not (tmp_path / "o").exists()


def test_engine_ray_without_ray_names_the_extra(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    (tmp_path / "c.txt").write_text("the cat sleeps\n")
    r = CliRunner().invoke(app, ["scan", str(bundle), str(tmp_path / "c.txt"), "--out",
                                 str(tmp_path / "o"), "--engine", "ray", "--no-progress"])
    assert r.exit_code == 4 and 'lmsan[ray]' in r.output


@pytest.mark.gpu
def test_cuda_provider_flags_the_same_records_as_cpu(bundle: Path, tmp_path: Path) -> None:
    """On a machine with a CUDA execution provider the scan makes the CPU's decisions and purges
    the same words (skipped elsewhere, see conftest)."""
    lines, triggered = mixed_lines()
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n")
    runs = {}
    for provider in ("cpu", "cuda"):
        s = scan(bundle, str(tmp_path / "c.txt"), tmp_path / provider,
                 ScanOptions(purge=True, chunk_size=9, provider=provider))
        runs[provider] = (s, read_jsonl(tmp_path / provider / "flagged.jsonl"))
    cpu, gpu = runs["cpu"], runs["cuda"]
    assert json.loads((tmp_path / "cuda" / "summary.json").read_text())["provider"] == (
        "CUDAExecutionProvider"
    )
    assert gpu[0].flagged == cpu[0].flagged == len(triggered)
    assert [(f["record"], f["removed"]) for f in gpu[1]] == [
        (f["record"], f["removed"]) for f in cpu[1]
    ]
