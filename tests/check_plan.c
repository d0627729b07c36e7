/* check_plan.c -- the plan's bookkeeping on 3 ranks with routing chosen by hand.

   5 experts, contiguous on 3 ranks: rank 0 holds {0, 1}, rank 1 {2, 3}, rank 2 {4}
   (local index 0, 1, 0, 1, 0), so S = 2 segments per peer. top_k = 2.
     rank 0, 3 tokens: t0 {4, 0}, t1 {1, 2}, t2 {0, 3}
     rank 1, 2 tokens: t0 {3, 1}, t1 {2, 4}
     rank 2, 0 tokens
   Send rows are ordered (destination rank, its local expert, token); receive rows
   (local expert, source rank, token). Every expected number below is worked out by
   hand from these lists. */
#include "check_moe_ep.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define P_R 3
#define P_E 5
#define P_K 2
#define P_S 2
#define P_D 6

static const int64_t plan_tokens[P_R] = { 3, 2, 0 };
static const int32_t plan_idx[] = { 4, 0, 1, 2, 0, 3, /* rank 1 */ 3, 1, 2, 4 };
static const float plan_weight[] = { 0.75f, 0.25f, 0.5f, 0.5f, 0.125f, 0.875f, /* rank 1 */ 0.375f, 0.625f, 1.0f, 2.0f };

typedef struct plan_expect {
    int64_t send_counts[P_R], recv_counts[P_R];
    int64_t seg_send_counts[P_R * P_S], seg_send_offsets[P_R * P_S];
    int64_t seg_recv_counts[P_R * P_S], seg_recv_offsets[P_R * P_S];
    int64_t local_expert_counts[P_S], local_expert_offsets[P_S];
    int64_t expert_counts[P_E];
    int64_t send_rows, recv_rows;
    int64_t permutation[6];
    int64_t slot_rows[6];
    int local_experts;
    /* the global token (rank, token) of each received row */
    int recv_from[4][2];
} plan_expect;

static const plan_expect plan_expected[P_R] = {
    {   /* rank 0 */
        { 3, 2, 1 }, { 3, 1, 0 },
        { 2, 1, 1, 1, 1, 0 }, { 0, 2, 3, 4, 5, 6 },
        { 2, 1, 0, 1, 0, 0 }, { 0, 2, 2, 3, 2, 4 },
        { 2, 2 }, { 0, 2 },
        { 2, 1, 1, 1, 1 },
        6, 4,
        { 0, 2, 1, 1, 2, 0 },
        { 5, 0, 2, 3, 1, 4 },
        2,
        { { 0, 0 }, { 0, 2 }, { 0, 1 }, { 1, 0 } },
    },
    {   /* rank 1 */
        { 1, 2, 1 }, { 2, 2, 0 },
        { 0, 1, 1, 1, 1, 0 }, { 0, 0, 1, 2, 3, 4 },
        { 1, 1, 1, 1, 0, 0 }, { 0, 2, 1, 3, 2, 4 },
        { 2, 2 }, { 0, 2 },
        { 0, 1, 1, 1, 1 },
        4, 4,
        { 0, 1, 0, 1 },
        { 2, 0, 1, 3 },
        2,
        { { 0, 1 }, { 1, 1 }, { 0, 2 }, { 1, 0 } },
    },
    {   /* rank 2 */
        { 0, 0, 0 }, { 1, 1, 0 },
        { 0, 0, 0, 0, 0, 0 }, { 0, 0, 0, 0, 0, 0 },
        { 1, 0, 1, 0, 0, 0 }, { 0, 2, 1, 2, 2, 2 },
        { 2, 0 }, { 0, 2 },
        { 0, 0, 0, 0, 0 },
        0, 2,
        { 0 },
        { 0 },
        1,
        { { 0, 0 }, { 1, 1 } },
    },
};

typedef struct plan_seen {
    moe_ep_result result;
    char error[256];
    moe_ep_plan_info info;          /* pointers are cleared; arrays copied below */
    int64_t send_counts[P_R], recv_counts[P_R];
    int64_t seg_send_counts[P_R * P_S], seg_send_offsets[P_R * P_S];
    int64_t seg_recv_counts[P_R * P_S], seg_recv_offsets[P_R * P_S];
    int64_t local_expert_counts[P_S], local_expert_offsets[P_S];
    int64_t expert_counts[P_E], expert_kept[P_E];
    int64_t permutation[8], slot_rows[8];
    float topk_weight[8];
    float recv[8 * P_D];
} plan_seen;

typedef struct plan_state {
    const float* x;                 /* [5, P_D]: rank 0's 3 tokens, then rank 1's 2 */
    check_model model;
    plan_seen seen[P_R];
} plan_state;

static moe_ep_result plan_rank(const moe_ep_transport* transport, void* user_data) {
    plan_state* st = (plan_state*)user_data;
    int rank = transport->rank, e, l = 0;
    plan_seen* seen = &st->seen[rank];
    int64_t offset = 0, T = plan_tokens[rank];
    moe_ep_expert_weights mine[P_E];
    moe_ep_context* ctx = NULL;
    moe_ep_plan* plan = NULL;
    moe_ep_plan_info info;
    moe_ep_result res;
    int owner[P_E] = { 0, 0, 1, 1, 2 };
    int r;
    for (r = 0; r < rank; ++r) offset += plan_tokens[r];
    for (e = 0; e < P_E; ++e)
        if (owner[e] == rank) mine[l++] = st->model.experts[e];
    res = moe_ep_create(&(moe_ep_desc){ .d_model = P_D, .d_ff = st->model.d_ff, .num_experts = P_E, .top_k = P_K,
                                        .router_weight = st->model.router, .experts = mine, .experts_count = l,
                                        .transport = transport },
                        &ctx);
    if (res != MOE_EP_OK) {
        snprintf(seen->error, sizeof seen->error, "create: %s", moe_ep_result_string(res));
        seen->result = res;
        return res;
    }
    res = moe_ep_plan_create(ctx, T, T > 0 ? plan_idx + offset * P_K : NULL,
                             T > 0 ? plan_weight + offset * P_K : NULL, &plan);
    if (res == MOE_EP_OK) {
        info = moe_ep_plan_query(plan);
        seen->info = info;
        memcpy(seen->send_counts, info.send_counts, sizeof seen->send_counts);
        memcpy(seen->recv_counts, info.recv_counts, sizeof seen->recv_counts);
        if (info.segments == P_S) {
            memcpy(seen->seg_send_counts, info.seg_send_counts, sizeof seen->seg_send_counts);
            memcpy(seen->seg_send_offsets, info.seg_send_offsets, sizeof seen->seg_send_offsets);
            memcpy(seen->seg_recv_counts, info.seg_recv_counts, sizeof seen->seg_recv_counts);
            memcpy(seen->seg_recv_offsets, info.seg_recv_offsets, sizeof seen->seg_recv_offsets);
        }
        memcpy(seen->local_expert_counts, info.local_expert_counts, sizeof(int64_t) * (size_t)info.local_experts);
        memcpy(seen->local_expert_offsets, info.local_expert_offsets, sizeof(int64_t) * (size_t)info.local_experts);
        memcpy(seen->expert_counts, info.expert_counts, sizeof seen->expert_counts);
        memcpy(seen->expert_kept, info.expert_kept, sizeof seen->expert_kept);
        if (info.send_rows <= 8) memcpy(seen->permutation, info.permutation, sizeof(int64_t) * (size_t)info.send_rows);
        memcpy(seen->slot_rows, info.slot_rows, sizeof(int64_t) * (size_t)(T * P_K));
        memcpy(seen->topk_weight, info.topk_weight, sizeof(float) * (size_t)(T * P_K));
        test_poison(seen->recv, 8 * P_D);
        if (info.recv_rows <= 7) res = moe_ep_dispatch(ctx, plan, st->x + offset * P_D, seen->recv);
        else res = MOE_EP_ERROR_INTERNAL;
    }
    if (res != MOE_EP_OK) snprintf(seen->error, sizeof seen->error, "%s: %s", moe_ep_result_string(res),
                                   moe_ep_last_error(ctx));
    moe_ep_plan_destroy(plan);
    moe_ep_destroy(ctx);
    seen->result = res;
    return res;
}

static void plan_expect_eq(const int64_t* got, const int64_t* want, int n, int rank, const char* what) {
    int i;
    for (i = 0; i < n; ++i)
        ck_assert_msg(got[i] == want[i], "rank %d: %s[%d] = %lld, expected %lld", rank, what, i, (long long)got[i],
                      (long long)want[i]);
}

START_TEST(plan_bookkeeping) {
    plan_state* st = (plan_state*)calloc(1, sizeof *st);
    float x[5 * P_D];
    uint64_t seed = 21;
    moe_ep_pthreads_world* world = NULL;
    moe_ep_result res, results[P_R];
    int r;
    test_fill(x, 5 * P_D, 1.0f, &seed);
    st->x = x;
    check_model_init(&st->model, P_D, 10, P_E, P_K, MOE_EP_ACTIVATION_SWIGLU, false, 22);
    ck_assert_int_eq(moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = P_R, .timeout_ms = 60000 },
                                                  &world), MOE_EP_OK);
    res = moe_ep_pthreads_run(world, plan_rank, st, results);
    moe_ep_pthreads_world_destroy(world);
    for (r = 0; r < P_R; ++r)
        ck_assert_msg(results[r] == MOE_EP_OK, "rank %d: %s", r, st->seen[r].error);
    ck_assert_int_eq(res, MOE_EP_OK);
    for (r = 0; r < P_R; ++r) {
        const plan_expect* w = &plan_expected[r];
        const plan_seen* s = &st->seen[r];
        int64_t offset = 0;
        int i, q;
        for (q = 0; q < r; ++q) offset += plan_tokens[q];
        ck_assert_int_eq(s->info.world_size, P_R);
        ck_assert_msg(s->info.local_experts == w->local_experts, "rank %d: local_experts %d", r, s->info.local_experts);
        ck_assert_msg(s->info.tokens == plan_tokens[r], "rank %d: tokens %lld", r, (long long)s->info.tokens);
        ck_assert_msg(s->info.capacity == -1, "rank %d: dropless capacity reads %lld", r, (long long)s->info.capacity);
        ck_assert_msg(s->info.segments == P_S, "rank %d: segments %d, expected %d", r, s->info.segments, P_S);
        ck_assert_msg(s->info.send_rows == w->send_rows, "rank %d: send_rows %lld, expected %lld", r,
                      (long long)s->info.send_rows, (long long)w->send_rows);
        ck_assert_msg(s->info.recv_rows == w->recv_rows, "rank %d: recv_rows %lld, expected %lld", r,
                      (long long)s->info.recv_rows, (long long)w->recv_rows);
        plan_expect_eq(s->send_counts, w->send_counts, P_R, r, "send_counts");
        plan_expect_eq(s->recv_counts, w->recv_counts, P_R, r, "recv_counts");
        plan_expect_eq(s->seg_send_counts, w->seg_send_counts, P_R * P_S, r, "seg_send_counts");
        plan_expect_eq(s->seg_send_offsets, w->seg_send_offsets, P_R * P_S, r, "seg_send_offsets");
        plan_expect_eq(s->seg_recv_counts, w->seg_recv_counts, P_R * P_S, r, "seg_recv_counts");
        plan_expect_eq(s->seg_recv_offsets, w->seg_recv_offsets, P_R * P_S, r, "seg_recv_offsets");
        plan_expect_eq(s->local_expert_counts, w->local_expert_counts, w->local_experts, r, "local_expert_counts");
        plan_expect_eq(s->local_expert_offsets, w->local_expert_offsets, w->local_experts, r, "local_expert_offsets");
        plan_expect_eq(s->expert_counts, w->expert_counts, P_E, r, "expert_counts");
        plan_expect_eq(s->expert_kept, w->expert_counts, P_E, r, "expert_kept (dropless)");
        plan_expect_eq(s->permutation, w->permutation, (int)w->send_rows, r, "permutation");
        plan_expect_eq(s->slot_rows, w->slot_rows, (int)(plan_tokens[r] * P_K), r, "slot_rows");
        for (i = 0; i < plan_tokens[r] * P_K; ++i)
            ck_assert_msg(s->topk_weight[i] == plan_weight[offset * P_K + i], "rank %d: topk_weight[%d] = %g", r, i,
                          (double)s->topk_weight[i]);
        /* dispatch delivered exactly those token rows, in that order, and nothing more */
        for (i = 0; i < w->recv_rows; ++i) {
            int64_t src = 0;
            for (q = 0; q < w->recv_from[i][0]; ++q) src += plan_tokens[q];
            src += w->recv_from[i][1];
            ck_assert_msg(memcmp(s->recv + i * P_D, x + src * P_D, sizeof(float) * P_D) == 0,
                          "rank %d: received row %d is not token %d of rank %d", r, i, w->recv_from[i][1],
                          w->recv_from[i][0]);
        }
        ck_assert_msg(test_is_poisoned(s->recv + w->recv_rows * P_D, (size_t)(8 - w->recv_rows) * P_D),
                      "rank %d: dispatch wrote past recv_rows", r);
    }
    check_model_free(&st->model);
    free(st);
}
END_TEST

/* One rank, the plan of every slot agrees with slot_rows and permutation: the send row
   of (t, j) holds token t, and rows of one expert are contiguous in token order. */
START_TEST(plan_slot_rows_consistent) {
    check_model m;
    moe_ep_context* ctx = NULL;
    moe_ep_plan* plan = NULL;
    moe_ep_plan_info info;
    int32_t idx[29 * 3];
    float weight[29 * 3];
    float x[29 * 8];
    uint64_t seed = 31;
    int64_t t, prev_row = -1;
    int j, e;
    check_model_init(&m, 8, 12, 7, 3, MOE_EP_ACTIVATION_RELU, false, 32);
    test_fill(x, 29 * 8, 1.0f, &seed);
    ck_assert_int_eq(moe_ep_create(&(moe_ep_desc){ .d_model = 8, .d_ff = 12, .num_experts = 7, .top_k = 3,
                                                   .activation = MOE_EP_ACTIVATION_RELU, .router_weight = m.router,
                                                   .experts = m.experts }, &ctx), MOE_EP_OK);
    ck_assert_int_eq(moe_ep_route(ctx, x, 29, idx, weight, NULL), MOE_EP_OK);
    ck_assert_int_eq(moe_ep_plan_create(ctx, 29, idx, weight, &plan), MOE_EP_OK);
    info = moe_ep_plan_query(plan);
    ck_assert_int_eq(info.send_rows, 29 * 3);
    ck_assert_int_eq(info.recv_rows, 29 * 3);
    for (t = 0; t < 29; ++t)
        for (j = 0; j < 3; ++j) {
            int64_t row = info.slot_rows[t * 3 + j];
            e = idx[t * 3 + j];
            ck_assert_msg(row >= info.local_expert_offsets[e] &&
                              row < info.local_expert_offsets[e] + info.local_expert_counts[e],
                          "slot (%lld, %d) of expert %d at row %lld, outside its segment", (long long)t, j, e,
                          (long long)row);
            ck_assert_msg(info.permutation[row] == t, "row %lld holds token %lld, expected %lld", (long long)row,
                          (long long)info.permutation[row], (long long)t);
        }
    for (e = 0; e < 7; ++e) {
        int64_t r0 = info.local_expert_offsets[e], n = info.local_expert_counts[e], i;
        ck_assert_msg(r0 == prev_row + 1, "expert %d starts at %lld", e, (long long)r0);
        for (i = 1; i < n; ++i)
            ck_assert_msg(info.permutation[r0 + i] > info.permutation[r0 + i - 1], "expert %d rows not in token order", e);
        prev_row = r0 + n - 1;
    }
    moe_ep_plan_destroy(plan);
    moe_ep_destroy(ctx);
    check_model_free(&m);
}
END_TEST

Suite* plan_suite(void) {
    Suite* s = suite_create("plan");
    TCase* tc = tcase_create("plan");
    tcase_add_test(tc, plan_bookkeeping);
    tcase_add_test(tc, plan_slot_rows_consistent);
    suite_add_tcase(s, tc);
    return s;
}
