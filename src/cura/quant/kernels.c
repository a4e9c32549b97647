/* cura: CPU fast path of the 4-bit format (NF4 / FP4, blockwise absmax, double quantization).
 *
 * Every function here must give the same bits as the PyTorch reference in cura/quant/blockwise.py and
 * cura/quant/tensor.py (tests/test_quant_kernels.py checks it). Built by cura/quant/kernels.py with
 *     cc -O3 -march=native -ffp-contract=off -fopenmp -shared -fPIC
 * and NO -ffast-math: plain IEEE float32, every product and sum rounded on its own (no FMA contraction).
 *
 * Layout (bitsandbytes 0.50.2, byte for byte):
 *     x          n elements, contiguous, float32 | bfloat16 | float16        (dtype code 0 | 1 | 2)
 *     block b    elements [b * blocksize, min((b + 1) * blocksize, n)); only the last block may be short
 *     absmax     float32 [blocks]
 *     packed     uint8 [ceil(n / 2)]: byte j = code[2j] << 4 | code[2j + 1]; an odd n pads the last low
 *                nibble with `pad_code` (the code of 0.0)
 *     DQ scales  scale[b] = (nested_code[absmax8[b]] * nested_absmax[b / nested_blocksize]) + offset
 *                (two float32 roundings, in that order)
 *     values     out[i] = code[c_i] * scale[b]   (float32; bf16 / fp16 by round-to-nearest-even of it)
 *
 * Quantization rules (copied from `quantize_blocks`):
 *     4-bit, full block:  s = x * (1 / max(absmax, 1e-38)), clamped to [-1, 1]
 *     4-bit, short block: s = x / max(absmax, 1e-38), clamped; absmax stored as max(absmax, 1e-38)
 *     8-bit (divide):     s = x / absmax, not clamped; a block with absmax 0 gets code 0
 *     code = order[number of `bounds` < s]   (torch.bucketize, right=False: a tie goes to the lower
 *            code); `bounds` are the midpoints of the sorted book padded with +inf to 16 / 256 entries,
 *            `order` maps a sorted index back to the code.
 *
 * Non-finite data (NaN / inf in x or in the scales) is not handled here: each function returns 1 when
 * it meets a non-finite block scale (its output is then unspecified) and the caller uses the reference.
 * Threads: each function splits whole blocks over `threads` OpenMP threads (blocksize must be even so
 * that no byte is shared by two blocks; every valid blocksize is).
 *
 * Two code paths, picked at compile time: AVX-512 (F + BW + VL) intrinsics where the compiler targets
 * them (-march=native on such a CPU), and portable C chunk loops written for the auto-vectorizer (SSE,
 * AVX2, NEON), which also finish the ends of blocks. -DCURA_SCALAR_ONLY forces the portable path (tests).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(CURA_SCALAR_ONLY)
#define CURA_AVX512 1
#include <immintrin.h>
#else
#define CURA_AVX512 0
#endif

#define CURA_ABI 2

enum { DTYPE_F32 = 0, DTYPE_BF16 = 1, DTYPE_F16 = 2 };

int cura_abi(void) { return CURA_ABI; }

int cura_simd(void) { return CURA_AVX512; }

/* ---- scalar conversions (torch's rules: exact widening, round-to-nearest-even narrowing) ---- */

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* fp16 <-> fp32 as in c10/util/Half.h (Maratyszcza's FP16 library): exact, subnormals included. */
static inline float f16_to_f32(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & UINT32_C(0x80000000);
    const uint32_t two_w = w + w;
    const float normalized = bits_f32((two_w >> 4) + (UINT32_C(0xE0) << 23)) * 0x1.0p-112f;
    const float denormalized = bits_f32((two_w >> 17) | (UINT32_C(126) << 23)) - 0.5f;
    const uint32_t tiny = -(uint32_t)(two_w < (UINT32_C(1) << 27)); /* all ones for a subnormal half */
    return bits_f32(sign | (f32_bits(denormalized) & tiny) | (f32_bits(normalized) & ~tiny));
}

static inline uint16_t f32_to_f16(float f) {
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = f32_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & UINT32_C(0x80000000);
    uint32_t bias = shl1_w & UINT32_C(0xFF000000);
    bias = bias < UINT32_C(0x71000000) ? UINT32_C(0x71000000) : bias;
    base = bits_f32((bias >> 1) + UINT32_C(0x07800000)) + base;
    const uint32_t bits = f32_bits(base);
    const uint32_t nonsign = ((bits >> 13) & UINT32_C(0x7C00)) + (bits & UINT32_C(0x0FFF));
    const uint32_t nan = -(uint32_t)(shl1_w > UINT32_C(0xFF000000));
    return (uint16_t)((sign >> 16) | (UINT32_C(0x7E00) & nan) | (nonsign & ~nan));
}

/* bf16: c10's round_to_nearest_even for finite values (NaN never reaches here, see the header). */
static inline uint16_t f32_to_bf16(float f) {
    const uint32_t u = f32_bits(f);
    return (uint16_t)((u + ((u >> 16) & 1) + UINT32_C(0x7FFF)) >> 16);
}

static inline float load_one(const void *x, int dtype, int64_t i) {
    if (dtype == DTYPE_F32) return ((const float *)x)[i];
    if (dtype == DTYPE_BF16) return bits_f32((uint32_t)((const uint16_t *)x)[i] << 16);
    return f16_to_f32(((const uint16_t *)x)[i]);
}

static inline void store_one(void *out, int dtype, int64_t i, float v) {
    if (dtype == DTYPE_F32)
        ((float *)out)[i] = v;
    else if (dtype == DTYPE_BF16)
        ((uint16_t *)out)[i] = f32_to_bf16(v);
    else
        ((uint16_t *)out)[i] = f32_to_f16(v);
}

/* Number of `bounds` strictly below s; `bounds` is sorted and padded with +inf to `size` (a power of 2). */
static inline int count_below(const float *bounds, int size, float s) {
    int idx = 0;
    for (int step = size >> 1; step > 0; step >>= 1)
        if (bounds[idx + step - 1] < s) idx += step;
    return idx;
}

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

static inline float clamp1(float s) { return s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s); }

/* ---- portable chunk loops: plain C shaped for the compiler's auto-vectorizer (SSE / AVX2 / NEON),
 * used where there is no AVX-512 and for the ends of blocks ---- */
#define CHUNK 256

static void load_chunk(const void *x, int dtype, int64_t i, int m, float *v) {
    if (dtype == DTYPE_F32)
        memcpy(v, (const float *)x + i, (size_t)m * sizeof(float));
    else if (dtype == DTYPE_BF16)
        for (int j = 0; j < m; j++) v[j] = bits_f32((uint32_t)((const uint16_t *)x)[i + j] << 16);
    else
        for (int j = 0; j < m; j++) v[j] = f16_to_f32(((const uint16_t *)x)[i + j]);
}

static void store_chunk(void *out, int dtype, int64_t i, int m, const float *v) {
    if (dtype == DTYPE_F32)
        memcpy((float *)out + i, v, (size_t)m * sizeof(float));
    else if (dtype == DTYPE_BF16)
        for (int j = 0; j < m; j++) ((uint16_t *)out)[i + j] = f32_to_bf16(v[j]);
    else
        for (int j = 0; j < m; j++) ((uint16_t *)out)[i + j] = f32_to_f16(v[j]);
}

/* 4-bit codes of m (even) elements from i (even) into packed bytes: scale into a buffer, count the 15
 * bounds below each value in 15 branch-free sweeps, then map through `order` and pack pairs. */
static void quant4_chunk(const void *x, int dtype, int64_t i, int m, float inv, float amax, int full,
                         const float *bounds, const int32_t *order, uint8_t *packed) {
    float s[CHUNK];
    int32_t count[CHUNK];
    load_chunk(x, dtype, i, m, s);
    if (full)
        for (int j = 0; j < m; j++) s[j] = clamp1(s[j] * inv);
    else
        for (int j = 0; j < m; j++) s[j] = clamp1(s[j] / amax);
    for (int j = 0; j < m; j++) count[j] = 0;
    for (int k = 0; k < 15; k++) {
        const float b = bounds[k];
        for (int j = 0; j < m; j++) count[j] += b < s[j];
    }
    for (int j = 0; j < m / 2; j++) packed[i / 2 + j] = (uint8_t)(order[count[2 * j]] << 4 | order[count[2 * j + 1]]);
}

/* Values of m (even) elements from i (even), all in one block with scale s. */
static void dequant_chunk(const uint8_t *packed, const float *code, float s, int64_t i, int m, void *out,
                          int dtype) {
    float v[CHUNK];
    float *restrict dst = dtype == DTYPE_F32 ? (float *)out + i : v;
    const uint8_t *restrict p = packed + i / 2;
    for (int j = 0; j < m / 2; j++) { /* table lookups: compilers rarely vectorize these (gathers) */
        dst[2 * j] = code[p[j] >> 4] * s;
        dst[2 * j + 1] = code[p[j] & 15] * s;
    }
    if (dtype != DTYPE_F32) store_chunk(out, dtype, i, m, v);
}

/* Blocks [first, last) of thread `t` out of `threads`: contiguous, balanced. */
#define THREAD_RANGE(blocks, threads, t, first, last)                 \
    const int64_t first = (blocks) * (int64_t)(t) / (threads);         \
    const int64_t last = (blocks) * ((int64_t)(t) + 1) / (threads)

#ifdef _OPENMP
#include <omp.h>
#define THREAD_ID() omp_get_thread_num()
#define THREAD_COUNT() omp_get_num_threads()
#else
#define THREAD_ID() 0
#define THREAD_COUNT() 1
#endif

/* ---- AVX-512 helpers: 16 float32 lanes ---- */
#if CURA_AVX512
static inline __m512 load16(const void *x, int dtype, int64_t i) {
    if (dtype == DTYPE_F32) return _mm512_loadu_ps((const float *)x + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i));
    if (dtype == DTYPE_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

static inline void store16(void *out, int dtype, int64_t i, __m512 v) {
    if (dtype == DTYPE_F32) {
        _mm512_storeu_ps((float *)out + i, v);
        return;
    }
    __m256i h;
    if (dtype == DTYPE_BF16) { /* u + 0x7FFF + ((u >> 16) & 1), then the high half: as f32_to_bf16 */
        __m512i u = _mm512_castps_si512(v);
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        u = _mm512_add_epi32(_mm512_add_epi32(u, lsb), _mm512_set1_epi32(0x7FFF));
        h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
    } else {
        h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    _mm256_storeu_si256((__m256i *)((uint16_t *)out + i), h);
}

/* 8 packed bytes (16 codes) -> the 16 code values, in element order. Each byte is duplicated into
 * two int32 lanes; the even lane is shifted right by 4 (the high nibble); vpermps reads only the
 * low 4 bits of an index, which drops the other nibble for free. */
static inline __m512 decode16(__m128i bytes8, __m512 book) {
    const __m512i shifts = _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
    __m512i lanes = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(bytes8, bytes8));
    return _mm512_permutexvar_ps(_mm512_srlv_epi32(lanes, shifts), book);
}

/* 16 scaled values -> their 16 codes (int32 lanes): a 4-step binary search in the padded bounds. */
static inline __m512i encode16(__m512 s, __m512 bounds, __m512i order) {
    __m512i idx = _mm512_setzero_si512();
    for (int step = 8; step > 0; step >>= 1) {
        __m512 b = _mm512_permutexvar_ps(_mm512_add_epi32(idx, _mm512_set1_epi32(step - 1)), bounds);
        __mmask16 below = _mm512_cmp_ps_mask(b, s, _CMP_LT_OQ);
        idx = _mm512_mask_add_epi32(idx, below, idx, _mm512_set1_epi32(step));
    }
    return _mm512_permutexvar_epi32(idx, order);
}

/* 16 scaled values -> their 8-bit codes (int32 lanes): the 8-step binary search in the 256 padded
 * bounds. Its first 4 steps only probe bounds[16k + 15] = tops[k], so they run on a register
 * (encode16 with an identity order); the last 4 gather each lane's probe. */
static inline __m512i encode16_256(__m512 s, __m512 tops, const float *bounds, const int32_t *order) {
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512i idx = _mm512_slli_epi32(encode16(s, tops, iota), 4);
    for (int step = 8; step > 0; step >>= 1) {
        __m512 b = _mm512_i32gather_ps(_mm512_add_epi32(idx, _mm512_set1_epi32(step - 1)), bounds, 4);
        __mmask16 below = _mm512_cmp_ps_mask(b, s, _CMP_LT_OQ);
        idx = _mm512_mask_add_epi32(idx, below, idx, _mm512_set1_epi32(step));
    }
    return _mm512_i32gather_epi32(idx, order, 4);
}

/* 16 codes in int32 lanes -> 8 bytes (even element in the high nibble). A 64-bit lane holds codes
 * (c_even, c_odd) as (low, high) halves: its low byte after (lane << 4) | (lane >> 32) is the packed
 * byte; vpmovqb keeps exactly that byte. */
static inline __m128i pack16(__m512i codes) {
    __m512i pairs = _mm512_or_si512(_mm512_slli_epi64(codes, 4), _mm512_srli_epi64(codes, 32));
    return _mm512_cvtepi64_epi8(pairs);
}
#endif

/* ---- dequantize ---- */

typedef struct {
    const uint8_t *packed;
    int64_t n, blocksize;
    const float *code; /* [16] */
    const float *absmax; /* float32 [blocks], or NULL with double quantization */
    const uint8_t *absmax8; /* DQ: uint8 [blocks] */
    const float *nested_absmax, *nested_code;
    float offset;
    int64_t nested_blocksize;
    void *out;
    int out_dtype;
} dequant_args;

static inline float block_scale(const dequant_args *a, int64_t b) {
    if (a->absmax) return a->absmax[b];
    float s = a->nested_code[a->absmax8[b]] * a->nested_absmax[b / a->nested_blocksize];
    return s + a->offset;
}

/* Elements [i0, i1) of one block (i0 even), all scaled by s. */
static void dequant_span(const dequant_args *a, int64_t i0, int64_t i1, float s) {
    int64_t i = i0;
#if CURA_AVX512
    const __m512 book = _mm512_loadu_ps(a->code), scale = _mm512_set1_ps(s);
    for (; i + 32 <= i1; i += 32) {
        __m128i bytes = _mm_loadu_si128((const __m128i *)(a->packed + i / 2));
        store16(a->out, a->out_dtype, i, _mm512_mul_ps(decode16(bytes, book), scale));
        store16(a->out, a->out_dtype, i + 16,
                _mm512_mul_ps(decode16(_mm_unpackhi_epi64(bytes, bytes), book), scale));
    }
    for (; i + 16 <= i1; i += 16) {
        __m128i bytes = _mm_loadl_epi64((const __m128i *)(a->packed + i / 2));
        store16(a->out, a->out_dtype, i, _mm512_mul_ps(decode16(bytes, book), scale));
    }
#endif
    for (int m; (m = (int)min64(CHUNK, (i1 - i) & ~(int64_t)1)) > 0; i += m)
        dequant_chunk(a->packed, a->code, s, i, m, a->out, a->out_dtype);
    if (i < i1) /* the last element of an odd n: the high nibble of its byte */
        store_one(a->out, a->out_dtype, i, a->code[a->packed[i / 2] >> 4] * s);
}

/* Returns 1 when a block scale is not finite (NaN / inf): the caller then uses the reference. */
int cura_dequantize_4bit(const uint8_t *packed, int64_t n, int64_t blocksize, const float *code,
                         const float *absmax, const uint8_t *absmax8, const float *nested_absmax,
                         const float *nested_code, float offset, int64_t nested_blocksize, void *out,
                         int out_dtype, int threads) {
    const dequant_args a = {packed, n, blocksize, code, absmax, absmax8, nested_absmax, nested_code,
                            offset, nested_blocksize, out, out_dtype};
    const int64_t blocks = (n + blocksize - 1) / blocksize;
    int bad = 0;
    if (blocksize % 2) return 1;
#pragma omp parallel num_threads(threads) reduction(| : bad)
    {
        THREAD_RANGE(blocks, THREAD_COUNT(), THREAD_ID(), first, last);
        for (int64_t b = first; b < last; b++) {
            const float s = block_scale(&a, b);
            bad |= !isfinite(s);
            dequant_span(&a, b * blocksize, min64((b + 1) * blocksize, n), s);
        }
    }
    return bad;
}

/* ---- quantize ---- */

typedef struct {
    const void *x;
    int dtype;
    int64_t n, blocksize;
    const float *bounds; /* sorted midpoints padded with +inf: [16] (4-bit) or [256] (8-bit) */
    const int32_t *order; /* sorted index -> code, same length */
} quant_args;

/* max |x| over [i0, i1), found on the float bits: for non-negative floats the integer order of the bit
 * patterns is the float order, and every pattern >= 0x7F800000 is inf or NaN, so one integer max gives
 * the absmax and whether the span is finite (sets *bad when it is not). */
static float span_absmax(const quant_args *a, int64_t i0, int64_t i1, int *bad) {
    uint32_t m = 0;
    int64_t i = i0;
#if CURA_AVX512
    __m512i vm = _mm512_setzero_si512();
    for (; i + 16 <= i1; i += 16) {
        __m512i u = _mm512_castps_si512(load16(a->x, a->dtype, i));
        vm = _mm512_max_epu32(vm, _mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)));
    }
    m = _mm512_reduce_max_epu32(vm);
#endif
    float v[CHUNK];
    for (int c; (c = (int)min64(CHUNK, i1 - i)) > 0; i += c) {
        load_chunk(a->x, a->dtype, i, c, v);
        for (int j = 0; j < c; j++) {
            const uint32_t u = f32_bits(v[j]) & UINT32_C(0x7FFFFFFF);
            m = u > m ? u : m;
        }
    }
    *bad |= m >= UINT32_C(0x7F800000);
    return bits_f32(m);
}

static inline int code_4bit(const quant_args *a, float s) {
    return a->order[count_below(a->bounds, 16, clamp1(s))];
}

/* One 4-bit block [i0, i1) (i0 even) into packed bytes; `full` picks the reference's rounding. */
static void quant4_span(const quant_args *a, int64_t i0, int64_t i1, float amax, int full, int pad_code,
                        uint8_t *packed) {
    const float inv = 1.0f / amax;
    int64_t i = i0;
#if CURA_AVX512
    const __m512 bounds = _mm512_loadu_ps(a->bounds), lo = _mm512_set1_ps(-1.0f), hi = _mm512_set1_ps(1.0f);
    const __m512 vinv = _mm512_set1_ps(inv), vmax = _mm512_set1_ps(amax);
    const __m512i order = _mm512_loadu_si512(a->order);
    for (; i + 32 <= i1; i += 32) {
        __m128i half[2];
        for (int k = 0; k < 2; k++) {
            __m512 v = load16(a->x, a->dtype, i + 16 * k);
            __m512 s = full ? _mm512_mul_ps(v, vinv) : _mm512_div_ps(v, vmax);
            half[k] = pack16(encode16(_mm512_min_ps(_mm512_max_ps(s, lo), hi), bounds, order));
        }
        _mm_storeu_si128((__m128i *)(packed + i / 2), _mm_unpacklo_epi64(half[0], half[1]));
    }
#endif
    for (int m; (m = (int)min64(CHUNK, (i1 - i) & ~(int64_t)1)) > 0; i += m)
        quant4_chunk(a->x, a->dtype, i, m, inv, amax, full, a->bounds, a->order, packed);
    if (i < i1) { /* the last element of an odd n, padded with the code of 0.0 */
        const float x0 = load_one(a->x, a->dtype, i);
        packed[i / 2] = (uint8_t)(code_4bit(a, full ? x0 * inv : x0 / amax) << 4 | pad_code);
    }
}

/* 4-bit blockwise quantization of x into packed [ceil(n / 2)] and absmax [blocks].
 * Returns 1 when x holds NaN or inf (the caller then uses the reference). */
int cura_quantize_4bit(const void *x, int dtype, int64_t n, int64_t blocksize, const float *bounds,
                       const int32_t *order, int pad_code, uint8_t *packed, float *absmax, int threads) {
    const quant_args a = {x, dtype, n, blocksize, bounds, order};
    const int64_t blocks = (n + blocksize - 1) / blocksize;
    int bad = 0;
    if (blocksize % 2) return 1;
#pragma omp parallel num_threads(threads) reduction(| : bad)
    {
        THREAD_RANGE(blocks, THREAD_COUNT(), THREAD_ID(), first, last);
        for (int64_t b = first; b < last; b++) {
            const int64_t i0 = b * blocksize, i1 = min64(i0 + blocksize, n);
            const int full = i1 - i0 == blocksize;
            const float m = span_absmax(&a, i0, i1, &bad);
            const float clamped = m > 1e-38f ? m : 1e-38f; /* torch clamp(min=1e-38) */
            absmax[b] = full ? m : clamped;
            quant4_span(&a, i0, i1, clamped, full, pad_code, packed);
        }
    }
    return bad;
}

/* 8-bit blockwise quantization in divide mode (double quantization of the absmax): one code per
 * element into codes [n], absmax [blocks]. Returns 1 when x holds NaN or inf. */
int cura_quantize_8bit(const float *x, int64_t n, int64_t blocksize, const float *bounds,
                       const int32_t *order, uint8_t *codes, float *absmax, int threads) {
    const quant_args a = {x, DTYPE_F32, n, blocksize, bounds, order};
    const int64_t blocks = (n + blocksize - 1) / blocksize;
    int bad = 0;
#pragma omp parallel num_threads(threads) reduction(| : bad)
    {
        THREAD_RANGE(blocks, THREAD_COUNT(), THREAD_ID(), first, last);
        for (int64_t b = first; b < last; b++) {
            const int64_t i0 = b * blocksize, i1 = min64(i0 + blocksize, n);
            const float m = span_absmax(&a, i0, i1, &bad);
            absmax[b] = m;
            int64_t i = i0;
            if (m == 0.0f) { /* the reference's rule for an all-zero block (its 0 / 0 is NaN) */
                memset(codes + i0, 0, (size_t)(i1 - i0));
                continue;
            }
#if CURA_AVX512
            const __m512i top_index = _mm512_set_epi32(255, 239, 223, 207, 191, 175, 159, 143, 127, 111, 95,
                                                       79, 63, 47, 31, 15);
            const __m512 tops = _mm512_i32gather_ps(top_index, bounds, 4);
            for (; i + 16 <= i1; i += 16) {
                __m512 scaled = _mm512_div_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(m));
                __m512i c = encode16_256(scaled, tops, bounds, order);
                _mm_storeu_si128((__m128i *)(codes + i), _mm512_cvtepi32_epi8(c));
            }
#endif
            for (; i < i1; i++) codes[i] = (uint8_t)order[count_below(bounds, 256, x[i] / m)];
        }
    }
    return bad;
}

/* ---- dropout: out = x * (keep ? scale : 0), keep decided by a hash of (seed, element index) ----
 *
 * keep_i = (h_i >> 8) >= threshold, h_i = fmix32(fmix32(i + seed_lo) ^ seed_hi) (MurmurHash3's
 * finalizer; i is the element's index as uint32, so n must be below 2^32). The mask is a pure function of
 * (seed, i): backward regenerates it instead of storing it, and any thread count gives the same bits.
 * The product is float32 (x widened exactly), then rounded to x's dtype (torch's round-to-nearest-even,
 * NaN -> 0x7FC0 as c10 does), which is what `cura.nn.dropout.reference_dropout` computes in PyTorch. */
static inline uint32_t fmix32(uint32_t h) {
    h ^= h >> 16;
    h *= UINT32_C(0x85EBCA6B);
    h ^= h >> 13;
    h *= UINT32_C(0xC2B2AE35);
    h ^= h >> 16;
    return h;
}

static void dropout_chunk(const void *x, void *out, int dtype, int64_t i, int m, uint32_t seed_lo,
                          uint32_t seed_hi, uint32_t threshold, float scale) {
    float v[CHUNK], f[CHUNK];
    for (int j = 0; j < m; j++) {
        const uint32_t h = fmix32(fmix32((uint32_t)(i + j) + seed_lo) ^ seed_hi);
        f[j] = (h >> 8) >= threshold ? scale : 0.0f;
    }
    load_chunk(x, dtype, i, m, v);
    for (int j = 0; j < m; j++) v[j] *= f[j];
    if (dtype == DTYPE_BF16) {
        for (int j = 0; j < m; j++)
            ((uint16_t *)out)[i + j] = isnan(v[j]) ? UINT16_C(0x7FC0) : f32_to_bf16(v[j]);
    } else {
        store_chunk(out, dtype, i, m, v);
    }
}

int cura_dropout(const void *x, void *out, int dtype, int64_t n, uint32_t seed_lo, uint32_t seed_hi,
                 uint32_t threshold, float scale, int threads) {
    if (n < 0 || n > (int64_t)UINT32_MAX) return 1;
    const int64_t chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel num_threads(threads)
    {
        THREAD_RANGE(chunks, THREAD_COUNT(), THREAD_ID(), first, last);
        for (int64_t c = first; c < last; c++) {
            const int64_t i = c * CHUNK;
            dropout_chunk(x, out, dtype, i, (int)min64(CHUNK, n - i), seed_lo, seed_hi, threshold, scale);
        }
    }
    return 0;
}
