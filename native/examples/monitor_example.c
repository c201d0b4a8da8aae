/* A C program that uses the lmsan monitor without Python: packs signs, finds the best PV of a
 * few rows, and generates purge candidates; checks known results and exits 0 on success.
 *
 *   cmake -S . -B /tmp/b && cmake --build /tmp/b --target monitor_example && /tmp/b/monitor_example
 */
#include <lmsan/monitor.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define D 72 /* not a multiple of 64: two words, eight bits used in the second */
#define N 3
#define K 2

static int failures = 0;

static void check(int ok, const char* what) {
  if (!ok) {
    fprintf(stderr, "FAIL: %s\n", what);
    ++failures;
  }
}

int main(void) {
  float pv_values[K][D], x[N][D];
  uint64_t pvs[K * 2];
  int32_t best_idx[N], best_count[N];
  uint8_t flagged[N];
  int j;

  check(lmsan_abi_version() == LMSAN_MONITOR_ABI_VERSION, "ABI version");
  check(lmsan_words_for_dim(D) == 2, "words_for_dim(72) == 2");

  /* PV 0: all positive; PV 1: first half negative. */
  for (j = 0; j < D; ++j) {
    pv_values[0][j] = 1.0f;
    pv_values[1][j] = j < D / 2 ? -1.0f : 1.0f;
  }
  lmsan_pack_signs(&pv_values[0][0], K, D, pvs);
  check(pvs[0] == ~(uint64_t)0 && pvs[1] == 0xFFu, "packed PV 0 (72 ones)");

  /* Row 0: zeros and -0.0 count as positive -> matches PV 0 on all 72 dims.
   * Row 1: like PV 1 except 10 dims -> best PV 1 with 62 (PV 0: 46).
   * Row 2: alternating signs -> 36 matches with either PV; tie -> lowest index (0). */
  for (j = 0; j < D; ++j) {
    x[0][j] = (j % 2) ? -0.0f : 0.0f;
    x[1][j] = pv_values[1][j] * (j < 10 ? -2.0f : 3.0f);
    x[2][j] = (j % 2) ? -1.0f : 1.0f;
  }
  {
    const int32_t threshold = 58; /* ceil(0.8 * 72) */
    int rc = lmsan_best_match(&x[0][0], N, D, pvs, K, threshold, 1, best_idx, best_count, flagged);
    check(rc == 0, "best_match returns 0");
    printf("kernel %s\n", lmsan_kernel_name(lmsan_active_kernel()));
    printf("row 0: pv %d count %d flagged %d\n", best_idx[0], best_count[0], flagged[0]);
    printf("row 1: pv %d count %d flagged %d\n", best_idx[1], best_count[1], flagged[1]);
    printf("row 2: pv %d count %d flagged %d\n", best_idx[2], best_count[2], flagged[2]);
    check(best_idx[0] == 0 && best_count[0] == 72 && flagged[0] == 1, "row 0");
    check(best_idx[1] == 1 && best_count[1] == 62 && flagged[1] == 1, "row 1");
    check(best_idx[2] == 0 && best_count[2] == 36 && flagged[2] == 0, "row 2");
  }
  {
    /* match_counts agrees with best_match. */
    uint64_t rows[N * 2];
    int32_t counts[N * K];
    lmsan_pack_signs(&x[0][0], N, D, rows);
    lmsan_match_counts(rows, N, pvs, K, D, counts);
    check(counts[0] == 72 && counts[1] == 36 && counts[2] == 46 && counts[3] == 62,
          "match_counts rows 0-1");
    check(counts[4] == 36 && counts[5] == 36, "match_counts row 2");
  }
  {
    /* Record "cf the film cf" / "a cf" as word ids: cf=0 the=1 film=2 a=3; window 2. */
    const int32_t ids[] = {0, 1, 2, 0, 3, 0};
    const int64_t offsets[] = {0, 4, 6};
    int32_t spans[3 * 8], removed[2 * 8], nremoved[8];
    uint8_t keep[6 * 8];
    int64_t cap = lmsan_purge_max_candidates(offsets, 2, 2);
    int64_t c = lmsan_purge_candidates(ids, offsets, 2, 2, spans, removed, nremoved, keep, 8);
    static const uint8_t keep0[6] = {0, 0, 1, 0, 1, 0}; /* remove {cf, the} */
    check(cap == 4, "max candidates: 3 spans + 1 span");
    /* spans: (0,0,2)={cf,the} (0,1,3)={the,film} (0,2,4)={film,cf} (1,0,2)={a,cf} */
    check(c == 4, "four distinct candidates");
    check(spans[0] == 0 && spans[1] == 0 && spans[2] == 2, "candidate 0 span");
    check(nremoved[0] == 2 && removed[0] == 0 && removed[1] == 1, "candidate 0 removed");
    check(memcmp(keep, keep0, 6) == 0, "candidate 0 keep mask");
    check(spans[9] == 1 && spans[10] == 0 && spans[11] == 2, "candidate 3 span");
    printf("purge: %lld candidates\n", (long long)c);
  }
  if (failures) {
    fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  printf("OK\n");
  return 0;
}
