/* check_capacity.c -- capacity factor: C = ceil(c * T_local * k / E) rows per expert from
   each source rank; assignments past C are dropped in token order.

   2 ranks, 4 experts (rank 0 holds {0, 1}, rank 1 {2, 3}), top-2, routing by hand:
     rank 0, 6 tokens: {0,1} {0,2} {1,0} {3,1} {0,3} {2,3}   expert_counts 4 3 2 3
     rank 1, 5 tokens: {2,3} {3,2} {2,0} {1,3} {0,1}         expert_counts 2 2 3 3
   Which slots drop, and the kept counts, are worked out by hand for each c below.
   The expected y of a token is the sum over its kept slots of weight * FFN(x), each
   FFN from moe_ep_expert_ffn on a one-rank context holding every expert. */
#include "check_moe_ep.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define C_R 2
#define C_E 4
#define C_K 2
#define C_D 12
#define C_F 20
#define C_T 11

static const int64_t cap_tokens[C_R] = { 6, 5 };
static const int32_t cap_idx[C_T * C_K] = { 0, 1, 0, 2, 1, 0, 3, 1, 0, 3, 2, 3, /* rank 1 */ 2, 3, 3, 2, 2, 0, 1, 3, 0, 1 };
static const int64_t cap_counts[C_R][C_E] = { { 4, 3, 2, 3 }, { 2, 2, 3, 3 } };

typedef struct cap_case {
    float factor;
    int64_t capacity[C_R];
    int64_t kept[C_R][C_E];
    int dropped[C_T];               /* per token (rank 0's, then rank 1's): bit j = slot j dropped */
} cap_case;

static const cap_case cap_cases[] = {
    /* c = 0.5: C = ceil(1.5) = 2 on rank 0, ceil(1.25) = 2 on rank 1 */
    { 0.5f, { 2, 2 }, { { 2, 2, 2, 2 }, { 2, 2, 2, 2 } }, { 0, 0, 2, 2, 1, 2, /**/ 0, 0, 1, 2, 0 } },
    /* c = 1: C = 3 and ceil(2.5) = 3; only rank 0's 4th row for expert 0 drops */
    { 1.0f, { 3, 3 }, { { 3, 3, 2, 3 }, { 2, 2, 3, 3 } }, { 0, 0, 0, 0, 1, 0, /**/ 0, 0, 0, 0, 0 } },
    /* c = 0.25: C = ceil(0.75) = 1 and ceil(0.625) = 1; rank 1's token 1 loses both slots */
    { 0.25f, { 1, 1 }, { { 1, 1, 1, 1 }, { 1, 1, 1, 1 } }, { 0, 1, 3, 2, 3, 3, /**/ 0, 3, 1, 2, 3 } },
    /* c = 1e6: nothing drops */
    { 1e6f, { 3000000, 2500000 }, { { 4, 3, 2, 3 }, { 2, 2, 3, 3 } }, { 0 } },
};

typedef struct cap_seen {
    moe_ep_result result;
    char error[256];
    int64_t capacity, send_rows;
    int64_t expert_counts[C_E], expert_kept[C_E];
    int64_t slot_rows[6 * C_K];
} cap_seen;

typedef struct cap_state {
    const cap_case* c;
    const check_model* model;
    const float* x;
    const float* weight;
    float* y_forward;               /* [C_T, C_D] */
    float* y_stages;
    cap_seen seen[C_R];
} cap_state;

static moe_ep_result cap_rank(const moe_ep_transport* transport, void* user_data) {
    cap_state* st = (cap_state*)user_data;
    int rank = transport->rank;
    int64_t offset = rank == 0 ? 0 : cap_tokens[0], T = cap_tokens[rank];
    cap_seen* seen = &st->seen[rank];
    moe_ep_context* ctx = NULL;
    moe_ep_plan* plan = NULL;
    moe_ep_plan_info info;
    int32_t idx[6 * C_K];
    float weight[6 * C_K];
    float *rows = NULL, *out = NULL;
    moe_ep_result res;
    memcpy(idx, cap_idx + offset * C_K, sizeof(int32_t) * (size_t)(T * C_K));
    memcpy(weight, st->weight + offset * C_K, sizeof(float) * (size_t)(T * C_K));
    res = moe_ep_create(&(moe_ep_desc){ .d_model = C_D, .d_ff = C_F, .num_experts = C_E, .top_k = C_K,
                                        .capacity_factor = st->c->factor, .router_weight = st->model->router,
                                        .experts = st->model->experts, .experts_count = C_E,   /* by global id */
                                        .transport = transport }, &ctx);
    if (res != MOE_EP_OK) {
        snprintf(seen->error, sizeof seen->error, "create: %s", moe_ep_result_string(res));
        seen->result = res;
        return res;
    }
    res = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = T, .x = st->x + offset * C_D,
                                                      .y = st->y_forward + offset * C_D, .routing_in = true,
                                                      .topk_idx = idx, .topk_weight = weight });
    if (res == MOE_EP_OK) res = moe_ep_plan_create(ctx, T, idx, weight, &plan);
    if (res == MOE_EP_OK) {
        info = moe_ep_plan_query(plan);
        seen->capacity = info.capacity;
        seen->send_rows = info.send_rows;
        memcpy(seen->expert_counts, info.expert_counts, sizeof seen->expert_counts);
        memcpy(seen->expert_kept, info.expert_kept, sizeof seen->expert_kept);
        memcpy(seen->slot_rows, info.slot_rows, sizeof(int64_t) * (size_t)(T * C_K));
        rows = (float*)malloc(sizeof(float) * (size_t)(info.recv_rows * C_D + 1));
        out = (float*)malloc(sizeof(float) * (size_t)(info.recv_rows * C_D + 1));
        res = moe_ep_dispatch(ctx, plan, st->x + offset * C_D, rows);
        if (res == MOE_EP_OK) res = moe_ep_experts(ctx, plan, rows, out);
        if (res == MOE_EP_OK) res = moe_ep_combine(ctx, plan, out, st->y_stages + offset * C_D);
    }
    if (res != MOE_EP_OK)
        snprintf(seen->error, sizeof seen->error, "%s: %s", moe_ep_result_string(res), moe_ep_last_error(ctx));
    moe_ep_plan_destroy(plan);
    moe_ep_destroy(ctx);
    free(rows);
    free(out);
    seen->result = res;
    return res;
}

START_TEST(capacity_drops) {
    const cap_case* c = &cap_cases[_i];
    cap_state st;
    check_model m;
    moe_ep_context* one = NULL;
    moe_ep_pthreads_world* world = NULL;
    float x[C_T * C_D], weight[C_T * C_K], y_forward[C_T * C_D], y_stages[C_T * C_D];
    float expert_out[C_E][C_T * C_D];
    uint64_t seed = 4000 + (uint64_t)_i;
    int r, t, j, e, i;
    check_model_init(&m, C_D, C_F, C_E, C_K, MOE_EP_ACTIVATION_SWIGLU, false, 4100 + (uint64_t)_i);
    test_fill(x, C_T * C_D, 1.0f, &seed);
    for (i = 0; i < C_T * C_K; ++i) weight[i] = 0.25f + 0.5f * (float)(test_rng_next(&seed) >> 40) / 16777216.0f;
    test_poison(y_forward, C_T * C_D);
    test_poison(y_stages, C_T * C_D);
    memset(&st, 0, sizeof st);
    st.c = c;
    st.model = &m;
    st.x = x;
    st.weight = weight;
    st.y_forward = y_forward;
    st.y_stages = y_stages;
    ck_assert_int_eq(moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = C_R, .timeout_ms = 60000 },
                                                  &world), MOE_EP_OK);
    moe_ep_pthreads_run(world, cap_rank, &st, NULL);
    moe_ep_pthreads_world_destroy(world);
    for (r = 0; r < C_R; ++r) ck_assert_msg(st.seen[r].result == MOE_EP_OK, "c=%g rank %d: %s", (double)c->factor, r,
                                            st.seen[r].error);

    /* what the plan reports */
    for (r = 0; r < C_R; ++r) {
        const cap_seen* s = &st.seen[r];
        int64_t offset = r == 0 ? 0 : cap_tokens[0], kept = 0;
        ck_assert_msg(s->capacity == c->capacity[r], "c=%g rank %d: capacity %lld, expected %lld", (double)c->factor, r,
                      (long long)s->capacity, (long long)c->capacity[r]);
        for (e = 0; e < C_E; ++e) {
            ck_assert_msg(s->expert_counts[e] == cap_counts[r][e], "c=%g rank %d: expert_counts[%d] = %lld, expected %lld",
                          (double)c->factor, r, e, (long long)s->expert_counts[e], (long long)cap_counts[r][e]);
            ck_assert_msg(s->expert_kept[e] == c->kept[r][e], "c=%g rank %d: expert_kept[%d] = %lld, expected %lld",
                          (double)c->factor, r, e, (long long)s->expert_kept[e], (long long)c->kept[r][e]);
            kept += c->kept[r][e];
        }
        ck_assert_msg(s->send_rows == kept, "c=%g rank %d: send_rows %lld, expected %lld", (double)c->factor, r,
                      (long long)s->send_rows, (long long)kept);
        for (t = 0; t < cap_tokens[r]; ++t)
            for (j = 0; j < C_K; ++j) {
                bool dropped = (c->dropped[offset + t] >> j) & 1;
                int64_t row = s->slot_rows[t * C_K + j];
                ck_assert_msg(dropped ? row == -1 : row >= 0, "c=%g rank %d token %d slot %d (expert %d): row %lld, %s",
                              (double)c->factor, r, t, j, (int)cap_idx[(offset + t) * C_K + j], (long long)row,
                              dropped ? "expected dropped" : "expected kept");
            }
    }

    /* y: the kept slots only, from the one-expert FFN */
    ck_assert_int_eq(moe_ep_create(&(moe_ep_desc){ .d_model = C_D, .d_ff = C_F, .num_experts = C_E, .top_k = C_K,
                                                   .router_weight = m.router, .experts = m.experts }, &one), MOE_EP_OK);
    for (e = 0; e < C_E; ++e) ck_assert_int_eq(moe_ep_expert_ffn(one, e, x, C_T, expert_out[e]), MOE_EP_OK);
    moe_ep_destroy(one);
    for (t = 0; t < C_T; ++t) {
        float want[C_D], full[C_D], scale = 0.0f, diff = 0.0f, missing = 0.0f;
        for (i = 0; i < C_D; ++i) want[i] = full[i] = 0.0f;
        for (j = 0; j < C_K; ++j) {
            int ex = cap_idx[t * C_K + j];
            float w = weight[t * C_K + j];
            for (i = 0; i < C_D; ++i) {
                float v = w * expert_out[ex][t * C_D + i];
                full[i] += v;
                if (!((c->dropped[t] >> j) & 1)) want[i] += v;
            }
        }
        for (i = 0; i < C_D; ++i) {
            scale = fmaxf(scale, fabsf(want[i]));
            diff = fmaxf(diff, fabsf(y_forward[t * C_D + i] - want[i]));
            missing = fmaxf(missing, fabsf(full[i] - want[i]));
            ck_assert_msg(y_stages[t * C_D + i] == y_forward[t * C_D + i], "c=%g token %d: the stages differ from forward",
                          (double)c->factor, t);
        }
        if (c->dropped[t] == 3) {
            for (i = 0; i < C_D; ++i)
                ck_assert_msg(y_forward[t * C_D + i] == 0.0f, "c=%g token %d lost every slot but y[%d] = %g",
                              (double)c->factor, t, i, (double)y_forward[t * C_D + i]);
        } else {
            ck_assert_msg(diff <= 1e-6f * scale, "c=%g token %d: y differs from its kept slots by %g (scale %g)",
                          (double)c->factor, t, (double)diff, (double)scale);
        }
        /* the data can tell a dropped slot from a kept one */
        if (c->dropped[t]) ck_assert_msg(missing > 1e-3f * scale, "c=%g token %d: the dropped slot is invisible",
                                         (double)c->factor, t);
    }
    check_model_free(&m);
}
END_TEST

Suite* capacity_suite(void) {
    Suite* s = suite_create("capacity");
    TCase* tc = tcase_create("capacity");
    tcase_add_loop_test(tc, capacity_drops, 0, (int)(sizeof cap_cases / sizeof cap_cases[0]));
    suite_add_tcase(s, tc);
    return s;
}
