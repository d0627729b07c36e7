/* The headers vendored into one flat folder (make check-headers copies them into
   build/headers/flat and compiles this file with only that folder on the include path):
   the core included first, or (FLAT_TRANSPORT_ONLY) the transport alone with
   MOE_EP_CORE_HEADER naming the core. Either way the transport must not look for
   "../moe_ep.h", which is not there. */
#define MOE_EP_IMPLEMENTATION
#ifndef FLAT_TRANSPORT_ONLY
#include "moe_ep.h"
#endif
#include "moe_ep_pthreads.h"

#include <stdio.h>

int main(void) {
    moe_ep_pthreads_world* world = NULL;
    moe_ep_pthreads_desc desc = { 0 };
    moe_ep_result res;
    desc.world_size = 2;
    res = moe_ep_pthreads_world_create(&desc, &world);
    moe_ep_pthreads_world_destroy(world);
    printf("flat folder: moe_ep %s, pthreads world: %s\n", moe_ep_version(), moe_ep_result_string(res));
    return res == MOE_EP_OK ? 0 : 1;
}
