/* mpi_demo -- the seed demo over MPI: 64 experts on 8 ranks, top-2, one rank per process.

   Each process routes its own tokens; the dispatch all-to-all sends every token to the
   processes of its two experts, the experts run, and the combine all-to-all brings the
   results back. Rank 0 gathers the output, runs the same layer on one rank over all
   tokens (the built-in single-rank transport) and checks that the two are bitwise
   identical. Inputs are the seed demo's, so both demos print the same tables.

       mpirun -n 8 ./mpi_demo            (--ranks must match the number of processes)

   ./mpi_demo --help for the flags. Exit status: 0 when the outputs match. */
#define _POSIX_C_SOURCE 200112L   /* clock_gettime */
#define MOE_EP_IMPLEMENTATION
#include "../transports/moe_ep_mpi.h"
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

/* v[i] = draw (first + i) of the stream that starts at `seed`, so that a process can
   draw its own slice of the inputs rank 0 draws whole. */
static void demo_fill(float* v, size_t n, float scale, unsigned long long seed, size_t first) {
    unsigned long long s = example_skip(seed, (unsigned long long)first);
    example_fill(v, n, scale, &s);
}

static double demo_wall(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Waits for a nonblocking call without spinning: on a machine with fewer cores than
   processes, ranks spinning in MPI would slow down rank 0's one-rank check. */
static void demo_wait_quietly(MPI_Request* request) {
    int done = 0;
    struct timespec pause = { 0, 1000000 };
    for (;;) {
        MPI_Test(request, &done, MPI_STATUS_IGNORE);
        if (done) return;
        nanosleep(&pause, NULL);
    }
}

static void usage(FILE* f) {
    fprintf(f,
        "usage: mpirun -n N mpi_demo [options]\n"
        "  --ranks N        ranks (MPI processes; must equal mpirun's -n)  default 8\n"
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

/* 1: run, 0: bad flags, -1: --help. Messages only on rank 0 (`talk`). */
static int parse_options(int argc, char** argv, demo_options* o, int talk) {
    int i;
    o->ranks = 8; o->experts = 64; o->top_k = 2; o->tokens_per_rank = 256; o->d_model = 256; o->d_ff = 512;
    o->threads = 0; o->capacity = 0.0f; o->placement = MOE_EP_PLACEMENT_CONTIGUOUS; o->seed = 1;
    for (i = 1; i < argc; i += 2) {
        const char* a = argv[i];
        const char* v = i + 1 < argc ? argv[i + 1] : NULL;
        int ok = 1;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) { if (talk) usage(stdout); return -1; }
        if (!v) { if (talk) fprintf(stderr, "mpi_demo: %s needs a value\n", a); return 0; }
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
        } else { if (talk) fprintf(stderr, "mpi_demo: unknown flag %s\n", a); return 0; }
        if (!ok) { if (talk) fprintf(stderr, "mpi_demo: bad value for %s: %s\n", a, v); return 0; }
    }
    if (o->top_k > o->experts) {
        if (talk) fprintf(stderr, "mpi_demo: --top-k (%d) must be <= --experts (%d)\n", o->top_k, o->experts);
        return 0;
    }
    return 1;
}

/* The layer on this rank, stage by stage (so that the plan's traffic can be shown).
   Returns the result; traffic/load/aux are this rank's figures. */
static moe_ep_result demo_layer(const demo_options* o, const moe_ep_transport* t, const float* x, float* y,
                                const float* router, const moe_ep_expert_weights* mine, int mine_count,
                                int64_t* traffic, int64_t* load, double* aux) {
    int64_t T = o->tokens_per_rank;
    moe_ep_context* ctx = NULL;
    moe_ep_plan* plan = NULL;
    moe_ep_plan_info info;
    moe_ep_router_stats stats;
    int32_t* idx = (int32_t*)malloc(sizeof *idx * (size_t)(T * o->top_k + 1));
    float* weight = (float*)malloc(sizeof *weight * (size_t)(T * o->top_k + 1));
    int64_t* counts = (int64_t*)calloc((size_t)o->experts, sizeof *counts);
    float *rows = NULL, *out = NULL;
    moe_ep_result res;
    res = moe_ep_create(&(moe_ep_desc){
        .d_model = o->d_model, .d_ff = o->d_ff, .num_experts = o->experts, .top_k = o->top_k,
        .normalize_topk = true, .capacity_factor = o->capacity, .placement = { .kind = o->placement },
        .num_threads = o->threads, .router_weight = router, .experts = mine, .experts_count = mine_count,
        .transport = t,
    }, &ctx);
    if (res != MOE_EP_OK) {
        fprintf(stderr, "mpi_demo: rank %d: moe_ep_create: %s\n", t->rank, moe_ep_result_string(res));
        free(idx); free(weight); free(counts);
        return res;
    }
    stats.tokens_per_expert = counts;
    /* Routing is local; if it failed here, a negative token count makes plan_create fail
       on this rank and tell the others, so that every rank returns an error. */
    res = moe_ep_route(ctx, x, T, idx, weight, &stats);
    res = moe_ep_plan_create(ctx, res == MOE_EP_OK ? T : -1, idx, weight, &plan);
    if (res == MOE_EP_OK) {
        info = moe_ep_plan_query(plan);
        rows = (float*)malloc(sizeof *rows * (size_t)(info.recv_rows * o->d_model + 1));
        out = (float*)malloc(sizeof *out * (size_t)(info.recv_rows * o->d_model + 1));
        res = moe_ep_dispatch(ctx, plan, x, rows);
    }
    if (res == MOE_EP_OK) {
        moe_ep_result experts = moe_ep_experts(ctx, plan, rows, out);
        res = moe_ep_combine(ctx, plan, experts == MOE_EP_OK ? out : NULL, y);
        if (experts != MOE_EP_OK) res = experts;
    }
    if (res == MOE_EP_OK) {
        memcpy(traffic, info.send_counts, sizeof(int64_t) * (size_t)o->ranks);
        memcpy(load, info.expert_kept, sizeof(int64_t) * (size_t)o->experts);
        *aux = stats.aux_loss;
    } else {
        fprintf(stderr, "mpi_demo: rank %d: %s: %s\n", t->rank, moe_ep_result_string(res), moe_ep_last_error(ctx));
    }
    moe_ep_plan_destroy(plan);
    moe_ep_destroy(ctx);
    free(idx); free(weight); free(counts); free(rows); free(out);
    return res;
}

int main(int argc, char** argv) {
    demo_options o;
    moe_ep_transport transport;
    moe_ep_expert_weights* mine = NULL;
    int mine_count = 0;
    float *x = NULL, *y = NULL, *router = NULL, *weights = NULL;
    int64_t *traffic = NULL, *load = NULL, *all_traffic = NULL, *all_load = NULL;
    double *all_aux = NULL, aux = 0.0, t0, t_multi = 0.0;
    int *owner = NULL, rank, size, parsed, r, p, i, e, held = 0, identical = 0, status;
    size_t per_expert, T_total, T_mine, d;
    moe_ep_result res;

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    parsed = parse_options(argc, argv, &o, rank == 0);
    if (parsed <= 0) {
        if (parsed == 0 && rank == 0) usage(stderr);
        MPI_Finalize();
        return parsed == 0 ? 2 : 0;
    }
    if (size != o.ranks) {
        if (rank == 0)
            fprintf(stderr, "mpi_demo: --ranks is %d but MPI started %d process(es): run `mpirun -n %d` (or pass "
                            "--ranks %d); a launcher of another MPI starts single processes\n",
                    o.ranks, size, o.ranks, size);
        MPI_Finalize();
        return 2;
    }
    d = (size_t)o.d_model;
    T_mine = (size_t)o.tokens_per_rank;
    T_total = (size_t)o.ranks * T_mine;
    per_expert = 3 * d * (size_t)o.d_ff;

    /* The seed demo's stream: x of all tokens, then the router, then every expert's
       w1, w3, w2. Rank 0 makes all of it (it runs the one-rank check); the others jump
       to their tokens and experts. */
    owner = (int*)calloc((size_t)o.experts, sizeof *owner);
    router = (float*)malloc(sizeof *router * (size_t)o.experts * d);
    traffic = (int64_t*)calloc((size_t)o.ranks, sizeof *traffic);
    load = (int64_t*)calloc((size_t)o.experts, sizeof *load);
    mine = (moe_ep_expert_weights*)calloc((size_t)o.experts, sizeof *mine);
    x = (float*)malloc(sizeof *x * ((rank == 0 ? T_total : T_mine) * d + 1));
    y = (float*)malloc(sizeof *y * ((rank == 0 ? T_total : T_mine) * d + 1));
    moe_ep_placement_compute(&(moe_ep_placement){ .kind = o.placement }, o.experts, o.ranks, owner);
    for (e = 0; e < o.experts; ++e) held += rank == 0 || owner[e] == rank;
    weights = (float*)malloc(sizeof *weights * (per_expert * (size_t)held + 1));
    if (!owner || !router || !traffic || !load || !mine || !x || !y || !weights) {
        fprintf(stderr, "mpi_demo: rank %d: out of memory\n", rank);
        MPI_Abort(MPI_COMM_WORLD, 1);   /* the demo's own choice; the library never aborts */
    }
    demo_fill(x, (rank == 0 ? T_total : T_mine) * d, 1.0f, o.seed, (rank == 0 ? 0 : (size_t)rank * T_mine) * d);
    demo_fill(router, (size_t)o.experts * d, 1.0f / (float)o.d_model, o.seed, T_total * d);
    for (e = 0, i = 0; e < o.experts; ++e) {
        if (rank != 0 && owner[e] != rank) continue;
        demo_fill(weights + (size_t)i * per_expert, per_expert, 1.0f / (float)o.d_model, o.seed,
                  T_total * d + (size_t)o.experts * d + (size_t)e * per_expert);
        mine[i].w1 = weights + (size_t)i * per_expert;
        mine[i].w3 = mine[i].w1 + d * (size_t)o.d_ff;
        mine[i].w2 = mine[i].w3 + d * (size_t)o.d_ff;
        ++i;
    }
    mine_count = rank == 0 ? o.experts : i;    /* rank 0 holds every expert, by global id; the others their own */
    memset(y, 0xFF, sizeof *y * ((rank == 0 ? T_total : T_mine) * d + 1));   /* NaN poison */

    if (rank == 0) {
        printf("moe_ep MPI demo: %d experts on %d ranks (MPI processes), top-%d, %d tokens per rank, d_model %d, "
               "d_ff %d, capacity %s\n\n", o.experts, o.ranks, o.top_k, o.tokens_per_rank, o.d_model, o.d_ff,
               o.capacity > 0 ? "limited" : "dropless");
        printf("placement (%s): rank -> experts\n", o.placement == MOE_EP_PLACEMENT_ROUND_ROBIN ? "round-robin" : "contiguous");
        for (r = 0; r < o.ranks; ++r) {
            int n = 0;
            printf("  rank %2d:", r);
            for (i = 0; i < o.experts; ++i)
                if (owner[i] == r) { printf(" %d", i); ++n; }
            printf("   (%d experts)\n", n);
        }
        fflush(stdout);
    }

    res = moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD,
                                                          .logger = { moe_ep_log_stderr, NULL } }, &transport);
    if (res != MOE_EP_OK) {
        fprintf(stderr, "mpi_demo: rank %d: moe_ep_mpi_transport_create: %s\n", rank, moe_ep_result_string(res));
        MPI_Finalize();
        return 1;
    }
    if (rank == 0) {
        /* rank 0's layer input is its slice; its experts are the first ones it holds */
        for (e = 0, i = 0, p = 0; e < o.experts; ++e)
            if (owner[e] == 0) mine[p++] = mine[e];
    }
    MPI_Barrier(MPI_COMM_WORLD);
    t0 = demo_wall();
    res = demo_layer(&o, &transport, x, y, router, mine, mine_count, traffic, load, &aux);
    MPI_Barrier(MPI_COMM_WORLD);
    t_multi = demo_wall() - t0;
    moe_ep_mpi_transport_destroy(&transport);
    status = res == MOE_EP_OK ? 0 : 1;
    MPI_Allreduce(MPI_IN_PLACE, &status, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (status != 0) {
        if (rank == 0) fprintf(stderr, "mpi_demo: the %d-rank layer failed\n", o.ranks);
        MPI_Finalize();
        return 1;
    }

    if (rank == 0) {
        all_traffic = (int64_t*)malloc(sizeof(int64_t) * (size_t)o.ranks * (size_t)o.ranks);
        all_load = (int64_t*)calloc((size_t)o.experts, sizeof(int64_t));
        all_aux = (double*)malloc(sizeof(double) * (size_t)o.ranks);
    }
    MPI_Gather(traffic, o.ranks, MPI_INT64_T, all_traffic, o.ranks, MPI_INT64_T, 0, MPI_COMM_WORLD);
    MPI_Reduce(load, all_load, o.experts, MPI_INT64_T, MPI_SUM, 0, MPI_COMM_WORLD);
    MPI_Gather(&aux, 1, MPI_DOUBLE, all_aux, 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
    {
        /* the output rows, counted in rows of d floats so that counts stay small */
        MPI_Datatype row;
        MPI_Type_contiguous(o.d_model, MPI_FLOAT, &row);
        MPI_Type_commit(&row);
        if (rank == 0)
            MPI_Gather(MPI_IN_PLACE, (int)T_mine, row, y, (int)T_mine, row, 0, MPI_COMM_WORLD);
        else
            MPI_Gather(y, (int)T_mine, row, NULL, (int)T_mine, row, 0, MPI_COMM_WORLD);
        MPI_Type_free(&row);
    }

    if (rank == 0) {
        moe_ep_context* single = NULL;
        float* y1 = (float*)malloc(sizeof *y1 * (T_total * d + 1));
        double t_single;
        long long max = 0, sum = 0;
        double mean_aux = 0.0;
        printf("\ntoken traffic: rows sent from rank (row) to rank (column)\n        ");
        for (p = 0; p < o.ranks; ++p) printf(" %6d", p);
        printf("\n");
        for (r = 0; r < o.ranks; ++r) {
            printf("  %4d: ", r);
            for (p = 0; p < o.ranks; ++p) printf(" %6lld", (long long)all_traffic[r * o.ranks + p]);
            printf("\n");
        }
        printf("\nload per expert (assignments, all ranks):\n");
        for (i = 0; i < o.experts; ++i) {
            long long n = (long long)all_load[i];
            printf("  %3d:%5lld", i, n);
            if (i % 8 == 7 || i == o.experts - 1) printf("\n");
            max = n > max ? n : max;
            sum += n;
        }
        for (r = 0; r < o.ranks; ++r) mean_aux += all_aux[r] / o.ranks;
        printf("imbalance (max / mean): %.3f   aux loss (E * sum f_i P_i, mean over ranks): %.4f\n",
               sum > 0 ? (double)max / ((double)sum / o.experts) : 0.0, mean_aux);
        printf("\n%d ranks: %.3f s, %.0f tokens/s\n", o.ranks, t_multi, t_multi > 0 ? (double)T_total / t_multi : 0.0);

        /* The same layer on one rank over all tokens: the built-in single-rank transport. */
        for (e = 0; e < o.experts; ++e) {
            mine[e].w1 = weights + (size_t)e * per_expert;
            mine[e].w3 = mine[e].w1 + d * (size_t)o.d_ff;
            mine[e].w2 = mine[e].w3 + d * (size_t)o.d_ff;
        }
        memset(y1, 0xFF, sizeof *y1 * (T_total * d + 1));
        t0 = demo_wall();
        res = moe_ep_create(&(moe_ep_desc){
            .d_model = o.d_model, .d_ff = o.d_ff, .num_experts = o.experts, .top_k = o.top_k, .normalize_topk = true,
            .capacity_factor = o.capacity, .num_threads = o.threads, .router_weight = router, .experts = mine,
            .experts_count = o.experts,
        }, &single);
        if (res == MOE_EP_OK)
            res = moe_ep_forward(single, &(moe_ep_forward_args){ .tokens = (int64_t)T_total, .x = x, .y = y1 });
        t_single = demo_wall() - t0;
        if (res != MOE_EP_OK) {
            fprintf(stderr, "mpi_demo: the one-rank layer failed: %s: %s\n", moe_ep_result_string(res),
                    moe_ep_last_error(single));
        } else {
            printf("1 rank:  %.3f s, %.0f tokens/s\n", t_single, t_single > 0 ? (double)T_total / t_single : 0.0);
            identical = memcmp(y, y1, sizeof *y * T_total * d) == 0;
            if (o.capacity > 0)
                printf("\n(with a capacity factor each rank applies the limit to its own tokens, so %d ranks and 1 rank "
                       "may drop different assignments)\n", o.ranks);
            printf("\noutput of %d ranks vs 1 rank: %s\n", o.ranks, identical ? "bitwise identical" : "DIFFERENT");
        }
        moe_ep_destroy(single);
        free(y1);
        status = res == MOE_EP_OK && (identical || o.capacity > 0) ? 0 : 1;
    }
    {
        MPI_Request request;
        MPI_Ibcast(&status, 1, MPI_INT, 0, MPI_COMM_WORLD, &request);
        demo_wait_quietly(&request);
    }
    free(x); free(y); free(router); free(weights); free(mine); free(owner);
    free(traffic); free(load); free(all_traffic); free(all_load); free(all_aux);
    MPI_Finalize();
    return status;
}
