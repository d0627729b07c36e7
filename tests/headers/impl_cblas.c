/* MOE_EP_CBLAS: the expert kernel on the system's CBLAS (make check-kernels). */
#define MOE_EP_CBLAS
#define MOE_EP_IMPLEMENTATION
#include "../../moe_ep.h"
