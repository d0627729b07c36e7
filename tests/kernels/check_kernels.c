/* check_kernels.c -- the expert FFN kernel on the path this file was compiled for
   (AVX-512, AVX2+FMA, NEON or portable: see kernels_path below).

   - against a float64 reference, on fresh random inputs, outputs poisoned with NaN
     first and one row past the end that must stay poisoned; every activation, with and
     without the biases b1, b3, b2 (clamped SwiGLU with weights large enough that both of
     its clamps fire);
   - determinism: every row is bitwise the same whether it is computed alone or inside a
     block of 3, 17 or 1024 rows (136 under emulation, see DETERMINISM_ROWS), on 1, 2 or
     3 threads; the shapes make K larger than the kernel's K slice, so sums wait in
     scratch between slices;
   - against the portable path (kernels_portable.c, the same header built with
     MOE_EP_NO_SIMD): the same bits, element by element;
   - the thread budget: ranks that share a process divide OpenMP's threads;
   - the router's logits: bitwise one token's sums taken alone, for every block of tokens.

   Error measure: |out - ref| <= 2e-5 * mag per element, mag = the same sums over
   absolute values (a bound on what fp32 rounding can do). Run with CK_FORK=no. */
#define MOE_EP_IMPLEMENTATION
#include "../../transports/moe_ep_pthreads.h"
#include "../support/test_support.h"

#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef MOE_EP_IMPL_INCLUDED
#error "check_kernels.c: the moe_ep core was not built"
#endif

int kernels_portable_ffn(moe_ep_activation activation, int d_model, int d_ff, const moe_ep_expert_weights* weights,
                         const float* x, int64_t rows, int threads, float* out);

/* >>data */
typedef struct kernels_expert {
    int d_model, d_ff;
    moe_ep_activation act;
    float *w1, *w3, *w2;
    float *b1, *b3, *b2;            /* all NULL without biases */
    moe_ep_expert_weights weights;
} kernels_expert;

/* Clamped SwiGLU gets up projections 24x larger (g and u of about 8 rms), so that min(g, 7)
   and clamp(u, -7, 7) fire often. */
static void kernels_expert_init_biased(kernels_expert* e, int d_model, int d_ff, moe_ep_activation act, bool biases,
                                       uint64_t seed) {
    size_t n = (size_t)d_model * (size_t)d_ff;
    float up_scale = (act == MOE_EP_ACTIVATION_SWIGLU_CLAMPED ? 24.0f : 1.0f) / sqrtf((float)d_model);
    bool gated = act == MOE_EP_ACTIVATION_SWIGLU || act == MOE_EP_ACTIVATION_SWIGLU_CLAMPED;
    memset(e, 0, sizeof *e);
    e->d_model = d_model;
    e->d_ff = d_ff;
    e->act = act;
    e->w1 = test_random_floats(n, up_scale, seed);
    e->w3 = test_random_floats(n, up_scale, seed + 1);
    e->w2 = test_random_floats(n, 1.0f / sqrtf((float)d_ff), seed + 2);
    if (biases) {
        e->b1 = test_random_floats((size_t)d_ff, 1.0f, seed + 3);
        e->b3 = test_random_floats((size_t)d_ff, 1.0f, seed + 4);
        e->b2 = test_random_floats((size_t)d_model, 1.0f, seed + 5);
    }
    e->weights.w1 = e->w1;
    e->weights.w3 = gated ? e->w3 : NULL;
    e->weights.w2 = e->w2;
    e->weights.b1 = e->b1;
    e->weights.b3 = gated ? e->b3 : NULL;
    e->weights.b2 = e->b2;
}

static void kernels_expert_init(kernels_expert* e, int d_model, int d_ff, moe_ep_activation act, uint64_t seed) {
    kernels_expert_init_biased(e, d_model, d_ff, act, false, seed);
}

static void kernels_expert_free(kernels_expert* e) {
    free(e->w1);
    free(e->w3);
    free(e->w2);
    free(e->b1);
    free(e->b3);
    free(e->b2);
}

static moe_ep_context* kernels_context(const kernels_expert* e, int threads) {
    moe_ep_context* ctx = NULL;
    moe_ep_result res = moe_ep_create(&(moe_ep_desc){ .d_model = e->d_model, .d_ff = e->d_ff, .num_experts = 1,
                                                      .activation = e->act, .num_threads = threads,
                                                      .experts = &e->weights }, &ctx);
    ck_assert_msg(res == MOE_EP_OK, "create: %s", moe_ep_result_string(res));
    return ctx;
}

/* >>reference: out and mag [rows, d_model] in double; clamps (if not NULL) counts the
   gate and up values that clamped SwiGLU's clamps change. */
static void kernels_reference(const kernels_expert* e, const float* x, int64_t rows, double* out, double* mag,
                              int64_t* clamps) {
    int D = e->d_model, F = e->d_ff, i, j;
    int gated = e->act == MOE_EP_ACTIVATION_SWIGLU || e->act == MOE_EP_ACTIVATION_SWIGLU_CLAMPED;
    int64_t r;
    double* h = (double*)malloc(sizeof(double) * (size_t)F);
    double* hmag = (double*)malloc(sizeof(double) * (size_t)F);
    for (r = 0; r < rows; ++r) {
        const float* xr = x + r * D;
        for (j = 0; j < F; ++j) {
            double g = 0.0, u = 0.0, gm = 0.0, um = 0.0;
            for (i = 0; i < D; ++i) {
                g += (double)e->w1[(size_t)j * D + i] * xr[i];
                u += (double)e->w3[(size_t)j * D + i] * xr[i];
                gm += fabs((double)e->w1[(size_t)j * D + i] * xr[i]);
                um += fabs((double)e->w3[(size_t)j * D + i] * xr[i]);
            }
            if (e->b1) { g += e->b1[j]; gm += fabs(e->b1[j]); }
            if (e->b3) { u += e->b3[j]; um += fabs(e->b3[j]); }
            if (clamps && e->act == MOE_EP_ACTIVATION_SWIGLU_CLAMPED) clamps[0] += g > 7.0, clamps[1] += fabs(u) > 7.0;
            h[j] = test_ref_activation(e->act, g, u);
            /* |act(g, u)| changes by at most ~1.1 (|u| + 1) |dg| + |g| |du| (+ the act's own rounding) */
            hmag[j] = fabs(h[j]) + gm * (gated ? 1.1 * (fabs(u) + 1.0) : 1.0) + (gated ? fabs(g) * um : 0.0);
        }
        for (i = 0; i < D; ++i) {
            double y = e->b2 ? (double)e->b2[i] : 0.0, m = e->b2 ? fabs((double)e->b2[i]) : 0.0;
            for (j = 0; j < F; ++j) {
                y += (double)e->w2[(size_t)i * F + j] * h[j];
                m += fabs((double)e->w2[(size_t)i * F + j]) * hmag[j];
            }
            out[r * D + i] = y;
            mag[r * D + i] = m;
        }
    }
    free(h);
    free(hmag);
}

/* The first element outside the bound, or -1. */
static int64_t kernels_check(const float* got, const double* ref, const double* mag, int64_t n, double* worst) {
    int64_t i, bad = -1;
    *worst = 0.0;
    for (i = 0; i < n; ++i) {
        double err = fabs((double)got[i] - ref[i]), q = err / (mag[i] + 1e-30);
        if (!(got[i] == got[i])) q = INFINITY;
        if (q > *worst) *worst = q;
        if (bad < 0 && !(q <= 2e-5)) bad = i;
    }
    return bad;
}

/* The variants every test runs: the activations without biases, then with b1, b3, b2. */
static const moe_ep_activation kernels_acts[] = { MOE_EP_ACTIVATION_SWIGLU, MOE_EP_ACTIVATION_GELU,
                                                  MOE_EP_ACTIVATION_RELU, MOE_EP_ACTIVATION_SWIGLU_CLAMPED,
                                                  MOE_EP_ACTIVATION_SWIGLU, MOE_EP_ACTIVATION_GELU,
                                                  MOE_EP_ACTIVATION_SWIGLU_CLAMPED };
static const bool kernels_biased[] = { false, false, false, false, true, true, true };
static const char* const kernels_act_names[] = { "SwiGLU", "GELU", "ReLU", "clamped SwiGLU", "SwiGLU+bias",
                                                 "GELU+bias", "clamped SwiGLU+bias" };
#define KERNEL_VARIANTS ((int)(sizeof kernels_acts / sizeof kernels_acts[0]))

/* >>tests */
typedef struct kernels_case {
    int d_model, d_ff;
    int64_t rows;
} kernels_case;

/* Odd sizes (no multiple of any tile), K slices on both products, tails of every row count. */
static const kernels_case reference_cases[] = {
    { 37, 53, 1 }, { 37, 53, 2 }, { 37, 53, 5 }, { 37, 53, 7 }, { 37, 53, 12 }, { 37, 53, 13 }, { 37, 53, 17 },
    { 37, 53, 100 }, { 37, 53, 200 }, { 64, 128, 6 }, { 64, 128, 33 }, { 275, 290, 1 }, { 275, 290, 19 },
    { 275, 290, 130 },
};
#define REFERENCE_CASES ((int)(sizeof reference_cases / sizeof reference_cases[0]))

START_TEST(kernel_vs_reference) {
    const kernels_case* c = &reference_cases[_i % REFERENCE_CASES];
    int a = _i / REFERENCE_CASES, threads;
    kernels_expert e;
    size_t n = (size_t)c->rows * (size_t)c->d_model;
    float* x = test_random_floats(n, 1.0f, 1000 + (uint64_t)_i);
    float* out = (float*)malloc(sizeof(float) * (n + (size_t)c->d_model));
    double* ref = (double*)malloc(sizeof(double) * n);
    double* mag = (double*)malloc(sizeof(double) * n);
    int64_t clamps[2] = { 0, 0 };
    kernels_expert_init_biased(&e, c->d_model, c->d_ff, kernels_acts[a], kernels_biased[a], 2000 + (uint64_t)_i);
    kernels_reference(&e, x, c->rows, ref, mag, clamps);
    /* the clamps must fire on a share of the values, or the test would not see them */
    ck_assert_msg(kernels_acts[a] != MOE_EP_ACTIVATION_SWIGLU_CLAMPED ||
                  (clamps[0] * 50 > c->rows * c->d_ff && clamps[1] * 50 > c->rows * c->d_ff),
                  "clamped gate %lld, up %lld of %lld values", (long long)clamps[0], (long long)clamps[1],
                  (long long)(c->rows * c->d_ff));
    for (threads = 1; threads <= 2; ++threads) {
        moe_ep_context* ctx = kernels_context(&e, threads);
        moe_ep_result res;
        double worst;
        int64_t bad;
        test_poison(out, n + (size_t)c->d_model);
        res = moe_ep_expert_ffn(ctx, 0, x, c->rows, out);
        ck_assert_msg(res == MOE_EP_OK, "%s: %s", moe_ep_result_string(res), moe_ep_last_error(ctx));
        ck_assert_msg(test_is_poisoned(out + n, (size_t)c->d_model), "%s %s %dx%d rows %lld: wrote past the last row",
                      moe_ep_kernel_path(), kernels_act_names[a], c->d_model, c->d_ff, (long long)c->rows);
        bad = kernels_check(out, ref, mag, (int64_t)n, &worst);
        ck_assert_msg(bad < 0, "%s %s %dx%d rows %lld threads %d: element %lld is %.9g, reference %.9g (error/mag %.3g)",
                      moe_ep_kernel_path(), kernels_act_names[a], c->d_model, c->d_ff, (long long)c->rows, threads,
                      (long long)bad, bad >= 0 ? (double)out[bad] : 0.0, bad >= 0 ? ref[bad] : 0.0, worst);
        moe_ep_destroy(ctx);
    }
    kernels_expert_free(&e);
    free(x);
    free(out);
    free(ref);
    free(mag);
}
END_TEST

/* armhf under qemu-user has no FMA instruction: every fmaf is the header's software one,
   and qemu runs that at ~9 M/s, so the 1024-row test alone takes most of an hour. make
   test-cross builds this file for armhf with KERNELS_EMULATED: 136 rows (two whole MC-row
   blocks of the portable kernel and a part; the shapes, blocks and thread counts as
   everywhere). Native builds, and the cross builds with hardware FMA, keep 1024 rows. */
#ifdef KERNELS_EMULATED
#define DETERMINISM_ROWS 136
#else
#define DETERMINISM_ROWS 1024
#endif

/* Row i of a 1024-row input, computed in blocks of 1, 3, 17 and 1024 rows, on 1, 2 and 3
   threads (GELU, which differs from ReLU only in the last store: 1 and 2): the bytes of
   every row must equal those of the 1024-row, 1-thread run. Every variant: the biases and
   the clamps sit in the epilogue, where a wrong panel or row would show. */
static const int determinism_blocks[] = { 1, 3, 17, DETERMINISM_ROWS };

START_TEST(kernel_row_determinism) {
    const int D = 275, F = 290, rows = DETERMINISM_ROWS;
    int a = _i, b, threads;
    kernels_expert e;
    float* x = test_random_floats((size_t)rows * D, 1.0f, 3000 + (uint64_t)_i);
    float* base = (float*)malloc(sizeof(float) * (size_t)rows * D);
    float* out = (float*)malloc(sizeof(float) * (size_t)rows * D);
    moe_ep_context* ctx;
    kernels_expert_init_biased(&e, D, F, kernels_acts[a], kernels_biased[a], 4000 + (uint64_t)_i);
    ctx = kernels_context(&e, 1);
    ck_assert(moe_ep_expert_ffn(ctx, 0, x, rows, base) == MOE_EP_OK);
    moe_ep_destroy(ctx);
    for (threads = 1; threads <= (kernels_acts[a] == MOE_EP_ACTIVATION_GELU ? 2 : 3); ++threads) {
        ctx = kernels_context(&e, threads);
        for (b = 0; b < (int)(sizeof determinism_blocks / sizeof determinism_blocks[0]); ++b) {
            int block = determinism_blocks[b], first, r;
            test_poison(out, (size_t)rows * D);
            for (first = 0; first < rows; first += block) {
                int n = first + block <= rows ? block : rows - first;
                ck_assert(moe_ep_expert_ffn(ctx, 0, x + (size_t)first * D, n, out + (size_t)first * D) == MOE_EP_OK);
            }
            for (r = 0; r < rows; ++r)
                ck_assert_msg(memcmp(out + (size_t)r * D, base + (size_t)r * D, sizeof(float) * D) == 0,
                              "%s %s: row %d differs in blocks of %d rows on %d threads from the %d-row run",
                              moe_ep_kernel_path(), kernels_act_names[a], r, block, threads, rows);
        }
        moe_ep_destroy(ctx);
    }
    kernels_expert_free(&e);
    free(x);
    free(base);
    free(out);
}
END_TEST

/* The compiled path against the portable one: the same bits (the portable kernel fuses
   where the SIMD kernels fuse, and both use the library's own exp). */
START_TEST(kernel_paths_agree) {
    const kernels_case* c = &reference_cases[_i % REFERENCE_CASES];
    int a = _i / REFERENCE_CASES;
    kernels_expert e;
    size_t n = (size_t)c->rows * (size_t)c->d_model, i;
    float* x = test_random_floats(n, 1.0f, 5000 + (uint64_t)_i);
    float* simd = (float*)malloc(sizeof(float) * n);
    float* portable = (float*)malloc(sizeof(float) * n);
    double* ref = (double*)malloc(sizeof(double) * n);
    double* mag = (double*)malloc(sizeof(double) * n);
    moe_ep_context* ctx;
    int res;
    kernels_expert_init_biased(&e, c->d_model, c->d_ff, kernels_acts[a], kernels_biased[a], 6000 + (uint64_t)_i);
    kernels_reference(&e, x, c->rows, ref, mag, NULL);
    ctx = kernels_context(&e, 2);
    ck_assert(moe_ep_expert_ffn(ctx, 0, x, c->rows, simd) == MOE_EP_OK);
    moe_ep_destroy(ctx);
    res = kernels_portable_ffn(e.act, e.d_model, e.d_ff, &e.weights, x, c->rows, 2, portable);
    ck_assert_msg(res == MOE_EP_OK, "portable build: %s", moe_ep_result_string((moe_ep_result)res));
    for (i = 0; i < n; ++i)
        ck_assert_msg(memcmp(&simd[i], &portable[i], sizeof(float)) == 0,
                      "%s vs portable, %s %dx%d rows %lld: element %zu: %.9g vs %.9g (must be the same bits)",
                      moe_ep_kernel_path(), kernels_act_names[a], c->d_model, c->d_ff, (long long)c->rows, i,
                      (double)simd[i], (double)portable[i]);
    kernels_expert_free(&e);
    free(x);
    free(simd);
    free(portable);
    free(ref);
    free(mag);
}
END_TEST

/* Two ranks in one process: each context resolves num_threads 0 to at most half of
   OpenMP's threads (and at least 1). */
typedef struct budget_state {
    kernels_expert* expert;
    int threads[2];
} budget_state;

static moe_ep_result budget_rank(const moe_ep_transport* transport, void* user_data) {
    budget_state* st = (budget_state*)user_data;
    moe_ep_context* ctx = NULL;
    moe_ep_result res = moe_ep_create(&(moe_ep_desc){ .d_model = st->expert->d_model, .d_ff = st->expert->d_ff,
                                                      .num_experts = 2, .experts = &st->expert->weights,
                                                      .experts_count = 1, .transport = transport }, &ctx);
    if (res != MOE_EP_OK) return res;
    st->threads[transport->rank] = moe_ep_query(ctx).num_threads;
    moe_ep_destroy(ctx);
    return MOE_EP_OK;
}

START_TEST(kernel_thread_budget) {
    kernels_expert e;
    budget_state st;
    moe_ep_pthreads_world* world = NULL;
    int max_threads = 1, r;
    kernels_expert_init(&e, 16, 32, MOE_EP_ACTIVATION_SWIGLU, 7000);
    st.expert = &e;
    st.threads[0] = st.threads[1] = -1;
#ifdef _OPENMP
    max_threads = omp_get_max_threads();
#endif
    ck_assert(moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = 2 }, &world) == MOE_EP_OK);
    ck_assert(moe_ep_pthreads_run(world, budget_rank, &st, NULL) == MOE_EP_OK);
    moe_ep_pthreads_world_destroy(world);
    for (r = 0; r < 2; ++r) {
        ck_assert_msg(st.threads[r] >= 1, "rank %d: num_threads %d", r, st.threads[r]);
        ck_assert_msg(max_threads < 2 || 2 * st.threads[r] <= max_threads,
                      "rank %d: num_threads %d with 2 ranks and %d OpenMP threads", r, st.threads[r], max_threads);
    }
    kernels_expert_free(&e);
}
END_TEST

/* >>router: the router's logits on every path this build has and this CPU runs equal,
   bitwise, one token's sums taken alone in order i = 0..D-1 with one fused multiply-add per
   step (the C library's fmaf), for every block size 1..8 and for E with and without a tail
   past the vector strips (moe_ep__router_logits). */
START_TEST(router_logits_exact) {
    static const int shapes[][2] = { { 1, 1 }, { 5, 7 }, { 64, 32 }, { 129, 33 }, { 64, 256 }, { 96, 300 } };
    int D = shapes[_i][0], E = shapes[_i][1], rows, r, e, i;
    float* x = test_random_floats((size_t)8 * (size_t)D, 1.0f, 900 + (uint64_t)_i);
    float* wt = test_random_floats((size_t)D * (size_t)E, 1.0f, 950 + (uint64_t)_i);
    float* got = (float*)malloc(sizeof(float) * (size_t)(8 * E + 1));
    int k;
    for (k = MOE_EP_KERNEL_PORTABLE; k <= MOE_EP_KERNEL_NEON; ++k)
    for (rows = 1; rows <= 8; ++rows) {
        const char* why;
        const moe_ep__path* path = moe_ep__select_path((moe_ep_kernel)k, &why);
        if (!path) break;
        test_poison(got, (size_t)(8 * E + 1));
        moe_ep__router_logits(path, x, rows, D, wt, E, got);
        for (r = 0; r < 8; ++r)
            for (e = 0; e < E; ++e) {
                float acc = 0.0f;     /* fmaf: one rounding per step, as every path */
                for (i = 0; i < D; ++i) acc = fmaf(x[r * D + i], wt[(size_t)i * (size_t)E + (size_t)e], acc);
                if (r >= rows) {
                    ck_assert_msg(test_is_poisoned(&got[r * E + e], 1), "D %d E %d rows %d: row %d written", D, E,
                                  rows, r);
                    continue;
                }
                ck_assert_msg(memcmp(&acc, &got[r * E + e], sizeof(float)) == 0,
                              "%s: D %d E %d rows %d: logit [%d][%d] %.9g, one token alone %.9g",
                              moe_ep_kernel_string((moe_ep_kernel)k), D, E, rows, r, e, (double)got[r * E + e],
                              (double)acc);
            }
    }
    free(x);
    free(wt);
    free(got);
}
END_TEST

static Suite* kernels_suite(void) {
    Suite* s = suite_create("kernels");
    TCase* tc = tcase_create("ffn");
    tcase_set_timeout(tc, 300);
    tcase_add_loop_test(tc, kernel_vs_reference, 0, KERNEL_VARIANTS * REFERENCE_CASES);
    tcase_add_loop_test(tc, kernel_row_determinism, 0, KERNEL_VARIANTS);
    tcase_add_loop_test(tc, kernel_paths_agree, 0, KERNEL_VARIANTS * REFERENCE_CASES);
    tcase_add_test(tc, kernel_thread_budget);
    tcase_add_loop_test(tc, router_logits_exact, 0, 6);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    SRunner* sr = srunner_create(kernels_suite());
    int failed;
    const char* why;
    const moe_ep__path* path = moe_ep__select_path(MOE_EP_KERNEL_DEFAULT, &why);
    printf("kernel path: %s (MR %d, NR %d)\n", moe_ep_kernel_path(), path->mr, path->nr);
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
