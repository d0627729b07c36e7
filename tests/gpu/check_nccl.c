/* check_nccl -- the NCCL transport alone (transports/moe_ep_nccl.h): no CUDA file, no cuBLAS.

   One process, one thread per GPU (ncclCommInitAll). For each world size 1, 2, 4, 8 that
   this machine has GPUs for (one Check loop test each, one assertion per subtest:
   tests/gpu/gpu_check.h):
   - the world transport: exchange_counts (and barrier), and the segmented all_to_all_v
     on device and host memory, blocking and split-phase: every row lands where the
     contract says, nothing else is written; the core's CPU layer over it (host rows)
     equals the single-rank CPU layer bitwise;
   - every layout (EP x TP x DP) of that size, split from the world transport with
     moe_ep_layout_split:
     - groups: each group's rank and size are moe_ep_layout_group's, and an exchange
       inside it reaches exactly the ranks that the layout names, in that order;
     - all_reduce_sum on the world, EP, TP and DP transports, device and host memory, odd
       and large counts, values over 40 binary orders of magnitude (so the order of the
       additions shows): bitwise equal to the sum in group-rank order made on the host,
       and nothing past count is written;
     - the core's CPU layer (moe_ep_forward, host rows, .transport = EP group,
       .tp_transport = TP group) against one rank that holds every expert: bitwise
       without TP; with TP within 1e-6 relative, and bitwise equal on every rank of a TP
       group;
   - last in each world: a split with a negative color on the last rank fails on every
     rank, and the world still works after it.
   A failed subtest stops its suite on every rank; after a timeout aborted a world
   communicator, the rest of that world size is reported as not run.
   MOE_EP_TEST_PROGRESS=1 (or 2: every rank) prints each step as it starts.
   Without a GPU it prints "check_nccl: no GPU, skipped" and exits 77 (--require-gpu or
   MOE_EP_REQUIRE_GPU=1: exits 1). --max-gpus N. Run with CK_FORK=no. */
#define MOE_EP_IMPLEMENTATION
#include "../../transports/moe_ep_nccl.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <stdarg.h>
#include <time.h>

#include "gpu_test_support.h"
#include "gpu_check.h"

#define PROGRAM "check_nccl"
#define MAX_GPUS 8
#define MAX_SUB 16
#define E_ALL 8
#define TOP_K 2

/* >>helpers (and gpu_test_support.h) */
static void fill(float* v, size_t n, float scale, int round_bf16, unsigned long long seed) {
    size_t i;
    unsigned long long s = seed;
    for (i = 0; i < n; ++i) {
        v[i] = scale * uniform(&s);
        if (round_bf16) v[i] = from_bf16(to_bf16(v[i]));
    }
}

static double rel_error(const float* a, const float* ref, size_t n) {
    double num = 0.0, den = 0.0;
    size_t i;
    for (i = 0; i < n; ++i) {
        double diff = (double)a[i] - (double)ref[i];
        if (a[i] != a[i]) return INFINITY;
        num += diff * diff;
        den += (double)ref[i] * (double)ref[i];
    }
    return den > 0.0 ? sqrt(num / den) : sqrt(num);
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
    char logged[256];               /* the first logged message about tp_transport */
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

/* Starts subtest `sub` unless a rank failed an earlier one (then 0 on every rank). */
/* >>model: every rank makes the same weights and shards from the seeds */
typedef struct model {
    int d, ff, bf16;
    float* router;                  /* [E, d] */
    float* weights;                 /* [E][w1 | w3 | w2] */
    moe_ep_expert_weights all[E_ALL];
} model;

static void model_make(model* m, int d, int ff, int bf16, unsigned long long seed) {
    int e;
    size_t per = 3 * (size_t)d * (size_t)ff;
    m->d = d;
    m->ff = ff;
    m->bf16 = bf16;
    m->router = (float*)malloc(sizeof(float) * E_ALL * (size_t)d);
    m->weights = (float*)malloc(sizeof(float) * per * E_ALL);
    fill(m->router, E_ALL * (size_t)d, 3.0f / sqrtf((float)d), bf16, seed);
    for (e = 0; e < E_ALL; ++e) {
        float* w = m->weights + per * (size_t)e;
        fill(w, 2 * (size_t)d * (size_t)ff, 1.7f / sqrtf((float)d), bf16, seed * 31 + (unsigned long long)e + 1);
        fill(w + 2 * (size_t)d * (size_t)ff, (size_t)d * (size_t)ff, 1.7f / sqrtf((float)ff), bf16,
             seed * 37 + (unsigned long long)e + 1000);
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
    fill(x, (size_t)T * (size_t)m->d, 1.0f, m->bf16, 7777 + (unsigned long long)shard);
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

/* A bad color on the last rank: every rank fails, nobody waits, the world works on. Its
   own suite, last in a world, so that a failure here hides none of the layouts. */
static void bad_split_suite(rank_env* env) {
    moe_ep_transport bad;
    char err[256] = "";
    moe_ep_result res;
    env->sub = 0;
    progress(env, "split with a bad color");
    memset(&bad, 0, sizeof bad);
    res = env->transport.split(env->transport.impl, env->rank == env->world - 1 ? -1 : 0, env->rank, &bad, err, sizeof err);
    if (res == MOE_EP_OK) {
        rank_fail(env, "split with a negative color on rank %d succeeded here", env->world - 1);
        moe_ep_nccl_transport_destroy(&bad);
    }
    progress(env, "barrier");
    if (env->transport.barrier(env->transport.impl, err, sizeof err) != MOE_EP_OK) rank_fail(env, "barrier after the bad split: %s", err);
    note(env, "rank 0: %s", moe_ep_result_string(res));
    checkpoint(env);
}

/* >>all-reduce */
static float contribution(int world_rank, int64_t i) {
    unsigned long long s = 0x1234567ull + (unsigned long long)world_rank * 1000003ull + (unsigned long long)i * 7919ull;
    unsigned long long h = next_u64(&s);
    float u = (float)(h >> 40) / 8388608.0f - 1.0f;
    return ldexpf(u, (int)((h >> 8) % 41) - 20);
}

static void reduce_one(rank_env* env, const moe_ep_transport* t, const int* members, int64_t count, const char* name,
                       int* order_matters) {
    size_t bytes = (size_t)count * sizeof(float), pad = 16 * sizeof(float);
    float* expect = (float*)malloc(bytes + 4);
    float* data = (float*)malloc(bytes + pad);
    float* got = (float*)malloc(bytes + pad);
    void* dev = NULL;
    char err[256] = "";
    int64_t i;
    int q, space;
    for (i = 0; i < count; ++i) {
        float sum = contribution(members[0], i), back = contribution(members[t->world_size - 1], i);
        for (q = 1; q < t->world_size; ++q) sum += contribution(members[q], i);
        for (q = t->world_size - 2; q >= 0; --q) back += contribution(members[q], i);
        expect[i] = sum;
        if (back != sum) *order_matters += 1;
    }
    for (space = 0; space < 2; ++space) {
        moe_ep_result res;
        for (i = 0; i < count; ++i) data[i] = contribution(env->rank, i);
        for (i = 0; i < 16; ++i) data[count + i] = 12345.0f;
        if (space == 0) {
            if (cudaMalloc(&dev, bytes + pad) != cudaSuccess ||
                cudaMemcpy(dev, data, bytes + pad, cudaMemcpyHostToDevice) != cudaSuccess) {
                rank_fail(env, "cudaMalloc/cudaMemcpy");
            }
            res = t->all_reduce_sum(t->impl, (float*)dev, count, MOE_EP_MEMORY_DEVICE, env->stream, err, sizeof err);
            if (cudaStreamSynchronize(env->stream) != cudaSuccess ||
                cudaMemcpy(got, dev, bytes + pad, cudaMemcpyDeviceToHost) != cudaSuccess)
                rank_fail(env, "cudaMemcpy back");
            cudaFree(dev);
        } else {
            res = t->all_reduce_sum(t->impl, data, count, MOE_EP_MEMORY_HOST, NULL, err, sizeof err);
            memcpy(got, data, bytes + pad);
        }
        if (res != MOE_EP_OK) {
            rank_fail(env, "%s all_reduce_sum (%s, %lld): %s: %s", name, space ? "host" : "device", (long long)count,
                 moe_ep_result_string(res), err);
            continue;
        }
        if (memcmp(got, expect, bytes) != 0) {
            for (i = 0; i < count && got[i] == expect[i]; ++i) {}
            rank_fail(env, "%s all_reduce_sum (%s, %lld): element %lld is %.9g, rank order gives %.9g", name,
                 space ? "host" : "device", (long long)count, (long long)i, got[i], expect[i]);
        }
        for (i = 0; i < 16; ++i)
            if (got[count + i] != 12345.0f) {
                rank_fail(env, "%s all_reduce_sum (%s, %lld) wrote past count", name, space ? "host" : "device", (long long)count);
                break;
            }
    }
    free(expect); free(data); free(got);
}

static void test_all_reduce(rank_env* env, groups* g) {
    suite* su = (suite*)env->suite;
    const moe_ep_layout_desc* l = &su->layout;
    static const int64_t counts[] = { 0, 1, 7, 1000, (3 << 18) + 1 };
    int c, k, order_matters = 0;
    int everyone[MAX_GPUS];
    for (k = 0; k < env->world; ++k) everyone[k] = k;
    for (c = 0; c < (int)(sizeof counts / sizeof counts[0]); ++c) {
        int members[MAX_GPUS];
        reduce_one(env, &env->transport, everyone, counts[c], "world", &order_matters);
        moe_ep_layout_group(l, env->rank, MOE_EP_GROUP_EP, members, MAX_GPUS);
        reduce_one(env, &g->ep, members, counts[c], "EP", &order_matters);
        moe_ep_layout_group(l, env->rank, MOE_EP_GROUP_TP, members, MAX_GPUS);
        reduce_one(env, &g->tp, members, counts[c], "TP", &order_matters);
        moe_ep_layout_group(l, env->rank, MOE_EP_GROUP_DP, members, MAX_GPUS);
        reduce_one(env, &g->dp, members, counts[c], "DP", &order_matters);
    }
    note(env, "%d sums here would round differently in reverse rank order", order_matters);
}

/* >>core CPU layer over the groups (host rows through NCCL) */
static void test_core(rank_env* env, groups* g) {
    suite* su = (suite*)env->suite;
    const moe_ep_layout_desc* l = &su->layout;
    int shard = shard_of(l, env->rank), T = shard_tokens(shard), experts[E_ALL], n, i;
    model m;
    moe_ep_expert_weights mine[E_ALL];
    moe_ep_context* ctx = NULL;
    float *x, *y, *ref;
    int32_t idx[128 * TOP_K];
    float w[128 * TOP_K];
    size_t count;
    moe_ep_result res;
    model_make(&m, 40, 56, 0, 901);
    count = (size_t)T * (size_t)m.d;
    x = shard_x(&m, shard, T);
    y = (float*)malloc(sizeof(float) * (count + 1));
    ref = (float*)malloc(sizeof(float) * (count + 1));
    n = moe_ep_layout_experts(l, env->rank, experts, E_ALL);
    for (i = 0; i < n; ++i) mine[i] = m.all[experts[i]];
    res = moe_ep_create(&(moe_ep_desc){ .d_model = m.d, .d_ff = m.ff, .num_experts = E_ALL, .top_k = TOP_K,
                                        .router_weight = m.router, .experts = mine, .num_threads = 1,
                                        .transport = &g->ep, .tp_transport = l->tp_size > 1 ? &g->tp : NULL }, &ctx);
    if (res != MOE_EP_OK) {
        rank_fail(env, "moe_ep_create over the groups: %s", moe_ep_result_string(res));
    } else {
        memset(y, 0xFF, sizeof(float) * count);
        res = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = T, .x = x, .y = y, .topk_idx = idx, .topk_weight = w });
        if (res != MOE_EP_OK) {
            rank_fail(env, "moe_ep_forward: %s (%s)", moe_ep_result_string(res), moe_ep_last_error(ctx));
        } else if (cpu_reference(&m, T, x, idx, w, ref) != MOE_EP_OK) {
            rank_fail(env, "CPU reference failed");
        } else if (l->tp_size == 1) {
            if (memcmp(y, ref, sizeof(float) * count) != 0) rank_fail(env, "not bitwise equal to one rank");
            note(env, "bitwise equal to one rank");
        } else {
            double err = rel_error(y, ref, count);
            if (!(err <= 1e-6)) rank_fail(env, "relative error %.3g > 1e-6", err);
            note(env, "rel.err %.2e", err);
        }
        keep(env, y, sizeof(float) * count);
    }
    moe_ep_destroy(ctx);
    model_free(&m);
    free(x); free(y); free(ref);
}

/* >>the world transport: counts, rows, the core's layer */
#define CHECK_CUDA(env, call) do { cudaError_t e_ = (call); \
    if (e_ != cudaSuccess) { rank_fail(env, "%s:%d %s: %s", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); return; } } while (0)

typedef struct a2a_case {
    int segments, row_bytes, host, split;
    unsigned long long seed;
} a2a_case;

static const a2a_case g_a2a_cases[] = {
    { 1, 64, 0, 0, 11 }, { 3, 12, 0, 0, 12 }, { 4, 6, 0, 1, 13 }, { 2, 40, 1, 0, 14 }, { 5, 2, 1, 1, 15 },
};
#define A2A_CASES ((int)(sizeof g_a2a_cases / sizeof g_a2a_cases[0]))

static int64_t seg_rows(unsigned long long seed, int src, int dst, int seg) {
    unsigned long long s = seed ^ ((unsigned long long)src << 40) ^ ((unsigned long long)dst << 20) ^ (unsigned long long)seg;
    return (int64_t)(next_u64(&s) % 7);  /* 0..6 rows, zeros included */
}

static unsigned char cell(int src, int dst, int seg, int64_t row, int byte) {
    return (unsigned char)(src * 131 + dst * 31 + seg * 17 + row * 7 + byte * 3 + 1);
}

static void test_counts(rank_env* env) {
    int R = env->world, q, i, count = 5;
    int64_t* send = (int64_t*)calloc((size_t)(R * count) + 1, sizeof(int64_t));
    int64_t* recv = (int64_t*)calloc((size_t)(R * count) + 1, sizeof(int64_t));
    char err[256] = "";
    if (!send || !recv) { rank_fail(env, "out of memory"); free(send); free(recv); return; }
    for (q = 0; q < R; ++q)
        for (i = 0; i < count; ++i) send[q * count + i] = (int64_t)env->rank * 1000003 + q * 1009 + i - 77;
    for (i = 0; i < R * count; ++i) recv[i] = -123456789;
    if (env->transport.exchange_counts(env->transport.impl, send, recv, count, err, sizeof err) != MOE_EP_OK)
        rank_fail(env, "exchange_counts: %s", err);
    for (q = 0; q < R && !env->failed[env->sub]; ++q)
        for (i = 0; i < count; ++i)
            if (recv[q * count + i] != (int64_t)q * 1000003 + env->rank * 1009 + i - 77) {
                rank_fail(env, "exchange_counts: value %d from rank %d is %lld", i, q, (long long)recv[q * count + i]);
                break;
            }
    if (!env->failed[env->sub] && env->transport.barrier(env->transport.impl, err, sizeof err) != MOE_EP_OK)
        rank_fail(env, "barrier: %s", err);
    free(send);
    free(recv);
}

/* Send rows in (peer, segment) order with a gap of one row between blocks; receive rows in
   (segment, peer) order, also with gaps that must stay untouched. */
static void test_a2a(rank_env* env, const a2a_case* c) {
    int R = env->world, S = c->segments, me = env->rank, p, s, b;
    size_t rb = (size_t)c->row_bytes;
    int64_t* sc = (int64_t*)calloc((size_t)(R * S), 8);
    int64_t* so = (int64_t*)calloc((size_t)(R * S), 8);
    int64_t* rc = (int64_t*)calloc((size_t)(R * S), 8);
    int64_t* ro = (int64_t*)calloc((size_t)(R * S), 8);
    int64_t send_rows = 0, recv_rows = 0, r;
    unsigned char *send, *recv, *expect;
    void *dsend = NULL, *drecv = NULL;
    moe_ep_a2a_args args;
    char err[256] = "";
    moe_ep_result res;
    for (p = 0; p < R; ++p)
        for (s = 0; s < S; ++s) {
            sc[p * S + s] = seg_rows(c->seed, me, p, s);
            so[p * S + s] = send_rows;
            send_rows += sc[p * S + s] + 1;
        }
    for (s = 0; s < S; ++s)
        for (p = 0; p < R; ++p) {
            rc[p * S + s] = seg_rows(c->seed, p, me, s);
            ro[p * S + s] = recv_rows;
            recv_rows += rc[p * S + s] + 1;
        }
    send = (unsigned char*)malloc((size_t)send_rows * rb + 1);
    recv = (unsigned char*)malloc((size_t)recv_rows * rb + 1);
    expect = (unsigned char*)malloc((size_t)recv_rows * rb + 1);
    memset(send, 0xEE, (size_t)send_rows * rb);
    memset(recv, 0xA5, (size_t)recv_rows * rb);
    memset(expect, 0xA5, (size_t)recv_rows * rb);
    for (p = 0; p < R; ++p)
        for (s = 0; s < S; ++s)
            for (r = 0; r < sc[p * S + s]; ++r)
                for (b = 0; b < (int)rb; ++b) send[(size_t)(so[p * S + s] + r) * rb + (size_t)b] = cell(me, p, s, r, b);
    for (p = 0; p < R; ++p)
        for (s = 0; s < S; ++s)
            for (r = 0; r < rc[p * S + s]; ++r)
                for (b = 0; b < (int)rb; ++b) expect[(size_t)(ro[p * S + s] + r) * rb + (size_t)b] = cell(p, me, s, r, b);
    memset(&args, 0, sizeof args);
    args.row_bytes = rb;
    args.segments = S;
    args.send_counts = sc;
    args.send_offsets = so;
    args.recv_counts = rc;
    args.recv_offsets = ro;
    if (c->host) {
        args.send = send;
        args.recv = recv;
        args.memory_space = MOE_EP_MEMORY_HOST;
    } else {
        CHECK_CUDA(env, cudaMalloc(&dsend, (size_t)send_rows * rb + 1));
        CHECK_CUDA(env, cudaMalloc(&drecv, (size_t)recv_rows * rb + 1));
        CHECK_CUDA(env, cudaMemcpy(dsend, send, (size_t)send_rows * rb, cudaMemcpyHostToDevice));
        CHECK_CUDA(env, cudaMemcpy(drecv, recv, (size_t)recv_rows * rb, cudaMemcpyHostToDevice));
        args.send = dsend;
        args.recv = drecv;
        args.memory_space = MOE_EP_MEMORY_DEVICE;
        args.stream = env->stream;
    }
    if (c->split) {
        void* request = NULL;
        res = env->transport.all_to_all_v_begin(env->transport.impl, &args, &request, err, sizeof err);
        if (res == MOE_EP_OK) res = env->transport.all_to_all_v_end(env->transport.impl, request, err, sizeof err);
    } else {
        res = env->transport.all_to_all_v(env->transport.impl, &args, err, sizeof err);
    }
    if (res != MOE_EP_OK) rank_fail(env, "all_to_all_v: %s: %s", moe_ep_result_string(res), err);
    if (!c->host) {
        CHECK_CUDA(env, cudaStreamSynchronize(env->stream));
        CHECK_CUDA(env, cudaMemcpy(recv, drecv, (size_t)recv_rows * rb, cudaMemcpyDeviceToHost));
        cudaFree(dsend);
        cudaFree(drecv);
    }
    if (!env->failed[env->sub] && memcmp(recv, expect, (size_t)recv_rows * rb) != 0) {
        size_t i = 0;
        while (recv[i] == expect[i]) ++i;
        rank_fail(env, "received rows differ at byte %zu (row %zu)", i, i / rb);
    }
    free(send); free(recv); free(expect); free(sc); free(so); free(rc); free(ro);
}

/* The core's CPU layer over the world transport (host rows through NCCL): E = 6, k = 2,
   d = 20, ff = 28, 33 / 0 / 17 / 5 tokens by rank, bitwise equal to one rank that holds
   every expert. */
static void test_core_world(rank_env* env) {
    static const int tokens[4] = { 33, 0, 17, 5 };
    enum { E = 6, K = 2, D = 20, FF = 28 };
    int me = env->rank, T = tokens[me % 4], owner[E], e, l;
    size_t n = (size_t)T * D, per = (size_t)D * FF;
    float* weights = (float*)malloc(sizeof(float) * 3 * per * E);
    float* router = (float*)malloc(sizeof(float) * E * D);
    float* x = (float*)malloc(sizeof(float) * (n + 1));
    float* y = (float*)malloc(sizeof(float) * (n + 1));
    float* ref = (float*)malloc(sizeof(float) * (n + 1));
    int32_t* idx = (int32_t*)malloc(sizeof(int32_t) * (size_t)(T * K + 1));
    float* w = (float*)malloc(sizeof(float) * (size_t)(T * K + 1));
    moe_ep_expert_weights all[E], mine[E];
    moe_ep_context *ctx = NULL, *one = NULL;
    moe_ep_result res;
    fill(router, (size_t)E * D, 3.0f / sqrtf((float)D), 0, 901);
    fill(weights, 3 * per * E, 1.7f / sqrtf((float)D), 0, 902);
    fill(x, n, 1.0f, 0, 903 + (unsigned long long)me);
    moe_ep_placement_compute(NULL, E, env->world, owner);
    for (e = 0, l = 0; e < E; ++e) {
        all[e].w1 = weights + 3 * per * (size_t)e;
        all[e].w3 = all[e].w1 + per;
        all[e].w2 = all[e].w1 + 2 * per;
        if (owner[e] == me) mine[l++] = all[e];
    }
    res = moe_ep_create(&(moe_ep_desc){ .d_model = D, .d_ff = FF, .num_experts = E, .top_k = K, .router_weight = router,
                                        .experts = mine, .num_threads = 1, .transport = &env->transport }, &ctx);
    if (res != MOE_EP_OK) { rank_fail(env, "moe_ep_create over NCCL: %s", moe_ep_result_string(res)); goto done; }
    memset(y, 0xFF, sizeof(float) * n);
    res = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = T, .x = x, .y = y, .topk_idx = idx, .topk_weight = w });
    if (res != MOE_EP_OK) {
        rank_fail(env, "moe_ep_forward over NCCL: %s (%s)", moe_ep_result_string(res), moe_ep_last_error(ctx));
        goto done;
    }
    res = moe_ep_create(&(moe_ep_desc){ .d_model = D, .d_ff = FF, .num_experts = E, .top_k = K, .router_weight = router,
                                        .experts = all, .num_threads = 1 }, &one);
    if (res == MOE_EP_OK)
        res = moe_ep_forward(one, &(moe_ep_forward_args){ .tokens = T, .x = x, .y = ref, .routing_in = true,
                                                          .topk_idx = idx, .topk_weight = w });
    if (res != MOE_EP_OK || memcmp(y, ref, sizeof(float) * n) != 0)
        rank_fail(env, "CPU layer over NCCL is not bitwise equal to one rank (%s)", moe_ep_result_string(res));
    else note(env, "bitwise equal to one rank");
done:
    moe_ep_destroy(ctx);
    moe_ep_destroy(one);
    free(weights); free(router); free(x); free(y); free(ref); free(idx); free(w);
}

/* >>suite */
static int begin(rank_env* env, int sub, const char* name) {
    if (sub > 0 && checkpoint(env)) return 0;
    env->sub = sub;
    progress(env, name);
    return 1;
}

static void layout_suite(rank_env* env) {
    suite* su = (suite*)env->suite;
    const moe_ep_layout_desc* l = &su->layout;
    groups g;
    moe_ep_result res;
    int i;
    memset(&g, 0, sizeof g);
    env->sub = 0;
    progress(env, "split");
    res = moe_ep_layout_split(l, &env->transport, MOE_EP_GROUP_EP, &g.ep, NULL, 0);
    if (res == MOE_EP_OK) {
        res = moe_ep_layout_split(l, &env->transport, MOE_EP_GROUP_TP, &g.tp, NULL, 0);
        if (res != MOE_EP_OK) moe_ep_nccl_transport_destroy(&g.ep);
    }
    if (res == MOE_EP_OK) {
        res = moe_ep_layout_split(l, &env->transport, MOE_EP_GROUP_DP, &g.dp, NULL, 0);
        if (res != MOE_EP_OK) { moe_ep_nccl_transport_destroy(&g.tp); moe_ep_nccl_transport_destroy(&g.ep); }
    }
    if (res != MOE_EP_OK) {   /* the split's verdict is the same on every rank */
        for (i = 0; i < su->count; ++i) { env->sub = i; rank_fail(env, "moe_ep_layout_split: %s", moe_ep_result_string(res)); }
        return;
    }
    if (!begin(env, 0, "groups")) goto out;
    test_groups(env, &g);
    if (!begin(env, 1, "all_reduce_sum")) goto out;
    test_all_reduce(env, &g);
    if (!begin(env, 2, "core")) goto out;
    test_core(env, &g);
    checkpoint(env);
out:
    progress(env, "destroy");
    moe_ep_nccl_transport_destroy(&g.dp);
    moe_ep_nccl_transport_destroy(&g.tp);
    moe_ep_nccl_transport_destroy(&g.ep);
}

static void run_layout(world* w, int ep, int tp, int dp) {
    suite su;
    char err[256];
    memset(&su, 0, sizeof su);
    su.fn = layout_suite;
    if (moe_ep_layout_resolve(&(moe_ep_layout_desc){ .world_size = w->size, .ep_size = ep, .tp_size = tp, .dp_size = dp,
                                                    .num_experts = E_ALL }, &su.layout, err, sizeof err) != MOE_EP_OK) {
        gpu_fact(1, "world=%d layout EP %d x TP %d x DP %d: %s", w->size, ep, tp, dp, err);
        return;
    }
    su.names[su.count++] = "groups match moe_ep_layout_group";
    su.names[su.count++] = "all_reduce_sum = rank-order sum (world, EP, TP, DP)";
    su.tp_equal[su.count] = 1;
    su.names[su.count++] = "core moe_ep_forward over the groups (host rows)";
    run_suite(w, &su);
}

/* The world transport itself: exchange_counts and barrier, every all_to_all_v case, the
   core's layer over it. */
static void transport_suite(rank_env* env) {
    int i;
    if (!begin(env, 0, "exchange_counts + barrier")) return;
    test_counts(env);
    for (i = 0; i < A2A_CASES; ++i) {
        if (!begin(env, 1 + i, "all_to_all_v")) return;
        test_a2a(env, &g_a2a_cases[i]);
    }
    if (!begin(env, 1 + A2A_CASES, "core over NCCL")) return;
    test_core_world(env);
    checkpoint(env);
}

static void run_transport(world* w) {
    static char names[A2A_CASES][96];
    suite su;
    int i;
    memset(&su, 0, sizeof su);
    su.fn = transport_suite;
    moe_ep_layout_resolve(&(moe_ep_layout_desc){ .world_size = w->size, .num_experts = E_ALL }, &su.layout, NULL, 0);
    su.names[su.count++] = "transport exchange_counts + barrier";
    for (i = 0; i < A2A_CASES; ++i) {
        const a2a_case* c = &g_a2a_cases[i];
        snprintf(names[i], sizeof names[i], "transport all_to_all_v S=%d row=%dB %s%s", c->segments, c->row_bytes,
                 c->host ? "host" : "device", c->split ? " split-phase" : "");
        su.names[su.count++] = names[i];
    }
    su.names[su.count++] = "core moe_ep_forward over NCCL (host rows)";
    run_suite(w, &su);
}

static void run_bad_split(world* w) {
    suite su;
    memset(&su, 0, sizeof su);
    su.fn = bad_split_suite;
    moe_ep_layout_resolve(&(moe_ep_layout_desc){ .world_size = w->size, .num_experts = E_ALL }, &su.layout, NULL, 0);
    su.names[su.count++] = "split, negative color on the last rank: all fail";
    run_suite(w, &su);
}

static int make_world(world* w, int size) {
    int r;
    ncclResult_t nr;
    w->size = size;
    for (r = 0; r < size; ++r) w->devices[r] = r;
    nr = ncclCommInitAll(w->comms, size, w->devices);
    if (nr != ncclSuccess) {
        gpu_fact(1, "world=%d ncclCommInitAll: %s", size, ncclGetErrorString(nr));
        return 0;
    }
    return 1;
}

static void free_world(world* w) {
    int r;
    /* after a timeout some communicators are gone (ncclCommAbort frees them): release none
       of the others by a call that could wait for their peers */
    if (w->aborted) return;
    for (r = 0; r < w->size; ++r) ncclCommDestroy(w->comms[r]);
}

/* One world size: every EP x TP x DP layout of it, then the bad split (last: a failure there
   hides none of the layouts). */
static void run_size(int size) {
    world w;
    int ep, tp;
    if (getenv("MOE_EP_TEST_PROGRESS")) { printf("      world %d: ncclCommInitAll\n", size); fflush(stdout); }
    memset(&w, 0, sizeof w);
    if (!make_world(&w, size)) return;
    run_transport(&w);
    for (tp = 1; tp <= size; tp *= 2)
        for (ep = 1; ep * tp <= size; ep *= 2) {
            if (w.aborted) {
                gpu_fact(1, "world=%d EP %d x TP %d x DP %d  not run: a world communicator was aborted", size, ep, tp,
                         size / (ep * tp));
                continue;
            }
            run_layout(&w, ep, tp, size / (ep * tp));
        }
    if (!w.aborted) run_bad_split(&w);
    free_world(&w);
}

static void banner(int gpus) {
    printf("%s: %d GPU(s)\n", PROGRAM, gpus);
}

int main(int argc, char** argv) {
    return gpu_main(argc, argv, PROGRAM, 0, run_size, banner);
}

#ifndef MOE_EP_NCCL_IMPL_INCLUDED
#error "MOE_EP_IMPLEMENTATION did not build the NCCL transport"
#endif
