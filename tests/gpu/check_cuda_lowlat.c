/* check_cuda_lowlat -- the GPU layer's low-latency mode (moe_ep_cuda.h, LOW-LATENCY DECODE).

   World sizes 1, 2, 3 and 4; every rank is a thread of this process with the pthreads
   transport (the mode exchanges nothing through the transport after create), rank r on
   GPU r % (GPUs there are). With one GPU every rank shares it: the regions are then
   mapped as plain pointers of one process, and the mode's protocol (landing slots, counts,
   arrival flags, epochs on the device, timeouts, aborts) runs across ranks for real, though
   nothing is learnt about bandwidth. Without a GPU it prints "check_cuda_lowlat: no GPU,
   skipped" and exits 77 (--require-gpu or MOE_EP_REQUIRE_GPU=1: exits 1). Run with
   CK_FORK=no.

   Checks, each on fresh seeded random data, outputs poisoned with NaN first:
   - world size 1: the low-latency layer's output is bitwise the normal layer's (planned on
     the GPU, the same expert_gemm: CHUNKED in fp32 and bf16, HOPPER in bf16 where it runs)
     at 1, 7 and 128 tokens, with hand-in routing that leaves half of the experts without
     tokens and with the GPU router (its routing brought back), with capacity drops and
     input scaling; and within tolerance of the core's CPU layer;
   - world size 1: one forward captured in a CUDA graph and replayed on fresh tokens: every
     replay bitwise the plain low-latency forward and the normal layer;
   - several ranks: each rank's output within tolerance of the CPU layer and of the normal
     layer on the direct path (fp32: CHUNKED against the normal path's cuBLAS GEMMs, other
     kernels, so not bitwise); the same call twice gives the same bits; a rank with 0 tokens;
     every rank's forward captured in a CUDA graph and replayed: bitwise its plain forward;
   - several ranks: the last rank skips a forward: every other rank's call ends in
     MOE_EP_ERROR_TIMEOUT (not a hang), and so does the late rank's next forward; with no
     timeout, moe_ep_cuda_layer_abort on rank 0 ends every rank's waits instead
     (MOE_EP_ERROR_ABORTED everywhere, the missing rank's next forward included);
   - create refuses the mode without max_tokens, with expert_fn, with GROUPED GEMMs or
     planning HOST; the stage calls refuse a low-latency layer.
   The Hopper kernel is used at world size 1 only: several ranks on one GPU would spin in
   their waits on SMs that its persistent grid needs. */
#define _POSIX_C_SOURCE 200809L  /* clock_gettime, nanosleep, setenv */
#define MOE_EP_IMPLEMENTATION
#include "../../moe_ep_cuda.h"
#include "../../transports/moe_ep_pthreads.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <stdarg.h>
#include <time.h>

#include "../support/test_support.h"
#include "gpu_check.h"

#define MAX_RANKS 4

/* >>world: one thread per rank, on the pthreads transport */
typedef struct rank_env {
    int rank, world, device;
    cudaStream_t stream;
    moe_ep_transport transport;
    int failed;
    char message[512];
    void* shared;                   /* the case; it begins with its rank function */
} rank_env;

typedef void (*rank_fn)(rank_env* env);

/* A barrier of the test's own (the transport may be aborted by the cases). */
static pthread_mutex_t g_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cond = PTHREAD_COND_INITIALIZER;
static int g_arrived, g_round, g_gpus;

static void test_barrier(int world) {
    int round;
    pthread_mutex_lock(&g_mutex);
    round = g_round;
    if (++g_arrived == world) {
        g_arrived = 0;
        g_round++;
        pthread_cond_broadcast(&g_cond);
    } else {
        while (round == g_round) pthread_cond_wait(&g_cond, &g_mutex);
    }
    pthread_mutex_unlock(&g_mutex);
}

/* MOE_EP_TEST_TRACE=1: each rank's steps on stderr (where a multi-rank case hangs) */
static int g_trace = -1;
static void trace(const rank_env* env, const char* step, int round) {
    if (g_trace < 0) g_trace = getenv("MOE_EP_TEST_TRACE") != NULL;
    if (g_trace) fprintf(stderr, "      [world %d rank %d] %s %d\n", env->world, env->rank, step, round);
}

static void rank_fail(rank_env* env, const char* fmt, ...) {
    va_list ap;
    if (env->failed) return;    /* keep the first cause */
    env->failed = 1;
    va_start(ap, fmt);
    vsnprintf(env->message, sizeof env->message, fmt, ap);
    va_end(ap);
}

#define CHECK_CUDA(env, call) do { cudaError_t e_ = (call); \
    if (e_ != cudaSuccess) { rank_fail(env, "%s:%d %s: %s", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); goto done; } } while (0)

/* Copies and poison on the rank's own stream, never on the legacy default stream: with ranks
   sharing a GPU, a legacy-stream call would wait for the other ranks' kernels, which wait in
   turn for this rank's next step (a deadlock the first run of this test hit). */
static cudaError_t copy_in(rank_env* env, void* dst, const void* src, size_t bytes) {
    cudaError_t e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, env->stream);
    return e != cudaSuccess ? e : cudaStreamSynchronize(env->stream);
}

static cudaError_t copy_out(rank_env* env, void* dst, const void* src, size_t bytes) {
    cudaError_t e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, env->stream);
    return e != cudaSuccess ? e : cudaStreamSynchronize(env->stream);
}

static cudaError_t poison(rank_env* env, void* dst, size_t bytes) {
    return cudaMemsetAsync(dst, 0xFF, bytes, env->stream);
}

static void* rank_main(void* arg) {
    rank_env* env = (rank_env*)arg;
    rank_fn fn = *(rank_fn*)env->shared;
    if (cudaSetDevice(env->device) != cudaSuccess) { rank_fail(env, "cudaSetDevice"); return NULL; }
    /* non-blocking: ranks that share a GPU must not meet on the legacy default stream, which
       would wait for a peer's kernels that wait for this rank (see the copies below) */
    cudaError_t e = cudaStreamCreateWithFlags(&env->stream, cudaStreamNonBlocking);
    if (e != cudaSuccess) {
        rank_fail(env, "cudaStreamCreateWithFlags: %s", cudaGetErrorString(e));
        return NULL;
    }
    fn(env);
    cudaStreamSynchronize(env->stream);
    cudaStreamDestroy(env->stream);
    return NULL;
}

static void run_case(int world, const char* name, void* the_case) {
    pthread_t threads[MAX_RANKS];
    rank_env env[MAX_RANKS];
    moe_ep_pthreads_world* w = NULL;
    int r, failed = -1;
    if (moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = world, .timeout_ms = 120000 }, &w) != MOE_EP_OK) {
        gpu_fact(1, "world=%d %s: moe_ep_pthreads_world_create failed", world, name);
        return;
    }
    for (r = 0; r < world; ++r) {
        memset(&env[r], 0, sizeof env[r]);
        env[r].rank = r;
        env[r].world = world;
        env[r].device = r % g_gpus;
        env[r].shared = the_case;
        moe_ep_pthreads_transport_create(w, r, &env[r].transport);
    }
    for (r = 0; r < world; ++r) pthread_create(&threads[r], NULL, rank_main, &env[r]);
    for (r = 0; r < world; ++r) pthread_join(threads[r], NULL);
    for (r = 0; r < world; ++r) {
        if (env[r].failed && failed < 0) failed = r;
        else if (env[r].failed) printf("      (also rank %d: %s)\n", r, env[r].message);
        moe_ep_pthreads_transport_destroy(&env[r].transport);
    }
    moe_ep_pthreads_world_destroy(w);
    if (failed >= 0) gpu_fact(1, "world=%d %s  rank %d: %s", world, name, failed, env[failed].message);
    else gpu_fact(0, "world=%d %s%s%s", world, name, env[0].message[0] ? "  " : "", env[0].message);
}

/* >>model: weights and tokens shared by all ranks (host, fp32, bf16-rounded for bf16) */
typedef struct ll_case {
    rank_fn fn;
    const char* name;
    int bf16, E, k, d, ff, max_tokens, scale_input, never_chosen, replays;
    int tokens[MAX_RANKS];          /* per rank */
    float capacity;
    moe_ep_cuda_expert_gemm gemm;
    uint64_t seed;
    float* router;                  /* [E, d] */
    float **w1, **w3, **w2;
} ll_case;

static void fill(float* v, size_t n, float scale, int round_bf16, uint64_t* s) {
    size_t i;
    for (i = 0; i < n; ++i) {
        v[i] = scale * test_rng_uniform(s);
        if (round_bf16) v[i] = test_bf16_to_float(test_bf16_from_float(v[i]));
    }
}

static void* to_dtype(const float* v, size_t n, int bf16) {
    size_t i;
    void* out = malloc(n * (bf16 ? 2 : 4) + 4);
    if (!bf16) memcpy(out, v, n * 4);
    else for (i = 0; i < n; ++i) ((uint16_t*)out)[i] = test_bf16_from_float(v[i]);
    return out;
}

static void from_dtype(const void* v, size_t n, int bf16, float* out) {
    size_t i;
    if (!bf16) memcpy(out, v, n * 4);
    else for (i = 0; i < n; ++i) out[i] = test_bf16_to_float(((const uint16_t*)v)[i]);
}

static void model_make(ll_case* c) {
    uint64_t s = c->seed;
    size_t dd = (size_t)c->d, ff = (size_t)c->ff;
    int e;
    c->router = (float*)malloc(sizeof(float) * (size_t)c->E * dd);
    fill(c->router, (size_t)c->E * dd, 3.0f / sqrtf((float)c->d), c->bf16, &s);
    c->w1 = (float**)calloc((size_t)c->E, sizeof(float*));
    c->w3 = (float**)calloc((size_t)c->E, sizeof(float*));
    c->w2 = (float**)calloc((size_t)c->E, sizeof(float*));
    for (e = 0; e < c->E; ++e) {
        c->w1[e] = (float*)malloc(sizeof(float) * ff * dd);
        c->w3[e] = (float*)malloc(sizeof(float) * ff * dd);
        c->w2[e] = (float*)malloc(sizeof(float) * ff * dd);
        fill(c->w1[e], ff * dd, 1.7f / sqrtf((float)c->d), c->bf16, &s);
        fill(c->w3[e], ff * dd, 1.7f / sqrtf((float)c->d), c->bf16, &s);
        fill(c->w2[e], ff * dd, 1.7f / sqrtf((float)c->ff), c->bf16, &s);
    }
}

static void model_free(ll_case* c) {
    int e;
    for (e = 0; e < c->E; ++e) { free(c->w1[e]); free(c->w3[e]); free(c->w2[e]); }
    free(c->w1); free(c->w3); free(c->w2); free(c->router);
}

/* The core's CPU layer on one rank, all experts, with the given routing. */
static moe_ep_result cpu_reference(const ll_case* c, int T, const float* x, const int32_t* idx, const float* w, float* y) {
    moe_ep_expert_weights* all = (moe_ep_expert_weights*)calloc((size_t)c->E, sizeof *all);
    moe_ep_context* ctx = NULL;
    moe_ep_result res;
    int e;
    for (e = 0; e < c->E; ++e) { all[e].w1 = c->w1[e]; all[e].w3 = c->w3[e]; all[e].w2 = c->w2[e]; }
    res = moe_ep_create(&(moe_ep_desc){ .d_model = c->d, .d_ff = c->ff, .num_experts = c->E, .top_k = c->k,
                                        .capacity_factor = c->capacity, .router_weight = c->router,
                                        .scale_expert_input = c->scale_input != 0, .experts = all, .num_threads = 1 },
                        &ctx);
    if (res == MOE_EP_OK)
        res = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = T, .x = x, .y = y, .routing_in = true,
                                                          .topk_idx = (int32_t*)(uintptr_t)idx,
                                                          .topk_weight = (float*)(uintptr_t)w });
    free(all);
    moe_ep_destroy(ctx);
    return res;
}

/* Hand-in routing: distinct experts per token, from the lower half when never_chosen. */
static void make_routing(const ll_case* c, uint64_t seed, int T, int32_t* idx, float* w) {
    uint64_t s = seed;
    int t, j, i, pool = c->never_chosen && c->E >= 2 * c->k ? c->E / 2 : c->E;
    for (t = 0; t < T; ++t)
        for (j = 0; j < c->k; ++j) {
            int e, dup;
            do {
                e = (int)(test_rng_next(&s) % (uint64_t)pool);
                dup = 0;
                for (i = 0; i < j; ++i) dup |= idx[t * c->k + i] == e;
            } while (dup);
            idx[t * c->k + j] = e;
            w[t * c->k + j] = 0.05f + 0.95f * (test_rng_uniform(&s) * 0.5f + 0.5f);
        }
}

/* This rank's experts (contiguous placement), host copies in the layer's dtype; *store gets
   the 3 * *count copies for the caller to free. */
static moe_ep_cuda_expert_weights* rank_weights(const ll_case* c, int me, int R, void*** store, int* count) {
    int owner[1024], e, i, l = 0, L = 0;
    size_t cnt = (size_t)c->d * (size_t)c->ff;
    moe_ep_cuda_expert_weights* mine;
    moe_ep_placement placement;
    memset(&placement, 0, sizeof placement);
    moe_ep_placement_compute(&placement, c->E, R, owner);
    for (e = 0; e < c->E; ++e) L += owner[e] == me;
    mine = (moe_ep_cuda_expert_weights*)calloc((size_t)(L + 1), sizeof *mine);
    *store = (void**)calloc((size_t)(3 * L + 1), sizeof(void*));
    for (e = 0; e < c->E; ++e) {
        if (owner[e] != me) continue;
        for (i = 0; i < 3; ++i) (*store)[3 * l + i] = to_dtype(i == 0 ? c->w1[e] : i == 1 ? c->w3[e] : c->w2[e], cnt, c->bf16);
        mine[l].w1 = (*store)[3 * l];
        mine[l].w3 = (*store)[3 * l + 1];
        mine[l].w2 = (*store)[3 * l + 2];
        ++l;
    }
    *count = L;
    return mine;
}

static void free_weights(moe_ep_cuda_expert_weights* mine, void** store, int L) {
    int l;
    for (l = 0; l < 3 * L; ++l) free(store[l]);
    free(store);
    free(mine);
}

static moe_ep_result make_layer(rank_env* env, const ll_case* c, const moe_ep_cuda_expert_weights* mine, const void* router,
                                moe_ep_cuda_mode mode, moe_ep_cuda_expert_gemm gemm, int timeout_ms,
                                moe_ep_cuda_layer** out) {
    return moe_ep_cuda_layer_create(&(moe_ep_cuda_layer_desc){
        .d_model = c->d, .d_ff = c->ff, .num_experts = c->E, .top_k = c->k, .capacity_factor = c->capacity,
        .scale_expert_input = c->scale_input != 0, .transport = &env->transport, .stream = env->stream,
        .dtype = c->bf16 ? MOE_EP_CUDA_DTYPE_BF16 : MOE_EP_CUDA_DTYPE_F32, .max_tokens = c->max_tokens,
        .expert_gemm = gemm, .mode = mode, .timeout_ms = timeout_ms, .router_weight = router,
        .direct = env->world > 1 && mode != MOE_EP_CUDA_MODE_LOW_LATENCY ? MOE_EP_CUDA_DIRECT_ON : MOE_EP_CUDA_DIRECT_DEFAULT,
        .experts = mine }, out);
}

/* One forward into y (poisoned first), its output copied to yh. idx, w: hand-in routing
   (routing_in), or NULL-free arrays the GPU router's choice comes back into. */
static moe_ep_result run_forward(rank_env* env, moe_ep_cuda_layer* layer, int T, const void* x, void* y, size_t bytes,
                                 int routing_in, int32_t* idx, float* w, void* yh) {
    moe_ep_result res;
    if (poison(env, y, bytes + 16) != cudaSuccess) return MOE_EP_ERROR_INTERNAL;
    res = moe_ep_cuda_forward(layer, &(moe_ep_cuda_forward_args){ .tokens = T, .x = x, .y = y, .routing_in = routing_in != 0,
                                                                   .topk_idx = idx, .topk_weight = w });
    if (res != MOE_EP_OK) return res;
    if (cudaStreamSynchronize(env->stream) != cudaSuccess) return MOE_EP_ERROR_INTERNAL;
    if (copy_out(env, yh, y, bytes) != cudaSuccess) return MOE_EP_ERROR_INTERNAL;
    return moe_ep_cuda_layer_check(layer);
}

/* >>world size 1: bitwise the normal layer */
static void test_bitwise(rank_env* env) {
    ll_case* c = (ll_case*)env->shared;
    static const int token_counts[3] = { 1, 7, 128 };
    moe_ep_cuda_layer *normal = NULL, *ll = NULL;
    moe_ep_cuda_expert_weights* mine = NULL;
    void **store = NULL, *router = NULL, *xh = NULL, *yh[2] = { NULL, NULL }, *x = NULL, *y[2] = { NULL, NULL };
    float *xf = NULL, *yf = NULL, *ref = NULL, *w = NULL, *w2 = NULL;
    int32_t *idx = NULL, *idx2 = NULL;
    int L = 0, ti, gpu_router, empty_seen = 0;
    size_t es = c->bf16 ? 2 : 4, cap = (size_t)c->max_tokens * (size_t)c->d;
    double worst = 0.0;
    uint64_t s = c->seed * 31 + 7;
    moe_ep_result res;
    mine = rank_weights(c, 0, 1, &store, &L);
    router = to_dtype(c->router, (size_t)c->E * (size_t)c->d, c->bf16);
    res = make_layer(env, c, mine, router, MOE_EP_CUDA_MODE_DEFAULT, c->gemm, 0, &normal);
    if (res != MOE_EP_OK) { rank_fail(env, "normal layer: %s", moe_ep_result_string(res)); goto done; }
    res = make_layer(env, c, mine, router, MOE_EP_CUDA_MODE_LOW_LATENCY, c->gemm, 20000, &ll);
    if (res != MOE_EP_OK) { rank_fail(env, "low-latency layer: %s", moe_ep_result_string(res)); goto done; }
    xf = (float*)malloc(sizeof(float) * (cap + 1));
    yf = (float*)malloc(sizeof(float) * (cap + 1));
    ref = (float*)malloc(sizeof(float) * (cap + 1));
    idx = (int32_t*)malloc(sizeof(int32_t) * (size_t)(c->max_tokens * c->k + 1));
    idx2 = (int32_t*)malloc(sizeof(int32_t) * (size_t)(c->max_tokens * c->k + 1));
    w = (float*)malloc(sizeof(float) * (size_t)(c->max_tokens * c->k + 1));
    w2 = (float*)malloc(sizeof(float) * (size_t)(c->max_tokens * c->k + 1));
    yh[0] = malloc(cap * es + 4);
    yh[1] = malloc(cap * es + 4);
    CHECK_CUDA(env, cudaMalloc(&x, cap * es + 16));
    CHECK_CUDA(env, cudaMalloc(&y[0], cap * es + 16));
    CHECK_CUDA(env, cudaMalloc(&y[1], cap * es + 16));
    for (ti = 0; ti < 3 && !env->failed; ++ti)
        for (gpu_router = 0; gpu_router < 2 && !env->failed; ++gpu_router) {
            int T = token_counts[ti], e, used = 0;
            size_t n = (size_t)T * (size_t)c->d, slots = (size_t)T * (size_t)c->k, i;
            double err;
            fill(xf, n, 1.0f, c->bf16, &s);
            free(xh);
            xh = to_dtype(xf, n, c->bf16);
            CHECK_CUDA(env, copy_in(env, x, xh, n * es));
            if (!gpu_router) make_routing(c, c->seed + 100 * (uint64_t)ti, T, idx, w);
            res = run_forward(env, ll, T, x, y[1], n * es, !gpu_router, idx, w, yh[1]);
            if (res != MOE_EP_OK) { rank_fail(env, "T=%d low-latency forward: %s", T, moe_ep_cuda_layer_last_error(ll)); break; }
            res = run_forward(env, normal, T, x, y[0], n * es, !gpu_router, gpu_router ? idx2 : idx, gpu_router ? w2 : w, yh[0]);
            if (res != MOE_EP_OK) { rank_fail(env, "T=%d normal forward: %s", T, moe_ep_cuda_layer_last_error(normal)); break; }
            if (gpu_router && (memcmp(idx, idx2, slots * 4) != 0 || memcmp(w, w2, slots * 4) != 0))
                rank_fail(env, "T=%d: the two layers' routers differ", T);
            if (memcmp(yh[0], yh[1], n * es) != 0) {
                size_t first = n, count = 0;
                for (i = 0; i < n; ++i)
                    if (memcmp((char*)yh[0] + i * es, (char*)yh[1] + i * es, es) != 0) { if (first == n) first = i; ++count; }
                rank_fail(env, "T=%d %s: the low-latency output differs from the normal layer's in %zu of %zu elements "
                          "(first: token %zu column %zu)", T, gpu_router ? "GPU router" : "hand-in routing", count, n,
                          first / (size_t)c->d, first % (size_t)c->d);
                break;
            }
            from_dtype(yh[1], n, c->bf16, yf);
            if (cpu_reference(c, T, xf, idx, w, ref) != MOE_EP_OK) { rank_fail(env, "CPU reference failed"); break; }
            err = rel_error(yf, ref, n);
            if (!(err <= (c->bf16 ? 1e-2 : 1e-5))) { rank_fail(env, "T=%d: relative error %.3g against the CPU layer", T, err); break; }
            if (err > worst) worst = err;
            for (e = 0; e < c->E; ++e) {
                int hit = 0;
                for (i = 0; i < slots; ++i) hit |= idx[i] == e;
                used += hit;
            }
            empty_seen += used < c->E;
        }
    if (!env->failed && !empty_seen) rank_fail(env, "no call left an expert without tokens (the case must)");
    if (!env->failed)
        snprintf(env->message, sizeof env->message, "bitwise the normal layer at 1, 7, 128 tokens (%d with empty "
                 "experts); rel.err <= %.2e", empty_seen, worst);
    /* the stage calls refuse the mode */
    if (!env->failed) {
        moe_ep_cuda_plan* plan = NULL;
        res = moe_ep_cuda_plan_create(ll, 1, idx, w, &plan);
        if (res != MOE_EP_ERROR_UNSUPPORTED || plan) rank_fail(env, "moe_ep_cuda_plan_create on a low-latency layer: %s",
                                                                moe_ep_result_string(res));
    }
done:
    trace(env, "destroy", 0);
    if (normal) moe_ep_cuda_layer_destroy(normal);
    if (ll) moe_ep_cuda_layer_destroy(ll);
    free_weights(mine, store, L);
    free(router); free(xh); free(yh[0]); free(yh[1]); free(xf); free(yf); free(ref); free(idx); free(idx2); free(w); free(w2);
    cudaFree(x); cudaFree(y[0]); cudaFree(y[1]);
}

/* >>world size 1: a CUDA graph */
static void test_graph(rank_env* env) {
    ll_case* c = (ll_case*)env->shared;
    int T = c->tokens[0], L = 0, round;
    size_t es = c->bf16 ? 2 : 4, n = (size_t)T * (size_t)c->d;
    moe_ep_cuda_layer *normal = NULL, *ll = NULL;
    moe_ep_cuda_expert_weights* mine = NULL;
    void **store = NULL, *router = NULL, *xh = NULL, *yg = NULL, *yp = NULL, *yn = NULL, *x = NULL, *y = NULL, *y2 = NULL;
    float* xf = NULL;
    uint64_t s = c->seed * 7177;
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    enum cudaStreamCaptureStatus status;
    moe_ep_result res;
    mine = rank_weights(c, 0, 1, &store, &L);
    router = to_dtype(c->router, (size_t)c->E * (size_t)c->d, c->bf16);
    res = make_layer(env, c, mine, router, MOE_EP_CUDA_MODE_DEFAULT, c->gemm, 0, &normal);
    if (res == MOE_EP_OK) res = make_layer(env, c, mine, router, MOE_EP_CUDA_MODE_LOW_LATENCY, c->gemm, 20000, &ll);
    if (res != MOE_EP_OK) { rank_fail(env, "layer create: %s", moe_ep_result_string(res)); goto done; }
    xf = (float*)malloc(sizeof(float) * (n + 1));
    yg = malloc(n * es + 4);
    yp = malloc(n * es + 4);
    yn = malloc(n * es + 4);
    CHECK_CUDA(env, cudaMalloc(&x, n * es + 16));
    CHECK_CUDA(env, cudaMalloc(&y, n * es + 16));
    CHECK_CUDA(env, cudaMalloc(&y2, n * es + 16));
    fill(xf, n, 1.0f, c->bf16, &s);
    xh = to_dtype(xf, n, c->bf16);
    CHECK_CUDA(env, copy_in(env, x, xh, n * es));
    res = moe_ep_cuda_forward(ll, &(moe_ep_cuda_forward_args){ .tokens = T, .x = x, .y = y2 });   /* warm-up */
    if (res != MOE_EP_OK) { rank_fail(env, "warm-up forward: %s", moe_ep_cuda_layer_last_error(ll)); goto done; }
    CHECK_CUDA(env, cudaStreamSynchronize(env->stream));
    CHECK_CUDA(env, cudaStreamBeginCapture(env->stream, cudaStreamCaptureModeGlobal));
    res = moe_ep_cuda_forward(ll, &(moe_ep_cuda_forward_args){ .tokens = T, .x = x, .y = y });
    if (cudaStreamIsCapturing(env->stream, &status) != cudaSuccess || status != cudaStreamCaptureStatusActive)
        rank_fail(env, "the forward broke the capture (%s)", moe_ep_cuda_layer_last_error(ll));
    CHECK_CUDA(env, cudaStreamEndCapture(env->stream, &graph));
    if (res != MOE_EP_OK) { rank_fail(env, "captured forward: %s", moe_ep_cuda_layer_last_error(ll)); goto done; }
    if (env->failed) goto done;
    CHECK_CUDA(env, cudaGraphInstantiate(&exec, graph, 0));
    for (round = 0; round < c->replays && !env->failed; ++round) {
        fill(xf, n, 1.0f, c->bf16, &s);
        free(xh);
        xh = to_dtype(xf, n, c->bf16);
        CHECK_CUDA(env, copy_in(env, x, xh, n * es));
        CHECK_CUDA(env, poison(env, y, n * es + 16));
        CHECK_CUDA(env, cudaGraphLaunch(exec, env->stream));
        CHECK_CUDA(env, cudaStreamSynchronize(env->stream));
        CHECK_CUDA(env, copy_out(env, yg, y, n * es));
        if ((res = moe_ep_cuda_layer_check(ll)) != MOE_EP_OK) { rank_fail(env, "replay %d: %s", round, moe_ep_result_string(res)); break; }
        if (run_forward(env, ll, T, x, y2, n * es, 0, NULL, NULL, yp) != MOE_EP_OK) { rank_fail(env, "plain forward failed"); break; }
        if (run_forward(env, normal, T, x, y2, n * es, 0, NULL, NULL, yn) != MOE_EP_OK) { rank_fail(env, "normal forward failed"); break; }
        if (memcmp(yg, yp, n * es) != 0) rank_fail(env, "replay %d differs from the plain low-latency forward", round);
        if (memcmp(yg, yn, n * es) != 0) rank_fail(env, "replay %d differs from the normal layer", round);
    }
    if (!env->failed)
        snprintf(env->message, sizeof env->message, "%d replays bitwise the plain forward and the normal layer", c->replays);
done:
    if (exec) cudaGraphExecDestroy(exec);
    if (graph) cudaGraphDestroy(graph);
    if (normal) moe_ep_cuda_layer_destroy(normal);
    if (ll) moe_ep_cuda_layer_destroy(ll);
    free_weights(mine, store, L);
    free(router); free(xh); free(yg); free(yp); free(yn); free(xf);
    cudaFree(x); cudaFree(y); cudaFree(y2);
}

/* >>several ranks: the protocol */
static void test_ranks(rank_env* env) {
    ll_case* c = (ll_case*)env->shared;
    int me = env->rank, T = c->tokens[me], L = 0, round;
    size_t es = c->bf16 ? 2 : 4, n = (size_t)T * (size_t)c->d, slots = (size_t)T * (size_t)c->k;
    moe_ep_cuda_layer *normal = NULL, *ll = NULL;
    moe_ep_cuda_expert_weights* mine = NULL;
    void **store = NULL, *xh = NULL, *yh[3] = { NULL, NULL, NULL }, *x = NULL, *y = NULL;
    float *xf = NULL, *yf = NULL, *yn = NULL, *ref = NULL, *w = NULL;
    int32_t* idx = NULL;
    uint64_t s = c->seed * 131 + (uint64_t)me;
    double err = 0.0, err_normal = 0.0;
    int bitwise = 1;
    moe_ep_result res;
    mine = rank_weights(c, me, env->world, &store, &L);
    /* device buffers before the layers: after a collective create no rank allocates while a
       peer's kernels may already wait for it */
    CHECK_CUDA(env, cudaMalloc(&x, n * es + 16));
    CHECK_CUDA(env, cudaMalloc(&y, n * es + 16));
    trace(env, "create", 0);
    res = make_layer(env, c, mine, NULL, MOE_EP_CUDA_MODE_DEFAULT, MOE_EP_CUDA_EXPERT_GEMM_DEFAULT, 20000, &normal);
    if (res != MOE_EP_OK) { rank_fail(env, "normal layer: %s", moe_ep_result_string(res)); goto done; }
    res = make_layer(env, c, mine, NULL, MOE_EP_CUDA_MODE_LOW_LATENCY, c->gemm, 20000, &ll);
    if (res != MOE_EP_OK) { rank_fail(env, "low-latency layer: %s", moe_ep_result_string(res)); goto done; }
    if (!moe_ep_cuda_layer_direct(ll)) rank_fail(env, "moe_ep_cuda_layer_direct is 0 on a low-latency layer of %d ranks", env->world);
    xf = (float*)malloc(sizeof(float) * (n + 1));
    yf = (float*)malloc(sizeof(float) * (n + 1));
    yn = (float*)malloc(sizeof(float) * (n + 1));
    ref = (float*)malloc(sizeof(float) * (n + 1));
    idx = (int32_t*)malloc(sizeof(int32_t) * (slots + 1));
    w = (float*)malloc(sizeof(float) * (slots + 1));
    for (round = 0; round < 3; ++round) yh[round] = malloc(n * es + 4);
    for (round = 0; round < 3 && !env->failed; ++round) {
        fill(xf, n, 1.0f, c->bf16, &s);
        free(xh);
        xh = to_dtype(xf, n, c->bf16);
        CHECK_CUDA(env, copy_in(env, x, xh, n * es));
        make_routing(c, c->seed * 977 + 10 * (uint64_t)round + (uint64_t)me, T, idx, w);
        /* the low-latency layer twice, then the normal one, on the same tokens and routing */
        trace(env, "low-latency forwards, round", round);
        res = run_forward(env, ll, T, x, y, n * es, 1, idx, w, yh[0]);
        if (res == MOE_EP_OK) res = run_forward(env, ll, T, x, y, n * es, 1, idx, w, yh[1]);
        if (res != MOE_EP_OK) { rank_fail(env, "round %d low-latency forward: %s", round, moe_ep_cuda_layer_last_error(ll)); break; }
        trace(env, "normal forward, round", round);
        res = run_forward(env, normal, T, x, y, n * es, 1, idx, w, yh[2]);
        if (res != MOE_EP_OK) { rank_fail(env, "round %d normal forward: %s", round, moe_ep_cuda_layer_last_error(normal)); break; }
        if (memcmp(yh[0], yh[1], n * es) != 0) rank_fail(env, "round %d: the same call twice gave other bits", round);
        bitwise &= memcmp(yh[0], yh[2], n * es) == 0;
        from_dtype(yh[0], n, c->bf16, yf);
        from_dtype(yh[2], n, c->bf16, yn);
        if (T > 0 && cpu_reference(c, T, xf, idx, w, ref) != MOE_EP_OK) { rank_fail(env, "CPU reference failed"); break; }
        err = T > 0 ? rel_error(yf, ref, n) : 0.0;
        err_normal = T > 0 ? rel_error(yf, yn, n) : 0.0;
        if (!(err <= (c->bf16 ? 1e-2 : 1e-5)) || !(err_normal <= (c->bf16 ? 1e-2 : 1e-5)))
            rank_fail(env, "round %d: relative error %.3g against the CPU layer, %.3g against the normal layer", round, err,
                      err_normal);
    }
    if (!env->failed && me == 0)
        snprintf(env->message, sizeof env->message, "T=%d,%d,...: rel.err %.2e (CPU), %.2e (normal direct path%s); "
                 "repeats bitwise", c->tokens[0], c->tokens[1], err, err_normal, bitwise ? ", bitwise here" : "");
done:
    if (normal) moe_ep_cuda_layer_destroy(normal);
    if (ll) moe_ep_cuda_layer_destroy(ll);
    free_weights(mine, store, L);
    free(xh); free(yh[0]); free(yh[1]); free(yh[2]); free(xf); free(yf); free(yn); free(ref); free(idx); free(w);
    cudaFree(x); cudaFree(y);
}

/* Several ranks, each with its forward captured (thread-local capture: the ranks capture at
   once) and replayed on fresh tokens: every replay bitwise the same rank's plain forward on
   the same tokens, within tolerance of the CPU layer; the epochs count on across replays and
   plain calls. */
static void test_ranks_graph(rank_env* env) {
    ll_case* c = (ll_case*)env->shared;
    int me = env->rank, T = c->tokens[me], L = 0, round;
    size_t es = c->bf16 ? 2 : 4, n = (size_t)T * (size_t)c->d, slots = (size_t)T * (size_t)c->k;
    moe_ep_cuda_layer* ll = NULL;
    moe_ep_cuda_expert_weights* mine = NULL;
    void **store = NULL, *router = NULL, *xh = NULL, *yg = NULL, *yp = NULL, *x = NULL, *y = NULL, *y2 = NULL;
    float *xf = NULL, *yf = NULL, *ref = NULL, *w = NULL;
    int32_t* idx = NULL;
    uint64_t s = c->seed * 4111 + (uint64_t)me;
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    double worst = 0.0;
    moe_ep_result res;
    mine = rank_weights(c, me, env->world, &store, &L);
    router = to_dtype(c->router, (size_t)c->E * (size_t)c->d, c->bf16);
    CHECK_CUDA(env, cudaMalloc(&x, n * es + 16));     /* before the layer: see test_ranks */
    CHECK_CUDA(env, cudaMalloc(&y, n * es + 16));
    CHECK_CUDA(env, cudaMalloc(&y2, n * es + 16));
    res = make_layer(env, c, mine, router, MOE_EP_CUDA_MODE_LOW_LATENCY, c->gemm, 20000, &ll);
    if (res != MOE_EP_OK) { rank_fail(env, "low-latency layer: %s", moe_ep_result_string(res)); goto done; }
    xf = (float*)malloc(sizeof(float) * (n + 1));
    yf = (float*)malloc(sizeof(float) * (n + 1));
    ref = (float*)malloc(sizeof(float) * (n + 1));
    idx = (int32_t*)malloc(sizeof(int32_t) * (slots + 1));
    w = (float*)malloc(sizeof(float) * (slots + 1));
    yg = malloc(n * es + 4);
    yp = malloc(n * es + 4);
    fill(xf, n, 1.0f, c->bf16, &s);
    xh = to_dtype(xf, n, c->bf16);
    CHECK_CUDA(env, copy_in(env, x, xh, n * es));
    res = run_forward(env, ll, T, x, y2, n * es, 0, NULL, NULL, yp);    /* warm-up, a step of every rank */
    if (res != MOE_EP_OK) { rank_fail(env, "warm-up forward: %s", moe_ep_cuda_layer_last_error(ll)); goto done; }
    CHECK_CUDA(env, cudaStreamBeginCapture(env->stream, cudaStreamCaptureModeThreadLocal));
    res = moe_ep_cuda_forward(ll, &(moe_ep_cuda_forward_args){ .tokens = T, .x = x, .y = y });
    CHECK_CUDA(env, cudaStreamEndCapture(env->stream, &graph));
    if (res != MOE_EP_OK) { rank_fail(env, "captured forward: %s", moe_ep_cuda_layer_last_error(ll)); goto done; }
    CHECK_CUDA(env, cudaGraphInstantiate(&exec, graph, 0));
    for (round = 0; round < 3 && !env->failed; ++round) {
        double err;
        fill(xf, n, 1.0f, c->bf16, &s);
        free(xh);
        xh = to_dtype(xf, n, c->bf16);
        CHECK_CUDA(env, copy_in(env, x, xh, n * es));
        CHECK_CUDA(env, poison(env, y, n * es + 16));
        CHECK_CUDA(env, cudaGraphLaunch(exec, env->stream));
        CHECK_CUDA(env, cudaStreamSynchronize(env->stream));
        CHECK_CUDA(env, copy_out(env, yg, y, n * es));
        if ((res = moe_ep_cuda_layer_check(ll)) != MOE_EP_OK) { rank_fail(env, "replay %d: %s", round, moe_ep_result_string(res)); break; }
        res = run_forward(env, ll, T, x, y2, n * es, 0, idx, w, yp);   /* the routing comes back */
        if (res != MOE_EP_OK) { rank_fail(env, "plain forward: %s", moe_ep_cuda_layer_last_error(ll)); break; }
        if (memcmp(yg, yp, n * es) != 0) rank_fail(env, "replay %d differs from the plain forward", round);
        from_dtype(yg, n, c->bf16, yf);
        if (T > 0 && cpu_reference(c, T, xf, idx, w, ref) != MOE_EP_OK) { rank_fail(env, "CPU reference failed"); break; }
        err = T > 0 ? rel_error(yf, ref, n) : 0.0;
        if (!(err <= (c->bf16 ? 1e-2 : 1e-5))) rank_fail(env, "replay %d: relative error %.3g against the CPU layer", round, err);
        if (err > worst) worst = err;
    }
    if (!env->failed && me == 0)
        snprintf(env->message, sizeof env->message, "3 replays on every rank bitwise the plain forward; rel.err <= %.2e", worst);
done:
    if (exec) cudaGraphExecDestroy(exec);
    if (graph) cudaGraphDestroy(graph);
    if (ll) moe_ep_cuda_layer_destroy(ll);
    free_weights(mine, store, L);
    free(router); free(xh); free(yg); free(yp); free(xf); free(yf); free(ref); free(idx); free(w);
    cudaFree(x); cudaFree(y); cudaFree(y2);
}

/* A peer that never arrives (the last rank skips a forward): with a timeout every rank ends
   in MOE_EP_ERROR_TIMEOUT; without one, moe_ep_cuda_layer_abort on rank 0 ends every rank's
   waits (MOE_EP_ERROR_ABORTED). replays: 0 the timeout, 1 the abort. */
static void test_missing(rank_env* env) {
    ll_case* c = (ll_case*)env->shared;
    int me = env->rank, last = env->world - 1, T = c->tokens[me], L = 0, aborting = c->replays == 1;
    moe_ep_result want = aborting ? MOE_EP_ERROR_ABORTED : MOE_EP_ERROR_TIMEOUT, got;
    size_t es = c->bf16 ? 2 : 4, n = (size_t)T * (size_t)c->d, slots = (size_t)T * (size_t)c->k;
    moe_ep_cuda_layer* ll = NULL;
    moe_ep_cuda_expert_weights* mine = NULL;
    void **store = NULL, *x = NULL, *y = NULL, *xh = NULL, *yh = NULL;
    float* xf = NULL;
    float* w = NULL;
    int32_t* idx = NULL;
    uint64_t s = c->seed + (uint64_t)me;
    struct timespec start, end, nap = { 0, 200000000L };
    double waited;
    moe_ep_result res;
    cudaError_t e;
    mine = rank_weights(c, me, env->world, &store, &L);
    if (cudaMalloc(&x, n * es + 16) != cudaSuccess || cudaMalloc(&y, n * es + 16) != cudaSuccess)
        rank_fail(env, "device buffers");   /* before the layer: see test_ranks */
    res = make_layer(env, c, mine, NULL, MOE_EP_CUDA_MODE_LOW_LATENCY, c->gemm, aborting ? 0 : 1000, &ll);
    if (res != MOE_EP_OK) { rank_fail(env, "low-latency layer: %s", moe_ep_result_string(res)); test_barrier(env->world); goto done; }
    xf = (float*)malloc(sizeof(float) * (n + 1));
    idx = (int32_t*)malloc(sizeof(int32_t) * (slots + 1));
    w = (float*)malloc(sizeof(float) * (slots + 1));
    yh = malloc(n * es + 4);
    fill(xf, n, 1.0f, c->bf16, &s);
    xh = to_dtype(xf, n, c->bf16);
    make_routing(c, c->seed * 3 + (uint64_t)me, T, idx, w);
    if (!env->failed && copy_in(env, x, xh, n * es) != cudaSuccess) rank_fail(env, "copying the tokens");
    /* one step together */
    res = env->failed ? MOE_EP_ERROR_INTERNAL : run_forward(env, ll, T, x, y, n * es, 1, idx, w, yh);
    if (res != MOE_EP_OK) rank_fail(env, "the step together: %s", moe_ep_cuda_layer_last_error(ll));
    test_barrier(env->world);
    /* the next step without the last rank */
    clock_gettime(CLOCK_MONOTONIC, &start);
    if (me != last) {
        res = moe_ep_cuda_forward(ll, &(moe_ep_cuda_forward_args){ .tokens = T, .x = x, .y = y, .routing_in = true,
                                                                    .topk_idx = idx, .topk_weight = w });
        if (res != MOE_EP_OK) rank_fail(env, "the forward did not queue: %s", moe_ep_cuda_layer_last_error(ll));
        if (aborting && me == 0) {
            nanosleep(&nap, NULL);      /* the kernels wait by now, with no time limit */
            moe_ep_cuda_layer_abort(ll);
        }
        if ((e = cudaStreamSynchronize(env->stream)) != cudaSuccess) rank_fail(env, "cudaStreamSynchronize: %s", cudaGetErrorString(e));
        clock_gettime(CLOCK_MONOTONIC, &end);
        got = moe_ep_cuda_layer_check(ll);
        waited = (double)(end.tv_sec - start.tv_sec) + 1e-9 * (double)(end.tv_nsec - start.tv_nsec);
        if (got != want)
            rank_fail(env, "waiting for a missing rank: %s (expected %s)", moe_ep_result_string(got), moe_ep_result_string(want));
        else if (me == 0)
            snprintf(env->message, sizeof env->message, "%s on every rank (the waiting ones after %.2f s)",
                     moe_ep_result_string(want), waited);
        if (moe_ep_cuda_forward(ll, &(moe_ep_cuda_forward_args){ .tokens = T, .x = x, .y = y, .routing_in = true,
                                                                 .topk_idx = idx, .topk_weight = w }) != want)
            rank_fail(env, "the next forward after the wait gave up did not fail with %s", moe_ep_result_string(want));
    }
    test_barrier(env->world);
    if (me == last) {
        /* late: its kernels find the peers' stop word and give up too */
        res = moe_ep_cuda_forward(ll, &(moe_ep_cuda_forward_args){ .tokens = T, .x = x, .y = y, .routing_in = true,
                                                                    .topk_idx = idx, .topk_weight = w });
        if ((e = cudaStreamSynchronize(env->stream)) != cudaSuccess) rank_fail(env, "cudaStreamSynchronize: %s", cudaGetErrorString(e));
        got = res != MOE_EP_OK ? res : moe_ep_cuda_layer_check(ll);
        if (got != want)
            rank_fail(env, "the late rank: %s (expected %s)", moe_ep_result_string(got), moe_ep_result_string(want));
    }
done:
    if (ll) moe_ep_cuda_layer_destroy(ll);     /* not collective once a wait gave up */
    free_weights(mine, store, L);
    free(xh); free(yh); free(xf); free(idx); free(w);
    cudaFree(x); cudaFree(y);
}

/* >>create refuses what the mode cannot do */
static int no_experts(int l, int e, const void* rows, int64_t n, int d, void* out, cudaStream_t s, void* u) {
    (void)l; (void)e; (void)rows; (void)n; (void)d; (void)out; (void)s; (void)u;
    return 1;
}

static void test_refusals(rank_env* env) {
    ll_case* c = (ll_case*)env->shared;
    moe_ep_cuda_expert_weights* mine = NULL;
    void** store = NULL;
    int L = 0, i;
    moe_ep_result got[4];
    mine = rank_weights(c, 0, 1, &store, &L);
    for (i = 0; i < 4; ++i) {
        moe_ep_cuda_layer* layer = NULL;
        moe_ep_cuda_layer_desc d;
        memset(&d, 0, sizeof d);
        d.d_model = c->d;
        d.d_ff = c->ff;
        d.num_experts = c->E;
        d.top_k = c->k;
        d.transport = &env->transport;
        d.stream = env->stream;
        d.mode = MOE_EP_CUDA_MODE_LOW_LATENCY;
        d.max_tokens = i == 0 ? 0 : 8;
        d.experts = mine;
        if (i == 1) { d.expert_fn = no_experts; d.experts = NULL; }
        if (i == 2) d.expert_gemm = MOE_EP_CUDA_EXPERT_GEMM_GROUPED;
        if (i == 3) d.planning = MOE_EP_CUDA_PLANNING_HOST;
        got[i] = moe_ep_cuda_layer_create(&d, &layer);
        if (layer) moe_ep_cuda_layer_destroy(layer);
    }
    for (i = 0; i < 4; ++i)
        if (got[i] != MOE_EP_ERROR_INVALID_ARGUMENT)
            rank_fail(env, "create %s: %s", i == 0 ? "without max_tokens" : i == 1 ? "with expert_fn" : i == 2 ? "with GROUPED"
                      : "with planning HOST", moe_ep_result_string(got[i]));
    free_weights(mine, store, L);
}

/* >>the cases */
static void run_ll_case(int world, ll_case c, rank_fn fn, const char* what) {
    char name[200];
    c.fn = fn;
    model_make(&c);
    snprintf(name, sizeof name, "%s %s %s %s E=%d k=%d d=%d", what, c.name, c.bf16 ? "bf16" : "fp32",
             c.gemm == MOE_EP_CUDA_EXPERT_GEMM_HOPPER ? "HOPPER" : "CHUNKED", c.E, c.k, c.d);
    run_case(world, name, &c);
    model_free(&c);
}

static void run_world(int world) {
    int hopper = moe_ep__cuda_k_gemm_ready();
    if (world == 1) {
        ll_case plain = { .name = "plain", .E = 16, .k = 4, .d = 64, .ff = 96, .max_tokens = 128, .never_chosen = 1,
                          .gemm = MOE_EP_CUDA_EXPERT_GEMM_CHUNKED, .seed = 11 };
        ll_case drops = plain, bf16 = plain, hop = plain, graph = plain, many = plain;
        run_ll_case(1, plain, test_bitwise, "low-latency = normal layer");
        drops.name = "capacity 0.5, input scaling";
        drops.capacity = 0.5f;
        drops.scale_input = 1;
        drops.never_chosen = 0;
        drops.seed = 12;
        run_ll_case(1, drops, test_bitwise, "low-latency = normal layer");
        bf16.bf16 = 1;
        bf16.d = 128;
        bf16.ff = 64;
        bf16.seed = 13;
        run_ll_case(1, bf16, test_bitwise, "low-latency = normal layer");
        many.name = "256 experts top-8";
        many.E = 256;
        many.k = 8;
        many.seed = 14;
        run_ll_case(1, many, test_bitwise, "low-latency = normal layer");
        if (hopper) {
            hop = bf16;
            hop.gemm = MOE_EP_CUDA_EXPERT_GEMM_HOPPER;
            hop.seed = 15;
            run_ll_case(1, hop, test_bitwise, "low-latency = normal layer");
        } else {
            printf("      (no Hopper kernel here: its cases are skipped)\n");
        }
        graph.tokens[0] = 7;
        graph.replays = 3;
        graph.seed = 16;
        run_ll_case(1, graph, test_graph, "graph");
        graph.bf16 = 1;
        graph.d = 128;
        graph.ff = 64;
        graph.tokens[0] = 128;
        run_ll_case(1, graph, test_graph, "graph");
        if (hopper) {
            graph.gemm = MOE_EP_CUDA_EXPERT_GEMM_HOPPER;
            run_ll_case(1, graph, test_graph, "graph");
        }
        run_ll_case(1, plain, test_refusals, "refusals");
    } else {
        ll_case ranks = { .name = "ranks", .E = 16, .k = 4, .d = 64, .ff = 96, .max_tokens = 128, .tokens = { 7, 128, 0, 1 },
                          .gemm = MOE_EP_CUDA_EXPERT_GEMM_CHUNKED, .seed = 21 };
        ll_case uneven = ranks;
        ranks.tokens[world - 1] = 1;    /* the smallest world keeps a rank with one token */
        run_ll_case(world, ranks, test_ranks, "low-latency ~ normal direct path");
        uneven.name = "10 experts, capacity 0.7";
        uneven.E = 10;
        uneven.k = 3;
        uneven.capacity = 0.7f;
        uneven.tokens[0] = 0;
        uneven.seed = 22;
        run_ll_case(world, uneven, test_ranks, "low-latency ~ normal direct path");
        run_ll_case(world, ranks, test_ranks_graph, "graphs on every rank");
        ranks.tokens[0] = 4;
        ranks.tokens[1] = 3;
        ranks.tokens[2] = 2;
        ranks.tokens[3] = 1;
        ranks.replays = 0;
        run_ll_case(world, ranks, test_missing, "a missing rank, timeout");
        ranks.replays = 1;
        run_ll_case(world, ranks, test_missing, "a missing rank, abort");
    }
}

int main(int argc, char** argv) {
    const char* env = getenv("MOE_EP_REQUIRE_GPU");
    int require = env && strcmp(env, "1") == 0, i, failed;
    cudaError_t e;
    Suite* suite;
    TCase* tc;
    SRunner* runner;
    for (i = 1; i < argc; ++i)
        if (strcmp(argv[i], "--require-gpu") == 0) require = 1;
    /* Ranks share a GPU here, and so one CUDA context: a kernel loaded lazily on its first
       launch waits for the context's running kernels, among them the peers' waits for this
       rank (the first multi-rank runs timed out so, in the first forward of a layer with
       the GPU router). Before the first CUDA call; a value the caller set is kept. */
    setenv("CUDA_MODULE_LOADING", "EAGER", 0);
    e = cudaGetDeviceCount(&g_gpus);
    if (e != cudaSuccess || g_gpus == 0) {
        printf("check_cuda_lowlat: no GPU, %s (%s)\n", require ? "FAILED (--require-gpu)" : "skipped",
               e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
        return require ? 1 : 77;
    }
    printf("check_cuda_lowlat: %d GPU(s); world sizes 1 to %d, rank r on GPU r %% %d\n", g_gpus, MAX_RANKS, g_gpus);
    env = getenv("MOE_EP_TEST_WORLD");     /* one world size only (1 to MAX_RANKS) */
    for (i = 0; i < MAX_RANKS; ++i)
        if (!env || atoi(env) == i + 1) g_gpu_sizes[g_gpu_size_count++] = i + 1;
    g_gpu_world = run_world;
    suite = suite_create("check_cuda_lowlat");
    tc = tcase_create("world sizes");
    tcase_set_timeout(tc, 600);
    tcase_add_loop_test(tc, gpu_world_test, 0, g_gpu_size_count);
    suite_add_tcase(suite, tc);
    runner = srunner_create(suite);
    srunner_set_fork_status(runner, CK_NOFORK);
    srunner_run_all(runner, CK_NORMAL);
    failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed == 0 ? 0 : 1;
}
