/* check_layer.c -- the whole layer on R pthreads ranks.

   For every case the R-rank output must be bitwise equal to one rank (the built-in
   single-rank transport) over the concatenated tokens, and that one-rank output must
   match a float64 reference of the layer (router in double, the FFN in double):
   max |y - ref| / max |ref| < 1e-5. The stage API and its split-phase form must give
   the same bytes as moe_ep_forward, and OpenMP thread counts must not change a bit. */
#include "check_moe_ep.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define L_D 20
#define L_F 36

typedef struct layer_case {
    const char* name;
    int ranks;
    int64_t tokens[CHECK_MAX_RANKS];
    int experts, top_k;
    moe_ep_placement_kind placement;
    int table[16];
    moe_ep_activation activation;
    bool normalize;
    int allowed[8];                 /* routing handed in, drawn from these experts; */
    int allowed_count;              /* 0: the router decides */
} layer_case;

static const layer_case layer_cases[] = {
    { "1 rank", 1, { 13 }, 4, 2, MOE_EP_PLACEMENT_CONTIGUOUS, { 0 }, MOE_EP_ACTIVATION_SWIGLU, true, { 0 }, 0 },
    { "2 ranks, 7 + 13 tokens", 2, { 7, 13 }, 4, 2, MOE_EP_PLACEMENT_CONTIGUOUS, { 0 }, MOE_EP_ACTIVATION_SWIGLU,
      false, { 0 }, 0 },
    { "3 ranks, 10 experts, a rank with 0 tokens", 3, { 13, 0, 29 }, 10, 2, MOE_EP_PLACEMENT_CONTIGUOUS, { 0 },
      MOE_EP_ACTIVATION_SWIGLU, false, { 0 }, 0 },
    { "4 ranks, 10 experts round-robin, top-3, GELU", 4, { 7, 13, 29, 0 }, 10, 3, MOE_EP_PLACEMENT_ROUND_ROBIN, { 0 },
      MOE_EP_ACTIVATION_GELU, false, { 0 }, 0 },
    { "8 ranks, 16 experts", 8, { 7, 0, 13, 29, 1, 3, 5, 11 }, 16, 2, MOE_EP_PLACEMENT_CONTIGUOUS, { 0 },
      MOE_EP_ACTIVATION_SWIGLU, true, { 0 }, 0 },
    { "4 ranks, k = E = 4, ReLU", 4, { 7, 13, 0, 29 }, 4, 4, MOE_EP_PLACEMENT_CONTIGUOUS, { 0 },
      MOE_EP_ACTIVATION_RELU, false, { 0 }, 0 },
    { "3 ranks, experts 1, 4, 5 never used", 3, { 13, 7, 29 }, 6, 2, MOE_EP_PLACEMENT_CONTIGUOUS, { 0 },
      MOE_EP_ACTIVATION_SWIGLU, false, { 0, 2, 3 }, 3 },
    { "8 ranks, 6 experts (E < R)", 8, { 3, 7, 0, 13, 2, 5, 1, 4 }, 6, 2, MOE_EP_PLACEMENT_CONTIGUOUS, { 0 },
      MOE_EP_ACTIVATION_SWIGLU, false, { 0 }, 0 },
    { "3 ranks, table placement, GELU", 3, { 13, 29, 7 }, 7, 2, MOE_EP_PLACEMENT_TABLE, { 2, 2, 0, 1, 2, 0, 1 },
      MOE_EP_ACTIVATION_GELU, false, { 0 }, 0 },
    { "2 ranks, 5 experts round-robin, top-1, ReLU", 2, { 29, 13 }, 5, 1, MOE_EP_PLACEMENT_ROUND_ROBIN, { 0 },
      MOE_EP_ACTIVATION_RELU, true, { 0 }, 0 },
    { "4 ranks, every token to expert 5", 4, { 7, 13, 29, 3 }, 8, 1, MOE_EP_PLACEMENT_CONTIGUOUS, { 0 },
      MOE_EP_ACTIVATION_SWIGLU, false, { 5 }, 1 },
};
#define LAYER_CASES ((int)(sizeof layer_cases / sizeof layer_cases[0]))

/* The data of one case: weights, tokens and (optionally) routing. */
typedef struct layer_data {
    check_model model;
    int64_t total;
    float* x;
    int32_t* idx;                   /* handed-in routing or NULL */
    float* weight;
} layer_data;

static void layer_data_init(layer_data* data, const layer_case* c, uint64_t seed) {
    int k = c->top_k;
    int64_t t;
    check_model_init(&data->model, L_D, L_F, c->experts, k, c->activation, c->normalize, seed);
    data->total = check_total_tokens(c->tokens, c->ranks);
    data->x = (float*)malloc(sizeof(float) * (size_t)(data->total * L_D + 1));
    test_fill(data->x, (size_t)(data->total * L_D), 1.0f, &seed);
    data->idx = NULL;
    data->weight = NULL;
    if (c->allowed_count > 0) {
        data->idx = (int32_t*)malloc(sizeof(int32_t) * (size_t)(data->total * k + 1));
        data->weight = (float*)malloc(sizeof(float) * (size_t)(data->total * k + 1));
        for (t = 0; t < data->total; ++t) {
            int j = 0;
            while (j < k) {   /* k distinct experts out of the allowed ones */
                int e = c->allowed[test_rng_next(&seed) % (uint64_t)c->allowed_count], i;
                bool taken = false;
                for (i = 0; i < j; ++i) taken = taken || data->idx[t * k + i] == e;
                if (taken) continue;
                data->idx[t * k + j] = e;
                data->weight[t * k + j] = 0.1f + 0.9f * (float)(test_rng_next(&seed) >> 40) / 16777216.0f;
                ++j;
            }
        }
    }
}

static void layer_data_free(layer_data* data) {
    check_model_free(&data->model);
    free(data->x);
    free(data->idx);
    free(data->weight);
}

static void layer_setup(check_layer* L, const layer_data* data, const layer_case* c, int ranks, float* y) {
    check_layer_init(L, &data->model, ranks, c->tokens, data->x, y);
    L->topk_idx = data->idx;
    L->topk_weight = data->weight;
    if (ranks > 0) {
        L->placement.kind = c->placement;
        L->placement.table = c->placement == MOE_EP_PLACEMENT_TABLE ? c->table : NULL;
    }
    test_poison(y, (size_t)(data->total * L_D + 1));
}

START_TEST(layer_worlds) {
    const layer_case* c = &layer_cases[_i];
    layer_data data;
    check_layer single, multi;
    int64_t total, t;
    int k = c->top_k, j;
    float *y1, *yr, *w1, *wr;
    int32_t *i1, *ir, *ref_idx;
    double *ref_w, *ref_y, err;
    char errors[2048];
    layer_data_init(&data, c, 1000 + (uint64_t)_i);
    total = data.total;
    y1 = (float*)malloc(sizeof(float) * (size_t)(total * L_D + 1));
    yr = (float*)malloc(sizeof(float) * (size_t)(total * L_D + 1));
    i1 = (int32_t*)malloc(sizeof(int32_t) * (size_t)(total * k + 1));
    ir = (int32_t*)malloc(sizeof(int32_t) * (size_t)(total * k + 1));
    w1 = (float*)malloc(sizeof(float) * (size_t)(total * k + 1));
    wr = (float*)malloc(sizeof(float) * (size_t)(total * k + 1));
    ref_idx = (int32_t*)malloc(sizeof(int32_t) * (size_t)(total * k + 1));
    ref_w = (double*)malloc(sizeof(double) * (size_t)(total * k + 1));
    ref_y = (double*)malloc(sizeof(double) * (size_t)(total * L_D + 1));

    /* one rank over all tokens */
    layer_setup(&single, &data, c, 0, y1);
    single.tokens = &total;
    single.idx_out = i1;
    single.weight_out = w1;
    check_run_layer(&single);
    ck_assert_msg(single.result == MOE_EP_OK, "%s, one rank: %s", c->name, check_layer_errors(&single, errors, sizeof errors));
    /* R ranks */
    layer_setup(&multi, &data, c, c->ranks, yr);
    multi.idx_out = ir;
    multi.weight_out = wr;
    check_run_layer(&multi);
    ck_assert_msg(multi.result == MOE_EP_OK, "%s: %s", c->name, check_layer_errors(&multi, errors, sizeof errors));
    ck_assert_msg(memcmp(y1, yr, sizeof(float) * (size_t)(total * L_D)) == 0, "%s: %d ranks differ from 1 rank", c->name,
                  c->ranks);
    if (!data.idx) {
        ck_assert_msg(memcmp(i1, ir, sizeof(int32_t) * (size_t)(total * k)) == 0 &&
                          memcmp(w1, wr, sizeof(float) * (size_t)(total * k)) == 0,
                      "%s: routing differs between %d ranks and 1", c->name, c->ranks);
    }

    /* the one-rank output against float64 */
    if (data.idx) {
        memcpy(ref_idx, data.idx, sizeof(int32_t) * (size_t)(total * k));
        for (t = 0; t < total * k; ++t) ref_w[t] = (double)data.weight[t];
    } else {
        check_ref_route(&data.model, data.x, total, ref_idx, ref_w);
        for (t = 0; t < total; ++t)
            for (j = 0; j < k; ++j) {
                ck_assert_msg(i1[t * k + j] == ref_idx[t * k + j], "%s: token %lld slot %d routed to %d, reference %d",
                              c->name, (long long)t, j, (int)i1[t * k + j], (int)ref_idx[t * k + j]);
                ck_assert_msg(fabs((double)w1[t * k + j] - ref_w[t * k + j]) <= 1e-6,
                              "%s: token %lld slot %d weight %.9g, reference %.9g", c->name, (long long)t, j,
                              (double)w1[t * k + j], ref_w[t * k + j]);
            }
    }
    if (total > 0) {
        check_ref_layer(&data.model, data.x, total, ref_idx, ref_w, ref_y);
        err = check_rel_error(y1, ref_y, (size_t)(total * L_D));
        ck_assert_msg(err < 1e-5, "%s: one rank vs float64 reference: relative error %.3g", c->name, err);
    }
    ck_assert_msg(test_is_poisoned(yr + total * L_D, 1), "%s: wrote past the last token", c->name);

    layer_data_free(&data);
    free(y1); free(yr); free(i1); free(ir); free(w1); free(wr); free(ref_idx); free(ref_w); free(ref_y);
}
END_TEST

/* forward, the stages and the split-phase stages: the same bytes on R ranks. */
START_TEST(layer_paths) {
    const layer_case* c = &layer_cases[_i];
    layer_data data;
    check_layer run;
    float* y[3];
    const char* const names[3] = { "moe_ep_forward", "the stages", "the split-phase stages" };
    int p;
    size_t n;
    char errors[2048];
    layer_data_init(&data, c, 2000 + (uint64_t)_i);
    n = (size_t)(data.total * L_D);
    for (p = 0; p < 3; ++p) {
        y[p] = (float*)malloc(sizeof(float) * (n + 1));
        layer_setup(&run, &data, c, c->ranks, y[p]);
        run.path = (check_path)p;
        check_run_layer(&run);
        ck_assert_msg(run.result == MOE_EP_OK, "%s, %s: %s", c->name, names[p], check_layer_errors(&run, errors, sizeof errors));
        ck_assert_msg(n == 0 || !test_is_poisoned(y[p], 1), "%s, %s: y not written", c->name, names[p]);
    }
    ck_assert_msg(memcmp(y[0], y[1], sizeof(float) * n) == 0, "%s: the stages differ from moe_ep_forward", c->name);
    ck_assert_msg(memcmp(y[0], y[2], sizeof(float) * n) == 0, "%s: split-phase differs from moe_ep_forward", c->name);
    layer_data_free(&data);
    for (p = 0; p < 3; ++p) free(y[p]);
}
END_TEST

/* The pthreads transport gathers the dispatched rows by index and hands the combine's rows
   over where they lie (row_lists): moe_ep_forward, moe_ep_dispatch and moe_ep_combine use
   it (one dispatch and one combine per rank), the split-phase stages pack (x may change
   before the dispatch ends; y is not known at combine_begin). The same layer with
   row_lists declined (the core packs, as for MPI and NCCL) must give the same bytes on
   every path. */
START_TEST(layer_row_lists) {
    const layer_case* c = &layer_cases[_i];
    layer_data data;
    check_layer run;
    float *y, *packed;
    const char* const names[3] = { "moe_ep_forward", "the stages", "the split-phase stages" };
    int p, declined, r;
    size_t n;
    char errors[2048];
    layer_data_init(&data, c, 2500 + (uint64_t)_i);
    n = (size_t)(data.total * L_D);
    y = (float*)malloc(sizeof(float) * (n + 1));
    packed = (float*)malloc(sizeof(float) * (n + 1));
    for (p = 0; p < 3; ++p) {
        for (declined = 0; declined < 2; ++declined) {
            layer_setup(&run, &data, c, c->ranks, declined ? packed : y);
            run.path = (check_path)p;
            run.decline_row_lists = declined;
            check_run_layer(&run);
            ck_assert_msg(run.result == MOE_EP_OK, "%s, %s, row lists %s: %s", c->name, names[p],
                          declined ? "declined" : "used", check_layer_errors(&run, errors, sizeof errors));
            for (r = 0; r < c->ranks; ++r)
                ck_assert_msg(run.row_list_exchanges[r] == (!declined && c->ranks > 1 && p != CHECK_PATH_SPLIT) * 2,
                              "%s, %s, row lists %s: rank %d handed %lld row lists to the transport", c->name,
                              names[p], declined ? "declined" : "used", r, (long long)run.row_list_exchanges[r]);
        }
        ck_assert_msg(memcmp(y, packed, sizeof(float) * n) == 0, "%s, %s: row lists and packed rows differ", c->name,
                      names[p]);
    }
    layer_data_free(&data);
    free(y);
    free(packed);
}
END_TEST

/* num_threads 1 and 2: the same bytes, on one rank and on two. */
START_TEST(layer_threads) {
    static const layer_case cases[2] = {
        { "1 rank, 67 tokens", 0, { 67 }, 6, 2, MOE_EP_PLACEMENT_CONTIGUOUS, { 0 }, MOE_EP_ACTIVATION_SWIGLU, true,
          { 0 }, 0 },
        { "2 ranks, 67 + 45 tokens, GELU", 2, { 67, 45 }, 6, 2, MOE_EP_PLACEMENT_CONTIGUOUS, { 0 },
          MOE_EP_ACTIVATION_GELU, false, { 0 }, 0 },
    };
    const layer_case* c = &cases[_i];
    layer_data data;
    check_layer run;
    float *y1, *y2;
    size_t n;
    char errors[2048];
    layer_data_init(&data, c, 3000 + (uint64_t)_i);
    n = (size_t)(data.total * L_D);
    y1 = (float*)malloc(sizeof(float) * (n + 1));
    y2 = (float*)malloc(sizeof(float) * (n + 1));
    layer_setup(&run, &data, c, c->ranks, y1);
    run.num_threads = 1;
    check_run_layer(&run);
    ck_assert_msg(run.result == MOE_EP_OK, "%s, 1 thread: %s", c->name, check_layer_errors(&run, errors, sizeof errors));
    layer_setup(&run, &data, c, c->ranks, y2);
    run.num_threads = 2;
    check_run_layer(&run);
    ck_assert_msg(run.result == MOE_EP_OK, "%s, 2 threads: %s", c->name, check_layer_errors(&run, errors, sizeof errors));
    ck_assert_msg(memcmp(y1, y2, sizeof(float) * n) == 0, "%s: 1 and 2 threads differ", c->name);
    layer_data_free(&data);
    free(y1);
    free(y2);
}
END_TEST

/* One context, calls of different sizes: the workspaces it keeps change nothing. */
START_TEST(layer_repeated_calls) {
    check_model m;
    moe_ep_context* ctx = NULL;
    float x[29 * L_D], y_big[29 * L_D], y_small[7 * L_D], y_again[29 * L_D];
    uint64_t seed = 77;
    check_model_init(&m, L_D, L_F, 5, 2, MOE_EP_ACTIVATION_SWIGLU, false, 78);
    test_fill(x, 29 * L_D, 1.0f, &seed);
    ck_assert_int_eq(moe_ep_create(&(moe_ep_desc){ .d_model = L_D, .d_ff = L_F, .num_experts = 5, .top_k = 2,
                                                   .router_weight = m.router, .experts = m.experts }, &ctx), MOE_EP_OK);
    ck_assert_int_eq(moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = 7, .x = x, .y = y_small }), MOE_EP_OK);
    ck_assert_int_eq(moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = 29, .x = x, .y = y_big }), MOE_EP_OK);
    ck_assert_int_eq(moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = 0, .x = NULL, .y = NULL }), MOE_EP_OK);
    ck_assert_int_eq(moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = 29, .x = x, .y = y_again }), MOE_EP_OK);
    ck_assert_msg(memcmp(y_small, y_big, sizeof y_small) == 0, "7 tokens alone differ from the first 7 of 29");
    ck_assert_msg(memcmp(y_big, y_again, sizeof y_big) == 0, "a repeated call differs");
    moe_ep_destroy(ctx);
    check_model_free(&m);
}
END_TEST

Suite* layer_suite(void) {
    Suite* s = suite_create("layer");
    TCase* tc = tcase_create("worlds");
    TCase* tc_paths = tcase_create("paths");
    TCase* tc_threads = tcase_create("threads");
    tcase_add_loop_test(tc, layer_worlds, 0, LAYER_CASES);
    tcase_add_test(tc, layer_repeated_calls);
    tcase_add_loop_test(tc_paths, layer_paths, 0, LAYER_CASES);
    tcase_add_loop_test(tc_paths, layer_row_lists, 0, LAYER_CASES);
    tcase_add_loop_test(tc_threads, layer_threads, 0, 2);
    suite_add_tcase(s, tc);
    suite_add_tcase(s, tc_paths);
    suite_add_tcase(s, tc_threads);
    return s;
}
