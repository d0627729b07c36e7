/* The core, the pthreads transport and the checkpoint loader as one translation unit (make check-headers). */
#define MOE_EP_IMPLEMENTATION
#include "../../transports/moe_ep_pthreads.h"
#include "../../moe_ep_safetensors.h"
