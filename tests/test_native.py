"""The native monitor agrees bit for bit with the NumPy / pure-Python reference."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from lmsan.auditor import monitor as m
from lmsan.auditor.pvset import pack_signs_reference

DIMS = [1, 63, 64, 65, 384, 768]
native_mod = m._native()
KERNELS = list(native_mod.kernels())
# The kernel fixture sets process state once per parameter, not per example: safe to reuse.
FIXTURE_OK = [HealthCheck.function_scoped_fixture]


@pytest.fixture(params=KERNELS)
def kernel(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test once per kernel this CPU supports (scalar, avx2, avx512)."""
    native_mod.force_kernel(request.param)
    try:
        yield request.param
    finally:
        native_mod.force_kernel("auto")


# Special values that decide the sign convention, mixed into random floats.
SPECIAL = [0.0, -0.0, np.nan, -np.nan, np.inf, -np.inf, 1e-45, -1e-45, 1.0, -1.0]
floats32 = st.one_of(st.sampled_from(SPECIAL), st.floats(width=32, allow_nan=True))


@st.composite
def float_matrix(draw: st.DrawFn, max_rows: int = 12) -> np.ndarray:
    d = draw(st.sampled_from(DIMS))
    n = draw(st.integers(0, max_rows))
    return draw(hnp.arrays(np.float32, (n, d), elements=floats32))


@st.composite
def packed(draw: st.DrawFn, d: int, max_rows: int = 8, min_rows: int = 0) -> np.ndarray:
    """Arbitrary uint64 words, padding bits included (they must be ignored)."""
    rows = draw(st.integers(min_rows, max_rows))
    return draw(
        hnp.arrays(np.uint64, (rows, m.words_for_dim(d)), elements=st.integers(0, 2**64 - 1))
    )


def assert_same(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        assert u.dtype == v.dtype and u.shape == v.shape
        np.testing.assert_array_equal(u, v)


# ------------------------------------------------------------------ sign packing


def test_sign_convention() -> None:
    x = np.array([[0.0, -0.0, np.nan, -np.inf, np.inf, -1e-45, 1e-45, -3.0]], dtype=np.float32)
    expect = 0b01010011  # bit j = x[j] >= 0: 0.0, -0.0, inf, 1e-45 positive; NaN negative
    for f in (m.pack_signs_python, m.pack_signs_native):
        assert f(x).tolist() == [[expect]]


def test_pack_layout_and_padding() -> None:
    x = np.ones((2, 65), dtype=np.float32)
    x[1, 64] = -1.0
    for f in (m.pack_signs_python, m.pack_signs_native):
        out = f(x)
        assert out.dtype == np.uint64 and out.shape == (2, 2)
        assert out[0].tolist() == [2**64 - 1, 1]
        assert out[1].tolist() == [2**64 - 1, 0]  # padding bits stay zero


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURE_OK)
@given(x=float_matrix())
def test_pack_signs_matches_reference(kernel: str, x: np.ndarray) -> None:
    ref = m.pack_signs_python(x)
    np.testing.assert_array_equal(m.pack_signs_native(x), ref)
    np.testing.assert_array_equal(pack_signs_reference(x), ref)  # the PV set file's packing
    np.testing.assert_array_equal(_bitloop_pack(x), ref)  # an independent plain-loop reference


def _bitloop_pack(x: np.ndarray) -> np.ndarray:
    xf = np.asarray(x, dtype=np.float32)
    n, d = xf.shape
    out = np.zeros((n, max(1, (d + 63) // 64)), dtype=np.uint64)
    for i in range(n):
        for j in range(d):
            if xf[i, j] >= 0:
                out[i, j // 64] |= np.uint64(1) << np.uint64(j % 64)
    return out


def test_pack_signs_casts_to_float32() -> None:
    x64 = np.array([[-1e-50, 1e-50, -2.0]])  # -1e-50 rounds to -0.0 in float32: positive
    for f in (m.pack_signs_python, m.pack_signs_native):
        assert f(x64).tolist() == [[0b011]]
    strided = np.asfortranarray(np.random.default_rng(0).standard_normal((5, 70)))
    np.testing.assert_array_equal(m.pack_signs_native(strided), m.pack_signs_python(strided))


# ------------------------------------------------------------------ match counts


@settings(max_examples=100, deadline=None, suppress_health_check=FIXTURE_OK)
@given(data=st.data(), d=st.sampled_from(DIMS))
def test_match_counts_matches_reference(kernel: str, data: st.DataObject, d: int) -> None:
    rows = data.draw(packed(d))
    pvs = data.draw(packed(d))
    ref = m.match_counts_python(rows, pvs, d)
    assert ref.dtype == np.int32 and ref.shape == (len(rows), len(pvs))
    assert ((ref >= 0) & (ref <= d)).all()
    np.testing.assert_array_equal(m.match_counts_native(rows, pvs, d), ref)


def test_match_counts_by_hand() -> None:
    x = np.array([[1, 1, 1, 1], [-1, -1, 1, 1], [0, -0.0, -1, -1]], dtype=np.float32)
    p = m.pack_signs_python(x)
    expect = [[4, 2, 2], [2, 4, 0], [2, 0, 4]]
    for f in (m.match_counts_python, m.match_counts_native):
        assert f(p, p, 4).tolist() == expect


# ------------------------------------------------------------------ best match


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURE_OK)
@given(data=st.data(), x=float_matrix(max_rows=20))
def test_best_match_matches_reference(kernel: str, data: st.DataObject, x: np.ndarray) -> None:
    d = x.shape[1]
    pvs = data.draw(packed(d, max_rows=7))
    thr = data.draw(st.integers(-1, d + 1))
    ref = m.best_match_python(x, pvs, d, thr)
    assert_same(m.best_match_native(x, pvs, d, thr), ref)
    # The reference itself agrees with the unfused definition.
    if len(pvs) and len(x):
        counts = m.match_counts_python(m.pack_signs_python(x), pvs, d)
        np.testing.assert_array_equal(ref[0], counts.argmax(axis=1))
        np.testing.assert_array_equal(ref[1], counts.max(axis=1))
        np.testing.assert_array_equal(ref[2], counts.max(axis=1) >= thr)


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("threads", [1, 2, 3, 0])
def test_best_match_threads_and_blocks(kernel: str, d: int, threads: int) -> None:
    rng = np.random.default_rng(d)
    n = 5003  # several threads' chunks and several reference blocks, uneven
    pv_vals = rng.standard_normal((6, d)).astype(np.float32)
    x = rng.standard_normal((n, d)).astype(np.float32)
    # A third of the rows are near a PV, so some rows are flagged.
    x[::3] = pv_vals[rng.integers(0, 6, size=len(x[::3]))] + 0.3 * x[::3]
    x[5, :] = 0.0
    pvs = m.pack_signs_python(pv_vals)
    thr = m.threshold_count(d)
    ref = m.best_match_python(x, pvs, d, thr, block_rows=1000)
    assert_same(m.best_match_native(x, pvs, d, thr, threads=threads), ref)
    if d >= 64:
        assert ref[2].sum() > n // 6  # the test exercises both decisions
        assert (~ref[2]).sum() > n // 2


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURE_OK)
@given(data=st.data(), x=float_matrix(max_rows=20))
def test_best_match_per_pv_thresholds_match_reference(
    kernel: str, data: st.DataObject, x: np.ndarray
) -> None:
    """One threshold count per PV: native == NumPy reference on random inputs, and the reference
    == the unfused definition (flagged iff some PV reaches its own count; the reported PV has the
    largest margin count - threshold, the lowest index on ties)."""
    d = x.shape[1]
    pvs = data.draw(packed(d, max_rows=7))
    thr = np.asarray(data.draw(st.lists(st.integers(-2, d + 2), min_size=len(pvs),
                                        max_size=len(pvs))), dtype=np.int64)
    ref = m.best_match_python(x, pvs, d, thr)
    assert_same(m.best_match_native(x, pvs, d, thr), ref)
    if len(pvs) and len(x):
        counts = m.match_counts_python(m.pack_signs_python(x), pvs, d).astype(np.int64)
        t = np.clip(thr, 0, d + 1)
        margin = counts - t[None, :]
        np.testing.assert_array_equal(ref[0], margin.argmax(axis=1))
        np.testing.assert_array_equal(ref[1], counts[np.arange(len(x)), margin.argmax(axis=1)])
        np.testing.assert_array_equal(ref[2], (counts >= thr[None, :]).any(axis=1))
    # equal per-PV counts give exactly the single-threshold result
    if len(pvs):
        one = data.draw(st.integers(-1, d + 1))
        assert_same(m.best_match_native(x, pvs, d, np.full(len(pvs), one)),
                    m.best_match_native(x, pvs, d, one))


def test_best_match_per_pv_threshold_flags_through_a_lower_count() -> None:
    """A row that matches PV 0 best (4 of 4) but under PV 0's strict threshold is flagged by PV 1
    (3 of 4, threshold 3), and PV 1 is reported; with one threshold of 4 it is not flagged."""
    x = np.array([[1.0, 1.0, 1.0, 1.0]], dtype=np.float32)
    pvs = m.pack_signs_python(np.array([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, -1.0]]))
    for f in (m.best_match_python, m.best_match_native):
        idx, cnt, flg = f(x, pvs, 4, np.array([5, 3]))
        assert idx.tolist() == [1] and cnt.tolist() == [3] and flg.tolist() == [True]
        idx, cnt, flg = f(x, pvs, 4, np.array([5, 5]))
        assert idx.tolist() == [0] and cnt.tolist() == [4] and flg.tolist() == [False]
        with pytest.raises(ValueError, match="one count per PV"):
            f(x, pvs, 4, np.array([3]))
        with pytest.raises(ValueError, match="one count per PV"):
            f(x, pvs, 4, np.array([3.0, 3.0]))


def test_best_match_ties_and_empty_sets() -> None:
    x = np.array([[1.0, -1.0], [-1.0, -1.0]], dtype=np.float32)
    same = m.pack_signs_python(np.array([[1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]]))
    no_pvs = np.zeros((0, 1), dtype=np.uint64)
    for f in (m.best_match_python, m.best_match_native):
        idx, cnt, flg = f(x, same, 2, 2)
        assert idx.tolist() == [0, 2] and cnt.tolist() == [1, 2] and flg.tolist() == [False, True]
        idx, cnt, flg = f(x, no_pvs, 2, 0)
        assert idx.tolist() == [-1, -1] and cnt.tolist() == [0, 0] and flg.tolist() == [False] * 2
        idx, cnt, flg = f(np.zeros((0, 2), np.float32), same, 2, 1)
        assert idx.dtype == np.int32 and cnt.dtype == np.int32 and flg.dtype == np.bool_
        assert idx.shape == cnt.shape == flg.shape == (0,)


def test_best_match_huge_threshold_is_clamped() -> None:
    x = np.ones((1, 3), dtype=np.float32)
    pvs = m.pack_signs_python(x)
    for f in (m.best_match_python, m.best_match_native):
        assert f(x, pvs, 3, 2**40)[2].tolist() == [False]
        assert f(x, pvs, 3, -(2**40))[2].tolist() == [True]


@pytest.mark.parametrize(
    "call",
    [
        lambda f: f(np.zeros((2, 3, 4), np.float32), np.zeros((1, 1), np.uint64), 4, 3),
        lambda f: f(np.zeros((2, 5), np.float32), np.zeros((1, 1), np.uint64), 4, 3),
        lambda f: f(np.zeros((2, 4), np.float32), np.zeros((1, 2), np.uint64), 4, 3),
        lambda f: f(np.zeros((2, 4), np.float32), np.zeros((1, 1), np.uint64), 0, 3),
        lambda f: f(np.zeros((2, 4), np.float32), np.zeros((1, 1), np.uint64), 4, 3.5),
        lambda f: f(np.zeros((2, 4), np.float32), np.zeros((1, 1), np.float32), 4, 3),
        lambda f: f(np.zeros((2, 4), np.float32), np.zeros((1, 1), np.uint64), 4, 3, threads=-1),
    ],
)
def test_best_match_rejects_bad_input(call: object) -> None:
    for f in (m.best_match_python, m.best_match_native):
        with pytest.raises(ValueError):
            call(f)  # type: ignore[operator]


def test_threshold_count() -> None:
    assert m.threshold_count(384) == 308  # ceil(307.2)
    assert m.threshold_count(768) == 615
    assert m.threshold_count(5) == 4  # exact decimal: 0.8 * 5 == 4, not 4.000000000000001
    assert m.threshold_count(10, 0.75) == 8
    assert m.threshold_count(7, 1.0) == 7
    for bad in [(0, 0.8), (5, 0.0), (5, 1.5), (-3, 0.8)]:
        with pytest.raises(ValueError):
            m.threshold_count(*bad)


# ------------------------------------------------------------------ purge candidates


def test_purge_candidates_by_hand() -> None:
    record = [["cf", "the", "film", "cf"], ["a", "cf"]]
    expect = [
        m.PurgeCandidate(0, 0, 2, ("cf", "the"), [["film"], ["a"]]),
        m.PurgeCandidate(0, 1, 3, ("the", "film"), [["cf", "cf"], ["a", "cf"]]),
        m.PurgeCandidate(0, 2, 4, ("film", "cf"), [["the"], ["a"]]),
        m.PurgeCandidate(1, 0, 2, ("a", "cf"), [["the", "film"], []]),
    ]
    for f in (m.purge_candidates_python, m.purge_candidates_native):
        assert f(record, 2) == expect
        # {cf, the} again from span (0, 0..2) reversed order: deduplicated, first span kept
        got = f([["cf", "the", "cf", "x"]], 2)
        assert [(c.start, c.removed) for c in got] == [(0, ("cf", "the")), (2, ("cf", "x"))]
        # one span with a repeated word removes one word; too-long windows give nothing
        assert f([["mn", "mn"]], 2) == [m.PurgeCandidate(0, 0, 2, ("mn",), [[]])]
        assert f([["a", "b"], []], 3) == []
        assert f([], 1) == []


words = st.sampled_from(["cf", "mn", "the", "a", "film", "", "Cf", "é", "tq tq"])


@settings(max_examples=200, deadline=None)
@given(
    sentences=st.lists(st.lists(words, max_size=12), min_size=1, max_size=2),
    window=st.integers(1, 6),
)
def test_purge_candidates_match_reference(sentences: list[list[str]], window: int) -> None:
    ref = m.purge_candidates_python(sentences, window)
    assert m.purge_candidates_native(sentences, window) == ref
    keys = [frozenset(c.removed) for c in ref]
    assert len(keys) == len(set(keys))
    for c in ref:
        span = sentences[c.sentence][c.start : c.end]
        assert c.end - c.start == window and set(span) == set(c.removed)
        assert all(w not in c.removed for s in c.purged for w in s)
        assert c.purged == [[w for w in s if w not in c.removed] for s in sentences]


@pytest.mark.parametrize(
    "args",
    [([["a"]], 0), ([["a"]], -1), ("a b", 1), ([["a", 3]], 1), ([["a"]], 1.0), (["ab"], 1)],
)
def test_purge_candidates_reject_bad_input(args: tuple[object, object]) -> None:
    for f in (m.purge_candidates_python, m.purge_candidates_native):
        with pytest.raises(ValueError):
            f(*args)  # type: ignore[arg-type]


# ------------------------------------------------------------------ dispatch


def test_env_var_forces_implementation(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(m, "best_match_native", lambda *a, **k: calls.append("native"))
    monkeypatch.setattr(m, "best_match_python", lambda *a, **k: calls.append("python"))
    x, pvs = np.ones((1, 2), np.float32), np.zeros((1, 1), np.uint64)
    monkeypatch.delenv(m.ENV_VAR, raising=False)
    assert m.implementation() == "native"
    m.best_match(x, pvs, 2, 1)
    monkeypatch.setenv(m.ENV_VAR, "python")
    assert m.implementation() == "python"
    m.best_match(x, pvs, 2, 1)
    monkeypatch.setenv(m.ENV_VAR, "NATIVE")
    assert m.implementation() == "native"
    m.best_match(x, pvs, 2, 1)
    assert calls == ["native", "python", "native"]
    monkeypatch.setenv(m.ENV_VAR, "cpp")
    with pytest.raises(ValueError, match="LMSAN_IMPLEMENTATION"):
        m.best_match(x, pvs, 2, 1)


def test_public_functions_follow_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 65)).astype(np.float32)
    pvs = m.pack_signs_python(x[:3])
    results = {}
    for impl in ("python", "native"):
        monkeypatch.setenv(m.ENV_VAR, impl)
        assert m.implementation() == impl
        results[impl] = (
            m.pack_signs(x),
            m.match_counts(m.pack_signs(x), pvs, 65),
            *m.best_match(x, pvs, 65, 52),
            m.purge_candidates([["a", "b", "a"], ["b", "c"]], 1),
        )
    for a, b in zip(results["python"][:5], results["native"][:5], strict=True):
        np.testing.assert_array_equal(a, b)
    assert results["python"][5] == results["native"][5]


def test_missing_extension_raises_without_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(m, "_native_cache", None)
    monkeypatch.setitem(sys.modules, "lmsan.auditor._native", None)  # import now fails
    x, pvs = np.ones((1, 2), np.float32), np.zeros((1, 1), np.uint64)
    for env in (None, "native"):
        if env is None:
            monkeypatch.delenv(m.ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(m.ENV_VAR, env)
        with pytest.raises(m.NativeUnavailableError, match="LMSAN_IMPLEMENTATION=python"):
            m.best_match(x, pvs, 2, 1)
        with pytest.raises(ImportError):
            m.implementation()
    monkeypatch.setenv(m.ENV_VAR, "python")
    assert m.implementation() == "python"
    assert m.best_match(x, pvs, 2, 1)[2].tolist() == [False]


def test_kernels_reported() -> None:
    assert "scalar" in KERNELS
    assert native_mod.kernel() in KERNELS
    with pytest.raises(ValueError):
        native_mod.force_kernel("sse9")
    assert native_mod.kernel() in KERNELS
