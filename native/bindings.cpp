// The one boundary between Python and the native monitor: lmsan.auditor._native.
// Thin: checks shapes, releases the GIL and calls the C ABI of native/include/lmsan/monitor.h.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "lmsan/monitor.h"

namespace py = pybind11;
using f32 = py::array_t<float, py::array::c_style | py::array::forcecast>;
using u64 = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;
using i32 = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using i64 = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

namespace {

size_t dim(const py::array& a, int axis) { return static_cast<size_t>(a.shape(axis)); }

py::array_t<uint64_t> pack_signs(const f32& x) {
  if (x.ndim() != 2) throw std::invalid_argument("pack_signs expects a 2-D float32 array");
  const size_t n = dim(x, 0), d = dim(x, 1);
  py::array_t<uint64_t> out({n, lmsan_words_for_dim(d)});
  {
    py::gil_scoped_release release;
    lmsan_pack_signs(x.data(), n, d, out.mutable_data());
  }
  return out;
}

void check_packed(const u64& a, size_t d, const char* name) {
  if (a.ndim() != 2 || dim(a, 1) != lmsan_words_for_dim(d))
    throw std::invalid_argument(std::string(name) + " must be a packed [rows, ceil(d/64)] array");
}

py::array_t<int32_t> match_counts(const u64& rows, const u64& pvs, size_t d) {
  if (d == 0) throw std::invalid_argument("d must be positive");
  check_packed(rows, d, "rows");
  check_packed(pvs, d, "pvs");
  const size_t n = dim(rows, 0), k = dim(pvs, 0);
  py::array_t<int32_t> out({n, k});
  {
    py::gil_scoped_release release;
    lmsan_match_counts(rows.data(), n, pvs.data(), k, d, out.mutable_data());
  }
  return out;
}

py::tuple best_match(const f32& x, const u64& pvs, size_t d, int32_t threshold_count,
                     int threads) {
  if (x.ndim() != 2 || dim(x, 1) != d)
    throw std::invalid_argument("x must be a 2-D float32 array with d columns");
  if (d == 0) throw std::invalid_argument("d must be positive");
  check_packed(pvs, d, "pvs");
  if (threads < 0) throw std::invalid_argument("threads must be >= 0");
  const size_t n = dim(x, 0), k = dim(pvs, 0);
  py::array_t<int32_t> idx(n), cnt(n);
  py::array_t<bool> flg(n);
  int rc;
  {
    py::gil_scoped_release release;
    static_assert(sizeof(bool) == sizeof(uint8_t), "bool must be one byte");
    rc = lmsan_best_match(x.data(), n, d, pvs.data(), k, threshold_count, threads,
                          idx.mutable_data(), cnt.mutable_data(),
                          reinterpret_cast<uint8_t*>(flg.mutable_data()));
  }
  if (rc != 0) throw std::invalid_argument("lmsan_best_match rejected its arguments");
  return py::make_tuple(idx, cnt, flg);
}

py::tuple purge_candidates(const i32& ids, const i64& offsets, size_t window) {
  if (ids.ndim() != 1 || offsets.ndim() != 1 || offsets.shape(0) < 1)
    throw std::invalid_argument("ids and offsets must be 1-D, offsets non-empty");
  const size_t n_sent = dim(offsets, 0) - 1;
  const int64_t* off = offsets.data();
  if (off[0] != 0 || off[n_sent] != static_cast<int64_t>(ids.shape(0)))
    throw std::invalid_argument("offsets must start at 0 and end at len(ids)");
  const int64_t cap = lmsan_purge_max_candidates(off, n_sent, window);
  if (cap < 0) throw std::invalid_argument("invalid window or offsets");
  const size_t total = dim(ids, 0), c = static_cast<size_t>(cap);
  py::array_t<int32_t> spans({c, size_t{3}}), removed({c, window}), nremoved(c);
  py::array_t<uint8_t> keep({c, total});
  int64_t got;
  {
    py::gil_scoped_release release;
    got = lmsan_purge_candidates(ids.data(), off, n_sent, window, spans.mutable_data(),
                                 removed.mutable_data(), nremoved.mutable_data(),
                                 keep.mutable_data(), c);
  }
  if (got < 0 || got > cap) throw std::runtime_error("lmsan_purge_candidates failed");
  const py::ssize_t g = static_cast<py::ssize_t>(got);
  py::slice first(0, g, 1);
  return py::make_tuple(spans[first], removed[first], nremoved[first], keep[first]);
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "lmsan native monitor kernels (private: use lmsan.auditor.monitor)";
  m.def("pack_signs", &pack_signs, py::arg("x"));
  m.def("match_counts", &match_counts, py::arg("rows"), py::arg("pvs"), py::arg("d"));
  m.def("best_match", &best_match, py::arg("x"), py::arg("pvs"), py::arg("d"),
        py::arg("threshold_count"), py::arg("threads") = 1);
  m.def("purge_candidates", &purge_candidates, py::arg("ids"), py::arg("offsets"),
        py::arg("window"));
  m.def(
      "kernel", [] { return std::string(lmsan_kernel_name(lmsan_active_kernel())); },
      "the kernel in use: scalar, avx2 or avx512");
  m.def(
      "kernels",
      [] {
        py::list out;
        for (int k : {LMSAN_KERNEL_SCALAR, LMSAN_KERNEL_AVX2, LMSAN_KERNEL_AVX512})
          if (lmsan_kernel_supported(k)) out.append(lmsan_kernel_name(k));
        return out;
      },
      "the kernels this build and CPU support");
  m.def(
      "force_kernel",
      [](const std::string& name) {
        int which = -1;
        for (int k : {LMSAN_KERNEL_AUTO, LMSAN_KERNEL_SCALAR, LMSAN_KERNEL_AVX2,
                      LMSAN_KERNEL_AVX512})
          if (name == lmsan_kernel_name(k)) which = k;
        if (which < 0 || lmsan_force_kernel(which) != 0)
          throw std::invalid_argument("unknown or unsupported kernel: " + name);
      },
      py::arg("name"), "force a kernel (auto, scalar, avx2, avx512); for tests and benchmarks");
  m.attr("ABI_VERSION") = lmsan_abi_version();
}
