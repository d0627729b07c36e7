/* bits_bench -- what the same-bits arithmetic costs on the build this file is compiled for.

   Prints one line: the kernel path, then the median GFLOP/s over --reps runs of
   - ffn:   one expert's SwiGLU FFN (moe_ep_expert_ffn), 128 rows, d_model 512, d_ff 1024;
   - layer: moe_ep_forward of the seed demo's layer shape at 512 tokens (64 experts, top-2,
            d_model 256, d_ff 512), router and combine included;
   one thread (num_threads 1), so that two builds compare kernel against kernel. make
   bench-bits builds it several ways (x86-64 without FMA instructions with this header and
   with the header before it fused, the portable kernel with hardware FMA, the SIMD path;
   armhf under qemu-user) and runs the builds in turn, so that each ratio is between runs
   made side by side (bench/RESULTS.md). Plain C99, any libc. */
#define _POSIX_C_SOURCE 200112L   /* clock_gettime */
#define MOE_EP_IMPLEMENTATION
#include "moe_ep.h"
#include "../examples/example_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_util.h"


static float* bench_floats(size_t n, float scale, unsigned long long* state) {
    float* v = (float*)malloc(sizeof(float) * n);
    if (!v) { fprintf(stderr, "bits_bench: out of memory\n"); exit(1); }
    example_fill(v, n, scale, state);
    return v;
}

/* Median seconds of `reps` calls of the layer (ffn: expert 0's FFN on all tokens). */
static double bench_time(int experts, int top_k, int tokens, int d_model, int d_ff, int ffn_only, int reps,
                         unsigned long long seed) {
    size_t per_expert = 3 * (size_t)d_model * (size_t)d_ff;
    float* x = bench_floats((size_t)tokens * (size_t)d_model, 1.0f, &seed);
    float* router = bench_floats((size_t)experts * (size_t)d_model, 1.0f / (float)d_model, &seed);
    float* w = bench_floats(per_expert * (size_t)experts, 1.0f / (float)d_model, &seed);
    float* y = (float*)malloc(sizeof(float) * (size_t)tokens * (size_t)d_model);
    moe_ep_expert_weights* ew = (moe_ep_expert_weights*)calloc((size_t)experts, sizeof *ew);
    double times[64], t0;
    moe_ep_desc desc;
    moe_ep_context* ctx = NULL;
    int e, r;
    for (e = 0; e < experts; ++e) {
        ew[e].w1 = w + (size_t)e * per_expert;
        ew[e].w3 = ew[e].w1 + (size_t)d_model * (size_t)d_ff;
        ew[e].w2 = ew[e].w3 + (size_t)d_model * (size_t)d_ff;
    }
    memset(&desc, 0, sizeof desc);
    desc.d_model = d_model;
    desc.d_ff = d_ff;
    desc.num_experts = experts;
    desc.top_k = top_k;
    desc.normalize_topk = true;
    desc.num_threads = 1;
    desc.router_weight = router;
    desc.experts = ew;
    if (moe_ep_create(&desc, &ctx) != MOE_EP_OK) { fprintf(stderr, "bits_bench: create failed\n"); exit(1); }
    for (r = 0; r < reps + 1; ++r) {       /* the first run warms up */
        moe_ep_result res;
        t0 = bench_now();
        if (ffn_only) {
            res = moe_ep_expert_ffn(ctx, 0, x, tokens, y);
        } else {
            moe_ep_forward_args args;
            memset(&args, 0, sizeof args);
            args.tokens = tokens;
            args.x = x;
            args.y = y;
            res = moe_ep_forward(ctx, &args);
        }
        if (res != MOE_EP_OK) { fprintf(stderr, "bits_bench: %s\n", moe_ep_last_error(ctx)); exit(1); }
        if (r > 0) times[r - 1] = bench_now() - t0;
    }
    moe_ep_destroy(ctx);
    free(x); free(router); free(w); free(y); free(ew);
    qsort(times, (size_t)reps, sizeof times[0], bench_cmp_double);
    return times[reps / 2];
}

int main(int argc, char** argv) {
    int reps = argc > 1 ? atoi(argv[1]) : 5;
    double ffn, layer;
    if (reps < 1 || reps > 64) reps = 5;
    ffn = bench_time(1, 1, 128, 512, 1024, 1, reps, 1);
    layer = bench_time(64, 2, 512, 256, 512, 0, reps, 2);
    printf("%-10s ffn %8.3f GF/s   layer %8.3f GF/s\n", moe_ep_kernel_path(),
           2.0 * 128 * 3 * 512 * 1024 / ffn * 1e-9, 2.0 * 512 * 2 * 3 * 256 * 512 / layer * 1e-9);
    return 0;
}
