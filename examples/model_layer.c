/* model_layer -- one MoE layer of a Hugging Face checkpoint on N ranks.

   Every rank opens the model directory and loads layer L for itself: the router, the shared
   experts and its own experts, nothing more (moe_ep_safetensors.h). The ranks then run the
   layer on T tokens split between them, and rank 0 prints the family and config, the
   placement, the traffic matrix (rows each rank sends to each rank), the expert load and its
   imbalance, and the time per layer. With --check REF the input is REF's and the output is
   compared with REF's (a reference.safetensors as tests/data/gen_models.py writes it).

       ./model_layer MODEL_DIR --layer L --ranks N [--tokens T] [--check REF]
       mpirun -n N ./model_layer_mpi MODEL_DIR --layer L --ranks N --transport mpi

   Exit status: 0, or 1 on an error or a failed check. */
#define _POSIX_C_SOURCE 200809L   /* clock_gettime */
#define MOE_EP_IMPLEMENTATION
#ifdef MODEL_LAYER_MPI
#include "../transports/moe_ep_mpi.h"
#endif
#include "../transports/moe_ep_pthreads.h"
#include "../moe_ep_safetensors.h"
#include "example_util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_RANKS 64

typedef struct options {
    const char* dir;
    const char* check;
    int layer, ranks, tokens, reps, threads;
    bool mpi;
    double tolerance;
} options;

/* What the ranks share (pthreads) or send to rank 0 (MPI). */
typedef struct job {
    options opt;
    int d_model, top_k, num_experts;
    const float* x;                 /* [tokens, d] */
    float* y;                       /* [tokens, d] */
    int32_t* topk_idx;              /* [tokens, k] */
    float* topk_weight;             /* [tokens, k] */
    double seconds[MAX_RANKS];      /* mean time of one forward per rank */
    double load_seconds[MAX_RANKS];
    unsigned long long bytes_read[MAX_RANKS];
    moe_ep_result result[MAX_RANKS];
    char error[MAX_RANKS][512];
} job;

static double wall(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void share(int tokens, int ranks, int rank, int* first, int* count) {
    *first = (int)((long long)tokens * rank / ranks);
    *count = (int)((long long)tokens * (rank + 1) / ranks) - *first;
}

/* One rank: load its layer, run its tokens once (output and routing kept), then reps times. */
static moe_ep_result rank_main(const moe_ep_transport* transport, void* user_data) {
    job* J = (job*)user_data;
    int rank = transport->rank, first, count, i;
    char* err = J->error[rank];
    moe_ep_model* model = NULL;
    moe_ep_model_layer* layer = NULL;
    moe_ep_context* ctx = NULL;
    moe_ep_desc d;
    moe_ep_result r;
    double t0 = wall();
    r = moe_ep_model_open(&(moe_ep_model_desc){ .path = J->opt.dir }, &model, err, 512);
    if (r == MOE_EP_OK)
        r = moe_ep_model_load_layer(model, &(moe_ep_model_layer_desc){ .layer = J->opt.layer, .rank = rank,
                                                                        .world_size = J->opt.ranks }, &layer, err, 512);
    moe_ep_model_close(model);
    J->load_seconds[rank] = wall() - t0;
    if (r == MOE_EP_OK) {
        J->bytes_read[rank] = (unsigned long long)moe_ep_model_layer_bytes_read(layer);
        d = moe_ep_model_layer_query(layer);
        d.transport = transport;
        d.num_threads = J->opt.threads;
        d.logger.func = moe_ep_log_stderr;
        r = moe_ep_create(&d, &ctx);
        moe_ep_model_layer_free(layer);
        if (r != MOE_EP_OK) snprintf(err, 512, "moe_ep_create: %s", moe_ep_result_string(r));
    }
    share(J->opt.tokens, J->opt.ranks, rank, &first, &count);
    if (r == MOE_EP_OK) {
        r = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = count, .x = J->x + (size_t)first * J->d_model,
                                                        .y = J->y + (size_t)first * J->d_model,
                                                        .topk_idx = J->topk_idx + (size_t)first * J->top_k,
                                                        .topk_weight = J->topk_weight + (size_t)first * J->top_k });
        if (r != MOE_EP_OK) snprintf(err, 512, "forward: %.480s", moe_ep_last_error(ctx));
    }
    if (r == MOE_EP_OK) {
        float* y = (float*)malloc(sizeof(float) * (size_t)(count > 0 ? count : 1) * (size_t)J->d_model);
        t0 = wall();
        for (i = 0; i < J->opt.reps && r == MOE_EP_OK; ++i)
            r = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = count, .x = J->x + (size_t)first * J->d_model,
                                                            .y = y });
        J->seconds[rank] = (wall() - t0) / (J->opt.reps > 0 ? J->opt.reps : 1);
        free(y);
    }
    moe_ep_destroy(ctx);
    J->result[rank] = r;
    return r;
}

static void usage(FILE* f) {
    fprintf(f, "usage: model_layer MODEL_DIR --layer L --ranks N [--tokens T] [--transport pthreads|mpi]\n"
               "                   [--check REF] [--tolerance E] [--reps N] [--threads N]\n"
               "  MODEL_DIR     config.json + model.safetensors (or the shards of model.safetensors.index.json)\n"
               "  --layer L     the decoder layer (an MoE layer)\n"
               "  --ranks N     ranks (pthreads threads, or MPI processes: equal to mpirun's -n)   default 8\n"
               "  --tokens T    tokens over all ranks (random inputs; with --check: REF's)        default 64\n"
               "  --check REF   reference.safetensors: input layers.L.input, output layers.L.output_f64\n"
               "  --tolerance E max relative error against REF                                    default 1e-5\n"
               "  --reps N      timed forwards after the first                                    default 10\n"
               "  --threads N   OpenMP threads per rank (0: the runtime's share)                  default 0\n");
}

static bool parse(int argc, char** argv, options* o) {
    int i;
    memset(o, 0, sizeof *o);
    o->layer = -1; o->ranks = 8; o->tokens = 64; o->reps = 10; o->tolerance = 1e-5;
    for (i = 1; i < argc; ++i) {
        const char* a = argv[i];
        const char* v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--help") == 0) { usage(stdout); exit(0); }
        if (a[0] != '-') { o->dir = a; continue; }
        if (!v) { fprintf(stderr, "%s needs a value\n", a); return false; }
        ++i;
        if (strcmp(a, "--layer") == 0) o->layer = atoi(v);
        else if (strcmp(a, "--ranks") == 0) o->ranks = atoi(v);
        else if (strcmp(a, "--tokens") == 0) o->tokens = atoi(v);
        else if (strcmp(a, "--reps") == 0) o->reps = atoi(v);
        else if (strcmp(a, "--threads") == 0) o->threads = atoi(v);
        else if (strcmp(a, "--tolerance") == 0) o->tolerance = atof(v);
        else if (strcmp(a, "--check") == 0) o->check = v;
        else if (strcmp(a, "--transport") == 0) {
            if (strcmp(v, "mpi") == 0) o->mpi = true;
            else if (strcmp(v, "pthreads") != 0) { fprintf(stderr, "--transport: pthreads or mpi\n"); return false; }
        } else { fprintf(stderr, "unknown option %s\n", a); return false; }
    }
    if (!o->dir || o->layer < 0 || o->ranks < 1 || o->ranks > MAX_RANKS || o->tokens < 1 || o->reps < 0) {
        usage(stderr);
        return false;
    }
    return true;
}

/* REF's layers.L.<what> as fresh floats or doubles; NULL when absent. */
static void* read_ref(moe_ep_st_file* ref, int layer, const char* what, int64_t* elements, int* dim) {
    char name[96], err[512];
    const moe_ep_st_tensor* t;
    void* out;
    snprintf(name, sizeof name, "layers.%d.%s", layer, what);
    t = moe_ep_st_find(ref, name);
    if (!t || t->ndim != 2) return NULL;
    out = malloc((size_t)t->size);
    if (!out || moe_ep_st_read(ref, t, 0, out, t->size, err, sizeof err) != MOE_EP_OK) { free(out); return NULL; }
    *elements = t->shape[0] * t->shape[1];
    *dim = (int)t->shape[1];
    return out;
}

static const char* family_name(moe_ep_family f) {
    static const char* const names[] = { "none", "Mixtral", "Qwen2-MoE", "Qwen3-MoE", "DeepSeek-V3", "GPT-OSS", "Llama-4" };
    return (int)f >= 0 && f < MOE_EP_FAMILY_COUNT ? names[f] : "?";
}

/* Rank 0's report: config, placement, traffic, load, time, check. Returns the exit status. */
static int report(job* J, const moe_ep_model_info* info, const double* reference) {
    int R = J->opt.ranks, E = J->num_experts, k = J->top_k, T = J->opt.tokens, r, e, t, j;
    int owner[4096];
    long long traffic[MAX_RANKS][MAX_RANKS], load[4096], max_load = 0, rank_rows[MAX_RANKS], max_rows = 0;
    double slowest = 0, load_time = 0;
    unsigned long long read = 0;
    moe_ep_placement placement = { MOE_EP_PLACEMENT_CONTIGUOUS, NULL };
    printf("model     %s: %s (%s), %d layers (%d MoE), d_model %d, %d experts of d_ff %d, top-%d", J->opt.dir,
           family_name(info->family), info->model_type, info->num_layers, info->moe_layers, info->d_model,
           info->num_experts, info->d_ff, info->top_k);
    if (info->shared_d_ff) printf(", shared d_ff %d", info->shared_d_ff);
    printf("; %d file%s%s%s\n", info->files, info->files == 1 ? "" : "s", info->quantization[0] ? ", " : "",
           info->quantization);
    if (E > 4096) { printf("more than 4096 experts: no tables\n"); return 0; }
    moe_ep_placement_compute(&placement, E, R, owner);
    printf("placement contiguous, %d ranks:", R);
    for (r = 0; r < R; ++r) {
        int lo = -1, hi = -1;
        for (e = 0; e < E; ++e) if (owner[e] == r) { if (lo < 0) lo = e; hi = e; }
        printf(" r%d [%d-%d]", r, lo, hi);
    }
    printf("\n");
    memset(traffic, 0, sizeof traffic);
    memset(load, 0, sizeof load);
    for (r = 0; r < R; ++r) {
        int first, count;
        share(T, R, r, &first, &count);
        for (t = first; t < first + count; ++t)
            for (j = 0; j < k; ++j) {
                int x = J->topk_idx[(size_t)t * k + j];
                traffic[r][owner[x]]++;
                load[x]++;
            }
    }
    printf("traffic (rows sent, row = source rank, column = destination rank)\n     ");
    for (r = 0; r < R; ++r) printf(" %6d", r);
    printf("\n");
    memset(rank_rows, 0, sizeof rank_rows);
    for (r = 0; r < R; ++r) {
        int q;
        printf("%4d ", r);
        for (q = 0; q < R; ++q) { printf(" %6lld", traffic[r][q]); rank_rows[q] += traffic[r][q]; }
        printf("\n");
    }
    printf("expert load (assignments):");
    for (e = 0; e < E; ++e) { printf(" %lld", load[e]); if (load[e] > max_load) max_load = load[e]; }
    printf("\n");
    for (r = 0; r < R; ++r) if (rank_rows[r] > max_rows) max_rows = rank_rows[r];
    printf("imbalance: busiest expert %.2f x the mean, busiest rank %.2f x the mean\n",
           (double)max_load * E / ((double)T * k), (double)max_rows * R / ((double)T * k));
    for (r = 0; r < R; ++r) {
        if (J->seconds[r] > slowest) slowest = J->seconds[r];
        if (J->load_seconds[r] > load_time) load_time = J->load_seconds[r];
        read += J->bytes_read[r];
    }
    printf("load: %.3f ms (slowest rank), %llu bytes read over all ranks\n", 1e3 * load_time, read);
    printf("time per layer: %.3f ms (slowest rank, mean of %d forwards of %d tokens)\n", 1e3 * slowest, J->opt.reps, T);
    if (reference) {
        double num = 0, den = 0;
        size_t i, n = (size_t)T * J->d_model;
        for (i = 0; i < n; ++i) {
            double dlt = fabs((double)J->y[i] - reference[i]);
            if (!(dlt <= num)) num = dlt;
            if (fabs(reference[i]) > den) den = fabs(reference[i]);
        }
        num = den > 0 ? num / den : num;
        printf("check: relative error %.3g against %s (tolerance %.3g): %s\n", num, J->opt.check, J->opt.tolerance,
               num <= J->opt.tolerance ? "PASSED" : "FAILED");
        return num <= J->opt.tolerance ? 0 : 1;
    }
    return 0;
}

int main(int argc, char** argv) {
    options opt;
    job* J;
    moe_ep_model* model;
    moe_ep_model_info info;
    moe_ep_st_file* ref = NULL;
    double* reference = NULL;
    float* x = NULL;
    char err[512], reason[256];
    int status = 1, rank = 0, world = 1, r;
#ifdef MODEL_LAYER_MPI
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world);
#endif
    if (!parse(argc, argv, &opt)) goto out;
#ifndef MODEL_LAYER_MPI
    if (opt.mpi) { fprintf(stderr, "--transport mpi: run model_layer_mpi (built with mpicc) under mpirun\n"); goto out; }
#else
    if (opt.mpi && world != opt.ranks) {
        if (rank == 0) fprintf(stderr, "--ranks %d but %d MPI processes\n", opt.ranks, world);
        goto out;
    }
#endif
    if (moe_ep_model_open(&(moe_ep_model_desc){ .path = opt.dir }, &model, err, sizeof err) != MOE_EP_OK) {
        fprintf(stderr, "%s\n", err);
        goto out;
    }
    info = moe_ep_model_query(model);
    if (!moe_ep_model_layer_is_moe(model, opt.layer, reason, sizeof reason)) {
        fprintf(stderr, "%s: %s\n", opt.dir, reason);
        moe_ep_model_close(model);
        goto out;
    }
    moe_ep_model_close(model);
    if (opt.check) {
        int64_t n = 0, m = 0;
        int d = 0, d2 = 0;
        if (moe_ep_st_open(opt.check, NULL, NULL, &ref, err, sizeof err) != MOE_EP_OK) { fprintf(stderr, "%s\n", err); goto out; }
        x = (float*)read_ref(ref, opt.layer, "input", &n, &d);
        reference = (double*)read_ref(ref, opt.layer, "output_f64", &m, &d2);
        moe_ep_st_close(ref);
        if (!x || !reference || n != m || d != info.d_model) {
            fprintf(stderr, "%s: no layers.%d.input / output_f64 of d_model %d\n", opt.check, opt.layer, info.d_model);
            goto out;
        }
        opt.tokens = (int)(n / d);
    } else {
        unsigned long long seed = 42;
        x = (float*)malloc(sizeof(float) * (size_t)opt.tokens * (size_t)info.d_model);
        example_fill(x, (size_t)opt.tokens * (size_t)info.d_model, 1.0f, &seed);
    }
    J = (job*)calloc(1, sizeof *J);
    J->opt = opt;
    J->d_model = info.d_model;
    J->top_k = info.top_k;
    J->num_experts = info.num_experts;
    J->x = x;
    J->y = (float*)calloc((size_t)opt.tokens * (size_t)info.d_model, sizeof(float));
    J->topk_idx = (int32_t*)calloc((size_t)opt.tokens * (size_t)info.top_k, sizeof(int32_t));
    J->topk_weight = (float*)calloc((size_t)opt.tokens * (size_t)info.top_k, sizeof(float));
#ifdef MODEL_LAYER_MPI
    if (opt.mpi) {
        moe_ep_transport transport;
        int first, count;
        int* counts = (int*)malloc(sizeof(int) * (size_t)world * 2);
        if (moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD }, &transport) != MOE_EP_OK) goto out;
        rank_main(&transport, J);
        moe_ep_mpi_transport_destroy(&transport);
        share(opt.tokens, world, rank, &first, &count);
        /* rank 0 gathers the outputs, the routing, the times */
        for (r = 0; r < world; ++r) { int f, c; share(opt.tokens, world, r, &f, &c); counts[r] = c * info.d_model; counts[world + r] = f * info.d_model; }
        MPI_Gatherv(rank ? J->y + (size_t)first * info.d_model : MPI_IN_PLACE, count * info.d_model, MPI_FLOAT, J->y, counts,
                    counts + world, MPI_FLOAT, 0, MPI_COMM_WORLD);
        for (r = 0; r < world; ++r) { int f, c; share(opt.tokens, world, r, &f, &c); counts[r] = c * info.top_k; counts[world + r] = f * info.top_k; }
        MPI_Gatherv(rank ? J->topk_idx + (size_t)first * info.top_k : MPI_IN_PLACE, count * info.top_k, MPI_INT,
                    J->topk_idx, counts, counts + world, MPI_INT, 0, MPI_COMM_WORLD);
        MPI_Gather(&J->seconds[rank], 1, MPI_DOUBLE, J->seconds, 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
        MPI_Gather(&J->load_seconds[rank], 1, MPI_DOUBLE, J->load_seconds, 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
        MPI_Gather(&J->bytes_read[rank], 1, MPI_UNSIGNED_LONG_LONG, J->bytes_read, 1, MPI_UNSIGNED_LONG_LONG, 0, MPI_COMM_WORLD);
        MPI_Gather(&J->result[rank], 1, MPI_INT, J->result, 1, MPI_INT, 0, MPI_COMM_WORLD);
        free(counts);
    } else
#endif
    {
        moe_ep_pthreads_world* pw;
        if (rank == 0) {
            if (moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = opt.ranks, .timeout_ms = 120000 }, &pw)
                != MOE_EP_OK) goto out;
            moe_ep_pthreads_run(pw, rank_main, J, NULL);
            moe_ep_pthreads_world_destroy(pw);
        }
    }
    if (rank != 0) status = J->result[rank] == MOE_EP_OK ? 0 : 1;   /* rank 0 reports */
    if (rank == 0) {
        status = 0;
        for (r = 0; r < opt.ranks; ++r)
            if (J->result[r] != MOE_EP_OK) {
                fprintf(stderr, "rank %d: %s: %s\n", r, moe_ep_result_string(J->result[r]), J->error[r]);
                status = 1;
            }
        if (status == 0) status = report(J, &info, reference);
    }
    free(J->y);
    free(J->topk_idx);
    free(J->topk_weight);
    free(J);
out:
    free(x);
    free(reference);
#ifdef MODEL_LAYER_MPI
    MPI_Finalize();
#endif
    (void)world;
    return status;
}
