/* MOE_EP_STATIC: the implementation with internal linkage, linked into a program (the loader too). */
#define MOE_EP_STATIC
#define MOE_EP_IMPLEMENTATION
#include "../../moe_ep.h"
#include "../../moe_ep_safetensors.h"
int main(void) { return moe_ep_result_string(MOE_EP_OK)[0] == 0 || moe_ep_st_dtype_string(MOE_EP_ST_F32)[0] == 0; }
