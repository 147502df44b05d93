/* The float32 screen over float16 rows, fused: out[i][j] = sum_c x[i][c] * float(phi[j][c]).
 *
 * torch converts a float16 block to float32 and then runs a general matmul, which for a few
 * queries spends most of its time on the conversion pass and a skinny product; this reads each
 * stored row once, converts it in registers (F16C: exact) and feeds up to 8 queries' float32
 * FMAs from it. Built by ctrak/native.py with the system C compiler; x86-64 with AVX2, FMA and
 * F16C at run time (`ctrak_screen16_supported`), else the caller keeps torch's path.
 *
 * Accumulation is float32 in 8 lanes, then a float32 sum of the lanes: a summation order
 * covered by the screen's error bound (ctrak/screen.py: any order, FMA or not).
 */
#include <stdint.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#define LANES 8
#define MAX_Q 8 /* queries per pass over a row: 8 accumulators + row + x in 16 ymm registers */
#define BLOCK_ROWS 256 /* rows kept in L2 (512 KB at k = 1024) while every query group passes */

__attribute__((target("avx2,fma"))) static float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Q (1..MAX_Q, a compile-time constant: the accumulators stay in registers) queries, rows of
 * x with stride k, against rows [j0, j1) of phi. */
#define DEFINE_GROUP(Q)                                                                      \
    __attribute__((target("avx2,fma,f16c"))) static void group##Q(                           \
        const uint16_t *phi, int64_t j0, int64_t j1, int64_t k, const float *x, float *out,  \
        int64_t ldo) {                                                                       \
        const int64_t kv = k - k % LANES;                                                    \
        for (int64_t j = j0; j < j1; j++) {                                                  \
            const uint16_t *row = phi + j * k;                                               \
            __m256 acc[Q];                                                                   \
            for (int i = 0; i < Q; i++) acc[i] = _mm256_setzero_ps();                        \
            for (int64_t c = 0; c < kv; c += LANES) {                                        \
                __m256 a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + c)));     \
                for (int i = 0; i < Q; i++)                                                  \
                    acc[i] = _mm256_fmadd_ps(a, _mm256_loadu_ps(x + i * k + c), acc[i]);     \
            }                                                                                \
            for (int i = 0; i < Q; i++) {                                                    \
                float s = hsum(acc[i]);                                                      \
                for (int64_t c = kv; c < k; c++) s += x[i * k + c] * _cvtsh_ss(row[c]);      \
                out[i * ldo + j] = s;                                                        \
            }                                                                                \
        }                                                                                    \
    }

DEFINE_GROUP(1)
DEFINE_GROUP(2)
DEFINE_GROUP(3)
DEFINE_GROUP(4)
DEFINE_GROUP(5)
DEFINE_GROUP(6)
DEFINE_GROUP(7)
DEFINE_GROUP(8)

typedef void (*group_fn)(const uint16_t *, int64_t, int64_t, int64_t, const float *, float *,
                         int64_t);
static const group_fn GROUPS[MAX_Q + 1] = {0,       group1, group2, group3, group4,
                                           group5,  group6, group7, group8};

int ctrak_screen16_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
}

/* phi (n, k) float16 row-major, x (q, k) float32 row-major -> out (q, n) with row stride ldo. */
void ctrak_screen16(const uint16_t *phi, int64_t n, int64_t k, const float *x, int64_t q,
                    float *out, int64_t ldo) {
    for (int64_t j0 = 0; j0 < n; j0 += BLOCK_ROWS) {
        int64_t j1 = j0 + BLOCK_ROWS < n ? j0 + BLOCK_ROWS : n;
        for (int64_t i = 0; i < q; i += MAX_Q) {
            int64_t g = q - i < MAX_Q ? q - i : MAX_Q;
            GROUPS[g](phi, j0, j1, k, x + i * k, out + i * ldo, ldo);
        }
    }
}

#else /* not x86-64: report unsupported; the caller keeps torch's path */

int ctrak_screen16_supported(void) { return 0; }

void ctrak_screen16(const uint16_t *phi, int64_t n, int64_t k, const float *x, int64_t q,
                    float *out, int64_t ldo) {
    (void)phi; (void)n; (void)k; (void)x; (void)q; (void)out; (void)ldo;
}

#endif
