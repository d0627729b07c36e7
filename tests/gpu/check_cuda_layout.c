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

#include "../support/test_support.h"
#include "gpu_check.h"
#include "gpu_layout_suite.h"

#define PROGRAM "check_cuda_layout"

/* >>GPU layer over the groups */
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
    else for (i = 0; i < n; ++i) ((uint16_t*)out)[i] = test_bf16_from_float(v[i]);
    return out;
}

static void from_dtype(const void* v, size_t n, int bf16, float* out) {
    size_t i;
    if (!bf16) memcpy(out, v, n * 4);
    else for (i = 0; i < n; ++i) out[i] = test_bf16_to_float(((const uint16_t*)v)[i]);
}

typedef struct gpu_setup {
    model m;
    moe_ep_cuda_expert_weights mine[E_ALL];
    void* host_weights[3 * E_ALL];
    void* router;
    moe_ep_cuda_layer* layer;
    test_log log;                   /* the layer's messages, create's included */
} gpu_setup;

static moe_ep_result gpu_create(rank_env* env, groups* g, gpu_setup* s, const gpu_case* c, moe_ep_cuda_expert_fn fn) {
    suite* su = (suite*)env->suite;
    const moe_ep_layout_desc* l = &su->layout;
    int experts[E_ALL], n, i, j;
    size_t cnt;
    memset(s, 0, sizeof *s);
    test_log_init(&s->log);     /* what the layer logs at create: the refusal of expert_fn with TP */
    model_make(&s->m, c->d, c->ff, c->bf16, 1000 + (uint64_t)c->d * 7 + (uint64_t)c->ff);
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
        .logger = test_log_logger(&s->log),
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
    test_log_destroy(&s->log);
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
        char lines[512];
        rank_fail(env, "moe_ep_cuda_layer_create: %s (%s)", moe_ep_result_string(res),
                  test_log_join(&s.log, lines, sizeof lines));
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
    int line = test_log_find(&s.log, "tp_transport");     /* the first message that names it */
    const char* refusal = test_log_line(&s.log, line);
    if (res == MOE_EP_OK) rank_fail(env, "expert_fn with a TP group was accepted");
    else if (!strstr(refusal, "not supported")) rank_fail(env, "logged \"%s\"", refusal);
    else note(env, "%s: \"%s\"", moe_ep_result_string(res), refusal);
    gpu_free(&s);
}

/* >>suite */
static void layout_suite(rank_env* env) {
    suite* su = (suite*)env->suite;
    const moe_ep_layout_desc* l = &su->layout;
    groups g;
    int i, sub;
    if (!split_groups(env, &g)) return;
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
    destroy_groups(env, &g);
}

static void run_layout(world* w, int ep, int tp, int dp) {
    suite su;
    if (!layout_suite_begin(&su, w, ep, tp, dp, layout_suite)) return;
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
