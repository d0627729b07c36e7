/* The CUDA half of the GPU tests: moe_ep's kernels, built once by nvcc. */
#define MOE_EP_NCCL_KERNELS_IMPLEMENTATION
#include "../../transports/moe_ep_nccl_kernels.cuh"
