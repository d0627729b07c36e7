/* check_moe_ep.h -- the suites of the moe_ep Check binary and the helpers they share.

   One suite per tests/check_<area>.c; check_main.c runs them all. The implementation
   is built once, in moe_ep_impl.c. The generic helpers (random data, poison, counting
   allocator, recording logger) are tests/support's; the ones below, in check_support.c,
   are this binary's own: float64 references, the echo transport, the R-rank layer. */
#ifndef CHECK_MOE_EP_H_INCLUDED
#define CHECK_MOE_EP_H_INCLUDED

#include <check.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>
#include "../transports/moe_ep_pthreads.h"
#include "support/test_support.h"

/* >>suites */
Suite* api_suite(void);
Suite* router_suite(void);
Suite* placement_suite(void);
Suite* plan_suite(void);
Suite* ffn_suite(void);
Suite* layer_suite(void);
Suite* capacity_suite(void);
Suite* validation_suite(void);
Suite* failure_suite(void);
Suite* expert_fn_suite(void);
Suite* layout_suite(void);
Suite* routing_suite(void);
Suite* ffn_variants_suite(void);
Suite* families_suite(void);
Suite* faults_suite(void);
Suite* hostile_suite(void);
Suite* safetensors_suite(void);
Suite* formats_suite(void);
Suite* row_lists_suite(void);
Suite* bf16_dot_suite(void);
Suite* barriers_suite(void);

/* >>float64 references */
/* out[rows, d_model] = the expert FFN in double (SwiGLU, exact-erf GELU, ReLU, clamped SwiGLU
   with GPT-OSS's alpha 1.702 and limit 7), with the weights' biases where they are set. */
void check_ref_ffn(moe_ep_activation activation, int d_model, int d_ff, const moe_ep_expert_weights* weights,
                   const float* x, int64_t rows, double* out);
/* max |got - ref| / max |ref| over the n elements (max |got - ref| if ref is all zero);
   +inf if got holds a non-finite value. */
double check_rel_error(const float* got, const double* ref, size_t n);

/* moe_ep_create(desc) must fail with MOE_EP_ERROR_INVALID_ARGUMENT: the out-param untouched,
   log item `item` logged, a message that names moe_ep_desc, nothing left allocated. Sets the
   desc's logger, allocator and create_error; `what` names the case in failures. */
void check_create_refused(moe_ep_desc* desc, moe_ep_log_item item, const char* what);

/* The router's settings beyond softmax top-k (moe_ep_desc's names; zero means default). */
typedef struct check_routing {
    moe_ep_scoring scoring;
    float routed_scaling_factor;
    const float* router_bias;
    const float* selection_bias;
    int num_groups, topk_groups;
    bool scale_expert_input;
} check_routing;

/* A layer's weights: router [E, d_model] and E experts with w1, w3 [d_ff, d_model], w2 [d_model, d_ff]. */
typedef struct check_model {
    int d_model, d_ff, num_experts, top_k;
    moe_ep_activation activation;
    bool normalize_topk;
    check_routing routing;          /* zero: softmax top-k */
    moe_ep_shared_desc shared;      /* zero: no shared experts */
    moe_ep_weight_layout weight_layout;  /* how `experts` lie (the references read the separate layout only) */
    moe_ep_weight_format weight_format;  /* the desc's (check_formats.c) */
    moe_ep_arithmetic arithmetic;   /* the desc's (check_bf16_dot.c) */
    float* router;
    float* weights;
    moe_ep_expert_weights* experts;  /* [num_experts], global ids */
    float* biases;                  /* NULL, or b1, b3, b2 of every expert (check_model_add_biases) */
} check_model;

void check_model_init(check_model* model, int d_model, int d_ff, int num_experts, int top_k,
                      moe_ep_activation activation, bool normalize_topk, uint64_t seed);
void check_model_free(check_model* model);
/* Gives every expert random b1, b3 [d_ff] and b2 [d_model]. */
void check_model_add_biases(check_model* model, uint64_t seed);
/* The router in double (every scoring, biases, groups, scaling), top-k with ties to the
   lower index. With scale_expert_input the weights are still the router's; check_ref_layer
   applies them to the input. */
void check_ref_route(const check_model* model, const float* x, int64_t tokens, int32_t* topk_idx, double* topk_weight);
/* y[t] = sum_j weight[t, j] * FFN_{idx[t, j]}(x[t]) in double (scale_expert_input:
   sum_j FFN_{idx[t, j]}(weight[t, j] * x[t]), the scaled input rounded to fp32 as the layer does),
   plus the shared experts, times sigmoid(gate . x[t]) with a gate. */
void check_ref_layer(const check_model* model, const float* x, int64_t tokens, const int32_t* topk_idx,
                     const double* topk_weight, double* y);

/* >>transports for single-threaded tests: rank `rank` of a world of `world_size` whose
   peers all send exactly what this rank sends (create's fingerprint exchange agrees);
   all_to_all_v is unsupported. Enough for create and the placement queries. */
typedef struct check_echo {
    int rank, world_size;
} check_echo;
moe_ep_transport check_echo_transport(check_echo* echo, int rank, int world_size);

/* >>a whole layer on R pthreads ranks */
#define CHECK_MAX_RANKS 8
typedef enum check_path {
    CHECK_PATH_FORWARD,             /* moe_ep_forward */
    CHECK_PATH_STAGES,              /* route, plan_create, dispatch, experts, combine */
    CHECK_PATH_SPLIT                /* the same with dispatch_begin/end and combine_begin/end */
} check_path;

typedef struct check_layer {
    const check_model* model;
    int ranks;                      /* 1..CHECK_MAX_RANKS pthreads ranks; 0: built-in single rank, no thread */
    const int64_t* tokens;          /* [max(ranks, 1)] tokens of each rank */
    const float* x;                 /* [sum of tokens, d_model], rank 0's tokens first */
    const int32_t* topk_idx;        /* optional routing handed in (routing_in), the same layout as x */
    const float* topk_weight;
    moe_ep_placement placement;
    float capacity_factor;
    int num_threads;
    moe_ep_kernel kernel;           /* the desc's; 0: default */
    check_path path;
    moe_ep_expert_fn expert_fn;
    void* expert_user_data[CHECK_MAX_RANKS];
    const moe_ep_allocator* allocator;   /* optional, for the contexts and the world */
    int timeout_ms;                 /* world timeout; 0: 60 s, a guard against a hang */
    bool decline_row_lists;         /* the pthreads transport with row_lists 0: dispatch packs the rows */
    int64_t row_list_exchanges[CHECK_MAX_RANKS];  /* out: exchanges of rows handed send_rows or recv_fn */
    float* y;                       /* out [sum of tokens, d_model] */
    int32_t* idx_out;               /* optional out: the router's choice [sum of tokens, top_k] */
    float* weight_out;
    moe_ep_result result;           /* out */
    moe_ep_result rank_result[CHECK_MAX_RANKS];
    char rank_error[CHECK_MAX_RANKS][256];
} check_layer;

/* Zeroes *layer (forward path, contiguous placement, no capacity, 60 s timeout) and sets
   the model, the ranks, each rank's tokens, x and y. */
void check_layer_init(check_layer* layer, const check_model* model, int ranks, const int64_t* tokens, const float* x,
                      float* y);
int64_t check_total_tokens(const int64_t* tokens, int ranks);
moe_ep_result check_run_layer(check_layer* layer);
/* The rank errors joined, for assertion messages. */
const char* check_layer_errors(const check_layer* layer, char* buffer, size_t size);

#endif /* CHECK_MOE_EP_H_INCLUDED */
