/* barrier_bench -- the pthreads transport's barrier, polling before it sleeps against
   sleeping at once, at 2 ranks and at more ranks than CPUs.

   usage: barrier_bench [--barriers N] [--rounds N]

   Each rank does a little work of its own (rank r: (r + 1) x 2000 additions, so that the
   ranks arrive one after another), then enters transport.barrier; N barriers per run.
   For each world size (2, 3, 4, 8) the run is repeated `rounds` times with
   desc.spin_count 0 (the default: polls) and -1 (sleeps at once), alternately; printed are
   the median wall time per barrier and the median CPU time of the process per barrier
   (what the polling costs the machine). */
#define _POSIX_C_SOURCE 200809L   /* clock_gettime */
#define MOE_EP_IMPLEMENTATION
#include "../transports/moe_ep_pthreads.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench_util.h"

#define MAX_ROUNDS 64

static volatile double g_sink[8];

typedef struct barrier_job { int barriers; moe_ep_result result[8]; } barrier_job;

static moe_ep_result barrier_rank(const moe_ep_transport* t, void* user_data) {
    barrier_job* job = (barrier_job*)user_data;
    int i, k, me = t->rank;
    moe_ep_result res = MOE_EP_OK;
    char err[192];
    for (i = 0; i < job->barriers && res == MOE_EP_OK; ++i) {
        for (k = 0; k < (me + 1) * 2000; ++k) g_sink[me] = g_sink[me] + (double)k;
        res = t->barrier(t->impl, err, sizeof err);
    }
    job->result[me] = res;
    return res;
}

static double cpu_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* one run: wall and CPU seconds per barrier */
static int run_once(int ranks, int spin_count, int barriers, double* wall, double* cpu) {
    moe_ep_pthreads_world* world = NULL;
    barrier_job job;
    double w0, c0;
    moe_ep_result res;
    memset(&job, 0, sizeof job);
    job.barriers = barriers;
    if (moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = ranks, .timeout_ms = 60000,
                                                              .spin_count = spin_count }, &world) != MOE_EP_OK)
        return 0;
    w0 = bench_now();
    c0 = cpu_seconds();
    res = moe_ep_pthreads_run(world, barrier_rank, &job, NULL);
    *cpu = (cpu_seconds() - c0) / barriers;
    *wall = (bench_now() - w0) / barriers;
    moe_ep_pthreads_world_destroy(world);
    return res == MOE_EP_OK;
}

int main(int argc, char** argv) {
    static const int worlds[4] = { 2, 3, 4, 8 };
    int barriers = 5000, rounds = 5, i, w, r;
    for (i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "--barriers") == 0 && i + 1 < argc) { barriers = atoi(argv[++i]); continue; }
        if (strcmp(argv[i], "--rounds") == 0 && i + 1 < argc) { rounds = atoi(argv[++i]); continue; }
        fprintf(stderr, "usage: barrier_bench [--barriers N] [--rounds N]\n");
        return 2;
    }
    if (barriers < 1) barriers = 5000;
    if (rounds < 1 || rounds > MAX_ROUNDS) rounds = 5;
    printf("barrier_bench: %d barriers per run, %d runs of each, medians; %ld online CPUs\n\n", barriers, rounds,
           (long)sysconf(_SC_NPROCESSORS_ONLN));
    printf("| ranks | polling us per barrier | sleeping us per barrier | sleeping / polling | polling CPU us per "
           "barrier | sleeping CPU us per barrier |\n|---|---|---|---|---|---|\n");
    for (w = 0; w < 4; ++w) {
        double wall[2][MAX_ROUNDS], cpu[2][MAX_ROUNDS], mw[2], mc[2];
        int mode;
        for (r = 0; r < rounds; ++r)
            for (mode = 0; mode < 2; ++mode)
                if (!run_once(worlds[w], mode == 0 ? 0 : -1, barriers, &wall[mode][r], &cpu[mode][r])) {
                    fprintf(stderr, "barrier_bench: a run of %d ranks failed\n", worlds[w]);
                    return 1;
                }
        for (mode = 0; mode < 2; ++mode) {
            mw[mode] = bench_median(wall[mode], rounds);
            mc[mode] = bench_median(cpu[mode], rounds);
        }
        printf("| %d | %.1f | %.1f | %.2f | %.1f | %.1f |\n", worlds[w], 1e6 * mw[0], 1e6 * mw[1], mw[1] / mw[0],
               1e6 * mc[0], 1e6 * mc[1]);
        fflush(stdout);
    }
    return 0;
}
