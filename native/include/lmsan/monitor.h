/* lmsan native monitor: a plain C ABI (no Python) for C and C++ programs.
 *
 * Sign convention: the bit of a dimension is (x >= 0.0f) in IEEE float32 comparison, so 0.0 and
 * -0.0 count as positive and NaN as negative.
 * Packed layout: row-major [rows, lmsan_words_for_dim(d)] uint64_t; bit (j % 64) of word (j / 64)
 * is dimension j; the padding bits above d in the last word are zero (and ignored on input).
 * A match count is the number of the d dimensions where the signs of a row and a PV agree.
 *
 * All functions are thread-safe (they keep no state) except lmsan_force_kernel, which changes the
 * process-wide kernel choice and is meant for tests and benchmarks.
 */
#ifndef LMSAN_MONITOR_H
#define LMSAN_MONITOR_H
#include <stddef.h>
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

#define LMSAN_MONITOR_ABI_VERSION 1

/* The ABI version the library was built with (LMSAN_MONITOR_ABI_VERSION). */
int lmsan_abi_version(void);

/* Kernels: selected at run time from the CPU's features unless forced. */
enum lmsan_kernel {
  LMSAN_KERNEL_AUTO = 0,   /* the best one the CPU supports */
  LMSAN_KERNEL_SCALAR = 1, /* portable C++ */
  LMSAN_KERNEL_AVX2 = 2,   /* x86-64 AVX2 + POPCNT */
  LMSAN_KERNEL_AVX512 = 3  /* x86-64 AVX-512 F/BW + POPCNT */
};

/* 1 if this build and CPU can run the kernel, 0 otherwise. */
int lmsan_kernel_supported(int kernel);
/* Force a kernel (LMSAN_KERNEL_AUTO restores the automatic choice). Returns 0, or -1 (and changes
 * nothing) when the kernel is not supported. */
int lmsan_force_kernel(int kernel);
/* The kernel used now: LMSAN_KERNEL_SCALAR, _AVX2 or _AVX512; and its name. */
int lmsan_active_kernel(void);
const char* lmsan_kernel_name(int kernel);

/* Number of 64-bit words needed for d sign bits. */
size_t lmsan_words_for_dim(size_t d);

/* Pack the signs of a row-major float32 [n, d] matrix into out [n, words]. */
void lmsan_pack_signs(const float* x, size_t n, size_t d, uint64_t* out);

/* Match counts between packed rows [n, words] and packed PVs [k, words] over d dimensions:
 * out[i*k + j] = number of dimensions where row i and PV j agree. */
void lmsan_match_counts(const uint64_t* rows, size_t n, const uint64_t* pvs, size_t k, size_t d,
                        int32_t* out);

/* Fused monitor: for each row i of a row-major float32 [n, d] matrix, the PV with the highest match
 * count (the lowest index on ties), that count, and flagged = (count >= threshold_count).
 * Streams over the rows (never builds the packed [n, words] matrix). With k == 0: best_idx = -1,
 * best_count = 0, flagged = 0. threads: 0 = all hardware threads, otherwise the number of threads
 * (rows are split into contiguous chunks; results do not depend on it).
 * Returns 0, or -1 when d == 0 or d or k exceed INT32_MAX (nothing written). */
int lmsan_best_match(const float* x, size_t n, size_t d, const uint64_t* pvs, size_t k,
                     int32_t threshold_count, int threads, int32_t* best_idx, int32_t* best_count,
                     uint8_t* flagged);

/* The same with one threshold count per PV (threshold_counts[k]): best_idx is the PV with the
 * largest margin count - threshold_counts[j] (the lowest index on ties), best_count its count,
 * flagged = (best_count >= threshold_counts[best_idx]), i.e. some PV reaches its own threshold.
 * With all thresholds equal this is lmsan_best_match. */
int lmsan_best_match_thresholds(const float* x, size_t n, size_t d, const uint64_t* pvs, size_t k,
                                const int32_t* threshold_counts, int threads, int32_t* best_idx,
                                int32_t* best_count, uint8_t* flagged);

/* Sliding-window purge candidates of one record (docs/how-it-works.md, "PV monitoring", trigger removal).
 *
 * The record is n_sentences sentences of word ids: sentence s is ids[offsets[s] .. offsets[s+1])
 * (offsets[0] must be 0 and offsets non-decreasing; total = offsets[n_sentences]). For each
 * sentence in order and each span [start, start + window) of it (stride 1), the candidate removes
 * the span's distinct ids from the whole record. A candidate whose removed-id set equals an
 * earlier candidate's is dropped.
 *
 * For candidate c (c < cap), writes:
 *   out_spans[3c .. 3c+2]       = sentence, start, end (word indices within the sentence),
 *   out_removed[c*window ..]    = the distinct removed ids in order of first appearance in the
 *                                 span (the rest of the window slots are set to -1),
 *   out_nremoved[c]             = how many ids were removed,
 *   out_keep[c*total .. +total] = 1 where the token at that position of ids survives, else 0.
 * Any output pointer may be NULL to skip it. cap = lmsan_purge_max_candidates(...) always
 * suffices. Returns the number of candidates (which may exceed cap: only the first cap are
 * written), or -1 on invalid input (window == 0, bad offsets).
 */
int64_t lmsan_purge_candidates(const int32_t* ids, const int64_t* offsets, size_t n_sentences,
                               size_t window, int32_t* out_spans, int32_t* out_removed,
                               int32_t* out_nremoved, uint8_t* out_keep, size_t cap);

/* Upper bound on the number of candidates: sum over sentences of max(0, len - window + 1).
 * Returns -1 on invalid input. */
int64_t lmsan_purge_max_candidates(const int64_t* offsets, size_t n_sentences, size_t window);

#ifdef __cplusplus
}
#endif
#endif
