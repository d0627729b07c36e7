/* check_routing.c -- the router's variants: sigmoid scoring, a selection-only bias,
   group-limited top-k, a router bias with softmax over the k chosen, sigmoid of the
   chosen logits applied to the expert's input, and the routed scaling factor.

   Every case runs the whole layer at 1, 2, 3 and 5 pthreads ranks: the routing must be
   the float64 reference's (same experts, weights within 1e-6), the one-rank output within
   1e-5 relative of the float64 layer, and every rank count bitwise equal to one rank.
   Biases have both signs and are large enough to change choices (asserted), and a NaN in
   x refuses the token without writing the caller's arrays. */
#include "check_moe_ep.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define R_D 24
#define R_F 40
#define R_TOKENS 29

typedef struct routing_case {
    const char* name;
    int experts, top_k;
    bool normalize;
    check_routing routing;
    bool router_bias, selection_bias;   /* fill the biases (both signs) */
    moe_ep_activation activation;
} routing_case;

static const routing_case routing_cases[] = {
    { "sigmoid, selection bias, 4 groups keep 2, renormalised, x2.5 (DeepSeek-V3)", 16, 4, true,
      { MOE_EP_SCORING_SIGMOID, 2.5f, NULL, NULL, 4, 2, false }, false, true, MOE_EP_ACTIVATION_SWIGLU },
    { "sigmoid, selection bias, no groups, not renormalised", 12, 3, false,
      { MOE_EP_SCORING_SIGMOID, 0.0f, NULL, NULL, 0, 0, false }, false, true, MOE_EP_ACTIVATION_SWIGLU },
    { "sigmoid, 8 groups keep 3, no bias", 16, 5, true,
      { MOE_EP_SCORING_SIGMOID, 0.0f, NULL, NULL, 8, 3, false }, false, false, MOE_EP_ACTIVATION_GELU },
    { "softmax, 3 groups keep 1, x0.5", 12, 2, false,
      { MOE_EP_SCORING_SOFTMAX, 0.5f, NULL, NULL, 3, 1, false }, false, false, MOE_EP_ACTIVATION_SWIGLU },
    { "top-k of biased logits, softmax over the k (GPT-OSS)", 8, 2, false,
      { MOE_EP_SCORING_TOPK_SOFTMAX, 0.0f, NULL, NULL, 0, 0, false }, true, false, MOE_EP_ACTIVATION_SWIGLU },
    { "top-1 of the logits, sigmoid on the input (Llama-4)", 8, 1, false,
      { MOE_EP_SCORING_TOPK_SIGMOID, 0.0f, NULL, NULL, 0, 0, true }, false, false, MOE_EP_ACTIVATION_SWIGLU },
    { "top-2 of the logits, sigmoid on the input", 8, 2, false,
      { MOE_EP_SCORING_TOPK_SIGMOID, 0.0f, NULL, NULL, 0, 0, true }, false, false, MOE_EP_ACTIVATION_RELU },
    { "softmax top-2 renormalised, weights on the input", 6, 2, true,
      { MOE_EP_SCORING_SOFTMAX, 0.0f, NULL, NULL, 0, 0, true }, false, false, MOE_EP_ACTIVATION_SWIGLU },
};
#define ROUTING_CASES ((int)(sizeof routing_cases / sizeof routing_cases[0]))

typedef struct routing_data {
    check_model model;
    float router_bias[64], selection_bias[64];
    float* x;
    int64_t total;
} routing_data;

static void routing_data_init(routing_data* data, const routing_case* c, uint64_t seed) {
    check_model_init(&data->model, R_D, R_F, c->experts, c->top_k, c->activation, c->normalize, seed);
    data->model.routing = c->routing;
    /* biases of the size of the scores' spread, so that they change choices */
    test_fill(data->router_bias, (size_t)c->experts, 1.0f, &seed);
    test_fill(data->selection_bias, (size_t)c->experts, 0.3f, &seed);
    if (c->router_bias) data->model.routing.router_bias = data->router_bias;
    if (c->selection_bias) data->model.routing.selection_bias = data->selection_bias;
    data->total = R_TOKENS;
    data->x = (float*)malloc(sizeof(float) * (size_t)(R_TOKENS * R_D));
    test_fill(data->x, (size_t)(R_TOKENS * R_D), 1.0f, &seed);
}

static void routing_data_free(routing_data* data) {
    check_model_free(&data->model);
    free(data->x);
}

/* The layer at R ranks (tokens spread unevenly, one rank may have none). */
static moe_ep_result routing_run(const routing_data* data, int ranks, float* y, int32_t* idx, float* weight,
                                 char* errors, size_t size) {
    static const int64_t spread[5][5] = { { R_TOKENS }, { 11, 18 }, { 13, 0, 16 }, { 0 }, { 5, 7, 0, 9, 8 } };
    check_layer L;
    check_layer_init(&L, &data->model, ranks, spread[ranks - 1], data->x, y);
    L.num_threads = 1;
    L.idx_out = idx;
    L.weight_out = weight;
    check_run_layer(&L);
    if (L.result != MOE_EP_OK) check_layer_errors(&L, errors, size);
    return L.result;
}

START_TEST(routing_layer) {
    static const int worlds[] = { 1, 2, 3, 5 };
    const routing_case* c = &routing_cases[_i];
    routing_data data;
    int k = c->top_k, w, j;
    int64_t t;
    float y1[R_TOKENS * R_D], yr[R_TOKENS * R_D], w1[R_TOKENS * 8], wr[R_TOKENS * 8];
    int32_t i1[R_TOKENS * 8], ir[R_TOKENS * 8], ref_idx[R_TOKENS * 8];
    double ref_w[R_TOKENS * 8], ref_y[R_TOKENS * R_D], err;
    char errors[2048] = "";
    routing_data_init(&data, c, 7000 + (uint64_t)_i);
    test_poison(y1, R_TOKENS * R_D);
    ck_assert_msg(routing_run(&data, 1, y1, i1, w1, errors, sizeof errors) == MOE_EP_OK, "%s, 1 rank: %s", c->name,
                  errors);
    check_ref_route(&data.model, data.x, R_TOKENS, ref_idx, ref_w);
    for (t = 0; t < R_TOKENS; ++t)
        for (j = 0; j < k; ++j) {
            ck_assert_msg(i1[t * k + j] == ref_idx[t * k + j], "%s: token %lld slot %d routed to %d, reference %d",
                          c->name, (long long)t, j, (int)i1[t * k + j], (int)ref_idx[t * k + j]);
            ck_assert_msg(fabs((double)w1[t * k + j] - ref_w[t * k + j]) <= 1e-6 * fmax(1.0, fabs(ref_w[t * k + j])),
                          "%s: token %lld slot %d weight %.9g, reference %.9g", c->name, (long long)t, j,
                          (double)w1[t * k + j], ref_w[t * k + j]);
        }
    check_ref_layer(&data.model, data.x, R_TOKENS, ref_idx, ref_w, ref_y);
    err = check_rel_error(y1, ref_y, R_TOKENS * R_D);
    ck_assert_msg(err <= 1e-5, "%s: relative error %.3g against float64", c->name, err);
    for (w = 1; w < (int)(sizeof worlds / sizeof worlds[0]); ++w) {
        test_poison(yr, R_TOKENS * R_D);
        ck_assert_msg(routing_run(&data, worlds[w], yr, ir, wr, errors, sizeof errors) == MOE_EP_OK, "%s, %d ranks: %s",
                      c->name, worlds[w], errors);
        ck_assert_msg(memcmp(y1, yr, sizeof y1) == 0, "%s: %d ranks differ from 1 rank", c->name, worlds[w]);
        ck_assert_msg(memcmp(i1, ir, sizeof(int32_t) * R_TOKENS * (size_t)k) == 0 &&
                          memcmp(w1, wr, sizeof(float) * R_TOKENS * (size_t)k) == 0,
                      "%s: routing at %d ranks differs from 1 rank", c->name, worlds[w]);
    }
    routing_data_free(&data);
}
END_TEST

/* The biases and the groups of the cases above change what is chosen: without them the
   reference picks other experts for some tokens (else those cases would test nothing). */
START_TEST(routing_settings_matter) {
    const routing_case* c = &routing_cases[_i];
    routing_data data;
    check_model plain;
    int32_t with[R_TOKENS * 8], without[R_TOKENS * 8];
    double w_with[R_TOKENS * 8], w_without[R_TOKENS * 8];
    int64_t t, differ = 0;
    int k = c->top_k, j;
    if (!c->router_bias && !c->selection_bias && c->routing.num_groups <= 1) return;
    routing_data_init(&data, c, 7000 + (uint64_t)_i);
    plain = data.model;
    plain.routing.router_bias = NULL;
    plain.routing.selection_bias = NULL;
    plain.routing.num_groups = 0;
    plain.routing.topk_groups = 0;
    check_ref_route(&data.model, data.x, R_TOKENS, with, w_with);
    check_ref_route(&plain, data.x, R_TOKENS, without, w_without);
    for (t = 0; t < R_TOKENS; ++t) {
        bool same = true;
        for (j = 0; j < k; ++j) same = same && with[t * k + j] == without[t * k + j];
        differ += !same;
    }
    ck_assert_msg(differ > 0, "%s: the biases and groups change no token's experts", c->name);
    routing_data_free(&data);
}
END_TEST

/* topk_groups = num_groups keeps every group: the same bytes as no groups at all. */
START_TEST(routing_all_groups_is_no_groups) {
    routing_case c = routing_cases[0];
    routing_data data;
    float a[R_TOKENS * R_D], b[R_TOKENS * R_D], wa[R_TOKENS * 8], wb[R_TOKENS * 8];
    int32_t ia[R_TOKENS * 8], ib[R_TOKENS * 8];
    char errors[1024] = "";
    c.routing.topk_groups = c.routing.num_groups;
    routing_data_init(&data, &c, 7100);
    ck_assert_msg(routing_run(&data, 2, a, ia, wa, errors, sizeof errors) == MOE_EP_OK, "%s", errors);
    data.model.routing.num_groups = 0;
    data.model.routing.topk_groups = 0;
    ck_assert_msg(routing_run(&data, 2, b, ib, wb, errors, sizeof errors) == MOE_EP_OK, "%s", errors);
    ck_assert_msg(memcmp(a, b, sizeof a) == 0 && memcmp(ia, ib, sizeof(int32_t) * R_TOKENS * 4) == 0,
                  "all groups kept differs from no groups");
    routing_data_free(&data);
}
END_TEST

/* A NaN in a token's row refuses the call, names the token and writes nothing of the caller's. */
START_TEST(routing_nan_refused) {
    const routing_case* c = &routing_cases[_i];
    routing_data data;
    moe_ep_context* ctx = NULL;
    int32_t idx[R_TOKENS * 8];
    float weight[R_TOKENS * 8];
    moe_ep_result res;
    routing_data_init(&data, c, 7200 + (uint64_t)_i);
    data.x[17 * R_D + 3] = NAN;
    ck_assert_int_eq(moe_ep_create(&(moe_ep_desc){ .d_model = R_D, .d_ff = R_F, .num_experts = c->experts,
                                                   .top_k = c->top_k, .scoring = c->routing.scoring,
                                                   .num_groups = c->routing.num_groups,
                                                   .topk_groups = c->routing.topk_groups,
                                                   .selection_bias = data.model.routing.selection_bias,
                                                   .router_bias = data.model.routing.router_bias,
                                                   .router_weight = data.model.router,
                                                   .experts = data.model.experts }, &ctx), MOE_EP_OK);
    memset(idx, 0x5A, sizeof idx);
    test_poison(weight, R_TOKENS * 8);
    res = moe_ep_route(ctx, data.x, R_TOKENS, idx, weight, NULL);
    ck_assert_msg(res == MOE_EP_ERROR_INVALID_ARGUMENT, "%s: route returned %s", c->name, moe_ep_result_string(res));
    ck_assert_msg(moe_ep_last_error_item(ctx) == MOE_EP_LOG_ITEM_ROUTE_NOT_FINITE, "%s: %s", c->name,
                  moe_ep_last_error(ctx));
    ck_assert_msg(strstr(moe_ep_last_error(ctx), "token 17") != NULL, "%s: the error does not name token 17: %s",
                  c->name, moe_ep_last_error(ctx));
    ck_assert_msg(idx[0] == 0x5A5A5A5A && idx[R_TOKENS * c->top_k - 1] == 0x5A5A5A5A,
                  "%s: topk_idx written on failure", c->name);
    ck_assert_msg(test_is_poisoned(weight, R_TOKENS * 8), "%s: topk_weight written on failure", c->name);
    moe_ep_destroy(ctx);
    routing_data_free(&data);
}
END_TEST

/* The statistics with a router that is not softmax: the probabilities are still the softmax
   of the logits (the bias included), f_i the share of assignments; z-loss over the logits. */
START_TEST(routing_stats_any_scoring) {
    const routing_case* c = &routing_cases[_i];
    routing_data data;
    moe_ep_context* ctx = NULL;
    int32_t idx[R_TOKENS * 8];
    float weight[R_TOKENS * 8];
    int64_t counts[64];
    double p_mean[64], logit[64], aux = 0.0, z = 0.0;
    moe_ep_router_stats stats;
    int E = c->experts, k = c->top_k, e, i;
    int64_t t;
    routing_data_init(&data, c, 7500 + (uint64_t)_i);
    ck_assert_int_eq(moe_ep_create(&(moe_ep_desc){ .d_model = R_D, .d_ff = R_F, .num_experts = E, .top_k = k,
                                                   .scoring = c->routing.scoring, .num_groups = c->routing.num_groups,
                                                   .topk_groups = c->routing.topk_groups,
                                                   .router_bias = data.model.routing.router_bias,
                                                   .selection_bias = data.model.routing.selection_bias,
                                                   .router_weight = data.model.router,
                                                   .experts = data.model.experts }, &ctx), MOE_EP_OK);
    memset(&stats, 0, sizeof stats);
    stats.tokens_per_expert = counts;
    ck_assert_int_eq(moe_ep_route(ctx, data.x, R_TOKENS, idx, weight, &stats), MOE_EP_OK);
    for (e = 0; e < E; ++e) p_mean[e] = 0.0;
    for (t = 0; t < R_TOKENS; ++t) {
        double mx = -INFINITY, sum = 0.0;
        for (e = 0; e < E; ++e) {
            logit[e] = data.model.routing.router_bias ? (double)data.model.routing.router_bias[e] : 0.0;
            for (i = 0; i < R_D; ++i) logit[e] += (double)data.x[t * R_D + i] * (double)data.model.router[e * R_D + i];
            if (logit[e] > mx) mx = logit[e];
        }
        for (e = 0; e < E; ++e) sum += exp(logit[e] - mx);
        for (e = 0; e < E; ++e) p_mean[e] += exp(logit[e] - mx) / sum / R_TOKENS;
        z += (mx + log(sum)) * (mx + log(sum)) / R_TOKENS;
    }
    for (e = 0; e < E; ++e) {
        int64_t n = 0;
        for (t = 0; t < R_TOKENS * k; ++t) n += idx[t] == e;
        ck_assert_msg(counts[e] == n, "%s: expert %d counted %lld, chosen %lld times", c->name, e, (long long)counts[e],
                      (long long)n);
        aux += (double)n / (double)(R_TOKENS * k) * p_mean[e];
    }
    aux *= E;
    ck_assert_msg(fabs(stats.aux_loss - aux) <= 1e-5 * aux, "%s: aux loss %.9g, reference %.9g", c->name, stats.aux_loss,
                  aux);
    ck_assert_msg(fabs(stats.z_loss - z) <= 1e-5 * z, "%s: z-loss %.9g, reference %.9g", c->name, stats.z_loss, z);
    moe_ep_destroy(ctx);
    routing_data_free(&data);
}
END_TEST

/* >>shared experts: every rank runs them on its own tokens; y = routed + g * shared(x). */
typedef struct shared_case {
    const char* name;
    int routing_case;               /* the router of routing_cases[] */
    int shared_d_ff;
    bool gate;
    moe_ep_activation activation;
    bool biases;                    /* the shared expert has b1, b3, b2 */
} shared_case;

static const shared_case shared_cases[] = {
    { "DeepSeek-V3 router, one shared expert of 2 x 24", 0, 48, false, MOE_EP_ACTIVATION_SWIGLU, false },
    { "softmax top-2 on the input, shared expert of 56 behind a sigmoid gate", 7, 56, true,
      MOE_EP_ACTIVATION_SWIGLU, false },
    { "Llama-4 router, shared expert of 40", 5, 40, false, MOE_EP_ACTIVATION_SWIGLU, false },
    { "GELU, gated shared expert of 7", 2, 7, true, MOE_EP_ACTIVATION_GELU, false },
    { "clamped SwiGLU, gated shared expert of 24 with biases", 4, 24, true, MOE_EP_ACTIVATION_SWIGLU_CLAMPED, true },
};

START_TEST(routing_shared_experts) {
    static const int worlds[] = { 1, 2, 3, 5 };
    const shared_case* sc = &shared_cases[_i];
    routing_case c = routing_cases[sc->routing_case];
    routing_data data;
    float* shared_w;
    float gate[R_D], y1[R_TOKENS * R_D], yr[R_TOKENS * R_D], w1[R_TOKENS * 8], wr[R_TOKENS * 8];
    int32_t i1[R_TOKENS * 8], ir[R_TOKENS * 8], ref_idx[R_TOKENS * 8];
    double ref_w[R_TOKENS * 8], ref_y[R_TOKENS * R_D], err;
    size_t per = (size_t)sc->shared_d_ff * R_D;
    char errors[2048] = "";
    uint64_t seed = 7300 + (uint64_t)_i;
    int w;
    c.activation = sc->activation;
    routing_data_init(&data, &c, seed);
    shared_w = (float*)malloc(sizeof(float) * (3 * per + 2 * (size_t)sc->shared_d_ff + R_D));
    test_fill(shared_w, 3 * per + 2 * (size_t)sc->shared_d_ff + R_D, 1.5f / sqrtf((float)R_D), &seed);
    test_fill(gate, R_D, 1.0f / sqrtf((float)R_D), &seed);
    data.model.shared.d_ff = sc->shared_d_ff;
    data.model.shared.weights.w1 = shared_w;
    data.model.shared.weights.w3 = shared_w + per;
    data.model.shared.weights.w2 = shared_w + 2 * per;
    data.model.shared.gate = sc->gate ? gate : NULL;
    if (sc->biases) {
        data.model.shared.weights.b1 = shared_w + 3 * per;
        data.model.shared.weights.b3 = shared_w + 3 * per + sc->shared_d_ff;
        data.model.shared.weights.b2 = shared_w + 3 * per + 2 * (size_t)sc->shared_d_ff;
    }
    test_poison(y1, R_TOKENS * R_D);
    ck_assert_msg(routing_run(&data, 1, y1, i1, w1, errors, sizeof errors) == MOE_EP_OK, "%s, 1 rank: %s", sc->name,
                  errors);
    check_ref_route(&data.model, data.x, R_TOKENS, ref_idx, ref_w);
    ck_assert_msg(memcmp(i1, ref_idx, sizeof(int32_t) * R_TOKENS * (size_t)c.top_k) == 0, "%s: routing differs",
                  sc->name);
    check_ref_layer(&data.model, data.x, R_TOKENS, ref_idx, ref_w, ref_y);
    err = check_rel_error(y1, ref_y, R_TOKENS * R_D);
    ck_assert_msg(err <= 1e-5, "%s: relative error %.3g against float64", sc->name, err);
    for (w = 1; w < (int)(sizeof worlds / sizeof worlds[0]); ++w) {
        test_poison(yr, R_TOKENS * R_D);
        ck_assert_msg(routing_run(&data, worlds[w], yr, ir, wr, errors, sizeof errors) == MOE_EP_OK, "%s, %d ranks: %s",
                      sc->name, worlds[w], errors);
        ck_assert_msg(memcmp(y1, yr, sizeof y1) == 0, "%s: %d ranks differ from 1 rank", sc->name, worlds[w]);
    }
    /* without the shared experts the layer differs: the test above saw them */
    data.model.shared.d_ff = 0;
    ck_assert_msg(routing_run(&data, 1, yr, ir, wr, errors, sizeof errors) == MOE_EP_OK, "%s: %s", sc->name, errors);
    ck_assert_msg(memcmp(y1, yr, sizeof y1) != 0, "%s: the shared experts changed nothing", sc->name);
    free(shared_w);
    routing_data_free(&data);
}
END_TEST

/* The stage call gives what forward adds: forward = forward without them + moe_ep_shared_experts. */
START_TEST(routing_shared_stage_call) {
    routing_case c = routing_cases[7];
    routing_data data;
    moe_ep_context *with = NULL, *without = NULL;
    float* shared_w;
    float gate[R_D], y[R_TOKENS * R_D], routed[R_TOKENS * R_D], s[R_TOKENS * R_D];
    size_t per = 56 * R_D, i;
    uint64_t seed = 7400;
    moe_ep_desc d;
    routing_data_init(&data, &c, seed);
    shared_w = (float*)malloc(sizeof(float) * 3 * per);
    test_fill(shared_w, 3 * per, 0.3f, &seed);
    test_fill(gate, R_D, 0.2f, &seed);
    memset(&d, 0, sizeof d);
    d.d_model = R_D;
    d.d_ff = R_F;
    d.num_experts = c.experts;
    d.top_k = c.top_k;
    d.normalize_topk = c.normalize;
    d.scale_expert_input = c.routing.scale_expert_input;
    d.router_weight = data.model.router;
    d.experts = data.model.experts;
    ck_assert_int_eq(moe_ep_create(&d, &without), MOE_EP_OK);
    d.shared.d_ff = 56;
    d.shared.weights.w1 = shared_w;
    d.shared.weights.w3 = shared_w + per;
    d.shared.weights.w2 = shared_w + 2 * per;
    d.shared.gate = gate;
    ck_assert_int_eq(moe_ep_create(&d, &with), MOE_EP_OK);
    memset(shared_w, 0, sizeof(float) * 3 * per);      /* copied at create: the caller's arrays are free */
    ck_assert_int_eq(moe_ep_forward(with, &(moe_ep_forward_args){ .tokens = R_TOKENS, .x = data.x, .y = y }), MOE_EP_OK);
    ck_assert_int_eq(moe_ep_forward(without, &(moe_ep_forward_args){ .tokens = R_TOKENS, .x = data.x, .y = routed }),
                     MOE_EP_OK);
    ck_assert_int_eq(moe_ep_shared_experts(with, data.x, R_TOKENS, s), MOE_EP_OK);
    for (i = 0; i < R_TOKENS * R_D; ++i) routed[i] += s[i];
    ck_assert_msg(memcmp(y, routed, sizeof y) == 0, "forward with shared experts != forward without + the stage call");
    ck_assert_int_eq(moe_ep_shared_experts(without, data.x, R_TOKENS, s), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(moe_ep_last_error_item(without), MOE_EP_LOG_ITEM_SHARED_ARGS);
    moe_ep_destroy(with);
    moe_ep_destroy(without);
    free(shared_w);
    routing_data_free(&data);
}
END_TEST

Suite* routing_suite(void) {
    Suite* s = suite_create("routing");
    TCase* tc = tcase_create("variants");
    tcase_add_loop_test(tc, routing_layer, 0, ROUTING_CASES);
    tcase_add_loop_test(tc, routing_settings_matter, 0, ROUTING_CASES);
    tcase_add_test(tc, routing_all_groups_is_no_groups);
    tcase_add_loop_test(tc, routing_stats_any_scoring, 0, ROUTING_CASES);
    tcase_add_loop_test(tc, routing_nan_refused, 0, ROUTING_CASES);
    tcase_add_loop_test(tc, routing_shared_experts, 0, (int)(sizeof shared_cases / sizeof shared_cases[0]));
    tcase_add_test(tc, routing_shared_stage_call);
    tcase_set_timeout(tc, 120);
    suite_add_tcase(s, tc);
    return s;
}
