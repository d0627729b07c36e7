/* nonfinite_bench -- what moe_ep_forward_args.nonfinite_tokens costs: the same forward with and
   without it, alternating, one rank, medians over --reps rounds (after 2 warm-ups).

   ./nonfinite_bench [--tokens T] [--d-model D] [--d-ff F] [--experts E] [--top-k K] [--reps N] */
#define _POSIX_C_SOURCE 200112L
#define MOE_EP_IMPLEMENTATION
#include "../moe_ep.h"
#include "../tests/support/test_support.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_util.h"


int main(int argc, char** argv) {
    int T = 2048, D = 1024, F = 512, E = 8, K = 2, reps = 20, i, e;
    float *router, *weights, *x, *y;
    moe_ep_expert_weights* experts;
    moe_ep_context* ctx = NULL;
    double *with, *without;
    int64_t bad = -1;
    for (i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--tokens")) T = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--d-model")) D = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--d-ff")) F = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--experts")) E = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--top-k")) K = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--reps")) reps = atoi(argv[i + 1]);
    }
    router = test_random_floats((size_t)E * (size_t)D, 0.05f, 1);
    weights = test_random_floats((size_t)E * 3 * (size_t)D * (size_t)F, 0.03f, 2);
    x = test_random_floats((size_t)T * (size_t)D, 1.0f, 3);
    y = (float*)malloc(sizeof(float) * (size_t)T * (size_t)D);
    experts = (moe_ep_expert_weights*)calloc((size_t)E, sizeof *experts);
    with = (double*)calloc((size_t)reps, sizeof(double));
    without = (double*)calloc((size_t)reps, sizeof(double));
    for (e = 0; e < E; ++e) {
        const float* w = weights + (size_t)e * 3 * (size_t)D * (size_t)F;
        experts[e].w1 = w;
        experts[e].w3 = w + (size_t)D * F;
        experts[e].w2 = w + 2 * (size_t)D * F;
    }
    if (moe_ep_create(&(moe_ep_desc){ .d_model = D, .d_ff = F, .num_experts = E, .top_k = K, .router_weight = router,
                                      .experts = experts }, &ctx) != MOE_EP_OK) {
        fprintf(stderr, "nonfinite_bench: create failed\n");
        return 1;
    }
    for (i = -2; i < reps; ++i) {
        double t0, t1, t2;
        int first = i % 2 == 0;     /* which goes first alternates */
        t0 = bench_now();
        moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = T, .x = x, .y = y, .nonfinite_tokens = first ? &bad : NULL });
        t1 = bench_now();
        moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = T, .x = x, .y = y, .nonfinite_tokens = first ? NULL : &bad });
        t2 = bench_now();
        if (i >= 0) {
            with[i] = first ? t1 - t0 : t2 - t1;
            without[i] = first ? t2 - t1 : t1 - t0;
        }
    }
    qsort(with, (size_t)reps, sizeof(double), bench_cmp_double);
    qsort(without, (size_t)reps, sizeof(double), bench_cmp_double);
    printf("forward, %d tokens, d_model %d, d_ff %d, %d experts, top-%d, %d threads, %d rounds: without the count "
           "%.3f ms, with it %.3f ms (median), ratio %.4f; non-finite rows: %lld\n", T, D, F, E, K,
           moe_ep_query(ctx).num_threads, reps, 1e3 * without[reps / 2], 1e3 * with[reps / 2],
           with[reps / 2] / without[reps / 2], (long long)bad);
    moe_ep_destroy(ctx);
    free(router); free(weights); free(x); free(y); free(experts); free(with); free(without);
    return 0;
}
