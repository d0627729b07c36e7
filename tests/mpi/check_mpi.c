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

#include <check.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static MPI_Comm test_comm;          /* the harness's own traffic */
static int world_rank, world_size;
static unsigned long long base_seed;

/* ---- helpers ---------------------------------------------------------------------- */

static unsigned long long next_random(unsigned long long* s) {   /* splitmix64 */
    unsigned long long z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void fill_uniform(float* v, size_t n, float scale, unsigned long long* s) {
    size_t i;
    for (i = 0; i < n; ++i) v[i] = scale * ((float)(next_random(s) >> 40) / 8388608.0f - 1.0f);
}

/* Waits without spinning: while rank 0 computes a reference, the others sleep instead
   of taking the cores from it (processes outnumber cores in these runs, and MPICH
   polls without yielding). */
static void quiet_wait(MPI_Request* request) {
    struct timespec pause = { 0, 200000 };
    int done = 0;
    for (;;) {
        MPI_Test(request, &done, MPI_STATUS_IGNORE);
        if (done) return;
        nanosleep(&pause, NULL);
    }
}

/* Every rank's verdict, agreed: 1 only if all ranks pass 1. */
static int all_ok(int ok) {
    int all = 0;
    MPI_Request request;
    MPI_Iallreduce(&ok, &all, 1, MPI_INT, MPI_MIN, test_comm, &request);
    quiet_wait(&request);
    return all;
}

/* Rank 0's verdict, to every rank. */
static int from_rank0(int verdict) {
    MPI_Request request;
    MPI_Ibcast(&verdict, 1, MPI_INT, 0, test_comm, &request);
    quiet_wait(&request);
    return verdict;
}

static void* xmalloc(size_t size) {
    void* p = malloc(size ? size : 1);
    if (!p) { fprintf(stderr, "check_mpi: out of memory\n"); MPI_Abort(MPI_COMM_WORLD, 3); }
    return p;
}

typedef struct counting_allocator { long outstanding, total; } counting_allocator;

static void* counting_alloc(size_t size, void* user) {
    counting_allocator* c = (counting_allocator*)user;
    c->outstanding++;
    c->total++;
    return malloc(size);
}

static void counting_free(void* ptr, void* user) {
    counting_allocator* c = (counting_allocator*)user;
    if (ptr) c->outstanding--;
    free(ptr);
}

typedef struct recording_logger { int calls; char last[512]; } recording_logger;

static void record_log(const char* tag, uint32_t level, uint32_t item, int rank, const char* message, void* user) {
    recording_logger* r = (recording_logger*)user;
    (void)tag; (void)level; (void)item; (void)rank;
    r->calls++;
    snprintf(r->last, sizeof r->last, "%s", message);
}

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
} layer_case;

static const int used_subset[] = { 0, 5, 6, 11 };

static const layer_case layer_cases[] = {
    { "seed-like",        32, 64, 16, 2, { 37, 29, 41, 13 }, MOE_EP_ACTIVATION_SWIGLU, MOE_EP_PLACEMENT_CONTIGUOUS, true, 0, 0, 1 },
    { "empty-ranks",      24, 40, 8,  2, { 19, 0, 31, 0 },   MOE_EP_ACTIVATION_SWIGLU, MOE_EP_PLACEMENT_CONTIGUOUS, true, 0, 0, 1 },
    { "empty-experts",    16, 48, 12, 2, { 17, 9, 1, 26 },   MOE_EP_ACTIVATION_SWIGLU, MOE_EP_PLACEMENT_CONTIGUOUS, false, 0, 4, 1 },
    { "k-equals-E",       24, 40, 5,  5, { 11, 3, 8, 1 },    MOE_EP_ACTIVATION_SWIGLU, MOE_EP_PLACEMENT_CONTIGUOUS, true, 0, 0, 1 },
    { "fewer-experts",    20, 36, 3,  2, { 13, 7, 29, 2 },   MOE_EP_ACTIVATION_RELU,   MOE_EP_PLACEMENT_CONTIGUOUS, true, 0, 0, 1 },
    { "round-robin-gelu", 20, 36, 7,  3, { 10, 21, 5, 17 },  MOE_EP_ACTIVATION_GELU,   MOE_EP_PLACEMENT_ROUND_ROBIN, false, 0, 0, 1 },
    { "table-relu",       28, 33, 9,  1, { 23, 14, 3, 30 },  MOE_EP_ACTIVATION_RELU,   MOE_EP_PLACEMENT_TABLE, false, 0, 0, 1 },
    { "capacity",         16, 32, 8,  2, { 40, 12, 27, 9 },  MOE_EP_ACTIVATION_SWIGLU, MOE_EP_PLACEMENT_CONTIGUOUS, true, 1.0f, 0, 1 },
    { "openmp-threads",   32, 64, 16, 2, { 37, 29, 41, 13 }, MOE_EP_ACTIVATION_SWIGLU, MOE_EP_PLACEMENT_CONTIGUOUS, true, 0, 0, 2 },
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
    int32_t* topk_idx;              /* [all tokens, k] hand-in routing, or NULL */
    float* topk_weight;
    float* y;                       /* [all tokens, d] output of a pthreads run */
    char error[8][256];
} layer_data;

static void layer_data_create(layer_data* L, const layer_case* c, int ranks, unsigned long long seed) {
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
    L->table = (int*)xmalloc(sizeof(int) * (size_t)c->experts);
    L->owner = (int*)xmalloc(sizeof(int) * (size_t)c->experts);
    fill_uniform(L->x, (size_t)T * (size_t)c->d_model, 1.0f, &seed);
    fill_uniform(L->router, (size_t)c->experts * (size_t)c->d_model, 1.0f / (float)c->d_model, &seed);
    fill_uniform(L->weights, per_expert * (size_t)c->experts, 1.0f / (float)c->d_model, &seed);
    for (e = 0; e < (size_t)c->experts; ++e) {
        L->experts[e].w1 = L->weights + e * per_expert;
        L->experts[e].w3 = L->experts[e].w1 + (size_t)c->d_model * (size_t)c->d_ff;
        L->experts[e].w2 = L->experts[e].w3 + (size_t)c->d_model * (size_t)c->d_ff;
        L->table[e] = (int)((e * 5 + 1) % (size_t)ranks);
    }
    moe_ep_placement_compute(&(moe_ep_placement){ .kind = c->placement, .table = L->table }, c->experts, ranks, L->owner);
    if (c->used_experts > 0) {
        /* hand-in routing over a few experts only: the others get no token at all */
        L->topk_idx = (int32_t*)xmalloc(sizeof(int32_t) * (size_t)(T * c->top_k + 1));
        L->topk_weight = (float*)xmalloc(sizeof(float) * (size_t)(T * c->top_k + 1));
        for (t = 0; t < T; ++t) {
            int first = (int)(next_random(&seed) % (unsigned)c->used_experts), j;
            for (j = 0; j < c->top_k; ++j) {
                L->topk_idx[t * c->top_k + j] = used_subset[(first + j) % c->used_experts];
                L->topk_weight[t * c->top_k + j] = 0.25f + (float)(next_random(&seed) >> 40) / 16777216.0f;
            }
        }
    }
}

static void layer_data_destroy(layer_data* L) {
    free(L->token_start); free(L->x); free(L->y); free(L->router); free(L->weights); free(L->experts);
    free(L->table); free(L->owner); free(L->topk_idx); free(L->topk_weight);
}

static moe_ep_desc layer_desc(const layer_data* L, const moe_ep_expert_weights* mine, const moe_ep_transport* t) {
    const layer_case* c = L->c;
    moe_ep_desc d;
    memset(&d, 0, sizeof d);
    d.d_model = c->d_model; d.d_ff = c->d_ff; d.num_experts = c->experts; d.top_k = c->top_k;
    d.activation = c->activation; d.normalize_topk = c->normalize; d.capacity_factor = c->capacity;
    d.placement.kind = c->placement; d.placement.table = L->table; d.num_threads = c->threads;
    d.router_weight = L->router; d.experts = mine; d.transport = t;
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

/* One rank of the layer with moe_ep_forward; y: this rank's rows. */
static moe_ep_result layer_forward(const layer_data* L, const moe_ep_transport* t, float* y, char* error, size_t size) {
    const layer_case* c = L->c;
    int rank = t->rank;
    int64_t first = L->token_start[rank], T = L->token_start[rank + 1] - first;
    moe_ep_expert_weights* mine = rank_experts(L, rank);
    moe_ep_desc d = layer_desc(L, mine, t);
    moe_ep_context* ctx = NULL;
    moe_ep_result res = moe_ep_create(&d, &ctx);
    if (res == MOE_EP_OK) {
        moe_ep_forward_args a;
        memset(&a, 0, sizeof a);
        a.tokens = T;
        a.x = L->x + first * c->d_model;
        a.y = y;
        if (L->topk_idx) {
            a.routing_in = true;
            a.topk_idx = L->topk_idx + first * c->top_k;
            a.topk_weight = L->topk_weight + first * c->top_k;
        }
        res = moe_ep_forward(ctx, &a);
        if (res != MOE_EP_OK) snprintf(error, size, "rank %d: forward: %.400s", rank, moe_ep_last_error(ctx));
    } else {
        snprintf(error, size, "rank %d: create: %s", rank, moe_ep_result_string(res));
    }
    moe_ep_destroy(ctx);
    free(mine);
    return res;
}

/* The same layer stage by stage with the split-phase dispatch and combine; a barrier on
   the harness's communicator runs while each exchange is open. */
static moe_ep_result layer_stages(const layer_data* L, const moe_ep_transport* t, float* y, char* error, size_t size) {
    const layer_case* c = L->c;
    int rank = t->rank;
    int64_t first = L->token_start[rank], T = L->token_start[rank + 1] - first;
    moe_ep_expert_weights* mine = rank_experts(L, rank);
    moe_ep_desc d = layer_desc(L, mine, t);
    moe_ep_context* ctx = NULL;
    moe_ep_plan* plan = NULL;
    int32_t* idx = (int32_t*)xmalloc(sizeof(int32_t) * (size_t)(T * c->top_k + 1));
    float* weight = (float*)xmalloc(sizeof(float) * (size_t)(T * c->top_k + 1));
    float *rows = NULL, *out = NULL;
    const float* x = L->x + first * c->d_model;
    moe_ep_result res = moe_ep_create(&d, &ctx);
    if (res == MOE_EP_OK) {
        if (L->topk_idx) {
            memcpy(idx, L->topk_idx + first * c->top_k, sizeof(int32_t) * (size_t)(T * c->top_k));
            memcpy(weight, L->topk_weight + first * c->top_k, sizeof(float) * (size_t)(T * c->top_k));
        } else {
            res = moe_ep_route(ctx, x, T, idx, weight, NULL);
        }
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
    if (res != MOE_EP_OK) snprintf(error, size, "rank %d: stages: %s: %.400s", rank, moe_ep_result_string(res),
                                   ctx ? moe_ep_last_error(ctx) : "");
    moe_ep_plan_destroy(plan);
    moe_ep_destroy(ctx);
    free(mine); free(idx); free(weight); free(rows); free(out);
    return res;
}

static moe_ep_result pthreads_rank(const moe_ep_transport* t, void* user) {
    layer_data* L = (layer_data*)user;
    return layer_forward(L, t, L->y + L->token_start[t->rank] * L->c->d_model, L->error[t->rank % 8],
                         sizeof L->error[0]);
}

/* Gathers every rank's rows to rank 0 (counts in tokens: a row type of d floats). */
static void gather_rows(const layer_data* L, const float* mine, float* all) {
    MPI_Datatype row;
    int* counts = (int*)xmalloc(sizeof(int) * (size_t)L->ranks);
    int* displs = (int*)xmalloc(sizeof(int) * (size_t)L->ranks);
    int r;
    for (r = 0; r < L->ranks; ++r) {
        counts[r] = (int)(L->token_start[r + 1] - L->token_start[r]);
        displs[r] = (int)L->token_start[r];
    }
    MPI_Type_contiguous(L->c->d_model, MPI_FLOAT, &row);
    MPI_Type_commit(&row);
    MPI_Gatherv(mine, counts[world_rank], row, all, counts, displs, row, 0, test_comm);
    MPI_Type_free(&row);
    free(counts);
    free(displs);
}

START_TEST(test_layer_matches_one_rank_and_pthreads) {
    const layer_case* c = &layer_cases[_i];
    unsigned long long seed = base_seed + 1000u * (unsigned)_i;
    layer_data L;
    moe_ep_transport t;
    int64_t T, mineT;
    size_t d = (size_t)c->d_model;
    float *y_fwd, *y_stages, *y_all = NULL, *y_one = NULL;
    char error[512] = "", report[1024] = "";
    int ok = 1, r0ok = 1;
    moe_ep_result res;

    layer_data_create(&L, c, world_size, seed);
    T = L.token_start[world_size];
    mineT = L.token_start[world_rank + 1] - L.token_start[world_rank];
    y_fwd = (float*)xmalloc(sizeof(float) * (size_t)(mineT * c->d_model + 1));
    y_stages = (float*)xmalloc(sizeof(float) * (size_t)(mineT * c->d_model + 1));
    memset(y_fwd, 0xFF, sizeof(float) * (size_t)(mineT * c->d_model + 1));     /* NaN poison */
    memset(y_stages, 0xFF, sizeof(float) * (size_t)(mineT * c->d_model + 1));

    res = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD }, &t);
    if (res != MOE_EP_OK) { ok = 0; snprintf(error, sizeof error, "transport create: %s", moe_ep_result_string(res)); }
    else if (_i % 2) {      /* every segment as its own messages, of at most 2 rows */
        ((moe_ep__mpi_impl*)t.impl)->rule.direct_bytes = 1;
        ((moe_ep__mpi_impl*)t.impl)->rule.chunk_rows = 2;
    }
    if (ok) {
        res = layer_forward(&L, &t, y_fwd, error, sizeof error);
        ok = res == MOE_EP_OK;
    }
    if (ok) {
        res = layer_stages(&L, &t, y_stages, error, sizeof error);
        ok = res == MOE_EP_OK;
    }
    if (ok && memcmp(y_fwd, y_stages, sizeof(float) * (size_t)mineT * d) != 0) {
        ok = 0;
        snprintf(error, sizeof error, "rank %d: forward and split-phase stages differ", world_rank);
    }
    moe_ep_mpi_transport_destroy(&t);

    if (world_rank == 0) {
        y_all = (float*)xmalloc(sizeof(float) * (size_t)(T * c->d_model + 1));
        y_one = (float*)xmalloc(sizeof(float) * (size_t)(T * c->d_model + 1));
        memset(y_all, 0xFF, sizeof(float) * (size_t)(T * c->d_model + 1));
    }
    gather_rows(&L, y_fwd, y_all);
    if (world_rank == 0) {
        /* the one-rank layer over all tokens, and the pthreads world at this size */
        moe_ep_context* single = NULL;
        moe_ep_pthreads_world* world = NULL;
        moe_ep_desc one = layer_desc(&L, L.experts, NULL);
        one.placement.kind = MOE_EP_PLACEMENT_CONTIGUOUS;
        one.num_threads = 1;
        memset(y_one, 0xFF, sizeof(float) * (size_t)(T * c->d_model + 1));
        memset(L.y, 0xFF, sizeof(float) * (size_t)T * d);
        res = moe_ep_create(&one, &single);
        if (res == MOE_EP_OK)
            res = moe_ep_forward(single, &(moe_ep_forward_args){ .tokens = T, .x = L.x, .y = y_one,
                                 .routing_in = L.topk_idx != NULL, .topk_idx = L.topk_idx, .topk_weight = L.topk_weight });
        if (res != MOE_EP_OK) {
            r0ok = 0;
            snprintf(report, sizeof report, "one-rank layer failed: %s", moe_ep_last_error(single));
        }
        moe_ep_destroy(single);
        if (r0ok && moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = world_size, .timeout_ms = 60000 },
                                                 &world) == MOE_EP_OK) {
            res = moe_ep_pthreads_run(world, pthreads_rank, &L, NULL);
            moe_ep_pthreads_world_destroy(world);
            if (res != MOE_EP_OK) {
                r0ok = 0;
                snprintf(report, sizeof report, "pthreads layer failed: %s (%s)", moe_ep_result_string(res), L.error[0]);
            }
        } else if (r0ok) {
            r0ok = 0;
            snprintf(report, sizeof report, "cannot create the pthreads world");
        }
        if (r0ok && ok && memcmp(y_all, L.y, sizeof(float) * (size_t)T * d) != 0) {
            r0ok = 0;
            snprintf(report, sizeof report, "MPI output differs from the pthreads output at %d ranks", world_size);
        }
        if (r0ok && ok && c->capacity == 0.0f && memcmp(y_all, y_one, sizeof(float) * (size_t)T * d) != 0) {
            r0ok = 0;
            snprintf(report, sizeof report, "MPI output differs from the one-rank output");
        }
    }
    r0ok = from_rank0(r0ok);
    ok = all_ok(ok);
    layer_data_destroy(&L);
    free(y_fwd); free(y_stages); free(y_all); free(y_one);
    ck_assert_msg(ok, "case %s, seed %llu: a rank failed (%s)", c->name, seed, error[0] ? error : "another rank");
    ck_assert_msg(r0ok, "case %s, seed %llu: %s", c->name, seed, report);
}
END_TEST

/* ---- the transport on its own ------------------------------------------------------ */

START_TEST(test_transport_identity) {
    moe_ep_transport t, dflt;
    moe_ep_result a = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD }, &t);
    moe_ep_result b = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = (MPI_Comm)0 }, &dflt);
    int ok = a == MOE_EP_OK && b == MOE_EP_OK && t.rank == world_rank && t.world_size == world_size &&
             dflt.rank == world_rank && dflt.world_size == world_size && t.local_ranks == 1 &&
             strcmp(t.name, "mpi") == 0 && t.barrier && t.all_to_all_v_begin && t.all_to_all_v_end && !t.abort;
    if (a == MOE_EP_OK) ok = ok && t.barrier(t.impl, NULL, 0) == MOE_EP_OK;
    if (a == MOE_EP_OK) {
        /* the library talks on a duplicate, never on the application's communicator */
        int same = 0;
        MPI_Comm_compare(((moe_ep__mpi_impl*)t.impl)->comm, MPI_COMM_WORLD, &same);
        ok = ok && same == MPI_CONGRUENT;
    }
    if (a == MOE_EP_OK) moe_ep_mpi_transport_destroy(&t);
    if (b == MOE_EP_OK) moe_ep_mpi_transport_destroy(&dflt);
    ok = all_ok(ok && t.impl == NULL && t.exchange_counts == NULL);
    ck_assert_msg(ok, "rank, size, name, callbacks or the duplicate communicator are wrong");
}
END_TEST

START_TEST(test_exchange_counts) {
    moe_ep_transport t;
    int R = world_size, count = 3, p, i, ok = 1;
    int64_t* send = (int64_t*)xmalloc(sizeof(int64_t) * (size_t)(R * count));
    int64_t* recv = (int64_t*)xmalloc(sizeof(int64_t) * (size_t)(R * count));
    char err[256] = "";
    for (p = 0; p < R; ++p)
        for (i = 0; i < count; ++i) {
            send[p * count + i] = ((int64_t)world_rank << 40) + ((int64_t)p << 20) + i + (int64_t)(base_seed & 0xFFF) * 1000;
            recv[p * count + i] = -7;
        }
    ok = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD }, &t) == MOE_EP_OK;
    if (ok) ok = t.exchange_counts(t.impl, send, recv, count, err, sizeof err) == MOE_EP_OK;
    for (p = 0; ok && p < R; ++p)
        for (i = 0; i < count; ++i)
            if (recv[p * count + i] != ((int64_t)p << 40) + ((int64_t)world_rank << 20) + i + (int64_t)(base_seed & 0xFFF) * 1000)
                ok = 0;
    moe_ep_mpi_transport_destroy(&t);
    free(send); free(recv);
    ok = all_ok(ok);
    ck_assert_msg(ok, "exchange_counts delivered wrong values (%s)", err);
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

static int64_t a2a_count(unsigned long long seed, int src, int dst, int s) {
    unsigned long long z = seed ^ ((unsigned long long)src << 32) ^ ((unsigned long long)dst << 16) ^ (unsigned long long)s;
    unsigned long long v = next_random(&z);
    return (v % 4 == 0) ? 0 : (int64_t)(v % 7);      /* a quarter of the segments are empty */
}

static unsigned char a2a_byte(int src, int dst, int s, int64_t row, size_t b) {
    return (unsigned char)(src * 37 + dst * 11 + s * 5 + row * 3 + (int64_t)b + 1);
}

/* Places the R*S segments of one side in a random order with random gaps. */
static int64_t a2a_place(const int64_t* counts, int64_t* offsets, int n, unsigned long long* rng) {
    int* order = (int*)xmalloc(sizeof(int) * (size_t)n);
    int i;
    int64_t at = 0;
    for (i = 0; i < n; ++i) order[i] = i;
    for (i = n - 1; i > 0; --i) {
        int j = (int)(next_random(rng) % (unsigned)(i + 1)), tmp = order[i];
        order[i] = order[j]; order[j] = tmp;
    }
    for (i = 0; i < n; ++i) {
        at += (int64_t)(next_random(rng) % 3 == 0);   /* a gap row now and then */
        offsets[order[i]] = at;
        at += counts[order[i]];
    }
    free(order);
    return at + 1;
}

static void a2a_layout_create(a2a_layout* A, unsigned long long seed, int S, size_t row_bytes, int contiguous_send) {
    int R = world_size, me = world_rank, p, s;
    unsigned long long rng = seed ^ (0x1234567ull * (unsigned long long)(me + 1));
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

/* 1 if every received row is right and every gap row still holds the poison. */
static int a2a_layout_check(const a2a_layout* A, char* why, size_t size) {
    int R = world_size, me = world_rank, p, s;
    int64_t r;
    size_t b;
    unsigned char* seen = (unsigned char*)calloc((size_t)A->recv_rows, 1);
    int ok = 1;
    for (p = 0; p < R && ok; ++p)
        for (s = 0; s < A->S && ok; ++s)
            for (r = 0; r < A->recv_counts[p * A->S + s] && ok; ++r) {
                int64_t row = A->recv_offsets[p * A->S + s] + r;
                seen[row] = 1;
                for (b = 0; b < A->row_bytes; ++b)
                    if (A->recv[(size_t)row * A->row_bytes + b] != a2a_byte(p, me, s, r, b)) {
                        snprintf(why, size, "rank %d: row %lld of segment %d from rank %d is wrong", me, (long long)r, s, p);
                        ok = 0;
                        break;
                    }
            }
    for (r = 0; r < A->recv_rows && ok; ++r)
        if (!seen[r])
            for (b = 0; b < A->row_bytes; ++b)
                if (A->recv[(size_t)r * A->row_bytes + b] != 0xEE) {
                    snprintf(why, size, "rank %d: gap row %lld was written", me, (long long)r);
                    ok = 0;
                    break;
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
    unsigned long long seed = base_seed + 77u * (unsigned)_i;
    moe_ep_transport t;
    char err[512] = "", why[256] = "";
    int ok, calls, k;
    /* `calls` gates the next collective, `ok` also holds the data checks: a wrong row on
       one rank must not make that rank skip an exchange the others enter. */
    calls = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD }, &t) == MOE_EP_OK;
    ok = calls;
    if (calls && (_i == 3 || _i == 5)) {
        moe_ep__mpi_impl* m = (moe_ep__mpi_impl*)t.impl;
        m->limits.max_block_rows = 1 + world_rank % 3;          /* each rank its own: a local choice */
        m->limits.max_plain_offset = (int64_t)(world_rank % 2) * 24;
    }
    if (calls && _i >= 4) {     /* the direct rule: the same on every rank */
        moe_ep__mpi_impl* m = (moe_ep__mpi_impl*)t.impl;
        m->rule.direct_bytes = _i == 4 ? 24 : _i == 5 ? 1 : 0;
        if (_i == 5) { m->rule.chunk_rows = 2; m->tag_ub = 0; }
        if (_i == 6) { m->rule.collective_bytes = 40; m->rule.chunk_rows = 3; }
    }
    for (k = 0; calls && k < 3; ++k) {
        a2a_layout A, B;
        moe_ep_a2a_args a, b;
        a2a_layout_create(&A, seed + (unsigned)k, segments[k], row_bytes[k], k == 1);
        a2a_layout_create(&B, seed + 100u + (unsigned)k, segments[(k + 1) % 3], row_bytes[(k + 2) % 3], 0);
        a = a2a_args(&A);
        b = a2a_args(&B);
        if (_i == 0 || _i == 3) {
            calls = t.all_to_all_v(t.impl, &a, err, sizeof err) == MOE_EP_OK;
            if (calls) calls = t.all_to_all_v(t.impl, &b, err, sizeof err) == MOE_EP_OK;
        } else if (_i == 1) {
            void* req = NULL;
            calls = t.all_to_all_v_begin(t.impl, &a, &req, err, sizeof err) == MOE_EP_OK;
            if (calls) calls = t.all_to_all_v_end(t.impl, req, err, sizeof err) == MOE_EP_OK;
            if (calls) calls = t.all_to_all_v_begin(t.impl, &b, &req, err, sizeof err) == MOE_EP_OK;
            if (calls) calls = t.all_to_all_v_end(t.impl, req, err, sizeof err) == MOE_EP_OK;
        } else {   /* 2, 4, 5, 6 */
            void *ra = NULL, *rb = NULL;
            calls = t.all_to_all_v_begin(t.impl, &a, &ra, err, sizeof err) == MOE_EP_OK;
            if (calls) calls = t.all_to_all_v_begin(t.impl, &b, &rb, err, sizeof err) == MOE_EP_OK;
            if (calls) calls = t.all_to_all_v_end(t.impl, rb, err, sizeof err) == MOE_EP_OK;
            if (calls) calls = t.all_to_all_v_end(t.impl, ra, err, sizeof err) == MOE_EP_OK;
        }
        if (!calls || !a2a_layout_check(&A, why, sizeof why) || !a2a_layout_check(&B, why, sizeof why)) ok = 0;
        a2a_layout_destroy(&A);
        a2a_layout_destroy(&B);
    }
    moe_ep_mpi_transport_destroy(&t);
    ok = all_ok(ok);
    ck_assert_msg(ok, "mode %d, seed %llu: %s%s", _i, seed, err, why);
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
    moe_ep_result res, want;
    int ok;
    layer_data_create(&L, &layer_cases[0], world_size, base_seed);
    mine = rank_experts(&L, world_rank);
    ok = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD }, &t) == MOE_EP_OK;
    d = layer_desc(&L, mine, &t);
    if (_i == 0) {
        if (world_rank == world_size - 1 && world_size > 1) d.top_k = 3;
        want = world_size > 1 ? MOE_EP_ERROR_RANK_MISMATCH : MOE_EP_OK;
    } else {
        if (world_rank == 0) d.top_k = d.num_experts + 1;
        want = world_rank == 0 ? MOE_EP_ERROR_INVALID_ARGUMENT : MOE_EP_ERROR_RANK_MISMATCH;
    }
    res = ok ? moe_ep_create(&d, &ctx) : MOE_EP_ERROR_INTERNAL;
    ok = ok && res == want && (res == MOE_EP_OK) == (ctx != NULL);
    moe_ep_destroy(ctx);
    moe_ep_mpi_transport_destroy(&t);
    free(mine);
    layer_data_destroy(&L);
    ok = all_ok(ok);
    ck_assert_msg(ok, "mode %d: rank %d got %s, expected %s", _i, world_rank, moe_ep_result_string(res),
                  moe_ep_result_string(want));
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
    int fail = world_rank == world_size - 1 ? 5 : 0, ok, d = 8, E = 2 * world_size;
    int64_t T = 6, i;
    float* x = (float*)xmalloc(sizeof(float) * (size_t)(T * d));
    float* y = (float*)xmalloc(sizeof(float) * (size_t)(T * d));
    int32_t* idx = (int32_t*)xmalloc(sizeof(int32_t) * (size_t)T);
    float* w = (float*)xmalloc(sizeof(float) * (size_t)T);
    moe_ep_result res = MOE_EP_ERROR_INTERNAL, want;
    for (i = 0; i < T * d; ++i) x[i] = (float)i;
    for (i = 0; i < T; ++i) { idx[i] = (int32_t)(2 * (world_size - 1) + i % 2); w[i] = 1.0f; }  /* all to the last rank */
    ok = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD }, &t) == MOE_EP_OK;
    if (ok) ok = moe_ep_create(&(moe_ep_desc){ .d_model = d, .num_experts = E, .top_k = 1, .expert_fn = failing_expert,
                                               .expert_user_data = &fail, .transport = &t }, &ctx) == MOE_EP_OK;
    if (ok) res = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = T, .x = x, .y = y, .routing_in = true,
                                                             .topk_idx = idx, .topk_weight = w });
    want = fail ? MOE_EP_ERROR_CALLBACK : MOE_EP_ERROR_ABORTED;
    ok = ok && res == want;
    moe_ep_destroy(ctx);
    moe_ep_mpi_transport_destroy(&t);
    free(x); free(y); free(idx); free(w);
    ok = all_ok(ok);
    ck_assert_msg(ok, "rank %d got %s, expected %s", world_rank, moe_ep_result_string(res), moe_ep_result_string(want));
}
END_TEST

START_TEST(test_mpi_error_becomes_result) {
    /* A negative count reaches MPI_Alltoall: MPI reports MPI_ERR_COUNT on every rank, the
       transport turns it into MOE_EP_ERROR_TRANSPORT with MPI's text, and the job lives on. */
    moe_ep_transport t;
    int64_t send[4] = { 0 }, recv[4] = { 0 };
    char err[512] = "", expected[MPI_MAX_ERROR_STRING + 16] = "";
    moe_ep_result res = MOE_EP_ERROR_INTERNAL;
    int ok, len = 0;
    {
        /* what this MPI says about the same call, for comparison (first line: MPICH appends a stack) */
        MPI_Comm probe;
        char text[MPI_MAX_ERROR_STRING + 1];
        int rc;
        MPI_Comm_dup(MPI_COMM_WORLD, &probe);
        MPI_Comm_set_errhandler(probe, MPI_ERRORS_RETURN);
        rc = MPI_Alltoall(send, -1, MPI_INT64_T, recv, -1, MPI_INT64_T, probe);
        MPI_Error_string(rc, text, &len);
        text[len] = '\0';
        text[strcspn(text, "\n")] = '\0';
        snprintf(expected, sizeof expected, "MPI_Alltoall: %s", text);
        MPI_Comm_free(&probe);
    }
    ok = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD }, &t) == MOE_EP_OK;
    if (ok) res = t.exchange_counts(t.impl, send, recv, -1, err, sizeof err);
    ok = ok && res == MOE_EP_ERROR_TRANSPORT && strncmp(err, expected, strlen(expected)) == 0 && strlen(expected) > 14;
    if (res == MOE_EP_ERROR_TRANSPORT) {
        /* the communicator still works afterwards */
        int64_t one[64], back[64];
        int p;
        for (p = 0; p < world_size; ++p) one[p] = world_rank;
        ok = ok && t.exchange_counts(t.impl, one, back, 1, NULL, 0) == MOE_EP_OK;
        for (p = 0; ok && p < world_size; ++p) ok = back[p] == p;
        ok = ok && t.barrier(t.impl, NULL, 0) == MOE_EP_OK;
    }
    moe_ep_mpi_transport_destroy(&t);
    ok = all_ok(ok);
    ck_assert_msg(ok, "got %s '%s', expected TRANSPORT '%s...'", moe_ep_result_string(res), err, expected);
}
END_TEST

START_TEST(test_create_refuses_bad_communicators) {
    recording_logger log;
    moe_ep_transport t, before;
    moe_ep_result a, b;
    int ok;
    memset(&log, 0, sizeof log);
    memset(&t, 0xAB, sizeof t);
    before = t;
    a = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_NULL,
                                                        .logger = { record_log, &log } }, &t);
    ok = a == MOE_EP_ERROR_INVALID_ARGUMENT && log.calls == 1 && strstr(log.last, "MPI_COMM_NULL") != NULL &&
         memcmp(&t, &before, sizeof t) == 0;
    b = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD,
                                                        .allocator = { .alloc_fn = counting_alloc },
                                                        .logger = { record_log, &log } }, &t);
    ok = ok && b == MOE_EP_ERROR_INVALID_ARGUMENT && log.calls == 2 && strstr(log.last, "allocator") != NULL;
    ok = ok && moe_ep_mpi_transport_create(NULL, &t) == MOE_EP_ERROR_INVALID_ARGUMENT;
    ok = all_ok(ok);
    ck_assert_msg(ok, "results %s / %s, log '%s'", moe_ep_result_string(a), moe_ep_result_string(b), log.last);
}
END_TEST

START_TEST(test_unsupported_rows_fail_symmetrically) {
    /* Every rank sees the same row size and memory space, so every rank refuses, before MPI. */
    moe_ep_transport t;
    int64_t zero[64] = { 0 };
    char buf[8], err1[256] = "", err2[256] = "", err3[256] = "";
    moe_ep_a2a_args a;
    moe_ep_result r1 = MOE_EP_ERROR_INTERNAL, r2 = MOE_EP_ERROR_INTERNAL, r3 = MOE_EP_ERROR_INTERNAL;
    int ok = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD }, &t) == MOE_EP_OK;
    memset(&a, 0, sizeof a);
    a.send = buf; a.recv = buf + 4; a.segments = 1;
    a.send_counts = zero; a.send_offsets = zero; a.recv_counts = zero; a.recv_offsets = zero;
    a.row_bytes = (size_t)INT_MAX + 1;
    if (ok) r1 = t.all_to_all_v(t.impl, &a, err1, sizeof err1);
    a.row_bytes = 4;
    a.memory_space = MOE_EP_MEMORY_DEVICE;
    if (ok) r2 = t.all_to_all_v(t.impl, &a, err2, sizeof err2);
    a.memory_space = MOE_EP_MEMORY_HOST;
    a.recv = buf;           /* in place: Open MPI would take it for MPI_IN_PLACE */
    if (ok) r3 = t.all_to_all_v(t.impl, &a, err3, sizeof err3);
    ok = ok && r1 == MOE_EP_ERROR_UNSUPPORTED && strstr(err1, "row_bytes (2147483648)") != NULL &&
         r2 == MOE_EP_ERROR_UNSUPPORTED && strstr(err2, "device memory") != NULL &&
         r3 == MOE_EP_ERROR_INVALID_ARGUMENT && strstr(err3, "same buffer") != NULL;
    ok = ok && t.barrier(t.impl, NULL, 0) == MOE_EP_OK;     /* nobody is left inside a collective */
    moe_ep_mpi_transport_destroy(&t);
    ok = all_ok(ok);
    ck_assert_msg(ok, "got %s '%s', %s '%s' and %s '%s'", moe_ep_result_string(r1), err1, moe_ep_result_string(r2), err2,
                  moe_ep_result_string(r3), err3);
}
END_TEST

START_TEST(test_allocations_are_returned) {
    counting_allocator count = { 0, 0 };
    moe_ep_allocator a = { counting_alloc, counting_free, &count };
    layer_data L;
    moe_ep_transport t;
    moe_ep_context* ctx = NULL;
    moe_ep_expert_weights* mine;
    moe_ep_desc d;
    int64_t first, T;
    float* y;
    int ok;
    layer_data_create(&L, &layer_cases[0], world_size, base_seed + 5);
    mine = rank_experts(&L, world_rank);
    first = L.token_start[world_rank];
    T = L.token_start[world_rank + 1] - first;
    y = (float*)xmalloc(sizeof(float) * (size_t)(T * L.c->d_model + 1));
    ok = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD, .allocator = a }, &t) == MOE_EP_OK;
    d = layer_desc(&L, mine, &t);
    d.allocator = a;
    if (ok) ok = moe_ep_create(&d, &ctx) == MOE_EP_OK;
    if (ok) ok = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = T, .x = L.x + first * L.c->d_model, .y = y })
                 == MOE_EP_OK;
    moe_ep_destroy(ctx);
    moe_ep_mpi_transport_destroy(&t);
    ok = ok && count.total > 0 && count.outstanding == 0;
    free(y); free(mine);
    layer_data_destroy(&L);
    ok = all_ok(ok);
    ck_assert_msg(ok, "rank %d: %ld allocations of %ld outstanding", world_rank, count.outstanding, count.total);
}
END_TEST

/* ---- groups and sums: EP x DP and EP x TP x DP over MPI ------------------------------ */

/* Rank r's input of the sum test: a function of (seed, r, i), so every rank can compute
   everyone's and the expected rank-order sum. */
static float reduce_input(unsigned long long seed, int r, int64_t i) {
    unsigned long long z = seed ^ ((unsigned long long)r << 40) ^ (unsigned long long)i;
    return (float)(next_random(&z) >> 40) / 65536.0f - 128.0f;
}

/* _i: 0 default rounds, 1 rounds of 7 floats per rank (many windows) */
START_TEST(test_all_reduce_sum_in_rank_order) {
    static const int64_t counts[] = { 0, 1, 3, 1000, 100003 };
    moe_ep_transport t;
    char err[512] = "";
    int ok, k, r, calls;
    calls = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD }, &t) == MOE_EP_OK;
    ok = calls;
    if (calls && _i == 1) ((moe_ep__mpi_impl*)t.impl)->reduce_chunk = 7;
    for (k = 0; calls && k < (int)(sizeof counts / sizeof counts[0]); ++k) {
        int64_t n = counts[k] > 1000 && _i == 1 ? 97 : counts[k], i;   /* 7-float rounds: few of them */
        float* data = (float*)xmalloc(sizeof(float) * (size_t)(n + 1));
        for (i = 0; i < n; ++i) data[i] = reduce_input(base_seed + (unsigned)k, world_rank, i);
        data[n] = 12345.0f;     /* past the end: must stay */
        calls = t.all_reduce_sum(t.impl, data, n, MOE_EP_MEMORY_HOST, NULL, err, sizeof err) == MOE_EP_OK;
        for (i = 0; calls && ok && i < n; ++i) {
            float want = reduce_input(base_seed + (unsigned)k, 0, i);
            for (r = 1; r < world_size; ++r) want += reduce_input(base_seed + (unsigned)k, r, i);
            if (memcmp(&want, &data[i], sizeof want) != 0) {
                snprintf(err, sizeof err, "count %lld: element %lld is %.9g, the rank-order sum %.9g", (long long)n,
                         (long long)i, (double)data[i], (double)want);
                ok = 0;
            }
        }
        if (!calls || data[n] != 12345.0f) ok = 0;
        free(data);
    }
    moe_ep_mpi_transport_destroy(&t);
    ok = all_ok(ok);
    ck_assert_msg(ok, "mode %d, seed %llu: %s", _i, base_seed, err);
}
END_TEST

START_TEST(test_all_reduce_sum_refuses_together) {
    /* the last rank passes one element more; then every rank passes device memory */
    moe_ep_transport t;
    float data[8] = { 1, 2, 3, 4, 5, 6, 7, 8 };
    char err1[256] = "", err2[256] = "";
    moe_ep_result r1 = MOE_EP_ERROR_INTERNAL, r2 = MOE_EP_ERROR_INTERNAL;
    int ok = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD }, &t) == MOE_EP_OK;
    int64_t n = world_rank == world_size - 1 && world_size > 1 ? 5 : 4;
    if (ok) r1 = t.all_reduce_sum(t.impl, data, n, MOE_EP_MEMORY_HOST, NULL, err1, sizeof err1);
    if (ok) r2 = t.all_reduce_sum(t.impl, data, 4, MOE_EP_MEMORY_DEVICE, NULL, err2, sizeof err2);
    ok = ok && (world_size == 1 ? r1 == MOE_EP_OK : r1 == MOE_EP_ERROR_INVALID_ARGUMENT && strstr(err1, "elements")) &&
         r2 == MOE_EP_ERROR_UNSUPPORTED && t.barrier(t.impl, NULL, 0) == MOE_EP_OK;
    moe_ep_mpi_transport_destroy(&t);
    ok = all_ok(ok);
    ck_assert_msg(ok, "rank %d: %s '%s', %s '%s'", world_rank, moe_ep_result_string(r1), err1, moe_ep_result_string(r2), err2);
}
END_TEST

START_TEST(test_split_groups) {
    /* color = rank % 2, key = -rank: each group in descending world rank; then the last
       rank passes a negative color and is refused while the others still get a group */
    moe_ep_transport world, group, second;
    int64_t mine[64], theirs[64];
    int ok, q, expected = 0, position = 0, r, got_rank, got_size;
    moe_ep_result res = MOE_EP_ERROR_INTERNAL, res2 = MOE_EP_ERROR_INTERNAL;
    char err[256] = "";
    memset(&group, 0, sizeof group);
    memset(&second, 0, sizeof second);
    ok = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD }, &world) == MOE_EP_OK;
    if (ok) res = world.split(world.impl, world_rank % 2, -world_rank, &group, err, sizeof err);
    for (r = world_size - 1; r >= 0; --r)
        if (r % 2 == world_rank % 2) { if (r > world_rank) position++; expected++; }
    got_rank = group.rank;
    got_size = group.world_size;
    ok = ok && res == MOE_EP_OK && group.world_size == expected && group.rank == position && group.split &&
         group.all_reduce_sum && strcmp(group.name, "mpi") == 0;
    if (res == MOE_EP_OK) {
        for (q = 0; q < group.world_size; ++q) mine[q] = world_rank;
        ok = group.exchange_counts(group.impl, mine, theirs, 1, NULL, 0) == MOE_EP_OK && ok;
        for (q = 0; ok && q < group.world_size; ++q)    /* group rank q is world rank (the q-th of our color, descending) */
            ok = theirs[q] % 2 == world_rank % 2 && (q == 0 || theirs[q] < theirs[q - 1]);
        moe_ep_mpi_transport_destroy(&group);
    }
    if (world.impl) res2 = world.split(world.impl, world_rank == world_size - 1 ? -1 : 0, 0, &second, err, sizeof err);
    ok = ok && (world_rank == world_size - 1 ? res2 == MOE_EP_ERROR_INVALID_ARGUMENT && second.impl == NULL
                                             : res2 == MOE_EP_OK && second.world_size == world_size - 1);
    if (res2 == MOE_EP_OK) moe_ep_mpi_transport_destroy(&second);
    moe_ep_mpi_transport_destroy(&world);
    ok = all_ok(ok);
    ck_assert_msg(ok, "rank %d: split %s (%d of %d, expected %d of %d), negative color %s %s", world_rank,
                  moe_ep_result_string(res), got_rank, got_size, position, expected,
                  moe_ep_result_string(res2), err);
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
        .normalize_topk = true, .num_threads = 1, .router_weight = L->router, .experts = mine,
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
    unsigned long long seed = base_seed + 31u * (unsigned)_i;
    layout_run L;
    moe_ep_transport world;
    float *x, *router, *weights, *y_all = NULL, *y_threads = NULL, *y_one = NULL;
    moe_ep_expert_weights* all;
    size_t per_expert = 3 * (size_t)d_model * (size_t)d_ff, e, rows;
    char report[512] = "";
    int ok, r0ok = 1;
    moe_ep_result res = MOE_EP_ERROR_INTERNAL;
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
    fill_uniform(x, (size_t)shards * rows, 1.0f, &seed);
    fill_uniform(router, (size_t)experts * (size_t)d_model, 0.3f, &seed);
    fill_uniform(weights, per_expert * (size_t)experts, 1.0f / (float)d_model, &seed);
    for (e = 0; e < (size_t)experts; ++e) {
        all[e].w1 = weights + e * per_expert;
        all[e].w3 = all[e].w1 + (size_t)d_model * (size_t)d_ff;
        all[e].w2 = all[e].w3 + (size_t)d_model * (size_t)d_ff;
    }
    L.tokens = tokens; L.d_model = d_model; L.d_ff = d_ff; L.top_k = top_k;
    L.x = x; L.router = router; L.experts = all;
    L.y = (float*)xmalloc(sizeof(float) * rows);
    L.y_is_local = 1;
    memset(L.y, 0xFF, sizeof(float) * rows);
    ok = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD }, &world) == MOE_EP_OK;
    if (ok) res = layout_rank(&world, &L);
    ok = ok && res == MOE_EP_OK;
    moe_ep_mpi_transport_destroy(&world);
    if (world_rank == 0) {
        y_all = (float*)xmalloc(sizeof(float) * (size_t)world_size * rows);
        y_threads = (float*)xmalloc(sizeof(float) * (size_t)world_size * rows);
        y_one = (float*)xmalloc(sizeof(float) * (size_t)shards * rows);
    }
    MPI_Gather(L.y, (int)rows, MPI_FLOAT, y_all, (int)rows, MPI_FLOAT, 0, test_comm);
    if (world_rank == 0) {
        layout_run T = L;
        moe_ep_pthreads_world* threads = NULL;
        moe_ep_context* single = NULL;
        int r;
        T.y = y_threads;
        T.y_is_local = 0;
        memset(y_threads, 0xFF, sizeof(float) * (size_t)world_size * rows);
        if (moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = world_size, .timeout_ms = 60000 },
                                         &threads) != MOE_EP_OK ||
            moe_ep_pthreads_run(threads, layout_rank, &T, NULL) != MOE_EP_OK) {
            r0ok = 0;
            snprintf(report, sizeof report, "the pthreads layout failed: %s", T.error);
        }
        moe_ep_pthreads_world_destroy(threads);
        if (r0ok && ok && memcmp(y_all, y_threads, sizeof(float) * (size_t)world_size * rows) != 0) {
            r0ok = 0;
            snprintf(report, sizeof report, "MPI and pthreads outputs differ");
        }
        if (r0ok && ok && L.layout.tp_size == 1) {
            res = moe_ep_create(&(moe_ep_desc){ .d_model = d_model, .d_ff = d_ff, .num_experts = experts, .top_k = top_k,
                                                .normalize_topk = true, .num_threads = 1, .router_weight = router,
                                                .experts = all }, &single);
            if (res == MOE_EP_OK)
                res = moe_ep_forward(single, &(moe_ep_forward_args){ .tokens = (int64_t)shards * tokens, .x = x, .y = y_one });
            moe_ep_destroy(single);
            for (r = 0; r < world_size && res == MOE_EP_OK && r0ok; ++r)
                if (memcmp(y_all + (size_t)r * rows, y_one + (size_t)layout_shard(&L.layout, r) * rows,
                           sizeof(float) * rows) != 0) {
                    r0ok = 0;
                    snprintf(report, sizeof report, "rank %d differs from the one-rank output", r);
                }
            if (res != MOE_EP_OK) { r0ok = 0; snprintf(report, sizeof report, "the one-rank layer failed"); }
        }
    }
    r0ok = from_rank0(r0ok);
    ok = all_ok(ok);
    free(x); free(router); free(weights); free(all); free(L.y); free(y_all); free(y_threads); free(y_one);
    ck_assert_msg(ok, "EP %d x TP %d x DP %d, seed %llu: the MPI layer failed (%s)", L.layout.ep_size,
                  L.layout.tp_size, L.layout.dp_size, seed, L.error);
    ck_assert_msg(r0ok, "EP %d x TP %d x DP %d, seed %llu: %s", L.layout.ep_size, L.layout.tp_size, L.layout.dp_size,
                  seed, report);
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
    tcase_add_loop_test(failures, test_rank_mismatch, 0, 2);
    tcase_add_test(failures, test_expert_failure_reaches_every_rank);
    tcase_add_test(failures, test_mpi_error_becomes_result);
    tcase_add_test(failures, test_create_refuses_bad_communicators);
    tcase_add_test(failures, test_unsupported_rows_fail_symmetrically);
    tcase_add_test(failures, test_allocations_are_returned);
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
    int expected, failed, failed_all = 0;
    char* end = NULL;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world_size);
    expected = argc > 1 ? (int)strtol(argv[1], &end, 10) : -1;
    if (argc < 2 || *end != '\0' || expected != world_size) {
        if (world_rank == 0)
            fprintf(stderr, "check_mpi: launched as %d process(es), expected %s (usage: mpirun -n N %s N; a "
                            "launcher of another MPI starts N singletons)\n",
                    world_size, argc > 1 ? argv[1] : "a size argument", argv[0]);
        MPI_Finalize();
        return 2;
    }
    MPI_Comm_dup(MPI_COMM_WORLD, &test_comm);
    if (world_rank == 0) {
        const char* env = getenv("MOE_EP_TEST_SEED");
        base_seed = env && *env ? strtoull(env, NULL, 10)
                                : (unsigned long long)time(NULL) * 2654435761ull ^ (unsigned long long)getpid();
        printf("check_mpi: %d ranks, seed %llu (MOE_EP_TEST_SEED=%llu repeats it)\n", world_size, base_seed, base_seed);
        fflush(stdout);
    }
    MPI_Bcast(&base_seed, 1, MPI_UNSIGNED_LONG_LONG, 0, test_comm);

    sr = srunner_create(mpi_suite());
    srunner_set_fork_status(sr, CK_NOFORK);     /* never fork an MPI process */
    srunner_run_all(sr, world_rank == 0 ? CK_NORMAL : CK_SILENT);
    failed = srunner_ntests_failed(sr);
    if (world_rank != 0 && failed > 0) {
        TestResult** results = srunner_failures(sr);
        int i;
        for (i = 0; i < failed; ++i)
            fprintf(stderr, "rank %d: %s:%d: %s\n", world_rank, tr_lfile(results[i]), tr_lno(results[i]), tr_msg(results[i]));
        free(results);
    }
    srunner_free(sr);
    MPI_Allreduce(&failed, &failed_all, 1, MPI_INT, MPI_MAX, test_comm);
    MPI_Comm_free(&test_comm);
    MPI_Finalize();
    return failed_all == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
