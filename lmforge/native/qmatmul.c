/* lmforge's native kernels: matrix products straight from GGUF quantized blocks.
 *
 * A weight row is a run of the file's own blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K,
 * Q6_K), never re-rounded, and activations stay float32: each group of 32 weights is expanded
 * in registers to the floats the file defines and multiplied with the activations, so the
 * result is the dequantized model's (gguf's reference dequantizer) up to float32 summation
 * order. llama.cpp instead rounds activations to 8 bits per 32 values for integer dots; on the
 * default model that changed 55 % of greedy replies against the file's own numbers
 * (benchmarks/results/default_fidelity.json), at no speed gain here, since decoding is bound
 * by reading the weights. Every type is reduced to the same group form:
 *
 *     w_i = c[i / 16] * v_i + mn        (v_i a small integer, i in 0..31)
 *
 * One `group_*` path per type gives (v, c, mn); the dot and the threading are shared. The
 * pure-PyTorch twin is gguf's dequantizer plus F.linear (`lmforge/native/linear.py`); tests
 * hold the two together.
 *
 * Built by lmforge/native/__init__.py with the machine's own flags (-march=native); the
 * OpenMP runtime is the one PyTorch already loaded, so both share one thread pool.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

/* activation rows that share each unpacked weight group (a decode batch, a prompt): one
 * accumulator register each, so as many as the registers allow (AVX-512: 32 zmm, AVX2: 16 ymm;
 * measured at 32 rows on 2 cores: 4 -> 16 rows is 1.6x faster) */
#ifdef __AVX512F__
#define NX 16
#else
#define NX 8
#endif

static inline float f16(const uint8_t *p) {
    uint16_t h = (uint16_t)(p[0] | (p[1] << 8));
#ifdef __F16C__
    return _cvtsh_ss(h);
#endif
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, bits;
    if (e == 0) {
        if (m == 0) { bits = sign; }
        else { /* subnormal: renormalize */
            e = 127 - 15 + 1;
            while (!(m & 0x400)) { m <<= 1; e--; }
            bits = sign | (e << 23) | ((m & 0x3ff) << 13);
        }
    } else if (e == 31) bits = sign | 0x7f800000 | (m << 13);
    else bits = sign | ((e + 127 - 15) << 23) | (m << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* bytes of one block and values per block, by type */
static int block_bytes(int t) {
    switch (t) {
    case Q4_0: return 18; case Q4_1: return 20; case Q5_0: return 22; case Q5_1: return 24;
    case Q8_0: return 34; case Q4_K: return 144; case Q5_K: return 176; case Q6_K: return 210;
    }
    return 0;
}
static int block_values(int t) { return (t == Q4_K || t == Q5_K || t == Q6_K) ? 256 : 32; }

/* the 6-bit scale and min of sub-block j of a Q4_K/Q5_K super-block */
static void scale_min_k4(int j, const uint8_t *s, int *sc, int *m) {
    if (j < 4) { *sc = s[j] & 63; *m = s[j + 4] & 63; }
    else { *sc = (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4); *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4); }
}

/* group g (32 values) of a row: v[32], c[2], *mn. Scalar; the SIMD path mirrors it. */
static void group_scalar(int t, const uint8_t *row, int64_t g, int8_t *v, float *c, float *mn) {
    int bv = block_values(t);
    const uint8_t *b = row + (g * 32 / bv) * block_bytes(t);
    int sub = (int)(g % (bv / 32));
    *mn = 0.f;
    c[0] = c[1] = 0.f;
    switch (t) {
    case Q4_0: case Q4_1: {
        const uint8_t *qs = b + (t == Q4_1 ? 4 : 2);
        for (int i = 0; i < 16; i++) { v[i] = qs[i] & 15; v[i + 16] = qs[i] >> 4; }
        c[0] = c[1] = f16(b);
        if (t == Q4_0) for (int i = 0; i < 32; i++) v[i] -= 8;
        else *mn = f16(b + 2);
        break;
    }
    case Q5_0: case Q5_1: {
        int o = t == Q5_1 ? 4 : 2;
        uint32_t qh; memcpy(&qh, b + o, 4);
        const uint8_t *qs = b + o + 4;
        for (int i = 0; i < 16; i++) {
            v[i] = (qs[i] & 15) | (((qh >> i) & 1) << 4);
            v[i + 16] = (qs[i] >> 4) | (((qh >> (i + 16)) & 1) << 4);
        }
        c[0] = c[1] = f16(b);
        if (t == Q5_0) for (int i = 0; i < 32; i++) v[i] -= 16;
        else *mn = f16(b + 2);
        break;
    }
    case Q8_0:
        memcpy(v, b + 2, 32);
        c[0] = c[1] = f16(b);
        break;
    case Q4_K: case Q5_K: {
        int sc, m;
        scale_min_k4(sub, b + 4, &sc, &m);
        const uint8_t *qs = b + (t == Q4_K ? 16 : 48) + 32 * (sub / 2);
        for (int i = 0; i < 32; i++) v[i] = sub & 1 ? qs[i] >> 4 : qs[i] & 15;
        if (t == Q5_K) for (int i = 0; i < 32; i++) v[i] |= ((b[16 + i] >> sub) & 1) << 4;
        c[0] = c[1] = f16(b) * sc;
        *mn = -f16(b + 2) * m;
        break;
    }
    case Q6_K: {
        int half = sub / 4, k = sub % 4;
        const uint8_t *ql = b + 64 * half + 32 * (k & 1), *qh = b + 128 + 32 * half;
        const int8_t *scales = (const int8_t *)(b + 192) + 8 * half + 2 * k;
        float d = f16(b + 208);
        for (int i = 0; i < 32; i++) {
            int lo = k < 2 ? ql[i] & 15 : ql[i] >> 4;
            v[i] = (int8_t)((lo | (((qh[i] >> (2 * k)) & 3) << 4)) - 32);
        }
        c[0] = d * scales[0];
        c[1] = d * scales[1];
        break;
    }
    }
}

static float dot_scalar(int t, const uint8_t *row, const float *x, int64_t groups) {
    float acc = 0.f;
    int8_t v[32];
    float c[2], mn;
    for (int64_t g = 0; g < groups; g++) {
        group_scalar(t, row, g, v, c, &mn);
        for (int i = 0; i < 32; i++) acc += (c[i / 16] * v[i] + mn) * x[32 * g + i];
    }
    return acc;
}

#ifdef __AVX2__
static inline __m256i nibbles16(const uint8_t *qs) { /* low nibbles, then high nibbles */
    __m128i p = _mm_loadu_si128((const __m128i *)qs), m = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(p, 4), m), _mm_and_si128(p, m));
}

static inline __m256i bit_bytes(uint32_t bits) { /* byte i = 0xff where bit i is set */
    const __m256i spread = _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL, 0x0303030303030303LL);
    const __m256i sel = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i v = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), spread), sel);
    return _mm256_cmpeq_epi8(v, sel);
}

static inline float hsum(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One group's weights widened to floats, c * v + mn (bytes 0-15 on scale c_lo, 16-31 on c_hi),
 * computed once and multiplied with every activation row that shares them. */
#ifdef __AVX512F__
typedef __m512 vacc;
#define VZERO _mm512_setzero_ps()
#define WN 2 /* vectors per group */
static inline void group_weights(__m256i v, float c_lo, float c_hi, float mn, vacc *w) {
    __m512 m = _mm512_set1_ps(mn);
    w[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v))), _mm512_set1_ps(c_lo), m);
    w[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1))), _mm512_set1_ps(c_hi), m);
}
static inline vacc group_dot(const vacc *w, const float *x, vacc acc) {
    return _mm512_fmadd_ps(w[1], _mm512_loadu_ps(x + 16), _mm512_fmadd_ps(w[0], _mm512_loadu_ps(x), acc));
}
static inline float vsum(vacc a) { return _mm512_reduce_add_ps(a); }
#else
typedef __m256 vacc;
#define VZERO _mm256_setzero_ps()
#define WN 4
static inline void group_weights(__m256i v, float c_lo, float c_hi, float mn, vacc *w) {
    __m256 m = _mm256_set1_ps(mn), cl = _mm256_set1_ps(c_lo), ch = _mm256_set1_ps(c_hi);
    __m128i lo = _mm256_castsi256_si128(v), hi = _mm256_extracti128_si256(v, 1);
    w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), cl, m);
    w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), cl, m);
    w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), ch, m);
    w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), ch, m);
}
static inline vacc group_dot(const vacc *w, const float *x, vacc acc) {
    for (int k = 0; k < 4; k++) acc = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(x + 8 * k), acc);
    return acc;
}
static inline float vsum(vacc a) { return hsum(a); }
#endif

#define ACC(v, c_lo, c_hi, mn)                                                                   \
    {                                                                                            \
        vacc w_[WN];                                                                             \
        group_weights((v), (c_lo), (c_hi), (mn), w_);                                            \
        for (int j = 0; j < n; j++) acc[j] = group_dot(w_, x + j * xstride + 32 * g, acc[j]);     \
    }

/* out[j] = row . x[j] for j < n (n <= NX); x[j] starts at x + j * xstride */
static inline void dot_simd(int t, const uint8_t *row, const float *x, int64_t groups, int64_t xstride, int n, float *out) {
    vacc acc[NX];
    for (int j = 0; j < n; j++) acc[j] = VZERO;
    const __m256i m15 = _mm256_set1_epi8(15);
    switch (t) {
    case Q4_0: case Q4_1: case Q5_0: case Q5_1: case Q8_0: {
        int bb = block_bytes(t);
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *b = row + g * bb;
            __m256i v;
            if (t == Q8_0) v = _mm256_loadu_si256((const __m256i *)(b + 2));
            else if (t == Q4_0 || t == Q4_1) v = nibbles16(b + (t == Q4_1 ? 4 : 2));
            else {
                int o = t == Q5_1 ? 4 : 2;
                uint32_t qh; memcpy(&qh, b + o, 4);
                v = _mm256_or_si256(nibbles16(b + o + 4), _mm256_and_si256(bit_bytes(qh), _mm256_set1_epi8(16)));
            }
            if (t == Q4_0) v = _mm256_sub_epi8(v, _mm256_set1_epi8(8));
            if (t == Q5_0) v = _mm256_sub_epi8(v, _mm256_set1_epi8(16));
            float c = f16(b), mn = (t == Q4_1 || t == Q5_1) ? f16(b + 2) : 0.f;
            ACC(v, c, c, mn);
        }
        break;
    }
    case Q4_K: case Q5_K: {
        int bb = block_bytes(t);
        for (int64_t sb = 0; sb < groups / 8; sb++) {
            const uint8_t *b = row + sb * bb;
            float d = f16(b), dmin = f16(b + 2);
            const uint8_t *qs = b + (t == Q4_K ? 16 : 48);
            __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 16));
            for (int sub = 0; sub < 8; sub++) {
                int64_t g = sb * 8 + sub;
                int sc, m;
                scale_min_k4(sub, b + 4, &sc, &m);
                __m256i p = _mm256_loadu_si256((const __m256i *)(qs + 32 * (sub / 2)));
                __m256i v = _mm256_and_si256(sub & 1 ? _mm256_srli_epi16(p, 4) : p, m15);
                if (t == Q5_K)
                    v = _mm256_or_si256(v, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, sub), _mm256_set1_epi8(1)), 4));
                ACC(v, d * sc, d * sc, -dmin * m);
            }
        }
        break;
    }
    case Q6_K: {
        for (int64_t sb = 0; sb < groups / 8; sb++) {
            const uint8_t *b = row + sb * 210;
            float d = f16(b + 208);
            for (int sub = 0; sub < 8; sub++) {
                int64_t g = sb * 8 + sub;
                int half = sub / 4, k = sub % 4;
                __m256i ql = _mm256_loadu_si256((const __m256i *)(b + 64 * half + 32 * (k & 1)));
                __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * half));
                __m256i lo = _mm256_and_si256(k < 2 ? ql : _mm256_srli_epi16(ql, 4), m15);
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * k), _mm256_set1_epi8(3));
                __m256i v = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), _mm256_set1_epi8(32));
                const int8_t *s = (const int8_t *)(b + 192) + 8 * half + 2 * k;
                ACC(v, d * s[0], d * s[1], 0.f);
            }
        }
        break;
    }
    default:
        for (int j = 0; j < n; j++) out[j] = dot_scalar(t, row, x + j * xstride, groups);
        return;
    }
    for (int j = 0; j < n; j++) out[j] = vsum(acc[j]);
}
#define HAVE_SIMD 1
#endif

static inline void dot_rows(int t, const uint8_t *row, const float *x, int64_t groups, int n, float *out, int scalar) {
#ifdef HAVE_SIMD
    if (!scalar) {
        if (n == 1) dot_simd(t, row, x, groups, 32 * groups, 1, out); /* inlined with n = 1 for decoding */
        else dot_simd(t, row, x, groups, 32 * groups, n, out);
        return;
    }
#endif
    for (int j = 0; j < n; j++) out[j] = dot_scalar(t, row, x + j * 32 * groups, groups);
}

/* which integer dot this build uses: 3 AVX-512 VNNI, 2 AVX-VNNI, 1 AVX2, 0 scalar */
int lmf_simd_level(void) {
#if defined(__AVX2__) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return 3;
#elif defined(__AVX2__) && defined(__AVXVNNI__)
    return 2;
#elif defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

/* Decoding reads each weight once, from memory: the hardware prefetcher alone leaves the
 * integer dots waiting on it (measured: a third of the bandwidth), so rows AHEAD are requested
 * while the current one is computed. */
#define AHEAD 32
static inline void prefetch_row(const uint8_t *p, int64_t n) {
    for (int64_t o = 0; o < n; o += 64) __builtin_prefetch(p + o, 0, 3);
}

/* Y[M, rows] = X[M, cols] W^T, W given as `rows` rows of `row_bytes` quantized bytes. Returns 0,
 * or -1 when the type is unknown or cols does not fill whole blocks. */
int lmf_matmul(int t, const uint8_t *w, int64_t rows, int64_t row_bytes, int64_t cols,
               const float *x, int64_t m, float *y, int threads, int scalar) {
    if (!block_bytes(t) || cols % block_values(t) || row_bytes != cols / block_values(t) * block_bytes(t)) return -1;
    int64_t groups = cols / 32;
    const int64_t tile = 8; /* rows whose blocks stay in L1 while every activation row passes */
    int64_t tiles = (rows + tile - 1) / tile;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && rows * cols * m > (1 << 16))
    for (int64_t ti = 0; ti < tiles; ti++) {
        int64_t r1 = (ti + 1) * tile < rows ? (ti + 1) * tile : rows;
        float out[NX];
        for (int64_t i = 0; i < m; i += NX) {
            int n = m - i < NX ? (int)(m - i) : NX;
            for (int64_t r = ti * tile; r < r1; r++) {
                prefetch_row(w + (r + AHEAD) * row_bytes, (r + AHEAD) < rows ? row_bytes : 0);
                dot_rows(t, w + r * row_bytes, x + i * cols, groups, n, out, scalar);
                for (int j = 0; j < n; j++) y[(i + j) * rows + r] = out[j];
            }
        }
    }
    return 0;
}

/* ---- one decoding step of a whole LLaMA-family model, for one sequence ----------------------
 * The fast decoder's (`lmforge/fast/decode.py`) arithmetic for one token, in one call: at batch
 * 1 a 135M model's ~450 small PyTorch ops per token cost as much as its matrix products.
 * Layout and conventions are the fast decoder's: q/k rows in adjacent-pair RoPE order, rotary
 * factors from its complex table, the static KV cache [layers, 2, kv_heads, capacity, head_dim]
 * it also fills during prefill. Weights per layer, in slots: q|k|v (one fused matrix in slot 0,
 * or three), o, gate|up (fused in slot 4, or two), down; a slot with 0 rows is empty. */
enum { S_Q, S_K, S_V, S_O, S_GATE, S_UP, S_DOWN, N_SLOTS };

typedef struct {
    int64_t n_layers, d, heads, kv_heads, head_dim, ff, vocab, capacity;
    float eps, scale;
    const float *embed;        /* [vocab, d] */
    const float *norm1, *norm2; /* [layers, d] */
    const float *final_norm;   /* [d] */
    const float *qkv_bias;     /* [layers, (heads + 2 kv_heads) head_dim] or NULL */
    const int64_t *w;          /* [layers, N_SLOTS] addresses of the blocks */
    const int64_t *rows;       /* [layers, N_SLOTS] */
    const int32_t *types;      /* [layers, N_SLOTS] */
    const uint8_t *head;
    int32_t head_type;
    float *kv;                 /* [layers, 2, kv_heads, capacity, head_dim] */
    const float *freqs;        /* [capacity, head_dim / 2] complex: (cos, sin) pairs */
    const int64_t *windows;    /* [layers]: a sliding window's size, 0 = every position; or NULL */
    const float *q_norm, *k_norm; /* [layers, head_dim]: RMSNorm of each q / k head (Qwen3), or NULL */
    const int64_t *rope;       /* [layers]: 1 where q/k rotate, 0 in NoPE layers (SmolLM3); or NULL = all */
} lmf_model;

static int matvec(int t, const uint8_t *w, int64_t rows, int64_t cols, const float *x, float *y, int threads) {
    int64_t groups = cols / 32, row_bytes = cols / block_values(t) * block_bytes(t);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t ti = 0; ti < (rows + 7) / 8; ti++) {
        int64_t r1 = (ti + 1) * 8 < rows ? (ti + 1) * 8 : rows;
        for (int64_t r = ti * 8; r < r1; r++) {
            prefetch_row(w + (r + AHEAD) * row_bytes, (r + AHEAD) < rows ? row_bytes : 0);
            dot_rows(t, w + r * row_bytes, x, groups, 1, y + r, 0);
        }
    }
    return 0;
}

static void rms_norm(const float *x, const float *w, float *out, int64_t n, float eps) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float r = 1.f / sqrtf((float)(ss / n) + eps);
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

/* the slots [s0, s1) of a layer, each to its own stretch of `out` */
static void slots(const lmf_model *m, int64_t l, int s0, int s1, int64_t cols, const float *x, float *out, int threads) {
    for (int s = s0; s < s1; s++) {
        int64_t k = l * N_SLOTS + s;
        if (!m->rows[k]) continue;
        matvec(m->types[k], (const uint8_t *)(intptr_t)m->w[k], m->rows[k], cols, x, out, threads);
        out += m->rows[k];
    }
}

/* one query token against the cached keys and values of layer l; heads run in parallel (at a
 * few hundred positions this is as much work as the layer's matrix products) */
static void attend(const lmf_model *m, int64_t l, int64_t pos, const float *q, float *y, float *scores, int threads) {
    int64_t KV = m->kv_heads, D = m->head_dim, G = m->heads / KV, S = pos + 1, cap = m->capacity;
    int64_t w = m->windows ? m->windows[l] : 0, s0 = w > 0 && S > w ? S - w : 0; /* keys s0..pos */
    const float *kc = m->kv + (l * 2) * KV * cap * D + s0 * D, *vc = m->kv + (l * 2 + 1) * KV * cap * D + s0 * D;
    S -= s0;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && S * m->heads * D > (1 << 14))
    for (int64_t h = 0; h < m->heads; h++) {
        const float *qh = q + h * D, *K = kc + (h / G) * cap * D, *V = vc + (h / G) * cap * D;
        float *sc = scores + h * S, mx = -INFINITY, sum = 0.f;
        for (int64_t s = 0; s < S; s++) {
            float a = 0.f;
#pragma omp simd reduction(+ : a)
            for (int64_t i = 0; i < D; i++) a += qh[i] * K[s * D + i];
            sc[s] = a * m->scale;
            mx = fmaxf(mx, sc[s]);
        }
        for (int64_t s = 0; s < S; s++) { sc[s] = expf(sc[s] - mx); sum += sc[s]; }
        float *yh = y + h * D, inv = 1.f / sum;
        for (int64_t i = 0; i < D; i++) yh[i] = 0.f;
        for (int64_t s = 0; s < S; s++) {
            float p = sc[s] * inv;
#pragma omp simd
            for (int64_t i = 0; i < D; i++) yh[i] += p * V[s * D + i];
        }
    }
}

/* token -> logits [vocab] at position `pos` (the cache holds positions 0..pos-1). 0, or -1 when
 * pos is past the cache, -2 when out of memory. */
int lmf_decode_step(const lmf_model *m, int64_t token, int64_t pos, float *logits, int threads) {
    if (pos >= m->capacity || token < 0 || token >= m->vocab) return -1;
    int64_t d = m->d, H = m->heads, KV = m->kv_heads, D = m->head_dim, ff = m->ff, cap = m->capacity;
    int64_t nqkv = (H + 2 * KV) * D, widest = ff > d ? ff : d;
    widest = widest > H * D ? widest : H * D;
    float *x = malloc(sizeof(float) * d), *h = malloc(sizeof(float) * (widest > d ? widest : d));
    float *qkv = malloc(sizeof(float) * nqkv), *y = malloc(sizeof(float) * H * D), *o = malloc(sizeof(float) * d);
    float *gu = malloc(sizeof(float) * 2 * ff), *scores = malloc(sizeof(float) * (pos + 1) * m->heads);
    int rc = 0;
    if (!x || !h || !qkv || !y || !o || !gu || !scores) { rc = -2; goto done; }
    memcpy(x, m->embed + token * d, sizeof(float) * d);
    const float *f = m->freqs + pos * D; /* D/2 complex = D floats */
    for (int64_t l = 0; l < m->n_layers; l++) {
        rms_norm(x, m->norm1 + l * d, h, d, m->eps);
        slots(m, l, S_Q, S_O, d, h, qkv, threads);
        if (m->qkv_bias) for (int64_t i = 0; i < nqkv; i++) qkv[i] += m->qkv_bias[l * nqkv + i];
        if (m->q_norm)
            for (int64_t hd = 0; hd < H + KV; hd++)
                rms_norm(qkv + hd * D, (hd < H ? m->q_norm : m->k_norm) + l * D, qkv + hd * D, D, m->eps);
        for (int64_t i = 0; i < (m->rope && !m->rope[l] ? 0 : (H + KV) * D); i += 2) { /* rotary: (re, im) pairs times e^{i pos freq} */
            float c = f[i % D], s = f[i % D + 1], a = qkv[i], b = qkv[i + 1];
            qkv[i] = a * c - b * s;
            qkv[i + 1] = a * s + b * c;
        }
        for (int64_t kh = 0; kh < KV; kh++) {
            memcpy(m->kv + ((l * 2) * KV + kh) * cap * D + pos * D, qkv + (H + kh) * D, sizeof(float) * D);
            memcpy(m->kv + ((l * 2 + 1) * KV + kh) * cap * D + pos * D, qkv + (H + KV + kh) * D, sizeof(float) * D);
        }
        attend(m, l, pos, qkv, y, scores, threads);
        slots(m, l, S_O, S_O + 1, H * D, y, o, threads);
        for (int64_t i = 0; i < d; i++) x[i] += o[i];
        rms_norm(x, m->norm2 + l * d, h, d, m->eps);
        slots(m, l, S_GATE, S_DOWN, d, h, gu, threads);
        for (int64_t i = 0; i < ff; i++) h[i] = gu[i] / (1.f + expf(-gu[i])) * gu[ff + i];
        slots(m, l, S_DOWN, S_DOWN + 1, ff, h, o, threads);
        for (int64_t i = 0; i < d; i++) x[i] += o[i];
    }
    rms_norm(x, m->final_norm, h, d, m->eps);
    matvec(m->head_type, m->head, m->vocab, d, h, logits, threads);
done:
    free(x); free(h); free(qkv); free(y); free(o); free(gu); free(scores);
    return rc;
}

/* out [rows, cols] float32 = the blocks dequantized (the embedding table, inspection, export) */
int lmf_dequant(int t, const uint8_t *w, int64_t rows, int64_t row_bytes, int64_t cols, float *out, int threads) {
    if (!block_bytes(t) || cols % block_values(t) || row_bytes != cols / block_values(t) * block_bytes(t)) return -1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && rows * cols > (1 << 16))
    for (int64_t r = 0; r < rows; r++) {
        int8_t v[32];
        float c[2], mn;
        for (int64_t g = 0; g < cols / 32; g++) {
            group_scalar(t, w + r * row_bytes, g, v, c, &mn);
            for (int i = 0; i < 32; i++) out[r * cols + 32 * g + i] = c[i / 16] * v[i] + mn;
        }
    }
    return 0;
}
