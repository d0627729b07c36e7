/* bench_nccl -- the GPU layer of moe_ep against raw NCCL and the plain PyTorch EP layer.

   One process, one thread per GPU. For the three configurations of
   anchors/gpu/torch_ep_moe.py (bf16, 4096 tokens per rank, the same init scales):
   1. dispatch and combine against a raw grouped ncclSend/ncclRecv all-to-all of
      identical bytes per peer (self included, as all_to_all_single does): the direct
      path (stores into the peers' memory, with the layer's own buffers; the default
      when it is available), and the NCCL path in both a2a layouts (permute + exchange +
      regroup; regroup + exchange + weighted un-permute);
   2. the full layer (GPU router, plan, dispatch, experts, combine) in ms per layer,
      with a per-stage breakdown;
   3. at world size 1: the plan kernels' time (PLANNING ON THE GPU, a graph of 20 plans
      replayed), and the forward planned on the host, on the GPU, with CHUNKED experts and
      as a CUDA graph replay (CUDA GRAPHS).
   Times are medians over --iters repetitions after warm-up, each started together on
   all ranks (a host barrier, then events on the stream); the reported time is the
   largest over ranks. --torch-log FILE (the output of torch_ep_moe.py from the same
   job) adds the ratio lines against the PyTorch layer.

   ./bench_nccl [--gpus N] [--iters N] [--torch-log FILE] */
#define MOE_EP_IMPLEMENTATION
#include "../moe_ep_cuda.h"
#include "../transports/moe_ep_nccl.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

int bench_fill(void* p, size_t n, int bf16, float scale, unsigned long long seed, void* stream);

#define MAX_GPUS 8
#define MAX_ITERS 200
#define CONFIGS 4
#define ROUTE_REPEAT 20

/* grouped: DeepSeek-V3's router (sigmoid, a selection bias, 8 groups keep 4, x2.5) */
typedef struct config { const char* name; int tokens, d, ff, E, k, grouped; } config;
static const config g_configs[CONFIGS] = {
    { "seed-64e-top2", 4096, 2048, 1408, 64, 2, 0 },
    { "deepseek-lite-64e-top6", 4096, 2048, 1408, 64, 6, 0 },
    { "mixtral-8e-top2", 4096, 4096, 14336, 8, 2, 0 },
    { "deepseek-v3-router-256e-top8", 4096, 7168, 256, 256, 8, 1 },
};

/* In this order: the ops from OP_ROUTE on run without a plan alive, so that the layer's
   reserved buffers are free for the plans they make, as in a plain sequence of layers. */
enum { OP_RAW_FWD, OP_RAW_BACK, OP_DIRECT, OP_DISPATCH, OP_COMBINE, OP_DISPATCH_SEG, OP_COMBINE_SEG, OP_EXPERTS,
       OP_EXPERTS_ONE_STREAM, OP_EXPERTS_OWN, OP_ROUTE, OP_PLAN, OP_CORE_PLAN, OP_FORWARD, OP_FORWARD_NCCL, OP_SPLIT, OP_SPLIT_NCCL,
       OP_ROUTE_GEMM, OP_ROUTE_TOPK,
       /* world size 1 only: planning on the GPU and CUDA graphs */
       OP_GPU_PLAN, OP_GPU_PLAN_ONE, OP_FORWARD_HOSTPLAN, OP_FORWARD_CHUNKED, OP_EXPERTS_CHUNKED, OP_GRAPH,
       OP_DIRECT_DISPATCH, /* not run: the dispatch part of OP_DIRECT */
       OP_COUNT };
static const char* g_op_names[OP_COUNT] = { "raw", "raw back", "direct dispatch + combine", "dispatch", "combine",
                                            "dispatch seg", "combine seg", "experts", "experts loop",
                                            "experts on the layer's buffers", "route", "plan", "core plan", "forward",
                                            "forward, NCCL path", "forward by stages", "forward by stages, NCCL path",
                                            "router GEMM", "router top-k kernel", "GPU plan (graph)",
                                            "GPU plan", "forward, host plan", "forward, CHUNKED",
                                            "experts, CHUNKED", "forward, CUDA graph", "direct dispatch" };

typedef struct shared {
    int world, iters, warmup;
    pthread_mutex_t mutex;
    pthread_cond_t cond;
    int arrived;
    unsigned long generation;
    ncclComm_t comms[MAX_GPUS];
    double ms[CONFIGS][OP_COUNT][MAX_GPUS];     /* median per rank */
    double bytes[CONFIGS][MAX_GPUS];            /* bytes this rank sends in a dispatch, self included */
    int direct[CONFIGS];                        /* the default layer took the direct path */
    double split[CONFIGS][2][5][MAX_GPUS];      /* OP_SPLIT(_NCCL): median of each stage inside the sequence */
    int failed;
    char error[640];
} shared;

typedef struct rank_arg { shared* sh; int rank; } rank_arg;

static void barrier(shared* sh) {
    unsigned long gen;
    pthread_mutex_lock(&sh->mutex);
    gen = sh->generation;
    if (++sh->arrived == sh->world) {
        sh->arrived = 0;
        sh->generation++;
        pthread_cond_broadcast(&sh->cond);
    } else {
        while (gen == sh->generation && !sh->failed) pthread_cond_wait(&sh->cond, &sh->mutex);
    }
    pthread_mutex_unlock(&sh->mutex);
}

static void bench_fail(shared* sh, int rank, const char* what, const char* detail) {
    pthread_mutex_lock(&sh->mutex);
    if (!sh->failed) {
        sh->failed = 1;
        snprintf(sh->error, sizeof sh->error, "rank %d: %.60s: %.500s", rank, what, detail ? detail : "");
    }
    pthread_cond_broadcast(&sh->cond);     /* nobody waits for a rank that gave up */
    pthread_mutex_unlock(&sh->mutex);
}

static int cmp_double(const void* a, const void* b) {
    double x = *(const double*)a, y = *(const double*)b;
    return x < y ? -1 : x > y;
}

/* The state one timed operation needs. */
typedef struct run {
    shared* sh;
    int rank, world, ci;
    cudaStream_t stream;
    ncclComm_t comm;
    moe_ep_cuda_layer* layer;       /* the default: direct when the GPUs can map each other's memory */
    moe_ep_cuda_layer* staged;      /* the NCCL path, staged layout */
    moe_ep_cuda_plan* plan_staged;
    void *layer_recv, *layer_out;   /* the layer's own expert-side rows */
    cudaEvent_t mid;                /* OP_DIRECT: between its dispatch and its combine */
    cudaEvent_t ev[6];              /* OP_SPLIT: between the stages */
    int direct;
    moe_ep_cuda_layer* segmented;   /* same shapes and weights, SEGMENTED layout, GEMM loop on one stream */
    moe_ep_cuda_layer* hostplan;    /* world size 1: as layer, planning = HOST */
    moe_ep_cuda_layer* chunked;     /* world size 1: as layer, expert_gemm = CHUNKED */
    cudaGraphExec_t plan_graph;     /* ROUTE_REPEAT GPU plans of layer's last routing */
    cudaGraphExec_t layer_graph;    /* chunked's forward of x into y */
    moe_ep_cuda_plan* plan;
    moe_ep_cuda_plan* plan_seg;
    moe_ep_plan_info info;
    void *x, *y, *recv, *out, *raw_send, *raw_recv;
    int32_t* idx;
    float* weight;
    size_t row_bytes;
    int64_t tokens;
    int ok;
} run;

static void raw_exchange(run* r, int back) {
    int p;
    size_t so = 0, ro = 0;
    const moe_ep_plan_info* in = &r->info;
    ncclGroupStart();
    for (p = 0; p < r->world; ++p) {
        size_t out = (size_t)(back ? in->recv_counts[p] : in->send_counts[p]) * r->row_bytes;
        size_t got = (size_t)(back ? in->send_counts[p] : in->recv_counts[p]) * r->row_bytes;
        if (out) ncclSend((char*)r->raw_send + so, out, ncclInt8, p, r->comm, r->stream);
        if (got) ncclRecv((char*)r->raw_recv + ro, got, ncclInt8, p, r->comm, r->stream);
        so += out;
        ro += got;
    }
    ncclGroupEnd();
}

static moe_ep_result do_op(run* r, int op) {
    moe_ep_result res = MOE_EP_OK;
    switch (op) {
    case OP_RAW_FWD: raw_exchange(r, 0); break;
    case OP_RAW_BACK: raw_exchange(r, 1); break;
    case OP_DIRECT:
        res = moe_ep_cuda_dispatch(r->layer, r->plan, r->x, r->layer_recv);
        cudaEventRecord(r->mid, r->stream);
        if (res == MOE_EP_OK) res = moe_ep_cuda_combine(r->layer, r->plan, r->layer_out, r->y);
        break;
    case OP_DISPATCH: res = moe_ep_cuda_dispatch(r->staged, r->plan_staged, r->x, r->recv); break;
    case OP_COMBINE: res = moe_ep_cuda_combine(r->staged, r->plan_staged, r->out, r->y); break;
    case OP_DISPATCH_SEG: res = moe_ep_cuda_dispatch(r->segmented, r->plan_seg, r->x, r->recv); break;
    case OP_COMBINE_SEG: res = moe_ep_cuda_combine(r->segmented, r->plan_seg, r->out, r->y); break;
    case OP_ROUTE: res = moe_ep_cuda_route(r->layer, r->x, r->tokens, r->idx, r->weight); break;
    case OP_PLAN: {
        moe_ep_cuda_plan* p = NULL;
        res = moe_ep_cuda_plan_create(r->layer, r->tokens, r->idx, r->weight, &p);
        if (res == MOE_EP_OK) moe_ep_cuda_plan_destroy(p);
        break;
    }
    case OP_EXPERTS: res = moe_ep_cuda_experts(r->layer, r->plan, r->recv, r->out); break;
    case OP_EXPERTS_OWN:    /* as OP_EXPERTS, on the rows the forward uses (on the direct path: its region) */
        res = moe_ep_cuda_experts(r->layer, r->plan, r->layer_recv, r->layer_out);
        break;
    case OP_EXPERTS_ONE_STREAM: res = moe_ep_cuda_experts(r->segmented, r->plan_seg, r->recv, r->out); break;
    case OP_CORE_PLAN: {    /* the core's plan alone: count exchange and host layout, no upload */
        moe_ep_plan* p = NULL;
        res = moe_ep_plan_create(moe_ep_cuda_layer_context(r->layer), r->tokens, r->idx, r->weight, &p);
        moe_ep_plan_destroy(p);
        break;
    }
    case OP_FORWARD:
        res = moe_ep_cuda_forward(r->layer, &(moe_ep_cuda_forward_args){ .tokens = r->tokens, .x = r->x, .y = r->y });
        break;
    case OP_SPLIT: case OP_SPLIT_NCCL: {   /* what moe_ep_cuda_forward does, an event after each stage */
        moe_ep_cuda_layer* L = op == OP_SPLIT ? r->layer : r->staged;
        moe_ep_cuda_plan* p = NULL;
        void *rows = NULL, *out = NULL;
        moe_ep_cuda_layer_rows(L, &rows, &out, NULL);
        res = moe_ep_cuda_route(L, r->x, r->tokens, r->idx, r->weight);
        cudaEventRecord(r->ev[1], r->stream);
        if (res == MOE_EP_OK) res = moe_ep_cuda_plan_create(L, r->tokens, r->idx, r->weight, &p);
        cudaEventRecord(r->ev[2], r->stream);
        if (res == MOE_EP_OK) res = moe_ep_cuda_dispatch(L, p, r->x, rows);
        cudaEventRecord(r->ev[3], r->stream);
        if (res == MOE_EP_OK) res = moe_ep_cuda_experts(L, p, rows, out);
        cudaEventRecord(r->ev[4], r->stream);
        if (res == MOE_EP_OK) res = moe_ep_cuda_combine(L, p, out, r->y);
        cudaEventRecord(r->ev[5], r->stream);
        moe_ep_cuda_plan_destroy(p);
        break;
    }
    case OP_ROUTE_GEMM: {  /* the route's two device steps alone (the layer's own internals), ROUTE_REPEAT
                              times back to back, so that the host's launch time hides behind the device's */
        moe_ep_cuda_layer* L = r->layer;
        int n;
        for (n = 0; n < ROUTE_REPEAT && res == MOE_EP_OK; ++n)
            res = moe_ep__cuda_linear(L, L->blas, L->router, L->num_experts, L->d_model, r->x, L->d_model, r->tokens,
                                      L->logits, L->num_experts, CUDA_R_32F, "router logits");
        break;
    }
    case OP_ROUTE_TOPK: {
        moe_ep_cuda_layer* L = r->layer;
        size_t slots = (size_t)r->tokens * (size_t)L->top_k;
        float* weight_dev = (float*)((char*)L->topk_dev + moe_ep__cuda_round16(slots * sizeof(int32_t)));
        int n;
        for (n = 0; n < ROUTE_REPEAT && res == MOE_EP_OK; ++n)
            res = moe_ep__cuda_kernel(L, moe_ep__cuda_k_topk((const float*)L->logits, r->tokens, L->num_experts,
                                                             L->top_k, &L->router_cfg, (int32_t*)L->topk_dev,
                                                             weight_dev, L->stream),
                                      "router top-k kernel");
        break;
    }
    case OP_FORWARD_NCCL:
        res = moe_ep_cuda_forward(r->staged, &(moe_ep_cuda_forward_args){ .tokens = r->tokens, .x = r->x, .y = r->y });
        break;
    case OP_GPU_PLAN:
        if (cudaGraphLaunch(r->plan_graph, r->stream) != cudaSuccess) res = MOE_EP_ERROR_INTERNAL;
        break;
    case OP_GPU_PLAN_ONE: {
        moe_ep__cuda_k_plan k;
        res = moe_ep__cuda_gpu_plan_run(r->layer, r->tokens, &k);
        break;
    }
    case OP_FORWARD_HOSTPLAN:
        res = moe_ep_cuda_forward(r->hostplan, &(moe_ep_cuda_forward_args){ .tokens = r->tokens, .x = r->x, .y = r->y });
        break;
    case OP_FORWARD_CHUNKED:
        res = moe_ep_cuda_forward(r->chunked, &(moe_ep_cuda_forward_args){ .tokens = r->tokens, .x = r->x, .y = r->y });
        break;
    case OP_EXPERTS_CHUNKED: res = moe_ep__cuda_chunked_experts(r->chunked); break;
    case OP_GRAPH:
        if (cudaGraphLaunch(r->layer_graph, r->stream) != cudaSuccess) res = MOE_EP_ERROR_INTERNAL;
        break;
    }
    return res;
}

/* Median milliseconds of `op` on this rank; every repetition starts together on all ranks.
   OP_DIRECT also leaves the median of its dispatch part in *first. */
static double time_op(run* r, int op, double* first) {
    cudaEvent_t start, stop;
    double samples[MAX_ITERS], parts[MAX_ITERS], stages[5][MAX_ITERS];
    int i, n = 0, total = r->sh->warmup + r->sh->iters;
    cudaEventCreate(&start);
    cudaEventCreate(&stop);
    for (i = 0; i < total && !r->sh->failed; ++i) {
        float ms = 0.0f;
        moe_ep_result res;
        cudaStreamSynchronize(r->stream);
        barrier(r->sh);
        cudaEventRecord(start, r->stream);
        res = do_op(r, op);
        cudaEventRecord(stop, r->stream);
        cudaEventSynchronize(stop);
        if (res != MOE_EP_OK) {
            bench_fail(r->sh, r->rank, g_op_names[op], moe_ep_cuda_layer_last_error(r->layer));
            r->ok = 0;
        }
        cudaEventElapsedTime(&ms, start, stop);
        if (i >= r->sh->warmup) {
            float part = 0.0f;
            if (op == OP_DIRECT) cudaEventElapsedTime(&part, start, r->mid);
            if (op == OP_SPLIT || op == OP_SPLIT_NCCL) {
                int st;
                for (st = 0; st < 5; ++st) {
                    float x = 0.0f;
                    cudaEventElapsedTime(&x, st == 0 ? start : r->ev[st], r->ev[st + 1]);
                    stages[st][n] = x;
                }
            }
            parts[n] = part;
            samples[n++] = ms;
        }
    }
    if (n > 0 && (op == OP_SPLIT || op == OP_SPLIT_NCCL)) {
        int st;
        for (st = 0; st < 5; ++st) {
            qsort(stages[st], (size_t)n, sizeof(double), cmp_double);
            r->sh->split[r->ci][op == OP_SPLIT_NCCL][st][r->rank] = stages[st][n / 2];
        }
    }
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    if (n == 0) return 0.0;
    qsort(samples, (size_t)n, sizeof(double), cmp_double);
    qsort(parts, (size_t)n, sizeof(double), cmp_double);
    if (first) *first = parts[n / 2];
    return samples[n / 2];
}

/* A captured sequence of work on r's stream, instantiated. */
static moe_ep_result capture(run* r, int what, cudaGraphExec_t* exec) {
    cudaGraph_t graph = NULL;
    moe_ep_result res = MOE_EP_OK;
    int n;
    if (cudaStreamBeginCapture(r->stream, cudaStreamCaptureModeThreadLocal) != cudaSuccess) return MOE_EP_ERROR_INTERNAL;
    if (what == 0)
        for (n = 0; n < ROUTE_REPEAT && res == MOE_EP_OK; ++n) {
            moe_ep__cuda_k_plan k;
            res = moe_ep__cuda_gpu_plan_run(r->layer, r->tokens, &k);
        }
    else
        res = moe_ep_cuda_forward(r->chunked, &(moe_ep_cuda_forward_args){ .tokens = r->tokens, .x = r->x, .y = r->y });
    if (cudaStreamEndCapture(r->stream, &graph) != cudaSuccess && res == MOE_EP_OK) res = MOE_EP_ERROR_INTERNAL;
    if (res == MOE_EP_OK && cudaGraphInstantiate(exec, graph, 0) != cudaSuccess) res = MOE_EP_ERROR_INTERNAL;
    if (graph) cudaGraphDestroy(graph);
    return res;
}

/* World size 1: the host-planned and the CHUNKED layer beside the default one (planned on
   the GPU), a graph of ROUTE_REPEAT plans of the default layer's routing, and the CHUNKED
   layer's forward captured. */
static moe_ep_result setup_world_one(run* r, const moe_ep_cuda_layer_desc* layer_desc) {
    moe_ep_result res;
    moe_ep_cuda_layer_desc d = *layer_desc;
    d.planning = MOE_EP_CUDA_PLANNING_HOST;
    res = moe_ep_cuda_layer_create(&d, &r->hostplan);
    d.planning = MOE_EP_CUDA_PLANNING_DEFAULT;
    d.expert_gemm = MOE_EP_CUDA_EXPERT_GEMM_CHUNKED;
    if (res == MOE_EP_OK) res = moe_ep_cuda_layer_create(&d, &r->chunked);
    if (res == MOE_EP_OK)   /* warm-ups; the default layer's routing stays for the plan graph */
        res = moe_ep_cuda_forward(r->chunked, &(moe_ep_cuda_forward_args){ .tokens = r->tokens, .x = r->x, .y = r->y });
    if (res == MOE_EP_OK)
        res = moe_ep_cuda_forward(r->layer, &(moe_ep_cuda_forward_args){ .tokens = r->tokens, .x = r->x, .y = r->y });
    if (res == MOE_EP_OK) res = capture(r, 0, &r->plan_graph);
    if (res == MOE_EP_OK) res = capture(r, 1, &r->layer_graph);
    return res;
}

static void* rank_main(void* arg) {
    rank_arg* ra = (rank_arg*)arg;
    shared* sh = ra->sh;
    int me = ra->rank, R = sh->world, ci, op;
    moe_ep_transport t;
    run r;
    memset(&r, 0, sizeof r);
    r.sh = sh;
    r.rank = me;
    r.world = R;
    r.comm = sh->comms[me];
    cudaSetDevice(me);
    cudaStreamCreateWithFlags(&r.stream, cudaStreamNonBlocking);
    cudaEventCreate(&r.mid);
    for (op = 0; op < 6; ++op) cudaEventCreate(&r.ev[op]);
    if (moe_ep_nccl_transport_create(&(moe_ep_nccl_desc){ .comm = r.comm, .stream = r.stream, .timeout_ms = 300000 }, &t)
        != MOE_EP_OK) {
        bench_fail(sh, me, "transport", "");
        return NULL;
    }
    for (ci = 0; ci < CONFIGS; ++ci) {
        const config* c = &g_configs[ci];
        int L = c->E / R, l;
        size_t dd = (size_t)c->d, ff = (size_t)c->ff, T = (size_t)c->tokens, rows_max;
        void *gate = NULL, *weights = NULL;
        float selection_bias[256];
        moe_ep_cuda_expert_weights* mine = (moe_ep_cuda_expert_weights*)calloc((size_t)L, sizeof *mine);
        moe_ep_cuda_layer_desc layer_desc;
        unsigned long long seed = 1234 + (unsigned long long)me * 7919 + (unsigned long long)ci * 104729;
        moe_ep_result res;
        r.ok = 1;
        r.ci = ci;
        r.tokens = c->tokens;
        r.row_bytes = dd * 2;
        rows_max = T * (size_t)(c->k < L ? c->k : L) * (size_t)R;
        /* init scales of torch_ep_moe.py: randn * d^-0.5 (gate and w1, w3), * ff^-0.5 (w2);
           uniform(-a, a) with a = sqrt(3) * std has that variance */
        if (cudaMalloc(&gate, (size_t)c->E * dd * 2) != cudaSuccess ||
            cudaMalloc(&weights, (size_t)L * 3 * ff * dd * 2) != cudaSuccess ||
            cudaMalloc(&r.x, T * dd * 2) != cudaSuccess || cudaMalloc(&r.y, T * dd * 2) != cudaSuccess ||
            cudaMalloc(&r.recv, rows_max * dd * 2) != cudaSuccess || cudaMalloc(&r.out, rows_max * dd * 2) != cudaSuccess ||
            cudaMalloc(&r.raw_send, rows_max * dd * 2) != cudaSuccess ||   /* the way back sends what this rank got */
            cudaMalloc(&r.raw_recv, rows_max * dd * 2) != cudaSuccess) {
            bench_fail(sh, me, "cudaMalloc", cudaGetErrorString(cudaGetLastError()));
            break;
        }
        r.idx = (int32_t*)malloc(sizeof(int32_t) * T * (size_t)c->k);
        r.weight = (float*)malloc(sizeof(float) * T * (size_t)c->k);
        bench_fill(gate, (size_t)c->E * dd, 1, 1.7320508f / sqrtf((float)c->d), 7, r.stream);  /* same gate on all ranks */
        bench_fill(r.x, T * dd, 1, 1.7320508f, seed, r.stream);
        bench_fill(r.raw_send, rows_max * dd, 1, 1.0f, seed + 1, r.stream);
        for (l = 0; l < L; ++l) {
            char* base = (char*)weights + (size_t)l * 3 * ff * dd * 2;
            mine[l].w1 = base;
            mine[l].w3 = base + ff * dd * 2;
            mine[l].w2 = base + 2 * ff * dd * 2;
            bench_fill(base, 2 * ff * dd, 1, 1.7320508f / sqrtf((float)c->d), seed + 10 + (unsigned long long)l, r.stream);
            bench_fill(base + 2 * ff * dd * 2, ff * dd, 1, 1.7320508f / sqrtf((float)c->ff), seed + 1000 + (unsigned long long)l,
                       r.stream);
        }
        cudaStreamSynchronize(r.stream);
        for (l = 0; l < c->E && l < 256; ++l) selection_bias[l] = 0.01f * (float)((l * 37) % 11) - 0.05f;
        layer_desc = (moe_ep_cuda_layer_desc){
            .d_model = c->d, .d_ff = c->ff, .num_experts = c->E, .top_k = c->k, .normalize_topk = true,
            .scoring = c->grouped ? MOE_EP_SCORING_SIGMOID : MOE_EP_SCORING_DEFAULT,
            .routed_scaling_factor = c->grouped ? 2.5f : 0.0f, .num_groups = c->grouped ? 8 : 0,
            .topk_groups = c->grouped ? 4 : 0, .selection_bias = c->grouped ? selection_bias : NULL,
            .transport = &t, .stream = r.stream,
            .dtype = MOE_EP_CUDA_DTYPE_BF16, .max_tokens = c->tokens, .router_weight = gate, .experts = mine };
        res = moe_ep_cuda_layer_create(&layer_desc, &r.layer);
        if (res == MOE_EP_OK)
            res = moe_ep_cuda_layer_create(&(moe_ep_cuda_layer_desc){
                .d_model = c->d, .d_ff = c->ff, .num_experts = c->E, .top_k = c->k, .normalize_topk = true,
                .transport = &t, .stream = r.stream,
                .dtype = MOE_EP_CUDA_DTYPE_BF16, .direct = MOE_EP_CUDA_DIRECT_OFF, .max_tokens = c->tokens,
                .router_weight = gate, .experts = mine }, &r.staged);
        if (res == MOE_EP_OK)
            res = moe_ep_cuda_layer_create(&(moe_ep_cuda_layer_desc){
                .d_model = c->d, .d_ff = c->ff, .num_experts = c->E, .top_k = c->k, .normalize_topk = true,
                .transport = &t, .stream = r.stream,
                .dtype = MOE_EP_CUDA_DTYPE_BF16, .a2a_layout = MOE_EP_CUDA_A2A_SEGMENTED,
                .direct = MOE_EP_CUDA_DIRECT_OFF, .max_tokens = c->tokens,
                .expert_gemm = MOE_EP_CUDA_EXPERT_GEMM_LOOP, .experts = mine }, &r.segmented);
        if (res == MOE_EP_OK) res = moe_ep_cuda_route(r.layer, r.x, r.tokens, r.idx, r.weight);
        if (res == MOE_EP_OK) res = moe_ep_cuda_plan_create(r.layer, r.tokens, r.idx, r.weight, &r.plan);
        if (res == MOE_EP_OK) res = moe_ep_cuda_plan_create(r.staged, r.tokens, r.idx, r.weight, &r.plan_staged);
        if (res == MOE_EP_OK) res = moe_ep_cuda_plan_create(r.segmented, r.tokens, r.idx, r.weight, &r.plan_seg);
        if (res != MOE_EP_OK) {
            bench_fail(sh, me, "setup", r.layer ? moe_ep_cuda_layer_last_error(r.layer) : moe_ep_result_string(res));
            break;
        }
        if (res == MOE_EP_OK && R == 1) res = setup_world_one(&r, &layer_desc);
        r.info = moe_ep_cuda_plan_query(r.plan);
        sh->bytes[ci][me] = (double)r.info.send_rows * (double)r.row_bytes;
        moe_ep_cuda_layer_rows(r.layer, &r.layer_recv, &r.layer_out, NULL);
        if (me == 0) sh->direct[ci] = moe_ep_cuda_layer_direct(r.layer);
        for (op = 0; op < OP_DIRECT_DISPATCH && r.ok; ++op) {
            if (op == OP_ROUTE) {
                moe_ep_cuda_plan_destroy(r.plan);
                moe_ep_cuda_plan_destroy(r.plan_staged);
                moe_ep_cuda_plan_destroy(r.plan_seg);
                r.plan = r.plan_staged = r.plan_seg = NULL;
            }
            if (op >= OP_GPU_PLAN && R > 1) continue;
            sh->ms[ci][op][me] = time_op(&r, op, op == OP_DIRECT ? &sh->ms[ci][OP_DIRECT_DISPATCH][me] : NULL);
        }
        if (r.plan_graph) cudaGraphExecDestroy(r.plan_graph);
        if (r.layer_graph) cudaGraphExecDestroy(r.layer_graph);
        r.plan_graph = r.layer_graph = NULL;
        moe_ep_cuda_layer_destroy(r.hostplan);
        moe_ep_cuda_layer_destroy(r.chunked);
        r.hostplan = r.chunked = NULL;
        moe_ep_cuda_plan_destroy(r.plan);
        moe_ep_cuda_plan_destroy(r.plan_staged);
        moe_ep_cuda_plan_destroy(r.plan_seg);
        moe_ep_cuda_layer_destroy(r.layer);
        moe_ep_cuda_layer_destroy(r.staged);
        moe_ep_cuda_layer_destroy(r.segmented);
        r.layer = r.staged = r.segmented = NULL;
        cudaFree(gate); cudaFree(weights); cudaFree(r.x); cudaFree(r.y); cudaFree(r.recv); cudaFree(r.out);
        cudaFree(r.raw_send); cudaFree(r.raw_recv);
        free(r.idx); free(r.weight); free(mine);
        if (!r.ok) break;
    }
    moe_ep_nccl_transport_destroy(&t);
    cudaEventDestroy(r.mid);
    for (op = 0; op < 6; ++op) cudaEventDestroy(r.ev[op]);
    cudaStreamDestroy(r.stream);
    return NULL;
}

static double worst(const shared* sh, int ci, int op) {
    double m = 0.0;
    int r;
    for (r = 0; r < sh->world; ++r) if (sh->ms[ci][op][r] > m) m = sh->ms[ci][op][r];
    return m;
}

/* "name tokens d ff E k  ms ..." lines of torch_ep_moe.py */
static int torch_ms(const char* path, const char* name, double* ms) {
    FILE* f = path ? fopen(path, "r") : NULL;
    char line[512];
    int found = 0;
    if (!f) return 0;
    while (fgets(line, sizeof line, f)) {
        char n[128];
        int a, b, c, d, e;
        double t;
        if (sscanf(line, "%127s %d %d %d %d %d %lf", n, &a, &b, &c, &d, &e, &t) == 7 && strcmp(n, name) == 0) {
            *ms = t;
            found = 1;
        }
    }
    fclose(f);
    return found;
}

int main(int argc, char** argv) {
    static shared sh;
    pthread_t threads[MAX_GPUS];
    rank_arg args[MAX_GPUS];
    int gpus = 0, i, ci, devs[MAX_GPUS], version = 0;
    const char* torch_log = NULL;
    struct cudaDeviceProp prop;
    memset(&sh, 0, sizeof sh);
    sh.iters = 20;
    sh.warmup = 5;
    if (cudaGetDeviceCount(&gpus) != cudaSuccess || gpus == 0) {
        printf("bench_nccl: no GPU, skipped\n");
        return 0;
    }
    for (i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "--gpus") == 0 && i + 1 < argc) { int g = atoi(argv[++i]); if (g < gpus) gpus = g; }
        else if (strcmp(argv[i], "--iters") == 0 && i + 1 < argc) sh.iters = atoi(argv[++i]);
        else if (strcmp(argv[i], "--torch-log") == 0 && i + 1 < argc) torch_log = argv[++i];
    }
    if (gpus > MAX_GPUS) gpus = MAX_GPUS;
    if (sh.iters < 1) sh.iters = 1;
    if (sh.iters + sh.warmup > MAX_ITERS) sh.iters = MAX_ITERS - sh.warmup;
    sh.world = gpus;
    for (i = 0; i < gpus; ++i) devs[i] = i;
    pthread_mutex_init(&sh.mutex, NULL);
    pthread_cond_init(&sh.cond, NULL);
    if (ncclCommInitAll(sh.comms, gpus, devs) != ncclSuccess) {
        printf("bench_nccl: ncclCommInitAll failed\n");
        return 1;
    }
    for (i = 0; i < gpus; ++i) {
        args[i].sh = &sh;
        args[i].rank = i;
        pthread_create(&threads[i], NULL, rank_main, &args[i]);
    }
    for (i = 0; i < gpus; ++i) pthread_join(threads[i], NULL);
    for (i = 0; i < gpus; ++i) ncclCommDestroy(sh.comms[i]);
    if (sh.failed) {
        printf("bench_nccl: FAILED: %s\n", sh.error);
        return 1;
    }
    cudaGetDeviceProperties(&prop, 0);
    ncclGetVersion(&version);
    printf("moe_ep GPU layer bench: %d x %s, NCCL %d, bf16, 4096 tokens per rank, median of %d (max over ranks)\n\n",
           gpus, prop.name, version, sh.iters);
    printf("dispatch + combine vs raw grouped ncclSend/ncclRecv of identical bytes per peer\n");
    printf("%-24s %-9s %8s %8s %9s %9s %9s %9s %7s\n", "config", "layout", "MiB/rank", "raw_us", "disp_us", "comb_us",
           "raw_GB/s", "ours_GB/s", "ratio");
    for (ci = 0; ci < CONFIGS; ++ci) {
        double bytes = 0.0, raw, lay;
        int seg;
        for (i = 0; i < gpus; ++i) if (sh.bytes[ci][i] > bytes) bytes = sh.bytes[ci][i];
        raw = worst(&sh, ci, OP_RAW_FWD) + worst(&sh, ci, OP_RAW_BACK);
        for (seg = 0; seg < 3; ++seg) {
            double disp = seg == 0 ? worst(&sh, ci, OP_DIRECT_DISPATCH) : worst(&sh, ci, seg == 2 ? OP_DISPATCH_SEG : OP_DISPATCH);
            double comb = seg == 0 ? worst(&sh, ci, OP_DIRECT) - disp : worst(&sh, ci, seg == 2 ? OP_COMBINE_SEG : OP_COMBINE);
            lay = seg == 0 ? worst(&sh, ci, OP_DIRECT) : disp + comb;
            printf("%-24s %-9s %8.1f %8.1f %9.1f %9.1f %9.1f %9.1f %7.3f\n", g_configs[ci].name,
                   seg == 0 ? (sh.direct[ci] ? "direct" : "default") : seg == 2 ? "segmented" : "staged",
                   bytes / 1048576.0, raw / 2 * 1e3, disp * 1e3, comb * 1e3, 2 * bytes / (raw * 1e-3) / 1e9,
                   2 * bytes / (lay * 1e-3) / 1e9, raw / lay);
        }
    }
    printf("(bandwidth = bytes sent per rank, self included, over the time; raw_us is the mean of forward and back;\n"
           " direct: dispatch and combine timed as one pair, split by an event, max over ranks of each median)\n\n");
    printf("full layer (GPU router, plan, dispatch, experts, combine), ms per layer\n");
    printf("%-24s %5s %6s %4s %2s %9s | %6s %6s %9s %8s %8s %8s | %8s %8s | %9s\n", "config", "d", "ff", "E", "k",
           "ms/layer", "route", "plan", "core-plan", "dispatch", "experts", "combine", "loop-1s", "own-rows",
           "NCCL-path");
    for (ci = 0; ci < CONFIGS; ++ci) {
        const config* c = &g_configs[ci];
        printf("%-24s %5d %6d %4d %2d %9.3f | %6.3f %6.3f %9.3f %8.3f %8.3f %8.3f | %8.3f %8.3f | %9.3f\n", c->name,
               c->d, c->ff,
               c->E, c->k, worst(&sh, ci, OP_FORWARD), worst(&sh, ci, OP_ROUTE), worst(&sh, ci, OP_PLAN),
               worst(&sh, ci, OP_CORE_PLAN), worst(&sh, ci, OP_DIRECT_DISPATCH), worst(&sh, ci, OP_EXPERTS),
               worst(&sh, ci, OP_DIRECT) - worst(&sh, ci, OP_DIRECT_DISPATCH), worst(&sh, ci, OP_EXPERTS_ONE_STREAM),
               worst(&sh, ci, OP_EXPERTS_OWN), worst(&sh, ci, OP_FORWARD_NCCL));
    }
    printf("(stages timed one by one; experts: grouped GEMMs; loop-1s: one cublasGemmEx per expert on the layer's\n"
           " stream; core-plan: the core's moe_ep_plan_create alone: count exchange and host layout;\n"
           " own-rows: the experts on the layer's own buffers, the direct path's region;\n"
           " NCCL-path: the whole layer with direct = OFF)\n");
    printf("\nthe GPU router (moe_ep_cuda_route), ms: its GEMM (logits, fp32 out) and its top-k kernel on the device\n"
           "(each the mean of %d launches back to back); the rest of route is launching, the download of ids\n"
           "and weights, and the host's wait and copy\n", ROUTE_REPEAT);
    printf("%-30s %8s %8s %8s %8s\n", "config", "route", "GEMM", "top-k", "rest");
    for (ci = 0; ci < CONFIGS; ++ci) {
        double gemm = worst(&sh, ci, OP_ROUTE_GEMM) / ROUTE_REPEAT, topk = worst(&sh, ci, OP_ROUTE_TOPK) / ROUTE_REPEAT;
        printf("%-30s %8.4f %8.4f %8.4f %8.4f\n", g_configs[ci].name, worst(&sh, ci, OP_ROUTE), gemm, topk,
               worst(&sh, ci, OP_ROUTE) - gemm - topk);
    }
    printf("\ninside one layer call (the forward's stages in sequence, median of each, max over ranks), ms\n");
    printf("%-24s %-7s %7s %7s %9s %8s %8s\n", "config", "path", "route", "plan", "dispatch", "experts", "combine");
    for (ci = 0; ci < CONFIGS; ++ci) {
        int path, st;
        for (path = 0; path < 2; ++path) {
            printf("%-24s %-7s", g_configs[ci].name, path ? "NCCL" : sh.direct[ci] ? "direct" : "default");
            for (st = 0; st < 5; ++st) {
                double m = 0.0;
                for (i = 0; i < gpus; ++i) if (sh.split[ci][path][st][i] > m) m = sh.split[ci][path][st][i];
                printf(" %*.3f", st == 2 ? 9 : st >= 3 ? 8 : 7, m);
            }
            printf("\n");
        }
    }
    if (gpus == 1) {
        printf("\nplanning on the GPU and CUDA graphs (world size 1), ms\n");
        printf("%-30s %9s %9s %10s | %9s %9s %9s %9s | %9s %9s\n", "config", "gpu-plan", "plan-1", "host-plan",
               "fwd-host", "fwd-gpu", "fwd-chunk", "fwd-graph", "experts", "exp-chunk");
        for (ci = 0; ci < CONFIGS; ++ci)
            printf("%-30s %9.4f %9.4f %10.4f | %9.3f %9.3f %9.3f %9.3f | %9.3f %9.3f\n", g_configs[ci].name,
                   worst(&sh, ci, OP_GPU_PLAN) / ROUTE_REPEAT, worst(&sh, ci, OP_GPU_PLAN_ONE), worst(&sh, ci, OP_PLAN),
                   worst(&sh, ci, OP_FORWARD_HOSTPLAN), worst(&sh, ci, OP_FORWARD), worst(&sh, ci, OP_FORWARD_CHUNKED),
                   worst(&sh, ci, OP_GRAPH), worst(&sh, ci, OP_EXPERTS), worst(&sh, ci, OP_EXPERTS_CHUNKED));
        printf("(gpu-plan: the three plan kernels, mean of %d plans replayed in one CUDA graph; plan-1: one plan\n"
               " launched from the host; host-plan: moe_ep_cuda_plan_create (download, host plan, upload);\n"
               " fwd-host: forward with planning = HOST; fwd-gpu: the default (planned on the GPU, GEMM sizes\n"
               " downloaded); fwd-chunk: expert_gemm = CHUNKED; fwd-graph: that forward captured, one graph launch;\n"
               " experts: grouped GEMMs on a host plan; exp-chunk: the CHUNKED experts alone)\n", ROUTE_REPEAT);
    }
    printf("\n");
    for (ci = 0; ci < CONFIGS; ++ci) {
        double raw = worst(&sh, ci, OP_RAW_FWD) + worst(&sh, ci, OP_RAW_BACK);
        double lay = worst(&sh, ci, OP_DIRECT), t;
        printf("ratio %-24s dispatch+combine bandwidth / raw NCCL = %.3f (goal >= 0.9; %s path; NCCL staged path %.3f)\n",
               g_configs[ci].name, raw / lay, sh.direct[ci] ? "direct" : "NCCL",
               raw / (worst(&sh, ci, OP_DISPATCH) + worst(&sh, ci, OP_COMBINE)));
        if (torch_ms(torch_log, g_configs[ci].name, &t))
            printf("ratio %-24s layer time / PyTorch layer (%.3f ms) = %.3f (goal <= 0.333)\n", g_configs[ci].name, t,
                   worst(&sh, ci, OP_FORWARD) / t);
    }
    return 0;
}
