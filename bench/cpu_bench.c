/* cpu_bench -- the CPU expert kernels of moe_ep against their anchors, side by side.

   usage: cpu_bench [gemm] [cblas] [comm] [layer] [decode] [deepseek] [--reps N] [--rounds N] [--python PATH]
                    [--torch-script PATH] [--deepseek-script PATH] [--biases]
   (no section: all of them; --biases: the experts get b1, b3, b2, and the gemm section's
   single products a bias). Each section prints one markdown table: our figure, the
   anchor's figure measured in the same run (interleaved with ours, median of the
   repetitions), and the ratio. Numbers are medians unless marked.

   gemm    built-in kernel vs OpenBLAS cblas_sgemm on the expert shapes (one product,
           packing of the input included), then the fused SwiGLU expert FFN vs the same
           FFN with OpenBLAS ([w1; w3] in one sgemm, the activation, w2).
   cblas   the FFN with MOE_EP_CBLAS (cpu_bench_cblas.c) vs the OpenBLAS FFN.
   comm    dispatch and combine through the pthreads transport vs memcpy of the same bytes
           on the same number of threads: 1 rank, 2 ranks (row lists: the transport
           gathers the dispatched rows by index, and combine sums the returning rows where
           they arrived: one pass each), the same with the transport's barriers sleeping
           at once (spin_count -1, the barrier as it was before it polled), and 2 ranks
           with the row lists declined (packed and copied first, as for MPI and NCCL).
           A second table: per rank, dispatch and combine time and the part of it asleep
           (or waiting for the mutex) in the transport's barriers.
   layer   moe_ep_forward, T = 1024 tokens, one rank, vs the PyTorch anchor
           (bench/torch_moe_cpu.py, OMP_WAIT_POLICY=PASSIVE) and vs the GEMM floor.
   decode  moe_ep_forward at 1, 4, 16, 64 tokens vs PyTorch; weight bandwidth vs memcpy.
   deepseek  a DeepSeek-V3-shaped layer (moe_ep_family_desc(MOE_EP_FAMILY_DEEPSEEK_V3): 256
           experts, top-8, sigmoid scores with a selection bias, 8 groups / top-4 groups,
           routed scaling 2.5, one shared expert; d_model 1024, d_ff 256, 1024 tokens, one
           rank): moe_ep_route alone and moe_ep_forward, vs transformers' DeepseekV3MoE
           forward in PyTorch (bench/torch_deepseek_moe.py, same weights from the same
           generator), whose output is compared with ours.

   Link OpenBLAS (its OpenMP build) into this program only; `make bench` does. When OpenBLAS's
   core detection falls back to Prescott on an AVX-512 or AVX2 CPU it does not know (0.3.21 on
   recent Xeons), the program sets OPENBLAS_CORETYPE (SkylakeX, Haswell) and restarts, so that
   the anchors, PyTorch's runs included, use the right kernels; the first line names the core. */
#define _POSIX_C_SOURCE 200809L   /* clock_gettime, popen */
#include <pthread.h>
#include "bench_util.h"

/* The comm section times how long each rank thread sleeps in the pthreads transport's
   barriers: the transport's condition-variable waits and mutex locks go through these
   (a thread that has not set g_wait_key is not timed). */
static pthread_key_t g_wait_key;
typedef struct bench_wait { double seconds; long sleeps; } bench_wait;

static int bench_cond_wait(pthread_cond_t* cond, pthread_mutex_t* mutex) {
    bench_wait* w = (bench_wait*)pthread_getspecific(g_wait_key);
    double t0 = w ? bench_now() : 0.0;
    int rc = (pthread_cond_wait)(cond, mutex);
    if (w) { w->seconds += bench_now() - t0; w->sleeps++; }
    return rc;
}

static int bench_cond_timedwait(pthread_cond_t* cond, pthread_mutex_t* mutex, const struct timespec* deadline) {
    bench_wait* w = (bench_wait*)pthread_getspecific(g_wait_key);
    double t0 = w ? bench_now() : 0.0;
    int rc = (pthread_cond_timedwait)(cond, mutex, deadline);
    if (w) { w->seconds += bench_now() - t0; w->sleeps++; }
    return rc;
}

static int bench_mutex_lock(pthread_mutex_t* mutex) {
    bench_wait* w = (bench_wait*)pthread_getspecific(g_wait_key);
    double t0 = w ? bench_now() : 0.0;
    int rc = (pthread_mutex_lock)(mutex);
    if (w) w->seconds += bench_now() - t0;
    return rc;
}

#define pthread_cond_wait(cond, mutex) bench_cond_wait(cond, mutex)
#define pthread_cond_timedwait(cond, mutex, deadline) bench_cond_timedwait(cond, mutex, deadline)
#define pthread_mutex_lock(mutex) bench_mutex_lock(mutex)
#define MOE_EP_IMPLEMENTATION
#include "../transports/moe_ep_pthreads.h"
#undef pthread_cond_wait
#undef pthread_cond_timedwait
#undef pthread_mutex_lock
#include "../tests/support/test_support.h"

#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

void* bench_cblas_create(int d_model, int d_ff, int num_experts, const moe_ep_expert_weights* experts);
int bench_cblas_ffn(void* handle, int expert, const float* x, int64_t rows, float* out);
void bench_cblas_destroy(void* handle);

#define D_MODEL 1024
#define D_FF 2816
#define EXPERTS 8
#define TOP_K 2
#define MAX_REPS 256

static int g_reps = 11, g_rounds = 3;
static const char* g_python = "/usr/bin/python3";
static int g_biases;
static const char* g_torch_script = "bench/torch_moe_cpu.py";
static const char* g_deepseek_script = "bench/torch_deepseek_moe.py";

/* >>util */
static float* zero_floats(size_t n) {
    float* v = (float*)calloc(n > 0 ? n : 1, sizeof(float));
    if (!v) { fprintf(stderr, "out of memory\n"); exit(1); }
    return v;
}

static int threads_available(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* max |a - b| / max |b| */
static double rel_diff(const float* a, const float* b, size_t n) {
    double md = 0.0, mb = 0.0;
    size_t i;
    for (i = 0; i < n; ++i) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= md)) md = d;
        if (fabs((double)b[i]) > mb) mb = fabs((double)b[i]);
    }
    return mb > 0.0 ? md / mb : md;
}

/* A model of one MoE layer: router [E, D], E experts; w13 = [w1; w3] stacked for OpenBLAS. */
typedef struct bench_model {
    float* router;
    float *w1[EXPERTS], *w3[EXPERTS], *w2[EXPERTS], *w13[EXPERTS];
    float* biases[EXPERTS];         /* b1, b3, b2 with --biases */
    moe_ep_expert_weights experts[EXPERTS];
} bench_model;

static void model_init(bench_model* m) {
    size_t n = (size_t)D_MODEL * D_FF;
    int e;
    m->router = test_random_floats((size_t)EXPERTS * D_MODEL, 1.0f / sqrtf((float)D_MODEL), 11);
    for (e = 0; e < EXPERTS; ++e) {
        m->w1[e] = test_random_floats(n, 1.0f / sqrtf((float)D_MODEL), 100 + (uint64_t)e);
        m->w3[e] = test_random_floats(n, 1.0f / sqrtf((float)D_MODEL), 200 + (uint64_t)e);
        m->w2[e] = test_random_floats(n, 1.0f / sqrtf((float)D_FF), 300 + (uint64_t)e);
        m->w13[e] = (float*)malloc(sizeof(float) * 2 * n);
        memcpy(m->w13[e], m->w1[e], sizeof(float) * n);
        memcpy(m->w13[e] + n, m->w3[e], sizeof(float) * n);
        m->experts[e].w1 = m->w1[e];
        m->experts[e].w3 = m->w3[e];
        m->experts[e].w2 = m->w2[e];
        if (g_biases) {
            m->biases[e] = test_random_floats(2 * (size_t)D_FF + D_MODEL, 0.1f, 400 + (uint64_t)e);
            m->experts[e].b1 = m->biases[e];
            m->experts[e].b3 = m->biases[e] + D_FF;
            m->experts[e].b2 = m->biases[e] + 2 * D_FF;
        }
    }
}

static void model_free(bench_model* m) {
    int e;
    free(m->router);
    for (e = 0; e < EXPERTS; ++e) {
        free(m->w1[e]); free(m->w3[e]); free(m->w2[e]); free(m->w13[e]); free(m->biases[e]);
    }
}

static moe_ep_context* model_context(const bench_model* m, const moe_ep_transport* transport) {
    moe_ep_context* ctx = NULL;
    moe_ep_result res = moe_ep_create(&(moe_ep_desc){ .d_model = D_MODEL, .d_ff = D_FF, .num_experts = EXPERTS,
                                                      .top_k = TOP_K, .normalize_topk = true,
                                                      .router_weight = m->router, .experts = m->experts,
                                                      .transport = transport }, &ctx);
    if (res != MOE_EP_OK) { fprintf(stderr, "moe_ep_create: %s\n", moe_ep_result_string(res)); exit(1); }
    return ctx;
}

/* The OpenBLAS expert FFN: [w1; w3] in one sgemm, silu(g) * u, then w2. pre: [m, 2F], hidden: [m, F].
   *gemm_seconds (optional) accumulates the time spent in the two sgemm calls. */
static void blas_ffn(const bench_model* m, int e, const float* x, int64_t rows, float* pre, float* hidden, float* out,
                     double* gemm_seconds) {
    int64_t i;
    double t0 = bench_now(), t1, t2;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows, 2 * D_FF, D_MODEL, 1.0f, x, D_MODEL, m->w13[e],
                D_MODEL, 0.0f, pre, 2 * D_FF);
    t1 = bench_now();
#ifdef _OPENMP
#pragma omp parallel for schedule(static)
#endif
    for (i = 0; i < rows * D_FF; ++i) {
        int64_t r = i / D_FF, j = i % D_FF;
        float g = pre[r * 2 * D_FF + j], u = pre[r * 2 * D_FF + D_FF + j];
        hidden[i] = g / (1.0f + expf(-g)) * u;
    }
    t2 = bench_now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows, D_MODEL, D_FF, 1.0f, hidden, D_FF, m->w2[e], D_FF,
                0.0f, out, D_MODEL);
    if (gemm_seconds) *gemm_seconds += (t1 - t0) + (bench_now() - t2);
}

/* PyTorch anchor: one run of the script; returns its median in ms, or -1. */
static double torch_run(int64_t tokens, int reps) {
    char cmd[1024], line[1024];
    double med = -1.0;
    FILE* p;
    snprintf(cmd, sizeof cmd, "OMP_WAIT_POLICY=PASSIVE %s %s 2 --tokens %lld --reps %d 2>/dev/null", g_python,
             g_torch_script, (long long)tokens, reps);
    p = popen(cmd, "r");
    if (!p) return -1.0;
    while (fgets(line, sizeof line, p)) {
        const char* at = strstr(line, "median_ms=");
        if (at) med = atof(at + 10);
    }
    if (pclose(p) != 0) return -1.0;
    return med;
}

/* memcpy of `bytes` from src to dst on `threads` OpenMP threads, each a contiguous share. */
static void copy_parallel(char* dst, const char* src, size_t bytes, int threads) {
    int t;
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads)
#endif
    for (t = 0; t < threads; ++t) {
        size_t a = bytes * (size_t)t / (size_t)threads, b = bytes * (size_t)(t + 1) / (size_t)threads;
        memcpy(dst + a, src + a, b - a);
    }
}

static double memcpy_bandwidth(size_t bytes, int threads, int reps) {
    char* src = (char*)malloc(bytes);
    char* dst = (char*)malloc(bytes);
    double ts[MAX_REPS];
    int r;
    memset(src, 1, bytes);
    memset(dst, 2, bytes);
    copy_parallel(dst, src, bytes, threads);
    for (r = 0; r < reps; ++r) {
        double t0 = bench_now();
        copy_parallel(dst, src, bytes, threads);
        ts[r] = bench_now() - t0;
    }
    free(src);
    free(dst);
    return (double)bytes / bench_median(ts, reps) * 1e-9;
}

static const moe_ep__path* default_path(void) {
    const char* why;
    return moe_ep__select_path(MOE_EP_KERNEL_DEFAULT, &why);
}

/* >>gemm: one product of the built-in kernel, packing of the input included. */
typedef struct ours_gemm {
    moe_ep__gemm_args g;
    const float* x;
    float* scratch;
} ours_gemm;

static void ours_gemm_run(ours_gemm* o, int threads) {
    const moe_ep__path* path = o->g.path;
    int64_t tiles = moe_ep__row_tiles(path, o->g.m), items = moe_ep__gemm_items(&o->g);
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
    {
        float* scratch = o->scratch + omp_get_thread_num() * moe_ep__scratch_floats(path);
        int64_t i;
#pragma omp for schedule(static)
        for (i = 0; i < tiles; ++i) moe_ep__pack_rows(path, o->x, o->g.k, o->g.m, o->g.k, i, i + 1, (float*)o->g.a);
#pragma omp for schedule(dynamic, 1)
        for (i = 0; i < items; ++i) moe_ep__gemm_item(&o->g, i, scratch);
    }
#else
    int64_t i;
    (void)threads;
    moe_ep__pack_rows(path, o->x, o->g.k, o->g.m, o->g.k, 0, tiles, (float*)o->g.a);
    for (i = 0; i < items; ++i) moe_ep__gemm_item(&o->g, i, o->scratch);
#endif
}

static const int64_t bench_rows[] = { 16, 64, 256, 1024 };

static void section_gemm(const bench_model* model) {
    static const int shapes[2][2] = { { D_MODEL, D_FF }, { D_FF, D_MODEL } };
    int threads = threads_available(), s, i, r;
    double min_ratio = 1e9;
    printf("\n### Goal 1: built-in kernel vs OpenBLAS cblas_sgemm (%d threads, GFLOP/s, median of %d)\n\n", threads,
           g_reps);
    printf("| M | K | N | moe_ep GF/s | OpenBLAS GF/s | ratio | max rel. diff |\n|---|---|---|---|---|---|---|\n");
    for (s = 0; s < 2; ++s)
        for (i = 0; i < 4; ++i) {
            int K = shapes[s][0], N = shapes[s][1];
            int64_t M = bench_rows[i];
            float* x = test_random_floats((size_t)M * K, 1.0f, 7 + (uint64_t)i);
            float* w = test_random_floats((size_t)N * K, 0.03f, 8 + (uint64_t)s);
            float* c1 = zero_floats((size_t)M * N);
            float* c2 = zero_floats((size_t)M * N);
            const char* why;
            const moe_ep__path* path = moe_ep__select_path(MOE_EP_KERNEL_DEFAULT, &why);
            size_t panel_floats = (size_t)moe_ep__panel_count(N, path->nr) * path->nr * K;
            float* panels_raw = zero_floats(panel_floats + (size_t)moe_ep__panel_count(N, path->nr) * path->nr + 64);
            float* bias = test_random_floats((size_t)N, 0.1f, 9 + (uint64_t)s);
            moe_ep__wview view = moe_ep__view(moe_ep__wtensor_of(w, NULL, MOE_EP_WEIGHT_FORMAT_FP32,
                                                                g_biases ? bias : NULL, NULL, "w"), 0, K, 1, 0, 1, K);
            float* tiles_raw = zero_floats((size_t)moe_ep__row_tiles(path, M) * path->mr * K + 64);
            float* scratch_raw = zero_floats((size_t)(threads * moe_ep__scratch_floats(path) + 64));
            moe_ep__pack_fault fault;
            double to[MAX_REPS], tb[MAX_REPS], flop = 2.0 * (double)M * K * N, ours, blas;
            ours_gemm o;
            memset(&o, 0, sizeof o);
            moe_ep__pack(path, MOE_EP_WEIGHT_FORMAT_FP32, false, &view, NULL, N, K, moe_ep__aligned(panels_raw),
                         moe_ep__aligned(panels_raw) + panel_floats, NULL, &fault);
            o.g.path = path;
            o.g.format = MOE_EP_WEIGHT_FORMAT_FP32;
            if (g_biases) o.g.bias = moe_ep__aligned(panels_raw) + panel_floats;
            o.x = x;
            o.scratch = moe_ep__aligned(scratch_raw);
            o.g.a = moe_ep__aligned(tiles_raw); o.g.a_kext = K; o.g.m = M; o.g.k = K; o.g.n = N;
            o.g.panels = moe_ep__aligned(panels_raw); o.g.act = MOE_EP_ACTIVATION_COUNT;
            o.g.c = c1; o.g.ldc = N; o.g.c_kext = 0;
            for (r = 0; r < 3; ++r) {
                ours_gemm_run(&o, threads);
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)M, N, K, 1.0f, x, K, w, K, 0.0f, c2, N);
            }
            for (r = 0; r < g_reps; ++r) {
                double t0 = bench_now();
                ours_gemm_run(&o, threads);
                to[r] = bench_now() - t0;
                t0 = bench_now();
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)M, N, K, 1.0f, x, K, w, K, 0.0f, c2, N);
                tb[r] = bench_now() - t0;
            }
            ours = flop / bench_median(to, g_reps) * 1e-9;
            blas = flop / bench_median(tb, g_reps) * 1e-9;
            if (ours / blas < min_ratio) min_ratio = ours / blas;
            printf("| %lld | %d | %d | %.1f | %.1f | %.2f | %.1e |\n", (long long)M, K, N, ours, blas, ours / blas,
                   rel_diff(c1, c2, (size_t)M * N));
            fflush(stdout);
            free(x); free(w); free(bias); free(c1); free(c2); free(panels_raw); free(tiles_raw); free(scratch_raw);
        }
    printf("\nlowest ratio: %.2f (goal >= 0.85)\n", min_ratio);

    /* The whole expert FFN at M rows. */
    {
        moe_ep_context* ctx = model_context(model, NULL);
        min_ratio = 1e9;
        printf("\n### Goal 1: fused SwiGLU expert FFN (d_model %d, d_ff %d) vs the same FFN with OpenBLAS "
               "(%d threads, GFLOP/s, median of %d)\n\n", D_MODEL, D_FF, threads, g_reps);
        printf("| rows | moe_ep GF/s | OpenBLAS FFN GF/s | ratio | max rel. diff |\n|---|---|---|---|---|\n");
        for (i = 0; i < 4; ++i) {
            int64_t M = bench_rows[i];
            float* x = test_random_floats((size_t)M * D_MODEL, 1.0f, 21 + (uint64_t)i);
            float* y1 = zero_floats((size_t)M * D_MODEL);
            float* y2 = zero_floats((size_t)M * D_MODEL);
            float* pre = zero_floats((size_t)M * 2 * D_FF);
            float* hidden = zero_floats((size_t)M * D_FF);
            double to[MAX_REPS], tb[MAX_REPS], flop = 6.0 * (double)M * D_MODEL * D_FF, ours, blas;
            for (r = 0; r < 3; ++r) {
                moe_ep_expert_ffn(ctx, 0, x, M, y1);
                blas_ffn(model, 0, x, M, pre, hidden, y2, NULL);
            }
            for (r = 0; r < g_reps; ++r) {
                double t0 = bench_now();
                moe_ep_expert_ffn(ctx, 0, x, M, y1);
                to[r] = bench_now() - t0;
                t0 = bench_now();
                blas_ffn(model, 0, x, M, pre, hidden, y2, NULL);
                tb[r] = bench_now() - t0;
            }
            ours = flop / bench_median(to, g_reps) * 1e-9;
            blas = flop / bench_median(tb, g_reps) * 1e-9;
            if (ours / blas < min_ratio) min_ratio = ours / blas;
            printf("| %lld | %.1f | %.1f | %.2f | %.1e |\n", (long long)M, ours, blas, ours / blas,
                   rel_diff(y1, y2, (size_t)M * D_MODEL));
            fflush(stdout);
            free(x); free(y1); free(y2); free(pre); free(hidden);
        }
        printf("\nlowest ratio: %.2f (goal >= 0.85)\n", min_ratio);
        moe_ep_destroy(ctx);
    }
}

/* >>cblas: the MOE_EP_CBLAS build against OpenBLAS itself. */
static void section_cblas(const bench_model* model) {
    void* h = bench_cblas_create(D_MODEL, D_FF, EXPERTS, model->experts);
    moe_ep_context* builtin;
    const int reps = 3 * g_reps;   /* both sides are the same sgemm calls: the ratio needs more samples */
    int threads = threads_available(), i, r;
    double min_ratio = 1e9;
    if (!h) { fprintf(stderr, "bench_cblas_create failed\n"); return; }
    builtin = model_context(model, NULL);
    printf("\n### Goal 2: MOE_EP_CBLAS expert FFN vs the OpenBLAS FFN (%d threads, GFLOP/s, median of %d)\n\n",
           threads, reps);
    printf("| rows | moe_ep (CBLAS) GF/s | OpenBLAS FFN GF/s | ratio | max rel. diff vs built-in | "
           "row alone == row in 1024 block |\n|---|---|---|---|---|---|\n");
    for (i = 0; i < 4; ++i) {
        int64_t M = bench_rows[i];
        float* x = test_random_floats((size_t)1024 * D_MODEL, 1.0f, 31 + (uint64_t)i);
        float* y1 = zero_floats((size_t)1024 * D_MODEL);
        float* y2 = zero_floats((size_t)M * D_MODEL);
        float* pre = zero_floats((size_t)M * 2 * D_FF);
        float* hidden = zero_floats((size_t)M * D_FF);
        double to[MAX_REPS], tb[MAX_REPS], flop = 6.0 * (double)M * D_MODEL * D_FF, ours, blas;
        int same = 1;
        int64_t row;
        double diff;
        for (r = 0; r < 3; ++r) {
            bench_cblas_ffn(h, 0, x, M, y1);
            blas_ffn(model, 0, x, M, pre, hidden, y2, NULL);
        }
        for (r = 0; r < reps; ++r) {
            double t0 = bench_now();
            bench_cblas_ffn(h, 0, x, M, y1);
            to[r] = bench_now() - t0;
            t0 = bench_now();
            blas_ffn(model, 0, x, M, pre, hidden, y2, NULL);
            tb[r] = bench_now() - t0;
        }
        ours = flop / bench_median(to, reps) * 1e-9;
        blas = flop / bench_median(tb, reps) * 1e-9;
        if (ours / blas < min_ratio) min_ratio = ours / blas;
        /* The same FFN as the built-in kernel, to rounding? */
        moe_ep_expert_ffn(builtin, 0, x, M, y2);
        diff = rel_diff(y1, y2, (size_t)M * D_MODEL);
        /* What the switch gives up: is a row's output independent of the block it came in? */
        bench_cblas_ffn(h, 0, x, 1024, y1);
        for (row = 0; row < M && same; row += 7) {
            bench_cblas_ffn(h, 0, x + row * D_MODEL, 1, y2);
            same = memcmp(y2, y1 + row * D_MODEL, sizeof(float) * D_MODEL) == 0;
        }
        printf("| %lld | %.1f | %.1f | %.2f | %.1e | %s |\n", (long long)M, ours, blas, ours / blas, diff,
               same ? "yes" : "no");
        fflush(stdout);
        free(x); free(y1); free(y2); free(pre); free(hidden);
    }
    printf("\nlowest ratio: %.2f (goal >= 0.97)\n", min_ratio);
    bench_cblas_destroy(h);
    moe_ep_destroy(builtin);
}

/* >>comm: dispatch + combine on R rank threads vs memcpy of the same bytes. */
typedef struct comm_state {
    const bench_model* model;
    int64_t tokens;                 /* per rank */
    int reps;
    int decline;                    /* the transport's row_lists set to 0: dispatch packs the rows first */
    double t_dispatch[2][MAX_REPS], t_combine[2][MAX_REPS], t_copy[2][MAX_REPS];
    double wait_dispatch[2][MAX_REPS], wait_combine[2][MAX_REPS];    /* asleep or locking in the barriers */
    long sleeps[2];                 /* condition-variable waits over the timed repetitions */
    int64_t bytes[2];
} comm_state;

static int copy_expert(int local_expert, int expert, const float* rows, int64_t row_count, int d_model, float* out,
                       void* user_data) {
    (void)local_expert; (void)expert; (void)user_data;
    memcpy(out, rows, sizeof(float) * (size_t)row_count * (size_t)d_model);
    return 0;
}

static moe_ep_result comm_rank(const moe_ep_transport* transport, void* user_data) {
    comm_state* st = (comm_state*)user_data;
    int rank = transport->rank, r, threads;
    moe_ep_context* ctx = NULL;
    moe_ep_plan* plan = NULL;
    moe_ep_plan_info info;
    int64_t T = st->tokens;
    float* x = test_random_floats((size_t)T * D_MODEL, 1.0f, 41 + (uint64_t)rank);
    float* y = zero_floats((size_t)T * D_MODEL);
    int32_t* idx = (int32_t*)malloc(sizeof(int32_t) * (size_t)T * TOP_K);
    float* weight = (float*)malloc(sizeof(float) * (size_t)T * TOP_K);
    float *recv, *src, *dst;
    moe_ep_transport t = *transport;
    moe_ep_result res;
    bench_wait wait = { 0.0, 0 };
    if (st->decline) t.row_lists = 0;
    res = moe_ep_create(&(moe_ep_desc){ .d_model = D_MODEL, .num_experts = EXPERTS, .top_k = TOP_K,
                                        .normalize_topk = true, .router_weight = st->model->router,
                                        .expert_fn = copy_expert, .transport = &t }, &ctx);
    if (res != MOE_EP_OK) return res;
    threads = moe_ep_query(ctx).num_threads;
    res = moe_ep_route(ctx, x, T, idx, weight, NULL);
    if (res == MOE_EP_OK) res = moe_ep_plan_create(ctx, T, idx, weight, &plan);
    if (res != MOE_EP_OK) return res;
    info = moe_ep_plan_query(plan);
    recv = zero_floats((size_t)info.recv_rows * D_MODEL);
    st->bytes[rank] = info.send_rows * D_MODEL * (int64_t)sizeof(float);
    src = test_random_floats((size_t)info.send_rows * D_MODEL, 1.0f, 51);
    dst = zero_floats((size_t)info.send_rows * D_MODEL);
    pthread_setspecific(g_wait_key, &wait);
    for (r = -2; r < st->reps && res == MOE_EP_OK; ++r) {
        double t0, t1, t2, t3, w0, w1;
        long sleeps0;
        char err[64];
        transport->barrier(transport->impl, err, sizeof err);
        t0 = bench_now();
        w0 = wait.seconds;
        sleeps0 = wait.sleeps;
        res = moe_ep_dispatch(ctx, plan, x, recv);
        t1 = bench_now();
        w1 = wait.seconds;
        if (res == MOE_EP_OK) res = moe_ep_combine(ctx, plan, recv, y);
        t2 = bench_now();
        if (r >= 0) {
            st->wait_dispatch[rank][r] = w1 - w0;
            st->wait_combine[rank][r] = wait.seconds - w1;
            st->sleeps[rank] += wait.sleeps - sleeps0;
        }
        transport->barrier(transport->impl, err, sizeof err);
        t3 = bench_now();
        copy_parallel((char*)dst, (const char*)src, (size_t)st->bytes[rank], threads);
        if (r >= 0) {
            st->t_dispatch[rank][r] = t1 - t0;
            st->t_combine[rank][r] = t2 - t1;
            st->t_copy[rank][r] = bench_now() - t3;
        }
    }
    pthread_setspecific(g_wait_key, NULL);
    moe_ep_plan_destroy(plan);
    moe_ep_destroy(ctx);
    free(x); free(y); free(idx); free(weight); free(recv); free(src); free(dst);
    return res;
}

/* Per rank: median time of dispatch and of combine, and of the part of it spent asleep (or
   locking) in the transport's barriers; condition-variable sleeps per repetition. */
static void comm_waits(const comm_state* st, int ranks, const char* label, char* out, size_t out_size) {
    size_t used = 0;
    int q, r;
    for (q = 0; q < ranks && used < out_size; ++q) {
        double td[MAX_REPS], wd[MAX_REPS], tc[MAX_REPS], wc[MAX_REPS];
        for (r = 0; r < st->reps; ++r) {
            td[r] = st->t_dispatch[q][r]; wd[r] = st->wait_dispatch[q][r];
            tc[r] = st->t_combine[q][r]; wc[r] = st->wait_combine[q][r];
        }
        used += (size_t)snprintf(out + used, out_size - used, "| %s | %d | %.0f | %.0f | %.0f | %.0f | %.1f |\n", label, q,
                                 1e6 * bench_median(td, st->reps), 1e6 * bench_median(wd, st->reps),
                                 1e6 * bench_median(tc, st->reps), 1e6 * bench_median(wc, st->reps),
                                 (double)st->sleeps[q] / st->reps);
    }
}

static void section_comm(const bench_model* model) {
    int config;
    char waits[4][512];
    static const char* const labels[4] = { "1", "2", "2, barriers sleep at once", "2, row lists declined" };
    pthread_key_create(&g_wait_key, NULL);
    printf("\n### Goal 3: dispatch + combine (pthreads transport, %d tokens per rank, d_model %d, top-%d) vs memcpy of "
           "the same bytes on the same threads (GB/s, median of %d)\n\n", 1024, D_MODEL, TOP_K, 2 * g_reps);
    printf("| ranks | MB moved | dispatch GB/s | combine GB/s | memcpy GB/s | dispatch / memcpy | combine / memcpy | "
           "(dispatch + combine) / 2 memcpy |\n|---|---|---|---|---|---|---|---|\n");
    /* 1 rank, 2 ranks (row lists: dispatch and combine in one pass each), the same with the
       transport's barriers sleeping at once (spin_count -1: the barrier before it could spin),
       and 2 ranks with the row lists declined (packed and copied first, as for MPI and NCCL) */
    for (config = 0; config < 4; ++config) {
        int ranks = config == 0 ? 1 : 2;
        comm_state st;
        moe_ep_pthreads_world* world = NULL;
        double td[MAX_REPS], tc[MAX_REPS], tm[MAX_REPS], bytes, d, c, m, tds, tcs, tms;
        int r, q;
        memset(&st, 0, sizeof st);
        st.model = model;
        st.tokens = 1024;
        st.reps = 2 * g_reps;
        st.decline = config == 3;
        moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = ranks, .spin_count = config == 2 ? -1 : 0 },
                                     &world);
        if (moe_ep_pthreads_run(world, comm_rank, &st, NULL) != MOE_EP_OK) {
            fprintf(stderr, "comm run failed\n");
            moe_ep_pthreads_world_destroy(world);
            return;
        }
        moe_ep_pthreads_world_destroy(world);
        comm_waits(&st, ranks, labels[config], waits[config], sizeof waits[config]);
        for (r = 0; r < st.reps; ++r) {     /* a collective takes as long as its slowest rank */
            td[r] = tc[r] = tm[r] = 0.0;
            for (q = 0; q < ranks; ++q) {
                if (st.t_dispatch[q][r] > td[r]) td[r] = st.t_dispatch[q][r];
                if (st.t_combine[q][r] > tc[r]) tc[r] = st.t_combine[q][r];
                if (st.t_copy[q][r] > tm[r]) tm[r] = st.t_copy[q][r];
            }
        }
        bytes = 0.0;
        for (q = 0; q < ranks; ++q) bytes += (double)st.bytes[q];
        tds = bench_median(td, st.reps); tcs = bench_median(tc, st.reps); tms = bench_median(tm, st.reps);
        d = bytes / tds * 1e-9; c = bytes / tcs * 1e-9; m = bytes / tms * 1e-9;
        printf("| %s | %.1f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f |\n", labels[config], bytes * 1e-6, d, c, m, d / m, c / m,
               2.0 * tms / (tds + tcs));
        fflush(stdout);
    }
    printf("\ngoal: (dispatch + combine) >= 0.7 x memcpy bandwidth\n");
    printf("\nWhere the time goes, per rank (us, medians; wait: asleep on the transport's condition variable or "
           "waiting for its mutex):\n\n| ranks | rank | dispatch | of it waiting | combine | of it waiting | sleeps per "
           "repetition |\n|---|---|---|---|---|---|---|\n");
    for (config = 0; config < 4; ++config) printf("%s", waits[config]);
}

/* >>layer */
static void ours_layer(moe_ep_context* ctx, const float* x, int64_t T, float* y) {
    moe_ep_result res = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = T, .x = x, .y = y });
    if (res != MOE_EP_OK) { fprintf(stderr, "moe_ep_forward: %s: %s\n", moe_ep_result_string(res), moe_ep_last_error(ctx)); exit(1); }
}

/* The layer's expert products with OpenBLAS, on the rows our router sent to each expert. */
static double blas_layer_gemms(const bench_model* model, moe_ep_context* ctx, const float* x, int64_t T) {
    int32_t* idx = (int32_t*)malloc(sizeof(int32_t) * (size_t)T * TOP_K);
    float* weight = (float*)malloc(sizeof(float) * (size_t)T * TOP_K);
    float* rows = zero_floats((size_t)T * TOP_K * D_MODEL);
    float* pre = zero_floats((size_t)T * TOP_K * 2 * D_FF);
    float* hidden = zero_floats((size_t)T * TOP_K * D_FF);
    float* out = zero_floats((size_t)T * TOP_K * D_MODEL);
    double gemm_seconds = 0.0;
    int e;
    moe_ep_route(ctx, x, T, idx, weight, NULL);
    for (e = 0; e < EXPERTS; ++e) {
        int64_t t, n = 0;
        for (t = 0; t < T * TOP_K; ++t)
            if (idx[t] == e) memcpy(rows + (n++) * D_MODEL, x + (t / TOP_K) * D_MODEL, sizeof(float) * D_MODEL);
        if (n > 0) blas_ffn(model, e, rows, n, pre, hidden, out, &gemm_seconds);
    }
    free(idx); free(weight); free(rows); free(pre); free(hidden); free(out);
    return gemm_seconds;
}

static void section_layer(const bench_model* model) {
    const int64_t T = 1024;
    moe_ep_context* ctx = model_context(model, NULL);
    float* x = test_random_floats((size_t)T * D_MODEL, 1.7f, 61);
    float* y = zero_floats((size_t)T * D_MODEL);
    double to[MAX_REPS * 4], tt[16], tg[MAX_REPS * 4], ours, torch, floor_ms, flop;
    int round, r, no = 0, nt = 0, ng = 0;
    flop = 2.0 * 3.0 * D_MODEL * D_FF * (double)T * TOP_K + 2.0 * (double)T * D_MODEL * EXPERTS;
    for (r = 0; r < 2; ++r) { ours_layer(ctx, x, T, y); blas_layer_gemms(model, ctx, x, T); }
    for (round = 0; round < g_rounds; ++round) {
        double m;
        for (r = 0; r < g_reps; ++r) {
            double t0 = bench_now();
            ours_layer(ctx, x, T, y);
            to[no++] = bench_now() - t0;
            tg[ng++] = blas_layer_gemms(model, ctx, x, T);
        }
        m = torch_run(T, 10);
        if (m > 0) tt[nt++] = m * 1e-3;
    }
    ours = bench_median(to, no) * 1e3;
    floor_ms = bench_median(tg, ng) * 1e3;
    torch = nt > 0 ? bench_median(tt, nt) * 1e3 : -1.0;
    printf("\n### Goal 4: the whole layer (T %lld, d_model %d, d_ff %d, E %d, top-%d, fp32, %d threads, one rank; "
           "%.1f GFLOP)\n\n", (long long)T, D_MODEL, D_FF, EXPERTS, TOP_K, threads_available(), flop * 1e-9);
    printf("| moe_ep ms | PyTorch ms | moe_ep / PyTorch (goal <= 0.6) | OpenBLAS GEMM floor ms | moe_ep / floor "
           "(goal <= 1.2) | moe_ep GF/s |\n|---|---|---|---|---|---|\n");
    if (torch > 0)
        printf("| %.1f | %.1f | %.2f | %.1f | %.2f | %.1f |\n", ours, torch, ours / torch, floor_ms, ours / floor_ms,
               flop / ours * 1e-6);
    else
        printf("| %.1f | n/a | n/a | %.1f | %.2f | %.1f |\n", ours, floor_ms, ours / floor_ms, flop / ours * 1e-6);
    printf("\nmedians over %d rounds: moe_ep %d x %d runs, PyTorch %d runs of its own median of 10 (OMP_WAIT_POLICY=PASSIVE, "
           "torch.set_num_threads(2)); the floor is OpenBLAS's time for the layer's expert products on the same rows "
           "(sgemm calls only).\n", g_rounds, g_rounds, g_reps, nt);
    moe_ep_destroy(ctx);
    free(x);
    free(y);
}

/* >>decode */
static void section_decode(const bench_model* model) {
    static const int64_t tokens[] = { 1, 4, 16, 64 };
    moe_ep_context* ctx = model_context(model, NULL);
    double copy_gbs = memcpy_bandwidth((size_t)64 << 20, threads_available(), 15);
    int i;
    printf("\n### Goal 5: small batches (one rank, %d threads): us per layer, and expert weight bandwidth\n\n",
           threads_available());
    printf("| tokens | experts hit | moe_ep us | PyTorch us | moe_ep / PyTorch | weights MB | moe_ep weight GB/s | "
           "memcpy GB/s | weight GB/s / memcpy |\n|---|---|---|---|---|---|---|---|---|\n");
    for (i = 0; i < 4; ++i) {
        int64_t T = tokens[i], counts[EXPERTS];
        int reps = 3 * g_reps, round, r, no = 0, nt = 0, e, hit = 0;
        float* x = test_random_floats((size_t)T * D_MODEL, 1.7f, 71 + (uint64_t)i);
        float* y = zero_floats((size_t)T * D_MODEL);
        double to[MAX_REPS * 4], tt[16], ours, torch, bytes;
        moe_ep_router_stats stats;
        memset(&stats, 0, sizeof stats);
        stats.tokens_per_expert = counts;
        moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = T, .x = x, .y = y, .stats = &stats });
        for (e = 0; e < EXPERTS; ++e) hit += counts[e] > 0;
        bytes = (double)hit * 3.0 * D_MODEL * D_FF * sizeof(float);
        for (round = 0; round < g_rounds; ++round) {
            double m;
            for (r = 0; r < reps; ++r) {
                double t0 = bench_now();
                ours_layer(ctx, x, T, y);
                to[no++] = bench_now() - t0;
            }
            m = torch_run(T, reps);
            if (m > 0) tt[nt++] = m * 1e-3;
        }
        ours = bench_median(to, no);
        torch = nt > 0 ? bench_median(tt, nt) : -1.0;
        if (torch > 0)
            printf("| %lld | %d | %.0f | %.0f | %.2f | %.0f | %.2f | %.2f | %.2f |\n", (long long)T, hit, ours * 1e6,
                   torch * 1e6, ours / torch, bytes * 1e-6, bytes / ours * 1e-9, copy_gbs, bytes / ours * 1e-9 / copy_gbs);
        else
            printf("| %lld | %d | %.0f | n/a | n/a | %.0f | %.2f | %.2f | %.2f |\n", (long long)T, hit, ours * 1e6,
                   bytes * 1e-6, bytes / ours * 1e-9, copy_gbs, bytes / ours * 1e-9 / copy_gbs);
        fflush(stdout);
        free(x);
        free(y);
    }
    printf("\nweights MB: the experts the batch touches x 3 matrices x %d x %d x 4 bytes, read once per layer; memcpy: "
           "64 MiB on %d threads (bytes copied per second).\n", D_MODEL, D_FF, threads_available());
    moe_ep_destroy(ctx);
}

/* >>deepseek: DeepSeek-V3's router, experts and shared expert at a CPU-sized width. */
#define DS_TOKENS 1024
#define DS_D_MODEL 1024
#define DS_D_FF 256
#define DS_SHARED_D_FF 256
/* the generator's streams and scales: keep in step with bench/torch_deepseek_moe.py */
enum { DS_STREAM_ROUTER = 1, DS_STREAM_BIAS, DS_STREAM_X, DS_STREAM_SHARED_W1, DS_STREAM_SHARED_W3,
       DS_STREAM_SHARED_W2, DS_STREAM_W1 = 0x100, DS_STREAM_W3 = 0x200, DS_STREAM_W2 = 0x300 };

/* Element i of stream s: splitmix64((s << 40) + i), its top 24 bits centred, times scale / 2^23.
   With a power-of-two scale every value is exact, so numpy reproduces them bit for bit. */
static float* bench_hash_floats(size_t n, uint64_t stream, float scale) {
    float* v = zero_floats(n);
    float s = scale / 8388608.0f;
    size_t i;
    for (i = 0; i < n; ++i) {
        uint64_t z = (stream << 40) + (uint64_t)i + 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        v[i] = (float)((int32_t)(z >> 40) - 8388608) * s;
    }
    return v;
}

static int cmp_int32(const void* a, const void* b) {
    int32_t x = *(const int32_t*)a, y = *(const int32_t*)b;
    return x < y ? -1 : x > y;
}

/* One run of the PyTorch layer; its median and its router's median in ms (-1 if it failed).
   out_path: where it writes its y and chosen experts; note: its own summary line. */
static double torch_deepseek_run(int threads, int reps, const char* out_path, double* route_ms, char* note,
                                 size_t note_size) {
    char cmd[1024], line[2048];
    double med = -1.0;
    FILE* p;
    snprintf(cmd, sizeof cmd, "OMP_WAIT_POLICY=PASSIVE %s %s %d --tokens %d --reps %d --out %s 2>&1", g_python,
             g_deepseek_script, threads, DS_TOKENS, reps, out_path);
    p = popen(cmd, "r");
    if (!p) return -1.0;
    *route_ms = -1.0;
    while (fgets(line, sizeof line, p)) {
        const char* at = strstr(line, "median_ms=");
        if (at) {
            const char* r = strstr(line, "route_ms=");
            med = atof(at + 10);
            if (r) *route_ms = atof(r + 9);
        } else if (strncmp(line, "torch ", 6) == 0) {
            snprintf(note, note_size, "%.1000s", line);
        } else {
            fprintf(stderr, "  [%s] %s", g_deepseek_script, line);  /* why it failed */
        }
    }
    if (pclose(p) != 0) return -1.0;
    return med;
}

static void section_deepseek(void) {
    const int64_t T = DS_TOKENS;
    const int D = DS_D_MODEL, F = DS_D_FF, SF = DS_SHARED_D_FF;
    moe_ep_desc desc = moe_ep_family_desc(MOE_EP_FAMILY_DEEPSEEK_V3);
    moe_ep_expert_weights* experts;
    moe_ep_context* ctx = NULL;
    moe_ep_result res;
    float *router, *bias, *x, *y, *weight, *sw1, *sw3, *sw2, *ty;
    int32_t *idx, *tidx;
    double *to, *tr, *tg, tt[16], ttr[16], flop, ours, route, torch, torch_route, logits_gemm;
    float* logits;
    double diff = -1.0, ymax = 0.0, dmax = 0.0, sum = 0.0, asum = 0.0;
    int E, K, threads, round, r, e, no = 0, nt = 0, have_torch = 0, fd;
    int64_t t, same_tokens = 0;
    char out_path[] = "/tmp/moe_ep_deepseek_XXXXXX", torch_note[1024] = "";

    desc.d_model = D;
    desc.d_ff = F;
    desc.shared.d_ff = SF;
    E = desc.num_experts;
    K = desc.top_k;
    router = bench_hash_floats((size_t)E * D, DS_STREAM_ROUTER, 1.0f / 32.0f);
    bias = bench_hash_floats((size_t)E, DS_STREAM_BIAS, 1.0f / 64.0f);
    x = bench_hash_floats((size_t)T * D, DS_STREAM_X, 1.0f);
    experts = (moe_ep_expert_weights*)calloc((size_t)E, sizeof *experts);
    for (e = 0; e < E; ++e) {
        experts[e].w1 = bench_hash_floats((size_t)F * D, DS_STREAM_W1 + (uint64_t)e, 1.0f / 32.0f);
        experts[e].w3 = bench_hash_floats((size_t)F * D, DS_STREAM_W3 + (uint64_t)e, 1.0f / 32.0f);
        experts[e].w2 = bench_hash_floats((size_t)D * F, DS_STREAM_W2 + (uint64_t)e, 1.0f / 16.0f);
    }
    sw1 = bench_hash_floats((size_t)SF * D, DS_STREAM_SHARED_W1, 1.0f / 32.0f);
    sw3 = bench_hash_floats((size_t)SF * D, DS_STREAM_SHARED_W3, 1.0f / 32.0f);
    sw2 = bench_hash_floats((size_t)D * SF, DS_STREAM_SHARED_W2, 1.0f / 16.0f);
    desc.router_weight = router;          /* not copied by create: kept until the end */
    desc.selection_bias = bias;
    desc.experts = experts;
    desc.shared.weights.w1 = sw1;
    desc.shared.weights.w3 = sw3;
    desc.shared.weights.w2 = sw2;
    desc.transport = NULL;
    res = moe_ep_create(&desc, &ctx);
    /* the expert weights are copied (packed) at create */
    for (e = 0; e < E; ++e) {
        free((void*)experts[e].w1); free((void*)experts[e].w3); free((void*)experts[e].w2);
    }
    free(experts); free(sw1); free(sw3); free(sw2);
    if (res != MOE_EP_OK) {
        fprintf(stderr, "deepseek: moe_ep_create: %s\n", moe_ep_result_string(res));
        free(router); free(bias); free(x);
        return;
    }
    desc = moe_ep_query(ctx);
    threads = desc.num_threads;
    y = zero_floats((size_t)T * D);
    ty = zero_floats((size_t)T * D);
    idx = (int32_t*)calloc((size_t)(T * K), sizeof(int32_t));
    tidx = (int32_t*)calloc((size_t)(T * K), sizeof(int32_t));
    weight = zero_floats((size_t)(T * K));
    to = (double*)calloc((size_t)(g_rounds * g_reps), sizeof(double));
    tr = (double*)calloc((size_t)(g_rounds * g_reps), sizeof(double));
    tg = (double*)calloc((size_t)(g_rounds * g_reps), sizeof(double));
    logits = zero_floats((size_t)T * E);
    fd = mkstemp(out_path);
    if (fd >= 0) close(fd);

    for (r = 0; r < 2; ++r) {
        ours_layer(ctx, x, T, y);
        moe_ep_route(ctx, x, T, idx, weight, NULL);
    }
    for (round = 0; round < g_rounds; ++round) {
        double m, mr = -1.0;
        for (r = 0; r < g_reps; ++r) {      /* route, layer and the logits sgemm alternate */
            double t0 = bench_now();
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)T, E, D, 1.0f, x, D, router, D, 0.0f, logits, E);
            tg[no] = bench_now() - t0;
            t0 = bench_now();
            res = moe_ep_route(ctx, x, T, idx, weight, NULL);
            tr[no] = bench_now() - t0;
            if (res != MOE_EP_OK) { fprintf(stderr, "moe_ep_route: %s\n", moe_ep_last_error(ctx)); exit(1); }
            t0 = bench_now();
            ours_layer(ctx, x, T, y);
            to[no++] = bench_now() - t0;
        }
        m = fd >= 0 ? torch_deepseek_run(threads, g_reps, out_path, &mr, torch_note, sizeof torch_note) : -1.0;
        if (m > 0) { tt[nt] = m * 1e-3; ttr[nt++] = mr * 1e-3; }
    }
    ours = bench_median(to, no) * 1e3;
    route = bench_median(tr, no) * 1e3;
    logits_gemm = bench_median(tg, no) * 1e3;
    torch = nt > 0 ? bench_median(tt, nt) * 1e3 : -1.0;
    torch_route = nt > 0 ? bench_median(ttr, nt) * 1e3 : -1.0;

    /* the same layer? PyTorch's y and chosen experts (sorted per token) against ours */
    if (nt > 0) {
        FILE* f = fopen(out_path, "rb");
        have_torch = f && fread(ty, sizeof(float), (size_t)T * D, f) == (size_t)T * D &&
                     fread(tidx, sizeof(int32_t), (size_t)(T * K), f) == (size_t)(T * K);
        if (f) fclose(f);
    }
    for (t = 0; t < T; ++t) qsort(idx + t * K, (size_t)K, sizeof(int32_t), cmp_int32);
    for (t = 0; t < T * D; ++t) {
        sum += y[t];
        asum += fabs((double)y[t]);
    }
    if (have_torch) {
        for (t = 0; t < T * D; ++t)
            if (fabs((double)ty[t]) > ymax) ymax = fabs((double)ty[t]);
        for (t = 0; t < T; ++t) {
            int64_t i;
            if (memcmp(idx + t * K, tidx + t * K, sizeof(int32_t) * (size_t)K) != 0) continue;
            ++same_tokens;
            for (i = t * D; i < (t + 1) * D; ++i) {
                double dd = fabs((double)y[i] - (double)ty[i]);
                if (!(dd <= dmax)) dmax = dd;
            }
        }
        diff = ymax > 0.0 ? dmax / ymax : dmax;
    }
    remove(out_path);

    /* routed experts 6 T k d F, shared 6 T d SF, router 2 T d E */
    flop = 6.0 * (double)T * K * D * F + 6.0 * (double)T * D * SF + 2.0 * (double)T * D * E;
    printf("\n### DeepSeek-V3-shaped layer (T %lld, d_model %d, d_ff %d, E %d, top-%d, %d groups / top-%d, sigmoid + "
           "selection bias, routed scaling %g, shared expert d_ff %d; fp32, one rank; %.1f GFLOP)\n\n",
           (long long)T, D, F, E, K, desc.num_groups, desc.topk_groups, (double)desc.routed_scaling_factor, SF,
           flop * 1e-9);
    printf("| router ms | layer ms | router share (goal <= 5%%) | PyTorch ms | layer / PyTorch (goal <= 0.6) | max rel. "
           "diff | threads | kernel path |\n|---|---|---|---|---|---|---|---|\n");
    printf("| %.2f | %.2f | %.1f%% | ", route, ours, 100.0 * route / ours);
    if (torch > 0) printf("%.1f | %.3f | ", torch, ours / torch);
    else printf("n/a | n/a | ");
    if (have_torch) printf("%.1e | ", diff);
    else printf("n/a | ");
    printf("%d | %s |\n", threads, moe_ep_kernel_path());
    printf("\nmedians over %d rounds: moe_ep_route and moe_ep_forward alternately %d x %d times (after 2 warm-ups); "
           "PyTorch %d runs of %s (OMP_WAIT_POLICY=PASSIVE, torch.set_num_threads(%d)), each its own median of %d "
           "after 3 warm-ups; its router (gate + route_tokens_to_experts) alone: %.2f ms. The router's logits "
           "(T x d_model x E) as one OpenBLAS sgemm, same rounds: %.2f ms. moe_ep: %.1f GF/s over the layer, "
           "%.1f GF/s without its router.\n", g_rounds, g_rounds, g_reps, nt, g_deepseek_script, threads, g_reps,
           torch_route, logits_gemm, flop / ours * 1e-6, (flop - 2.0 * (double)T * D * E) / (ours - route) * 1e-6);
    if (have_torch)
        printf("same layer: %lld of %lld tokens chose the same %d experts as PyTorch; max rel. diff = max |y - "
               "y_torch| over those tokens / max |y_torch|; checksum sum(y) %.6e, sum|y| %.6e (the PyTorch line "
               "prints its own).\n", (long long)same_tokens, (long long)T, K, sum, asum);
    else
        printf("same layer: no PyTorch output to compare with; checksum sum(y) %.6e, sum|y| %.6e\n", sum, asum);
    if (torch_note[0]) printf("PyTorch's last run: %s", torch_note);
    fflush(stdout);
    moe_ep_destroy(ctx);
    free(router); free(bias); free(x); free(y); free(ty); free(idx); free(tidx); free(weight); free(to); free(tr);
    free(tg); free(logits);
}

/* OpenBLAS 0.3.21 (Debian 12) does not know recent Intel models (e.g. family 6 model 207) and
   falls back to its Prescott (SSE3) kernels, ~5x below its AVX-512 ones; the anchors (our
   OpenBLAS calls and PyTorch, which loads the same library) would be that much weaker. Unless
   the caller chose a core, name the right one and start again (the PyTorch runs inherit it). */
static void openblas_core_fix(char** argv) {
    const char* core = NULL;
    if (getenv("OPENBLAS_CORETYPE") || strcmp(openblas_get_corename(), "Prescott") != 0) return;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) core = "SkylakeX";
    else if (__builtin_cpu_supports("avx2")) core = "Haswell";
#endif
    if (!core) return;
    setenv("OPENBLAS_CORETYPE", core, 1);
    execv("/proc/self/exe", argv);
    fprintf(stderr, "cpu_bench: could not restart with OPENBLAS_CORETYPE=%s; OpenBLAS keeps %s here\n", core,
            openblas_get_corename());
}

int main(int argc, char** argv) {
    int want[6] = { 0, 0, 0, 0, 0, 0 }, any = 0, i;
    static const char* const names[6] = { "gemm", "cblas", "comm", "layer", "decode", "deepseek" };
    bench_model model = { 0 };
    for (i = 1; i < argc; ++i) {
        int s, found = 0;
        if (strcmp(argv[i], "--reps") == 0 && i + 1 < argc) { g_reps = atoi(argv[++i]); continue; }
        if (strcmp(argv[i], "--rounds") == 0 && i + 1 < argc) { g_rounds = atoi(argv[++i]); continue; }
        if (strcmp(argv[i], "--python") == 0 && i + 1 < argc) { g_python = argv[++i]; continue; }
        if (strcmp(argv[i], "--biases") == 0) { g_biases = 1; continue; }
        if (strcmp(argv[i], "--torch-script") == 0 && i + 1 < argc) { g_torch_script = argv[++i]; continue; }
        if (strcmp(argv[i], "--deepseek-script") == 0 && i + 1 < argc) { g_deepseek_script = argv[++i]; continue; }
        for (s = 0; s < 6; ++s)
            if (strcmp(argv[i], names[s]) == 0) want[s] = found = any = 1;
        if (!found) {
            fprintf(stderr, "usage: cpu_bench [gemm] [cblas] [comm] [layer] [decode] [deepseek] [--reps N] [--rounds N] "
                            "[--python PATH] [--torch-script PATH] [--deepseek-script PATH] [--biases]\n");
            return 2;
        }
    }
    if (g_reps < 1 || g_reps > MAX_REPS / 3) g_reps = 11;
    if (g_rounds < 1 || g_rounds > 16) g_rounds = 3;
    if (!any) for (i = 0; i < 6; ++i) want[i] = 1;
    openblas_core_fix(argv);
    printf("moe_ep cpu_bench: kernel path %s (MR %d, NR %d), %d OpenMP threads, OpenBLAS %s, core %s (OPENBLAS_CORETYPE "
           "%s)\n", moe_ep_kernel_path(), default_path()->mr, default_path()->nr, threads_available(), openblas_get_config(),
           openblas_get_corename(), getenv("OPENBLAS_CORETYPE") ? getenv("OPENBLAS_CORETYPE") : "unset");
    if (want[0] || want[1] || want[2] || want[3] || want[4]) model_init(&model);
    if (want[0]) section_gemm(&model);
    if (want[1]) section_cblas(&model);
    if (want[2]) section_comm(&model);
    if (want[3]) section_layer(&model);
    if (want[4]) section_decode(&model);
    model_free(&model);
    if (want[5]) section_deepseek();
    return 0;
}
