// The MPI transport's declarations must compile as C++.
#include "../../transports/moe_ep_mpi.h"
int f(void) { return (int)MOE_EP_RESULT_COUNT; }
