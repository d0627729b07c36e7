// The declarations must compile as C++.
#include "../../moe_ep.h"
#include "../../transports/moe_ep_pthreads.h"
#include "../../moe_ep_safetensors.h"
int f(void) { return (int)MOE_EP_RESULT_COUNT + (int)MOE_EP_ST_DTYPE_COUNT; }
