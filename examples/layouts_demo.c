/* layouts_demo -- the same MoE layer as pure EP, EP x DP and EP x TP x DP, 64 ranks, 512 experts.

   For each layout it prints the groups and the experts of each rank, runs a small layer on
   64 rank threads (pthreads transport, groups made with moe_ep_layout_split), and checks
   every rank's output against one rank that holds all 512 experts and all tokens:
   bitwise without tensor parallelism; with it, the TP slices' partial sums are added in a
   fixed order, so the result is deterministic but rounds differently from one rank
   (checked within 1e-6 relative, and bitwise equal across the ranks of a TP group).

   ./layouts_demo [--ranks 64] [--experts 512] [--tokens 8] [--seed 1]. Exit 0 when all agree. */
#define MOE_EP_IMPLEMENTATION
#include "../transports/moe_ep_pthreads.h"
#include "example_util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define D_MODEL 32
#define D_FF 64
#define TOP_K 2

typedef struct layout_case {
    const char* name;
    int ep, tp, dp;
} layout_case;

typedef struct demo {
    moe_ep_layout_desc layout;      /* resolved */
    int tokens;                     /* per data shard (a TP group shares one shard) */
    const float* x;                 /* [shards * tokens, D_MODEL] */
    const float* router;
    const moe_ep_expert_weights* experts;  /* all experts */
    float* y;                       /* [ranks, tokens, D_MODEL] */
    char error[256];
} demo;

static int shard_of(const moe_ep_layout_desc* l, int rank) {
    moe_ep_coords c;
    moe_ep_layout_coords(l, rank, &c);
    return c.dp * l->ep_size + c.ep;
}

static moe_ep_result rank_main(const moe_ep_transport* world, void* user_data) {
    demo* d = (demo*)user_data;
    const moe_ep_layout_desc* l = &d->layout;
    int rank = world->rank, n, i;
    moe_ep_transport ep_group, tp_group;
    moe_ep_context* ctx = NULL;
    moe_ep_expert_weights* mine;
    int* experts;
    moe_ep_result res;
    int has_tp = l->tp_size > 1;

    res = moe_ep_layout_split(l, world, MOE_EP_GROUP_EP, &ep_group, NULL, 0);
    if (res != MOE_EP_OK) return res;
    if (has_tp) {
        res = moe_ep_layout_split(l, world, MOE_EP_GROUP_TP, &tp_group, NULL, 0);
        if (res != MOE_EP_OK) { moe_ep_pthreads_transport_destroy(&ep_group); return res; }
    }
    n = moe_ep_layout_experts(l, rank, NULL, 0);
    experts = (int*)malloc(sizeof *experts * (size_t)n);
    mine = (moe_ep_expert_weights*)malloc(sizeof *mine * (size_t)n);
    moe_ep_layout_experts(l, rank, experts, n);
    for (i = 0; i < n; ++i) mine[i] = d->experts[experts[i]];
    res = moe_ep_create(&(moe_ep_desc){
        .d_model = D_MODEL, .d_ff = D_FF, .num_experts = l->num_experts, .top_k = TOP_K, .normalize_topk = true,
        .num_threads = 1, .router_weight = d->router, .experts = mine, .experts_count = n,
        .transport = &ep_group, .tp_transport = has_tp ? &tp_group : NULL,
    }, &ctx);
    if (res == MOE_EP_OK) {
        const float* x = d->x + (size_t)shard_of(l, rank) * (size_t)d->tokens * D_MODEL;
        float* y = d->y + (size_t)rank * (size_t)d->tokens * D_MODEL;
        res = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = d->tokens, .x = x, .y = y });
        if (res != MOE_EP_OK && rank == 0)
            snprintf(d->error, sizeof d->error, "rank 0: %.200s", moe_ep_last_error(ctx));
    }
    moe_ep_destroy(ctx);
    if (has_tp) moe_ep_pthreads_transport_destroy(&tp_group);
    moe_ep_pthreads_transport_destroy(&ep_group);
    free(experts);
    free(mine);
    return res;
}

static void print_layout(const moe_ep_layout_desc* l) {
    int r, g[1024], n, i, shown = 0;
    printf("  rank order: rank = (dp * %d + ep) * %d + tp  (tp fastest)\n", l->ep_size, l->tp_size);
    printf("  %4s  %-12s  %-28s  %-16s  %s\n", "rank", "(dp,ep,tp)", "EP group", "TP group", "experts");
    for (r = 0; r < l->world_size; ++r) {
        moe_ep_coords c;
        char ep_text[64], tp_text[64];
        int first = 0, count;
        /* print the first ranks and every rank that starts a new DP replica; the rest follow the pattern */
        moe_ep_layout_coords(l, r, &c);
        if (!(r < 4 || (c.ep == 0 && c.tp == 0 && shown < 12))) continue;
        shown++;
        n = moe_ep_layout_group(l, r, MOE_EP_GROUP_EP, g, 1024);
        snprintf(ep_text, sizeof ep_text, "%d ranks: %d,%d..%d", n, g[0], n > 1 ? g[1] : g[0], g[n - 1]);
        n = moe_ep_layout_group(l, r, MOE_EP_GROUP_TP, g, 1024);
        if (n == 1) snprintf(tp_text, sizeof tp_text, "-");
        else snprintf(tp_text, sizeof tp_text, "%d ranks: %d..%d", n, g[0], g[n - 1]);
        count = moe_ep_layout_experts(l, r, g, 1024);
        first = g[0];
        for (i = 1; i < count; ++i) if (g[i] != g[i - 1] + 1) break;
        printf("  %4d  (%d,%d,%d)%*s  %-28s  %-16s  %d experts: %d..%d%s\n", r, c.dp, c.ep, c.tp,
               c.dp > 9 || c.ep > 9 ? 2 : 4, "", ep_text, tp_text, count, first, g[count - 1],
               l->tp_size > 1 ? " (d_ff slice)" : "");
    }
    printf("  ...\n");
}

int main(int argc, char** argv) {
    static const layout_case cases[] = {
        { "pure EP", 0, 1, 1 },
        { "EP x DP", 8, 1, 8 },
        { "EP x TP x DP", 8, 4, 2 },
    };
    int ranks = 64, experts = 512, tokens = 8, c, i, failures = 0;
    unsigned long long seed = 1;
    for (i = 1; i < argc; i += 2) {
        if (strcmp(argv[i], "--help") == 0) {
            printf("usage: layouts_demo [--ranks 64] [--experts 512] [--tokens 8] [--seed 1]\n"
                   "  ranks must be a multiple of 64's layouts: EP x DP uses EP 8, EP x TP x DP uses 8 x 4.\n");
            return 0;
        }
        if (i + 1 >= argc) { fprintf(stderr, "layouts_demo: %s needs a value\n", argv[i]); return 2; }
        if (strcmp(argv[i], "--ranks") == 0) ranks = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--experts") == 0) experts = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--tokens") == 0) tokens = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--seed") == 0) seed = strtoull(argv[i + 1], NULL, 10);
        else { fprintf(stderr, "layouts_demo: unknown flag %s\n", argv[i]); return 2; }
    }
    if (ranks <= 0 || experts <= 0 || tokens < 0 || ranks % 32 != 0) {
        fprintf(stderr, "layouts_demo: --ranks must be a positive multiple of 32, --experts > 0, --tokens >= 0\n");
        return 2;
    }
    printf("moe_ep layouts demo: %d ranks, %d experts, top-%d, d_model %d, d_ff %d, %d tokens per data shard\n",
           ranks, experts, TOP_K, D_MODEL, D_FF, tokens);

    for (c = 0; c < 3; ++c) {
        const layout_case* lc = &cases[c];
        moe_ep_layout_desc layout;
        char err[256];
        demo d;
        moe_ep_pthreads_world* world;
        moe_ep_expert_weights* all;
        moe_ep_context* single;
        float *x, *y_ref, *router, *weights;
        size_t per_expert = 3 * (size_t)D_MODEL * D_FF;
        int shards, r, e, tp_consistent = 1, bitwise = 1;
        double max_diff = 0.0, max_ref = 0.0;
        moe_ep_result res;

        if (moe_ep_layout_resolve(&(moe_ep_layout_desc){ .world_size = ranks, .ep_size = lc->ep, .tp_size = lc->tp,
                                                        .dp_size = lc->dp, .num_experts = experts },
                                  &layout, err, sizeof err) != MOE_EP_OK) {
            printf("\n%s: %s\n", lc->name, err);
            failures++;
            continue;
        }
        printf("\n== %s: EP %d x TP %d x DP %d = %d ranks, %d experts per rank ==\n", lc->name, layout.ep_size,
               layout.tp_size, layout.dp_size, ranks, experts / layout.ep_size);
        print_layout(&layout);

        shards = layout.dp_size * layout.ep_size;
        x = (float*)malloc(sizeof *x * (size_t)shards * (size_t)tokens * D_MODEL + 1);
        y_ref = (float*)malloc(sizeof *y_ref * (size_t)shards * (size_t)tokens * D_MODEL + 1);
        router = (float*)malloc(sizeof *router * (size_t)experts * D_MODEL);
        weights = (float*)malloc(sizeof *weights * per_expert * (size_t)experts);
        all = (moe_ep_expert_weights*)calloc((size_t)experts, sizeof *all);
        memset(&d, 0, sizeof d);
        d.y = (float*)malloc(sizeof *d.y * (size_t)ranks * (size_t)tokens * D_MODEL + 1);
        example_fill(x, (size_t)shards * (size_t)tokens * D_MODEL, 1.0f, &seed);
        example_fill(router, (size_t)experts * D_MODEL, 0.2f, &seed);
        example_fill(weights, per_expert * (size_t)experts, 1.0f / D_MODEL, &seed);
        for (e = 0; e < experts; ++e) {
            all[e].w1 = weights + (size_t)e * per_expert;
            all[e].w3 = all[e].w1 + (size_t)D_MODEL * D_FF;
            all[e].w2 = all[e].w3 + (size_t)D_MODEL * D_FF;
        }
        memset(d.y, 0xFF, sizeof *d.y * (size_t)ranks * (size_t)tokens * D_MODEL);
        d.layout = layout; d.tokens = tokens; d.x = x; d.router = router; d.experts = all;

        moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = ranks, .timeout_ms = 60000 }, &world);
        res = moe_ep_pthreads_run(world, rank_main, &d, NULL);
        moe_ep_pthreads_world_destroy(world);
        if (res != MOE_EP_OK) {
            printf("  layer on %d ranks failed: %s %s\n", ranks, moe_ep_result_string(res), d.error);
            failures++;
        } else {
            /* one rank, every expert, every shard's tokens */
            res = moe_ep_create(&(moe_ep_desc){ .d_model = D_MODEL, .d_ff = D_FF, .num_experts = experts, .top_k = TOP_K,
                                                .normalize_topk = true, .num_threads = 1, .router_weight = router,
                                                .experts = all }, &single);
            if (res == MOE_EP_OK)
                res = moe_ep_forward(single, &(moe_ep_forward_args){ .tokens = (int64_t)shards * tokens, .x = x, .y = y_ref });
            moe_ep_destroy(single);
            for (r = 0; r < ranks && res == MOE_EP_OK; ++r) {
                const float* got = d.y + (size_t)r * (size_t)tokens * D_MODEL;
                const float* want = y_ref + (size_t)shard_of(&layout, r) * (size_t)tokens * D_MODEL;
                moe_ep_coords co;
                size_t k, n = (size_t)tokens * D_MODEL;
                if (memcmp(got, want, sizeof *got * n) != 0) bitwise = 0;
                for (k = 0; k < n; ++k) {
                    double diff = fabs((double)got[k] - (double)want[k]);
                    if (!(diff <= max_diff)) max_diff = diff;   /* NaN (an unwritten element) wins */
                    if (fabs((double)want[k]) > max_ref) max_ref = fabs((double)want[k]);
                }
                moe_ep_layout_coords(&layout, r, &co);
                if (co.tp > 0) {
                    const float* first = d.y + (size_t)(r - co.tp) * (size_t)tokens * D_MODEL;
                    if (memcmp(got, first, sizeof *got * n) != 0) tp_consistent = 0;
                }
            }
            if (res != MOE_EP_OK) {
                printf("  one-rank reference failed: %s\n", moe_ep_result_string(res));
                failures++;
            } else if (layout.tp_size == 1) {
                printf("  output vs 1 rank: %s\n", bitwise ? "bitwise identical" : "DIFFERENT");
                failures += !bitwise;
            } else {
                double rel = max_ref > 0 ? max_diff / max_ref : max_diff;
                int ok = rel <= 1e-6 && tp_consistent;
                printf("  output vs 1 rank: %s, max |diff| / max |ref| = %.2e (limit 1e-6); "
                       "TP ranks of a group %s\n", bitwise ? "bitwise identical" : "not bitwise (TP sums slices)", rel,
                       tp_consistent ? "bitwise identical" : "DIFFER");
                failures += !ok;
            }
        }
        free(x); free(y_ref); free(router); free(weights); free(all); free(d.y);
    }
    printf("\n%s\n", failures ? "FAILED" : "all layouts agree with the single-rank run");
    return failures ? 1 : 0;
}
