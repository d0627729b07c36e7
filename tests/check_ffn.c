/* check_ffn.c -- the built-in expert FFN against a float64 reference, and its determinism.

   Error measure: max |out - ref| / max |ref| over the whole output (check_rel_error),
   which must stay below 1e-5. d_model 37 and d_ff 53 are multiples of neither the
   kernel's 4-row tiles nor its 32-column panels. Outputs are filled with NaN first
   and one extra row past the end must stay NaN. */
#include "check_moe_ep.h"

#include <stdlib.h>
#include <string.h>

#define F_D 37
#define F_F 53
#define F_E 3

static const moe_ep_activation ffn_acts[] = { MOE_EP_ACTIVATION_SWIGLU, MOE_EP_ACTIVATION_GELU,
                                              MOE_EP_ACTIVATION_RELU };
static const char* const ffn_act_names[] = { "SwiGLU", "GELU", "ReLU" };
static const int64_t ffn_rows[] = { 0, 1, 3, 17 };

static moe_ep_context* ffn_context(const check_model* m, int threads) {
    moe_ep_context* ctx = NULL;
    moe_ep_result res = moe_ep_create(&(moe_ep_desc){ .d_model = m->d_model, .d_ff = m->d_ff, .num_experts = m->num_experts,
                                                      .activation = m->activation, .num_threads = threads,
                                                      .router_weight = m->router, .experts = m->experts }, &ctx);
    ck_assert_msg(res == MOE_EP_OK, "create: %s", moe_ep_result_string(res));
    return ctx;
}

START_TEST(ffn_vs_reference) {
    int a = _i / 4, expert = _i % F_E;
    int64_t rows = ffn_rows[_i % 4];
    check_model m;
    moe_ep_context* ctx;
    uint64_t seed = 100 + (uint64_t)_i;
    size_t n = (size_t)rows * F_D;
    float* x = (float*)malloc(sizeof(float) * (n + F_D));
    float* out = (float*)malloc(sizeof(float) * (n + F_D));
    double* ref = (double*)malloc(sizeof(double) * (n + 1));
    moe_ep_result res;
    check_model_init(&m, F_D, F_F, F_E, 1, ffn_acts[a], false, 200 + (uint64_t)_i);
    ctx = ffn_context(&m, 0);
    test_fill(x, n + F_D, 1.0f, &seed);
    test_poison(out, n + F_D);
    res = moe_ep_expert_ffn(ctx, expert, x, rows, out);
    ck_assert_msg(res == MOE_EP_OK, "%s rows %lld: %s: %s", ffn_act_names[a], (long long)rows, moe_ep_result_string(res),
                  moe_ep_last_error(ctx));
    ck_assert_msg(test_is_poisoned(out + n, F_D), "%s rows %lld: wrote past the last row", ffn_act_names[a],
                  (long long)rows);
    if (rows > 0) {
        double err;
        check_ref_ffn(ffn_acts[a], F_D, F_F, &m.experts[expert], x, rows, ref);
        err = check_rel_error(out, ref, n);
        ck_assert_msg(err < 1e-5, "%s expert %d rows %lld: relative error %.3g", ffn_act_names[a], expert,
                      (long long)rows, err);
    }
    moe_ep_destroy(ctx);
    check_model_free(&m);
    free(x);
    free(out);
    free(ref);
}
END_TEST

/* The other experts' weights are not mixed in: each local index gives its own expert. */
START_TEST(ffn_expert_index) {
    check_model m;
    moe_ep_context* ctx;
    uint64_t seed = 5;
    float x[3 * F_D], out[F_E][3 * F_D];
    double ref[3 * F_D];
    int e;
    check_model_init(&m, F_D, F_F, F_E, 1, MOE_EP_ACTIVATION_SWIGLU, false, 6);
    ctx = ffn_context(&m, 1);
    test_fill(x, 3 * F_D, 1.0f, &seed);
    for (e = 0; e < F_E; ++e) {
        ck_assert_int_eq(moe_ep_expert_ffn(ctx, e, x, 3, out[e]), MOE_EP_OK);
        check_ref_ffn(MOE_EP_ACTIVATION_SWIGLU, F_D, F_F, &m.experts[e], x, 3, ref);
        ck_assert_msg(check_rel_error(out[e], ref, 3 * F_D) < 1e-5, "expert %d: relative error %.3g", e,
                      check_rel_error(out[e], ref, 3 * F_D));
    }
    ck_assert_msg(memcmp(out[0], out[1], sizeof out[0]) != 0, "experts 0 and 1 give the same output");
    moe_ep_destroy(ctx);
    check_model_free(&m);
}
END_TEST

/* num_threads 1 and 2 give the same bytes. */
START_TEST(ffn_threads_bitwise) {
    int a = _i;
    check_model m;
    moe_ep_context *one, *two;
    uint64_t seed = 300 + (uint64_t)_i;
    const int64_t sizes[3] = { 41, 5, 64 };
    float* x = (float*)malloc(sizeof(float) * 64 * F_D);
    float* y1 = (float*)malloc(sizeof(float) * 64 * F_D);
    float* y2 = (float*)malloc(sizeof(float) * 64 * F_D);
    int s;
    check_model_init(&m, F_D, F_F, F_E, 1, ffn_acts[a], false, 400 + (uint64_t)_i);
    one = ffn_context(&m, 1);
    two = ffn_context(&m, 2);
    ck_assert_int_eq(moe_ep_query(two).num_threads, 2);
    test_fill(x, 64 * F_D, 1.0f, &seed);
    for (s = 0; s < 3; ++s) {
        test_poison(y1, 64 * F_D);
        test_poison(y2, 64 * F_D);
        ck_assert_int_eq(moe_ep_expert_ffn(one, 1, x, sizes[s], y1), MOE_EP_OK);
        ck_assert_int_eq(moe_ep_expert_ffn(two, 1, x, sizes[s], y2), MOE_EP_OK);
        ck_assert_msg(memcmp(y1, y2, sizeof(float) * 64 * F_D) == 0, "%s rows %lld: 1 and 2 threads differ",
                      ffn_act_names[a], (long long)sizes[s]);
        ck_assert_msg(!test_is_poisoned(y1, F_D), "nothing written");
    }
    moe_ep_destroy(one);
    moe_ep_destroy(two);
    check_model_free(&m);
    free(x);
    free(y1);
    free(y2);
}
END_TEST

/* A row's output does not depend on how many rows came with it. */
START_TEST(ffn_rows_independent) {
    int a = _i;
    check_model m;
    moe_ep_context* ctx;
    uint64_t seed = 500 + (uint64_t)_i;
    float x[17 * F_D], all[17 * F_D], one[F_D], tail[3 * F_D];
    int r;
    check_model_init(&m, F_D, F_F, F_E, 1, ffn_acts[a], false, 600 + (uint64_t)_i);
    ctx = ffn_context(&m, 2);
    test_fill(x, 17 * F_D, 1.0f, &seed);
    ck_assert_int_eq(moe_ep_expert_ffn(ctx, 0, x, 17, all), MOE_EP_OK);
    for (r = 0; r < 17; ++r) {
        ck_assert_int_eq(moe_ep_expert_ffn(ctx, 0, x + r * F_D, 1, one), MOE_EP_OK);
        ck_assert_msg(memcmp(one, all + r * F_D, sizeof one) == 0, "%s: row %d alone differs from row %d of 17",
                      ffn_act_names[a], r, r);
    }
    ck_assert_int_eq(moe_ep_expert_ffn(ctx, 0, x + 14 * F_D, 3, tail), MOE_EP_OK);
    ck_assert_msg(memcmp(tail, all + 14 * F_D, sizeof tail) == 0, "%s: rows 14..16 differ", ffn_act_names[a]);
    moe_ep_destroy(ctx);
    check_model_free(&m);
}
END_TEST

START_TEST(ffn_bad_args) {
    check_model m;
    moe_ep_context* ctx;
    float x[F_D], out[F_D];
    uint64_t seed = 9;
    check_model_init(&m, F_D, F_F, F_E, 1, MOE_EP_ACTIVATION_SWIGLU, false, 10);
    ctx = ffn_context(&m, 1);
    test_fill(x, F_D, 1.0f, &seed);
    test_poison(out, F_D);
    ck_assert_int_eq(moe_ep_expert_ffn(ctx, -1, x, 1, out), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_msg(moe_ep_last_error_item(ctx) == MOE_EP_LOG_ITEM_FFN_ARGS, "%s", moe_ep_last_error(ctx));
    ck_assert_int_eq(moe_ep_expert_ffn(ctx, F_E, x, 1, out), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(moe_ep_expert_ffn(ctx, 0, x, -1, out), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_msg(moe_ep_last_error_item(ctx) == MOE_EP_LOG_ITEM_FFN_ARGS, "%s", moe_ep_last_error(ctx));
    ck_assert_int_eq(moe_ep_expert_ffn(ctx, 0, NULL, 1, out), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(moe_ep_expert_ffn(ctx, 0, x, 1, NULL), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_msg(test_is_poisoned(out, F_D), "out written on failure");
    moe_ep_destroy(ctx);
    check_model_free(&m);
}
END_TEST

Suite* ffn_suite(void) {
    Suite* s = suite_create("ffn");
    TCase* tc = tcase_create("reference");
    TCase* tc_det = tcase_create("determinism");
    tcase_add_loop_test(tc, ffn_vs_reference, 0, 12);
    tcase_add_test(tc, ffn_expert_index);
    tcase_add_test(tc, ffn_bad_args);
    tcase_add_loop_test(tc_det, ffn_threads_bitwise, 0, 3);
    tcase_add_loop_test(tc_det, ffn_rows_independent, 0, 3);
    suite_add_tcase(s, tc);
    suite_add_tcase(s, tc_det);
    return s;
}
