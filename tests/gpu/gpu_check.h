/* gpu_check.h -- the Check harness the GPU programs share.

   One loop test per world size (1, 2, 4, 8 up to the GPUs there are; optionally all of
   them). A world size's cases run on one thread per GPU; each case ends in facts that the
   test's own thread records after the rank threads joined (gpu_fact), and the loop test
   then asserts them, one ck_assert_msg each, naming the fact. Check asserts are not
   thread-safe: rank threads never call them. Runs without fork (CUDA and rank threads do
   not survive one).

   Without a GPU a program prints "<prog>: no GPU, skipped (...)" and exits 77; with
   --require-gpu, or MOE_EP_REQUIRE_GPU=1 in the environment, it exits 1 instead.
   --max-gpus N limits the world size. */
#ifndef GPU_CHECK_H
#define GPU_CHECK_H

#include <check.h>
#include <cuda_runtime_api.h>
#include <math.h>
#include <nccl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define GPU_MAX_FACTS 1024
#define GPU_MAX_SIZES 8

typedef struct gpu_fact_entry {
    int failed;
    char text[768];
} gpu_fact_entry;

static gpu_fact_entry g_gpu_facts[GPU_MAX_FACTS];
static int g_gpu_fact_count;
static int g_gpu_sizes[GPU_MAX_SIZES], g_gpu_size_count;
static void (*g_gpu_world)(int size);     /* runs every case of one world size */

/* Records (and prints) one fact; the test's own thread only. */
static void gpu_fact(int failed, const char* fmt, ...) {
    gpu_fact_entry* f = &g_gpu_facts[g_gpu_fact_count < GPU_MAX_FACTS ? g_gpu_fact_count : GPU_MAX_FACTS - 1];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(f->text, sizeof f->text, fmt, ap);
    va_end(ap);
    f->failed = failed;
    if (g_gpu_fact_count < GPU_MAX_FACTS) g_gpu_fact_count++;
    printf("%s  %s\n", failed ? "FAIL" : "ok  ", f->text);
    fflush(stdout);
}

START_TEST(gpu_world_test) {
    int i, count;
    g_gpu_fact_count = 0;
    g_gpu_world(g_gpu_sizes[_i]);
    count = g_gpu_fact_count;
    for (i = 0; i < count; ++i) ck_assert_msg(!g_gpu_facts[i].failed, "%s", g_gpu_facts[i].text);
}
END_TEST

/* One communicator per GPU 0..size-1 in this process (ncclCommInitAll); a failure is a fact. */
static int gpu_init_comms(ncclComm_t* comms, int* devices, int size) {
    ncclResult_t nr;
    int r;
    for (r = 0; r < size; ++r) devices[r] = r;
    nr = ncclCommInitAll(comms, size, devices);
    if (nr != ncclSuccess) gpu_fact(1, "world=%d ncclCommInitAll: %s", size, ncclGetErrorString(nr));
    return nr == ncclSuccess;
}

/* The whole program: the world sizes, the skip rules, the suite. all_gpus: also a world of
   every GPU when their count is no power of two. banner (may be NULL) prints a line first. */
static int gpu_main(int argc, char** argv, const char* prog, int all_gpus, void (*world)(int size),
                    void (*banner)(int gpus)) {
    const char* env = getenv("MOE_EP_REQUIRE_GPU");
    int gpus = 0, max = GPU_MAX_SIZES, require = env && strcmp(env, "1") == 0, i, size, failed;
    cudaError_t e = cudaGetDeviceCount(&gpus);
    Suite* suite;
    TCase* tc;
    SRunner* runner;
    for (i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "--max-gpus") == 0 && i + 1 < argc) max = atoi(argv[++i]);
        else if (strcmp(argv[i], "--require-gpu") == 0) require = 1;
    }
    if (e != cudaSuccess || gpus == 0) {
        printf("%s: no GPU, %s (%s)\n", prog, require ? "FAILED (--require-gpu)" : "skipped",
               e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
        return require ? 1 : 77;
    }
    if (gpus > max) gpus = max;
    if (gpus > GPU_MAX_SIZES) gpus = GPU_MAX_SIZES;
    for (size = 1; size <= gpus; size *= 2) g_gpu_sizes[g_gpu_size_count++] = size;    /* 1, 2, 4, 8 */
    if (all_gpus && g_gpu_sizes[g_gpu_size_count - 1] != gpus) g_gpu_sizes[g_gpu_size_count++] = gpus;
    g_gpu_world = world;
    if (banner) banner(gpus);
    suite = suite_create(prog);
    tc = tcase_create("world sizes");
    tcase_add_loop_test(tc, gpu_world_test, 0, g_gpu_size_count);
    suite_add_tcase(suite, tc);
    runner = srunner_create(suite);
    srunner_set_fork_status(runner, CK_NOFORK);
    srunner_run_all(runner, CK_NORMAL);
    failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed == 0 ? 0 : 1;
}

/* sqrt(sum (a - ref)^2 / sum ref^2) in double (the plain norm where ref is all zeros);
   infinite if a holds a NaN (an element never written). */
static inline double rel_error(const float* a, const float* ref, size_t n) {
    double num = 0.0, den = 0.0;
    size_t i;
    for (i = 0; i < n; ++i) {
        double diff = (double)a[i] - (double)ref[i];
        if (a[i] != a[i]) return INFINITY;
        num += diff * diff;
        den += (double)ref[i] * (double)ref[i];
    }
    return den > 0.0 ? sqrt(num / den) : sqrt(num);
}

#endif
