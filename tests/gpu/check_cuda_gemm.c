/* check_cuda_gemm -- the Hopper grouped expert GEMM (moe_ep_cuda_gemm.cuh) against cuBLAS, one GPU.

   Each case draws fresh random bf16 rows and weights, groups the rows by expert (experts of
   0, 1, 7, 128, 129 and 4096 rows among them), and runs the grouped kernel in each of its
   modes: plain (bf16 and fp32 output), gated SwiGLU and the clamped SwiGLU with biases,
   GELU on each column. The reference is cuBLAS on the same rows, expert by expert
   (cublasGemmEx, bf16 in, fp32 out and compute), with the bias and the activation applied
   on the host in double. Facts:
   - relative error ||out - ref|| / ||ref|| <= 1e-2 (bf16 output) or 1e-5 (fp32 output);
   - every element of every expert's rows was written (the output is poisoned with NaN
     first) and rows past the last expert's end were not (they stay poison);
   - a second run gives the same bytes;
   - shapes the kernel does not take are refused (cudaErrorInvalidValue), not run.
   d and d_ff are multiples of 8 but not of the 64 x 128 tile. On a GPU other than Hopper, or
   a build without sm_90a code, the program says so and exits 77 (--require-gpu: 1). Without
   a GPU: "check_cuda_gemm: no GPU, skipped", exit 77. */
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../moe_ep_cuda_kernels.cuh"
#include "../support/test_support.h"
#include "gpu_check.h"

typedef struct gemm_case {
    const char* name;
    int experts;
    int64_t rows[8];        /* per expert; the rest of the experts get rows[i % 8] */
    int k, n, mode, activation, biases, out_f32;
    float alpha, limit;
} gemm_case;

static uint64_t g_seed = 0x5eed1234u;

static float uniform(uint64_t* s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)(z >> 40) / 8388608.0f - 1.0f;
}

static uint16_t* random_bf16(size_t n, float scale, uint64_t* s) {
    uint16_t* v = (uint16_t*)malloc(n * 2 + 2);
    size_t i;
    for (i = 0; i < n; ++i) v[i] = test_bf16_from_float(scale * uniform(s));
    return v;
}

static double act_ref(const gemm_case* c, double g, double u) {
    if (c->activation == 2) return 0.5 * g * (1.0 + erf(g * 0.70710678118654752));
    if (c->activation == 3) return g > 0.0 ? g : 0.0;
    if (c->activation == 4) {
        g = g < c->limit ? g : c->limit;
        u = u < -c->limit ? -c->limit : u > c->limit ? c->limit : u;
        return (u + 1.0) * (g / (1.0 + exp(-c->alpha * g)));
    }
    return g / (1.0 + exp(-g)) * u;
}

/* fp32 to bf16, round to nearest even (finite values) */
static uint16_t round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

#define CK(call) do { cudaError_t e_ = (call); if (e_ != cudaSuccess) { \
    gpu_fact(1, "%s: %s: %s", c->name, #call, cudaGetErrorString(e_)); goto done; } } while (0)

static void run_case(const gemm_case* c, cublasHandle_t blas) {
    int E = c->experts, l, gated = c->mode == 1, run;
    int64_t w_rows = gated ? 2 * (int64_t)c->n : c->n, total = 0, r, col;
    int64_t* first = (int64_t*)calloc((size_t)E + 1, sizeof(int64_t));
    size_t out_elem = c->out_f32 ? 4 : 2, out_rows, out_bytes;
    uint16_t *a = NULL, *w = NULL, *bias = NULL;
    void *da = NULL, *dw = NULL, *dbias = NULL, *dout = NULL;
    float *dref = NULL, *ref = NULL;
    unsigned char *out = NULL, *out2 = NULL, *out32 = NULL;
    int64_t* dfirst = NULL;
    double num = 0.0, den = 0.0;
    int64_t unwritten = 0, overwritten = 0, unrounded = 0;
    moe_ep__cuda_k_gemm_args g;
    uint64_t s = g_seed++;
    for (l = 0; l < E; ++l) {
        first[l] = total;
        total += c->rows[l % 8];
    }
    first[E] = total;
    out_rows = (size_t)total + 300;      /* 300 rows past the end must stay poison */
    out_bytes = out_rows * (size_t)c->n * out_elem;
    a = random_bf16((size_t)(total > 0 ? total : 1) * (size_t)c->k, 1.0f, &s);
    w = random_bf16((size_t)E * (size_t)w_rows * (size_t)c->k, 1.0f / sqrtf((float)c->k), &s);
    if (c->biases) bias = random_bf16((size_t)E * (size_t)w_rows, 0.5f, &s);
    ref = (float*)malloc((size_t)(total > 0 ? total : 1) * (size_t)w_rows * 4);
    out = (unsigned char*)malloc(out_bytes);
    out2 = (unsigned char*)malloc(out_bytes);
    CK(cudaMalloc(&da, (size_t)(total > 0 ? total : 1) * (size_t)c->k * 2));
    CK(cudaMalloc(&dw, (size_t)E * (size_t)w_rows * (size_t)c->k * 2));
    CK(cudaMalloc(&dout, out_bytes));
    CK(cudaMalloc((void**)&dref, (size_t)(total > 0 ? total : 1) * (size_t)w_rows * 4));
    CK(cudaMalloc((void**)&dfirst, ((size_t)E + 1) * 8));
    CK(cudaMemcpy(da, a, (size_t)total * (size_t)c->k * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dw, w, (size_t)E * (size_t)w_rows * (size_t)c->k * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dfirst, first, ((size_t)E + 1) * 8, cudaMemcpyHostToDevice));
    if (bias) {
        CK(cudaMalloc(&dbias, (size_t)E * (size_t)w_rows * 2));
        CK(cudaMemcpy(dbias, bias, (size_t)E * (size_t)w_rows * 2, cudaMemcpyHostToDevice));
    }
    /* the reference: ref[rows, w_rows] = a . W_l^T per expert, in fp32 */
    for (l = 0; l < E; ++l) {
        float one = 1.0f, zero = 0.0f;
        int64_t n = first[l + 1] - first[l];
        cublasStatus_t st;
        if (n == 0) continue;
        st = cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)w_rows, (int)n, c->k, &one,
                          (const char*)dw + (size_t)l * (size_t)w_rows * (size_t)c->k * 2, CUDA_R_16BF, c->k,
                          (const char*)da + (size_t)first[l] * (size_t)c->k * 2, CUDA_R_16BF, c->k, &zero,
                          dref + (size_t)first[l] * (size_t)w_rows, CUDA_R_32F, (int)w_rows, CUBLAS_COMPUTE_32F,
                          CUBLAS_GEMM_DEFAULT);
        if (st != CUBLAS_STATUS_SUCCESS) {
            gpu_fact(1, "%s: cublasGemmEx: status %d", c->name, (int)st);
            goto done;
        }
    }
    CK(cudaMemcpy(ref, dref, (size_t)total * (size_t)w_rows * 4, cudaMemcpyDeviceToHost));
    memset(&g, 0, sizeof g);
    g.a = da;
    g.a_rows = total;
    g.lda = c->k;
    g.w = dw;
    g.w_rows = w_rows;
    g.first_row = dfirst;
    g.experts = E;
    g.k = c->k;
    g.n = c->n;
    g.mode = c->mode;
    g.up_offset = gated ? c->n : 0;
    g.activation = c->activation;
    g.alpha = c->alpha;
    g.limit = c->limit;
    g.bias = dbias;
    g.bias_ld = w_rows;
    g.out = dout;
    g.ldo = c->n;
    g.out_f32 = c->out_f32;
    for (run = 0; run < 2; ++run) {
        CK(cudaMemset(dout, 0xFF, out_bytes));      /* NaN in bf16 and fp32 */
        CK((cudaError_t)moe_ep__cuda_k_gemm(&g, NULL));
        CK(cudaDeviceSynchronize());
        CK(cudaMemcpy(run ? out2 : out, dout, out_bytes, cudaMemcpyDeviceToHost));
    }
    if (!c->out_f32) {
        /* bf16 output is the fp32 output rounded: the same sums and epilogue, whichever way the
           kernel stores them (through shared memory or from registers) */
        size_t n32 = (size_t)total * (size_t)c->n, i;
        out32 = (unsigned char*)malloc(n32 * 4 + 4);
        g.out_f32 = 1;
        CK(cudaFree(dout));
        dout = NULL;
        CK(cudaMalloc(&dout, n32 * 4 + 4));
        g.out = dout;
        CK((cudaError_t)moe_ep__cuda_k_gemm(&g, NULL));
        CK(cudaDeviceSynchronize());
        CK(cudaMemcpy(out32, dout, n32 * 4, cudaMemcpyDeviceToHost));
        g.out_f32 = 0;
        for (i = 0; i < n32; ++i) {
            float f;
            uint16_t h;
            memcpy(&f, out32 + i * 4, 4);
            memcpy(&h, out + i * 2, 2);
            unrounded += h != round_bf16(f);
        }
        gpu_fact(unrounded != 0, "%s: bf16 output = the fp32 output rounded, bitwise (%lld differ)", c->name,
                 (long long)unrounded);
    }
    for (l = 0; l < E; ++l) {
        for (r = first[l]; r < first[l + 1]; ++r) {
            for (col = 0; col < c->n; ++col) {
                const float* rr = ref + (size_t)r * (size_t)w_rows;
                double b0 = bias ? test_bf16_to_float(bias[(size_t)l * (size_t)w_rows + (size_t)col]) : 0.0;
                double v = rr[col] + b0, got;
                if (gated) {
                    double b1 = bias ? test_bf16_to_float(bias[(size_t)l * (size_t)w_rows + (size_t)(c->n + col)]) : 0.0;
                    v = act_ref(c, v, rr[c->n + col] + b1);
                } else if (c->mode == 2) {
                    v = act_ref(c, v, 0.0);
                }
                if (c->out_f32) {
                    float f;
                    memcpy(&f, out + ((size_t)r * (size_t)c->n + (size_t)col) * 4, 4);
                    got = f;
                } else {
                    uint16_t h;
                    memcpy(&h, out + ((size_t)r * (size_t)c->n + (size_t)col) * 2, 2);
                    got = test_bf16_to_float(h);
                }
                if (got != got) ++unwritten;
                else num += (got - v) * (got - v);
                den += v * v;
            }
        }
    }
    {
        size_t i, from = (size_t)total * (size_t)c->n * out_elem;
        for (i = from; i < out_bytes; ++i) overwritten += out[i] != 0xFF;
    }
    {
        double err = den > 0.0 ? sqrt(num / den) : sqrt(num), tol = c->out_f32 ? 1e-5 : 1e-2;
        gpu_fact(unwritten != 0 || !(err <= tol), "%s: E=%d rows=%lld k=%d n=%d: rel.err %.2e (<= %.0e), %lld unwritten",
                 c->name, E, (long long)total, c->k, c->n, err, tol, (long long)unwritten);
        gpu_fact(overwritten != 0, "%s: rows past the last expert untouched (%lld bytes written there)", c->name,
                 (long long)overwritten);
        gpu_fact(memcmp(out, out2, (size_t)total * (size_t)c->n * out_elem) != 0, "%s: a second run, same bytes",
                 c->name);
    }
done:
    cudaFree(da);
    cudaFree(dw);
    cudaFree(dbias);
    cudaFree(dout);
    cudaFree(dref);
    cudaFree(dfirst);
    free(first);
    free(a);
    free(w);
    free(bias);
    free(ref);
    free(out);
    free(out2);
    free(out32);
}

/* Shapes the kernel does not take come back as cudaErrorInvalidValue, nothing queued. */
static void refusals(void) {
    moe_ep__cuda_k_gemm_args g, bad;
    int64_t* dfirst = NULL;
    void* buf = NULL;
    int i, refused = 0;
    if (cudaMalloc((void**)&dfirst, 16) != cudaSuccess || cudaMalloc(&buf, 1 << 20) != cudaSuccess) {
        gpu_fact(1, "refusals: cudaMalloc failed");
        goto done;
    }
    memset(&g, 0, sizeof g);
    g.a = buf; g.a_rows = 16; g.lda = 64; g.w = buf; g.w_rows = 64; g.first_row = dfirst; g.experts = 1;
    g.k = 64; g.n = 64; g.out = buf; g.ldo = 64;
    for (i = 0; i < 6; ++i) {
        bad = g;
        if (i == 0) bad.k = 60;                     /* not a multiple of 8 */
        if (i == 1) bad.experts = 0;
        if (i == 2) bad.a = (const char*)buf + 2;   /* not 16-byte aligned */
        if (i == 3) { bad.mode = 1; bad.up_offset = 32; }   /* up rows overlap the gate's */
        if (i == 4) bad.mode = 3;
        if (i == 5) bad.w_rows = 32;                /* fewer W rows than outputs */
        refused += moe_ep__cuda_k_gemm(&bad, NULL) == (int)cudaErrorInvalidValue;
    }
    gpu_fact(refused != 6, "refusals: %d of 6 bad shapes refused with cudaErrorInvalidValue", refused);
done:
    (void)cudaGetLastError();
    cudaFree(dfirst);
    cudaFree(buf);
}

static void run_size(int size) {
    static const gemm_case cases[] = {
        { "plain bf16", 6, { 0, 1, 7, 128, 129, 4096 }, 264, 392, 0, 0, 0, 0, 0, 0 },
        { "plain bf16, long K (stores from registers)", 3, { 129, 7, 300 }, 4104, 392, 0, 0, 0, 0, 0, 0 },
        { "plain bf16, part tiles (rows 65 to 127 past a tile start)", 5, { 100, 200, 65, 127, 191 }, 520, 264, 0, 0, 0, 0,
          0, 0 },
        { "plain fp32 out", 6, { 129, 0, 4096, 7, 1, 128 }, 1416, 2056, 0, 0, 0, 1, 0, 0 },
        { "gated SwiGLU", 6, { 7, 4096, 0, 129, 128, 1 }, 2056, 1416, 1, 1, 0, 0, 0, 0 },
        { "gated clamped SwiGLU + biases", 6, { 1, 129, 128, 0, 7, 4096 }, 520, 136, 1, 4, 1, 0, 1.702f, 7.0f },
        { "GELU on each column + biases", 5, { 300, 1, 0, 129, 64 }, 200, 264, 2, 2, 1, 0, 0, 0 },
        { "64 experts x 128 rows, gated (the seed's shape)", 64, { 128, 128, 128, 128, 128, 128, 128, 128 }, 2048,
          1408, 1, 1, 0, 0, 0, 0 },
    };
    cublasHandle_t blas = NULL;
    size_t i;
    if (size != 1) return;      /* one GPU: world size 1 only */
    if (!moe_ep__cuda_k_gemm_ready()) {
        int dev = 0, major = 0, minor = 0;
        cudaGetDevice(&dev);
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
        gpu_fact(major == 9 && minor == 0 && getenv("MOE_EP_REQUIRE_GPU") != NULL,
                 "grouped GEMM not available (compute capability %d.%d, or no sm_90a code in this build): skipped",
                 major, minor);
        return;
    }
    if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS) {
        gpu_fact(1, "cublasCreate failed");
        return;
    }
    for (i = 0; i < sizeof cases / sizeof cases[0]; ++i) run_case(&cases[i], blas);
    refusals();
    cublasDestroy(blas);
}

int main(int argc, char** argv) {
    return gpu_main(argc, argv, "check_cuda_gemm", 0, run_size, NULL);
}
