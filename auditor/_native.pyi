"""Type stubs of the private native extension (native/bindings.cpp); use lmsan.auditor.monitor."""

import numpy as np
import numpy.typing as npt

ABI_VERSION: int

def pack_signs(x: npt.NDArray[np.float32]) -> npt.NDArray[np.uint64]: ...
def match_counts(
    rows: npt.NDArray[np.uint64], pvs: npt.NDArray[np.uint64], d: int
) -> npt.NDArray[np.int32]: ...
def best_match(
    x: npt.NDArray[np.float32],
    pvs: npt.NDArray[np.uint64],
    d: int,
    threshold_count: npt.NDArray[np.int32],
    threads: int = 1,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.bool_]]: ...
def purge_record(
    sentences: list[list[str]], window: int
) -> list[tuple[int, int, int, tuple[str, ...], list[list[str]]]]: ...
def kernel() -> str: ...
def kernels() -> list[str]: ...
def force_kernel(name: str) -> None: ...
