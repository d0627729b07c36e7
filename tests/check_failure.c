/* check_failure.c -- ranks that disagree or fail: every rank returns an error, none hangs.

   Rank threads only record what they saw; the assertions run on the test's thread after
   moe_ep_pthreads_run has joined them. Every world has a timeout, so a hang becomes a
   TIMEOUT result rather than a stuck test binary. */
#include "check_moe_ep.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define X_R 3
#define X_D 8
#define X_F 12
#define X_E 6

static int copy_fn(int local_expert, int expert, const float* rows, int64_t row_count, int d_model, float* out,
                   void* user_data) {
    (void)local_expert; (void)expert; (void)user_data;
    memcpy(out, rows, sizeof(float) * (size_t)(row_count * d_model));
    return 0;
}

static moe_ep_desc failure_desc(const moe_ep_transport* transport) {
    moe_ep_desc d;
    memset(&d, 0, sizeof d);
    d.d_model = X_D;
    d.d_ff = X_F;
    d.num_experts = X_E;
    d.top_k = 2;
    d.expert_fn = copy_fn;          /* no weights: a rank's desc may differ in d_ff or d_model */
    d.transport = transport;
    return d;
}

/* >>mismatch: one rank's desc differs from the others'. */
typedef struct mismatch_case {
    const char* name;
    int rank;                       /* the rank whose desc differs */
    void (*mutate)(moe_ep_desc* d);
    moe_ep_result odd, others;      /* what that rank and the others must return */
} mismatch_case;

static void mm_d_ff(moe_ep_desc* d) { d->d_ff = X_F + 4; }
static void mm_d_model(moe_ep_desc* d) { d->d_model = X_D * 2; }
static void mm_top_k(moe_ep_desc* d) { d->top_k = 3; }
static void mm_experts(moe_ep_desc* d) { d->num_experts = X_E + 1; }
static void mm_activation(moe_ep_desc* d) { d->activation = MOE_EP_ACTIVATION_GELU; }
static void mm_normalize(moe_ep_desc* d) { d->normalize_topk = true; }
static void mm_capacity(moe_ep_desc* d) { d->capacity_factor = 1.5f; }
static void mm_placement(moe_ep_desc* d) { d->placement.kind = MOE_EP_PLACEMENT_ROUND_ROBIN; }
static void mm_bad_top_k(moe_ep_desc* d) { d->top_k = -1; }
static void mm_bad_d_model(moe_ep_desc* d) { d->d_model = 0; }
static void mm_none(moe_ep_desc* d) { (void)d; }

static const mismatch_case mismatch_cases[] = {
    { "rank 1 has another d_ff", 1, mm_d_ff, MOE_EP_ERROR_RANK_MISMATCH, MOE_EP_ERROR_RANK_MISMATCH },
    { "rank 0 has another d_model", 0, mm_d_model, MOE_EP_ERROR_RANK_MISMATCH, MOE_EP_ERROR_RANK_MISMATCH },
    { "rank 1 has another top_k", 1, mm_top_k, MOE_EP_ERROR_RANK_MISMATCH, MOE_EP_ERROR_RANK_MISMATCH },
    { "rank 2 has another num_experts", 2, mm_experts, MOE_EP_ERROR_RANK_MISMATCH, MOE_EP_ERROR_RANK_MISMATCH },
    { "rank 1 has another activation", 1, mm_activation, MOE_EP_ERROR_RANK_MISMATCH, MOE_EP_ERROR_RANK_MISMATCH },
    { "rank 1 renormalises", 1, mm_normalize, MOE_EP_ERROR_RANK_MISMATCH, MOE_EP_ERROR_RANK_MISMATCH },
    { "rank 2 has a capacity factor", 2, mm_capacity, MOE_EP_ERROR_RANK_MISMATCH, MOE_EP_ERROR_RANK_MISMATCH },
    { "rank 1 places round-robin", 1, mm_placement, MOE_EP_ERROR_RANK_MISMATCH, MOE_EP_ERROR_RANK_MISMATCH },
    { "rank 1 has top_k -1", 1, mm_bad_top_k, MOE_EP_ERROR_INVALID_ARGUMENT, MOE_EP_ERROR_RANK_MISMATCH },
    { "rank 2 has d_model 0", 2, mm_bad_d_model, MOE_EP_ERROR_INVALID_ARGUMENT, MOE_EP_ERROR_RANK_MISMATCH },
    { "all agree", 1, mm_none, MOE_EP_OK, MOE_EP_OK },
};

typedef struct mismatch_state {
    const mismatch_case* c;
    moe_ep_result result[X_R];
    bool out_kept[X_R];
} mismatch_state;

static moe_ep_result mismatch_rank(const moe_ep_transport* transport, void* user_data) {
    mismatch_state* st = (mismatch_state*)user_data;
    int rank = transport->rank;
    moe_ep_desc d = failure_desc(transport);
    moe_ep_context* sentinel = (moe_ep_context*)st;
    moe_ep_context* ctx = sentinel;
    moe_ep_result res;
    if (rank == st->c->rank) st->c->mutate(&d);
    res = moe_ep_create(&d, &ctx);
    st->result[rank] = res;
    st->out_kept[rank] = res == MOE_EP_OK || ctx == sentinel;
    if (res == MOE_EP_OK) moe_ep_destroy(ctx);
    return res;
}

START_TEST(failure_rank_mismatch) {
    mismatch_state st;
    moe_ep_pthreads_world* world = NULL;
    moe_ep_result results[X_R];
    int r;
    memset(&st, 0, sizeof st);
    st.c = &mismatch_cases[_i];
    ck_assert_int_eq(moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = X_R, .timeout_ms = 30000 },
                                                  &world), MOE_EP_OK);
    moe_ep_pthreads_run(world, mismatch_rank, &st, results);
    moe_ep_pthreads_world_destroy(world);
    for (r = 0; r < X_R; ++r) {
        moe_ep_result want = r == st.c->rank ? st.c->odd : st.c->others;
        ck_assert_msg(st.result[r] == want, "%s: rank %d got %s, expected %s", st.c->name, r,
                      moe_ep_result_string(st.result[r]), moe_ep_result_string(want));
        ck_assert_msg(results[r] == want, "%s: rank %d returned %s from its thread", st.c->name, r,
                      moe_ep_result_string(results[r]));
        ck_assert_msg(st.out_kept[r], "%s: rank %d: out written on failure", st.c->name, r);
    }
}
END_TEST

/* >>an expert callback fails on one rank */
static int failing_fn(int local_expert, int expert, const float* rows, int64_t row_count, int d_model, float* out,
                      void* user_data) {
    if (user_data && *(const int*)user_data) return 7;
    return copy_fn(local_expert, expert, rows, row_count, d_model, out, NULL);
}

START_TEST(failure_expert_callback) {
    check_model m;
    check_layer run;
    int64_t tokens[X_R] = { 5, 4, 6 };
    float x[15 * X_D], y[15 * X_D + 1], weight[15 * 3];
    int32_t idx[15 * 3];
    int fail_flag = 1, t, r;
    uint64_t seed = 80;
    char errors[2048];
    /* k = E = 3: every token visits every expert, so each rank's callback runs */
    check_model_init(&m, X_D, X_F, 3, 3, MOE_EP_ACTIVATION_SWIGLU, false, 81);
    test_fill(x, 15 * X_D, 1.0f, &seed);
    for (t = 0; t < 15; ++t) {
        idx[t * 3] = 2; idx[t * 3 + 1] = 0; idx[t * 3 + 2] = 1;
        weight[t * 3] = weight[t * 3 + 1] = weight[t * 3 + 2] = 0.25f;
    }
    check_layer_init(&run, &m, X_R, tokens, x, y);
    run.topk_idx = idx;
    run.topk_weight = weight;
    run.path = (check_path)_i;
    run.expert_fn = failing_fn;
    run.expert_user_data[1] = &fail_flag;
    run.timeout_ms = 30000;
    test_poison(y, 15 * X_D + 1);
    check_run_layer(&run);
    for (r = 0; r < X_R; ++r) {
        moe_ep_result want = r == 1 ? MOE_EP_ERROR_CALLBACK : MOE_EP_ERROR_ABORTED;
        ck_assert_msg(run.rank_result[r] == want, "path %d: rank %d got %s, expected %s (%s)", _i, r,
                      moe_ep_result_string(run.rank_result[r]), moe_ep_result_string(want),
                      check_layer_errors(&run, errors, sizeof errors));
    }
    ck_assert_msg(strstr(run.rank_error[1], "expert_fn returned 7") != NULL, "rank 1's error: %s", run.rank_error[1]);
    /* moe_ep_forward reaches combine's status exchange, where the others learn who failed */
    if (run.path == CHECK_PATH_FORWARD)
        for (r = 0; r < X_R; r += 2)
            ck_assert_msg(strstr(run.rank_error[r], "rank 1 failed") != NULL, "rank %d's error: %s", r, run.rank_error[r]);
    ck_assert_msg(run.result == MOE_EP_ERROR_CALLBACK, "the run returned %s", moe_ep_result_string(run.result));
    check_model_free(&m);
}
END_TEST

/* >>the stage API: moe_ep_experts fails on rank 1, which still calls combine as documented
   ("a failure is reported to the peers by the next combine") */
typedef struct stage_fail_state {
    const check_model* model;
    const float* x;                 /* [X_R * 4, X_D] */
    moe_ep_result experts_res[X_R], combine_res[X_R], next_res[X_R];
    char error[X_R][256];
} stage_fail_state;

static moe_ep_result stage_fail_rank(const moe_ep_transport* transport, void* user_data) {
    stage_fail_state* st = (stage_fail_state*)user_data;
    int rank = transport->rank, t;
    int fail_flag = 1;
    moe_ep_desc d = failure_desc(transport);
    moe_ep_context* ctx = NULL;
    moe_ep_plan* plan = NULL;
    int32_t idx[4 * 3];
    float weight[4 * 3], rows[12 * X_D], out[12 * X_D], y[4 * X_D];
    const float* x = st->x + rank * 4 * X_D;
    moe_ep_result res;
    for (t = 0; t < 4; ++t) {
        idx[t * 3] = 0; idx[t * 3 + 1] = 1; idx[t * 3 + 2] = 2;
        weight[t * 3] = weight[t * 3 + 1] = weight[t * 3 + 2] = 0.5f;
    }
    d.num_experts = 3;
    d.top_k = 3;
    d.expert_fn = failing_fn;
    d.expert_user_data = rank == 1 ? &fail_flag : NULL;
    res = moe_ep_create(&d, &ctx);
    if (res != MOE_EP_OK) return res;
    res = moe_ep_plan_create(ctx, 4, idx, weight, &plan);
    if (res == MOE_EP_OK) res = moe_ep_dispatch(ctx, plan, x, rows);
    if (res == MOE_EP_OK) {
        st->experts_res[rank] = moe_ep_experts(ctx, plan, rows, out);
        /* every rank goes on to combine, the failed one too */
        res = st->combine_res[rank] = moe_ep_combine(ctx, plan, out, y);
        snprintf(st->error[rank], sizeof st->error[0], "%s", moe_ep_last_error(ctx));
    }
    moe_ep_plan_destroy(plan);
    /* the failure was told once; the next layer on the same contexts works */
    if (st->combine_res[rank] != MOE_EP_OK) {
        fail_flag = 0;
        st->next_res[rank] = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = 4, .x = x, .y = y,
                                                                         .routing_in = true, .topk_idx = idx,
                                                                         .topk_weight = weight });
        if (st->next_res[rank] != MOE_EP_OK)
            snprintf(st->error[rank], sizeof st->error[0], "%s", moe_ep_last_error(ctx));
    }
    moe_ep_destroy(ctx);
    return res == MOE_EP_OK ? MOE_EP_OK : st->next_res[rank];
}

START_TEST(failure_stage_experts) {
    stage_fail_state st;
    check_model m;
    float x[X_R * 4 * X_D];
    uint64_t seed = 85;
    moe_ep_pthreads_world* world = NULL;
    int r;
    memset(&st, 0, sizeof st);
    check_model_init(&m, X_D, X_F, 3, 3, MOE_EP_ACTIVATION_SWIGLU, false, 86);
    test_fill(x, X_R * 4 * X_D, 1.0f, &seed);
    st.model = &m;
    st.x = x;
    ck_assert_int_eq(moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = X_R, .timeout_ms = 30000 },
                                                  &world), MOE_EP_OK);
    moe_ep_pthreads_run(world, stage_fail_rank, &st, NULL);
    moe_ep_pthreads_world_destroy(world);
    ck_assert_msg(st.experts_res[1] == MOE_EP_ERROR_CALLBACK, "rank 1's experts: %s",
                  moe_ep_result_string(st.experts_res[1]));
    ck_assert_msg(st.combine_res[1] == MOE_EP_ERROR_CALLBACK, "rank 1's combine: %s (%s)",
                  moe_ep_result_string(st.combine_res[1]), st.error[1]);
    for (r = 0; r < X_R; r += 2) {
        ck_assert_msg(st.experts_res[r] == MOE_EP_OK, "rank %d's experts: %s", r, moe_ep_result_string(st.experts_res[r]));
        ck_assert_msg(st.combine_res[r] == MOE_EP_ERROR_ABORTED && strstr(st.error[r], "rank 1 failed") != NULL,
                      "rank %d's combine: %s (%s)", r, moe_ep_result_string(st.combine_res[r]), st.error[r]);
    }
    for (r = 0; r < X_R; ++r)
        ck_assert_msg(st.next_res[r] == MOE_EP_OK, "rank %d's next layer: %s (%s)", r, moe_ep_result_string(st.next_res[r]),
                      st.error[r]);
    check_model_free(&m);
}
END_TEST

/* >>a rank leaves early, without taking part in the layer */
typedef struct early_case {
    const char* name;
    bool after_create;              /* leave after create (else before it) */
    moe_ep_result leaves_with;
} early_case;

static const early_case early_cases[] = {
    { "before create, returning OK", false, MOE_EP_OK },
    { "before create, returning an error", false, MOE_EP_ERROR_INTERNAL },
    { "after create, returning OK", true, MOE_EP_OK },
    { "after create, returning an error", true, MOE_EP_ERROR_TRANSPORT },
};

typedef struct early_state {
    const early_case* c;
    const check_model* model;
    const float* x;
    moe_ep_result create_res[X_R], forward_res[X_R];
    bool forwarded[X_R];
} early_state;

static moe_ep_result early_rank(const moe_ep_transport* transport, void* user_data) {
    early_state* st = (early_state*)user_data;
    int rank = transport->rank;
    moe_ep_desc d = failure_desc(transport);
    moe_ep_context* ctx = NULL;
    float y[4 * X_D];
    moe_ep_result res;
    if (rank == 2 && !st->c->after_create) return st->c->leaves_with;
    d.router_weight = st->model->router;
    res = moe_ep_create(&d, &ctx);
    st->create_res[rank] = res;
    if (res != MOE_EP_OK) return res;
    if (rank == 2) {
        moe_ep_destroy(ctx);
        return st->c->leaves_with;
    }
    res = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = 4, .x = st->x, .y = y });
    st->forward_res[rank] = res;
    st->forwarded[rank] = true;
    moe_ep_destroy(ctx);
    return res;
}

/* The model, 4 tokens of x drawn from seed, and a world of X_R ranks. */
static moe_ep_pthreads_world* early_setup(early_state* st, check_model* m, float* x, uint64_t seed) {
    moe_ep_pthreads_world* world = NULL;
    memset(st, 0, sizeof *st);
    check_model_init(m, X_D, X_F, X_E, 2, MOE_EP_ACTIVATION_SWIGLU, false, seed + 1);
    test_fill(x, 4 * X_D, 1.0f, &seed);
    st->model = m;
    st->x = x;
    ck_assert_int_eq(moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = X_R, .timeout_ms = 30000 },
                                                  &world), MOE_EP_OK);
    return world;
}

START_TEST(failure_early_return) {
    early_state st;
    check_model m;
    float x[4 * X_D];
    moe_ep_pthreads_world* world = early_setup(&st, &m, x, 90);
    moe_ep_result results[X_R], res;
    int r;
    st.c = &early_cases[_i];
    res = moe_ep_pthreads_run(world, early_rank, &st, results);
    moe_ep_pthreads_world_destroy(world);
    for (r = 0; r < 2; ++r) {
        if (st.c->after_create) {
            ck_assert_msg(st.create_res[r] == MOE_EP_OK, "%s: rank %d create: %s", st.c->name, r,
                          moe_ep_result_string(st.create_res[r]));
            ck_assert_msg(st.forwarded[r] && st.forward_res[r] == MOE_EP_ERROR_ABORTED, "%s: rank %d forward: %s",
                          st.c->name, r, moe_ep_result_string(st.forward_res[r]));
        } else {
            ck_assert_msg(st.create_res[r] == MOE_EP_ERROR_ABORTED, "%s: rank %d create: %s", st.c->name, r,
                          moe_ep_result_string(st.create_res[r]));
        }
        ck_assert_msg(results[r] == MOE_EP_ERROR_ABORTED, "%s: rank %d returned %s", st.c->name, r,
                      moe_ep_result_string(results[r]));
    }
    ck_assert_msg(results[2] == st.c->leaves_with, "%s: rank 2 returned %s", st.c->name, moe_ep_result_string(results[2]));
    /* run's verdict: the lowest rank's error that is not ABORTED, else ABORTED */
    ck_assert_msg(res == (st.c->leaves_with == MOE_EP_OK ? MOE_EP_ERROR_ABORTED : st.c->leaves_with),
                  "%s: the run returned %s", st.c->name, moe_ep_result_string(res));
    check_model_free(&m);
}
END_TEST

/* >>a rank is busy elsewhere for 3 s; the world's timeout is 1 s */
typedef struct slow_state {
    moe_ep_result result[X_R];
    long seconds[X_R];              /* from the start of the run until create returned */
    time_t start;
} slow_state;

static moe_ep_result slow_rank(const moe_ep_transport* transport, void* user_data) {
    slow_state* st = (slow_state*)user_data;
    int rank = transport->rank;
    moe_ep_desc d = failure_desc(transport);
    moe_ep_context* ctx = NULL;
    moe_ep_result res;
    if (rank == 1) {
        volatile unsigned long spins = 0;
        while (time(NULL) - st->start < 3) spins++;   /* strict C99 has no sleep */
    }
    res = moe_ep_create(&d, &ctx);
    st->seconds[rank] = (long)(time(NULL) - st->start);
    st->result[rank] = res;
    if (res == MOE_EP_OK) moe_ep_destroy(ctx);
    return res;
}

START_TEST(failure_timeout) {
    slow_state st;
    moe_ep_pthreads_world* world = NULL;
    int r;
    memset(&st, 0, sizeof st);
    ck_assert_int_eq(moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = X_R, .timeout_ms = 1000 },
                                                  &world), MOE_EP_OK);
    st.start = time(NULL);
    moe_ep_pthreads_run(world, slow_rank, &st, NULL);
    moe_ep_pthreads_world_destroy(world);
    for (r = 0; r < X_R; r += 2) {
        ck_assert_msg(st.result[r] == MOE_EP_ERROR_TIMEOUT || st.result[r] == MOE_EP_ERROR_ABORTED,
                      "waiting rank %d got %s", r, moe_ep_result_string(st.result[r]));
        ck_assert_msg(st.seconds[r] <= 2, "waiting rank %d returned after %ld s, the timeout is 1 s", r, st.seconds[r]);
    }
    ck_assert_msg(st.result[0] == MOE_EP_ERROR_TIMEOUT || st.result[2] == MOE_EP_ERROR_TIMEOUT,
                  "no rank reported the timeout (%s, %s)", moe_ep_result_string(st.result[0]),
                  moe_ep_result_string(st.result[2]));
    ck_assert_msg(st.result[1] != MOE_EP_OK, "the late rank's create succeeded alone");
    ck_assert_msg(st.seconds[1] >= 3, "the late rank was not late (%ld s)", st.seconds[1]);
}
END_TEST

/* >>one rank hands in bad routing: it says why, the others are told */
START_TEST(failure_bad_routing_on_one_rank) {
    check_model m;
    check_layer run;
    int64_t tokens[X_R] = { 4, 3, 5 };
    float x[12 * X_D], y[12 * X_D + 1], weight[12 * 2];
    int32_t idx[12 * 2];
    int t, r;
    uint64_t seed = 95;
    char errors[2048];
    check_model_init(&m, X_D, X_F, X_E, 2, MOE_EP_ACTIVATION_SWIGLU, false, 96);
    test_fill(x, 12 * X_D, 1.0f, &seed);
    for (t = 0; t < 12; ++t) {
        idx[t * 2] = t % X_E;
        idx[t * 2 + 1] = (t + 1) % X_E;
        weight[t * 2] = weight[t * 2 + 1] = 0.5f;
    }
    idx[5 * 2 + 1] = X_E;           /* rank 1's token 1 */
    check_layer_init(&run, &m, X_R, tokens, x, y);
    run.topk_idx = idx;
    run.topk_weight = weight;
    run.timeout_ms = 30000;
    check_run_layer(&run);
    for (r = 0; r < X_R; ++r) {
        moe_ep_result want = r == 1 ? MOE_EP_ERROR_INVALID_ARGUMENT : MOE_EP_ERROR_ABORTED;
        ck_assert_msg(run.rank_result[r] == want, "rank %d got %s, expected %s (%s)", r,
                      moe_ep_result_string(run.rank_result[r]), moe_ep_result_string(want),
                      check_layer_errors(&run, errors, sizeof errors));
    }
    ck_assert_msg(strstr(run.rank_error[1], "topk_idx[1][1] (6)") != NULL, "rank 1's error: %s", run.rank_error[1]);
    ck_assert_msg(strstr(run.rank_error[0], "rank 1") != NULL, "rank 0 does not name rank 1: %s", run.rank_error[0]);
    check_model_free(&m);
}
END_TEST

/* >>a world that saw a failure runs the next layer normally */
static moe_ep_result layer_or_leave(const moe_ep_transport* transport, void* user_data) {
    early_state* st = (early_state*)user_data;
    moe_ep_desc d = failure_desc(transport);
    moe_ep_context* ctx = NULL;
    float y[4 * X_D];
    moe_ep_result res;
    if (st->c && transport->rank == 2) return MOE_EP_ERROR_INTERNAL;
    d.router_weight = st->model->router;
    res = moe_ep_create(&d, &ctx);
    if (res == MOE_EP_OK) res = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = 4, .x = st->x, .y = y });
    if (res == MOE_EP_OK) res = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = 4, .x = st->x, .y = y });
    moe_ep_destroy(ctx);
    return res;
}

START_TEST(failure_world_reusable) {
    early_state st;
    check_model m;
    float x[4 * X_D];
    moe_ep_pthreads_world* world = early_setup(&st, &m, x, 97);
    moe_ep_result res;
    st.c = &early_cases[1];
    res = moe_ep_pthreads_run(world, layer_or_leave, &st, NULL);
    ck_assert_msg(res == MOE_EP_ERROR_INTERNAL, "the failing run returned %s", moe_ep_result_string(res));
    st.c = NULL;
    res = moe_ep_pthreads_run(world, layer_or_leave, &st, NULL);
    ck_assert_msg(res == MOE_EP_OK, "the run after a failure returned %s", moe_ep_result_string(res));
    moe_ep_pthreads_abort(world);
    st.c = NULL;
    res = moe_ep_pthreads_run(world, layer_or_leave, &st, NULL);
    ck_assert_msg(res == MOE_EP_OK, "the run after an abort returned %s", moe_ep_result_string(res));
    moe_ep_pthreads_world_destroy(world);
    check_model_free(&m);
}
END_TEST

/* >>moe_ep_agree: the protocol every "same verdict" step uses, on 3 pthreads ranks. */
typedef struct agree_case {
    const char* name;
    int failing_rank;               /* -1: none */
    int odd_rank;                   /* -1: none; this rank's second fact differs */
    bool may_differ;
    moe_ep_result want_failing, want_odd, want_others;
    const char* want_text;          /* in the others' err text, or NULL */
} agree_case;

static const agree_case agree_cases[] = {
    { "all agree", -1, -1, false, MOE_EP_OK, MOE_EP_OK, MOE_EP_OK, NULL },
    { "rank 2 failed", 2, -1, false, MOE_EP_ERROR_CALLBACK, MOE_EP_OK, MOE_EP_ERROR_ABORTED, "rank 2 failed" },
    { "rank 1 has other facts", -1, 1, false, MOE_EP_OK, MOE_EP_ERROR_RANK_MISMATCH, MOE_EP_ERROR_RANK_MISMATCH,
      "has other sizes than rank" },
    { "a vote: facts may differ", -1, 1, true, MOE_EP_OK, MOE_EP_OK, MOE_EP_OK, NULL },
    { "failure wins over mismatch", 0, 1, false, MOE_EP_ERROR_CALLBACK, MOE_EP_ERROR_ABORTED, MOE_EP_ERROR_ABORTED,
      "rank 0 failed" },
};

typedef struct agree_state {
    const agree_case* c;
    moe_ep_result result[3];
    char text[3][256];
    int64_t peer_facts[3][6];
    int64_t peer_status[3][3];
} agree_state;

static moe_ep_result agree_rank(const moe_ep_transport* t, void* user_data) {
    agree_state* st = (agree_state*)user_data;
    int64_t facts[2] = { 42, 1000 + (t->rank == st->c->odd_rank ? t->rank : 0) };
    moe_ep_agree_desc a = { 0 };
    a.stage = "agree test";
    a.status = t->rank == st->c->failing_rank ? MOE_EP_ERROR_CALLBACK : MOE_EP_OK;
    a.facts = facts;
    a.fact_count = 2;
    a.facts_name = "sizes";
    a.facts_may_differ = st->c->may_differ;
    a.peer_facts = st->peer_facts[t->rank];
    a.peer_status = st->peer_status[t->rank];
    st->result[t->rank] = moe_ep_agree(t, &a, st->text[t->rank], sizeof st->text[t->rank]);
    return MOE_EP_OK;
}

START_TEST(failure_agree) {
    const agree_case* c = &agree_cases[_i];
    agree_state st;
    moe_ep_pthreads_world* world = NULL;
    int r, q;
    memset(&st, 0, sizeof st);
    st.c = c;
    ck_assert_int_eq(moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = 3, .timeout_ms = 20000 },
                                                  &world), MOE_EP_OK);
    ck_assert_int_eq(moe_ep_pthreads_run(world, agree_rank, &st, NULL), MOE_EP_OK);
    moe_ep_pthreads_world_destroy(world);
    for (r = 0; r < 3; ++r) {
        moe_ep_result want = r == c->failing_rank ? c->want_failing : r == c->odd_rank ? c->want_odd : c->want_others;
        ck_assert_msg(st.result[r] == want, "%s: rank %d got %s, want %s (%s)", c->name, r,
                      moe_ep_result_string(st.result[r]), moe_ep_result_string(want), st.text[r]);
        if (c->want_text && r != c->failing_rank)
            ck_assert_msg(strstr(st.text[r], c->want_text) != NULL, "%s: rank %d's text \"%s\" lacks \"%s\"", c->name,
                          r, st.text[r], c->want_text);
        for (q = 0; q < 3; ++q) {
            ck_assert_msg(st.peer_status[r][q] == (q == c->failing_rank ? MOE_EP_ERROR_CALLBACK : MOE_EP_OK),
                          "%s: rank %d sees rank %d's status as %lld", c->name, r, q, (long long)st.peer_status[r][q]);
            ck_assert_msg(st.peer_facts[r][2 * q + 1] == 1000 + (q == c->odd_rank ? q : 0),
                          "%s: rank %d sees rank %d's second fact as %lld", c->name, r, q,
                          (long long)st.peer_facts[r][2 * q + 1]);
        }
    }
}
END_TEST

Suite* failure_suite(void) {
    Suite* s = suite_create("failure");
    TCase* tc = tcase_create("mismatch");
    TCase* tc_fail = tcase_create("failing ranks");
    tcase_add_loop_test(tc, failure_rank_mismatch, 0, (int)(sizeof mismatch_cases / sizeof mismatch_cases[0]));
    tcase_add_loop_test(tc_fail, failure_expert_callback, 0, 3);
    tcase_add_test(tc_fail, failure_stage_experts);
    tcase_add_loop_test(tc_fail, failure_early_return, 0, (int)(sizeof early_cases / sizeof early_cases[0]));
    tcase_add_test(tc_fail, failure_bad_routing_on_one_rank);
    tcase_add_test(tc_fail, failure_world_reusable);
    tcase_add_test(tc_fail, failure_timeout);
    tcase_add_loop_test(tc_fail, failure_agree, 0, (int)(sizeof agree_cases / sizeof agree_cases[0]));
    suite_add_tcase(s, tc);
    suite_add_tcase(s, tc_fail);
    return s;
}
