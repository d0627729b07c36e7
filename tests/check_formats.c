/* check_formats.c -- bf16, fp16 and int8 expert weights, and the kernel paths.

   - each format against a float64 FFN over the same quantised weights (the stored values
     widened in double; int8: q * scale), on every kernel path this build has and this CPU
     runs, with and without biases, rows crossing the row tiles and blocks, K past the K
     slice: max |out - ref| / max |ref| < 1e-5; outputs poisoned first, one row past the
     end must stay poisoned;
   - weights handed in fp32 (converted at create) against the same values handed in
     stored (the bits the test made itself: bf16 and fp16 to nearest even -- checked
     against F16C's vcvtps2ph where the CPU has it -- int8 by the documented rule
     max |w| / 127 per output channel, round half away from zero): the same output bits;
   - each format against the fp32 layer of the same fp32 weights: the bound the format's
     rounding implies (bf16 1e-2, fp16 2e-3), int8 measured on uniform and on
     heavy-tailed weights (the figures are printed; README "Weight formats");
   - bitwise equality (memcmp) of the whole layer for each format across R = 1..5 pthreads
     ranks, 1..3 threads and every kernel path here;
   - weight memory: moe_ep_weight_bytes in the format's size;
   - invalid combinations: a named error (log item), out untouched.
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
#define FMT_HAVE_F16C_TEST 1
#endif

static const moe_ep_weight_format fmt_formats[] = { MOE_EP_WEIGHT_FORMAT_FP32, MOE_EP_WEIGHT_FORMAT_BF16,
                                                    MOE_EP_WEIGHT_FORMAT_FP16, MOE_EP_WEIGHT_FORMAT_INT8 };
static const char* const fmt_names[] = { "fp32", "bf16", "fp16", "int8" };
#define FMT_COUNT 4

/* The kernel paths this build has and this CPU runs (portable first). */
static int fmt_paths(moe_ep_kernel* out) {
    int n = 0, k;
    for (k = MOE_EP_KERNEL_PORTABLE; k <= MOE_EP_KERNEL_NEON; ++k) {
        moe_ep_context* ctx = NULL;
        float w = 0.0f;
        moe_ep_expert_weights e;
        memset(&e, 0, sizeof e);
        e.w1 = e.w3 = e.w2 = &w;
        if (moe_ep_create(&(moe_ep_desc){ .d_model = 1, .d_ff = 1, .num_experts = 1, .experts = &e,
                                          .kernel = (moe_ep_kernel)k }, &ctx) == MOE_EP_OK) {
            out[n++] = (moe_ep_kernel)k;
            moe_ep_destroy(ctx);
        }
    }
    return n;
}

/* >>the test's own conversions */
static double fmt_half_to_double(uint16_t h) {
    int e = (h >> 10) & 0x1F, m = h & 0x3FF;
    double v = e == 0 ? ldexp((double)m, -24) : ldexp((double)(m | 0x400), e - 25);
    return (h & 0x8000) ? -v : v;
}

/* float -> fp16 to nearest even, in double arithmetic: a in units of its binade's half ulp
   (2^-24 below 2^-14), rounded by rint (ties to even), then encoded. */
static uint16_t fmt_half_from_float(float f) {
    double a = fabs((double)f), ulp, v;
    uint16_t sign = f < 0.0f || (f == 0.0f && signbit(f)) ? 0x8000 : 0;
    int ex;
    if (a != a) return (uint16_t)(sign | 0x7E00);
    if (a >= 65520.0) return (uint16_t)(sign | 0x7C00);
    if (a < ldexp(1.0, -14)) {
        ulp = ldexp(1.0, -24);
        return (uint16_t)(sign | (uint16_t)rint(a / ulp));    /* 0x400: the smallest normal, encoded right */
    }
    frexp(a, &ex);                  /* a in [2^(ex-1), 2^ex) */
    ulp = ldexp(1.0, ex - 11);
    v = rint(a / ulp) * ulp;
    frexp(v, &ex);
    return (uint16_t)(sign | (uint16_t)((ex - 1 + 15) << 10) | (uint16_t)(ldexp(v, 11 - ex) - 1024.0));
}

static float fmt_round_half_away(float r) {
    float a = r < 0.0f ? -r : r;
    int q;
    if (a > 127.0f) a = 127.0f;
    q = (int)a;
    if (a - (float)q >= 0.5f) ++q;
    return (float)(r < 0.0f ? -q : q);
}

/* >>one expert, stored in a format */
typedef struct fmt_tensor {
    int rows, cols;
    float* fp32;                    /* the user's fp32 values (random) */
    void* stored;                   /* the test's own conversion of fp32 to the format */
    float* scale;                   /* int8: per row */
    double* value;                  /* what the stored elements mean, in double */
} fmt_tensor;

static void fmt_tensor_init(fmt_tensor* t, moe_ep_weight_format f, int rows, int cols, const float* fp32) {
    size_t n = (size_t)rows * (size_t)cols, i;
    int r, c;
    t->rows = rows;
    t->cols = cols;
    t->fp32 = (float*)malloc(sizeof(float) * n);
    memcpy(t->fp32, fp32, sizeof(float) * n);
    t->value = (double*)malloc(sizeof(double) * n);
    t->scale = NULL;
    t->stored = malloc(n * 4 + 1);
    for (i = 0; i < n; ++i) {
        if (f == MOE_EP_WEIGHT_FORMAT_BF16) {
            uint16_t h = test_bf16_from_float(fp32[i]);
            ((uint16_t*)t->stored)[i] = h;
            t->value[i] = (double)test_bf16_to_float(h);
        } else if (f == MOE_EP_WEIGHT_FORMAT_FP16) {
            uint16_t h = fmt_half_from_float(fp32[i]);
            ((uint16_t*)t->stored)[i] = h;
            t->value[i] = fmt_half_to_double(h);
        } else {
            t->value[i] = (double)fp32[i];
        }
    }
    if (f == MOE_EP_WEIGHT_FORMAT_INT8) {
        t->scale = (float*)malloc(sizeof(float) * (size_t)rows);
        for (r = 0; r < rows; ++r) {
            float amax = 0.0f;
            for (c = 0; c < cols; ++c) amax = fmaxf(amax, fabsf(fp32[(size_t)r * cols + c]));
            t->scale[r] = amax > 0.0f ? amax / 127.0f : 1.0f;
            for (c = 0; c < cols; ++c) {
                size_t at = (size_t)r * cols + c;
                float q = fmt_round_half_away(fp32[at] / t->scale[r]);
                ((int8_t*)t->stored)[at] = (int8_t)q;
                t->value[at] = (double)q * (double)t->scale[r];
            }
        }
    }
}

static void fmt_tensor_free(fmt_tensor* t) {
    free(t->fp32);
    free(t->stored);
    free(t->scale);
    free(t->value);
}

typedef struct fmt_expert {
    int d_model, d_ff;
    moe_ep_weight_format format;
    fmt_tensor w1, w3, w2;
    float *b1, *b3, *b2;
    moe_ep_expert_weights as_fp32, as_stored;
} fmt_expert;

/* heavy: weights with a heavy tail (one in 64 is 16x larger), else uniform. */
static void fmt_expert_init(fmt_expert* e, moe_ep_weight_format f, int d_model, int d_ff, bool biases, bool heavy,
                            uint64_t seed) {
    size_t n = (size_t)d_model * (size_t)d_ff, i;
    float* w = (float*)malloc(sizeof(float) * 3 * n);
    uint64_t state = seed;
    memset(e, 0, sizeof *e);
    e->d_model = d_model;
    e->d_ff = d_ff;
    e->format = f;
    test_fill(w, 2 * n, 1.5f / sqrtf((float)d_model), &state);
    test_fill(w + 2 * n, n, 1.5f / sqrtf((float)d_ff), &state);
    if (heavy)
        for (i = 0; i < 3 * n; ++i)
            if ((test_rng_next(&state) & 63) == 0) w[i] *= 16.0f;
    fmt_tensor_init(&e->w1, f, d_ff, d_model, w);
    fmt_tensor_init(&e->w3, f, d_ff, d_model, w + n);
    fmt_tensor_init(&e->w2, f, d_model, d_ff, w + 2 * n);
    free(w);
    if (biases) {
        e->b1 = test_random_floats((size_t)d_ff, 0.5f, seed + 11);
        e->b3 = test_random_floats((size_t)d_ff, 0.5f, seed + 12);
        e->b2 = test_random_floats((size_t)d_model, 0.5f, seed + 13);
    }
    e->as_fp32.w1 = e->w1.fp32;
    e->as_fp32.w3 = e->w3.fp32;
    e->as_fp32.w2 = e->w2.fp32;
    e->as_fp32.b1 = e->as_stored.b1 = e->b1;
    e->as_fp32.b3 = e->as_stored.b3 = e->b3;
    e->as_fp32.b2 = e->as_stored.b2 = e->b2;
    if (f == MOE_EP_WEIGHT_FORMAT_FP32) {
        e->as_stored = e->as_fp32;
        return;
    }
    e->as_stored.w1_stored = e->w1.stored;
    e->as_stored.w3_stored = e->w3.stored;
    e->as_stored.w2_stored = e->w2.stored;
    e->as_stored.w1_scale = e->w1.scale;
    e->as_stored.w3_scale = e->w3.scale;
    e->as_stored.w2_scale = e->w2.scale;
}

static void fmt_expert_free(fmt_expert* e) {
    fmt_tensor_free(&e->w1);
    fmt_tensor_free(&e->w3);
    fmt_tensor_free(&e->w2);
    free(e->b1);
    free(e->b3);
    free(e->b2);
}

/* The FFN in double over the stored values. */
static void fmt_reference(const fmt_expert* e, moe_ep_activation act, const float* x, int64_t rows, double* out) {
    int D = e->d_model, F = e->d_ff, f, i, o;
    bool gated = act == MOE_EP_ACTIVATION_SWIGLU || act == MOE_EP_ACTIVATION_SWIGLU_CLAMPED;
    double* h = (double*)malloc(sizeof(double) * (size_t)F);
    int64_t r;
    for (r = 0; r < rows; ++r) {
        const float* xr = x + r * D;
        for (f = 0; f < F; ++f) {
            double a = e->b1 ? e->b1[f] : 0.0, b = gated && e->b3 ? e->b3[f] : 0.0;
            for (i = 0; i < D; ++i) {
                a += e->w1.value[(size_t)f * D + i] * (double)xr[i];
                b += e->w3.value[(size_t)f * D + i] * (double)xr[i];
            }
            h[f] = test_ref_activation(act, a, b);
        }
        for (o = 0; o < D; ++o) {
            double acc = e->b2 ? e->b2[o] : 0.0;
            for (f = 0; f < F; ++f) acc += e->w2.value[(size_t)o * F + f] * h[f];
            out[r * D + o] = acc;
        }
    }
    free(h);
}

static moe_ep_result fmt_ffn(const fmt_expert* e, const moe_ep_expert_weights* w, moe_ep_weight_format f,
                             moe_ep_activation act, moe_ep_kernel kernel, int threads, const float* x, int64_t rows,
                             float* out, char* err, size_t err_size) {
    moe_ep_context* ctx = NULL;
    moe_ep_result res = moe_ep_create(&(moe_ep_desc){ .d_model = e->d_model, .d_ff = e->d_ff, .num_experts = 1,
                                                      .activation = act, .num_threads = threads, .experts = w,
                                                      .weight_format = f, .kernel = kernel,
                                                      .create_error = err, .create_error_size = err_size }, &ctx);
    if (res != MOE_EP_OK) return res;
    res = moe_ep_expert_ffn(ctx, 0, x, rows, out);
    if (res != MOE_EP_OK) snprintf(err, err_size, "%s", moe_ep_last_error(ctx));
    moe_ep_destroy(ctx);
    return res;
}

/* >>against float64 of the same quantised weights, on every path; fp32 in = stored in */
static const moe_ep_activation fmt_acts[] = { MOE_EP_ACTIVATION_SWIGLU, MOE_EP_ACTIVATION_GELU,
                                              MOE_EP_ACTIVATION_SWIGLU_CLAMPED };
static const char* const fmt_act_names[] = { "SwiGLU", "GELU", "clamped SwiGLU" };
static const int64_t fmt_rows[] = { 1, 3, 5, 13, 200 };

START_TEST(format_vs_reference) {
    int fi = _i / 6, a = (_i / 2) % 3;
    bool biases = _i % 2;
    moe_ep_weight_format f = fmt_formats[fi];
    moe_ep_kernel paths[8];
    int npaths = fmt_paths(paths), p, ri;
    fmt_expert e;
    const int D = 300, F = 70;      /* D past the K slice (256); neither a multiple of a tile */
    int64_t max_rows = 200;
    float* x = test_random_floats((size_t)(max_rows + 1) * D, 1.0f, 700 + (uint64_t)_i);
    float* out = (float*)malloc(sizeof(float) * (size_t)(max_rows + 1) * D);
    float* first = (float*)malloc(sizeof(float) * (size_t)(max_rows + 1) * D);
    float* other = (float*)malloc(sizeof(float) * (size_t)(max_rows + 1) * D);
    double* ref = (double*)malloc(sizeof(double) * (size_t)max_rows * D);
    char err[256] = "";
    fmt_expert_init(&e, f, D, F, biases, false, 800 + (uint64_t)_i);
    fmt_reference(&e, fmt_acts[a], x, max_rows, ref);
    for (p = 0; p < npaths; ++p)
        for (ri = 0; ri < 5; ++ri) {
            int64_t rows = fmt_rows[ri];
            size_t n = (size_t)rows * D;
            double rel;
            moe_ep_result res;
            test_poison(out, n + D);
            res = fmt_ffn(&e, &e.as_stored, f, fmt_acts[a], paths[p], 2, x, rows, out, err, sizeof err);
            ck_assert_msg(res == MOE_EP_OK, "%s %s %s: %s", fmt_names[fi], moe_ep_kernel_string(paths[p]),
                          fmt_act_names[a], err);
            ck_assert_msg(test_is_poisoned(out + n, D), "%s %s: wrote past the last row", fmt_names[fi],
                          moe_ep_kernel_string(paths[p]));
            rel = check_rel_error(out, ref, n);
            ck_assert_msg(rel < 1e-5, "%s %s %s%s rows %lld: relative error %.3g against float64 of the same "
                          "quantised weights", fmt_names[fi], moe_ep_kernel_string(paths[p]), fmt_act_names[a],
                          biases ? " biases" : "", (long long)rows, rel);
            if (rows != max_rows) continue;
            /* fp32 handed in, converted at create: the same bits as the stored values */
            test_poison(other, n);
            res = fmt_ffn(&e, &e.as_fp32, f, fmt_acts[a], paths[p], 1, x, rows, other, err, sizeof err);
            ck_assert_msg(res == MOE_EP_OK, "%s from fp32: %s", fmt_names[fi], err);
            ck_assert_msg(test_first_difference(out, other, n) == n,
                          "%s %s: fp32 converted at create differs from the stored values at element %zu",
                          fmt_names[fi], moe_ep_kernel_string(paths[p]), test_first_difference(out, other, n));
            /* and every path the same bits as the first */
            if (p == 0) memcpy(first, out, sizeof(float) * n);
            ck_assert_msg(test_first_difference(first, out, n) == n, "%s: %s differs from %s at element %zu",
                          fmt_names[fi], moe_ep_kernel_string(paths[p]), moe_ep_kernel_string(paths[0]),
                          test_first_difference(first, out, n));
        }
    fmt_expert_free(&e);
    free(x);
    free(out);
    free(first);
    free(other);
    free(ref);
}
END_TEST

/* >>fp32 -> fp16 at create rounds as F16C's vcvtps2ph (to nearest even), subnormal halves
   and ties included. */
#ifdef FMT_HAVE_F16C_TEST
static __attribute__((target("f16c"))) uint16_t fmt_f16c(float f) {
    return (uint16_t)_cvtss_sh(f, 0);
}
#endif

START_TEST(fp16_rounding_is_f16c) {
#ifdef FMT_HAVE_F16C_TEST
    unsigned eax, ebx, ecx = 0, edx;
    uint64_t state = 4242;
    int i, mismatches = 0;
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & (1u << 29))) return;    /* no F16C: nothing to hold */
    for (i = 0; i < 200000; ++i) {
        uint32_t u = (uint32_t)test_rng_next(&state);
        float f;
        /* exponents from fp16's subnormals to its overflow, and exact ties (13 low bits 1000...) */
        u = (u & 0x807FFFFFu) | ((uint32_t)(100 + (u >> 23) % 43) << 23);
        if (i % 4 == 0) u = (u & ~0x1FFFu) | 0x1000u;
        memcpy(&f, &u, sizeof f);
        if (fabsf(f) >= 65520.0f) continue;
        if (fmt_half_from_float(f) != fmt_f16c(f) && mismatches++ < 5)
            ck_abort_msg("the test's fp16 rounding of %.9g: %04x, vcvtps2ph: %04x", (double)f, fmt_half_from_float(f),
                         fmt_f16c(f));
    }
#endif
}
END_TEST

/* >>against the fp32 layer: the rounding the format implies */
START_TEST(format_vs_fp32) {
    int fi = 1 + _i / 2;
    bool heavy = _i % 2;
    moe_ep_weight_format f = fmt_formats[fi];
    const int D = 256, F = 512;
    const int64_t rows = 64;
    fmt_expert e;
    float* x = test_random_floats((size_t)rows * D, 1.0f, 900 + (uint64_t)_i);
    float* y32 = (float*)malloc(sizeof(float) * (size_t)rows * D);
    float* yf = (float*)malloc(sizeof(float) * (size_t)rows * D);
    double* ref = (double*)malloc(sizeof(double) * (size_t)rows * D);
    static const double bound[4][2] = { { 0, 0 }, { 1e-2, 1e-2 }, { 2e-3, 2e-3 }, { 2e-2, 1e-1 } };
    char err[256] = "";
    size_t n = (size_t)rows * D, i;
    double rel;
    fmt_expert_init(&e, f, D, F, true, heavy, 1000 + (uint64_t)_i);
    ck_assert(fmt_ffn(&e, &e.as_fp32, MOE_EP_WEIGHT_FORMAT_FP32, MOE_EP_ACTIVATION_SWIGLU, MOE_EP_KERNEL_DEFAULT, 0,
                      x, rows, y32, err, sizeof err) == MOE_EP_OK);
    ck_assert_msg(fmt_ffn(&e, &e.as_fp32, f, MOE_EP_ACTIVATION_SWIGLU, MOE_EP_KERNEL_DEFAULT, 0, x, rows, yf, err,
                          sizeof err) == MOE_EP_OK, "%s", err);
    for (i = 0; i < n; ++i) ref[i] = (double)y32[i];
    rel = check_rel_error(yf, ref, n);
    printf("formats: %s vs the fp32 layer (%s weights, SwiGLU %dx%d): max |diff| / max |y| = %.2e\n", fmt_names[fi],
           heavy ? "heavy-tailed" : "uniform", D, F, rel);
    ck_assert_msg(rel < bound[fi][heavy], "%s (%s weights): %.3g vs the fp32 layer, bound %.0e", fmt_names[fi],
                  heavy ? "heavy-tailed" : "uniform", rel, bound[fi][heavy]);
    ck_assert_msg(rel > 0.0, "%s: the same bits as fp32: the format was not applied", fmt_names[fi]);
    fmt_expert_free(&e);
    free(x);
    free(y32);
    free(yf);
    free(ref);
}
END_TEST

/* >>the whole layer: the same bits for R = 1..5, threads 1..3 and every path, per format */
START_TEST(format_layer_bitwise) {
    moe_ep_weight_format f = fmt_formats[_i];
    moe_ep_kernel paths[8];
    int npaths = fmt_paths(paths), p, R, threads, e;
    check_model m;
    /* each R's tokens sum to 41; R >= 3 has a rank without tokens */
    static const int64_t tokens[6][5] = { { 0 }, { 41 }, { 23, 18 }, { 20, 0, 21 }, { 9, 14, 0, 18 },
                                          { 9, 14, 0, 11, 7 } };
    const int64_t all = 41;
    float* x;
    float* first;
    float* y;
    fmt_expert* ex = (fmt_expert*)calloc(8, sizeof *ex);
    char errors[1024];
    check_model_init(&m, 40, 72, 8, 2, MOE_EP_ACTIVATION_SWIGLU, true, 3000 + (uint64_t)_i);
    m.weight_format = f;
    m.shared.d_ff = 24;
    m.shared.weights = m.experts[0];     /* fp32 weights, converted into the format at create */
    for (e = 0; e < 8; ++e) {           /* the routed experts handed in stored (fp32 for FP32) */
        size_t per = (size_t)m.d_model * (size_t)m.d_ff;
        float* w = (float*)malloc(sizeof(float) * 3 * per);
        memcpy(w, m.experts[e].w1, sizeof(float) * per);
        memcpy(w + per, m.experts[e].w3, sizeof(float) * per);
        memcpy(w + 2 * per, m.experts[e].w2, sizeof(float) * per);
        fmt_expert_init(&ex[e], f, m.d_model, m.d_ff, false, false, 1);
        fmt_tensor_free(&ex[e].w1); fmt_tensor_free(&ex[e].w3); fmt_tensor_free(&ex[e].w2);
        fmt_tensor_init(&ex[e].w1, f, m.d_ff, m.d_model, w);
        fmt_tensor_init(&ex[e].w3, f, m.d_ff, m.d_model, w + per);
        fmt_tensor_init(&ex[e].w2, f, m.d_model, m.d_ff, w + 2 * per);
        free(w);
        if (f != MOE_EP_WEIGHT_FORMAT_FP32) {
            memset(&m.experts[e], 0, sizeof m.experts[e]);
            m.experts[e].w1_stored = ex[e].w1.stored;
            m.experts[e].w3_stored = ex[e].w3.stored;
            m.experts[e].w2_stored = ex[e].w2.stored;
            m.experts[e].w1_scale = ex[e].w1.scale;
            m.experts[e].w3_scale = ex[e].w3.scale;
            m.experts[e].w2_scale = ex[e].w2.scale;
        }
    }
    m.shared.weights.w1 = ex[0].w1.fp32;
    m.shared.weights.w3 = ex[0].w3.fp32;
    m.shared.weights.w2 = ex[0].w2.fp32;
    x = test_random_floats((size_t)all * 40, 1.0f, 3100 + (uint64_t)_i);
    first = (float*)malloc(sizeof(float) * (size_t)all * 40);
    y = (float*)malloc(sizeof(float) * (size_t)all * 40);
    for (p = 0; p < npaths; ++p)
        for (R = 1; R <= 5; ++R)
            for (threads = 1; threads <= 3; ++threads) {
                check_layer L;
                if (R > 1 && threads > 1 && p > 0) continue;    /* enough: paths x threads at R = 1 */
                check_layer_init(&L, &m, R, tokens[R], x, y);
                L.num_threads = threads;
                L.kernel = paths[p];
                test_poison(y, (size_t)all * 40);
                ck_assert_msg(check_run_layer(&L) == MOE_EP_OK, "%s %s R %d: %s", fmt_names[_i],
                              moe_ep_kernel_string(paths[p]), R, check_layer_errors(&L, errors, sizeof errors));
                if (p == 0 && R == 1 && threads == 1) {
                    memcpy(first, y, sizeof(float) * (size_t)all * 40);
                    continue;
                }
                ck_assert_msg(test_first_difference(first, y, (size_t)all * 40) == (size_t)all * 40,
                              "%s: %s, %d ranks, %d threads differs from %s, 1 rank, 1 thread at element %zu",
                              fmt_names[_i], moe_ep_kernel_string(paths[p]), R, threads,
                              moe_ep_kernel_string(paths[0]), test_first_difference(first, y, (size_t)all * 40));
            }
    for (e = 0; e < 8; ++e) fmt_expert_free(&ex[e]);
    free(ex);
    check_model_free(&m);
    free(x);
    free(first);
    free(y);
}
END_TEST

/* >>memory: the format's size */
START_TEST(format_weight_bytes) {
    fmt_expert e;
    int64_t bytes[FMT_COUNT];
    int fi;
    const int D = 128, F = 384;
    char err[256] = "";
    fmt_expert_init(&e, MOE_EP_WEIGHT_FORMAT_FP32, D, F, false, false, 77);
    for (fi = 0; fi < FMT_COUNT; ++fi) {
        moe_ep_context* ctx = NULL;
        moe_ep_result res = moe_ep_create(&(moe_ep_desc){ .d_model = D, .d_ff = F, .num_experts = 1,
                                                          .experts = &e.as_fp32, .weight_format = fmt_formats[fi],
                                                          .create_error = err, .create_error_size = sizeof err }, &ctx);
        ck_assert_msg(res == MOE_EP_OK, "%s", err);
        bytes[fi] = moe_ep_weight_bytes(ctx);
        moe_ep_destroy(ctx);
    }
    /* 3 D F weights of 4, 2, 2, 1 bytes (+ int8's scales, + panel padding) */
    ck_assert_msg(bytes[0] >= 12LL * D * F && bytes[0] <= 12LL * D * F + 65536, "fp32: %lld", (long long)bytes[0]);
    ck_assert_msg(2 * bytes[1] <= bytes[0] + 4096 && 2 * bytes[1] >= bytes[0] - 4096, "bf16: %lld of fp32's %lld",
                  (long long)bytes[1], (long long)bytes[0]);
    ck_assert_msg(bytes[2] == bytes[1], "fp16: %lld, bf16 %lld", (long long)bytes[2], (long long)bytes[1]);
    ck_assert_msg(4 * bytes[3] <= bytes[0] + 4 * (4096 + 4 * (2 * F + D + 128)), "int8: %lld of fp32's %lld",
                  (long long)bytes[3], (long long)bytes[0]);
    ck_assert_int_eq(moe_ep_weight_bytes(NULL), 0);
    fmt_expert_free(&e);
}
END_TEST

/* >>invalid combinations: the rule's log item, no context */
typedef struct fmt_bad {
    const char* what;
    moe_ep_weight_format format;
    int kernel;                     /* -1: a path this build or CPU cannot run */
    int tweak;                      /* see fmt_invalid */
    moe_ep_log_item item;
} fmt_bad;

static const fmt_bad fmt_bad_cases[] = {
    { "weight_format out of range", (moe_ep_weight_format)99, 0, 0, MOE_EP_LOG_ITEM_DESC_WEIGHT_FORMAT },
    { "kernel out of range", MOE_EP_WEIGHT_FORMAT_FP32, 99, 0, MOE_EP_LOG_ITEM_DESC_KERNEL },
    { "a kernel this build or CPU lacks", MOE_EP_WEIGHT_FORMAT_FP32, -1, 0, MOE_EP_LOG_ITEM_DESC_KERNEL },
    { "w1 and w1_stored", MOE_EP_WEIGHT_FORMAT_BF16, 0, 1, MOE_EP_LOG_ITEM_DESC_EXPERT_WEIGHTS_STORED },
    { "w2_stored with fp32", MOE_EP_WEIGHT_FORMAT_FP32, 0, 2, MOE_EP_LOG_ITEM_DESC_EXPERT_WEIGHTS_STORED },
    { "int8 stored without scales", MOE_EP_WEIGHT_FORMAT_INT8, 0, 3, MOE_EP_LOG_ITEM_DESC_EXPERT_SCALE },
    { "int8 scale zero", MOE_EP_WEIGHT_FORMAT_INT8, 0, 4, MOE_EP_LOG_ITEM_DESC_EXPERT_SCALE },
    { "int8 scale negative", MOE_EP_WEIGHT_FORMAT_INT8, 0, 5, MOE_EP_LOG_ITEM_DESC_EXPERT_SCALE },
    { "int8 scale NaN", MOE_EP_WEIGHT_FORMAT_INT8, 0, 6, MOE_EP_LOG_ITEM_DESC_EXPERT_SCALE },
    { "int8 scale infinite", MOE_EP_WEIGHT_FORMAT_INT8, 0, 7, MOE_EP_LOG_ITEM_DESC_EXPERT_SCALE },
    { "a scale with bf16", MOE_EP_WEIGHT_FORMAT_BF16, 0, 8, MOE_EP_LOG_ITEM_DESC_EXPERT_SCALE },
    { "fp16 of 1e5", MOE_EP_WEIGHT_FORMAT_FP16, 0, 9, MOE_EP_LOG_ITEM_DESC_WEIGHT_NOT_CONVERTIBLE },
    { "bf16 of FLT_MAX", MOE_EP_WEIGHT_FORMAT_BF16, 0, 10, MOE_EP_LOG_ITEM_DESC_WEIGHT_NOT_CONVERTIBLE },
    { "int8 of NaN", MOE_EP_WEIGHT_FORMAT_INT8, 0, 11, MOE_EP_LOG_ITEM_DESC_WEIGHT_NOT_CONVERTIBLE },
    { "int8 of infinity in w2", MOE_EP_WEIGHT_FORMAT_INT8, 0, 12, MOE_EP_LOG_ITEM_DESC_WEIGHT_NOT_CONVERTIBLE },
};

START_TEST(format_invalid) {
    const fmt_bad* c = &fmt_bad_cases[_i];
    fmt_expert e;
    moe_ep_expert_weights w;
    moe_ep_desc desc;
    int k;
    fmt_expert_init(&e, c->format == MOE_EP_WEIGHT_FORMAT_INT8 ? MOE_EP_WEIGHT_FORMAT_INT8 : MOE_EP_WEIGHT_FORMAT_BF16,
                    8, 16, false, false, 55);
    w = c->tweak >= 3 && c->tweak <= 7 ? e.as_stored : e.as_fp32;
    switch (c->tweak) {
    case 1: w.w1_stored = e.w1.stored; break;
    case 2: w.w2 = NULL; w.w2_stored = e.w2.stored; break;
    case 3: w.w1_scale = NULL; break;
    case 4: e.w1.scale[3] = 0.0f; break;
    case 5: e.w3.scale[0] = -1.0f; break;
    case 6: e.w2.scale[7] = NAN; break;
    case 7: e.w2.scale[1] = INFINITY; break;
    case 8: w.w1_scale = e.b1 ? e.b1 : e.w3.fp32; w.w1_stored = e.w1.stored; w.w1 = NULL; break;  /* any floats */
    case 9: e.w1.fp32[5] = 1e5f; break;
    case 10: e.w3.fp32[2] = -FLT_MAX; break;
    case 11: e.w1.fp32[9] = NAN; break;
    case 12: e.w2.fp32[4] = INFINITY; break;
    default: break;
    }
    memset(&desc, 0, sizeof desc);
    desc.d_model = 8;
    desc.d_ff = 16;
    desc.num_experts = 1;
    desc.experts = &w;
    desc.weight_format = c->format;
    desc.kernel = (moe_ep_kernel)c->kernel;
    if (c->kernel == -1) {          /* NEON on x86, AVX-512 elsewhere; or any SIMD path without one */
        moe_ep_kernel paths[8];
        int n = fmt_paths(paths), has[MOE_EP_KERNEL_COUNT] = { 0 };
        for (k = 0; k < n; ++k) has[paths[k]] = 1;
        for (k = MOE_EP_KERNEL_AVX2; k <= MOE_EP_KERNEL_NEON && has[k]; ++k) {}
        desc.kernel = (moe_ep_kernel)k;
    }
    check_create_refused(&desc, c->item, c->what);
    fmt_expert_free(&e);
}
END_TEST

/* >>the query: the resolved kernel, and the name moe_ep_kernel_path gives */
START_TEST(format_query) {
    fmt_expert e;
    moe_ep_context* ctx = NULL;
    moe_ep_desc d;
    fmt_expert_init(&e, MOE_EP_WEIGHT_FORMAT_FP32, 8, 16, false, false, 5);
    ck_assert(moe_ep_create(&(moe_ep_desc){ .d_model = 8, .d_ff = 16, .num_experts = 1, .experts = &e.as_fp32,
                                            .weight_format = MOE_EP_WEIGHT_FORMAT_INT8 }, &ctx) == MOE_EP_OK);
    d = moe_ep_query(ctx);
    ck_assert_int_eq(d.weight_format, MOE_EP_WEIGHT_FORMAT_INT8);
    ck_assert_msg(d.kernel != MOE_EP_KERNEL_DEFAULT, "the kernel is resolved");
    ck_assert_str_eq(moe_ep_kernel_string(d.kernel), moe_ep_kernel_path());
    moe_ep_destroy(ctx);
    fmt_expert_free(&e);
}
END_TEST

Suite* formats_suite(void) {
    Suite* s = suite_create("formats");
    TCase* tc = tcase_create("formats");
    tcase_set_timeout(tc, 300);
    tcase_add_loop_test(tc, format_vs_reference, 0, FMT_COUNT * 6);
    tcase_add_test(tc, fp16_rounding_is_f16c);
    tcase_add_loop_test(tc, format_vs_fp32, 0, 6);
    tcase_add_loop_test(tc, format_layer_bitwise, 0, FMT_COUNT);
    tcase_add_test(tc, format_weight_bytes);
    tcase_add_loop_test(tc, format_invalid, 0, (int)(sizeof fmt_bad_cases / sizeof fmt_bad_cases[0]));
    tcase_add_test(tc, format_query);
    suite_add_tcase(s, tc);
    return s;
}
