/* bench_lowlat -- the GPU layer's low-latency decode mode against its normal path, world size 1.

   One GPU, one rank: at world size 1 nothing crosses between GPUs, so this measures the
   mode's kernels and the host round trips it saves, not the exchange it exists for (the
   issue's goals are for 4 GPUs and more). Decode shapes, bf16:
   - deepseek-v3-decode: d_model 7168, 256 experts, top-8 (sigmoid router, 8 groups keep 4,
     x2.5), 128 tokens; d_ff 256 instead of 2048, as bench_nccl's router shape, so that
     creating a layer does not copy 22 GiB of weights (dispatch and combine do not depend on
     d_ff; the layer times do);
   - seed: d_model 2048, d_ff 1408, 64 experts, top-2, at 1, 16 and 128 tokens.
   Layers on the same weights: normal (planned on the GPU, the default experts: the Hopper
   kernel after a download of the row counts), normal HOPPER and normal CHUNKED (no host
   synchronisation: capturable; CHUNKED with --chunked, for seed only), low-latency (the Hopper
   kernel where it runs), and with --chunked for seed low-latency CHUNKED. For each: the
   forward (a call), the forward replayed from a CUDA graph where the layer can be captured, and the row movement alone: the normal path's dispatch (its permute
   kernel) and combine (its weighted un-permute kernel) against the low-latency dispatch and
   combine kernels. Medians over --iters events-timed repetitions after warm-up; ratios are
   low-latency / normal, measured side by side in this run (graphs: against the normal
   layer with the same expert GEMM).

   ./bench_lowlat [--iters N] [--chunked] */
#define _POSIX_C_SOURCE 200809L  /* bench_util.h: clock_gettime */
#define MOE_EP_IMPLEMENTATION
#include "../moe_ep_cuda.h"
#include "../transports/moe_ep_pthreads.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_util.h"

int bench_fill(void* p, size_t n, int bf16, float scale, unsigned long long seed, void* stream);

#define MAX_ITERS 400

typedef struct config { const char* name; int d, ff, E, k, deepseek, tokens[3]; } config;
static const config g_configs[2] = {
    { "deepseek-v3-decode (d_ff 256)", 7168, 256, 256, 8, 1, { 128, 0, 0 } },
    { "seed-64e-top2", 2048, 1408, 64, 2, 0, { 1, 16, 128 } },
};

enum { L_NORMAL, L_NORMAL_HOPPER, L_NORMAL_CHUNKED, L_LL, L_LL_CHUNKED, L_COUNT };
static const char* g_layer_names[L_COUNT] = { "normal", "normal HOPPER", "normal CHUNKED", "low-latency",
                                              "low-latency CHUNKED" };

typedef struct bench {
    cudaStream_t stream;
    moe_ep_transport transport;
    moe_ep_cuda_layer* layers[L_COUNT];
    void *x, *y;
    int64_t tokens;
    int iters;
    cudaEvent_t start, stop;
} bench;

/* What one timed repetition runs. */
typedef enum op { OP_FORWARD, OP_GRAPH, OP_DISPATCH, OP_COMBINE } op;

static moe_ep_result run_op(bench* b, moe_ep_cuda_layer* L, op o, cudaGraphExec_t graph) {
    int64_t T = b->tokens;
    if (o == OP_FORWARD)
        return moe_ep_cuda_forward(L, &(moe_ep_cuda_forward_args){ .tokens = T, .x = b->x, .y = b->y });
    if (o == OP_GRAPH) return cudaGraphLaunch(graph, b->stream) == cudaSuccess ? MOE_EP_OK : MOE_EP_ERROR_INTERNAL;
    if (L->ll) {
        /* the kernels of the last forward's plan again; at world size 1 the flags of the
           epoch are this rank's own, so dispatch repeats and each combine takes a step */
        moe_ep__cuda_k_plan k = L->gp.k;
        k.topk_idx = (const int32_t*)L->topk_dev;
        k.topk_weight = (const float*)((char*)L->topk_dev + moe_ep__cuda_round16((size_t)(T * L->top_k) * 4));
        k.slots = T * L->top_k;
        k.capacity = -1;
        if (o == OP_DISPATCH)
            return moe_ep__cuda_k_ll_dispatch(L->ll_args, &k, b->x, L->ll_dest, T, L->top_k, L->recv, b->stream) == 0
                       ? MOE_EP_OK : MOE_EP_ERROR_INTERNAL;
        return moe_ep__cuda_k_ll_combine(L->ll_args, L->ll_dest, k.weight, b->y, T, L->top_k, L->d_model,
                                         moe_ep__cuda_kdtype[L->dtype], b->stream) == 0 ? MOE_EP_OK : MOE_EP_ERROR_INTERNAL;
    }
    /* the normal path at world size 1: dispatch is its permute kernel, combine its un-permute */
    if (o == OP_DISPATCH)
        return moe_ep__cuda_k_permute(b->x, NULL, L->recv, L->gp.k.slot_map, T, L->top_k, L->row_bytes, 3, b->stream) == 0
                   ? MOE_EP_OK : MOE_EP_ERROR_INTERNAL;
    return moe_ep__cuda_k_unpermute(NULL, L->out, L->gp.k.slot_map, L->gp.k.weight, b->y, T, L->top_k, L->d_model,
                                    moe_ep__cuda_kdtype[L->dtype], b->stream) == 0 ? MOE_EP_OK : MOE_EP_ERROR_INTERNAL;
}

/* Median microseconds of one repetition (event to event on the stream, the host's launch
   work inside), or -1 on failure. */
static double time_op(bench* b, moe_ep_cuda_layer* L, op o, cudaGraphExec_t graph) {
    double samples[MAX_ITERS];
    int i, n = 0, warmup = 5;
    for (i = 0; i < warmup + b->iters; ++i) {
        float ms = 0.0f;
        moe_ep_result res;
        cudaStreamSynchronize(b->stream);
        cudaEventRecord(b->start, b->stream);
        res = run_op(b, L, o, graph);
        cudaEventRecord(b->stop, b->stream);
        if (cudaEventSynchronize(b->stop) != cudaSuccess || res != MOE_EP_OK || moe_ep_cuda_layer_check(L) != MOE_EP_OK) {
            fprintf(stderr, "bench_lowlat: %s failed: %s\n", L->ll ? "low-latency" : "normal", moe_ep_cuda_layer_last_error(L));
            return -1.0;
        }
        cudaEventElapsedTime(&ms, b->start, b->stop);
        if (i >= warmup) samples[n++] = 1000.0 * (double)ms;
    }
    return bench_median(samples, n);
}

static cudaGraphExec_t capture(bench* b, moe_ep_cuda_layer* L) {
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    moe_ep_result res;
    if (cudaStreamBeginCapture(b->stream, cudaStreamCaptureModeThreadLocal) != cudaSuccess) return NULL;
    res = run_op(b, L, OP_FORWARD, NULL);
    if (cudaStreamEndCapture(b->stream, &graph) != cudaSuccess || res != MOE_EP_OK) {
        (void)cudaGetLastError();
        if (graph) cudaGraphDestroy(graph);
        return NULL;
    }
    if (cudaGraphInstantiate(&exec, graph, 0) != cudaSuccess) exec = NULL;
    cudaGraphDestroy(graph);
    return exec;
}

/* One expert's weights, random, shared by every expert (the layers copy them at create);
   the router's rows random, so that the tokens spread over the experts. */
static int make_layers(bench* b, const config* c, int with_chunked, void** dev_weights) {
    size_t dd = (size_t)c->d, ff = (size_t)c->ff;
    moe_ep_cuda_expert_weights* experts = (moe_ep_cuda_expert_weights*)calloc((size_t)c->E, sizeof *experts);
    float selection_bias[256];
    void *w1 = NULL, *w3 = NULL, *w2 = NULL, *router = NULL;
    uint64_t s = 99;    /* the selection bias: small, from a splitmix64 of its own */
    int e, l, ok = 1;
    ok &= cudaMalloc(&w1, ff * dd * 2) == cudaSuccess && cudaMalloc(&w3, ff * dd * 2) == cudaSuccess &&
          cudaMalloc(&w2, ff * dd * 2) == cudaSuccess && cudaMalloc(&router, (size_t)c->E * dd * 2) == cudaSuccess;
    ok = ok && bench_fill(w1, ff * dd, 1, 1.7f / sqrtf((float)c->d), 1, b->stream) == 0 &&
         bench_fill(w3, ff * dd, 1, 1.7f / sqrtf((float)c->d), 2, b->stream) == 0 &&
         bench_fill(w2, ff * dd, 1, 1.7f / sqrtf((float)c->ff), 3, b->stream) == 0 &&
         bench_fill(router, (size_t)c->E * dd, 1, 3.0f / sqrtf((float)c->d), 4, b->stream) == 0 &&
         cudaStreamSynchronize(b->stream) == cudaSuccess;
    for (e = 0; e < 256; ++e) {
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        selection_bias[e] = 0.01f * ((float)((z ^ (z >> 31)) >> 40) / 8388608.0f - 1.0f);
    }
    for (e = 0; e < c->E; ++e) {
        experts[e].w1 = w1;
        experts[e].w3 = w3;
        experts[e].w2 = w2;
    }
    for (l = 0; ok && l < L_COUNT; ++l) {
        moe_ep_result res;
        /* DeepSeek: one chunk of 128 rows per expert, 33x the rows */
        if ((l == L_LL_CHUNKED || l == L_NORMAL_CHUNKED) && (!with_chunked || c->deepseek)) continue;
        if (l == L_NORMAL_HOPPER && !moe_ep__cuda_k_gemm_ready()) continue;
        res = moe_ep_cuda_layer_create(&(moe_ep_cuda_layer_desc){
            .d_model = c->d, .d_ff = c->ff, .num_experts = c->E, .top_k = c->k, .transport = &b->transport,
            .stream = b->stream, .dtype = MOE_EP_CUDA_DTYPE_BF16, .max_tokens = 128, .timeout_ms = 10000,
            .scoring = c->deepseek ? MOE_EP_SCORING_SIGMOID : MOE_EP_SCORING_DEFAULT, .normalize_topk = c->deepseek != 0,
            .num_groups = c->deepseek ? 8 : 0, .topk_groups = c->deepseek ? 4 : 0,
            .routed_scaling_factor = c->deepseek ? 2.5f : 0.0f, .selection_bias = c->deepseek ? selection_bias : NULL,
            .expert_gemm = l == L_NORMAL_CHUNKED || l == L_LL_CHUNKED ? MOE_EP_CUDA_EXPERT_GEMM_CHUNKED
                           : l == L_NORMAL_HOPPER ? MOE_EP_CUDA_EXPERT_GEMM_HOPPER : MOE_EP_CUDA_EXPERT_GEMM_DEFAULT,
            .mode = l >= L_LL ? MOE_EP_CUDA_MODE_LOW_LATENCY : MOE_EP_CUDA_MODE_DEFAULT,
            .router_weight = router, .experts = experts }, &b->layers[l]);
        if (res != MOE_EP_OK) {
            fprintf(stderr, "bench_lowlat: %s %s: create failed: %s\n", c->name, g_layer_names[l], moe_ep_result_string(res));
            ok = 0;
        }
    }
    free(experts);
    dev_weights[0] = w1;
    dev_weights[1] = w3;
    dev_weights[2] = w2;
    dev_weights[3] = router;
    return ok;
}

int main(int argc, char** argv) {
    bench b;
    moe_ep_pthreads_world* world = NULL;
    int gpus = 0, i, ci, ti, l, chunked = 0;
    memset(&b, 0, sizeof b);
    b.iters = 50;
    for (i = 1; i < argc; ++i)
        if (strcmp(argv[i], "--iters") == 0 && i + 1 < argc) b.iters = atoi(argv[++i]);
        else if (strcmp(argv[i], "--chunked") == 0) chunked = 1;
    if (b.iters < 1 || b.iters > MAX_ITERS) b.iters = 50;
    if (cudaGetDeviceCount(&gpus) != cudaSuccess || gpus == 0) {
        printf("bench_lowlat: no GPU, skipped\n");
        return 77;
    }
    cudaSetDevice(0);
    cudaStreamCreate(&b.stream);
    cudaEventCreate(&b.start);
    cudaEventCreate(&b.stop);
    moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = 1 }, &world);
    moe_ep_pthreads_transport_create(world, 0, &b.transport);
    printf("bench_lowlat: world size 1 (one GPU): the low-latency mode's kernels and host round trips, not its exchange\n");
    printf("%-30s %5s  %-20s %12s %12s %12s %12s\n", "config", "T", "layer", "forward us", "graph us", "dispatch us",
           "combine us");
    for (ci = 0; ci < 2; ++ci) {
        const config* c = &g_configs[ci];
        void* weights[4] = { NULL, NULL, NULL, NULL };
        double t[L_COUNT][4];
        memset(t, 0, sizeof t);
        size_t bytes = (size_t)128 * (size_t)c->d * 2;
        int ok = cudaMalloc(&b.x, bytes) == cudaSuccess && cudaMalloc(&b.y, bytes) == cudaSuccess &&
                 bench_fill(b.x, (size_t)128 * (size_t)c->d, 1, 1.0f, 5, b.stream) == 0;
        ok = ok && make_layers(&b, c, chunked, weights);
        for (ti = 0; ok && ti < 3 && c->tokens[ti] > 0; ++ti) {
            b.tokens = c->tokens[ti];
            for (l = 0; l < L_COUNT; ++l) {
                moe_ep_cuda_layer* L = b.layers[l];
                cudaGraphExec_t graph;
                t[l][0] = t[l][1] = t[l][2] = t[l][3] = -1.0;
                if (!L) continue;
                t[l][0] = time_op(&b, L, OP_FORWARD, NULL);
                graph = l == L_NORMAL ? NULL : capture(&b, L);
                if (graph) t[l][1] = time_op(&b, L, OP_GRAPH, graph);
                if (graph) cudaGraphExecDestroy(graph);
                run_op(&b, L, OP_FORWARD, NULL);    /* the plan of these tokens, for the kernels alone */
                cudaStreamSynchronize(b.stream);
                if (l == L_NORMAL || l == L_LL) {
                    t[l][2] = time_op(&b, L, OP_DISPATCH, NULL);
                    t[l][3] = time_op(&b, L, OP_COMBINE, NULL);
                }
                printf("%-30s %5lld  %-20s %12.1f %12.1f %12.1f %12.1f\n", c->name, (long long)b.tokens, g_layer_names[l],
                       t[l][0], t[l][1], t[l][2], t[l][3]);
            }
            printf("ratio %s T=%lld: low-latency / normal: forward %.2f, dispatch %.2f, combine %.2f", c->name,
                   (long long)b.tokens, t[L_LL][0] / t[L_NORMAL][0], t[L_LL][2] / t[L_NORMAL][2], t[L_LL][3] / t[L_NORMAL][3]);
            if (t[L_LL][1] > 0.0) printf("; low-latency graph / normal call %.2f", t[L_LL][1] / t[L_NORMAL][0]);
            if (t[L_LL][1] > 0.0 && t[L_NORMAL_HOPPER][1] > 0.0)
                printf("; graphs, HOPPER both: %.2f", t[L_LL][1] / t[L_NORMAL_HOPPER][1]);
            if (t[L_NORMAL_CHUNKED][1] > 0.0 && t[L_LL_CHUNKED][1] > 0.0)
                printf("; graphs, CHUNKED both: %.2f", t[L_LL_CHUNKED][1] / t[L_NORMAL_CHUNKED][1]);
            printf("\n");
            fflush(stdout);
        }
        for (l = 0; l < L_COUNT; ++l)
            if (b.layers[l]) moe_ep_cuda_layer_destroy(b.layers[l]);
        memset(b.layers, 0, sizeof b.layers);
        for (i = 0; i < 4; ++i) cudaFree(weights[i]);
        cudaFree(b.x);
        cudaFree(b.y);
        if (!ok) return 1;
    }
    moe_ep_pthreads_transport_destroy(&b.transport);
    moe_ep_pthreads_world_destroy(world);
    return 0;
}
