/* The CUDA half of the GPU tests: moe_ep's kernels, built once by nvcc. */
#define MOE_EP_CUDA_KERNELS_IMPLEMENTATION
#include "../../moe_ep_cuda_kernels.cuh"
