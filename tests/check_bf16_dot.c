/* check_bf16_dot.c -- the opt-in BF16_DOT arithmetic (moe_ep_desc.arithmetic).

   - the test's own model of AVX512-BF16, written from the Intel SDM's pseudo-code in 64-bit
     integers (not the library's double arithmetic): VCVTNE2PS2BF16 for the activations (to
     nearest even, subnormals to zeros of their sign) and one lane of VDPBF16PS (the odd k's
     product added first, then the even k's, each sum exact and rounded once to nearest
     even, subnormal inputs read as zeros, a result below FLT_MIN once rounded flushed to a
     zero of its sign); held against the instructions on 400000 random lanes where the
     CPU has AVX512-BF16 (exponents over the whole range, subnormals, cancellations,
     signed zeros, the FLT_MIN boundary);
   - the FFN with ReLU (an activation without rounding of its own), bitwise equal to the
     model's chains on every path that runs the arithmetic (AVX512-BF16, the portable
     emulation), with biases, odd d_model and d_ff, K past the kernel's K slice, 1 to 200
     rows; outputs poisoned first, a row past the end must stay poisoned;
   - every activation against a float64 FFN over the bf16-rounded activations and weights
     (the hidden rows rounded to bf16 as well): max |y - ref| / max |ref| < 2e-3 (a hidden
     element whose fp32 and float64 values round to neighbouring bf16s moves y by up to a
     bf16 ulp of one term); against the exact arithmetic over the same bf16 weights < 1e-2;
     the figures are printed;
   - the whole layer (routed and shared experts) bitwise the same for the built-in single
     rank and R = 1..5 pthreads ranks (with row lists, and packing the rows), 1..3
     threads and both paths;
   - bad input: the rule's log item, out untouched, nothing left allocated.
   Run with CK_FORK=no. */
#include "check_moe_ep.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && !defined(__TINYC__)
#include <immintrin.h>
#include <cpuid.h>
#define DOT_X86 1
#endif

/* >>the CPU */
#ifdef DOT_X86
static bool dot_cpu_has_bf16(void) {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && (eax & (1u << 5));
}
#endif

/* The paths that run the arithmetic here: AVX512_BF16 where the build and CPU have it, portable. */
static int dot_paths(moe_ep_kernel* out) {
    static const moe_ep_kernel candidates[] = { MOE_EP_KERNEL_AVX512_BF16, MOE_EP_KERNEL_PORTABLE };
    int n = 0, i;
    for (i = 0; i < 2; ++i) {
        moe_ep_context* ctx = NULL;
        uint16_t w = 0x3F80;
        moe_ep_expert_weights e;
        memset(&e, 0, sizeof e);
        e.w1_stored = e.w3_stored = e.w2_stored = &w;
        if (moe_ep_create(&(moe_ep_desc){ .d_model = 1, .d_ff = 1, .num_experts = 1, .experts = &e,
                                          .weight_format = MOE_EP_WEIGHT_FORMAT_BF16,
                                          .arithmetic = MOE_EP_ARITHMETIC_BF16_DOT, .kernel = candidates[i] },
                          &ctx) == MOE_EP_OK) {
            out[n++] = candidates[i];
            moe_ep_destroy(ctx);
        }
    }
    return n;
}

/* >>the model, from the SDM */
static uint32_t dot_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* VCVTNE2PS2BF16 of one float: the significand rounded to 8 bits by rint (ties to even). */
static uint16_t dot_model_bf16(float f) {
    uint32_t u = dot_bits(f);
    int e;
    double m;
    if ((u & 0x7F800000u) == 0) return (uint16_t)((u >> 16) & 0x8000u);
    if (f != f) return (uint16_t)((u >> 16) | 0x40u);
    if (u == 0x7F800000u || u == 0xFF800000u) return (uint16_t)(u >> 16);
    m = frexp((double)f, &e);       /* [0.5, 1) */
    return (uint16_t)(dot_bits((float)ldexp(rint(m * 256.0), e - 8)) >> 16);
}

/* A finite float as sign, integer significand and exponent: x = (-1)^neg * m * 2^e, m odd
   (so a bf16's has at most 8 bits, a product's 16: the sums below fit in 64 bits); m = 0:
   zero, and subnormals read as zeros. */
typedef struct dot_num {
    int neg;
    int64_t m;
    int e;
} dot_num;

static dot_num dot_split(float f) {
    uint32_t u = dot_bits(f), ef = (u >> 23) & 0xFFu;
    dot_num n;
    n.neg = (int)(u >> 31);
    n.m = ef == 0 ? 0 : (int64_t)((u & 0x7FFFFFu) | 0x800000u);
    n.e = (int)ef - 150;
    while (n.m != 0 && !(n.m & 1)) {
        n.m >>= 1;
        ++n.e;
    }
    return n;
}

static int dot_bitlen(uint64_t v) {
    int b = 0;
    while (v) {
        ++b;
        v >>= 1;
    }
    return b;
}

/* (-1)^neg * mag * 2^e rounded to 24 bits, to nearest even, with no floor on the exponent;
   below FLT_MIN: a zero of that sign; 2^128 and above: infinity. */
static float dot_round(int neg, uint64_t mag, int e) {
    int b = dot_bitlen(mag), top;
    float r;
    if (b > 24) {
        int sh = b - 24;
        uint64_t q = mag >> sh, rest = mag & ((1ull << sh) - 1), half = 1ull << (sh - 1);
        if (rest > half || (rest == half && (q & 1u))) ++q;
        if (q == 1ull << 24) {
            q >>= 1;
            ++sh;
        }
        mag = q;
        e += sh;
    }
    top = e + dot_bitlen(mag) - 1;
    if (top < -126) r = 0.0f;
    else if (top >= 128) r = INFINITY;
    else r = (float)ldexp((double)mag, e);
    return neg ? -r : r;
}

/* acc + a * b, one step of a lane (a and b finite; an infinite acc stays, the exact product
   being finite). */
static float dot_model_step(float acc, float a, float b) {
    dot_num x = dot_split(a), y = dot_split(b), s = dot_split(acc), p;
    int tp, ts;
    if (acc - acc != 0.0f) return acc;
    p.neg = x.neg ^ y.neg;
    p.m = x.m * y.m;
    p.e = x.e + y.e;
    if (p.m == 0 && s.m == 0) return p.neg && s.neg ? -0.0f : 0.0f;
    if (p.m == 0) return dot_round(s.neg, (uint64_t)s.m, s.e);
    if (s.m == 0) return dot_round(p.neg, (uint64_t)p.m, p.e);
    tp = p.e + dot_bitlen((uint64_t)p.m) - 1;
    ts = s.e + dot_bitlen((uint64_t)s.m) - 1;
    if (tp - ts > 30) return dot_round(p.neg, (uint64_t)p.m, p.e);   /* the other below a 64th of an ulp */
    if (ts - tp > 30) return dot_round(s.neg, (uint64_t)s.m, s.e);
    {
        int lo = p.e < s.e ? p.e : s.e;
        int64_t sum = (p.neg ? -1 : 1) * (p.m << (p.e - lo)) + (s.neg ? -1 : 1) * (s.m << (s.e - lo));
        if (sum == 0) return 0.0f;
        return dot_round(sum < 0, (uint64_t)(sum < 0 ? -sum : sum), lo);
    }
}

/* One lane: x and w bf16 pairs, the even k in the low half. */
static float dot_model_lane(float acc, uint32_t x, uint32_t w) {
    acc = dot_model_step(acc, test_bf16_to_float((uint16_t)(x >> 16)), test_bf16_to_float((uint16_t)(w >> 16)));
    return dot_model_step(acc, test_bf16_to_float((uint16_t)(x & 0xFFFFu)), test_bf16_to_float((uint16_t)(w & 0xFFFFu)));
}

/* >>the model against the instructions */
#ifdef DOT_X86
static __attribute__((target("avx512f,avx512bf16"))) void dot_instruction(const float* acc, const uint32_t* x,
                                                                          const uint32_t* w, float* out) {
    __m512i xv = _mm512_loadu_si512((const void*)x), wv = _mm512_loadu_si512((const void*)w);
    _mm512_storeu_ps(out, _mm512_dpbf16_ps(_mm512_loadu_ps(acc), (__m512bh)wv, (__m512bh)xv));
}

static __attribute__((target("avx512f,avx512bf16"))) void dot_convert(const float* in, uint16_t* out) {
    __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(in + 16), _mm512_loadu_ps(in));
    _mm512_storeu_si512((void*)out, (__m512i)v);
}
#endif

#ifdef DOT_X86
static float dot_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* A random bf16: exponents near 1 (mode 0), anywhere finite (1), or tiny, subnormals included (2). */
static uint16_t dot_random_bf16(uint64_t* state, int mode) {
    uint64_t r = test_rng_next(state);
    int e = mode == 0 ? 120 + (int)((r >> 1) % 15) : mode == 1 ? (int)((r >> 1) % 255) : (int)((r >> 1) % 8);
    return (uint16_t)(((r & 1u) << 15) | ((uint32_t)e << 7) | ((r >> 9) & 0x7Fu));
}

static float dot_random_acc(uint64_t* state, int mode) {
    uint64_t r = test_rng_next(state);
    int e = mode == 0 ? 115 + (int)((r >> 1) % 25) : mode == 1 ? (int)((r >> 1) % 255) : (int)((r >> 1) % 4);
    return dot_from_bits((uint32_t)((r & 1u) << 31) | ((uint32_t)e << 23) | (uint32_t)((r >> 9) & 0x7FFFFFu));
}

#endif

START_TEST(model_is_the_instruction) {
#ifdef DOT_X86
    uint64_t state = 20261203;
    long lanes = 0, i;
    int j, mismatches = 0;
    if (!dot_cpu_has_bf16()) {
        printf("bf16_dot: this CPU has no AVX512-BF16: the model was not held against vdpbf16ps\n");
        return;
    }
    for (i = 0; i < 25000; ++i) {
        float acc[16], out[16], conv_in[32];
        uint32_t x[16], w[16];
        uint16_t conv_out[32];
        int mode = (int)(i % 7);
        for (j = 0; j < 16; ++j) {
            int m = mode < 3 ? mode : mode == 3 ? 0 : mode == 4 ? 2 : (int)(test_rng_next(&state) % 3);
            x[j] = dot_random_bf16(&state, m) | (uint32_t)dot_random_bf16(&state, m) << 16;
            w[j] = dot_random_bf16(&state, m) | (uint32_t)dot_random_bf16(&state, m) << 16;
            acc[j] = mode == 6 ? 0.0f : dot_random_acc(&state, m);
            if (mode == 5 && (test_rng_next(&state) & 1u)) {    /* the odd product cancels acc */
                float c = -(float)((double)test_bf16_to_float((uint16_t)(x[j] >> 16)) *
                                   (double)test_bf16_to_float((uint16_t)(w[j] >> 16)));
                if (c - c == 0.0f) acc[j] = c;
            }
            if ((test_rng_next(&state) & 15u) == 0) acc[j] = (test_rng_next(&state) & 1u) ? -0.0f : 0.0f;
        }
        dot_instruction(acc, x, w, out);
        for (j = 0; j < 16; ++j, ++lanes) {
            float want = dot_model_lane(acc[j], x[j], w[j]);
            if (dot_bits(want) != dot_bits(out[j]) && mismatches++ < 5)
                ck_abort_msg("lane acc %a, x %08x, w %08x: vdpbf16ps %a, the model %a", (double)acc[j], x[j], w[j],
                             (double)out[j], (double)want);
        }
        for (j = 0; j < 32; ++j) {  /* every exponent, ties (low 16 bits 0x8000), NaN and infinity */
            uint32_t u = (uint32_t)test_rng_next(&state);
            if (j % 4 == 0) u = (u & 0xFFFF0000u) | 0x8000u;
            if (j == 7) u = 0x7F800000u | (u & 0x80000000u);
            if (j == 9) u |= 0x7F800000u;
            conv_in[j] = dot_from_bits(u);
        }
        dot_convert(conv_in, conv_out);
        for (j = 0; j < 32; ++j)
            ck_assert_msg(dot_model_bf16(conv_in[j]) == conv_out[j], "bf16 of %08x: vcvtne2ps2bf16 %04x, the model %04x",
                          dot_bits(conv_in[j]), conv_out[j], dot_model_bf16(conv_in[j]));
    }
    ck_assert_int_eq(mismatches, 0);
    printf("bf16_dot: the model is vdpbf16ps on %ld random lanes and vcvtne2ps2bf16 on %ld floats\n", lanes, 32 * i);
#else
    printf("bf16_dot: not x86 with gcc or clang: the model was not held against vdpbf16ps\n");
#endif
}
END_TEST

/* >>one expert, bf16 weights */
typedef struct dot_expert {
    int d_model, d_ff;
    uint16_t *w1, *w3, *w2;
    float *b1, *b3, *b2;
    moe_ep_expert_weights stored;
} dot_expert;

static uint16_t* dot_bf16_weights(size_t n, float scale, uint64_t seed) {
    float* w = test_random_floats(n, scale, seed);
    uint16_t* h = (uint16_t*)malloc(sizeof(uint16_t) * n);
    size_t i;
    for (i = 0; i < n; ++i) h[i] = test_bf16_from_float(w[i]);
    free(w);
    return h;
}

static void dot_expert_init(dot_expert* e, int d_model, int d_ff, uint64_t seed) {
    size_t n = (size_t)d_model * (size_t)d_ff;
    memset(e, 0, sizeof *e);
    e->d_model = d_model;
    e->d_ff = d_ff;
    e->w1 = dot_bf16_weights(n, 1.5f / sqrtf((float)d_model), seed);
    e->w3 = dot_bf16_weights(n, 1.5f / sqrtf((float)d_model), seed + 1);
    e->w2 = dot_bf16_weights(n, 1.5f / sqrtf((float)d_ff), seed + 2);
    e->b1 = test_random_floats((size_t)d_ff, 0.5f, seed + 3);
    e->b3 = test_random_floats((size_t)d_ff, 0.5f, seed + 4);
    e->b2 = test_random_floats((size_t)d_model, 0.5f, seed + 5);
    e->stored.w1_stored = e->w1;
    e->stored.w3_stored = e->w3;
    e->stored.w2_stored = e->w2;
    e->stored.b1 = e->b1;
    e->stored.b3 = e->b3;
    e->stored.b2 = e->b2;
}

static void dot_expert_free(dot_expert* e) {
    free(e->w1); free(e->w3); free(e->w2);
    free(e->b1); free(e->b3); free(e->b2);
}

static moe_ep_result dot_ffn(const dot_expert* e, moe_ep_arithmetic arithmetic, moe_ep_activation act,
                             moe_ep_kernel kernel, int threads, const float* x, int64_t rows, float* out, char* err,
                             size_t err_size) {
    moe_ep_context* ctx = NULL;
    moe_ep_result res = moe_ep_create(&(moe_ep_desc){ .d_model = e->d_model, .d_ff = e->d_ff, .num_experts = 1,
                                                      .activation = act, .num_threads = threads,
                                                      .experts = &e->stored, .weight_format = MOE_EP_WEIGHT_FORMAT_BF16,
                                                      .arithmetic = arithmetic, .kernel = kernel,
                                                      .create_error = err, .create_error_size = err_size }, &ctx);
    if (res != MOE_EP_OK) return res;
    res = moe_ep_expert_ffn(ctx, 0, x, rows, out);
    if (res != MOE_EP_OK) snprintf(err, err_size, "%s", moe_ep_last_error(ctx));
    moe_ep_destroy(ctx);
    return res;
}

/* The model's chain of one output: sum over pairs i = 0, 1, ... of the activations' pair
   with row `row` of W [n, k] (bf16), from +0. */
static float dot_model_chain(const uint32_t* pairs, const uint16_t* w, int k, int row) {
    float acc = 0.0f;
    int i;
    for (i = 0; i < (k + 1) / 2; ++i) {
        const uint16_t* wr = w + (size_t)row * (size_t)k;
        uint32_t wp = wr[2 * i] | (2 * i + 1 < k ? (uint32_t)wr[2 * i + 1] << 16 : 0u);
        acc = dot_model_lane(acc, pairs[i], wp);
    }
    return acc;
}

static void dot_model_pairs(const float* v, int k, uint32_t* pairs) {
    int i;
    for (i = 0; i < (k + 1) / 2; ++i)
        pairs[i] = dot_model_bf16(v[2 * i]) | (2 * i + 1 < k ? (uint32_t)dot_model_bf16(v[2 * i + 1]) << 16 : 0u);
}

/* The ReLU FFN of the model: h = relu(chain(x, w1) + b1), y = chain(h, w2) + b2. */
static void dot_model_relu_ffn(const dot_expert* e, const float* x, int64_t rows, float* out) {
    int D = e->d_model, F = e->d_ff, f, o;
    uint32_t* xp = (uint32_t*)malloc(sizeof(uint32_t) * (size_t)(D + 1));
    uint32_t* hp = (uint32_t*)malloc(sizeof(uint32_t) * (size_t)(F + 1));
    float* h = (float*)malloc(sizeof(float) * (size_t)F);
    int64_t r;
    for (r = 0; r < rows; ++r) {
        dot_model_pairs(x + r * D, D, xp);
        for (f = 0; f < F; ++f) {
            float g = dot_model_chain(xp, e->w1, D, f) + e->b1[f];
            h[f] = g > 0.0f ? g : 0.0f;
        }
        dot_model_pairs(h, F, hp);
        for (o = 0; o < D; ++o) out[r * D + o] = dot_model_chain(hp, e->w2, F, o) + e->b2[o];
    }
    free(xp);
    free(hp);
    free(h);
}

/* >>the library against the model, bit for bit */
static const int dot_shapes[2][2] = { { 301, 69 }, { 601, 530 } };     /* odd; then K past the 256-pair slice */
static const int64_t dot_rows[2][4] = { { 1, 3, 13, 200 }, { 1, 5, 25, 0 } };

START_TEST(ffn_is_the_model) {
    moe_ep_kernel paths[2];
    int npaths = dot_paths(paths), p, ri;
    const int D = dot_shapes[_i][0], F = dot_shapes[_i][1];
    const int64_t max_rows = 200;
    dot_expert e;
    float* x = test_random_floats((size_t)(max_rows + 1) * D, 1.0f, 500 + (uint64_t)_i);
    float* want = (float*)malloc(sizeof(float) * (size_t)max_rows * D);
    float* out = (float*)malloc(sizeof(float) * (size_t)(max_rows + 1) * D);
    char err[256] = "";
    dot_expert_init(&e, D, F, 600 + (uint64_t)_i);
    ck_assert_int_ge(npaths, 1);
    for (ri = 0; ri < 4 && dot_rows[_i][ri] > 0; ++ri) {
        int64_t rows = dot_rows[_i][ri];
        size_t n = (size_t)rows * D;
        dot_model_relu_ffn(&e, x, rows, want);
        for (p = 0; p < npaths; ++p) {
            test_poison(out, n + D);
            ck_assert_msg(dot_ffn(&e, MOE_EP_ARITHMETIC_BF16_DOT, MOE_EP_ACTIVATION_RELU, paths[p], 2, x, rows, out, err,
                                  sizeof err) == MOE_EP_OK, "%s: %s", moe_ep_kernel_string(paths[p]), err);
            ck_assert_msg(test_is_poisoned(out + n, D), "%s: wrote past the last row", moe_ep_kernel_string(paths[p]));
            ck_assert_msg(test_first_difference(out, want, n) == n,
                          "%s, %dx%d, %lld rows: element %zu is %a, the model's chains give %a",
                          moe_ep_kernel_string(paths[p]), D, F, (long long)rows, test_first_difference(out, want, n),
                          (double)out[test_first_difference(out, want, n)],
                          (double)want[test_first_difference(out, want, n)]);
        }
    }
    dot_expert_free(&e);
    free(x);
    free(want);
    free(out);
}
END_TEST

/* >>against float64 of the bf16-rounded activations and weights, and the exact arithmetic */
static const moe_ep_activation dot_acts[] = { MOE_EP_ACTIVATION_SWIGLU, MOE_EP_ACTIVATION_GELU,
                                              MOE_EP_ACTIVATION_SWIGLU_CLAMPED, MOE_EP_ACTIVATION_RELU };
static const char* const dot_act_names[] = { "SwiGLU", "GELU", "clamped SwiGLU", "ReLU" };

static void dot_reference(const dot_expert* e, moe_ep_activation act, const float* x, int64_t rows, double* out) {
    int D = e->d_model, F = e->d_ff, f, i, o;
    bool gated = act == MOE_EP_ACTIVATION_SWIGLU || act == MOE_EP_ACTIVATION_SWIGLU_CLAMPED;
    double* h = (double*)malloc(sizeof(double) * (size_t)F);
    int64_t r;
    for (r = 0; r < rows; ++r) {
        for (f = 0; f < F; ++f) {
            double a = e->b1[f], b = gated ? e->b3[f] : 0.0, v;
            for (i = 0; i < D; ++i) {
                double xi = (double)test_bf16_to_float(dot_model_bf16(x[r * D + i]));
                a += (double)test_bf16_to_float(e->w1[(size_t)f * D + i]) * xi;
                b += (double)test_bf16_to_float(e->w3[(size_t)f * D + i]) * xi;
            }
            v = act == MOE_EP_ACTIVATION_SWIGLU_CLAMPED ? test_ref_swiglu_clamped(a, b, 1.702, 7.0)
                                                        : test_ref_activation(act, a, b);
            h[f] = (double)test_bf16_to_float(dot_model_bf16((float)v));
        }
        for (o = 0; o < D; ++o) {
            double acc = e->b2[o];
            for (f = 0; f < F; ++f) acc += (double)test_bf16_to_float(e->w2[(size_t)o * F + f]) * h[f];
            out[r * D + o] = acc;
        }
    }
    free(h);
}

START_TEST(ffn_vs_reference) {
    moe_ep_kernel paths[2];
    int npaths = dot_paths(paths), p;
    const int D = 300, F = 70;
    const int64_t rows = 64;
    size_t n = (size_t)rows * D, i;
    dot_expert e;
    float* x = test_random_floats(n, 1.0f, 700 + (uint64_t)_i);
    float* out = (float*)malloc(sizeof(float) * n);
    float* exact = (float*)malloc(sizeof(float) * n);
    double* ref = (double*)malloc(sizeof(double) * n);
    char err[256] = "";
    double rel, rel_exact;
    dot_expert_init(&e, D, F, 800 + (uint64_t)_i);
    dot_reference(&e, dot_acts[_i], x, rows, ref);
    ck_assert(dot_ffn(&e, MOE_EP_ARITHMETIC_EXACT, dot_acts[_i], MOE_EP_KERNEL_DEFAULT, 1, x, rows, exact, err,
                      sizeof err) == MOE_EP_OK);
    for (p = 0; p < npaths; ++p) {
        test_poison(out, n);
        ck_assert_msg(dot_ffn(&e, MOE_EP_ARITHMETIC_BF16_DOT, dot_acts[_i], paths[p], 1, x, rows, out, err,
                              sizeof err) == MOE_EP_OK, "%s", err);
        rel = check_rel_error(out, ref, n);
        for (i = 0; i < n; ++i) ref[i] = (double)exact[i];
        rel_exact = check_rel_error(out, ref, n);
        dot_reference(&e, dot_acts[_i], x, rows, ref);
        if (p == 0)
            printf("bf16_dot: %s %dx%d: max |y - ref| / max |ref| = %.2e against float64 of the bf16-rounded "
                   "activations and weights, %.2e against the exact arithmetic\n", dot_act_names[_i], D, F, rel,
                   rel_exact);
        ck_assert_msg(rel < 2e-3, "%s %s: %.3g against float64 of the bf16-rounded values", moe_ep_kernel_string(paths[p]),
                      dot_act_names[_i], rel);
        ck_assert_msg(rel_exact < 1e-2 && rel_exact > 0.0, "%s %s: %.3g against the exact arithmetic (0: not applied)",
                      moe_ep_kernel_string(paths[p]), dot_act_names[_i], rel_exact);
    }
    dot_expert_free(&e);
    free(x);
    free(out);
    free(exact);
    free(ref);
}
END_TEST

/* >>the whole layer: the same bits for R = 1..5, threads 1..3 and both paths */
START_TEST(layer_bitwise) {
    moe_ep_kernel paths[2];
    int npaths = dot_paths(paths), p, R, threads;
    check_model m;
    static const int64_t tokens[6][5] = { { 0 }, { 41 }, { 23, 18 }, { 20, 0, 21 }, { 9, 14, 0, 18 },
                                          { 9, 14, 0, 11, 7 } };
    const int64_t all = 41;
    float* x;
    float* first;
    float* y;
    char errors[1024];
    check_model_init(&m, 41, 73, 8, 2, MOE_EP_ACTIVATION_SWIGLU, true, 4000);   /* odd: pairs padded */
    m.weight_format = MOE_EP_WEIGHT_FORMAT_BF16;    /* fp32 weights, converted at create */
    m.arithmetic = MOE_EP_ARITHMETIC_BF16_DOT;
    m.shared.d_ff = 24;
    m.shared.weights = m.experts[1];
    x = test_random_floats((size_t)all * 41, 1.0f, 4100);
    first = (float*)malloc(sizeof(float) * (size_t)all * 41);
    y = (float*)malloc(sizeof(float) * (size_t)all * 41);
    /* R = 0: the built-in single-rank transport; R = 3 also with the pthreads transport packing
       the rows (row lists declined) */
    for (p = 0; p < npaths; ++p)
        for (R = 0; R <= 5; ++R)
            for (threads = 1; threads <= 3; ++threads) {
                int variant, variants = R == 3 && threads == 1 ? 2 : 1;
                for (variant = 0; variant < variants; ++variant) {
                    check_layer L;
                    check_layer_init(&L, &m, R, tokens[R > 0 ? R : 1], x, y);
                    L.num_threads = threads;
                    L.kernel = paths[p];
                    L.decline_row_lists = variant == 1;
                    test_poison(y, (size_t)all * 41);
                    ck_assert_msg(check_run_layer(&L) == MOE_EP_OK, "%s R %d: %s", moe_ep_kernel_string(paths[p]), R,
                                  check_layer_errors(&L, errors, sizeof errors));
                    if (p == 0 && R == 0 && threads == 1) {
                        memcpy(first, y, sizeof(float) * (size_t)all * 41);
                        continue;
                    }
                    ck_assert_msg(test_first_difference(first, y, (size_t)all * 41) == (size_t)all * 41,
                                  "%s, %d ranks, %d threads (variant %d) differs from %s, the built-in rank, 1 thread "
                                  "at element %zu", moe_ep_kernel_string(paths[p]), R, threads, variant,
                                  moe_ep_kernel_string(paths[0]), test_first_difference(first, y, (size_t)all * 41));
                }
            }
    check_model_free(&m);
    free(x);
    free(first);
    free(y);
}
END_TEST

/* >>bad input: the rule's log item, no context */
typedef struct dot_bad {
    const char* what;
    int arithmetic;
    moe_ep_weight_format format;
    moe_ep_kernel kernel;
    moe_ep_log_item item;
} dot_bad;

static const dot_bad dot_bad_cases[] = {
    { "arithmetic out of range", 7, MOE_EP_WEIGHT_FORMAT_BF16, MOE_EP_KERNEL_DEFAULT, MOE_EP_LOG_ITEM_DESC_ARITHMETIC },
    { "arithmetic negative", -1, MOE_EP_WEIGHT_FORMAT_BF16, MOE_EP_KERNEL_DEFAULT, MOE_EP_LOG_ITEM_DESC_ARITHMETIC },
    { "BF16_DOT with fp32 weights", MOE_EP_ARITHMETIC_BF16_DOT, MOE_EP_WEIGHT_FORMAT_FP32, MOE_EP_KERNEL_DEFAULT,
      MOE_EP_LOG_ITEM_DESC_ARITHMETIC },
    { "BF16_DOT with fp16 weights", MOE_EP_ARITHMETIC_BF16_DOT, MOE_EP_WEIGHT_FORMAT_FP16, MOE_EP_KERNEL_DEFAULT,
      MOE_EP_LOG_ITEM_DESC_ARITHMETIC },
    { "BF16_DOT with int8 weights", MOE_EP_ARITHMETIC_BF16_DOT, MOE_EP_WEIGHT_FORMAT_INT8, MOE_EP_KERNEL_DEFAULT,
      MOE_EP_LOG_ITEM_DESC_ARITHMETIC },
    { "BF16_DOT on the exact AVX-512 kernel", MOE_EP_ARITHMETIC_BF16_DOT, MOE_EP_WEIGHT_FORMAT_BF16,
      MOE_EP_KERNEL_AVX512, MOE_EP_LOG_ITEM_DESC_KERNEL },
    { "BF16_DOT on the AVX2 kernel", MOE_EP_ARITHMETIC_BF16_DOT, MOE_EP_WEIGHT_FORMAT_BF16, MOE_EP_KERNEL_AVX2,
      MOE_EP_LOG_ITEM_DESC_KERNEL },
    { "the AVX512_BF16 kernel with the exact arithmetic", MOE_EP_ARITHMETIC_EXACT, MOE_EP_WEIGHT_FORMAT_BF16,
      MOE_EP_KERNEL_AVX512_BF16, MOE_EP_LOG_ITEM_DESC_KERNEL },
    { "the AVX512_BF16 kernel by default arithmetic", MOE_EP_ARITHMETIC_DEFAULT, MOE_EP_WEIGHT_FORMAT_FP32,
      MOE_EP_KERNEL_AVX512_BF16, MOE_EP_LOG_ITEM_DESC_KERNEL },
};

START_TEST(bad_input) {
    const dot_bad* c = &dot_bad_cases[_i];
    check_model m;
    moe_ep_desc desc;
    check_model_init(&m, 8, 16, 1, 1, MOE_EP_ACTIVATION_SWIGLU, false, 55);
    memset(&desc, 0, sizeof desc);
    desc.d_model = 8;
    desc.d_ff = 16;
    desc.num_experts = 1;
    desc.experts = m.experts;
    desc.weight_format = c->format;
    desc.arithmetic = (moe_ep_arithmetic)c->arithmetic;
    desc.kernel = c->kernel;
    check_create_refused(&desc, c->item, c->what);
    check_model_free(&m);
}
END_TEST

/* >>the query: the arithmetic and the kernel that runs it */
START_TEST(query) {
    check_model m;
    moe_ep_context* ctx = NULL;
    moe_ep_desc d;
    check_model_init(&m, 8, 16, 1, 1, MOE_EP_ACTIVATION_SWIGLU, false, 5);
    ck_assert(moe_ep_create(&(moe_ep_desc){ .d_model = 8, .d_ff = 16, .num_experts = 1, .experts = m.experts,
                                            .weight_format = MOE_EP_WEIGHT_FORMAT_BF16,
                                            .arithmetic = MOE_EP_ARITHMETIC_BF16_DOT }, &ctx) == MOE_EP_OK);
    d = moe_ep_query(ctx);
    ck_assert_int_eq(d.arithmetic, MOE_EP_ARITHMETIC_BF16_DOT);
#if defined(DOT_X86) && !defined(MOE_EP_NO_SIMD)
    ck_assert_msg(d.kernel == (dot_cpu_has_bf16() ? MOE_EP_KERNEL_AVX512_BF16 : MOE_EP_KERNEL_PORTABLE),
                  "BF16_DOT by default runs on %s", moe_ep_kernel_string(d.kernel));
#else
    ck_assert_int_eq(d.kernel, MOE_EP_KERNEL_PORTABLE);
#endif
    moe_ep_destroy(ctx);
    ck_assert(moe_ep_create(&(moe_ep_desc){ .d_model = 8, .d_ff = 16, .num_experts = 1, .experts = m.experts,
                                            .weight_format = MOE_EP_WEIGHT_FORMAT_BF16 }, &ctx) == MOE_EP_OK);
    d = moe_ep_query(ctx);
    ck_assert_int_eq(d.arithmetic, MOE_EP_ARITHMETIC_EXACT);
    ck_assert_str_eq(moe_ep_kernel_string(d.kernel), moe_ep_kernel_path());
    ck_assert_str_eq(moe_ep_kernel_string(MOE_EP_KERNEL_AVX512_BF16), "AVX512-BF16");
    moe_ep_destroy(ctx);
    check_model_free(&m);
}
END_TEST

Suite* bf16_dot_suite(void) {
    Suite* s = suite_create("bf16_dot");
    TCase* tc = tcase_create("bf16_dot");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, model_is_the_instruction);
    tcase_add_loop_test(tc, ffn_is_the_model, 0, 2);
    tcase_add_loop_test(tc, ffn_vs_reference, 0, 4);
    tcase_add_test(tc, layer_bitwise);
    tcase_add_loop_test(tc, bad_input, 0, (int)(sizeof dot_bad_cases / sizeof dot_bad_cases[0]));
    tcase_add_test(tc, query);
    suite_add_tcase(s, tc);
    return s;
}
