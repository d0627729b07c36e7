/* check_ffn_variants.c -- the expert FFN's variants: the biases b1, b3, b2, GPT-OSS's
   clamped SwiGLU and the weight layouts (fused gate_up, GPT-OSS's transposed and
   interleaved tensors).

   - against the float64 reference (check_ref_ffn), every activation with no bias, each
     bias alone and all three; clamped SwiGLU on inputs where both clamps fire;
   - each layout gives the same bytes as the default one with the same weights
     rearranged (also on a TP slice, where the layouts are read at an offset);
   - row counts 1..37 on 1, 2 and 3 threads: every row bitwise equal;
   - the whole layer on 1 and 3 pthreads ranks bitwise equal, and against float64;
   - TP 2 against TP 1 within 1e-6 with the biases (b2 added once). */
#include "check_moe_ep.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define V_D 37
#define V_F 53

static const moe_ep_activation variant_acts[] = { MOE_EP_ACTIVATION_SWIGLU, MOE_EP_ACTIVATION_GELU,
                                                  MOE_EP_ACTIVATION_RELU, MOE_EP_ACTIVATION_SWIGLU_CLAMPED };
static const char* const variant_act_names[] = { "SwiGLU", "GELU", "ReLU", "clamped SwiGLU" };
#define VARIANT_ACTS 4

/* Which biases an expert keeps: bit 0 b1, bit 1 b3, bit 2 b2. */
static const int bias_sets[] = { 0, 1, 2, 4, 7 };
#define BIAS_SETS 5

static void keep_biases(moe_ep_expert_weights* w, int set) {
    if (!(set & 1)) w->b1 = NULL;
    if (!(set & 2)) w->b3 = NULL;
    if (!(set & 4)) w->b2 = NULL;
}

/* Clamped SwiGLU's inputs: x of about 8x the usual size, so that gate and up values of
   about 8 rms go past the limit 7 in both directions. */
static float input_scale(moe_ep_activation act) { return act == MOE_EP_ACTIVATION_SWIGLU_CLAMPED ? 16.0f : 1.0f; }

/* How many gate values are above 7 and up values outside [-7, 7], in double. */
static void count_clamps(const moe_ep_expert_weights* w, int D, int F, const float* x, int64_t rows, int64_t* gate,
                         int64_t* up) {
    int64_t r;
    int f, i;
    *gate = *up = 0;
    for (r = 0; r < rows; ++r)
        for (f = 0; f < F; ++f) {
            double g = w->b1 ? w->b1[f] : 0.0, u = w->b3 ? w->b3[f] : 0.0;
            for (i = 0; i < D; ++i) {
                g += (double)w->w1[(size_t)f * D + i] * x[r * D + i];
                u += (double)w->w3[(size_t)f * D + i] * x[r * D + i];
            }
            *gate += g > 7.0;
            *up += fabs(u) > 7.0;
        }
}

static moe_ep_context* variant_context(const check_model* m, const moe_ep_expert_weights* experts,
                                       moe_ep_weight_layout layout, int threads) {
    moe_ep_context* ctx = NULL;
    moe_ep_result res = moe_ep_create(&(moe_ep_desc){ .d_model = m->d_model, .d_ff = m->d_ff, .num_experts = 1,
                                                      .activation = m->activation, .weight_layout = layout,
                                                      .num_threads = threads, .experts = experts }, &ctx);
    ck_assert_msg(res == MOE_EP_OK, "create: %s", moe_ep_result_string(res));
    return ctx;
}

/* >>reference */
START_TEST(ffn_variant_vs_reference) {
    int a = _i / BIAS_SETS, set = bias_sets[_i % BIAS_SETS];
    const int64_t rows = 19;
    size_t n = (size_t)rows * V_D;
    check_model m;
    moe_ep_expert_weights w;
    moe_ep_context* ctx;
    float* x = (float*)malloc(sizeof(float) * n);
    float* out = (float*)malloc(sizeof(float) * (n + V_D));
    double* ref = (double*)malloc(sizeof(double) * n);
    double err;
    uint64_t seed = 500 + (uint64_t)_i;
    check_model_init(&m, V_D, V_F, 1, 1, variant_acts[a], false, seed);
    check_model_add_biases(&m, seed + 1);
    w = m.experts[0];
    keep_biases(&w, set);
    test_fill(x, n, input_scale(m.activation), &seed);
    if (m.activation == MOE_EP_ACTIVATION_SWIGLU_CLAMPED) {
        int64_t gate, up;
        count_clamps(&w, V_D, V_F, x, rows, &gate, &up);
        ck_assert_msg(gate * 20 > rows * V_F && up * 20 > rows * V_F,
                      "the clamps must fire: gate %lld, up %lld of %lld", (long long)gate, (long long)up,
                      (long long)(rows * V_F));
    }
    check_ref_ffn(m.activation, V_D, V_F, &w, x, rows, ref);
    ctx = variant_context(&m, &w, MOE_EP_WEIGHT_LAYOUT_DEFAULT, 1);
    test_poison(out, n + V_D);
    ck_assert(moe_ep_expert_ffn(ctx, 0, x, rows, out) == MOE_EP_OK);
    err = check_rel_error(out, ref, n);
    ck_assert_msg(err < 1e-5, "%s, biases %d: relative error %.3g", variant_act_names[a], set, err);
    ck_assert_msg(test_is_poisoned(out + n, V_D), "%s: wrote past the last row", variant_act_names[a]);
    moe_ep_destroy(ctx);
    check_model_free(&m);
    free(x);
    free(out);
    free(ref);
}
END_TEST

/* >>layouts: the default weights rearranged as a checkpoint stores them. */
typedef struct layouts {
    float *fused, *fused_bias;      /* [2F, D], [2F] */
    float *oss, *oss_bias, *oss_down;  /* [D, 2F], [2F], [F, D] */
    float* llama;                   /* [D, 2F]: gate columns, then up columns (bias: fused_bias; down: oss_down) */
    moe_ep_expert_weights fused_w, oss_w, llama_w;
} layouts;

static void layouts_init(layouts* L, const moe_ep_expert_weights* w, int D, int F) {
    int f, i;
    L->fused = (float*)malloc(sizeof(float) * 2 * (size_t)F * D);
    L->fused_bias = (float*)malloc(sizeof(float) * 2 * (size_t)F);
    L->oss = (float*)malloc(sizeof(float) * 2 * (size_t)F * D);
    L->oss_bias = (float*)malloc(sizeof(float) * 2 * (size_t)F);
    L->oss_down = (float*)malloc(sizeof(float) * (size_t)F * D);
    L->llama = (float*)malloc(sizeof(float) * 2 * (size_t)F * D);
    for (f = 0; f < F; ++f) {
        for (i = 0; i < D; ++i) {
            L->fused[(size_t)f * D + i] = w->w1[(size_t)f * D + i];
            L->fused[(size_t)(F + f) * D + i] = w->w3[(size_t)f * D + i];
            L->oss[(size_t)i * 2 * F + 2 * f] = w->w1[(size_t)f * D + i];
            L->oss[(size_t)i * 2 * F + 2 * f + 1] = w->w3[(size_t)f * D + i];
            L->oss_down[(size_t)f * D + i] = w->w2[(size_t)i * F + f];
            L->llama[(size_t)i * 2 * F + f] = w->w1[(size_t)f * D + i];
            L->llama[(size_t)i * 2 * F + F + f] = w->w3[(size_t)f * D + i];
        }
        L->fused_bias[f] = L->oss_bias[2 * f] = w->b1 ? w->b1[f] : 0.0f;
        L->fused_bias[F + f] = L->oss_bias[2 * f + 1] = w->b3 ? w->b3[f] : 0.0f;
    }
    memset(&L->fused_w, 0, sizeof L->fused_w);
    L->fused_w.w1 = L->fused;
    L->fused_w.b1 = w->b1 || w->b3 ? L->fused_bias : NULL;
    L->fused_w.w2 = w->w2;
    L->fused_w.b2 = w->b2;
    memset(&L->oss_w, 0, sizeof L->oss_w);
    L->oss_w.w1 = L->oss;
    L->oss_w.b1 = w->b1 || w->b3 ? L->oss_bias : NULL;
    L->oss_w.w2 = L->oss_down;
    L->oss_w.b2 = w->b2;
    memset(&L->llama_w, 0, sizeof L->llama_w);
    L->llama_w.w1 = L->llama;
    L->llama_w.b1 = L->fused_w.b1;
    L->llama_w.w2 = L->oss_down;
    L->llama_w.b2 = w->b2;
}

/* The weights of `layout` (SEPARATE: the model's own). */
static const moe_ep_expert_weights* layouts_of(const layouts* L, const moe_ep_expert_weights* separate, int layout) {
    return layout == MOE_EP_WEIGHT_LAYOUT_FUSED_GATE_UP ? &L->fused_w
           : layout == MOE_EP_WEIGHT_LAYOUT_GPT_OSS ? &L->oss_w
           : layout == MOE_EP_WEIGHT_LAYOUT_LLAMA4 ? &L->llama_w : separate;
}

static void layouts_free(layouts* L) {
    free(L->fused); free(L->fused_bias); free(L->oss); free(L->oss_bias); free(L->oss_down); free(L->llama);
}

START_TEST(ffn_variant_layouts_same_bytes) {
    int a = _i / 2, biased = _i % 2;
    const int64_t rows = 37;
    size_t n = (size_t)rows * V_D;
    check_model m;
    layouts L;
    moe_ep_context* ctx;
    float* x = (float*)malloc(sizeof(float) * n);
    float *want = (float*)malloc(sizeof(float) * n), *got = (float*)malloc(sizeof(float) * n);
    uint64_t seed = 700 + (uint64_t)_i;
    int layout;
    check_model_init(&m, V_D, V_F, 1, 1, variant_acts[a], false, seed);
    if (biased) check_model_add_biases(&m, seed + 1);
    layouts_init(&L, &m.experts[0], V_D, V_F);
    test_fill(x, n, input_scale(m.activation), &seed);
    ctx = variant_context(&m, &m.experts[0], MOE_EP_WEIGHT_LAYOUT_DEFAULT, 1);
    ck_assert(moe_ep_expert_ffn(ctx, 0, x, rows, want) == MOE_EP_OK);
    moe_ep_destroy(ctx);
    for (layout = MOE_EP_WEIGHT_LAYOUT_FUSED_GATE_UP; layout < MOE_EP_WEIGHT_LAYOUT_COUNT; ++layout) {
        const moe_ep_expert_weights* w = layouts_of(&L, &m.experts[0], layout);
        ctx = variant_context(&m, w, (moe_ep_weight_layout)layout, 1);
        test_poison(got, n);
        ck_assert(moe_ep_expert_ffn(ctx, 0, x, rows, got) == MOE_EP_OK);
        ck_assert_msg(memcmp(got, want, sizeof(float) * n) == 0, "%s, biases %d: layout %d differs from the default",
                      variant_act_names[a], biased, layout);
        moe_ep_destroy(ctx);
    }
    layouts_free(&L);
    check_model_free(&m);
    free(x);
    free(want);
    free(got);
}
END_TEST

/* >>determinism: d_ff 300 puts the down product's K past one K slice. */
START_TEST(ffn_variant_rows_and_threads) {
    const int D = 40, F = 300, rows = 37;
    size_t n = (size_t)rows * D;
    check_model m;
    moe_ep_context* ctx;
    float* x = (float*)malloc(sizeof(float) * n);
    float *base = (float*)malloc(sizeof(float) * n), *out = (float*)malloc(sizeof(float) * n);
    uint64_t seed = 900 + (uint64_t)_i;
    int threads, count, r;
    check_model_init(&m, D, F, 1, 1, variant_acts[_i], false, seed);
    check_model_add_biases(&m, seed + 1);
    test_fill(x, n, input_scale(m.activation), &seed);
    ctx = variant_context(&m, &m.experts[0], MOE_EP_WEIGHT_LAYOUT_DEFAULT, 1);
    ck_assert(moe_ep_expert_ffn(ctx, 0, x, rows, base) == MOE_EP_OK);
    moe_ep_destroy(ctx);
    for (threads = 1; threads <= 3; ++threads) {
        ctx = variant_context(&m, &m.experts[0], MOE_EP_WEIGHT_LAYOUT_DEFAULT, threads);
        for (count = 1; count <= rows; ++count) {
            test_poison(out, n);
            ck_assert(moe_ep_expert_ffn(ctx, 0, x, count, out) == MOE_EP_OK);
            for (r = 0; r < count; ++r)
                ck_assert_msg(memcmp(out + (size_t)r * D, base + (size_t)r * D, sizeof(float) * (size_t)D) == 0,
                              "%s: row %d of %d rows on %d threads differs from the %d-row run",
                              variant_act_names[_i], r, count, threads, rows);
        }
        moe_ep_destroy(ctx);
    }
    check_model_free(&m);
    free(x);
    free(base);
    free(out);
}
END_TEST

/* >>layer: biases and clamped SwiGLU through the whole layer, 1 and 3 ranks. */
START_TEST(ffn_variant_layer_ranks) {
    const int D = 24, F = 40, E = 6, K = 2;
    int64_t tokens1 = 29, tokens3[3] = { 10, 7, 12 };
    size_t n = (size_t)tokens1 * D;
    check_model m;
    check_layer one, three;
    float* x = (float*)malloc(sizeof(float) * n);
    float *y1 = (float*)malloc(sizeof(float) * (n + 1)), *y3 = (float*)malloc(sizeof(float) * (n + 1));
    int32_t* idx = (int32_t*)malloc(sizeof(int32_t) * (size_t)tokens1 * K);
    double* weight = (double*)malloc(sizeof(double) * (size_t)tokens1 * K);
    double* ref = (double*)malloc(sizeof(double) * n);
    double err;
    char errors[2048];
    uint64_t seed = 1100 + (uint64_t)_i;
    check_model_init(&m, D, F, E, K, _i ? MOE_EP_ACTIVATION_SWIGLU_CLAMPED : MOE_EP_ACTIVATION_GELU, false, seed);
    check_model_add_biases(&m, seed + 1);
    test_fill(x, n, input_scale(m.activation), &seed);
    check_layer_init(&one, &m, 1, &tokens1, x, y1);
    test_poison(y1, n + 1);
    check_run_layer(&one);
    ck_assert_msg(one.result == MOE_EP_OK, "1 rank: %s", check_layer_errors(&one, errors, sizeof errors));
    check_layer_init(&three, &m, 3, tokens3, x, y3);
    test_poison(y3, n + 1);
    check_run_layer(&three);
    ck_assert_msg(three.result == MOE_EP_OK, "3 ranks: %s", check_layer_errors(&three, errors, sizeof errors));
    ck_assert_msg(memcmp(y1, y3, sizeof(float) * n) == 0, "%s: 3 ranks differ from 1", variant_act_names[_i ? 3 : 1]);
    check_ref_route(&m, x, tokens1, idx, weight);
    check_ref_layer(&m, x, tokens1, idx, weight, ref);
    err = check_rel_error(y1, ref, n);
    ck_assert_msg(err < 1e-5, "%s: layer vs float64: relative error %.3g", variant_act_names[_i ? 3 : 1], err);
    check_model_free(&m);
    free(x); free(y1); free(y3); free(idx); free(weight); free(ref);
}
END_TEST

/* >>TP: T ranks of one TP group (EP is the built-in single rank) run the same tokens. */
typedef struct tp_run {
    const check_model* model;
    const moe_ep_expert_weights* experts;
    moe_ep_weight_layout layout;
    const float* x;
    int64_t tokens;
    float* y;                       /* [T][tokens, d_model] */
} tp_run;

static moe_ep_result tp_rank(const moe_ep_transport* tp, void* user_data) {
    tp_run* t = (tp_run*)user_data;
    const check_model* m = t->model;
    moe_ep_context* ctx = NULL;
    moe_ep_result res = moe_ep_create(&(moe_ep_desc){ .d_model = m->d_model, .d_ff = m->d_ff,
                                                      .num_experts = m->num_experts, .top_k = m->top_k,
                                                      .activation = m->activation, .weight_layout = t->layout,
                                                      .num_threads = 1, .router_weight = m->router,
                                                      .experts = t->experts, .tp_transport = tp }, &ctx);
    if (res == MOE_EP_OK)
        res = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = t->tokens, .x = t->x,
                                                          .y = t->y + (size_t)tp->rank * (size_t)t->tokens * m->d_model });
    moe_ep_destroy(ctx);
    return res;
}

static void tp_forward(tp_run* t, int tp_size) {
    moe_ep_pthreads_world* world = NULL;
    ck_assert(moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = tp_size, .timeout_ms = 30000 },
                                           &world) == MOE_EP_OK);
    ck_assert_int_eq(moe_ep_pthreads_run(world, tp_rank, t, NULL), MOE_EP_OK);
    moe_ep_pthreads_world_destroy(world);
}

START_TEST(ffn_variant_tp) {
    const int D = 24, F = 42, E = 4, K = 2, tokens = 11;
    moe_ep_activation act = _i ? MOE_EP_ACTIVATION_SWIGLU_CLAMPED : MOE_EP_ACTIVATION_SWIGLU;
    size_t n = (size_t)tokens * D, k;
    check_model m;
    layouts L[4];
    moe_ep_expert_weights fused[4], oss[4], llama[4];
    float* x = (float*)malloc(sizeof(float) * n);
    float *y1 = (float*)malloc(sizeof(float) * n), *y2 = (float*)malloc(sizeof(float) * 2 * n);
    float* y2_default = (float*)malloc(sizeof(float) * 2 * n);
    double max_diff = 0.0, max_ref = 0.0;
    uint64_t seed = 1300 + (uint64_t)_i;
    tp_run t;
    int e, layout;
    check_model_init(&m, D, F, E, K, act, false, seed);
    check_model_add_biases(&m, seed + 1);
    test_fill(x, n, input_scale(act), &seed);
    for (e = 0; e < E; ++e) {
        layouts_init(&L[e], &m.experts[e], D, F);
        fused[e] = L[e].fused_w;
        oss[e] = L[e].oss_w;
        llama[e] = L[e].llama_w;
    }
    memset(&t, 0, sizeof t);
    t.model = &m; t.experts = m.experts; t.x = x; t.tokens = tokens; t.y = y1;
    tp_forward(&t, 1);
    for (layout = MOE_EP_WEIGHT_LAYOUT_SEPARATE; layout < MOE_EP_WEIGHT_LAYOUT_COUNT; ++layout) {
        t.layout = (moe_ep_weight_layout)layout;
        t.experts = layout == MOE_EP_WEIGHT_LAYOUT_FUSED_GATE_UP ? fused
                    : layout == MOE_EP_WEIGHT_LAYOUT_GPT_OSS ? oss
                    : layout == MOE_EP_WEIGHT_LAYOUT_LLAMA4 ? llama : m.experts;
        t.y = y2;
        test_poison(y2, 2 * n);
        tp_forward(&t, 2);
        ck_assert_msg(memcmp(y2, y2 + n, sizeof(float) * n) == 0, "layout %d: the TP ranks' outputs differ", layout);
        if (layout == MOE_EP_WEIGHT_LAYOUT_SEPARATE) memcpy(y2_default, y2, sizeof(float) * 2 * n);
        ck_assert_msg(memcmp(y2, y2_default, sizeof(float) * n) == 0, "layout %d: TP 2 differs from the default layout",
                      layout);
    }
    for (k = 0; k < n; ++k) {
        double diff = fabs((double)y2[k] - (double)y1[k]);
        ck_assert_msg(diff == diff, "element %zu is NaN", k);
        if (diff > max_diff) max_diff = diff;
        if (fabs((double)y1[k]) > max_ref) max_ref = fabs((double)y1[k]);
    }
    ck_assert_msg(max_diff <= 1e-6 * max_ref, "%s: TP 2 vs TP 1: error %g, max %g", act == MOE_EP_ACTIVATION_SWIGLU ?
                  "SwiGLU" : "clamped SwiGLU", max_diff, max_ref);
    for (e = 0; e < E; ++e) layouts_free(&L[e]);
    check_model_free(&m);
    free(x); free(y1); free(y2); free(y2_default);
}
END_TEST

Suite* ffn_variants_suite(void) {
    Suite* s = suite_create("ffn_variants");
    TCase* tc = tcase_create("variants");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, ffn_variant_vs_reference, 0, VARIANT_ACTS * BIAS_SETS);
    tcase_add_loop_test(tc, ffn_variant_layouts_same_bytes, 0, VARIANT_ACTS * 2);
    tcase_add_loop_test(tc, ffn_variant_rows_and_threads, 0, VARIANT_ACTS);
    tcase_add_loop_test(tc, ffn_variant_layer_ranks, 0, 2);
    tcase_add_loop_test(tc, ffn_variant_tp, 0, 2);
    suite_add_tcase(s, tc);
    return s;
}
