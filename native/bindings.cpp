// The one boundary between Python and the native monitor: lmsan.auditor._native.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "lmsan/monitor.h"

namespace py = pybind11;
using f32 = py::array_t<float, py::array::c_style | py::array::forcecast>;
using u64 = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;

static py::array_t<uint64_t> pack_signs(f32 x) {
  if (x.ndim() != 2) throw std::invalid_argument("pack_signs expects a 2-D float32 array");
  const size_t n = x.shape(0), d = x.shape(1);
  py::array_t<uint64_t> out({n, lmsan_words_for_dim(d)});
  {
    py::gil_scoped_release release;
    lmsan_pack_signs(x.data(), n, d, out.mutable_data());
  }
  return out;
}

static py::array_t<int32_t> match_counts(u64 rows, u64 pvs, size_t d) {
  if (rows.ndim() != 2 || pvs.ndim() != 2) throw std::invalid_argument("expects 2-D arrays");
  const size_t words = lmsan_words_for_dim(d);
  if ((size_t)rows.shape(1) != words || (size_t)pvs.shape(1) != words)
    throw std::invalid_argument("packed width does not match d");
  const size_t n = rows.shape(0), k = pvs.shape(0);
  py::array_t<int32_t> out({n, k});
  {
    py::gil_scoped_release release;
    lmsan_match_counts(rows.data(), n, pvs.data(), k, d, out.mutable_data());
  }
  return out;
}

PYBIND11_MODULE(_native, m) {
  m.doc() = "lmsan native monitor kernels";
  m.def("pack_signs", &pack_signs, py::arg("x"));
  m.def("match_counts", &match_counts, py::arg("rows"), py::arg("pvs"), py::arg("d"));
}
