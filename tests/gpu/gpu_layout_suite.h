/* gpu_layout_suite.h -- the harness that check_nccl.c and check_cuda_layout.c share: one
   thread per GPU, a suite of numbered subtests per EP x TP x DP layout with a checkpoint
   between subtests (after a failure no rank starts a collective call that a failed peer may
   never join), the model and data shards every rank makes from the seeds, the groups
   split from the world transport, and the CPU reference. The including file defines
   MOE_EP_IMPLEMENTATION, includes transports/moe_ep_nccl.h, tests/support/test_support.h and
   gpu_check.h first. */
#ifndef GPU_LAYOUT_SUITE_H
#define GPU_LAYOUT_SUITE_H

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <stdarg.h>
#include <time.h>

#define MAX_GPUS 8
#define MAX_SUB 16
#define E_ALL 8
#define TOP_K 2

/* >>helpers (and tests/support) */
static void fill(float* v, size_t n, float scale, int round_bf16, uint64_t seed) {
    size_t i;
    uint64_t s = seed;
    for (i = 0; i < n; ++i) {
        v[i] = scale * test_rng_uniform(&s);
        if (round_bf16) v[i] = test_bf16_to_float(test_bf16_from_float(v[i]));
    }
}

/* >>world: one thread per rank, a suite of numbered subtests per layout */
typedef struct rank_env {
    int rank, world, device;
    ncclComm_t comm;
    cudaStream_t stream;
    moe_ep_transport transport;
    int sub;                        /* the subtest being run */
    int failed[MAX_SUB];
    char message[MAX_SUB][400];
    void* kept[MAX_SUB];            /* outputs compared across the TP group after the join */
    size_t kept_bytes[MAX_SUB];
    void* suite;
} rank_env;

typedef struct suite suite;
typedef void (*suite_fn)(rank_env* env);

struct suite {
    suite_fn fn;
    moe_ep_layout_desc layout;      /* resolved */
    int count;                      /* subtests */
    const char* names[MAX_SUB];
    int tp_equal[MAX_SUB];          /* kept outputs must be equal across each TP group */
    /* the checkpoint between subtests: after a failure no rank starts another collective
       call that a failed peer may never join */
    pthread_mutex_t mutex;
    pthread_cond_t cond;
    int arrived, ranks, any_failed, stop, last_run;
    unsigned long generation;
};

typedef struct world {
    int size;
    int devices[MAX_GPUS];
    ncclComm_t comms[MAX_GPUS];
    int aborted;                    /* a timeout aborted a rank's world communicator */
    rank_env env[MAX_GPUS];
} world;


static void rank_fail(rank_env* env, const char* fmt, ...) {
    va_list ap;
    int s = env->sub;
    if (env->failed[s]) return;
    env->failed[s] = 1;
    va_start(ap, fmt);
    vsnprintf(env->message[s], sizeof env->message[s], fmt, ap);
    va_end(ap);
}

static void note(rank_env* env, const char* fmt, ...) {
    va_list ap;
    int s = env->sub;
    if (env->failed[s] || env->rank != 0) return;
    va_start(ap, fmt);
    vsnprintf(env->message[s], sizeof env->message[s], fmt, ap);
    va_end(ap);
}

static void keep(rank_env* env, const void* data, size_t bytes) {
    free(env->kept[env->sub]);
    env->kept[env->sub] = malloc(bytes + 1);
    if (env->kept[env->sub]) memcpy(env->kept[env->sub], data, bytes);
    env->kept_bytes[env->sub] = bytes;
}

/* All ranks meet here after a subtest; returns 1 on every rank if any rank failed it. */
static int checkpoint(rank_env* env) {
    suite* su = (suite*)env->suite;
    unsigned long generation;
    int stop;
    pthread_mutex_lock(&su->mutex);
    generation = su->generation;
    su->any_failed |= env->failed[env->sub];
    if (++su->arrived == su->ranks) {
        su->stop = su->any_failed;
        su->last_run = env->sub;
        su->arrived = 0;
        su->generation++;
        pthread_cond_broadcast(&su->cond);
    } else {
        while (generation == su->generation) pthread_cond_wait(&su->cond, &su->mutex);
    }
    stop = su->stop;
    pthread_mutex_unlock(&su->mutex);
    return stop;
}

static void* rank_main(void* arg) {
    rank_env* env = (rank_env*)arg;
    suite* su = (suite*)env->suite;
    if (cudaSetDevice(env->device) != cudaSuccess) { rank_fail(env, "cudaSetDevice"); return NULL; }
    if (cudaStreamCreate(&env->stream) != cudaSuccess) { rank_fail(env, "cudaStreamCreate"); return NULL; }
    if (moe_ep_nccl_transport_create(&(moe_ep_nccl_desc){ .comm = env->comm, .stream = env->stream, .timeout_ms = 60000 },
                                     &env->transport) != MOE_EP_OK) {
        rank_fail(env, "moe_ep_nccl_transport_create failed");
    } else {
        su->fn(env);
        {   /* the communicator was aborted, or will be at destroy */
            const moe_ep__nccl* n = (const moe_ep__nccl*)env->transport.impl;
            if (n->broken || n->abort_requested) env->failed[MAX_SUB - 1] = 1;
        }
        moe_ep_nccl_transport_destroy(&env->transport);
    }
    cudaStreamSynchronize(env->stream);
    cudaStreamDestroy(env->stream);
    return NULL;
}

static void run_suite(world* w, suite* su) {
    pthread_t threads[MAX_GPUS];
    const moe_ep_layout_desc* l = &su->layout;
    int r, s;
    for (r = 0; r < w->size; ++r) {
        rank_env* env = &w->env[r];
        memset(env, 0, sizeof *env);
        env->rank = r;
        env->world = w->size;
        env->device = w->devices[r];
        env->comm = w->comms[r];
        env->suite = su;
    }
    pthread_mutex_init(&su->mutex, NULL);
    pthread_cond_init(&su->cond, NULL);
    su->ranks = w->size;
    for (r = 0; r < w->size; ++r) pthread_create(&threads[r], NULL, rank_main, &w->env[r]);
    for (r = 0; r < w->size; ++r) pthread_join(threads[r], NULL);
    pthread_mutex_destroy(&su->mutex);
    pthread_cond_destroy(&su->cond);
    for (r = 0; r < w->size; ++r) w->aborted |= w->env[r].failed[MAX_SUB - 1];
    for (s = 0; s < su->count; ++s) {
        char why[600] = "";
        for (r = 0; r < w->size; ++r)
            if (w->env[r].failed[s]) {
                if (why[0]) printf("      (also rank %d: %s)\n", r, w->env[r].message[s]);
                else snprintf(why, sizeof why, "rank %d: %s", r, w->env[r].message[s]);
            }
        if (!why[0] && su->tp_equal[s]) {
            /* every rank against the first rank of its TP group */
            for (r = 0; r < w->size && !why[0]; ++r) {
                int group[MAX_GPUS];
                const rank_env* a;
                const rank_env* b = &w->env[r];
                moe_ep_layout_group(l, r, MOE_EP_GROUP_TP, group, MAX_GPUS);
                a = &w->env[group[0]];
                if (!a->kept[s] || !b->kept[s] || a->kept_bytes[s] != b->kept_bytes[s] ||
                    memcmp(a->kept[s], b->kept[s], a->kept_bytes[s]) != 0)
                    snprintf(why, sizeof why, "rank %d differs from TP rank 0 (rank %d)", r, group[0]);
            }
        }
        if (!why[0] && su->stop && s > su->last_run) snprintf(why, sizeof why, "not run: an earlier subtest failed");
        gpu_fact(why[0] != 0, "world=%d EP %d x TP %d x DP %d  %s%s%s", w->size, l->ep_size, l->tp_size, l->dp_size,
                 su->names[s], "  ", why[0] ? why : w->env[0].message[s]);
    }
    for (r = 0; r < w->size; ++r)
        for (s = 0; s < MAX_SUB; ++s) free(w->env[r].kept[s]);
    fflush(stdout);
}

/* MOE_EP_TEST_PROGRESS=1: rank 0 prints each step as it starts, for finding a slow or stuck
   one; =2: every rank does. */
static void progress(rank_env* env, const char* step) {
    static time_t start;
    const char* level = getenv("MOE_EP_TEST_PROGRESS");
    if (!level || (env->rank != 0 && atoi(level) < 2)) return;
    if (!start) start = time(NULL);
    printf("      [%3.0f s] rank %d: %s\n", difftime(time(NULL), start), env->rank, step);
    fflush(stdout);
}

/* >>model: every rank makes the same weights and shards from the seeds */
typedef struct model {
    int d, ff, bf16;
    float* router;                  /* [E, d] */
    float* weights;                 /* [E][w1 | w3 | w2] */
    moe_ep_expert_weights all[E_ALL];
} model;

static void model_make(model* m, int d, int ff, int bf16, uint64_t seed) {
    int e;
    size_t per = 3 * (size_t)d * (size_t)ff;
    memset(m, 0, sizeof *m);        /* the experts' biases stay NULL */
    m->d = d;
    m->ff = ff;
    m->bf16 = bf16;
    m->router = (float*)malloc(sizeof(float) * E_ALL * (size_t)d);
    m->weights = (float*)malloc(sizeof(float) * per * E_ALL);
    fill(m->router, E_ALL * (size_t)d, 3.0f / sqrtf((float)d), bf16, seed);
    for (e = 0; e < E_ALL; ++e) {
        float* w = m->weights + per * (size_t)e;
        fill(w, 2 * (size_t)d * (size_t)ff, 1.7f / sqrtf((float)d), bf16, seed * 31 + (uint64_t)e + 1);
        fill(w + 2 * (size_t)d * (size_t)ff, (size_t)d * (size_t)ff, 1.7f / sqrtf((float)ff), bf16,
             seed * 37 + (uint64_t)e + 1000);
        m->all[e].w1 = w;
        m->all[e].w3 = w + (size_t)d * (size_t)ff;
        m->all[e].w2 = w + 2 * (size_t)d * (size_t)ff;
    }
}

static void model_free(model* m) {
    free(m->router);
    free(m->weights);
}

/* The data shard of a rank: the ranks of a TP group share one. */
static int shard_tokens(int shard) {
    static const int tokens[4] = { 97, 0, 64, 33 };
    return tokens[shard % 4];
}

static int shard_of(const moe_ep_layout_desc* l, int rank) {
    moe_ep_coords c;
    moe_ep_layout_coords(l, rank, &c);
    return c.dp * l->ep_size + c.ep;
}

static float* shard_x(const model* m, int shard, int T) {
    float* x = (float*)malloc(sizeof(float) * ((size_t)T * (size_t)m->d + 1));
    fill(x, (size_t)T * (size_t)m->d, 1.0f, m->bf16, 7777 + (uint64_t)shard);
    return x;
}

/* The core's CPU layer on one rank with every expert, over the given routing. */
static moe_ep_result cpu_reference(const model* m, int T, const float* x, const int32_t* idx, const float* w, float* y) {
    moe_ep_context* ctx = NULL;
    moe_ep_result res = moe_ep_create(&(moe_ep_desc){ .d_model = m->d, .d_ff = m->ff, .num_experts = E_ALL,
                                                      .top_k = TOP_K, .router_weight = m->router, .experts = m->all,
                                                      .num_threads = 1 }, &ctx);
    if (res == MOE_EP_OK)
        res = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = T, .x = x, .y = y, .routing_in = true,
                                                          .topk_idx = (int32_t*)(uintptr_t)idx,
                                                          .topk_weight = (float*)(uintptr_t)w });
    moe_ep_destroy(ctx);
    return res;
}

/* >>groups */
typedef struct groups {
    moe_ep_transport ep, tp, dp;
    int have;
} groups;

static int index_in(const int* ranks, int n, int rank) {
    int i;
    for (i = 0; i < n; ++i) if (ranks[i] == rank) return i;
    return -1;
}

static void check_group(rank_env* env, const moe_ep_layout_desc* l, moe_ep_group_kind kind, const moe_ep_transport* t,
                        const char* name) {
    int ranks[MAX_GPUS], n = moe_ep_layout_group(l, env->rank, kind, ranks, MAX_GPUS), p;
    int64_t send[MAX_GPUS], recv[MAX_GPUS];
    char err[256] = "";
    if (t->world_size != n || t->rank != index_in(ranks, n, env->rank)) {
        rank_fail(env, "%s group: rank %d of %d, the layout says %d of %d", name, t->rank, t->world_size,
             index_in(ranks, n, env->rank), n);
    }
    for (p = 0; p < MAX_GPUS; ++p) { send[p] = env->rank; recv[p] = -1; }
    if (t->exchange_counts(t->impl, send, recv, 1, err, sizeof err) != MOE_EP_OK) {
        rank_fail(env, "%s group exchange: %s", name, err);
        return;
    }
    for (p = 0; p < n && p < t->world_size; ++p)
        if (recv[p] != ranks[p]) rank_fail(env, "%s group: member %d is world rank %lld, the layout says %d", name, p,
                                      (long long)recv[p], ranks[p]);
}

static void test_groups(rank_env* env, groups* g) {
    suite* su = (suite*)env->suite;
    const moe_ep_layout_desc* l = &su->layout;
    check_group(env, l, MOE_EP_GROUP_EP, &g->ep, "EP");
    check_group(env, l, MOE_EP_GROUP_TP, &g->tp, "TP");
    check_group(env, l, MOE_EP_GROUP_DP, &g->dp, "DP");
}

/* Splits the world into this rank's EP, TP and DP groups; on failure (the same verdict on
   every rank) every subtest of the suite fails and 0 is returned. */
static int split_groups(rank_env* env, groups* g) {
    suite* su = (suite*)env->suite;
    const moe_ep_layout_desc* l = &su->layout;
    moe_ep_result res;
    int i;
    memset(g, 0, sizeof *g);
    env->sub = 0;
    progress(env, "split");
    res = moe_ep_layout_split(l, &env->transport, MOE_EP_GROUP_EP, &g->ep, NULL, 0);
    if (res == MOE_EP_OK) {
        res = moe_ep_layout_split(l, &env->transport, MOE_EP_GROUP_TP, &g->tp, NULL, 0);
        if (res != MOE_EP_OK) moe_ep_nccl_transport_destroy(&g->ep);
    }
    if (res == MOE_EP_OK) {
        res = moe_ep_layout_split(l, &env->transport, MOE_EP_GROUP_DP, &g->dp, NULL, 0);
        if (res != MOE_EP_OK) { moe_ep_nccl_transport_destroy(&g->tp); moe_ep_nccl_transport_destroy(&g->ep); }
    }
    if (res == MOE_EP_OK) return 1;
    for (i = 0; i < su->count; ++i) { env->sub = i; rank_fail(env, "moe_ep_layout_split: %s", moe_ep_result_string(res)); }
    return 0;
}

static void destroy_groups(rank_env* env, groups* g) {
    progress(env, "destroy");
    moe_ep_nccl_transport_destroy(&g->dp);
    moe_ep_nccl_transport_destroy(&g->tp);
    moe_ep_nccl_transport_destroy(&g->ep);
}

/* Starts subtest `sub` unless a rank failed an earlier one (then 0 on every rank). */
static int begin(rank_env* env, int sub, const char* name) {
    if (sub > 0 && checkpoint(env)) return 0;
    env->sub = sub;
    progress(env, name);
    return 1;
}

static int make_world(world* w, int size) {
    w->size = size;
    return gpu_init_comms(w->comms, w->devices, size);
}

/* A layout's suite: fn on every rank of w over the layout EP x TP x DP (resolved), with the
   subtests' names still to add; 0 (and a fact) if the layout is invalid. */
static int layout_suite_begin(suite* su, const world* w, int ep, int tp, int dp, suite_fn fn) {
    char err[256];
    memset(su, 0, sizeof *su);
    su->fn = fn;
    if (moe_ep_layout_resolve(&(moe_ep_layout_desc){ .world_size = w->size, .ep_size = ep, .tp_size = tp, .dp_size = dp,
                                                    .num_experts = E_ALL }, &su->layout, err, sizeof err) != MOE_EP_OK) {
        gpu_fact(1, "world=%d layout EP %d x TP %d x DP %d: %s", w->size, ep, tp, dp, err);
        return 0;
    }
    su->names[su->count++] = "groups match moe_ep_layout_group";
    return 1;
}

static void free_world(world* w) {
    int r;
    /* after a timeout some communicators are gone (ncclCommAbort frees them): release none
       of the others by a call that could wait for their peers */
    if (w->aborted) return;
    for (r = 0; r < w->size; ++r) ncclCommDestroy(w->comms[r]);
}

#endif
