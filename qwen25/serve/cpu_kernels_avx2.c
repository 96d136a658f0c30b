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
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define INLINE static inline __attribute__((always_inline))

INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// ---- fp32 weights, or int8 weights with one fp32 scale per output row; fp32 activations --------------------------
//
//   y[m, n] = bias[n] + sum_k x[m, k] * W[n, k]                    W (N, K) fp32   (Q and scale NULL)
//   y[m, n] = bias[n] + scale[n] * sum_k x[m, k] * Q[n, k]         Q (N, K) int8   (W NULL)
//
// int8 weights: a decode step reads a quarter of fp32's bytes; each 8 weights are widened to fp32 once (two
// conversions) and used for both activation rows of the block. The same order of sums either way. Every caller
// passes W or Q as a constant NULL, so the always-inlined code below is compiled once per kind, branch-free.

INLINE __m256 widen8(const int8_t* q) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)q)));
}

// NR x MR outputs: weight rows n0.., activation rows m0..; NR <= 4 and MR <= 2 constants where inlined
INLINE void block(const float* W, const int8_t* Q, const float* scale, const float* x, const float* bias, float* y,
                  int64_t N, int64_t K, int64_t n0, int64_t m0, int NR, int MR) {
    __m256 acc[4][2];
    for (int r = 0; r < NR; r++)
        for (int i = 0; i < MR; i++) acc[r][i] = _mm256_setzero_ps();
    // int8 weights: the next 4 rows, a line per step of 8 weights (4 rows are K / 16 lines; see block_q4); fp32
    // weights stream at ~30 GB/s without it
    const int8_t* next = Q ? Q + (n0 + NR) * K : NULL;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        if (Q && next + k * 8 < Q + N * K) _mm_prefetch((const char*)(next + k * 8), _MM_HINT_T0);
        __m256 w[4];
        for (int r = 0; r < NR; r++) w[r] = Q ? widen8(Q + (n0 + r) * K + k) : _mm256_loadu_ps(W + (n0 + r) * K + k);
        for (int i = 0; i < MR; i++) {
            __m256 xv = _mm256_loadu_ps(x + (m0 + i) * K + k);
            for (int r = 0; r < NR; r++) acc[r][i] = _mm256_fmadd_ps(w[r], xv, acc[r][i]);
        }
    }
    for (int r = 0; r < NR; r++)
        for (int i = 0; i < MR; i++) {
            float s = hsum(acc[r][i]);
            for (int64_t t = k; t < K; t++)
                s += (Q ? (float)Q[(n0 + r) * K + t] : W[(n0 + r) * K + t]) * x[(m0 + i) * K + t];
            y[(m0 + i) * N + n0 + r] = (Q ? s * scale[n0 + r] : s) + (bias ? bias[n0 + r] : 0.0f);
        }
}

INLINE void linear(const float* W, const int8_t* Q, const float* scale, const float* x, const float* bias, float* y,
                   int64_t M, int64_t N, int64_t K, int threads) {
    int64_t blocks = (N + 3) / 4;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t n0 = b * 4;
        int nr = N - n0 < 4 ? (int)(N - n0) : 4;
        for (int64_t m0 = 0; m0 < M; m0 += 2) {
            int mr = M - m0 < 2 ? (int)(M - m0) : 2;
            if (nr == 4 && mr == 2)  // the unrolled common case; the edges with the same sums
                block(W, Q, scale, x, bias, y, N, K, n0, m0, 4, 2);
            else if (nr == 4)
                block(W, Q, scale, x, bias, y, N, K, n0, m0, 4, 1);
            else
                block(W, Q, scale, x, bias, y, N, K, n0, m0, nr, mr);
        }
    }
}

void qwen25_linear_f32(const float* W, const float* x, const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                       int threads) {
    linear(W, NULL, NULL, x, bias, y, M, N, K, threads);
}

void qwen25_linear_int8_f32(const int8_t* Q, const float* scale, const float* x, const float* bias, float* y,
                            int64_t M, int64_t N, int64_t K, int threads) {
    linear(NULL, Q, scale, x, bias, y, M, N, K, threads);
}

// ---- int8 weights x int8 activations (--w8a8 on AVX2) -------------------------------------------------------------
//
// The activations of a decode step quantized per block of 32, as llama.cpp's Q8_0 does (d = max|x| / 127 per
// block, xq = round(x / d), ties to even; a block with a NaN or infinity gets d = NaN, so its row's outputs are NaN
// as the exact product's would be), then bytes multiplied by bytes: _mm256_maddubs_epi16 multiplies unsigned by
// signed bytes, so each pair is taken as (|w|, x with w's sign) (llama.cpp's trick; |w| <= 127 fits).
//
//   y[m, n] = bias[n] + scale[n] * sum_b d[m, b] * sum_{k in b} Q[n, k] * xq[m, k]
//
// K must be a multiple of 32 (the caller checks).


static void quantize_blocks(const float* x, int64_t M, int64_t K, int8_t* xq, float* d) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < K / 32; b++) {
            const float* v = x + m * K + b * 32;
            float amax = 0.0f, nonfinite = 0.0f;
            for (int i = 0; i < 32; i++) {
                amax = fmaxf(amax, fabsf(v[i]));
                nonfinite += v[i] * 0.0f;  // NaN exactly when some value is NaN or infinite
            }
            float dm = nonfinite == 0.0f ? amax / 127.0f : nonfinite, inv = dm > 0.0f ? 1.0f / dm : 0.0f;
            d[m * (K / 32) + b] = dm;
            for (int i = 0; i < 32; i++) {
                float q = nearbyintf(v[i] * inv);
                xq[m * K + b * 32 + i] = (int8_t)(q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q);
            }
        }
}

INLINE __m256 dot32(__m256i w, __m256i x, __m256i ones) {  // the 32 products of a block, as 8 fp32 partial sums
    __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)), ones);
    return _mm256_cvtepi32_ps(p);
}

INLINE void block_q8(const int8_t* Q, const float* scale, const int8_t* xq, const float* d, const float* bias,
                     float* y, int64_t N, int64_t K, int64_t n0, int64_t m0, int NR, int MR) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[2][2];
    for (int r = 0; r < NR; r++)
        for (int i = 0; i < MR; i++) acc[r][i] = _mm256_setzero_ps();
    const int8_t* next = Q + (n0 + NR) * K;  // the next 2 weight rows: a line per block step (see block_q4)
    for (int64_t b = 0; b < K / 32; b++) {
        if (next + b * 64 < Q + N * K) _mm_prefetch((const char*)(next + b * 64), _MM_HINT_T0);
        __m256i w[2];
        for (int r = 0; r < NR; r++) w[r] = _mm256_loadu_si256((const __m256i*)(Q + (n0 + r) * K + b * 32));
        for (int i = 0; i < MR; i++) {
            __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + (m0 + i) * K + b * 32));
            __m256 dv = _mm256_set1_ps(d[(m0 + i) * (K / 32) + b]);
            for (int r = 0; r < NR; r++) acc[r][i] = _mm256_fmadd_ps(dot32(w[r], xv, ones), dv, acc[r][i]);
        }
    }
    for (int r = 0; r < NR; r++)
        for (int i = 0; i < MR; i++)
            y[(m0 + i) * N + n0 + r] = hsum(acc[r][i]) * scale[n0 + r] + (bias ? bias[n0 + r] : 0.0f);
}

void qwen25_linear_q8_f32(const int8_t* Q, const float* scale, const float* x, const float* bias, float* y,
                          int64_t M, int64_t N, int64_t K, int threads) {
    int8_t* xq = (int8_t*)malloc(M * K);
    float* d = (float*)malloc(sizeof(float) * (M * K / 32 + 1));
    quantize_blocks(x, M, K, xq, d);
    int64_t blocks = (N + 1) / 2;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t n0 = b * 2;
        int nr = N - n0 < 2 ? 1 : 2;
        for (int64_t m0 = 0; m0 < M; m0 += 2) {
            int mr = M - m0 < 2 ? 1 : 2;
            if (nr == 2 && mr == 2) block_q8(Q, scale, xq, d, bias, y, N, K, n0, m0, 2, 2);
            else if (nr == 2) block_q8(Q, scale, xq, d, bias, y, N, K, n0, m0, 2, 1);
            else block_q8(Q, scale, xq, d, bias, y, N, K, n0, m0, 1, mr);
        }
    }
    free(d);
    free(xq);
}

// ---- 4-bit weights x int8 activations (--int4) ---------------------------------------------------------------------
//
// The weights in llama.cpp's Q4_0 layout: per block of 32 inputs one fp16 scale dw and 16 bytes, byte j holding
// q[j] in its low nibble and q[j + 16] in its high one, q in 0..15 standing for dw * (q - 8). A decode step reads
// 4.5 bits per weight. The activations are quantized per block of 32 as for --w8a8 (quantize_blocks), and each
// block's 32 products summed exactly in integers:
//
//   y[m, n] = bias[n] + sum_b dw[n, b] * d[m, b] * sum_{k in b} (q[n, k] - 8) * xq[m, k]
//
// q is unsigned, so _mm256_maddubs_epi16 takes it as it is; the 8 * sum(xq) it adds too is subtracted per lane
// (computed once per activation block). 2 weight rows at a time, unpacked once and used for up to 4 activation
// rows. K must be a multiple of 32.

INLINE __m256i unpack_q4(const uint8_t* qs) {  // 16 bytes -> the block's 32 weights q (0..15) as bytes, in order
    __m128i b = _mm_loadu_si128((const __m128i*)qs), low = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), low), _mm_and_si128(b, low));
}

INLINE void block_q4(const uint8_t* Q, const uint16_t* S, const int8_t* xq, const __m256i* eight, const float* d,
                     const float* bias, float* y, int64_t N, int64_t K, int64_t n0, int64_t m0, int NR, int MR) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t nb = K / 32;
    __m256 acc[4][4];
    for (int r = 0; r < NR; r++)
        for (int i = 0; i < MR; i++) acc[r][i] = _mm256_setzero_ps();
    // the next weight rows, a cache line per block step (4 rows of K / 2 bytes are K / 128 lines = nb / 4 ... nb):
    // the hardware prefetcher alone streamed these at half the memory bandwidth
    const uint8_t* next = Q + (n0 + NR) * nb * 16;
    const uint8_t* end = Q + N * nb * 16;
    for (int64_t b = 0; b < nb; b++) {
        if (next + b * 64 < end) _mm_prefetch((const char*)(next + b * 64), _MM_HINT_T0);
        __m256i w[4];
        __m256 dw[4];
        for (int r = 0; r < NR; r++) {
            w[r] = unpack_q4(Q + ((n0 + r) * nb + b) * 16);
            dw[r] = _mm256_set1_ps(_cvtsh_ss(S[(n0 + r) * nb + b]));
        }
        for (int i = 0; i < MR; i++) {
            __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + (m0 + i) * K + b * 32));
            __m256i off = _mm256_loadu_si256(eight + (m0 + i) * nb + b);
            __m256 dx = _mm256_set1_ps(d[(m0 + i) * nb + b]);
            for (int r = 0; r < NR; r++) {
                __m256i p = _mm256_sub_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(w[r], xv), ones), off);
                acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(dw[r], dx), acc[r][i]);
            }
        }
    }
    for (int r = 0; r < NR; r++)
        for (int i = 0; i < MR; i++)
            y[(m0 + i) * N + n0 + r] = hsum(acc[r][i]) + (bias ? bias[n0 + r] : 0.0f);
}

#ifndef QMR
#define QMR 4
#endif

void qwen25_linear_q4_f32(const uint8_t* Q, const uint16_t* S, const float* x, const float* bias, float* y,
                          int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t nb = K / 32;
    int8_t* xq = (int8_t*)malloc(M * K);
    float* d = (float*)malloc(sizeof(float) * (M * nb + 1));
    __m256i* eight = (__m256i*)malloc(sizeof(__m256i) * (M * nb + 1));  // per block: 8 * xq summed per lane
    quantize_blocks(x, M, K, xq, d);
    for (int64_t j = 0; j < M * nb; j++) {
        __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + j * 32));
        _mm256_storeu_si256(eight + j, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(8), xv),
                                                         _mm256_set1_epi16(1)));
    }
    // one activation row (a single stream's decode step): 4 weight rows at a time, more independent sums;
    // more rows: 2 weight rows x QMR activation rows, each unpacked weight used QMR times
    const int NRB = M == 1 ? 4 : 2;
    int64_t blocks = (N + NRB - 1) / NRB;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t n0 = b * NRB;
        int nr = N - n0 < NRB ? (int)(N - n0) : NRB;
        if (M == 1) {
            if (nr == 4) block_q4(Q, S, xq, eight, d, bias, y, N, K, n0, 0, 4, 1);
            else block_q4(Q, S, xq, eight, d, bias, y, N, K, n0, 0, nr, 1);
            continue;
        }
        for (int64_t m0 = 0; m0 < M; m0 += QMR) {
            int mr = M - m0 < QMR ? (int)(M - m0) : QMR;
            if (nr == 2 && mr == QMR) block_q4(Q, S, xq, eight, d, bias, y, N, K, n0, m0, 2, QMR);
            else block_q4(Q, S, xq, eight, d, bias, y, N, K, n0, m0, nr, mr);
        }
    }
    free(eight);
    free(d);
    free(xq);
}

// The fp32 weight (N, K) of a 4-bit one, for prompts (many rows: a dense matmul on it beats the kernel above).
void qwen25_dequant_q4_f32(const uint8_t* Q, const uint16_t* S, float* W, int64_t N, int64_t K, int threads) {
    const int64_t nb = K / 32;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t j = 0; j < N * nb; j++) {
        __m256i q = unpack_q4(Q + j * 16);
        __m256 dw = _mm256_set1_ps(_cvtsh_ss(S[j])), eight = _mm256_set1_ps(8.0f);
        for (int h = 0; h < 4; h++) {  // 8 weights at a time: bytes -> int32 -> fp32, (q - 8) * dw
            __m128i part = h < 2 ? _mm256_castsi256_si128(q) : _mm256_extracti128_si256(q, 1);
            if (h & 1) part = _mm_srli_si128(part, 8);
            __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part));
            _mm256_storeu_ps(W + j * 32 + h * 8, _mm256_mul_ps(_mm256_sub_ps(v, eight), dw));
        }
    }
}

// ---- fp32 RMSNorm and RoPE (a decode step's elementwise work in one call each instead of torch's ~8 ops) --------
#define PARALLEL_MIN (1 << 15)  // elementwise kernels use threads from this many elements on

// y[m, :] = w * (x[m, :] * (1 / sqrt(mean(x[m, :]^2) + eps))), as RMSNorm.forward for fp32 (the sum of squares in
// another order than torch's: outputs within a few ulps)
void qwen25_rms_norm_f32(const float* x, const float* w, float* y, int64_t M, int64_t K, float eps, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (M * K >= PARALLEL_MIN)
    for (int64_t m = 0; m < M; m++) {
        const float* xm = x + m * K;
        __m256 acc = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) {
            __m256 v = _mm256_loadu_ps(xm + k);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float ss = hsum(acc);
        for (; k < K; k++) ss += xm[k] * xm[k];
        float r = 1.0f / sqrtf(ss / (float)K + eps);
        __m256 rv = _mm256_set1_ps(r);
        for (k = 0; k + 8 <= K; k += 8)
            _mm256_storeu_ps(y + m * K + k, _mm256_mul_ps(_mm256_loadu_ps(w + k),
                                                          _mm256_mul_ps(_mm256_loadu_ps(xm + k), rv)));
        for (; k < K; k++) y[m * K + k] = w[k] * (xm[k] * r);
    }
}

// Rotate-half RoPE in fp32: out[b, h, t, :] = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1), the same
// products and sums as model.rope.apply_rope. x[b, h, t, d] at x + b*sb + h*sh + t*st + d; cos/sin[b, t, d] at
// + b*cb + t*D + d (cb = 0: one table for all); out contiguous (B, H, T, D); D even.
void qwen25_rope_f32(const float* x, int64_t sb, int64_t sh, int64_t st, const float* cos, const float* sin,
                     int64_t cb, float* out, int64_t B, int64_t H, int64_t T, int64_t D, int threads) {
    const int64_t half = D / 2;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads) if (B * H * T * D >= PARALLEL_MIN)
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t t = 0; t < T; t++) {
                const float* xr = x + b * sb + h * sh + t * st;
                const float *c = cos + b * cb + t * D, *s = sin + b * cb + t * D;
                float* o = out + ((b * H + h) * T + t) * D;
                int64_t k = 0;
                for (; k + 8 <= half; k += 8) {
                    __m256 x1 = _mm256_loadu_ps(xr + k), x2 = _mm256_loadu_ps(xr + half + k);
                    _mm256_storeu_ps(o + k, _mm256_sub_ps(_mm256_mul_ps(x1, _mm256_loadu_ps(c + k)),
                                                          _mm256_mul_ps(x2, _mm256_loadu_ps(s + k))));
                    _mm256_storeu_ps(o + half + k, _mm256_add_ps(_mm256_mul_ps(x2, _mm256_loadu_ps(c + half + k)),
                                                                 _mm256_mul_ps(x1, _mm256_loadu_ps(s + half + k))));
                }
                for (; k < half; k++) {
                    o[k] = xr[k] * c[k] - xr[half + k] * s[k];
                    o[half + k] = xr[half + k] * c[half + k] + xr[k] * s[half + k];
                }
            }
}
