/* fingerprint.c -- the fp32 layer's output as one number per layer, to compare builds.

   Runs fixed, seeded layers on one rank (the same bits as any rank count: the core
   promises that, the demos and suites check it) and prints, per layer, the fingerprint
   of its output y, its routing (topk_idx, topk_weight) and its aux and z losses, then one line
   that combines them:

       seed      <16 hex digits>   the seed demo's layer at check-demos' size: the number
                                   `seed_demo --ranks 8 --experts 64 --top-k 2 --tokens 64
                                   --d-model 64 --d-ff 128` prints
       ...
       fingerprint <16 hex digits>

   Every compiler, optimisation level, kernel path and architecture must print the same
   lines (make check-bits, make test-cross). Plain C99 that is also C++ (no designated
   initialisers, no compound literals), no Check: it runs wherever a libc does. */
#define MOE_EP_IMPLEMENTATION
#include "../../moe_ep.h"
#include "../../examples/example_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct bits_layer {
    const char* name;
    int experts, top_k, tokens, d_model, d_ff, shared_d_ff;
    moe_ep_activation activation;
    moe_ep_scoring scoring;
    bool normalize, biases, router_bias, selection_bias, scale_input, shared_gate;
    int groups, topk_groups;
    float scaling, weight_scale;
    moe_ep_weight_format format;
    moe_ep_arithmetic arithmetic;
} bits_layer;

/* --kernel NAME: the kernel path every layer runs (default: the one the CPU gets). */
static moe_ep_kernel bits_kernel = MOE_EP_KERNEL_DEFAULT;

static unsigned long long bits_hash_bytes(unsigned long long hash, uint32_t value) {
    int b;
    for (b = 0; b < 32; b += 8) { hash ^= (value >> b) & 0xFFu; hash *= 1099511628211ull; }
    return hash;
}

static float* bits_floats(size_t n, float scale, unsigned long long* state) {
    float* v = (float*)malloc(sizeof(float) * (n > 0 ? n : 1));
    if (!v) { fprintf(stderr, "fingerprint: out of memory\n"); exit(1); }
    example_fill(v, n, scale, state);
    return v;
}

/* One expert's weights (and biases) from the stream. */
static void bits_expert(const bits_layer* l, int d_ff, float* w, float** biases, moe_ep_expert_weights* out,
                        unsigned long long* state) {
    size_t dm = (size_t)l->d_model * (size_t)d_ff;
    memset(out, 0, sizeof *out);
    out->w1 = w;
    out->w3 = w + dm;
    out->w2 = w + 2 * dm;
    if (l->biases) {
        biases[0] = bits_floats((size_t)d_ff, 0.5f, state);
        biases[1] = bits_floats((size_t)d_ff, 0.5f, state);
        biases[2] = bits_floats((size_t)l->d_model, 0.5f, state);
        out->b1 = biases[0];
        out->b3 = biases[1];
        out->b2 = biases[2];
    }
}

/* The layer's fingerprint, or 0 with a message on failure. The seed layer draws x, the
   router and the experts' weights in the seed demo's order, so its y is the demo's. */
static unsigned long long bits_run(const bits_layer* l, unsigned long long seed) {
    unsigned long long state = seed, hash = 14695981039346656037ull, h_y;
    size_t D = (size_t)l->d_model, T = (size_t)l->tokens, per_expert = 3 * D * (size_t)l->d_ff, i;
    float* x = bits_floats(T * D, 1.0f, &state);
    float* router = bits_floats((size_t)l->experts * D, 1.0f / (float)l->d_model, &state);
    float* weights = bits_floats(per_expert * (size_t)l->experts, l->weight_scale / (float)l->d_model, &state);
    float* shared_w = NULL;
    float* shared_gate = NULL;
    float* router_bias = NULL;
    float* selection_bias = NULL;
    float** biases = (float**)calloc((size_t)l->experts * 3 + 3, sizeof(float*));
    moe_ep_expert_weights* experts = (moe_ep_expert_weights*)calloc((size_t)l->experts, sizeof *experts);
    float* y = (float*)malloc(sizeof(float) * (T * D + 1));
    int32_t* idx = (int32_t*)malloc(sizeof(int32_t) * (T * (size_t)l->top_k + 1));
    float* weight = (float*)malloc(sizeof(float) * (T * (size_t)l->top_k + 1));
    moe_ep_desc desc;
    moe_ep_forward_args args;
    moe_ep_router_stats stats;
    moe_ep_context* ctx = NULL;
    moe_ep_result res;
    int e;
    uint64_t aux_bits;
    if (!biases || !experts || !y || !idx || !weight) { fprintf(stderr, "fingerprint: out of memory\n"); exit(1); }
    for (e = 0; e < l->experts; ++e)
        bits_expert(l, l->d_ff, weights + (size_t)e * per_expert, biases + 3 * e, &experts[e], &state);
    memset(&desc, 0, sizeof desc);
    desc.d_model = l->d_model;
    desc.d_ff = l->d_ff;
    desc.num_experts = l->experts;
    desc.top_k = l->top_k;
    desc.activation = l->activation;
    desc.scoring = l->scoring;
    desc.normalize_topk = l->normalize;
    desc.routed_scaling_factor = l->scaling;
    desc.num_groups = l->groups;
    desc.topk_groups = l->topk_groups;
    desc.scale_expert_input = l->scale_input;
    desc.router_weight = router;
    desc.experts = experts;
    desc.weight_format = l->format;
    desc.arithmetic = l->arithmetic;
    /* BF16_DOT runs on its own kernels: --kernel portable is its emulation, the others its default */
    desc.kernel = l->arithmetic == MOE_EP_ARITHMETIC_BF16_DOT && bits_kernel != MOE_EP_KERNEL_PORTABLE
                      ? MOE_EP_KERNEL_DEFAULT : bits_kernel;
    if (l->router_bias) desc.router_bias = router_bias = bits_floats((size_t)l->experts, 0.05f, &state);
    if (l->selection_bias) desc.selection_bias = selection_bias = bits_floats((size_t)l->experts, 0.05f, &state);
    if (l->shared_d_ff > 0) {
        shared_w = bits_floats(3 * D * (size_t)l->shared_d_ff, 1.0f / (float)l->d_model, &state);
        desc.shared.d_ff = l->shared_d_ff;
        bits_expert(l, l->shared_d_ff, shared_w, biases + 3 * l->experts, &desc.shared.weights, &state);
        if (l->shared_gate) desc.shared.gate = shared_gate = bits_floats(D, 1.0f, &state);
    }
    memset(y, 0xFF, sizeof(float) * T * D);    /* NaN poison: unwritten rows change the fingerprint */
    memset(&stats, 0, sizeof stats);
    memset(&args, 0, sizeof args);
    args.tokens = (int64_t)T;
    args.x = x;
    args.y = y;
    args.topk_idx = idx;
    args.topk_weight = weight;
    args.stats = &stats;
    res = moe_ep_create(&desc, &ctx);
    if (res == MOE_EP_OK) res = moe_ep_forward(ctx, &args);
    if (res != MOE_EP_OK) {
        fprintf(stderr, "fingerprint: layer %s: %s: %s\n", l->name, moe_ep_result_string(res),
                ctx ? moe_ep_last_error(ctx) : "(create failed)");
        hash = 0;
    } else {
        h_y = example_fingerprint(y, T * D);
        hash = bits_hash_bytes(hash, (uint32_t)h_y);
        hash = bits_hash_bytes(hash, (uint32_t)(h_y >> 32));
        for (i = 0; i < T * (size_t)l->top_k; ++i) {
            uint32_t w;
            memcpy(&w, &weight[i], sizeof w);
            hash = bits_hash_bytes(hash, (uint32_t)idx[i]);
            hash = bits_hash_bytes(hash, w);
        }
        memcpy(&aux_bits, &stats.aux_loss, sizeof aux_bits);
        hash = bits_hash_bytes(hash, (uint32_t)aux_bits);
        hash = bits_hash_bytes(hash, (uint32_t)(aux_bits >> 32));
        memcpy(&aux_bits, &stats.z_loss, sizeof aux_bits);
        hash = bits_hash_bytes(hash, (uint32_t)aux_bits);
        hash = bits_hash_bytes(hash, (uint32_t)(aux_bits >> 32));
        if (strcmp(l->name, "seed") == 0) hash = h_y;  /* the demo prints y's alone */
    }
    moe_ep_destroy(ctx);
    for (i = 0; i < (size_t)l->experts * 3 + 3; ++i) free(biases[i]);
    free(biases); free(experts); free(x); free(router); free(weights); free(shared_w); free(shared_gate);
    free(router_bias); free(selection_bias); free(y); free(idx); free(weight);
    return hash;
}

int main(int argc, char** argv) {
    /* name, E, k, tokens, d_model, d_ff, shared d_ff, activation, scoring, normalize, biases, router
       bias, selection bias, scale input, shared gate, groups, topk groups, scaling, weight scale,
       format, arithmetic */
    static const bits_layer layers[] = {
        { "seed", 64, 2, 512, 64, 128, 0, MOE_EP_ACTIVATION_SWIGLU, MOE_EP_SCORING_SOFTMAX, true, false, false,
          false, false, false, 0, 0, 0.0f, 1.0f, MOE_EP_WEIGHT_FORMAT_DEFAULT, MOE_EP_ARITHMETIC_DEFAULT },
        { "gelu-sigmoid-groups-shared", 16, 4, 37, 40, 72, 56, MOE_EP_ACTIVATION_GELU, MOE_EP_SCORING_SIGMOID,
          true, true, false, true, false, true, 4, 2, 2.5f, 8.0f, MOE_EP_WEIGHT_FORMAT_DEFAULT, MOE_EP_ARITHMETIC_DEFAULT },
        { "clamped-topk-softmax", 12, 3, 29, 36, 44, 0, MOE_EP_ACTIVATION_SWIGLU_CLAMPED,
          MOE_EP_SCORING_TOPK_SOFTMAX, false, true, true, false, false, false, 0, 0, 0.0f, 40.0f,
          MOE_EP_WEIGHT_FORMAT_DEFAULT, MOE_EP_ARITHMETIC_DEFAULT },
        { "relu-topk-sigmoid-scaled", 8, 1, 31, 24, 52, 24, MOE_EP_ACTIVATION_RELU, MOE_EP_SCORING_TOPK_SIGMOID,
          false, false, false, false, true, false, 0, 0, 0.0f, 1.0f, MOE_EP_WEIGHT_FORMAT_DEFAULT, MOE_EP_ARITHMETIC_DEFAULT },
        { "swiglu-biases-softmax", 10, 2, 23, 33, 70, 0, MOE_EP_ACTIVATION_SWIGLU, MOE_EP_SCORING_SOFTMAX,
          false, true, true, false, false, false, 0, 0, 0.0f, 16.0f, MOE_EP_WEIGHT_FORMAT_DEFAULT, MOE_EP_ARITHMETIC_DEFAULT },
        /* the weight formats: each weight widened exactly, so the same bits everywhere too */
        { "bf16-swiglu-shared", 16, 2, 41, 48, 80, 40, MOE_EP_ACTIVATION_SWIGLU, MOE_EP_SCORING_SOFTMAX, true,
          false, false, false, false, true, 0, 0, 0.0f, 4.0f, MOE_EP_WEIGHT_FORMAT_BF16, MOE_EP_ARITHMETIC_DEFAULT },
        { "fp16-gelu-biases", 12, 2, 35, 40, 68, 0, MOE_EP_ACTIVATION_GELU, MOE_EP_SCORING_SOFTMAX, false, true,
          false, false, false, false, 0, 0, 0.0f, 8.0f, MOE_EP_WEIGHT_FORMAT_FP16, MOE_EP_ARITHMETIC_DEFAULT },
        { "int8-clamped-biases-shared", 10, 3, 27, 36, 60, 28, MOE_EP_ACTIVATION_SWIGLU_CLAMPED,
          MOE_EP_SCORING_TOPK_SOFTMAX, false, true, true, false, false, true, 0, 0, 0.0f, 40.0f,
          MOE_EP_WEIGHT_FORMAT_INT8, MOE_EP_ARITHMETIC_DEFAULT },
        /* the opt-in BF16_DOT arithmetic: vdpbf16ps where the CPU has AVX512-BF16, its emulation elsewhere */
        { "bf16dot-swiglu-biases-shared", 12, 2, 33, 41, 75, 30, MOE_EP_ACTIVATION_SWIGLU, MOE_EP_SCORING_SOFTMAX,
          true, true, false, false, false, true, 0, 0, 0.0f, 4.0f, MOE_EP_WEIGHT_FORMAT_BF16,
          MOE_EP_ARITHMETIC_BF16_DOT },
    };
    static const char* const kernel_names[] = { "default", "portable", "avx2", "avx512", "neon" };
    unsigned long long all = 14695981039346656037ull;
    size_t i;
    int failed = 0;
    if (argc == 3 && strcmp(argv[1], "--kernel") == 0) {
        for (i = 0; i < sizeof kernel_names / sizeof kernel_names[0]; ++i)
            if (strcmp(argv[2], kernel_names[i]) == 0) bits_kernel = (moe_ep_kernel)i;
        if (strcmp(argv[2], kernel_names[bits_kernel]) != 0) {
            fprintf(stderr, "fingerprint: --kernel %s: not one of default, portable, avx2, avx512, neon\n", argv[2]);
            return 2;
        }
    } else if (argc != 1) {
        fprintf(stderr, "usage: %s [--kernel default|portable|avx2|avx512|neon]\n", argv[0]);
        return 2;
    }
    printf("moe_ep %s, kernel path: %s\n", MOE_EP_VERSION_STRING,
           bits_kernel == MOE_EP_KERNEL_DEFAULT ? moe_ep_kernel_path() : moe_ep_kernel_string(bits_kernel));
    for (i = 0; i < sizeof layers / sizeof layers[0]; ++i) {
        unsigned long long h = bits_run(&layers[i], i == 0 ? 1 : 1000 + i);
        failed |= h == 0;
        printf("%-28s %016llx\n", layers[i].name, h);
        all = bits_hash_bytes(all, (uint32_t)h);
        all = bits_hash_bytes(all, (uint32_t)(h >> 32));
    }
    printf("fingerprint %016llx\n", all);
    return failed ? 1 : 0;
}
