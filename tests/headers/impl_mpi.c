/* The MPI transport's implementation (make check-mpi-headers). */
#define MOE_EP_IMPLEMENTATION
#include "../../transports/moe_ep_mpi.h"
