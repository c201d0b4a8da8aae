// Sliding-window purge candidate generation (docs/how-it-works.md, "PV monitoring", trigger removal).
#include <algorithm>
#include <set>
#include <vector>

#include "lmsan/monitor.h"

namespace {

bool valid_offsets(const int64_t* offsets, size_t n_sentences) {
  if (offsets == nullptr) return n_sentences == 0;
  if (offsets[0] != 0) return false;
  for (size_t s = 0; s < n_sentences; ++s)
    if (offsets[s + 1] < offsets[s]) return false;
  return true;
}

}  // namespace

extern "C" {

int64_t lmsan_purge_max_candidates(const int64_t* offsets, size_t n_sentences, size_t window) {
  if (window == 0 || !valid_offsets(offsets, n_sentences)) return -1;
  int64_t total = 0;
  for (size_t s = 0; s < n_sentences; ++s) {
    const int64_t len = offsets[s + 1] - offsets[s];
    if (len >= static_cast<int64_t>(window)) total += len - static_cast<int64_t>(window) + 1;
  }
  return total;
}

int64_t lmsan_purge_candidates(const int32_t* ids, const int64_t* offsets, size_t n_sentences,
                               size_t window, int32_t* out_spans, int32_t* out_removed,
                               int32_t* out_nremoved, uint8_t* out_keep, size_t cap) {
  if (window == 0 || !valid_offsets(offsets, n_sentences)) return -1;
  const size_t total = n_sentences ? static_cast<size_t>(offsets[n_sentences]) : 0;
  std::set<std::vector<int32_t>> seen;  // sorted distinct ids of each kept candidate
  std::vector<int32_t> key, order;
  key.reserve(window);
  order.reserve(window);
  int64_t count = 0;
  for (size_t s = 0; s < n_sentences; ++s) {
    const size_t begin = static_cast<size_t>(offsets[s]);
    const size_t len = static_cast<size_t>(offsets[s + 1]) - begin;
    if (len < window) continue;
    for (size_t start = 0; start + window <= len; ++start) {
      order.clear();
      for (size_t t = 0; t < window; ++t) {
        const int32_t id = ids[begin + start + t];
        if (std::find(order.begin(), order.end(), id) == order.end()) order.push_back(id);
      }
      key.assign(order.begin(), order.end());
      std::sort(key.begin(), key.end());
      if (!seen.insert(key).second) continue;
      const size_t c = static_cast<size_t>(count++);
      if (c >= cap) continue;
      if (out_spans) {
        out_spans[3 * c] = static_cast<int32_t>(s);
        out_spans[3 * c + 1] = static_cast<int32_t>(start);
        out_spans[3 * c + 2] = static_cast<int32_t>(start + window);
      }
      if (out_removed) {
        int32_t* dst = out_removed + c * window;
        std::fill(dst, dst + window, -1);
        std::copy(order.begin(), order.end(), dst);
      }
      if (out_nremoved) out_nremoved[c] = static_cast<int32_t>(order.size());
      if (out_keep) {
        uint8_t* keep = out_keep + c * total;
        for (size_t t = 0; t < total; ++t)
          keep[t] = static_cast<uint8_t>(!std::binary_search(key.begin(), key.end(), ids[t]));
      }
    }
  }
  return count;
}

}  // extern "C"
