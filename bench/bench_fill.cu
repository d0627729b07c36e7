/* The CUDA half of bench_nccl: moe_ep's kernels, and a random fill so that gigabytes of
   expert weights need not cross from the host. */
#define MOE_EP_CUDA_KERNELS_IMPLEMENTATION
#include "../moe_ep_cuda_kernels.cuh"

#include <cuda_bf16.h>

/* uniform in [-scale, scale) from a counter hash (splitmix64) */
__device__ static float bench_uniform(unsigned long long seed, unsigned long long i) {
    unsigned long long z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)(z >> 40) / 8388608.0f - 1.0f;
}

__global__ static void bench_fill_kernel(void* p, size_t n, int bf16, float scale, unsigned long long seed) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float v = scale * bench_uniform(seed, i);
        if (bf16) ((__nv_bfloat16*)p)[i] = __float2bfloat16_rn(v);
        else ((float*)p)[i] = v;
    }
}

extern "C" int bench_fill(void* p, size_t n, int bf16, float scale, unsigned long long seed, void* stream) {
    if (n == 0) return 0;
    bench_fill_kernel<<<4096, 256, 0, (cudaStream_t)stream>>>(p, n, bf16, scale, seed);
    return (int)cudaGetLastError();
}
