/* kernels_portable.c -- a second, private build of the implementation with the portable
   kernel (MOE_EP_NO_SIMD), so that check_kernels can hold the SIMD path it was compiled
   for against the portable one in the same process. Everything here is static except
   kernels_portable_ffn. */
#define MOE_EP_STATIC
#ifndef MOE_EP_NO_SIMD
#define MOE_EP_NO_SIMD
#endif
#define MOE_EP_IMPLEMENTATION
#include "../../moe_ep.h"

#ifndef MOE_EP_IMPL_INCLUDED
#error "kernels_portable.c: the moe_ep core was not built"
#endif

/* The FFN of expert 0 of `weights` on `rows` rows, on the portable path. */
int kernels_portable_ffn(moe_ep_activation activation, int d_model, int d_ff, const moe_ep_expert_weights* weights,
                         const float* x, int64_t rows, int threads, float* out);

int kernels_portable_ffn(moe_ep_activation activation, int d_model, int d_ff, const moe_ep_expert_weights* weights,
                         const float* x, int64_t rows, int threads, float* out) {
    moe_ep_context* ctx = NULL;
    moe_ep_result res = moe_ep_create(&(moe_ep_desc){ .d_model = d_model, .d_ff = d_ff, .num_experts = 1,
                                                      .activation = activation, .num_threads = threads,
                                                      .experts = weights }, &ctx);
    if (res != MOE_EP_OK) return (int)res;
    res = moe_ep_expert_ffn(ctx, 0, x, rows, out);
    moe_ep_destroy(ctx);
    return (int)res;
}
