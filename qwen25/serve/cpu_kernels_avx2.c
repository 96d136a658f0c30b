// fp32 linear layers for a decode step on CPUs with AVX2 and FMA but no AVX-512 (cpu_kernels.c needs AVX-512).
//
//   y[m, n] = bias[n] + sum_k x[m, k] * W[n, k]        W (N, K), x (M, K), y (M, N) fp32 row-major, bias or NULL
//
// A decode step has a few activation rows (one per running request) against every weight row. torch's fp32 matmul
// runs such skinny products at ~50 GFLOP/s here; this kernel takes 4 weight rows at a time, keeps them in cache
// while it goes through the activation rows 2 at a time (8 accumulators of 8 lanes: with the 4 weight vectors
// and one activation vector, 13 of AVX2's 16 registers, so nothing spills), so each weight is read from memory once per step. Sums run in a fixed order (8 lanes per row, k ascending,
// then the lanes, then the tail), whatever the thread count.

#include <immintrin.h>
#include <stdint.h>

#define INLINE static inline __attribute__((always_inline))

INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// NR x MR outputs: weight rows n0.., activation rows m0..; NR <= 4 and MR <= 2 constants where inlined
INLINE void block(const float* W, const float* x, const float* bias, float* y, int64_t N, int64_t K, int64_t n0,
                  int64_t m0, int NR, int MR) {
    __m256 acc[4][2];
    for (int r = 0; r < NR; r++)
        for (int i = 0; i < MR; i++) acc[r][i] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 w[4];
        for (int r = 0; r < NR; r++) w[r] = _mm256_loadu_ps(W + (n0 + r) * K + k);
        for (int i = 0; i < MR; i++) {
            __m256 xv = _mm256_loadu_ps(x + (m0 + i) * K + k);
            for (int r = 0; r < NR; r++) acc[r][i] = _mm256_fmadd_ps(w[r], xv, acc[r][i]);
        }
    }
    for (int r = 0; r < NR; r++)
        for (int i = 0; i < MR; i++) {
            float s = hsum(acc[r][i]);
            for (int64_t t = k; t < K; t++) s += W[(n0 + r) * K + t] * x[(m0 + i) * K + t];
            y[(m0 + i) * N + n0 + r] = s + (bias ? bias[n0 + r] : 0.0f);
        }
}

static void block_any(const float* W, const float* x, const float* bias, float* y, int64_t N, int64_t K, int64_t n0,
                      int64_t m0, int nr, int mr) {
    // the edges (fewer than 4 weight rows or 2 activation rows left): the same sums
    if (nr == 4 && mr == 1) block(W, x, bias, y, N, K, n0, m0, 4, 1);
    else block(W, x, bias, y, N, K, n0, m0, nr, mr);
}

void qwen25_linear_f32(const float* W, const float* x, const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                       int threads) {
    int64_t blocks = (N + 3) / 4;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t n0 = b * 4;
        int nr = N - n0 < 4 ? (int)(N - n0) : 4;
        for (int64_t m0 = 0; m0 < M; m0 += 2) {
            int mr = M - m0 < 2 ? (int)(M - m0) : 2;
            if (nr == 4 && mr == 2)
                block(W, x, bias, y, N, K, n0, m0, 4, 2);
            else
                block_any(W, x, bias, y, N, K, n0, m0, nr, mr);
        }
    }
}

// ---- int8 weights (one fp32 scale per output row), fp32 activations --------------------------------------------
//
//   y[m, n] = bias[n] + scale[n] * sum_k x[m, k] * Q[n, k]        Q (N, K) int8
//
// A decode step reads a quarter of fp32's bytes. Each 8 weights are widened to fp32 once (two conversions) and
// used for both activation rows of the block; the same order of sums as qwen25_linear_f32.

INLINE __m256 widen8(const int8_t* q) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)q)));
}

INLINE void block_q(const int8_t* Q, const float* scale, const float* x, const float* bias, float* y, int64_t N,
                    int64_t K, int64_t n0, int64_t m0, int NR, int MR) {
    __m256 acc[4][2];
    for (int r = 0; r < NR; r++)
        for (int i = 0; i < MR; i++) acc[r][i] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 w[4];
        for (int r = 0; r < NR; r++) w[r] = widen8(Q + (n0 + r) * K + k);
        for (int i = 0; i < MR; i++) {
            __m256 xv = _mm256_loadu_ps(x + (m0 + i) * K + k);
            for (int r = 0; r < NR; r++) acc[r][i] = _mm256_fmadd_ps(w[r], xv, acc[r][i]);
        }
    }
    for (int r = 0; r < NR; r++)
        for (int i = 0; i < MR; i++) {
            float s = hsum(acc[r][i]);
            for (int64_t t = k; t < K; t++) s += (float)Q[(n0 + r) * K + t] * x[(m0 + i) * K + t];
            y[(m0 + i) * N + n0 + r] = s * scale[n0 + r] + (bias ? bias[n0 + r] : 0.0f);
        }
}

static void block_q_any(const int8_t* Q, const float* scale, const float* x, const float* bias, float* y, int64_t N,
                        int64_t K, int64_t n0, int64_t m0, int nr, int mr) {
    if (nr == 4 && mr == 1) block_q(Q, scale, x, bias, y, N, K, n0, m0, 4, 1);
    else block_q(Q, scale, x, bias, y, N, K, n0, m0, nr, mr);
}

void qwen25_linear_int8_f32(const int8_t* Q, const float* scale, const float* x, const float* bias, float* y,
                            int64_t M, int64_t N, int64_t K, int threads) {
    int64_t blocks = (N + 3) / 4;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t n0 = b * 4;
        int nr = N - n0 < 4 ? (int)(N - n0) : 4;
        for (int64_t m0 = 0; m0 < M; m0 += 2) {
            int mr = M - m0 < 2 ? (int)(M - m0) : 2;
            if (nr == 4 && mr == 2)
                block_q(Q, scale, x, bias, y, N, K, n0, m0, 4, 2);
            else
                block_q_any(Q, scale, x, bias, y, N, K, n0, m0, nr, mr);
        }
    }
}
