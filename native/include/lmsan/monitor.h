/* lmsan native monitor: plain C ABI (no Python). */
#ifndef LMSAN_MONITOR_H
#define LMSAN_MONITOR_H
#include <stddef.h>
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

/* Number of 64-bit words needed for d sign bits. */
size_t lmsan_words_for_dim(size_t d);

/* Pack sign(x) >= 0 of a row-major float32 [n, d] matrix into out [n, words] (bit j of word
 * j/64 is dimension j; padding bits are zero). */
void lmsan_pack_signs(const float* x, size_t n, size_t d, uint64_t* out);

/* Match counts between packed rows [n, words] and packed PVs [k, words] over d dimensions:
 * out[i*k + j] = number of dimensions where the signs agree. */
void lmsan_match_counts(const uint64_t* rows, size_t n, const uint64_t* pvs, size_t k, size_t d,
                        int32_t* out);

#ifdef __cplusplus
}
#endif
#endif
