/* MOE_EP_STATIC: the implementation with internal linkage, linked into a program. */
#define MOE_EP_STATIC
#define MOE_EP_IMPLEMENTATION
#include "../../moe_ep.h"
int main(void) { return moe_ep_result_string(MOE_EP_OK)[0] == 0; }
