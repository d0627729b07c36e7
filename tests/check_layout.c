/* Layout arithmetic (EP x TP x DP) and layered layers (groups split from a pthreads
   world) against one rank, in fp32, bf16 and int8 (whose per-channel scales come from the
   whole row, so a TP slice quantises as one rank does), and in bf16 with the BF16_DOT
   arithmetic (under TP each rank pairs its own slice of d_ff, odd slices included). */
#include "check_moe_ep.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct shape { int world, ep, tp, dp, experts; } shape;

static const shape valid_shapes[] = {
    { 1, 1, 1, 1, 1 }, { 8, 8, 1, 1, 64 }, { 64, 64, 1, 1, 512 }, { 64, 8, 1, 8, 512 }, { 64, 8, 4, 2, 512 },
    { 12, 3, 2, 2, 9 }, { 6, 2, 3, 1, 4 }, { 30, 5, 3, 2, 15 }, { 4, 2, 2, 1, 6 }, { 4, 1, 2, 2, 3 },
};

/* Coordinates, rank_of and the groups, checked against the rule written in the header
   (rank = (dp * ep_size + ep) * tp_size + tp) by brute force over every rank. */
START_TEST(test_layout_coords_and_groups) {
    const shape* sh = &valid_shapes[_i];
    moe_ep_layout_desc d = { .world_size = sh->world, .ep_size = sh->ep, .tp_size = sh->tp, .dp_size = sh->dp,
                             .num_experts = sh->experts };
    int rank, *seen = calloc((size_t)sh->world, sizeof(int)), group[128];
    for (rank = 0; rank < sh->world; ++rank) {
        moe_ep_coords c;
        int n, i, q;
        ck_assert_int_eq(moe_ep_layout_coords(&d, rank, &c), MOE_EP_OK);
        ck_assert_int_eq((c.dp * sh->ep + c.ep) * sh->tp + c.tp, rank);
        ck_assert_int_eq(moe_ep_layout_rank_of(&d, c), rank);
        seen[rank]++;
        /* EP group: same dp and tp, ep = 0..ep-1 in order */
        n = moe_ep_layout_group(&d, rank, MOE_EP_GROUP_EP, group, 128);
        ck_assert_int_eq(n, sh->ep);
        for (i = 0; i < n; ++i) {
            moe_ep_coords m;
            moe_ep_layout_coords(&d, group[i], &m);
            ck_assert(m.dp == c.dp && m.tp == c.tp && m.ep == i);
        }
        n = moe_ep_layout_group(&d, rank, MOE_EP_GROUP_TP, group, 128);
        ck_assert_int_eq(n, sh->tp);
        for (i = 0; i < n; ++i) {
            moe_ep_coords m;
            moe_ep_layout_coords(&d, group[i], &m);
            ck_assert(m.dp == c.dp && m.ep == c.ep && m.tp == i);
        }
        n = moe_ep_layout_group(&d, rank, MOE_EP_GROUP_DP, group, 128);
        ck_assert_int_eq(n, sh->dp);
        for (i = 0; i < n; ++i) {
            moe_ep_coords m;
            moe_ep_layout_coords(&d, group[i], &m);
            ck_assert(m.ep == c.ep && m.tp == c.tp && m.dp == i);
        }
        /* experts: the contiguous block of EP index ep, the same for every dp and tp */
        n = moe_ep_layout_experts(&d, rank, group, 128);
        ck_assert_int_eq(n, sh->experts / sh->ep);
        for (i = 0; i < n; ++i) ck_assert_int_eq(group[i], c.ep * n + i);
        for (q = 0; q < sh->world; ++q) {
            moe_ep_coords m;
            moe_ep_layout_coords(&d, q, &m);
            if (m.ep == c.ep) ck_assert_int_eq(moe_ep_layout_experts(&d, q, NULL, 0), n);
        }
    }
    for (rank = 0; rank < sh->world; ++rank) ck_assert_int_eq(seen[rank], 1);
    free(seen);
}
END_TEST

START_TEST(test_layout_defaults) {
    moe_ep_layout_desc r;
    ck_assert_int_eq(moe_ep_layout_resolve(&(moe_ep_layout_desc){ .world_size = 64, .tp_size = 4, .dp_size = 2,
                                                                   .num_experts = 512 }, &r, NULL, 0), MOE_EP_OK);
    ck_assert_int_eq(r.ep_size, 8);
    ck_assert_int_eq(moe_ep_layout_resolve(&(moe_ep_layout_desc){ .world_size = 8, .num_experts = 64 }, &r, NULL, 0),
                     MOE_EP_OK);
    ck_assert(r.ep_size == 8 && r.tp_size == 1 && r.dp_size == 1 && r.placement.kind == MOE_EP_PLACEMENT_CONTIGUOUS);
}
END_TEST

typedef struct bad_layout { moe_ep_layout_desc desc; const char* words; } bad_layout;
static const bad_layout bad_layouts[] = {
    { { .world_size = 64, .ep_size = 8, .tp_size = 4, .dp_size = 4, .num_experts = 512 }, "must equal world_size" },
    { { .world_size = 10, .ep_size = 3, .num_experts = 9 }, "must equal world_size" },
    { { .world_size = 8, .ep_size = 8, .num_experts = 60 }, "multiple of ep_size" },
    { { .world_size = 8, .ep_size = 8, .num_experts = 0 }, "num_experts" },
    { { .world_size = 0, .num_experts = 8 }, "world_size" },
    { { .world_size = 8, .tp_size = -1, .num_experts = 8 }, "tp_size" },
    { { .world_size = 8, .ep_size = -2, .num_experts = 8 }, "ep_size" },
    { { .world_size = 6, .tp_size = 4, .num_experts = 8 }, "must equal world_size" },
};

START_TEST(test_layout_invalid) {
    const bad_layout* b = &bad_layouts[_i];
    moe_ep_layout_desc out;
    moe_ep_coords c = { 7, 7, 7 };
    char err[256] = "";
    memset(&out, 0x5A, sizeof out);
    ck_assert_int_eq(moe_ep_layout_resolve(&b->desc, &out, err, sizeof err), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_msg(strstr(err, b->words) != NULL, "message '%s' lacks '%s'", err, b->words);
    ck_assert_int_eq(((unsigned char*)&out)[0], 0x5A);   /* out untouched */
    ck_assert_int_eq(moe_ep_layout_coords(&b->desc, 0, &c), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert(c.dp == 7 && c.ep == 7 && c.tp == 7);
    ck_assert_int_eq(moe_ep_layout_group(&b->desc, 0, MOE_EP_GROUP_EP, NULL, 0), -1);
    ck_assert_int_eq(moe_ep_layout_experts(&b->desc, 0, NULL, 0), -1);
}
END_TEST

START_TEST(test_layout_out_of_range) {
    moe_ep_layout_desc d = { .world_size = 8, .ep_size = 4, .dp_size = 2, .num_experts = 8 };
    moe_ep_coords c;
    ck_assert_int_eq(moe_ep_layout_coords(&d, 8, &c), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(moe_ep_layout_coords(&d, -1, &c), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(moe_ep_layout_rank_of(&d, (moe_ep_coords){ 2, 0, 0 }), -1);
    ck_assert_int_eq(moe_ep_layout_rank_of(&d, (moe_ep_coords){ 0, 4, 0 }), -1);
    ck_assert_int_eq(moe_ep_layout_rank_of(&d, (moe_ep_coords){ 0, 0, 1 }), -1);
    ck_assert_int_eq(moe_ep_layout_group(&d, 0, MOE_EP_GROUP_COUNT, NULL, 0), -1);
}
END_TEST

/* >>layered layer: every rank runs the layer in its groups; outputs are compared with one rank. */
enum { D_MODEL = 20, D_FF = 36, TOP_K = 2 };

typedef struct layered {
    moe_ep_layout_desc layout;
    int tokens;
    const float *x, *router;
    const moe_ep_expert_weights* experts;
    moe_ep_weight_format format;    /* int8 under TP: each output channel's scale from its whole row */
    moe_ep_arithmetic arithmetic;   /* BF16_DOT under TP: each rank's pairs from its slice's first row */
    float* y;                       /* [world, tokens, D_MODEL] */
    int group_sizes[128][3];        /* what each rank's split transports report */
} layered;

static int shard_of(const moe_ep_layout_desc* l, int rank) {
    moe_ep_coords c;
    moe_ep_layout_coords(l, rank, &c);
    return c.dp * l->ep_size + c.ep;
}

static moe_ep_result layered_rank(const moe_ep_transport* world, void* user_data) {
    layered* t = (layered*)user_data;
    const moe_ep_layout_desc* l = &t->layout;
    moe_ep_transport ep, tp, dp;
    moe_ep_context* ctx = NULL;
    moe_ep_expert_weights mine[64];
    int experts[64], n, i;
    moe_ep_result res;
    res = moe_ep_layout_split(l, world, MOE_EP_GROUP_EP, &ep, NULL, 0);
    if (res != MOE_EP_OK) return res;
    res = moe_ep_layout_split(l, world, MOE_EP_GROUP_TP, &tp, NULL, 0);
    if (res != MOE_EP_OK) return res;
    res = moe_ep_layout_split(l, world, MOE_EP_GROUP_DP, &dp, NULL, 0);
    if (res != MOE_EP_OK) return res;
    t->group_sizes[world->rank][0] = ep.world_size * 1000 + ep.rank;
    t->group_sizes[world->rank][1] = tp.world_size * 1000 + tp.rank;
    t->group_sizes[world->rank][2] = dp.world_size * 1000 + dp.rank;
    n = moe_ep_layout_experts(l, world->rank, experts, 64);
    for (i = 0; i < n; ++i) mine[i] = t->experts[experts[i]];
    res = moe_ep_create(&(moe_ep_desc){ .d_model = D_MODEL, .d_ff = D_FF, .num_experts = l->num_experts, .top_k = TOP_K,
                                        .num_threads = 1, .router_weight = t->router, .experts = mine,
                                        .experts_count = n, .weight_format = t->format,
                                        .arithmetic = t->arithmetic, .transport = &ep,
                                        .tp_transport = l->tp_size > 1 ? &tp : NULL }, &ctx);
    if (res == MOE_EP_OK)
        res = moe_ep_forward(ctx, &(moe_ep_forward_args){
            .tokens = t->tokens, .x = t->x + (size_t)shard_of(l, world->rank) * (size_t)t->tokens * D_MODEL,
            .y = t->y + (size_t)world->rank * (size_t)t->tokens * D_MODEL });
    moe_ep_destroy(ctx);
    moe_ep_pthreads_transport_destroy(&dp);
    moe_ep_pthreads_transport_destroy(&tp);
    moe_ep_pthreads_transport_destroy(&ep);
    return res;
}

static const shape layer_shapes[] = {
    { 4, 2, 1, 2, 6 }, { 4, 2, 2, 1, 6 }, { 4, 1, 2, 2, 3 }, { 12, 3, 2, 2, 9 }, { 64, 8, 1, 8, 64 },
    { 64, 8, 4, 2, 64 }, { 64, 64, 1, 1, 64 }, { 8, 2, 4, 1, 4 },
};

#define LAYER_SHAPES ((int)(sizeof layer_shapes / sizeof layer_shapes[0]))
static const moe_ep_weight_format layer_formats[] = { MOE_EP_WEIGHT_FORMAT_FP32, MOE_EP_WEIGHT_FORMAT_BF16,
                                                      MOE_EP_WEIGHT_FORMAT_INT8, MOE_EP_WEIGHT_FORMAT_BF16 };
static const moe_ep_arithmetic layer_arithmetic[] = { MOE_EP_ARITHMETIC_EXACT, MOE_EP_ARITHMETIC_EXACT,
                                                      MOE_EP_ARITHMETIC_EXACT, MOE_EP_ARITHMETIC_BF16_DOT };

START_TEST(test_layered_layer_matches_one_rank) {
    const shape* sh = &layer_shapes[_i % LAYER_SHAPES];
    moe_ep_weight_format format = layer_formats[_i / LAYER_SHAPES];
    moe_ep_arithmetic arithmetic = layer_arithmetic[_i / LAYER_SHAPES];
    layered t;
    moe_ep_pthreads_world* world;
    moe_ep_context* single;
    moe_ep_expert_weights all[64] = { { 0 } };
    size_t per = 3 * (size_t)D_MODEL * D_FF, n;
    int shards = sh->dp * sh->ep, r, e, tokens = 7;
    uint64_t seed = 1234u + (unsigned)_i;
    float *x, *router, *weights, *y_ref;
    double max_diff = 0.0, max_ref = 0.0;
    memset(&t, 0, sizeof t);
    ck_assert_int_eq(moe_ep_layout_resolve(&(moe_ep_layout_desc){ .world_size = sh->world, .ep_size = sh->ep,
                                                                   .tp_size = sh->tp, .dp_size = sh->dp,
                                                                   .num_experts = sh->experts }, &t.layout, NULL, 0),
                     MOE_EP_OK);
    n = (size_t)tokens * D_MODEL;
    x = malloc(sizeof *x * n * (size_t)shards);
    y_ref = malloc(sizeof *y_ref * n * (size_t)shards);
    router = malloc(sizeof *router * (size_t)sh->experts * D_MODEL);
    weights = malloc(sizeof *weights * per * (size_t)sh->experts);
    t.y = malloc(sizeof *t.y * n * (size_t)sh->world);
    test_fill(x, n * (size_t)shards, 1.0f, &seed);
    test_fill(router, (size_t)sh->experts * D_MODEL, 0.5f, &seed);
    test_fill(weights, per * (size_t)sh->experts, 0.2f, &seed);
    for (e = 0; e < sh->experts; ++e) {
        all[e].w1 = weights + (size_t)e * per;
        all[e].w3 = all[e].w1 + (size_t)D_MODEL * D_FF;
        all[e].w2 = all[e].w3 + (size_t)D_MODEL * D_FF;
    }
    test_poison(t.y, n * (size_t)sh->world);
    test_poison(y_ref, n * (size_t)shards);
    t.tokens = tokens; t.x = x; t.router = router; t.experts = all; t.format = format; t.arithmetic = arithmetic;
    ck_assert_int_eq(moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = sh->world, .timeout_ms = 30000 },
                                                  &world), MOE_EP_OK);
    ck_assert_int_eq(moe_ep_pthreads_run(world, layered_rank, &t, NULL), MOE_EP_OK);
    moe_ep_pthreads_world_destroy(world);
    ck_assert_int_eq(moe_ep_create(&(moe_ep_desc){ .d_model = D_MODEL, .d_ff = D_FF, .num_experts = sh->experts,
                                                   .top_k = TOP_K, .num_threads = 1, .router_weight = router,
                                                   .experts = all, .weight_format = format,
                                                   .arithmetic = arithmetic }, &single), MOE_EP_OK);
    ck_assert_int_eq(moe_ep_forward(single, &(moe_ep_forward_args){ .tokens = (int64_t)shards * tokens, .x = x,
                                                                     .y = y_ref }), MOE_EP_OK);
    moe_ep_destroy(single);
    for (r = 0; r < sh->world; ++r) {
        const float* got = t.y + (size_t)r * n;
        const float* want = y_ref + (size_t)shard_of(&t.layout, r) * n;
        moe_ep_coords c;
        size_t k;
        moe_ep_layout_coords(&t.layout, r, &c);
        ck_assert_int_eq(t.group_sizes[r][0], sh->ep * 1000 + c.ep);
        ck_assert_int_eq(t.group_sizes[r][1], sh->tp * 1000 + c.tp);
        ck_assert_int_eq(t.group_sizes[r][2], sh->dp * 1000 + c.dp);
        if (sh->tp == 1) {
            ck_assert_msg(memcmp(got, want, sizeof *got * n) == 0, "rank %d differs from one rank", r);
        } else {
            /* the TP group's ranks agree to the bit; against one rank within 1e-6 (slices summed) */
            if (c.tp > 0) ck_assert(memcmp(got, t.y + (size_t)(r - c.tp) * n, sizeof *got * n) == 0);
            for (k = 0; k < n; ++k) {
                double diff = fabs((double)got[k] - (double)want[k]);
                ck_assert_msg(diff == diff, "rank %d element %zu is NaN (unwritten)", r, k);
                if (diff > max_diff) max_diff = diff;
                if (fabs((double)want[k]) > max_ref) max_ref = fabs((double)want[k]);
            }
        }
    }
    if (sh->tp > 1) ck_assert_msg(max_diff <= 1e-6 * max_ref, "TP error %g vs max %g", max_diff, max_ref);
    free(x); free(y_ref); free(router); free(weights); free(t.y);
}
END_TEST

/* The pthreads all-reduce adds in rank order: the same bytes as a sequential sum. */
typedef struct reduce_case { float* data; int count; } reduce_case;
static moe_ep_result reduce_rank(const moe_ep_transport* t, void* user_data) {
    reduce_case* c = (reduce_case*)user_data;
    return t->all_reduce_sum(t->impl, c->data + (size_t)t->rank * (size_t)c->count, c->count, MOE_EP_MEMORY_HOST, NULL,
                             NULL, 0);
}

START_TEST(test_all_reduce_rank_order) {
    int R = 5, count = 37, r, i;
    uint64_t seed = 99;
    float* data = malloc(sizeof *data * (size_t)(R * count));
    float* expect = malloc(sizeof *expect * (size_t)count);
    moe_ep_pthreads_world* w;
    reduce_case c = { data, count };
    test_fill(data, (size_t)(R * count), 1e3f, &seed);
    for (i = 0; i < count; ++i) {
        float s = data[i];
        for (r = 1; r < R; ++r) s += data[r * count + i];
        expect[i] = s;
    }
    moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = R, .timeout_ms = 10000 }, &w);
    ck_assert_int_eq(moe_ep_pthreads_run(w, reduce_rank, &c, NULL), MOE_EP_OK);
    moe_ep_pthreads_world_destroy(w);
    for (r = 0; r < R; ++r) ck_assert(memcmp(data + r * count, expect, sizeof *expect * (size_t)count) == 0);
    free(data); free(expect);
}
END_TEST

/* A rank of one group returning early does not abort another group's collective. */
typedef struct early_case { moe_ep_result results[4]; } early_case;
static moe_ep_result early_rank(const moe_ep_transport* world, void* user_data) {
    early_case* e = (early_case*)user_data;
    moe_ep_transport g;
    moe_ep_result res = world->split(world->impl, world->rank / 2, world->rank, &g, NULL, 0);
    if (res != MOE_EP_OK) return res;
    if (world->rank < 2) {
        res = g.barrier(g.impl, NULL, 0);  /* group {0,1}: done, ranks return */
    } else {
        int i;
        for (i = 0; i < 50 && res == MOE_EP_OK; ++i) res = g.barrier(g.impl, NULL, 0);   /* group {2,3} keeps going */
    }
    e->results[world->rank] = res;
    moe_ep_pthreads_transport_destroy(&g);
    return res;
}

START_TEST(test_groups_independent_exit) {
    early_case e;
    moe_ep_pthreads_world* w;
    int r;
    moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = 4, .timeout_ms = 10000 }, &w);
    ck_assert_int_eq(moe_ep_pthreads_run(w, early_rank, &e, NULL), MOE_EP_OK);
    moe_ep_pthreads_world_destroy(w);
    for (r = 0; r < 4; ++r) ck_assert_int_eq(e.results[r], MOE_EP_OK);
}
END_TEST

/* A transport whose split fails with its own words: the caller must get them. */
static moe_ep_result refusing_split(void* impl, int color, int key, moe_ep_transport* out, char* err_text,
                                    size_t err_size) {
    (void)impl; (void)color; (void)key; (void)out;
    snprintf(err_text, err_size, "no communicator left for color %d", color);
    return MOE_EP_ERROR_TRANSPORT;
}

START_TEST(test_split_keeps_transport_text) {
    check_echo echo;
    moe_ep_transport world = check_echo_transport(&echo, 1, 4), group;
    moe_ep_layout_desc l = { .world_size = 4, .ep_size = 2, .tp_size = 2, .num_experts = 8 };
    char err[256] = "";
    world.split = refusing_split;
    ck_assert_int_eq(moe_ep_layout_split(&l, &world, MOE_EP_GROUP_EP, &group, err, sizeof err), MOE_EP_ERROR_TRANSPORT);
    ck_assert_msg(strstr(err, "no communicator left for color 1") != NULL, "split error lost the transport's text: %s", err);
    l.world_size = 8;
    l.dp_size = 2;
    ck_assert_int_eq(moe_ep_layout_split(&l, &world, MOE_EP_GROUP_EP, &group, err, sizeof err),
                     MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_msg(strstr(err, "world_size (8)") != NULL, "split error does not name the size: %s", err);
}
END_TEST

Suite* layout_suite(void) {
    Suite* s = suite_create("layout");
    TCase* core = tcase_create("core");
    TCase* errors = tcase_create("errors");
    TCase* layer = tcase_create("layer");
    tcase_add_loop_test(core, test_layout_coords_and_groups, 0, (int)(sizeof valid_shapes / sizeof valid_shapes[0]));
    tcase_add_test(core, test_layout_defaults);
    tcase_add_loop_test(errors, test_layout_invalid, 0, (int)(sizeof bad_layouts / sizeof bad_layouts[0]));
    tcase_add_test(errors, test_layout_out_of_range);
    tcase_add_test(errors, test_split_keeps_transport_text);
    tcase_add_loop_test(layer, test_layered_layer_matches_one_rank, 0, LAYER_SHAPES * 4);
    tcase_add_test(layer, test_all_reduce_rank_order);
    tcase_add_test(layer, test_groups_independent_exit);
    tcase_set_timeout(layer, 60);
    suite_add_tcase(s, core);
    suite_add_tcase(s, errors);
    suite_add_tcase(s, layer);
    return s;
}
