/* check_api.c -- result strings, the resolved desc and the small context queries. */
#include "check_moe_ep.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

START_TEST(result_strings_distinct) {
    int a, b;
    for (a = 0; a < (int)MOE_EP_RESULT_COUNT; ++a) {
        const char* s = moe_ep_result_string((moe_ep_result)a);
        ck_assert_msg(s != NULL && s[0] != '\0', "moe_ep_result_string(%d) is empty", a);
        for (b = 0; b < a; ++b)
            ck_assert_msg(strcmp(s, moe_ep_result_string((moe_ep_result)b)) != 0,
                          "codes %d and %d share the string \"%s\"", b, a, s);
    }
    ck_assert_msg(strcmp(moe_ep_result_string(MOE_EP_OK), "ok") == 0, "MOE_EP_OK reads \"%s\"",
                  moe_ep_result_string(MOE_EP_OK));
}
END_TEST

/* Log items: each has its own name, the enum's name without the prefix. */
START_TEST(log_item_names) {
    int a, b;
    char want[64];
    for (a = 0; a < (int)MOE_EP_LOG_ITEM_COUNT; ++a) {
        const char* s = moe_ep_log_item_string((moe_ep_log_item)a);
        ck_assert_msg(s != NULL && s[0] != '\0', "log item %d has no name", a);
        for (b = 0; b < a; ++b)
            ck_assert_msg(strcmp(s, moe_ep_log_item_string((moe_ep_log_item)b)) != 0, "items %d and %d are both %s", b,
                          a, s);
    }
    snprintf(want, sizeof want, "%s", moe_ep_log_item_string(MOE_EP_LOG_ITEM_DESC_TOP_K));
    ck_assert_str_eq(want, "DESC_TOP_K");
    ck_assert_str_eq(moe_ep_log_item_string(MOE_EP_LOG_ITEM_COUNT), "unknown log item");
    ck_assert_str_eq(moe_ep_log_item_string((moe_ep_log_item)-1), "unknown log item");
    ck_assert_int_eq(moe_ep_last_error_item(NULL), MOE_EP_LOG_ITEM_NONE);
}
END_TEST

START_TEST(result_string_out_of_range) {
    const char* past = moe_ep_result_string(MOE_EP_RESULT_COUNT);
    const char* negative = moe_ep_result_string((moe_ep_result)-1);
    int a;
    ck_assert_msg(past != NULL && past[0] != '\0', "COUNT gives no string");
    ck_assert_msg(negative != NULL && negative[0] != '\0', "-1 gives no string");
    for (a = 0; a < (int)MOE_EP_RESULT_COUNT; ++a)
        ck_assert_msg(strcmp(past, moe_ep_result_string((moe_ep_result)a)) != 0,
                      "COUNT reads like code %d (\"%s\")", a, past);
}
END_TEST

/* Every zero in the desc resolves to the documented default, visible through query_desc. */
START_TEST(query_desc_defaults) {
    check_model m;
    moe_ep_context* ctx = NULL;
    moe_ep_desc d;
    moe_ep_result res;
    check_model_init(&m, 8, 12, 3, 1, MOE_EP_ACTIVATION_SWIGLU, false, 11);
    res = moe_ep_create(&(moe_ep_desc){ .d_model = 8, .d_ff = 12, .num_experts = 3, .router_weight = m.router,
                                        .experts = m.experts }, &ctx);
    ck_assert_msg(res == MOE_EP_OK, "create: %s", moe_ep_result_string(res));
    d = moe_ep_query(ctx);
    ck_assert_int_eq(d.d_model, 8);
    ck_assert_int_eq(d.d_ff, 12);
    ck_assert_int_eq(d.num_experts, 3);
    ck_assert_msg(d.top_k == 1, "top_k resolved to %d, expected 1", d.top_k);
    ck_assert_msg(d.activation == MOE_EP_ACTIVATION_SWIGLU, "activation resolved to %d", (int)d.activation);
    ck_assert_msg(d.scoring == MOE_EP_SCORING_SOFTMAX, "scoring resolved to %d", (int)d.scoring);
    ck_assert_msg(d.placement.kind == MOE_EP_PLACEMENT_CONTIGUOUS, "placement resolved to %d", (int)d.placement.kind);
    ck_assert_msg(d.placement.table == NULL, "a contiguous placement keeps a table");
    ck_assert_msg(d.num_threads >= 1, "num_threads resolved to %d", d.num_threads);
    ck_assert_msg(d.capacity_factor == 0.0f, "capacity_factor changed to %g", (double)d.capacity_factor);
    ck_assert_msg(!d.normalize_topk, "normalize_topk turned on");
    ck_assert_msg(d.router_weight == m.router, "router_weight not kept");
    ck_assert_int_eq(moe_ep_rank(ctx), 0);
    ck_assert_int_eq(moe_ep_world_size(ctx), 1);
    ck_assert_msg(strcmp(moe_ep_last_error(ctx), "") == 0, "fresh context has last error \"%s\"", moe_ep_last_error(ctx));
    moe_ep_destroy(ctx);
    check_model_free(&m);
}
END_TEST

/* Explicit values stay; a TABLE placement is copied, not borrowed. */
START_TEST(query_desc_keeps_values) {
    check_model m;
    moe_ep_context* ctx = NULL;
    moe_ep_desc d;
    moe_ep_result res;
    int table[4] = { 0, 0, 0, 0 };
    check_model_init(&m, 8, 12, 4, 3, MOE_EP_ACTIVATION_GELU, true, 12);
    res = moe_ep_create(&(moe_ep_desc){ .d_model = 8, .d_ff = 12, .num_experts = 4, .top_k = 3,
                                        .activation = MOE_EP_ACTIVATION_GELU, .normalize_topk = true,
                                        .capacity_factor = 1.5f, .num_threads = 2,
                                        .placement = { .kind = MOE_EP_PLACEMENT_TABLE, .table = table },
                                        .router_weight = m.router, .experts = m.experts }, &ctx);
    ck_assert_msg(res == MOE_EP_OK, "create: %s", moe_ep_result_string(res));
    table[2] = 5;   /* the context must not see this */
    d = moe_ep_query(ctx);
    ck_assert_int_eq(d.top_k, 3);
    ck_assert_msg(d.activation == MOE_EP_ACTIVATION_GELU, "activation %d", (int)d.activation);
    ck_assert_msg(d.normalize_topk, "normalize_topk lost");
    ck_assert_msg(d.capacity_factor == 1.5f, "capacity_factor %g", (double)d.capacity_factor);
    ck_assert_int_eq(d.num_threads, 2);
    ck_assert_msg(d.placement.kind == MOE_EP_PLACEMENT_TABLE, "placement kind %d", (int)d.placement.kind);
    ck_assert_msg(d.placement.table != NULL && d.placement.table != table, "the table was not copied");
    ck_assert_msg(d.placement.table[2] == 0, "the copied table follows the caller's array");
    ck_assert_int_eq(moe_ep_expert_owner(ctx, 2), 0);
    moe_ep_destroy(ctx);
    check_model_free(&m);
}
END_TEST

START_TEST(null_context_queries) {
    moe_ep_desc d = moe_ep_query(NULL);
    ck_assert_int_eq(d.d_model, 0);
    ck_assert_int_eq(moe_ep_rank(NULL), -1);
    ck_assert_int_eq(moe_ep_world_size(NULL), -1);
    ck_assert_msg(strcmp(moe_ep_last_error(NULL), "") == 0, "last_error(NULL) not empty");
    ck_assert_int_eq(moe_ep_expert_owner(NULL, 0), -1);
    ck_assert_int_eq(moe_ep_rank_expert_count(NULL, 0), -1);
    moe_ep_destroy(NULL);
    moe_ep_plan_destroy(NULL);
    ck_assert_int_eq(moe_ep_plan_query(NULL).world_size, 0);
    ck_assert_int_eq(moe_ep_forward(NULL, NULL), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(moe_ep_route(NULL, NULL, 0, NULL, NULL, NULL), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(moe_ep_expert_ffn(NULL, 0, NULL, 0, NULL), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(moe_ep_plan_create(NULL, 0, NULL, NULL, NULL), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(moe_ep_dispatch(NULL, NULL, NULL, NULL), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(moe_ep_dispatch_end(NULL, NULL), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(moe_ep_experts(NULL, NULL, NULL, NULL), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(moe_ep_combine(NULL, NULL, NULL, NULL), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(moe_ep_combine_begin(NULL, NULL, NULL), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(moe_ep_combine_end(NULL, NULL, NULL), MOE_EP_ERROR_INVALID_ARGUMENT);
}
END_TEST

START_TEST(single_rank_transport_fields) {
    moe_ep_transport t = moe_ep_single_rank_transport();
    int64_t send[3] = { 7, 8, 9 }, recv[3] = { 0, 0, 0 };
    ck_assert_int_eq(t.rank, 0);
    ck_assert_int_eq(t.world_size, 1);
    ck_assert_msg(t.exchange_counts && t.all_to_all_v, "required callbacks missing");
    ck_assert_msg((t.all_to_all_v_begin == NULL) == (t.all_to_all_v_end == NULL), "half a split-phase pair");
    ck_assert_int_eq(t.exchange_counts(t.impl, send, recv, 3, NULL, 0), MOE_EP_OK);
    ck_assert_msg(recv[0] == 7 && recv[1] == 8 && recv[2] == 9, "exchange gave %lld %lld %lld", (long long)recv[0],
                  (long long)recv[1], (long long)recv[2]);
}
END_TEST

Suite* api_suite(void) {
    Suite* s = suite_create("api");
    TCase* tc = tcase_create("api");
    tcase_add_test(tc, result_strings_distinct);
    tcase_add_test(tc, result_string_out_of_range);
    tcase_add_test(tc, log_item_names);
    tcase_add_test(tc, query_desc_defaults);
    tcase_add_test(tc, query_desc_keeps_values);
    tcase_add_test(tc, null_context_queries);
    tcase_add_test(tc, single_rank_transport_fields);
    suite_add_tcase(s, tc);
    return s;
}
