// The GPU layer as one nvcc (C++) file, its kernels inside (make check-nccl).
#define MOE_EP_IMPLEMENTATION
#include "../../moe_ep_cuda.h"
