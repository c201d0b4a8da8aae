// The one boundary between Python and the native monitor: lmsan.auditor._native.
// Thin: checks shapes, releases the GIL and calls the C ABI of native/include/lmsan/monitor.h.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "lmsan/monitor.h"

namespace py = pybind11;
using f32 = py::array_t<float, py::array::c_style | py::array::forcecast>;
using u64 = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;

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

py::tuple best_match(const f32& x, const u64& pvs, size_t d,
                     const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& thr,
                     int threads) {
  if (x.ndim() != 2 || dim(x, 1) != d)
    throw std::invalid_argument("x must be a 2-D float32 array with d columns");
  if (d == 0) throw std::invalid_argument("d must be positive");
  check_packed(pvs, d, "pvs");
  if (threads < 0) throw std::invalid_argument("threads must be >= 0");
  const size_t n = dim(x, 0), k = dim(pvs, 0);
  if (thr.ndim() != 1 || dim(thr, 0) != k)
    throw std::invalid_argument("threshold_counts must be a 1-D int32 array with one count per PV");
  py::array_t<int32_t> idx(n), cnt(n);
  py::array_t<bool> flg(n);
  int rc;
  {
    py::gil_scoped_release release;
    static_assert(sizeof(bool) == sizeof(uint8_t), "bool must be one byte");
    rc = lmsan_best_match_thresholds(x.data(), n, d, pvs.data(), k, thr.data(), threads,
                          idx.mutable_data(), cnt.mutable_data(),
                          reinterpret_cast<uint8_t*>(flg.mutable_data()));
  }
  if (rc != 0) throw std::invalid_argument("lmsan_best_match_thresholds rejected its arguments");
  return py::make_tuple(idx, cnt, flg);
}

// Purge candidates of a record given as Python words: interns the words to ids, calls the C core
// and builds the (sentence, start, end, removed, purged) tuples without Python bytecode.
py::list purge_record(const py::list& sentences, size_t window) {
  if (window == 0) throw std::invalid_argument("window must be positive");
  const size_t n_sent = sentences.size();
  std::vector<py::list> sents;
  std::vector<int64_t> offsets{0};
  std::vector<py::object> words;  // id -> word
  std::vector<int32_t> ids;
  py::dict vocab;
  for (const auto& item : sentences) {
    if (!PyList_Check(item.ptr())) throw std::invalid_argument("sentences must be lists");
    py::list sent = py::reinterpret_borrow<py::list>(item);
    for (const auto& w : sent) {
      if (!PyUnicode_Check(w.ptr())) throw std::invalid_argument("words must be str");
      PyObject* found = PyDict_GetItemWithError(vocab.ptr(), w.ptr());
      if (found == nullptr) {
        if (PyErr_Occurred()) throw py::error_already_set();
        const auto id = static_cast<int32_t>(words.size());
        vocab[w] = id;
        words.push_back(py::reinterpret_borrow<py::object>(w));
        ids.push_back(id);
      } else {
        ids.push_back(static_cast<int32_t>(PyLong_AsLong(found)));
      }
    }
    offsets.push_back(static_cast<int64_t>(ids.size()));
    sents.push_back(std::move(sent));
  }
  const int64_t cap = lmsan_purge_max_candidates(offsets.data(), n_sent, window);
  if (cap < 0) throw std::invalid_argument("invalid window or offsets");
  const size_t c = static_cast<size_t>(cap), total = ids.size();
  std::vector<int32_t> spans(3 * c), removed(c * window), nremoved(c);
  std::vector<uint8_t> keep(c * total);
  const int64_t got = lmsan_purge_candidates(ids.data(), offsets.data(), n_sent, window,
                                             spans.data(), removed.data(), nremoved.data(),
                                             keep.data(), c);
  if (got < 0 || got > cap) throw std::runtime_error("lmsan_purge_candidates failed");
  py::list out(static_cast<size_t>(got));
  for (size_t i = 0; i < static_cast<size_t>(got); ++i) {
    py::tuple rem(static_cast<size_t>(nremoved[i]));
    for (int32_t r = 0; r < nremoved[i]; ++r) rem[r] = words[removed[i * window + r]];
    py::list purged(n_sent);
    const uint8_t* mask = keep.data() + i * total;
    for (size_t s = 0; s < n_sent; ++s) {
      py::list kept;
      for (int64_t t = offsets[s]; t < offsets[s + 1]; ++t)
        if (mask[t]) kept.append(words[ids[t]]);
      purged[s] = std::move(kept);
    }
    out[i] = py::make_tuple(spans[3 * i], spans[3 * i + 1], spans[3 * i + 2], std::move(rem),
                            std::move(purged));
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "lmsan native monitor kernels (private: use lmsan.auditor.monitor)";
  m.def("pack_signs", &pack_signs, py::arg("x"));
  m.def("match_counts", &match_counts, py::arg("rows"), py::arg("pvs"), py::arg("d"));
  m.def("best_match", &best_match, py::arg("x"), py::arg("pvs"), py::arg("d"),
        py::arg("threshold_counts"), py::arg("threads") = 1);
  m.def("purge_record", &purge_record, py::arg("sentences"), py::arg("window"),
        "purge candidates of a record of words: [(sentence, start, end, removed, purged)]");
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
