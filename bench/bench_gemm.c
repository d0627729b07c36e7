/* bench_gemm -- the experts stage alone on one GPU: the Hopper grouped GEMM
   (moe_ep_cuda_gemm.cuh: gate+up with SwiGLU in its epilogue, then down) against cuBLAS
   as the GPU layer used it before (one cublasGemmEx per expert for gate+up, the activation
   kernel, one cublasGemmEx per expert for down), on the same random bf16 rows and weights.

   Configurations: the GPU-experts issue's three at 4096 tokens (rows per expert = tokens x
   top-k / experts, balanced; seed and deepseek-lite also with the uneven rows that random
   routing gives, where most experts end in a part tile), and the seed's rows on a rank of a
   4-GPU job (16 experts x 512 rows). Each timing is the median of 9 rounds of 10 back-to-back runs between two
   events, after 3 warm-up runs. FLOP counted: 6 x rows x d x ff (gate, up, down).
   Prints a table; exit 77 without a GPU, 0 with the table, 1 on a CUDA error. */
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../moe_ep_cuda_kernels.cuh"

int bench_fill(void* p, size_t n, int bf16, float scale, unsigned long long seed, void* stream);

typedef struct config {
    const char* name;
    int experts, rows, d, ff;
    int top_k;      /* > 0: rows per expert as routing gives them (4096 tokens, top_k distinct experts
                       each, uniformly at random, a fixed seed), rows = their mean; 0: balanced */
} config;

#define CU(call) do { cudaError_t e_ = (call); if (e_ != cudaSuccess) { \
    fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); exit(1); } } while (0)
#define BL(call) do { cublasStatus_t s_ = (call); if (s_ != CUBLAS_STATUS_SUCCESS) { \
    fprintf(stderr, "%s:%d %s: status %d\n", __FILE__, __LINE__, #call, (int)s_); exit(1); } } while (0)

typedef struct bufs {
    const config* c;
    void *rows, *w_up, *w_down, *hidden, *out;
    int64_t* first;
    const int64_t* first_host;
    cublasHandle_t blas;
    cudaStream_t stream;
} bufs;

static int g_part = 3;     /* 1: gate+up only, 2: down only, 3: both; 4: gate+up as a plain GEMM (no activation) */

static void run_ours(const bufs* b) {
    const config* c = b->c;
    moe_ep__cuda_k_gemm_args g;
    memset(&g, 0, sizeof g);
    g.a = b->rows; g.a_rows = (int64_t)c->experts * c->rows; g.lda = c->d;
    g.w = b->w_up; g.w_rows = 2 * (int64_t)c->ff; g.first_row = b->first; g.experts = c->experts;
    g.k = c->d; g.n = c->ff; g.mode = 1; g.up_offset = c->ff; g.activation = 1;
    g.out = b->hidden; g.ldo = c->ff;
    if (g_part == 4) { g.mode = 0; g.n = 2 * c->ff; g.up_offset = 0; g.ldo = 2 * (int64_t)c->ff; }
    if (g_part & 5) CU((cudaError_t)moe_ep__cuda_k_gemm(&g, b->stream));
    if (!(g_part & 2)) return;
    g.a = b->hidden; g.lda = c->ff; g.w = b->w_down; g.w_rows = c->d; g.k = c->ff; g.n = c->d; g.mode = 0;
    g.up_offset = 0; g.out = b->out; g.ldo = c->d;
    CU((cudaError_t)moe_ep__cuda_k_gemm(&g, b->stream));
}

static void run_cublas(const bufs* b) {
    const config* c = b->c;
    float one = 1.0f, zero = 0.0f;
    moe_ep__cuda_k_act act;
    int l;
    size_t up = 2 * (size_t)c->ff;
    memset(&act, 0, sizeof act);
    act.activation = 1;
    for (l = 0; (g_part & 1) && l < c->experts; ++l) {
        size_t r0 = (size_t)b->first_host[l];
        int n = (int)(b->first_host[l + 1] - b->first_host[l]);
        if (n == 0) continue;
        BL(cublasGemmEx(b->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)up, n, c->d, &one,
                        (char*)b->w_up + (size_t)l * up * (size_t)c->d * 2, CUDA_R_16BF, c->d,
                        (char*)b->rows + r0 * (size_t)c->d * 2, CUDA_R_16BF, c->d, &zero,
                        (char*)b->hidden + r0 * up * 2, CUDA_R_16BF, (int)up, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
    if (g_part & 1) CU((cudaError_t)moe_ep__cuda_k_activation(b->hidden, (int64_t)c->experts * c->rows, c->ff, (int64_t)up, &act,
                                              MOE_EP__CUDA_K_BF16, b->stream));
    for (l = 0; (g_part & 2) && l < c->experts; ++l) {
        size_t r0 = (size_t)b->first_host[l];
        int n = (int)(b->first_host[l + 1] - b->first_host[l]);
        if (n == 0) continue;
        BL(cublasGemmEx(b->blas, CUBLAS_OP_T, CUBLAS_OP_N, c->d, n, c->ff, &one,
                        (char*)b->w_down + (size_t)l * (size_t)c->d * (size_t)c->ff * 2, CUDA_R_16BF, c->ff,
                        (char*)b->hidden + r0 * up * 2, CUDA_R_16BF, (int)up, &zero,
                        (char*)b->out + r0 * (size_t)c->d * 2, CUDA_R_16BF, c->d, CUBLAS_COMPUTE_32F,
                        CUBLAS_GEMM_DEFAULT));
    }
}

static int cmp_float(const void* a, const void* b) {
    float x = *(const float*)a, y = *(const float*)b;
    return x < y ? -1 : x > y;
}

/* median ms per run */
static float time_it(void (*fn)(const bufs*), const bufs* b) {
    cudaEvent_t e0, e1;
    float ms[9];
    int i, j;
    CU(cudaEventCreate(&e0));
    CU(cudaEventCreate(&e1));
    for (i = 0; i < 3; ++i) fn(b);
    for (i = 0; i < 9; ++i) {
        CU(cudaEventRecord(e0, b->stream));
        for (j = 0; j < 10; ++j) fn(b);
        CU(cudaEventRecord(e1, b->stream));
        CU(cudaEventSynchronize(e1));
        CU(cudaEventElapsedTime(&ms[i], e0, e1));
        ms[i] /= 10.0f;
    }
    qsort(ms, 9, sizeof ms[0], cmp_float);
    CU(cudaEventDestroy(e0));
    CU(cudaEventDestroy(e1));
    return ms[4];
}

int main(void) {
    static const config configs[] = {
        { "seed 64e top-2 (4096 tokens)", 64, 128, 2048, 1408, 0 },
        { "  the same, routed rows", 64, 128, 2048, 1408, 2 },
        { "deepseek-lite 64e top-6", 64, 384, 2048, 1408, 0 },
        { "  the same, routed rows", 64, 384, 2048, 1408, 6 },
        { "mixtral 8e top-2", 8, 1024, 4096, 14336, 0 },
        { "seed, a rank of 4: 16e x 512", 16, 512, 2048, 1408, 0 },
        { "16e x 4096 (large experts)", 16, 4096, 2048, 1408, 0 },
    };
    int gpus = 0;
    size_t i;
    if (cudaGetDeviceCount(&gpus) != cudaSuccess || gpus == 0) {
        printf("bench_gemm: no GPU, skipped\n");
        return 77;
    }
    if (!moe_ep__cuda_k_gemm_ready()) {
        printf("bench_gemm: the grouped GEMM does not run on this GPU (not compute capability 9.0, or no sm_90a code)\n");
        return 77;
    }
    printf("%-32s %8s %8s %10s %10s %9s %9s %7s\n", "config", "rows", "GFLOP", "ours ms", "cuBLAS ms", "ours TF/s",
           "cuBLAS TF/s", "ratio");
    for (i = 0; i < sizeof configs / sizeof configs[0]; ++i) {
        const config* c = &configs[i];
        bufs b;
        int64_t total = (int64_t)c->experts * c->rows, l;
        int64_t* first = (int64_t*)malloc(((size_t)c->experts + 1) * 8);
        double flop = 6.0 * (double)total * c->d * c->ff;
        float ours, theirs;
        memset(&b, 0, sizeof b);
        b.c = c;
        CU(cudaStreamCreate(&b.stream));
        BL(cublasCreate(&b.blas));
        BL(cublasSetStream(b.blas, b.stream));
        CU(cudaMalloc(&b.rows, (size_t)total * (size_t)c->d * 2));
        CU(cudaMalloc(&b.w_up, (size_t)c->experts * 2 * (size_t)c->ff * (size_t)c->d * 2));
        CU(cudaMalloc(&b.w_down, (size_t)c->experts * (size_t)c->ff * (size_t)c->d * 2));
        CU(cudaMalloc(&b.hidden, (size_t)total * 2 * (size_t)c->ff * 2));
        CU(cudaMalloc(&b.out, (size_t)total * (size_t)c->d * 2));
        CU(cudaMalloc((void**)&b.first, ((size_t)c->experts + 1) * 8));
        if (c->top_k > 0) {     /* 4096 tokens, each to top_k distinct experts drawn at random */
            int64_t* count = (int64_t*)calloc((size_t)c->experts, 8);
            uint64_t s = 0x9E3779B97F4A7C15ull;
            int t, j, e, taken[64];
            for (t = 0; t < 4096; ++t) {
                for (j = 0; j < c->top_k; ++j) {
                    int dup;
                    do {
                        s = s * 6364136223846793005ull + 1442695040888963407ull;
                        e = (int)((s >> 33) % (uint64_t)c->experts);
                        for (dup = 0, l = 0; l < j; ++l) dup |= taken[l] == e;
                    } while (dup);
                    taken[j] = e;
                    ++count[e];
                }
            }
            for (first[0] = 0, l = 0; l < c->experts; ++l) first[l + 1] = first[l] + count[l];
            free(count);
        } else {
            for (l = 0; l <= c->experts; ++l) first[l] = l * c->rows;
        }
        b.first_host = first;
        CU(cudaMemcpy(b.first, first, ((size_t)c->experts + 1) * 8, cudaMemcpyHostToDevice));
        CU((cudaError_t)bench_fill(b.rows, (size_t)total * (size_t)c->d, 1, 1.0f, 1, b.stream));
        CU((cudaError_t)bench_fill(b.w_up, (size_t)c->experts * 2 * (size_t)c->ff * (size_t)c->d, 1, 0.02f, 2, b.stream));
        CU((cudaError_t)bench_fill(b.w_down, (size_t)c->experts * (size_t)c->ff * (size_t)c->d, 1, 0.02f, 3, b.stream));
        {   /* the whole stage, then its parts: gate+up (ours with SwiGLU, and as a plain GEMM), down */
            static const char* parts[] = { "", "  gate+up", "  down", "both", "  gate+up, no act" };
            static const int order[] = { 3, 1, 4, 2 };
            int j;
            for (j = 0; j < 4; ++j) {
                double f = order[j] == 3 ? flop : order[j] == 2 ? flop / 3.0 : 2.0 * flop / 3.0;
                g_part = order[j];
                ours = time_it(run_ours, &b);
                g_part = order[j] == 4 ? 1 : order[j];
                theirs = time_it(run_cublas, &b);
                printf("%-32s %8lld %8.1f %10.3f %10.3f %9.0f %9.0f %7.3f  %s\n", j ? "" : c->name, (long long)total,
                       f / 1e9, ours, theirs, f / (ours * 1e9), f / (theirs * 1e9), ours / theirs, parts[order[j]]);
            }
            g_part = 3;
        }
        cudaFree(b.rows); cudaFree(b.w_up); cudaFree(b.w_down); cudaFree(b.hidden); cudaFree(b.out); cudaFree(b.first);
        cublasDestroy(b.blas);
        cudaStreamDestroy(b.stream);
        free(first);
    }
    return 0;
}
