/* edge_bench.c -- the layer at the memory limit: weight formats in decode and prefill.

   One rank, d_model 1024, d_ff 2816, 8 experts, top-2, SwiGLU (the shape), on
   --threads threads (default: OpenMP's). For each weight format (fp32, bf16, fp16, int8):

   - decode, 1, 4 and 16 tokens: the layer's median time over --reps calls, each after a
     1 GiB read that evicts the weights from every cache (the weights then come from
     memory, as on a board whose cache is far smaller than its experts); tokens/s, and the
     bytes of expert weights the call streamed (the experts its tokens chose, at the
     format's size) per second, against a plain read loop over 1 GiB on the same threads,
     measured in the same run (median of --reps);
   - with --evict 0, the weights are not evicted (what stays in the last-level cache is read
     from there);
   - prefill, --prefill tokens (default 1024): median time over 3 calls;
   - weight memory of the rank (moe_ep_weight_bytes).
   The last row, "bf16 dot", is bf16 weights with the opt-in BF16_DOT arithmetic (activations
   rounded to bf16, vdpbf16ps where the CPU has AVX512-BF16); on a CPU without it its portable
   emulation is far slower and the row is left out unless --kernel portable asks for it.

   Prints a Markdown table. The kernel path is the one this build picks (--kernel forces
   one: portable, avx2, avx512, neon). make bench-edge builds it plainly (-O2) and with
   -march=native. */
#define _POSIX_C_SOURCE 200809L   /* clock_gettime */
#define MOE_EP_IMPLEMENTATION
#include "../moe_ep.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_util.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#define D_MODEL 1024
#define D_FF 2816
#define EXPERTS 8
#define TOP_K 2
#define FLUSH_BYTES ((size_t)1 << 30)


static void fill(float* v, size_t n, float scale, uint64_t* state) {
    size_t i;
    for (i = 0; i < n; ++i) {
        *state = *state * 6364136223846793005ull + 1442695040888963407ull;
        v[i] = scale * ((float)(*state >> 40) / 8388608.0f - 1.0f);
    }
}

static volatile uint64_t g_sink;

/* The plain read loop: every 8-byte word of buf summed, the buffer split over the threads. */
static double read_seconds(const uint64_t* buf, size_t words, int threads) {
    double t0 = bench_now();
    uint64_t total = 0;
    long long chunk = (long long)(words / (size_t)threads);
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(+ : total)
#endif
    {
        int me = 0;
        const uint64_t* p;
        uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        long long i;
#ifdef _OPENMP
        me = omp_get_thread_num();
#endif
        p = buf + (size_t)me * (size_t)chunk;
        for (i = 0; i + 4 <= chunk; i += 4) {
            s0 += p[i];
            s1 += p[i + 1];
            s2 += p[i + 2];
            s3 += p[i + 3];
        }
        total += s0 + s1 + s2 + s3;
    }
    g_sink = total;
    (void)threads;
    return bench_now() - t0;
}

int main(int argc, char** argv) {
    static const moe_ep_weight_format formats[] = { MOE_EP_WEIGHT_FORMAT_FP32, MOE_EP_WEIGHT_FORMAT_BF16,
                                                    MOE_EP_WEIGHT_FORMAT_FP16, MOE_EP_WEIGHT_FORMAT_INT8,
                                                    MOE_EP_WEIGHT_FORMAT_BF16 };
    static const moe_ep_arithmetic arithmetic[] = { MOE_EP_ARITHMETIC_EXACT, MOE_EP_ARITHMETIC_EXACT,
                                                    MOE_EP_ARITHMETIC_EXACT, MOE_EP_ARITHMETIC_EXACT,
                                                    MOE_EP_ARITHMETIC_BF16_DOT };
    static const char* const names[] = { "fp32", "bf16", "fp16", "int8", "bf16 dot" };
    static const char* const kernels[] = { "default", "portable", "avx2", "avx512", "neon" };
    static const int decode_tokens[] = { 1, 4, 16 };
    int threads = 1, reps = 9, prefill = 1024, f, i, r, kernel = 0, evict = 1, rows = 5;
    size_t per = (size_t)D_MODEL * D_FF, flush_words = FLUSH_BYTES / 8;
    uint64_t state = 12345;
    float* weights;
    float* router;
    float* x;
    float* y;
    int32_t* idx;
    float* topk_weight;
    uint64_t* flush;
    moe_ep_expert_weights experts[EXPERTS];
    double times[64], read_bw, tokens_per_s[5][3], bytes_per_s[5][3], prefill_s[5];
    int64_t weight_bytes[5];
    const char* dot_kernel = "";
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    for (i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--threads") == 0) threads = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--reps") == 0) reps = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--prefill") == 0) prefill = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--evict") == 0) evict = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--kernel") == 0) {
            for (kernel = 4; kernel > 0 && strcmp(argv[i + 1], kernels[kernel]) != 0; --kernel) {}
        } else {
            fprintf(stderr, "usage: %s [--threads N] [--reps N] [--prefill TOKENS] [--kernel NAME] [--evict 0|1]\n",
                    argv[0]);
            return 2;
        }
    }
    if (threads < 1) threads = 1;
    if (reps < 1 || reps > 63) reps = 9;
    if (prefill < 16) prefill = 16;
    weights = (float*)malloc(sizeof(float) * 3 * per * EXPERTS);
    router = (float*)malloc(sizeof(float) * EXPERTS * D_MODEL);
    x = (float*)malloc(sizeof(float) * (size_t)prefill * D_MODEL);
    y = (float*)malloc(sizeof(float) * (size_t)prefill * D_MODEL);
    idx = (int32_t*)malloc(sizeof(int32_t) * (size_t)prefill * TOP_K);
    topk_weight = (float*)malloc(sizeof(float) * (size_t)prefill * TOP_K);
    flush = (uint64_t*)malloc(FLUSH_BYTES);
    if (!weights || !router || !x || !y || !idx || !topk_weight || !flush) {
        fprintf(stderr, "edge_bench: out of memory\n");
        return 1;
    }
    memset(flush, 1, FLUSH_BYTES);
    fill(weights, 3 * per * EXPERTS, 0.03f, &state);
    fill(router, (size_t)EXPERTS * D_MODEL, 0.1f, &state);
    fill(x, (size_t)prefill * D_MODEL, 1.0f, &state);
    memset(experts, 0, sizeof experts);
    for (i = 0; i < EXPERTS; ++i) {
        experts[i].w1 = weights + (size_t)i * 3 * per;
        experts[i].w3 = experts[i].w1 + per;
        experts[i].w2 = experts[i].w3 + per;
    }
    for (r = 0; r < reps; ++r) times[r] = read_seconds(flush, flush_words, threads);
    read_bw = (double)FLUSH_BYTES / bench_median(times, reps);

    for (f = 0; f < 5; ++f) {
        moe_ep_context* ctx = NULL;
        moe_ep_forward_args args;
        char err[512] = "";
        int t;
        /* the dot arithmetic runs on AVX512_BF16 or the portable emulation: the default, or portable if asked */
        moe_ep_kernel k = f < 4 || kernel == MOE_EP_KERNEL_PORTABLE ? (moe_ep_kernel)kernel : MOE_EP_KERNEL_DEFAULT;
        if (moe_ep_create(&(moe_ep_desc){ .d_model = D_MODEL, .d_ff = D_FF, .num_experts = EXPERTS, .top_k = TOP_K,
                                          .num_threads = threads, .router_weight = router, .experts = experts,
                                          .weight_format = formats[f], .arithmetic = arithmetic[f], .kernel = k,
                                          .create_error = err, .create_error_size = sizeof err }, &ctx) != MOE_EP_OK) {
            fprintf(stderr, "edge_bench: %s: %s\n", names[f], err);
            return 1;
        }
        if (f == 4) {
            dot_kernel = moe_ep_kernel_string(moe_ep_query(ctx).kernel);
            if (moe_ep_query(ctx).kernel == MOE_EP_KERNEL_PORTABLE && kernel != MOE_EP_KERNEL_PORTABLE) {
                printf("bf16 dot: not run (no AVX512-BF16 here; --kernel portable runs the emulation)\n\n");
                moe_ep_destroy(ctx);
                rows = 4;
                break;
            }
        }
        if (f == 0) printf("edge_bench: kernel %s, %d threads, d_model %d, d_ff %d, %d experts, top-%d\n\n",
                           moe_ep_kernel_string(moe_ep_query(ctx).kernel), threads, D_MODEL, D_FF, EXPERTS, TOP_K);
        weight_bytes[f] = moe_ep_weight_bytes(ctx);
        for (t = 0; t < 3; ++t) {
            int T = decode_tokens[t], chosen[EXPERTS] = { 0 }, distinct = 0;
            memset(&args, 0, sizeof args);
            args.tokens = T;
            args.x = x;
            args.y = y;
            args.topk_idx = idx;
            args.topk_weight = topk_weight;
            for (r = 0; r < reps; ++r) {
                double t0;
                if (evict) read_seconds(flush, flush_words, threads);   /* the weights out of every cache */
                t0 = bench_now();
                if (moe_ep_forward(ctx, &args) != MOE_EP_OK) {
                    fprintf(stderr, "edge_bench: %s: %s\n", names[f], moe_ep_last_error(ctx));
                    return 1;
                }
                times[r] = bench_now() - t0;
            }
            for (i = 0; i < T * TOP_K; ++i) chosen[idx[i]] = 1;
            for (i = 0; i < EXPERTS; ++i) distinct += chosen[i];
            tokens_per_s[f][t] = (double)T / bench_median(times, reps);
            bytes_per_s[f][t] = (double)weight_bytes[f] / EXPERTS * distinct * tokens_per_s[f][t] / T;
        }
        memset(&args, 0, sizeof args);
        args.tokens = prefill;
        args.x = x;
        args.y = y;
        if (moe_ep_forward(ctx, &args) != MOE_EP_OK) {      /* warms the workspaces */
            fprintf(stderr, "edge_bench: %s: %s\n", names[f], moe_ep_last_error(ctx));
            return 1;
        }
        for (r = 0; r < 3; ++r) {
            double t0 = bench_now();
            moe_ep_forward(ctx, &args);
            times[r] = bench_now() - t0;
        }
        prefill_s[f] = bench_median(times, 3);
        moe_ep_destroy(ctx);
    }
    printf("plain read loop (1 GiB, %d threads): %.2f GB/s\n\n", threads, read_bw * 1e-9);
    if (rows == 5) printf("bf16 dot: the BF16_DOT arithmetic on the %s kernel\n\n", dot_kernel);
    printf("| format | weights per rank (MiB) | decode tokens | tokens/s | x fp32 | weight GB/s | x read loop |\n"
           "|---|---|---|---|---|---|---|\n");
    for (f = 0; f < rows; ++f)
        for (i = 0; i < 3; ++i)
            printf("| %s | %.1f | %d | %.1f | %.2f | %.2f | %.2f |\n", names[f], (double)weight_bytes[f] / 1048576.0,
                   decode_tokens[i], tokens_per_s[f][i], tokens_per_s[f][i] / tokens_per_s[0][i],
                   bytes_per_s[f][i] * 1e-9, bytes_per_s[f][i] / read_bw);
    printf("\n| format | prefill %d tokens (s) | tokens/s | x fp32 | x bf16 |\n|---|---|---|---|---|\n", prefill);
    for (f = 0; f < rows; ++f)
        printf("| %s | %.3f | %.0f | %.2f | %.2f |\n", names[f], prefill_s[f], prefill / prefill_s[f],
               prefill_s[0] / prefill_s[f], prefill_s[1] / prefill_s[f]);
    free(weights); free(router); free(x); free(y); free(idx); free(topk_weight); free(flush);
    return 0;
}
