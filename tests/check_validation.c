/* check_validation.c -- bad input is refused with INVALID_ARGUMENT and a message that
   names the field, out-params stay untouched and nothing leaks; out of memory is
   reported as such at every allocation; forward's and the stages' argument checks. */
#include "check_moe_ep.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define V_D 8
#define V_F 12
#define V_E 4

typedef struct venv {
    check_model model;
    moe_ep_expert_weights experts[V_E];
    int table[V_E];
    float bias[V_E];
    float gate[V_D];
    moe_ep_transport transport;
} venv;

typedef struct vcase {
    const char* name;
    moe_ep_log_item item;           /* the rule that must fire */
    void (*mutate)(moe_ep_desc* d, venv* env);
} vcase;

static void m_d_model_0(moe_ep_desc* d, venv* v) { (void)v; d->d_model = 0; }
static void m_d_model_neg(moe_ep_desc* d, venv* v) { (void)v; d->d_model = -3; }
static void m_d_ff_0(moe_ep_desc* d, venv* v) { (void)v; d->d_ff = 0; }
static void m_d_ff_neg(moe_ep_desc* d, venv* v) { (void)v; d->d_ff = -1; }
static void m_experts_0(moe_ep_desc* d, venv* v) { (void)v; d->num_experts = 0; }
static void m_experts_neg(moe_ep_desc* d, venv* v) { (void)v; d->num_experts = -2; }
static void m_top_k_neg(moe_ep_desc* d, venv* v) { (void)v; d->top_k = -1; }
static void m_top_k_big(moe_ep_desc* d, venv* v) { (void)v; d->top_k = V_E + 1; }
static void m_act_count(moe_ep_desc* d, venv* v) { (void)v; d->activation = MOE_EP_ACTIVATION_COUNT; }
static void m_act_77(moe_ep_desc* d, venv* v) { (void)v; d->activation = (moe_ep_activation)77; }
static void m_scoring_count(moe_ep_desc* d, venv* v) { (void)v; d->scoring = MOE_EP_SCORING_COUNT; }
static void m_scoring_9(moe_ep_desc* d, venv* v) { (void)v; d->scoring = (moe_ep_scoring)9; }
static void m_cap_neg(moe_ep_desc* d, venv* v) { (void)v; d->capacity_factor = -0.5f; }
static void m_cap_nan(moe_ep_desc* d, venv* v) { (void)v; d->capacity_factor = NAN; }
static void m_cap_huge(moe_ep_desc* d, venv* v) { (void)v; d->capacity_factor = 2e6f; }
static void m_place_count(moe_ep_desc* d, venv* v) { (void)v; d->placement.kind = MOE_EP_PLACEMENT_COUNT; }
static void m_place_77(moe_ep_desc* d, venv* v) { (void)v; d->placement.kind = (moe_ep_placement_kind)77; }
static void m_table_null(moe_ep_desc* d, venv* v) {
    (void)v;
    d->placement.kind = MOE_EP_PLACEMENT_TABLE;
    d->placement.table = NULL;
}
static void m_table_high(moe_ep_desc* d, venv* v) {
    v->table[2] = 1;                /* a world of one rank */
    d->placement.kind = MOE_EP_PLACEMENT_TABLE;
    d->placement.table = v->table;
}
static void m_table_neg(moe_ep_desc* d, venv* v) {
    v->table[0] = -1;
    d->placement.kind = MOE_EP_PLACEMENT_TABLE;
    d->placement.table = v->table;
}
static void m_threads_neg(moe_ep_desc* d, venv* v) { (void)v; d->num_threads = -1; }
static void m_alloc_only(moe_ep_desc* d, venv* v) { (void)v; d->allocator.free_fn = NULL; }
static void m_free_only(moe_ep_desc* d, venv* v) { (void)v; d->allocator.alloc_fn = NULL; }
static void m_no_exchange(moe_ep_desc* d, venv* v) {
    v->transport = moe_ep_single_rank_transport();
    v->transport.exchange_counts = NULL;
    d->transport = &v->transport;
}
static void m_no_a2a(moe_ep_desc* d, venv* v) {
    v->transport = moe_ep_single_rank_transport();
    v->transport.all_to_all_v = NULL;
    d->transport = &v->transport;
}
static moe_ep_result v_begin(void* impl, const moe_ep_a2a_args* args, void** request, char* e, size_t n) {
    (void)impl; (void)args; (void)request; (void)e; (void)n;
    return MOE_EP_OK;
}
static void m_half_split(moe_ep_desc* d, venv* v) {
    v->transport = moe_ep_single_rank_transport();
    v->transport.all_to_all_v_begin = v_begin;
    d->transport = &v->transport;
}
static void m_rank_out(moe_ep_desc* d, venv* v) {
    v->transport = moe_ep_single_rank_transport();
    v->transport.rank = 1;
    d->transport = &v->transport;
}
static void m_world_0(moe_ep_desc* d, venv* v) {
    v->transport = moe_ep_single_rank_transport();
    v->transport.world_size = 0;
    d->transport = &v->transport;
}
static void m_experts_null(moe_ep_desc* d, venv* v) { (void)v; d->experts = NULL; }
static void m_w3_null(moe_ep_desc* d, venv* v) { (void)d; v->experts[1].w3 = NULL; }
static void m_w2_null_gelu(moe_ep_desc* d, venv* v) {
    d->activation = MOE_EP_ACTIVATION_GELU;
    v->experts[0].w2 = NULL;
}
static void m_w1_null(moe_ep_desc* d, venv* v) { (void)d; v->experts[3].w1 = NULL; }
static void m_groups_3(moe_ep_desc* d, venv* v) { (void)v; d->num_groups = 3; }
static void m_groups_neg(moe_ep_desc* d, venv* v) { (void)v; d->num_groups = -2; }
static void m_topk_groups_big(moe_ep_desc* d, venv* v) { (void)v; d->num_groups = 2; d->topk_groups = 3; }
static void m_topk_groups_neg(moe_ep_desc* d, venv* v) { (void)v; d->num_groups = 2; d->topk_groups = -1; }
static void m_k_above_groups(moe_ep_desc* d, venv* v) { (void)v; d->num_groups = 4; d->topk_groups = 1; }
static void m_scaling_neg(moe_ep_desc* d, venv* v) { (void)v; d->routed_scaling_factor = -1.0f; }
static void m_scaling_nan(moe_ep_desc* d, venv* v) { (void)v; d->routed_scaling_factor = NAN; }
static void m_selection_nan(moe_ep_desc* d, venv* v) {
    v->bias[0] = 0.5f; v->bias[1] = -0.25f; v->bias[2] = NAN; v->bias[3] = 0.0f;
    d->selection_bias = v->bias;
}
static void m_shared_d_ff_neg(moe_ep_desc* d, venv* v) { (void)v; d->shared.d_ff = -4; }
static void m_shared_no_w3(moe_ep_desc* d, venv* v) {
    d->shared.d_ff = V_F;
    d->shared.weights = v->experts[0];
    d->shared.weights.w3 = NULL;
}
static void m_shared_gate_nan(moe_ep_desc* d, venv* v) {
    int i;
    for (i = 0; i < V_D; ++i) v->gate[i] = 0.125f * (float)i;
    v->gate[5] = NAN;
    d->shared.d_ff = V_F;
    d->shared.weights = v->experts[1];
    d->shared.gate = v->gate;
}
static void m_router_bias_inf(moe_ep_desc* d, venv* v) {
    v->bias[0] = 0.5f; v->bias[1] = -0.25f; v->bias[2] = 1.0f; v->bias[3] = -INFINITY;
    d->router_bias = v->bias;
}
static void m_alpha_neg(moe_ep_desc* d, venv* v) { (void)v; d->swiglu_alpha = -1.702f; }
static void m_alpha_inf(moe_ep_desc* d, venv* v) { (void)v; d->swiglu_alpha = INFINITY; }
static void m_limit_neg(moe_ep_desc* d, venv* v) { (void)v; d->swiglu_limit = -7.0f; }
static void m_limit_nan(moe_ep_desc* d, venv* v) { (void)v; d->swiglu_limit = NAN; }
static void m_layout_count(moe_ep_desc* d, venv* v) { (void)v; d->weight_layout = MOE_EP_WEIGHT_LAYOUT_COUNT; }
static void m_clamped_w3_null(moe_ep_desc* d, venv* v) {
    d->activation = MOE_EP_ACTIVATION_SWIGLU_CLAMPED;
    v->experts[2].w3 = NULL;
}
static void m_fused_w1_null(moe_ep_desc* d, venv* v) {
    d->weight_layout = MOE_EP_WEIGHT_LAYOUT_FUSED_GATE_UP;
    v->experts[0].w1 = NULL;
}
static void m_gpt_oss_w2_null(moe_ep_desc* d, venv* v) {
    d->weight_layout = MOE_EP_WEIGHT_LAYOUT_GPT_OSS;
    d->activation = MOE_EP_ACTIVATION_SWIGLU_CLAMPED;
    v->experts[1].w2 = NULL;
}

static const vcase vcases[] = {
    { "d_model 0", MOE_EP_LOG_ITEM_DESC_D_MODEL, m_d_model_0 },
    { "d_model -3", MOE_EP_LOG_ITEM_DESC_D_MODEL, m_d_model_neg },
    { "d_ff 0", MOE_EP_LOG_ITEM_DESC_D_FF, m_d_ff_0 },
    { "d_ff -1", MOE_EP_LOG_ITEM_DESC_D_FF, m_d_ff_neg },
    { "num_experts 0", MOE_EP_LOG_ITEM_DESC_NUM_EXPERTS, m_experts_0 },
    { "num_experts -2", MOE_EP_LOG_ITEM_DESC_NUM_EXPERTS, m_experts_neg },
    { "top_k -1", MOE_EP_LOG_ITEM_DESC_TOP_K, m_top_k_neg },
    { "top_k > num_experts", MOE_EP_LOG_ITEM_DESC_TOP_K_ABOVE_EXPERTS, m_top_k_big },
    { "activation COUNT", MOE_EP_LOG_ITEM_DESC_ACTIVATION, m_act_count },
    { "activation 77", MOE_EP_LOG_ITEM_DESC_ACTIVATION, m_act_77 },
    { "scoring COUNT", MOE_EP_LOG_ITEM_DESC_SCORING, m_scoring_count },
    { "scoring 9", MOE_EP_LOG_ITEM_DESC_SCORING, m_scoring_9 },
    { "capacity_factor -0.5", MOE_EP_LOG_ITEM_DESC_CAPACITY_FACTOR, m_cap_neg },
    { "capacity_factor NaN", MOE_EP_LOG_ITEM_DESC_CAPACITY_FACTOR, m_cap_nan },
    { "capacity_factor 2e6", MOE_EP_LOG_ITEM_DESC_CAPACITY_FACTOR, m_cap_huge },
    { "placement.kind COUNT", MOE_EP_LOG_ITEM_DESC_PLACEMENT_KIND, m_place_count },
    { "placement.kind 77", MOE_EP_LOG_ITEM_DESC_PLACEMENT_KIND, m_place_77 },
    { "placement.table NULL", MOE_EP_LOG_ITEM_DESC_PLACEMENT_TABLE_MISSING, m_table_null },
    { "placement.table[2] = 1 of 1 rank", MOE_EP_LOG_ITEM_DESC_PLACEMENT_TABLE_RANK, m_table_high },
    { "placement.table[0] = -1", MOE_EP_LOG_ITEM_DESC_PLACEMENT_TABLE_RANK, m_table_neg },
    { "num_threads -1", MOE_EP_LOG_ITEM_DESC_NUM_THREADS, m_threads_neg },
    { "allocator with alloc_fn only", MOE_EP_LOG_ITEM_DESC_ALLOCATOR_HALF, m_alloc_only },
    { "allocator with free_fn only", MOE_EP_LOG_ITEM_DESC_ALLOCATOR_HALF, m_free_only },
    { "transport without exchange_counts", MOE_EP_LOG_ITEM_DESC_TRANSPORT_REQUIRED_CALLBACKS, m_no_exchange },
    { "transport without all_to_all_v", MOE_EP_LOG_ITEM_DESC_TRANSPORT_REQUIRED_CALLBACKS, m_no_a2a },
    { "transport with all_to_all_v_begin only", MOE_EP_LOG_ITEM_DESC_TRANSPORT_SPLIT_PHASE_HALF, m_half_split },
    { "transport rank 1 of 1", MOE_EP_LOG_ITEM_DESC_TRANSPORT_RANK, m_rank_out },
    { "transport world_size 0", MOE_EP_LOG_ITEM_DESC_TRANSPORT_RANK, m_world_0 },
    { "experts NULL", MOE_EP_LOG_ITEM_DESC_EXPERTS_MISSING, m_experts_null },
    { "experts[1].w3 NULL under SwiGLU", MOE_EP_LOG_ITEM_DESC_EXPERT_WEIGHTS_NULL, m_w3_null },
    { "experts[0].w2 NULL under GELU", MOE_EP_LOG_ITEM_DESC_EXPERT_WEIGHTS_NULL, m_w2_null_gelu },
    { "experts[3].w1 NULL", MOE_EP_LOG_ITEM_DESC_EXPERT_WEIGHTS_NULL, m_w1_null },
    { "num_groups 3 of 4 experts", MOE_EP_LOG_ITEM_DESC_NUM_GROUPS, m_groups_3 },
    { "num_groups -2", MOE_EP_LOG_ITEM_DESC_NUM_GROUPS, m_groups_neg },
    { "topk_groups 3 > num_groups 2", MOE_EP_LOG_ITEM_DESC_TOPK_GROUPS, m_topk_groups_big },
    { "topk_groups -1", MOE_EP_LOG_ITEM_DESC_TOPK_GROUPS, m_topk_groups_neg },
    { "top_k 2 above the 1 expert of 1 group of 4", MOE_EP_LOG_ITEM_DESC_TOP_K_ABOVE_GROUPS, m_k_above_groups },
    { "routed_scaling_factor -1", MOE_EP_LOG_ITEM_DESC_ROUTED_SCALING_FACTOR, m_scaling_neg },
    { "routed_scaling_factor NaN", MOE_EP_LOG_ITEM_DESC_ROUTED_SCALING_FACTOR, m_scaling_nan },
    { "selection_bias[2] NaN", MOE_EP_LOG_ITEM_DESC_BIAS_NOT_FINITE, m_selection_nan },
    { "router_bias[3] -Inf", MOE_EP_LOG_ITEM_DESC_BIAS_NOT_FINITE, m_router_bias_inf },
    { "shared.d_ff -4", MOE_EP_LOG_ITEM_DESC_SHARED_D_FF, m_shared_d_ff_neg },
    { "shared expert without w3 under SwiGLU", MOE_EP_LOG_ITEM_DESC_SHARED_WEIGHTS_NULL, m_shared_no_w3 },
    { "shared.gate[5] NaN", MOE_EP_LOG_ITEM_DESC_SHARED_GATE_NOT_FINITE, m_shared_gate_nan },
    { "swiglu_alpha -1.702", MOE_EP_LOG_ITEM_DESC_SWIGLU_ALPHA, m_alpha_neg },
    { "swiglu_alpha Inf", MOE_EP_LOG_ITEM_DESC_SWIGLU_ALPHA, m_alpha_inf },
    { "swiglu_limit -7", MOE_EP_LOG_ITEM_DESC_SWIGLU_LIMIT, m_limit_neg },
    { "swiglu_limit NaN", MOE_EP_LOG_ITEM_DESC_SWIGLU_LIMIT, m_limit_nan },
    { "weight_layout COUNT", MOE_EP_LOG_ITEM_DESC_WEIGHT_LAYOUT, m_layout_count },
    { "experts[2].w3 NULL under clamped SwiGLU", MOE_EP_LOG_ITEM_DESC_EXPERT_WEIGHTS_NULL, m_clamped_w3_null },
    { "experts[0].w1 NULL in the fused gate_up layout", MOE_EP_LOG_ITEM_DESC_EXPERT_WEIGHTS_NULL, m_fused_w1_null },
    { "experts[1].w2 NULL in the GPT-OSS layout", MOE_EP_LOG_ITEM_DESC_EXPERT_WEIGHTS_NULL, m_gpt_oss_w2_null },
};
#define VCASES ((int)(sizeof vcases / sizeof vcases[0]))

START_TEST(validation_desc_fields) {
    const vcase* c = &vcases[_i];
    venv env;
    test_counter counter;
    test_log log;
    moe_ep_desc d;
    moe_ep_context* sentinel = (moe_ep_context*)&env;
    moe_ep_context* ctx = sentinel;
    moe_ep_result res;
    char joined[4096];
    int e;
    memset(&env, 0, sizeof env);
    test_counter_init(&counter);
    test_log_init(&log);
    check_model_init(&env.model, V_D, V_F, V_E, 2, MOE_EP_ACTIVATION_SWIGLU, false, 50);
    for (e = 0; e < V_E; ++e) env.experts[e] = env.model.experts[e];
    memset(&d, 0, sizeof d);
    d.d_model = V_D;
    d.d_ff = V_F;
    d.num_experts = V_E;
    d.top_k = 2;
    d.router_weight = env.model.router;
    d.experts = env.experts;
    d.allocator = test_counter_allocator(&counter);
    d.logger = test_log_logger(&log);
    c->mutate(&d, &env);
    res = moe_ep_create(&d, &ctx);
    ck_assert_msg(res == MOE_EP_ERROR_INVALID_ARGUMENT, "%s: create returned %s", c->name, moe_ep_result_string(res));
    ck_assert_msg(ctx == sentinel, "%s: the out-param was written on failure", c->name);
    ck_assert_msg(test_log_find_item(&log, c->item) >= 0, "%s: no message has item %s: %s", c->name,
                  moe_ep_log_item_string(c->item), test_log_join(&log, joined, sizeof joined));
    /* the words name the field of the desc */
    ck_assert_msg(strncmp(test_log_line(&log, test_log_find_item(&log, c->item)), "moe_ep_desc.", 12) == 0,
                  "%s: the message does not start with the field: %s", c->name, test_log_join(&log, joined, sizeof joined));
    ck_assert_msg(test_counter_outstanding(&counter) == 0, "%s: %ld allocations outstanding (%ld made, %ld freed)",
                  c->name, test_counter_outstanding(&counter), counter.allocs, counter.frees);
    check_model_free(&env.model);
    test_counter_destroy(&counter);
    test_log_destroy(&log);
}
END_TEST

/* The unmutated base desc is valid: the table above tests one defect at a time. */
START_TEST(validation_base_desc_valid) {
    check_model m;
    test_counter counter;
    test_log log;
    moe_ep_context* ctx = NULL;
    moe_ep_result res;
    test_counter_init(&counter);
    test_log_init(&log);
    check_model_init(&m, V_D, V_F, V_E, 2, MOE_EP_ACTIVATION_SWIGLU, false, 50);
    res = moe_ep_create(&(moe_ep_desc){ .d_model = V_D, .d_ff = V_F, .num_experts = V_E, .top_k = 2,
                                        .router_weight = m.router, .experts = m.experts,
                                        .allocator = test_counter_allocator(&counter),
                                        .logger = test_log_logger(&log) }, &ctx);
    ck_assert_msg(res == MOE_EP_OK, "base desc: %s", moe_ep_result_string(res));
    ck_assert_msg(log.lines == 0, "a valid desc logged %d lines", log.lines);
    ck_assert_msg(counter.allocs > 0, "the allocator was not used");
    moe_ep_destroy(ctx);
    ck_assert_msg(test_counter_outstanding(&counter) == 0, "%ld outstanding after destroy",
                  test_counter_outstanding(&counter));
    check_model_free(&m);
    test_counter_destroy(&counter);
    test_log_destroy(&log);
}
END_TEST

START_TEST(validation_null_desc_or_out) {
    check_model m;
    moe_ep_context* ctx = (moe_ep_context*)&m;
    check_model_init(&m, V_D, V_F, V_E, 2, MOE_EP_ACTIVATION_SWIGLU, false, 50);
    ck_assert_int_eq(moe_ep_create(NULL, &ctx), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_msg(ctx == (moe_ep_context*)&m, "out written");
    ck_assert_int_eq(moe_ep_create(&(moe_ep_desc){ .d_model = V_D, .d_ff = V_F, .num_experts = V_E,
                                                   .router_weight = m.router, .experts = m.experts }, NULL),
                     MOE_EP_ERROR_INVALID_ARGUMENT);
    check_model_free(&m);
}
END_TEST

/* create, every kind of layer call, destroy: nothing left behind, on one rank and on three. */
START_TEST(validation_no_leaks) {
    check_model m;
    test_counter counter;
    moe_ep_allocator a;
    moe_ep_context* ctx = NULL;
    moe_ep_plan* plan = NULL;
    moe_ep_plan_info info;
    check_layer run;
    int64_t tokens[3] = { 13, 0, 7 };
    float x[20 * V_D], y[20 * V_D + 1], rows[40 * V_D], out[40 * V_D];
    int32_t idx[20 * 2];
    float weight[20 * 2];
    int64_t counts[V_E];
    moe_ep_router_stats stats;
    uint64_t seed = 60;
    char errors[1024];
    test_counter_init(&counter);
    a = test_counter_allocator(&counter);
    check_model_init(&m, V_D, V_F, V_E, 2, MOE_EP_ACTIVATION_SWIGLU, false, 61);
    test_fill(x, 20 * V_D, 1.0f, &seed);
    stats.tokens_per_expert = counts;
    ck_assert_int_eq(moe_ep_create(&(moe_ep_desc){ .d_model = V_D, .d_ff = V_F, .num_experts = V_E, .top_k = 2,
                                                   .capacity_factor = 1.0f, .router_weight = m.router,
                                                   .experts = m.experts, .allocator = a }, &ctx), MOE_EP_OK);
    ck_assert_int_eq(moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = 20, .x = x, .y = y, .stats = &stats }),
                     MOE_EP_OK);
    ck_assert_int_eq(moe_ep_route(ctx, x, 20, idx, weight, &stats), MOE_EP_OK);
    ck_assert_int_eq(moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = 20, .x = x, .y = y, .routing_in = true,
                                                                 .topk_idx = idx, .topk_weight = weight }), MOE_EP_OK);
    ck_assert_int_eq(moe_ep_plan_create(ctx, 20, idx, weight, &plan), MOE_EP_OK);
    info = moe_ep_plan_query(plan);
    ck_assert(info.recv_rows <= 40);
    ck_assert_int_eq(moe_ep_dispatch_begin(ctx, plan, x, rows), MOE_EP_OK);
    ck_assert_int_eq(moe_ep_dispatch_end(ctx, plan), MOE_EP_OK);
    ck_assert_int_eq(moe_ep_experts(ctx, plan, rows, out), MOE_EP_OK);
    ck_assert_int_eq(moe_ep_combine(ctx, plan, out, y), MOE_EP_OK);
    moe_ep_plan_destroy(plan);
    moe_ep_destroy(ctx);
    ck_assert_msg(counter.allocs > 0, "the allocator was not used");
    ck_assert_msg(test_counter_outstanding(&counter) == 0, "one rank: %ld allocations outstanding",
                  test_counter_outstanding(&counter));

    /* three ranks; the world's own allocations go through the same counter */
    check_layer_init(&run, &m, 3, tokens, x, y);
    run.allocator = &a;
    run.capacity_factor = 0.5f;
    check_run_layer(&run);
    ck_assert_msg(run.result == MOE_EP_OK, "three ranks: %s", check_layer_errors(&run, errors, sizeof errors));
    ck_assert_msg(test_counter_outstanding(&counter) == 0, "three ranks: %ld allocations outstanding",
                  test_counter_outstanding(&counter));
    check_model_free(&m);
    test_counter_destroy(&counter);
}
END_TEST

/* Fail allocation n of create, for every n: OUT_OF_MEMORY, out untouched, nothing leaked. */
START_TEST(validation_create_out_of_memory) {
    check_model m;
    test_counter counter;
    moe_ep_context* sentinel = (moe_ep_context*)&m;
    long n;
    bool created = false;
    test_counter_init(&counter);
    check_model_init(&m, V_D, V_F, V_E, 2, MOE_EP_ACTIVATION_SWIGLU, false, 62);
    for (n = 1; n < 200 && !created; ++n) {
        moe_ep_context* ctx = sentinel;
        moe_ep_result res;
        int table[V_E] = { 0, 0, 0, 0 };
        counter.attempts = 0;
        counter.fail_at = n;
        res = moe_ep_create(&(moe_ep_desc){ .d_model = V_D, .d_ff = V_F, .num_experts = V_E, .top_k = 2,
                                            .placement = { .kind = MOE_EP_PLACEMENT_TABLE, .table = table },
                                            .router_weight = m.router, .experts = m.experts,
                                            .allocator = test_counter_allocator(&counter) }, &ctx);
        if (res == MOE_EP_OK) {
            ck_assert_msg(counter.attempts < n, "allocation %ld failed but create succeeded", n);
            moe_ep_destroy(ctx);
            created = true;
        } else {
            ck_assert_msg(res == MOE_EP_ERROR_OUT_OF_MEMORY, "allocation %ld failed: create returned %s", n,
                          moe_ep_result_string(res));
            ck_assert_msg(ctx == sentinel, "allocation %ld failed: out written", n);
        }
        ck_assert_msg(test_counter_outstanding(&counter) == 0, "allocation %ld failed: %ld outstanding", n,
                      test_counter_outstanding(&counter));
    }
    ck_assert_msg(created, "create never succeeded");
    ck_assert_msg(n > 5, "create made only %ld allocations", n - 1);
    check_model_free(&m);
    test_counter_destroy(&counter);
}
END_TEST

/* Fail allocation n of a forward call: OUT_OF_MEMORY and y untouched, or a correct answer;
   the context stays usable and nothing leaks. */
START_TEST(validation_forward_out_of_memory) {
    check_model m;
    test_counter counter;
    moe_ep_context* ctx = NULL;
    float x[9 * V_D], y_good[9 * V_D], y[9 * V_D];
    int64_t counts_good[V_E], counts[V_E];
    moe_ep_router_stats stats_good, stats;
    uint64_t seed = 63;
    long n;
    bool passed = false;
    test_counter_init(&counter);
    check_model_init(&m, V_D, V_F, V_E, 2, MOE_EP_ACTIVATION_SWIGLU, false, 64);
    test_fill(x, 9 * V_D, 1.0f, &seed);
    stats_good.tokens_per_expert = counts_good;
    ck_assert_int_eq(moe_ep_create(&(moe_ep_desc){ .d_model = V_D, .d_ff = V_F, .num_experts = V_E, .top_k = 2,
                                                   .router_weight = m.router, .experts = m.experts }, &ctx), MOE_EP_OK);
    ck_assert_int_eq(moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = 9, .x = x, .y = y_good,
                                                                 .stats = &stats_good }), MOE_EP_OK);
    moe_ep_destroy(ctx);
    for (n = 1; n < 200 && !passed; ++n) {
        moe_ep_result res;
        ctx = NULL;
        counter.fail_at = 0;
        ck_assert_int_eq(moe_ep_create(&(moe_ep_desc){ .d_model = V_D, .d_ff = V_F, .num_experts = V_E, .top_k = 2,
                                                       .router_weight = m.router, .experts = m.experts,
                                                       .allocator = test_counter_allocator(&counter) }, &ctx),
                         MOE_EP_OK);
        counter.fail_at = counter.attempts + n;
        test_poison(y, 9 * V_D);
        memset(&stats, 0, sizeof stats);
        stats.tokens_per_expert = counts;
        res = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = 9, .x = x, .y = y, .stats = &stats });
        if (res == MOE_EP_OK) {
            ck_assert_msg(memcmp(y, y_good, sizeof y) == 0, "allocation %ld failed: forward succeeded with other output", n);
            ck_assert_msg(memcmp(counts, counts_good, sizeof counts) == 0 && stats.aux_loss == stats_good.aux_loss &&
                              stats.z_loss == stats_good.z_loss,
                          "allocation %ld failed: forward succeeded with other statistics (aux %g, expected %g)", n,
                          stats.aux_loss, stats_good.aux_loss);
            passed = counter.attempts < counter.fail_at;
        } else {
            ck_assert_msg(res == MOE_EP_ERROR_OUT_OF_MEMORY, "allocation %ld failed: forward returned %s", n,
                          moe_ep_result_string(res));
            ck_assert_msg(test_is_poisoned(y, 9 * V_D), "allocation %ld failed: y written", n);
            /* the context still works */
            counter.fail_at = 0;
            ck_assert_int_eq(moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = 9, .x = x, .y = y }), MOE_EP_OK);
            ck_assert_msg(memcmp(y, y_good, sizeof y) == 0, "allocation %ld failed: the next forward differs", n);
        }
        moe_ep_destroy(ctx);
        ck_assert_msg(test_counter_outstanding(&counter) == 0, "allocation %ld failed: %ld outstanding", n,
                      test_counter_outstanding(&counter));
    }
    ck_assert_msg(passed, "forward never got through");
    check_model_free(&m);
    test_counter_destroy(&counter);
}
END_TEST

typedef struct fcase {
    const char* name;
    moe_ep_log_item item;
    int64_t tokens;
    bool null_x, null_y, routing_in_null, null_args;
} fcase;

static const fcase fcases[] = {
    { "tokens -1", MOE_EP_LOG_ITEM_FORWARD_TOKENS, -1, false, false, false, false },
    { "x NULL", MOE_EP_LOG_ITEM_FORWARD_NULL, 5, true, false, false, false },
    { "y NULL", MOE_EP_LOG_ITEM_FORWARD_NULL, 5, false, true, false, false },
    { "routing_in without arrays", MOE_EP_LOG_ITEM_FORWARD_ROUTING_IN, 5, false, false, true, false },
    { "args NULL", MOE_EP_LOG_ITEM_FORWARD_ARGS_NULL, 5, false, false, false, true },
};

START_TEST(validation_forward_args) {
    const fcase* c = &fcases[_i];
    check_model m;
    test_log log;
    moe_ep_context* ctx = NULL;
    float x[5 * V_D], y[5 * V_D];
    uint64_t seed = 65;
    moe_ep_forward_args args;
    moe_ep_result res;
    char joined[2048];
    test_log_init(&log);
    check_model_init(&m, V_D, V_F, V_E, 2, MOE_EP_ACTIVATION_SWIGLU, false, 66);
    test_fill(x, 5 * V_D, 1.0f, &seed);
    test_poison(y, 5 * V_D);
    ck_assert_int_eq(moe_ep_create(&(moe_ep_desc){ .d_model = V_D, .d_ff = V_F, .num_experts = V_E, .top_k = 2,
                                                   .router_weight = m.router, .experts = m.experts,
                                                   .logger = test_log_logger(&log) }, &ctx), MOE_EP_OK);
    memset(&args, 0, sizeof args);
    args.tokens = c->tokens;
    args.x = c->null_x ? NULL : x;
    args.y = c->null_y ? NULL : y;
    args.routing_in = c->routing_in_null;
    res = moe_ep_forward(ctx, c->null_args ? NULL : &args);
    ck_assert_msg(res == MOE_EP_ERROR_INVALID_ARGUMENT, "%s: forward returned %s", c->name, moe_ep_result_string(res));
    ck_assert_msg(moe_ep_last_error_item(ctx) == c->item, "%s: last error is %s (\"%s\"), want %s", c->name,
                  moe_ep_log_item_string(moe_ep_last_error_item(ctx)), moe_ep_last_error(ctx),
                  moe_ep_log_item_string(c->item));
    ck_assert_msg(test_log_find_item(&log, c->item) >= 0, "%s: log: %s", c->name,
                  test_log_join(&log, joined, sizeof joined));
    ck_assert_msg(test_is_poisoned(y, 5 * V_D), "%s: y written on failure", c->name);
    /* the context is still good */
    ck_assert_int_eq(moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = 5, .x = x, .y = y }), MOE_EP_OK);
    moe_ep_destroy(ctx);
    check_model_free(&m);
    test_log_destroy(&log);
}
END_TEST

/* The stage calls refuse a plan in the wrong state or of another context. */
START_TEST(validation_stage_misuse) {
    check_model m;
    moe_ep_context *ctx = NULL, *other = NULL;
    moe_ep_plan *plan = NULL, *sentinel = (moe_ep_plan*)&m;
    float x[3 * V_D], rows[6 * V_D], out[6 * V_D], y[3 * V_D];
    int32_t idx[6] = { 0, 1, 2, 3, 1, 2 };
    float weight[6] = { 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f };
    uint64_t seed = 67;
    check_model_init(&m, V_D, V_F, V_E, 2, MOE_EP_ACTIVATION_SWIGLU, false, 68);
    test_fill(x, 3 * V_D, 1.0f, &seed);
    ck_assert_int_eq(moe_ep_create(&(moe_ep_desc){ .d_model = V_D, .d_ff = V_F, .num_experts = V_E, .top_k = 2,
                                                   .router_weight = m.router, .experts = m.experts }, &ctx), MOE_EP_OK);
    ck_assert_int_eq(moe_ep_create(&(moe_ep_desc){ .d_model = V_D, .d_ff = V_F, .num_experts = V_E, .top_k = 2,
                                                   .router_weight = m.router, .experts = m.experts }, &other), MOE_EP_OK);
    ck_assert_int_eq(moe_ep_plan_create(ctx, 3, idx, weight, NULL), MOE_EP_ERROR_INVALID_ARGUMENT);
    plan = sentinel;
    ck_assert_int_eq(moe_ep_plan_create(ctx, -1, idx, weight, &plan), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(moe_ep_plan_create(ctx, 3, NULL, weight, &plan), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_msg(plan == sentinel, "plan_create wrote its out-param on failure");
    ck_assert_int_eq(moe_ep_plan_create(ctx, 3, idx, weight, &plan), MOE_EP_OK);
    ck_assert_int_eq(moe_ep_dispatch_end(ctx, plan), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_msg(moe_ep_last_error_item(ctx) == MOE_EP_LOG_ITEM_STAGE_SPLIT_PHASE, "%s", moe_ep_last_error(ctx));
    ck_assert_int_eq(moe_ep_dispatch(other, plan, x, rows), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_msg(moe_ep_last_error_item(other) == MOE_EP_LOG_ITEM_STAGE_PLAN, "%s", moe_ep_last_error(other));
    ck_assert_int_eq(moe_ep_dispatch(ctx, plan, NULL, rows), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_msg(moe_ep_last_error_item(ctx) == MOE_EP_LOG_ITEM_STAGE_NULL, "%s", moe_ep_last_error(ctx));
    ck_assert_int_eq(moe_ep_dispatch_begin(ctx, plan, x, rows), MOE_EP_OK);
    ck_assert_int_eq(moe_ep_experts(ctx, plan, rows, out), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(moe_ep_dispatch_begin(ctx, plan, x, rows), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_msg(moe_ep_last_error_item(ctx) == MOE_EP_LOG_ITEM_STAGE_SPLIT_PHASE, "%s", moe_ep_last_error(ctx));
    ck_assert_int_eq(moe_ep_dispatch_end(ctx, plan), MOE_EP_OK);
    ck_assert_int_eq(moe_ep_experts(ctx, plan, rows, out), MOE_EP_OK);
    ck_assert_int_eq(moe_ep_combine_end(ctx, plan, y), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(moe_ep_combine(ctx, plan, out, y), MOE_EP_OK);
    moe_ep_plan_destroy(plan);
    moe_ep_destroy(ctx);
    moe_ep_destroy(other);
    check_model_free(&m);
}
END_TEST

Suite* validation_suite(void) {
    Suite* s = suite_create("validation");
    TCase* tc = tcase_create("desc");
    TCase* tc_mem = tcase_create("memory");
    TCase* tc_args = tcase_create("args");
    tcase_add_loop_test(tc, validation_desc_fields, 0, VCASES);
    tcase_add_test(tc, validation_base_desc_valid);
    tcase_add_test(tc, validation_null_desc_or_out);
    tcase_add_test(tc_mem, validation_no_leaks);
    tcase_add_test(tc_mem, validation_create_out_of_memory);
    tcase_add_test(tc_mem, validation_forward_out_of_memory);
    tcase_add_loop_test(tc_args, validation_forward_args, 0, (int)(sizeof fcases / sizeof fcases[0]));
    tcase_add_test(tc_args, validation_stage_misuse);
    suite_add_tcase(s, tc);
    suite_add_tcase(s, tc_mem);
    suite_add_tcase(s, tc_args);
    return s;
}
