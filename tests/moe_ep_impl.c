/* The one translation unit of the test binary that builds the implementation:
   the core, the pthreads transport and the checkpoint loader. */
#define MOE_EP_IMPLEMENTATION
#include "../transports/moe_ep_pthreads.h"
#include "../moe_ep_safetensors.h"

/* A misspelled switch would compile nothing here and fail only at link time, if at all. */
#ifndef MOE_EP_IMPL_INCLUDED
#error "moe_ep_impl.c: the moe_ep core was not built (is MOE_EP_IMPLEMENTATION spelled right?)"
#endif
#ifndef MOE_EP_PTHREADS_IMPL_INCLUDED
#error "moe_ep_impl.c: the pthreads transport was not built (is MOE_EP_IMPLEMENTATION spelled right?)"
#endif
#ifndef MOE_EP_SAFETENSORS_IMPL_INCLUDED
#error "moe_ep_impl.c: the checkpoint loader was not built (is MOE_EP_IMPLEMENTATION spelled right?)"
#endif
