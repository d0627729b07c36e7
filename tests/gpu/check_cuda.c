/* check_cuda -- the GPU layer of moe_ep (moe_ep_cuda.h) over the NCCL transport, on every GPU of this machine.

   One process, one thread per GPU (ncclCommInitAll). Every case runs with world sizes 1,
   2, 4, 8 up to the GPUs there are, and with all GPUs: one Check loop test per world size,
   one assertion per case (tests/gpu/gpu_check.h). Without a GPU it prints "check_cuda: no
   GPU, skipped" and exits 77 (with --require-gpu or MOE_EP_REQUIRE_GPU=1: exits 1).
   --max-gpus N limits the world size. Run with CK_FORK=no.

   Checks, each on fresh seeded random data, outputs poisoned with NaN first:
   - the GPU layer against the core's CPU layer (moe_ep_forward on one rank, same weights,
     tokens and routing, fp32): relative error ||y - ref|| / ||ref|| <= 1e-5 for fp32 and
     <= 1e-2 for bf16, per rank, on odd shapes (0 tokens, empty experts, k = E, sizes that
     are multiples of nothing, capacity drops, both a2a layouts, reserved buffers, the
     grouped GEMMs and the GEMM loop);
   - the GPU router picks a valid top-k (up to 1e-5 in probability) with the CPU's weights;
   - the staged calls (split-phase) give the forward's output bitwise; two forwards agree;
   - the direct path gives the NCCL path's output bitwise, forwards and stages, with the
     layer's buffers and the caller's; a second dispatch before the combine fails on every
     rank and the layer works on;
   - an expert callback that fails on one rank (also on the direct path), or a bad desc /
     too many tokens on one rank, fails the call on every rank, and the layer works again
     afterwards.
   The transport alone (exchange_counts, all_to_all_v, the core's layer over NCCL) is
   tests/gpu/check_nccl.c. */
#define MOE_EP_IMPLEMENTATION
#include "../../moe_ep_cuda.h"
#include "../../transports/moe_ep_nccl.h"
#include "../../transports/moe_ep_pthreads.h"   /* the core's plans of an emulated world of ranks */

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <stdarg.h>

#include "../support/test_support.h"
#include "gpu_check.h"

#define MAX_GPUS 8

/* >>helpers (and tests/support) */
static void fill(float* v, size_t n, float scale, int round_bf16, uint64_t* s) {
    size_t i;
    for (i = 0; i < n; ++i) {
        v[i] = scale * test_rng_uniform(s);
        if (round_bf16) v[i] = test_bf16_to_float(test_bf16_from_float(v[i]));
    }
}

/* a host copy in the GPU dtype */
static void* to_dtype(const float* v, size_t n, int bf16) {
    size_t i;
    if (!bf16) {
        float* out = (float*)malloc(n * 4 + 4);
        memcpy(out, v, n * 4);
        return out;
    } else {
        uint16_t* out = (uint16_t*)malloc(n * 2 + 2);
        for (i = 0; i < n; ++i) out[i] = test_bf16_from_float(v[i]);
        return out;
    }
}

static void from_dtype(const void* v, size_t n, int bf16, float* out) {
    size_t i;
    if (!bf16) memcpy(out, v, n * 4);
    else for (i = 0; i < n; ++i) out[i] = test_bf16_to_float(((const uint16_t*)v)[i]);
}

/* >>world: one thread per rank */
typedef struct rank_env {
    int rank, world, device;
    ncclComm_t comm;
    cudaStream_t stream;
    moe_ep_transport transport;
    int failed;
    moe_ep_result result;           /* for agreement tests */
    char message[512];
    void* shared;                   /* the case */
} rank_env;

typedef void (*rank_fn)(rank_env* env);

typedef struct world {
    int size;
    int devices[MAX_GPUS];
    ncclComm_t comms[MAX_GPUS];
    rank_env env[MAX_GPUS];
} world;


static void rank_fail(rank_env* env, const char* fmt, ...) {
    va_list ap;
    if (env->failed) return;    /* keep the first cause */
    env->failed = 1;
    va_start(ap, fmt);
    vsnprintf(env->message, sizeof env->message, fmt, ap);
    va_end(ap);
}

#define CHECK_CUDA(env, call) do { cudaError_t e_ = (call); \
    if (e_ != cudaSuccess) { rank_fail(env, "%s:%d %s: %s", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); return; } } while (0)

static void* rank_main(void* arg) {
    rank_env* env = (rank_env*)arg;
    rank_fn fn = *(rank_fn*)env->shared;
    if (cudaSetDevice(env->device) != cudaSuccess) { rank_fail(env, "cudaSetDevice"); return NULL; }
    if (cudaStreamCreate(&env->stream) != cudaSuccess) { rank_fail(env, "cudaStreamCreate"); return NULL; }
    if (moe_ep_nccl_transport_create(&(moe_ep_nccl_desc){ .comm = env->comm, .stream = env->stream, .timeout_ms = 120000 },
                                     &env->transport) != MOE_EP_OK) {
        rank_fail(env, "moe_ep_nccl_transport_create failed");
    } else {
        fn(env);
        moe_ep_nccl_transport_destroy(&env->transport);
    }
    cudaStreamSynchronize(env->stream);
    cudaStreamDestroy(env->stream);
    return NULL;
}

/* The case struct must begin with its rank_fn. */
static void run_case(world* w, const char* name, void* the_case) {
    pthread_t threads[MAX_GPUS];
    int r, failed = 0;
    for (r = 0; r < w->size; ++r) {
        rank_env* env = &w->env[r];
        memset(env, 0, sizeof *env);
        env->rank = r;
        env->world = w->size;
        env->device = w->devices[r];
        env->comm = w->comms[r];
        env->shared = the_case;
        env->result = MOE_EP_OK;
    }
    for (r = 0; r < w->size; ++r) pthread_create(&threads[r], NULL, rank_main, &w->env[r]);
    for (r = 0; r < w->size; ++r) pthread_join(threads[r], NULL);
    for (r = 0; r < w->size; ++r)
        if (w->env[r].failed) {
            if (failed < 0) printf("      (also rank %d: %s)\n", r, w->env[r].message);
            else failed = -1 - r;
        }
    if (failed) gpu_fact(1, "world=%d %s  rank %d: %s", w->size, name, -1 - failed, w->env[-1 - failed].message);
    else gpu_fact(0, "world=%d %s%s%s", w->size, name, w->env[0].message[0] ? "  " : "", w->env[0].message);
}

/* >>model: weights and tokens shared by all ranks (host, fp32, bf16-rounded for bf16) */
typedef struct layer_case {
    rank_fn fn;
    const char* name;
    int bf16, E, k, d, ff, normalize, max_tokens, gpu_router, staged, weights_on_device;
    moe_ep_cuda_expert_gemm expert_gemm;
    int tokens[4];                  /* per rank, cycled */
    float capacity;
    moe_ep_activation activation;
    moe_ep_placement_kind placement;
    moe_ep_cuda_a2a_layout layout;
    moe_ep_cuda_direct direct;
    uint64_t seed;
    /* the router's variants (moe_ep_desc's names); biases: fill router_bias and selection_bias */
    moe_ep_scoring scoring;
    float scaling;
    int groups, topk_groups, biases;
    /* filled by the runner */
    float* router;                  /* [E, d] */
    float router_bias[256], selection_bias[256];
    float** w1; float** w3; float** w2;
    float* x[MAX_GPUS];
    int never_chosen;               /* hand-in routing avoids the upper half of the experts */
    int scale_input;                /* scale_expert_input (Llama-4) */
    int replays;                    /* the graph case: replays with fresh tokens */
} layer_case;

static void model_make(layer_case* c, int world) {
    uint64_t s = c->seed;
    int e, r;
    size_t dd = (size_t)c->d, ff = (size_t)c->ff;
    c->router = (float*)malloc(sizeof(float) * (size_t)c->E * dd);
    fill(c->router, (size_t)c->E * dd, 3.0f / sqrtf((float)c->d), c->bf16, &s);
    {   /* the biases from a generator of their own: the other draws stay those of every case */
        uint64_t bs = c->seed * 7919u + 1u;
        fill(c->router_bias, 256, 1.0f, 0, &bs);
        fill(c->selection_bias, 256, 0.3f, 0, &bs);
    }
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
    for (r = 0; r < world; ++r) {
        size_t T = (size_t)c->tokens[r % 4];
        c->x[r] = (float*)malloc(sizeof(float) * (T * dd + 1));
        fill(c->x[r], T * dd, 1.0f, c->bf16, &s);
    }
}

static void model_free(layer_case* c, int world) {
    int e, r;
    for (e = 0; e < c->E; ++e) { free(c->w1[e]); free(c->w3[e]); free(c->w2[e]); }
    free(c->w1); free(c->w3); free(c->w2); free(c->router);
    for (r = 0; r < world; ++r) free(c->x[r]);
}

/* The core's CPU layer on one rank over this rank's tokens with the given routing. */
static moe_ep_result cpu_reference(const layer_case* c, int T, const float* x, const int32_t* idx, const float* w,
                                   float* y, moe_ep_context** keep) {
    moe_ep_expert_weights* all = (moe_ep_expert_weights*)calloc((size_t)c->E, sizeof *all);
    moe_ep_context* ctx = NULL;
    moe_ep_result res;
    int e;
    for (e = 0; e < c->E; ++e) { all[e].w1 = c->w1[e]; all[e].w3 = c->w3[e]; all[e].w2 = c->w2[e]; }
    res = moe_ep_create(&(moe_ep_desc){ .d_model = c->d, .d_ff = c->ff, .num_experts = c->E, .top_k = c->k,
                                        .activation = c->activation, .normalize_topk = c->normalize != 0,
                                        .scoring = c->scoring, .routed_scaling_factor = c->scaling,
                                        .num_groups = c->groups, .topk_groups = c->topk_groups,
                                        .router_bias = c->biases ? c->router_bias : NULL,
                                        .selection_bias = c->biases ? c->selection_bias : NULL,
                                        .capacity_factor = c->capacity, .router_weight = c->router,
                                        .scale_expert_input = c->scale_input != 0,
                                        .experts = all, .num_threads = 1 }, &ctx);
    if (res == MOE_EP_OK)
        res = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = T, .x = x, .y = y, .routing_in = true,
                                                          .topk_idx = (int32_t*)(uintptr_t)idx,
                                                          .topk_weight = (float*)(uintptr_t)w });
    free(all);
    if (keep) *keep = ctx;
    else moe_ep_destroy(ctx);
    return res;
}

/* Hand-in routing: distinct experts per token, from the lower half when never_chosen. */
static void make_routing(const layer_case* c, int rank, int T, int32_t* idx, float* w) {
    uint64_t s = c->seed * 977 + (uint64_t)rank;
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

/* GPU routing is a valid top-k of the CPU probabilities, with the CPU's weights. */
static void check_router(rank_env* env, const layer_case* c, moe_ep_context* ref, int T, const float* x,
                         const int32_t* idx, const float* w) {
    int32_t* cpu_idx = (int32_t*)malloc(sizeof(int32_t) * (size_t)(T * c->k + 1));
    float* cpu_w = (float*)malloc(sizeof(float) * (size_t)(T * c->k + 1));
    int t, j;
    if (moe_ep_route(ref, x, T, cpu_idx, cpu_w, NULL) != MOE_EP_OK) { rank_fail(env, "moe_ep_route failed"); goto done; }
    for (t = 0; t < T; ++t) {
        float kth = cpu_w[t * c->k + c->k - 1];
        for (j = 0; j < c->k; ++j) {
            int32_t e = idx[t * c->k + j];
            int i, found = -1;
            for (i = 0; i < c->k; ++i) if (cpu_idx[t * c->k + i] == e) found = i;
            if (found >= 0) {
                if (fabsf(w[t * c->k + j] - cpu_w[t * c->k + found]) > 1e-5f * fabsf(cpu_w[t * c->k + found]) + 1e-7f) {
                    rank_fail(env, "router: token %d expert %d weight %g, CPU %g", t, e, w[t * c->k + j], cpu_w[t * c->k + found]);
                    goto done;
                }
            } else if (c->normalize || c->scoring > MOE_EP_SCORING_SOFTMAX || c->groups > 1 || c->biases ||
                       fabsf(w[t * c->k + j] - kth) > 1e-5f * kth) {
                /* a different expert is fine only at a near tie with the k-th choice */
                rank_fail(env, "router: token %d chose expert %d (weight %g) outside the CPU's top-%d", t, e, w[t * c->k + j], c->k);
                goto done;
            }
        }
    }
done:
    free(cpu_idx);
    free(cpu_w);
}

/* This rank's experts under c's placement, host copies in the layer's dtype; *store gets
   the 3 * *count copies (w1, w3, w2 of each), for the caller to free. */
static moe_ep_cuda_expert_weights* rank_weights(const layer_case* c, int me, int R, void*** store, int* count) {
    int owner[256], e, i, l = 0, L = 0;
    int swiglu = c->activation == MOE_EP_ACTIVATION_SWIGLU || c->activation == MOE_EP_ACTIVATION_DEFAULT;
    size_t cnt = (size_t)c->d * (size_t)c->ff;
    moe_ep_cuda_expert_weights* mine;
    moe_ep_placement placement;
    placement.kind = c->placement;
    placement.table = NULL;
    moe_ep_placement_compute(&placement, c->E, R, owner);
    for (e = 0; e < c->E; ++e) L += owner[e] == me;
    mine = (moe_ep_cuda_expert_weights*)calloc((size_t)(L + 1), sizeof *mine);
    *store = (void**)calloc((size_t)(3 * L + 1), sizeof(void*));
    for (e = 0; e < c->E; ++e) {
        if (owner[e] != me) continue;
        for (i = 0; i < 3; ++i) (*store)[3 * l + i] = to_dtype(i == 0 ? c->w1[e] : i == 1 ? c->w3[e] : c->w2[e], cnt, c->bf16);
        mine[l].w1 = (*store)[3 * l];
        mine[l].w3 = swiglu ? (*store)[3 * l + 1] : NULL;
        mine[l].w2 = (*store)[3 * l + 2];
        ++l;
    }
    *count = L;
    return mine;
}

static void test_layer(rank_env* env) {
    layer_case* c = (layer_case*)env->shared;
    int me = env->rank, R = env->world, T = c->tokens[me % 4], l, L;
    size_t es = c->bf16 ? 2 : 4, n = (size_t)T * (size_t)c->d;
    moe_ep_cuda_layer* layer = NULL;
    moe_ep_cuda_expert_weights* mine = NULL;
    void **dev_weights = NULL, *router = NULL, *xh = NULL, *yh = NULL;
    void *x = NULL, *y = NULL, *y2 = NULL;
    float *yf = NULL, *ref = NULL, *w = NULL;
    int32_t* idx = NULL;
    moe_ep_context* ref_ctx = NULL;
    moe_ep_result res;
    double err;
    mine = rank_weights(c, me, R, &dev_weights, &L);
    for (l = 0; c->weights_on_device && l < L; ++l) {
        size_t cnt = (size_t)c->d * (size_t)c->ff;
        int i;
        for (i = 0; i < 3; ++i) {
            void* d = NULL;
            CHECK_CUDA(env, cudaMalloc(&d, cnt * es));
            CHECK_CUDA(env, cudaMemcpy(d, dev_weights[3 * l + i], cnt * es, cudaMemcpyHostToDevice));
            free(dev_weights[3 * l + i]);
            dev_weights[3 * l + i] = d;
        }
        mine[l].w1 = dev_weights[3 * l];
        mine[l].w3 = mine[l].w3 ? dev_weights[3 * l + 1] : NULL;
        mine[l].w2 = dev_weights[3 * l + 2];
    }
    router = to_dtype(c->router, (size_t)c->E * (size_t)c->d, c->bf16);
    res = moe_ep_cuda_layer_create(&(moe_ep_cuda_layer_desc){
        .d_model = c->d, .d_ff = c->ff, .num_experts = c->E, .top_k = c->k, .activation = c->activation,
        .normalize_topk = c->normalize != 0, .capacity_factor = c->capacity,
        .scoring = c->scoring, .routed_scaling_factor = c->scaling, .num_groups = c->groups,
        .topk_groups = c->topk_groups, .router_bias = c->biases ? c->router_bias : NULL,
        .selection_bias = c->biases ? c->selection_bias : NULL,
        .placement = { .kind = c->placement }, .transport = &env->transport,
        .stream = env->stream, .timeout_ms = 120000,
        .dtype = c->bf16 ? MOE_EP_CUDA_DTYPE_BF16 : MOE_EP_CUDA_DTYPE_F32, .a2a_layout = c->layout,
        .direct = c->direct, .max_tokens = c->max_tokens, .expert_gemm = c->expert_gemm,
        .router_weight = c->gpu_router ? router : NULL, .experts = mine }, &layer);
    if (res != MOE_EP_OK) { rank_fail(env, "moe_ep_cuda_layer_create: %s", moe_ep_result_string(res)); goto done; }
    xh = to_dtype(c->x[me], n, c->bf16);
    yh = malloc(n * es + 4);
    yf = (float*)malloc(sizeof(float) * (n + 1));
    ref = (float*)malloc(sizeof(float) * (n + 1));
    idx = (int32_t*)malloc(sizeof(int32_t) * (size_t)(T * c->k + 1));
    w = (float*)malloc(sizeof(float) * (size_t)(T * c->k + 1));
    CHECK_CUDA(env, cudaMalloc(&x, n * es + 16));
    CHECK_CUDA(env, cudaMalloc(&y, n * es + 16));
    CHECK_CUDA(env, cudaMalloc(&y2, n * es + 16));
    CHECK_CUDA(env, cudaMemcpy(x, xh, n * es, cudaMemcpyHostToDevice));
    CHECK_CUDA(env, cudaMemset(y, 0xFF, n * es + 16));   /* NaN in fp32 and bf16 */
    CHECK_CUDA(env, cudaMemset(y2, 0xFF, n * es + 16));
    if (!c->gpu_router) make_routing(c, me, T, idx, w);
    res = moe_ep_cuda_forward(layer, &(moe_ep_cuda_forward_args){ .tokens = T, .x = x, .y = y,
                                                                    .routing_in = !c->gpu_router,
                                                                    .topk_idx = idx, .topk_weight = w });
    if (res != MOE_EP_OK) { rank_fail(env, "forward: %s: %s", moe_ep_result_string(res), moe_ep_cuda_layer_last_error(layer)); goto done; }
    CHECK_CUDA(env, cudaStreamSynchronize(env->stream));
    CHECK_CUDA(env, cudaMemcpy(yh, y, n * es, cudaMemcpyDeviceToHost));
    from_dtype(yh, n, c->bf16, yf);
    /* local checks only from here to the second run: a rank that fails one must still
       take part in the collective calls below */
    res = cpu_reference(c, T, c->x[me], idx, w, ref, &ref_ctx);
    if (res != MOE_EP_OK) {
        rank_fail(env, "CPU reference: %s", moe_ep_result_string(res));
    } else {
        err = rel_error(yf, ref, n);
        if (!(err <= (c->bf16 ? 1e-2 : 1e-5)))
            rank_fail(env, "relative error %.3g > %g", err, c->bf16 ? 1e-2 : 1e-5);
        else if (me == 0)
            snprintf(env->message, sizeof env->message, "rel.err %.2e", err);
        if (c->gpu_router && !env->failed) check_router(env, c, ref_ctx, T, c->x[me], idx, w);
    }
    /* again, through the stages (split-phase) or the forward: the same bits */
    {
        int failed_before = env->failed;
        if (c->staged) {
            moe_ep_cuda_plan* plan = NULL;
            moe_ep_plan_info info;
            void *rows = NULL, *out = NULL;
            if (c->gpu_router) res = moe_ep_cuda_route(layer, x, T, idx, w);
            if (res == MOE_EP_OK) res = moe_ep_cuda_plan_create(layer, T, idx, w, &plan);
            if (res != MOE_EP_OK) { rank_fail(env, "staged: %s", moe_ep_cuda_layer_last_error(layer)); goto done; }
            info = moe_ep_cuda_plan_query(plan);
            CHECK_CUDA(env, cudaMalloc(&rows, (size_t)info.recv_rows * (size_t)c->d * es + 16));
            CHECK_CUDA(env, cudaMalloc(&out, (size_t)info.recv_rows * (size_t)c->d * es + 16));
            res = moe_ep_cuda_dispatch_begin(layer, plan, x, rows);
            if (res == MOE_EP_OK) res = moe_ep_cuda_dispatch_end(layer, plan);
            if (res == MOE_EP_OK) res = moe_ep_cuda_experts(layer, plan, rows, out);
            if (res == MOE_EP_OK) res = moe_ep_cuda_combine_begin(layer, plan, out);
            if (res == MOE_EP_OK) res = moe_ep_cuda_combine_end(layer, plan, y2);
            if (res != MOE_EP_OK) rank_fail(env, "staged: %s", moe_ep_cuda_layer_last_error(layer));
            CHECK_CUDA(env, cudaStreamSynchronize(env->stream));
            moe_ep_cuda_plan_destroy(plan);
            cudaFree(rows);
            cudaFree(out);
        } else {
            res = moe_ep_cuda_forward(layer, &(moe_ep_cuda_forward_args){ .tokens = T, .x = x, .y = y2,
                                                                            .routing_in = !c->gpu_router,
                                                                            .topk_idx = c->gpu_router ? NULL : idx,
                                                                            .topk_weight = c->gpu_router ? NULL : w });
            if (res != MOE_EP_OK) rank_fail(env, "second forward: %s", moe_ep_cuda_layer_last_error(layer));
        }
        if (!env->failed || failed_before) {
            void* again = malloc(n * es + 4);
            CHECK_CUDA(env, cudaStreamSynchronize(env->stream));
            CHECK_CUDA(env, cudaMemcpy(again, y2, n * es, cudaMemcpyDeviceToHost));
            if (memcmp(again, yh, n * es) != 0) rank_fail(env, "%s differs from the first forward", c->staged ? "staged run" : "second forward");
            free(again);
        }
    }
done:
    if (ref_ctx) moe_ep_destroy(ref_ctx);
    if (layer) moe_ep_cuda_layer_destroy(layer);
    for (l = 0; l < 3 * L; ++l) {
        if (c->weights_on_device) cudaFree(dev_weights[l]);
        else free(dev_weights[l]);
    }
    free(dev_weights); free(mine); free(router); free(xh); free(yh); free(yf); free(ref); free(idx); free(w);
    cudaFree(x); cudaFree(y); cudaFree(y2);
}

/* >>direct path: the same bits as the NCCL path */
/* Two layers on the same weights, one direct (ON from 2 ranks) and one through NCCL
   (OFF); several forwards with fresh tokens (and hand-in routing), then the stages with
   the layer's buffers and with the caller's; every output equal to the NCCL layer's,
   bitwise, and the first within tolerance of the CPU layer. Then misuse: a second
   dispatch before the first plan's combine fails on every rank, and the layer works on. */
static void test_direct(rank_env* env) {
    layer_case* c = (layer_case*)env->shared;
    int me = env->rank, R = env->world, T = c->tokens[me % 4], l, L, it, which;
    size_t es = c->bf16 ? 2 : 4, n = (size_t)T * (size_t)c->d;
    moe_ep_cuda_layer* layers[2] = { NULL, NULL };
    moe_ep_cuda_expert_weights* mine = NULL;
    void** host_weights = NULL;
    void *x = NULL, *y[2] = { NULL, NULL }, *yh[2] = { NULL, NULL }, *xh = NULL;
    float *xf = NULL, *yf = NULL, *ref = NULL, *w = NULL;
    int32_t* idx = NULL;
    uint64_t s = c->seed * 131 + (uint64_t)me;
    moe_ep_result res = MOE_EP_OK;
    mine = rank_weights(c, me, R, &host_weights, &L);
    for (which = 0; which < 2; ++which) {
        res = moe_ep_cuda_layer_create(&(moe_ep_cuda_layer_desc){
            .d_model = c->d, .d_ff = c->ff, .num_experts = c->E, .top_k = c->k,
            .capacity_factor = c->capacity, .placement = { .kind = c->placement },
            .transport = &env->transport,
        .stream = env->stream, .timeout_ms = 120000,
            .dtype = c->bf16 ? MOE_EP_CUDA_DTYPE_BF16 : MOE_EP_CUDA_DTYPE_F32, .max_tokens = c->max_tokens,
            .direct = which == 0 ? (R > 1 ? MOE_EP_CUDA_DIRECT_ON : MOE_EP_CUDA_DIRECT_DEFAULT) : MOE_EP_CUDA_DIRECT_OFF,
            .experts = mine }, &layers[which]);
        if (res != MOE_EP_OK) { rank_fail(env, "moe_ep_cuda_layer_create (%s): %s", which ? "NCCL" : "direct",
                                     moe_ep_result_string(res)); goto done; }
    }
    if (moe_ep_cuda_layer_direct(layers[0]) != (R > 1) || moe_ep_cuda_layer_direct(layers[1]) != 0)
        rank_fail(env, "moe_ep_cuda_layer_direct: %d and %d", moe_ep_cuda_layer_direct(layers[0]),
             moe_ep_cuda_layer_direct(layers[1]));
    xf = (float*)malloc(sizeof(float) * (n + 1));
    yf = (float*)malloc(sizeof(float) * (n + 1));
    ref = (float*)malloc(sizeof(float) * (n + 1));
    idx = (int32_t*)malloc(sizeof(int32_t) * (size_t)(T * c->k + 1));
    w = (float*)malloc(sizeof(float) * (size_t)(T * c->k + 1));
    for (which = 0; which < 2; ++which) {
        yh[which] = malloc(n * es + 4);
        CHECK_CUDA(env, cudaMalloc(&y[which], n * es + 16));
    }
    CHECK_CUDA(env, cudaMalloc(&x, n * es + 16));
    /* 0-2: forwards; 3: stages with the layer's buffers; 4: stages with the caller's */
    for (it = 0; it < 5; ++it) {
        fill(xf, n, 1.0f, c->bf16, &s);
        free(xh);
        xh = to_dtype(xf, n, c->bf16);
        CHECK_CUDA(env, cudaMemcpy(x, xh, n * es, cudaMemcpyHostToDevice));
        {
            layer_case rc = *c;
            rc.seed = c->seed + 1000 * (uint64_t)it;
            make_routing(&rc, me, T, idx, w);
        }
        for (which = 0; which < 2; ++which) {
            moe_ep_cuda_layer* layer = layers[which];
            CHECK_CUDA(env, cudaMemset(y[which], 0xFF, n * es + 16));
            if (it < 3 || which == 1) {
                res = moe_ep_cuda_forward(layer, &(moe_ep_cuda_forward_args){ .tokens = T, .x = x, .y = y[which],
                                                                                .routing_in = true, .topk_idx = idx,
                                                                                .topk_weight = w });
            } else {
                moe_ep_cuda_plan* plan = NULL;
                void *rows = NULL, *out = NULL, *own_rows = NULL, *own_out = NULL;
                int64_t cap = 0;
                moe_ep_cuda_layer_rows(layer, &rows, &out, &cap);
                res = moe_ep_cuda_plan_create(layer, T, idx, w, &plan);
                if (res == MOE_EP_OK) {
                    moe_ep_plan_info info = moe_ep_cuda_plan_query(plan);
                    if (!rows || !out || cap < info.recv_rows) rank_fail(env, "moe_ep_cuda_layer_rows: %lld rows", (long long)cap);
                    if (it == 4) {
                        CHECK_CUDA(env, cudaMalloc(&own_rows, (size_t)info.recv_rows * (size_t)c->d * es + 16));
                        CHECK_CUDA(env, cudaMalloc(&own_out, (size_t)info.recv_rows * (size_t)c->d * es + 16));
                        rows = own_rows;
                        out = own_out;
                    }
                    res = moe_ep_cuda_dispatch_begin(layer, plan, x, rows);
                    if (res == MOE_EP_OK) res = moe_ep_cuda_dispatch_end(layer, plan);
                    if (res == MOE_EP_OK) res = moe_ep_cuda_experts(layer, plan, rows, out);
                    if (res == MOE_EP_OK) res = moe_ep_cuda_combine_begin(layer, plan, out);
                    if (res == MOE_EP_OK) res = moe_ep_cuda_combine_end(layer, plan, y[which]);
                    CHECK_CUDA(env, cudaStreamSynchronize(env->stream));
                    moe_ep_cuda_plan_destroy(plan);
                    cudaFree(own_rows);
                    cudaFree(own_out);
                }
            }
            if (res != MOE_EP_OK) { rank_fail(env, "run %d (%s): %s", it, which ? "NCCL" : "direct",
                                         moe_ep_cuda_layer_last_error(layer)); goto done; }
            CHECK_CUDA(env, cudaStreamSynchronize(env->stream));
            CHECK_CUDA(env, cudaMemcpy(yh[which], y[which], n * es, cudaMemcpyDeviceToHost));
        }
        if (memcmp(yh[0], yh[1], n * es) != 0) {
            size_t i, first = n, count = 0;
            float a, b;
            for (i = 0; i < n; ++i)
                if (memcmp((char*)yh[0] + i * es, (char*)yh[1] + i * es, es) != 0) { if (first == n) first = i; ++count; }
            from_dtype((char*)yh[0] + first * es, 1, c->bf16, &a);
            from_dtype((char*)yh[1] + first * es, 1, c->bf16, &b);
            rank_fail(env, "run %d: the direct path differs from the NCCL path in %zu of %zu elements, first at token %zu "
                 "column %zu: %g against %g", it, count, n, first / (size_t)c->d, first % (size_t)c->d, a, b);
        }
        if (it == 0) {
            double err;
            from_dtype(yh[0], n, c->bf16, yf);
            res = cpu_reference(c, T, xf, idx, w, ref, NULL);
            err = res == MOE_EP_OK ? rel_error(yf, ref, n) : INFINITY;
            if (!(err <= (c->bf16 ? 1e-2 : 1e-5))) rank_fail(env, "relative error against the CPU layer %.3g", err);
            else if (me == 0) snprintf(env->message, sizeof env->message, "bitwise equal, rel.err %.2e", err);
        }
    }
    if (R > 1) {
        /* misuse: dispatch a second plan while the first is not combined */
        moe_ep_cuda_plan *p1 = NULL, *p2 = NULL;
        void *rows = NULL, *out = NULL;
        moe_ep_cuda_layer_rows(layers[0], &rows, &out, NULL);
        res = moe_ep_cuda_plan_create(layers[0], T, idx, w, &p1);
        if (res == MOE_EP_OK) res = moe_ep_cuda_plan_create(layers[0], T, idx, w, &p2);
        if (res == MOE_EP_OK) res = moe_ep_cuda_dispatch(layers[0], p1, x, rows);
        if (res != MOE_EP_OK) rank_fail(env, "misuse setup: %s", moe_ep_cuda_layer_last_error(layers[0]));
        else if ((res = moe_ep_cuda_dispatch(layers[0], p2, x, rows)) != MOE_EP_ERROR_INVALID_ARGUMENT)
            rank_fail(env, "second dispatch before the combine: %s", moe_ep_result_string(res));
        moe_ep_cuda_plan_destroy(p2);
        moe_ep_cuda_plan_destroy(p1);   /* never combined: its destroy frees the peers' next dispatch */
        CHECK_CUDA(env, cudaMemset(y[0], 0xFF, n * es + 16));
        res = moe_ep_cuda_forward(layers[0], &(moe_ep_cuda_forward_args){ .tokens = T, .x = x, .y = y[0],
                                                                           .routing_in = true, .topk_idx = idx,
                                                                           .topk_weight = w });
        if (res != MOE_EP_OK) rank_fail(env, "forward after the misuse: %s", moe_ep_cuda_layer_last_error(layers[0]));
        CHECK_CUDA(env, cudaStreamSynchronize(env->stream));
        CHECK_CUDA(env, cudaMemcpy(yh[0], y[0], n * es, cudaMemcpyDeviceToHost));
        if (memcmp(yh[0], yh[1], n * es) != 0) rank_fail(env, "after the misuse: the direct path differs from the NCCL path");
    }
done:
    for (which = 0; which < 2; ++which) {
        if (layers[which]) moe_ep_cuda_layer_destroy(layers[which]);
        cudaFree(y[which]);
        free(yh[which]);
    }
    for (l = 0; l < 3 * L; ++l) free(host_weights[l]);
    free(host_weights); free(mine); free(xh); free(xf); free(yf); free(ref); free(idx); free(w);
    cudaFree(x);
}

static void run_direct_case(world* w, layer_case c) {
    char name[160];
    c.fn = test_direct;
    model_make(&c, w->size);
    snprintf(name, sizeof name, "direct = NCCL path %s %s E=%d k=%d d=%d", c.name, c.bf16 ? "bf16" : "fp32", c.E, c.k, c.d);
    run_case(w, name, &c);
    model_free(&c, w->size);
}

static int scale_expert(int local_expert, int expert, const void* rows, int64_t row_count, int d_model, void* out,
                        cudaStream_t stream, void* user_data);

/* >>planning on the GPU: the host-planned layer's bits (world size 1) */
/* One layer per kind of planning, the same weights; fresh tokens each round. The GPU plan
   must place every row where the host plan does: the slot maps, the combine weights and
   the receive offsets equal (CHUNKED: the same rank within each expert, its padded
   offsets), and the outputs equal bitwise (CHUNKED: within tolerance of the CPU layer,
   its GEMMs being others). With capacity drops, empty experts, input scaling, k = E, the
   GPU router and hand-in routing. */
static moe_ep_cuda_layer* make_layer(rank_env* env, const layer_case* c, moe_ep_cuda_expert_weights* mine, void* router,
                                     moe_ep_cuda_planning planning, moe_ep_cuda_expert_gemm gemm) {
    moe_ep_cuda_layer* layer = NULL;
    moe_ep_result res = moe_ep_cuda_layer_create(&(moe_ep_cuda_layer_desc){
        .d_model = c->d, .d_ff = c->ff, .num_experts = c->E, .top_k = c->k, .activation = c->activation,
        .normalize_topk = c->normalize != 0, .capacity_factor = c->capacity, .scale_expert_input = c->scale_input != 0,
        .placement = { .kind = c->placement }, .transport = &env->transport, .stream = env->stream,
        .dtype = c->bf16 ? MOE_EP_CUDA_DTYPE_BF16 : MOE_EP_CUDA_DTYPE_F32, .max_tokens = c->max_tokens,
        .expert_gemm = gemm, .planning = planning, .router_weight = router, .experts = mine }, &layer);
    if (res != MOE_EP_OK) rank_fail(env, "moe_ep_cuda_layer_create (planning %d): %s", (int)planning, moe_ep_result_string(res));
    return res == MOE_EP_OK ? layer : NULL;
}

static void* fetch(rank_env* env, const void* dev, size_t bytes) {
    void* h = malloc(bytes + 8);
    if (cudaMemcpy(h, dev, bytes, cudaMemcpyDeviceToHost) != cudaSuccess) rank_fail(env, "download of a plan array");
    return h;
}

/* The GPU layer's last plan against a host plan of the same routing. */
static void compare_plans(rank_env* env, moe_ep_cuda_layer* host, moe_ep_cuda_layer* gpu, int T, const int32_t* idx,
                          const float* w, int chunked) {
    moe_ep_cuda_plan* P = NULL;
    size_t slots = (size_t)T * (size_t)gpu->top_k, n = (size_t)gpu->local_experts, i;
    int32_t *hm, *gm;
    float *hw, *gw;
    int64_t *hf, *gf, *gc;
    if (moe_ep_cuda_plan_create(host, T, idx, w, &P) != MOE_EP_OK) { rank_fail(env, "host plan: %s", moe_ep_cuda_layer_last_error(host)); return; }
    hm = (int32_t*)fetch(env, P->slot_map, slots * 4);
    gm = (int32_t*)fetch(env, gpu->gp.k.slot_map, slots * 4);
    hw = (float*)fetch(env, P->weight, slots * 4);
    gw = (float*)fetch(env, gpu->gp.k.weight, slots * 4);
    hf = (int64_t*)fetch(env, P->first_row, n * 8);
    gf = (int64_t*)fetch(env, gpu->gp.k.local_offsets, n * 8);
    gc = (int64_t*)fetch(env, gpu->gp.k.local_counts, n * 8);
    if (memcmp(hw, gw, slots * 4) != 0) rank_fail(env, "plan: the combine weights differ");
    if (memcmp(gc, P->info.local_expert_counts, n * 8) != 0) rank_fail(env, "plan: the local expert counts differ");
    if (!chunked && memcmp(hf, gf, n * 8) != 0) rank_fail(env, "plan: the local expert offsets differ");
    if (!chunked && memcmp(hm, gm, slots * 4) != 0) rank_fail(env, "plan: the slot maps differ");
    for (i = 0; chunked && i < slots && !env->failed; ++i) {
        int l = gpu->local_index_of[idx[i]];
        int64_t hr = hm[i] == -1 ? -1 : -(int64_t)hm[i] - 2 - hf[l], gr = gm[i] == -1 ? -1 : -(int64_t)gm[i] - 2 - gf[l];
        if (hr != gr || (gf[l] % gpu->chunk_rows) != 0)
            rank_fail(env, "plan: slot %zu is row %lld of expert %d on the host, %lld (first row %lld) on the GPU", i,
                      (long long)hr, l, (long long)gr, (long long)gf[l]);
    }
    moe_ep_cuda_plan_destroy(P);
    free(hm); free(gm); free(hw); free(gw); free(hf); free(gf); free(gc);
}

static void test_gpu_plan(rank_env* env) {
    layer_case* c = (layer_case*)env->shared;
    int T = c->tokens[0], l, L = 0, round, chunked = c->expert_gemm == MOE_EP_CUDA_EXPERT_GEMM_CHUNKED;
    size_t es = c->bf16 ? 2 : 4, n = (size_t)T * (size_t)c->d, slots = (size_t)T * (size_t)c->k;
    moe_ep_cuda_layer *host = NULL, *gpu = NULL;
    moe_ep_cuda_expert_weights* mine = NULL;
    void **store = NULL, *router = NULL, *xh = NULL, *yh[2] = { NULL, NULL }, *x = NULL, *y[2] = { NULL, NULL };
    float *xf = NULL, *yf = NULL, *ref = NULL, *w = NULL;
    int32_t* idx = NULL;
    uint64_t s = c->seed * 4099;
    mine = rank_weights(c, 0, 1, &store, &L);
    router = to_dtype(c->router, (size_t)c->E * (size_t)c->d, c->bf16);
    host = make_layer(env, c, mine, c->gpu_router ? router : NULL, MOE_EP_CUDA_PLANNING_HOST,
                      chunked ? MOE_EP_CUDA_EXPERT_GEMM_DEFAULT : c->expert_gemm);
    gpu = make_layer(env, c, mine, c->gpu_router ? router : NULL, MOE_EP_CUDA_PLANNING_GPU, c->expert_gemm);
    if (!host || !gpu) goto done;
    if (!gpu->gpu_plan || host->gpu_plan) { rank_fail(env, "the layers did not take the planning asked for"); goto done; }
    xf = (float*)malloc(sizeof(float) * (n + 1));
    yf = (float*)malloc(sizeof(float) * (n + 1));
    ref = (float*)malloc(sizeof(float) * (n + 1));
    idx = (int32_t*)malloc(sizeof(int32_t) * (slots + 1));
    w = (float*)malloc(sizeof(float) * (slots + 1));
    yh[0] = malloc(n * es + 4);
    yh[1] = malloc(n * es + 4);
    CHECK_CUDA(env, cudaMalloc(&x, n * es + 16));
    CHECK_CUDA(env, cudaMalloc(&y[0], n * es + 16));
    CHECK_CUDA(env, cudaMalloc(&y[1], n * es + 16));
    for (round = 0; round < 3 && !env->failed; ++round) {
        moe_ep_result res;
        int which;
        fill(xf, n, 1.0f, c->bf16, &s);
        free(xh);
        xh = to_dtype(xf, n, c->bf16);
        CHECK_CUDA(env, cudaMemcpy(x, xh, n * es, cudaMemcpyHostToDevice));
        CHECK_CUDA(env, cudaMemset(y[0], 0xFF, n * es + 16));
        CHECK_CUDA(env, cudaMemset(y[1], 0xFF, n * es + 16));
        if (!c->gpu_router) {
            layer_case c2 = *c;
            c2.seed = c->seed + (uint64_t)round;
            make_routing(&c2, 0, T, idx, w);
        }
        /* the GPU-planned layer routes (or takes the routing), the host-planned one routes on its own */
        res = moe_ep_cuda_forward(gpu, &(moe_ep_cuda_forward_args){ .tokens = T, .x = x, .y = y[1],
                                                                      .routing_in = !c->gpu_router, .topk_idx = idx,
                                                                      .topk_weight = w });
        if (res != MOE_EP_OK) { rank_fail(env, "GPU-planned forward: %s", moe_ep_cuda_layer_last_error(gpu)); break; }
        res = moe_ep_cuda_forward(host, &(moe_ep_cuda_forward_args){ .tokens = T, .x = x, .y = y[0],
                                                                       .routing_in = !c->gpu_router,
                                                                       .topk_idx = c->gpu_router ? NULL : idx,
                                                                       .topk_weight = c->gpu_router ? NULL : w });
        if (res != MOE_EP_OK) { rank_fail(env, "host-planned forward: %s", moe_ep_cuda_layer_last_error(host)); break; }
        CHECK_CUDA(env, cudaStreamSynchronize(env->stream));
        for (which = 0; which < 2; ++which) CHECK_CUDA(env, cudaMemcpy(yh[which], y[which], n * es, cudaMemcpyDeviceToHost));
        compare_plans(env, host, gpu, T, idx, w, chunked);
        from_dtype(yh[1], n, c->bf16, yf);
        if (cpu_reference(c, T, xf, idx, w, ref, NULL) != MOE_EP_OK) { rank_fail(env, "CPU reference failed"); break; }
        {
            double err = rel_error(yf, ref, n);
            if (!(err <= (c->bf16 ? 1e-2 : 1e-5))) rank_fail(env, "round %d: relative error %.3g against the CPU layer", round, err);
            else snprintf(env->message, sizeof env->message, "rel.err %.2e%s", err, chunked ? "" : ", bitwise the host plan's");
        }
        if (!chunked && memcmp(yh[0], yh[1], n * es) != 0) rank_fail(env, "round %d: the output differs from the host-planned layer's", round);
    }
    /* no tokens: nothing to do, y untouched */
    if (!env->failed && moe_ep_cuda_forward(gpu, &(moe_ep_cuda_forward_args){ .tokens = 0, .routing_in = !c->gpu_router })
                        != MOE_EP_OK)
        rank_fail(env, "a forward of 0 tokens failed: %s", moe_ep_cuda_layer_last_error(gpu));
done:
    if (host) moe_ep_cuda_layer_destroy(host);
    if (gpu) moe_ep_cuda_layer_destroy(gpu);
    for (l = 0; l < 3 * L; ++l) free(store[l]);
    free(store); free(mine); free(router); free(xh); free(yh[0]); free(yh[1]); free(xf); free(yf); free(ref); free(idx); free(w);
    cudaFree(x); cudaFree(y[0]); cudaFree(y[1]);
}

/* >>CUDA graphs: the layer captured once, replayed on fresh tokens (world size 1) */
/* CHUNKED, the GPU router: a warm-up forward, then one forward captured (global mode: any
   synchronising call fails the capture), then replays, each with new tokens copied into the
   captured input, against the same layer's plain forward on them, bitwise; one replay is
   also checked against the CPU layer. Few tokens over many experts: experts without rows. */
static void test_graph(rank_env* env) {
    layer_case* c = (layer_case*)env->shared;
    int T = c->tokens[0], l, L = 0, round, empty_seen = 0;
    size_t es = c->bf16 ? 2 : 4, n = (size_t)T * (size_t)c->d, slots = (size_t)T * (size_t)c->k;
    moe_ep_cuda_layer *layer = NULL, *refused = NULL;
    moe_ep_cuda_expert_weights* mine = NULL;
    void **store = NULL, *router = NULL, *xh = NULL, *yg = NULL, *yp = NULL, *x = NULL, *y = NULL, *y2 = NULL;
    float *xf = NULL, *yf = NULL, *ref = NULL, *w = NULL;
    int32_t* idx = NULL;
    uint64_t s = c->seed * 7177;
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    enum cudaStreamCaptureStatus status;
    moe_ep_result res;
    mine = rank_weights(c, 0, 1, &store, &L);
    router = to_dtype(c->router, (size_t)c->E * (size_t)c->d, c->bf16);
    /* CHUNKED without max_tokens, or with an expert callback, is refused at create */
    res = moe_ep_cuda_layer_create(&(moe_ep_cuda_layer_desc){ .d_model = c->d, .d_ff = c->ff, .num_experts = c->E,
                                       .top_k = c->k, .transport = &env->transport, .stream = env->stream,
                                       .expert_gemm = MOE_EP_CUDA_EXPERT_GEMM_CHUNKED, .experts = mine }, &refused);
    if (res != MOE_EP_ERROR_INVALID_ARGUMENT) rank_fail(env, "CHUNKED without max_tokens: %s", moe_ep_result_string(res));
    res = moe_ep_cuda_layer_create(&(moe_ep_cuda_layer_desc){ .d_model = c->d, .num_experts = c->E, .top_k = c->k,
                                       .transport = &env->transport, .stream = env->stream, .max_tokens = T,
                                       .expert_gemm = MOE_EP_CUDA_EXPERT_GEMM_CHUNKED, .expert_fn = scale_expert }, &refused);
    if (res != MOE_EP_ERROR_INVALID_ARGUMENT) rank_fail(env, "CHUNKED with expert_fn: %s", moe_ep_result_string(res));
    if (refused) moe_ep_cuda_layer_destroy(refused);
    layer = make_layer(env, c, mine, router, MOE_EP_CUDA_PLANNING_DEFAULT,
                       c->expert_gemm ? c->expert_gemm : MOE_EP_CUDA_EXPERT_GEMM_CHUNKED);
    if (!layer) goto done;
    xf = (float*)malloc(sizeof(float) * (n + 1));
    yf = (float*)malloc(sizeof(float) * (n + 1));
    ref = (float*)malloc(sizeof(float) * (n + 1));
    idx = (int32_t*)malloc(sizeof(int32_t) * (slots + 1));
    w = (float*)malloc(sizeof(float) * (slots + 1));
    yg = malloc(n * es + 4);
    yp = malloc(n * es + 4);
    CHECK_CUDA(env, cudaMalloc(&x, n * es + 16));
    CHECK_CUDA(env, cudaMalloc(&y, n * es + 16));
    CHECK_CUDA(env, cudaMalloc(&y2, n * es + 16));
    fill(xf, n, 1.0f, c->bf16, &s);
    xh = to_dtype(xf, n, c->bf16);
    CHECK_CUDA(env, cudaMemcpy(x, xh, n * es, cudaMemcpyHostToDevice));
    res = moe_ep_cuda_forward(layer, &(moe_ep_cuda_forward_args){ .tokens = T, .x = x, .y = y2 });   /* warm-up */
    if (res != MOE_EP_OK) { rank_fail(env, "warm-up forward: %s", moe_ep_cuda_layer_last_error(layer)); goto done; }
    CHECK_CUDA(env, cudaStreamSynchronize(env->stream));
    CHECK_CUDA(env, cudaStreamBeginCapture(env->stream, cudaStreamCaptureModeGlobal));
    res = moe_ep_cuda_forward(layer, &(moe_ep_cuda_forward_args){ .tokens = T, .x = x, .y = y });
    if (cudaStreamIsCapturing(env->stream, &status) != cudaSuccess || status != cudaStreamCaptureStatusActive)
        rank_fail(env, "the forward broke the capture (%s)", moe_ep_cuda_layer_last_error(layer));
    CHECK_CUDA(env, cudaStreamEndCapture(env->stream, &graph));
    if (res != MOE_EP_OK) { rank_fail(env, "captured forward: %s", moe_ep_cuda_layer_last_error(layer)); goto done; }
    if (env->failed) goto done;
    CHECK_CUDA(env, cudaGraphInstantiate(&exec, graph, 0));
    for (round = 0; round < c->replays && !env->failed; ++round) {
        size_t used = 0;
        int e;
        fill(xf, n, 1.0f, c->bf16, &s);
        free(xh);
        xh = to_dtype(xf, n, c->bf16);
        CHECK_CUDA(env, cudaMemcpy(x, xh, n * es, cudaMemcpyHostToDevice));
        CHECK_CUDA(env, cudaMemset(y, 0xFF, n * es + 16));
        CHECK_CUDA(env, cudaMemset(y2, 0xFF, n * es + 16));
        CHECK_CUDA(env, cudaGraphLaunch(exec, env->stream));
        CHECK_CUDA(env, cudaStreamSynchronize(env->stream));
        CHECK_CUDA(env, cudaMemcpy(yg, y, n * es, cudaMemcpyDeviceToHost));
        /* the plain forward on the same tokens, with the routing brought back */
        res = moe_ep_cuda_forward(layer, &(moe_ep_cuda_forward_args){ .tokens = T, .x = x, .y = y2, .topk_idx = idx,
                                                                        .topk_weight = w });
        if (res != MOE_EP_OK) { rank_fail(env, "plain forward: %s", moe_ep_cuda_layer_last_error(layer)); break; }
        CHECK_CUDA(env, cudaStreamSynchronize(env->stream));
        CHECK_CUDA(env, cudaMemcpy(yp, y2, n * es, cudaMemcpyDeviceToHost));
        if (memcmp(yg, yp, n * es) != 0) rank_fail(env, "replay %d differs from the plain forward", round);
        for (e = 0; e < c->E; ++e) {
            size_t i;
            int hit = 0;
            for (i = 0; i < slots; ++i) hit |= idx[i] == e;
            used += (size_t)hit;
        }
        empty_seen += used < (size_t)c->E;
        if (round == 0) {
            double err;
            from_dtype(yg, n, c->bf16, yf);
            if (cpu_reference(c, T, xf, idx, w, ref, NULL) != MOE_EP_OK) { rank_fail(env, "CPU reference failed"); break; }
            err = rel_error(yf, ref, n);
            if (!(err <= (c->bf16 ? 1e-2 : 1e-5))) rank_fail(env, "replay: relative error %.3g against the CPU layer", err);
            else snprintf(env->message, sizeof env->message, "%d replays bitwise the plain forward; rel.err %.2e; "
                          "chunks of %d rows", c->replays, err, layer->chunk_rows);
        }
    }
    if (!env->failed && !empty_seen && T * c->k < c->E)
        rank_fail(env, "no replay left an expert without rows (the case must)");
done:
    if (exec) cudaGraphExecDestroy(exec);
    if (graph) cudaGraphDestroy(graph);
    if (layer) moe_ep_cuda_layer_destroy(layer);
    for (l = 0; l < 3 * L; ++l) free(store[l]);
    free(store); free(mine); free(router); free(xh); free(yg); free(yp); free(xf); free(yf); free(ref); free(idx); free(w);
    cudaFree(x); cudaFree(y); cudaFree(y2);
}

/* >>the plan kernels for several ranks, emulated on one GPU */
/* The core's plans of R ranks (pthreads transport, hand-in routing) against the plan
   kernels run for each of the R ranks on this GPU, the count exchange done by the test
   between their two halves: every rank's send and receive offsets, local counts and
   offsets, totals and slot map equal. Uneven placements (E % R != 0, round-robin), capacity
   drops and several blocks of slots. */
#define EMU_MAX_RANKS 4
typedef struct emu_case {
    int R, E, k, tokens[EMU_MAX_RANKS];
    float capacity;
    moe_ep_placement_kind placement;
    uint64_t seed;
    /* filled by the core's ranks */
    int32_t* idx[EMU_MAX_RANKS];
    float* weight[EMU_MAX_RANKS];
    moe_ep_plan_info info[EMU_MAX_RANKS];
    moe_ep_plan* plans[EMU_MAX_RANKS];
    moe_ep_context* ctx[EMU_MAX_RANKS];
    int32_t expert_at[2 * 64];
} emu_case;

static int emu_no_experts(int l, int e, const float* rows, int64_t n, int d, float* out, void* u) {
    (void)l; (void)e; (void)rows; (void)n; (void)d; (void)out; (void)u;
    return 1;
}

static moe_ep_result emu_rank(const moe_ep_transport* t, void* user) {
    emu_case* c = (emu_case*)user;
    int r = t->rank, e;
    moe_ep_result res = moe_ep_create(&(moe_ep_desc){ .d_model = 8, .num_experts = c->E, .top_k = c->k,
                                                       .capacity_factor = c->capacity,
                                                       .placement = { .kind = c->placement }, .num_threads = 1,
                                                       .expert_fn = emu_no_experts, .transport = t }, &c->ctx[r]);
    if (res == MOE_EP_OK) res = moe_ep_plan_create(c->ctx[r], c->tokens[r], c->idx[r], c->weight[r], &c->plans[r]);
    if (res != MOE_EP_OK) return res;
    c->info[r] = moe_ep_plan_query(c->plans[r]);
    for (e = 0; r == 0 && e < c->E; ++e) {
        c->expert_at[e] = moe_ep_expert_owner(c->ctx[r], e);
        c->expert_at[c->E + e] = moe_ep_expert_local_index(c->ctx[r], e);
    }
    return MOE_EP_OK;
}

typedef struct emu_run { rank_fn fn; emu_case* c; } emu_run;

static void test_plan_ranks(rank_env* env) {
    emu_case* c = ((emu_run*)env->shared)->c;
    moe_ep_pthreads_world* world = NULL;
    moe_ep__cuda_k_plan k[EMU_MAX_RANKS];
    void* block[EMU_MAX_RANKS];
    int R = c->R, S = 1, r, q, s, e;
    int64_t* sent = (int64_t*)calloc((size_t)(R * R * c->E + 1), sizeof(int64_t));
    layer_case routing_case;
    memset(block, 0, sizeof block);
    memset(&routing_case, 0, sizeof routing_case);
    routing_case.E = c->E;
    routing_case.k = c->k;
    for (r = 0; r < R; ++r) {
        c->idx[r] = (int32_t*)malloc(sizeof(int32_t) * (size_t)(c->tokens[r] * c->k + 1));
        c->weight[r] = (float*)malloc(sizeof(float) * (size_t)(c->tokens[r] * c->k + 1));
        routing_case.seed = c->seed + (uint64_t)r;
        make_routing(&routing_case, r, c->tokens[r], c->idx[r], c->weight[r]);
    }
    if (moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = R }, &world) != MOE_EP_OK ||
        moe_ep_pthreads_run(world, emu_rank, c, NULL) != MOE_EP_OK) {
        rank_fail(env, "the core's plans of %d ranks failed", R);
        goto done;
    }
    S = c->info[0].segments;
    for (r = 0; r < R; ++r) {     /* each rank's send half */
        int64_t slots = (int64_t)c->tokens[r] * c->k, blocks = (slots + MOE_EP__CUDA_PLAN_BLOCK - 1) / MOE_EP__CUDA_PLAN_BLOCK;
        size_t RS = (size_t)R * (size_t)S, off = 0;
        char* b;
        CHECK_CUDA(env, cudaMalloc(&block[r], 1 << 22));
        b = (char*)block[r];
        memset(&k[r], 0, sizeof k[r]);
#define EMU_TAKE(ptr, type, count) do { ptr = (type*)(b + off); off += ((size_t)(count) * sizeof(type) + 255) & ~(size_t)255; } while (0)
        EMU_TAKE(k[r].topk_idx, const int32_t, slots + 1);
        EMU_TAKE(k[r].topk_weight, const float, slots + 1);
        EMU_TAKE(k[r].expert_at, const int32_t, 2 * c->E);
        EMU_TAKE(k[r].slot_rank, int32_t, slots + 1);
        EMU_TAKE(k[r].block_counts, int32_t, (blocks + 1) * c->E);
        EMU_TAKE(k[r].counts, int64_t, c->E);
        EMU_TAKE(k[r].kept, int64_t, c->E);
        EMU_TAKE(k[r].seg_send_counts, int64_t, RS);
        EMU_TAKE(k[r].seg_send_offsets, int64_t, RS);
        EMU_TAKE(k[r].seg_recv_counts, int64_t, RS);
        EMU_TAKE(k[r].seg_recv_offsets, int64_t, RS);
        EMU_TAKE(k[r].local_counts, int64_t, S);
        EMU_TAKE(k[r].local_offsets, int64_t, S);
        EMU_TAKE(k[r].totals, int64_t, 4);
        EMU_TAKE(k[r].slot_map, int32_t, slots + 1);
        EMU_TAKE(k[r].weight, float, slots + 1);
#undef EMU_TAKE
        k[r].slots = slots;
        k[r].capacity = c->info[r].capacity;
        k[r].E = c->E;
        k[r].R = R;
        k[r].S = S;
        k[r].rank = r;
        k[r].local_experts = c->info[r].local_experts;
        CHECK_CUDA(env, cudaMemcpy((void*)(uintptr_t)k[r].topk_idx, c->idx[r], (size_t)slots * 4 + 4, cudaMemcpyHostToDevice));
        CHECK_CUDA(env, cudaMemcpy((void*)(uintptr_t)k[r].topk_weight, c->weight[r], (size_t)slots * 4 + 4, cudaMemcpyHostToDevice));
        CHECK_CUDA(env, cudaMemcpy((void*)(uintptr_t)k[r].expert_at, c->expert_at, sizeof(int32_t) * 2 * (size_t)c->E,
                                   cudaMemcpyHostToDevice));
        CHECK_CUDA(env, (cudaError_t)moe_ep__cuda_k_plan_send(&k[r], env->stream));
        CHECK_CUDA(env, cudaMemcpy(sent + (size_t)r * RS, k[r].seg_send_counts, RS * 8, cudaMemcpyDeviceToHost));
    }
    for (r = 0; r < R && !env->failed; ++r) {    /* the count exchange, then the receive half */
        int64_t* got = (int64_t*)calloc((size_t)(R * S) * 4 + 8, sizeof(int64_t));
        int64_t *recv_off = got + R * S, *send_off = got + 2 * R * S, *local = got + 3 * R * S, totals[4];
        int64_t slots = (int64_t)c->tokens[r] * c->k, i;
        int32_t* map = (int32_t*)malloc(sizeof(int32_t) * (size_t)(slots + 1));
        const moe_ep_plan_info* in = &c->info[r];
        for (q = 0; q < R; ++q)
            for (s = 0; s < S; ++s) got[q * S + s] = sent[(size_t)q * R * S + (size_t)r * S + s];
        if (memcmp(got, in->seg_recv_counts, sizeof(int64_t) * (size_t)(R * S)) != 0)
            rank_fail(env, "R=%d rank %d: the counts it receives differ from the core's", R, r);
        CHECK_CUDA(env, cudaMemcpy(k[r].seg_recv_counts, got, sizeof(int64_t) * (size_t)(R * S), cudaMemcpyHostToDevice));
        CHECK_CUDA(env, (cudaError_t)moe_ep__cuda_k_plan_receive(&k[r], env->stream));
        CHECK_CUDA(env, cudaStreamSynchronize(env->stream));
        CHECK_CUDA(env, cudaMemcpy(recv_off, k[r].seg_recv_offsets, sizeof(int64_t) * (size_t)(R * S), cudaMemcpyDeviceToHost));
        CHECK_CUDA(env, cudaMemcpy(send_off, k[r].seg_send_offsets, sizeof(int64_t) * (size_t)(R * S), cudaMemcpyDeviceToHost));
        CHECK_CUDA(env, cudaMemcpy(local, k[r].local_counts, sizeof(int64_t) * (size_t)S, cudaMemcpyDeviceToHost));
        CHECK_CUDA(env, cudaMemcpy(local + S, k[r].local_offsets, sizeof(int64_t) * (size_t)S, cudaMemcpyDeviceToHost));
        CHECK_CUDA(env, cudaMemcpy(totals, k[r].totals, sizeof totals, cudaMemcpyDeviceToHost));
        CHECK_CUDA(env, cudaMemcpy(map, k[r].slot_map, sizeof(int32_t) * (size_t)slots, cudaMemcpyDeviceToHost));
        if (memcmp(send_off, in->seg_send_offsets, sizeof(int64_t) * (size_t)(R * S)) != 0 ||
            memcmp(recv_off, in->seg_recv_offsets, sizeof(int64_t) * (size_t)(R * S)) != 0)
            rank_fail(env, "R=%d rank %d: segment offsets differ from the core's", R, r);
        if (memcmp(local, in->local_expert_counts, sizeof(int64_t) * (size_t)in->local_experts) != 0 ||
            memcmp(local + S, in->local_expert_offsets, sizeof(int64_t) * (size_t)in->local_experts) != 0)
            rank_fail(env, "R=%d rank %d: local expert counts or offsets differ from the core's", R, r);
        if (totals[0] != in->send_rows || totals[1] != in->recv_rows)
            rank_fail(env, "R=%d rank %d: %lld send / %lld receive rows, the core %lld / %lld", R, r, (long long)totals[0],
                      (long long)totals[1], (long long)in->send_rows, (long long)in->recv_rows);
        for (i = 0; i < slots && !env->failed; ++i) {
            int64_t row = in->slot_rows[i];
            int owner = c->expert_at[c->idx[r][i]], l = c->expert_at[c->E + c->idx[r][i]];
            int64_t want = row < 0 ? -1 : owner != r ? row
                           : -(row + in->seg_recv_offsets[r * S + l] - in->seg_send_offsets[r * S + l]) - 2;
            if (map[i] != want) rank_fail(env, "R=%d rank %d slot %lld: slot map %d, the core's plan says %lld", R, r,
                                          (long long)i, map[i], (long long)want);
        }
        free(got);
        free(map);
    }
    if (!env->failed) {
        int64_t dropped = 0;
        for (r = 0; r < R; ++r)
            for (e = 0; e < c->E; ++e) dropped += c->info[r].expert_counts[e] - c->info[r].expert_kept[e];
        snprintf(env->message, sizeof env->message, "%d segments, %lld assignments dropped", S, (long long)dropped);
    }
done:
    for (r = 0; r < R; ++r) {
        if (c->plans[r]) moe_ep_plan_destroy(c->plans[r]);
        if (c->ctx[r]) moe_ep_destroy(c->ctx[r]);
        c->plans[r] = NULL;
        c->ctx[r] = NULL;
        free(c->idx[r]);
        free(c->weight[r]);
        cudaFree(block[r]);
    }
    if (world) moe_ep_pthreads_world_destroy(world);
    free(sent);
}

static void run_world_one_case(world* w, layer_case c, rank_fn fn, const char* what) {
    char name[200];
    c.fn = fn;
    model_make(&c, 1);
    snprintf(name, sizeof name, "%s %s %s E=%d k=%d d=%d ff=%d T=%d", what, c.name, c.bf16 ? "bf16" : "fp32", c.E, c.k, c.d,
             c.ff, c.tokens[0]);
    run_case(w, name, &c);
    model_free(&c, 1);
}

/* >>agreement tests */
typedef struct agree_case {
    rank_fn fn;
    int mode;       /* 0 failing expert_fn on the last rank, 1 bad desc on rank 0, 2 too many tokens on the last
                       rank (direct path from 2 ranks), 3 as 0 on the direct path */
} agree_case;

typedef struct scale_state { cublasHandle_t blas; int fail_once; } scale_state;

/* out = (expert + 1) * rows: y = x * sum_j w_j (e_j + 1) checks that rows meet the right expert. */
static int scale_expert(int local_expert, int expert, const void* rows, int64_t row_count, int d_model, void* out,
                        cudaStream_t stream, void* user_data) {
    scale_state* st = (scale_state*)user_data;
    float alpha = (float)(expert + 1);
    (void)local_expert;
    if (st->fail_once) { st->fail_once = 0; return 7; }
    if (cudaMemcpyAsync(out, rows, (size_t)row_count * (size_t)d_model * 4, cudaMemcpyDeviceToDevice, stream) != cudaSuccess)
        return 1;
    cublasSetStream(st->blas, stream);
    return cublasSscal(st->blas, (int)(row_count * d_model), &alpha, (float*)out, 1) == CUBLAS_STATUS_SUCCESS ? 0 : 2;
}

static void test_agreement(rank_env* env) {
    agree_case* c = (agree_case*)env->shared;
    int me = env->rank, R = env->world, E = 2 * R, k = 2, d = 24, T = 50, t, j, i;
    moe_ep_cuda_layer* layer = NULL;
    scale_state st;
    void *x = NULL, *y = NULL;
    float *xh, *yh, *expect;
    int32_t idx[50 * 2];
    float w[50 * 2];
    moe_ep_result res;
    uint64_t s = 4242 + (uint64_t)me;
    memset(&st, 0, sizeof st);
    cublasCreate(&st.blas);
    xh = (float*)malloc(sizeof(float) * (size_t)(T * d));
    yh = (float*)malloc(sizeof(float) * (size_t)(T * d));
    expect = (float*)malloc(sizeof(float) * (size_t)(T * d));
    fill(xh, (size_t)(T * d), 1.0f, 0, &s);
    for (t = 0; t < T; ++t) {   /* token t visits experts t % E and (t + 1) % E: every expert gets rows */
        idx[t * k] = t % E;
        idx[t * k + 1] = (t + 1) % E;
        w[t * k] = 0.25f + 0.01f * (float)(t % 7);
        w[t * k + 1] = 0.5f;
    }
    for (t = 0; t < T; ++t)
        for (i = 0; i < d; ++i) {
            float acc = 0.0f;
            for (j = 0; j < k; ++j) acc += w[t * k + j] * ((float)(idx[t * k + j] + 1) * xh[t * d + i]);
            expect[t * d + i] = acc;
        }
    CHECK_CUDA(env, cudaMalloc(&x, sizeof(float) * (size_t)(T * d)));
    CHECK_CUDA(env, cudaMalloc(&y, sizeof(float) * (size_t)(T * d)));
    CHECK_CUDA(env, cudaMemcpy(x, xh, sizeof(float) * (size_t)(T * d), cudaMemcpyHostToDevice));
    res = moe_ep_cuda_layer_create(&(moe_ep_cuda_layer_desc){
        .d_model = d, .num_experts = E, .top_k = k, .transport = &env->transport,
        .stream = env->stream, .timeout_ms = 120000,
        .dtype = c->mode == 1 && me == 0 ? (moe_ep_cuda_dtype)99 : MOE_EP_CUDA_DTYPE_F32,
        .max_tokens = c->mode >= 2 ? T : 0, .direct = c->mode == 3 && R > 1 ? MOE_EP_CUDA_DIRECT_ON : MOE_EP_CUDA_DIRECT_DEFAULT,
        .expert_fn = scale_expert, .expert_user_data = &st }, &layer);
    if (c->mode == 1) {
        if (res == MOE_EP_OK) rank_fail(env, "a bad desc on rank 0 was accepted here");
        else if (R > 1 && me != 0 && res != MOE_EP_ERROR_RANK_MISMATCH)
            rank_fail(env, "expected RANK_MISMATCH, got %s", moe_ep_result_string(res));
        /* the layer must still be creatable by all afterwards */
        res = moe_ep_cuda_layer_create(&(moe_ep_cuda_layer_desc){
            .d_model = d, .num_experts = E, .top_k = k, .transport = &env->transport,
        .stream = env->stream, .timeout_ms = 120000,
            .expert_fn = scale_expert, .expert_user_data = &st }, &layer);
    }
    if (res != MOE_EP_OK) { rank_fail(env, "moe_ep_cuda_layer_create: %s", moe_ep_result_string(res)); goto done; }
    if (c->mode == 0 || c->mode == 3) st.fail_once = me == R - 1;
    res = moe_ep_cuda_forward(layer, &(moe_ep_cuda_forward_args){
        .tokens = c->mode == 2 && me == R - 1 ? T + 1 : T, .x = x, .y = y, .routing_in = true,
        .topk_idx = idx, .topk_weight = w });
    if (c->mode != 1) {
        moe_ep_result want_here = c->mode == 2 ? MOE_EP_ERROR_INVALID_ARGUMENT : MOE_EP_ERROR_CALLBACK;
        moe_ep_result want = me == R - 1 ? want_here : MOE_EP_ERROR_ABORTED;
        if (res != want) rank_fail(env, "failing forward: expected %s, got %s (%s)", moe_ep_result_string(want),
                              moe_ep_result_string(res), moe_ep_cuda_layer_last_error(layer));
        st.fail_once = 0;
        res = moe_ep_cuda_forward(layer, &(moe_ep_cuda_forward_args){ .tokens = T, .x = x, .y = y, .routing_in = true,
                                                                        .topk_idx = idx, .topk_weight = w });
    }
    if (res != MOE_EP_OK) { rank_fail(env, "forward: %s (%s)", moe_ep_result_string(res), moe_ep_cuda_layer_last_error(layer)); goto done; }
    CHECK_CUDA(env, cudaStreamSynchronize(env->stream));
    CHECK_CUDA(env, cudaMemcpy(yh, y, sizeof(float) * (size_t)(T * d), cudaMemcpyDeviceToHost));
    {
        double err = rel_error(yh, expect, (size_t)(T * d));
        if (!(err <= 1e-6)) rank_fail(env, "scaled experts: relative error %.3g", err);
    }
done:
    if (layer) moe_ep_cuda_layer_destroy(layer);
    cublasDestroy(st.blas);
    free(xh); free(yh); free(expect);
    cudaFree(x); cudaFree(y);
}

/* >>main */
static void run_layer_case(world* w, layer_case c) {
    char name[160];
    c.fn = test_layer;
    model_make(&c, w->size);
    snprintf(name, sizeof name, "layer %s %s E=%d k=%d d=%d ff=%d", c.name, c.bf16 ? "bf16" : "fp32", c.E, c.k, c.d, c.ff);
    run_case(w, name, &c);
    model_free(&c, w->size);
}

static void run_world(world* w) {
    int i;
    {
        layer_case cases[] = {
            { .name = "router", .E = 8, .k = 2, .d = 64, .ff = 96, .gpu_router = 1, .tokens = { 300, 257, 1, 64 }, .seed = 1 },
            { .name = "router", .bf16 = 1, .E = 8, .k = 2, .d = 64, .ff = 96, .gpu_router = 1, .tokens = { 300, 257, 1, 64 }, .seed = 2 },
            { .name = "router sigmoid, selection bias, 4 groups keep 2, x2.5 (DeepSeek-V3)", .E = 16, .k = 4, .d = 48,
              .ff = 40, .gpu_router = 1, .normalize = 1, .scoring = MOE_EP_SCORING_SIGMOID, .scaling = 2.5f, .groups = 4,
              .topk_groups = 2, .biases = 1, .tokens = { 130, 77, 3, 40 }, .seed = 31 },
            { .name = "router bias, top-k then softmax (GPT-OSS)", .E = 8, .k = 2, .d = 40, .ff = 32, .gpu_router = 1,
              .scoring = MOE_EP_SCORING_TOPK_SOFTMAX, .biases = 1, .tokens = { 90, 33, 0, 7 }, .seed = 32 },
            { .name = "router top-1 then sigmoid (Llama-4)", .E = 8, .k = 1, .d = 40, .ff = 32, .gpu_router = 1,
              .scoring = MOE_EP_SCORING_TOPK_SIGMOID, .tokens = { 64, 19, 5, 1 }, .seed = 33 },
            { .name = "router sigmoid, 8 groups of 32 keep 4, top-8 (DeepSeek-V3's shape, registers)", .E = 256, .k = 8,
              .d = 64, .ff = 16, .gpu_router = 1, .normalize = 1, .scoring = MOE_EP_SCORING_SIGMOID, .scaling = 2.5f,
              .groups = 8, .topk_groups = 4, .biases = 1, .tokens = { 300, 77, 5, 1 }, .seed = 36 },
            { .name = "router softmax, 2 groups of 32 keep 1, top-6, biases (registers)", .E = 64, .k = 6, .d = 48,
              .ff = 16, .gpu_router = 1, .groups = 2, .topk_groups = 1, .biases = 1, .tokens = { 150, 41, 9, 2 },
              .seed = 37 },
            { .name = "router top-k then softmax, 40 experts (registers, a part-filled slot)", .E = 40, .k = 5,
              .d = 32, .ff = 16, .gpu_router = 1, .scoring = MOE_EP_SCORING_TOPK_SOFTMAX, .normalize = 1,
              .tokens = { 120, 33, 2, 7 }, .seed = 38 },
            { .name = "router softmax, 3 groups keep 1, x0.5", .E = 12, .k = 2, .d = 40, .ff = 32, .gpu_router = 1,
              .scaling = 0.5f, .groups = 3, .topk_groups = 1, .tokens = { 70, 41, 9, 2 }, .seed = 34 },
            { .name = "router+normalize staged-calls", .E = 16, .k = 4, .d = 48, .ff = 40, .gpu_router = 1, .normalize = 1,
              .staged = 1, .tokens = { 129, 77, 3, 0 }, .seed = 3 },
            { .name = "0 tokens on rank 1", .E = 8, .k = 2, .d = 32, .ff = 64, .gpu_router = 1, .tokens = { 100, 0, 40, 0 }, .seed = 4 },
            { .name = "0 tokens on rank 1", .bf16 = 1, .E = 8, .k = 2, .d = 32, .ff = 64, .gpu_router = 1, .tokens = { 100, 0, 40, 0 }, .seed = 5 },
            { .name = "empty experts (half never chosen)", .E = 16, .k = 2, .d = 40, .ff = 24, .never_chosen = 1,
              .tokens = { 37, 101, 7, 13 }, .seed = 6 },
            { .name = "k=E", .E = 4, .k = 4, .d = 36, .ff = 20, .gpu_router = 1, .tokens = { 55, 31, 9, 2 }, .seed = 7 },
            { .name = "k=E", .bf16 = 1, .E = 4, .k = 4, .d = 36, .ff = 20, .gpu_router = 1, .tokens = { 55, 31, 9, 2 }, .seed = 8 },
            { .name = "odd d, ff, E (E%R!=0)", .E = 5, .k = 3, .d = 33, .ff = 45, .gpu_router = 1, .tokens = { 97, 61, 1, 3 }, .seed = 9 },
            { .name = "odd d, ff, E (E%R!=0)", .bf16 = 1, .E = 5, .k = 3, .d = 33, .ff = 45, .gpu_router = 1, .tokens = { 97, 61, 1, 3 }, .seed = 10 },
            { .name = "segmented a2a", .E = 12, .k = 3, .d = 64, .ff = 48, .gpu_router = 1, .layout = MOE_EP_CUDA_A2A_SEGMENTED,
              .staged = 1, .tokens = { 211, 99, 5, 8 }, .seed = 11 },
            { .name = "segmented a2a", .bf16 = 1, .E = 12, .k = 3, .d = 64, .ff = 48, .gpu_router = 1,
              .layout = MOE_EP_CUDA_A2A_SEGMENTED, .tokens = { 211, 99, 5, 8 }, .seed = 12 },
            { .name = "capacity 1.0 (drops) round-robin", .E = 8, .k = 2, .d = 32, .ff = 32, .gpu_router = 1, .capacity = 1.0f,
              .placement = MOE_EP_PLACEMENT_ROUND_ROBIN, .tokens = { 150, 90, 11, 4 }, .seed = 13 },
            { .name = "max_tokens reserved, weights on device", .E = 8, .k = 2, .d = 64, .ff = 64, .gpu_router = 1,
              .max_tokens = 256, .weights_on_device = 1, .staged = 1, .tokens = { 256, 200, 3, 1 }, .seed = 14 },
            { .name = "gelu", .E = 6, .k = 2, .d = 40, .ff = 56, .activation = MOE_EP_ACTIVATION_GELU, .gpu_router = 1,
              .tokens = { 80, 45, 2, 9 }, .seed = 15 },
            { .name = "relu", .bf16 = 1, .E = 6, .k = 2, .d = 40, .ff = 56, .activation = MOE_EP_ACTIVATION_RELU,
              .gpu_router = 1, .tokens = { 80, 45, 2, 9 }, .seed = 16 },
            { .name = "larger", .E = 8, .k = 2, .d = 512, .ff = 768, .gpu_router = 1, .tokens = { 700, 513, 64, 1 }, .seed = 17 },
            { .name = "larger, GEMM loop", .E = 8, .k = 2, .d = 512, .ff = 768, .gpu_router = 1,
              .expert_gemm = MOE_EP_CUDA_EXPERT_GEMM_LOOP, .staged = 1, .tokens = { 700, 513, 64, 1 },
              .seed = 19 },
            { .name = "GEMM loop, 32 experts", .bf16 = 1, .E = 32, .k = 4, .d = 128, .ff = 96, .gpu_router = 1,
              .expert_gemm = MOE_EP_CUDA_EXPERT_GEMM_LOOP, .staged = 1, .tokens = { 400, 333, 8, 1 },
              .seed = 20 },
            { .name = "GEMM loop, odd shapes", .bf16 = 1, .E = 5, .k = 3, .d = 33, .ff = 45, .gpu_router = 1,
              .expert_gemm = MOE_EP_CUDA_EXPERT_GEMM_LOOP, .tokens = { 97, 0, 1, 3 }, .seed = 21 },
            { .name = "larger", .bf16 = 1, .E = 8, .k = 2, .d = 512, .ff = 768, .gpu_router = 1, .tokens = { 700, 513, 64, 1 }, .seed = 18 },
        };
        for (i = 0; i < (int)(sizeof cases / sizeof cases[0]); ++i) run_layer_case(w, cases[i]);
    }
    {
        layer_case cases[] = {
            { .name = "", .E = 8, .k = 2, .d = 64, .ff = 48, .max_tokens = 300, .tokens = { 300, 257, 1, 64 }, .seed = 31 },
            { .name = "", .bf16 = 1, .E = 16, .k = 4, .d = 128, .ff = 64, .max_tokens = 300, .tokens = { 129, 300, 3, 77 },
              .seed = 32 },
            { .name = "0 tokens on two ranks", .bf16 = 1, .E = 8, .k = 2, .d = 32, .ff = 40, .max_tokens = 100,
              .tokens = { 100, 0, 40, 0 }, .seed = 33 },
            { .name = "empty experts", .E = 16, .k = 2, .d = 40, .ff = 24, .never_chosen = 1, .max_tokens = 120,
              .tokens = { 37, 101, 7, 13 }, .seed = 34 },
            { .name = "odd d, k=E", .bf16 = 1, .E = 3, .k = 3, .d = 33, .ff = 20, .max_tokens = 64,
              .tokens = { 55, 31, 9, 2 }, .seed = 35 },
            { .name = "capacity 1.0 (drops) round-robin", .E = 8, .k = 2, .d = 36, .ff = 32, .capacity = 1.0f,
              .placement = MOE_EP_PLACEMENT_ROUND_ROBIN, .max_tokens = 150, .tokens = { 150, 90, 11, 4 }, .seed = 36 },
        };
        for (i = 0; i < (int)(sizeof cases / sizeof cases[0]); ++i) run_direct_case(w, cases[i]);
    }
    if (w->size == 1) {
        layer_case plans[] = {
            { .name = "GPU router", .E = 8, .k = 2, .d = 64, .ff = 48, .gpu_router = 1, .max_tokens = 300,
              .tokens = { 300 }, .seed = 51 },
            { .name = "hand-in, empty experts, capacity 1.0 (drops)", .bf16 = 1, .E = 16, .k = 4, .d = 64, .ff = 40,
              .never_chosen = 1, .capacity = 1.0f, .max_tokens = 256, .tokens = { 250 }, .seed = 52 },
            { .name = "odd shapes, GEMM loop, capacity 1.25, input scaling", .E = 5, .k = 3, .d = 33, .ff = 45,
              .expert_gemm = MOE_EP_CUDA_EXPERT_GEMM_LOOP, .capacity = 1.25f, .scale_input = 1, .max_tokens = 128,
              .tokens = { 97 }, .seed = 53 },
            { .name = "k=E, GPU router", .bf16 = 1, .E = 4, .k = 4, .d = 36, .ff = 20, .gpu_router = 1, .max_tokens = 64,
              .tokens = { 55 }, .seed = 54 },
            { .name = "1030 slots (5 blocks), round-robin", .E = 32, .k = 5, .d = 40, .ff = 24, .gpu_router = 1,
              .placement = MOE_EP_PLACEMENT_ROUND_ROBIN, .max_tokens = 300, .tokens = { 206 }, .seed = 55 },
            { .name = "CHUNKED, GPU router", .bf16 = 1, .E = 64, .k = 6, .d = 128, .ff = 96, .gpu_router = 1,
              .expert_gemm = MOE_EP_CUDA_EXPERT_GEMM_CHUNKED, .max_tokens = 600, .tokens = { 512 }, .seed = 56 },
            { .name = "CHUNKED, hand-in, empty experts, capacity 1.0, input scaling", .E = 12, .k = 3, .d = 48, .ff = 40,
              .expert_gemm = MOE_EP_CUDA_EXPERT_GEMM_CHUNKED, .never_chosen = 1, .capacity = 1.0f, .scale_input = 1,
              .max_tokens = 100, .tokens = { 100 }, .seed = 57 },
            { .name = "CHUNKED, gelu", .E = 6, .k = 2, .d = 40, .ff = 56, .activation = MOE_EP_ACTIVATION_GELU,
              .gpu_router = 1, .expert_gemm = MOE_EP_CUDA_EXPERT_GEMM_CHUNKED, .max_tokens = 200, .tokens = { 130 },
              .seed = 58 },
        };
        layer_case graphs[] = {
            { .name = "", .bf16 = 1, .E = 64, .k = 2, .d = 128, .ff = 96, .max_tokens = 64, .tokens = { 24 }, .replays = 4,
              .seed = 61 },
            { .name = "", .E = 32, .k = 4, .d = 64, .ff = 80, .max_tokens = 100, .tokens = { 9 }, .replays = 4, .seed = 62 },
            { .name = "input scaling, capacity 1.0 (drops)", .bf16 = 1, .E = 64, .k = 2, .d = 64, .ff = 48,
              .scale_input = 1, .capacity = 1.0f, .max_tokens = 200, .tokens = { 30 }, .replays = 3, .seed = 63 },
            { .name = "chunks of 256 rows", .bf16 = 1, .E = 4, .k = 2, .d = 64, .ff = 64, .max_tokens = 2048,
              .tokens = { 1500 }, .replays = 2, .seed = 64 },
            { .name = "Hopper kernel", .bf16 = 1, .E = 64, .k = 2, .d = 128, .ff = 96, .max_tokens = 64,
              .expert_gemm = MOE_EP_CUDA_EXPERT_GEMM_HOPPER, .tokens = { 24 }, .replays = 4, .seed = 65 },
            { .name = "Hopper kernel, input scaling, capacity 1.0 (drops), 1500 tokens", .bf16 = 1, .E = 8, .k = 2,
              .d = 64, .ff = 72, .scale_input = 1, .capacity = 1.0f, .max_tokens = 2048,
              .expert_gemm = MOE_EP_CUDA_EXPERT_GEMM_HOPPER, .tokens = { 1500 }, .replays = 3, .seed = 66 },
        };
        emu_case emus[] = {
            { .R = 2, .E = 8, .k = 2, .tokens = { 700, 300 }, .seed = 71 },
            { .R = 3, .E = 10, .k = 3, .tokens = { 900, 1, 450 }, .capacity = 1.0f, .seed = 72 },
            { .R = 4, .E = 16, .k = 4, .tokens = { 600, 0, 333, 1200 }, .placement = MOE_EP_PLACEMENT_ROUND_ROBIN,
              .capacity = 1.25f, .seed = 73 },
            { .R = 4, .E = 6, .k = 2, .tokens = { 50, 40, 30, 20 }, .seed = 74 },
        };
        for (i = 0; i < (int)(sizeof emus / sizeof emus[0]); ++i) {
            emu_run the_case = { test_plan_ranks, &emus[i] };
            char name[160];
            snprintf(name, sizeof name, "plan kernels = the core's plans, %d emulated ranks, E=%d k=%d capacity %.2f%s",
                     emus[i].R, emus[i].E, emus[i].k, emus[i].capacity,
                     emus[i].placement == MOE_EP_PLACEMENT_ROUND_ROBIN ? " round-robin" : "");
            run_case(w, name, &the_case);
        }
        for (i = 0; i < (int)(sizeof plans / sizeof plans[0]); ++i)
            run_world_one_case(w, plans[i], test_gpu_plan, "GPU plan = host plan");
        for (i = 0; i < (int)(sizeof graphs / sizeof graphs[0]); ++i) {
            if (graphs[i].expert_gemm == MOE_EP_CUDA_EXPERT_GEMM_HOPPER && !moe_ep__cuda_k_gemm_ready()) {
                printf("skip  CUDA graph, %s: not a compute capability 9.0 GPU, or no sm_90a code\n", graphs[i].name);
                continue;
            }
            run_world_one_case(w, graphs[i], test_graph, "CUDA graph replay = forward");
        }
    }
    {
        agree_case cases[] = { { test_agreement, 0 }, { test_agreement, 1 }, { test_agreement, 2 }, { test_agreement, 3 } };
        const char* names[] = { "expert_fn fails on the last rank: all fail, then recover",
                                "bad desc on rank 0: all fail create, then create",
                                "too many tokens on the last rank: all fail, then recover",
                                "direct path: expert_fn fails on the last rank: all fail, then recover" };
        for (i = 0; i < 4; ++i) run_case(w, names[i], &cases[i]);
    }
}

static int make_world(world* w, int size) {
    w->size = size;
    return gpu_init_comms(w->comms, w->devices, size);
}

static void free_world(world* w) {
    int r;
    for (r = 0; r < w->size; ++r) ncclCommDestroy(w->comms[r]);
}

/* One world size: every case on one thread per GPU. */
static void run_size(int size) {
    world w;
    if (!make_world(&w, size)) return;
    run_world(&w);
    free_world(&w);
}

static void banner(int gpus) {
    int version = 0;
    ncclGetVersion(&version);
    printf("check_cuda: %d GPU(s), NCCL %d\n", gpus, version);
}

int main(int argc, char** argv) {
    return gpu_main(argc, argv, "check_cuda", 1, run_size, banner);
}

#if !defined(MOE_EP_NCCL_IMPL_INCLUDED) || !defined(MOE_EP_CUDA_IMPL_INCLUDED)
#error "MOE_EP_IMPLEMENTATION did not build the NCCL transport and the GPU layer"
#endif
