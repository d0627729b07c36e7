/* check_placement.c -- expert-to-rank tables and the context's placement queries. */
#include "check_moe_ep.h"

#include <stdlib.h>
#include <string.h>

static int placement_noop_fn(int local_expert, int expert, const float* rows, int64_t row_count, int d_model,
                             float* out, void* user_data) {
    (void)local_expert; (void)expert; (void)rows; (void)row_count; (void)d_model; (void)out; (void)user_data;
    return 0;
}

/* A context of rank `rank` in a world of `world` ranks, single-threaded (echo transport). */
static moe_ep_context* placement_context(check_echo* echo, moe_ep_transport* t, int rank, int world, int experts,
                                         const moe_ep_placement* placement) {
    moe_ep_context* ctx = NULL;
    moe_ep_result res;
    *t = check_echo_transport(echo, rank, world);
    res = moe_ep_create(&(moe_ep_desc){ .d_model = 4, .num_experts = experts, .top_k = 1, .placement = *placement,
                                        .expert_fn = placement_noop_fn, .transport = t }, &ctx);
    ck_assert_msg(res == MOE_EP_OK, "create rank %d of %d, %d experts: %s", rank, world, experts,
                  moe_ep_result_string(res));
    return ctx;
}

typedef struct placement_case {
    const char* name;
    moe_ep_placement_kind kind;
    int experts, ranks;
    int table[16];
    int owner[16];                  /* expected, by hand */
    int local[16];                  /* expected index of each expert on its owner */
    int count[8];                   /* expected experts per rank */
} placement_case;

static const placement_case placement_cases[] = {
    { "10 contiguous on 4", MOE_EP_PLACEMENT_CONTIGUOUS, 10, 4, { 0 },
      { 0, 0, 0, 1, 1, 1, 2, 2, 3, 3 }, { 0, 1, 2, 0, 1, 2, 0, 1, 0, 1 }, { 3, 3, 2, 2 } },
    { "default is contiguous", MOE_EP_PLACEMENT_DEFAULT, 7, 3, { 0 },
      { 0, 0, 0, 1, 1, 2, 2 }, { 0, 1, 2, 0, 1, 0, 1 }, { 3, 2, 2 } },
    { "3 contiguous on 5", MOE_EP_PLACEMENT_CONTIGUOUS, 3, 5, { 0 },
      { 0, 1, 2 }, { 0, 0, 0 }, { 1, 1, 1, 0, 0 } },
    { "6 contiguous on 8", MOE_EP_PLACEMENT_CONTIGUOUS, 6, 8, { 0 },
      { 0, 1, 2, 3, 4, 5 }, { 0, 0, 0, 0, 0, 0 }, { 1, 1, 1, 1, 1, 1, 0, 0 } },
    { "10 round-robin on 4", MOE_EP_PLACEMENT_ROUND_ROBIN, 10, 4, { 0 },
      { 0, 1, 2, 3, 0, 1, 2, 3, 0, 1 }, { 0, 0, 0, 0, 1, 1, 1, 1, 2, 2 }, { 3, 3, 2, 2 } },
    { "3 round-robin on 5", MOE_EP_PLACEMENT_ROUND_ROBIN, 3, 5, { 0 },
      { 0, 1, 2 }, { 0, 0, 0 }, { 1, 1, 1, 0, 0 } },
    { "table", MOE_EP_PLACEMENT_TABLE, 6, 4, { 3, 0, 3, 1, 0, 3 },
      { 3, 0, 3, 1, 0, 3 }, { 0, 0, 1, 0, 1, 2 }, { 2, 1, 0, 3 } },
    { "1 expert on 1 rank", MOE_EP_PLACEMENT_CONTIGUOUS, 1, 1, { 0 }, { 0 }, { 0 }, { 1 } },
};

START_TEST(placement_tables) {
    const placement_case* c = &placement_cases[_i];
    moe_ep_placement placement;
    int owner[16], e, r, rank;
    placement.kind = c->kind;
    placement.table = c->table;
    for (e = 0; e < 16; ++e) owner[e] = -5;
    ck_assert_int_eq(moe_ep_placement_compute(&placement, c->experts, c->ranks, owner), MOE_EP_OK);
    for (e = 0; e < c->experts; ++e)
        ck_assert_msg(owner[e] == c->owner[e], "%s: expert %d on rank %d, expected %d", c->name, e, owner[e], c->owner[e]);
    ck_assert_msg(owner[c->experts] == -5, "%s: wrote past num_experts", c->name);
    /* every rank's context answers the same queries the same way */
    for (rank = 0; rank < c->ranks; ++rank) {
        check_echo echo;
        moe_ep_transport t;
        moe_ep_context* ctx = placement_context(&echo, &t, rank, c->ranks, c->experts, &placement);
        for (e = 0; e < c->experts; ++e) {
            ck_assert_msg(moe_ep_expert_owner(ctx, e) == c->owner[e], "%s (rank %d): owner(%d) = %d, expected %d",
                          c->name, rank, e, moe_ep_expert_owner(ctx, e), c->owner[e]);
            ck_assert_msg(moe_ep_expert_local_index(ctx, e) == c->local[e], "%s: local_index(%d) = %d, expected %d",
                          c->name, e, moe_ep_expert_local_index(ctx, e), c->local[e]);
        }
        for (r = 0; r < c->ranks; ++r) {
            int list[16], want[16], n = 0, got;
            for (e = 0; e < c->experts; ++e)
                if (c->owner[e] == r) want[n++] = e;
            ck_assert_msg(n == c->count[r], "%s: the case table disagrees with itself on rank %d", c->name, r);
            ck_assert_msg(moe_ep_rank_expert_count(ctx, r) == c->count[r], "%s: rank_expert_count(%d) = %d, expected %d",
                          c->name, r, moe_ep_rank_expert_count(ctx, r), c->count[r]);
            memset(list, 0xFF, sizeof list);
            got = moe_ep_rank_experts(ctx, r, list, 16);
            ck_assert_msg(got == n, "%s: rank_experts(%d) returned %d, expected %d", c->name, r, got, n);
            ck_assert_msg(memcmp(list, want, sizeof(int) * (size_t)n) == 0, "%s: rank_experts(%d) lists other experts",
                          c->name, r);
        }
        moe_ep_destroy(ctx);
    }
}
END_TEST

/* 64 experts on 8 ranks: 8 each, rank = e / 8, local index = e % 8. */
START_TEST(placement_contiguous_64_on_8) {
    moe_ep_placement placement = { MOE_EP_PLACEMENT_CONTIGUOUS, NULL };
    int owner[64], e, r;
    check_echo echo;
    moe_ep_transport t;
    moe_ep_context* ctx;
    ck_assert_int_eq(moe_ep_placement_compute(&placement, 64, 8, owner), MOE_EP_OK);
    for (e = 0; e < 64; ++e) ck_assert_msg(owner[e] == e / 8, "expert %d on rank %d", e, owner[e]);
    ctx = placement_context(&echo, &t, 5, 8, 64, &placement);
    for (e = 0; e < 64; ++e) {
        ck_assert_int_eq(moe_ep_expert_owner(ctx, e), e / 8);
        ck_assert_int_eq(moe_ep_expert_local_index(ctx, e), e % 8);
    }
    for (r = 0; r < 8; ++r) {
        int list[8], i;
        ck_assert_int_eq(moe_ep_rank_expert_count(ctx, r), 8);
        ck_assert_int_eq(moe_ep_rank_experts(ctx, r, list, 8), 8);
        for (i = 0; i < 8; ++i) ck_assert_msg(list[i] == 8 * r + i, "rank %d list[%d] = %d", r, i, list[i]);
    }
    moe_ep_destroy(ctx);
}
END_TEST

START_TEST(placement_query_bounds) {
    moe_ep_placement placement = { MOE_EP_PLACEMENT_CONTIGUOUS, NULL };
    check_echo echo;
    moe_ep_transport t;
    moe_ep_context* ctx = placement_context(&echo, &t, 1, 4, 10, &placement);
    int list[4] = { -9, -9, -9, -9 };
    ck_assert_int_eq(moe_ep_expert_owner(ctx, -1), -1);
    ck_assert_int_eq(moe_ep_expert_owner(ctx, 10), -1);
    ck_assert_int_eq(moe_ep_expert_local_index(ctx, -1), -1);
    ck_assert_int_eq(moe_ep_expert_local_index(ctx, 10), -1);
    ck_assert_int_eq(moe_ep_rank_expert_count(ctx, -1), -1);
    ck_assert_int_eq(moe_ep_rank_expert_count(ctx, 4), -1);
    ck_assert_int_eq(moe_ep_rank_experts(ctx, 4, list, 4), -1);
    /* max smaller than the count: writes max, returns the count */
    ck_assert_int_eq(moe_ep_rank_experts(ctx, 1, list, 2), 3);
    ck_assert_msg(list[0] == 3 && list[1] == 4 && list[2] == -9, "list %d %d %d", list[0], list[1], list[2]);
    ck_assert_int_eq(moe_ep_rank_experts(ctx, 1, NULL, 0), 3);
    moe_ep_destroy(ctx);
}
END_TEST

typedef struct placement_bad {
    moe_ep_placement_kind kind;
    int table[4];
    bool null_table, null_out;
    int experts, ranks;
} placement_bad;

static const placement_bad placement_bads[] = {
    { MOE_EP_PLACEMENT_CONTIGUOUS, { 0 }, false, false, 0, 2 },
    { MOE_EP_PLACEMENT_CONTIGUOUS, { 0 }, false, false, -3, 2 },
    { MOE_EP_PLACEMENT_CONTIGUOUS, { 0 }, false, false, 4, 0 },
    { MOE_EP_PLACEMENT_ROUND_ROBIN, { 0 }, false, false, 4, -1 },
    { MOE_EP_PLACEMENT_CONTIGUOUS, { 0 }, false, true, 4, 2 },
    { MOE_EP_PLACEMENT_TABLE, { 0 }, true, false, 4, 2 },
    { MOE_EP_PLACEMENT_TABLE, { 0, 1, 2, 0 }, false, false, 4, 2 },
    { MOE_EP_PLACEMENT_TABLE, { 0, -1, 1, 0 }, false, false, 4, 2 },
    { MOE_EP_PLACEMENT_COUNT, { 0 }, false, false, 4, 2 },
    { (moe_ep_placement_kind)77, { 0 }, false, false, 4, 2 },
};

START_TEST(placement_compute_invalid) {
    const placement_bad* b = &placement_bads[_i];
    moe_ep_placement placement;
    int owner[4] = { 9, 9, 9, 9 };
    moe_ep_result res;
    placement.kind = b->kind;
    placement.table = b->null_table ? NULL : b->table;
    res = moe_ep_placement_compute(&placement, b->experts, b->ranks, b->null_out ? NULL : owner);
    ck_assert_msg(res == MOE_EP_ERROR_INVALID_ARGUMENT, "case %d: %s", _i, moe_ep_result_string(res));
}
END_TEST

START_TEST(placement_compute_null_is_default) {
    int owner[5], e;
    ck_assert_int_eq(moe_ep_placement_compute(NULL, 5, 2, owner), MOE_EP_OK);
    for (e = 0; e < 5; ++e) ck_assert_msg(owner[e] == (e < 3 ? 0 : 1), "expert %d on %d", e, owner[e]);
}
END_TEST

Suite* placement_suite(void) {
    Suite* s = suite_create("placement");
    TCase* tc = tcase_create("placement");
    tcase_add_loop_test(tc, placement_tables, 0, (int)(sizeof placement_cases / sizeof placement_cases[0]));
    tcase_add_test(tc, placement_contiguous_64_on_8);
    tcase_add_test(tc, placement_query_bounds);
    tcase_add_loop_test(tc, placement_compute_invalid, 0, (int)(sizeof placement_bads / sizeof placement_bads[0]));
    tcase_add_test(tc, placement_compute_null_is_default);
    suite_add_tcase(s, tc);
    return s;
}
