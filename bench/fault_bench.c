/* fault_bench -- how long the other ranks wait after a rank fault, over MPI.

   mpirun -n R ./fault_bench fail [--reps N]
       The last rank's dispatch fails (x NULL) 200 ms after the others entered theirs; each
       other rank measures from the failing rank's return (MPI_Wtime, one host: the same
       clock) to its own dispatch's return. The layer is retried after every round.
   mpirun --mca orte_abort_on_non_zero_status 0 -n R ./fault_bench kill [--timeout-ms T]
       The last rank kills itself (SIGKILL) 200 ms after the others entered their dispatch;
       the survivors report what their dispatch returned and how long it waited. Without the
       MCA setting mpirun ends the job as soon as a process dies.
   Prints one line per rank and round, and a summary on rank 0 (fail) or per survivor (kill). */
#define _POSIX_C_SOURCE 200112L
#define MOE_EP_IMPLEMENTATION
#include "../transports/moe_ep_mpi.h"
#include "../tests/support/test_support.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define B_D 64
#define B_F 128
#define B_T 32
#define B_K 2

static void pause_ms(int ms) {
    struct timespec t;
    t.tv_sec = ms / 1000;
    t.tv_nsec = (long)(ms % 1000) * 1000000L;
    nanosleep(&t, NULL);
}

static int compare(const void* a, const void* b) {
    double x = *(const double*)a, y = *(const double*)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char** argv) {
    int rank, size, reps = 20, timeout_ms = 1000, kill_mode, i, e, E;
    const char* mode = argc > 1 ? argv[1] : "fail";
    uint64_t seed = 7;
    float *router, *weights, *x, *rows, *out, *y;
    moe_ep_expert_weights* experts;
    int32_t idx[B_T * B_K];
    float weight[B_T * B_K];
    moe_ep_transport t;
    moe_ep_context* ctx = NULL;
    double* waits;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    for (i = 2; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--reps") == 0) reps = atoi(argv[i + 1]);
        if (strcmp(argv[i], "--timeout-ms") == 0) timeout_ms = atoi(argv[i + 1]);
    }
    kill_mode = strcmp(mode, "kill") == 0;
    if (size < 2 || (!kill_mode && strcmp(mode, "fail") != 0)) {
        if (rank == 0) fprintf(stderr, "usage: mpirun -n R (R >= 2) %s fail|kill [--reps N] [--timeout-ms T]\n", argv[0]);
        MPI_Finalize();
        return 2;
    }
    E = 2 * size;
    router = test_random_floats((size_t)E * B_D, 0.3f, seed);
    weights = test_random_floats((size_t)E * 3 * B_D * B_F, 0.1f, seed + 1);
    x = test_random_floats((size_t)B_T * B_D, 1.0f, seed + 2 + (uint64_t)rank);
    rows = (float*)malloc(sizeof(float) * (size_t)(size * B_T * B_K * B_D));
    out = (float*)malloc(sizeof(float) * (size_t)(size * B_T * B_K * B_D));
    y = (float*)malloc(sizeof(float) * B_T * B_D);
    experts = (moe_ep_expert_weights*)calloc(2, sizeof *experts);
    waits = (double*)calloc((size_t)reps, sizeof(double));
    for (e = 0; e < 2; ++e) {
        const float* w = weights + (size_t)(2 * rank + e) * 3 * B_D * B_F;
        experts[e].w1 = w;
        experts[e].w3 = w + B_D * B_F;
        experts[e].w2 = w + 2 * B_D * B_F;
    }
    if (moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD, .timeout_ms = timeout_ms }, &t) != MOE_EP_OK ||
        moe_ep_create(&(moe_ep_desc){ .d_model = B_D, .d_ff = B_F, .num_experts = E, .top_k = B_K, .router_weight = router,
                                      .experts = experts, .experts_count = 2, .transport = &t }, &ctx) != MOE_EP_OK ||
        moe_ep_route(ctx, x, B_T, idx, weight, NULL) != MOE_EP_OK) {
        fprintf(stderr, "rank %d: setup failed\n", rank);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    for (i = 0; i < (kill_mode ? 1 : reps); ++i) {
        moe_ep_plan* plan = NULL;
        moe_ep_result res;
        double entered, returned, failed_at = 0.0;
        int odd = rank == size - 1;
        if (moe_ep_plan_create(ctx, B_T, idx, weight, &plan) != MOE_EP_OK) {
            fprintf(stderr, "rank %d: plan_create failed: %s\n", rank, moe_ep_last_error(ctx));
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
        MPI_Barrier(MPI_COMM_WORLD);
        entered = MPI_Wtime();
        if (odd) {
            pause_ms(200);
            if (kill_mode) raise(SIGKILL);
            res = moe_ep_dispatch(ctx, plan, NULL, rows);
        } else {
            res = moe_ep_dispatch(ctx, plan, x, rows);
        }
        returned = MPI_Wtime();
        if (kill_mode) {
            printf("rank %d: dispatch returned %s after %.1f ms (the peer died 200 ms in; timeout %d ms): %s\n", rank,
                   moe_ep_result_string(res), 1e3 * (returned - entered), timeout_ms, moe_ep_last_error(ctx));
            fflush(stdout);
            _exit(res == MOE_EP_ERROR_TIMEOUT ? 0 : 1);    /* MPI cannot be finalised without the dead rank */
        }
        moe_ep_experts(ctx, plan, rows, out);
        moe_ep_combine(ctx, plan, out, y);
        moe_ep_plan_destroy(plan);
        /* the failing rank's return time, to every rank (one host: one clock) */
        if (odd) failed_at = returned;
        MPI_Bcast(&failed_at, 1, MPI_DOUBLE, size - 1, MPI_COMM_WORLD);
        if (!odd && res != MOE_EP_ERROR_ABORTED) fprintf(stderr, "rank %d: dispatch returned %s\n", rank, moe_ep_result_string(res));
        {
            double wait = odd ? 0.0 : returned - failed_at, worst = 0.0;
            MPI_Reduce(&wait, &worst, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
            waits[i] = worst;
        }
        if (moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = B_T, .x = x, .y = y }) != MOE_EP_OK)
            fprintf(stderr, "rank %d: the retry failed: %s\n", rank, moe_ep_last_error(ctx));
    }
    if (rank == 0) {
        qsort(waits, (size_t)reps, sizeof *waits, compare);
        printf("fail, %d ranks, %d rounds: the slowest other rank returned %.3f ms (median), %.3f ms (max) after the "
               "failing rank's return\n", size, reps, 1e3 * waits[reps / 2], 1e3 * waits[reps - 1]);
    }
    moe_ep_destroy(ctx);
    moe_ep_mpi_transport_destroy(&t);
    free(router); free(weights); free(x); free(rows); free(out); free(y); free(experts); free(waits);
    MPI_Finalize();
    return 0;
}
