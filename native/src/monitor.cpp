#include "lmsan/monitor.h"

#include <cstring>

extern "C" {

size_t lmsan_words_for_dim(size_t d) { return (d + 63) / 64; }

void lmsan_pack_signs(const float* x, size_t n, size_t d, uint64_t* out) {
  const size_t words = lmsan_words_for_dim(d);
  for (size_t i = 0; i < n; ++i) {
    const float* row = x + i * d;
    uint64_t* dst = out + i * words;
    for (size_t w = 0; w < words; ++w) {
      uint64_t bits = 0;
      const size_t base = w * 64;
      const size_t end = base + 64 < d ? base + 64 : d;
      for (size_t j = base; j < end; ++j) {
        bits |= static_cast<uint64_t>(row[j] >= 0.0f) << (j - base);
      }
      dst[w] = bits;
    }
  }
}

void lmsan_match_counts(const uint64_t* rows, size_t n, const uint64_t* pvs, size_t k, size_t d,
                        int32_t* out) {
  const size_t words = lmsan_words_for_dim(d);
  const size_t tail = d % 64;
  const uint64_t last_mask = tail ? ((uint64_t{1} << tail) - 1) : ~uint64_t{0};
  for (size_t i = 0; i < n; ++i) {
    const uint64_t* r = rows + i * words;
    for (size_t j = 0; j < k; ++j) {
      const uint64_t* p = pvs + j * words;
      int64_t diff = 0;
      for (size_t w = 0; w < words; ++w) {
        uint64_t x = r[w] ^ p[w];
        if (w + 1 == words) x &= last_mask;
        diff += __builtin_popcountll(x);
      }
      out[i * k + j] = static_cast<int32_t>(static_cast<int64_t>(d) - diff);
    }
  }
}
}
