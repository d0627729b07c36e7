/* The NCCL transport alone, strict C99 (make check-nccl). */
#define MOE_EP_IMPLEMENTATION
#include "../../transports/moe_ep_nccl.h"
