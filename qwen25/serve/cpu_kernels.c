// Matrix-vector products for decoding on x86 CPUs with AVX-512 (bf16 dot products where the CPU has them).
//
// Decoding a token multiplies a few activation rows by every weight matrix once, so it is bound by how fast the
// weights stream from memory. These kernels read each weight row once, keep four rows' partial sums in registers,
// prefetch the rows they will read next, and split the output rows between OpenMP threads (torch's own OpenMP
// runtime: it is already loaded under the same soname). Accumulation is in fp32; outputs are rounded to bf16
// once, after the bias, as torch's bf16 linear does.
//
//   y[m, n] = bias[n] + sum_k W[n, k] * x[m, k]                          (qwen25_linear_bf16)
//   y[m, n] = bias[n] + scale[n] * sum_k Q[n, k] * x[m, k]              (qwen25_linear_int8, Q int8)
//
// W, Q, x row-major and contiguous; bias and scale fp32 (bias may be NULL); x and y bf16 stored as uint16.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ROWS 4
#define INLINE static inline __attribute__((always_inline))
#define PARALLEL_MIN (1 << 15)  // elementwise kernels use threads from this many elements on
#define AHEAD 2  // prefetch this many row blocks ahead (1-8 measured within 7% of each other)

static inline uint16_t to_bf16(float f) {  // round to nearest even, as torch does
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline __m512 bf16x16_to_ps(const uint16_t* p, __mmask16 mask) {
    __m256i h = _mm256_maskz_loadu_epi16(mask, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __mmask16 tail16(int64_t left) {  // the first min(left, 16) lanes (none for left <= 0)
    return left >= 16 ? 0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
}

static inline __m512 round_to_bf16_ps(__m512 v) {  // fp32 lanes rounded to bf16 values (nearest even), NaN kept
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    r = _mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_castsi512_ps(r), v);
}

static inline void store_bf16x16(uint16_t* p, __m512 v, __mmask16 mask) {  // v must hold bf16 values already
    _mm256_mask_storeu_epi16(p, mask, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
}

static inline __m512 exp_ps(__m512 x) {  // e^x in fp32 (~1e-7 relative): 2^n * poly(r), r = x - n ln 2
    // below -87 the result is 0 (e^-87 is near the smallest normal float: no denormals, which cost microcode
    // assists on every later operation); NaN stays NaN (max and min return their second operand for a NaN)
    const __mmask16 under = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), x));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    const float c[8] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
    __m512 p = _mm512_set1_ps(c[0]);
    for (int i = 1; i < 8; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c[i]));
    return _mm512_maskz_mov_ps(~under, _mm512_scalef_ps(p, n));
}

// The first weight element of the block AHEAD blocks on (this block's own at the end): what to prefetch.
INLINE int64_t prefetch_start(int64_t n0, int64_t N, int64_t K) {
    return (n0 + AHEAD * ROWS < N ? n0 + AHEAD * ROWS : n0) * K;
}

// y[n0 + r] = (sum(acc[r]) - offset) (times scale[n0 + r] when scale is given) + bias[n0 + r], rounded to bf16 once.
INLINE void store_rows(const __m512* acc, int rows, float offset, const float* scale, const float* bias, int64_t n0,
                       uint16_t* y) {
    for (int r = 0; r < rows; r++) {
        float s = _mm512_reduce_add_ps(acc[r]) - offset;
        if (scale) s *= scale[n0 + r];
        y[n0 + r] = to_bf16(s + (bias ? bias[n0 + r] : 0.0f));
    }
}

// One block of up to ROWS weight rows [n0, n0+rows) against every activation row.
INLINE void block_bf16(const uint16_t* W, const uint16_t* x, const float* bias, uint16_t* y,
                       int64_t M, int64_t N, int64_t K, int64_t n0, int rows) {
    const int64_t next = prefetch_start(n0, N, K);
    for (int64_t m = 0; m < M; m++) {
        const uint16_t* xm = x + m * K;
        __m512 acc[ROWS];
        for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 32) {
            __mmask32 mask = K - k >= 32 ? 0xffffffffu : (__mmask32)((1ull << (K - k)) - 1);
            if (m == 0)
                for (int r = 0; r < rows; r++) _mm_prefetch((const char*)(W + next + r * K + k), _MM_HINT_T0);
#ifdef __AVX512BF16__
            __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, xm + k);
            for (int r = 0; r < rows; r++)
                acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_maskz_loadu_epi16(mask, W + (n0 + r) * K + k), xv);
#else
            __m512 x0 = bf16x16_to_ps(xm + k, (__mmask16)mask);
            __m512 x1 = bf16x16_to_ps(xm + k + 16, (__mmask16)(mask >> 16));
            for (int r = 0; r < rows; r++) {
                const uint16_t* w = W + (n0 + r) * K + k;
                acc[r] = _mm512_fmadd_ps(bf16x16_to_ps(w, (__mmask16)mask), x0, acc[r]);
                acc[r] = _mm512_fmadd_ps(bf16x16_to_ps(w + 16, (__mmask16)(mask >> 16)), x1, acc[r]);
            }
#endif
        }
        store_rows(acc, rows, 0.0f, NULL, bias, n0, y + m * N);
    }
}

// ---- bf16 with AMX tiles (Sapphire Rapids and later): up to 16 activation rows at memory speed ---------------
//
// The vector kernel above does one vdpbf16ps (32 products) per weight vector and activation row, so from ~4 rows
// on it is bound by arithmetic; AMX's tdpbf16ps does 16 x 16 x 32 products per instruction. The product is taken
// transposed, y^T = W x^T: the A tiles are 16 weight rows x 32 features read straight from W (no repacking), the
// B tile holds the activations as feature pairs (16 pairs x M rows), and each C tile is 16 outputs x M rows in
// fp32. Every (m, n) sum runs over k in the same order whatever M is, so among batches of 3-16 rows a row's
// result does not depend on the rows batched with it. Used for 3 <= M <= 16 and K % 32 == 0 (one or two rows
// decode ~7% faster with the vector kernel); weight rows past the last multiple of 32 take the vector kernel.
// Linux asks each process to request the tile state (arch_prctl) before its first tile instruction.

#define AMX_ROWS 32  // weight rows per block: two A and two C tiles share one B tile

int qwen25_amx(void) {  // whether the AMX path is used: compiled in, and the OS grants the tile state
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    static int amx_ready = -1;  // -1: not asked yet, 0: refused, 1: granted
    if (amx_ready < 0) amx_ready = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return amx_ready;
#else
    return 0;
#endif
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed, aligned(64))) tile_config;

// y[m, n0 + i] = c[i][m] (+ bias), rounded to bf16, from a stored C tile of 16 outputs x M rows.
static inline void store_tile(const float* c, const float* bias, uint16_t* y, int64_t M, int64_t N, int64_t n0) {
    for (int i = 0; i < 16; i++)
        for (int64_t m = 0; m < M; m++) y[m * N + n0 + i] = to_bf16(c[i * M + m] + (bias ? bias[n0 + i] : 0.0f));
}

static void linear_bf16_amx(const uint16_t* W, const uint16_t* x, const float* bias, uint16_t* y,
                            int64_t M, int64_t N, int64_t K, int threads) {
    uint16_t* xp = (uint16_t*)malloc(sizeof(uint16_t) * K * M);  // xp[k/2][m][k%2] = x[m][k]
    for (int64_t k = 0; k < K; k++)
        for (int64_t m = 0; m < M; m++) xp[((k / 2) * M + m) * 2 + k % 2] = x[m * K + k];
    const int64_t blocks = N / AMX_ROWS;
#pragma omp parallel num_threads(threads)
    {
        tile_config cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette = 1;
        for (int t = 0; t < 2; t++) {
            cfg.rows[t] = 16, cfg.colsb[t] = (uint16_t)(M * 4);  // tiles 0, 1: C, 16 outputs x M fp32
            cfg.rows[2 + t] = 16, cfg.colsb[2 + t] = 64;         // tiles 2, 3: A, 16 weight rows x 32 bf16
        }
        cfg.rows[4] = 16, cfg.colsb[4] = (uint16_t)(M * 4);     // tile 4: B, 16 feature pairs x M rows
        _tile_loadconfig(&cfg);
        float c[16 * 16];
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t n0 = b * AMX_ROWS;
            _tile_zero(0);
            _tile_zero(1);
            for (int64_t k = 0; k < K; k += 32) {
                _tile_loadd(4, xp + k * M, M * 4);
                _tile_loadd(2, W + n0 * K + k, K * 2);
                _tile_loadd(3, W + (n0 + 16) * K + k, K * 2);
                _tile_dpbf16ps(0, 2, 4);
                _tile_dpbf16ps(1, 3, 4);
            }
            _tile_stored(0, c, M * 4);  // tile numbers must be constants: one store per tile
            store_tile(c, bias, y, M, N, n0);
            _tile_stored(1, c, M * 4);
            store_tile(c, bias, y, M, N, n0 + 16);
        }
        _tile_release();
    }
    free(xp);
}
#endif

void qwen25_linear_bf16(const uint16_t* W, const uint16_t* x, const float* bias, uint16_t* y,
                        int64_t M, int64_t N, int64_t K, int threads) {
    int64_t first = 0;  // weight rows before this one are done
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (M >= 3 && M <= 16 && K % 32 == 0 && N >= AMX_ROWS && qwen25_amx() == 1) {
        linear_bf16_amx(W, x, bias, y, M, N, K, threads);
        first = N / AMX_ROWS * AMX_ROWS;
    }
#endif
    int64_t blocks = (N - first + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static) num_threads(threads) if (blocks > 0)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t n0 = first + b * ROWS;
        if (N - n0 >= ROWS)  // a constant row count keeps the accumulators in registers
            block_bf16(W, x, bias, y, M, N, K, n0, ROWS);
        else
            block_bf16(W, x, bias, y, M, N, K, n0, (int)(N - n0));
    }
}

INLINE void block_int8(const int8_t* Q, const float* xf, const float* scale, const float* bias, uint16_t* y,
                       int64_t M, int64_t N, int64_t K, int64_t n0, int rows) {
    const int64_t next = prefetch_start(n0, N, K);
    for (int64_t m = 0; m < M; m++) {
        const float* xm = xf + m * K;
        __m512 acc[ROWS];
        for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
            __mmask16 mask = tail16(K - k);
            if (m == 0 && (k & 63) == 0)
                for (int r = 0; r < rows; r++) _mm_prefetch((const char*)(Q + next + r * K + k), _MM_HINT_T0);
            __m512 xv = _mm512_maskz_loadu_ps(mask, xm + k);
            for (int r = 0; r < rows; r++) {
                __m128i q = _mm_maskz_loadu_epi8(mask, Q + (n0 + r) * K + k);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), xv, acc[r]);
            }
        }
        store_rows(acc, rows, 0.0f, scale, bias, n0, y + m * N);
    }
}

void qwen25_linear_int8(const int8_t* Q, const float* scale, const uint16_t* x, const float* bias, uint16_t* y,
                        int64_t M, int64_t N, int64_t K, int threads) {
    float* xf = (float*)malloc(sizeof(float) * M * K);
    for (int64_t i = 0; i < M * K; i++) {
        uint32_t u = (uint32_t)x[i] << 16;
        memcpy(xf + i, &u, 4);
    }
    int64_t blocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t n0 = b * ROWS;
        if (N - n0 >= ROWS)
            block_int8(Q, xf, scale, bias, y, M, N, K, n0, ROWS);
        else
            block_int8(Q, xf, scale, bias, y, M, N, K, n0, (int)(N - n0));
    }
    free(xf);
}

// ---- int8 weights x int8 activations (llama.cpp's Q8_0 scheme for the activations) ----------------------------
//
// Each activation row is quantized per block of 32: d_b = max|x| / 127 over the block, xq = round(x / d_b) (int8,
// computed as x * (1 / d_b) in fp32, ties to even). The weights are stored with an offset, Wu = Q + 128 (uint8),
// so that one vpdpbusd (uint8 x int8, 64 products per instruction) does the multiply-adds:
//
//   y[m, n] = bias[n] + scale[n] * (sum_b d_b * sum_{k in b} Wu[n, k] * xq[m, k]  -  c[m]),
//   c[m]    = 128 * sum_b d_b * sum_{k in b} xq[m, k]                            (the offset's share, per row)
//
// Activation rows are padded with zero blocks to a multiple of 64 (Kp); dq holds each 64-wide step's two block
// scales as 16 lanes (8 per block), lined up with vpdpbusd's 16 int32 sums of 4 products each.

static void quantize_q8(const uint16_t* x, int64_t M, int64_t K, int64_t Kp, int8_t* xq, float* dq, float* c) {
    for (int64_t m = 0; m < M; m++) {
        double corr = 0.0;
        for (int64_t k = 0; k < Kp; k += 32) {
            __m512 a = bf16x16_to_ps(x + m * K + k, tail16(K - k));
            __m512 b = bf16x16_to_ps(x + m * K + k + 16, tail16(K - k - 16));
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
            // x * 0 is NaN exactly where x is NaN or infinite: such a block makes d (and the row's outputs) NaN,
            // as the unquantized product would be, instead of a finite result
            __m512 zero = _mm512_setzero_ps();
            float nonfinite = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_mul_ps(a, zero), _mm512_mul_ps(b, zero)));
            float d = nonfinite == 0.0f ? amax / 127.0f : nonfinite, inv = d > 0.0f ? 1.0f / d : 0.0f;
            __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(inv)));  // rounds to nearest even
            __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(inv)));
            _mm_storeu_si128((__m128i*)(xq + m * Kp + k), _mm512_cvtsepi32_epi8(qa));
            _mm_storeu_si128((__m128i*)(xq + m * Kp + k + 16), _mm512_cvtsepi32_epi8(qb));
            corr += (double)d * _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
            float* lanes = dq + m * (Kp / 4) + (k / 64) * 16 + ((k / 32) & 1) * 8;
            for (int i = 0; i < 8; i++) lanes[i] = d;
        }
        c[m] = (float)(128.0 * corr);
    }
}

INLINE void block_q8(const uint8_t* Wu, const int8_t* xq, const float* dq, const float* c, const float* scale,
                     const float* bias, uint16_t* y, int64_t M, int64_t N, int64_t K, int64_t Kp, int64_t n0,
                     int rows) {
    const int64_t next = prefetch_start(n0, N, K);
    for (int64_t m = 0; m < M; m++) {
        const int8_t* xm = xq + m * Kp;
        const float* dm = dq + m * (Kp / 4);
        __m512 acc[ROWS];
        for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 64) {
            __mmask64 mask = K - k >= 64 ? ~0ull : (1ull << (K - k)) - 1;
            if (m == 0)
                for (int r = 0; r < rows; r++) _mm_prefetch((const char*)(Wu + next + r * K + k), _MM_HINT_T0);
            __m512i xv = _mm512_loadu_si512(xm + k);
            __m512 dv = _mm512_loadu_ps(dm + k / 4);
            for (int r = 0; r < rows; r++) {
                __m512i w = _mm512_maskz_loadu_epi8(mask, Wu + (n0 + r) * K + k);
#ifdef __AVX512VNNI__
                __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xv);
#else  // the same sums with AVX512BW: widen to int16, multiply-add pairs, add neighbouring pairs
                __m512i lo = _mm512_madd_epi16(_mm512_cvtepu8_epi16(_mm512_castsi512_si256(w)),
                                               _mm512_cvtepi8_epi16(_mm512_castsi512_si256(xv)));
                __m512i hi = _mm512_madd_epi16(_mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(w, 1)),
                                               _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(xv, 1)));
                // lanes 0-7 of p must hold products 0-31 (block 0) and lanes 8-15 products 32-63 (block 1)
                __m512i p = _mm512_add_epi32(_mm512_permutex2var_epi32(lo, _mm512_set_epi32(30, 28, 26, 24, 22, 20,
                    18, 16, 14, 12, 10, 8, 6, 4, 2, 0), hi), _mm512_permutex2var_epi32(lo, _mm512_set_epi32(31, 29,
                    27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1), hi));
#endif
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), dv, acc[r]);
            }
        }
        store_rows(acc, rows, c[m], scale, bias, n0, y + m * N);
    }
}

void qwen25_linear_q8(const uint8_t* Wu, const float* scale, const uint16_t* x, const float* bias, uint16_t* y,
                      int64_t M, int64_t N, int64_t K, int threads) {
    int64_t Kp = (K + 63) / 64 * 64;
    int8_t* xq = (int8_t*)malloc(M * Kp);
    float* dq = (float*)malloc(sizeof(float) * (M * Kp / 4 + M));
    float* c = dq + M * Kp / 4;
    quantize_q8(x, M, K, Kp, xq, dq, c);
    int64_t blocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t n0 = b * ROWS;
        if (N - n0 >= ROWS)
            block_q8(Wu, xq, dq, c, scale, bias, y, M, N, K, Kp, n0, ROWS);
        else
            block_q8(Wu, xq, dq, c, scale, bias, y, M, N, K, Kp, n0, (int)(N - n0));
    }
    free(dq);
    free(xq);
}

// ---- A mixture-of-experts block's experts in one call (AMX) ----------------------------------------------------
//
// For the (token, expert) assignments grouped by expert, with routing weights w:
//
//   h[a, :]   = bf16(silu(x[t_a] Wg_e^T) * (x[t_a] Wu_e^T))          (fp32 inside, rounded to bf16 once)
//   out[t_a] += w[a] * (h[a, :] Wd_e^T)                               (fp32, experts in ascending order)
//
// The weights are packed once into AMX's B-tile layout, P[n / 16][k / 2][n % 16][k % 2] = W[n][k], so that a
// tile of 16 outputs x 32 inputs is one contiguous kilobyte; the tokens' rows are the A tiles, and the products
// come out as 16 tokens x 16 outputs with the tokens in rows, ready for the SwiGLU and for the weighted sum.
// Phase 1 hands out units of (rows of one expert, group of feature blocks) to threads; phase 2 splits the output
// columns, so each element of out has one writer and its sum runs in the same order whatever the thread count and
// whatever other tokens share the call (batch invariance). wgu holds Wg's blocks then Wu's.

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define MOE_ROWS 32   // assignments per pass: two A tiles share each B tile
#define MOE_GROUP_BYTES (512 << 10)  // weight tiles a unit keeps in cache while it goes through rows

typedef struct {
    int64_t expert, start, end, jb0, jb1;  // assignments [start, end) of one expert, feature blocks [jb0, jb1)
} moe_unit;

static void tile_config_16x64(void) {  // every tile 16 rows of 64 bytes
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    _tile_loadconfig(&cfg);
}

// What is left to do with a finished pass's C tiles (stored in c): the SwiGLU of phase 1 into hb (rows of
// intermediate features [16 jb, 16 jb + 16)), or phase 2's weighted sum into out (columns [32 op, 32 op + 32)).
// The next pass does it a slice of rows per k step, so the vector units work while the tile unit multiplies.
typedef struct {
    int kind, rows;  // kind: 0 nothing, 1 SwiGLU, 2 weighted sum; rows: how many rows of c to take
    int add;         // the weighted sum: added to out, or written
    float (*c)[16][16];
    uint16_t* hb;
    int64_t I, jb;
    const int64_t* token;
    const float* w;
    float* out;
    int64_t H, op;
} moe_pending;

INLINE void moe_finish(const moe_pending* p, int r0, int r1) {
    if (p->kind == 1)
        for (int r = r0; r < r1; r++) {  // h = silu(gate) * up, rounded to bf16 once
            __m512 g = _mm512_loadu_ps(p->c[r / 16][r % 16]), u = _mm512_loadu_ps(p->c[2 + r / 16][r % 16]);
            __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g));
            __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
            store_bf16x16(p->hb + r * p->I + p->jb * 16, round_to_bf16_ps(_mm512_mul_ps(silu, u)), 0xffff);
        }
    else if (p->kind == 2)
        for (int r = r0; r < r1; r++) {  // out[token[r], 32 op ..] += w[r] * y[r]
            float* o = p->out + p->token[r] * p->H + p->op * 32;
            __m512 wr = _mm512_set1_ps(p->w[r]);
            __m512 y0 = _mm512_mul_ps(wr, _mm512_loadu_ps(p->c[r / 16][r % 16]));
            __m512 y1 = _mm512_mul_ps(wr, _mm512_loadu_ps(p->c[2 + r / 16][r % 16]));
            _mm512_storeu_ps(o, p->add ? _mm512_add_ps(_mm512_loadu_ps(o), y0) : y0);
            _mm512_storeu_ps(o + 16, p->add ? _mm512_add_ps(_mm512_loadu_ps(o + 16), y1) : y1);
        }
}

// c[t][r][i] = sum_k a[r][k] * B_t[k][i] for a block's rows r < 16 (and 16-31 when two), K inputs: a is
// row-major with K columns, b0 and b1 two packed 16-output tile columns (c[0], c[2]: rows 0-15, c[1], c[3]:
// rows 16-31); meanwhile finishes the pending pass, which is then empty.
INLINE void moe_tiles(const uint16_t* a, const uint16_t* b0, const uint16_t* b1, int64_t K, int two,
                      float c[4][16][16], moe_pending* pending) {
    _tile_zero(0);
    _tile_zero(2);
    if (two) {
        _tile_zero(1);
        _tile_zero(3);
    }
    const int64_t steps = K / 32;
    int done = 0;
    for (int64_t s = 0; s < steps; s++) {
        const int64_t k = s * 32;
        _tile_loadd(4, a + k, K * 2);
        _tile_loadd(6, b0 + k * 16, 64);
        _tile_loadd(7, b1 + k * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 4, 7);
        if (two) {
            _tile_loadd(5, a + 16 * K + k, K * 2);
            _tile_dpbf16ps(1, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
        int upto = (int)(pending->rows * (s + 1) / steps);
        moe_finish(pending, done, upto);
        done = upto;
    }
    pending->kind = 0;
    _tile_stored(0, c[0], 64);
    _tile_stored(2, c[2], 64);
    if (two) {
        _tile_stored(1, c[1], 64);
        _tile_stored(3, c[3], 64);
    }
}
#endif

// x (T x H) bf16; wgu (E, 2I/16, H/2, 16, 2) and wd (E, H/16, I/2, 16, 2) packed bf16; token (A) the assignments'
// token rows grouped by expert, offsets (E + 1) where each expert's start, w (A) fp32; out (T x H) fp32: added to
// when add, else written (then every token must have exactly one assignment). y (T x H) bf16 or NULL: when given,
// out rounded to bf16 once everything is added. Needs H % 32 == 0 and I % 32 == 0; returns 0, or -1 where AMX is
// unavailable (nothing done).
int qwen25_moe_bf16(const uint16_t* x, const uint16_t* wgu, const uint16_t* wd, const int64_t* token,
                    const int64_t* offsets, const float* w, float* out, int add, uint16_t* y, int64_t T, int64_t H,
                    int64_t I, int64_t E, int threads) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (qwen25_amx() != 1) return -1;
    const int64_t A = offsets[E];
    uint16_t* h = (uint16_t*)malloc(sizeof(uint16_t) * (A + MOE_ROWS) * I);  // the SwiGLU outputs, per assignment
    // phase 1's units: feature blocks grouped by the bytes of their weights; an expert's rows split when there
    // would be too few units to keep every thread busy (the shared expert is one expert)
    const int64_t blocks = I / 16, per = MOE_GROUP_BYTES / (64 * H) > 1 ? MOE_GROUP_BYTES / (64 * H) : 1;
    const int64_t groups = (blocks + per - 1) / per, wanted = 8 * (int64_t)threads;
    int64_t span = A + MOE_ROWS;  // rows per unit
    if (E * groups < wanted) span = ((A * groups + wanted - 1) / wanted + MOE_ROWS - 1) / MOE_ROWS * MOE_ROWS;
    int64_t nunits = 0;
    for (int64_t e = 0; e < E; e++) nunits += (offsets[e + 1] - offsets[e] + span - 1) / span * groups;
    moe_unit* units = (moe_unit*)malloc(sizeof(moe_unit) * (nunits + 1));
    // The rows of x each pass multiplies: gathered by the pass itself into a small buffer when one unit covers all
    // features (each row is then gathered once), else gathered once for all units into xg, in assignment order
    // (each expert's rows contiguous) with MOE_ROWS zero rows after the last, which a partial pass reads.
    const int local = groups == 1;
    uint16_t* xg = local ? NULL : (uint16_t*)malloc(sizeof(uint16_t) * (A + MOE_ROWS) * H);
    nunits = 0;
    for (int64_t e = 0; e < E; e++)
        for (int64_t g = 0; g < groups; g++)
            for (int64_t r = offsets[e]; r < offsets[e + 1]; r += span)
                units[nunits++] = (moe_unit){e, r, r + span < offsets[e + 1] ? r + span : offsets[e + 1], g * per,
                                             (g + 1) * per < blocks ? (g + 1) * per : blocks};
#pragma omp parallel num_threads(threads)
    {
        uint16_t* xl = local ? (uint16_t*)aligned_alloc(64, sizeof(uint16_t) * MOE_ROWS * H) : NULL;
        if (!local)
#pragma omp for schedule(static)
            for (int64_t a = 0; a < A + MOE_ROWS; a++) {
                if (a < A) memcpy(xg + a * H, x + token[a] * H, sizeof(uint16_t) * H);
                else memset(xg + a * H, 0, sizeof(uint16_t) * H);
            }
        tile_config_16x64();
        float c[2][4][16][16];  // the pass being multiplied and the one being finished
        int cur = 0;
        moe_pending pending = {.kind = 0, .I = I, .H = H, .out = out, .add = add};
        // Phase 1: h = silu(x Wg^T) * (x Wu^T), in units of (rows of one expert, group of 16-feature blocks).
        // A group's weight tiles (~MOE_GROUP_BYTES) stay in cache across the unit's rows, so the weights are read
        // once per call; a pass's rows stay in cache across the group's blocks. Units go to whichever thread is
        // free (experts get different numbers of rows).
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t u = 0; u < nunits; u++) {
            const moe_unit* unit = units + u;
            const uint16_t* wg = wgu + unit->expert * 2 * I * H;
            for (int64_t r0 = unit->start; r0 < unit->end; r0 += MOE_ROWS) {
                // a last pass of fewer rows reads the next expert's (or zero) rows; only its own results are kept
                const int64_t rows = unit->end - r0 < MOE_ROWS ? unit->end - r0 : MOE_ROWS;
                const uint16_t* a = xg + r0 * H;
                if (local) {
                    for (int64_t r = 0; r < MOE_ROWS; r++) {
                        if (r < rows) memcpy(xl + r * H, x + token[r0 + r] * H, sizeof(uint16_t) * H);
                        else memset(xl + r * H, 0, sizeof(uint16_t) * H);
                    }
                    a = xl;
                }
                for (int64_t jb = unit->jb0; jb < unit->jb1; jb++) {
                    if (rows > 16)
                        moe_tiles(a, wg + jb * 16 * H, wg + I * H + jb * 16 * H, H, 1, c[cur], &pending);
                    else
                        moe_tiles(a, wg + jb * 16 * H, wg + I * H + jb * 16 * H, H, 0, c[cur], &pending);
                    pending.kind = 1, pending.rows = (int)rows, pending.c = c[cur];
                    pending.hb = h + r0 * I, pending.jb = jb;
                    cur ^= 1;
                }
            }
        }
        moe_finish(&pending, 0, pending.rows);
        pending.kind = 0;
#pragma omp barrier
        // Phase 2: this thread's output columns (each element of out has one writer), expert by expert, in groups
        // of column pairs whose down-projection tiles (2 x 16 x I each, ~MOE_GROUP_BYTES in all) stay in cache
        // across the expert's rows, while a pass's rows of h stay in cache across the group's columns.
        const int nt = omp_get_num_threads(), id = omp_get_thread_num();
        const int64_t pairs = H / 32, op0 = pairs * id / nt, op1 = pairs * (id + 1) / nt;
        const int64_t group = MOE_GROUP_BYTES / (64 * I) > 1 ? MOE_GROUP_BYTES / (64 * I) : 1;
        for (int64_t e = 0; e < E; e++) {
            const uint16_t* wde = wd + e * H * I;
            for (int64_t g0 = op0; g0 < op1; g0 += group)
                for (int64_t r0 = offsets[e]; r0 < offsets[e + 1]; r0 += MOE_ROWS) {
                    const int64_t rows = offsets[e + 1] - r0 < MOE_ROWS ? offsets[e + 1] - r0 : MOE_ROWS;
                    for (int64_t op = g0; op < g0 + group && op < op1; op++) {
                        const uint16_t *b0 = wde + 2 * op * 16 * I, *b1 = b0 + 16 * I;
                        if (rows > 16)
                            moe_tiles(h + r0 * I, b0, b1, I, 1, c[cur], &pending);
                        else
                            moe_tiles(h + r0 * I, b0, b1, I, 0, c[cur], &pending);
                        pending.kind = 2, pending.rows = (int)rows, pending.c = c[cur];
                        pending.token = token + r0, pending.w = w + r0, pending.op = op;
                        cur ^= 1;
                    }
                }
        }
        moe_finish(&pending, 0, pending.rows);
        if (y)  // this thread's columns are complete
            for (int64_t t = 0; t < T; t++)
                for (int64_t k = op0 * 32; k < op1 * 32; k += 16)
                    store_bf16x16(y + t * H + k, round_to_bf16_ps(_mm512_loadu_ps(out + t * H + k)), 0xffff);
        free(xl);
        _tile_release();
    }
    free(units);
    free(h);
    free(xg);
    return 0;
#else
    (void)x, (void)wgu, (void)wd, (void)token, (void)offsets, (void)w, (void)out, (void)add, (void)y, (void)T;
    (void)H, (void)I, (void)E, (void)threads;
    return -1;
#endif
}

// Routing for qwen25_moe_bf16: each token's top_k experts by router logit (the order of the softmax; ties to the
// lower expert id), weight p_e = softmax(logits)_e in fp32 (renormalised over the k when norm), and the
// assignments grouped by expert with tokens ascending (a counting sort): token (T*k), w (T*k), offsets (E + 1).
// logits (T x E) fp32; E <= 1024 and top_k <= E.
void qwen25_moe_route(const float* logits, int64_t T, int64_t E, int64_t top_k, int norm, int64_t* token, float* w,
                      int64_t* offsets, int threads) {
    int64_t* chosen = (int64_t*)malloc(sizeof(int64_t) * T * top_k);
    float* weight = (float*)malloc(sizeof(float) * T * top_k);
#pragma omp parallel for schedule(static) num_threads(threads) if (T * E >= PARALLEL_MIN / 4)
    for (int64_t t = 0; t < T; t++) {
        const float* l = logits + t * E;
        int64_t* c = chosen + t * top_k;
        float p[E], top = l[0], picked = 0.0f;
        __mmask16 open[(E + 15) / 16];  // the experts not chosen yet, 16 per mask
        for (int64_t e = 1; e < E; e++) top = l[e] > top ? l[e] : top;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t e = 0; e < E; e += 16) {
            __mmask16 m = open[e / 16] = tail16(E - e);
            __m512 v = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, l + e), _mm512_set1_ps(top)));
            _mm512_mask_storeu_ps(p + e, m, v);
            acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(m, v));
        }
        const float sum = _mm512_reduce_add_ps(acc);
        for (int64_t j = 0; j < top_k; j++) {  // the j-th largest logit, the lowest id among equals
            float most = -INFINITY;
            for (int64_t e = 0; e < E; e += 16) {
                __mmask16 m = open[e / 16];
                most = fmaxf(most, _mm512_mask_reduce_max_ps(m, _mm512_maskz_loadu_ps(m, l + e)));
            }
            int64_t best = -1;
            for (int64_t e = 0; e < E && best < 0; e += 16) {
                __mmask16 hit = _mm512_mask_cmp_ps_mask(open[e / 16], _mm512_maskz_loadu_ps(open[e / 16], l + e),
                                                        _mm512_set1_ps(most), _CMP_EQ_OQ);
                if (hit) best = e + __builtin_ctz(hit);
            }
            for (int64_t e = 0; e < E && best < 0; e += 16)  // only NaNs left: the first of them
                if (open[e / 16]) best = e + __builtin_ctz(open[e / 16]);
            c[j] = best, open[best / 16] &= (__mmask16)~(1u << (best % 16));
            picked += (weight[t * top_k + j] = p[best] / sum);
        }
        if (norm)
            for (int64_t j = 0; j < top_k; j++) weight[t * top_k + j] /= picked;
    }
    for (int64_t e = 0; e <= E; e++) offsets[e] = 0;
    for (int64_t a = 0; a < T * top_k; a++) offsets[chosen[a] + 1]++;
    for (int64_t e = 0; e < E; e++) offsets[e + 1] += offsets[e];
    int64_t* next = (int64_t*)malloc(sizeof(int64_t) * E);
    memcpy(next, offsets, sizeof(int64_t) * E);
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < top_k; j++) {
            int64_t a = next[chosen[t * top_k + j]]++;
            token[a] = t, w[a] = weight[t * top_k + j];
        }
    free(next);
    free(weight);
    free(chosen);
}

// ---- RMSNorm and RoPE, as the model computes them -------------------------------------------------------------
//
// One call each instead of the ~9 small torch ops (casts, pow, mean, rsqrt, multiplies, cat) a decode step pays
// per norm and per rotation, and one pass over the data instead of ~9 for a prompt's rows (split between threads
// from PARALLEL_MIN elements on). Built with -ffp-contract=off, so a * b + c rounds twice, as torch's ops do.

//   y[m, :] = bf16(w * bf16(x[m, :] / sqrt(mean(x[m, :]^2) + eps)))      (fp32 inside; x, w, y bf16)
void qwen25_rms_norm_bf16(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t M, int64_t K, float eps,
                          int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (M * K >= PARALLEL_MIN)
    for (int64_t m = 0; m < M; m++) {
        const uint16_t* xm = x + m * K;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
            __m512 v = bf16x16_to_ps(xm + k, tail16(K - k));
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        float ms = _mm512_reduce_add_ps(acc) / (float)K + eps;
        __m512 r = _mm512_set1_ps(1.0f / _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(ms))));  // sqrt rounded once, as torch
        for (int64_t k = 0; k < K; k += 16) {
            __mmask16 mask = tail16(K - k);
            __m512 n = round_to_bf16_ps(_mm512_mul_ps(bf16x16_to_ps(xm + k, mask), r));
            store_bf16x16(y + m * K + k, round_to_bf16_ps(_mm512_mul_ps(n, bf16x16_to_ps(w + k, mask))), mask);
        }
    }
}

// Rotate-half RoPE: out[b, h, t, :] = bf16(x * cos + rotate_half(x) * sin), rotate_half(x) = (-x2, x1), in fp32.
// x[b, h, t, d] at x + b*sb + h*sh + t*st + d; cos/sin[b, t, d] at + b*cb + t*D + d (cb = 0: one table for all);
// out contiguous (B, H, T, D).
void qwen25_rope_bf16(const uint16_t* x, int64_t sb, int64_t sh, int64_t st, const float* cos, const float* sin,
                      int64_t cb, uint16_t* out, int64_t B, int64_t H, int64_t T, int64_t D, int threads) {
    const int64_t half = D / 2;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads) if (B * H * T * D >= PARALLEL_MIN)
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t t = 0; t < T; t++) {
                const uint16_t* xr = x + b * sb + h * sh + t * st;
                const float *c = cos + b * cb + t * D, *s = sin + b * cb + t * D;
                uint16_t* o = out + ((b * H + h) * T + t) * D;
                for (int64_t k = 0; k < half; k += 16) {
                    __mmask16 mask = tail16(half - k);
                    __m512 x1 = bf16x16_to_ps(xr + k, mask), x2 = bf16x16_to_ps(xr + half + k, mask);
                    __m512 lo = _mm512_sub_ps(_mm512_mul_ps(x1, _mm512_maskz_loadu_ps(mask, c + k)),
                                              _mm512_mul_ps(x2, _mm512_maskz_loadu_ps(mask, s + k)));
                    __m512 hi = _mm512_add_ps(_mm512_mul_ps(x2, _mm512_maskz_loadu_ps(mask, c + half + k)),
                                              _mm512_mul_ps(x1, _mm512_maskz_loadu_ps(mask, s + half + k)));
                    store_bf16x16(o + k, round_to_bf16_ps(lo), mask);
                    store_bf16x16(o + half + k, round_to_bf16_ps(hi), mask);
                }
            }
}
