/* moe_ep_nccl.h -- the NCCL transport and GPU data path of moe_ep: one rank per GPU -- MIT or public domain

   Two things live here:

   1. A moe_ep_transport over an ncclComm_t that you create (one rank per GPU). Counts
      and status words are exchanged with grouped ncclSend/ncclRecv and copied to the
      host; row all-to-alls run as grouped ncclSend/ncclRecv on your CUDA stream. With
      it the core's CPU layer (moe_ep_forward) runs across processes and nodes. It also
      splits (ncclCommSplit) into the EP and TP groups of moe_ep_layout_split and sums
      in rank order (all_reduce_sum), so EP x DP and EP x TP x DP run over NCCL.
   2. The GPU layer (moe_ep_nccl_layer): token rows, the permutation, the expert FFNs
      (cuBLAS, or your callback) and the weighted combine stay in device memory; only
      routing metadata -- top-k ids and weights, counts, the plan's layout -- crosses to
      the host. fp32 or bf16 rows; fp32 accumulation everywhere.

   DO THIS
   =======
   In exactly one C file:

       #define MOE_EP_IMPLEMENTATION
       #include "transports/moe_ep_nccl.h"     (builds the core, the transport, the layer)

   and in exactly one CUDA file (nvcc -arch=sm_90 ...):

       #define MOE_EP_NCCL_KERNELS_IMPLEMENTATION
       #include "transports/moe_ep_nccl_kernels.cuh"

   (A file compiled by nvcc with MOE_EP_IMPLEMENTATION gets the kernels by itself.)
   Strict C99 users compile with -isystem /usr/local/cuda/include (nccl.h pulls in the
   CUDA runtime headers, which -pedantic rejects otherwise). Link with
   -lnccl -lcublas -lcudart -lstdc++ (the last one for the nvcc object).
   MOE_EP_NCCL_NO_LAYER leaves the GPU layer out: the transport alone needs only
   -lnccl -lcudart and no CUDA file.

   STEP BY STEP
   ============
   1. One process per GPU: rank 0 calls ncclGetUniqueId and shares it (e.g. MPI_Bcast;
      examples/nccl_mpi_demo.c), every rank cudaSetDevice()s and ncclCommInitRank()s.
      Or one thread per GPU in one process: ncclCommInitAll() on the main thread, then
      one thread per comm (tests/gpu/test_nccl.c).
   2. moe_ep_nccl_transport_create(&(moe_ep_nccl_desc){ .comm = comm, .stream = s }, &t);
   3. moe_ep_nccl_layer_create(&(moe_ep_nccl_layer_desc){
          .base = { .d_model = 2048, .d_ff = 1408, .num_experts = 64, .top_k = 2,
                    .transport = &t },
          .dtype = MOE_EP_NCCL_DTYPE_BF16, .router_weight = gate, .experts = mine }, &layer);
                                                                      collective
   4. moe_ep_nccl_forward(layer, &(moe_ep_nccl_forward_args){ .tokens = T, .x = x, .y = y });
      collective; x and y are device pointers. Or the stages: moe_ep_nccl_route,
      moe_ep_nccl_plan_create, moe_ep_nccl_dispatch, moe_ep_nccl_experts,
      moe_ep_nccl_combine, moe_ep_nccl_plan_destroy (with begin/end forms of dispatch
      and combine, so that your own work can overlap the exchange).
   5. moe_ep_nccl_layer_destroy(layer); moe_ep_nccl_transport_destroy(&t); then your
      ncclCommDestroy and cudaStreamDestroy.

   STREAMS AND BLOCKING
   ====================
   Every device operation is queued on desc.stream (0 = the legacy default stream), so
   it is ordered after your earlier work there and before your later work. Calls that
   need numbers on the host wait for them: exchange_counts (and so plan creation, the
   layer's create and agreement steps) and moe_ep_nccl_route. The layer's dispatch,
   experts and combine only queue work; y is ready when the stream gets there.
   all_to_all_v on device memory likewise queues the exchange: "recv holds the data"
   means "for work queued after it on args->stream". On host memory it stages the rows
   through device buffers and returns when they have arrived. The begin/end forms run
   the exchange on an internal stream that waits for yours; end makes yours wait for it.

   GROUPS: EP x DP AND EP x TP x DP
   ================================
   transport.split (called by moe_ep_layout_split) is ncclCommSplit over your
   communicator, collective over it; the group transport owns the new communicator and
   destroys it in moe_ep_nccl_transport_destroy (destroy groups before their parent's
   communicator). Groups inherit the stream, timeout and allocator. All ranks of the
   parent get the same verdict (a negative color fails the split on every rank).

   all_reduce_sum gathers every rank's block (ncclAllGather) and adds the blocks in rank
   order, (((r0 + r1) + r2) + ...), so the sum is the same on every rank and in every
   run (ncclAllReduce promises no order): device memory by a kernel queued on the stream,
   host memory on the host (the call waits). Without the kernels (MOE_EP_NCCL_NO_LAYER)
   device memory is summed on the host too, and the call waits. Every rank must pass the
   same count.

       moe_ep_layout_desc lay = { .world_size = R, .ep_size = 2, .tp_size = 2, .num_experts = E };
       moe_ep_layout_split(&lay, &world, MOE_EP_GROUP_EP, &ep);     (collective)
       moe_ep_layout_split(&lay, &world, MOE_EP_GROUP_TP, &tp);     (collective)
       experts: those of moe_ep_layout_experts(&lay, rank, ...), full weights
       .base = { ..., .transport = &ep, .tp_transport = &tp }        (GPU layer or core)
       ...; moe_ep_nccl_transport_destroy(&tp); moe_ep_nccl_transport_destroy(&ep);

   With tp_transport, the GPU layer gives TP rank t of T the d_ff rows [t*F/T, (t+1)*F/T)
   of w1 and w3 and those columns of w2 (copied from the full weights at create); each
   TP rank computes its slice's partial expert outputs (fp32: in place; bf16: fp32
   partial sums, GEMM loop only), all_reduce_sum adds them over the TP group before the
   combine, and every rank of a TP group ends with the same y, bitwise. The ranks of a
   TP group must hand in the same tokens and routing: plan creation checks it (one more
   status exchange, over the TP group) and fails on every rank otherwise. expert_fn
   cannot be combined with tp_transport. moe_ep_nccl_experts is then collective over
   the TP group.

   THE GPU LAYER
   =============
   - Router: logits = x . router_weight^T on cuBLAS (fp32 output), then softmax and
     top-k in one kernel (ties to the lower expert, optional renormalisation), then the
     ids and weights are copied to the host for the core's plan. No router statistics.
   - Plan: the core's moe_ep_plan_create over this transport (count exchange), then the
     slot map (where each (token, k-slot) row goes) and the weights are uploaded.
   - Dispatch: a permute kernel gathers token rows into send order; rows whose expert
     is on this rank go straight to their place and never touch NCCL, and are gathered
     while the others are on the wire (grouped ncclSend/ncclRecv on an internal stream). a2a_layout STAGED (the default) sends one message per
     peer and regroups received rows by local expert in a kernel; SEGMENTED sends one
     message per (peer, local expert) straight into place.
   - Experts: two cuBLAS GEMMs per local expert (w1 and w3 fused into one), all experts
     of a projection in one cublasGemmGroupedBatchedEx when experts are small (it saves
     the host ~10 us per call), else one cublasGemmEx each (cuBLAS's grouped kernels lose
     on large GEMMs), and an activation kernel; fp32 uses plain fp32 GEMMs (TF32 off); bf16 uses
     bf16 GEMMs with fp32 accumulation. Expert weights are copied once at create.
     Or expert_fn, called per local expert with device rows on the layer's stream.
   - Combine: the reverse exchange, then one kernel sums a token's k slots in k-slot
     order in fp32 with the routing weights (dropped slots add nothing).
   - Direct path (next section): with max_tokens and GPUs that can map each other's
     memory, dispatch and combine skip NCCL, the permute and the regroups.
   Results match the core's CPU path to rounding (fp32: about 1e-6 relative; bf16:
   about 4e-3, from rounding the hidden activations and outputs to bf16). They repeat
   bitwise from run to run with the same world size, but are not bitwise identical to
   the CPU path, nor across world sizes (cuBLAS may reduce differently for another
   number of rows).

   DIRECT NVLINK PATH
   ==================
   On one host whose GPUs reach each other's memory (NVLink or PCIe peer access), the
   layer moves rows with stores and loads straight into the peers' memory, as DeepEP's
   intranode kernels do, instead of NCCL messages. desc.direct: DEFAULT (auto) takes it
   when max_tokens > 0 and every rank can map every other rank's memory, OFF never, ON
   or layer_create fails; moe_ep_nccl_layer_direct() says which path a layer took.
   - At create (collective): each rank allocates one region, max_tokens worth of
     received rows and of expert outputs (moe_ep_nccl_layer_rows), offers it with
     ncclAllGather, and maps the others': the pointer itself with peer access when the
     peer is a thread of this process, cudaIpcOpenMemHandle when it is another process
     of this host. All ranks agree on the verdict; with auto a rank that cannot map a
     peer turns the path off everywhere.
   - Plan: the core's plan as before, then each rank publishes its receive offsets in
     its region and reads its peers', so that it knows the place of each of its rows
     in the owner's region.
   - Dispatch: one kernel reads each token row once and stores it at each k-slot's place
     in the owner's region (its own rows included); dispatch_end waits until every rank
     has stored its rows. Combine: each rank reads its tokens' expert outputs from the
     owners' regions and sums them in k-slot order, in fp32, as the NCCL path does: the
     outputs are bitwise those of the NCCL path (tests/gpu/test_nccl.c checks it).
   - Ordering: per-rank flags in the regions, written with release stores at system
     scope after the data and read with acquire loads. A wait that runs past the
     transport's timeout_ms gives MOE_EP_ERROR_TIMEOUT at the next call and aborts the
     communicator (timeout 0: it waits for ever, as NCCL does); transport.abort does
     not interrupt a kernel that waits.
   - The layer has one set of these buffers: a plan dispatched on this path must be
     combined (or destroyed) before the next dispatch (else INVALID_ARGUMENT, on every
     rank of a program that does the same everywhere). Stage calls with your own
     recv_rows / expert_out work, at the cost of a copy each; pass the layer's
     (moe_ep_nccl_layer_rows) to save it. moe_ep_nccl_forward uses them.
   - moe_ep_nccl_layer_destroy is then collective (no rank may still read a region that
     goes away): call it on every rank.
   On 4 x H200 (bench/RESULTS.md) dispatch + combine ran at 1.10-1.24 x the bandwidth of
   a raw NCCL all-to-all of the same bytes; the NCCL path at 0.78-0.85 x.

   FAILURE
   =======
   Validation failures and out-of-memory give the same verdict on every rank (they are
   agreed through the exchanges that planning does anyway; without max_tokens, each plan
   adds one status exchange). A failing expert_fn is agreed before the combine. An
   asynchronous NCCL error, a wait longer than desc.timeout_ms, or transport.abort()
   aborts the communicator (ncclCommAbort): the call returns MOE_EP_ERROR_TRANSPORT,
   TIMEOUT or ABORTED, the transport refuses further work, and you must not use or
   destroy that communicator again. The communicator must be a blocking one (the
   default config).

   MEMORY
   ======
   Host allocations use desc.allocator (the layer keeps up to 32 blocks that its plans
   freed, for the next plan); device memory is cudaMalloc'ed, pinned host memory
   cudaMallocHost'ed. With layer desc max_tokens > 0, every buffer is sized at
   create for that many tokens per rank and a forward allocates nothing; otherwise the
   buffers grow (by half again) when a call needs more, and stay. The direct path adds
   its region: 2 x max_tokens x min(top_k, most experts per rank) x world x d_model
   elements (the forward's expert-side rows live there), plus a few KiB.
*/
#ifndef MOE_EP_NCCL_H_INCLUDED
#define MOE_EP_NCCL_H_INCLUDED

#include "../moe_ep.h"
#include <nccl.h>   /* also declares cudaStream_t */

#ifdef __cplusplus
extern "C" {
#endif

/* >>nccl transport */
typedef struct moe_ep_nccl_desc {
    ncclComm_t comm;                /* required; borrowed: you destroy it after the transport */
    cudaStream_t stream;            /* default 0: the legacy default stream */
    int timeout_ms;                 /* default 0: host waits have no time limit (resolution: 1 s) */
    moe_ep_allocator allocator;     /* default malloc/free */
} moe_ep_nccl_desc;

/* Queries the communicator (rank, size, device) and makes the device current on this
   thread. Collective: no. */
MOE_EP_API moe_ep_result moe_ep_nccl_transport_create(const moe_ep_nccl_desc* desc, moe_ep_transport* out);
MOE_EP_API void moe_ep_nccl_transport_destroy(moe_ep_transport* transport);

#ifndef MOE_EP_NCCL_NO_LAYER
/* >>gpu layer */
typedef enum moe_ep_nccl_dtype {
    MOE_EP_NCCL_DTYPE_DEFAULT = 0,  /* fp32 */
    MOE_EP_NCCL_DTYPE_F32,
    MOE_EP_NCCL_DTYPE_BF16,
    MOE_EP_NCCL_DTYPE_COUNT,
    MOE_EP_NCCL_DTYPE_FORCE_U32 = 0x7FFFFFFF
} moe_ep_nccl_dtype;

typedef enum moe_ep_nccl_expert_gemm {
    MOE_EP_NCCL_EXPERT_GEMM_DEFAULT = 0,  /* grouped for small experts, loop for large ones */
    MOE_EP_NCCL_EXPERT_GEMM_GROUPED,      /* one cublasGemmGroupedBatchedEx per projection for all experts */
    MOE_EP_NCCL_EXPERT_GEMM_LOOP,         /* one cublasGemmEx per expert and projection (expert_streams) */
    MOE_EP_NCCL_EXPERT_GEMM_COUNT,
    MOE_EP_NCCL_EXPERT_GEMM_FORCE_U32 = 0x7FFFFFFF
} moe_ep_nccl_expert_gemm;

typedef enum moe_ep_nccl_a2a_layout {
    MOE_EP_NCCL_A2A_DEFAULT = 0,    /* staged */
    MOE_EP_NCCL_A2A_STAGED,         /* one message per peer; received rows regrouped by a kernel */
    MOE_EP_NCCL_A2A_SEGMENTED,      /* one message per (peer, local expert), straight into place */
    MOE_EP_NCCL_A2A_COUNT,
    MOE_EP_NCCL_A2A_FORCE_U32 = 0x7FFFFFFF
} moe_ep_nccl_a2a_layout;

typedef enum moe_ep_nccl_direct {
    MOE_EP_NCCL_DIRECT_DEFAULT = 0, /* auto: direct when max_tokens > 0 and every rank can map the
                                       memory of every other (one host, peer access or CUDA IPC) */
    MOE_EP_NCCL_DIRECT_OFF,         /* rows always travel through NCCL */
    MOE_EP_NCCL_DIRECT_ON,          /* direct, or moe_ep_nccl_layer_create fails (needs max_tokens > 0) */
    MOE_EP_NCCL_DIRECT_COUNT,
    MOE_EP_NCCL_DIRECT_FORCE_U32 = 0x7FFFFFFF
} moe_ep_nccl_direct;

/* One local expert, nn.Linear layout, row-major, in the layer's dtype, in device or
   host memory (copied at create): w1, w3 [d_ff, d_model]; w2 [d_model, d_ff]. With a
   TP group these are still the full weights; only this rank's slice is copied. */
typedef struct moe_ep_nccl_expert_weights {
    const void* w1;
    const void* w3;                 /* SwiGLU only */
    const void* w2;
} moe_ep_nccl_expert_weights;

/* Your expert compute. rows, out: device [row_count, d_model] in the layer's dtype, for
   local expert `local_expert` (global id `expert`). Queue the work on `stream` (or
   finish it before returning). Return 0 on success. */
typedef int (*moe_ep_nccl_expert_fn)(int local_expert, int expert, const void* rows, int64_t row_count,
                                     int d_model, void* out, cudaStream_t stream, void* user_data);

typedef struct moe_ep_nccl_layer_desc {
    moe_ep_desc base;               /* d_model, d_ff, num_experts, top_k, activation, normalize_topk,
                                       capacity_factor, placement, transport (an NCCL transport,
                                       required: the EP group), tp_transport (an NCCL transport on
                                       the same GPU, optional: the TP group, see GROUPS above),
                                       allocator, logger. Its router_weight, experts, expert_fn and
                                       num_threads must be left zero: the device versions are below. */
    moe_ep_nccl_dtype dtype;        /* default fp32 */
    moe_ep_nccl_a2a_layout a2a_layout;  /* default staged; not used by the direct path */
    moe_ep_nccl_direct direct;      /* default auto: see DIRECT NVLINK PATH */
    int64_t max_tokens;             /* default 0: buffers grow on demand; else tokens per rank per call
                                       that every buffer is sized for at create */
    moe_ep_nccl_expert_gemm expert_gemm;  /* default: per call, grouped when the experts average at
                                       most 384 rows, else the loop (cuBLAS's grouped kernels are slower
                                       on larger GEMMs); results agree within rounding */
    int expert_streams;             /* loop only. default 0 = 1: CUDA streams (each with a cuBLAS
                                       handle) that the local experts are spread over, so that small
                                       GEMMs can run side by side (on 2 x H200 it did not pay) */
    const void* router_weight;      /* [num_experts, d_model] in dtype, device or host memory (copied);
                                       NULL: every call hands in its routing */
    const moe_ep_nccl_expert_weights* experts;  /* [local expert count]; required unless expert_fn */
    moe_ep_nccl_expert_fn expert_fn;
    void* expert_user_data;
} moe_ep_nccl_layer_desc;

typedef struct moe_ep_nccl_layer moe_ep_nccl_layer;
typedef struct moe_ep_nccl_plan moe_ep_nccl_plan;

/* One layer call. x, y: device [tokens, d_model] in dtype (y written in full).
   topk_idx / topk_weight: host [tokens, top_k]; with routing_in they are the caller's
   routing, otherwise, if non-NULL, the GPU router's choice is written there. */
typedef struct moe_ep_nccl_forward_args {
    int64_t tokens;
    const void* x;
    void* y;
    bool routing_in;
    int32_t* topk_idx;
    float* topk_weight;
} moe_ep_nccl_forward_args;

/* Collective: yes. out untouched on failure (the cause goes to the logger). */
MOE_EP_API moe_ep_result moe_ep_nccl_layer_create(const moe_ep_nccl_layer_desc* desc, moe_ep_nccl_layer** out);
/* Collective: only on the direct path (it waits until no peer can still touch this
   rank's memory). */
MOE_EP_API void moe_ep_nccl_layer_destroy(moe_ep_nccl_layer* layer);
/* The core context (placement queries, moe_ep_query_desc). */
MOE_EP_API moe_ep_context* moe_ep_nccl_layer_context(moe_ep_nccl_layer* layer);
MOE_EP_API const char* moe_ep_nccl_last_error(const moe_ep_nccl_layer* layer);
MOE_EP_API cudaStream_t moe_ep_nccl_layer_stream(const moe_ep_nccl_layer* layer);
/* 1 when the layer moves rows by direct stores into the peers' memory (DIRECT NVLINK PATH). */
MOE_EP_API int moe_ep_nccl_layer_direct(const moe_ep_nccl_layer* layer);
/* The layer's own expert-side buffers, device [rows, d_model] each, rows = max_tokens *
   min(top_k, the most experts a rank holds) * world size: the ones moe_ep_nccl_forward uses. On the
   direct path dispatch lands rows in *recv and combine reads the expert outputs from
   *out; handing these to dispatch / experts / combine saves a copy each way. NULL
   (and rows 0) without max_tokens. */
MOE_EP_API void moe_ep_nccl_layer_rows(moe_ep_nccl_layer* layer, void** recv, void** out, int64_t* rows);

/* Route on the GPU. x: device [tokens, d_model]; topk_idx, topk_weight: host out
   [tokens, top_k]. Waits for the result. Collective: no. */
MOE_EP_API moe_ep_result moe_ep_nccl_route(moe_ep_nccl_layer* layer, const void* x, int64_t tokens,
                                           int32_t* topk_idx, float* topk_weight);
/* The core's plan plus its device copy. Collective: yes. */
MOE_EP_API moe_ep_result moe_ep_nccl_plan_create(moe_ep_nccl_layer* layer, int64_t tokens, const int32_t* topk_idx,
                                                 const float* topk_weight, moe_ep_nccl_plan** out);
MOE_EP_API void moe_ep_nccl_plan_destroy(moe_ep_nccl_plan* plan);
/* Host view of the layout (counts, offsets, slot rows): see moe_ep_plan_info. */
MOE_EP_API moe_ep_plan_info moe_ep_nccl_plan_query(const moe_ep_nccl_plan* plan);

/* x: device [tokens, d_model]; recv_rows: device [info.recv_rows, d_model], grouped by
   local expert (info.local_expert_offsets), then source rank, then token. Collective: yes.
   begin/end: recv_rows is complete (for later work on the stream) after end. */
MOE_EP_API moe_ep_result moe_ep_nccl_dispatch(moe_ep_nccl_layer* layer, moe_ep_nccl_plan* plan, const void* x,
                                              void* recv_rows);
MOE_EP_API moe_ep_result moe_ep_nccl_dispatch_begin(moe_ep_nccl_layer* layer, moe_ep_nccl_plan* plan, const void* x,
                                                    void* recv_rows);
MOE_EP_API moe_ep_result moe_ep_nccl_dispatch_end(moe_ep_nccl_layer* layer, moe_ep_nccl_plan* plan);
/* rows, out: device [info.recv_rows, d_model]. Collective: no (a failing expert_fn is
   agreed at the next combine); with a TP group, collective over it (the slices are summed). */
MOE_EP_API moe_ep_result moe_ep_nccl_experts(moe_ep_nccl_layer* layer, moe_ep_nccl_plan* plan, const void* rows,
                                             void* out);
/* expert_out: device [info.recv_rows, d_model]; y: device [tokens, d_model], written in
   full: y[t] = sum over k-slots of weight * expert output. expert_out must stay valid
   until end. Collective: yes. */
MOE_EP_API moe_ep_result moe_ep_nccl_combine(moe_ep_nccl_layer* layer, moe_ep_nccl_plan* plan, const void* expert_out,
                                             void* y);
MOE_EP_API moe_ep_result moe_ep_nccl_combine_begin(moe_ep_nccl_layer* layer, moe_ep_nccl_plan* plan,
                                                   const void* expert_out);
MOE_EP_API moe_ep_result moe_ep_nccl_combine_end(moe_ep_nccl_layer* layer, moe_ep_nccl_plan* plan, void* y);

/* The whole layer: route (or take routing), plan, dispatch, experts, combine. Collective: yes. */
MOE_EP_API moe_ep_result moe_ep_nccl_forward(moe_ep_nccl_layer* layer, const moe_ep_nccl_forward_args* args);
#endif /* MOE_EP_NCCL_NO_LAYER */

#ifdef __cplusplus
}
#endif
#endif /* MOE_EP_NCCL_H_INCLUDED */

#if defined(MOE_EP_IMPLEMENTATION) && !defined(MOE_EP_NCCL_IMPLEMENTATION)
#define MOE_EP_NCCL_IMPLEMENTATION
#endif

#ifdef MOE_EP_NCCL_IMPLEMENTATION
#ifndef MOE_EP_NCCL_IMPL_INCLUDED
#define MOE_EP_NCCL_IMPL_INCLUDED

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdarg.h>
#include <time.h>
#include <unistd.h>     /* getpid: the direct path tells processes apart */
#include <cuda_runtime.h>
#ifndef MOE_EP_NCCL_NO_LAYER
#include <cublas_v2.h>
#if defined(__CUDACC__) && !defined(MOE_EP_NCCL_KERNELS_IMPLEMENTATION)
#define MOE_EP_NCCL_KERNELS_IMPLEMENTATION
#endif
#include "moe_ep_nccl_kernels.cuh"
#endif

#ifndef MOE_EP_PRIVATE
#define MOE_EP_PRIVATE static
#endif

#define MOE_EP__NCCL_REQUESTS 8
#define MOE_EP__NCCL_CACHE 32
#define MOE_EP__NCCL_LANES 16
#define MOE_EP__NCCL_HEADER 16   /* keeps the block size; 16 keeps malloc's alignment */
#define MOE_EP__NCCL_ERR 512

/* >>nccl transport: state */
typedef struct moe_ep__nccl_request {
    int in_use;
    int host;                       /* rows in host memory, staged through device buffers */
    cudaEvent_t ready, done;
    cudaStream_t user;
    const moe_ep_a2a_args* args;
} moe_ep__nccl_request;

typedef struct moe_ep__nccl {
    ncclComm_t comm;
    cudaStream_t stream, side;
    int device, rank, world_size, timeout_ms;
    volatile int abort_requested;   /* set by transport.abort from any thread */
    int broken;                     /* the communicator was aborted: refuse further work */
    moe_ep_allocator allocator;
    int64_t* counts_host;           /* pinned [2 * counts_capacity] */
    int64_t* counts_dev;
    size_t counts_capacity;
    void* stage_send;               /* host-memory a2a: device staging */
    void* stage_recv;
    size_t stage_send_bytes, stage_recv_bytes;
    moe_ep__nccl_request requests[MOE_EP__NCCL_REQUESTS];
    int owns_comm;                  /* made by split: destroyed with the transport */
    float* gather_dev;              /* all_reduce_sum: [world_size * count] gathered blocks */
    float* gather_host;             /* pinned mirror, for sums on the host */
    size_t gather_dev_bytes, gather_host_bytes;
    cudaEvent_t gather_free;        /* the last all_reduce_sum's use of gather_dev, on its stream */
} moe_ep__nccl;

MOE_EP_PRIVATE void* moe_ep__nccl_alloc(const moe_ep_allocator* a, size_t size) {
    if (size == 0) size = 1;
    return a->alloc_fn ? a->alloc_fn(size, a->user_data) : malloc(size);
}

MOE_EP_PRIVATE void moe_ep__nccl_free(const moe_ep_allocator* a, void* ptr) {
    if (!ptr) return;
    if (a->free_fn) a->free_fn(ptr, a->user_data);
    else free(ptr);
}

MOE_EP_PRIVATE void moe_ep__nccl_text(char* err, size_t size, const char* fmt, ...) {
    va_list ap;
    if (!err || size == 0) return;
    va_start(ap, fmt);
    vsnprintf(err, size, fmt, ap);
    va_end(ap);
}

MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_cuda_fail(cudaError_t e, const char* what, char* err, size_t size) {
    moe_ep__nccl_text(err, size, "%s: %s", what, cudaGetErrorString(e));
    return e == cudaErrorMemoryAllocation ? MOE_EP_ERROR_OUT_OF_MEMORY : MOE_EP_ERROR_TRANSPORT;
}

MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_nccl_fail(moe_ep__nccl* n, ncclResult_t r, const char* what, char* err,
                                                    size_t size) {
    const char* last = ncclGetLastError(n->comm);
    moe_ep__nccl_text(err, size, "%s: %s%s%s", what, ncclGetErrorString(r), last && last[0] ? ": " : "",
                      last ? last : "");
    return MOE_EP_ERROR_TRANSPORT;
}

/* Grows a device buffer (by half again), keeping nothing of the old contents. */
MOE_EP_PRIVATE cudaError_t moe_ep__nccl_grow_device(void** buffer, size_t* capacity, size_t need) {
    cudaError_t e;
    size_t size;
    if (need <= *capacity) return cudaSuccess;
    size = need + need / 2;
    if (*buffer) cudaFree(*buffer);
    *buffer = NULL;
    *capacity = 0;
    e = cudaMalloc(buffer, size);
    if (e != cudaSuccess) {
        *buffer = NULL;
        (void)cudaGetLastError();
        return e;
    }
    *capacity = size;
    return cudaSuccess;
}

MOE_EP_PRIVATE cudaError_t moe_ep__nccl_grow_pinned(void** buffer, size_t* capacity, size_t need) {
    cudaError_t e;
    size_t size;
    if (need <= *capacity) return cudaSuccess;
    size = need + need / 2;
    if (*buffer) cudaFreeHost(*buffer);
    *buffer = NULL;
    *capacity = 0;
    e = cudaMallocHost(buffer, size);
    if (e != cudaSuccess) {
        *buffer = NULL;
        (void)cudaGetLastError();
        return e;
    }
    *capacity = size;
    return cudaSuccess;
}

/* Abort the communicator: the only way to release peers (and ourselves) from a
   collective that cannot complete. */
MOE_EP_PRIVATE void moe_ep__nccl_break(moe_ep__nccl* n) {
    if (n->broken) return;
    n->broken = 1;
    ncclCommAbort(n->comm);
}

MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_usable(moe_ep__nccl* n, char* err, size_t size) {
    if (n->broken) {
        moe_ep__nccl_text(err, size, "the communicator was aborted by an earlier failure");
        return MOE_EP_ERROR_ABORTED;
    }
    if (cudaSetDevice(n->device) != cudaSuccess) {
        (void)cudaGetLastError();
        moe_ep__nccl_text(err, size, "cudaSetDevice(%d) failed", n->device);
        return MOE_EP_ERROR_TRANSPORT;
    }
    return MOE_EP_OK;
}

/* Waits for an event (or a whole stream when event is NULL) with a way out: an
   asynchronous NCCL error, transport.abort, or desc.timeout_ms. */
MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_wait(moe_ep__nccl* n, cudaStream_t stream, cudaEvent_t event, char* err,
                                               size_t size) {
    time_t start = time(NULL);
    unsigned long spins = 0;
    for (;;) {
        cudaError_t q = event ? cudaEventQuery(event) : cudaStreamQuery(stream);
        ncclResult_t async = ncclSuccess;
        if (q == cudaSuccess) return MOE_EP_OK;
        if (q != cudaErrorNotReady) return moe_ep__nccl_cuda_fail(q, "waiting for the stream", err, size);
        if (++spins % 1024 != 0) continue;
        if (ncclCommGetAsyncError(n->comm, &async) == ncclSuccess && async != ncclSuccess && async != ncclInProgress) {
            moe_ep_result r = moe_ep__nccl_nccl_fail(n, async, "asynchronous NCCL error", err, size);
            moe_ep__nccl_break(n);
            return r;
        }
        if (n->abort_requested) {
            moe_ep__nccl_break(n);
            moe_ep__nccl_text(err, size, "aborted while waiting for the other ranks");
            return MOE_EP_ERROR_ABORTED;
        }
        if (n->timeout_ms > 0 && difftime(time(NULL), start) * 1000.0 > (double)n->timeout_ms + 999.0) {
            moe_ep__nccl_break(n);
            moe_ep__nccl_text(err, size, "no progress for %d ms; the communicator was aborted", n->timeout_ms);
            return MOE_EP_ERROR_TIMEOUT;
        }
    }
}

/* >>nccl transport: counts */
MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_exchange(void* impl, const int64_t* send, int64_t* recv, int count,
                                                   char* err, size_t size) {
    moe_ep__nccl* n = (moe_ep__nccl*)impl;
    size_t per = (size_t)count, all = per * (size_t)n->world_size, bytes = all * sizeof(int64_t);
    moe_ep_result res = moe_ep__nccl_usable(n, err, size);
    cudaError_t e;
    ncclResult_t r;
    int p;
    if (res != MOE_EP_OK) return res;
    if (count <= 0) return MOE_EP_OK;
    if (2 * all > n->counts_capacity) {
        size_t cap_host = n->counts_capacity * sizeof(int64_t), cap_dev = cap_host;
        void* host = n->counts_host;
        void* dev = n->counts_dev;
        e = moe_ep__nccl_grow_pinned(&host, &cap_host, 2 * bytes);
        if (e == cudaSuccess) e = moe_ep__nccl_grow_device(&dev, &cap_dev, 2 * bytes);
        n->counts_host = (int64_t*)host;
        n->counts_dev = (int64_t*)dev;
        n->counts_capacity = (cap_host < cap_dev ? cap_host : cap_dev) / sizeof(int64_t);
        if (e != cudaSuccess) return moe_ep__nccl_cuda_fail(e, "count exchange buffers", err, size);
    }
    memcpy(n->counts_host, send, bytes);
    e = cudaMemcpyAsync(n->counts_dev, n->counts_host, bytes, cudaMemcpyHostToDevice, n->side);
    if (e != cudaSuccess) return moe_ep__nccl_cuda_fail(e, "count exchange upload", err, size);
    r = ncclGroupStart();
    for (p = 0; r == ncclSuccess && p < n->world_size; ++p) {
        if (p == n->rank) continue;
        r = ncclSend(n->counts_dev + (size_t)p * per, per, ncclInt64, p, n->comm, n->side);
        if (r == ncclSuccess) r = ncclRecv(n->counts_dev + all + (size_t)p * per, per, ncclInt64, p, n->comm, n->side);
    }
    {
        ncclResult_t end = ncclGroupEnd();
        if (r == ncclSuccess) r = end;
    }
    if (r != ncclSuccess) return moe_ep__nccl_nccl_fail(n, r, "count exchange", err, size);
    e = cudaMemcpyAsync(n->counts_host + all, n->counts_dev + all, bytes, cudaMemcpyDeviceToHost, n->side);
    if (e != cudaSuccess) return moe_ep__nccl_cuda_fail(e, "count exchange download", err, size);
    res = moe_ep__nccl_wait(n, n->side, NULL, err, size);
    if (res != MOE_EP_OK) return res;
    /* send may alias recv: our own block comes from the staged copy of send */
    memcpy(n->counts_host + all + (size_t)n->rank * per, n->counts_host + (size_t)n->rank * per, per * sizeof(int64_t));
    memcpy(recv, n->counts_host + all, bytes);
    return MOE_EP_OK;
}

MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_barrier(void* impl, char* err, size_t size) {
    moe_ep__nccl* n = (moe_ep__nccl*)impl;
    int64_t words[2] = { 0, 0 };
    int64_t* buf = n->world_size <= 1 ? words : (int64_t*)moe_ep__nccl_alloc(&n->allocator,
                                                    sizeof(int64_t) * 2 * (size_t)n->world_size);
    moe_ep_result res;
    if (!buf) return MOE_EP_ERROR_OUT_OF_MEMORY;
    memset(buf, 0, sizeof(int64_t) * 2 * (size_t)(n->world_size <= 1 ? 1 : n->world_size));
    res = moe_ep__nccl_exchange(impl, buf, buf + n->world_size, 1, err, size);
    if (buf != words) moe_ep__nccl_free(&n->allocator, buf);
    return res;
}

/* >>nccl transport: rows */
MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_group_end(moe_ep__nccl* n, ncclResult_t r, char* err, size_t size) {
    ncclResult_t end = ncclGroupEnd();
    if (r == ncclSuccess) r = end;
    if (r != ncclSuccess) return moe_ep__nccl_nccl_fail(n, r, "grouped send/recv", err, size);
    return MOE_EP_OK;
}

/* The segmented exchange of device buffers on `stream`: our own segments by device copy,
   the others one ncclSend/ncclRecv per non-empty segment, in segment order. */
MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_rows(moe_ep__nccl* n, const moe_ep_a2a_args* a, const char* send, char* recv,
                                               cudaStream_t stream, char* err, size_t size) {
    int S = a->segments, p, s, me = n->rank;
    size_t rb = a->row_bytes;
    ncclResult_t r;
    for (s = 0; s < S; ++s) {
        int64_t rows = a->send_counts[me * S + s];
        cudaError_t e;
        if (rows != a->recv_counts[me * S + s]) {
            moe_ep__nccl_text(err, size, "segment %d to itself: sends %lld rows, expects %lld", s, (long long)rows,
                              (long long)a->recv_counts[me * S + s]);
            return MOE_EP_ERROR_TRANSPORT;
        }
        if (rows <= 0) continue;
        e = cudaMemcpyAsync(recv + (size_t)a->recv_offsets[me * S + s] * rb, send + (size_t)a->send_offsets[me * S + s] * rb,
                            (size_t)rows * rb, cudaMemcpyDeviceToDevice, stream);
        if (e != cudaSuccess) return moe_ep__nccl_cuda_fail(e, "local segment copy", err, size);
    }
    r = ncclGroupStart();
    for (p = 0; r == ncclSuccess && p < n->world_size; ++p) {
        if (p == me) continue;
        for (s = 0; r == ncclSuccess && s < S; ++s) {
            int64_t out = a->send_counts[p * S + s], in = a->recv_counts[p * S + s];
            if (out > 0)
                r = ncclSend(send + (size_t)a->send_offsets[p * S + s] * rb, (size_t)out * rb, ncclInt8, p, n->comm, stream);
            if (r == ncclSuccess && in > 0)
                r = ncclRecv(recv + (size_t)a->recv_offsets[p * S + s] * rb, (size_t)in * rb, ncclInt8, p, n->comm, stream);
        }
    }
    return moe_ep__nccl_group_end(n, r, err, size);
}

/* Rows [first, end) that a side of the exchange touches, from its counts and offsets. */
MOE_EP_PRIVATE void moe_ep__nccl_span(const moe_ep_a2a_args* a, int recv_side, int world, int64_t* first, int64_t* end) {
    int i, total = world * a->segments;
    const int64_t* counts = recv_side ? a->recv_counts : a->send_counts;
    const int64_t* offsets = recv_side ? a->recv_offsets : a->send_offsets;
    *first = 0;
    *end = 0;
    for (i = 0; i < total; ++i) {
        if (counts[i] <= 0) continue;
        if (*end == 0 || offsets[i] < *first) *first = offsets[i];
        if (offsets[i] + counts[i] > *end) *end = offsets[i] + counts[i];
    }
    if (*end == 0) *first = 0;
}

MOE_EP_PRIVATE moe_ep__nccl_request* moe_ep__nccl_request_take(moe_ep__nccl* n, char* err, size_t size) {
    int i;
    for (i = 0; i < MOE_EP__NCCL_REQUESTS; ++i) {
        moe_ep__nccl_request* q = &n->requests[i];
        if (q->in_use) continue;
        if (!q->ready) {
            if (cudaEventCreateWithFlags(&q->ready, cudaEventDisableTiming) != cudaSuccess ||
                cudaEventCreateWithFlags(&q->done, cudaEventDisableTiming) != cudaSuccess) {
                (void)cudaGetLastError();
                moe_ep__nccl_text(err, size, "cudaEventCreate failed");
                return NULL;
            }
        }
        q->in_use = 1;
        return q;
    }
    moe_ep__nccl_text(err, size, "more than %d split-phase exchanges are open", MOE_EP__NCCL_REQUESTS);
    return NULL;
}

/* Make the side stream wait for `user`. */
MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_fork(moe_ep__nccl* n, moe_ep__nccl_request* q, cudaStream_t user, char* err,
                                               size_t size) {
    cudaError_t e = cudaEventRecord(q->ready, user);
    if (e == cudaSuccess) e = cudaStreamWaitEvent(n->side, q->ready, 0);
    q->user = user;
    if (e != cudaSuccess) return moe_ep__nccl_cuda_fail(e, "ordering the exchange after the stream", err, size);
    return MOE_EP_OK;
}

MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_a2a_begin(void* impl, const moe_ep_a2a_args* a, void** request, char* err,
                                                    size_t size) {
    moe_ep__nccl* n = (moe_ep__nccl*)impl;
    moe_ep__nccl_request* q;
    moe_ep_result res = moe_ep__nccl_usable(n, err, size);
    cudaStream_t user = a->stream ? (cudaStream_t)a->stream : n->stream;
    if (res != MOE_EP_OK) return res;
    if (a->segments < 1 || a->row_bytes == 0) {
        moe_ep__nccl_text(err, size, "segments (%d) must be >= 1 and row_bytes > 0", a->segments);
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    q = moe_ep__nccl_request_take(n, err, size);
    if (!q) return MOE_EP_ERROR_TRANSPORT;
    q->args = a;
    q->host = a->memory_space != MOE_EP_MEMORY_DEVICE;
    res = moe_ep__nccl_fork(n, q, user, err, size);
    if (res == MOE_EP_OK && !q->host) {
        res = moe_ep__nccl_rows(n, a, (const char*)a->send, (char*)a->recv, n->side, err, size);
    } else if (res == MOE_EP_OK) {
        /* Host rows: upload the span this rank sends, exchange between device buffers;
           end() downloads the received segments. */
        int64_t s0, s1, r0, r1;
        cudaError_t e;
        moe_ep__nccl_span(a, 0, n->world_size, &s0, &s1);
        moe_ep__nccl_span(a, 1, n->world_size, &r0, &r1);
        e = moe_ep__nccl_grow_device(&n->stage_send, &n->stage_send_bytes, (size_t)s1 * a->row_bytes);
        if (e == cudaSuccess) e = moe_ep__nccl_grow_device(&n->stage_recv, &n->stage_recv_bytes, (size_t)r1 * a->row_bytes);
        if (e == cudaSuccess && s1 > s0)
            e = cudaMemcpyAsync((char*)n->stage_send + (size_t)s0 * a->row_bytes,
                                (const char*)a->send + (size_t)s0 * a->row_bytes, (size_t)(s1 - s0) * a->row_bytes,
                                cudaMemcpyHostToDevice, n->side);
        if (e != cudaSuccess) res = moe_ep__nccl_cuda_fail(e, "staging host rows", err, size);
        else res = moe_ep__nccl_rows(n, a, (const char*)n->stage_send, (char*)n->stage_recv, n->side, err, size);
    }
    if (res == MOE_EP_OK) {
        cudaError_t e = cudaEventRecord(q->done, n->side);
        if (e != cudaSuccess) res = moe_ep__nccl_cuda_fail(e, "recording the exchange", err, size);
    }
    if (res != MOE_EP_OK) {
        q->in_use = 0;
        return res;
    }
    *request = q;
    return MOE_EP_OK;
}

MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_a2a_end(void* impl, void* request, char* err, size_t size) {
    moe_ep__nccl* n = (moe_ep__nccl*)impl;
    moe_ep__nccl_request* q = (moe_ep__nccl_request*)request;
    moe_ep_result res = MOE_EP_OK;
    if (!q || !q->in_use) {
        moe_ep__nccl_text(err, size, "no exchange is open for this request");
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    if (!q->host) {
        cudaError_t e = cudaStreamWaitEvent(q->user, q->done, 0);
        if (e != cudaSuccess) res = moe_ep__nccl_cuda_fail(e, "ordering the stream after the exchange", err, size);
    } else {
        const moe_ep_a2a_args* a = q->args;
        int i, total = n->world_size * a->segments;
        res = moe_ep__nccl_wait(n, NULL, q->done, err, size);
        /* download the received segments, merging neighbours */
        for (i = 0; res == MOE_EP_OK && i < total;) {
            int64_t first = a->recv_offsets[i], rows = a->recv_counts[i];
            int j = i + 1;
            if (rows <= 0) { i = j; continue; }
            while (j < total && (a->recv_counts[j] <= 0 || a->recv_offsets[j] == first + rows)) {
                if (a->recv_counts[j] > 0) rows += a->recv_counts[j];
                ++j;
            }
            {
                cudaError_t e = cudaMemcpy((char*)a->recv + (size_t)first * a->row_bytes,
                                           (const char*)n->stage_recv + (size_t)first * a->row_bytes,
                                           (size_t)rows * a->row_bytes, cudaMemcpyDeviceToHost);
                if (e != cudaSuccess) res = moe_ep__nccl_cuda_fail(e, "downloading received rows", err, size);
            }
            i = j;
        }
    }
    q->in_use = 0;
    return res;
}

MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_a2a(void* impl, const moe_ep_a2a_args* a, char* err, size_t size) {
    moe_ep__nccl* n = (moe_ep__nccl*)impl;
    void* request = NULL;
    moe_ep_result res;
    if (a->memory_space == MOE_EP_MEMORY_DEVICE) {
        /* no side stream needed: queue straight on the caller's stream */
        res = moe_ep__nccl_usable(n, err, size);
        if (res != MOE_EP_OK) return res;
        if (a->segments < 1 || a->row_bytes == 0) {
            moe_ep__nccl_text(err, size, "segments (%d) must be >= 1 and row_bytes > 0", a->segments);
            return MOE_EP_ERROR_INVALID_ARGUMENT;
        }
        return moe_ep__nccl_rows(n, a, (const char*)a->send, (char*)a->recv,
                                 a->stream ? (cudaStream_t)a->stream : n->stream, err, size);
    }
    res = moe_ep__nccl_a2a_begin(impl, a, &request, err, size);
    if (res != MOE_EP_OK) return res;
    return moe_ep__nccl_a2a_end(impl, request, err, size);
}

/* >>nccl transport: all-reduce */
/* data[0..count) on the host += the other ranks' blocks in rank order, from gather_host. */
MOE_EP_PRIVATE void moe_ep__nccl_sum_host(const moe_ep__nccl* n, float* data, int64_t count) {
    int q;
    int64_t i;
    if (data != n->gather_host) memcpy(data, n->gather_host, (size_t)count * sizeof(float));
    for (q = 1; q < n->world_size; ++q) {
        const float* block = n->gather_host + (size_t)q * (size_t)count;
        for (i = 0; i < count; ++i) data[i] += block[i];
    }
}

/* Every rank's block gathered (ncclAllGather), then added in rank order: by a kernel on the
   caller's stream for device memory; on the host for host memory (and, without the
   kernels, for device memory too). ncclAllReduce would be faster but promises no order. */
MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_all_reduce(void* impl, float* data, int64_t count,
                                                     moe_ep_memory_space memory_space, void* stream, char* err,
                                                     size_t size) {
    moe_ep__nccl* n = (moe_ep__nccl*)impl;
    size_t bytes = (size_t)(count > 0 ? count : 0) * sizeof(float), all = bytes * (size_t)n->world_size;
    int device = memory_space == MOE_EP_MEMORY_DEVICE;
    cudaStream_t s = device ? (stream ? (cudaStream_t)stream : n->stream) : n->side;
    float* mine;
    cudaError_t e;
    ncclResult_t r;
    moe_ep_result res = moe_ep__nccl_usable(n, err, size);
    if (res != MOE_EP_OK) return res;
    if (count < 0 || (count > 0 && !data)) {
        moe_ep__nccl_text(err, size, "all_reduce_sum: count (%lld) must be >= 0 and data non-NULL", (long long)count);
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    if (count == 0 || n->world_size == 1) return MOE_EP_OK;
    if (!n->gather_free && cudaEventCreateWithFlags(&n->gather_free, cudaEventDisableTiming) != cudaSuccess) {
        n->gather_free = NULL;
        return moe_ep__nccl_cuda_fail(cudaGetLastError(), "all_reduce_sum event", err, size);
    }
    /* the previous call's kernel may still read the gathered blocks on another stream */
    e = cudaStreamWaitEvent(s, n->gather_free, 0);
    if (e == cudaSuccess) {
        void* buffer = n->gather_dev;
        e = moe_ep__nccl_grow_device(&buffer, &n->gather_dev_bytes, all);
        n->gather_dev = (float*)buffer;
    }
    if (e != cudaSuccess) return moe_ep__nccl_cuda_fail(e, "all_reduce_sum buffers", err, size);
    mine = n->gather_dev + (size_t)n->rank * (size_t)count;
    if (!device) {
        e = cudaMemcpyAsync(mine, data, bytes, cudaMemcpyHostToDevice, s);
        if (e != cudaSuccess) return moe_ep__nccl_cuda_fail(e, "all_reduce_sum upload", err, size);
    }
    r = ncclAllGather(device ? (const void*)data : (const void*)mine, n->gather_dev, (size_t)count, ncclFloat, n->comm, s);
    if (r != ncclSuccess) return moe_ep__nccl_nccl_fail(n, r, "all_reduce_sum gather", err, size);
#ifndef MOE_EP_NCCL_NO_LAYER
    if (device) {
        e = (cudaError_t)moe_ep__nccl_k_sum_ranks(n->gather_dev, count, n->world_size, data, MOE_EP__NCCL_K_F32, s);
        if (e == cudaSuccess) e = cudaEventRecord(n->gather_free, s);
        if (e != cudaSuccess) return moe_ep__nccl_cuda_fail(e, "all_reduce_sum kernel", err, size);
        return MOE_EP_OK;
    }
#endif
    {
        void* buffer = n->gather_host;
        e = moe_ep__nccl_grow_pinned(&buffer, &n->gather_host_bytes, all);
        n->gather_host = (float*)buffer;
    }
    if (e == cudaSuccess) e = cudaMemcpyAsync(n->gather_host, n->gather_dev, all, cudaMemcpyDeviceToHost, s);
    if (e == cudaSuccess) e = cudaEventRecord(n->gather_free, s);
    if (e != cudaSuccess) return moe_ep__nccl_cuda_fail(e, "all_reduce_sum download", err, size);
    res = moe_ep__nccl_wait(n, s, NULL, err, size);
    if (res != MOE_EP_OK) return res;
    if (!device) {
        moe_ep__nccl_sum_host(n, data, count);
        return MOE_EP_OK;
    }
    /* device memory without the kernels: the sum is made in the pinned buffer's first block */
    moe_ep__nccl_sum_host(n, n->gather_host, count);
    e = cudaMemcpyAsync(data, n->gather_host, bytes, cudaMemcpyHostToDevice, s);
    if (e != cudaSuccess) return moe_ep__nccl_cuda_fail(e, "all_reduce_sum result upload", err, size);
    return moe_ep__nccl_wait(n, s, NULL, err, size);    /* before the pinned buffer is reused */
}

/* >>nccl transport: split */
/* One verdict on every rank of n: res if this rank failed, else ABORTED if another did
   (err says which), else OK. */
MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_verdict(moe_ep__nccl* n, moe_ep_result res, const char* what, char* err,
                                                  size_t size) {
    int p, R = n->world_size;
    char text[MOE_EP__NCCL_ERR] = "";
    moe_ep_result agreed;
    int64_t* words = (int64_t*)moe_ep__nccl_alloc(&n->allocator, sizeof(int64_t) * 2 * (size_t)R);
    if (!words) {
        if (res == MOE_EP_OK) moe_ep__nccl_text(err, size, "%s: out of memory", what);
        return res != MOE_EP_OK ? res : MOE_EP_ERROR_OUT_OF_MEMORY;
    }
    for (p = 0; p < R; ++p) words[p] = (int64_t)res;
    agreed = moe_ep__nccl_exchange(n, words, words + R, 1, text, sizeof text);
    if (agreed != MOE_EP_OK && res == MOE_EP_OK) moe_ep__nccl_text(err, size, "%s: %s", what, text);
    for (p = 0; agreed == MOE_EP_OK && p < R; ++p)
        if (words[R + p] != MOE_EP_OK) {
            agreed = MOE_EP_ERROR_ABORTED;
            if (res == MOE_EP_OK)
                moe_ep__nccl_text(err, size, "%s: rank %d failed (%s)", what, p,
                                  moe_ep_result_string((moe_ep_result)words[R + p]));
        }
    moe_ep__nccl_free(&n->allocator, words);
    return res != MOE_EP_OK ? res : agreed;
}

MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_split(void* impl, int color, int key, moe_ep_transport* out, char* err,
                                                size_t size) {
    moe_ep__nccl* n = (moe_ep__nccl*)impl;
    ncclComm_t comm = NULL;
    moe_ep_transport t;
    moe_ep_nccl_desc desc;
    ncclResult_t r;
    moe_ep_result res = moe_ep__nccl_usable(n, err, size);
    if (res != MOE_EP_OK) return res;
    memset(&t, 0, sizeof t);
    /* Colors first: with a negative color anywhere no rank calls ncclCommSplit. (On
       4 x H200, a 3-rank group split beside a rank with NCCL_SPLIT_NOCOLOR blocked its
       first rank in ncclCommDestroy, and in ncclCommAbort, until the others timed out.) */
    if (color < 0) {
        moe_ep__nccl_text(err, size, "split: color (%d) must be >= 0", color);
        res = MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    res = moe_ep__nccl_verdict(n, res, "split", err, size);
    if (res != MOE_EP_OK) return res;
    /* collective over the parent */
    r = ncclCommSplit(n->comm, color, key, &comm, NULL);
    if (r != ncclSuccess || !comm) {
        res = r != ncclSuccess ? moe_ep__nccl_nccl_fail(n, r, "ncclCommSplit", err, size) : MOE_EP_ERROR_TRANSPORT;
        comm = NULL;
    } else {
        memset(&desc, 0, sizeof desc);
        desc.comm = comm;
        desc.stream = n->stream;
        desc.timeout_ms = n->timeout_ms;
        desc.allocator = n->allocator;
        res = moe_ep_nccl_transport_create(&desc, &t);
        if (res == MOE_EP_OK) ((moe_ep__nccl*)t.impl)->owns_comm = 1;
        else moe_ep__nccl_text(err, size, "split: the new transport could not be created (%s)", moe_ep_result_string(res));
    }
    res = moe_ep__nccl_verdict(n, res, "split", err, size);
    if (res == MOE_EP_OK) {
        *out = t;
        return MOE_EP_OK;
    }
    /* abort, not destroy, a group nobody will use: an abort waits for no peer */
    if (comm) ncclCommAbort(comm);
    if (t.impl) {
        ((moe_ep__nccl*)t.impl)->broken = 1;        /* the communicator is gone */
        moe_ep_nccl_transport_destroy(&t);
    }
    return res;
}

MOE_EP_PRIVATE void moe_ep__nccl_abort_cb(void* impl) {
    ((moe_ep__nccl*)impl)->abort_requested = 1;
}

MOE_EP_PRIVATE void moe_ep__nccl_destroy_cb(void* impl) {
    moe_ep__nccl* n = (moe_ep__nccl*)impl;
    moe_ep_allocator a;
    int i;
    if (!n) return;
    a = n->allocator;
    cudaSetDevice(n->device);
    if (!n->broken) cudaStreamSynchronize(n->side);
    for (i = 0; i < MOE_EP__NCCL_REQUESTS; ++i) {
        if (n->requests[i].ready) cudaEventDestroy(n->requests[i].ready);
        if (n->requests[i].done) cudaEventDestroy(n->requests[i].done);
    }
    if (n->counts_host) cudaFreeHost(n->counts_host);
    if (n->counts_dev) cudaFree(n->counts_dev);
    if (n->stage_send) cudaFree(n->stage_send);
    if (n->stage_recv) cudaFree(n->stage_recv);
    if (n->gather_dev) cudaFree(n->gather_dev);
    if (n->gather_host) cudaFreeHost(n->gather_host);
    if (n->gather_free) cudaEventDestroy(n->gather_free);
    if (n->side) cudaStreamDestroy(n->side);
    (void)cudaGetLastError();
    /* a split communicator is ours; an aborted one is already gone (ncclCommAbort frees it) */
    if (n->owns_comm && !n->broken) ncclCommDestroy(n->comm);
    moe_ep__nccl_free(&a, n);
}

MOE_EP_API moe_ep_result moe_ep_nccl_transport_create(const moe_ep_nccl_desc* desc, moe_ep_transport* out) {
    moe_ep__nccl* n;
    moe_ep_transport t;
    int rank = -1, count = 0, device = -1;
    if (!desc || !out || !desc->comm || desc->timeout_ms < 0 ||
        (desc->allocator.alloc_fn == NULL) != (desc->allocator.free_fn == NULL))
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    if (ncclCommUserRank(desc->comm, &rank) != ncclSuccess || ncclCommCount(desc->comm, &count) != ncclSuccess ||
        ncclCommCuDevice(desc->comm, &device) != ncclSuccess)
        return MOE_EP_ERROR_TRANSPORT;
    if (cudaSetDevice(device) != cudaSuccess) {
        (void)cudaGetLastError();
        return MOE_EP_ERROR_TRANSPORT;
    }
    n = (moe_ep__nccl*)moe_ep__nccl_alloc(&desc->allocator, sizeof *n);
    if (!n) return MOE_EP_ERROR_OUT_OF_MEMORY;
    memset(n, 0, sizeof *n);
    n->comm = desc->comm;
    n->stream = desc->stream;
    n->device = device;
    n->rank = rank;
    n->world_size = count;
    n->timeout_ms = desc->timeout_ms;
    n->allocator = desc->allocator;
    if (cudaStreamCreateWithFlags(&n->side, cudaStreamNonBlocking) != cudaSuccess) {
        (void)cudaGetLastError();
        moe_ep__nccl_free(&n->allocator, n);
        return MOE_EP_ERROR_TRANSPORT;
    }
    memset(&t, 0, sizeof t);
    t.impl = n;
    t.name = "nccl";
    t.rank = rank;
    t.world_size = count;
    t.local_ranks = 1;
    t.exchange_counts = moe_ep__nccl_exchange;
    t.all_to_all_v = moe_ep__nccl_a2a;
    t.all_to_all_v_begin = moe_ep__nccl_a2a_begin;
    t.all_to_all_v_end = moe_ep__nccl_a2a_end;
    t.barrier = moe_ep__nccl_barrier;
    t.abort = moe_ep__nccl_abort_cb;
    t.destroy = moe_ep__nccl_destroy_cb;
    t.all_reduce_sum = moe_ep__nccl_all_reduce;
    t.split = moe_ep__nccl_split;
    *out = t;
    return MOE_EP_OK;
}

MOE_EP_API void moe_ep_nccl_transport_destroy(moe_ep_transport* transport) {
    if (!transport) return;
    if (transport->destroy == moe_ep__nccl_destroy_cb) moe_ep__nccl_destroy_cb(transport->impl);
    memset(transport, 0, sizeof *transport);
}

#ifndef MOE_EP_NCCL_NO_LAYER
/* >>gpu layer: state */
typedef struct moe_ep__nccl_buffers {
    void* send;                     /* device [send rows, d]: send order; the combine lands here too */
    void* stage;                    /* device [remote receive rows, d]: staged layout */
    void* meta;                     /* device: slot map, weights, stage map */
    void* meta_host;                /* pinned mirror of meta */
    size_t send_bytes, stage_bytes, meta_bytes, meta_host_bytes;
    cudaEvent_t uploaded;           /* meta_host may be rewritten once the stream passed this */
    int full;                       /* sized at create for max_tokens */
} moe_ep__nccl_buffers;

struct moe_ep_nccl_plan {
    moe_ep_nccl_layer* layer;
    moe_ep_plan* core;
    moe_ep_plan_info info;
    moe_ep__nccl_buffers bufs;
    int32_t* slot_map;              /* device [tokens * k] */
    float* weight;                  /* device [tokens * k] */
    int32_t* stage_map;             /* device [remote_rows]: staging row -> receive row */
    int64_t remote_rows;
    int pending;                    /* 0 none, 1 dispatch open, 2 combine open */
    moe_ep__nccl_request* request;
    void* open_rows;                /* dispatch: recv_rows */
    const void* open_local;         /* combine: expert_out */
    moe_ep_result expert_status;
    int64_t* dest;                  /* device [tokens * k], direct path: (rank << 32) | row of each slot */
    uint64_t xfer;                  /* direct: the transfer epoch of its dispatch, 0 once combined */
    int out_sent;                   /* direct: OUT(xfer) signalled */
};

struct moe_ep_nccl_layer {
    moe_ep_nccl_layer_desc desc;    /* resolved; desc.base.transport is NULL */
    moe_ep_transport transport;
    moe_ep__nccl* net;
    moe_ep_transport tp;            /* the TP group (base.tp_transport), when tp_size > 1 */
    moe_ep__nccl* tp_net;
    int tp_rank, tp_size, ff_full, ff_begin;    /* this rank holds d_ff rows [ff_begin, ff_begin + ff) */
    int partial_f32;                /* bf16 with TP: down projections write fp32 partial sums */
    void* partial; size_t partial_bytes;        /* device fp32 [rows, d] */
    moe_ep_context* core;
    cudaStream_t stream;
    cublasHandle_t blas;
    int grouped;                    /* 0 loop, 1 grouped, 2 grouped for small experts */
    int* group_ints;                /* host [9 * L]: m, n, k, lda, ldb, ldc of a projection, group sizes */
    float* group_scalars;           /* host [2 * L]: alpha, beta */
    cublasOperation_t* group_ops;   /* host [2 * L]: transa, transb */
    void** ptrs_host;               /* pinned [6 * L]: A, B, C of the up and the down projection */
    void** ptrs_dev;
    cudaEvent_t ptrs_uploaded;
    int lanes;                      /* expert streams; 1 = the layer stream only */
    cudaStream_t lane_stream[MOE_EP__NCCL_LANES];
    cublasHandle_t lane_blas[MOE_EP__NCCL_LANES];
    cudaEvent_t lane_done[MOE_EP__NCCL_LANES];
    cudaEvent_t lanes_go;
    int rank, world_size, dtype, d, ff, E, k, L, S, up_rows, activation;
    size_t elem, row_bytes;
    int* owner_of;                  /* [E] */
    int* local_index_of;            /* [E] */
    int* local_ids;                 /* [L] global id of each local expert */
    void* router;                   /* device [E, d] */
    void* w_up;                     /* device [L, up_rows, d] */
    void* w_down;                   /* device [L, d, ff] */
    void* logits; size_t logits_bytes;
    void* topk_dev; size_t topk_dev_bytes;
    void* topk_host; size_t topk_host_bytes;
    void* hidden; size_t hidden_bytes;
    void* recv; size_t recv_bytes;
    void* out; size_t out_bytes;
    int32_t* routing_idx;           /* host, for forward calls without routing arrays */
    float* routing_weight;
    int64_t routing_capacity;
    /* the direct path */
    int direct;                     /* rows move by stores into the peers' regions */
    char* region;                   /* device: flags, offset table, recv rows, out rows (kernels.cuh) */
    size_t region_bytes;
    int64_t region_rows;            /* rows of recv and of out */
    char** peer_host;               /* [R] each rank's region as this GPU sees it */
    int* peer_opened;               /* [R] 1: opened with cudaIpcOpenMemHandle */
    char** peer_dev;                /* device copy of peer_host */
    int32_t* expert_at;             /* device [2E]: each expert's rank, then its local index */
    int* ctl_host;                  /* host-mapped [2]: [1] a direct wait timed out */
    moe_ep__nccl_k_direct g;        /* what the direct kernels get */
    uint64_t plan_epoch, xfer_epoch;
    moe_ep_nccl_plan* open_plan;    /* dispatched directly and not combined yet */
    moe_ep__nccl_buffers spare;     /* plan buffers of the last destroyed plan */
    int has_spare;
    void* cache[MOE_EP__NCCL_CACHE];    /* host blocks the core context freed, for its next plan */
    int cached;
    char last_error[MOE_EP__NCCL_ERR];
};

/* The core context's allocator: a plan allocates the same dozen blocks every layer call,
   some of them large; keeping freed blocks spares the page faults and mmap/munmap churn
   that fresh memory costs each time. Used by the layer's own thread only. */
MOE_EP_PRIVATE void* moe_ep__nccl_cache_alloc(size_t size, void* user_data) {
    moe_ep_nccl_layer* L = (moe_ep_nccl_layer*)user_data;
    int i, best = -1;
    size_t best_size = 0;
    char* block;
    for (i = 0; i < L->cached; ++i) {
        size_t have = *(size_t*)L->cache[i];
        if (have >= size && have <= 2 * size + 4096 && (best < 0 || have < best_size)) {
            best = i;
            best_size = have;
        }
    }
    if (best >= 0) {
        block = (char*)L->cache[best];
        L->cache[best] = L->cache[--L->cached];
        return block + MOE_EP__NCCL_HEADER;
    }
    if (size > (size_t)-1 - MOE_EP__NCCL_HEADER) return NULL;
    block = (char*)moe_ep__nccl_alloc(&L->desc.base.allocator, size + MOE_EP__NCCL_HEADER);
    if (!block) return NULL;
    *(size_t*)block = size;
    return block + MOE_EP__NCCL_HEADER;
}

MOE_EP_PRIVATE void moe_ep__nccl_cache_free(void* ptr, void* user_data) {
    moe_ep_nccl_layer* L = (moe_ep_nccl_layer*)user_data;
    char* block = (char*)ptr - MOE_EP__NCCL_HEADER;
    if (L->cached < MOE_EP__NCCL_CACHE) L->cache[L->cached++] = block;
    else moe_ep__nccl_free(&L->desc.base.allocator, block);
}

MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_fail(moe_ep_nccl_layer* L, moe_ep_result result, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(L->last_error, sizeof L->last_error, fmt, ap);
    va_end(ap);
    if (L->desc.base.logger.func)
        L->desc.base.logger.func("moe_ep_nccl", 1, L->rank, L->last_error, L->desc.base.logger.user_data);
    return result;
}

MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_cuda(moe_ep_nccl_layer* L, cudaError_t e, const char* what) {
    if (e == cudaSuccess) return MOE_EP_OK;
    (void)cudaGetLastError();
    return moe_ep__nccl_fail(L, e == cudaErrorMemoryAllocation ? MOE_EP_ERROR_OUT_OF_MEMORY : MOE_EP_ERROR_INTERNAL,
                             "%s: %s", what, cudaGetErrorString(e));
}

MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_blas(moe_ep_nccl_layer* L, cublasStatus_t s, const char* what) {
    if (s == CUBLAS_STATUS_SUCCESS) return MOE_EP_OK;
    return moe_ep__nccl_fail(L, s == CUBLAS_STATUS_ALLOC_FAILED ? MOE_EP_ERROR_OUT_OF_MEMORY : MOE_EP_ERROR_INTERNAL,
                             "%s: %s", what, cublasGetStatusString(s));
}

MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_net_fail(moe_ep_nccl_layer* L, moe_ep_result r, const char* what, const char* err) {
    return moe_ep__nccl_fail(L, r, "%s: %s%s%s", what, moe_ep_result_string(r), err[0] ? ": " : "", err);
}

/* Every rank learns whether every rank is fine; the verdict is the same everywhere. */
MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_agree(moe_ep_nccl_layer* L, moe_ep_result local, const char* stage) {
    char err[MOE_EP__NCCL_ERR] = "";
    moe_ep_result res = moe_ep__nccl_verdict(L->net, local, stage, err, sizeof err);
    if (res != local) moe_ep__nccl_fail(L, res, "%s", err);     /* another rank failed, or the exchange did */
    return res;
}

static const int moe_ep__nccl_kdtype[] = { 0, MOE_EP__NCCL_K_F32, MOE_EP__NCCL_K_BF16 };

MOE_EP_PRIVATE cudaDataType_t moe_ep__nccl_cuda_type(const moe_ep_nccl_layer* L) {
    return L->dtype == MOE_EP_NCCL_DTYPE_BF16 ? CUDA_R_16BF : CUDA_R_32F;
}

/* Column-major C[m, n] (ldc) = op(A)^T... in row-major words: out[n, m] = in[n, k] . W[m, k]^T,
   W in nn.Linear layout (lda = k), in with row stride ldb, out with row stride ldc. */
MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_linear(moe_ep_nccl_layer* L, cublasHandle_t blas, const void* w, int m, int k,
                                                 const void* in, int64_t ldb, int64_t n, void* out, int64_t ldc,
                                                 cudaDataType_t out_type, const char* what) {
    const float one = 1.0f, zero = 0.0f;
    cudaDataType_t t = moe_ep__nccl_cuda_type(L);
    if (n <= 0) return MOE_EP_OK;
    if (n > 0x7FFFFFFF)
        return moe_ep__nccl_fail(L, MOE_EP_ERROR_UNSUPPORTED, "%s: %lld rows exceed one GEMM", what, (long long)n);
    return moe_ep__nccl_blas(L, cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, m, (int)n, k, &one, w, t, k, in, t,
                                             (int)ldb, &zero, out, out_type, (int)ldc, CUBLAS_COMPUTE_32F,
                                             CUBLAS_GEMM_DEFAULT), what);
}

MOE_EP_PRIVATE void moe_ep__nccl_free_buffers(moe_ep__nccl_buffers* b) {
    if (b->send) cudaFree(b->send);
    if (b->stage) cudaFree(b->stage);
    if (b->meta) cudaFree(b->meta);
    if (b->meta_host) cudaFreeHost(b->meta_host);
    if (b->uploaded) cudaEventDestroy(b->uploaded);
    (void)cudaGetLastError();
    memset(b, 0, sizeof *b);
}

/* >>gpu layer: direct path */
/* The region: flags [4][R], two block counters, the offset table [R * S], then the
   received rows and the expert outputs, max_tokens worth of each; laid out alike on
   every rank. */
MOE_EP_PRIVATE size_t moe_ep__nccl_round256(size_t n) { return (n + 255) & ~(size_t)255; }

/* What each rank tells the others about its region (one ncclAllGather). */
typedef struct moe_ep__nccl_card {
    int64_t ok;                     /* 0: this rank failed before it could offer a region */
    int64_t boot, pid;              /* same boot and pid: same process */
    int64_t device;                 /* the CUDA device, as numbered in that process */
    int64_t out_off;                /* the region's layout, which must be the same everywhere */
    uint64_t address;
    cudaIpcMemHandle_t handle;
} moe_ep__nccl_card;

/* The machine's boot id (Linux), so that CUDA IPC is only tried between processes of one host. */
MOE_EP_PRIVATE int64_t moe_ep__nccl_boot_id(void) {
    uint64_t h = 14695981039346656037ull;
    FILE* f = fopen("/proc/sys/kernel/random/boot_id", "r");
    int c;
    if (!f) return 0;
    while ((c = fgetc(f)) != EOF) { h ^= (unsigned char)c; h *= 1099511628211ull; }
    fclose(f);
    return (int64_t)(h & 0x7FFFFFFFFFFFFFFFull);
}

MOE_EP_PRIVATE void moe_ep__nccl_direct_free(moe_ep_nccl_layer* L) {
    const moe_ep_allocator* a = &L->desc.base.allocator;
    int q;
    for (q = 0; L->peer_host && L->peer_opened && q < L->world_size; ++q)
        if (L->peer_opened[q]) cudaIpcCloseMemHandle(L->peer_host[q]);
    if (L->region) cudaFree(L->region);
    if (L->peer_dev) cudaFree(L->peer_dev);
    if (L->expert_at) cudaFree(L->expert_at);
    if (L->ctl_host) cudaFreeHost(L->ctl_host);
    (void)cudaGetLastError();
    moe_ep__nccl_free(a, L->peer_host);
    moe_ep__nccl_free(a, L->peer_opened);
    L->region = NULL;
    L->peer_dev = NULL;
    L->expert_at = NULL;
    L->ctl_host = NULL;
    L->peer_host = NULL;
    L->peer_opened = NULL;
    L->direct = 0;
}

/* This rank's half of the setup: the region, the host-mapped control words, the experts'
   owners on the device, and the card that offers the region. */
MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_direct_local(moe_ep_nccl_layer* L, moe_ep__nccl_card* card) {
    const moe_ep_allocator* a = &L->desc.base.allocator;
    /* the same layout on every rank (the combine reads a peer's outputs at this rank's
       out offset): rows for the rank with the most experts */
    int64_t rows = L->desc.max_tokens * (L->k < L->S ? L->k : L->S) * L->world_size;
    size_t flags = moe_ep__nccl_round256((size_t)4 * L->world_size * 8 + 64);
    size_t table = moe_ep__nccl_round256((size_t)L->world_size * (size_t)L->S * 8);
    /* the rows start on 2 MiB boundaries, as a cudaMalloc of their own would */
    size_t head = ((flags + table) + ((size_t)2 << 20) - 1) & ~(((size_t)2 << 20) - 1);
    size_t rows_bytes = ((size_t)rows * L->row_bytes + ((size_t)2 << 20) - 1) & ~(((size_t)2 << 20) - 1);
    int32_t* at;
    int e;
    moe_ep_result res;
    L->peer_host = (char**)moe_ep__nccl_alloc(a, sizeof(char*) * (size_t)L->world_size);
    L->peer_opened = (int*)moe_ep__nccl_alloc(a, sizeof(int) * (size_t)L->world_size);
    at = (int32_t*)moe_ep__nccl_alloc(a, sizeof(int32_t) * 2 * (size_t)L->E);
    if (!L->peer_host || !L->peer_opened || !at) {
        moe_ep__nccl_free(a, at);
        return moe_ep__nccl_fail(L, MOE_EP_ERROR_OUT_OF_MEMORY, "moe_ep_nccl_layer_create: out of memory");
    }
    memset(L->peer_opened, 0, sizeof(int) * (size_t)L->world_size);
    for (e = 0; e < L->E; ++e) {
        at[e] = L->owner_of[e];
        at[L->E + e] = L->local_index_of[e];
    }
    L->region_rows = rows;
    L->region_bytes = head + 2 * rows_bytes;
    memset(&L->g, 0, sizeof L->g);
    L->g.rank = L->rank;
    L->g.world = L->world_size;
    L->g.table_off = flags;
    L->g.recv_off = head;
    L->g.out_off = head + rows_bytes;
    L->g.timeout_ns = L->net->timeout_ms > 0 ? (uint64_t)L->net->timeout_ms * 1000000u : 0;
    res = moe_ep__nccl_cuda(L, cudaMalloc((void**)&L->region, L->region_bytes), "direct path: region");
    if (res == MOE_EP_OK) res = moe_ep__nccl_cuda(L, cudaMemset(L->region, 0, flags), "direct path: region");
    if (res == MOE_EP_OK)
        res = moe_ep__nccl_cuda(L, cudaMalloc((void**)&L->peer_dev, sizeof(char*) * (size_t)L->world_size),
                                "direct path: peers");
    if (res == MOE_EP_OK)
        res = moe_ep__nccl_cuda(L, cudaMalloc((void**)&L->expert_at, sizeof(int32_t) * 2 * (size_t)L->E),
                                "direct path: owners");
    if (res == MOE_EP_OK)
        res = moe_ep__nccl_cuda(L, cudaMemcpy(L->expert_at, at, sizeof(int32_t) * 2 * (size_t)L->E,
                                              cudaMemcpyHostToDevice), "direct path: owners");
    moe_ep__nccl_free(a, at);
    if (res == MOE_EP_OK)
        res = moe_ep__nccl_cuda(L, cudaHostAlloc((void**)&L->ctl_host, 2 * sizeof(int), cudaHostAllocMapped),
                                "direct path: control words");
    if (res == MOE_EP_OK) {
        L->ctl_host[0] = L->ctl_host[1] = 0;
        res = moe_ep__nccl_cuda(L, cudaHostGetDevicePointer((void**)&L->g.ctl, L->ctl_host, 0),
                                "direct path: control words");
    }
    if (res == MOE_EP_OK) res = moe_ep__nccl_cuda(L, cudaIpcGetMemHandle(&card->handle, L->region), "cudaIpcGetMemHandle");
    if (res != MOE_EP_OK) return res;
    L->g.counters = (unsigned*)(L->region + (size_t)4 * L->world_size * 8);
    card->ok = 1;
    card->boot = moe_ep__nccl_boot_id();
    card->pid = (int64_t)getpid();
    card->device = L->net->device;
    card->out_off = (int64_t)L->g.out_off;
    card->address = (uint64_t)(uintptr_t)L->region;
    return MOE_EP_OK;
}

/* Reach rank q's region: the pointer itself in this process (with peer access), else
   CUDA IPC. MOE_EP_ERROR_UNSUPPORTED: this GPU cannot reach it. */
MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_direct_reach(moe_ep_nccl_layer* L, int q, const moe_ep__nccl_card* card,
                                                       const moe_ep__nccl_card* mine) {
    int can = 0;
    cudaError_t e;
    if (q == L->rank) {
        L->peer_host[q] = L->region;
        return MOE_EP_OK;
    }
    if (card->boot != mine->boot)
        return moe_ep__nccl_fail(L, MOE_EP_ERROR_UNSUPPORTED, "direct path: rank %d is on another host", q);
    if (card->pid == mine->pid) {
        if (card->device != mine->device) {
            e = cudaDeviceCanAccessPeer(&can, (int)mine->device, (int)card->device);
            if (e != cudaSuccess || !can)
                return moe_ep__nccl_fail(L, MOE_EP_ERROR_UNSUPPORTED, "direct path: GPU %d cannot access GPU %d (rank %d)",
                                         (int)mine->device, (int)card->device, q);
            e = cudaDeviceEnablePeerAccess((int)card->device, 0);
            if (e == cudaErrorPeerAccessAlreadyEnabled) e = cudaSuccess;
            (void)cudaGetLastError();
            if (e != cudaSuccess)
                return moe_ep__nccl_fail(L, MOE_EP_ERROR_UNSUPPORTED, "direct path: cudaDeviceEnablePeerAccess(%d): %s",
                                         (int)card->device, cudaGetErrorString(e));
        }
        L->peer_host[q] = (char*)(uintptr_t)card->address;
        return MOE_EP_OK;
    }
    e = cudaIpcOpenMemHandle((void**)&L->peer_host[q], card->handle, cudaIpcMemLazyEnablePeerAccess);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return moe_ep__nccl_fail(L, MOE_EP_ERROR_UNSUPPORTED, "direct path: cudaIpcOpenMemHandle for rank %d: %s", q,
                                 cudaGetErrorString(e));
    }
    L->peer_opened[q] = 1;
    return MOE_EP_OK;
}

/* Collective over the EP group, on every rank whatever `status` says (a failed rank
   takes part with an empty card). Returns the status to agree on: with auto, a rank
   that cannot reach another turns the path off everywhere and is no failure. */
MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_direct_setup(moe_ep_nccl_layer* L, moe_ep_result status) {
    int R = L->world_size, q, verdict = 0;
    moe_ep__nccl_card mine;
    moe_ep__nccl_card* cards = NULL;
    char* gathered = NULL;
    char err[MOE_EP__NCCL_ERR] = "";
    int64_t* words = NULL;
    moe_ep_result res = status, x;
    memset(&mine, 0, sizeof mine);
    if (res == MOE_EP_OK) res = moe_ep__nccl_direct_local(L, &mine);
    cards = (moe_ep__nccl_card*)moe_ep__nccl_alloc(&L->desc.base.allocator, sizeof *cards * (size_t)R);
    words = (int64_t*)moe_ep__nccl_alloc(&L->desc.base.allocator, sizeof(int64_t) * 2 * (size_t)R);
    if ((!cards || !words) && res == MOE_EP_OK)
        res = moe_ep__nccl_fail(L, MOE_EP_ERROR_OUT_OF_MEMORY, "moe_ep_nccl_layer_create: out of memory");
    /* the cards travel by ncclAllGather; without a buffer a rank cannot take part, and
       the transport is broken so that nobody waits for it forever */
    x = moe_ep__nccl_cuda(L, cudaMalloc((void**)&gathered, sizeof mine * (size_t)R), "direct path: cards");
    if (x == MOE_EP_OK)
        x = moe_ep__nccl_cuda(L, cudaMemcpy(gathered + sizeof mine * (size_t)L->rank, &mine, sizeof mine,
                                            cudaMemcpyHostToDevice), "direct path: cards");
    if (x == MOE_EP_OK) {
        ncclResult_t r = ncclAllGather(gathered + sizeof mine * (size_t)L->rank, gathered, sizeof mine, ncclInt8,
                                       L->net->comm, L->stream);
        x = r == ncclSuccess ? moe_ep__nccl_wait(L->net, L->stream, NULL, err, sizeof err)
                             : moe_ep__nccl_nccl_fail(L->net, r, "ncclAllGather", err, sizeof err);
        if (x != MOE_EP_OK) x = moe_ep__nccl_net_fail(L, x, "direct path: exchanging the regions", err);
    } else {
        moe_ep__nccl_break(L->net);
    }
    if (x == MOE_EP_OK && cards)
        x = moe_ep__nccl_cuda(L, cudaMemcpy(cards, gathered, sizeof mine * (size_t)R, cudaMemcpyDeviceToHost),
                              "direct path: cards");
    if (gathered) cudaFree(gathered);
    if (res == MOE_EP_OK) res = x;
    for (q = 0; res == MOE_EP_OK && q < R; ++q)
        if (!cards[q].ok) res = moe_ep__nccl_fail(L, MOE_EP_ERROR_ABORTED, "direct path: rank %d failed", q);
        else if (cards[q].out_off != mine.out_off)
            res = moe_ep__nccl_fail(L, MOE_EP_ERROR_INTERNAL, "direct path: rank %d lays out its region otherwise", q);
    for (q = 0; res == MOE_EP_OK && q < R; ++q) res = moe_ep__nccl_direct_reach(L, q, &cards[q], &mine);
    if (res == MOE_EP_OK)
        res = moe_ep__nccl_cuda(L, cudaMemcpy(L->peer_dev, L->peer_host, sizeof(char*) * (size_t)R,
                                              cudaMemcpyHostToDevice), "direct path: peers");
    /* 0 fine, 1 cannot reach a peer, 2 failed */
    verdict = res == MOE_EP_OK ? 0 : res == MOE_EP_ERROR_UNSUPPORTED ? 1 : 2;
    if (words && !L->net->broken) {
        for (q = 0; q < R; ++q) words[q] = verdict;
        x = moe_ep__nccl_exchange(L->net, words, words + R, 1, err, sizeof err);
        if (x != MOE_EP_OK) {
            verdict = 2;
            if (res == MOE_EP_OK) res = moe_ep__nccl_net_fail(L, x, "direct path", err);
        }
        for (q = 0; x == MOE_EP_OK && q < R; ++q)
            if (words[R + q] > verdict) verdict = (int)words[R + q];
    } else {
        verdict = 2;
    }
    moe_ep__nccl_free(&L->desc.base.allocator, cards);
    moe_ep__nccl_free(&L->desc.base.allocator, words);
    if (verdict == 0) {
        /* the forward's expert-side rows live in the region from now on */
        if (L->recv) cudaFree(L->recv);
        if (L->out) cudaFree(L->out);
        L->recv = L->region + L->g.recv_off;
        L->out = L->region + L->g.out_off;
        L->recv_bytes = L->out_bytes = (size_t)L->region_rows * L->row_bytes;
        L->g.peers = L->peer_dev;
        L->direct = 1;
        return MOE_EP_OK;
    }
    moe_ep__nccl_direct_free(L);
    if (verdict == 1 && L->desc.direct != MOE_EP_NCCL_DIRECT_ON) return status;
    if (res == MOE_EP_OK)
        res = moe_ep__nccl_fail(L, verdict == 1 ? MOE_EP_ERROR_UNSUPPORTED : MOE_EP_ERROR_ABORTED,
                                "direct path: %s", verdict == 1 ? "another rank cannot reach its peers' memory"
                                                                : "another rank failed");
    return res;
}

/* A direct wait that ran past the timeout leaves its mark here; the transport is then
   broken, as after a host-side timeout. */
MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_direct_check(moe_ep_nccl_layer* L) {
    if (!L->direct || !((volatile int*)L->ctl_host)[1]) return MOE_EP_OK;
    moe_ep__nccl_break(L->net);
    return moe_ep__nccl_fail(L, MOE_EP_ERROR_TIMEOUT, "moe_ep_nccl: a direct-path wait for the other ranks ran past "
                             "%d ms; the communicator was aborted", L->net->timeout_ms);
}

MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_kernel(moe_ep_nccl_layer* L, int e, const char* what) {
    return moe_ep__nccl_cuda(L, (cudaError_t)e, what);
}

MOE_EP_PRIVATE void moe_ep__nccl_layer_free(moe_ep_nccl_layer* L) {
    moe_ep_allocator a = L->desc.base.allocator;
    cudaSetDevice(L->net ? L->net->device : 0);
    if (L->stream || L->net) cudaStreamSynchronize(L->stream);
    if (L->blas) cublasDestroy(L->blas);
    {
        int i;
        for (i = 0; i < MOE_EP__NCCL_LANES; ++i) {
            if (L->lane_blas[i]) cublasDestroy(L->lane_blas[i]);
            if (L->lane_done[i]) cudaEventDestroy(L->lane_done[i]);
            if (L->lane_stream[i]) cudaStreamDestroy(L->lane_stream[i]);
        }
        if (L->lanes_go) cudaEventDestroy(L->lanes_go);
    }
    if (L->ptrs_host) cudaFreeHost(L->ptrs_host);
    if (L->ptrs_dev) cudaFree(L->ptrs_dev);
    if (L->ptrs_uploaded) cudaEventDestroy(L->ptrs_uploaded);
    moe_ep__nccl_free(&a, L->group_ints);
    moe_ep__nccl_free(&a, L->group_scalars);
    moe_ep__nccl_free(&a, L->group_ops);
    if (L->router) cudaFree(L->router);
    if (L->w_up) cudaFree(L->w_up);
    if (L->w_down) cudaFree(L->w_down);
    if (L->logits) cudaFree(L->logits);
    if (L->topk_dev) cudaFree(L->topk_dev);
    if (L->topk_host) cudaFreeHost(L->topk_host);
    if (L->hidden) cudaFree(L->hidden);
    if (L->direct && !L->net->broken) {
        /* nobody may still read or write this rank's region */
        char err[MOE_EP__NCCL_ERR] = "";
        moe_ep__nccl_barrier(L->net, err, sizeof err);
    }
    if (L->recv && !L->direct) cudaFree(L->recv);
    if (L->out && !L->direct) cudaFree(L->out);
    moe_ep__nccl_direct_free(L);
    if (L->partial) cudaFree(L->partial);
    if (L->has_spare) moe_ep__nccl_free_buffers(&L->spare);
    (void)cudaGetLastError();
    if (L->core) moe_ep_destroy(L->core);
    while (L->cached > 0) moe_ep__nccl_free(&a, L->cache[--L->cached]);
    moe_ep__nccl_free(&a, L->owner_of);
    moe_ep__nccl_free(&a, L->local_index_of);
    moe_ep__nccl_free(&a, L->local_ids);
    moe_ep__nccl_free(&a, L->routing_idx);
    moe_ep__nccl_free(&a, L->routing_weight);
    moe_ep__nccl_free(&a, L);
}

/* >>gpu layer: sizes */
MOE_EP_PRIVATE size_t moe_ep__nccl_round16(size_t n) { return (n + 15) & ~(size_t)15; }

MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_reserve_router(moe_ep_nccl_layer* L, int64_t tokens) {
    size_t slots = (size_t)tokens * (size_t)L->k, topk = moe_ep__nccl_round16(slots * sizeof(int32_t)) + slots * sizeof(float);
    moe_ep_result res = moe_ep__nccl_cuda(L, moe_ep__nccl_grow_device(&L->logits, &L->logits_bytes,
                                          (size_t)tokens * (size_t)L->E * sizeof(float)), "router buffers");
    if (res == MOE_EP_OK)
        res = moe_ep__nccl_cuda(L, moe_ep__nccl_grow_device(&L->topk_dev, &L->topk_dev_bytes, topk), "router buffers");
    if (res == MOE_EP_OK)
        res = moe_ep__nccl_cuda(L, moe_ep__nccl_grow_pinned(&L->topk_host, &L->topk_host_bytes, topk), "router buffers");
    return res;
}

/* Where the plan metadata lives in the meta buffers: first what the host uploads (the
   core plan's slot rows, the routing, small tables), then what kernels build from it
   (the slot map and the stage map). Offsets in bytes. */
typedef struct moe_ep__nccl_meta {
    size_t rows, idx, weight, owner, shift, chunk_start, chunk_dest, send_off, table, upload, map, stage, dest, total;
} moe_ep__nccl_meta;

MOE_EP_PRIVATE moe_ep__nccl_meta moe_ep__nccl_meta_layout(const moe_ep_nccl_layer* L, int64_t slots, int64_t remote_rows) {
    moe_ep__nccl_meta m;
    size_t chunks = (size_t)(L->world_size - 1) * (size_t)L->S;
    m.rows = 0;
    m.idx = m.rows + moe_ep__nccl_round16((size_t)slots * 8);
    m.weight = m.idx + moe_ep__nccl_round16((size_t)slots * 4);
    m.owner = m.weight + moe_ep__nccl_round16((size_t)slots * 4);
    m.shift = m.owner + moe_ep__nccl_round16((size_t)L->E * 4);
    m.chunk_start = m.shift + moe_ep__nccl_round16((size_t)L->S * 8);
    m.chunk_dest = m.chunk_start + moe_ep__nccl_round16((chunks + 1) * 8);
    m.send_off = m.chunk_dest + moe_ep__nccl_round16(chunks * 8 + 8);
    m.table = m.send_off + moe_ep__nccl_round16((size_t)L->world_size * (size_t)L->S * 8);
    m.upload = m.table + moe_ep__nccl_round16((size_t)L->world_size * (size_t)L->S * 8);
    m.map = m.upload;
    m.stage = m.map + moe_ep__nccl_round16((size_t)slots * 4);
    m.dest = m.stage + moe_ep__nccl_round16((size_t)remote_rows * 4);
    m.total = m.dest + moe_ep__nccl_round16((size_t)slots * 8);
    return m;
}

/* Plan buffers for `slots` assignments, `send_rows` send rows and `remote_rows` staged rows. */
MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_reserve_plan(moe_ep_nccl_layer* L, moe_ep__nccl_buffers* b, int64_t slots,
                                                       int64_t send_rows, int64_t remote_rows) {
    moe_ep__nccl_meta layout = moe_ep__nccl_meta_layout(L, slots, remote_rows);
    size_t meta = layout.total;
    moe_ep_result res = moe_ep__nccl_cuda(L, moe_ep__nccl_grow_device(&b->send, &b->send_bytes,
                                          (size_t)send_rows * L->row_bytes), "plan buffers");
    if (res == MOE_EP_OK && L->desc.a2a_layout == MOE_EP_NCCL_A2A_STAGED)
        res = moe_ep__nccl_cuda(L, moe_ep__nccl_grow_device(&b->stage, &b->stage_bytes,
                                (size_t)remote_rows * L->row_bytes), "plan buffers");
    if (res == MOE_EP_OK) res = moe_ep__nccl_cuda(L, moe_ep__nccl_grow_device(&b->meta, &b->meta_bytes, meta), "plan buffers");
    if (res == MOE_EP_OK)
        res = moe_ep__nccl_cuda(L, moe_ep__nccl_grow_pinned(&b->meta_host, &b->meta_host_bytes, layout.upload),
                                "plan buffers");
    return res;
}

/* Expert-side buffers for `rows` received rows; `forward` adds the forward's own rows. */
MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_reserve_experts(moe_ep_nccl_layer* L, int64_t rows, int forward) {
    moe_ep_result res = MOE_EP_OK;
    if (!L->desc.expert_fn)
        res = moe_ep__nccl_cuda(L, moe_ep__nccl_grow_device(&L->hidden, &L->hidden_bytes,
                                (size_t)rows * (size_t)L->up_rows * L->elem), "expert buffers");
    if (res == MOE_EP_OK && L->partial_f32)
        res = moe_ep__nccl_cuda(L, moe_ep__nccl_grow_device(&L->partial, &L->partial_bytes,
                                (size_t)rows * (size_t)L->d * sizeof(float)), "expert buffers");
    if (res == MOE_EP_OK && forward)
        res = moe_ep__nccl_cuda(L, moe_ep__nccl_grow_device(&L->recv, &L->recv_bytes, (size_t)rows * L->row_bytes),
                                "expert buffers");
    if (res == MOE_EP_OK && forward)
        res = moe_ep__nccl_cuda(L, moe_ep__nccl_grow_device(&L->out, &L->out_bytes, (size_t)rows * L->row_bytes),
                                "expert buffers");
    return res;
}

/* The most rows any buffer can need when every rank has at most max_tokens tokens. */
MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_reserve_all(moe_ep_nccl_layer* L) {
    int64_t T = L->desc.max_tokens, per_source = T * (L->k < L->L ? L->k : L->L);
    moe_ep_result res = MOE_EP_OK;
    if (T <= 0) return MOE_EP_OK;
    if (L->desc.router_weight) res = moe_ep__nccl_reserve_router(L, T);
    if (res == MOE_EP_OK) {
        res = moe_ep__nccl_reserve_plan(L, &L->spare, T * L->k, T * L->k, per_source * (L->world_size - 1));
        L->spare.full = 1;
        L->has_spare = 1;
        if (res == MOE_EP_OK && per_source * L->world_size > 0x3FFFFFFF)
            res = moe_ep__nccl_fail(L, MOE_EP_ERROR_UNSUPPORTED, "max_tokens (%lld): more than 2^30 rows per plan",
                                    (long long)T);
    }
    if (res == MOE_EP_OK) res = moe_ep__nccl_reserve_experts(L, per_source * L->world_size, 1);
    return res;
}

/* >>gpu layer: create */
/* The GPU layer plans with a core context but never runs its CPU experts; setting this
   callback keeps the core from packing a CPU copy of the weights. */
MOE_EP_PRIVATE int moe_ep__nccl_no_cpu_experts(int local_expert, int expert, const float* rows, int64_t row_count,
                                            int d_model, float* out, void* user_data) {
    (void)local_expert; (void)expert; (void)rows; (void)row_count; (void)d_model; (void)out; (void)user_data;
    return -1;  /* the core's CPU expert path is never used by the GPU layer */
}

MOE_EP_PRIVATE int64_t moe_ep__nccl_fingerprint(const moe_ep_nccl_layer_desc* d) {
    uint64_t h = 14695981039346656037ull;
    int64_t fields[8];
    size_t i;
    fields[7] = d->direct;
    fields[0] = d->dtype;
    fields[1] = d->a2a_layout;
    fields[2] = d->max_tokens > 0;
    fields[3] = d->expert_fn != NULL;
    fields[4] = d->router_weight != NULL;
    fields[5] = 0x6e63636c;
    fields[6] = d->base.tp_transport ? d->base.tp_transport->world_size : 1;
    for (i = 0; i < sizeof fields; ++i) { h ^= ((const unsigned char*)fields)[i]; h *= 1099511628211ull; }
    h &= 0x7FFFFFFFFFFFFFFFull;
    return h == 0 ? 1 : (int64_t)h;
}

MOE_EP_PRIVATE void moe_ep__nccl_check(moe_ep_nccl_layer* L, int* failures, int ok, const char* fmt, ...) {
    char text[MOE_EP__NCCL_ERR];
    va_list ap;
    if (ok) return;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    if (*failures == 0) memcpy(L->last_error, text, sizeof text);
    if (L->desc.base.logger.func) L->desc.base.logger.func("moe_ep_nccl", 1, L->rank, text, L->desc.base.logger.user_data);
    (*failures)++;
}

MOE_EP_PRIVATE int moe_ep__nccl_validate(moe_ep_nccl_layer* L) {
    const moe_ep_nccl_layer_desc* d = &L->desc;
    int f = 0;
    moe_ep__nccl_check(L, &f, d->dtype > 0 && d->dtype < MOE_EP_NCCL_DTYPE_COUNT,
                       "moe_ep_nccl_layer_desc.dtype (%d) is not a moe_ep_nccl_dtype", (int)d->dtype);
    moe_ep__nccl_check(L, &f, d->direct >= 0 && d->direct < MOE_EP_NCCL_DIRECT_COUNT,
                       "moe_ep_nccl_layer_desc.direct (%d) is not a moe_ep_nccl_direct", (int)d->direct);
    moe_ep__nccl_check(L, &f, d->direct != MOE_EP_NCCL_DIRECT_ON || d->max_tokens > 0,
                       "moe_ep_nccl_layer_desc.direct = ON needs max_tokens > 0 (the peers map buffers of fixed size)");
    moe_ep__nccl_check(L, &f, d->expert_gemm >= 0 && d->expert_gemm < MOE_EP_NCCL_EXPERT_GEMM_COUNT,
                       "moe_ep_nccl_layer_desc.expert_gemm (%d) is not a moe_ep_nccl_expert_gemm", (int)d->expert_gemm);
    moe_ep__nccl_check(L, &f, d->expert_streams >= 0, "moe_ep_nccl_layer_desc.expert_streams (%d) must be >= 0",
                       d->expert_streams);
    moe_ep__nccl_check(L, &f, d->a2a_layout > 0 && d->a2a_layout < MOE_EP_NCCL_A2A_COUNT,
                       "moe_ep_nccl_layer_desc.a2a_layout (%d) is not a moe_ep_nccl_a2a_layout", (int)d->a2a_layout);
    moe_ep__nccl_check(L, &f, d->max_tokens >= 0, "moe_ep_nccl_layer_desc.max_tokens (%lld) must be >= 0",
                       (long long)d->max_tokens);
    moe_ep__nccl_check(L, &f, !d->base.router_weight && !d->base.experts && !d->base.expert_fn,
                       "moe_ep_nccl_layer_desc.base: leave router_weight, experts and expert_fn NULL "
                       "(set the device versions in moe_ep_nccl_layer_desc)");
    moe_ep__nccl_check(L, &f, d->base.scoring == MOE_EP_SCORING_DEFAULT || d->base.scoring == MOE_EP_SCORING_SOFTMAX,
                       "moe_ep_nccl_layer_desc.base.scoring (%d): the GPU router supports softmax", (int)d->base.scoring);
    moe_ep__nccl_check(L, &f, d->base.d_model > 0 && d->base.num_experts > 0 && (d->base.d_ff > 0 || d->expert_fn),
                       "moe_ep_nccl_layer_desc.base: d_model (%d), num_experts (%d) and d_ff (%d) must be > 0",
                       d->base.d_model, d->base.num_experts, d->base.d_ff);
    if (d->base.tp_transport) {
        const moe_ep_transport* tp = d->base.tp_transport;
        int nccl = tp->exchange_counts == moe_ep__nccl_exchange && tp->impl;
        moe_ep__nccl_check(L, &f, nccl, "moe_ep_nccl_layer_desc.base.tp_transport must be an NCCL transport "
                                        "(moe_ep_nccl_transport_create, or a group split from one)");
        moe_ep__nccl_check(L, &f, tp->world_size > 0 && tp->rank >= 0 && tp->rank < tp->world_size,
                           "moe_ep_nccl_layer_desc.base.tp_transport: rank (%d) must be in [0, world_size (%d))",
                           tp->rank, tp->world_size);
        moe_ep__nccl_check(L, &f, !nccl || ((const moe_ep__nccl*)tp->impl)->device == L->net->device,
                           "moe_ep_nccl_layer_desc.base.tp_transport is on GPU %d and base.transport on GPU %d: "
                           "they must share one", nccl ? ((const moe_ep__nccl*)tp->impl)->device : -1, L->net->device);
        moe_ep__nccl_check(L, &f, tp->world_size <= 1 || !d->expert_fn,
                           "moe_ep_nccl_layer_desc.expert_fn is not supported with base.tp_transport: tensor "
                           "parallelism splits the built-in experts by d_ff, a callback gets whole experts");
        moe_ep__nccl_check(L, &f, tp->world_size <= 1 || d->base.d_ff >= tp->world_size,
                           "moe_ep_nccl_layer_desc.base.d_ff (%d) must be >= the tensor-parallel size (%d)",
                           d->base.d_ff, tp->world_size);
    }
    return f;
}

/* What the ranks of a TP group must share: the layer's shapes and GPU parameters. */
MOE_EP_PRIVATE int64_t moe_ep__nccl_tp_fingerprint(const moe_ep_nccl_layer* L) {
    uint64_t h = 14695981039346656037ull;
    int64_t fields[11];
    int32_t capacity;
    size_t i;
    memcpy(&capacity, &L->desc.base.capacity_factor, sizeof capacity);
    fields[0] = moe_ep__nccl_fingerprint(&L->desc);
    fields[1] = L->d;
    fields[2] = L->ff_full;
    fields[3] = L->E;
    fields[4] = L->k;
    fields[5] = L->activation;
    fields[6] = L->desc.base.normalize_topk;
    fields[7] = capacity;
    fields[8] = L->desc.base.placement.kind;
    fields[9] = L->world_size;
    fields[10] = L->tp_size;
    for (i = 0; i < sizeof fields; ++i) { h ^= ((const unsigned char*)fields)[i]; h *= 1099511628211ull; }
    return (int64_t)(h & 0x7FFFFFFFFFFFFFFFull);
}

MOE_EP_PRIVATE int64_t moe_ep__nccl_routing_hash(const int32_t* idx, const float* weight, int64_t slots) {
    uint64_t h = 14695981039346656037ull;
    int64_t i;
    uint32_t bits;
    for (i = 0; idx && i < slots; ++i) h = (h ^ (uint32_t)idx[i]) * 1099511628211ull;
    for (i = 0; weight && i < slots; ++i) {
        memcpy(&bits, weight + i, sizeof bits);
        h = (h ^ bits) * 1099511628211ull;
    }
    return (int64_t)(h & 0x7FFFFFFFFFFFFFFFull);
}

/* The TP group's ranks exchange their status and `facts`, which must be equal on all of
   them (else `mismatch`). Every rank of the group gets the same verdict. The ranks of a
   TP group sit in different EP groups, so an agreement over the EP group followed by this
   one reaches every rank of the data-parallel replica. */
MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_tp_agree(moe_ep_nccl_layer* L, moe_ep_result local, const int64_t* facts,
                                                   int count, moe_ep_result mismatch, const char* what,
                                                   const char* stage) {
    char err[MOE_EP__NCCL_ERR] = "";
    int T = L->tp_size, W = 1 + count, p, j;
    int64_t* words;
    moe_ep_result res;
    if (T <= 1 || !L->tp_net) return local;
    words = (int64_t*)moe_ep__nccl_alloc(&L->desc.base.allocator, sizeof(int64_t) * 2 * (size_t)T * (size_t)W);
    if (!words) return local != MOE_EP_OK ? local : moe_ep__nccl_fail(L, MOE_EP_ERROR_OUT_OF_MEMORY, "%s: out of memory", stage);
    for (p = 0; p < T; ++p) {
        words[p * W] = (int64_t)local;
        for (j = 0; j < count; ++j) words[p * W + 1 + j] = facts[j];
    }
    res = moe_ep__nccl_exchange(L->tp_net, words, words + T * W, W, err, sizeof err);
    if (res != MOE_EP_OK) {
        if (local == MOE_EP_OK) local = moe_ep__nccl_net_fail(L, res, stage, err);
    } else if (local == MOE_EP_OK) {
        const int64_t* got = words + T * W;
        for (p = 0; local == MOE_EP_OK && p < T; ++p)
            if (got[p * W] != MOE_EP_OK)
                local = moe_ep__nccl_fail(L, MOE_EP_ERROR_ABORTED, "%s: tensor-parallel rank %d failed (%s)", stage, p,
                                          moe_ep_result_string((moe_ep_result)got[p * W]));
        for (p = 0; local == MOE_EP_OK && p < T; ++p)
            for (j = 0; local == MOE_EP_OK && j < count; ++j)
                if (got[p * W + 1 + j] != facts[j])
                    local = moe_ep__nccl_fail(L, mismatch, "%s: tensor-parallel rank %d %s", stage, p, what);
    }
    moe_ep__nccl_free(&L->desc.base.allocator, words);
    return local;
}

MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_build(moe_ep_nccl_layer* L) {
    const moe_ep_nccl_layer_desc* d = &L->desc;
    const moe_ep_allocator* a = &d->base.allocator;
    int e, l;
    size_t up_each, down_each;
    moe_ep_result res;
    L->L = moe_ep_rank_expert_count(L->core, L->rank);
    for (e = 0, L->S = 1; e < L->world_size; ++e)   /* a plan's segments: the most experts a rank holds */
        if (moe_ep_rank_expert_count(L->core, e) > L->S) L->S = moe_ep_rank_expert_count(L->core, e);
    L->owner_of = (int*)moe_ep__nccl_alloc(a, sizeof(int) * (size_t)L->E);
    L->local_index_of = (int*)moe_ep__nccl_alloc(a, sizeof(int) * (size_t)L->E);
    L->local_ids = (int*)moe_ep__nccl_alloc(a, sizeof(int) * (size_t)(L->L > 0 ? L->L : 1));
    if (!L->owner_of || !L->local_index_of || !L->local_ids)
        return moe_ep__nccl_fail(L, MOE_EP_ERROR_OUT_OF_MEMORY, "moe_ep_nccl_layer_create: out of memory");
    for (e = 0; e < L->E; ++e) {
        L->owner_of[e] = moe_ep_expert_owner(L->core, e);
        L->local_index_of[e] = moe_ep_expert_local_index(L->core, e);
    }
    moe_ep_rank_experts(L->core, L->rank, L->local_ids, L->L);
    if (!d->expert_fn && L->L > 0) {
        int f = 0;
        moe_ep__nccl_check(L, &f, d->experts != NULL,
                           "moe_ep_nccl_layer_desc.experts must hold this rank's %d experts (or set expert_fn)", L->L);
        for (l = 0; d->experts && l < L->L; ++l)
            moe_ep__nccl_check(L, &f, d->experts[l].w1 && d->experts[l].w2 &&
                                          (L->activation != MOE_EP_ACTIVATION_SWIGLU || d->experts[l].w3),
                               "moe_ep_nccl_layer_desc.experts[%d]: w1, w2%s must not be NULL", l,
                               L->activation == MOE_EP_ACTIVATION_SWIGLU ? " and w3" : "");
        if (f) return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    res = moe_ep__nccl_blas(L, cublasCreate(&L->blas), "cublasCreate");
    if (res == MOE_EP_OK) res = moe_ep__nccl_blas(L, cublasSetStream(L->blas, L->stream), "cublasSetStream");
    /* fp32 stays fp32: no TF32 tensor-op math */
    if (res == MOE_EP_OK) res = moe_ep__nccl_blas(L, cublasSetMathMode(L->blas, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
    if (res != MOE_EP_OK) return res;
    /* grouped GEMMs: host arrays per group, device arrays of pointers filled per call */
    /* bf16 with TP: the down projections write fp32 partial sums, which grouped GEMMs
       (one type for A, B and C) cannot */
    L->grouped = d->expert_fn || L->L == 0 || d->expert_gemm == MOE_EP_NCCL_EXPERT_GEMM_LOOP || L->partial_f32 ? 0
                 : d->expert_gemm == MOE_EP_NCCL_EXPERT_GEMM_GROUPED ? 1 : 2;
    if (L->grouped) {
        L->group_ints = (int*)moe_ep__nccl_alloc(a, sizeof(int) * 9 * (size_t)L->L);
        L->group_scalars = (float*)moe_ep__nccl_alloc(a, sizeof(float) * 2 * (size_t)L->L);
        L->group_ops = (cublasOperation_t*)moe_ep__nccl_alloc(a, sizeof(cublasOperation_t) * 2 * (size_t)L->L);
        if (!L->group_ints || !L->group_scalars || !L->group_ops)
            return moe_ep__nccl_fail(L, MOE_EP_ERROR_OUT_OF_MEMORY, "moe_ep_nccl_layer_create: out of memory");
        for (l = 0; l < L->L; ++l) {
            L->group_ints[8 * L->L + l] = 1;
            L->group_scalars[l] = 1.0f;
            L->group_scalars[L->L + l] = 0.0f;
            L->group_ops[l] = CUBLAS_OP_T;
            L->group_ops[L->L + l] = CUBLAS_OP_N;
        }
        res = moe_ep__nccl_cuda(L, cudaMallocHost((void**)&L->ptrs_host, sizeof(void*) * 6 * (size_t)L->L), "expert GEMM arrays");
        if (res == MOE_EP_OK)
            res = moe_ep__nccl_cuda(L, cudaMalloc((void**)&L->ptrs_dev, sizeof(void*) * 6 * (size_t)L->L), "expert GEMM arrays");
        if (res == MOE_EP_OK)
            res = moe_ep__nccl_cuda(L, cudaEventCreateWithFlags(&L->ptrs_uploaded, cudaEventDisableTiming), "expert GEMM arrays");
        if (res != MOE_EP_OK) return res;
    }
    /* expert lanes: one stream and one cuBLAS handle (its own workspace) each */
    L->lanes = d->expert_fn || L->grouped == 1 || L->L <= 1 ? 1 : (d->expert_streams > 0 ? d->expert_streams : 1);
    if (L->lanes > MOE_EP__NCCL_LANES) L->lanes = MOE_EP__NCCL_LANES;
    if (L->lanes > L->L) L->lanes = L->L > 0 ? L->L : 1;
    if (L->lanes > 1) {
        res = moe_ep__nccl_cuda(L, cudaEventCreateWithFlags(&L->lanes_go, cudaEventDisableTiming), "expert streams");
        for (l = 0; res == MOE_EP_OK && l < L->lanes; ++l) {
            res = moe_ep__nccl_cuda(L, cudaStreamCreateWithFlags(&L->lane_stream[l], cudaStreamNonBlocking), "expert streams");
            if (res == MOE_EP_OK)
                res = moe_ep__nccl_cuda(L, cudaEventCreateWithFlags(&L->lane_done[l], cudaEventDisableTiming), "expert streams");
            if (res == MOE_EP_OK) res = moe_ep__nccl_blas(L, cublasCreate(&L->lane_blas[l]), "cublasCreate");
            if (res == MOE_EP_OK) res = moe_ep__nccl_blas(L, cublasSetStream(L->lane_blas[l], L->lane_stream[l]), "cublasSetStream");
            if (res == MOE_EP_OK)
                res = moe_ep__nccl_blas(L, cublasSetMathMode(L->lane_blas[l], CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
        }
        if (res != MOE_EP_OK) return res;
    }
    if (d->router_weight) {
        size_t bytes = (size_t)L->E * L->row_bytes;
        res = moe_ep__nccl_cuda(L, cudaMalloc(&L->router, bytes), "router weights");
        if (res == MOE_EP_OK)
            res = moe_ep__nccl_cuda(L, cudaMemcpyAsync(L->router, d->router_weight, bytes, cudaMemcpyDefault, L->stream),
                                    "copying the router weights");
        if (res != MOE_EP_OK) return res;
    }
    if (!d->expert_fn && L->L > 0) {
        up_each = (size_t)L->up_rows * L->row_bytes;
        down_each = (size_t)L->ff * L->row_bytes;
        res = moe_ep__nccl_cuda(L, cudaMalloc(&L->w_up, up_each * (size_t)L->L), "expert weights");
        if (res == MOE_EP_OK) res = moe_ep__nccl_cuda(L, cudaMalloc(&L->w_down, down_each * (size_t)L->L), "expert weights");
        /* with TP only this rank's slice: w1, w3 rows [ff_begin, ff_begin + ff), w2 those columns */
        for (l = 0; res == MOE_EP_OK && l < L->L; ++l) {
            char* up = (char*)L->w_up + up_each * (size_t)l;
            size_t half = (size_t)L->ff * L->row_bytes, skip = (size_t)L->ff_begin * L->row_bytes;
            res = moe_ep__nccl_cuda(L, cudaMemcpyAsync(up, (const char*)d->experts[l].w1 + skip, half, cudaMemcpyDefault,
                                                       L->stream), "copying expert weights");
            if (res == MOE_EP_OK && L->activation == MOE_EP_ACTIVATION_SWIGLU)
                res = moe_ep__nccl_cuda(L, cudaMemcpyAsync(up + half, (const char*)d->experts[l].w3 + skip, half,
                                                           cudaMemcpyDefault, L->stream), "copying expert weights");
            if (res == MOE_EP_OK)
                res = moe_ep__nccl_cuda(L, cudaMemcpy2DAsync((char*)L->w_down + down_each * (size_t)l, (size_t)L->ff * L->elem,
                                                             (const char*)d->experts[l].w2 + (size_t)L->ff_begin * L->elem,
                                                             (size_t)L->ff_full * L->elem, (size_t)L->ff * L->elem,
                                                             (size_t)L->d, cudaMemcpyDefault, L->stream),
                                        "copying expert weights");
        }
        if (res != MOE_EP_OK) return res;
    }
    res = moe_ep__nccl_reserve_all(L);
    if (res == MOE_EP_OK) res = moe_ep__nccl_cuda(L, cudaStreamSynchronize(L->stream), "copying the weights");
    return res;
}

MOE_EP_API moe_ep_result moe_ep_nccl_layer_create(const moe_ep_nccl_layer_desc* desc, moe_ep_nccl_layer** out) {
    moe_ep_nccl_layer* L;
    const moe_ep_transport *t, *tp;
    moe_ep_desc core;
    moe_ep_result res = MOE_EP_OK;
    char err[MOE_EP__NCCL_ERR] = "";
    int64_t* words;
    int p, R;
    if (!desc || !out) return MOE_EP_ERROR_INVALID_ARGUMENT;
    t = desc->base.transport;
    if (!t || t->exchange_counts != moe_ep__nccl_exchange) {
        /* without our transport there is nobody to tell: fail locally */
        if (desc->base.logger.func)
            desc->base.logger.func("moe_ep_nccl", 1, t ? t->rank : -1,
                                   "moe_ep_nccl_layer_desc.base.transport must be an NCCL transport "
                                   "(moe_ep_nccl_transport_create)", desc->base.logger.user_data);
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    if ((desc->base.allocator.alloc_fn == NULL) != (desc->base.allocator.free_fn == NULL)) return MOE_EP_ERROR_INVALID_ARGUMENT;
    L = (moe_ep_nccl_layer*)moe_ep__nccl_alloc(&desc->base.allocator, sizeof *L);
    if (!L) return MOE_EP_ERROR_OUT_OF_MEMORY;
    memset(L, 0, sizeof *L);
    L->desc = *desc;
    L->desc.dtype = desc->dtype == MOE_EP_NCCL_DTYPE_DEFAULT ? MOE_EP_NCCL_DTYPE_F32 : desc->dtype;
    L->desc.a2a_layout = desc->a2a_layout == MOE_EP_NCCL_A2A_DEFAULT ? MOE_EP_NCCL_A2A_STAGED : desc->a2a_layout;
    L->transport = *t;
    L->net = (moe_ep__nccl*)t->impl;
    L->stream = L->net->stream;
    L->rank = t->rank;
    L->world_size = R = t->world_size;
    L->dtype = L->desc.dtype;
    L->elem = L->dtype == MOE_EP_NCCL_DTYPE_BF16 ? 2 : 4;
    L->d = desc->base.d_model;
    L->ff = desc->base.d_ff;
    L->E = desc->base.num_experts;
    L->k = desc->base.top_k > 0 ? desc->base.top_k : 1;
    L->activation = desc->base.activation == MOE_EP_ACTIVATION_DEFAULT ? MOE_EP_ACTIVATION_SWIGLU : desc->base.activation;
    L->ff_full = L->ff;
    L->tp_size = 1;
    tp = desc->base.tp_transport;
    if (tp && tp->exchange_counts == moe_ep__nccl_exchange && tp->impl && tp->world_size > 1 && tp->rank >= 0 &&
        tp->rank < tp->world_size) {
        L->tp = *tp;
        L->tp_net = (moe_ep__nccl*)tp->impl;
        L->tp_rank = tp->rank;
        L->tp_size = tp->world_size;
        L->partial_f32 = L->dtype == MOE_EP_NCCL_DTYPE_BF16;
        if (L->ff_full >= L->tp_size) {     /* else validation fails */
            L->ff_begin = (int)((int64_t)L->ff_full * L->tp_rank / L->tp_size);
            L->ff = (int)((int64_t)L->ff_full * (L->tp_rank + 1) / L->tp_size) - L->ff_begin;
        }
    }
    L->up_rows = L->activation == MOE_EP_ACTIVATION_SWIGLU ? 2 * L->ff : L->ff;
    L->row_bytes = (size_t)(L->d > 0 ? L->d : 0) * L->elem;
    res = moe_ep__nccl_usable(L->net, err, sizeof err);
    if (res != MOE_EP_OK) {
        moe_ep__nccl_free(&desc->base.allocator, L);
        return res;
    }
    if (moe_ep__nccl_validate(L) != 0) res = MOE_EP_ERROR_INVALID_ARGUMENT;
    /* 1: agree on the GPU-side parameters (0 = this rank rejected its desc) */
    words = (int64_t*)moe_ep__nccl_alloc(&desc->base.allocator, sizeof(int64_t) * 2 * (size_t)R);
    if (!words) {
        moe_ep__nccl_free(&desc->base.allocator, L);
        return MOE_EP_ERROR_OUT_OF_MEMORY;
    }
    {
        int64_t mine = res == MOE_EP_OK ? moe_ep__nccl_fingerprint(&L->desc) : 0;
        moe_ep_result x;
        for (p = 0; p < R; ++p) words[p] = mine;
        x = moe_ep__nccl_exchange(L->net, words, words + R, 1, err, sizeof err);
        if (x != MOE_EP_OK && res == MOE_EP_OK) res = moe_ep__nccl_net_fail(L, x, "moe_ep_nccl_layer_create", err);
        for (p = 0; x == MOE_EP_OK && res == MOE_EP_OK && p < R; ++p)
            if (words[R + p] != mine)
                res = moe_ep__nccl_fail(L, MOE_EP_ERROR_RANK_MISMATCH,
                                        words[R + p] == 0 ? "moe_ep_nccl_layer_create: rank %d rejected its desc"
                                                          : "moe_ep_nccl_layer_create: rank %d has other GPU parameters "
                                                            "(dtype, a2a_layout, max_tokens, expert_fn, router_weight)", p);
    }
    moe_ep__nccl_free(&desc->base.allocator, words);
    {   /* and over the TP group: the same shapes; after this every rank of the replica agrees */
        int64_t shape = moe_ep__nccl_tp_fingerprint(L);
        res = moe_ep__nccl_tp_agree(L, res, &shape, 1, MOE_EP_ERROR_RANK_MISMATCH,
                                    "has another layer (shapes, dtype, a2a_layout, max_tokens, router_weight)",
                                    "moe_ep_nccl_layer_create");
    }
    if (res != MOE_EP_OK) {
        moe_ep__nccl_free(&desc->base.allocator, L);
        return res;
    }
    /* 2: the core context (its own fingerprint exchange) plans for the EP group; TP stays
       here, since the core would split the CPU experts, which the GPU layer does not use */
    core = desc->base;
    core.tp_transport = NULL;
    core.expert_fn = moe_ep__nccl_no_cpu_experts;
    core.num_threads = 1;
    core.allocator.alloc_fn = moe_ep__nccl_cache_alloc;
    core.allocator.free_fn = moe_ep__nccl_cache_free;
    core.allocator.user_data = L;
    res = moe_ep_create(&core, &L->core);
    if (res == MOE_EP_OK) {
        L->desc.base = moe_ep_query_desc(L->core);
        L->desc.base.transport = NULL;
        L->desc.base.tp_transport = NULL;
        L->desc.base.expert_fn = NULL;
        L->desc.base.allocator = desc->base.allocator;
        /* 3: device state */
        res = moe_ep__nccl_build(L);
    }
    /* 4: the direct path, collective over the EP group whatever happened above */
    if (L->world_size > 1 && L->desc.max_tokens > 0 && L->desc.direct != MOE_EP_NCCL_DIRECT_OFF)
        res = moe_ep__nccl_direct_setup(L, res);
    /* then agree again (any rank can run out of memory), over the EP and the TP group */
    res = moe_ep__nccl_agree(L, res, "moe_ep_nccl_layer_create");
    res = moe_ep__nccl_tp_agree(L, res, NULL, 0, MOE_EP_OK, "", "moe_ep_nccl_layer_create");
    if (res != MOE_EP_OK) {
        moe_ep__nccl_layer_free(L);
        return res;
    }
    *out = L;
    return MOE_EP_OK;
}

MOE_EP_API void moe_ep_nccl_layer_destroy(moe_ep_nccl_layer* layer) {
    if (layer) moe_ep__nccl_layer_free(layer);
}

MOE_EP_API moe_ep_context* moe_ep_nccl_layer_context(moe_ep_nccl_layer* layer) { return layer ? layer->core : NULL; }
MOE_EP_API const char* moe_ep_nccl_last_error(const moe_ep_nccl_layer* layer) { return layer ? layer->last_error : ""; }
MOE_EP_API cudaStream_t moe_ep_nccl_layer_stream(const moe_ep_nccl_layer* layer) { return layer ? layer->stream : 0; }
MOE_EP_API int moe_ep_nccl_layer_direct(const moe_ep_nccl_layer* layer) { return layer ? layer->direct : 0; }

MOE_EP_API void moe_ep_nccl_layer_rows(moe_ep_nccl_layer* layer, void** recv, void** out, int64_t* rows) {
    int full = layer && layer->desc.max_tokens > 0;
    if (recv) *recv = full ? layer->recv : NULL;
    if (out) *out = full ? layer->out : NULL;
    if (rows) *rows = !full ? 0 : layer->direct ? layer->region_rows : (int64_t)(layer->recv_bytes / layer->row_bytes);
}

MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_enter(moe_ep_nccl_layer* L) {
    char err[MOE_EP__NCCL_ERR] = "";
    moe_ep_result res = moe_ep__nccl_direct_check(L);
    if (res != MOE_EP_OK) return res;
    res = moe_ep__nccl_usable(L->net, err, sizeof err);
    if (res != MOE_EP_OK) return moe_ep__nccl_net_fail(L, res, "moe_ep_nccl", err);
    return MOE_EP_OK;
}

/* >>gpu layer: router */
MOE_EP_API moe_ep_result moe_ep_nccl_route(moe_ep_nccl_layer* L, const void* x, int64_t tokens, int32_t* topk_idx,
                                           float* topk_weight) {
    moe_ep_result res;
    size_t slots, idx_bytes;
    char err[MOE_EP__NCCL_ERR] = "";
    int32_t* idx_dev;
    float* weight_dev;
    if (!L) return MOE_EP_ERROR_INVALID_ARGUMENT;
    res = moe_ep__nccl_enter(L);
    if (res != MOE_EP_OK) return res;
    if (!L->router)
        return moe_ep__nccl_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT,
                                 "moe_ep_nccl_route: the layer has no router_weight: hand in routing instead");
    if (tokens < 0) return moe_ep__nccl_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT, "moe_ep_nccl_route: tokens (%lld) must be >= 0",
                                             (long long)tokens);
    if (tokens == 0) return MOE_EP_OK;
    if (!x || !topk_idx || !topk_weight)
        return moe_ep__nccl_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT,
                                 "moe_ep_nccl_route: x, topk_idx and topk_weight must not be NULL when tokens > 0");
    if (L->desc.max_tokens > 0 && tokens > L->desc.max_tokens)
        return moe_ep__nccl_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT, "moe_ep_nccl_route: tokens (%lld) must be <= max_tokens (%lld)",
                                 (long long)tokens, (long long)L->desc.max_tokens);
    res = moe_ep__nccl_reserve_router(L, tokens);
    if (res != MOE_EP_OK) return res;
    slots = (size_t)tokens * (size_t)L->k;
    idx_bytes = moe_ep__nccl_round16(slots * sizeof(int32_t));
    idx_dev = (int32_t*)L->topk_dev;
    weight_dev = (float*)((char*)L->topk_dev + idx_bytes);
    res = moe_ep__nccl_linear(L, L->blas, L->router, L->E, L->d, x, L->d, tokens, L->logits, L->E, CUDA_R_32F, "router logits");
    if (res != MOE_EP_OK) return res;
    res = moe_ep__nccl_cuda(L, (cudaError_t)moe_ep__nccl_k_topk((const float*)L->logits, tokens, L->E, L->k,
                                                                L->desc.base.normalize_topk, idx_dev, weight_dev, L->stream),
                            "router top-k kernel");
    if (res == MOE_EP_OK)
        res = moe_ep__nccl_cuda(L, cudaMemcpyAsync(L->topk_host, L->topk_dev, idx_bytes + slots * sizeof(float),
                                                   cudaMemcpyDeviceToHost, L->stream), "router download");
    if (res != MOE_EP_OK) return res;
    res = moe_ep__nccl_wait(L->net, L->stream, NULL, err, sizeof err);
    if (res != MOE_EP_OK) return moe_ep__nccl_net_fail(L, res, "moe_ep_nccl_route", err);
    memcpy(topk_idx, L->topk_host, slots * sizeof(int32_t));
    memcpy(topk_weight, (char*)L->topk_host + idx_bytes, slots * sizeof(float));
    return MOE_EP_OK;
}

/* >>gpu layer: plan */
/* Keeps one set of plan buffers for the next plan, preferring the full-size set. Plans
   are created and destroyed collectively, so every rank makes the same choice. */
MOE_EP_PRIVATE void moe_ep__nccl_release_buffers(moe_ep_nccl_layer* L, moe_ep__nccl_buffers* b) {
    if (!L->has_spare || (b->full && !L->spare.full)) {
        moe_ep__nccl_buffers old = L->spare;
        int had = L->has_spare;
        L->spare = *b;
        L->has_spare = 1;
        if (!had) return;
        *b = old;
    }
    cudaStreamSynchronize(L->stream);   /* the GPU may still read them */
    moe_ep__nccl_free_buffers(b);
}

/* Uploads the core plan's slot rows, the routing and a few small tables in one copy; two
   kernels then build where each (token, slot) row lives (the slot map) and, staged,
   where each staged row goes. The host only copies arrays, never walks the slots. */
MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_upload_plan(moe_ep_nccl_layer* L, moe_ep_nccl_plan* P, const int32_t* idx) {
    const moe_ep_plan_info* in = &P->info;
    int64_t slots = in->tokens * L->k;
    int S = in->segments, me = L->rank, q, s, e, chunks = 0;
    moe_ep__nccl_meta m = moe_ep__nccl_meta_layout(L, slots, P->remote_rows);
    char* host = (char*)P->bufs.meta_host;
    char* dev = (char*)P->bufs.meta;
    int32_t* owner_local = (int32_t*)(host + m.owner);
    int64_t* shift = (int64_t*)(host + m.shift);
    int64_t* chunk_start = (int64_t*)(host + m.chunk_start);
    int64_t* chunk_dest = (int64_t*)(host + m.chunk_dest);
    moe_ep_result res;
    if (S != L->S) return moe_ep__nccl_fail(L, MOE_EP_ERROR_INTERNAL, "plan has %d segments, expected %d", S, L->S);
    if (P->bufs.uploaded) {
        res = moe_ep__nccl_cuda(L, cudaEventSynchronize(P->bufs.uploaded), "plan upload");
        if (res != MOE_EP_OK) return res;
    } else {
        res = moe_ep__nccl_cuda(L, cudaEventCreateWithFlags(&P->bufs.uploaded, cudaEventDisableTiming), "plan upload");
        if (res != MOE_EP_OK) return res;
    }
    if (slots > 0) {
        memcpy(host + m.rows, in->slot_rows, (size_t)slots * 8);
        memcpy(host + m.idx, idx, (size_t)slots * 4);
        memcpy(host + m.weight, in->topk_weight, (size_t)slots * 4);
    }
    for (e = 0; e < L->E; ++e) owner_local[e] = L->owner_of[e] == me ? L->local_index_of[e] : -1;
    if (L->direct) {
        memcpy(host + m.send_off, in->seg_send_offsets, sizeof(int64_t) * (size_t)L->world_size * (size_t)S);
        memcpy(host + m.table, in->seg_recv_offsets, sizeof(int64_t) * (size_t)L->world_size * (size_t)S);
    }
    for (s = 0; s < S; ++s) shift[s] = in->seg_recv_offsets[me * S + s] - in->seg_send_offsets[me * S + s];
    chunk_start[0] = 0;
    for (q = 0; q < L->world_size; ++q) {
        if (q == me) continue;
        for (s = 0; s < S; ++s, ++chunks) {
            chunk_dest[chunks] = in->seg_recv_offsets[q * S + s];
            chunk_start[chunks + 1] = chunk_start[chunks] + in->seg_recv_counts[q * S + s];
        }
    }
    P->slot_map = (int32_t*)(dev + m.map);
    P->weight = (float*)(dev + m.weight);
    P->stage_map = (int32_t*)(dev + m.stage);
    P->dest = (int64_t*)(dev + m.dest);
    res = moe_ep__nccl_cuda(L, cudaMemcpyAsync(dev, host, m.upload, cudaMemcpyHostToDevice, L->stream), "plan upload");
    if (res == MOE_EP_OK) res = moe_ep__nccl_cuda(L, cudaEventRecord(P->bufs.uploaded, L->stream), "plan upload");
    if (res == MOE_EP_OK)
        res = moe_ep__nccl_cuda(L, (cudaError_t)moe_ep__nccl_k_slot_map((const int64_t*)(dev + m.rows),
                                                                        (const int32_t*)(dev + m.idx),
                                                                        (const int32_t*)(dev + m.owner),
                                                                        (const int64_t*)(dev + m.shift), slots,
                                                                        P->slot_map, L->stream), "slot map kernel");
    if (res == MOE_EP_OK && L->direct) {
        /* publish this rank's receive offsets, then learn where each slot's row goes */
        uint64_t epoch = ++L->plan_epoch;
        res = moe_ep__nccl_kernel(L, moe_ep__nccl_k_direct_publish(L->g, (const int64_t*)(dev + m.table),
                                                                   (int64_t)L->world_size * S, epoch, L->stream),
                                  "direct publish kernel");
        if (res == MOE_EP_OK)
            res = moe_ep__nccl_kernel(L, moe_ep__nccl_k_direct_resolve(L->g, P->slot_map, (const int32_t*)(dev + m.idx),
                                                                       L->expert_at, L->E,
                                                                       (const int64_t*)(dev + m.send_off), S, slots,
                                                                       P->dest, epoch, L->stream),
                                      "direct resolve kernel");
        return res;
    }
    if (res == MOE_EP_OK && L->desc.a2a_layout == MOE_EP_NCCL_A2A_STAGED)
        res = moe_ep__nccl_cuda(L, (cudaError_t)moe_ep__nccl_k_stage_map((const int64_t*)(dev + m.chunk_start),
                                                                         (const int64_t*)(dev + m.chunk_dest), chunks,
                                                                         P->remote_rows, P->stage_map, L->stream),
                                "stage map kernel");
    return res;
}

/* forward: also size the forward's own expert-side buffers. With full-size buffers at
   hand nothing after the count exchange can fail, so no further agreement is needed;
   otherwise buffers are sized and then every rank agrees. */
MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_plan_build(moe_ep_nccl_layer* L, int64_t tokens, const int32_t* idx,
                                                     const float* weight, moe_ep_result status, int forward,
                                                     moe_ep_nccl_plan** out) {
    moe_ep_nccl_plan* P = NULL;
    moe_ep_plan* core = NULL;
    moe_ep_result res;
    int reserved = L->has_spare && L->spare.full;
    if (status == MOE_EP_OK && L->desc.max_tokens > 0 && tokens > L->desc.max_tokens)
        status = moe_ep__nccl_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT, "tokens (%lld) must be <= max_tokens (%lld)",
                                   (long long)tokens, (long long)L->desc.max_tokens);
    if (status == MOE_EP_OK) {
        P = (moe_ep_nccl_plan*)moe_ep__nccl_alloc(&L->desc.base.allocator, sizeof *P);
        if (!P) status = moe_ep__nccl_fail(L, MOE_EP_ERROR_OUT_OF_MEMORY, "moe_ep_nccl_plan_create: out of memory");
    }
    if (L->tp_size > 1) {
        /* First over the TP group, whose ranks must hand in the same tokens and routing:
           then they receive the same rows, and the EP exchange below takes any failure
           to every rank of the replica. */
        int64_t facts[2];
        facts[0] = tokens;
        facts[1] = status == MOE_EP_OK ? moe_ep__nccl_routing_hash(idx, weight, tokens * L->k) : 0;
        status = moe_ep__nccl_tp_agree(L, status, facts, 2, MOE_EP_ERROR_INVALID_ARGUMENT,
                                       "hands in other tokens or routing (a TP group must share both)",
                                       "moe_ep_nccl_plan_create");
    }
    if (status != MOE_EP_OK) {
        /* take part in the count exchange with an invalid call: every other rank fails too */
        moe_ep__nccl_free(&L->desc.base.allocator, P);
        moe_ep_plan_create(L->core, -1, NULL, NULL, &core);
        return status;
    }
    res = moe_ep_plan_create(L->core, tokens, idx, weight, &core);
    if (res != MOE_EP_OK) {
        moe_ep__nccl_free(&L->desc.base.allocator, P);
        return moe_ep__nccl_fail(L, res, "%s", moe_ep_last_error(L->core));
    }
    memset(P, 0, sizeof *P);
    P->layer = L;
    P->core = core;
    P->info = moe_ep_plan_query(core);
    P->remote_rows = P->info.recv_rows - P->info.recv_counts[L->rank];
    if (L->has_spare) {
        P->bufs = L->spare;
        L->has_spare = 0;
    }
    if (!reserved) {
        if (P->info.send_rows > 0x3FFFFFFF || P->info.recv_rows > 0x3FFFFFFF)
            status = moe_ep__nccl_fail(L, MOE_EP_ERROR_UNSUPPORTED, "moe_ep_nccl_plan_create: more than 2^30 rows");
        if (status == MOE_EP_OK)
            status = moe_ep__nccl_reserve_plan(L, &P->bufs, P->info.tokens * L->k, P->info.send_rows, P->remote_rows);
        if (status == MOE_EP_OK) status = moe_ep__nccl_reserve_experts(L, P->info.recv_rows, forward);
        status = moe_ep__nccl_agree(L, status, "moe_ep_nccl_plan_create");
        status = moe_ep__nccl_tp_agree(L, status, NULL, 0, MOE_EP_OK, "", "moe_ep_nccl_plan_create");
    }
    if (status == MOE_EP_OK) status = moe_ep__nccl_upload_plan(L, P, idx);
    if (status != MOE_EP_OK) {
        moe_ep__nccl_release_buffers(L, &P->bufs);
        moe_ep__nccl_free(&L->desc.base.allocator, P);
        moe_ep_plan_destroy(core);
        return status;
    }
    *out = P;
    return MOE_EP_OK;
}

MOE_EP_API moe_ep_result moe_ep_nccl_plan_create(moe_ep_nccl_layer* L, int64_t tokens, const int32_t* topk_idx,
                                                 const float* topk_weight, moe_ep_nccl_plan** out) {
    moe_ep_result status = MOE_EP_OK;
    if (!L) return MOE_EP_ERROR_INVALID_ARGUMENT;
    status = moe_ep__nccl_enter(L);
    if (status != MOE_EP_OK) return status;
    if (!out) status = moe_ep__nccl_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT, "moe_ep_nccl_plan_create: out must not be NULL");
    else if (tokens < 0)
        status = moe_ep__nccl_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT, "moe_ep_nccl_plan_create: tokens (%lld) must be >= 0",
                                   (long long)tokens);
    return moe_ep__nccl_plan_build(L, tokens, topk_idx, topk_weight, status, 0, out);
}

MOE_EP_API void moe_ep_nccl_plan_destroy(moe_ep_nccl_plan* P) {
    moe_ep_nccl_layer* L;
    if (!P) return;
    L = P->layer;
    cudaSetDevice(L->net->device);
    if (P->request) {
        /* an open split-phase exchange: let it finish before its buffers go */
        cudaStreamSynchronize(L->net->side);
        P->request->in_use = 0;
    }
    if (P->xfer) {
        /* dispatched directly but never combined: free the peers' next dispatch all the same */
        if (!P->out_sent) moe_ep__nccl_k_direct_signal(L->g, MOE_EP__NCCL_PHASE_OUT, P->xfer, L->stream);
        if (L->open_plan == P) L->open_plan = NULL;
    }
    moe_ep__nccl_release_buffers(L, &P->bufs);
    moe_ep_plan_destroy(P->core);
    moe_ep__nccl_free(&L->desc.base.allocator, P);
}

MOE_EP_API moe_ep_plan_info moe_ep_nccl_plan_query(const moe_ep_nccl_plan* plan) {
    moe_ep_plan_info info;
    if (plan) return plan->info;
    memset(&info, 0, sizeof info);
    return info;
}

/* >>gpu layer: exchanges */
MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_check_stage(moe_ep_nccl_layer* L, moe_ep_nccl_plan* P, const char* stage,
                                                      int pending_expected) {
    moe_ep_result res;
    if (!L) return MOE_EP_ERROR_INVALID_ARGUMENT;
    res = moe_ep__nccl_enter(L);
    if (res != MOE_EP_OK) return res;
    if (!P || P->layer != L)
        return moe_ep__nccl_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT, "%s: plan is NULL or belongs to another layer", stage);
    if (P->pending != pending_expected)
        return moe_ep__nccl_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT, "%s: %s", stage,
                                 P->pending ? "a split-phase operation on this plan is still open"
                                            : "no split-phase operation is open on this plan");
    return MOE_EP_OK;
}

/* One exchange of the layer's rows over the network, on `stream`. forward: token side
   sends (dispatch); else expert side sends (combine). Own-rank rows never come here. */
MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_exchange_rows(moe_ep_nccl_layer* L, moe_ep_nccl_plan* P, int forward,
                                                        char* expert_rows, cudaStream_t stream) {
    const moe_ep_plan_info* in = &P->info;
    moe_ep__nccl* n = L->net;
    int S = in->segments, me = L->rank, p, s;
    size_t rb = L->row_bytes;
    char* token_rows = (char*)P->bufs.send;
    char* stage = (char*)P->bufs.stage;
    char err[MOE_EP__NCCL_ERR] = "";
    ncclResult_t r = ncclGroupStart();
    moe_ep_result res;
    if (L->desc.a2a_layout == MOE_EP_NCCL_A2A_STAGED) {
        int64_t stage_row = 0;
        for (p = 0; r == ncclSuccess && p < L->world_size; ++p) {
            int64_t token_count = in->send_counts[p], expert_count = in->recv_counts[p];
            char* token_block = token_rows + (size_t)in->seg_send_offsets[p * S] * rb;
            char* stage_block = stage + (size_t)stage_row * rb;
            if (p == me) continue;
            stage_row += expert_count;
            if (token_count > 0)
                r = forward ? ncclSend(token_block, (size_t)token_count * rb, ncclInt8, p, n->comm, stream)
                            : ncclRecv(token_block, (size_t)token_count * rb, ncclInt8, p, n->comm, stream);
            if (r == ncclSuccess && expert_count > 0)
                r = forward ? ncclRecv(stage_block, (size_t)expert_count * rb, ncclInt8, p, n->comm, stream)
                            : ncclSend(stage_block, (size_t)expert_count * rb, ncclInt8, p, n->comm, stream);
        }
    } else {
        for (p = 0; r == ncclSuccess && p < L->world_size; ++p) {
            if (p == me) continue;
            for (s = 0; r == ncclSuccess && s < S; ++s) {
                int64_t token_count = in->seg_send_counts[p * S + s], expert_count = in->seg_recv_counts[p * S + s];
                char* token_seg = token_rows + (size_t)in->seg_send_offsets[p * S + s] * rb;
                char* expert_seg = expert_rows + (size_t)in->seg_recv_offsets[p * S + s] * rb;
                if (token_count > 0)
                    r = forward ? ncclSend(token_seg, (size_t)token_count * rb, ncclInt8, p, n->comm, stream)
                                : ncclRecv(token_seg, (size_t)token_count * rb, ncclInt8, p, n->comm, stream);
                if (r == ncclSuccess && expert_count > 0)
                    r = forward ? ncclRecv(expert_seg, (size_t)expert_count * rb, ncclInt8, p, n->comm, stream)
                                : ncclSend(expert_seg, (size_t)expert_count * rb, ncclInt8, p, n->comm, stream);
            }
        }
    }
    res = moe_ep__nccl_group_end(n, r, err, sizeof err);
    if (res != MOE_EP_OK) return moe_ep__nccl_net_fail(L, res, forward ? "moe_ep_nccl_dispatch" : "moe_ep_nccl_combine", err);
    return MOE_EP_OK;
}

/* Queue the exchange on the side stream, ordered after the layer stream's work so far;
   the layer stream is free for local work until moe_ep__nccl_finish joins them. */
MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_start(moe_ep_nccl_layer* L, moe_ep_nccl_plan* P, int forward,
                                                char* expert_rows) {
    char err[MOE_EP__NCCL_ERR] = "";
    moe_ep__nccl_request* q;
    moe_ep_result res;
    if (L->world_size == 1) return MOE_EP_OK;
    q = moe_ep__nccl_request_take(L->net, err, sizeof err);
    if (!q) return moe_ep__nccl_net_fail(L, MOE_EP_ERROR_TRANSPORT, "split-phase exchange", err);
    q->host = 0;
    res = moe_ep__nccl_fork(L->net, q, L->stream, err, sizeof err);
    if (res != MOE_EP_OK) res = moe_ep__nccl_net_fail(L, res, "split-phase exchange", err);
    if (res == MOE_EP_OK) res = moe_ep__nccl_exchange_rows(L, P, forward, expert_rows, L->net->side);
    if (res == MOE_EP_OK) res = moe_ep__nccl_cuda(L, cudaEventRecord(q->done, L->net->side), "split-phase exchange");
    if (res != MOE_EP_OK) {
        q->in_use = 0;
        return res;
    }
    P->request = q;
    return MOE_EP_OK;
}

MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_finish(moe_ep_nccl_layer* L, moe_ep_nccl_plan* P) {
    moe_ep_result res = MOE_EP_OK;
    if (P->request) {
        res = moe_ep__nccl_cuda(L, cudaStreamWaitEvent(L->stream, P->request->done, 0), "split-phase exchange");
        P->request->in_use = 0;
        P->request = NULL;
    }
    return res;
}

/* >>gpu layer: dispatch */
/* Rows for the network are gathered first; the exchange then runs on the side stream
   while the rows that stay on this rank are gathered beside it. */
MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_dispatch_begin(moe_ep_nccl_layer* L, moe_ep_nccl_plan* P, const void* x,
                                                         void* recv_rows) {
    moe_ep_result res = moe_ep__nccl_check_stage(L, P, "moe_ep_nccl_dispatch", 0);
    int alone = L->world_size == 1;
    if (res != MOE_EP_OK) return res;
    if ((P->info.tokens > 0 && !x) || (P->info.recv_rows > 0 && !recv_rows))
        return moe_ep__nccl_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT, "moe_ep_nccl_dispatch: x and recv_rows must not be NULL");
    if (L->direct) {
        /* one store per row into its owner's region; the wait is in dispatch_end */
        uint64_t epoch;
        if (L->open_plan)
            return moe_ep__nccl_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT,
                                     "moe_ep_nccl_dispatch: the plan dispatched before must be combined first "
                                     "(the direct path has one set of buffers)");
        epoch = L->xfer_epoch + 1;
        res = moe_ep__nccl_kernel(L, moe_ep__nccl_k_direct_push(L->g, x, P->dest, P->info.tokens, L->k, L->row_bytes,
                                                                epoch, L->stream), "direct push kernel");
        if (res != MOE_EP_OK) return res;
        L->xfer_epoch = epoch;
        L->open_plan = P;
        P->xfer = epoch;
        P->out_sent = 0;
        P->pending = 1;
        P->open_rows = recv_rows;
        return MOE_EP_OK;
    }
    res = moe_ep__nccl_cuda(L, (cudaError_t)moe_ep__nccl_k_permute(x, P->bufs.send, recv_rows, P->slot_map, P->info.tokens,
                                                                   L->k, L->row_bytes, alone ? 3 : 1, L->stream),
                            "permute kernel");
    if (res == MOE_EP_OK && !alone) res = moe_ep__nccl_start(L, P, 1, (char*)recv_rows);
    if (res == MOE_EP_OK && !alone)
        res = moe_ep__nccl_cuda(L, (cudaError_t)moe_ep__nccl_k_permute(x, P->bufs.send, recv_rows, P->slot_map,
                                                                       P->info.tokens, L->k, L->row_bytes, 2, L->stream),
                                "permute kernel");
    if (res != MOE_EP_OK) return res;
    P->pending = 1;
    P->open_rows = recv_rows;
    return MOE_EP_OK;
}

MOE_EP_API moe_ep_result moe_ep_nccl_dispatch_end(moe_ep_nccl_layer* L, moe_ep_nccl_plan* P) {
    moe_ep_result res = moe_ep__nccl_check_stage(L, P, "moe_ep_nccl_dispatch_end", 1);
    if (res != MOE_EP_OK) return res;
    P->pending = 0;
    if (P->xfer) {
        res = moe_ep__nccl_kernel(L, moe_ep__nccl_k_direct_wait(L->g, MOE_EP__NCCL_PHASE_DATA, P->xfer, L->stream),
                                  "direct wait kernel");
        if (res == MOE_EP_OK && P->open_rows != L->recv && P->info.recv_rows > 0)
            res = moe_ep__nccl_cuda(L, cudaMemcpyAsync(P->open_rows, L->recv, (size_t)P->info.recv_rows * L->row_bytes,
                                                       cudaMemcpyDeviceToDevice, L->stream), "moe_ep_nccl_dispatch");
        return res;
    }
    res = moe_ep__nccl_finish(L, P);
    if (res == MOE_EP_OK && L->desc.a2a_layout == MOE_EP_NCCL_A2A_STAGED)
        res = moe_ep__nccl_cuda(L, (cudaError_t)moe_ep__nccl_k_move_rows(P->bufs.stage, P->open_rows, P->stage_map,
                                                                         P->remote_rows, L->row_bytes, 1, L->stream),
                                "regroup kernel");
    return res;
}

MOE_EP_API moe_ep_result moe_ep_nccl_dispatch_begin(moe_ep_nccl_layer* L, moe_ep_nccl_plan* P, const void* x,
                                                    void* recv_rows) {
    return moe_ep__nccl_dispatch_begin(L, P, x, recv_rows);
}

MOE_EP_API moe_ep_result moe_ep_nccl_dispatch(moe_ep_nccl_layer* L, moe_ep_nccl_plan* P, const void* x, void* recv_rows) {
    moe_ep_result res = moe_ep__nccl_dispatch_begin(L, P, x, recv_rows);
    if (res != MOE_EP_OK) return res;
    return moe_ep_nccl_dispatch_end(L, P);
}

/* >>gpu layer: experts */
/* All experts' up projections in one grouped GEMM (one group per non-empty expert), one
   activation pass, all down projections in another. MOE_EP_ERROR_UNSUPPORTED when this
   cuBLAS refuses the types, before anything is queued. */
MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_grouped_experts(moe_ep_nccl_layer* L, moe_ep_nccl_plan* P, const void* rows,
                                                          void* out) {
    size_t rb = L->row_bytes, hb = (size_t)L->up_rows * L->elem;
    int* m = L->group_ints;
    int *n = m + L->L, *k = m + 2 * L->L, *lda = m + 3 * L->L, *ldb = m + 4 * L->L, *ldc = m + 5 * L->L;
    int* sizes = m + 8 * L->L;
    cudaDataType_t t = moe_ep__nccl_cuda_type(L);
    int g = 0, l, pass;
    cublasStatus_t st;
    moe_ep_result res;
    void** ptr = L->ptrs_host;
    /* the previous call's upload must be done before its pinned source is rewritten */
    res = moe_ep__nccl_cuda(L, cudaEventSynchronize(L->ptrs_uploaded), "expert GEMM arrays");
    if (res != MOE_EP_OK) return res;
    for (l = 0; l < L->L; ++l) {
        int64_t rows_l = P->info.local_expert_counts[l], first = P->info.local_expert_offsets[l];
        if (rows_l == 0) continue;
        n[g] = (int)rows_l;
        ptr[g] = (char*)L->w_up + (size_t)l * L->up_rows * rb;
        ptr[L->L + g] = (char*)(uintptr_t)rows + (size_t)first * rb;
        ptr[2 * L->L + g] = (char*)L->hidden + (size_t)first * hb;
        ptr[3 * L->L + g] = (char*)L->w_down + (size_t)l * L->ff * rb;
        ptr[4 * L->L + g] = (char*)L->hidden + (size_t)first * hb;
        ptr[5 * L->L + g] = (char*)out + (size_t)first * rb;
        ++g;
    }
    res = moe_ep__nccl_cuda(L, cudaMemcpyAsync(L->ptrs_dev, L->ptrs_host, sizeof(void*) * 6 * (size_t)L->L,
                                               cudaMemcpyHostToDevice, L->stream), "expert GEMM arrays");
    if (res == MOE_EP_OK) res = moe_ep__nccl_cuda(L, cudaEventRecord(L->ptrs_uploaded, L->stream), "expert GEMM arrays");
    for (pass = 0; res == MOE_EP_OK && pass < 2; ++pass) {
        void** dev = L->ptrs_dev + 3 * (size_t)pass * L->L;
        int i;
        for (i = 0; i < g; ++i) {   /* up: [n, up_rows] = rows . w_up^T; down: [n, d] = hidden . w_down^T */
            m[i] = pass ? L->d : L->up_rows;
            k[i] = pass ? L->ff : L->d;
            lda[i] = k[i];
            ldb[i] = pass ? L->up_rows : L->d;
            ldc[i] = pass ? L->d : L->up_rows;
        }
        st = cublasGemmGroupedBatchedEx(L->blas, L->group_ops, L->group_ops + L->L, m, n, k, L->group_scalars,
                                        (const void* const*)dev, t, lda, (const void* const*)(dev + L->L), t, ldb,
                                        L->group_scalars + L->L, (void* const*)(dev + 2 * L->L), t, ldc, g, sizes,
                                        CUBLAS_COMPUTE_32F);
        if (pass == 0 && (st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE))
            return MOE_EP_ERROR_UNSUPPORTED;
        res = moe_ep__nccl_blas(L, st, pass ? "expert down projections" : "expert up projections");
        if (res == MOE_EP_OK && pass == 0)
            res = moe_ep__nccl_cuda(L, (cudaError_t)moe_ep__nccl_k_activation(L->hidden, P->info.recv_rows, L->ff,
                                                                              L->up_rows, L->activation,
                                                                              moe_ep__nccl_kdtype[L->dtype], L->stream),
                                    "activation kernel");
    }
    return res;
}

/* The built-in experts of this rank (its d_ff slice with TP): grouped GEMMs or the loop. */
MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_local_experts(moe_ep_nccl_layer* L, moe_ep_nccl_plan* P, const void* rows,
                                                        void* out) {
    moe_ep_result res = moe_ep__nccl_reserve_experts(L, P->info.recv_rows, 0);  /* no-op after plan creation sized it */
    size_t rb = L->row_bytes, hb = (size_t)L->up_rows * L->elem;
    int l, used = 0;
    if (res == MOE_EP_OK && L->grouped) {
        int busy = 0;
        for (l = 0; l < L->L; ++l) busy += P->info.local_expert_counts[l] > 0;
        if (L->grouped == 1 || P->info.recv_rows <= 384 * (int64_t)busy) {
            res = moe_ep__nccl_grouped_experts(L, P, rows, out);
            if (res != MOE_EP_ERROR_UNSUPPORTED) return res;
            L->grouped = 0;     /* this cuBLAS lacks grouped GEMMs for these types: the loop from now on */
            res = MOE_EP_OK;
        }
    }
    if (res != MOE_EP_OK) return res;
    /* Expert after expert, each on the next lane: up projection (w1 and w3 in one GEMM),
       activation, down projection. Lanes fork from and join back into the layer stream. */
    if (res == MOE_EP_OK && L->lanes > 1) {
        res = moe_ep__nccl_cuda(L, cudaEventRecord(L->lanes_go, L->stream), "expert streams");
        for (l = 0; res == MOE_EP_OK && l < L->lanes; ++l)
            res = moe_ep__nccl_cuda(L, cudaStreamWaitEvent(L->lane_stream[l], L->lanes_go, 0), "expert streams");
    }
    for (l = 0; res == MOE_EP_OK && l < L->L; ++l) {
        int64_t n = P->info.local_expert_counts[l], first = P->info.local_expert_offsets[l];
        int lane = L->lanes > 1 ? used++ % L->lanes : 0;
        cudaStream_t stream = L->lanes > 1 ? L->lane_stream[lane] : L->stream;
        cublasHandle_t blas = L->lanes > 1 ? L->lane_blas[lane] : L->blas;
        char* hidden = (char*)L->hidden + (size_t)first * hb;
        if (n == 0) { if (L->lanes > 1) used--; continue; }
        res = moe_ep__nccl_linear(L, blas, (const char*)L->w_up + (size_t)l * L->up_rows * rb, L->up_rows, L->d,
                                  (const char*)rows + (size_t)first * rb, L->d, n, hidden, L->up_rows,
                                  moe_ep__nccl_cuda_type(L), "expert up projection");
        if (res == MOE_EP_OK)
            res = moe_ep__nccl_cuda(L, (cudaError_t)moe_ep__nccl_k_activation(hidden, n, L->ff, L->up_rows, L->activation,
                                                                              moe_ep__nccl_kdtype[L->dtype], stream),
                                    "activation kernel");
        if (res == MOE_EP_OK && L->partial_f32)
            res = moe_ep__nccl_linear(L, blas, (const char*)L->w_down + (size_t)l * L->ff * rb, L->d, L->ff, hidden,
                                      L->up_rows, n, (float*)L->partial + (size_t)first * (size_t)L->d, L->d,
                                      CUDA_R_32F, "expert down projection");
        else if (res == MOE_EP_OK)
            res = moe_ep__nccl_linear(L, blas, (const char*)L->w_down + (size_t)l * L->ff * rb, L->d, L->ff, hidden,
                                      L->up_rows, n, (char*)out + (size_t)first * rb, L->d, moe_ep__nccl_cuda_type(L),
                                      "expert down projection");
    }
    if (L->lanes > 1) {
        /* join even after a failure, so the layer stream never runs ahead of the lanes */
        int lane;
        for (lane = 0; lane < L->lanes; ++lane) {
            cudaError_t e = cudaEventRecord(L->lane_done[lane], L->lane_stream[lane]);
            if (e == cudaSuccess) e = cudaStreamWaitEvent(L->stream, L->lane_done[lane], 0);
            if (res == MOE_EP_OK) res = moe_ep__nccl_cuda(L, e, "expert streams");
        }
    }
    return res;
}

MOE_EP_API moe_ep_result moe_ep_nccl_experts(moe_ep_nccl_layer* L, moe_ep_nccl_plan* P, const void* rows, void* out) {
    moe_ep_result res = moe_ep__nccl_check_stage(L, P, "moe_ep_nccl_experts", 0);
    int l;
    size_t rb;
    if (res != MOE_EP_OK) return res;
    P->expert_status = MOE_EP_OK;
    if (P->info.recv_rows > 0 && (!rows || !out))
        return P->expert_status = moe_ep__nccl_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT,
                                                    "moe_ep_nccl_experts: rows and out must not be NULL");
    rb = L->row_bytes;
    if (L->desc.expert_fn) {
        for (l = 0; l < L->L; ++l) {
            int64_t n = P->info.local_expert_counts[l], first = P->info.local_expert_offsets[l];
            int rc;
            if (n == 0) continue;
            rc = L->desc.expert_fn(l, L->local_ids[l], (const char*)rows + (size_t)first * rb, n, L->d,
                                   (char*)out + (size_t)first * rb, L->stream, L->desc.expert_user_data);
            if (rc != 0)
                return P->expert_status = moe_ep__nccl_fail(L, MOE_EP_ERROR_CALLBACK,
                                                            "moe_ep_nccl_experts: expert_fn returned %d for expert %d",
                                                            rc, L->local_ids[l]);
        }
        return MOE_EP_OK;
    }
    /* the TP group holds the same rows: all its ranks skip, or none */
    if (P->info.recv_rows == 0) return MOE_EP_OK;
    res = moe_ep__nccl_local_experts(L, P, rows, out);
    if (L->tp_size > 1) {
        /* Sum the d_ff slices over the TP group, in TP-rank order; reached after a local
           failure too, so that the group is not left waiting */
        char err[MOE_EP__NCCL_ERR] = "";
        int64_t count = P->info.recv_rows * (int64_t)L->d;
        float* sums = L->partial_f32 ? (float*)L->partial : (float*)out;
        moe_ep_result reduced = L->tp.all_reduce_sum(L->tp.impl, sums, count, MOE_EP_MEMORY_DEVICE, L->stream, err,
                                                     sizeof err);
        if (res == MOE_EP_OK && reduced != MOE_EP_OK)
            res = moe_ep__nccl_net_fail(L, reduced, "moe_ep_nccl_experts: tensor-parallel sum", err);
        if (res == MOE_EP_OK && L->partial_f32)
            res = moe_ep__nccl_cuda(L, (cudaError_t)moe_ep__nccl_k_sum_ranks(sums, count, 1, out, MOE_EP__NCCL_K_BF16,
                                                                             L->stream), "bf16 rounding kernel");
    }
    return P->expert_status = res;
}

/* >>gpu layer: combine */
MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_combine_begin(moe_ep_nccl_layer* L, moe_ep_nccl_plan* P,
                                                        const void* expert_out) {
    moe_ep_result res = moe_ep__nccl_check_stage(L, P, "moe_ep_nccl_combine", 0), status = MOE_EP_OK;
    if (res != MOE_EP_OK) return res;
    if (P->info.recv_rows > 0 && !expert_out)
        status = moe_ep__nccl_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT, "moe_ep_nccl_combine: expert_out must not be NULL");
    /* A callback can fail on one rank: tell the others before they wait for its rows. */
    if (L->desc.expert_fn) {
        if (status == MOE_EP_OK) status = P->expert_status;
        status = moe_ep__nccl_agree(L, status, "moe_ep_nccl_combine");
    }
    P->expert_status = MOE_EP_OK;
    if (status != MOE_EP_OK) return status;
    if (P->xfer) {
        /* the outputs must sit in this rank's region, where the token owners read them */
        if (expert_out != L->out && P->info.recv_rows > 0)
            res = moe_ep__nccl_cuda(L, cudaMemcpyAsync(L->out, expert_out, (size_t)P->info.recv_rows * L->row_bytes,
                                                       cudaMemcpyDeviceToDevice, L->stream), "moe_ep_nccl_combine");
        if (res == MOE_EP_OK)
            res = moe_ep__nccl_kernel(L, moe_ep__nccl_k_direct_signal(L->g, MOE_EP__NCCL_PHASE_OUT, P->xfer, L->stream),
                                      "direct signal kernel");
        if (res != MOE_EP_OK) return res;
        P->out_sent = 1;
        P->pending = 2;
        P->open_local = expert_out;
        return MOE_EP_OK;
    }
    if (L->desc.a2a_layout == MOE_EP_NCCL_A2A_STAGED)
        res = moe_ep__nccl_cuda(L, (cudaError_t)moe_ep__nccl_k_move_rows(expert_out, P->bufs.stage, P->stage_map,
                                                                         P->remote_rows, L->row_bytes, 0, L->stream),
                                "regroup kernel");
    if (res == MOE_EP_OK) res = moe_ep__nccl_start(L, P, 0, (char*)(uintptr_t)expert_out);
    if (res != MOE_EP_OK) return res;
    P->pending = 2;
    P->open_local = expert_out;
    return MOE_EP_OK;
}

MOE_EP_API moe_ep_result moe_ep_nccl_combine_begin(moe_ep_nccl_layer* L, moe_ep_nccl_plan* P, const void* expert_out) {
    return moe_ep__nccl_combine_begin(L, P, expert_out);
}

MOE_EP_API moe_ep_result moe_ep_nccl_combine_end(moe_ep_nccl_layer* L, moe_ep_nccl_plan* P, void* y) {
    moe_ep_result res = moe_ep__nccl_check_stage(L, P, "moe_ep_nccl_combine_end", 2);
    if (res != MOE_EP_OK) return res;
    P->pending = 0;
    if (P->xfer) {
        uint64_t epoch = P->xfer;
        P->xfer = 0;
        L->open_plan = NULL;
        if (P->info.tokens > 0 && !y)
            return moe_ep__nccl_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT, "moe_ep_nccl_combine: y must not be NULL");
        return moe_ep__nccl_kernel(L, moe_ep__nccl_k_direct_combine(L->g, P->dest, P->weight, y, P->info.tokens, L->k, L->d,
                                                                    moe_ep__nccl_kdtype[L->dtype], epoch, L->stream),
                                   "direct combine kernel");
    }
    res = moe_ep__nccl_finish(L, P);
    if (res != MOE_EP_OK) return res;
    if (P->info.tokens > 0 && !y)
        return moe_ep__nccl_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT, "moe_ep_nccl_combine: y must not be NULL");
    return moe_ep__nccl_cuda(L, (cudaError_t)moe_ep__nccl_k_unpermute(P->bufs.send, P->open_local, P->slot_map, P->weight, y,
                                                                      P->info.tokens, L->k, L->d,
                                                                      moe_ep__nccl_kdtype[L->dtype], L->stream),
                             "un-permute kernel");
}

MOE_EP_API moe_ep_result moe_ep_nccl_combine(moe_ep_nccl_layer* L, moe_ep_nccl_plan* P, const void* expert_out, void* y) {
    moe_ep_result res = moe_ep__nccl_combine_begin(L, P, expert_out);
    if (res != MOE_EP_OK) return res;
    return moe_ep_nccl_combine_end(L, P, y);
}

/* >>gpu layer: forward */
MOE_EP_API moe_ep_result moe_ep_nccl_forward(moe_ep_nccl_layer* L, const moe_ep_nccl_forward_args* a) {
    moe_ep_result status = MOE_EP_OK, res;
    moe_ep_nccl_plan* P = NULL;
    int32_t* idx = NULL;
    float* weight = NULL;
    int64_t tokens = 0;
    if (!L) return MOE_EP_ERROR_INVALID_ARGUMENT;
    status = moe_ep__nccl_enter(L);
    if (status != MOE_EP_OK) return status;
    if (!a) status = moe_ep__nccl_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT, "moe_ep_nccl_forward: args must not be NULL");
    else if (a->tokens < 0)
        status = moe_ep__nccl_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT, "moe_ep_nccl_forward_args.tokens (%lld) must be >= 0",
                                   (long long)a->tokens);
    else if (a->tokens > 0 && (!a->x || !a->y))
        status = moe_ep__nccl_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT,
                                   "moe_ep_nccl_forward_args.x and .y must not be NULL when tokens > 0");
    else if (a->routing_in && a->tokens > 0 && (!a->topk_idx || !a->topk_weight))
        status = moe_ep__nccl_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT,
                                   "moe_ep_nccl_forward_args.routing_in needs topk_idx and topk_weight");
    else if (!a->routing_in && !L->router)
        status = moe_ep__nccl_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT,
                                   "moe_ep_nccl_layer_desc.router_weight is NULL: set it, or hand in routing (routing_in)");
    if (status == MOE_EP_OK) {
        tokens = a->tokens;
        if (a->topk_idx && a->topk_weight) {
            idx = a->topk_idx;
            weight = a->topk_weight;
        } else if (tokens * L->k > L->routing_capacity) {
            const moe_ep_allocator* al = &L->desc.base.allocator;
            moe_ep__nccl_free(al, L->routing_idx);
            moe_ep__nccl_free(al, L->routing_weight);
            L->routing_idx = (int32_t*)moe_ep__nccl_alloc(al, sizeof(int32_t) * (size_t)(tokens * L->k));
            L->routing_weight = (float*)moe_ep__nccl_alloc(al, sizeof(float) * (size_t)(tokens * L->k));
            L->routing_capacity = L->routing_idx && L->routing_weight ? tokens * L->k : 0;
            if (!L->routing_capacity)
                status = moe_ep__nccl_fail(L, MOE_EP_ERROR_OUT_OF_MEMORY, "moe_ep_nccl_forward: out of memory");
        }
        if (!idx) {
            idx = L->routing_idx;
            weight = L->routing_weight;
        }
    }
    if (status == MOE_EP_OK && !a->routing_in) status = moe_ep_nccl_route(L, a->x, tokens, idx, weight);
    res = moe_ep__nccl_plan_build(L, tokens, idx, weight, status, 1, &P);
    if (res != MOE_EP_OK) return res;
    res = moe_ep_nccl_dispatch(L, P, a->x, L->recv);
    if (res == MOE_EP_OK) {
        /* an expert_fn failure is agreed inside the combine; a launch failure of the built-in
           experts is this rank's alone, reported after the peers got their rows */
        status = moe_ep_nccl_experts(L, P, L->recv, L->out);
        res = moe_ep_nccl_combine(L, P, L->out, a->y);
        if (res == MOE_EP_OK && status != MOE_EP_OK && !L->desc.expert_fn) res = status;
    }
    moe_ep_nccl_plan_destroy(P);
    return res;
}
#endif /* MOE_EP_NCCL_NO_LAYER */

#endif /* MOE_EP_NCCL_IMPL_INCLUDED */
#endif /* MOE_EP_NCCL_IMPLEMENTATION */
