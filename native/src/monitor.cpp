// Sign packing, XOR + popcount match counts and the fused best-match monitor.
//
// Each kernel (scalar, AVX2, AVX-512) is the same row loop instantiated with a different row
// packer inside a function compiled for that instruction set (GCC/Clang `target` attribute);
// the kernel is chosen once at run time with __builtin_cpu_supports.
#include <algorithm>
#include <atomic>
#include <climits>
#include <cstring>
#include <thread>
#include <vector>

#include "lmsan/monitor.h"

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define LMSAN_X86 1
#include <immintrin.h>
#define LMSAN_TARGET(s) __attribute__((target(s)))
#else
#define LMSAN_X86 0
#define LMSAN_TARGET(s)
#endif

#if defined(__GNUC__) || defined(__clang__)
#define LMSAN_INLINE inline __attribute__((always_inline))
#else
#define LMSAN_INLINE inline
#endif

namespace {

constexpr size_t kMaxStackWords = 64;  // rows up to d = 4096 pack into a stack buffer

LMSAN_INLINE int popcount64(uint64_t v) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_popcountll(v);
#else
  v = v - ((v >> 1) & 0x5555555555555555ULL);
  v = (v & 0x3333333333333333ULL) + ((v >> 2) & 0x3333333333333333ULL);
  v = (v + (v >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
  return static_cast<int>((v * 0x0101010101010101ULL) >> 56);
#endif
}

LMSAN_INLINE uint64_t last_word_mask(size_t d) {
  const size_t tail = d % 64;
  return tail ? ((uint64_t{1} << tail) - 1) : ~uint64_t{0};
}

// ---------------------------------------------------------------- row packers

struct PackScalar {
  static LMSAN_INLINE void pack(const float* row, size_t d, uint64_t* dst) {
    const size_t full = d / 64;
    for (size_t w = 0; w < full; ++w) {
      const float* p = row + w * 64;
      uint64_t bits = 0;
      for (size_t j = 0; j < 64; ++j) bits |= static_cast<uint64_t>(p[j] >= 0.0f) << j;
      dst[w] = bits;
    }
    if (d % 64) {
      const float* p = row + full * 64;
      uint64_t bits = 0;
      for (size_t j = 0; j < d % 64; ++j) bits |= static_cast<uint64_t>(p[j] >= 0.0f) << j;
      dst[full] = bits;
    }
  }
};

#if LMSAN_X86
struct PackAvx2 {
  LMSAN_TARGET("avx2,popcnt") static inline void pack(const float* row, size_t d, uint64_t* dst) {
    const __m256 zero = _mm256_setzero_ps();
    const size_t full = d / 64;
    for (size_t w = 0; w < full; ++w) {
      const float* p = row + w * 64;
      uint64_t bits = 0;
      for (int b = 0; b < 8; ++b) {
        // _CMP_GE_OQ: ordered, so NaN gives 0; -0.0 >= 0.0 is true.
        const __m256 m = _mm256_cmp_ps(_mm256_loadu_ps(p + 8 * b), zero, _CMP_GE_OQ);
        bits |= static_cast<uint64_t>(static_cast<uint32_t>(_mm256_movemask_ps(m))) << (8 * b);
      }
      dst[w] = bits;
    }
    if (d % 64) {
      const float* p = row + full * 64;
      uint64_t bits = 0;
      for (size_t j = 0; j < d % 64; ++j) bits |= static_cast<uint64_t>(p[j] >= 0.0f) << j;
      dst[full] = bits;
    }
  }
};

struct PackAvx512 {
  LMSAN_TARGET("avx512f,avx512bw,popcnt") static inline void pack(const float* row, size_t d, uint64_t* dst) {
    const __m512 zero = _mm512_setzero_ps();
    const size_t full = d / 64;
    for (size_t w = 0; w < full; ++w) {
      const float* p = row + w * 64;
      const uint64_t m0 = _mm512_cmp_ps_mask(_mm512_loadu_ps(p), zero, _CMP_GE_OQ);
      const uint64_t m1 = _mm512_cmp_ps_mask(_mm512_loadu_ps(p + 16), zero, _CMP_GE_OQ);
      const uint64_t m2 = _mm512_cmp_ps_mask(_mm512_loadu_ps(p + 32), zero, _CMP_GE_OQ);
      const uint64_t m3 = _mm512_cmp_ps_mask(_mm512_loadu_ps(p + 48), zero, _CMP_GE_OQ);
      dst[w] = m0 | (m1 << 16) | (m2 << 32) | (m3 << 48);
    }
    const size_t tail = d % 64;
    if (tail) {
      const float* p = row + full * 64;
      uint64_t bits = 0;
      for (size_t c = 0; c * 16 < tail; ++c) {
        const size_t left = tail - c * 16;
        const __mmask16 lanes =
            left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
        // Masked load reads no memory past the row; masked compare zeroes the unused lanes.
        const __m512 v = _mm512_maskz_loadu_ps(lanes, p + c * 16);
        bits |= static_cast<uint64_t>(_mm512_mask_cmp_ps_mask(lanes, v, zero, _CMP_GE_OQ))
                << (16 * c);
      }
      dst[full] = bits;
    }
  }
};
#endif

// ---------------------------------------------------------------- generic loops

template <class Packer>
LMSAN_INLINE void pack_rows(const float* x, size_t r0, size_t r1, size_t d, uint64_t* out) {
  const size_t words = lmsan_words_for_dim(d);
  for (size_t i = r0; i < r1; ++i) Packer::pack(x + i * d, d, out + i * words);
}

LMSAN_INLINE void match_rows(const uint64_t* rows, size_t n, const uint64_t* pvs, size_t k,
                             size_t d, int32_t* out) {
  const size_t words = lmsan_words_for_dim(d);
  const uint64_t mask = last_word_mask(d);
  for (size_t i = 0; i < n; ++i) {
    const uint64_t* r = rows + i * words;
    for (size_t j = 0; j < k; ++j) {
      const uint64_t* p = pvs + j * words;
      int64_t diff = 0;
      for (size_t w = 0; w + 1 < words; ++w) diff += popcount64(r[w] ^ p[w]);
      diff += popcount64((r[words - 1] ^ p[words - 1]) & mask);
      out[i * k + j] = static_cast<int32_t>(static_cast<int64_t>(d) - diff);
    }
  }
}

struct BestArgs {
  const float* x;
  size_t d;
  const uint64_t* pvs;  // [k, words], padding bits cleared
  size_t k;
  const uint32_t* thresholds;  // [k] per-PV counts, clamped to [0, d + 1]
  int32_t* best_idx;
  int32_t* best_count;
  uint8_t* flagged;
};

template <class Packer>
LMSAN_INLINE void best_rows(const BestArgs& a, size_t r0, size_t r1) {
  const size_t d = a.d, k = a.k, words = lmsan_words_for_dim(d);
  const uint64_t mask = last_word_mask(d);
  uint64_t stack_buf[kMaxStackWords];
  std::vector<uint64_t> heap_buf;
  uint64_t* bits = stack_buf;
  if (words > kMaxStackWords) {
    heap_buf.resize(words);
    bits = heap_buf.data();
  }
  for (size_t i = r0; i < r1; ++i) {
    Packer::pack(a.x + i * d, d, bits);
    bits[words - 1] &= mask;
    // The best PV has the largest margin count_j - threshold_j (with one threshold for all PVs:
    // the highest count). key = ((mismatches + threshold_j) << 32) | pv index: the smallest key
    // is the best PV, the lowest index on ties, found without branches (mismatches <= d and
    // threshold_j <= d + 1 with d < 2^31, so the sum fits 32 bits; k < 2^31).
    uint64_t best_key = ~uint64_t{0};
    uint64_t best_diff = 0;
    for (size_t j = 0; j < k; ++j) {
      const uint64_t* p = a.pvs + j * words;
      uint64_t diff = 0;
      for (size_t w = 0; w < words; ++w) diff += static_cast<uint64_t>(popcount64(bits[w] ^ p[w]));
      const uint64_t key = ((diff + a.thresholds[j]) << 32) | j;
      const bool better = key < best_key;
      best_key = better ? key : best_key;
      best_diff = better ? diff : best_diff;
    }
    const int32_t best = k ? static_cast<int32_t>(best_key & 0xFFFFFFFFu) : -1;
    const int32_t count = k ? static_cast<int32_t>(d - best_diff) : 0;
    a.best_idx[i] = best;
    a.best_count[i] = count;
    a.flagged[i] = static_cast<uint8_t>(
        best >= 0 && static_cast<uint32_t>(count) >= a.thresholds[static_cast<size_t>(best)]);
  }
}

// ---------------------------------------------------------------- per-ISA entry points

using PackFn = void (*)(const float*, size_t, size_t, size_t, uint64_t*);
using MatchFn = void (*)(const uint64_t*, size_t, const uint64_t*, size_t, size_t, int32_t*);
using BestFn = void (*)(const BestArgs&, size_t, size_t);

struct Kernel {
  PackFn pack;
  MatchFn match;
  BestFn best;
};

void pack_scalar(const float* x, size_t r0, size_t r1, size_t d, uint64_t* out) {
  pack_rows<PackScalar>(x, r0, r1, d, out);
}
void match_scalar(const uint64_t* r, size_t n, const uint64_t* p, size_t k, size_t d,
                  int32_t* out) {
  match_rows(r, n, p, k, d, out);
}
void best_scalar(const BestArgs& a, size_t r0, size_t r1) { best_rows<PackScalar>(a, r0, r1); }

#if LMSAN_X86
LMSAN_TARGET("avx2,popcnt")
void pack_avx2(const float* x, size_t r0, size_t r1, size_t d, uint64_t* out) {
  pack_rows<PackAvx2>(x, r0, r1, d, out);
}
LMSAN_TARGET("avx2,popcnt")
void match_avx2(const uint64_t* r, size_t n, const uint64_t* p, size_t k, size_t d,
                int32_t* out) {
  match_rows(r, n, p, k, d, out);
}
LMSAN_TARGET("avx2,popcnt")
void best_avx2(const BestArgs& a, size_t r0, size_t r1) { best_rows<PackAvx2>(a, r0, r1); }

LMSAN_TARGET("avx512f,avx512bw,popcnt")
void pack_avx512(const float* x, size_t r0, size_t r1, size_t d, uint64_t* out) {
  pack_rows<PackAvx512>(x, r0, r1, d, out);
}
LMSAN_TARGET("avx512f,avx512bw,popcnt")
void best_avx512(const BestArgs& a, size_t r0, size_t r1) { best_rows<PackAvx512>(a, r0, r1); }
#endif

bool cpu_supports(int kernel) {
  switch (kernel) {
    case LMSAN_KERNEL_SCALAR:
      return true;
#if LMSAN_X86
    case LMSAN_KERNEL_AVX2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
    case LMSAN_KERNEL_AVX512:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("popcnt");
#endif
    default:
      return false;
  }
}

int auto_kernel() {
  static const int best = [] {
    if (cpu_supports(LMSAN_KERNEL_AVX512)) return static_cast<int>(LMSAN_KERNEL_AVX512);
    if (cpu_supports(LMSAN_KERNEL_AVX2)) return static_cast<int>(LMSAN_KERNEL_AVX2);
    return static_cast<int>(LMSAN_KERNEL_SCALAR);
  }();
  return best;
}

std::atomic<int> g_forced{LMSAN_KERNEL_AUTO};

Kernel kernel_for(int which) {
  switch (which) {
#if LMSAN_X86
    case LMSAN_KERNEL_AVX512:
      return {pack_avx512, match_avx2, best_avx512};
    case LMSAN_KERNEL_AVX2:
      return {pack_avx2, match_avx2, best_avx2};
#endif
    default:
      return {pack_scalar, match_scalar, best_scalar};
  }
}

Kernel current_kernel() { return kernel_for(lmsan_active_kernel()); }

// Run fn(r0, r1) over [0, n) split into `threads` contiguous chunks.
template <class Fn>
void parallel_rows(size_t n, int threads, Fn fn) {
  size_t t = threads > 0 ? static_cast<size_t>(threads)
                         : std::max<size_t>(1, std::thread::hardware_concurrency());
  t = std::min(t, std::max<size_t>(1, n / 1024));  // not worth a thread below ~1k rows
  if (t <= 1) {
    fn(size_t{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(t - 1);
  const size_t chunk = (n + t - 1) / t;
  for (size_t c = 1; c < t; ++c) {
    const size_t r0 = std::min(n, c * chunk), r1 = std::min(n, r0 + chunk);
    pool.emplace_back([=] { fn(r0, r1); });
  }
  fn(size_t{0}, std::min(n, chunk));
  for (auto& th : pool) th.join();
}

}  // namespace

extern "C" {

int lmsan_abi_version(void) { return LMSAN_MONITOR_ABI_VERSION; }

int lmsan_kernel_supported(int kernel) {
  if (kernel == LMSAN_KERNEL_AUTO) return 1;
  return cpu_supports(kernel) ? 1 : 0;
}

int lmsan_force_kernel(int kernel) {
  if (!lmsan_kernel_supported(kernel)) return -1;
  g_forced.store(kernel);
  return 0;
}

int lmsan_active_kernel(void) {
  const int forced = g_forced.load();
  return forced == LMSAN_KERNEL_AUTO ? auto_kernel() : forced;
}

const char* lmsan_kernel_name(int kernel) {
  switch (kernel) {
    case LMSAN_KERNEL_AUTO:
      return "auto";
    case LMSAN_KERNEL_SCALAR:
      return "scalar";
    case LMSAN_KERNEL_AVX2:
      return "avx2";
    case LMSAN_KERNEL_AVX512:
      return "avx512";
    default:
      return "unknown";
  }
}

size_t lmsan_words_for_dim(size_t d) { return (d + 63) / 64; }

void lmsan_pack_signs(const float* x, size_t n, size_t d, uint64_t* out) {
  if (d == 0 || n == 0) return;
  current_kernel().pack(x, 0, n, d, out);
}

void lmsan_match_counts(const uint64_t* rows, size_t n, const uint64_t* pvs, size_t k, size_t d,
                        int32_t* out) {
  if (n == 0 || k == 0) return;
  if (d == 0) {
    std::memset(out, 0, n * k * sizeof(int32_t));
    return;
  }
  current_kernel().match(rows, n, pvs, k, d, out);
}

int lmsan_best_match(const float* x, size_t n, size_t d, const uint64_t* pvs, size_t k,
                     int32_t threshold_count, int threads, int32_t* best_idx, int32_t* best_count,
                     uint8_t* flagged) {
  const std::vector<int32_t> thr(k, threshold_count);
  return lmsan_best_match_thresholds(x, n, d, pvs, k, thr.data(), threads, best_idx, best_count,
                                     flagged);
}

int lmsan_best_match_thresholds(const float* x, size_t n, size_t d, const uint64_t* pvs, size_t k,
                                const int32_t* threshold_counts, int threads, int32_t* best_idx,
                                int32_t* best_count, uint8_t* flagged) {
  if (d == 0 || d > static_cast<size_t>(INT32_MAX) || k > static_cast<size_t>(INT32_MAX))
    return -1;
  if (n == 0) return 0;
  // A count is in [0, d]: a threshold below 0 flags like 0 and one above d + 1 like d + 1.
  std::vector<uint32_t> thr(k);
  for (size_t j = 0; j < k; ++j) {
    const int64_t t = threshold_counts[j];
    thr[j] = static_cast<uint32_t>(t < 0 ? 0 : (t > static_cast<int64_t>(d) + 1 ? d + 1 : t));
  }
  const size_t words = lmsan_words_for_dim(d);
  // A copy of the PVs with the padding bits cleared, so the inner loop needs no mask.
  std::vector<uint64_t> clean(pvs, pvs + k * words);
  const uint64_t mask = last_word_mask(d);
  for (size_t j = 0; j < k; ++j) clean[j * words + words - 1] &= mask;
  const BestArgs args{x, d, clean.data(), k, thr.data(), best_idx, best_count, flagged};
  const BestFn best = current_kernel().best;
  parallel_rows(n, threads, [&](size_t r0, size_t r1) { best(args, r0, r1); });
  return 0;
}

}  // extern "C"
