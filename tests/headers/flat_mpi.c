/* The MPI transport from a flat folder of headers, the core included first
   (make check-mpi-headers). */
#define MOE_EP_IMPLEMENTATION
#include "moe_ep.h"
#include "moe_ep_mpi.h"
