/* check_expert_fn.c -- a user callback in place of the built-in expert kernel.

   The callback computes the expert with the float64 reference; the layer must then
   match the built-in layer within max |diff| / max |y| < 1e-5, and the callback must be
   called once per local expert that has rows, with the right local index, global id,
   row count and rows (the tokens routed to it, in (source rank, token) order). */
#include "check_moe_ep.h"

#include <stdlib.h>
#include <string.h>

#define U_R 3
#define U_D 16
#define U_F 24
#define U_E 7
#define U_K 2
#define U_CALLS 8

typedef struct fn_call {
    int local_expert, expert, d_model;
    int64_t row_count;
    bool rows_right;                /* the rows are the expected tokens' x, in order */
} fn_call;

typedef struct fn_shared {
    const check_model* model;
    const float* x;                 /* all tokens */
    int64_t total;
    const int32_t* idx;             /* the routing of all tokens (from the built-in run) */
} fn_shared;

typedef struct fn_rank {
    const fn_shared* shared;
    int calls;
    fn_call call[U_CALLS];
} fn_rank;

static int reference_fn(int local_expert, int expert, const float* rows, int64_t row_count, int d_model, float* out,
                        void* user_data) {
    fn_rank* me = (fn_rank*)user_data;
    const fn_shared* sh = me->shared;
    double* ref = (double*)malloc(sizeof(double) * (size_t)(row_count * d_model + 1));
    int64_t i, t, row = 0;
    int j;
    bool right = d_model == U_D;
    /* the rows must be the x of the tokens routed to `expert`, in global token order */
    for (t = 0; t < sh->total && right; ++t)
        for (j = 0; j < U_K; ++j)
            if (sh->idx[t * U_K + j] == expert) {
                right = row < row_count && memcmp(rows + row * d_model, sh->x + t * U_D, sizeof(float) * U_D) == 0;
                ++row;
            }
    right = right && row == row_count;
    if (me->calls < U_CALLS) {
        fn_call* c = &me->call[me->calls];
        c->local_expert = local_expert;
        c->expert = expert;
        c->d_model = d_model;
        c->row_count = row_count;
        c->rows_right = right;
    }
    me->calls++;
    check_ref_ffn(sh->model->activation, d_model, sh->model->d_ff, &sh->model->experts[expert], rows, row_count, ref);
    for (i = 0; i < row_count * d_model; ++i) out[i] = (float)ref[i];
    free(ref);
    return 0;
}

START_TEST(expert_fn_matches_builtin) {
    check_model m;
    check_layer run;
    fn_shared shared;
    fn_rank ranks[U_R];
    int64_t tokens[U_R] = { 13, 0, 17 }, total = 30;
    float x[30 * U_D], y_builtin[30 * U_D + 1], y_fn[30 * U_D + 1], w[30 * U_K];
    int32_t idx[30 * U_K];
    int64_t expected_rows[U_E];
    double y_ref[30 * U_D];
    int owner[U_E], local[U_E], seen[U_E], r, e, i, t;
    uint64_t seed = 110;
    char errors[2048];
    check_model_init(&m, U_D, U_F, U_E, U_K, (moe_ep_activation)(1 + _i), false, 111);
    test_fill(x, 30 * U_D, 1.0f, &seed);

    check_layer_init(&run, &m, U_R, tokens, x, y_builtin);
    run.idx_out = idx;
    run.weight_out = w;
    test_poison(y_builtin, 30 * U_D + 1);
    check_run_layer(&run);
    ck_assert_msg(run.result == MOE_EP_OK, "built-in: %s", check_layer_errors(&run, errors, sizeof errors));

    shared.model = &m;
    shared.x = x;
    shared.total = total;
    shared.idx = idx;
    memset(ranks, 0, sizeof ranks);
    check_layer_init(&run, &m, U_R, tokens, x, y_fn);
    run.expert_fn = reference_fn;
    for (r = 0; r < U_R; ++r) {
        ranks[r].shared = &shared;
        run.expert_user_data[r] = &ranks[r];
    }
    test_poison(y_fn, 30 * U_D + 1);
    check_run_layer(&run);
    ck_assert_msg(run.result == MOE_EP_OK, "expert_fn: %s", check_layer_errors(&run, errors, sizeof errors));

    /* the output: the same layer, up to the kernel's rounding */
    for (i = 0; i < 30 * U_D; ++i) y_ref[i] = (double)y_builtin[i];
    ck_assert_msg(check_rel_error(y_fn, y_ref, 30 * U_D) < 1e-5, "activation %d: expert_fn vs built-in: %.3g", 1 + _i,
                  check_rel_error(y_fn, y_ref, 30 * U_D));
    ck_assert_msg(memcmp(y_fn, y_builtin, sizeof(float) * 30 * U_D) != 0,
                  "the callback's output is bitwise the kernel's: was the callback used?");

    /* the calls */
    ck_assert_int_eq(moe_ep_placement_compute(NULL, U_E, U_R, owner), MOE_EP_OK);
    for (e = 0; e < U_E; ++e) {
        expected_rows[e] = 0;
        seen[e] = 0;
        local[e] = 0;
        for (i = 0; i < e; ++i) local[e] += owner[i] == owner[e];
    }
    for (t = 0; t < total * U_K; ++t) expected_rows[idx[t]]++;
    for (r = 0; r < U_R; ++r) {
        ck_assert_msg(ranks[r].calls <= U_CALLS, "rank %d: %d calls", r, ranks[r].calls);
        for (i = 0; i < ranks[r].calls; ++i) {
            const fn_call* c = &ranks[r].call[i];
            ck_assert_msg(c->expert >= 0 && c->expert < U_E, "rank %d call %d: expert %d", r, i, c->expert);
            ck_assert_msg(owner[c->expert] == r, "rank %d ran expert %d of rank %d", r, c->expert, owner[c->expert]);
            ck_assert_msg(c->local_expert == local[c->expert], "expert %d: local index %d, expected %d", c->expert,
                          c->local_expert, local[c->expert]);
            ck_assert_msg(c->row_count == expected_rows[c->expert], "expert %d: %lld rows, expected %lld", c->expert,
                          (long long)c->row_count, (long long)expected_rows[c->expert]);
            ck_assert_msg(c->d_model == U_D, "expert %d: d_model %d", c->expert, c->d_model);
            ck_assert_msg(c->rows_right, "expert %d: the rows are not its tokens in order", c->expert);
            seen[c->expert]++;
        }
    }
    for (e = 0; e < U_E; ++e)
        ck_assert_msg(seen[e] == (expected_rows[e] > 0 ? 1 : 0), "expert %d (%lld rows) called %d times", e,
                      (long long)expected_rows[e], seen[e]);
    check_model_free(&m);
}
END_TEST

static int never_fn(int local_expert, int expert, const float* rows, int64_t row_count, int d_model, float* out,
                    void* user_data) {
    (void)local_expert; (void)expert; (void)rows; (void)row_count; (void)d_model; (void)out; (void)user_data;
    return 1;
}

/* With expert_fn, d_ff may be 0 and no weights are needed; the built-in FFN then refuses. */
START_TEST(expert_fn_without_weights) {
    moe_ep_context* ctx = NULL;
    float rows[U_D], out[U_D];
    uint64_t seed = 120;
    moe_ep_result res;
    test_fill(rows, U_D, 1.0f, &seed);
    res = moe_ep_create(&(moe_ep_desc){ .d_model = U_D, .num_experts = 3, .top_k = 1, .expert_fn = never_fn }, &ctx);
    ck_assert_msg(res == MOE_EP_OK, "create with expert_fn and d_ff 0: %s", moe_ep_result_string(res));
    test_poison(out, U_D);
    ck_assert_int_eq(moe_ep_expert_ffn(ctx, 0, rows, 1, out), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_msg(moe_ep_last_error_item(ctx) == MOE_EP_LOG_ITEM_FFN_NO_WEIGHTS, "%s", moe_ep_last_error(ctx));
    ck_assert_msg(test_is_poisoned(out, U_D), "out written");
    moe_ep_destroy(ctx);
}
END_TEST

/* A failing callback on one rank: CALLBACK, the message names the expert, y untouched. */
START_TEST(expert_fn_failure_single_rank) {
    moe_ep_context* ctx = NULL;
    float x[2 * U_D], y[2 * U_D];
    int32_t idx[2] = { 2, 2 };
    float w[2] = { 1.0f, 1.0f };
    uint64_t seed = 121;
    test_fill(x, 2 * U_D, 1.0f, &seed);
    ck_assert_int_eq(moe_ep_create(&(moe_ep_desc){ .d_model = U_D, .num_experts = 3, .top_k = 1,
                                                   .expert_fn = never_fn }, &ctx), MOE_EP_OK);
    test_poison(y, 2 * U_D);
    ck_assert_int_eq(moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = 2, .x = x, .y = y, .routing_in = true,
                                                                 .topk_idx = idx, .topk_weight = w }),
                     MOE_EP_ERROR_CALLBACK);
    ck_assert_msg(moe_ep_last_error_item(ctx) == MOE_EP_LOG_ITEM_EXPERT_FN_FAILED, "%s", moe_ep_last_error(ctx));
    ck_assert_msg(strstr(moe_ep_last_error(ctx), "expert 2") != NULL, "the error does not name expert 2: %s",
                  moe_ep_last_error(ctx));
    ck_assert_msg(test_is_poisoned(y, 2 * U_D), "y written on failure");
    moe_ep_destroy(ctx);
}
END_TEST

Suite* expert_fn_suite(void) {
    Suite* s = suite_create("expert_fn");
    TCase* tc = tcase_create("expert_fn");
    tcase_add_loop_test(tc, expert_fn_matches_builtin, 0, 3);
    tcase_add_test(tc, expert_fn_without_weights);
    tcase_add_test(tc, expert_fn_failure_single_rank);
    suite_add_tcase(s, tc);
    return s;
}
