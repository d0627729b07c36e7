/* The core and the pthreads transport as one translation unit (make check-headers). */
#define MOE_EP_IMPLEMENTATION
#include "../../transports/moe_ep_pthreads.h"
