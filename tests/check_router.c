/* check_router.c -- softmax, top-k (ties to the lower index), renormalisation and the
   router statistics on hand-computed cases; validation of caller-supplied routing. */
#include "check_moe_ep.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Four experts over d_model = 2. Every logit below is exact in float. */
#define R_E 4
#define R_D 2
#define R_T 4
static const float router_w[R_E * R_D] = {
    1.0f, 0.0f,     /* e0 */
    0.0f, 1.0f,     /* e1 */
    0.5f, 0.5f,     /* e2 */
    -1.0f, 0.5f,    /* e3 */
};
static const float router_x[R_T * R_D] = {
    1.0f, 2.0f,     /* logits  1,  2,  1.5,  0   */
    2.0f, 2.0f,     /* logits  2,  2,  2,   -1   : a three-way tie */
    -1.0f, 1.0f,    /* logits -1,  1,  0,    1.5 */
    3.0f, -1.0f,    /* logits  3, -1,  1,   -3.5 */
};
static const double router_logits[R_T][R_E] = {
    { 1.0, 2.0, 1.5, 0.0 },
    { 2.0, 2.0, 2.0, -1.0 },
    { -1.0, 1.0, 0.0, 1.5 },
    { 3.0, -1.0, 1.0, -3.5 },
};
/* Experts by descending logit; equal logits in ascending index. */
static const int router_order[R_T][R_E] = {
    { 1, 2, 0, 3 },
    { 0, 1, 2, 3 },
    { 3, 1, 2, 0 },
    { 0, 2, 1, 3 },
};

typedef struct router_case {
    int top_k;
    bool normalize;
    int64_t tokens_per_expert[R_E];  /* counted by hand from router_order */
} router_case;

static const router_case router_cases[] = {
    { 1, false, { 2, 1, 0, 1 } },
    { 2, false, { 2, 3, 2, 1 } },
    { 2, true, { 2, 3, 2, 1 } },
    { 3, false, { 3, 4, 4, 1 } },
    { 3, true, { 3, 4, 4, 1 } },
    { 4, true, { 4, 4, 4, 4 } },
};

static int router_identity_fn(int local_expert, int expert, const float* rows, int64_t row_count, int d_model,
                              float* out, void* user_data) {
    (void)local_expert; (void)expert; (void)user_data;
    memcpy(out, rows, sizeof(float) * (size_t)(row_count * d_model));
    return 0;
}

static moe_ep_context* router_create(int top_k, bool normalize) {
    moe_ep_context* ctx = NULL;
    moe_ep_result res = moe_ep_create(&(moe_ep_desc){ .d_model = R_D, .num_experts = R_E, .top_k = top_k,
                                                      .normalize_topk = normalize, .router_weight = router_w,
                                                      .expert_fn = router_identity_fn, .num_threads = 1 }, &ctx);
    ck_assert_msg(res == MOE_EP_OK, "create: %s", moe_ep_result_string(res));
    return ctx;
}

START_TEST(router_hand_cases) {
    const router_case* c = &router_cases[_i];
    int k = c->top_k, t, j, e;
    moe_ep_context* ctx = router_create(k, c->normalize);
    int32_t idx[R_T * R_E];
    float weight[R_T * R_E];
    int64_t counts[R_E] = { -7, -7, -7, -7 };
    moe_ep_router_stats stats;
    double prob[R_T][R_E], lse[R_T], mean_p[R_E] = { 0, 0, 0, 0 }, aux = 0.0, z = 0.0;
    moe_ep_result res;
    memset(&stats, 0, sizeof stats);
    stats.tokens_per_expert = counts;
    stats.aux_loss = -1.0;
    stats.z_loss = -1.0;
    res = moe_ep_route(ctx, router_x, R_T, idx, weight, &stats);
    ck_assert_msg(res == MOE_EP_OK, "route: %s: %s", moe_ep_result_string(res), moe_ep_last_error(ctx));
    for (t = 0; t < R_T; ++t) {
        double sum = 0.0;
        for (e = 0; e < R_E; ++e) sum += exp(router_logits[t][e]);
        lse[t] = log(sum);
        for (e = 0; e < R_E; ++e) {
            prob[t][e] = exp(router_logits[t][e]) / sum;
            mean_p[e] += prob[t][e] / R_T;
        }
    }
    for (t = 0; t < R_T; ++t) {
        double wsum = 0.0;
        for (j = 0; j < k; ++j) wsum += prob[t][router_order[t][j]];
        for (j = 0; j < k; ++j) {
            int want = router_order[t][j];
            double w = prob[t][want] / (c->normalize ? wsum : 1.0);
            ck_assert_msg(idx[t * k + j] == want, "k=%d token %d slot %d: expert %d, expected %d", k, t, j,
                          (int)idx[t * k + j], want);
            ck_assert_msg(fabs((double)weight[t * k + j] - w) <= 1e-6, "k=%d token %d slot %d: weight %.9g, expected %.9g",
                          k, t, j, (double)weight[t * k + j], w);
        }
    }
    for (e = 0; e < R_E; ++e) {
        ck_assert_msg(counts[e] == c->tokens_per_expert[e], "k=%d tokens_per_expert[%d] = %lld, expected %lld", k, e,
                      (long long)counts[e], (long long)c->tokens_per_expert[e]);
        aux += ((double)c->tokens_per_expert[e] / (double)(R_T * k)) * mean_p[e];
    }
    aux *= R_E;
    for (t = 0; t < R_T; ++t) z += lse[t] * lse[t] / R_T;
    ck_assert_msg(fabs(stats.aux_loss - aux) <= 1e-6 * fabs(aux), "k=%d aux_loss %.12g, expected %.12g", k,
                  stats.aux_loss, aux);
    ck_assert_msg(fabs(stats.z_loss - z) <= 1e-6 * fabs(z), "k=%d z_loss %.12g, expected %.12g", k, stats.z_loss, z);
    moe_ep_destroy(ctx);
}
END_TEST

/* The tie token alone: three experts share the top logit, k = 1 picks the lowest. */
START_TEST(router_tie_lowest_index) {
    moe_ep_context* ctx = router_create(1, false);
    int32_t idx[1] = { -1 };
    float weight[1] = { 0.0f };
    float x[2] = { 4.0f, 4.0f };   /* logits 4, 4, 4, -2 */
    ck_assert_int_eq(moe_ep_route(ctx, x, 1, idx, weight, NULL), MOE_EP_OK);
    ck_assert_msg(idx[0] == 0, "tie went to expert %d", (int)idx[0]);
    ck_assert_msg(fabs((double)weight[0] - exp(4.0) / (3 * exp(4.0) + exp(-2.0))) <= 1e-6, "weight %.9g",
                  (double)weight[0]);
    moe_ep_destroy(ctx);
}
END_TEST

START_TEST(router_zero_tokens) {
    moe_ep_context* ctx = router_create(2, false);
    int64_t counts[R_E] = { 5, 5, 5, 5 };
    moe_ep_router_stats stats;
    int e;
    stats.tokens_per_expert = counts;
    stats.aux_loss = 3.0;
    stats.z_loss = 3.0;
    ck_assert_int_eq(moe_ep_route(ctx, NULL, 0, NULL, NULL, &stats), MOE_EP_OK);
    for (e = 0; e < R_E; ++e) ck_assert_msg(counts[e] == 0, "tokens_per_expert[%d] = %lld", e, (long long)counts[e]);
    ck_assert_msg(stats.aux_loss == 0.0 && stats.z_loss == 0.0, "aux %g z %g", stats.aux_loss, stats.z_loss);
    moe_ep_destroy(ctx);
}
END_TEST

/* moe_ep_forward reports the router's choice and statistics when asked to. */
START_TEST(router_forward_writes_routing) {
    moe_ep_context* ctx = router_create(2, true);
    int32_t idx[R_T * 2], idx2[R_T * 2];
    float weight[R_T * 2], weight2[R_T * 2], y[R_T * R_D];
    int64_t counts[R_E];
    moe_ep_router_stats stats, stats2;
    moe_ep_result res;
    int t, j, i;
    memset(&stats, 0, sizeof stats);
    stats.tokens_per_expert = counts;
    memset(&stats2, 0, sizeof stats2);
    test_poison(y, R_T * R_D);
    res = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = R_T, .x = router_x, .y = y, .topk_idx = idx,
                                                      .topk_weight = weight, .stats = &stats });
    ck_assert_msg(res == MOE_EP_OK, "forward: %s: %s", moe_ep_result_string(res), moe_ep_last_error(ctx));
    ck_assert_int_eq(moe_ep_route(ctx, router_x, R_T, idx2, weight2, &stats2), MOE_EP_OK);
    ck_assert_msg(memcmp(idx, idx2, sizeof idx) == 0 && memcmp(weight, weight2, sizeof weight) == 0,
                  "forward's routing differs from moe_ep_route's");
    ck_assert_msg(stats.aux_loss == stats2.aux_loss && stats.z_loss == stats2.z_loss, "forward's statistics differ");
    ck_assert_msg(counts[0] == 2 && counts[1] == 3 && counts[2] == 2 && counts[3] == 1, "counts %lld %lld %lld %lld",
                  (long long)counts[0], (long long)counts[1], (long long)counts[2], (long long)counts[3]);
    /* identity experts and normalised weights: y = x */
    for (t = 0; t < R_T; ++t)
        for (i = 0; i < R_D; ++i) {
            float want = 0.0f;
            for (j = 0; j < 2; ++j) want += weight[t * 2 + j] * router_x[t * R_D + i];
            ck_assert_msg(fabsf(y[t * R_D + i] - want) <= 1e-6f * fabsf(want) + 1e-7f, "y[%d][%d] = %g, expected %g",
                          t, i, (double)y[t * R_D + i], (double)want);
        }
    moe_ep_destroy(ctx);
}
END_TEST

START_TEST(router_needs_weights) {
    moe_ep_context* ctx = NULL;
    int32_t idx[2];
    float weight[2], y[R_D * 2];
    moe_ep_result res = moe_ep_create(&(moe_ep_desc){ .d_model = R_D, .num_experts = R_E, .top_k = 1,
                                                      .expert_fn = router_identity_fn }, &ctx);
    ck_assert_msg(res == MOE_EP_OK, "create without router weights: %s", moe_ep_result_string(res));
    ck_assert_int_eq(moe_ep_route(ctx, router_x, 2, idx, weight, NULL), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_msg(moe_ep_last_error_item(ctx) == MOE_EP_LOG_ITEM_ROUTER_WEIGHT_MISSING, "message: %s",
                  moe_ep_last_error(ctx));
    test_poison(y, R_D * 2);
    ck_assert_int_eq(moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = 2, .x = router_x, .y = y }),
                     MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_msg(moe_ep_last_error_item(ctx) == MOE_EP_LOG_ITEM_ROUTER_WEIGHT_MISSING, "message: %s",
                  moe_ep_last_error(ctx));
    ck_assert_msg(test_is_poisoned(y, R_D * 2), "y written on failure");
    moe_ep_destroy(ctx);
}
END_TEST

/* >>caller's routing: each defect gives INVALID_ARGUMENT and a message that names it. */
typedef struct bad_routing {
    int token, slot;
    int32_t expert;
    float weight;                   /* used when expert is -100: keep the good expert, set this weight */
    moe_ep_log_item item;
    const char* needle;             /* where: the message names the token and slot */
} bad_routing;

static const bad_routing bad_routings[] = {
    { 1, 0, 4, 0.0f, MOE_EP_LOG_ITEM_ROUTING_EXPERT_RANGE, "topk_idx[1][0] (4)" },
    { 2, 1, -1, 0.0f, MOE_EP_LOG_ITEM_ROUTING_EXPERT_RANGE, "topk_idx[2][1] (-1)" },
    { 3, 1, 1, 0.0f, MOE_EP_LOG_ITEM_ROUTING_EXPERT_TWICE, "topk_idx[3] names expert 1" },  /* token 3 is { 1, 2 } */
    { 1, 1, -100, 0.0f, MOE_EP_LOG_ITEM_ROUTING_WEIGHT_NOT_FINITE, "topk_weight[1][1]" },     /* NaN, set below */
    { 2, 0, -100, 0.0f, MOE_EP_LOG_ITEM_ROUTING_WEIGHT_NOT_FINITE, "topk_weight[2][0]" },     /* +inf */
    { 0, 1, -100, 0.0f, MOE_EP_LOG_ITEM_ROUTING_WEIGHT_NOT_FINITE, "topk_weight[0][1]" },     /* -inf */
};

START_TEST(routing_in_validated) {
    const bad_routing* b = &bad_routings[_i];
    moe_ep_context* ctx = NULL;
    moe_ep_plan* plan = (moe_ep_plan*)&ctx;   /* a sentinel: must stay */
    test_log log;
    int32_t idx[R_T * 2] = { 0, 1, 2, 3, 3, 0, 1, 2 };
    float weight[R_T * 2] = { 0.5f, 0.25f, 0.5f, 0.25f, 0.5f, 0.25f, 0.5f, 0.25f };
    float y[R_T * R_D];
    char joined[2048];
    moe_ep_result res;
    test_log_init(&log);
    res = moe_ep_create(&(moe_ep_desc){ .d_model = R_D, .num_experts = R_E, .top_k = 2, .router_weight = router_w,
                                        .expert_fn = router_identity_fn, .logger = test_log_logger(&log) },
                        &ctx);
    ck_assert_msg(res == MOE_EP_OK, "create: %s", moe_ep_result_string(res));
    if (b->expert != -100) idx[b->token * 2 + b->slot] = b->expert;
    else if (_i == 3) weight[b->token * 2 + b->slot] = NAN;
    else if (_i == 4) weight[b->token * 2 + b->slot] = INFINITY;
    else weight[b->token * 2 + b->slot] = -INFINITY;
    test_poison(y, R_T * R_D);
    res = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = R_T, .x = router_x, .y = y, .routing_in = true,
                                                      .topk_idx = idx, .topk_weight = weight });
    ck_assert_msg(res == MOE_EP_ERROR_INVALID_ARGUMENT, "case %d: forward returned %s", _i, moe_ep_result_string(res));
    ck_assert_msg(moe_ep_last_error_item(ctx) == b->item, "case %d: item %s, want %s", _i,
                  moe_ep_log_item_string(moe_ep_last_error_item(ctx)), moe_ep_log_item_string(b->item));
    ck_assert_msg(strstr(moe_ep_last_error(ctx), b->needle) != NULL, "case %d: last error \"%s\" lacks \"%s\"", _i,
                  moe_ep_last_error(ctx), b->needle);
    ck_assert_msg(test_log_find_item(&log, b->item) >= 0, "case %d: log lacks %s: %s", _i,
                  moe_ep_log_item_string(b->item), test_log_join(&log, joined, sizeof joined));
    ck_assert_msg(test_is_poisoned(y, R_T * R_D), "case %d: y written on failure", _i);
    res = moe_ep_plan_create(ctx, R_T, idx, weight, &plan);
    ck_assert_msg(res == MOE_EP_ERROR_INVALID_ARGUMENT, "case %d: plan_create returned %s", _i,
                  moe_ep_result_string(res));
    ck_assert_msg(plan == (moe_ep_plan*)&ctx, "case %d: plan_create wrote its out-param on failure", _i);
    ck_assert_msg(moe_ep_last_error_item(ctx) == b->item, "case %d: plan_create item %s", _i,
                  moe_ep_log_item_string(moe_ep_last_error_item(ctx)));
    ck_assert_msg(strstr(moe_ep_last_error(ctx), b->needle) != NULL, "case %d: plan_create error \"%s\"", _i,
                  moe_ep_last_error(ctx));
    moe_ep_destroy(ctx);
    test_log_destroy(&log);
}
END_TEST

/* Duplicate experts in a token, on both sides of E = 64 (the plan checks up to 64 experts
   with a bit mask, more with a scan): the repeat is found wherever it sits in the token,
   and distinct experts pass. */
START_TEST(routing_in_duplicates_any_e) {
    static const int num_experts[] = { 63, 64, 65, 200 };
    int E = num_experts[_i / 3], where = _i % 3, t, j;
    enum { T = 5, K = 4 };
    moe_ep_context* ctx = NULL;
    moe_ep_plan* plan = NULL;
    int32_t idx[T * K];
    float weight[T * K];
    char needle[64];
    moe_ep_result res = moe_ep_create(&(moe_ep_desc){ .d_model = 4, .num_experts = E, .top_k = K,
                                                      .expert_fn = router_identity_fn }, &ctx);
    ck_assert_msg(res == MOE_EP_OK, "create: %s", moe_ep_result_string(res));
    for (t = 0; t < T; ++t)
        for (j = 0; j < K; ++j) {
            idx[t * K + j] = (E - 1 - 7 * t - j + 10 * E) % E;   /* distinct in a token, the top expert included */
            weight[t * K + j] = 0.25f;
        }
    res = moe_ep_plan_create(ctx, T, idx, weight, &plan);
    ck_assert_msg(res == MOE_EP_OK, "E=%d distinct experts: %s (%s)", E, moe_ep_result_string(res), moe_ep_last_error(ctx));
    moe_ep_plan_destroy(plan);
    plan = NULL;
    /* token 3 repeats one of its experts: slot 0 in slot 1, slot 0 in slot 3, or slot 2 in slot 3 */
    if (where == 0) idx[3 * K + 1] = idx[3 * K + 0];
    else if (where == 1) idx[3 * K + 3] = idx[3 * K + 0];
    else idx[3 * K + 3] = idx[3 * K + 2];
    snprintf(needle, sizeof needle, "topk_idx[3] names expert %d twice", (int)idx[3 * K + (where == 0 ? 1 : 3)]);
    res = moe_ep_plan_create(ctx, T, idx, weight, &plan);
    ck_assert_msg(res == MOE_EP_ERROR_INVALID_ARGUMENT, "E=%d case %d: %s", E, where, moe_ep_result_string(res));
    ck_assert_msg(plan == NULL, "E=%d case %d: plan written on failure", E, where);
    ck_assert_msg(moe_ep_last_error_item(ctx) == MOE_EP_LOG_ITEM_ROUTING_EXPERT_TWICE, "E=%d case %d: item %s", E,
                  where, moe_ep_log_item_string(moe_ep_last_error_item(ctx)));
    ck_assert_msg(strstr(moe_ep_last_error(ctx), needle) != NULL, "E=%d case %d: \"%s\" lacks \"%s\"", E, where,
                  moe_ep_last_error(ctx), needle);
    moe_ep_destroy(ctx);
}
END_TEST

Suite* router_suite(void) {
    Suite* s = suite_create("router");
    TCase* tc = tcase_create("hand");
    TCase* tc_in = tcase_create("routing_in");
    tcase_add_loop_test(tc, router_hand_cases, 0, (int)(sizeof router_cases / sizeof router_cases[0]));
    tcase_add_test(tc, router_tie_lowest_index);
    tcase_add_test(tc, router_zero_tokens);
    tcase_add_test(tc, router_forward_writes_routing);
    tcase_add_test(tc, router_needs_weights);
    tcase_add_loop_test(tc_in, routing_in_validated, 0, (int)(sizeof bad_routings / sizeof bad_routings[0]));
    tcase_add_loop_test(tc_in, routing_in_duplicates_any_e, 0, 12);
    suite_add_tcase(s, tc);
    suite_add_tcase(s, tc_in);
    return s;
}
