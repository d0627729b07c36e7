/* cpu_bench_cblas.c -- a second, private build of moe_ep for cpu_bench with
   MOE_EP_CBLAS: the expert products go to the CBLAS the program links (OpenBLAS here).
   Everything is static except the three bench_cblas_* functions. */
#define MOE_EP_STATIC
#define MOE_EP_CBLAS
#define MOE_EP_IMPLEMENTATION
#include "../moe_ep.h"

#include <stdlib.h>

#ifndef MOE_EP_IMPL_INCLUDED
#error "cpu_bench_cblas.c: the moe_ep core was not built"
#endif

void* bench_cblas_create(int d_model, int d_ff, int num_experts, const moe_ep_expert_weights* experts);
int bench_cblas_ffn(void* handle, int expert, const float* x, int64_t rows, float* out);
void bench_cblas_destroy(void* handle);

void* bench_cblas_create(int d_model, int d_ff, int num_experts, const moe_ep_expert_weights* experts) {
    moe_ep_context* ctx = NULL;
    if (moe_ep_create(&(moe_ep_desc){ .d_model = d_model, .d_ff = d_ff, .num_experts = num_experts,
                                      .experts = experts }, &ctx) != MOE_EP_OK)
        return NULL;
    return ctx;
}

int bench_cblas_ffn(void* handle, int expert, const float* x, int64_t rows, float* out) {
    return (int)moe_ep_expert_ffn((moe_ep_context*)handle, expert, x, rows, out);
}

void bench_cblas_destroy(void* handle) { moe_ep_destroy((moe_ep_context*)handle); }
