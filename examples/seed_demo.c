/* seed_demo -- the classic expert-parallel MoE layer: 64 experts on 8 ranks, top-2.

   Every rank is a thread (the pthreads transport). Each routes its own tokens, the
   dispatch all-to-all sends every token to the ranks of its two experts, the experts
   run, and the combine all-to-all brings the results back. The same layer then runs
   on one rank over all tokens, and the outputs must be bitwise identical.

   ./seed_demo --help for the flags. Exit status: 0 when the outputs match. */
#define _POSIX_C_SOURCE 200112L   /* clock_gettime */
#define MOE_EP_IMPLEMENTATION
#include "../transports/moe_ep_pthreads.h"
#include "example_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct demo_options {
    int ranks, experts, top_k, tokens_per_rank, d_model, d_ff, threads;
    float capacity;
    moe_ep_placement_kind placement;
    unsigned long long seed;
} demo_options;

typedef struct demo_state {
    demo_options opt;
    const float* x;                 /* [ranks * tokens_per_rank, d_model] */
    float* y;                       /* the same shape, filled by the ranks */
    const float* router;            /* [experts, d_model] */
    const moe_ep_expert_weights* experts;  /* [experts], global */
    int64_t* traffic;               /* [ranks * ranks] rows sent from row-rank to column-rank */
    int64_t* load;                  /* [ranks * experts] assignments per expert, per source rank */
    double* aux_loss;               /* [ranks] */
    double* layer_seconds;          /* [ranks] route to combine, without create */
    int* owner;                     /* [experts] */
    char errors[8][640];
} demo_state;

static double demo_wall(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static moe_ep_result demo_rank(const moe_ep_transport* transport, void* user_data) {
    demo_state* st = (demo_state*)user_data;
    const demo_options* o = &st->opt;
    int rank = transport->rank, l, R = o->ranks;
    int64_t T = o->tokens_per_rank;
    moe_ep_context* ctx = NULL;
    moe_ep_plan* plan = NULL;
    moe_ep_expert_weights* mine = NULL;
    int32_t* idx = NULL;
    float *weight = NULL, *rows = NULL, *out = NULL;
    int64_t* counts = NULL;
    moe_ep_router_stats stats;
    moe_ep_plan_info info;
    moe_ep_result res;
    int experts_here = 0, e;
    const float* x = st->x + (size_t)rank * (size_t)T * (size_t)o->d_model;
    float* y = st->y + (size_t)rank * (size_t)T * (size_t)o->d_model;

    /* A rank is given only its own experts' weights. */
    for (e = 0; e < o->experts; ++e) experts_here += st->owner[e] == rank;
    mine = (moe_ep_expert_weights*)calloc((size_t)(experts_here > 0 ? experts_here : 1), sizeof *mine);
    for (e = 0, l = 0; e < o->experts; ++e)
        if (st->owner[e] == rank) mine[l++] = st->experts[e];
    res = moe_ep_create(&(moe_ep_desc){
        .d_model = o->d_model, .d_ff = o->d_ff, .num_experts = o->experts, .top_k = o->top_k,
        .normalize_topk = true, .capacity_factor = o->capacity, .placement = { .kind = o->placement },
        .num_threads = o->threads, .router_weight = st->router, .experts = mine,
        .experts_count = experts_here, .transport = transport,
    }, &ctx);
    if (res != MOE_EP_OK) {
        snprintf(st->errors[rank % 8], sizeof st->errors[0], "rank %d: moe_ep_create: %s", rank, moe_ep_result_string(res));
        free(mine);
        return res;
    }
    idx = (int32_t*)malloc(sizeof *idx * (size_t)(T * o->top_k + 1));
    weight = (float*)malloc(sizeof *weight * (size_t)(T * o->top_k + 1));
    counts = (int64_t*)calloc((size_t)o->experts, sizeof *counts);
    stats.tokens_per_expert = counts;
    /* The stages one by one, so that the plan's traffic can be shown. */
    st->layer_seconds[rank] = -demo_wall();
    res = moe_ep_route(ctx, x, T, idx, weight, &stats);
    if (res == MOE_EP_OK) res = moe_ep_plan_create(ctx, T, idx, weight, &plan);
    if (res == MOE_EP_OK) {
        info = moe_ep_plan_query(plan);
        rows = (float*)malloc(sizeof *rows * (size_t)(info.recv_rows * o->d_model + 1));
        out = (float*)malloc(sizeof *out * (size_t)(info.recv_rows * o->d_model + 1));
        res = moe_ep_dispatch(ctx, plan, x, rows);
    }
    if (res == MOE_EP_OK) res = moe_ep_experts(ctx, plan, rows, out);
    if (res == MOE_EP_OK) res = moe_ep_combine(ctx, plan, out, y);
    st->layer_seconds[rank] += demo_wall();
    if (res == MOE_EP_OK) {
        int p;
        for (p = 0; p < R; ++p) st->traffic[rank * R + p] = info.send_counts[p];
        memcpy(st->load + (size_t)rank * (size_t)o->experts, info.expert_kept, sizeof(int64_t) * (size_t)o->experts);
        st->aux_loss[rank] = stats.aux_loss;
    } else {
        snprintf(st->errors[rank % 8], sizeof st->errors[0], "rank %d: %s: %s", rank, moe_ep_result_string(res),
                 moe_ep_last_error(ctx));
    }
    moe_ep_plan_destroy(plan);
    moe_ep_destroy(ctx);
    free(mine); free(idx); free(weight); free(counts); free(rows); free(out);
    return res;
}

static void usage(FILE* f) {
    fprintf(f,
        "usage: seed_demo [options]\n"
        "  --ranks N        ranks (threads)                 default 8\n"
        "  --experts N      experts                         default 64\n"
        "  --top-k N        experts per token               default 2\n"
        "  --tokens N       tokens per rank                 default 256\n"
        "  --d-model N      model width                     default 256\n"
        "  --d-ff N         expert hidden width             default 512\n"
        "  --capacity F     capacity factor, 0 = dropless   default 0\n"
        "  --placement P    contiguous | round-robin        default contiguous\n"
        "  --threads N      OpenMP threads per rank, 0 = auto  default 0\n"
        "  --seed N         random seed                     default 1\n"
        "  --help           this text\n");
}

static int parse_int(const char* s, int lo, int* out) {
    char* end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < lo || v > 1000000000L) return 0;
    *out = (int)v;
    return 1;
}

static int parse_options(int argc, char** argv, demo_options* o) {
    int i;
    o->ranks = 8; o->experts = 64; o->top_k = 2; o->tokens_per_rank = 256; o->d_model = 256; o->d_ff = 512;
    o->threads = 0; o->capacity = 0.0f; o->placement = MOE_EP_PLACEMENT_CONTIGUOUS; o->seed = 1;
    for (i = 1; i < argc; i += 2) {
        const char* a = argv[i];
        const char* v = i + 1 < argc ? argv[i + 1] : NULL;
        int ok = 1;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) { usage(stdout); exit(0); }
        if (!v) { fprintf(stderr, "seed_demo: %s needs a value\n", a); return 0; }
        if (strcmp(a, "--ranks") == 0) ok = parse_int(v, 1, &o->ranks);
        else if (strcmp(a, "--experts") == 0) ok = parse_int(v, 1, &o->experts);
        else if (strcmp(a, "--top-k") == 0) ok = parse_int(v, 1, &o->top_k);
        else if (strcmp(a, "--tokens") == 0) ok = parse_int(v, 0, &o->tokens_per_rank);
        else if (strcmp(a, "--d-model") == 0) ok = parse_int(v, 1, &o->d_model);
        else if (strcmp(a, "--d-ff") == 0) ok = parse_int(v, 1, &o->d_ff);
        else if (strcmp(a, "--threads") == 0) ok = parse_int(v, 0, &o->threads);
        else if (strcmp(a, "--seed") == 0) { char* end; o->seed = strtoull(v, &end, 10); ok = *v && !*end; }
        else if (strcmp(a, "--capacity") == 0) { char* end; o->capacity = strtof(v, &end); ok = *v && !*end && o->capacity >= 0; }
        else if (strcmp(a, "--placement") == 0) {
            if (strcmp(v, "contiguous") == 0) o->placement = MOE_EP_PLACEMENT_CONTIGUOUS;
            else if (strcmp(v, "round-robin") == 0) o->placement = MOE_EP_PLACEMENT_ROUND_ROBIN;
            else ok = 0;
        } else { fprintf(stderr, "seed_demo: unknown flag %s\n", a); return 0; }
        if (!ok) { fprintf(stderr, "seed_demo: bad value for %s: %s\n", a, v); return 0; }
    }
    if (o->top_k > o->experts) { fprintf(stderr, "seed_demo: --top-k (%d) must be <= --experts (%d)\n", o->top_k, o->experts); return 0; }
    if (o->ranks > 256) { fprintf(stderr, "seed_demo: --ranks must be <= 256\n"); return 0; }
    return 1;
}

int main(int argc, char** argv) {
    demo_options o;
    demo_state st;
    moe_ep_pthreads_world* world = NULL;
    moe_ep_context* single = NULL;
    moe_ep_expert_weights* experts;
    float *x, *y, *y1, *router, *weights;
    size_t per_expert, T_total, e;
    unsigned long long seed;
    double t0, t_multi, t_single;
    int r, p, i, identical;
    moe_ep_result res;

    if (!parse_options(argc, argv, &o)) { usage(stderr); return 2; }
    memset(&st, 0, sizeof st);
    st.opt = o;
    T_total = (size_t)o.ranks * (size_t)o.tokens_per_rank;
    per_expert = 3 * (size_t)o.d_model * (size_t)o.d_ff;
    seed = o.seed;
    x = (float*)malloc(sizeof *x * (T_total * (size_t)o.d_model + 1));
    y = (float*)malloc(sizeof *y * (T_total * (size_t)o.d_model + 1));
    y1 = (float*)malloc(sizeof *y1 * (T_total * (size_t)o.d_model + 1));
    router = (float*)malloc(sizeof *router * (size_t)o.experts * (size_t)o.d_model);
    weights = (float*)malloc(sizeof *weights * per_expert * (size_t)o.experts);
    experts = (moe_ep_expert_weights*)calloc((size_t)o.experts, sizeof *experts);
    st.traffic = (int64_t*)calloc((size_t)o.ranks * (size_t)o.ranks, sizeof(int64_t));
    st.load = (int64_t*)calloc((size_t)o.ranks * (size_t)o.experts, sizeof(int64_t));
    st.aux_loss = (double*)calloc((size_t)o.ranks, sizeof(double));
    st.layer_seconds = (double*)calloc((size_t)o.ranks, sizeof(double));
    st.owner = (int*)calloc((size_t)o.experts, sizeof(int));
    if (!x || !y || !y1 || !router || !weights || !experts || !st.traffic || !st.load || !st.aux_loss || !st.layer_seconds || !st.owner) {
        fprintf(stderr, "seed_demo: out of memory\n");
        return 1;
    }
    example_fill(x, T_total * (size_t)o.d_model, 1.0f, &seed);
    example_fill(router, (size_t)o.experts * (size_t)o.d_model, 1.0f / (float)o.d_model, &seed);
    example_fill(weights, per_expert * (size_t)o.experts, 1.0f / (float)o.d_model, &seed);
    for (e = 0; e < (size_t)o.experts; ++e) {
        experts[e].w1 = weights + e * per_expert;
        experts[e].w3 = experts[e].w1 + (size_t)o.d_model * (size_t)o.d_ff;
        experts[e].w2 = experts[e].w3 + (size_t)o.d_model * (size_t)o.d_ff;
    }
    memset(y, 0xFF, sizeof *y * T_total * (size_t)o.d_model);    /* NaN poison: unwritten rows show */
    memset(y1, 0xFF, sizeof *y1 * T_total * (size_t)o.d_model);
    st.x = x; st.y = y; st.router = router; st.experts = experts;
    moe_ep_placement_compute(&(moe_ep_placement){ .kind = o.placement }, o.experts, o.ranks, st.owner);

    printf("moe_ep seed demo: %d experts on %d ranks, top-%d, %d tokens per rank, d_model %d, d_ff %d, capacity %s\n",
           o.experts, o.ranks, o.top_k, o.tokens_per_rank, o.d_model, o.d_ff, o.capacity > 0 ? "limited" : "dropless");
    printf("expert kernel: %s (chosen for this CPU)\n\n", moe_ep_kernel_path());
    printf("placement (%s): rank -> experts\n", o.placement == MOE_EP_PLACEMENT_ROUND_ROBIN ? "round-robin" : "contiguous");
    for (r = 0; r < o.ranks; ++r) {
        int n = 0;
        printf("  rank %2d:", r);
        for (i = 0; i < o.experts; ++i)
            if (st.owner[i] == r) { printf(" %d", i); ++n; }
        printf("   (%d experts)\n", n);
    }

    if (moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = o.ranks, .timeout_ms = 60000 }, &world) != MOE_EP_OK) {
        fprintf(stderr, "seed_demo: cannot create the pthreads world\n");
        return 1;
    }
    res = moe_ep_pthreads_run(world, demo_rank, &st, NULL);
    for (r = 0, t_multi = 0.0; r < o.ranks; ++r)    /* the slowest rank's layer */
        t_multi = st.layer_seconds[r] > t_multi ? st.layer_seconds[r] : t_multi;
    moe_ep_pthreads_world_destroy(world);
    if (res != MOE_EP_OK) {
        fprintf(stderr, "seed_demo: the %d-rank layer failed: %s\n", o.ranks, moe_ep_result_string(res));
        for (r = 0; r < 8; ++r) if (st.errors[r][0]) fprintf(stderr, "  %s\n", st.errors[r]);
        return 1;
    }

    printf("\ntoken traffic: rows sent from rank (row) to rank (column)\n        ");
    for (p = 0; p < o.ranks; ++p) printf(" %6d", p);
    printf("\n");
    for (r = 0; r < o.ranks; ++r) {
        printf("  %4d: ", r);
        for (p = 0; p < o.ranks; ++p) printf(" %6lld", (long long)st.traffic[r * o.ranks + p]);
        printf("\n");
    }
    {
        long long max = 0, sum = 0;
        double aux = 0.0;
        printf("\nload per expert (assignments, all ranks):\n");
        for (i = 0; i < o.experts; ++i) {
            long long n = 0;
            for (r = 0; r < o.ranks; ++r) n += st.load[(size_t)r * (size_t)o.experts + (size_t)i];
            printf("%s%3d:%5lld", i % 8 == 0 ? "  " : "  ", i, n);
            if (i % 8 == 7 || i == o.experts - 1) printf("\n");
            max = n > max ? n : max;
            sum += n;
        }
        for (r = 0; r < o.ranks; ++r) aux += st.aux_loss[r] / o.ranks;
        printf("imbalance (max / mean): %.3f   aux loss (E * sum f_i P_i, mean over ranks): %.4f\n",
               sum > 0 ? (double)max / ((double)sum / o.experts) : 0.0, aux);
    }
    printf("\nlayer time (route to combine, slowest rank; weights packed at create are not counted)\n");
    printf("%d ranks: %.3f s, %.0f tokens/s\n", o.ranks, t_multi, t_multi > 0 ? (double)T_total / t_multi : 0.0);

    /* The same layer on one rank over all tokens. */
    res = moe_ep_create(&(moe_ep_desc){
        .d_model = o.d_model, .d_ff = o.d_ff, .num_experts = o.experts, .top_k = o.top_k, .normalize_topk = true,
        .capacity_factor = o.capacity, .num_threads = o.threads, .router_weight = router, .experts = experts,
    }, &single);
    t0 = demo_wall();
    if (res == MOE_EP_OK)
        res = moe_ep_forward(single, &(moe_ep_forward_args){ .tokens = (int64_t)T_total, .x = x, .y = y1 });
    t_single = demo_wall() - t0;
    if (res != MOE_EP_OK) {
        fprintf(stderr, "seed_demo: the one-rank layer failed: %s: %s\n", moe_ep_result_string(res), moe_ep_last_error(single));
        return 1;
    }
    moe_ep_destroy(single);
    printf("1 rank:  %.3f s, %.0f tokens/s\n", t_single, t_single > 0 ? (double)T_total / t_single : 0.0);
    identical = memcmp(y, y1, sizeof *y * T_total * (size_t)o.d_model) == 0;
    if (o.capacity > 0)
        printf("\n(with a capacity factor each rank applies the limit to its own tokens, so %d ranks and 1 rank may drop different assignments)\n", o.ranks);
    printf("\noutput fingerprint: %016llx (the same on every machine, compiler and kernel path for these flags)\n",
           example_fingerprint(y, T_total * (size_t)o.d_model));
    printf("\noutput of %d ranks vs 1 rank: %s\n", o.ranks, identical ? "bitwise identical" : "DIFFERENT");
    free(x); free(y); free(y1); free(router); free(weights); free(experts);
    free(st.traffic); free(st.load); free(st.aux_loss); free(st.layer_seconds); free(st.owner);
    return identical || o.capacity > 0 ? 0 : 1;
}
