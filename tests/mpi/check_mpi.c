/* check_mpi -- the MPI transport under a real MPI job.

   Run with the expected world size as the first argument, e.g.
       mpirun -n 3 ./check_mpi 3
   The binary refuses to run under another size (a launcher of another MPI starts N
   singletons). Every test is collective: each rank computes its verdict, the ranks
   agree (MPI_Allreduce) and only then assert, so that a failure on one rank never
   leaves the others waiting. Rank 0 prints Check's report; the others print only
   their failures. Inputs are fresh random numbers every run: the seed is printed,
   and MOE_EP_TEST_SEED=N repeats a run. */
#define _POSIX_C_SOURCE 200112L
#define MOE_EP_IMPLEMENTATION
#include "../../transports/moe_ep_mpi.h"
#include "../../transports/moe_ep_pthreads.h"
#include "../support/test_mpi.h"
#include "../support/test_support.h"
#include "../support/test_families.h"

#include <check.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static MPI_Comm test_comm;          /* the harness's own traffic */
static int world_rank, world_size;
static uint64_t base_seed;

/* ---- helpers ---------------------------------------------------------------------- */

static void* xmalloc(size_t size) {
    void* p = malloc(size ? size : 1);
    if (!p) { fprintf(stderr, "check_mpi: out of memory\n"); MPI_Abort(MPI_COMM_WORLD, 3); }
    return p;
}

/* Formats a failed fact: this rank's values, and where the fact failed first. */
#if defined(__GNUC__)
static void fact_message(char* buffer, size_t size, int first_failing, const char* format, ...)
    __attribute__((format(printf, 4, 5)));
#endif
static void fact_message(char* buffer, size_t size, int first_failing, const char* format, ...) {
    va_list args;
    int used;
    va_start(args, format);
    used = snprintf(buffer, size, "rank %d: ", world_rank);
    vsnprintf(buffer + used, size - (size_t)used, format, args);
    va_end(args);
    used = (int)strlen(buffer);
    if (first_failing != world_rank)
        snprintf(buffer + used, size - (size_t)used, " [holds here; fails first on rank %d]", first_failing);
}

/* One fact, one assertion. Collective: every rank passes the fact in the same order
   (holds = 1 where it does not apply), the ranks agree, and all fail together at the
   first fact that fails anywhere; the message names the fact with this rank's values. */
#define CHECK_FACT(holds, ...)                                                      \
    do {                                                                            \
        int first_failing_ = test_mpi_first_failing(test_comm, (holds) ? 1 : 0);   \
        char fact_[1024] = "";                                                      \
        if (first_failing_ >= 0) fact_message(fact_, sizeof fact_, first_failing_, __VA_ARGS__); \
        ck_assert_msg(first_failing_ < 0, "%s", fact_);                             \
    } while (0)

/* ---- layer cases ------------------------------------------------------------------ */

typedef struct layer_case {
    const char* name;
    int d_model, d_ff, experts, top_k;
    int tokens[4];                  /* tokens of rank r: tokens[r % 4] */
    moe_ep_activation activation;
    moe_ep_placement_kind placement;
    bool normalize;
    float capacity;                 /* > 0: ranks drop differently from one rank, compare with pthreads only */
    int used_experts;               /* > 0: hand-in routing over the first used_experts of `used` */
    int threads;
    int family;                     /* FAMILY_NONE: softmax top-k; else a family's router and shared expert */
    moe_ep_weight_format format;    /* how the experts (routed and shared) hold their weights */
    moe_ep_arithmetic arithmetic;   /* BF16_DOT: its own bits, those of one rank too */
} layer_case;

/* The families' routers over MPI: DeepSeek-V3 (sigmoid, selection bias, 4 groups keep 2, x2.5,
   shared expert), GPT-OSS (router bias, softmax over the k) and Llama-4 (sigmoid of the chosen
   logit on the input, gated shared expert). */
enum { FAMILY_NONE, FAMILY_DEEPSEEK, FAMILY_GPT_OSS, FAMILY_LLAMA4 };

static const int used_subset[] = { 0, 5, 6, 11 };

static const layer_case layer_cases[] = {
    { "seed-like",        32, 64, 16, 2, { 37, 29, 41, 13 }, MOE_EP_ACTIVATION_SWIGLU, MOE_EP_PLACEMENT_CONTIGUOUS, true, 0, 0, 1, FAMILY_NONE, MOE_EP_WEIGHT_FORMAT_DEFAULT, MOE_EP_ARITHMETIC_DEFAULT },
    { "empty-ranks",      24, 40, 8,  2, { 19, 0, 31, 0 },   MOE_EP_ACTIVATION_SWIGLU, MOE_EP_PLACEMENT_CONTIGUOUS, true, 0, 0, 1, FAMILY_NONE, MOE_EP_WEIGHT_FORMAT_DEFAULT, MOE_EP_ARITHMETIC_DEFAULT },
    { "empty-experts",    16, 48, 12, 2, { 17, 9, 1, 26 },   MOE_EP_ACTIVATION_SWIGLU, MOE_EP_PLACEMENT_CONTIGUOUS, false, 0, 4, 1, FAMILY_NONE, MOE_EP_WEIGHT_FORMAT_DEFAULT, MOE_EP_ARITHMETIC_DEFAULT },
    { "k-equals-E",       24, 40, 5,  5, { 11, 3, 8, 1 },    MOE_EP_ACTIVATION_SWIGLU, MOE_EP_PLACEMENT_CONTIGUOUS, true, 0, 0, 1, FAMILY_NONE, MOE_EP_WEIGHT_FORMAT_DEFAULT, MOE_EP_ARITHMETIC_DEFAULT },
    { "fewer-experts",    20, 36, 3,  2, { 13, 7, 29, 2 },   MOE_EP_ACTIVATION_RELU,   MOE_EP_PLACEMENT_CONTIGUOUS, true, 0, 0, 1, FAMILY_NONE, MOE_EP_WEIGHT_FORMAT_DEFAULT, MOE_EP_ARITHMETIC_DEFAULT },
    { "round-robin-gelu", 20, 36, 7,  3, { 10, 21, 5, 17 },  MOE_EP_ACTIVATION_GELU,   MOE_EP_PLACEMENT_ROUND_ROBIN, false, 0, 0, 1, FAMILY_NONE, MOE_EP_WEIGHT_FORMAT_DEFAULT, MOE_EP_ARITHMETIC_DEFAULT },
    { "table-relu",       28, 33, 9,  1, { 23, 14, 3, 30 },  MOE_EP_ACTIVATION_RELU,   MOE_EP_PLACEMENT_TABLE, false, 0, 0, 1, FAMILY_NONE, MOE_EP_WEIGHT_FORMAT_DEFAULT, MOE_EP_ARITHMETIC_DEFAULT },
    { "capacity",         16, 32, 8,  2, { 40, 12, 27, 9 },  MOE_EP_ACTIVATION_SWIGLU, MOE_EP_PLACEMENT_CONTIGUOUS, true, 1.0f, 0, 1, FAMILY_NONE, MOE_EP_WEIGHT_FORMAT_DEFAULT, MOE_EP_ARITHMETIC_DEFAULT },
    { "openmp-threads",   32, 64, 16, 2, { 37, 29, 41, 13 }, MOE_EP_ACTIVATION_SWIGLU, MOE_EP_PLACEMENT_CONTIGUOUS, true, 0, 0, 2, FAMILY_NONE, MOE_EP_WEIGHT_FORMAT_DEFAULT, MOE_EP_ARITHMETIC_DEFAULT },
    { "deepseek-v3",      24, 32, 16, 4, { 21, 13, 30, 7 },  MOE_EP_ACTIVATION_SWIGLU, MOE_EP_PLACEMENT_CONTIGUOUS, true, 0, 0, 1,
      FAMILY_DEEPSEEK, MOE_EP_WEIGHT_FORMAT_DEFAULT, MOE_EP_ARITHMETIC_DEFAULT },
    { "gpt-oss-router",   20, 28, 8,  2, { 17, 25, 3, 11 },  MOE_EP_ACTIVATION_SWIGLU, MOE_EP_PLACEMENT_ROUND_ROBIN, false, 0, 0, 1,
      FAMILY_GPT_OSS, MOE_EP_WEIGHT_FORMAT_DEFAULT, MOE_EP_ARITHMETIC_DEFAULT },
    { "llama4",           24, 36, 8,  1, { 19, 0, 27, 14 },  MOE_EP_ACTIVATION_SWIGLU, MOE_EP_PLACEMENT_CONTIGUOUS, false, 0, 0, 1,
      FAMILY_LLAMA4, MOE_EP_WEIGHT_FORMAT_DEFAULT, MOE_EP_ARITHMETIC_DEFAULT },
    /* the weight formats: every rank widens the same stored weights, so the bits are those of one rank */
    { "bf16-weights",     32, 64, 16, 2, { 37, 29, 41, 13 }, MOE_EP_ACTIVATION_SWIGLU, MOE_EP_PLACEMENT_CONTIGUOUS, true, 0, 0, 2,
      FAMILY_NONE, MOE_EP_WEIGHT_FORMAT_BF16, MOE_EP_ARITHMETIC_DEFAULT },
    { "fp16-deepseek-v3", 24, 32, 16, 4, { 21, 13, 30, 7 },  MOE_EP_ACTIVATION_SWIGLU, MOE_EP_PLACEMENT_CONTIGUOUS, true, 0, 0, 1,
      FAMILY_DEEPSEEK, MOE_EP_WEIGHT_FORMAT_FP16, MOE_EP_ARITHMETIC_DEFAULT },
    { "int8-round-robin", 20, 36, 7,  3, { 10, 21, 5, 17 },  MOE_EP_ACTIVATION_GELU,   MOE_EP_PLACEMENT_ROUND_ROBIN, false, 0, 0, 1,
      FAMILY_NONE, MOE_EP_WEIGHT_FORMAT_INT8, MOE_EP_ARITHMETIC_DEFAULT },
    /* the opt-in BF16_DOT arithmetic: the same chains on every rank and transport */
    { "bf16-dot-deepseek-v3", 24, 32, 16, 4, { 21, 13, 30, 7 }, MOE_EP_ACTIVATION_SWIGLU, MOE_EP_PLACEMENT_CONTIGUOUS, true, 0, 0, 2,
      FAMILY_DEEPSEEK, MOE_EP_WEIGHT_FORMAT_BF16, MOE_EP_ARITHMETIC_BF16_DOT },
};
#define LAYER_CASES ((int)(sizeof layer_cases / sizeof layer_cases[0]))

/* Everything a rank needs, the same on every rank (small shapes: all of it is generated everywhere). */
typedef struct layer_data {
    const layer_case* c;
    int ranks;
    int64_t* token_start;           /* [ranks + 1] */
    float* x;                       /* [all tokens, d] */
    float* router;
    float* weights;
    moe_ep_expert_weights* experts; /* [E] */
    int* table;                     /* [E] placement table (TABLE only) */
    int* owner;                     /* [E] */
    float bias[16];                 /* the family's router or selection bias */
    float* shared;                  /* the family's shared expert: w1, w3, w2 of width d_ff, then a gate [d] */
    int32_t* topk_idx;              /* [all tokens, k] hand-in routing, or NULL */
    float* topk_weight;
    float* y;                       /* [all tokens, d] output of a pthreads run */
    char error[8][256];
} layer_data;

static void layer_data_create(layer_data* L, const layer_case* c, int ranks, uint64_t seed) {
    size_t per_expert = 3 * (size_t)c->d_model * (size_t)c->d_ff, e;
    int r;
    int64_t T, t;
    memset(L, 0, sizeof *L);
    L->c = c;
    L->ranks = ranks;
    L->token_start = (int64_t*)xmalloc(sizeof(int64_t) * (size_t)(ranks + 1));
    L->token_start[0] = 0;
    for (r = 0; r < ranks; ++r) L->token_start[r + 1] = L->token_start[r] + c->tokens[r % 4];
    T = L->token_start[ranks];
    L->x = (float*)xmalloc(sizeof(float) * (size_t)T * (size_t)c->d_model);
    L->y = (float*)xmalloc(sizeof(float) * (size_t)T * (size_t)c->d_model);
    L->router = (float*)xmalloc(sizeof(float) * (size_t)c->experts * (size_t)c->d_model);
    L->weights = (float*)xmalloc(sizeof(float) * per_expert * (size_t)c->experts);
    L->experts = (moe_ep_expert_weights*)xmalloc(sizeof *L->experts * (size_t)c->experts);
    memset(L->experts, 0, sizeof *L->experts * (size_t)c->experts);
    L->table = (int*)xmalloc(sizeof(int) * (size_t)c->experts);
    L->owner = (int*)xmalloc(sizeof(int) * (size_t)c->experts);
    test_fill(L->x, (size_t)T * (size_t)c->d_model, 1.0f, &seed);
    test_fill(L->router, (size_t)c->experts * (size_t)c->d_model, 1.0f / (float)c->d_model, &seed);
    test_fill(L->weights, per_expert * (size_t)c->experts, 1.0f / (float)c->d_model, &seed);
    for (e = 0; e < (size_t)c->experts; ++e) {
        L->experts[e].w1 = L->weights + e * per_expert;
        L->experts[e].w3 = L->experts[e].w1 + (size_t)c->d_model * (size_t)c->d_ff;
        L->experts[e].w2 = L->experts[e].w3 + (size_t)c->d_model * (size_t)c->d_ff;
        L->table[e] = (int)((e * 5 + 1) % (size_t)ranks);
    }
    moe_ep_placement_compute(&(moe_ep_placement){ .kind = c->placement, .table = L->table }, c->experts, ranks, L->owner);
    if (c->family != FAMILY_NONE) {
        L->shared = (float*)xmalloc(sizeof(float) * (3 * (size_t)c->d_ff + 1) * (size_t)c->d_model);
        test_fill(L->shared, (3 * (size_t)c->d_ff + 1) * (size_t)c->d_model, 1.0f / (float)c->d_model, &seed);
        test_fill(L->bias, 16, 0.2f, &seed);
    }
    if (c->used_experts > 0) {
        /* hand-in routing over a few experts only: the others get no token at all */
        L->topk_idx = (int32_t*)xmalloc(sizeof(int32_t) * (size_t)(T * c->top_k + 1));
        L->topk_weight = (float*)xmalloc(sizeof(float) * (size_t)(T * c->top_k + 1));
        for (t = 0; t < T; ++t) {
            int first = (int)(test_rng_next(&seed) % (unsigned)c->used_experts), j;
            for (j = 0; j < c->top_k; ++j) {
                L->topk_idx[t * c->top_k + j] = used_subset[(first + j) % c->used_experts];
                L->topk_weight[t * c->top_k + j] = 0.25f + (float)(test_rng_next(&seed) >> 40) / 16777216.0f;
            }
        }
    }
}

static void layer_data_destroy(layer_data* L) {
    free(L->token_start); free(L->x); free(L->y); free(L->router); free(L->weights); free(L->experts);
    free(L->table); free(L->owner); free(L->topk_idx); free(L->topk_weight); free(L->shared);
}

static moe_ep_desc layer_desc(const layer_data* L, const moe_ep_expert_weights* mine, const moe_ep_transport* t) {
    const layer_case* c = L->c;
    moe_ep_desc d;
    int e;
    memset(&d, 0, sizeof d);
    d.d_model = c->d_model; d.d_ff = c->d_ff; d.num_experts = c->experts; d.top_k = c->top_k;
    d.activation = c->activation; d.normalize_topk = c->normalize; d.capacity_factor = c->capacity;
    d.placement.kind = c->placement; d.placement.table = L->table; d.num_threads = c->threads;
    d.router_weight = L->router; d.experts = mine; d.transport = t; d.weight_format = c->format;
    d.arithmetic = c->arithmetic;
    if (mine == L->experts) d.experts_count = c->experts;
    else for (e = 0; e < c->experts; ++e) d.experts_count += L->owner[e] == t->rank;
    if (c->family != FAMILY_NONE) {
        size_t per = (size_t)c->d_ff * (size_t)c->d_model;
        d.shared.d_ff = c->d_ff;
        d.shared.weights.w1 = L->shared;
        d.shared.weights.w3 = L->shared + per;
        d.shared.weights.w2 = L->shared + 2 * per;
    }
    if (c->family == FAMILY_DEEPSEEK) {
        d.scoring = MOE_EP_SCORING_SIGMOID; d.selection_bias = L->bias;
        d.num_groups = 4; d.topk_groups = 2; d.routed_scaling_factor = 2.5f;
    } else if (c->family == FAMILY_GPT_OSS) {
        d.scoring = MOE_EP_SCORING_TOPK_SOFTMAX; d.router_bias = L->bias; d.shared.d_ff = 0;
    } else if (c->family == FAMILY_LLAMA4) {
        d.scoring = MOE_EP_SCORING_TOPK_SIGMOID; d.scale_expert_input = true;
        d.shared.gate = L->shared + 3 * (size_t)c->d_ff * (size_t)c->d_model;
    }
    return d;
}

/* This rank's experts, in local order (ascending global id). */
static moe_ep_expert_weights* rank_experts(const layer_data* L, int rank) {
    moe_ep_expert_weights* mine = (moe_ep_expert_weights*)xmalloc(sizeof *mine * (size_t)L->c->experts);
    int e, l = 0;
    for (e = 0; e < L->c->experts; ++e)
        if (L->owner[e] == rank) mine[l++] = L->experts[e];
    return mine;
}

/* moe_ep_forward over this rank's tokens. */
static moe_ep_result rank_forward(const layer_data* L, moe_ep_context* ctx, int rank, float* y) {
    const layer_case* c = L->c;
    int64_t first = L->token_start[rank];
    moe_ep_forward_args a;
    memset(&a, 0, sizeof a);
    a.tokens = L->token_start[rank + 1] - first;
    a.x = L->x + first * c->d_model;
    a.y = y;
    if (L->topk_idx) {
        a.routing_in = true;
        a.topk_idx = L->topk_idx + first * c->top_k;
        a.topk_weight = L->topk_weight + first * c->top_k;
    }
    return moe_ep_forward(ctx, &a);
}

/* The same stage by stage with the split-phase dispatch and combine; a barrier on the
   harness's communicator runs while each exchange is open. */
static moe_ep_result rank_stages(const layer_data* L, moe_ep_context* ctx, int rank, float* y) {
    const layer_case* c = L->c;
    int64_t first = L->token_start[rank], T = L->token_start[rank + 1] - first;
    moe_ep_plan* plan = NULL;
    int32_t* idx = (int32_t*)xmalloc(sizeof(int32_t) * (size_t)(T * c->top_k + 1));
    float* weight = (float*)xmalloc(sizeof(float) * (size_t)(T * c->top_k + 1));
    float *rows = NULL, *out = NULL;
    const float* x = L->x + first * c->d_model;
    moe_ep_result res = MOE_EP_OK;
    if (L->topk_idx) {
        memcpy(idx, L->topk_idx + first * c->top_k, sizeof(int32_t) * (size_t)(T * c->top_k));
        memcpy(weight, L->topk_weight + first * c->top_k, sizeof(float) * (size_t)(T * c->top_k));
    } else {
        res = moe_ep_route(ctx, x, T, idx, weight, NULL);
    }
    if (res == MOE_EP_OK) res = moe_ep_plan_create(ctx, T, idx, weight, &plan);
    if (res == MOE_EP_OK) {
        moe_ep_plan_info info = moe_ep_plan_query(plan);
        rows = (float*)xmalloc(sizeof(float) * (size_t)(info.recv_rows * c->d_model + 1));
        out = (float*)xmalloc(sizeof(float) * (size_t)(info.recv_rows * c->d_model + 1));
        res = moe_ep_dispatch_begin(ctx, plan, x, rows);
        MPI_Barrier(test_comm);
        if (res == MOE_EP_OK) res = moe_ep_dispatch_end(ctx, plan);
    }
    if (res == MOE_EP_OK) res = moe_ep_experts(ctx, plan, rows, out);
    if (res == MOE_EP_OK) {
        res = moe_ep_combine_begin(ctx, plan, out);
        MPI_Barrier(test_comm);
        if (res == MOE_EP_OK) res = moe_ep_combine_end(ctx, plan, y);
    }
    if (res == MOE_EP_OK && moe_ep_query(ctx).shared.d_ff > 0) {
        /* the stage user adds the shared experts after the routed sum, as forward does */
        float* shared = (float*)xmalloc(sizeof(float) * (size_t)(T * c->d_model + 1));
        int64_t i;
        res = moe_ep_shared_experts(ctx, x, T, shared);
        for (i = 0; res == MOE_EP_OK && i < T * c->d_model; ++i) y[i] += shared[i];
        free(shared);
    }
    moe_ep_plan_destroy(plan);
    free(idx); free(weight); free(rows); free(out);
    return res;
}

/* One rank of the layer, its own context, forward or stage by stage; y: this rank's rows. */
static moe_ep_result layer_rank(const layer_data* L, const moe_ep_transport* t, bool staged, float* y, char* error,
                                size_t size) {
    int rank = t->rank;
    moe_ep_expert_weights* mine = rank_experts(L, rank);
    moe_ep_desc d = layer_desc(L, mine, t);
    moe_ep_context* ctx = NULL;
    moe_ep_result res = moe_ep_create(&d, &ctx);
    if (res != MOE_EP_OK) {
        snprintf(error, size, "rank %d: create: %s", rank, moe_ep_result_string(res));
    } else {
        res = staged ? rank_stages(L, ctx, rank, y) : rank_forward(L, ctx, rank, y);
        if (res != MOE_EP_OK) snprintf(error, size, "rank %d: %s: %s: %.400s", rank, staged ? "stages" : "forward",
                                       moe_ep_result_string(res), moe_ep_last_error(ctx));
    }
    moe_ep_destroy(ctx);
    free(mine);
    return res;
}

static moe_ep_result pthreads_rank(const moe_ep_transport* t, void* user) {
    layer_data* L = (layer_data*)user;
    return layer_rank(L, t, false, L->y + L->token_start[t->rank] * L->c->d_model, L->error[t->rank % 8],
                      sizeof L->error[0]);
}

START_TEST(test_layer_matches_one_rank_and_pthreads) {
    const layer_case* c = &layer_cases[_i];
    uint64_t seed = base_seed + 1000u * (unsigned)_i;
    unsigned long long shown = (unsigned long long)seed;
    layer_data L;
    moe_ep_transport t;
    int64_t T, mineT;
    size_t d = (size_t)c->d_model, n_mine, n_all, fwd_vs_stages, vs_threads, vs_one;
    float *y_fwd, *y_stages, *y_all = NULL, *y_one = NULL;
    char fwd_error[512] = "", stages_error[512] = "", one_error[512] = "", threads_error[256] = "";
    float got[3], want[3];
    moe_ep_result made, fwd = MOE_EP_ERROR_INTERNAL, stages = MOE_EP_ERROR_INTERNAL;
    moe_ep_result one = MOE_EP_OK, threads = MOE_EP_OK;
    int threads_world = 1, ran;

    layer_data_create(&L, c, world_size, seed);
    T = L.token_start[world_size];
    mineT = L.token_start[world_rank + 1] - L.token_start[world_rank];
    n_mine = (size_t)mineT * d;
    n_all = (size_t)T * d;
    y_fwd = (float*)xmalloc(sizeof(float) * (n_mine + 1));
    y_stages = (float*)xmalloc(sizeof(float) * (n_mine + 1));
    test_poison(y_fwd, n_mine + 1);
    test_poison(y_stages, n_mine + 1);

    made = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD }, &t);
    if (made == MOE_EP_OK && _i % 2) {      /* every segment as its own messages, of at most 2 rows */
        ((moe_ep__mpi_impl*)t.impl)->rule.direct_bytes = 1;
        ((moe_ep__mpi_impl*)t.impl)->rule.chunk_rows = 2;
    }
    if (made == MOE_EP_OK) fwd = layer_rank(&L, &t, false, y_fwd, fwd_error, sizeof fwd_error);
    if (fwd == MOE_EP_OK) stages = layer_rank(&L, &t, true, y_stages, stages_error, sizeof stages_error);
    fwd_vs_stages = stages == MOE_EP_OK ? test_first_difference(y_fwd, y_stages, n_mine) : n_mine;
    ran = stages == MOE_EP_OK;
    if (made == MOE_EP_OK) moe_ep_mpi_transport_destroy(&t);

    if (world_rank == 0) {
        y_all = (float*)xmalloc(sizeof(float) * (n_all + 1));
        y_one = (float*)xmalloc(sizeof(float) * (n_all + 1));
        test_poison(y_all, n_all + 1);
    }
    test_mpi_gather_rows(test_comm, y_fwd, mineT, c->d_model, y_all);
    vs_threads = vs_one = n_all;
    if (world_rank == 0) {
        /* the one-rank layer over all tokens, and the pthreads world at this size */
        moe_ep_context* single = NULL;
        moe_ep_pthreads_world* world = NULL;
        moe_ep_desc d1 = layer_desc(&L, L.experts, NULL);
        d1.placement.kind = MOE_EP_PLACEMENT_CONTIGUOUS;
        d1.num_threads = 1;
        test_poison(y_one, n_all + 1);
        test_poison(L.y, n_all);
        one = moe_ep_create(&d1, &single);
        if (one == MOE_EP_OK)
            one = moe_ep_forward(single, &(moe_ep_forward_args){ .tokens = T, .x = L.x, .y = y_one,
                                 .routing_in = L.topk_idx != NULL, .topk_idx = L.topk_idx, .topk_weight = L.topk_weight });
        if (one != MOE_EP_OK) snprintf(one_error, sizeof one_error, "%.400s", moe_ep_last_error(single));
        moe_ep_destroy(single);
        if (one == MOE_EP_OK) {
            threads_world = moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = world_size,
                                                                                   .timeout_ms = 60000 }, &world)
                            == MOE_EP_OK;
            if (threads_world) {
                threads = moe_ep_pthreads_run(world, pthreads_rank, &L, NULL);
                moe_ep_pthreads_world_destroy(world);
            }
        }
        if (ran && one == MOE_EP_OK && threads_world && threads == MOE_EP_OK) {
            vs_threads = test_first_difference(y_all, L.y, n_all);
            if (c->capacity == 0.0f) vs_one = test_first_difference(y_all, y_one, n_all);
        }
    }

    /* the differing values, kept before the buffers go */
    got[0] = fwd_vs_stages < n_mine ? y_fwd[fwd_vs_stages] : 0.0f;
    want[0] = fwd_vs_stages < n_mine ? y_stages[fwd_vs_stages] : 0.0f;
    got[1] = vs_threads < n_all ? y_all[vs_threads] : 0.0f;
    want[1] = vs_threads < n_all ? L.y[vs_threads] : 0.0f;
    got[2] = vs_one < n_all ? y_all[vs_one] : 0.0f;
    want[2] = vs_one < n_all ? y_one[vs_one] : 0.0f;
    snprintf(threads_error, sizeof threads_error, "%s", L.error[0]);
    layer_data_destroy(&L);
    free(y_fwd); free(y_stages); free(y_all); free(y_one);

    CHECK_FACT(made == MOE_EP_OK, "case %s, seed %llu: moe_ep_mpi_transport_create returned %s", c->name, shown,
               moe_ep_result_string(made));
    CHECK_FACT(made != MOE_EP_OK || fwd == MOE_EP_OK, "case %s, seed %llu: the MPI forward returned %s (%s)", c->name,
               shown, moe_ep_result_string(fwd), fwd_error);
    CHECK_FACT(fwd != MOE_EP_OK || stages == MOE_EP_OK, "case %s, seed %llu: the MPI split-phase stages returned %s (%s)",
               c->name, shown, moe_ep_result_string(stages), stages_error);
    CHECK_FACT(fwd_vs_stages == n_mine, "case %s, seed %llu: forward and split-phase stages differ at element %lu of "
               "%lu: %.9g vs %.9g", c->name, shown, (unsigned long)fwd_vs_stages, (unsigned long)n_mine,
               (double)got[0], (double)want[0]);
    CHECK_FACT(one == MOE_EP_OK, "case %s, seed %llu: the one-rank layer returned %s (%s)", c->name, shown,
               moe_ep_result_string(one), one_error);
    CHECK_FACT(threads_world, "case %s, seed %llu: moe_ep_pthreads_world_create failed at %d ranks", c->name, shown,
               world_size);
    CHECK_FACT(threads == MOE_EP_OK, "case %s, seed %llu: the pthreads layer returned %s (%s)", c->name, shown,
               moe_ep_result_string(threads), threads_error);
    CHECK_FACT(vs_threads == n_all, "case %s, seed %llu: at %d ranks, MPI output differs from the pthreads output at "
               "element %lu of %lu: %.9g vs %.9g", c->name, shown, world_size, (unsigned long)vs_threads,
               (unsigned long)n_all, (double)got[1], (double)want[1]);
    CHECK_FACT(vs_one == n_all, "case %s, seed %llu: MPI output differs from the one-rank output at element %lu of %lu: "
               "%.9g vs %.9g", c->name, shown, (unsigned long)vs_one, (unsigned long)n_all, (double)got[2],
               (double)want[2]);
}
END_TEST

/* ---- the transport on its own ------------------------------------------------------ */

static const char* compare_name(int result) {
    return result == MPI_IDENT ? "MPI_IDENT" : result == MPI_CONGRUENT ? "MPI_CONGRUENT"
         : result == MPI_SIMILAR ? "MPI_SIMILAR" : result == MPI_UNEQUAL ? "MPI_UNEQUAL" : "(not compared)";
}

START_TEST(test_transport_identity) {
    moe_ep_transport t, dflt, seen, dflt_seen;
    moe_ep_result a, b, barrier = MOE_EP_OK;
    int same = -1, is_a = 0, is_b = 0;
    memset(&t, 0, sizeof t);
    memset(&dflt, 0, sizeof dflt);
    a = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD }, &t);
    b = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = (MPI_Comm)0 }, &dflt);
    is_a = a == MOE_EP_OK;
    is_b = b == MOE_EP_OK;
    seen = t;
    dflt_seen = dflt;
    if (is_a) {
        barrier = t.barrier ? t.barrier(t.impl, NULL, 0) : MOE_EP_ERROR_INTERNAL;
        /* the library talks on a duplicate, never on the application's communicator */
        MPI_Comm_compare(((moe_ep__mpi_impl*)t.impl)->comm, MPI_COMM_WORLD, &same);
        moe_ep_mpi_transport_destroy(&t);
    }
    if (is_b) moe_ep_mpi_transport_destroy(&dflt);
    CHECK_FACT(is_a, "moe_ep_mpi_transport_create(MPI_COMM_WORLD) returned %s", moe_ep_result_string(a));
    CHECK_FACT(is_b, "moe_ep_mpi_transport_create(comm 0, the default) returned %s", moe_ep_result_string(b));
    CHECK_FACT(seen.rank == world_rank, "transport.rank is %d, MPI_Comm_rank says %d", seen.rank, world_rank);
    CHECK_FACT(seen.world_size == world_size, "transport.world_size is %d, MPI_Comm_size says %d", seen.world_size,
               world_size);
    CHECK_FACT(dflt_seen.rank == world_rank, "the default communicator's transport.rank is %d, MPI_Comm_rank says %d",
               dflt_seen.rank, world_rank);
    CHECK_FACT(dflt_seen.world_size == world_size, "the default communicator's transport.world_size is %d, "
               "MPI_Comm_size says %d", dflt_seen.world_size, world_size);
    CHECK_FACT(seen.local_ranks == 1, "transport.local_ranks is %d, expected 1 (one rank per process)", seen.local_ranks);
    CHECK_FACT(seen.name && strcmp(seen.name, "mpi") == 0, "transport.name is '%s', expected 'mpi'",
               seen.name ? seen.name : "(null)");
    CHECK_FACT(seen.barrier != NULL, "transport.barrier is NULL");
    CHECK_FACT(seen.all_to_all_v_begin != NULL, "transport.all_to_all_v_begin is NULL");
    CHECK_FACT(seen.all_to_all_v_end != NULL, "transport.all_to_all_v_end is NULL");
    CHECK_FACT(seen.abort == NULL, "transport.abort is set; the MPI transport has none");
    CHECK_FACT(barrier == MOE_EP_OK, "transport.barrier returned %s", moe_ep_result_string(barrier));
    CHECK_FACT(!is_a || same == MPI_CONGRUENT, "the library's communicator compares %s to MPI_COMM_WORLD, expected "
               "MPI_CONGRUENT (a duplicate)", compare_name(same));
    CHECK_FACT(t.impl == NULL, "transport.impl is %p after moe_ep_mpi_transport_destroy, expected NULL", t.impl);
    CHECK_FACT(t.exchange_counts == NULL, "transport.exchange_counts is still set after moe_ep_mpi_transport_destroy");
}
END_TEST

static int64_t count_value(int from, int to, int i) {
    return ((int64_t)from << 40) + ((int64_t)to << 20) + i + (int64_t)(base_seed & 0xFFF) * 1000;
}

START_TEST(test_exchange_counts) {
    moe_ep_transport t;
    int R = world_size, count = 3, p, i, bad = -1;
    int64_t* send = (int64_t*)xmalloc(sizeof(int64_t) * (size_t)(R * count));
    int64_t* recv = (int64_t*)xmalloc(sizeof(int64_t) * (size_t)(R * count));
    int64_t got = 0;
    char err[256] = "";
    moe_ep_result made, res = MOE_EP_ERROR_INTERNAL;
    for (p = 0; p < R; ++p)
        for (i = 0; i < count; ++i) {
            send[p * count + i] = count_value(world_rank, p, i);
            recv[p * count + i] = -7;
        }
    made = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD }, &t);
    if (made == MOE_EP_OK) res = t.exchange_counts(t.impl, send, recv, count, err, sizeof err);
    for (p = 0; res == MOE_EP_OK && bad < 0 && p < R; ++p)
        for (i = 0; bad < 0 && i < count; ++i)
            if (recv[p * count + i] != count_value(p, world_rank, i)) {
                bad = p * count + i;
                got = recv[bad];
            }
    if (made == MOE_EP_OK) moe_ep_mpi_transport_destroy(&t);
    free(send); free(recv);
    CHECK_FACT(made == MOE_EP_OK, "moe_ep_mpi_transport_create returned %s", moe_ep_result_string(made));
    CHECK_FACT(made != MOE_EP_OK || res == MOE_EP_OK, "exchange_counts returned %s (%s)", moe_ep_result_string(res), err);
    CHECK_FACT(bad < 0, "exchange_counts: count %d from rank %d is %lld, rank %d sent %lld", bad % count, bad / count,
               (long long)got, bad / count, (long long)count_value(bad / count, world_rank, bad % count));
}
END_TEST

/* A segmented exchange with random counts, random segment order and gaps on both
   sides. Counts are a function of (seed, source, destination, segment), so each rank
   knows what it receives without asking. Row bytes encode (source, dest, segment, row). */
typedef struct a2a_layout {
    int S;
    size_t row_bytes;
    int64_t *send_counts, *send_offsets, *recv_counts, *recv_offsets;
    int64_t send_rows, recv_rows;   /* buffer sizes, gaps included */
    unsigned char *send, *recv;
} a2a_layout;

static int64_t a2a_count(uint64_t seed, int src, int dst, int s) {
    uint64_t z = seed ^ ((uint64_t)src << 32) ^ ((uint64_t)dst << 16) ^ (uint64_t)s;
    uint64_t v = test_rng_next(&z);
    return (v % 4 == 0) ? 0 : (int64_t)(v % 7);      /* a quarter of the segments are empty */
}

static unsigned char a2a_byte(int src, int dst, int s, int64_t row, size_t b) {
    return (unsigned char)(src * 37 + dst * 11 + s * 5 + row * 3 + (int64_t)b + 1);
}

/* Places the R*S segments of one side in a random order with random gaps. */
static int64_t a2a_place(const int64_t* counts, int64_t* offsets, int n, uint64_t* rng) {
    int* order = (int*)xmalloc(sizeof(int) * (size_t)n);
    int i;
    int64_t at = 0;
    for (i = 0; i < n; ++i) order[i] = i;
    for (i = n - 1; i > 0; --i) {
        int j = (int)(test_rng_next(rng) % (unsigned)(i + 1)), tmp = order[i];
        order[i] = order[j]; order[j] = tmp;
    }
    for (i = 0; i < n; ++i) {
        at += (int64_t)(test_rng_next(rng) % 3 == 0);   /* a gap row now and then */
        offsets[order[i]] = at;
        at += counts[order[i]];
    }
    free(order);
    return at + 1;
}

static void a2a_layout_create(a2a_layout* A, uint64_t seed, int S, size_t row_bytes, int contiguous_send) {
    int R = world_size, me = world_rank, p, s;
    uint64_t rng = seed ^ (0x1234567ull * (uint64_t)(me + 1));
    int64_t r;
    size_t b;
    A->S = S;
    A->row_bytes = row_bytes;
    A->send_counts = (int64_t*)xmalloc(sizeof(int64_t) * (size_t)(R * S));
    A->send_offsets = (int64_t*)xmalloc(sizeof(int64_t) * (size_t)(R * S));
    A->recv_counts = (int64_t*)xmalloc(sizeof(int64_t) * (size_t)(R * S));
    A->recv_offsets = (int64_t*)xmalloc(sizeof(int64_t) * (size_t)(R * S));
    for (p = 0; p < R; ++p)
        for (s = 0; s < S; ++s) {
            A->send_counts[p * S + s] = a2a_count(seed, me, p, s);
            A->recv_counts[p * S + s] = a2a_count(seed, p, me, s);
        }
    if (contiguous_send) {      /* dispatch's send side: (peer, segment) order, no gaps */
        int64_t at = 0;
        for (p = 0; p < R * S; ++p) { A->send_offsets[p] = at; at += A->send_counts[p]; }
        A->send_rows = at + 1;
    } else {
        A->send_rows = a2a_place(A->send_counts, A->send_offsets, R * S, &rng);
    }
    A->recv_rows = a2a_place(A->recv_counts, A->recv_offsets, R * S, &rng);
    A->send = (unsigned char*)xmalloc((size_t)A->send_rows * row_bytes);
    A->recv = (unsigned char*)xmalloc((size_t)A->recv_rows * row_bytes);
    memset(A->send, 0xEE, (size_t)A->send_rows * row_bytes);
    memset(A->recv, 0xEE, (size_t)A->recv_rows * row_bytes);   /* poison: gaps must stay 0xEE */
    for (p = 0; p < R; ++p)
        for (s = 0; s < S; ++s)
            for (r = 0; r < A->send_counts[p * S + s]; ++r)
                for (b = 0; b < row_bytes; ++b)
                    A->send[(size_t)(A->send_offsets[p * S + s] + r) * row_bytes + b] = a2a_byte(me, p, s, r, b);
}

/* 1 if every received row is right; else why names the first wrong byte. */
static int a2a_rows_right(const a2a_layout* A, char* why, size_t size) {
    int p, s;
    int64_t r;
    size_t b;
    for (p = 0; p < world_size; ++p)
        for (s = 0; s < A->S; ++s)
            for (r = 0; r < A->recv_counts[p * A->S + s]; ++r) {
                const unsigned char* row = A->recv + (size_t)(A->recv_offsets[p * A->S + s] + r) * A->row_bytes;
                for (b = 0; b < A->row_bytes; ++b)
                    if (row[b] != a2a_byte(p, world_rank, s, r, b)) {
                        snprintf(why, size, "row %lld of segment %d from rank %d: byte %lu is 0x%02x, expected 0x%02x",
                                 (long long)r, s, p, (unsigned long)b, row[b], a2a_byte(p, world_rank, s, r, b));
                        return 0;
                    }
            }
    return 1;
}

/* 1 if every row that no segment covers still holds the poison; else why names the first. */
static int a2a_gaps_untouched(const a2a_layout* A, char* why, size_t size) {
    unsigned char* seen = (unsigned char*)calloc((size_t)A->recv_rows, 1);
    int p, s, ok = 1;
    int64_t r;
    size_t b;
    for (p = 0; p < world_size; ++p)
        for (s = 0; s < A->S; ++s)
            for (r = 0; r < A->recv_counts[p * A->S + s]; ++r) seen[A->recv_offsets[p * A->S + s] + r] = 1;
    for (r = 0; r < A->recv_rows && ok; ++r)
        for (b = 0; b < A->row_bytes && ok && !seen[r]; ++b)
            if (A->recv[(size_t)r * A->row_bytes + b] != 0xEE) {
                snprintf(why, size, "gap row %lld was written: byte %lu is 0x%02x, not the poison 0xEE", (long long)r,
                         (unsigned long)b, A->recv[(size_t)r * A->row_bytes + b]);
                ok = 0;
            }
    free(seen);
    return ok;
}

static void a2a_layout_destroy(a2a_layout* A) {
    free(A->send_counts); free(A->send_offsets); free(A->recv_counts); free(A->recv_offsets);
    free(A->send); free(A->recv);
}

static moe_ep_a2a_args a2a_args(const a2a_layout* A) {
    moe_ep_a2a_args a;
    memset(&a, 0, sizeof a);
    a.send = A->send; a.recv = A->recv; a.row_bytes = A->row_bytes; a.segments = A->S;
    a.send_counts = A->send_counts; a.send_offsets = A->send_offsets;
    a.recv_counts = A->recv_counts; a.recv_offsets = A->recv_offsets;
    a.memory_space = MOE_EP_MEMORY_HOST;
    return a;
}

/* _i: 0 blocking, 1 split-phase, 2 two exchanges open at once (ended in reverse order),
   3 blocking with tiny per-rank limits (blocks split, hindexed even where contiguous),
   4 as 2 with segments of 2 rows and more as their own messages (the same tags in both
   exchanges), 5 as 4 with every segment on its own in messages of at most 2 rows, one
   tag for all and tiny limits, 6 as 2 with every peer whose rows exceed 40 bytes sent
   point-to-point in messages of at most 3 rows (the path of more than 2 GiB per peer). */
START_TEST(test_segmented_all_to_all) {
    static const int segments[] = { 1, 3, 5 };
    static const size_t row_bytes[] = { 4, 12, 20 };
    uint64_t seed = base_seed + 77u * (unsigned)_i;
    unsigned long long shown = (unsigned long long)seed;
    moe_ep_transport t;
    char err[512] = "", rows_why[320] = "", gaps_why[320] = "";
    const char* step = "";
    int rows_ok = 1, gaps_ok = 1, k;
    /* a failed call stops the rounds on every rank alike (the transport agrees); a wrong
       row does not: a rank must never skip an exchange the others enter. */
    moe_ep_result made = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD }, &t);
    moe_ep_result res = made;
    if (made == MOE_EP_OK && (_i == 3 || _i == 5)) {
        moe_ep__mpi_impl* m = (moe_ep__mpi_impl*)t.impl;
        m->limits.max_block_rows = 1 + world_rank % 3;          /* each rank its own: a local choice */
        m->limits.max_plain_offset = (int64_t)(world_rank % 2) * 24;
    }
    if (made == MOE_EP_OK && _i >= 4) {     /* the direct rule: the same on every rank */
        moe_ep__mpi_impl* m = (moe_ep__mpi_impl*)t.impl;
        m->rule.direct_bytes = _i == 4 ? 24 : _i == 5 ? 1 : 0;
        if (_i == 5) { m->rule.chunk_rows = 2; m->tag_ub = 1; }   /* every collective under tag 1 */
        if (_i == 6) { m->rule.collective_bytes = 40; m->rule.chunk_rows = 3; }
    }
    for (k = 0; res == MOE_EP_OK && k < 3; ++k) {
        a2a_layout A, B;
        moe_ep_a2a_args a, b;
        char why[256];
        int side;
        a2a_layout_create(&A, seed + (unsigned)k, segments[k], row_bytes[k], k == 1);
        a2a_layout_create(&B, seed + 100u + (unsigned)k, segments[(k + 1) % 3], row_bytes[(k + 2) % 3], 0);
        a = a2a_args(&A);
        b = a2a_args(&B);
/* the next call, unless one before it failed; step names the call that returned res */
#define A2A_CALL(name, call) if (res == MOE_EP_OK) { step = (name); res = (call); }
        if (_i == 0 || _i == 3) {
            A2A_CALL("all_to_all_v of exchange A", t.all_to_all_v(t.impl, &a, err, sizeof err));
            A2A_CALL("all_to_all_v of exchange B", t.all_to_all_v(t.impl, &b, err, sizeof err));
        } else if (_i == 1) {
            void* req = NULL;
            A2A_CALL("all_to_all_v_begin of exchange A", t.all_to_all_v_begin(t.impl, &a, &req, err, sizeof err));
            A2A_CALL("all_to_all_v_end of exchange A", t.all_to_all_v_end(t.impl, req, err, sizeof err));
            A2A_CALL("all_to_all_v_begin of exchange B", t.all_to_all_v_begin(t.impl, &b, &req, err, sizeof err));
            A2A_CALL("all_to_all_v_end of exchange B", t.all_to_all_v_end(t.impl, req, err, sizeof err));
        } else {   /* 2, 4, 5, 6 */
            void *ra = NULL, *rb = NULL;
            A2A_CALL("all_to_all_v_begin of exchange A", t.all_to_all_v_begin(t.impl, &a, &ra, err, sizeof err));
            A2A_CALL("all_to_all_v_begin of exchange B (A open)", t.all_to_all_v_begin(t.impl, &b, &rb, err, sizeof err));
            A2A_CALL("all_to_all_v_end of exchange B", t.all_to_all_v_end(t.impl, rb, err, sizeof err));
            A2A_CALL("all_to_all_v_end of exchange A", t.all_to_all_v_end(t.impl, ra, err, sizeof err));
        }
#undef A2A_CALL
        for (side = 0; res == MOE_EP_OK && side < 2; ++side) {
            const a2a_layout* X = side ? &B : &A;
            if (rows_ok && !a2a_rows_right(X, why, sizeof why)) {
                rows_ok = 0;
                snprintf(rows_why, sizeof rows_why, "round %d, exchange %c: %s", k, "AB"[side], why);
            }
            if (gaps_ok && !a2a_gaps_untouched(X, why, sizeof why)) {
                gaps_ok = 0;
                snprintf(gaps_why, sizeof gaps_why, "round %d, exchange %c: %s", k, "AB"[side], why);
            }
        }
        a2a_layout_destroy(&A);
        a2a_layout_destroy(&B);
        if (res != MOE_EP_OK) break;
    }
    if (made == MOE_EP_OK) moe_ep_mpi_transport_destroy(&t);
    CHECK_FACT(made == MOE_EP_OK, "mode %d: moe_ep_mpi_transport_create returned %s", _i, moe_ep_result_string(made));
    CHECK_FACT(res == MOE_EP_OK, "mode %d, seed %llu: round %d: %s returned %s: %s", _i, shown, k, step,
               moe_ep_result_string(res), err);
    CHECK_FACT(rows_ok, "mode %d, seed %llu: a received row is wrong: %s", _i, shown, rows_why);
    CHECK_FACT(gaps_ok, "mode %d, seed %llu: %s", _i, shown, gaps_why);
}
END_TEST

/* ---- failures become results, on every rank ---------------------------------------- */

START_TEST(test_rank_mismatch) {
    /* _i 0: the last rank has another top_k; 1: rank 0 has an invalid desc */
    layer_data L;
    moe_ep_transport t;
    moe_ep_context* ctx = NULL;
    moe_ep_expert_weights* mine;
    moe_ep_desc d;
    moe_ep_result made, res, want;
    int has_context;
    layer_data_create(&L, &layer_cases[0], world_size, base_seed);
    mine = rank_experts(&L, world_rank);
    made = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD }, &t);
    d = layer_desc(&L, mine, &t);
    if (_i == 0) {
        if (world_rank == world_size - 1 && world_size > 1) d.top_k = 3;
        want = world_size > 1 ? MOE_EP_ERROR_RANK_MISMATCH : MOE_EP_OK;
    } else {
        if (world_rank == 0) d.top_k = d.num_experts + 1;
        want = world_rank == 0 ? MOE_EP_ERROR_INVALID_ARGUMENT : MOE_EP_ERROR_RANK_MISMATCH;
    }
    res = made == MOE_EP_OK ? moe_ep_create(&d, &ctx) : MOE_EP_ERROR_INTERNAL;
    has_context = ctx != NULL;
    moe_ep_destroy(ctx);
    if (made == MOE_EP_OK) moe_ep_mpi_transport_destroy(&t);
    free(mine);
    layer_data_destroy(&L);
    CHECK_FACT(made == MOE_EP_OK, "mode %d: moe_ep_mpi_transport_create returned %s", _i, moe_ep_result_string(made));
    CHECK_FACT(res == want, "mode %d: moe_ep_create returned %s, expected %s", _i, moe_ep_result_string(res),
               moe_ep_result_string(want));
    CHECK_FACT((res == MOE_EP_OK) == has_context, "mode %d: moe_ep_create returned %s and %s a context", _i,
               moe_ep_result_string(res), has_context ? "handed out" : "did not hand out");
}
END_TEST

static int failing_expert(int local_expert, int expert, const float* rows, int64_t row_count, int d_model, float* out,
                          void* user) {
    (void)local_expert; (void)expert; (void)rows; (void)row_count; (void)d_model; (void)out;
    return *(const int*)user;
}

START_TEST(test_expert_failure_reaches_every_rank) {
    /* The last rank's expert callback fails: it returns CALLBACK, the others ABORTED. */
    moe_ep_transport t;
    moe_ep_context* ctx = NULL;
    int fail = world_rank == world_size - 1 ? 5 : 0, d = 8, E = 2 * world_size;
    int64_t T = 6, i;
    float* x = (float*)xmalloc(sizeof(float) * (size_t)(T * d));
    float* y = (float*)xmalloc(sizeof(float) * (size_t)(T * d));
    int32_t* idx = (int32_t*)xmalloc(sizeof(int32_t) * (size_t)T);
    float* w = (float*)xmalloc(sizeof(float) * (size_t)T);
    moe_ep_result made, created = MOE_EP_ERROR_INTERNAL, res = MOE_EP_ERROR_INTERNAL, want;
    for (i = 0; i < T * d; ++i) x[i] = (float)i;
    for (i = 0; i < T; ++i) { idx[i] = (int32_t)(2 * (world_size - 1) + i % 2); w[i] = 1.0f; }  /* all to the last rank */
    made = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD }, &t);
    if (made == MOE_EP_OK)
        created = moe_ep_create(&(moe_ep_desc){ .d_model = d, .num_experts = E, .top_k = 1, .expert_fn = failing_expert,
                                                .expert_user_data = &fail, .transport = &t }, &ctx);
    if (created == MOE_EP_OK) res = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = T, .x = x, .y = y,
                                                                                .routing_in = true, .topk_idx = idx,
                                                                                .topk_weight = w });
    want = fail ? MOE_EP_ERROR_CALLBACK : MOE_EP_ERROR_ABORTED;
    moe_ep_destroy(ctx);
    if (made == MOE_EP_OK) moe_ep_mpi_transport_destroy(&t);
    free(x); free(y); free(idx); free(w);
    CHECK_FACT(made == MOE_EP_OK, "moe_ep_mpi_transport_create returned %s", moe_ep_result_string(made));
    CHECK_FACT(made != MOE_EP_OK || created == MOE_EP_OK, "moe_ep_create returned %s", moe_ep_result_string(created));
    CHECK_FACT(created != MOE_EP_OK || res == want, "moe_ep_forward returned %s, expected %s (%s)",
               moe_ep_result_string(res), moe_ep_result_string(want),
               fail ? "this rank's expert callback fails" : "the last rank's expert callback fails");
}
END_TEST

START_TEST(test_mpi_error_becomes_result) {
    /* A negative count: every rank refuses it with the rule in words (the transport checks
       before MPI sees it), the peers are told, and the communicator works on. */
    moe_ep_transport t;
    int64_t send[4] = { 0 }, recv[4] = { 0 };
    char err[512] = "";
    moe_ep_result made, res = MOE_EP_ERROR_INTERNAL, again = MOE_EP_OK, barrier = MOE_EP_OK;
    int wrong = -1;
    int64_t got = 0;
    made = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD }, &t);
    if (made == MOE_EP_OK) res = t.exchange_counts(t.impl, send, recv, -1, err, sizeof err);
    if (res == MOE_EP_ERROR_INVALID_ARGUMENT) {
        /* the communicator still works afterwards */
        int64_t one[64], back[64];
        int p;
        for (p = 0; p < world_size; ++p) one[p] = world_rank;
        again = t.exchange_counts(t.impl, one, back, 1, NULL, 0);
        for (p = 0; again == MOE_EP_OK && wrong < 0 && p < world_size; ++p)
            if (back[p] != p) { wrong = p; got = back[p]; }
        barrier = t.barrier(t.impl, NULL, 0);
    }
    if (made == MOE_EP_OK) moe_ep_mpi_transport_destroy(&t);
    CHECK_FACT(made == MOE_EP_OK, "moe_ep_mpi_transport_create returned %s", moe_ep_result_string(made));
    CHECK_FACT(made != MOE_EP_OK || res == MOE_EP_ERROR_INVALID_ARGUMENT, "exchange_counts with count -1 returned %s "
               "('%s'), expected MOE_EP_ERROR_INVALID_ARGUMENT", moe_ep_result_string(res), err);
    CHECK_FACT(strstr(err, "count (-1)") != NULL, "the transport's error text '%s' does not name count (-1)", err);
    CHECK_FACT(again == MOE_EP_OK, "exchange_counts after the error returned %s: the communicator is broken",
               moe_ep_result_string(again));
    CHECK_FACT(wrong < 0, "exchange_counts after the error: the count from rank %d is %lld, expected %d", wrong,
               (long long)got, wrong);
    CHECK_FACT(barrier == MOE_EP_OK, "barrier after the error returned %s", moe_ep_result_string(barrier));
}
END_TEST

START_TEST(test_create_refuses_bad_communicators) {
    test_log log;
    test_counter count;
    moe_ep_allocator half;
    moe_ep_transport t, before;
    moe_ep_result a, b, c;
    int lines_after_a, lines_after_b, untouched;
    char line_a[TEST_LOG_TEXT], line_b[TEST_LOG_TEXT];
    test_log_init(&log);
    test_counter_init(&count);
    half = test_counter_allocator(&count);
    half.free_fn = NULL;                /* half an allocator */
    memset(&t, 0xAB, sizeof t);
    before = t;
    a = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_NULL, .logger = test_log_logger(&log) }, &t);
    lines_after_a = test_log_count(&log);
    untouched = memcmp(&t, &before, sizeof t) == 0;
    b = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD, .allocator = half,
                                                        .logger = test_log_logger(&log) }, &t);
    lines_after_b = test_log_count(&log);
    c = moe_ep_mpi_transport_create(NULL, &t);
    snprintf(line_a, sizeof line_a, "%s", test_log_line(&log, 0));
    snprintf(line_b, sizeof line_b, "%s", test_log_line(&log, 1));
    test_log_destroy(&log);
    test_counter_destroy(&count);
    CHECK_FACT(a == MOE_EP_ERROR_INVALID_ARGUMENT, "create on MPI_COMM_NULL returned %s, expected INVALID_ARGUMENT",
               moe_ep_result_string(a));
    CHECK_FACT(lines_after_a == 1, "create on MPI_COMM_NULL logged %d lines, expected 1", lines_after_a);
    CHECK_FACT(strstr(line_a, "MPI_COMM_NULL") != NULL, "create on MPI_COMM_NULL logged '%s', which does not name "
               "MPI_COMM_NULL", line_a);
    CHECK_FACT(untouched, "create on MPI_COMM_NULL wrote into the transport it refused");
    CHECK_FACT(b == MOE_EP_ERROR_INVALID_ARGUMENT, "create with an allocator without free_fn returned %s, expected "
               "INVALID_ARGUMENT", moe_ep_result_string(b));
    CHECK_FACT(lines_after_b == 2, "create with half an allocator: %d lines logged in all, expected 2", lines_after_b);
    CHECK_FACT(strstr(line_b, "allocator") != NULL, "create with half an allocator logged '%s', which does not name "
               "the allocator", line_b);
    CHECK_FACT(c == MOE_EP_ERROR_INVALID_ARGUMENT, "create with a NULL desc returned %s, expected INVALID_ARGUMENT",
               moe_ep_result_string(c));
}
END_TEST

START_TEST(test_unsupported_rows_fail_symmetrically) {
    /* Every rank sees the same row size and memory space, so every rank refuses, before MPI. */
    moe_ep_transport t;
    int64_t zero[64] = { 0 };
    char buf[8], err1[256] = "", err2[256] = "", err3[256] = "", err4[256] = "";
    moe_ep_a2a_args a;
    moe_ep_result r1 = MOE_EP_ERROR_INTERNAL, r2 = MOE_EP_ERROR_INTERNAL, r3 = MOE_EP_ERROR_INTERNAL;
    moe_ep_result r4 = MOE_EP_ERROR_INTERNAL;
    int row_lists = -1;
    moe_ep_result barrier = MOE_EP_ERROR_INTERNAL;
    moe_ep_result made = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD }, &t);
    memset(&a, 0, sizeof a);
    a.send = buf; a.recv = buf + 4; a.segments = 1;
    a.send_counts = zero; a.send_offsets = zero; a.recv_counts = zero; a.recv_offsets = zero;
    if (made == MOE_EP_OK) {
        a.row_bytes = (size_t)INT_MAX + 1;
        r1 = t.all_to_all_v(t.impl, &a, err1, sizeof err1);
        a.row_bytes = 4;
        a.memory_space = MOE_EP_MEMORY_DEVICE;
        r2 = t.all_to_all_v(t.impl, &a, err2, sizeof err2);
        a.memory_space = MOE_EP_MEMORY_HOST;
        a.recv = buf;           /* in place: Open MPI would take it for MPI_IN_PLACE */
        r3 = t.all_to_all_v(t.impl, &a, err3, sizeof err3);
        a.recv = buf + 4;
        a.send_rows = zero;     /* a row list: the MPI transport declines it (row_lists 0) */
        a.send_buffer_rows = 1;
        r4 = t.all_to_all_v(t.impl, &a, err4, sizeof err4);
        row_lists = t.row_lists;
        barrier = t.barrier(t.impl, NULL, 0);     /* nobody is left inside a collective */
        moe_ep_mpi_transport_destroy(&t);
    }
    CHECK_FACT(made == MOE_EP_OK, "moe_ep_mpi_transport_create returned %s", moe_ep_result_string(made));
    CHECK_FACT(r1 == MOE_EP_ERROR_UNSUPPORTED, "rows of 2^31 bytes: all_to_all_v returned %s ('%s'), expected "
               "UNSUPPORTED", moe_ep_result_string(r1), err1);
    CHECK_FACT(strstr(err1, "row_bytes (2147483648)") != NULL, "rows of 2^31 bytes: the error '%s' does not name "
               "row_bytes (2147483648)", err1);
    CHECK_FACT(r2 == MOE_EP_ERROR_UNSUPPORTED, "device memory: all_to_all_v returned %s ('%s'), expected UNSUPPORTED",
               moe_ep_result_string(r2), err2);
    CHECK_FACT(strstr(err2, "device memory") != NULL, "device memory: the error '%s' does not say 'device memory'",
               err2);
    CHECK_FACT(r3 == MOE_EP_ERROR_INVALID_ARGUMENT, "one buffer for send and recv: all_to_all_v returned %s ('%s'), "
               "expected INVALID_ARGUMENT", moe_ep_result_string(r3), err3);
    CHECK_FACT(strstr(err3, "same buffer") != NULL, "one buffer for send and recv: the error '%s' does not say "
               "'same buffer'", err3);
    CHECK_FACT(row_lists == 0, "the MPI transport's row_lists is %d, expected 0", row_lists);
    CHECK_FACT(r4 == MOE_EP_ERROR_UNSUPPORTED, "a row list: all_to_all_v returned %s ('%s'), expected UNSUPPORTED",
               moe_ep_result_string(r4), err4);
    CHECK_FACT(strstr(err4, "send_rows") != NULL, "a row list: the error '%s' does not name send_rows", err4);
    CHECK_FACT(barrier == MOE_EP_OK, "the barrier after the refusals returned %s", moe_ep_result_string(barrier));
}
END_TEST

START_TEST(test_allocations_are_returned) {
    test_counter count;
    moe_ep_allocator a;
    layer_data L;
    moe_ep_transport t;
    moe_ep_context* ctx = NULL;
    moe_ep_expert_weights* mine;
    moe_ep_desc d;
    int64_t first, T;
    float* y;
    moe_ep_result made, created = MOE_EP_ERROR_INTERNAL, res = MOE_EP_ERROR_INTERNAL;
    long allocs, outstanding;
    test_counter_init(&count);
    a = test_counter_allocator(&count);
    layer_data_create(&L, &layer_cases[0], world_size, base_seed + 5);
    mine = rank_experts(&L, world_rank);
    first = L.token_start[world_rank];
    T = L.token_start[world_rank + 1] - first;
    y = (float*)xmalloc(sizeof(float) * (size_t)(T * L.c->d_model + 1));
    made = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD, .allocator = a }, &t);
    d = layer_desc(&L, mine, &t);
    d.allocator = a;
    if (made == MOE_EP_OK) created = moe_ep_create(&d, &ctx);
    if (created == MOE_EP_OK)
        res = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = T, .x = L.x + first * L.c->d_model, .y = y });
    moe_ep_destroy(ctx);
    if (made == MOE_EP_OK) moe_ep_mpi_transport_destroy(&t);
    allocs = count.allocs;
    outstanding = test_counter_outstanding(&count);
    test_counter_destroy(&count);
    free(y); free(mine);
    layer_data_destroy(&L);
    CHECK_FACT(made == MOE_EP_OK, "moe_ep_mpi_transport_create returned %s", moe_ep_result_string(made));
    CHECK_FACT(made != MOE_EP_OK || created == MOE_EP_OK, "moe_ep_create returned %s", moe_ep_result_string(created));
    CHECK_FACT(created != MOE_EP_OK || res == MOE_EP_OK, "moe_ep_forward returned %s", moe_ep_result_string(res));
    CHECK_FACT(allocs > 0, "the allocator handed out no block: the library did not use it");
    CHECK_FACT(outstanding == 0, "%ld of %ld allocations outstanding after destroy", outstanding, allocs);
}
END_TEST

/* ---- rank faults: a rank fails before a collective, enters another, or is late ---------- */

/* mode 0: the last rank's dispatch fails (x NULL) and it goes on to experts and combine, as
   the header's failure section says; mode 1: the last rank skips its dispatch and enters
   combine. Every rank then retries with moe_ep_forward (at most three times); the retry's y
   must be the one-rank layer's bits. Before the fix, mode 0 left the others waiting in
   their dispatch until mpirun's timeout. */
START_TEST(test_rank_fault_in_dispatch) {
    layer_data L;
    moe_ep_transport t;
    moe_ep_context *ctx = NULL, *one = NULL;
    moe_ep_plan* plan = NULL;
    moe_ep_expert_weights* mine;
    moe_ep_desc d;
    moe_ep_result made, created = MOE_EP_ERROR_INTERNAL, dispatched = MOE_EP_ERROR_INTERNAL;
    moe_ep_result combined = MOE_EP_ERROR_INTERNAL, retry[3] = { MOE_EP_ERROR_INTERNAL, MOE_EP_ERROR_INTERNAL,
                                                                 MOE_EP_ERROR_INTERNAL };
    int odd = world_rank == world_size - 1, i, y_untouched = 0, same = 0;
    int64_t first, T, all;
    int32_t* idx;
    float *weight, *rows, *out, *y, *y_ref;
    layer_data_create(&L, &layer_cases[0], world_size, base_seed + 77);
    mine = rank_experts(&L, world_rank);
    first = L.token_start[world_rank];
    T = L.token_start[world_rank + 1] - first;
    all = L.token_start[world_size];
    idx = (int32_t*)xmalloc(sizeof(int32_t) * (size_t)(T * L.c->top_k + 1));
    weight = (float*)xmalloc(sizeof(float) * (size_t)(T * L.c->top_k + 1));
    rows = (float*)xmalloc(sizeof(float) * (size_t)(all * L.c->top_k * L.c->d_model + 1));
    out = (float*)xmalloc(sizeof(float) * (size_t)(all * L.c->top_k * L.c->d_model + 1));
    y = (float*)xmalloc(sizeof(float) * (size_t)(T * L.c->d_model + 1));
    y_ref = (float*)xmalloc(sizeof(float) * (size_t)(all * L.c->d_model + 1));
    made = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD, .timeout_ms = 60000 }, &t);
    d = layer_desc(&L, mine, &t);
    if (made == MOE_EP_OK) created = moe_ep_create(&d, &ctx);
    if (created == MOE_EP_OK && moe_ep_route(ctx, L.x + first * L.c->d_model, T, idx, weight, NULL) == MOE_EP_OK &&
        moe_ep_plan_create(ctx, T, idx, weight, &plan) == MOE_EP_OK) {
        test_poison(y, (size_t)(T * L.c->d_model));
        if (odd && _i == 0) dispatched = moe_ep_dispatch(ctx, plan, NULL, rows);
        else if (odd) dispatched = MOE_EP_OK;   /* mode 1: not called */
        else dispatched = moe_ep_dispatch(ctx, plan, L.x + first * L.c->d_model, rows);
        moe_ep_experts(ctx, plan, rows, out);
        combined = moe_ep_combine(ctx, plan, out, y);
        y_untouched = test_is_poisoned(y, (size_t)(T * L.c->d_model));
        moe_ep_plan_destroy(plan);
        for (i = 0; i < 3; ++i)
            if ((retry[i] = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = T, .x = L.x + first * L.c->d_model,
                                                                         .y = y })) == MOE_EP_OK) break;
    }
    moe_ep_destroy(ctx);
    if (made == MOE_EP_OK) moe_ep_mpi_transport_destroy(&t);
    /* the one-rank layer on every token, on every rank (small) */
    d = layer_desc(&L, L.experts, NULL);
    d.placement.kind = MOE_EP_PLACEMENT_CONTIGUOUS;
    d.placement.table = NULL;
    if (moe_ep_create(&d, &one) == MOE_EP_OK &&
        moe_ep_forward(one, &(moe_ep_forward_args){ .tokens = all, .x = L.x, .y = y_ref }) == MOE_EP_OK)
        same = memcmp(y, y_ref + first * L.c->d_model, sizeof(float) * (size_t)(T * L.c->d_model)) == 0;
    moe_ep_destroy(one);
    CHECK_FACT(made == MOE_EP_OK && created == MOE_EP_OK, "mode %d: transport %s, create %s", _i,
               moe_ep_result_string(made), moe_ep_result_string(created));
    if (world_size > 1 && _i == 0) {
        CHECK_FACT(dispatched == (odd ? MOE_EP_ERROR_INVALID_ARGUMENT : MOE_EP_ERROR_ABORTED), "mode 0: dispatch "
                   "returned %s", moe_ep_result_string(dispatched));
        CHECK_FACT(combined == (odd ? MOE_EP_ERROR_INVALID_ARGUMENT : MOE_EP_ERROR_ABORTED), "mode 0: combine returned "
                   "%s", moe_ep_result_string(combined));
        CHECK_FACT(retry[0] == MOE_EP_OK, "mode 0: the first retry returned %s", moe_ep_result_string(retry[0]));
    } else if (world_size > 1) {
        CHECK_FACT(odd || dispatched == MOE_EP_ERROR_OUT_OF_STEP, "mode 1: dispatch returned %s",
                   moe_ep_result_string(dispatched));
        CHECK_FACT(combined == MOE_EP_ERROR_OUT_OF_STEP, "mode 1: combine returned %s", moe_ep_result_string(combined));
        CHECK_FACT(odd ? retry[0] == MOE_EP_ERROR_OUT_OF_STEP && retry[1] == MOE_EP_OK : retry[0] == MOE_EP_OK,
                   "mode 1: the retries returned %s, %s", moe_ep_result_string(retry[0]), moe_ep_result_string(retry[1]));
    }
    CHECK_FACT(world_size == 1 || y_untouched, "mode %d: combine wrote y although it failed", _i);
    CHECK_FACT(same, "mode %d: the retry's y differs from the one-rank layer's", _i);
    free(idx); free(weight); free(rows); free(out); free(y); free(y_ref); free(mine);
    layer_data_destroy(&L);
}
END_TEST

/* The last rank is 1.5 s late for a collective; the transport's deadline is 0.3 s: the
   others return TIMEOUT (not a hang); the late rank, told, returns TIMEOUT at once; the
   next exchange works on every rank. */
START_TEST(test_late_rank_times_out) {
    moe_ep_transport t;
    int64_t send[64], recv[64];
    int p, late = world_rank == world_size - 1;
    double start, waited = 0.0;
    char err[256] = "";
    moe_ep_result made, first = MOE_EP_ERROR_INTERNAL, again = MOE_EP_ERROR_INTERNAL;
    made = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD, .timeout_ms = 300 }, &t);
    for (p = 0; p < world_size; ++p) send[p] = world_rank;
    if (made == MOE_EP_OK) {
        if (late) {
            struct timespec pause = { 1, 500000000 };
            nanosleep(&pause, NULL);
        }
        start = MPI_Wtime();
        first = t.exchange_counts(t.impl, send, recv, 1, err, sizeof err);
        waited = MPI_Wtime() - start;
        MPI_Barrier(test_comm);     /* every rank past the failed exchange before the next */
        again = t.exchange_counts(t.impl, send, recv, 1, NULL, 0);
        moe_ep_mpi_transport_destroy(&t);
    }
    CHECK_FACT(made == MOE_EP_OK, "moe_ep_mpi_transport_create returned %s", moe_ep_result_string(made));
    CHECK_FACT(world_size == 1 || first == MOE_EP_ERROR_TIMEOUT, "a rank 1.5 s late, deadline 0.3 s: %s ('%s')",
               moe_ep_result_string(first), err);
    CHECK_FACT(world_size == 1 || !late || waited < 0.25, "the late rank waited %.3f s although it had been told", waited);
    CHECK_FACT(again == MOE_EP_OK, "the next exchange returned %s", moe_ep_result_string(again));
}
END_TEST

/* ---- groups and sums: EP x DP and EP x TP x DP over MPI ------------------------------ */

/* Rank r's input of the sum test: a function of (seed, r, i), so every rank can compute
   everyone's and the expected rank-order sum. */
static float reduce_input(uint64_t seed, int r, int64_t i) {
    uint64_t z = seed ^ ((uint64_t)r << 40) ^ (uint64_t)i;
    return (float)(test_rng_next(&z) >> 40) / 65536.0f - 128.0f;
}

/* _i: 0 default rounds, 1 rounds of 7 floats per rank (many windows) */
START_TEST(test_all_reduce_sum_in_rank_order) {
    static const int64_t counts[] = { 0, 1, 3, 1000, 100003 };
    moe_ep_transport t;
    char err[512] = "", wrong[256] = "", overrun[256] = "";
    int k, r, sums_ok = 1, end_ok = 1;
    int64_t n = 0;
    moe_ep_result made = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD }, &t);
    moe_ep_result res = made;
    if (made == MOE_EP_OK && _i == 1) ((moe_ep__mpi_impl*)t.impl)->reduce_chunk = 7;
    for (k = 0; res == MOE_EP_OK && k < (int)(sizeof counts / sizeof counts[0]); ++k) {
        int64_t i;
        float* data;
        n = counts[k] > 1000 && _i == 1 ? 97 : counts[k];   /* 7-float rounds: few of them */
        data = (float*)xmalloc(sizeof(float) * (size_t)(n + 1));
        for (i = 0; i < n; ++i) data[i] = reduce_input(base_seed + (unsigned)k, world_rank, i);
        data[n] = 12345.0f;     /* past the end: must stay */
        res = t.all_reduce_sum(t.impl, data, n, MOE_EP_MEMORY_HOST, NULL, err, sizeof err);
        for (i = 0; res == MOE_EP_OK && sums_ok && i < n; ++i) {
            float want = reduce_input(base_seed + (unsigned)k, 0, i);
            for (r = 1; r < world_size; ++r) want += reduce_input(base_seed + (unsigned)k, r, i);
            if (memcmp(&want, &data[i], sizeof want) != 0) {
                snprintf(wrong, sizeof wrong, "count %lld: element %lld is %.9g, the rank-order sum %.9g",
                         (long long)n, (long long)i, (double)data[i], (double)want);
                sums_ok = 0;
            }
        }
        if (res == MOE_EP_OK && end_ok && data[n] != 12345.0f) {
            snprintf(overrun, sizeof overrun, "count %lld: the float past the end is %.9g, was 12345", (long long)n,
                     (double)data[n]);
            end_ok = 0;
        }
        free(data);
    }
    if (made == MOE_EP_OK) moe_ep_mpi_transport_destroy(&t);
    CHECK_FACT(made == MOE_EP_OK, "moe_ep_mpi_transport_create returned %s", moe_ep_result_string(made));
    CHECK_FACT(res == MOE_EP_OK, "mode %d, seed %llu: all_reduce_sum of %lld floats returned %s: %s", _i,
               (unsigned long long)base_seed, (long long)n, moe_ep_result_string(res), err);
    CHECK_FACT(sums_ok, "mode %d, seed %llu: %s", _i, (unsigned long long)base_seed, wrong);
    CHECK_FACT(end_ok, "mode %d, seed %llu: %s", _i, (unsigned long long)base_seed, overrun);
}
END_TEST

START_TEST(test_all_reduce_sum_refuses_together) {
    /* the last rank passes one element more; then every rank passes device memory */
    moe_ep_transport t;
    float data[8] = { 1, 2, 3, 4, 5, 6, 7, 8 };
    char err1[256] = "", err2[256] = "";
    moe_ep_result r1 = MOE_EP_ERROR_INTERNAL, r2 = MOE_EP_ERROR_INTERNAL, barrier = MOE_EP_ERROR_INTERNAL;
    moe_ep_result made = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD }, &t);
    int64_t n = world_rank == world_size - 1 && world_size > 1 ? 5 : 4;
    moe_ep_result want1 = world_size == 1 ? MOE_EP_OK : MOE_EP_ERROR_INVALID_ARGUMENT;
    if (made == MOE_EP_OK) {
        r1 = t.all_reduce_sum(t.impl, data, n, MOE_EP_MEMORY_HOST, NULL, err1, sizeof err1);
        r2 = t.all_reduce_sum(t.impl, data, 4, MOE_EP_MEMORY_DEVICE, NULL, err2, sizeof err2);
        barrier = t.barrier(t.impl, NULL, 0);
        moe_ep_mpi_transport_destroy(&t);
    }
    CHECK_FACT(made == MOE_EP_OK, "moe_ep_mpi_transport_create returned %s", moe_ep_result_string(made));
    CHECK_FACT(r1 == want1, "%lld floats here, the last rank one more: all_reduce_sum returned %s ('%s'), expected %s",
               (long long)n, moe_ep_result_string(r1), err1, moe_ep_result_string(want1));
    CHECK_FACT(world_size == 1 || strstr(err1, "elements") != NULL, "counts that differ: the error '%s' does not say "
               "'elements'", err1);
    CHECK_FACT(r2 == MOE_EP_ERROR_UNSUPPORTED, "device memory: all_reduce_sum returned %s ('%s'), expected UNSUPPORTED",
               moe_ep_result_string(r2), err2);
    CHECK_FACT(barrier == MOE_EP_OK, "the barrier after the refusals returned %s", moe_ep_result_string(barrier));
}
END_TEST

START_TEST(test_split_groups) {
    /* color = rank % 2, key = -rank: each group in descending world rank; then the last
       rank passes a negative color and is refused while the others still get a group */
    moe_ep_transport world, group, second;
    int64_t mine[64], theirs[64];
    int q, expected = 0, position = 0, r, out_of_order = -1, last = world_rank == world_size - 1;
    moe_ep_result made, res = MOE_EP_ERROR_INTERNAL, res2 = MOE_EP_ERROR_INTERNAL, exchanged = MOE_EP_OK;
    char err[256] = "", err2[256] = "";
    moe_ep_transport seen;
    void* second_impl;
    int second_size;
    memset(&world, 0, sizeof world);
    memset(&group, 0, sizeof group);
    memset(&second, 0, sizeof second);
    made = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD }, &world);
    if (made == MOE_EP_OK) res = world.split(world.impl, world_rank % 2, -world_rank, &group, err, sizeof err);
    for (r = world_size - 1; r >= 0; --r)
        if (r % 2 == world_rank % 2) { if (r > world_rank) position++; expected++; }
    seen = group;
    if (res == MOE_EP_OK) {
        for (q = 0; q < group.world_size; ++q) mine[q] = world_rank;
        exchanged = group.exchange_counts(group.impl, mine, theirs, 1, NULL, 0);
        for (q = 0; exchanged == MOE_EP_OK && out_of_order < 0 && q < group.world_size; ++q)
            /* group rank q is world rank (the q-th of our color, descending) */
            if (!(theirs[q] % 2 == world_rank % 2 && (q == 0 || theirs[q] < theirs[q - 1]))) out_of_order = q;
        moe_ep_mpi_transport_destroy(&group);
    }
    if (world.impl) res2 = world.split(world.impl, last ? -1 : 0, 0, &second, err2, sizeof err2);
    second_size = second.world_size;
    second_impl = second.impl;
    if (res2 == MOE_EP_OK) moe_ep_mpi_transport_destroy(&second);
    if (made == MOE_EP_OK) moe_ep_mpi_transport_destroy(&world);
    CHECK_FACT(made == MOE_EP_OK, "moe_ep_mpi_transport_create returned %s", moe_ep_result_string(made));
    CHECK_FACT(made != MOE_EP_OK || res == MOE_EP_OK, "split(color %d, key %d) returned %s: %s", world_rank % 2,
               -world_rank, moe_ep_result_string(res), err);
    CHECK_FACT(seen.world_size == expected, "the group of color %d has world_size %d, expected %d", world_rank % 2,
               seen.world_size, expected);
    CHECK_FACT(seen.rank == position, "group rank is %d, expected %d (descending world rank)", seen.rank, position);
    CHECK_FACT(seen.split != NULL, "the group's split callback is NULL");
    CHECK_FACT(seen.all_reduce_sum != NULL, "the group's all_reduce_sum callback is NULL");
    CHECK_FACT(seen.name && strcmp(seen.name, "mpi") == 0, "the group's name is '%s', expected 'mpi'",
               seen.name ? seen.name : "(null)");
    CHECK_FACT(exchanged == MOE_EP_OK, "exchange_counts in the group returned %s", moe_ep_result_string(exchanged));
    CHECK_FACT(out_of_order < 0, "group rank %d is world rank %lld: not of color %d, or not below group rank %d's",
               out_of_order, out_of_order >= 0 ? (long long)theirs[out_of_order] : -1LL, world_rank % 2,
               out_of_order - 1);
    CHECK_FACT(!last || res2 == MOE_EP_ERROR_INVALID_ARGUMENT, "split with color -1 returned %s ('%s'), expected "
               "INVALID_ARGUMENT", moe_ep_result_string(res2), err2);
    CHECK_FACT(!last || second_impl == NULL, "split with color -1 refused but left a transport (impl %p)", second_impl);
    CHECK_FACT(last || res2 == MOE_EP_OK, "split(color 0) while the last rank is refused returned %s: %s",
               moe_ep_result_string(res2), err2);
    CHECK_FACT(last || second_size == world_size - 1, "split(color 0) without the last rank: world_size %d, "
               "expected %d", second_size, world_size - 1);
}
END_TEST

typedef struct layout_run {
    moe_ep_layout_desc layout;
    int tokens, d_model, d_ff, top_k;
    const float *x, *router;        /* x: [shards * tokens, d] */
    const moe_ep_expert_weights* experts;
    float* y;                       /* [world * tokens, d] (pthreads), or this rank's [tokens, d] (MPI) */
    int y_is_local;
    char error[256];
} layout_run;

static int layout_shard(const moe_ep_layout_desc* l, int rank) {
    moe_ep_coords c;
    moe_ep_layout_coords(l, rank, &c);
    return c.dp * l->ep_size + c.ep;
}

/* One rank of a layout: split the world into the EP (and TP) group, the layout's experts, forward. */
static moe_ep_result layout_rank(const moe_ep_transport* world, void* user) {
    layout_run* L = (layout_run*)user;
    const moe_ep_layout_desc* l = &L->layout;
    moe_ep_transport ep_group, tp_group;
    moe_ep_context* ctx = NULL;
    int rank = world->rank, has_tp = l->tp_size > 1, n, i;
    int* ids;
    moe_ep_expert_weights* mine;
    moe_ep_result res = moe_ep_layout_split(l, world, MOE_EP_GROUP_EP, &ep_group, NULL, 0);
    if (res != MOE_EP_OK) return res;
    if (has_tp && (res = moe_ep_layout_split(l, world, MOE_EP_GROUP_TP, &tp_group, NULL, 0)) != MOE_EP_OK) {
        ep_group.destroy(ep_group.impl);
        return res;
    }
    n = moe_ep_layout_experts(l, rank, NULL, 0);
    ids = (int*)xmalloc(sizeof(int) * (size_t)(n + 1));
    mine = (moe_ep_expert_weights*)xmalloc(sizeof *mine * (size_t)(n + 1));
    moe_ep_layout_experts(l, rank, ids, n);
    for (i = 0; i < n; ++i) mine[i] = L->experts[ids[i]];
    res = moe_ep_create(&(moe_ep_desc){
        .d_model = L->d_model, .d_ff = L->d_ff, .num_experts = l->num_experts, .top_k = L->top_k,
        .normalize_topk = true, .num_threads = 1, .router_weight = L->router, .experts = mine, .experts_count = n,
        .transport = &ep_group, .tp_transport = has_tp ? &tp_group : NULL,
    }, &ctx);
    if (res == MOE_EP_OK) {
        const float* x = L->x + (size_t)layout_shard(l, rank) * (size_t)L->tokens * (size_t)L->d_model;
        float* y = L->y + (L->y_is_local ? 0 : (size_t)rank * (size_t)L->tokens * (size_t)L->d_model);
        res = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = L->tokens, .x = x, .y = y });
        if (res != MOE_EP_OK && rank == 0) snprintf(L->error, sizeof L->error, "%.200s", moe_ep_last_error(ctx));
    }
    moe_ep_destroy(ctx);
    /* a group's own destroy callback releases it, whatever the transport */
    if (has_tp) tp_group.destroy(tp_group.impl);
    ep_group.destroy(ep_group.impl);
    free(ids);
    free(mine);
    return res;
}

/* _i picks (ep, tp, dp) among the factorisations of the world size. The MPI layer's output
   equals the pthreads layer's with the same layout, bit for bit (rank-order TP sums), and
   the one-rank output too when there is no TP. */
START_TEST(test_layouts_match_pthreads) {
    int sizes[16][3], cases = 0, ep, tp, dp;
    int d_model = 24, d_ff = 40, top_k = 2, tokens = 11, experts, shards, c;
    uint64_t seed = base_seed + 31u * (unsigned)_i;
    layout_run L;
    moe_ep_transport world;
    float *x, *router, *weights, *y_all = NULL, *y_threads = NULL, *y_one = NULL;
    moe_ep_expert_weights* all;
    size_t per_expert = 3 * (size_t)d_model * (size_t)d_ff, e, rows;
    size_t n_all, vs_threads, one_at = 0;
    uint64_t rng = seed;
    char threads_error[256] = "", shape[128];
    float got[2] = { 0.0f, 0.0f }, want[2] = { 0.0f, 0.0f };
    int r, one_rank = -1;
    moe_ep_result made, res = MOE_EP_ERROR_INTERNAL, threads_world = MOE_EP_OK, threads_run = MOE_EP_OK, one = MOE_EP_OK;
    for (ep = 1; ep <= world_size; ++ep)
        for (tp = 1; tp <= world_size; ++tp)
            for (dp = 1; dp <= world_size; ++dp)
                if (ep * tp * dp == world_size && cases < 16) {
                    sizes[cases][0] = ep; sizes[cases][1] = tp; sizes[cases][2] = dp;
                    cases++;
                }
    c = _i % cases;     /* a small world has fewer layouts: some repeat */
    memset(&L, 0, sizeof L);
    experts = 6 * sizes[c][0];
    if (moe_ep_layout_resolve(&(moe_ep_layout_desc){ .world_size = world_size, .ep_size = sizes[c][0],
                                                    .tp_size = sizes[c][1], .dp_size = sizes[c][2],
                                                    .num_experts = experts }, &L.layout, NULL, 0) != MOE_EP_OK) {
        ck_abort_msg("layout %d x %d x %d does not resolve", sizes[c][0], sizes[c][1], sizes[c][2]);
    }
    shards = L.layout.dp_size * L.layout.ep_size;
    rows = (size_t)tokens * (size_t)d_model;
    x = (float*)xmalloc(sizeof(float) * (size_t)shards * rows);
    router = (float*)xmalloc(sizeof(float) * (size_t)experts * (size_t)d_model);
    weights = (float*)xmalloc(sizeof(float) * per_expert * (size_t)experts);
    all = (moe_ep_expert_weights*)xmalloc(sizeof *all * (size_t)experts);
    memset(all, 0, sizeof *all * (size_t)experts);
    test_fill(x, (size_t)shards * rows, 1.0f, &rng);
    test_fill(router, (size_t)experts * (size_t)d_model, 0.3f, &rng);
    test_fill(weights, per_expert * (size_t)experts, 1.0f / (float)d_model, &rng);
    snprintf(shape, sizeof shape, "EP %d x TP %d x DP %d, seed %llu", L.layout.ep_size, L.layout.tp_size,
             L.layout.dp_size, (unsigned long long)seed);
    for (e = 0; e < (size_t)experts; ++e) {
        all[e].w1 = weights + e * per_expert;
        all[e].w3 = all[e].w1 + (size_t)d_model * (size_t)d_ff;
        all[e].w2 = all[e].w3 + (size_t)d_model * (size_t)d_ff;
    }
    L.tokens = tokens; L.d_model = d_model; L.d_ff = d_ff; L.top_k = top_k;
    L.x = x; L.router = router; L.experts = all;
    L.y = (float*)xmalloc(sizeof(float) * rows);
    L.y_is_local = 1;
    test_poison(L.y, rows);
    made = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD }, &world);
    if (made == MOE_EP_OK) {
        res = layout_rank(&world, &L);
        moe_ep_mpi_transport_destroy(&world);
    }
    if (world_rank == 0) {
        y_all = (float*)xmalloc(sizeof(float) * (size_t)world_size * rows);
        y_threads = (float*)xmalloc(sizeof(float) * (size_t)world_size * rows);
        y_one = (float*)xmalloc(sizeof(float) * (size_t)shards * rows);
    }
    test_mpi_gather_rows(test_comm, L.y, tokens, d_model, y_all);
    n_all = (size_t)world_size * rows;
    vs_threads = n_all;
    if (world_rank == 0) {
        layout_run T = L;
        moe_ep_pthreads_world* threads = NULL;
        moe_ep_context* single = NULL;
        T.y = y_threads;
        T.y_is_local = 0;
        test_poison(y_threads, n_all);
        threads_world = moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = world_size,
                                                                               .timeout_ms = 60000 }, &threads);
        if (threads_world == MOE_EP_OK) threads_run = moe_ep_pthreads_run(threads, layout_rank, &T, NULL);
        snprintf(threads_error, sizeof threads_error, "%s", T.error);
        moe_ep_pthreads_world_destroy(threads);
        if (res == MOE_EP_OK && threads_run == MOE_EP_OK) {
            vs_threads = test_first_difference(y_all, y_threads, n_all);
            if (vs_threads < n_all) { got[0] = y_all[vs_threads]; want[0] = y_threads[vs_threads]; }
        }
        if (res == MOE_EP_OK && threads_run == MOE_EP_OK && L.layout.tp_size == 1) {
            one = moe_ep_create(&(moe_ep_desc){ .d_model = d_model, .d_ff = d_ff, .num_experts = experts, .top_k = top_k,
                                                .normalize_topk = true, .num_threads = 1, .router_weight = router,
                                                .experts = all }, &single);
            if (one == MOE_EP_OK)
                one = moe_ep_forward(single, &(moe_ep_forward_args){ .tokens = (int64_t)shards * tokens, .x = x, .y = y_one });
            moe_ep_destroy(single);
            for (r = 0; r < world_size && one == MOE_EP_OK && one_rank < 0; ++r) {
                const float* shard = y_one + (size_t)layout_shard(&L.layout, r) * rows;
                size_t at = test_first_difference(y_all + (size_t)r * rows, shard, rows);
                if (at < rows) { one_rank = r; one_at = at; got[1] = y_all[(size_t)r * rows + at]; want[1] = shard[at]; }
            }
        }
    }
    free(x); free(router); free(weights); free(all); free(L.y); free(y_all); free(y_threads); free(y_one);
    CHECK_FACT(made == MOE_EP_OK, "%s: moe_ep_mpi_transport_create returned %s", shape, moe_ep_result_string(made));
    CHECK_FACT(made != MOE_EP_OK || res == MOE_EP_OK, "%s: the MPI layer returned %s (%s)", shape,
               moe_ep_result_string(res), L.error);
    CHECK_FACT(threads_world == MOE_EP_OK, "%s: moe_ep_pthreads_world_create returned %s", shape,
               moe_ep_result_string(threads_world));
    CHECK_FACT(threads_run == MOE_EP_OK, "%s: the pthreads layout returned %s (%s)", shape,
               moe_ep_result_string(threads_run), threads_error);
    CHECK_FACT(vs_threads == n_all, "%s: MPI and pthreads outputs differ at element %lu of %lu (world rank %lu): "
               "%.9g vs %.9g", shape, (unsigned long)vs_threads, (unsigned long)n_all,
               (unsigned long)(vs_threads / (rows ? rows : 1)), (double)got[0], (double)want[0]);
    CHECK_FACT(one == MOE_EP_OK, "%s: the one-rank layer returned %s", shape, moe_ep_result_string(one));
    CHECK_FACT(one_rank < 0, "%s: rank %d differs from the one-rank output at element %lu of its %lu: %.9g vs %.9g",
               shape, one_rank, (unsigned long)one_at, (unsigned long)rows, (double)got[1], (double)want[1]);
}
END_TEST

/* ---- the >2^31 arithmetic, without the gigabytes (local, no MPI) ------------------ */

static moe_ep_result describe(const int64_t* counts, const int64_t* offsets, int S, size_t row_bytes,
                              moe_ep__mpi_peer* out, int64_t* rows, int64_t* offs, int64_t cap, char* err) {
    moe_ep__mpi_limits lim;
    lim.max_block_rows = INT_MAX;
    lim.max_plain_offset = INT_MAX;
    lim.max_offset = INT64_MAX;
    return moe_ep__mpi_describe(counts, offsets, S, row_bytes, &lim, 1, out, rows, offs, cap, err, 256);
}

START_TEST(test_large_layout_arithmetic) {
    moe_ep__mpi_peer p;
    int64_t rows[8], offs[8];
    char err[256] = "";
    const int64_t big = (int64_t)INT_MAX;
    /* 3 GiB to one peer in rows of 16 KiB: 196608 rows, an int count; the bytes are not */
    {
        int64_t c[1] = { 196608 }, o[1] = { 0 };
        ck_assert_int_eq(describe(c, o, 1, 16384, &p, rows, offs, 8, err), MOE_EP_OK);
        ck_assert(p.plain);
        ck_assert_int_eq(p.rows, 196608);
        ck_assert(p.rows * 16384 > big);
    }
    /* exactly INT_MAX rows stay one count; one more splits into two blocks */
    {
        int64_t c[1] = { big }, o[1] = { 0 };
        ck_assert_int_eq(describe(c, o, 1, 4, &p, rows, offs, 8, err), MOE_EP_OK);
        ck_assert(p.plain);
        c[0] = big + 1;
        ck_assert_int_eq(describe(c, o, 1, 4, &p, rows, offs, 8, err), MOE_EP_OK);
        ck_assert(!p.plain);
        ck_assert_int_eq(p.blocks, 2);
        ck_assert_int_eq(rows[0], big);
        ck_assert_int_eq(rows[1], 1);
        ck_assert_int_eq(offs[1], big * 4);
    }
    /* a byte offset of INT_MAX is an int displacement; INT_MAX + 1 needs an MPI_Aint */
    {
        int64_t c[1] = { 10 }, o[1] = { big };
        ck_assert_int_eq(describe(c, o, 1, 1, &p, rows, offs, 8, err), MOE_EP_OK);
        ck_assert(p.plain);
        ck_assert_int_eq(p.plain_offset, big);
        o[0] = big + 1;
        ck_assert_int_eq(describe(c, o, 1, 1, &p, rows, offs, 8, err), MOE_EP_OK);
        ck_assert(!p.plain);
        ck_assert_int_eq(p.blocks, 1);
        ck_assert_int_eq(offs[0], big + 1);
        o[0] = 524288;      /* 2^31 bytes in rows of 4 KiB */
        ck_assert_int_eq(describe(c, o, 1, 4096, &p, rows, offs, 8, err), MOE_EP_OK);
        ck_assert(!p.plain);
        ck_assert_int_eq(offs[0], (int64_t)1 << 31);
        o[0] = 524287;
        ck_assert_int_eq(describe(c, o, 1, 4096, &p, rows, offs, 8, err), MOE_EP_OK);
        ck_assert(p.plain);
    }
    /* segments merge into runs when adjacent; empty segments do not break a run */
    {
        int64_t c[4] = { 3, 0, 2, 5 }, o[4] = { 10, 99, 13, 15 };
        ck_assert_int_eq(describe(c, o, 4, 8, &p, rows, offs, 8, err), MOE_EP_OK);
        ck_assert(p.plain);
        ck_assert_int_eq(p.rows, 10);
        ck_assert_int_eq(p.plain_offset, 80);
        o[3] = 16;          /* a gap: two runs, two blocks */
        ck_assert_int_eq(describe(c, o, 4, 8, &p, rows, offs, 8, err), MOE_EP_OK);
        ck_assert(!p.plain);
        ck_assert_int_eq(p.blocks, 2);
        ck_assert_int_eq(rows[0], 5);
        ck_assert_int_eq(offs[1], 128);
        o[0] = 20; o[2] = 0; o[3] = 2;  /* out of order in memory: the type keeps segment order */
        ck_assert_int_eq(describe(c, o, 4, 8, &p, rows, offs, 8, err), MOE_EP_OK);
        ck_assert_int_eq(p.blocks, 2);
        ck_assert_int_eq(offs[0], 160);
        ck_assert_int_eq(offs[1], 0);
        ck_assert_int_eq(rows[1], 7);
    }
    /* counting only (capacity 0), and a run split by a small block limit */
    {
        moe_ep__mpi_limits lim = { 3, INT_MAX, INT64_MAX };
        int64_t c[1] = { 10 }, o[1] = { 4 };
        ck_assert_int_eq(moe_ep__mpi_describe(c, o, 1, 2, &lim, 0, &p, NULL, NULL, 0, err, sizeof err), MOE_EP_OK);
        ck_assert_int_eq(p.blocks, 4);
        ck_assert(!p.plain);
        ck_assert_int_eq(moe_ep__mpi_describe(c, o, 1, 2, &lim, 0, &p, rows, offs, 8, err, sizeof err), MOE_EP_OK);
        ck_assert_int_eq(rows[3], 1);
        ck_assert_int_eq(offs[3], (4 + 9) * 2);
    }
    /* the direct rule: by size, and everything of a pair whose rest would pass 2 GiB */
    {
        moe_ep__mpi_direct_rule rule = { 65536, INT_MAX, INT_MAX };
        int64_t c[3] = { 15, 16, 524287 };
        ck_assert(!moe_ep__mpi_pair_direct(c, 3, 4096, &rule));
        ck_assert_int_eq(moe_ep__mpi_direct_messages(c[0], 4096, 0, &rule), 0);
        ck_assert_int_eq(moe_ep__mpi_direct_messages(c[1], 4096, 0, &rule), 1);     /* 16 rows = 64 KiB */
        rule.direct_bytes = 0;                                                      /* never by size */
        ck_assert(!moe_ep__mpi_pair_direct(c + 2, 1, 4096, &rule));                 /* 2^31 - 4096 bytes */
        c[2] = 524288;                                                              /* 2^31 bytes */
        ck_assert(moe_ep__mpi_pair_direct(c + 2, 1, 4096, &rule));
        ck_assert_int_eq(moe_ep__mpi_direct_messages(c[2], 4096, 1, &rule), 1);
        ck_assert_int_eq(moe_ep__mpi_direct_messages(0, 4096, 1, &rule), 0);
        c[0] = 262144; c[1] = 262144; c[2] = 0;                                     /* 1 GiB + 1 GiB */
        ck_assert(moe_ep__mpi_pair_direct(c, 3, 4096, &rule));
        c[0] = big + 1;                                                             /* more than an int of rows */
        ck_assert_int_eq(moe_ep__mpi_direct_messages(c[0], 1, 1, &rule), 2);
        rule.chunk_rows = 3;
        ck_assert_int_eq(moe_ep__mpi_direct_messages(10, 8, 1, &rule), 4);
    }
    /* out of range: negative, past MPI_Aint, empty rows; each says which value */
    {
        int64_t c[2] = { 1, -2 }, o[2] = { 0, 5 };
        ck_assert_int_eq(describe(c, o, 2, 8, &p, rows, offs, 8, err), MOE_EP_ERROR_UNSUPPORTED);
        ck_assert_msg(strstr(err, "segment 1: -2 rows") != NULL, "%s", err);
        c[1] = 1;
        o[1] = INT64_MAX / 8;
        ck_assert_int_eq(describe(c, o, 2, 8, &p, rows, offs, 8, err), MOE_EP_ERROR_UNSUPPORTED);
        ck_assert_msg(strstr(err, "MPI_Aint") != NULL, "%s", err);
        ck_assert_int_eq(describe(c, o, 1, 0, &p, rows, offs, 8, err), MOE_EP_ERROR_UNSUPPORTED);
        ck_assert_msg(strstr(err, "row_bytes (0)") != NULL, "%s", err);
    }
}
END_TEST

/* ---- runner ----------------------------------------------------------------------- */

/* ---- the transformers reference cases (tests/families) over MPI ------------------ */

/* max |got - ref| / max |ref|; +inf for a non-finite value. */
static double rel_error_f64(const float* got, const double* ref, size_t n) {
    double diff = 0.0, scale = 0.0;
    size_t i;
    for (i = 0; i < n; ++i) {
        double e = fabs((double)got[i] - ref[i]);
        if (!(e == e) || e > 1e300) return INFINITY;
        if (e > diff) diff = e;
        if (fabs(ref[i]) > scale) scale = fabs(ref[i]);
    }
    return scale > 0.0 ? diff / scale : diff;
}

/* Each family's case, its tokens split over the processes and its experts placed
   contiguously: bitwise equal to one rank over all tokens, and within 1e-5 of transformers'
   float64 output. */
START_TEST(test_families_over_mpi) {
    const fam_spec* spec = &fam_specs[_i];
    fam_case c;
    moe_ep_expert_weights all[64], mine[64];
    moe_ep_desc d;
    moe_ep_transport t;
    moe_ep_context* ctx = NULL;
    int owner[64], e, n = 0;
    int64_t T = 0, first, count;
    float *y_mine = NULL, *y_all = NULL, *y_one = NULL;
    char text[512] = "";
    bool loaded;
    moe_ep_result made, res = MOE_EP_ERROR_INTERNAL, one = MOE_EP_OK;
    double err = 0.0;
    size_t differ = 0;
    loaded = fam_load(&c, spec->name, text, sizeof text) && fam_desc(&c, spec, all, &d, text, sizeof text);
    CHECK_FACT(loaded, "%s: %s", spec->name, text);
    T = fam_tokens(&c, d.d_model);
    first = T * world_rank / world_size;
    count = T * (world_rank + 1) / world_size - first;
    moe_ep_placement_compute(NULL, d.num_experts, world_size, owner);
    for (e = 0; e < d.num_experts; ++e)
        if (owner[e] == world_rank) mine[n++] = all[e];
    y_mine = (float*)xmalloc(sizeof(float) * (size_t)(count * d.d_model + 1));
    made = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD }, &t);
    CHECK_FACT(made == MOE_EP_OK, "%s: moe_ep_mpi_transport_create returned %s", spec->name, moe_ep_result_string(made));
    d.experts = mine;
    d.experts_count = n;
    d.transport = &t;
    d.num_threads = 1;
    res = moe_ep_create(&d, &ctx);
    if (res == MOE_EP_OK)
        res = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = count, .x = fam_f32(&c, "input") + first * d.d_model,
                                                          .y = y_mine });
    if (res != MOE_EP_OK) snprintf(text, sizeof text, "%s", ctx ? moe_ep_last_error(ctx) : "create failed");
    moe_ep_destroy(ctx);
    moe_ep_mpi_transport_destroy(&t);
    CHECK_FACT(res == MOE_EP_OK, "%s: the MPI forward returned %s (%s)", spec->name, moe_ep_result_string(res), text);
    if (world_rank == 0) {
        y_all = (float*)xmalloc(sizeof(float) * (size_t)(T * d.d_model + 1));
        y_one = (float*)xmalloc(sizeof(float) * (size_t)(T * d.d_model + 1));
        test_poison(y_all, (size_t)(T * d.d_model));
    }
    test_mpi_gather_rows(test_comm, y_mine, count, d.d_model, y_all);
    if (world_rank == 0) {
        moe_ep_context* single = NULL;
        d.experts = all;
        d.experts_count = d.num_experts;
        d.transport = NULL;
        one = moe_ep_create(&d, &single);
        if (one == MOE_EP_OK)
            one = moe_ep_forward(single, &(moe_ep_forward_args){ .tokens = T, .x = fam_f32(&c, "input"), .y = y_one });
        moe_ep_destroy(single);
        if (one == MOE_EP_OK) {
            differ = test_first_difference(y_all, y_one, (size_t)(T * d.d_model));
            err = rel_error_f64(y_all, fam_f64(&c, "output_f64"), (size_t)(T * d.d_model));
        }
    }
    CHECK_FACT(one == MOE_EP_OK, "%s: the one-rank layer returned %s", spec->name, moe_ep_result_string(one));
    CHECK_FACT(world_rank != 0 || differ == (size_t)(T * d.d_model), "%s: %d processes differ from one rank at element %zu", spec->name,
               world_size, differ);
    CHECK_FACT(err <= 1e-5, "%s: relative error %.3g against transformers' float64 output at %d processes",
               spec->name, err, world_size);
    free(y_mine); free(y_all); free(y_one);
    fam_free(&c);
}
END_TEST

static Suite* mpi_suite(void) {
    Suite* s = suite_create("moe_ep_mpi");
    TCase* transport = tcase_create("transport");
    TCase* layer = tcase_create("layer");
    TCase* failures = tcase_create("failures");
    TCase* limits = tcase_create("limits");
    TCase* groups = tcase_create("groups");
    tcase_add_test(transport, test_transport_identity);
    tcase_add_test(transport, test_exchange_counts);
    tcase_add_loop_test(transport, test_segmented_all_to_all, 0, 7);
    tcase_add_loop_test(layer, test_layer_matches_one_rank_and_pthreads, 0, LAYER_CASES);
    tcase_add_loop_test(layer, test_families_over_mpi, 0, FAM_SPECS);
    tcase_add_loop_test(failures, test_rank_mismatch, 0, 2);
    tcase_add_test(failures, test_expert_failure_reaches_every_rank);
    tcase_add_test(failures, test_mpi_error_becomes_result);
    tcase_add_test(failures, test_create_refuses_bad_communicators);
    tcase_add_test(failures, test_unsupported_rows_fail_symmetrically);
    tcase_add_test(failures, test_allocations_are_returned);
    tcase_add_loop_test(failures, test_rank_fault_in_dispatch, 0, 2);
    tcase_add_test(failures, test_late_rank_times_out);
    tcase_add_test(limits, test_large_layout_arithmetic);
    tcase_add_loop_test(groups, test_all_reduce_sum_in_rank_order, 0, 2);
    tcase_add_test(groups, test_all_reduce_sum_refuses_together);
    tcase_add_test(groups, test_split_groups);
    tcase_add_loop_test(groups, test_layouts_match_pthreads, 0, 6);
    suite_add_tcase(s, transport);
    suite_add_tcase(s, layer);
    suite_add_tcase(s, failures);
    suite_add_tcase(s, limits);
    suite_add_tcase(s, groups);
    return s;
}

int main(int argc, char** argv) {
    SRunner* sr;
    int failed, failed_all = 0;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world_size);
    if (!test_mpi_world_size_ok(argc, argv, "check_mpi", 0)) {
        MPI_Finalize();
        return 2;
    }
    MPI_Comm_dup(MPI_COMM_WORLD, &test_comm);
    if (world_rank == 0) {
        const char* env = getenv("MOE_EP_TEST_SEED");
        base_seed = env && *env ? (uint64_t)strtoull(env, NULL, 10)
                                : (uint64_t)time(NULL) * 2654435761ull ^ (uint64_t)getpid();
        printf("check_mpi: %d ranks, seed %llu (MOE_EP_TEST_SEED=%llu repeats it)\n", world_size,
               (unsigned long long)base_seed, (unsigned long long)base_seed);
        fflush(stdout);
    }
    MPI_Bcast(&base_seed, 1, MPI_UINT64_T, 0, test_comm);

    sr = srunner_create(mpi_suite());
    srunner_set_fork_status(sr, CK_NOFORK);     /* never fork an MPI process */
    srunner_run_all(sr, world_rank == 0 ? CK_NORMAL : CK_SILENT);
    failed = srunner_ntests_failed(sr);
    if (world_rank != 0 && failed > 0) {
        TestResult** results = srunner_failures(sr);
        int i;
        char prefix[32];
        snprintf(prefix, sizeof prefix, "rank %d: ", world_rank);
        for (i = 0; i < failed; ++i) {
            const char* msg = tr_msg(results[i]);
            /* a fact's message already starts with the rank */
            fprintf(stderr, "%s%s:%d: %s\n", strncmp(msg, prefix, strlen(prefix)) == 0 ? "" : prefix,
                    tr_lfile(results[i]), tr_lno(results[i]), msg);
        }
        free(results);
    }
    srunner_free(sr);
    MPI_Allreduce(&failed, &failed_all, 1, MPI_INT, MPI_MAX, test_comm);
    MPI_Comm_free(&test_comm);
    MPI_Finalize();
    return failed_all == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
