/* check_hostile.c -- inputs an attacker would try: each gets a named error (the field and the
   rule in words, before any arithmetic that could overflow) or a correct output, and
   out-params stay untouched on failure. One test per row of the table in the docs' failure
   section; each fails if its defect comes back. */
#include "check_moe_ep.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define H_D 8
#define H_F 12
#define H_E 6

static moe_ep_desc hostile_desc(const check_model* m) {
    moe_ep_desc d;
    memset(&d, 0, sizeof d);
    d.d_model = m->d_model;
    d.d_ff = m->d_ff;
    d.num_experts = m->num_experts;
    d.top_k = m->top_k;
    d.router_weight = m->router;
    d.experts = m->experts;
    return d;
}

/* layouts whose products pass an int: refused, and no query hands out ranks */
START_TEST(hostile_layout_overflow) {
    static const moe_ep_layout_desc cases[] = {
        { 4, 0, 65536, 65536, 8, { MOE_EP_PLACEMENT_DEFAULT, NULL } },          /* tp*dp = 2^32: was SIGFPE */
        { 4, 769546, 494770, 48448661, 8, { MOE_EP_PLACEMENT_DEFAULT, NULL } }, /* the product wraps to 4 */
    };
    moe_ep_layout_desc out;
    char err[256] = "";
    int ranks[4];
    moe_ep_coords c;
    const moe_ep_layout_desc* d = &cases[_i];
    memset(&out, 0x5a, sizeof out);
    ck_assert_int_eq(moe_ep_layout_resolve(d, &out, err, sizeof err), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_msg(strstr(err, "must equal world_size (4)") != NULL, "case %d: %s", _i, err);
    ck_assert_int_eq(moe_ep_layout_group(d, 0, MOE_EP_GROUP_EP, ranks, 4), -1);
    ck_assert_int_eq(moe_ep_layout_group(d, 1, MOE_EP_GROUP_DP, ranks, 4), -1);
    ck_assert_int_eq(moe_ep_layout_experts(d, 0, ranks, 4), -1);
    ck_assert_int_eq(moe_ep_layout_coords(d, 0, &c), MOE_EP_ERROR_INVALID_ARGUMENT);
}
END_TEST

/* num_threads past what an OpenMP runtime can start (libgomp exits the process) */
START_TEST(hostile_num_threads) {
    static const int threads[] = { 20000, 1 << 30, MOE_EP_MAX_THREADS + 1 };
    check_model m;
    moe_ep_context* ctx = NULL;
    moe_ep_desc d;
    char why[256] = "x";
    check_model_init(&m, H_D, H_F, H_E, 2, MOE_EP_ACTIVATION_SWIGLU, false, 300);
    d = hostile_desc(&m);
    d.num_threads = threads[_i];
    d.create_error = why;
    d.create_error_size = sizeof why;
    ck_assert_int_eq(moe_ep_create(&d, &ctx), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_ptr_null(ctx);
    /* no logger: the text reaches the caller through desc.create_error */
    ck_assert_msg(strstr(why, "num_threads") != NULL && strstr(why, "must be in [0, 1024]") != NULL, "%s", why);
    d.num_threads = 2;
    ck_assert_int_eq(moe_ep_create(&d, &ctx), MOE_EP_OK);
    ck_assert_str_eq(why, "");
    moe_ep_destroy(ctx);
    check_model_free(&m);
}
END_TEST

/* NaN or Inf in x, or in a router row: refused, the right field named, outputs untouched */
START_TEST(hostile_not_finite_input) {
    check_model m;
    moe_ep_context* ctx = NULL;
    moe_ep_desc d;
    float x[3 * H_D], weight[3 * 2], y[3 * H_D];
    int32_t idx[3 * 2];
    int64_t counts[H_E];
    moe_ep_router_stats stats;
    uint64_t seed = 301;
    int e;
    check_model_init(&m, H_D, H_F, H_E, 2, MOE_EP_ACTIVATION_SWIGLU, false, 302);
    test_fill(x, 3 * H_D, 1.0f, &seed);
    if (_i == 0) x[1 * H_D + 3] = NAN;
    else if (_i == 1) x[2 * H_D + 5] = -INFINITY;
    else m.router[4 * H_D + 2] = INFINITY;     /* expert 4's router row */
    d = hostile_desc(&m);
    ck_assert_int_eq(moe_ep_create(&d, &ctx), MOE_EP_OK);
    test_poison(weight, 6);
    test_poison(y, 3 * H_D);
    memset(idx, 0x77, sizeof idx);
    for (e = 0; e < H_E; ++e) counts[e] = -5;
    stats.tokens_per_expert = counts;
    stats.aux_loss = stats.z_loss = -1.0;
    ck_assert_int_eq(moe_ep_route(ctx, x, 3, idx, weight, &stats), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(moe_ep_last_error_item(ctx), MOE_EP_LOG_ITEM_ROUTE_NOT_FINITE);
    if (_i == 0) ck_assert_msg(strstr(moe_ep_last_error(ctx), "x[1][3]") != NULL, "%s", moe_ep_last_error(ctx));
    if (_i == 1) ck_assert_msg(strstr(moe_ep_last_error(ctx), "x[2][5]") != NULL, "%s", moe_ep_last_error(ctx));
    if (_i == 2) ck_assert_msg(strstr(moe_ep_last_error(ctx), "router_weight") != NULL, "%s", moe_ep_last_error(ctx));
    ck_assert_msg(strstr(moe_ep_last_error(ctx), "topk_weight") == NULL, "blames topk_weight: %s", moe_ep_last_error(ctx));
    ck_assert(test_is_poisoned(weight, 6));
    for (e = 0; e < 6; ++e) ck_assert_int_eq(idx[e], 0x77777777);
    for (e = 0; e < H_E; ++e) ck_assert_int_eq(counts[e], -5);
    ck_assert(stats.aux_loss == -1.0 && stats.z_loss == -1.0);
    /* forward: the same refusal, y and the routing out-params untouched */
    ck_assert_int_eq(moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = 3, .x = x, .y = y, .topk_idx = idx,
                                                                 .topk_weight = weight, .stats = &stats }),
                     MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert(test_is_poisoned(y, 3 * H_D) && test_is_poisoned(weight, 6));
    for (e = 0; e < 6; ++e) ck_assert_int_eq(idx[e], 0x77777777);
    for (e = 0; e < H_E; ++e) ck_assert_int_eq(counts[e], -5);
    moe_ep_destroy(ctx);
    check_model_free(&m);
}
END_TEST

/* finite but huge x: the output overflows, and forward says how many rows */
START_TEST(hostile_output_overflows) {
    check_model m;
    moe_ep_context* ctx = NULL;
    moe_ep_desc d;
    float x[4 * H_D], y[4 * H_D];
    int64_t nonfinite = -1;
    uint64_t seed = 303;
    moe_ep_result res;
    int t, i;
    check_model_init(&m, H_D, H_F, H_E, 2, MOE_EP_ACTIVATION_SWIGLU, false, 304);
    test_fill(x, 4 * H_D, 1.0f, &seed);
    d = hostile_desc(&m);
    ck_assert_int_eq(moe_ep_create(&d, &ctx), MOE_EP_OK);
    ck_assert_int_eq(moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = 4, .x = x, .y = y,
                                                                 .nonfinite_tokens = &nonfinite }), MOE_EP_OK);
    ck_assert_int_eq(nonfinite, 0);
    for (i = 0; i < H_D; ++i) x[2 * H_D + i] *= 1e25f;      /* logits ~1e25: finite; gate x up ~1e50 is not */
    res = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = 4, .x = x, .y = y, .nonfinite_tokens = &nonfinite });
    ck_assert_int_eq(res, MOE_EP_OK);
    ck_assert_int_eq(nonfinite, 1);
    for (t = 0; t < 4; ++t) {
        bool finite = true;
        for (i = 0; i < H_D; ++i) finite = finite && isfinite(y[t * H_D + i]);
        ck_assert_msg(finite == (t != 2), "token %d's row: finite %d", t, (int)finite);
    }
    moe_ep_destroy(ctx);
    check_model_free(&m);
}
END_TEST

/* a failing forward (an expert callback) writes none of the routing and statistics */
static int refusing_fn(int local_expert, int expert, const float* rows, int64_t row_count, int d_model, float* out,
                       void* user_data) {
    (void)local_expert; (void)expert; (void)rows; (void)row_count; (void)d_model; (void)out; (void)user_data;
    return 3;
}

START_TEST(hostile_out_params_on_failure) {
    check_model m;
    moe_ep_context* ctx = NULL;
    moe_ep_desc d;
    float x[3 * H_D], y[3 * H_D], weight[6];
    int32_t idx[6];
    int64_t counts[H_E];
    moe_ep_router_stats stats;
    uint64_t seed = 305;
    int e;
    check_model_init(&m, H_D, H_F, H_E, 2, MOE_EP_ACTIVATION_SWIGLU, false, 306);
    test_fill(x, 3 * H_D, 1.0f, &seed);
    d = hostile_desc(&m);
    d.experts = NULL;
    d.expert_fn = refusing_fn;
    ck_assert_int_eq(moe_ep_create(&d, &ctx), MOE_EP_OK);
    test_poison(y, 3 * H_D);
    test_poison(weight, 6);
    memset(idx, 0x77, sizeof idx);
    for (e = 0; e < H_E; ++e) counts[e] = -5;
    stats.tokens_per_expert = counts;
    stats.aux_loss = stats.z_loss = -1.0;
    ck_assert_int_eq(moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = 3, .x = x, .y = y, .topk_idx = idx,
                                                                 .topk_weight = weight, .stats = &stats }),
                     MOE_EP_ERROR_CALLBACK);
    ck_assert(test_is_poisoned(y, 3 * H_D) && test_is_poisoned(weight, 6));
    for (e = 0; e < 6; ++e) ck_assert_int_eq(idx[e], 0x77777777);
    for (e = 0; e < H_E; ++e) ck_assert_int_eq(counts[e], -5);
    ck_assert(stats.aux_loss == -1.0 && stats.z_loss == -1.0);
    /* half the routing pair: refused, not silently ignored */
    ck_assert_int_eq(moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = 3, .x = x, .y = y, .topk_idx = idx }),
                     MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(moe_ep_last_error_item(ctx), MOE_EP_LOG_ITEM_FORWARD_ROUTING_IN);
    ck_assert_msg(strstr(moe_ep_last_error(ctx), "topk_weight is NULL") != NULL, "%s", moe_ep_last_error(ctx));
    for (e = 0; e < 6; ++e) ck_assert_int_eq(idx[e], 0x77777777);
    moe_ep_destroy(ctx);
    check_model_free(&m);
}
END_TEST

/* tokens near 2^62: a named error about tokens, before tokens x top_k or tokens x E overflows */
START_TEST(hostile_huge_tokens) {
    static const int64_t tokens[] = { (int64_t)1 << 62, INT64_MAX, ((int64_t)1 << 62) / H_E + 1 };
    check_model m;
    moe_ep_context* ctx = NULL;
    moe_ep_desc d;
    moe_ep_plan* plan = (moe_ep_plan*)&m;
    float x[H_D], y[H_D], weight[2];
    int32_t idx[2] = { 0, 1 };
    check_model_init(&m, H_D, H_F, H_E, 2, MOE_EP_ACTIVATION_SWIGLU, false, 307);
    d = hostile_desc(&m);
    ck_assert_int_eq(moe_ep_create(&d, &ctx), MOE_EP_OK);
    ck_assert_int_eq(moe_ep_route(ctx, x, tokens[_i], idx, weight, NULL), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(moe_ep_last_error_item(ctx), MOE_EP_LOG_ITEM_ROUTE_TOKENS);
    ck_assert_msg(strstr(moe_ep_last_error(ctx), "tokens (") != NULL, "%s", moe_ep_last_error(ctx));
    ck_assert_int_eq(moe_ep_plan_create(ctx, tokens[_i], idx, weight, &plan), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_msg(plan == (moe_ep_plan*)&m, "plan written on failure");
    ck_assert_msg(strstr(moe_ep_last_error(ctx), "tokens (") != NULL, "%s", moe_ep_last_error(ctx));
    ck_assert_int_eq(moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = tokens[_i], .x = x, .y = y }),
                     MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(moe_ep_last_error_item(ctx), MOE_EP_LOG_ITEM_FORWARD_TOKENS);
    ck_assert_int_eq(moe_ep_expert_ffn(ctx, 0, x, tokens[_i], y), MOE_EP_ERROR_INVALID_ARGUMENT);
    moe_ep_destroy(ctx);
    check_model_free(&m);
}
END_TEST

/* top-k by a heap: the choice and order of k rounds of "best not taken" (ties to the lower
   index), here against exactly that in the test, over every k of E = 64 with ties, and at
   E = k = 2048 (which cost 2.75 s per token in O(E k^2)) */
START_TEST(hostile_top_k_wide) {
    int E = _i == 0 ? 64 : 2048, k, t, tokens = _i == 0 ? 4 : 2, D = 4, e, j;
    float* router = (float*)malloc(sizeof(float) * (size_t)E * (size_t)D);
    float* x = (float*)malloc(sizeof(float) * (size_t)tokens * (size_t)D);
    int32_t* idx = (int32_t*)malloc(sizeof(int32_t) * (size_t)tokens * (size_t)E);
    float* weight = (float*)malloc(sizeof(float) * (size_t)tokens * (size_t)E);
    unsigned char* taken = (unsigned char*)malloc((size_t)E);
    uint64_t seed = 308;
    for (e = 0; e < E * D; ++e)     /* few distinct rows: many experts tie */
        router[e] = (float)((e / D) % 7) * 0.25f * (float)(e % D + 1);
    test_fill(x, (size_t)tokens * (size_t)D, 1.0f, &seed);
    for (k = _i == 0 ? 1 : E; k <= E; k += _i == 0 ? 1 : E) {
        moe_ep_context* ctx = NULL;
        ck_assert_int_eq(moe_ep_create(&(moe_ep_desc){ .d_model = D, .expert_fn = refusing_fn, .num_experts = E,
                                                       .top_k = k, .router_weight = router,
                                                       .scoring = MOE_EP_SCORING_TOPK_SIGMOID }, &ctx), MOE_EP_OK);
        ck_assert_int_eq(moe_ep_route(ctx, x, tokens, idx, weight, NULL), MOE_EP_OK);
        for (t = 0; t < tokens; ++t) {
            /* the logits in the library's order (i = 0..D-1 from zero), then k rounds of argmax */
            float logit[2048];
            for (e = 0; e < E; ++e) {
                float acc = 0.0f;
                int i;
                for (i = 0; i < D; ++i) acc += x[t * D + i] * router[e * D + i];
                logit[e] = acc;
            }
            memset(taken, 0, (size_t)E);
            for (j = 0; j < k; ++j) {
                int best = -1;
                for (e = 0; e < E; ++e)
                    if (!taken[e] && (best < 0 || logit[e] > logit[best])) best = e;
                taken[best] = 1;
                ck_assert_msg(idx[t * k + j] == best, "E %d, k %d, token %d, slot %d: expert %d, expected %d", E, k, t, j,
                              idx[t * k + j], best);
            }
        }
        moe_ep_destroy(ctx);
    }
    free(router); free(x); free(idx); free(weight); free(taken);
}
END_TEST

/* a plan destroyed after its context: safe (it keeps the allocator); nothing leaks */
START_TEST(hostile_plan_after_context) {
    check_model m;
    test_counter count;
    moe_ep_context* ctx = NULL;
    moe_ep_plan* plan = NULL;
    moe_ep_desc d;
    int32_t idx[4] = { 0, 1, 2, 3 };
    float weight[4] = { 0.5f, 0.5f, 0.5f, 0.5f };
    check_model_init(&m, H_D, H_F, H_E, 2, MOE_EP_ACTIVATION_SWIGLU, false, 309);
    test_counter_init(&count);
    d = hostile_desc(&m);
    d.allocator = test_counter_allocator(&count);
    ck_assert_int_eq(moe_ep_create(&d, &ctx), MOE_EP_OK);
    ck_assert_int_eq(moe_ep_plan_create(ctx, 2, idx, weight, &plan), MOE_EP_OK);
    moe_ep_destroy(ctx);
    moe_ep_plan_destroy(plan);      /* under ASan (make check-asan) a use after free shows here */
    ck_assert_int_eq(test_counter_outstanding(&count), 0);
    test_counter_destroy(&count);
    check_model_free(&m);
}
END_TEST

Suite* hostile_suite(void) {
    Suite* s = suite_create("hostile");
    TCase* tc = tcase_create("inputs");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, hostile_layout_overflow, 0, 2);
    tcase_add_loop_test(tc, hostile_num_threads, 0, 3);
    tcase_add_loop_test(tc, hostile_not_finite_input, 0, 3);
    tcase_add_test(tc, hostile_output_overflows);
    tcase_add_test(tc, hostile_out_params_on_failure);
    tcase_add_loop_test(tc, hostile_huge_tokens, 0, 3);
    tcase_add_loop_test(tc, hostile_top_k_wide, 0, 2);
    tcase_add_test(tc, hostile_plan_after_context);
    suite_add_tcase(s, tc);
    return s;
}
