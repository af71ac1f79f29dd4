/* The peak rates of this core, for `bnnc profile` (runtime/peak.py builds this file with -O3
 * -ffp-contract=off -march=native and times each loop on the thread's CPU clock).
 *
 * Each loop is the kind of work one class of bnnc's weight-layer products does, in register
 * blocks fed from an L1-resident buffer (as a GEMM microkernel is), at the widest vector ISA the
 * compiler may use here:
 *   peak_f32  - f32 multiply then add, not fused: bnnc builds with -ffp-contract=off so that
 *               every target sums the same way; the standard step's products are bound by this.
 *   peak_int  - 8-bit integer dot products accumulated in int32 (AVX-512 VNNI vpdpbusd, else
 *               AVX2 vpmaddubsw + vpmaddwd, else int32 multiply-adds): the u8 first layer and
 *               the PO2 codes' products count here.
 *   peak_bit  - XNOR, popcount, add over 64-bit words (VPOPCNTDQ where present): 64 binary
 *               multiply-accumulates per word, the XNOR forward and the bit-plane products.
 *   peak_read - sum of a buffer of n bytes: read bandwidth of that working set.
 * Every function returns the work it did (multiply-accumulates, or bytes read) and folds its
 * accumulators into *sink, so the compiler cannot drop the loop.
 */
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define L1_BYTES 8192

/* keep a loaded vector in a register: without it the compiler reloads the operand from L1 for
 * every product and the loop measures the load ports instead of the arithmetic */
#if defined(__x86_64__) && defined(__AVX512F__)
#define PIN(x) __asm__("" : "+v"(x))
#elif defined(__x86_64__)
#define PIN(x) __asm__("" : "+x"(x))
#elif defined(__aarch64__)
#define PIN(x) __asm__("" : "+w"(x))
#else
#define PIN(x) ((void)0)
#endif

#if defined(__AVX512F__)
/* a 4 x 4 register block of 512-bit integer accumulators over the L1 buffers: n rows of 4 + 4
 * vectors, `iters` times; STEP(acc, a, b) is one vector product-accumulate */
#define ZMM_BLOCK(acc, STEP)                                                                     \
    do {                                                                                         \
        for (int i = 0; i < 4; i++)                                                              \
            for (int j = 0; j < 4; j++)                                                          \
                (acc)[i][j] = _mm512_setzero_si512();                                            \
        for (int64_t it = 0; it < iters; it++)                                                   \
            for (int k = 0; k < n; k++) {                                                        \
                __m512i a[4], b[4];                                                              \
                _Pragma("GCC unroll 4")                                                          \
                for (int i = 0; i < 4; i++) {                                                    \
                    a[i] = _mm512_load_si512((const void *)(buf_a + 256 * k + 64 * i));          \
                    b[i] = _mm512_load_si512((const void *)(buf_b + 256 * k + 64 * i));          \
                    PIN(a[i]);                                                                   \
                    PIN(b[i]);                                                                   \
                }                                                                                \
                _Pragma("GCC unroll 4")                                                          \
                for (int i = 0; i < 4; i++)                                                      \
                    _Pragma("GCC unroll 4")                                                      \
                    for (int j = 0; j < 4; j++)                                                  \
                        (acc)[i][j] = STEP((acc)[i][j], a[i], b[j]);                             \
            }                                                                                    \
    } while (0)
#define VNNI_STEP(c, x, y) _mm512_dpbusd_epi32(c, x, y)
/* ~(x ^ y): ternary logic 0x99 */
#define XNOR_STEP(c, x, y) \
    _mm512_add_epi64(c, _mm512_popcnt_epi64(_mm512_ternarylogic_epi64(x, y, y, 0x99)))
#endif

static uint8_t buf_a[L1_BYTES] __attribute__((aligned(64)));
static uint8_t buf_b[L1_BYTES] __attribute__((aligned(64)));

static void fill(void)
{
    for (int i = 0; i < L1_BYTES; i++) {
        buf_a[i] = (uint8_t)(i * 37 + 11);
        buf_b[i] = (uint8_t)(i * 101 + 7);
    }
}

/* the f32 block's vectors: the widest register this build has (a wider GCC vector would be
 * split over several registers, which PIN cannot hold) */
#if defined(__AVX512F__)
#define VF_BYTES 64
#elif defined(__AVX__)
#define VF_BYTES 32
#else
#define VF_BYTES 16
#endif
#define VF_LANES (VF_BYTES / 4)
typedef float vf __attribute__((vector_size(VF_BYTES)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint64_t v8u __attribute__((vector_size(64)));

/* a 4 x 4 register block of float vectors: 16 vector multiply-adds per 8 vector loads */
int64_t peak_f32(int64_t iters, double *sink)
{
    /* normal floats near 1 (random bytes would hold subnormals, which take a slow path) */
    for (int i = 0; i < L1_BYTES / 4; i++) {
        float fa = 1.0f + (float)(i % 97) * 1e-3f, fb = 0.5f - (float)(i % 89) * 1e-3f;
        memcpy(buf_a + 4 * i, &fa, 4);
        memcpy(buf_b + 4 * i, &fb, 4);
    }
    vf acc[4][4];
    memset(acc, 0, sizeof acc);
    const int n = L1_BYTES / VF_BYTES / 4;
    for (int64_t it = 0; it < iters; it++)
        for (int k = 0; k < n; k++) {
            vf a[4], b[4];
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) {
                a[i] = ((const vf *)(buf_a + 4 * VF_BYTES * k))[i];
                b[i] = ((const vf *)(buf_b + 4 * VF_BYTES * k))[i];
                PIN(a[i]);
                PIN(b[i]);
            }
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++)
#pragma GCC unroll 4
                for (int j = 0; j < 4; j++)
                    acc[i][j] = acc[i][j] + a[i] * b[j];
        }
    double s = 0;
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < VF_LANES; l++)
                s += acc[i][j][l];
    *sink += s;
    return iters * n * 16 * VF_LANES;
}

int64_t peak_int(int64_t iters, double *sink)
{
    fill();
    const int n = L1_BYTES / 64 / 4;
    int64_t s = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    __m512i acc[4][4];
    ZMM_BLOCK(acc, VNNI_STEP);
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++)
            s += _mm512_reduce_add_epi32(acc[i][j]);
    *sink += (double)s;
    return iters * n * 16 * 64;            /* 64 u8 x s8 products per instruction */
#elif defined(__AVX2__)
    /* u8 x s8 pairs summed into int16 (vpmaddubsw), pairs of those into int32 (vpmaddwd) */
    __m256i acc[4][4];
    const __m256i ones = _mm256_set1_epi16(1);
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++)
            acc[i][j] = _mm256_setzero_si256();
    for (int64_t it = 0; it < iters; it++)
        for (int k = 0; k < 2 * n; k++) {
            __m256i a[4], b[4];
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) {
                a[i] = _mm256_load_si256((const __m256i *)(buf_a + 128 * k + 32 * i));
                b[i] = _mm256_load_si256((const __m256i *)(buf_b + 128 * k + 32 * i));
                PIN(a[i]);
                PIN(b[i]);
            }
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++)
#pragma GCC unroll 4
                for (int j = 0; j < 4; j++)
                    acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(
                        _mm256_maddubs_epi16(a[i], b[j]), ones));
        }
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) {
            int32_t lanes[8];
            _mm256_storeu_si256((__m256i *)lanes, acc[i][j]);
            for (int l = 0; l < 8; l++)
                s += lanes[l];
        }
    *sink += (double)s;
    return iters * 2 * n * 16 * 32;        /* 32 u8 x s8 products per vector pair */
#else
    /* int32 multiply-adds, 16 lanes */
    v16i acc[4][4];
    memset(acc, 0, sizeof acc);
    for (int64_t it = 0; it < iters; it++)
        for (int k = 0; k < n; k++) {
            const v16i *a = (const v16i *)(buf_a + 256 * k);
            const v16i *b = (const v16i *)(buf_b + 256 * k);
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++)
#pragma GCC unroll 4
                for (int j = 0; j < 4; j++)
                    acc[i][j] = acc[i][j] + a[i] * b[j];
        }
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < 16; l++)
                s += acc[i][j][l];
    *sink += (double)s;
    return iters * n * 16 * 16;
#endif
}

int64_t peak_bit(int64_t iters, double *sink)
{
    fill();
    const int n = L1_BYTES / 64 / 4;
    uint64_t s = 0;
#if defined(__AVX512VPOPCNTDQ__)
    __m512i acc[4][4];
    ZMM_BLOCK(acc, XNOR_STEP);
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++)
            s += (uint64_t)_mm512_reduce_add_epi64(acc[i][j]);
#else
    v8u acc[4][4];
    memset(acc, 0, sizeof acc);
    for (int64_t it = 0; it < iters; it++)
        for (int k = 0; k < n; k++) {
            const v8u *a = (const v8u *)(buf_a + 256 * k);
            const v8u *b = (const v8u *)(buf_b + 256 * k);
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++)
#pragma GCC unroll 4
                for (int j = 0; j < 4; j++)
                    for (int l = 0; l < 8; l++)
                        acc[i][j][l] += (uint64_t)__builtin_popcountll(~(a[i][l] ^ b[j][l]));
        }
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < 8; l++)
                s += acc[i][j][l];
#endif
    *sink += (double)s;
    return iters * n * 16 * 512;           /* 512 binary products per 64-byte vector pair */
}

int64_t peak_read(const uint8_t *p, int64_t nbytes, int64_t iters, double *sink)
{
    v8u acc[4];
    memset(acc, 0, sizeof acc);
    const int64_t n = nbytes / 256;
    for (int64_t it = 0; it < iters; it++)
        for (int64_t k = 0; k < n; k++)
            for (int i = 0; i < 4; i++) {
                v8u v;
                memcpy(&v, p + 256 * k + 64 * i, 64);
                acc[i] += v;
            }
    uint64_t s = 0;
    for (int i = 0; i < 4; i++)
        for (int l = 0; l < 8; l++)
            s += acc[i][l];
    *sink += (double)s;
    return iters * n * 256;
}
