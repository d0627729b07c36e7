/* check_cuda_families -- the model families on the GPU layer (moe_ep_cuda.h), one GPU.

   The transformers cases of tests/families/ (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3
   with and without groups, GPT-OSS, Llama-4 top-1 and top-2) are loaded as a user writes
   them (moe_ep_family_desc() plus the config's numbers, the checkpoint's tensors in their
   own layouts: tests/support/test_families.h), run by the core's CPU layer on one rank and
   by the GPU layer at world size 1 (an NCCL communicator of one GPU), and compared:
   - fp32: relative error ||y - cpu|| / ||cpu|| <= 1e-5, and the GPU router's experts equal
     to the CPU router's; with the grouped GEMMs and with the GEMM loop (the two ways the
     biases reach the rows), with buffers grown per call and reserved at create
     (max_tokens); a second forward repeats the first bitwise;
   - bf16 (weights, router and tokens rounded to bf16): relative error <= 1e-2, with the
     default expert GEMMs (the Hopper kernel where it runs), the cuBLAS loop, and the Hopper
     kernel asked for by name (skipped, and said so, on other GPUs);
   - moe_ep_cuda_shared_experts against moe_ep_shared_experts (fp32, 1e-5), where the
     family has shared experts;
   - a shared expert without weights is refused at create, naming the field.
   Outputs are poisoned (NaN) before every run. The CPU layer itself is checked against
   transformers' float64 output by tests/check_families.c. Without a GPU the program
   prints "check_cuda_families: no GPU, skipped" and exits 77 (--require-gpu: exits 1). */
#define MOE_EP_IMPLEMENTATION
#include "../../moe_ep_cuda.h"
#include "../../transports/moe_ep_nccl.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../support/test_families.h"
#include "../support/test_support.h"
#include "gpu_check.h"

/* >>helpers */
typedef struct gpu_env {
    ncclComm_t comm;
    cudaStream_t stream;
    moe_ep_transport transport;
} gpu_env;

/* A host copy of n floats in the layer's dtype (bf16: rounded to nearest even). */
static void* to_dtype(const float* v, size_t n, int bf16) {
    size_t i;
    void* out;
    if (!v) return NULL;
    out = malloc(n * (bf16 ? 2 : 4) + 4);
    if (!bf16) memcpy(out, v, n * 4);
    else for (i = 0; i < n; ++i) ((uint16_t*)out)[i] = test_bf16_from_float(v[i]);
    return out;
}

/* The same n floats rounded through bf16 (the CPU's copy of what the bf16 layer gets). */
static float* bf16_rounded(const float* v, size_t n) {
    float* out = (float*)malloc(n * 4 + 4);
    size_t i;
    for (i = 0; i < n; ++i) out[i] = test_bf16_to_float(test_bf16_from_float(v[i]));
    return out;
}

/* The tensors of one expert: sizes in elements, by the desc's layout (test_families.h
   points w1 at the fused gate/up tensor, w2 at down, b1/b2 at the biases). */
typedef struct expert_sizes {
    size_t w1, w2, b1, b2;
} expert_sizes;

static expert_sizes sizes_of(const moe_ep_desc* d) {
    expert_sizes s;
    s.w1 = (size_t)2 * (size_t)d->d_ff * (size_t)d->d_model;
    s.w2 = (size_t)d->d_ff * (size_t)d->d_model;
    s.b1 = (size_t)2 * (size_t)d->d_ff;
    s.b2 = (size_t)d->d_model;
    return s;
}

/* A GPU desc that describes the CPU desc d, its tensors converted to the dtype (kept in
   `store`, freed by free_store). */
#define STORE_MAX 1024
typedef struct store {
    void* block[STORE_MAX];
    int count;
    moe_ep_cuda_expert_weights experts[64];
} store;

static const void* keep(store* s, void* p) {
    if (p && s->count < STORE_MAX) s->block[s->count++] = p;
    return p;
}

static void free_store(store* s) {
    while (s->count > 0) free(s->block[--s->count]);
}

static moe_ep_cuda_layer_desc gpu_desc(const moe_ep_desc* d, int bf16, gpu_env* env, store* s) {
    moe_ep_cuda_layer_desc g;
    expert_sizes z = sizes_of(d);
    size_t D = (size_t)d->d_model, Fs = (size_t)d->shared.d_ff;
    int e;
    memset(&g, 0, sizeof g);
    memset(s, 0, sizeof *s);
    g.d_model = d->d_model;
    g.d_ff = d->d_ff;
    g.num_experts = d->num_experts;
    g.top_k = d->top_k;
    g.activation = d->activation;
    g.swiglu_alpha = d->swiglu_alpha;
    g.swiglu_limit = d->swiglu_limit;
    g.weight_layout = d->weight_layout;
    g.scoring = d->scoring;
    g.normalize_topk = d->normalize_topk;
    g.routed_scaling_factor = d->routed_scaling_factor;
    g.router_bias = d->router_bias;
    g.selection_bias = d->selection_bias;
    g.num_groups = d->num_groups;
    g.topk_groups = d->topk_groups;
    g.scale_expert_input = d->scale_expert_input;
    g.transport = &env->transport;
    g.stream = env->stream;
    g.timeout_ms = 120000;
    g.dtype = bf16 ? MOE_EP_CUDA_DTYPE_BF16 : MOE_EP_CUDA_DTYPE_F32;
    g.router_weight = keep(s, to_dtype(d->router_weight, (size_t)d->num_experts * D, bf16));
    for (e = 0; e < d->num_experts; ++e) {
        const moe_ep_expert_weights* w = &d->experts[e];
        s->experts[e].w1 = keep(s, to_dtype(w->w1, z.w1, bf16));
        s->experts[e].w2 = keep(s, to_dtype(w->w2, z.w2, bf16));
        s->experts[e].b1 = keep(s, to_dtype(w->b1, z.b1, bf16));
        s->experts[e].b2 = keep(s, to_dtype(w->b2, z.b2, bf16));
    }
    g.experts = s->experts;
    if (Fs > 0) {
        g.shared.d_ff = d->shared.d_ff;
        g.shared.weights.w1 = keep(s, to_dtype(d->shared.weights.w1, Fs * D, bf16));
        g.shared.weights.w3 = keep(s, to_dtype(d->shared.weights.w3, Fs * D, bf16));
        g.shared.weights.w2 = keep(s, to_dtype(d->shared.weights.w2, Fs * D, bf16));
        g.shared.gate = keep(s, to_dtype(d->shared.gate, D, bf16));
    }
    return g;
}

/* The CPU desc of the bf16 run: the same layer with every tensor rounded through bf16. */
static moe_ep_desc cpu_desc_bf16(const moe_ep_desc* d, store* s, moe_ep_expert_weights* experts) {
    moe_ep_desc r = *d;
    expert_sizes z = sizes_of(d);
    size_t D = (size_t)d->d_model, Fs = (size_t)d->shared.d_ff;
    int e;
    memset(s, 0, sizeof *s);
    r.router_weight = (const float*)keep(s, bf16_rounded(d->router_weight, (size_t)d->num_experts * D));
    for (e = 0; e < d->num_experts; ++e) {
        const moe_ep_expert_weights* w = &d->experts[e];
        memset(&experts[e], 0, sizeof experts[e]);
        experts[e].w1 = (const float*)keep(s, bf16_rounded(w->w1, z.w1));
        experts[e].w2 = (const float*)keep(s, bf16_rounded(w->w2, z.w2));
        if (w->b1) experts[e].b1 = (const float*)keep(s, bf16_rounded(w->b1, z.b1));
        if (w->b2) experts[e].b2 = (const float*)keep(s, bf16_rounded(w->b2, z.b2));
    }
    r.experts = experts;
    if (Fs > 0) {
        r.shared.weights.w1 = (const float*)keep(s, bf16_rounded(d->shared.weights.w1, Fs * D));
        r.shared.weights.w3 = (const float*)keep(s, bf16_rounded(d->shared.weights.w3, Fs * D));
        r.shared.weights.w2 = (const float*)keep(s, bf16_rounded(d->shared.weights.w2, Fs * D));
        if (d->shared.gate) r.shared.gate = (const float*)keep(s, bf16_rounded(d->shared.gate, D));
    }
    return r;
}

/* >>runs */
typedef struct gpu_run {
    int bf16, max_tokens;
    moe_ep_cuda_expert_gemm gemm;
    const char* what;
} gpu_run;

/* One GPU layer run of a case: y (fp32 host) and the router's choice. 0 on success, else a
   message in err. */
static int run_gpu(gpu_env* env, const moe_ep_cuda_layer_desc* base, const gpu_run* run, const float* x, int64_t T,
                   float* y, int32_t* idx, float* weight, char* err, size_t err_size) {
    moe_ep_cuda_layer_desc g = *base;
    moe_ep_cuda_layer* layer = NULL;
    size_t n = (size_t)T * (size_t)g.d_model, es = run->bf16 ? 2 : 4;
    void *xh = to_dtype(x, n, run->bf16), *yh = malloc(n * es + 4), *again = malloc(n * es + 4);
    void *xd = NULL, *yd = NULL;
    moe_ep_result res;
    int rc = 1, pass;
    size_t i;
    g.max_tokens = run->max_tokens ? T : 0;
    g.expert_gemm = run->gemm;
    res = moe_ep_cuda_layer_create(&g, &layer);
    if (res != MOE_EP_OK) {
        snprintf(err, err_size, "moe_ep_cuda_layer_create: %s", moe_ep_result_string(res));
        goto done;
    }
    if (cudaMalloc(&xd, n * es + 16) != cudaSuccess || cudaMalloc(&yd, n * es + 16) != cudaSuccess ||
        cudaMemcpy(xd, xh, n * es, cudaMemcpyHostToDevice) != cudaSuccess) {
        snprintf(err, err_size, "device buffers");
        goto done;
    }
    for (pass = 0; pass < 2; ++pass) {
        cudaMemset(yd, 0xFF, n * es + 16);     /* NaN in fp32 and bf16 */
        res = moe_ep_cuda_forward(layer, &(moe_ep_cuda_forward_args){ .tokens = T, .x = xd, .y = yd,
                                                                        .topk_idx = idx, .topk_weight = weight });
        if (res != MOE_EP_OK) {
            snprintf(err, err_size, "forward %d: %s: %s", pass, moe_ep_result_string(res),
                     moe_ep_cuda_layer_last_error(layer));
            goto done;
        }
        if (cudaStreamSynchronize(env->stream) != cudaSuccess ||
            cudaMemcpy(pass ? again : yh, yd, n * es, cudaMemcpyDeviceToHost) != cudaSuccess) {
            snprintf(err, err_size, "forward %d: reading y", pass);
            goto done;
        }
    }
    if (memcmp(yh, again, n * es) != 0) {
        snprintf(err, err_size, "the second forward differs from the first");
        goto done;
    }
    for (i = 0; i < n; ++i) y[i] = run->bf16 ? test_bf16_to_float(((const uint16_t*)yh)[i]) : ((const float*)yh)[i];
    rc = 0;
done:
    if (layer) moe_ep_cuda_layer_destroy(layer);
    cudaFree(xd);
    cudaFree(yd);
    free(xh);
    free(yh);
    free(again);
    return rc;
}

/* The CPU layer on one rank: y, and the routing it chose. */
static moe_ep_result run_cpu(const moe_ep_desc* d, const float* x, int64_t T, float* y, int32_t* idx, float* weight,
                             moe_ep_context** keep_ctx) {
    moe_ep_context* ctx = NULL;
    moe_ep_desc one = *d;
    moe_ep_result res;
    one.num_threads = 1;
    res = moe_ep_create(&one, &ctx);
    if (res == MOE_EP_OK)
        res = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = T, .x = x, .y = y, .topk_idx = idx,
                                                          .topk_weight = weight });
    if (keep_ctx && res == MOE_EP_OK) *keep_ctx = ctx;
    else moe_ep_destroy(ctx);
    return res;
}

/* moe_ep_cuda_shared_experts against moe_ep_shared_experts, fp32. */
static void check_shared_stage(gpu_env* env, const char* name, const moe_ep_cuda_layer_desc* g, moe_ep_context* cpu,
                               const float* x, int64_t T) {
    moe_ep_cuda_layer* layer = NULL;
    size_t n = (size_t)T * (size_t)g->d_model;
    float *ref = (float*)malloc(n * 4 + 4), *got = (float*)malloc(n * 4 + 4);
    void *xd = NULL, *od = NULL;
    moe_ep_result res = moe_ep_shared_experts(cpu, x, T, ref);
    if (res == MOE_EP_OK) res = moe_ep_cuda_layer_create(g, &layer);
    if (res != MOE_EP_OK) {
        gpu_fact(1, "%s shared experts stage: %s", name, moe_ep_result_string(res));
    } else if (cudaMalloc(&xd, n * 4) != cudaSuccess || cudaMalloc(&od, n * 4) != cudaSuccess ||
               cudaMemcpy(xd, x, n * 4, cudaMemcpyHostToDevice) != cudaSuccess ||
               cudaMemset(od, 0xFF, n * 4) != cudaSuccess) {
        gpu_fact(1, "%s shared experts stage: device buffers", name);
    } else {
        double e;
        res = moe_ep_cuda_shared_experts(layer, xd, T, od);
        cudaStreamSynchronize(env->stream);
        cudaMemcpy(got, od, n * 4, cudaMemcpyDeviceToHost);
        e = rel_error(got, ref, n);
        gpu_fact(res != MOE_EP_OK || !(e <= 1e-5), "%s moe_ep_cuda_shared_experts = moe_ep_shared_experts: %s, "
                 "rel.err %.2e", name, moe_ep_result_string(res), e);
    }
    if (layer) moe_ep_cuda_layer_destroy(layer);
    cudaFree(xd);
    cudaFree(od);
    free(ref);
    free(got);
}

static void run_family(gpu_env* env, const fam_spec* spec) {
    static const gpu_run runs[] = {
        { 0, 0, MOE_EP_CUDA_EXPERT_GEMM_GROUPED, "fp32 grouped GEMMs" },
        { 0, 1, MOE_EP_CUDA_EXPERT_GEMM_LOOP, "fp32 GEMM loop, max_tokens" },
        { 1, 0, MOE_EP_CUDA_EXPERT_GEMM_DEFAULT, "bf16" },
        { 1, 1, MOE_EP_CUDA_EXPERT_GEMM_LOOP, "bf16 GEMM loop, max_tokens" },
        { 1, 1, MOE_EP_CUDA_EXPERT_GEMM_HOPPER, "bf16 Hopper grouped GEMM, max_tokens" },
    };
    fam_case c;
    moe_ep_desc d, d16;
    moe_ep_expert_weights experts[64], experts16[64];
    moe_ep_cuda_layer_desc g;
    moe_ep_context* cpu = NULL;
    store s, s16;
    char err[1024] = "";
    const float* x;
    float *x16 = NULL, *ref = NULL, *ref16 = NULL, *y = NULL, *w = NULL, *cpu_w = NULL;
    int32_t *idx = NULL, *cpu_idx = NULL;
    int64_t T;
    size_t n;
    int i;
    if (!fam_load(&c, spec->name, err, sizeof err) || !fam_desc(&c, spec, experts, &d, err, sizeof err)) {
        gpu_fact(1, "%s: %s", spec->name, err);
        fam_free(&c);
        return;
    }
    x = fam_f32(&c, "input");
    T = fam_tokens(&c, d.d_model);
    n = (size_t)T * (size_t)d.d_model;
    ref = (float*)malloc(n * 4 + 4);
    ref16 = (float*)malloc(n * 4 + 4);
    y = (float*)malloc(n * 4 + 4);
    w = (float*)malloc(sizeof(float) * (size_t)(T * d.top_k) + 4);
    cpu_w = (float*)malloc(sizeof(float) * (size_t)(T * d.top_k) + 4);
    idx = (int32_t*)malloc(sizeof(int32_t) * (size_t)(T * d.top_k) + 4);
    cpu_idx = (int32_t*)malloc(sizeof(int32_t) * (size_t)(T * d.top_k) + 4);
    x16 = bf16_rounded(x, n);
    test_poison(ref, n);
    test_poison(ref16, n);
    if (run_cpu(&d, x, T, ref, cpu_idx, cpu_w, &cpu) != MOE_EP_OK) {
        gpu_fact(1, "%s: the CPU layer failed", spec->name);
        goto done;
    }
    d16 = cpu_desc_bf16(&d, &s16, experts16);
    if (run_cpu(&d16, x16, T, ref16, idx, w, NULL) != MOE_EP_OK) {
        gpu_fact(1, "%s: the CPU layer (bf16-rounded tensors) failed", spec->name);
        goto done;
    }
    for (i = 0; i < (int)(sizeof runs / sizeof runs[0]); ++i) {
        const gpu_run* run = &runs[i];
        double e, bound = run->bf16 ? 1e-2 : 1e-5;
        if (run->gemm == MOE_EP_CUDA_EXPERT_GEMM_HOPPER && !moe_ep__cuda_k_gemm_ready()) {
            printf("skip  %s %s: not a compute capability 9.0 GPU, or no sm_90a code in this build\n", spec->name,
                   run->what);
            continue;
        }
        test_poison(y, n);
        g = gpu_desc(&d, run->bf16, env, &s);
        if (run_gpu(env, &g, run, run->bf16 ? x16 : x, T, y, idx, w, err, sizeof err) != 0) {
            gpu_fact(1, "%s %s: %s", spec->name, run->what, err);
        } else {
            /* bf16 against the CPU layer on the same bf16-rounded inputs and weights */
            e = rel_error(y, run->bf16 ? ref16 : ref, n);
            gpu_fact(!(e <= bound), "%s %s (T=%lld, E=%d, k=%d): rel.err %.2e against the CPU layer (<= %g)",
                     spec->name, run->what, (long long)T, d.num_experts, d.top_k, e, bound);
            if (!run->bf16)
                gpu_fact(memcmp(idx, cpu_idx, sizeof(int32_t) * (size_t)(T * d.top_k)) != 0,
                         "%s %s: the GPU router chose the CPU router's experts", spec->name, run->what);
        }
        free_store(&s);
    }
    if (d.shared.d_ff > 0) {
        g = gpu_desc(&d, 0, env, &s);
        check_shared_stage(env, spec->name, &g, cpu, x, T);
        free_store(&s);
    }
    free_store(&s16);
done:
    moe_ep_destroy(cpu);
    free(x16); free(ref); free(ref16); free(y); free(w); free(cpu_w); free(idx); free(cpu_idx);
    fam_free(&c);
}

/* A shared expert without weights: refused at create, with the field named. */
static void check_refusals(gpu_env* env) {
    test_log log;
    moe_ep_cuda_layer* layer = NULL;
    float router[8 * 16], wt[16 * 16];
    moe_ep_cuda_expert_weights experts[8];
    moe_ep_result res;
    int e;
    memset(experts, 0, sizeof experts);
    memset(router, 0, sizeof router);
    memset(wt, 0, sizeof wt);
    for (e = 0; e < 8; ++e) experts[e].w1 = experts[e].w3 = experts[e].w2 = wt;
    test_log_init(&log);
    res = moe_ep_cuda_layer_create(&(moe_ep_cuda_layer_desc){
        .d_model = 16, .d_ff = 16, .num_experts = 8, .top_k = 2, .transport = &env->transport, .stream = env->stream,
        .router_weight = router, .experts = experts, .shared = { .d_ff = 16, .weights = { .w1 = wt, .w2 = wt } },
        .logger = test_log_logger(&log) }, &layer);
    gpu_fact(res != MOE_EP_ERROR_INVALID_ARGUMENT || layer != NULL || test_log_find(&log, "shared.weights") < 0,
             "a shared expert without w3 is refused naming shared.weights: %s (%s)", moe_ep_result_string(res),
             test_log_line(&log, 0));
    if (layer) moe_ep_cuda_layer_destroy(layer);
    test_log_destroy(&log);
}

static void run_size(int size) {
    gpu_env env;
    int device = 0, i;
    if (size != 1) return;  /* the families run at world size 1 (the comparison with the CPU layer) */
    memset(&env, 0, sizeof env);
    if (!gpu_init_comms(&env.comm, &device, 1)) return;
    if (cudaSetDevice(0) != cudaSuccess || cudaStreamCreate(&env.stream) != cudaSuccess ||
        moe_ep_nccl_transport_create(&(moe_ep_nccl_desc){ .comm = env.comm, .stream = env.stream, .timeout_ms = 120000 },
                                     &env.transport) != MOE_EP_OK) {
        gpu_fact(1, "world=1: stream or NCCL transport");
        ncclCommDestroy(env.comm);
        return;
    }
    for (i = 0; i < FAM_SPECS; ++i) run_family(&env, &fam_specs[i]);
    check_refusals(&env);
    moe_ep_nccl_transport_destroy(&env.transport);
    cudaStreamDestroy(env.stream);
    ncclCommDestroy(env.comm);
}

int main(int argc, char** argv) {
    return gpu_main(argc, argv, "check_cuda_families", 0, run_size, NULL);
}

#if !defined(MOE_EP_NCCL_IMPL_INCLUDED) || !defined(MOE_EP_CUDA_IMPL_INCLUDED)
#error "MOE_EP_IMPLEMENTATION did not build the NCCL transport and the GPU layer"
#endif
