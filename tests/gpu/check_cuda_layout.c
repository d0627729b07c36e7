/* check_cuda_layout -- the GPU layer (moe_ep_cuda.h) over EP x DP and EP x TP x DP groups of NCCL transports.

   One process, one thread per GPU (ncclCommInitAll). For each world size 1, 2, 4, 8 that
   this machine has GPUs for (one Check loop test each, one assertion per subtest:
   tests/gpu/gpu_check.h), every layout (EP x TP x DP) of that size is split from the
   world transport with moe_ep_layout_split, and on it:
   - groups: each group's rank and size are moe_ep_layout_group's, and an exchange inside
     it reaches exactly the ranks that the layout names, in that order;
   - the GPU layer with the same groups (fp32 and bf16, grouped GEMMs and the loop, both a2a
     layouts, uneven d_ff slices): within 1e-5 (fp32) / 1e-2 (bf16) of the one-rank CPU
     layer, a second run bitwise equal to the first, bitwise equal across a TP group;
   - agreement: too many tokens on the last rank fails its whole data-parallel replica
     (ABORTED on the others), other replicas carry on, and the layer works afterwards; TP
     ranks with different routing fail; expert_fn with a TP group is refused with a
     message that says so.
   A failed subtest stops its suite on every rank (no rank starts a collective call that
   a failed peer may never join); after a timeout aborted a world communicator, the rest
   of that world size is reported as not run. MOE_EP_TEST_PROGRESS=1 (or 2: every rank)
   prints each step as it starts. The transport's own checks over the same layouts
   (all_reduce_sum, the core's layer, a bad split) are tests/gpu/check_nccl.c.
   Without a GPU it prints "check_cuda_layout: no GPU, skipped" and exits 77 (--require-gpu
   or MOE_EP_REQUIRE_GPU=1: exits 1). --max-gpus N. Run with CK_FORK=no. */
#define MOE_EP_IMPLEMENTATION
#include "../../moe_ep_cuda.h"
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

#define PROGRAM "check_cuda_layout"
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

/* >>GPU layer over the groups */
/* Records the first message that names tp_transport (called on the rank's thread). */
static void record_log(const char* tag, uint32_t level, int rank, const char* message, void* user_data) {
    rank_env* env = (rank_env*)user_data;
    (void)tag; (void)level; (void)rank;
    if (!env->logged[0] && strstr(message, "tp_transport")) snprintf(env->logged, sizeof env->logged, "%s", message);
}

typedef struct gpu_case {
    const char* name;
    int bf16, d, ff, staged, max_tokens;
    moe_ep_cuda_expert_gemm gemm;
    moe_ep_cuda_a2a_layout a2a;
} gpu_case;

static const gpu_case g_gpu_cases[] = {
    { "GPU layer fp32, grouped GEMMs", 0, 40, 56, 0, 0, MOE_EP_CUDA_EXPERT_GEMM_GROUPED, MOE_EP_CUDA_A2A_DEFAULT },
    { "GPU layer fp32, GEMM loop, d=33 ff=45", 0, 33, 45, 1, 0, MOE_EP_CUDA_EXPERT_GEMM_LOOP, MOE_EP_CUDA_A2A_DEFAULT },
    { "GPU layer bf16", 1, 64, 96, 1, 0, MOE_EP_CUDA_EXPERT_GEMM_DEFAULT, MOE_EP_CUDA_A2A_DEFAULT },
    { "GPU layer bf16, segmented, max_tokens, ff=45", 1, 32, 45, 0, 128, MOE_EP_CUDA_EXPERT_GEMM_DEFAULT,
      MOE_EP_CUDA_A2A_SEGMENTED },
};
#define GPU_CASES ((int)(sizeof g_gpu_cases / sizeof g_gpu_cases[0]))

static void* to_dtype(const float* v, size_t n, int bf16) {
    size_t i;
    void* out = malloc(n * (bf16 ? 2 : 4) + 4);
    if (!bf16) memcpy(out, v, n * 4);
    else for (i = 0; i < n; ++i) ((uint16_t*)out)[i] = to_bf16(v[i]);
    return out;
}

static void from_dtype(const void* v, size_t n, int bf16, float* out) {
    size_t i;
    if (!bf16) memcpy(out, v, n * 4);
    else for (i = 0; i < n; ++i) out[i] = from_bf16(((const uint16_t*)v)[i]);
}

typedef struct gpu_setup {
    model m;
    moe_ep_cuda_expert_weights mine[E_ALL];
    void* host_weights[3 * E_ALL];
    void* router;
    moe_ep_cuda_layer* layer;
} gpu_setup;

static moe_ep_result gpu_create(rank_env* env, groups* g, gpu_setup* s, const gpu_case* c, moe_ep_cuda_expert_fn fn) {
    suite* su = (suite*)env->suite;
    const moe_ep_layout_desc* l = &su->layout;
    int experts[E_ALL], n, i, j;
    size_t cnt;
    memset(s, 0, sizeof *s);
    env->logged[0] = '\0';
    model_make(&s->m, c->d, c->ff, c->bf16, 1000 + (unsigned long long)c->d * 7 + (unsigned long long)c->ff);
    cnt = (size_t)c->d * (size_t)c->ff;
    n = moe_ep_layout_experts(l, env->rank, experts, E_ALL);
    for (i = 0; i < n; ++i) {
        const float* src[3];
        src[0] = s->m.all[experts[i]].w1;
        src[1] = s->m.all[experts[i]].w3;
        src[2] = s->m.all[experts[i]].w2;
        for (j = 0; j < 3; ++j) s->host_weights[3 * i + j] = to_dtype(src[j], cnt, c->bf16);
        s->mine[i].w1 = s->host_weights[3 * i];
        s->mine[i].w3 = s->host_weights[3 * i + 1];
        s->mine[i].w2 = s->host_weights[3 * i + 2];
    }
    s->router = to_dtype(s->m.router, E_ALL * (size_t)c->d, c->bf16);
    return moe_ep_cuda_layer_create(&(moe_ep_cuda_layer_desc){
        .d_model = c->d, .d_ff = c->ff, .num_experts = E_ALL, .top_k = TOP_K, .transport = &g->ep,
        .stream = env->stream, .timeout_ms = 60000,
        .tp_transport = l->tp_size > 1 ? &g->tp : NULL,
        .logger = { .func = record_log, .user_data = env },
        .dtype = c->bf16 ? MOE_EP_CUDA_DTYPE_BF16 : MOE_EP_CUDA_DTYPE_F32, .a2a_layout = c->a2a,
        .max_tokens = c->max_tokens, .expert_gemm = c->gemm,
        .router_weight = s->router, .experts = fn ? NULL : s->mine, .expert_fn = fn }, &s->layer);
}

static void gpu_free(gpu_setup* s) {
    int i;
    if (s->layer) moe_ep_cuda_layer_destroy(s->layer);
    for (i = 0; i < 3 * E_ALL; ++i) free(s->host_weights[i]);
    free(s->router);
    model_free(&s->m);
}

static void test_gpu(rank_env* env, groups* g, const gpu_case* c) {
    suite* su = (suite*)env->suite;
    const moe_ep_layout_desc* l = &su->layout;
    int shard = shard_of(l, env->rank), T = shard_tokens(shard);
    size_t es = c->bf16 ? 2 : 4, n = (size_t)T * (size_t)c->d;
    gpu_setup s;
    void *x = NULL, *y = NULL, *y2 = NULL, *xh, *yh, *again;
    float *xf, *yf, *ref;
    int32_t idx[128 * TOP_K];
    float w[128 * TOP_K];
    moe_ep_result res = gpu_create(env, g, &s, c, NULL);
    xf = shard_x(&s.m, shard, T);
    xh = to_dtype(xf, n, c->bf16);
    yh = malloc(n * es + 4);
    again = malloc(n * es + 4);
    yf = (float*)malloc(sizeof(float) * (n + 1));
    ref = (float*)malloc(sizeof(float) * (n + 1));
    if (res != MOE_EP_OK) {
        rank_fail(env, "moe_ep_cuda_layer_create: %s (%s)", moe_ep_result_string(res), s.layer ? "" : env->logged);
        goto done;
    }
    if (cudaMalloc(&x, n * es + 16) != cudaSuccess || cudaMalloc(&y, n * es + 16) != cudaSuccess ||
        cudaMalloc(&y2, n * es + 16) != cudaSuccess || cudaMemcpy(x, xh, n * es, cudaMemcpyHostToDevice) != cudaSuccess ||
        cudaMemset(y, 0xFF, n * es + 16) != cudaSuccess || cudaMemset(y2, 0xFF, n * es + 16) != cudaSuccess)
        rank_fail(env, "cudaMalloc/cudaMemcpy");
    res = moe_ep_cuda_forward(s.layer, &(moe_ep_cuda_forward_args){ .tokens = T, .x = x, .y = y, .topk_idx = idx,
                                                                      .topk_weight = w });
    if (res != MOE_EP_OK) { rank_fail(env, "forward: %s: %s", moe_ep_result_string(res), moe_ep_cuda_layer_last_error(s.layer)); goto done; }
    cudaStreamSynchronize(env->stream);
    cudaMemcpy(yh, y, n * es, cudaMemcpyDeviceToHost);
    from_dtype(yh, n, c->bf16, yf);
    if (cpu_reference(&s.m, T, xf, idx, w, ref) != MOE_EP_OK) {
        rank_fail(env, "CPU reference failed");
    } else {
        double err = rel_error(yf, ref, n), tol = c->bf16 ? 1e-2 : 1e-5;
        if (!(err <= tol)) rank_fail(env, "relative error %.3g > %g", err, tol);
        note(env, "rel.err %.2e", err);
    }
    keep(env, yh, n * es);
    /* again, through the stages or the forward with the routing handed in: the same bits */
    if (c->staged) {
        moe_ep_cuda_plan* plan = NULL;
        moe_ep_plan_info info;
        void *rows = NULL, *out = NULL;
        res = moe_ep_cuda_plan_create(s.layer, T, idx, w, &plan);
        if (res != MOE_EP_OK) { rank_fail(env, "staged plan: %s", moe_ep_cuda_layer_last_error(s.layer)); goto done; }
        info = moe_ep_cuda_plan_query(plan);
        cudaMalloc(&rows, (size_t)info.recv_rows * (size_t)c->d * es + 16);
        cudaMalloc(&out, (size_t)info.recv_rows * (size_t)c->d * es + 16);
        res = moe_ep_cuda_dispatch_begin(s.layer, plan, x, rows);
        if (res == MOE_EP_OK) res = moe_ep_cuda_dispatch_end(s.layer, plan);
        if (res == MOE_EP_OK) res = moe_ep_cuda_experts(s.layer, plan, rows, out);
        if (res == MOE_EP_OK) res = moe_ep_cuda_combine_begin(s.layer, plan, out);
        if (res == MOE_EP_OK) res = moe_ep_cuda_combine_end(s.layer, plan, y2);
        if (res != MOE_EP_OK) rank_fail(env, "staged: %s", moe_ep_cuda_layer_last_error(s.layer));
        cudaStreamSynchronize(env->stream);
        moe_ep_cuda_plan_destroy(plan);
        cudaFree(rows);
        cudaFree(out);
    } else {
        res = moe_ep_cuda_forward(s.layer, &(moe_ep_cuda_forward_args){ .tokens = T, .x = x, .y = y2, .routing_in = true,
                                                                          .topk_idx = idx, .topk_weight = w });
        if (res != MOE_EP_OK) rank_fail(env, "second forward: %s", moe_ep_cuda_layer_last_error(s.layer));
    }
    cudaStreamSynchronize(env->stream);
    cudaMemcpy(again, y2, n * es, cudaMemcpyDeviceToHost);
    if (res == MOE_EP_OK && memcmp(again, yh, n * es) != 0)
        rank_fail(env, "%s differs from the first forward", c->staged ? "staged run" : "second forward");
done:
    gpu_free(&s);
    cudaFree(x); cudaFree(y); cudaFree(y2);
    free(xf); free(xh); free(yh); free(again); free(yf); free(ref);
}

/* Too many tokens on the last rank: its data-parallel replica fails, the others do not;
   then every rank runs again. */
static void test_too_many(rank_env* env, groups* g) {
    suite* su = (suite*)env->suite;
    const moe_ep_layout_desc* l = &su->layout;
    static const gpu_case c = { "", 0, 32, 48, 0, 64, MOE_EP_CUDA_EXPERT_GEMM_DEFAULT, MOE_EP_CUDA_A2A_DEFAULT };
    int T = 64, last = env->world - 1;
    moe_ep_coords mine, theirs;
    gpu_setup s;
    void *x = NULL, *y = NULL;
    float *xf, *yf, *ref;
    int32_t idx[65 * TOP_K];
    float w[65 * TOP_K];
    size_t n = (size_t)(T + 1) * 32;
    moe_ep_result res = gpu_create(env, g, &s, &c, NULL), want;
    moe_ep_layout_coords(l, env->rank, &mine);
    moe_ep_layout_coords(l, last, &theirs);
    xf = shard_x(&s.m, 5, T + 1);    /* one shard for all ranks: equal within every TP group */
    yf = (float*)malloc(sizeof(float) * n);
    ref = (float*)malloc(sizeof(float) * n);
    if (res != MOE_EP_OK) { rank_fail(env, "create: %s", moe_ep_result_string(res)); goto done; }
    cudaMalloc(&x, n * 4);
    cudaMalloc(&y, n * 4);
    cudaMemcpy(x, xf, n * 4, cudaMemcpyHostToDevice);
    res = moe_ep_cuda_forward(s.layer, &(moe_ep_cuda_forward_args){ .tokens = env->rank == last ? T + 1 : T, .x = x, .y = y,
                                                                      .topk_idx = idx, .topk_weight = w });
    want = env->rank == last ? MOE_EP_ERROR_INVALID_ARGUMENT : mine.dp == theirs.dp ? MOE_EP_ERROR_ABORTED : MOE_EP_OK;
    if (res != want)
        rank_fail(env, "expected %s, got %s (%s)", moe_ep_result_string(want), moe_ep_result_string(res),
             moe_ep_cuda_layer_last_error(s.layer));
    res = moe_ep_cuda_forward(s.layer, &(moe_ep_cuda_forward_args){ .tokens = T, .x = x, .y = y, .topk_idx = idx,
                                                                      .topk_weight = w });
    if (res != MOE_EP_OK) { rank_fail(env, "then: %s", moe_ep_cuda_layer_last_error(s.layer)); goto done; }
    cudaStreamSynchronize(env->stream);
    cudaMemcpy(yf, y, (size_t)T * 32 * 4, cudaMemcpyDeviceToHost);
    if (cpu_reference(&s.m, T, xf, idx, w, ref) != MOE_EP_OK || !(rel_error(yf, ref, (size_t)T * 32) <= 1e-5))
        rank_fail(env, "then: relative error %.3g", rel_error(yf, ref, (size_t)T * 32));
    note(env, "last rank INVALID_ARGUMENT, its replica ABORTED, the others ok; then all ok");
done:
    gpu_free(&s);
    cudaFree(x); cudaFree(y);
    free(xf); free(yf); free(ref);
}

/* TP ranks with different routing: refused on every rank, then the layer works. */
static void test_tp_mismatch(rank_env* env, groups* g) {
    suite* su = (suite*)env->suite;
    const moe_ep_layout_desc* l = &su->layout;
    static const gpu_case c = { "", 0, 32, 48, 0, 0, MOE_EP_CUDA_EXPERT_GEMM_DEFAULT, MOE_EP_CUDA_A2A_DEFAULT };
    int T = 40, t;
    moe_ep_coords me;
    gpu_setup s;
    void *x = NULL, *y = NULL;
    float* xf;
    int32_t idx[40 * TOP_K];
    float w[40 * TOP_K];
    moe_ep_result res = gpu_create(env, g, &s, &c, NULL);
    moe_ep_layout_coords(l, env->rank, &me);
    xf = shard_x(&s.m, shard_of(l, env->rank), T);
    if (res != MOE_EP_OK) { rank_fail(env, "create: %s", moe_ep_result_string(res)); goto done; }
    cudaMalloc(&x, (size_t)T * 32 * 4);
    cudaMalloc(&y, (size_t)T * 32 * 4);
    cudaMemcpy(x, xf, (size_t)T * 32 * 4, cudaMemcpyHostToDevice);
    for (t = 0; t < T; ++t) {
        idx[t * 2] = (t + (me.tp == 1)) % E_ALL;    /* TP rank 1 routes elsewhere */
        idx[t * 2 + 1] = (t + 3) % E_ALL;
        w[t * 2] = 0.6f;
        w[t * 2 + 1] = 0.4f;
    }
    res = moe_ep_cuda_forward(s.layer, &(moe_ep_cuda_forward_args){ .tokens = T, .x = x, .y = y, .routing_in = true,
                                                                      .topk_idx = idx, .topk_weight = w });
    if (res == MOE_EP_OK) rank_fail(env, "different routing in a TP group was accepted");
    else if (res == MOE_EP_ERROR_INVALID_ARGUMENT && !strstr(moe_ep_cuda_layer_last_error(s.layer), "tensor-parallel"))
        rank_fail(env, "message does not name the TP group: %s", moe_ep_cuda_layer_last_error(s.layer));
    else note(env, "%s: %s", moe_ep_result_string(res), moe_ep_cuda_layer_last_error(s.layer));
    for (t = 0; t < T; ++t) idx[t * 2] = t % E_ALL;
    res = moe_ep_cuda_forward(s.layer, &(moe_ep_cuda_forward_args){ .tokens = T, .x = x, .y = y, .routing_in = true,
                                                                      .topk_idx = idx, .topk_weight = w });
    if (res != MOE_EP_OK) rank_fail(env, "then: %s", moe_ep_cuda_layer_last_error(s.layer));
done:
    gpu_free(&s);
    cudaFree(x); cudaFree(y);
    free(xf);
}

static int copy_expert(int local_expert, int expert, const void* rows, int64_t row_count, int d_model, void* out,
                       cudaStream_t stream, void* user_data) {
    (void)local_expert; (void)expert; (void)user_data;
    return cudaMemcpyAsync(out, rows, (size_t)row_count * (size_t)d_model * 4, cudaMemcpyDeviceToDevice, stream) != cudaSuccess;
}

static void test_expert_fn_refused(rank_env* env, groups* g) {
    static const gpu_case c = { "", 0, 32, 48, 0, 0, MOE_EP_CUDA_EXPERT_GEMM_DEFAULT, MOE_EP_CUDA_A2A_DEFAULT };
    gpu_setup s;
    moe_ep_result res = gpu_create(env, g, &s, &c, copy_expert);
    if (res == MOE_EP_OK) rank_fail(env, "expert_fn with a TP group was accepted");
    else if (!strstr(env->logged, "not supported")) rank_fail(env, "logged \"%s\"", env->logged);
    else note(env, "%s: \"%s\"", moe_ep_result_string(res), env->logged);
    gpu_free(&s);
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
    int i, sub;
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
    for (i = 0, sub = 1; i < GPU_CASES; ++i, ++sub) {
        if (!begin(env, sub, g_gpu_cases[i].name)) goto out;
        test_gpu(env, &g, &g_gpu_cases[i]);
    }
    if (!begin(env, sub++, "too many tokens")) goto out;
    test_too_many(env, &g);
    if (l->tp_size > 1) {
        if (!begin(env, sub++, "TP routing mismatch")) goto out;
        test_tp_mismatch(env, &g);
        if (!begin(env, sub, "expert_fn with TP")) goto out;
        test_expert_fn_refused(env, &g);
    }
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
    {
        int i;
        for (i = 0; i < GPU_CASES; ++i) {
            su.tp_equal[su.count] = 1;
            su.names[su.count++] = g_gpu_cases[i].name;
        }
    }
    su.names[su.count++] = "too many tokens on the last rank";
    if (tp > 1) {
        su.names[su.count++] = "TP ranks with different routing: refused";
        su.names[su.count++] = "expert_fn with tp_transport: not supported";
    }
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
    for (tp = 1; tp <= size; tp *= 2)
        for (ep = 1; ep * tp <= size; ep *= 2) {
            if (w.aborted) {
                gpu_fact(1, "world=%d EP %d x TP %d x DP %d  not run: a world communicator was aborted", size, ep, tp,
                         size / (ep * tp));
                continue;
            }
            run_layout(&w, ep, tp, size / (ep * tp));
        }
    free_world(&w);
}

static void banner(int gpus) {
    printf("%s: %d GPU(s)\n", PROGRAM, gpus);
}

int main(int argc, char** argv) {
    return gpu_main(argc, argv, PROGRAM, 0, run_size, banner);
}

#if !defined(MOE_EP_NCCL_IMPL_INCLUDED) || !defined(MOE_EP_CUDA_IMPL_INCLUDED)
#error "MOE_EP_IMPLEMENTATION did not build the NCCL transport and the GPU layer"
#endif
