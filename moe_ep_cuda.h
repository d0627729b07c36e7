/* moe_ep_cuda.h -- the GPU MoE layer of moe_ep: rows, experts and combine in device memory -- MIT or public domain

   The MoE layer on the GPU (moe_ep_cuda_layer): token rows, the permutation, the expert
   FFNs (cuBLAS, or your callback) and the weighted combine stay in device memory; only
   routing metadata -- top-k ids and weights, counts, the plan's layout -- crosses to the
   host. fp32 or bf16 rows; fp32 accumulation everywhere. It plans with the core
   (moe_ep.h) and moves rows through any transport that moves device memory -- the NCCL
   transport (transports/moe_ep_nccl.h) or your own -- through the public moe_ep_transport
   callbacks only; on one host it can skip the transport (DIRECT NVLINK PATH).

   DO THIS
   =======
   In exactly one C file:

       #define MOE_EP_IMPLEMENTATION
       #include "moe_ep_cuda.h"                 (builds the core and the layer)
       #include "transports/moe_ep_nccl.h"      (and the transport, if you use it)

   and in exactly one CUDA file (nvcc -arch=sm_90 ...):

       #define MOE_EP_CUDA_KERNELS_IMPLEMENTATION
       #include "moe_ep_cuda_kernels.cuh"

   (A file compiled by nvcc with MOE_EP_IMPLEMENTATION gets the kernels by itself.)
   MOE_EP_CUDA_IMPLEMENTATION builds the layer alone. Strict C99 users compile with
   -isystem /usr/local/cuda/include. Link with -lnccl -lcublas -lcudart -lstdc++ (the
   last one for the nvcc object; -lnccl only with the NCCL transport).

   TRANSPORTS
   ==========
   The layer needs from desc.transport: exchange_counts (counts, agreements, the direct
   path's cards), all_to_all_v with memory_space MOE_EP_MEMORY_DEVICE and stream =
   desc.stream (rows; the begin/end form when the transport has it), barrier (optional:
   destroy on the direct path) and abort (optional: called after a device-side timeout).
   With tp_transport, its all_to_all_v moves the partial sums. transports/moe_ep_nccl.h
   is such a transport; so is your own if it moves device memory.

   CONFIGURATION MACROS
   ====================
   MOE_EP_IMPLEMENTATION               (undefined)   build the core and the GPU layer in this file
   MOE_EP_CUDA_IMPLEMENTATION          (undefined)   build the GPU layer only (the core built elsewhere)
   MOE_EP_CUDA_KERNELS_IMPLEMENTATION  (undefined)   build the kernels (moe_ep_cuda_kernels.cuh), in
                                                     one nvcc-compiled file; implied there by the above
   The core's macros (MOE_EP_STATIC, MOE_EP_API, ...) apply as documented in moe_ep.h.

   STEP BY STEP
   ============
   1. A transport per GPU (moe_ep_nccl.h: STEP BY STEP), the GPU made current.
   2. moe_ep_cuda_layer_create(&(moe_ep_cuda_layer_desc){
          .d_model = 2048, .d_ff = 1408, .num_experts = 64, .top_k = 2, .transport = &t,
          .stream = s, .dtype = MOE_EP_CUDA_DTYPE_BF16, .router_weight = gate,
          .experts = mine }, &layer);                                 collective
   3. moe_ep_cuda_forward(layer, &(moe_ep_cuda_forward_args){ .tokens = T, .x = x, .y = y });
      collective; x and y are device pointers. Or the stages: moe_ep_cuda_route,
      moe_ep_cuda_plan_create, moe_ep_cuda_dispatch, moe_ep_cuda_experts,
      moe_ep_cuda_combine, moe_ep_cuda_plan_destroy (with begin/end forms of dispatch
      and combine, so that your own work can overlap the exchange).
   4. moe_ep_cuda_layer_destroy(layer); then the transport.

   THE GPU LAYER
   =============
   - Router: logits = x . router_weight^T on cuBLAS (fp32 output), then one kernel does
     what the core's router does: the scores (softmax, sigmoid, or the logits for the TOPK_
     scorings, with router_bias), the choice (with selection_bias, within the best
     topk_groups of num_groups groups), top-k with ties to the lower expert, the weights
     from the unbiased scores, normalize_topk, routed_scaling_factor; then the ids and
     weights are copied to the host for the core's plan (unless the GPU plans). No router
     statistics.
   - Plan: the core's moe_ep_plan_create over the transport (count exchange), then the
     slot map (where each (token, k-slot) row goes) and the weights are uploaded; or, with
     max_tokens on one rank, three kernels on the device (PLANNING ON THE GPU).
   - Dispatch: with scale_expert_input a kernel first writes one row per (token, k-slot),
     weight times x, which then travel as the token rows do (the combine adds the outputs
     unweighted). A permute kernel gathers token rows into send order; rows whose expert is
     on this rank go straight to their place and never touch the transport, and are
     gathered while the others are on the wire. a2a_layout STAGED (the default) sends
     one message per peer and regroups received rows by local expert in a kernel;
     SEGMENTED sends one message per (peer, local expert) straight into place.
   - Experts, bf16 on a Hopper GPU (compute capability 9.0): two launches of one persistent
     grouped GEMM over all local experts (moe_ep_cuda_gemm.cuh: wgmma, tensor copies, the
     tile list made on the device from the plan's offsets); the first computes gate and up
     together and writes act(gate + b1, up + b3) in bf16 (the activation on the fp32
     sums), the second the down projection.
   - Experts, otherwise: two cuBLAS GEMMs per local expert (w1 and w3 fused into one), all experts
     of a projection in one cublasGemmGroupedBatchedEx when experts are small, else one
     cublasGemmEx each on the layer stream, and an activation kernel that adds the gate and
     up biases first (SwiGLU, GELU, ReLU, clamped SwiGLU); a kernel adds the down bias.
     fp32 uses plain fp32 GEMMs (TF32 off); bf16 uses bf16 GEMMs with fp32 accumulation
     (the up products are rounded to bf16 before the bias and the activation). Expert
     weights are copied once at create, in any moe_ep_weight_layout (a strided copy on the
     device puts them in the nn.Linear layout, w1 and w3 fused). Or expert_fn, per local
     expert, on the layer's stream.
   - Shared experts (desc.shared): the same FFN kernels on this rank's tokens, queued
     between the dispatch's start and end; after the combine one kernel adds g_t * their
     output to y (g_t = sigmoid of the gate's logit, fp32).
   - Combine: the reverse exchange, then one kernel sums a token's k slots in k-slot
     order in fp32 with the routing weights (dropped slots add nothing).
   Results match the core's CPU path to rounding (fp32: about 1e-6 relative; bf16:
   about 4e-3). They repeat bitwise from run to run with the same world size, but are
   not bitwise identical to the CPU path, nor across world sizes (cuBLAS may reduce
   differently for another number of rows).

   PLANNING ON THE GPU
   ===================
   With max_tokens > 0 on an EP group of one rank (no TP group, num_experts <= 1024), the
   forward plans on the GPU (desc.planning DEFAULT; GPU insists, HOST keeps the core's
   plan): the routing stays in device memory and three kernels compute what the core's
   moe_ep_plan_create does -- each assignment's rank among its expert's assignments in slot
   order (the capacity rule: the first `capacity` are kept), the counts per expert and per
   (rank, local expert) segment, their offsets, the receive offsets per local expert, the
   slot map and the combine weights -- so every row lands where the host plan puts it and
   the output is bitwise the host-planned layer's (check_cuda asserts both). No download of
   the routing, no host plan, no upload. The host still needs numbers where the GEMMs take
   host sizes or are chosen per call: the default and the named GEMM paths (the Hopper
   kernel, grouped, the loop) and expert_fn wait for a download of the local experts' row
   counts (a few hundred bytes) after the plan kernels, while the permute runs;
   expert_gemm = CHUNKED needs none (CUDA GRAPHS). With topk_idx and
   topk_weight set (and routing_in false) the forward also brings the routing back, and
   waits for it at the end. Hand-in routing (routing_in) is checked on the host and copied
   up through a pinned buffer.
   Where it does not apply the forward plans on the host as before: several ranks (their
   row exchange needs the counts on the host; a device-memory count exchange and the
   direct path's tables from the device are not built yet), a TP group, no max_tokens. The
   stage calls (moe_ep_cuda_plan_create, whose info is host data) always plan on the host.

   CUDA GRAPHS
   ===========
   A layer created with max_tokens > 0, expert_gemm = MOE_EP_CUDA_EXPERT_GEMM_CHUNKED (or
   MOE_EP_CUDA_EXPERT_GEMM_HOPPER: bf16 on compute capability 9.0) and a router
   (router_weight), on an EP group of one rank, runs its forward without any host
   synchronisation, allocation or read of device data: it can be captured once and
   replayed. CHUNKED lays out each local expert's received rows from a multiple of 128 rows
   (256 where experts average more than 512 rows) and runs one cublasGemmBatchedEx per
   projection over a fixed number of chunks (enough for max_tokens), each chunk's weights
   picked by the plan kernels; chunks past the last expert's rows compute rows nobody reads.
   Its results agree with the other GEMM paths within rounding (not bitwise: other cuBLAS
   kernels), and a replay gives the plain forward's bits. cuBLAS works in a workspace the
   layer allocates at create (32 MiB, with max_tokens).

       moe_ep_cuda_forward(layer, &args);              warm-up, outside the capture: cuBLAS
                                                       and the kernels load here
       cudaStreamBeginCapture(desc.stream, cudaStreamCaptureModeThreadLocal);
       moe_ep_cuda_forward(layer, &(moe_ep_cuda_forward_args){ .tokens = T, .x = x, .y = y });
       cudaStreamEndCapture(desc.stream, &graph);
       cudaGraphInstantiate(&exec, graph, 0);
       ... write the next tokens into x (same device buffer), then
       cudaGraphLaunch(exec, desc.stream);             y is written when the stream gets there

   The captured call fixes T, x and y (the buffers, not their contents); T <= max_tokens.
   Leave topk_idx / topk_weight NULL and routing_in false (both would touch host memory).
   Shared experts, biases, input scaling and capacity are captured with the rest. The
   layer's buffers are the graph's: replay it on desc.stream (or order it after the layer's
   other work), one replay or forward at a time, and keep the layer alive while the graph
   exists. Without CHUNKED or HOPPER, or with several ranks, a capture fails (the forward
   waits for sizes on the host; cudaStreamEndCapture reports the broken capture). HOPPER
   needs no chunks: the kernel (moe_ep_cuda_gemm.cuh) makes its tile list on the device from
   the plan's offsets and runs over the receive buffer as the plan filled it.

   DIRECT NVLINK PATH
   ==================
   On one host whose GPUs reach each other's memory (NVLink or PCIe peer access), the
   layer moves rows with stores and loads straight into the peers' memory, as DeepEP's
   intranode kernels do, instead of transport messages. desc.direct: DEFAULT (auto)
   takes it when max_tokens > 0 and every rank can map every other rank's memory, OFF
   never, ON or layer_create fails; moe_ep_cuda_layer_direct() says which path it took.
   - At create (collective): each rank allocates one region, max_tokens worth of
     received rows and of expert outputs (moe_ep_cuda_layer_rows), offers it to the
     others in an agreement (exchange_counts), and maps theirs: the pointer itself with
     peer access when the peer is a thread of this process, cudaIpcOpenMemHandle when it
     is another process of this host. With auto a rank that cannot map a peer turns the
     path off everywhere.
   - Plan: the core's plan as before, then each rank publishes its receive offsets in
     its region and reads its peers'.
   - Dispatch: one kernel stores each token row at each k-slot's place in the owner's
     region; dispatch_end waits until every rank has stored its rows. Combine: each rank
     reads its tokens' expert outputs from the owners' regions and sums them in k-slot
     order, in fp32: bitwise the outputs of the transport path.
   - Ordering: per-rank flags in the regions, release stores and acquire loads at system
     scope. A wait that runs past desc.timeout_ms gives MOE_EP_ERROR_TIMEOUT at the next
     call, calls transport.abort (if set) and the layer refuses further work (timeout 0:
     it waits for ever). transport.abort does not reach a kernel that waits;
     moe_ep_cuda_layer_abort does (this rank's waits end; the peers' time out).
   - The layer has one set of these buffers: a plan dispatched on this path must be
     combined (or destroyed) before the next dispatch. Stage calls with your own
     recv_rows / expert_out work, at the cost of a copy each; pass the layer's
     (moe_ep_cuda_layer_rows) to save it.
   - moe_ep_cuda_layer_destroy is then collective: call it on every rank.

   LOW-LATENCY DECODE
   ==================
   desc.mode = MOE_EP_CUDA_MODE_LOW_LATENCY is for decoding, steps of 1 to a few hundred
   tokens per rank, where the layer's time is latency: as DeepEP's low-latency kernels, it
   exchanges no counts, sizes nothing on the host and moves rows with one kernel each way,
   so the whole forward can be captured in a CUDA graph also with several ranks.
   - Needs max_tokens > 0 (per rank and call), the built-in experts (no expert_fn), no TP
     group, num_experts <= 1024, planning not HOST, expert_gemm DEFAULT (the Hopper kernel
     where it runs: bf16 on compute capability 9.0, else CHUNKED), HOPPER or CHUNKED, and
     with several ranks every rank able to map every other rank's memory, as the direct
     path maps it (one host; threads of one process may share a GPU). There is no
     transport fallback yet: where the peers cannot map each other, create fails with
     MOE_EP_ERROR_UNSUPPORTED on every rank. Only moe_ep_cuda_forward runs (with
     moe_ep_cuda_route and moe_ep_cuda_shared_experts); moe_ep_cuda_plan_create, and so
     every stage call, fails with MOE_EP_ERROR_UNSUPPORTED.
   - Buffers (create, collective): each rank's region holds its landing rows
     [experts per rank, world * max_tokens, d_model] (source q's i-th row for local expert
     s at row (s * world + q) * max_tokens + i: a known place, no count needed first), the
     counts [experts per rank][world] its sources write, arrival flags, a table of where
     each source's rows start among the received rows, and the expert outputs.
   - The forward: the router and the plan kernels' send half (each assignment's rank among
     its expert's, capacity) on the GPU; dispatch, one kernel: every row stored at its
     landing row in its owner's region, then this rank's counts and its arrival flag to
     every rank; every block then waits for every rank's flag and moves the landed rows
     into the received rows grouped by local expert, source rank and token, as the normal
     path lays them out (CHUNKED: each expert from a multiple of the chunk). The experts
     (shared experts too) as with the plan on the GPU; combine, one kernel: this rank's
     "outputs ready" flag to every rank, wait for every rank's, then each token's k slots
     read from the owners' regions and summed in k-slot order in fp32. So the output is
     bitwise the normal layer's with the same expert_gemm on the same inputs (asserted at
     world size 1; with several ranks the normal layer runs other GEMMs: within rounding).
   - The epoch of a step lives on the device (a counter the combine advances), so replays
     of a captured forward count on; one forward or replay at a time, on desc.stream. Every
     rank must call every step, with 0 tokens too: the others wait for its flags.
   - Errors: a wait that runs past desc.timeout_ms gives up, and tells every rank to give
     up (a stop word in each region): every rank's next call, or moe_ep_cuda_layer_check
     after the stream, fails with MOE_EP_ERROR_TIMEOUT, a rank that arrives late included,
     and the layer refuses further work (timeout 0: no limit). moe_ep_cuda_layer_abort on
     any rank ends every rank's waits the same way (MOE_EP_ERROR_ABORTED); so does a rank
     whose call fails before its kernels (bad arguments), which would otherwise leave the
     others waiting. The output of a step that gave up is undefined.
   - Costs: the landed rows are copied once more into place (DeepEP's receive side copies
     too); the landing buffers are sized for the worst case. The dispatch and combine
     kernels spin in their waits on a grid of one block per SM (a quarter of the SMs,
     shared out, when ranks share a GPU): do not run the Hopper kernel (HOPPER, or DEFAULT
     in bf16) with several ranks on one GPU, whose persistent grid needs SMs that the
     other ranks' waits hold. Ranks that share a GPU (threads of one process, a test
     setup) must give the layer non-blocking streams (cudaStreamNonBlocking) and keep
     device-wide synchronisation (the legacy default stream: cudaMemcpy, cudaMemset;
     cudaFree) out of their steps: it waits for the other ranks' kernels, which wait for
     this rank's next step, until the timeout. For the same reason they need eager module
     loading (CUDA_MODULE_LOADING=EAGER in the environment before the first CUDA call):
     with lazy loading, CUDA's default, the first launch of a kernel (the router's, a
     cuBLAS GEMM's) loads it, and that waits for the kernels running in the context.

   moe_ep_cuda DOES NOT
   ====================
   - create streams, communicators or transports, or pick the GPU (it uses the current
     one at create, and makes it current again in every call);
   - compute router statistics.

   THREADING, STREAMS AND COLLECTIVE SEMANTICS
   ===========================================
   One layer per rank (per GPU), used by one thread at a time. Calls marked "Collective:
   yes" must be made by every rank of the EP group in the same order, with the same GPU
   parameters (create checks them: dtype, a2a_layout, direct, max_tokens, expert_fn and
   router_weight set or not, the TP size, mode) and the same shape (the core's fingerprint).
   Every device operation is queued on desc.stream (0 = the legacy default stream), so it
   is ordered after your earlier work there and before your later work; give the
   transport the same stream. Calls that need numbers on the host wait for them: plan
   creation and the layer's create and agreement steps (they exchange counts), and
   moe_ep_cuda_route (its wait gives up after desc.timeout_ms, if set, as the direct
   path's do); a forward planned on the GPU waits only for the GEMM sizes (not with
   CHUNKED) and the routing it was asked to bring back. The layer's dispatch, experts and combine only queue work; y is ready
   when the stream gets there.

   TENSOR PARALLELISM (EP x TP x DP)
   =================================
   With tp_transport (a TP group from moe_ep_layout_split), TP rank t of T holds the d_ff
   rows [t*F/T, (t+1)*F/T) of w1 and w3 and those columns of w2 (copied from the full
   weights at create); each TP rank computes its slice's partial expert outputs (fp32: in
   place; bf16: fp32 partial sums, GEMM loop only), the partials travel to every TP rank
   (all_to_all_v) and a kernel adds them in TP-rank order before the combine, so every
   rank of a TP group ends with the same y, bitwise. The ranks of a TP group must hand in
   the same tokens and routing: plan creation checks it and fails on every rank
   otherwise. expert_fn cannot be combined with tp_transport. moe_ep_cuda_experts is
   then collective over the TP group.

   ERRORS AND LOGGING
   ==================
   Every fallible call returns a moe_ep_result; moe_ep_cuda_layer_last_error(layer) keeps
   the cause in words (with the transport's own text). desc.logger gets it too (tag
   "moe_ep_cuda"; the core context logs as "moe_ep"); create's failures, when no layer
   exists, go to the logger only. Validation failures and out-of-memory give the same
   verdict on every rank (through the core's moe_ep_agree, over the EP group and then the
   TP group). A failing expert_fn is agreed before the combine. The transport's own
   failures (timeouts, aborts) come back as its error. Waits on the device (the direct
   path's, the low-latency mode's) end at desc.timeout_ms or moe_ep_cuda_layer_abort and
   show at the next call or in moe_ep_cuda_layer_check.

   MEMORY
   ======
   Host allocations use desc.allocator (the layer keeps up to 32 blocks that its plans
   freed, for the next plan); device memory is cudaMalloc'ed, pinned host memory
   cudaMallocHost'ed. With max_tokens > 0, every buffer is sized at create for that many
   tokens per rank and a forward allocates nothing (the GPU plan's buffers and cuBLAS's
   32 MiB workspace included; CHUNKED sizes the expert-side rows for its padding);
   otherwise the buffers grow (by half again) when a call needs more, and stay. The direct path adds its region: 2 x
   max_tokens x min(top_k, most experts per rank) x world x d_model elements. The
   low-latency mode's region: max_tokens x world x (most experts per rank + min(top_k,
   most experts per rank)) x d_model elements (plus CHUNKED's padding).

   LICENSE
   =======
   See the end of moe_ep.h.
*/
#ifndef MOE_EP_CUDA_H_INCLUDED
#define MOE_EP_CUDA_H_INCLUDED

#include "moe_ep.h"
#include <cuda_runtime_api.h>   /* cudaStream_t */

#ifdef __cplusplus
extern "C" {
#endif

/* >>gpu layer */
typedef enum moe_ep_cuda_dtype {
    MOE_EP_CUDA_DTYPE_DEFAULT = 0,  /* fp32 */
    MOE_EP_CUDA_DTYPE_F32,
    MOE_EP_CUDA_DTYPE_BF16,
    MOE_EP_CUDA_DTYPE_COUNT,
    MOE_EP_CUDA_DTYPE_FORCE_U32 = 0x7FFFFFFF
} moe_ep_cuda_dtype;

typedef enum moe_ep_cuda_expert_gemm {
    MOE_EP_CUDA_EXPERT_GEMM_DEFAULT = 0,  /* per call: bf16 on Hopper, HOPPER while the experts average at
                                             most 448 rows; else grouped for small experts, loop for large */
    MOE_EP_CUDA_EXPERT_GEMM_GROUPED,      /* one cublasGemmGroupedBatchedEx per projection for all experts */
    MOE_EP_CUDA_EXPERT_GEMM_LOOP,         /* one cublasGemmEx per expert and projection */
    MOE_EP_CUDA_EXPERT_GEMM_HOPPER,       /* moe_ep_cuda_gemm.cuh's grouped kernel (bf16, compute capability
                                             9.0, d_model and d_ff multiples of 8): gate+up with the bias and
                                             activation in its epilogue, then down; create fails with
                                             MOE_EP_ERROR_UNSUPPORTED where it cannot run */
    MOE_EP_CUDA_EXPERT_GEMM_CHUNKED,      /* the forward: one cublasGemmBatchedEx per projection over chunks of
                                             128 (or 256) rows of one expert each, shapes fixed at create; the
                                             host reads no sizes, so the layer can be captured in a CUDA graph
                                             (CUDA GRAPHS). Needs GPU planning. Stage calls: as DEFAULT */
    MOE_EP_CUDA_EXPERT_GEMM_COUNT,
    MOE_EP_CUDA_EXPERT_GEMM_FORCE_U32 = 0x7FFFFFFF
} moe_ep_cuda_expert_gemm;

typedef enum moe_ep_cuda_a2a_layout {
    MOE_EP_CUDA_A2A_DEFAULT = 0,    /* staged */
    MOE_EP_CUDA_A2A_STAGED,         /* one message per peer; received rows regrouped by a kernel */
    MOE_EP_CUDA_A2A_SEGMENTED,      /* one message per (peer, local expert), straight into place */
    MOE_EP_CUDA_A2A_COUNT,
    MOE_EP_CUDA_A2A_FORCE_U32 = 0x7FFFFFFF
} moe_ep_cuda_a2a_layout;

typedef enum moe_ep_cuda_planning {
    MOE_EP_CUDA_PLANNING_DEFAULT = 0,   /* the forward plans on the GPU where it can (PLANNING ON THE GPU),
                                           else on the host */
    MOE_EP_CUDA_PLANNING_HOST,          /* the core's plan on the host, uploaded: the routing is downloaded first */
    MOE_EP_CUDA_PLANNING_GPU,           /* on the GPU, or moe_ep_cuda_layer_create fails */
    MOE_EP_CUDA_PLANNING_COUNT,
    MOE_EP_CUDA_PLANNING_FORCE_U32 = 0x7FFFFFFF
} moe_ep_cuda_planning;

typedef enum moe_ep_cuda_mode {
    MOE_EP_CUDA_MODE_DEFAULT = 0,       /* normal */
    MOE_EP_CUDA_MODE_NORMAL,            /* counts exchanged on the host, buffers of the exact size, any stage call */
    MOE_EP_CUDA_MODE_LOW_LATENCY,       /* decoding: fixed landing buffers, no count exchange, one kernel each
                                           way, no host synchronisation; the forward only (LOW-LATENCY DECODE) */
    MOE_EP_CUDA_MODE_COUNT,
    MOE_EP_CUDA_MODE_FORCE_U32 = 0x7FFFFFFF
} moe_ep_cuda_mode;

typedef enum moe_ep_cuda_direct {
    MOE_EP_CUDA_DIRECT_DEFAULT = 0, /* auto: direct when max_tokens > 0 and every rank can map the
                                       memory of every other (one host, peer access or CUDA IPC) */
    MOE_EP_CUDA_DIRECT_OFF,         /* rows always travel through the transport */
    MOE_EP_CUDA_DIRECT_ON,          /* direct, or moe_ep_cuda_layer_create fails (needs max_tokens > 0) */
    MOE_EP_CUDA_DIRECT_COUNT,
    MOE_EP_CUDA_DIRECT_FORCE_U32 = 0x7FFFFFFF
} moe_ep_cuda_direct;

/* One expert, in the layer's dtype, in device or host memory (copied at create), laid
   out as desc.weight_layout says (moe_ep_weight_layout; the default is nn.Linear's,
   row-major: w1 (gate), w3 (up) [d_ff, d_model]; w2 (down) [d_model, d_ff]). w3 and b3
   are used by the gated activations only. The biases are optional (NULL: none): b1, b3
   [d_ff] (b1 [2*d_ff] in the fused layouts) are added to the up products before the
   activation, b2 [d_model] to the output. With a TP group these are still the full
   weights; only this rank's slice is copied. Zero the struct before you fill it. */
typedef struct moe_ep_cuda_expert_weights {
    const void* w1;
    const void* w3;
    const void* w2;
    const void* b1;
    const void* b3;
    const void* b2;
} moe_ep_cuda_expert_weights;

/* Always-on experts that every rank holds and runs on its own tokens, as moe_ep_shared_desc:
   y[t] = routed[t] + g_t * shared(x[t]), g_t = sigmoid(gate . x[t]) with a gate, else 1.
   Weights in the layer's dtype, nn.Linear layout (w1, w3 [d_ff, d_model], w2 [d_model,
   d_ff], optional biases), gate [d_model]; device or host memory, copied at create. The
   FFN is the routed experts' activation. With a TP group every rank computes it whole. */
typedef struct moe_ep_cuda_shared_desc {
    int d_ff;                       /* default 0: no shared experts */
    moe_ep_cuda_expert_weights weights;
    const void* gate;               /* [d_model] or NULL */
} moe_ep_cuda_shared_desc;

/* Your expert compute. rows, out: device [row_count, d_model] in the layer's dtype, for
   local expert `local_expert` (global id `expert`). Queue the work on `stream` (or
   finish it before returning). Return 0 on success. */
typedef int (*moe_ep_cuda_expert_fn)(int local_expert, int expert, const void* rows, int64_t row_count,
                                     int d_model, void* out, cudaStream_t stream, void* user_data);

typedef struct moe_ep_cuda_layer_desc {
    /* the layer's shape, as in moe_ep_desc (the core resolves its defaults) */
    int d_model;                    /* required, > 0 */
    int d_ff;                       /* required, > 0 (unless expert_fn is set) */
    int num_experts;                /* required, > 0 */
    int top_k;                      /* default 1 */
    moe_ep_activation activation;   /* default SwiGLU */
    float swiglu_alpha, swiglu_limit;   /* default 0 = 1.702 and 7: the clamped SwiGLU's (as moe_ep_desc) */
    moe_ep_weight_layout weight_layout; /* default nn.Linear: how experts[] are laid out (moe_ep_weight_layout) */
    moe_ep_scoring scoring;         /* default softmax */
    bool normalize_topk;            /* default false */
    float routed_scaling_factor;    /* default 0 = 1 */
    const float* router_bias;       /* [num_experts] fp32 host memory, or NULL; copied */
    const float* selection_bias;    /* [num_experts] fp32 host memory, or NULL; copied */
    int num_groups, topk_groups;    /* default 0 = 1 group, all kept (the router as in moe_ep_desc) */
    bool scale_expert_input;        /* default false; true: a token's weight scales the expert's input
                                       and the outputs add unweighted (Llama-4), as in moe_ep_desc */
    float capacity_factor;          /* default 0 = dropless */
    moe_ep_placement placement;     /* default contiguous */
    const moe_ep_transport* transport;      /* required: the EP group; must move device memory
                                       (all_to_all_v with MOE_EP_MEMORY_DEVICE), e.g. an NCCL transport */
    const moe_ep_transport* tp_transport;   /* default NULL; else the TP group on the same GPU (GROUPS
                                       in moe_ep_nccl.h): exchange_counts and device all_to_all_v */
    moe_ep_allocator allocator;     /* default malloc/free */
    moe_ep_logger logger;           /* default none */
    /* the GPU */
    cudaStream_t stream;            /* default 0: the legacy default stream. Every device operation is
                                       queued here; give the transport the same stream */
    moe_ep_cuda_dtype dtype;        /* default fp32 */
    moe_ep_cuda_a2a_layout a2a_layout;  /* default staged; not used by the direct path */
    moe_ep_cuda_direct direct;      /* default auto: see DIRECT NVLINK PATH */
    int64_t max_tokens;             /* default 0: buffers grow on demand; else tokens per rank per call
                                       that every buffer is sized for at create */
    moe_ep_cuda_expert_gemm expert_gemm;  /* default, per call: the Hopper kernel for bf16 where it runs
                                       and the experts average at most 448 rows; else grouped when they
                                       average at most 384 rows, else the loop (cuBLAS's grouped kernels
                                       are slower on larger GEMMs); results agree within rounding */
    moe_ep_cuda_planning planning;  /* default: the forward plans on the GPU when it can (PLANNING ON THE GPU) */
    moe_ep_cuda_mode mode;          /* default normal; LOW_LATENCY: see LOW-LATENCY DECODE */
    int timeout_ms;                 /* default 0: the layer's own waits (the router's download, the
                                       direct path's device-side waits) have no time limit */
    const void* router_weight;      /* [num_experts, d_model] in dtype, device or host memory (copied);
                                       NULL: every call hands in its routing */
    const moe_ep_cuda_expert_weights* experts;  /* [local expert count]; required unless expert_fn */
    moe_ep_cuda_expert_fn expert_fn;
    void* expert_user_data;
    moe_ep_cuda_shared_desc shared; /* default none: shared experts (built in, also with expert_fn) */
} moe_ep_cuda_layer_desc;

typedef struct moe_ep_cuda_layer moe_ep_cuda_layer;
typedef struct moe_ep_cuda_plan moe_ep_cuda_plan;

/* One layer call. x, y: device [tokens, d_model] in dtype (y written in full).
   topk_idx / topk_weight: host [tokens, top_k]; with routing_in they are the caller's
   routing, otherwise, if non-NULL, the GPU router's choice is written there. */
typedef struct moe_ep_cuda_forward_args {
    int64_t tokens;
    const void* x;
    void* y;
    bool routing_in;
    int32_t* topk_idx;
    float* topk_weight;
} moe_ep_cuda_forward_args;

/* Collective: yes. out untouched on failure (the cause goes to the logger). */
MOE_EP_API moe_ep_result moe_ep_cuda_layer_create(const moe_ep_cuda_layer_desc* desc, moe_ep_cuda_layer** out);
/* Collective: only on the direct path (it waits until no peer can still touch this
   rank's memory). */
MOE_EP_API void moe_ep_cuda_layer_destroy(moe_ep_cuda_layer* layer);
/* The core context (placement queries, moe_ep_query). */
MOE_EP_API moe_ep_context* moe_ep_cuda_layer_context(moe_ep_cuda_layer* layer);
MOE_EP_API const char* moe_ep_cuda_layer_last_error(const moe_ep_cuda_layer* layer);
MOE_EP_API cudaStream_t moe_ep_cuda_layer_stream(const moe_ep_cuda_layer* layer);
/* 1 when the layer moves rows by direct stores into the peers' memory (DIRECT NVLINK PATH). */
MOE_EP_API int moe_ep_cuda_layer_direct(const moe_ep_cuda_layer* layer);
/* Ends this rank's device-side waits (the low-latency mode's and the direct path's) now:
   any thread may call it, also while the layer's own thread waits in a call or the GPU
   runs a graph. Waiting kernels give up, the low-latency mode tells every peer to give up
   too, and the layer's next call (or moe_ep_cuda_layer_check) fails with
   MOE_EP_ERROR_ABORTED on this rank. */
MOE_EP_API void moe_ep_cuda_layer_abort(moe_ep_cuda_layer* layer);
/* OK, or the error a device-side wait left (MOE_EP_ERROR_TIMEOUT: a wait here or on a peer ran
   past timeout_ms; MOE_EP_ERROR_ABORTED: moe_ep_cuda_layer_abort here or on a peer, or a peer
   that failed its call). Does not wait: synchronise the stream first to learn about the work
   queued so far (a replayed graph, say). After an error the layer refuses every call. */
MOE_EP_API moe_ep_result moe_ep_cuda_layer_check(moe_ep_cuda_layer* layer);
/* The layer's own expert-side buffers, device [rows, d_model] each, rows = max_tokens *
   min(top_k, the most experts a rank holds) * world size: the ones moe_ep_cuda_forward uses. On the
   direct path dispatch lands rows in *recv and combine reads the expert outputs from
   *out; handing these to dispatch / experts / combine saves a copy each way. NULL
   (and rows 0) without max_tokens. */
MOE_EP_API void moe_ep_cuda_layer_rows(moe_ep_cuda_layer* layer, void** recv, void** out, int64_t* rows);

/* Route on the GPU. x: device [tokens, d_model]; topk_idx, topk_weight: host out
   [tokens, top_k]. Waits for the result. Collective: no. */
MOE_EP_API moe_ep_result moe_ep_cuda_route(moe_ep_cuda_layer* layer, const void* x, int64_t tokens,
                                           int32_t* topk_idx, float* topk_weight);
/* The core's plan plus its device copy. Collective: yes. */
MOE_EP_API moe_ep_result moe_ep_cuda_plan_create(moe_ep_cuda_layer* layer, int64_t tokens, const int32_t* topk_idx,
                                                 const float* topk_weight, moe_ep_cuda_plan** out);
MOE_EP_API void moe_ep_cuda_plan_destroy(moe_ep_cuda_plan* plan);
/* Host view of the layout (counts, offsets, slot rows): see moe_ep_plan_info. */
MOE_EP_API moe_ep_plan_info moe_ep_cuda_plan_query(const moe_ep_cuda_plan* plan);

/* x: device [tokens, d_model]; recv_rows: device [info.recv_rows, d_model], grouped by
   local expert (info.local_expert_offsets), then source rank, then token. Collective: yes.
   begin/end: recv_rows is complete (for later work on the stream) after end. */
MOE_EP_API moe_ep_result moe_ep_cuda_dispatch(moe_ep_cuda_layer* layer, moe_ep_cuda_plan* plan, const void* x,
                                              void* recv_rows);
MOE_EP_API moe_ep_result moe_ep_cuda_dispatch_begin(moe_ep_cuda_layer* layer, moe_ep_cuda_plan* plan, const void* x,
                                                    void* recv_rows);
MOE_EP_API moe_ep_result moe_ep_cuda_dispatch_end(moe_ep_cuda_layer* layer, moe_ep_cuda_plan* plan);
/* rows, out: device [info.recv_rows, d_model]. Collective: no (a failing expert_fn is
   agreed at the next combine); with a TP group, collective over it (the slices are summed). */
MOE_EP_API moe_ep_result moe_ep_cuda_experts(moe_ep_cuda_layer* layer, moe_ep_cuda_plan* plan, const void* rows,
                                             void* out);
/* expert_out: device [info.recv_rows, d_model]; y: device [tokens, d_model], written in
   full: y[t] = sum over k-slots of weight * expert output. expert_out must stay valid
   until end. Collective: yes. */
MOE_EP_API moe_ep_result moe_ep_cuda_combine(moe_ep_cuda_layer* layer, moe_ep_cuda_plan* plan, const void* expert_out,
                                             void* y);
MOE_EP_API moe_ep_result moe_ep_cuda_combine_begin(moe_ep_cuda_layer* layer, moe_ep_cuda_plan* plan,
                                                   const void* expert_out);
MOE_EP_API moe_ep_result moe_ep_cuda_combine_end(moe_ep_cuda_layer* layer, moe_ep_cuda_plan* plan, void* y);

/* The shared experts on this rank's tokens: out[t] = g_t * shared(x[t]), what forward adds
   to the routed sum (desc.shared). x, out: device [tokens, d_model]. Collective: no. */
MOE_EP_API moe_ep_result moe_ep_cuda_shared_experts(moe_ep_cuda_layer* layer, const void* x, int64_t tokens, void* out);

/* The whole layer: route (or take routing), plan, dispatch (the shared experts run while
   the rows travel), experts, combine, plus the shared experts. Collective: yes. */
MOE_EP_API moe_ep_result moe_ep_cuda_forward(moe_ep_cuda_layer* layer, const moe_ep_cuda_forward_args* args);
#ifdef __cplusplus
}
#endif
#endif /* MOE_EP_CUDA_H_INCLUDED */

#if defined(MOE_EP_IMPLEMENTATION) && !defined(MOE_EP_CUDA_IMPLEMENTATION)
#define MOE_EP_CUDA_IMPLEMENTATION
#endif

#ifdef MOE_EP_CUDA_IMPLEMENTATION
#ifndef MOE_EP_CUDA_IMPL_INCLUDED
#define MOE_EP_CUDA_IMPL_INCLUDED

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdarg.h>
#include <time.h>
#include <unistd.h>     /* getpid: the direct path tells processes apart */
#include <math.h>       /* ceil: the capacity, as the core computes it */
#include <cuda_runtime.h>
#include <cublas_v2.h>
#if defined(__CUDACC__) && !defined(MOE_EP_CUDA_KERNELS_IMPLEMENTATION)
#define MOE_EP_CUDA_KERNELS_IMPLEMENTATION
#endif
#include "moe_ep_cuda_kernels.cuh"

#ifndef MOE_EP_PRIVATE
#define MOE_EP_PRIVATE static
#endif

#define MOE_EP__CUDA_CACHE 32
#define MOE_EP__CUDA_HEADER 16   /* keeps the block size; 16 keeps malloc's alignment */
#define MOE_EP__CUDA_ERR 512

/* >>gpu layer: state */
typedef struct moe_ep__cuda_buffers {
    void* send;                     /* device [send rows, d]: send order; the combine lands here too */
    void* stage;                    /* device [remote receive rows, d]: staged layout */
    void* meta;                     /* device: slot map, weights, stage map */
    void* meta_host;                /* pinned mirror of meta */
    size_t send_bytes, stage_bytes, meta_bytes, meta_host_bytes;
    cudaEvent_t uploaded;           /* meta_host may be rewritten once the stream passed this */
    int full;                       /* sized at create for max_tokens */
} moe_ep__cuda_buffers;

struct moe_ep_cuda_plan {
    moe_ep_cuda_layer* layer;
    moe_ep_plan* core;
    moe_ep_plan_info info;
    moe_ep__cuda_buffers bufs;
    int32_t* slot_map;              /* device [tokens * k] */
    float* weight;                  /* device [tokens * k] */
    int32_t* stage_map;             /* device [remote_rows]: staging row -> receive row */
    int64_t remote_rows;
    int pending;                    /* 0 none, 1 dispatch open, 2 combine open */
    void* request;                  /* the transport's open split-phase exchange */
    moe_ep_a2a_args a2a;            /* its arguments, which must live until it ends */
    int64_t* a2a_rows;              /* [4 * world * segments]: its counts and offsets */
    void* open_rows;                /* dispatch: recv_rows */
    const void* open_local;         /* combine: expert_out */
    moe_ep_result expert_status;
    int64_t* dest;                  /* device [tokens * k], direct path: (rank << 32) | row of each slot */
    int64_t* first_row;             /* device [local experts + 1]: each local expert's first received row,
                                       then the received rows' end */
    float* scale;                   /* device [tokens * k], scale_expert_input: the routing weights */
    uint64_t xfer;                  /* direct: the transfer epoch of its dispatch, 0 once combined */
    int out_sent;                   /* direct: OUT(xfer) signalled */
};

/* The forward's plan on the GPU (PLANNING ON THE GPU): device buffers sized at create for
   max_tokens, reused by every forward (the stream orders one forward after the other). */
#define MOE_EP__CUDA_BLAS_WORKSPACE ((size_t)32 << 20)  /* cuBLAS's recommendation for Hopper */
typedef struct moe_ep__cuda_gpu_plan {
    void* block;                    /* device: everything below, in one allocation */
    moe_ep__cuda_k_plan k;          /* the plan kernels' arguments (their device arrays point into block) */
    void** chunk_ptrs;              /* device [6 * chunks]: A, B, C of the up, then of the down projections */
    int64_t* sizes_host;            /* pinned [2 * S + 4]: local counts, local offsets, totals (downloaded
                                       when the host needs them) */
    cudaEvent_t downloaded;         /* sizes_host holds this forward's numbers once the stream passed it */
    cudaEvent_t routing_free;       /* topk_host may be rewritten once the stream passed this */
    float capacity_factor;          /* the core's resolved one */
    moe_ep_cuda_plan view;          /* the plan moe_ep_cuda_experts takes, with the downloaded sizes */
} moe_ep__cuda_gpu_plan;

struct moe_ep_cuda_layer {
    moe_ep_cuda_layer_desc desc;    /* resolved; desc.transport and desc.tp_transport are NULL */
    moe_ep_transport transport;     /* the EP group */
    moe_ep_transport tp;            /* the TP group (desc.tp_transport), when tp_size > 1 */
    int device;                     /* current at create; made current again by every call */
    int broken;                     /* a direct-path wait timed out: every call fails */
    int tp_rank, tp_size, d_ff_full, ff_begin;  /* this rank holds d_ff rows [ff_begin, ff_begin + d_ff) */
    int partial_f32;                /* bf16 with TP: down projections write fp32 partial sums */
    void* partial; size_t partial_bytes;        /* device fp32 [rows, d] */
    float* tp_gather; size_t tp_gather_bytes;   /* device fp32 [tp_size, rows, d]: every TP rank's partials */
    int64_t* tp_rows;               /* host [4 * tp_size]: the gather's counts and offsets */
    moe_ep_context* core;
    cudaStream_t stream;
    cublasHandle_t blas;
    int grouped;                    /* 0 loop, 1 grouped, 2 grouped for small experts */
    int hopper;                     /* the experts run on moe_ep_cuda_gemm.cuh's kernel */
    int* group_ints;                /* host [9 * local_experts]: m, n, k, lda, ldb, ldc of a projection, group sizes */
    float* group_scalars;           /* host [2 * local_experts]: alpha, beta */
    cublasOperation_t* group_ops;   /* host [2 * local_experts]: transa, transb */
    void** ptrs_host;               /* pinned [6 * local_experts]: A, B, C of the up and the down projection */
    void** ptrs_dev;
    cudaEvent_t ptrs_uploaded;
    int rank, world_size, dtype, d_model, d_ff, num_experts, top_k, local_experts, segments, up_rows, activation;
    size_t elem, row_bytes;
    int* owner_of;                  /* [num_experts] */
    int* local_index_of;            /* [num_experts] */
    int* local_ids;                 /* [local_experts] global id of each one */
    void* router;                   /* device [num_experts, d_model] */
    float* router_biases;           /* device [2 * num_experts]: router_bias, then selection_bias */
    moe_ep__cuda_k_router router_cfg;   /* the router's resolved settings */
    void* w_up;                     /* device [local_experts, up_rows, d_model] */
    void* w_down;                   /* device [local_experts, d_model, d_ff] */
    void* b_up;                     /* device [local_experts, up_rows] or NULL: gate then up biases */
    void* b_down;                   /* device [local_experts, d_model] or NULL */
    moe_ep__cuda_k_act act;         /* the activation's settings (biases and rows per call) */
    /* the shared experts (desc.shared): one FFN of width sh_ff on this rank's tokens */
    int sh_ff, sh_up_rows;
    void *sh_up, *sh_down, *sh_b_up, *sh_b_down, *sh_gate;  /* device, as the routed experts' */
    void* sh_hidden; size_t sh_hidden_bytes;    /* device [tokens, sh_up_rows] */
    void* sh_out; size_t sh_out_bytes;          /* device [tokens, d]: forward's shared output */
    float* sh_logit; size_t sh_logit_bytes;     /* device [tokens]: the gate's logits */
    void* scaled; size_t scaled_bytes;          /* device [tokens * k, d]: scale_expert_input's rows */
    void* staging; size_t staging_bytes;        /* device: a weight as handed in, at create */
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
    moe_ep__cuda_k_direct direct_args;  /* what the direct kernels get */
    uint64_t plan_epoch, xfer_epoch;
    moe_ep_cuda_plan* open_plan;    /* dispatched directly and not combined yet */
    moe_ep__cuda_buffers spare;     /* plan buffers of the last destroyed plan */
    int has_spare;
    int gpu_plan;                   /* the forward plans on the GPU */
    int64_t chunks;                 /* CHUNKED: chunks per projection, chunk_rows rows each; else 0 */
    int chunk_rows;
    moe_ep__cuda_gpu_plan gp;
    void* blas_workspace;           /* device: cuBLAS's workspace, the layer's own (graph capture allocates nothing) */
    /* the low-latency mode: the region (and peers, control words) are the direct path's fields */
    int ll;                         /* desc.mode is LOW_LATENCY */
    int ll_mapped;                  /* every rank maps every region (agreed at create) */
    int out_in_region;              /* L->out lies in the region (not freed on its own) */
    moe_ep__cuda_k_ll ll_args;
    int64_t* ll_dest;               /* device [max_tokens * top_k]: each slot's owner and landing row */
    void* cache[MOE_EP__CUDA_CACHE];    /* host blocks the core context freed, for its next plan */
    int cached;
    char last_error[MOE_EP__CUDA_ERR];
};

/* The core context's allocator: a plan allocates the same dozen blocks every layer call,
   some of them large; keeping freed blocks spares the page faults and mmap/munmap churn
   that fresh memory costs each time. Used by the layer's own thread only. */
MOE_EP_PRIVATE void* moe_ep__cuda_cache_alloc(size_t size, void* user_data) {
    moe_ep_cuda_layer* L = (moe_ep_cuda_layer*)user_data;
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
        return block + MOE_EP__CUDA_HEADER;
    }
    if (size > (size_t)-1 - MOE_EP__CUDA_HEADER) return NULL;
    block = (char*)moe_ep_alloc(&L->desc.allocator, size + MOE_EP__CUDA_HEADER);
    if (!block) return NULL;
    *(size_t*)block = size;
    return block + MOE_EP__CUDA_HEADER;
}

MOE_EP_PRIVATE void moe_ep__cuda_cache_free(void* ptr, void* user_data) {
    moe_ep_cuda_layer* L = (moe_ep_cuda_layer*)user_data;
    char* block = (char*)ptr - MOE_EP__CUDA_HEADER;
    if (L->cached < MOE_EP__CUDA_CACHE) L->cache[L->cached++] = block;
    else moe_ep_free(&L->desc.allocator, block);
}

MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_fail(moe_ep_cuda_layer* L, moe_ep_result result, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(L->last_error, sizeof L->last_error, fmt, ap);
    va_end(ap);
    if (L->desc.logger.func)
        L->desc.logger.func("moe_ep_cuda", 1, MOE_EP_LOG_ITEM_NONE, L->rank, L->last_error, L->desc.logger.user_data);
    return result;
}

MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_cuda(moe_ep_cuda_layer* L, cudaError_t e, const char* what) {
    if (e == cudaSuccess) return MOE_EP_OK;
    (void)cudaGetLastError();
    return moe_ep__cuda_fail(L, e == cudaErrorMemoryAllocation ? MOE_EP_ERROR_OUT_OF_MEMORY : MOE_EP_ERROR_INTERNAL,
                             "%s: %s", what, cudaGetErrorString(e));
}

MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_blas(moe_ep_cuda_layer* L, cublasStatus_t s, const char* what) {
    if (s == CUBLAS_STATUS_SUCCESS) return MOE_EP_OK;
    return moe_ep__cuda_fail(L, s == CUBLAS_STATUS_ALLOC_FAILED ? MOE_EP_ERROR_OUT_OF_MEMORY : MOE_EP_ERROR_INTERNAL,
                             "%s: %s", what, cublasGetStatusString(s));
}

MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_net_fail(moe_ep_cuda_layer* L, moe_ep_result r, const char* what,
                                                   const char* err) {
    return moe_ep__cuda_fail(L, r, "%s: %s%s%s", what, moe_ep_result_string(r), err[0] ? ": " : "", err);
}

/* An agreement step without facts: fill in facts, peer_facts, ... where the step has them. */
MOE_EP_PRIVATE moe_ep_agree_desc moe_ep__cuda_agree_step(const char* stage, moe_ep_result status,
                                                         const moe_ep_allocator* allocator) {
    moe_ep_agree_desc a;
    memset(&a, 0, sizeof a);
    a.stage = stage;
    a.status = status;
    a.allocator = *allocator;
    return a;
}

/* A stage's verdict through the core's agreement over t (the EP or the TP group), with the
   facts of `with` (NULL: none): a cause that is not this rank's own becomes the last error. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_agree(moe_ep_cuda_layer* L, const moe_ep_transport* t, moe_ep_result status,
                                                const moe_ep_agree_desc* with, const char* stage) {
    char err[MOE_EP__CUDA_ERR] = "";
    moe_ep_agree_desc a = with ? *with : moe_ep__cuda_agree_step(stage, status, &L->desc.allocator);
    moe_ep_result res;
    a.stage = stage;
    a.status = status;
    a.allocator = L->desc.allocator;
    res = moe_ep_agree(t, &a, err, sizeof err);
    if (res != status) moe_ep__cuda_fail(L, res, "%s", err);
    return res;
}

/* Every rank of the EP group, then of the TP group, learns whether every rank is fine. The
   ranks of a TP group sit in different EP groups, so the two reach every rank of the
   data-parallel replica. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_verdict(moe_ep_cuda_layer* L, moe_ep_result status, const char* stage) {
    status = moe_ep__cuda_agree(L, &L->transport, status, NULL, stage);
    if (L->tp_size > 1) status = moe_ep__cuda_agree(L, &L->tp, status, NULL, stage);
    return status;
}

/* A create-time upload of `bytes` from host memory `src` (NULL: zeros) to device memory
   `dst`, on the layer's stream and waited for. Not cudaMemcpy or cudaMemset: those run on
   the legacy default stream, which a non-blocking desc.stream does not wait for, and
   cudaMemcpy from pageable memory may return before its copy lands: the layer's first
   kernels could read what was there before (a multi-rank test on one GPU read peer
   pointers that way). */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_put(moe_ep_cuda_layer* L, void* dst, const void* src, size_t bytes,
                                              const char* what) {
    cudaError_t e = src ? cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, L->stream)
                        : cudaMemsetAsync(dst, 0, bytes, L->stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(L->stream);
    return moe_ep__cuda_cuda(L, e, what);
}

/* Grows a device buffer (pinned host memory with `pinned`) by half again; the old
   contents are not kept. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_grow(moe_ep_cuda_layer* L, void** buffer, size_t* capacity, size_t need,
                                               int pinned, const char* what) {
    size_t size = need + need / 2;
    cudaError_t e;
    if (need <= *capacity) return MOE_EP_OK;
    if (*buffer && pinned) cudaFreeHost(*buffer);
    else if (*buffer) cudaFree(*buffer);
    *buffer = NULL;
    *capacity = 0;
    e = pinned ? cudaMallocHost(buffer, size) : cudaMalloc(buffer, size);
    if (e != cudaSuccess) *buffer = NULL;
    else *capacity = size;
    return moe_ep__cuda_cuda(L, e, what);
}

/* After a direct-path wait ran past the timeout: the transport is aborted (its abort
   callback, if it has one) and the layer refuses every later call, so nobody waits again. */
MOE_EP_PRIVATE void moe_ep__cuda_break(moe_ep_cuda_layer* L) {
    if (L->broken) return;
    L->broken = 1;
    if (L->transport.abort) L->transport.abort(L->transport.impl);
}

/* Waits until the layer stream has done its work, for at most desc.timeout_ms (0: no limit). */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_wait(moe_ep_cuda_layer* L, const char* what) {
    time_t start = time(NULL);
    cudaError_t q;
    if (L->desc.timeout_ms <= 0) return moe_ep__cuda_cuda(L, cudaStreamSynchronize(L->stream), what);
    while ((q = cudaStreamQuery(L->stream)) == cudaErrorNotReady)
        if (difftime(time(NULL), start) * 1000.0 > (double)L->desc.timeout_ms + 999.0) {
            moe_ep__cuda_break(L);
            return moe_ep__cuda_fail(L, MOE_EP_ERROR_TIMEOUT, "%s: no progress for %d ms; the transport was aborted",
                                     what, L->desc.timeout_ms);
        }
    return moe_ep__cuda_cuda(L, q, what);
}

static const int moe_ep__cuda_kdtype[] = { 0, MOE_EP__CUDA_K_F32, MOE_EP__CUDA_K_BF16 };

MOE_EP_PRIVATE cudaDataType_t moe_ep__cuda_cuda_type(const moe_ep_cuda_layer* L) {
    return L->dtype == MOE_EP_CUDA_DTYPE_BF16 ? CUDA_R_16BF : CUDA_R_32F;
}

/* Column-major C[m, n] (ldc) = op(A)^T... in row-major words: out[n, m] = in[n, k] . W[m, k]^T,
   W in nn.Linear layout (lda = k), in with row stride ldb, out with row stride ldc. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_linear(moe_ep_cuda_layer* L, cublasHandle_t blas, const void* w, int m, int k,
                                                 const void* in, int64_t ldb, int64_t n, void* out, int64_t ldc,
                                                 cudaDataType_t out_type, const char* what) {
    const float one = 1.0f, zero = 0.0f;
    cudaDataType_t t = moe_ep__cuda_cuda_type(L);
    if (n <= 0) return MOE_EP_OK;
    if (n > 0x7FFFFFFF)
        return moe_ep__cuda_fail(L, MOE_EP_ERROR_UNSUPPORTED, "%s: %lld rows exceed one GEMM", what, (long long)n);
    return moe_ep__cuda_blas(L, cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, m, (int)n, k, &one, w, t, k, in, t,
                                             (int)ldb, &zero, out, out_type, (int)ldc, CUBLAS_COMPUTE_32F,
                                             CUBLAS_GEMM_DEFAULT), what);
}

MOE_EP_PRIVATE void moe_ep__cuda_free_buffers(moe_ep__cuda_buffers* b) {
    cudaFree(b->send);
    cudaFree(b->stage);
    cudaFree(b->meta);
    cudaFreeHost(b->meta_host);
    if (b->uploaded) cudaEventDestroy(b->uploaded);
    (void)cudaGetLastError();
    memset(b, 0, sizeof *b);
}

/* >>gpu layer: direct path */
/* The region: flags [4][R], two block counters, the offset table [R * S], then the
   received rows and the expert outputs, max_tokens worth of each; laid out alike on
   every rank. */
MOE_EP_PRIVATE size_t moe_ep__cuda_round256(size_t n) { return (n + 255) & ~(size_t)255; }

/* What each rank tells the others about its region: the facts of one agreement
   (moe_ep__cuda_card_words), which hands every rank everyone's card. */
typedef struct moe_ep__cuda_card {
    int64_t boot, pid;              /* same boot and pid: same process */
    int64_t device;                 /* the CUDA device, as numbered in that process */
    int64_t out_off;                /* the region's layout, which must be the same everywhere */
    uint64_t address;
    cudaIpcMemHandle_t handle;
} moe_ep__cuda_card;

#define MOE_EP__CUDA_CARD_WORDS ((sizeof(moe_ep__cuda_card) + 7) / 8)

/* The machine's boot id (Linux), so that CUDA IPC is only tried between processes of one host. */
MOE_EP_PRIVATE int64_t moe_ep__cuda_boot_id(void) {
    uint64_t h = MOE_EP_HASH_SEED;
    FILE* f = fopen("/proc/sys/kernel/random/boot_id", "r");
    char text[64];
    size_t n;
    if (!f) return 0;
    n = fread(text, 1, sizeof text, f);
    fclose(f);
    h = moe_ep_hash(h, text, n);
    return (int64_t)(h & 0x7FFFFFFFFFFFFFFFull);
}

MOE_EP_PRIVATE void moe_ep__cuda_direct_free(moe_ep_cuda_layer* L) {
    const moe_ep_allocator* a = &L->desc.allocator;
    int q;
    for (q = 0; L->peer_host && L->peer_opened && q < L->world_size; ++q)
        if (L->peer_opened[q]) cudaIpcCloseMemHandle(L->peer_host[q]);
    if (L->region) cudaFree(L->region);
    if (L->peer_dev) cudaFree(L->peer_dev);
    if (L->expert_at) cudaFree(L->expert_at);
    if (L->ctl_host) cudaFreeHost(L->ctl_host);
    (void)cudaGetLastError();
    moe_ep_free(a, L->peer_host);
    moe_ep_free(a, L->peer_opened);
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
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_direct_local(moe_ep_cuda_layer* L, moe_ep__cuda_card* card) {
    const moe_ep_allocator* a = &L->desc.allocator;
    /* the same layout on every rank (the combine reads a peer's outputs at this rank's
       out offset): rows for the rank with the most experts */
    int64_t rows = L->desc.max_tokens * (L->top_k < L->segments ? L->top_k : L->segments) * L->world_size;
    size_t flags = moe_ep__cuda_round256((size_t)4 * L->world_size * 8 + 64);
    size_t table = moe_ep__cuda_round256((size_t)L->world_size * (size_t)L->segments * 8);
    /* the rows start on 2 MiB boundaries, as a cudaMalloc of their own would */
    size_t head = ((flags + table) + ((size_t)2 << 20) - 1) & ~(((size_t)2 << 20) - 1);
    size_t rows_bytes = ((size_t)rows * L->row_bytes + ((size_t)2 << 20) - 1) & ~(((size_t)2 << 20) - 1);
    int32_t* at;
    int e;
    moe_ep_result res;
    L->peer_host = (char**)moe_ep_alloc(a, sizeof(char*) * (size_t)L->world_size);
    L->peer_opened = (int*)moe_ep_alloc(a, sizeof(int) * (size_t)L->world_size);
    at = (int32_t*)moe_ep_alloc(a, sizeof(int32_t) * 2 * (size_t)L->num_experts);
    if (!L->peer_host || !L->peer_opened || !at) {
        moe_ep_free(a, at);
        return moe_ep__cuda_fail(L, MOE_EP_ERROR_OUT_OF_MEMORY, "moe_ep_cuda_layer_create: out of memory");
    }
    memset(L->peer_opened, 0, sizeof(int) * (size_t)L->world_size);
    for (e = 0; e < L->num_experts; ++e) {
        at[e] = L->owner_of[e];
        at[L->num_experts + e] = L->local_index_of[e];
    }
    L->region_rows = rows;
    L->region_bytes = head + 2 * rows_bytes;
    memset(&L->direct_args, 0, sizeof L->direct_args);
    L->direct_args.rank = L->rank;
    L->direct_args.world = L->world_size;
    L->direct_args.table_off = flags;
    L->direct_args.recv_off = head;
    L->direct_args.out_off = head + rows_bytes;
    L->direct_args.timeout_ns = L->desc.timeout_ms > 0 ? (uint64_t)L->desc.timeout_ms * 1000000u : 0;
    res = moe_ep__cuda_cuda(L, cudaMalloc((void**)&L->region, L->region_bytes), "direct path: region");
    if (res == MOE_EP_OK) res = moe_ep__cuda_put(L, L->region, NULL, flags, "direct path: region");
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_cuda(L, cudaMalloc((void**)&L->peer_dev, sizeof(char*) * (size_t)L->world_size),
                                "direct path: peers");
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_cuda(L, cudaMalloc((void**)&L->expert_at, sizeof(int32_t) * 2 * (size_t)L->num_experts),
                                "direct path: owners");
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_put(L, L->expert_at, at, sizeof(int32_t) * 2 * (size_t)L->num_experts, "direct path: owners");
    moe_ep_free(a, at);
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_cuda(L, cudaHostAlloc((void**)&L->ctl_host, 2 * sizeof(int), cudaHostAllocMapped),
                                "direct path: control words");
    if (res == MOE_EP_OK) {
        L->ctl_host[0] = L->ctl_host[1] = 0;
        res = moe_ep__cuda_cuda(L, cudaHostGetDevicePointer((void**)&L->direct_args.ctl, L->ctl_host, 0),
                                "direct path: control words");
    }
    if (res == MOE_EP_OK) res = moe_ep__cuda_cuda(L, cudaIpcGetMemHandle(&card->handle, L->region),
                                                  "cudaIpcGetMemHandle");
    if (res != MOE_EP_OK) return res;
    L->direct_args.counters = (unsigned*)(L->region + (size_t)4 * L->world_size * 8);
    card->boot = moe_ep__cuda_boot_id();
    card->pid = (int64_t)getpid();
    card->device = L->device;
    card->out_off = (int64_t)L->direct_args.out_off;
    card->address = (uint64_t)(uintptr_t)L->region;
    return MOE_EP_OK;
}

/* Reach rank q's region: the pointer itself in this process (with peer access), else
   CUDA IPC. MOE_EP_ERROR_UNSUPPORTED: this GPU cannot reach it. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_direct_reach(moe_ep_cuda_layer* L, int q, const moe_ep__cuda_card* card,
                                                       const moe_ep__cuda_card* mine) {
    int can = 0;
    cudaError_t e;
    if (q == L->rank) {
        L->peer_host[q] = L->region;
        return MOE_EP_OK;
    }
    if (card->boot != mine->boot)
        return moe_ep__cuda_fail(L, MOE_EP_ERROR_UNSUPPORTED, "direct path: rank %d is on another host", q);
    if (card->pid == mine->pid) {
        if (card->device != mine->device) {
            e = cudaDeviceCanAccessPeer(&can, (int)mine->device, (int)card->device);
            if (e != cudaSuccess || !can)
                return moe_ep__cuda_fail(L, MOE_EP_ERROR_UNSUPPORTED,
                                         "direct path: GPU %d cannot access GPU %d (rank %d)",
                                         (int)mine->device, (int)card->device, q);
            e = cudaDeviceEnablePeerAccess((int)card->device, 0);
            if (e == cudaErrorPeerAccessAlreadyEnabled) e = cudaSuccess;
            (void)cudaGetLastError();
            if (e != cudaSuccess)
                return moe_ep__cuda_fail(L, MOE_EP_ERROR_UNSUPPORTED, "direct path: cudaDeviceEnablePeerAccess(%d): %s",
                                         (int)card->device, cudaGetErrorString(e));
        }
        L->peer_host[q] = (char*)(uintptr_t)card->address;
        return MOE_EP_OK;
    }
    e = cudaIpcOpenMemHandle((void**)&L->peer_host[q], card->handle, cudaIpcMemLazyEnablePeerAccess);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return moe_ep__cuda_fail(L, MOE_EP_ERROR_UNSUPPORTED, "direct path: cudaIpcOpenMemHandle for rank %d: %s", q,
                                 cudaGetErrorString(e));
    }
    L->peer_opened[q] = 1;
    return MOE_EP_OK;
}

/* The cards of every rank, by one agreement over the EP group whose facts are this rank's
   card (may differ): peer_facts then holds everyone's. A failed rank takes part with its
   failure as status. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_direct_cards(moe_ep_cuda_layer* L, moe_ep_result status,
                                                      const moe_ep__cuda_card* mine, moe_ep__cuda_card* cards) {
    int64_t words[MOE_EP__CUDA_CARD_WORDS];
    int64_t* all = cards ? (int64_t*)moe_ep_alloc(&L->desc.allocator, sizeof words * (size_t)L->world_size) : NULL;
    moe_ep_agree_desc a = moe_ep__cuda_agree_step(NULL, status, &L->desc.allocator);
    int q;
    memset(words, 0, sizeof words);
    memcpy(words, mine, sizeof *mine);
    if (!all && status == MOE_EP_OK)
        status = moe_ep__cuda_fail(L, MOE_EP_ERROR_OUT_OF_MEMORY, "moe_ep_cuda_layer_create: out of memory");
    a.facts = words;
    a.fact_count = (int)MOE_EP__CUDA_CARD_WORDS;
    a.facts_may_differ = true;
    a.peer_facts = all;
    status = moe_ep__cuda_agree(L, &L->transport, status, &a, "direct path: exchanging the regions");
    for (q = 0; status == MOE_EP_OK && q < L->world_size; ++q)
        memcpy(&cards[q], all + (size_t)q * MOE_EP__CUDA_CARD_WORDS, sizeof *cards);
    moe_ep_free(&L->desc.allocator, all);
    return status;
}

/* The vote: 0 fine, 1 cannot reach a peer, 2 failed; every rank takes the largest. */
MOE_EP_PRIVATE int moe_ep__cuda_direct_vote(moe_ep_cuda_layer* L, int verdict, moe_ep_result* res) {
    int64_t mine = verdict, votes[64];
    int64_t* all = L->world_size <= 64 ? votes
                                       : (int64_t*)moe_ep_alloc(&L->desc.allocator, sizeof(int64_t) * (size_t)L->world_size);
    moe_ep_agree_desc a = moe_ep__cuda_agree_step(NULL, MOE_EP_OK, &L->desc.allocator);
    moe_ep_result x;
    int q;
    a.facts = &mine;
    a.fact_count = 1;
    a.facts_may_differ = true;
    a.peer_facts = all;
    x = moe_ep__cuda_agree(L, &L->transport, MOE_EP_OK, &a, "direct path");
    if (x != MOE_EP_OK || !all) {
        if (*res == MOE_EP_OK) *res = x != MOE_EP_OK ? x : MOE_EP_ERROR_OUT_OF_MEMORY;
        verdict = 2;
    }
    for (q = 0; x == MOE_EP_OK && all && q < L->world_size; ++q)
        if (all[q] > verdict) verdict = (int)all[q];
    if (all != votes) moe_ep_free(&L->desc.allocator, all);
    return verdict;
}

/* Collective over the EP group, on every rank whatever `status` says (a failed rank
   takes part with its failure). Returns the status to agree on: with auto, a rank that
   cannot reach another turns the path off everywhere and is no failure. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_direct_setup(moe_ep_cuda_layer* L, moe_ep_result status) {
    int R = L->world_size, q, verdict;
    moe_ep__cuda_card mine;
    moe_ep__cuda_card* cards = (moe_ep__cuda_card*)moe_ep_alloc(&L->desc.allocator, sizeof *cards * (size_t)R);
    moe_ep_result res = status;
    memset(&mine, 0, sizeof mine);
    if (res == MOE_EP_OK && !cards)
        res = moe_ep__cuda_fail(L, MOE_EP_ERROR_OUT_OF_MEMORY, "moe_ep_cuda_layer_create: out of memory");
    if (res == MOE_EP_OK) res = moe_ep__cuda_direct_local(L, &mine);
    res = moe_ep__cuda_direct_cards(L, res, &mine, cards);
    for (q = 0; res == MOE_EP_OK && q < R; ++q)
        if (cards[q].out_off != mine.out_off)
            res = moe_ep__cuda_fail(L, MOE_EP_ERROR_INTERNAL, "direct path: rank %d lays out its region otherwise", q);
    for (q = 0; res == MOE_EP_OK && q < R; ++q) res = moe_ep__cuda_direct_reach(L, q, &cards[q], &mine);
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_put(L, L->peer_dev, L->peer_host, sizeof(char*) * (size_t)R, "direct path: peers");
    moe_ep_free(&L->desc.allocator, cards);
    verdict = moe_ep__cuda_direct_vote(L, res == MOE_EP_OK ? 0 : res == MOE_EP_ERROR_UNSUPPORTED ? 1 : 2, &res);
    if (verdict == 0) {
        /* the forward's expert-side rows live in the region from now on */
        if (L->recv) cudaFree(L->recv);
        if (L->out) cudaFree(L->out);
        L->recv = L->region + L->direct_args.recv_off;
        L->out = L->region + L->direct_args.out_off;
        L->recv_bytes = L->out_bytes = (size_t)L->region_rows * L->row_bytes;
        L->direct_args.peers = L->peer_dev;
        L->direct = 1;
        return MOE_EP_OK;
    }
    moe_ep__cuda_direct_free(L);
    if (verdict == 1 && L->desc.direct != MOE_EP_CUDA_DIRECT_ON) return status;
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_fail(L, verdict == 1 ? MOE_EP_ERROR_UNSUPPORTED : MOE_EP_ERROR_ABORTED,
                                "direct path: %s", verdict == 1 ? "another rank cannot reach its peers' memory"
                                                                : "another rank failed");
    return res;
}

/* >>gpu layer: low-latency mode */
/* This rank's region (LOW-LATENCY DECODE; moe_ep__cuda_k_ll has its layout), its control
   words, the slots' landing places, and the expert outputs moved into the region (the
   owners' rows that the combine reads). Local; before the GPU plan's chunk pointers, which
   point at L->out. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_ll_local(moe_ep_cuda_layer* L) {
    const moe_ep_allocator* a = &L->desc.allocator;
    int W = L->world_size, S = L->segments, sms = 0;
    int64_t M = L->desc.max_tokens, rows = M * (L->top_k < S ? L->top_k : S) * W;
    /* CHUNKED starts each expert on a chunk of up to 256 rows: room for the padding */
    int64_t out_rows = L->desc.expert_gemm == MOE_EP_CUDA_EXPERT_GEMM_CHUNKED ? rows + 256 * ((int64_t)S + 1) : rows;
    size_t mib2 = (size_t)2 << 20, flags = moe_ep__cuda_round256((size_t)4 * W * 8);
    size_t ctl = moe_ep__cuda_round256(sizeof(moe_ep__cuda_k_ll_ctl));
    size_t counts = moe_ep__cuda_round256((size_t)S * (size_t)W * 8), table = counts;
    size_t head = (flags + ctl + counts + table + mib2 - 1) & ~(mib2 - 1);
    size_t land = ((size_t)S * (size_t)W * (size_t)M * L->row_bytes + mib2 - 1) & ~(mib2 - 1);
    size_t out = ((size_t)out_rows * L->row_bytes + mib2 - 1) & ~(mib2 - 1);
    moe_ep__cuda_k_ll* g = &L->ll_args;
    moe_ep_result res;
    if ((int64_t)S * W * M > 0x7FFFFFFF)
        return moe_ep__cuda_fail(L, MOE_EP_ERROR_UNSUPPORTED, "moe_ep_cuda_layer_desc.mode LOW_LATENCY: max_tokens (%lld) "
                                 "x world size (%d) x experts per rank (%d) must be < 2^31", (long long)M, W, S);
    L->peer_host = (char**)moe_ep_alloc(a, sizeof(char*) * (size_t)W);
    L->peer_opened = (int*)moe_ep_alloc(a, sizeof(int) * (size_t)W);
    if (!L->peer_host || !L->peer_opened)
        return moe_ep__cuda_fail(L, MOE_EP_ERROR_OUT_OF_MEMORY, "moe_ep_cuda_layer_create: out of memory");
    memset(L->peer_opened, 0, sizeof(int) * (size_t)W);
    memset(g, 0, sizeof *g);
    g->rank = L->rank;
    g->world = W;
    g->S = S;
    g->max_tokens = M;
    g->ctl_off = flags;
    g->counts_off = flags + ctl;
    g->table_off = g->counts_off + counts;
    g->land_off = head;
    g->out_off = head + land;
    g->row_bytes = L->row_bytes;
    g->timeout_ns = L->desc.timeout_ms > 0 ? (uint64_t)L->desc.timeout_ms * 1000000u : 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, L->device) != cudaSuccess) {
        (void)cudaGetLastError();
        sms = 1;
    }
    g->grid = sms > 0 ? sms : 1;
    L->region_bytes = head + land + out;
    L->region_rows = out_rows;
    res = moe_ep__cuda_cuda(L, cudaMalloc((void**)&L->region, L->region_bytes), "low-latency region");
    if (res == MOE_EP_OK) res = moe_ep__cuda_put(L, L->region, NULL, head, "low-latency region");
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_cuda(L, cudaMalloc((void**)&L->peer_dev, sizeof(char*) * (size_t)W), "low-latency peers");
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_cuda(L, cudaMalloc((void**)&L->ll_dest, sizeof(int64_t) * (size_t)(M * L->top_k)),
                                "low-latency slots");
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_cuda(L, cudaHostAlloc((void**)&L->ctl_host, 2 * sizeof(int), cudaHostAllocMapped),
                                "low-latency control words");
    if (res == MOE_EP_OK) {
        L->ctl_host[0] = L->ctl_host[1] = 0;
        res = moe_ep__cuda_cuda(L, cudaHostGetDevicePointer((void**)&g->ctl, L->ctl_host, 0), "low-latency control words");
    }
    if (res != MOE_EP_OK) return res;
    if (L->out) cudaFree(L->out);
    L->out = L->region + g->out_off;
    L->out_bytes = (size_t)out_rows * L->row_bytes;
    L->out_in_region = 1;
    return MOE_EP_OK;
}

/* Collective over the EP group, on every rank whatever `status` says: every rank maps
   every other rank's region (as the direct path does), or the layer fails everywhere
   (MOE_EP_ERROR_UNSUPPORTED: no peer access; there is no transport fallback). */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_ll_setup(moe_ep_cuda_layer* L, moe_ep_result status) {
    int R = L->world_size, q, verdict, sharing = 0;
    moe_ep__cuda_card mine;
    moe_ep__cuda_card* cards = (moe_ep__cuda_card*)moe_ep_alloc(&L->desc.allocator, sizeof *cards * (size_t)R);
    moe_ep_result res = status;
    memset(&mine, 0, sizeof mine);
    if (res == MOE_EP_OK && !cards)
        res = moe_ep__cuda_fail(L, MOE_EP_ERROR_OUT_OF_MEMORY, "moe_ep_cuda_layer_create: out of memory");
    if (res == MOE_EP_OK && R > 1)
        res = moe_ep__cuda_cuda(L, cudaIpcGetMemHandle(&mine.handle, L->region), "cudaIpcGetMemHandle");
    mine.boot = moe_ep__cuda_boot_id();
    mine.pid = (int64_t)getpid();
    mine.device = L->device;
    mine.out_off = (int64_t)L->ll_args.out_off;
    mine.address = (uint64_t)(uintptr_t)L->region;
    if (R > 1) res = moe_ep__cuda_direct_cards(L, res, &mine, cards);
    else if (cards) cards[0] = mine;
    for (q = 0; res == MOE_EP_OK && q < R; ++q)
        if (cards[q].out_off != mine.out_off)
            res = moe_ep__cuda_fail(L, MOE_EP_ERROR_INTERNAL, "low-latency mode: rank %d lays out its region otherwise", q);
    for (q = 0; res == MOE_EP_OK && q < R; ++q) {
        res = moe_ep__cuda_direct_reach(L, q, &cards[q], &mine);
        sharing += cards[q].boot == mine.boot && cards[q].pid == mine.pid && cards[q].device == mine.device;
    }
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_put(L, L->peer_dev, L->peer_host, sizeof(char*) * (size_t)R, "low-latency peers");
    moe_ep_free(&L->desc.allocator, cards);
    verdict = R > 1 ? moe_ep__cuda_direct_vote(L, res == MOE_EP_OK ? 0 : res == MOE_EP_ERROR_UNSUPPORTED ? 1 : 2, &res)
                    : res == MOE_EP_OK ? 0 : 2;
    if (verdict == 0) {
        /* ranks that share this GPU (threads of one process, a test setup) share its SMs:
           their dispatch and combine blocks spin in their waits, so together they keep to
           a quarter of the SMs and leave the rest to the others' GEMMs */
        L->ll_args.peers = L->peer_dev;
        if (sharing > 1) L->ll_args.grid = L->ll_args.grid / (4 * sharing);
        if (L->ll_args.grid < 1) L->ll_args.grid = 1;
        L->ll_mapped = 1;
        return MOE_EP_OK;
    }
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_fail(L, verdict == 1 ? MOE_EP_ERROR_UNSUPPORTED : MOE_EP_ERROR_ABORTED, "low-latency mode: %s",
                                verdict == 1 ? "another rank cannot reach its peers' memory (one host, peer access or "
                                               "CUDA IPC; there is no transport fallback)" : "another rank failed");
    else if (res == MOE_EP_ERROR_UNSUPPORTED) {
        char cause[MOE_EP__CUDA_ERR];
        snprintf(cause, sizeof cause, "%s", L->last_error);
        moe_ep__cuda_fail(L, res, "low-latency mode needs every rank to map every other rank's memory (one host, peer "
                          "access or CUDA IPC; there is no transport fallback): %s", cause);
    }
    return res;
}

/* A device-side wait that gave up (it ran past the timeout, here or on a peer; or an
   abort) leaves its mark in ctl_host[1]; the transport is then aborted and the layer
   refuses further work, as after a host-side timeout. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_direct_check(moe_ep_cuda_layer* L) {
    int why = L->ctl_host ? ((volatile int*)L->ctl_host)[1] : 0;
    if (!(L->direct || L->ll_mapped) || !why) return MOE_EP_OK;
    moe_ep__cuda_break(L);
    if (why == 2)
        return moe_ep__cuda_fail(L, MOE_EP_ERROR_ABORTED, "moe_ep_cuda: a device-side wait was aborted "
                                 "(moe_ep_cuda_layer_abort, or a rank that failed its call); the transport was aborted");
    return moe_ep__cuda_fail(L, MOE_EP_ERROR_TIMEOUT, "moe_ep_cuda: a device-side wait for the other ranks ran past "
                             "%d ms (on this rank or another); the transport was aborted", L->desc.timeout_ms);
}

MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_kernel(moe_ep_cuda_layer* L, int e, const char* what) {
    return moe_ep__cuda_cuda(L, (cudaError_t)e, what);
}

MOE_EP_PRIVATE void moe_ep__cuda_gpu_plan_free(moe_ep_cuda_layer* L);

MOE_EP_PRIVATE void moe_ep__cuda_layer_free(moe_ep_cuda_layer* L) {
    moe_ep_allocator a = L->desc.allocator;
    /* on the direct path the forward's rows live in the region (freed with it) */
    void* device[] = { L->ptrs_dev, L->router, L->router_biases, L->w_up, L->w_down, L->logits, L->topk_dev, L->hidden, L->partial,
                       L->tp_gather, L->direct ? NULL : L->recv, L->direct || L->out_in_region ? NULL : L->out,
                       L->b_up, L->b_down, L->ll_dest,
                       L->sh_up, L->sh_down, L->sh_b_up, L->sh_b_down, L->sh_gate, L->sh_hidden, L->sh_out,
                       L->sh_logit, L->scaled, L->staging };
    void* host[] = { L->group_ints, L->group_scalars, L->group_ops, L->owner_of, L->local_index_of, L->local_ids,
                     L->routing_idx, L->routing_weight, L->tp_rows };
    size_t i;
    cudaSetDevice(L->device);
    cudaStreamSynchronize(L->stream);
    if (L->blas) cublasDestroy(L->blas);
    moe_ep__cuda_gpu_plan_free(L);     /* after cuBLAS, which owned its workspace */
    if (L->ptrs_uploaded) cudaEventDestroy(L->ptrs_uploaded);
    cudaFreeHost(L->ptrs_host);
    cudaFreeHost(L->topk_host);
    for (i = 0; i < sizeof device / sizeof device[0]; ++i) cudaFree(device[i]);
    if ((L->direct || (L->ll_mapped && L->world_size > 1)) && !L->broken) {
        /* nobody may still read or write this rank's region */
        char err[MOE_EP__CUDA_ERR] = "";
        if (L->transport.barrier) L->transport.barrier(L->transport.impl, err, sizeof err);
        else moe_ep__cuda_agree(L, &L->transport, MOE_EP_OK, NULL, "moe_ep_cuda_layer_destroy");
    }
    moe_ep__cuda_direct_free(L);
    if (L->has_spare) moe_ep__cuda_free_buffers(&L->spare);
    (void)cudaGetLastError();
    if (L->core) moe_ep_destroy(L->core);
    while (L->cached > 0) moe_ep_free(&a, L->cache[--L->cached]);
    for (i = 0; i < sizeof host / sizeof host[0]; ++i) moe_ep_free(&a, host[i]);
    moe_ep_free(&a, L);
}

/* >>gpu layer: sizes */
MOE_EP_PRIVATE size_t moe_ep__cuda_round16(size_t n) { return (n + 15) & ~(size_t)15; }

MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_reserve_router(moe_ep_cuda_layer* L, int64_t tokens) {
    size_t slots = (size_t)tokens * (size_t)L->top_k;
    size_t topk = moe_ep__cuda_round16(slots * sizeof(int32_t)) + slots * sizeof(float);
    moe_ep_result res = moe_ep__cuda_grow(L, (void**)&L->logits, &L->logits_bytes,
                                          (size_t)tokens * (size_t)L->num_experts * sizeof(float), 0, "router buffers");
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_grow(L, (void**)&L->topk_dev, &L->topk_dev_bytes, topk, 0, "router buffers");
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_grow(L, (void**)&L->topk_host, &L->topk_host_bytes, topk, 1, "router buffers");
    return res;
}

/* Where the plan metadata lives in the meta buffers: first what the host uploads (the
   core plan's slot rows, the routing, small tables), then what kernels build from it
   (the slot map and the stage map). Offsets in bytes. */
typedef struct moe_ep__cuda_meta {
    size_t rows, idx, weight, scale, first_row, owner, shift, chunk_start, chunk_dest, send_off, table, upload, map, stage,
        dest, total;
} moe_ep__cuda_meta;

MOE_EP_PRIVATE moe_ep__cuda_meta moe_ep__cuda_meta_layout(const moe_ep_cuda_layer* L, int64_t slots,
                                                          int64_t remote_rows) {
    moe_ep__cuda_meta m;
    size_t chunks = (size_t)(L->world_size - 1) * (size_t)L->segments;
    m.rows = 0;
    m.idx = m.rows + moe_ep__cuda_round16((size_t)slots * 8);
    m.weight = m.idx + moe_ep__cuda_round16((size_t)slots * 4);
    m.scale = m.weight + moe_ep__cuda_round16((size_t)slots * 4);
    m.first_row = m.scale + (L->desc.scale_expert_input ? moe_ep__cuda_round16((size_t)slots * 4) : 0);
    m.owner = m.first_row + moe_ep__cuda_round16(((size_t)L->local_experts + 1) * 8);
    m.shift = m.owner + moe_ep__cuda_round16((size_t)L->num_experts * 4);
    m.chunk_start = m.shift + moe_ep__cuda_round16((size_t)L->segments * 8);
    m.chunk_dest = m.chunk_start + moe_ep__cuda_round16((chunks + 1) * 8);
    m.send_off = m.chunk_dest + moe_ep__cuda_round16(chunks * 8 + 8);
    m.table = m.send_off + moe_ep__cuda_round16((size_t)L->world_size * (size_t)L->segments * 8);
    m.upload = m.table + moe_ep__cuda_round16((size_t)L->world_size * (size_t)L->segments * 8);
    m.map = m.upload;
    m.stage = m.map + moe_ep__cuda_round16((size_t)slots * 4);
    m.dest = m.stage + moe_ep__cuda_round16((size_t)remote_rows * 4);
    m.total = m.dest + moe_ep__cuda_round16((size_t)slots * 8);
    return m;
}

/* Plan buffers for `slots` assignments, `send_rows` send rows and `remote_rows` staged rows. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_reserve_plan(moe_ep_cuda_layer* L, moe_ep__cuda_buffers* b, int64_t slots,
                                                       int64_t send_rows, int64_t remote_rows) {
    moe_ep__cuda_meta layout = moe_ep__cuda_meta_layout(L, slots, remote_rows);
    size_t meta = layout.total;
    moe_ep_result res = moe_ep__cuda_grow(L, (void**)&b->send, &b->send_bytes, (size_t)send_rows * L->row_bytes, 0,
                                          "plan buffers");
    if (res == MOE_EP_OK && L->desc.a2a_layout == MOE_EP_CUDA_A2A_STAGED)
        res = moe_ep__cuda_grow(L, (void**)&b->stage, &b->stage_bytes, (size_t)remote_rows * L->row_bytes, 0,
                                "plan buffers");
    if (res == MOE_EP_OK) res = moe_ep__cuda_grow(L, (void**)&b->meta, &b->meta_bytes, meta, 0, "plan buffers");
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_grow(L, (void**)&b->meta_host, &b->meta_host_bytes, layout.upload, 1, "plan buffers");
    return res;
}

/* Expert-side buffers for `rows` received rows; `forward` adds the forward's own rows. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_reserve_experts(moe_ep_cuda_layer* L, int64_t rows, int forward) {
    moe_ep_result res = MOE_EP_OK;
    if (!L->desc.expert_fn)
        res = moe_ep__cuda_grow(L, (void**)&L->hidden, &L->hidden_bytes, (size_t)rows * (size_t)L->up_rows * L->elem,
                                0, "expert buffers");
    if (res == MOE_EP_OK && L->partial_f32)
        res = moe_ep__cuda_grow(L, (void**)&L->partial, &L->partial_bytes,
                                (size_t)rows * (size_t)L->d_model * sizeof(float), 0, "expert buffers");
    if (res == MOE_EP_OK && L->tp_size > 1 && !L->desc.expert_fn)
        res = moe_ep__cuda_grow(L, (void**)&L->tp_gather, &L->tp_gather_bytes,
                                (size_t)rows * (size_t)L->d_model * sizeof(float) * (size_t)L->tp_size, 0,
                                "expert buffers");
    if (res == MOE_EP_OK && forward)
        res = moe_ep__cuda_grow(L, (void**)&L->recv, &L->recv_bytes, (size_t)rows * L->row_bytes, 0, "expert buffers");
    if (res == MOE_EP_OK && forward)
        res = moe_ep__cuda_grow(L, (void**)&L->out, &L->out_bytes, (size_t)rows * L->row_bytes, 0, "expert buffers");
    return res;
}

/* The most rows any buffer can need when every rank has at most max_tokens tokens. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_reserve_all(moe_ep_cuda_layer* L) {
    int64_t T = L->desc.max_tokens, per_source = T * (L->top_k < L->local_experts ? L->top_k : L->local_experts);
    moe_ep_result res = MOE_EP_OK;
    if (T <= 0) return MOE_EP_OK;
    if (L->desc.router_weight) res = moe_ep__cuda_reserve_router(L, T);
    if (res == MOE_EP_OK) {
        res = moe_ep__cuda_reserve_plan(L, &L->spare, T * L->top_k, T * L->top_k, per_source * (L->world_size - 1));
        L->spare.full = 1;
        L->has_spare = 1;
        if (res == MOE_EP_OK && per_source * L->world_size > 0x3FFFFFFF)
            res = moe_ep__cuda_fail(L, MOE_EP_ERROR_UNSUPPORTED, "max_tokens (%lld): more than 2^30 rows per plan",
                                    (long long)T);
    }
    if (res == MOE_EP_OK) res = moe_ep__cuda_reserve_experts(L, per_source * L->world_size, 1);
    if (res == MOE_EP_OK && L->desc.scale_expert_input)
        res = moe_ep__cuda_grow(L, &L->scaled, &L->scaled_bytes, (size_t)(T * L->top_k) * L->row_bytes, 0, "scaled rows");
    if (res == MOE_EP_OK && L->sh_ff > 0)
        res = moe_ep__cuda_grow(L, &L->sh_hidden, &L->sh_hidden_bytes, (size_t)T * (size_t)L->sh_up_rows * L->elem, 0,
                                "shared expert buffers");
    if (res == MOE_EP_OK && L->sh_ff > 0)
        res = moe_ep__cuda_grow(L, &L->sh_out, &L->sh_out_bytes, (size_t)T * L->row_bytes, 0, "shared expert buffers");
    if (res == MOE_EP_OK && L->sh_gate)
        res = moe_ep__cuda_grow(L, (void**)&L->sh_logit, &L->sh_logit_bytes, (size_t)T * sizeof(float), 0,
                                "shared expert buffers");
    return res;
}

/* >>gpu layer: planning on the GPU */
/* Whether the forward can plan on the GPU: fixed-size buffers, one rank (the row exchange
   of several ranks needs the counts on the host), no TP group, at most 1024 experts. */
MOE_EP_PRIVATE int moe_ep__cuda_can_plan_on_gpu(const moe_ep_cuda_layer_desc* d) {
    return d->planning != MOE_EP_CUDA_PLANNING_HOST && d->max_tokens > 0 && d->transport->world_size == 1 &&
           (!d->tp_transport || d->tp_transport->world_size <= 1) && d->num_experts <= 1024;
}

/* A bump allocator over one device block: sizes first (base NULL), then the pointers. */
MOE_EP_PRIVATE void* moe_ep__cuda_carve(char* base, size_t* used, size_t bytes) {
    void* at = base ? base + *used : NULL;
    *used += moe_ep__cuda_round256(bytes > 0 ? bytes : 1);
    return at;
}

/* The plan's device arrays in gp.block (or, with block NULL, only their size in *total). */
MOE_EP_PRIVATE void moe_ep__cuda_gpu_plan_layout(moe_ep_cuda_layer* L, char* block, size_t* total) {
    moe_ep__cuda_k_plan* k = &L->gp.k;
    int64_t slots = L->desc.max_tokens * L->top_k, blocks = (slots + MOE_EP__CUDA_PLAN_BLOCK - 1) / MOE_EP__CUDA_PLAN_BLOCK;
    size_t E = (size_t)L->num_experts, RS = (size_t)L->world_size * (size_t)L->segments, S = (size_t)L->segments;
    *total = 0;
    k->slot_rank = (int32_t*)moe_ep__cuda_carve(block, total, (size_t)slots * 4);
    k->block_counts = (int32_t*)moe_ep__cuda_carve(block, total, (size_t)blocks * E * 4);
    k->counts = (int64_t*)moe_ep__cuda_carve(block, total, E * 8);
    k->kept = (int64_t*)moe_ep__cuda_carve(block, total, E * 8);
    k->seg_send_counts = (int64_t*)moe_ep__cuda_carve(block, total, RS * 8);
    k->seg_send_offsets = (int64_t*)moe_ep__cuda_carve(block, total, RS * 8);
    k->seg_recv_counts = (int64_t*)moe_ep__cuda_carve(block, total, RS * 8);
    k->seg_recv_offsets = (int64_t*)moe_ep__cuda_carve(block, total, RS * 8);
    k->local_counts = (int64_t*)moe_ep__cuda_carve(block, total, S * 8 * 2 + 4 * 8);    /* then offsets, totals */
    k->local_offsets = k->local_counts ? k->local_counts + S : NULL;
    k->totals = k->local_counts ? k->local_counts + 2 * S : NULL;
    k->slot_map = (int32_t*)moe_ep__cuda_carve(block, total, (size_t)slots * 4);
    k->weight = (float*)moe_ep__cuda_carve(block, total, (size_t)slots * 4);
    k->expert_at = (const int32_t*)moe_ep__cuda_carve(block, total, 2 * E * 4);
    L->gp.chunk_ptrs = (void**)moe_ep__cuda_carve(block, total, sizeof(void*) * 6 * (size_t)L->chunks);
}

/* The GPU plan's buffers, its constant arguments, and for CHUNKED the expert-side rows
   (chunks x 128 of them) and the GEMMs' constant row pointers. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_build_gpu_plan(moe_ep_cuda_layer* L) {
    moe_ep__cuda_gpu_plan* gp = &L->gp;
    moe_ep__cuda_k_plan* k = &gp->k;
    size_t total = 0, S = (size_t)L->segments, rb = L->row_bytes, hb = (size_t)L->up_rows * L->elem;
    int64_t c, per_source = L->desc.max_tokens * (L->top_k < L->local_experts ? L->top_k : L->local_experts);
    int32_t* at = (int32_t*)moe_ep_alloc(&L->desc.allocator, sizeof(int32_t) * 2 * (size_t)L->num_experts);
    void** ptrs = NULL;
    moe_ep_result res = MOE_EP_OK;
    int e;
    if (!at) return moe_ep__cuda_fail(L, MOE_EP_ERROR_OUT_OF_MEMORY, "moe_ep_cuda_layer_create: out of memory");
    gp->capacity_factor = moe_ep_query(L->core).capacity_factor;
    /* the routing lives in the router's buffers also when it is handed in */
    if (!L->desc.router_weight) res = moe_ep__cuda_reserve_router(L, L->desc.max_tokens);
    for (e = 0; e < L->num_experts; ++e) {
        at[e] = L->owner_of[e];
        at[L->num_experts + e] = L->local_index_of[e];
    }
    if (res == MOE_EP_OK && L->desc.expert_gemm == MOE_EP_CUDA_EXPERT_GEMM_CHUNKED) {
        /* every expert's rows start on a chunk: at most one partial chunk per expert. 128 rows,
           256 where experts average more than 512 rows (fewer, larger GEMMs; the padding is
           then a smaller share) */
        int64_t rows = per_source * L->world_size;
        L->chunk_rows = rows > 512 * (int64_t)(L->local_experts > 0 ? L->local_experts : 1) ? 256 : 128;
        L->chunks = (rows + L->chunk_rows - 1) / L->chunk_rows + L->local_experts;
        res = moe_ep__cuda_reserve_experts(L, L->chunks * L->chunk_rows, 1);
        /* the padding rows are read by the GEMMs (their results unused): never uninitialised memory */
        if (res == MOE_EP_OK) res = moe_ep__cuda_cuda(L, cudaMemsetAsync(L->recv, 0, L->recv_bytes, L->stream), "expert buffers");
    }
    moe_ep__cuda_gpu_plan_layout(L, NULL, &total);
    if (res == MOE_EP_OK) res = moe_ep__cuda_cuda(L, cudaMalloc(&gp->block, total), "GPU plan buffers");
    if (res == MOE_EP_OK) moe_ep__cuda_gpu_plan_layout(L, (char*)gp->block, &total);
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_put(L, (void*)(uintptr_t)k->expert_at, at, sizeof(int32_t) * 2 * (size_t)L->num_experts,
                               "GPU plan buffers");
    moe_ep_free(&L->desc.allocator, at);
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_cuda(L, cudaMallocHost((void**)&gp->sizes_host, sizeof(int64_t) * (2 * S + 4)),
                                "GPU plan buffers");
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_cuda(L, cudaEventCreateWithFlags(&gp->downloaded, cudaEventDisableTiming), "GPU plan events");
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_cuda(L, cudaEventCreateWithFlags(&gp->routing_free, cudaEventDisableTiming), "GPU plan events");
    if (res == MOE_EP_OK && L->chunks > 0) {
        int64_t n = L->chunks;
        ptrs = (void**)moe_ep_alloc(&L->desc.allocator, sizeof(void*) * 4 * (size_t)n);
        if (!ptrs) res = moe_ep__cuda_fail(L, MOE_EP_ERROR_OUT_OF_MEMORY, "moe_ep_cuda_layer_create: out of memory");
        for (c = 0; ptrs && c < n; ++c) {   /* B, C of the up projection, then of the down projection */
            size_t row = (size_t)(c * L->chunk_rows);
            ptrs[c] = (char*)L->recv + row * rb;
            ptrs[n + c] = (char*)L->hidden + row * hb;
            ptrs[2 * n + c] = (char*)L->hidden + row * hb;
            ptrs[3 * n + c] = (char*)L->out + row * rb;
        }
        if (res == MOE_EP_OK)
            res = moe_ep__cuda_put(L, gp->chunk_ptrs + 2 * n, ptrs, sizeof(void*) * 4 * (size_t)n, "chunked GEMM pointers");
        moe_ep_free(&L->desc.allocator, ptrs);
    }
    k->E = L->num_experts;
    k->R = L->world_size;
    k->S = L->segments;
    k->rank = L->rank;
    k->local_experts = L->local_experts;
    k->scale_input = L->desc.scale_expert_input;
    k->chunk = L->chunks > 0 ? L->chunk_rows : 0;
    k->chunk_weights = L->chunks > 0 ? gp->chunk_ptrs : NULL;
    k->chunks = L->chunks;
    k->w_up = (const char*)L->w_up;
    k->w_down = (const char*)L->w_down;
    k->up_bytes = (size_t)L->up_rows * rb;
    k->down_bytes = (size_t)L->d_ff * rb;
    gp->view.layer = L;
    gp->view.slot_map = k->slot_map;
    gp->view.weight = k->weight;
    /* first_row[local_experts], the rows' end that the Hopper kernel reads, is totals[0]: the
       rows sent, which at world size 1 (the only one planned on the GPU) are the rows received */
    gp->view.first_row = k->local_offsets;
    gp->view.info.world_size = L->world_size;
    gp->view.info.local_experts = L->local_experts;
    gp->view.info.segments = L->segments;
    gp->view.info.local_expert_counts = gp->sizes_host;
    gp->view.info.local_expert_offsets = gp->sizes_host ? gp->sizes_host + S : NULL;
    return res;
}

MOE_EP_PRIVATE void moe_ep__cuda_gpu_plan_free(moe_ep_cuda_layer* L) {
    moe_ep__cuda_gpu_plan* gp = &L->gp;
    if (gp->block) cudaFree(gp->block);
    if (gp->sizes_host) cudaFreeHost(gp->sizes_host);
    if (gp->downloaded) cudaEventDestroy(gp->downloaded);
    if (gp->routing_free) cudaEventDestroy(gp->routing_free);
    if (L->blas_workspace) cudaFree(L->blas_workspace);
    (void)cudaGetLastError();
    memset(gp, 0, sizeof *gp);
    L->blas_workspace = NULL;
}

/* >>gpu layer: create */
/* The GPU layer plans with a core context but never runs its CPU experts; setting this
   callback keeps the core from packing a CPU copy of the weights. */
MOE_EP_PRIVATE int moe_ep__cuda_no_cpu_experts(int local_expert, int expert, const float* rows, int64_t row_count,
                                               int d_model, float* out, void* user_data) {
    (void)local_expert; (void)expert; (void)rows; (void)row_count; (void)d_model; (void)out; (void)user_data;
    return -1;  /* the core's CPU expert path is never used by the GPU layer */
}

/* >>defaults: the one place where zero becomes a value for the GPU fields (the core
   resolves the shared shape in moe_ep_create; the layer reads it back from there). */
MOE_EP_PRIVATE moe_ep_cuda_layer_desc moe_ep__cuda_desc_defaults(const moe_ep_cuda_layer_desc* in) {
    moe_ep_cuda_layer_desc d = *in;
    d.dtype = d.dtype == MOE_EP_CUDA_DTYPE_DEFAULT ? MOE_EP_CUDA_DTYPE_F32 : d.dtype;
    d.a2a_layout = d.a2a_layout == MOE_EP_CUDA_A2A_DEFAULT ? MOE_EP_CUDA_A2A_STAGED : d.a2a_layout;
    d.weight_layout = d.weight_layout == MOE_EP_WEIGHT_LAYOUT_DEFAULT ? MOE_EP_WEIGHT_LAYOUT_SEPARATE : d.weight_layout;
    /* direct DEFAULT (auto) and expert_gemm DEFAULT (by row count) are decided per layer and per call */
    return d;
}

/* The core desc the layer plans with: the shared shape of d, the EP group, no TP (the
   layer splits d_ff itself), no CPU experts, and the layer's block cache as allocator. */
MOE_EP_PRIVATE moe_ep_desc moe_ep__cuda_core_desc(moe_ep_cuda_layer* L, const moe_ep_cuda_layer_desc* d) {
    moe_ep_desc core;
    memset(&core, 0, sizeof core);
    core.d_model = d->d_model;
    core.d_ff = d->d_ff;
    core.num_experts = d->num_experts;
    core.top_k = d->top_k;
    core.activation = d->activation;
    core.swiglu_alpha = d->swiglu_alpha;
    core.swiglu_limit = d->swiglu_limit;
    core.scale_expert_input = d->scale_expert_input;
    core.scoring = d->scoring;
    core.normalize_topk = d->normalize_topk;
    core.routed_scaling_factor = d->routed_scaling_factor;
    core.router_bias = d->router_bias;
    core.selection_bias = d->selection_bias;
    core.num_groups = d->num_groups;
    core.topk_groups = d->topk_groups;
    core.capacity_factor = d->capacity_factor;
    core.placement = d->placement;
    core.num_threads = 1;
    core.expert_fn = moe_ep__cuda_no_cpu_experts;
    core.transport = d->transport;
    core.allocator.alloc_fn = moe_ep__cuda_cache_alloc;
    core.allocator.free_fn = moe_ep__cuda_cache_free;
    core.allocator.user_data = L;
    core.logger = d->logger;
    return core;
}

/* The GPU parameters every rank of the EP group must share. */
MOE_EP_PRIVATE int64_t moe_ep__cuda_fingerprint(const moe_ep_cuda_layer_desc* d) {
    int64_t fields[13];
    uint64_t h;
    fields[12] = d->mode;
    fields[10] = d->planning;
    fields[11] = d->expert_gemm == MOE_EP_CUDA_EXPERT_GEMM_CHUNKED;
    fields[8] = d->shared.d_ff;
    fields[9] = d->shared.gate != NULL;
    fields[0] = d->dtype;
    fields[1] = d->a2a_layout;
    fields[2] = d->max_tokens > 0;
    fields[3] = d->expert_fn != NULL;
    fields[4] = d->router_weight != NULL;
    fields[5] = 0x63756461;
    fields[6] = d->tp_transport ? d->tp_transport->world_size : 1;
    fields[7] = d->direct;
    h = moe_ep_hash(MOE_EP_HASH_SEED, fields, sizeof fields) & 0x7FFFFFFFFFFFFFFFull;
    return h == 0 ? 1 : (int64_t)h;
}

/* What the ranks of a TP group must share: the GPU parameters and the layer's shape. */
MOE_EP_PRIVATE int64_t moe_ep__cuda_tp_fingerprint(const moe_ep_cuda_layer_desc* d) {
    int64_t fields[10];
    uint64_t h;
    fields[0] = moe_ep__cuda_fingerprint(d);
    fields[1] = d->d_model;
    fields[2] = d->d_ff;
    fields[3] = d->num_experts;
    fields[4] = d->top_k;
    fields[5] = d->activation;
    fields[6] = d->normalize_topk;
    fields[7] = d->placement.kind;
    fields[8] = d->transport->world_size;
    fields[9] = d->tp_transport ? d->tp_transport->world_size : 1;
    h = moe_ep_hash(MOE_EP_HASH_SEED, fields, sizeof fields);
    h = moe_ep_hash(h, &d->capacity_factor, sizeof d->capacity_factor);
    return (int64_t)(h & 0x7FFFFFFFFFFFFFFFull);
}

/* >>validation: every failing rule is logged (the layer does not exist yet). */
MOE_EP_PRIVATE void moe_ep__cuda_check(const moe_ep_cuda_layer_desc* d, int rank, int* failures, int ok,
                                       const char* fmt, ...) {
    char text[MOE_EP__CUDA_ERR];
    va_list ap;
    if (ok) return;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    if (d->logger.func) d->logger.func("moe_ep_cuda", 1, MOE_EP_LOG_ITEM_NONE, rank, text, d->logger.user_data);
    (*failures)++;
}

MOE_EP_PRIVATE void moe_ep__cuda_validate_tp(const moe_ep_cuda_layer_desc* d, int* f) {
    const moe_ep_transport* tp = d->tp_transport;
    int rank = d->transport->rank;
    moe_ep__cuda_check(d, rank, f, tp->exchange_counts && tp->all_to_all_v,
                       "moe_ep_cuda_layer_desc.tp_transport: exchange_counts and all_to_all_v are required "
                       "(the partial sums travel in device memory)");
    moe_ep__cuda_check(d, rank, f, tp->world_size > 0 && tp->rank >= 0 && tp->rank < tp->world_size,
                       "moe_ep_cuda_layer_desc.tp_transport: rank (%d) must be in [0, world_size (%d))",
                       tp->rank, tp->world_size);
    moe_ep__cuda_check(d, rank, f, tp->world_size <= 1 || !d->expert_fn,
                       "moe_ep_cuda_layer_desc.expert_fn is not supported with tp_transport: tensor "
                       "parallelism splits the built-in experts by d_ff, a callback gets whole experts");
    moe_ep__cuda_check(d, rank, f, tp->world_size <= 1 || d->d_ff >= tp->world_size,
                       "moe_ep_cuda_layer_desc.d_ff (%d) must be >= the tensor-parallel size (%d)",
                       d->d_ff, tp->world_size);
}

MOE_EP_PRIVATE int moe_ep__cuda_gated(moe_ep_activation a) {
    return a == MOE_EP_ACTIVATION_DEFAULT || a == MOE_EP_ACTIVATION_SWIGLU || a == MOE_EP_ACTIVATION_SWIGLU_CLAMPED;
}

/* The low-latency mode's rules: the forward runs without the host (max_tokens, the plan on
   the GPU, experts whose shapes are fixed at create), over the peers' memory. */
MOE_EP_PRIVATE void moe_ep__cuda_validate_ll(const moe_ep_cuda_layer_desc* d, int* f) {
    int rank = d->transport->rank;
    moe_ep_cuda_expert_gemm g = d->expert_gemm;
    moe_ep__cuda_check(d, rank, f, d->max_tokens > 0, "moe_ep_cuda_layer_desc.mode LOW_LATENCY needs max_tokens > 0 "
                       "(the landing buffers have a fixed size)");
    moe_ep__cuda_check(d, rank, f, !d->expert_fn, "moe_ep_cuda_layer_desc.mode LOW_LATENCY needs the built-in experts "
                       "(expert_fn would need the row counts on the host)");
    moe_ep__cuda_check(d, rank, f, !d->tp_transport || d->tp_transport->world_size <= 1,
                       "moe_ep_cuda_layer_desc.mode LOW_LATENCY does not support tp_transport");
    moe_ep__cuda_check(d, rank, f, d->planning != MOE_EP_CUDA_PLANNING_HOST,
                       "moe_ep_cuda_layer_desc.mode LOW_LATENCY plans on the GPU (planning must not be HOST)");
    moe_ep__cuda_check(d, rank, f, d->num_experts <= 1024 && d->transport->world_size <= 1024,
                       "moe_ep_cuda_layer_desc.mode LOW_LATENCY needs num_experts (%d) and the world size (%d) <= 1024",
                       d->num_experts, d->transport->world_size);
    moe_ep__cuda_check(d, rank, f, g == MOE_EP_CUDA_EXPERT_GEMM_DEFAULT || g == MOE_EP_CUDA_EXPERT_GEMM_HOPPER ||
                                   g == MOE_EP_CUDA_EXPERT_GEMM_CHUNKED,
                       "moe_ep_cuda_layer_desc.mode LOW_LATENCY runs its experts on HOPPER or CHUNKED (expert_gemm "
                       "is %d; DEFAULT picks HOPPER where it runs, else CHUNKED)", (int)g);
    moe_ep__cuda_check(d, rank, f, d->direct != MOE_EP_CUDA_DIRECT_OFF || d->transport->world_size == 1,
                       "moe_ep_cuda_layer_desc.mode LOW_LATENCY moves rows by stores into the peers' memory: direct "
                       "must not be OFF with several ranks (there is no transport fallback)");
}

/* The rank-local rules of the GPU fields (the core checks the shared shape). */
MOE_EP_PRIVATE int moe_ep__cuda_validate(const moe_ep_cuda_layer_desc* d) {
    int f = 0, rank = d->transport->rank;
    moe_ep__cuda_check(d, rank, &f, d->dtype > 0 && d->dtype < MOE_EP_CUDA_DTYPE_COUNT,
                       "moe_ep_cuda_layer_desc.dtype (%d) is not a moe_ep_cuda_dtype", (int)d->dtype);
    moe_ep__cuda_check(d, rank, &f, d->weight_layout > 0 && d->weight_layout < MOE_EP_WEIGHT_LAYOUT_COUNT,
                       "moe_ep_cuda_layer_desc.weight_layout (%d) is not a moe_ep_weight_layout", (int)d->weight_layout);
    moe_ep__cuda_check(d, rank, &f, d->shared.d_ff >= 0, "moe_ep_cuda_layer_desc.shared.d_ff (%d) must be >= 0",
                       d->shared.d_ff);
    moe_ep__cuda_check(d, rank, &f, d->shared.d_ff <= 0 || (d->shared.weights.w1 && d->shared.weights.w2 &&
                                                             (d->shared.weights.w3 || !moe_ep__cuda_gated(d->activation))),
                       "moe_ep_cuda_layer_desc.shared.weights: w1, w2%s must not be NULL when shared.d_ff (%d) > 0",
                       moe_ep__cuda_gated(d->activation) ? " and w3" : "", d->shared.d_ff);
    moe_ep__cuda_check(d, rank, &f, d->direct >= 0 && d->direct < MOE_EP_CUDA_DIRECT_COUNT,
                       "moe_ep_cuda_layer_desc.direct (%d) is not a moe_ep_cuda_direct", (int)d->direct);
    moe_ep__cuda_check(d, rank, &f, d->direct != MOE_EP_CUDA_DIRECT_ON || d->max_tokens > 0,
                       "moe_ep_cuda_layer_desc.direct = ON needs max_tokens > 0 (the peers map buffers of fixed size)");
    moe_ep__cuda_check(d, rank, &f, d->expert_gemm >= 0 && d->expert_gemm < MOE_EP_CUDA_EXPERT_GEMM_COUNT,
                       "moe_ep_cuda_layer_desc.expert_gemm (%d) is not a moe_ep_cuda_expert_gemm", (int)d->expert_gemm);
    moe_ep__cuda_check(d, rank, &f, d->a2a_layout > 0 && d->a2a_layout < MOE_EP_CUDA_A2A_COUNT,
                       "moe_ep_cuda_layer_desc.a2a_layout (%d) is not a moe_ep_cuda_a2a_layout", (int)d->a2a_layout);
    moe_ep__cuda_check(d, rank, &f, d->max_tokens >= 0, "moe_ep_cuda_layer_desc.max_tokens (%lld) must be >= 0",
                       (long long)d->max_tokens);
    moe_ep__cuda_check(d, rank, &f, d->timeout_ms >= 0, "moe_ep_cuda_layer_desc.timeout_ms (%d) must be >= 0",
                       d->timeout_ms);
    moe_ep__cuda_check(d, rank, &f, d->d_model > 0 && d->num_experts > 0 && (d->d_ff > 0 || d->expert_fn),
                       "moe_ep_cuda_layer_desc: d_model (%d), num_experts (%d) and d_ff (%d) must be > 0",
                       d->d_model, d->num_experts, d->d_ff);
    moe_ep__cuda_check(d, rank, &f, (d->allocator.alloc_fn == NULL) == (d->allocator.free_fn == NULL),
                       "moe_ep_cuda_layer_desc.allocator: set both alloc_fn and free_fn, or neither");
    moe_ep__cuda_check(d, rank, &f, d->planning >= 0 && d->planning < MOE_EP_CUDA_PLANNING_COUNT,
                       "moe_ep_cuda_layer_desc.planning (%d) is not a moe_ep_cuda_planning", (int)d->planning);
    moe_ep__cuda_check(d, rank, &f, d->mode >= 0 && d->mode < MOE_EP_CUDA_MODE_COUNT,
                       "moe_ep_cuda_layer_desc.mode (%d) is not a moe_ep_cuda_mode", (int)d->mode);
    if (d->mode == MOE_EP_CUDA_MODE_LOW_LATENCY) moe_ep__cuda_validate_ll(d, &f);
    else if (d->planning == MOE_EP_CUDA_PLANNING_GPU || d->expert_gemm == MOE_EP_CUDA_EXPERT_GEMM_CHUNKED) {
        const char* what = d->planning == MOE_EP_CUDA_PLANNING_GPU ? "planning = GPU" : "expert_gemm = CHUNKED";
        moe_ep__cuda_check(d, rank, &f, d->max_tokens > 0, "moe_ep_cuda_layer_desc.%s needs max_tokens > 0 (the "
                           "plan's buffers have a fixed size)", what);
        moe_ep__cuda_check(d, rank, &f, d->transport->world_size == 1, "moe_ep_cuda_layer_desc.%s needs an EP group "
                           "of one rank (transport.world_size is %d): with several ranks the forward plans on the host",
                           what, d->transport->world_size);
        moe_ep__cuda_check(d, rank, &f, !d->tp_transport || d->tp_transport->world_size <= 1,
                           "moe_ep_cuda_layer_desc.%s does not support tp_transport", what);
        moe_ep__cuda_check(d, rank, &f, d->num_experts <= 1024, "moe_ep_cuda_layer_desc.%s needs num_experts (%d) "
                           "<= 1024", what, d->num_experts);
    }
    moe_ep__cuda_check(d, rank, &f, d->expert_gemm != MOE_EP_CUDA_EXPERT_GEMM_CHUNKED || d->mode == MOE_EP_CUDA_MODE_LOW_LATENCY ||
                                    (d->planning != MOE_EP_CUDA_PLANNING_HOST && !d->expert_fn),
                       "moe_ep_cuda_layer_desc.expert_gemm = CHUNKED needs the plan on the GPU (not planning = HOST) "
                       "and the built-in experts (no expert_fn)");
    if (d->tp_transport) moe_ep__cuda_validate_tp(d, &f);
    return f;
}

/* create, step 3: every rank, failed or not, sends its status and GPU fingerprint over
   the EP group, then its status and shape over the TP group: after this every rank of the
   data-parallel replica has the same verdict. A rank that rejected its desc is a
   mismatch for the others. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_create_agree(const moe_ep_cuda_layer_desc* d, moe_ep_result status) {
    char err[MOE_EP__CUDA_ERR] = "";
    int64_t facts[2];
    moe_ep_agree_desc a = moe_ep__cuda_agree_step("moe_ep_cuda_layer_create", status, &d->allocator);
    moe_ep_result res;
    facts[0] = status == MOE_EP_OK ? moe_ep__cuda_fingerprint(d) : 0;
    facts[1] = status == MOE_EP_OK ? moe_ep__cuda_tp_fingerprint(d) : 0;
    a.facts = facts;
    a.fact_count = 1;
    a.facts_name = "GPU parameters (dtype, a2a_layout, direct, max_tokens, expert_fn, router_weight, TP size, "
                   "shared experts, planning, CHUNKED, mode)";
    a.on_peer_failure = MOE_EP_ERROR_RANK_MISMATCH;
    res = moe_ep_agree(d->transport, &a, err, sizeof err);
    if (d->tp_transport && d->tp_transport->world_size > 1 && d->tp_transport->exchange_counts) {
        a.status = res;
        a.facts = facts + 1;
        a.facts_name = "layer (shapes, GPU parameters) on its tensor-parallel group";
        a.on_peer_failure = MOE_EP_ERROR_ABORTED;
        res = moe_ep_agree(d->tp_transport, &a, res == status ? err : NULL, sizeof err);
    }
    if (res != status && d->logger.func)
        d->logger.func("moe_ep_cuda", 1, MOE_EP_LOG_ITEM_NONE, d->transport->rank, err, d->logger.user_data);
    return res;
}

/* create, step 2: the layer struct. The shape and the sizes derived from it are filled in
   by moe_ep__cuda_layer_shape, once the core has resolved it. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_layer_alloc(const moe_ep_cuda_layer_desc* d, moe_ep_cuda_layer** out) {
    moe_ep_cuda_layer* L = (moe_ep_cuda_layer*)moe_ep_alloc(&d->allocator, sizeof *L);
    int device = 0;
    if (!L) return MOE_EP_ERROR_OUT_OF_MEMORY;
    memset(L, 0, sizeof *L);
    if (cudaGetDevice(&device) != cudaSuccess) (void)cudaGetLastError();
    L->desc = *d;
    L->desc.transport = NULL;
    L->desc.tp_transport = NULL;
    L->transport = *d->transport;
    L->device = device;
    L->stream = d->stream;
    L->rank = d->transport->rank;
    L->world_size = d->transport->world_size;
    L->dtype = d->dtype;
    L->elem = d->dtype == MOE_EP_CUDA_DTYPE_BF16 ? 2 : 4;
    L->ll = d->mode == MOE_EP_CUDA_MODE_LOW_LATENCY;
    L->gpu_plan = !L->ll && moe_ep__cuda_can_plan_on_gpu(d);
    L->tp_size = 1;
    if (d->tp_transport && d->tp_transport->world_size > 1) {
        L->tp = *d->tp_transport;
        L->tp_rank = L->tp.rank;
        L->tp_size = L->tp.world_size;
        L->partial_f32 = L->dtype == MOE_EP_CUDA_DTYPE_BF16;
        L->tp_rows = (int64_t*)moe_ep_alloc(&d->allocator, sizeof(int64_t) * 4 * (size_t)L->tp_size);
        if (!L->tp_rows) {
            moe_ep_free(&d->allocator, L);
            return MOE_EP_ERROR_OUT_OF_MEMORY;
        }
    }
    *out = L;
    return MOE_EP_OK;
}

/* build, first: the shape the core resolved, this rank's d_ff slice and the sizes. */
MOE_EP_PRIVATE void moe_ep__cuda_layer_shape(moe_ep_cuda_layer* L) {
    moe_ep_desc core = moe_ep_query(L->core);
    L->desc.top_k = core.top_k;
    L->desc.activation = core.activation;
    L->desc.scoring = core.scoring;
    L->router_cfg.scoring = (int)core.scoring;
    L->router_cfg.normalize = core.normalize_topk;
    L->router_cfg.groups = core.num_groups;
    L->router_cfg.topk_groups = core.topk_groups;
    L->router_cfg.scaling = core.routed_scaling_factor;
    L->desc.placement = core.placement;
    L->d_model = core.d_model;
    L->d_ff_full = L->d_ff = core.d_ff;
    L->num_experts = core.num_experts;
    L->top_k = core.top_k;
    L->activation = core.activation;
    L->act.activation = (int)core.activation;
    L->act.alpha = core.swiglu_alpha;
    L->act.limit = core.swiglu_limit;
    L->desc.swiglu_alpha = core.swiglu_alpha;
    L->desc.swiglu_limit = core.swiglu_limit;
    if (L->tp_size > 1) {
        /* rank t of T holds d_ff rows [t*F/T, (t+1)*F/T) */
        L->ff_begin = (int)((int64_t)L->d_ff_full * L->tp_rank / L->tp_size);
        L->d_ff = (int)((int64_t)L->d_ff_full * (L->tp_rank + 1) / L->tp_size) - L->ff_begin;
    }
    L->up_rows = moe_ep__cuda_gated(core.activation) ? 2 * L->d_ff : L->d_ff;
    L->sh_ff = L->desc.shared.d_ff;
    L->sh_up_rows = moe_ep__cuda_gated(core.activation) ? 2 * L->sh_ff : L->sh_ff;
    L->row_bytes = (size_t)L->d_model * L->elem;
}

/* build, step 1: the placement tables the plan kernels need, and this rank's experts checked. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_build_placement(moe_ep_cuda_layer* L) {
    const moe_ep_cuda_layer_desc* d = &L->desc;
    const moe_ep_allocator* a = &d->allocator;
    int e, l, f = 0, rank = L->rank, gated = moe_ep__cuda_gated(d->activation);
    int fused = d->weight_layout != MOE_EP_WEIGHT_LAYOUT_SEPARATE;   /* gate and up in w1 */
    L->local_experts = moe_ep_rank_expert_count(L->core, L->rank);
    for (e = 0, L->segments = 1; e < L->world_size; ++e)   /* a plan's segments: the most experts a rank holds */
        if (moe_ep_rank_expert_count(L->core, e) > L->segments) L->segments = moe_ep_rank_expert_count(L->core, e);
    L->owner_of = (int*)moe_ep_alloc(a, sizeof(int) * (size_t)L->num_experts);
    L->local_index_of = (int*)moe_ep_alloc(a, sizeof(int) * (size_t)L->num_experts);
    L->local_ids = (int*)moe_ep_alloc(a, sizeof(int) * (size_t)(L->local_experts > 0 ? L->local_experts : 1));
    if (!L->owner_of || !L->local_index_of || !L->local_ids)
        return moe_ep__cuda_fail(L, MOE_EP_ERROR_OUT_OF_MEMORY, "moe_ep_cuda_layer_create: out of memory");
    for (e = 0; e < L->num_experts; ++e) {
        L->owner_of[e] = moe_ep_expert_owner(L->core, e);
        L->local_index_of[e] = moe_ep_expert_local_index(L->core, e);
    }
    moe_ep_rank_experts(L->core, L->rank, L->local_ids, L->local_experts);
    if (d->expert_fn || L->local_experts == 0) return MOE_EP_OK;
    moe_ep__cuda_check(d, rank, &f, d->experts != NULL,
                       "moe_ep_cuda_layer_desc.experts must hold this rank's %d experts (or set expert_fn)",
                       L->local_experts);
    for (l = 0; d->experts && l < L->local_experts; ++l)
        moe_ep__cuda_check(d, rank, &f, d->experts[l].w1 && d->experts[l].w2 && (!gated || fused || d->experts[l].w3),
                           "moe_ep_cuda_layer_desc.experts[%d]: w1, w2%s must not be NULL", l,
                           gated && !fused ? " and w3" : "");
    return f ? MOE_EP_ERROR_INVALID_ARGUMENT : MOE_EP_OK;
}

/* build, step 2: the cuBLAS handle on the layer stream and, for grouped GEMMs, the host
   arrays per group and the device arrays of pointers filled per call. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_build_blas(moe_ep_cuda_layer* L) {
    const moe_ep_cuda_layer_desc* d = &L->desc;
    const moe_ep_allocator* a = &d->allocator;
    size_t n = (size_t)L->local_experts;
    int l;
    moe_ep_result res = moe_ep__cuda_blas(L, cublasCreate(&L->blas), "cublasCreate");
    if (res == MOE_EP_OK) res = moe_ep__cuda_blas(L, cublasSetStream(L->blas, L->stream), "cublasSetStream");
    /* fp32 stays fp32: no TF32 tensor-op math */
    if (res == MOE_EP_OK) res = moe_ep__cuda_blas(L, cublasSetMathMode(L->blas, CUBLAS_DEFAULT_MATH),
                                                  "cublasSetMathMode");
    /* with max_tokens cuBLAS gets a workspace of its own, so that a captured forward allocates
       nothing (the same with either planning: the same GEMM kernels) */
    if (res == MOE_EP_OK && d->max_tokens > 0)
        res = moe_ep__cuda_cuda(L, cudaMalloc(&L->blas_workspace, MOE_EP__CUDA_BLAS_WORKSPACE), "cuBLAS workspace");
    if (res == MOE_EP_OK && d->max_tokens > 0)
        res = moe_ep__cuda_blas(L, cublasSetWorkspace(L->blas, L->blas_workspace, MOE_EP__CUDA_BLAS_WORKSPACE),
                                "cublasSetWorkspace");
    if (res != MOE_EP_OK) return res;
    /* The Hopper kernel: bf16, a GPU it runs on, 16-byte rows of d_model and d_ff elements. */
    L->hopper = L->dtype == MOE_EP_CUDA_DTYPE_BF16 && !d->expert_fn && n > 0 && n <= 1024 &&
                L->d_model % 8 == 0 && L->d_ff % 8 == 0 && L->act.activation >= 1 && L->act.activation <= 4 &&
                (d->expert_gemm == MOE_EP_CUDA_EXPERT_GEMM_DEFAULT || d->expert_gemm == MOE_EP_CUDA_EXPERT_GEMM_HOPPER) &&
                moe_ep__cuda_k_gemm_ready();
    if (d->expert_gemm == MOE_EP_CUDA_EXPERT_GEMM_HOPPER && !L->hopper)
        return moe_ep__cuda_fail(L, MOE_EP_ERROR_UNSUPPORTED,
                                 "moe_ep_cuda_layer_create: expert_gemm HOPPER needs bf16, built-in experts (no "
                                 "expert_fn), 1 to 1024 local experts, d_model and d_ff (per TP rank) multiples of 8, "
                                 "and a compute capability 9.0 GPU with this build's sm_90a code");
    /* bf16 with TP: the down projections write fp32 partial sums, which grouped GEMMs
       (one type for A, B and C) cannot */
    L->grouped = d->expert_fn || n == 0 || d->expert_gemm == MOE_EP_CUDA_EXPERT_GEMM_LOOP || L->partial_f32 ? 0
                 : d->expert_gemm == MOE_EP_CUDA_EXPERT_GEMM_GROUPED ? 1 : 2;
    if (!L->grouped) return MOE_EP_OK;
    L->group_ints = (int*)moe_ep_alloc(a, sizeof(int) * 9 * n);
    L->group_scalars = (float*)moe_ep_alloc(a, sizeof(float) * 2 * n);
    L->group_ops = (cublasOperation_t*)moe_ep_alloc(a, sizeof(cublasOperation_t) * 2 * n);
    if (!L->group_ints || !L->group_scalars || !L->group_ops)
        return moe_ep__cuda_fail(L, MOE_EP_ERROR_OUT_OF_MEMORY, "moe_ep_cuda_layer_create: out of memory");
    for (l = 0; l < L->local_experts; ++l) {
        L->group_ints[8 * n + l] = 1;
        L->group_scalars[l] = 1.0f;
        L->group_scalars[n + l] = 0.0f;
        L->group_ops[l] = CUBLAS_OP_T;
        L->group_ops[n + l] = CUBLAS_OP_N;
    }
    res = moe_ep__cuda_cuda(L, cudaMallocHost((void**)&L->ptrs_host, sizeof(void*) * 6 * n), "expert GEMM arrays");
    if (res == MOE_EP_OK) res = moe_ep__cuda_cuda(L, cudaMalloc((void**)&L->ptrs_dev, sizeof(void*) * 6 * n),
                                                  "expert GEMM arrays");
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_cuda(L, cudaEventCreateWithFlags(&L->ptrs_uploaded, cudaEventDisableTiming),
                                "expert GEMM arrays");
    return res;
}

/* A tensor's view in the layout it was handed in, in elements: [i, c] sits at
   offset + i * row_stride + c * col_stride of a tensor of `count` elements. */
typedef struct moe_ep__cuda_view {
    const void* base;
    int64_t count, offset, row_stride, col_stride;
} moe_ep__cuda_view;

MOE_EP_PRIVATE moe_ep__cuda_view moe_ep__cuda_view_of(const void* base, int64_t count, int64_t offset,
                                                     int64_t row_stride, int64_t col_stride) {
    moe_ep__cuda_view v;
    v.base = base;
    v.count = count;
    v.offset = offset;
    v.row_stride = row_stride;
    v.col_stride = col_stride;
    return v;
}

enum { MOE_EP__CUDA_GATE, MOE_EP__CUDA_UP, MOE_EP__CUDA_DOWN, MOE_EP__CUDA_GATE_BIAS, MOE_EP__CUDA_UP_BIAS };

/* Where a part of one expert's FFN sits, for rows [f0, f0 + slice) of d_ff = F (the gate
   and up parts [slice, D], the down part [D, slice], the biases [slice, 1]); base NULL:
   not handed in. The layouts are moe_ep_weight_layout's, as the core reads them. */
MOE_EP_PRIVATE moe_ep__cuda_view moe_ep__cuda_part(const moe_ep_cuda_expert_weights* w, moe_ep_weight_layout layout,
                                                  int64_t F, int64_t f0, int64_t D, int part) {
    int separate = layout == MOE_EP_WEIGHT_LAYOUT_SEPARATE, fused = layout == MOE_EP_WEIGHT_LAYOUT_FUSED_GATE_UP;
    int oss = layout == MOE_EP_WEIGHT_LAYOUT_GPT_OSS, up = part == MOE_EP__CUDA_UP || part == MOE_EP__CUDA_UP_BIAS;
    const void* base;
    if (part == MOE_EP__CUDA_DOWN)      /* nn.Linear [D, F]; GPT-OSS and Llama-4 [F, D] */
        return separate || fused ? moe_ep__cuda_view_of(w->w2, D * F, f0, F, 1) : moe_ep__cuda_view_of(w->w2, F * D, f0 * D, 1, D);
    if (part == MOE_EP__CUDA_GATE || part == MOE_EP__CUDA_UP) {
        if (separate) return moe_ep__cuda_view_of(up ? w->w3 : w->w1, F * D, f0 * D, D, 1);
        if (fused) return moe_ep__cuda_view_of(w->w1, 2 * F * D, (up * F + f0) * D, D, 1);
        if (oss) return moe_ep__cuda_view_of(w->w1, 2 * F * D, 2 * f0 + up, 2, 2 * F);     /* interleaved columns */
        return moe_ep__cuda_view_of(w->w1, 2 * F * D, up * F + f0, 1, 2 * F);               /* Llama-4 */
    }
    base = separate && up ? w->b3 : w->b1;
    if (separate) return moe_ep__cuda_view_of(base, F, f0, 1, 0);
    if (oss) return moe_ep__cuda_view_of(base, 2 * F, 2 * f0 + up, 2, 0);
    return moe_ep__cuda_view_of(base, 2 * F, up * F + f0, 1, 0);
}

/* rows x cols of a view into dst, in the layer's dtype. Device memory is read where it is;
   anything else is copied to the device first. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_import(moe_ep_cuda_layer* L, moe_ep__cuda_view v, int64_t rows, int64_t cols,
                                                void* dst, const char* what) {
    struct cudaPointerAttributes attr;
    const void* src = v.base;
    moe_ep_result res = MOE_EP_OK;
    if (cudaPointerGetAttributes(&attr, v.base) != cudaSuccess) {
        (void)cudaGetLastError();
        attr.type = cudaMemoryTypeUnregistered;
    }
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) {
        size_t bytes = (size_t)v.count * L->elem;
        if (bytes > L->staging_bytes) {
            res = moe_ep__cuda_cuda(L, cudaStreamSynchronize(L->stream), what);  /* the old buffer may be in use */
            if (res == MOE_EP_OK) res = moe_ep__cuda_grow(L, &L->staging, &L->staging_bytes, bytes, 0, what);
        }
        if (res == MOE_EP_OK)
            res = moe_ep__cuda_cuda(L, cudaMemcpyAsync(L->staging, v.base, bytes, cudaMemcpyDefault, L->stream), what);
        src = L->staging;
    }
    if (res != MOE_EP_OK) return res;
    return moe_ep__cuda_kernel(L, moe_ep__cuda_k_strided_copy(src, v.offset, v.row_stride, v.col_stride, rows, cols, dst,
                                                              (int)L->elem, L->stream), what);
}

/* One FFN (rows [f0, f0 + slice) of width F) into the layer's layout: up [gate; up]
   [up_rows, D], down [D, slice], and the biases the caller has room for (b_up [up_rows],
   b_down [D]; parts not handed in stay as they are, zero). */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_import_ffn(moe_ep_cuda_layer* L, const moe_ep_cuda_expert_weights* w,
                                                    moe_ep_weight_layout layout, int64_t F, int64_t f0, int64_t slice,
                                                    void* up, void* down, void* b_up, void* b_down) {
    int64_t D = L->d_model;
    int gated = moe_ep__cuda_gated((moe_ep_activation)L->activation), part;
    moe_ep_result res = MOE_EP_OK;
    for (part = MOE_EP__CUDA_GATE; res == MOE_EP_OK && part <= MOE_EP__CUDA_UP_BIAS; ++part) {
        moe_ep__cuda_view v = moe_ep__cuda_part(w, layout, F, f0, D, part);
        int upper = part == MOE_EP__CUDA_UP || part == MOE_EP__CUDA_UP_BIAS;
        if (!v.base || (upper && !gated)) continue;
        if (part == MOE_EP__CUDA_DOWN)
            res = moe_ep__cuda_import(L, v, D, slice, down, "copying expert weights");
        else if (part <= MOE_EP__CUDA_UP)
            res = moe_ep__cuda_import(L, v, slice, D, (char*)up + (size_t)(upper * slice * D) * L->elem,
                                      "copying expert weights");
        else if (b_up)
            res = moe_ep__cuda_import(L, v, slice, 1, (char*)b_up + (size_t)(upper * slice) * L->elem,
                                      "copying expert biases");
    }
    if (res == MOE_EP_OK && w->b2 && b_down)
        res = moe_ep__cuda_import(L, moe_ep__cuda_view_of(w->b2, D, 0, 1, 0), D, 1, b_down, "copying expert biases");
    return res;
}

/* A zeroed device buffer, or none. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_zeroed(moe_ep_cuda_layer* L, void** buffer, size_t bytes, const char* what) {
    moe_ep_result res = moe_ep__cuda_cuda(L, cudaMalloc(buffer, bytes), what);
    if (res == MOE_EP_OK) res = moe_ep__cuda_cuda(L, cudaMemsetAsync(*buffer, 0, bytes, L->stream), what);
    return res;
}

/* build, step 3: the router copied to the device. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_build_router(moe_ep_cuda_layer* L) {
    const moe_ep_cuda_layer_desc* d = &L->desc;
    size_t bytes = (size_t)L->num_experts * L->row_bytes, E = (size_t)L->num_experts;
    moe_ep_result res = moe_ep__cuda_cuda(L, cudaMalloc(&L->router, bytes), "router weights");
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_cuda(L, cudaMemcpyAsync(L->router, d->router_weight, bytes, cudaMemcpyDefault, L->stream),
                                "copying the router weights");
    if (res == MOE_EP_OK && (d->router_bias || d->selection_bias))
        res = moe_ep__cuda_cuda(L, cudaMalloc((void**)&L->router_biases, 2 * E * sizeof(float)), "router biases");
    if (res == MOE_EP_OK && d->router_bias)
        res = moe_ep__cuda_cuda(L, cudaMemcpyAsync(L->router_biases, d->router_bias, E * sizeof(float),
                                                   cudaMemcpyHostToDevice, L->stream), "copying the router bias");
    if (res == MOE_EP_OK && d->selection_bias)
        res = moe_ep__cuda_cuda(L, cudaMemcpyAsync(L->router_biases + E, d->selection_bias, E * sizeof(float),
                                                   cudaMemcpyHostToDevice, L->stream),
                                "copying the selection bias");
    L->router_cfg.router_bias = d->router_bias ? L->router_biases : NULL;
    L->router_cfg.selection_bias = d->selection_bias ? L->router_biases + E : NULL;
    if (res == MOE_EP_OK) res = moe_ep__cuda_cuda(L, cudaStreamSynchronize(L->stream), "copying the router");
    return res;
}

/* build, step 4: this rank's expert weights (with TP only its slice: the gate and up rows
   [ff_begin, ff_begin + d_ff), those columns of down) and the shared experts, whole. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_build_weights(moe_ep_cuda_layer* L) {
    const moe_ep_cuda_layer_desc* d = &L->desc;
    size_t up_each = (size_t)L->up_rows * L->row_bytes, down_each = (size_t)L->d_ff * L->row_bytes, D = (size_t)L->d_model;
    moe_ep_result res = MOE_EP_OK;
    int l, up_bias = 0, down_bias = 0;
    if (L->sh_ff > 0) {
        const moe_ep_cuda_shared_desc* sh = &d->shared;
        size_t ff = (size_t)L->sh_ff;
        res = moe_ep__cuda_cuda(L, cudaMalloc(&L->sh_up, (size_t)L->sh_up_rows * L->row_bytes), "shared expert weights");
        if (res == MOE_EP_OK) res = moe_ep__cuda_cuda(L, cudaMalloc(&L->sh_down, ff * L->row_bytes), "shared expert weights");
        if (res == MOE_EP_OK && (sh->weights.b1 || sh->weights.b3))
            res = moe_ep__cuda_zeroed(L, &L->sh_b_up, (size_t)L->sh_up_rows * L->elem, "shared expert biases");
        if (res == MOE_EP_OK && sh->weights.b2)
            res = moe_ep__cuda_zeroed(L, &L->sh_b_down, D * L->elem, "shared expert biases");
        if (res == MOE_EP_OK)
            res = moe_ep__cuda_import_ffn(L, &sh->weights, MOE_EP_WEIGHT_LAYOUT_SEPARATE, L->sh_ff, 0, L->sh_ff, L->sh_up,
                                          L->sh_down, L->sh_b_up, L->sh_b_down);
        if (res == MOE_EP_OK && sh->gate) {
            res = moe_ep__cuda_cuda(L, cudaMalloc(&L->sh_gate, L->row_bytes), "shared expert gate");
            if (res == MOE_EP_OK)
                res = moe_ep__cuda_cuda(L, cudaMemcpyAsync(L->sh_gate, sh->gate, L->row_bytes, cudaMemcpyDefault,
                                                           L->stream), "copying the shared expert gate");
        }
    }
    if (res != MOE_EP_OK || d->expert_fn || L->local_experts == 0) return res;
    for (l = 0; l < L->local_experts; ++l) {
        up_bias |= d->experts[l].b1 != NULL || d->experts[l].b3 != NULL;
        down_bias |= d->experts[l].b2 != NULL;
    }
    res = moe_ep__cuda_cuda(L, cudaMalloc(&L->w_up, up_each * (size_t)L->local_experts), "expert weights");
    if (res == MOE_EP_OK) res = moe_ep__cuda_cuda(L, cudaMalloc(&L->w_down, down_each * (size_t)L->local_experts),
                                                  "expert weights");
    if (res == MOE_EP_OK && up_bias)
        res = moe_ep__cuda_zeroed(L, &L->b_up, (size_t)L->up_rows * L->elem * (size_t)L->local_experts, "expert biases");
    if (res == MOE_EP_OK && down_bias)
        res = moe_ep__cuda_zeroed(L, &L->b_down, D * L->elem * (size_t)L->local_experts, "expert biases");
    for (l = 0; res == MOE_EP_OK && l < L->local_experts; ++l)
        res = moe_ep__cuda_import_ffn(L, &d->experts[l], d->weight_layout, L->d_ff_full, L->ff_begin, L->d_ff,
                                      (char*)L->w_up + up_each * (size_t)l, (char*)L->w_down + down_each * (size_t)l,
                                      L->b_up ? (char*)L->b_up + (size_t)L->up_rows * L->elem * (size_t)l : NULL,
                                      L->b_down ? (char*)L->b_down + D * L->elem * (size_t)l : NULL);
    L->act.bias = L->b_up;
    return res;
}

/* The staging buffer is needed at create only. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_drop_staging(moe_ep_cuda_layer* L) {
    moe_ep_result res = moe_ep__cuda_cuda(L, cudaStreamSynchronize(L->stream), "copying the weights");
    cudaFree(L->staging);
    L->staging = NULL;
    L->staging_bytes = 0;
    return res;
}

/* create, step 5: the device state of a layer whose core context exists. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_build(moe_ep_cuda_layer* L) {
    moe_ep_result res;
    moe_ep__cuda_layer_shape(L);
    res = moe_ep__cuda_build_placement(L);
    if (res == MOE_EP_OK) res = moe_ep__cuda_build_blas(L);
    if (res == MOE_EP_OK && L->desc.router_weight) res = moe_ep__cuda_build_router(L);
    if (res == MOE_EP_OK) res = moe_ep__cuda_build_weights(L);
    if (res == MOE_EP_OK) res = moe_ep__cuda_drop_staging(L);
    if (res == MOE_EP_OK) res = moe_ep__cuda_reserve_all(L);
    /* the low-latency mode: the Hopper kernel where it runs, else CHUNKED; its region */
    if (res == MOE_EP_OK && L->ll && !L->hopper) L->desc.expert_gemm = MOE_EP_CUDA_EXPERT_GEMM_CHUNKED;
    if (res == MOE_EP_OK && L->ll) res = moe_ep__cuda_ll_local(L);
    if (res == MOE_EP_OK && (L->gpu_plan || L->ll)) res = moe_ep__cuda_build_gpu_plan(L);
    if (res == MOE_EP_OK) res = moe_ep__cuda_cuda(L, cudaStreamSynchronize(L->stream), "copying the weights");
    return res;
}

MOE_EP_API moe_ep_result moe_ep_cuda_layer_create(const moe_ep_cuda_layer_desc* desc, moe_ep_cuda_layer** out) {
    moe_ep_cuda_layer_desc d;
    moe_ep_cuda_layer* L = NULL;
    moe_ep_desc core;
    moe_ep_result res;
    if (!desc || !out) return MOE_EP_ERROR_INVALID_ARGUMENT;
    /* without an exchange there is nobody to tell: fail locally */
    if (!desc->transport || !desc->transport->exchange_counts || desc->transport->world_size <= 0) {
        if (desc->logger.func)
            desc->logger.func("moe_ep_cuda", 1, MOE_EP_LOG_ITEM_NONE, desc->transport ? desc->transport->rank : -1,
                              "moe_ep_cuda_layer_desc.transport must be a transport with exchange_counts "
                              "that moves device memory", desc->logger.user_data);
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    /* 1. defaults and the rank-local rules */
    d = moe_ep__cuda_desc_defaults(desc);
    res = moe_ep__cuda_validate(&d) ? MOE_EP_ERROR_INVALID_ARGUMENT : MOE_EP_OK;
    /* half an allocator is refused above; never allocate with one half and free with the other */
    if ((d.allocator.alloc_fn == NULL) != (d.allocator.free_fn == NULL)) memset(&d.allocator, 0, sizeof d.allocator);
    /* 2. the layer */
    if (res == MOE_EP_OK) res = moe_ep__cuda_layer_alloc(&d, &L);
    /* 3. the same verdict and GPU parameters on every rank of the replica */
    res = moe_ep__cuda_create_agree(&d, res);
    if (res != MOE_EP_OK) {
        if (L) moe_ep__cuda_layer_free(L);
        return res;
    }
    /* 4. the core context (its own agreement) plans for the EP group */
    core = moe_ep__cuda_core_desc(L, &d);
    res = moe_ep_create(&core, &L->core);
    /* 5. device state */
    if (res == MOE_EP_OK) res = moe_ep__cuda_build(L);
    /* 6. the direct path or the low-latency mode's regions, collective over the EP group
       whatever happened above */
    if (L->ll) res = moe_ep__cuda_ll_setup(L, res);
    else if (L->world_size > 1 && L->desc.max_tokens > 0 && L->desc.direct != MOE_EP_CUDA_DIRECT_OFF)
        res = moe_ep__cuda_direct_setup(L, res);
    /* 7. agree again (any rank can run out of memory), over the EP and the TP group */
    res = moe_ep__cuda_verdict(L, res, "moe_ep_cuda_layer_create");
    if (res != MOE_EP_OK) {
        moe_ep__cuda_layer_free(L);
        return res;
    }
    *out = L;
    return MOE_EP_OK;
}

MOE_EP_API void moe_ep_cuda_layer_destroy(moe_ep_cuda_layer* layer) {
    if (layer) moe_ep__cuda_layer_free(layer);
}

MOE_EP_API moe_ep_context* moe_ep_cuda_layer_context(moe_ep_cuda_layer* layer) { return layer ? layer->core : NULL; }
MOE_EP_API const char* moe_ep_cuda_layer_last_error(const moe_ep_cuda_layer* layer) {
    return layer ? layer->last_error : "";
}
MOE_EP_API cudaStream_t moe_ep_cuda_layer_stream(const moe_ep_cuda_layer* layer) { return layer ? layer->stream : 0; }
MOE_EP_API int moe_ep_cuda_layer_direct(const moe_ep_cuda_layer* layer) {
    return layer ? layer->direct || (layer->ll_mapped && layer->world_size > 1) : 0;
}

MOE_EP_API void moe_ep_cuda_layer_abort(moe_ep_cuda_layer* layer) {
    volatile int* ctl = layer ? (volatile int*)layer->ctl_host : NULL;
    if (ctl && !ctl[1]) ctl[1] = 2;    /* read by the waiting kernels through the mapping */
}

MOE_EP_API void moe_ep_cuda_layer_rows(moe_ep_cuda_layer* layer, void** recv, void** out, int64_t* rows) {
    int full = layer && layer->desc.max_tokens > 0 && !layer->ll;
    if (recv) *recv = full ? layer->recv : NULL;
    if (out) *out = full ? layer->out : NULL;
    if (rows) *rows = !full ? 0 : layer->direct ? layer->region_rows : (int64_t)(layer->recv_bytes / layer->row_bytes);
}

MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_enter(moe_ep_cuda_layer* L) {
    moe_ep_result res = moe_ep__cuda_direct_check(L);
    if (res != MOE_EP_OK) return res;
    if (L->broken)
        return moe_ep__cuda_fail(L, MOE_EP_ERROR_ABORTED,
                                 "moe_ep_cuda: an earlier wait timed out and aborted the transport");
    return moe_ep__cuda_cuda(L, cudaSetDevice(L->device), "cudaSetDevice");
}

MOE_EP_API moe_ep_result moe_ep_cuda_layer_check(moe_ep_cuda_layer* layer) {
    moe_ep_result res;
    if (!layer) return MOE_EP_ERROR_INVALID_ARGUMENT;
    res = moe_ep__cuda_direct_check(layer);
    if (res == MOE_EP_OK && layer->broken)
        res = moe_ep__cuda_fail(layer, MOE_EP_ERROR_ABORTED,
                                "moe_ep_cuda: an earlier wait timed out or was aborted, and aborted the transport");
    return res;
}

/* >>gpu layer: router */
MOE_EP_API moe_ep_result moe_ep_cuda_route(moe_ep_cuda_layer* L, const void* x, int64_t tokens, int32_t* topk_idx,
                                           float* topk_weight) {
    moe_ep_result res;
    size_t slots, idx_bytes;
    int32_t* idx_dev;
    float* weight_dev;
    if (!L) return MOE_EP_ERROR_INVALID_ARGUMENT;
    res = moe_ep__cuda_enter(L);
    if (res != MOE_EP_OK) return res;
    if (!L->router)
        return moe_ep__cuda_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT,
                                 "moe_ep_cuda_route: the layer has no router_weight: hand in routing instead");
    if (tokens < 0)
        return moe_ep__cuda_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT, "moe_ep_cuda_route: tokens (%lld) must be >= 0",
                                 (long long)tokens);
    if (tokens == 0) return MOE_EP_OK;
    if (!x || !topk_idx || !topk_weight)
        return moe_ep__cuda_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT,
                                 "moe_ep_cuda_route: x, topk_idx and topk_weight must not be NULL when tokens > 0");
    if (L->desc.max_tokens > 0 && tokens > L->desc.max_tokens)
        return moe_ep__cuda_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT,
                                 "moe_ep_cuda_route: tokens (%lld) must be <= max_tokens (%lld)",
                                 (long long)tokens, (long long)L->desc.max_tokens);
    res = moe_ep__cuda_reserve_router(L, tokens);
    if (res != MOE_EP_OK) return res;
    slots = (size_t)tokens * (size_t)L->top_k;
    idx_bytes = moe_ep__cuda_round16(slots * sizeof(int32_t));
    idx_dev = (int32_t*)L->topk_dev;
    weight_dev = (float*)((char*)L->topk_dev + idx_bytes);
    res = moe_ep__cuda_linear(L, L->blas, L->router, L->num_experts, L->d_model, x, L->d_model, tokens, L->logits,
                              L->num_experts, CUDA_R_32F, "router logits");
    if (res != MOE_EP_OK) return res;
    res = moe_ep__cuda_cuda(L, (cudaError_t)moe_ep__cuda_k_topk((const float*)L->logits, tokens, L->num_experts,
                                                                L->top_k, &L->router_cfg, idx_dev, weight_dev,
                                                                L->stream),
                            "router top-k kernel");
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_cuda(L, cudaMemcpyAsync(L->topk_host, L->topk_dev, idx_bytes + slots * sizeof(float),
                                                   cudaMemcpyDeviceToHost, L->stream), "router download");
    if (res != MOE_EP_OK) return res;
    res = moe_ep__cuda_wait(L, "moe_ep_cuda_route");
    if (res != MOE_EP_OK) return res;
    memcpy(topk_idx, L->topk_host, slots * sizeof(int32_t));
    memcpy(topk_weight, (char*)L->topk_host + idx_bytes, slots * sizeof(float));
    return MOE_EP_OK;
}

/* >>gpu layer: plan */
MOE_EP_PRIVATE int64_t moe_ep__cuda_routing_hash(const int32_t* idx, const float* weight, int64_t slots) {
    uint64_t h = MOE_EP_HASH_SEED;
    if (idx && slots > 0) h = moe_ep_hash(h, idx, sizeof(int32_t) * (size_t)slots);
    if (weight && slots > 0) h = moe_ep_hash(h, weight, sizeof(float) * (size_t)slots);
    return (int64_t)(h & 0x7FFFFFFFFFFFFFFFull);
}

/* Keeps one set of plan buffers for the next plan, preferring the full-size set. Plans
   are created and destroyed collectively, so every rank makes the same choice. */
MOE_EP_PRIVATE void moe_ep__cuda_release_buffers(moe_ep_cuda_layer* L, moe_ep__cuda_buffers* b) {
    if (!L->has_spare || (b->full && !L->spare.full)) {
        moe_ep__cuda_buffers old = L->spare;
        int had = L->has_spare;
        L->spare = *b;
        L->has_spare = 1;
        if (!had) return;
        *b = old;
    }
    cudaStreamSynchronize(L->stream);   /* the GPU may still read them */
    moe_ep__cuda_free_buffers(b);
}

/* Uploads the core plan's slot rows, the routing and a few small tables in one copy; two
   kernels then build where each (token, slot) row lives (the slot map) and, staged,
   where each staged row goes. The host only copies arrays, never walks the slots. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_upload_plan(moe_ep_cuda_layer* L, moe_ep_cuda_plan* P, const int32_t* idx,
                                                      const float* weight) {
    const moe_ep_plan_info* in = &P->info;
    int64_t slots = in->tokens * L->top_k;
    int S = in->segments, me = L->rank, q, s, e, chunks = 0;
    moe_ep__cuda_meta m = moe_ep__cuda_meta_layout(L, slots, P->remote_rows);
    char* host = (char*)P->bufs.meta_host;
    char* dev = (char*)P->bufs.meta;
    int32_t* owner_local = (int32_t*)(host + m.owner);
    int64_t* shift = (int64_t*)(host + m.shift);
    int64_t* chunk_start = (int64_t*)(host + m.chunk_start);
    int64_t* chunk_dest = (int64_t*)(host + m.chunk_dest);
    moe_ep_result res;
    if (S != L->segments) return moe_ep__cuda_fail(L, MOE_EP_ERROR_INTERNAL, "plan has %d segments, expected %d", S,
                                                   L->segments);
    if (P->bufs.uploaded) {
        res = moe_ep__cuda_cuda(L, cudaEventSynchronize(P->bufs.uploaded), "plan upload");
        if (res != MOE_EP_OK) return res;
    } else {
        res = moe_ep__cuda_cuda(L, cudaEventCreateWithFlags(&P->bufs.uploaded, cudaEventDisableTiming), "plan upload");
        if (res != MOE_EP_OK) return res;
    }
    if (slots > 0) {
        memcpy(host + m.rows, in->slot_rows, (size_t)slots * 8);
        memcpy(host + m.idx, idx, (size_t)slots * 4);
        memcpy(host + m.weight, in->topk_weight, (size_t)slots * 4);   /* 1 with scale_expert_input */
        if (L->desc.scale_expert_input) memcpy(host + m.scale, weight, (size_t)slots * 4);
    }
    if (L->local_experts > 0)
        memcpy(host + m.first_row, in->local_expert_offsets, sizeof(int64_t) * (size_t)L->local_experts);
    memcpy(host + m.first_row + (size_t)L->local_experts * 8, &in->recv_rows, sizeof(int64_t));  /* the rows' end */
    for (e = 0; e < L->num_experts; ++e) owner_local[e] = L->owner_of[e] == me ? L->local_index_of[e] : -1;
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
    P->scale = L->desc.scale_expert_input ? (float*)(dev + m.scale) : NULL;
    P->first_row = (int64_t*)(dev + m.first_row);
    P->stage_map = (int32_t*)(dev + m.stage);
    P->dest = (int64_t*)(dev + m.dest);
    res = moe_ep__cuda_cuda(L, cudaMemcpyAsync(dev, host, m.upload, cudaMemcpyHostToDevice, L->stream), "plan upload");
    if (res == MOE_EP_OK) res = moe_ep__cuda_cuda(L, cudaEventRecord(P->bufs.uploaded, L->stream), "plan upload");
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_cuda(L, (cudaError_t)moe_ep__cuda_k_slot_map((const int64_t*)(dev + m.rows),
                                                                        (const int32_t*)(dev + m.idx),
                                                                        (const int32_t*)(dev + m.owner),
                                                                        (const int64_t*)(dev + m.shift), slots,
                                                                        P->slot_map, L->stream), "slot map kernel");
    if (res == MOE_EP_OK && L->direct) {
        /* publish this rank's receive offsets, then learn where each slot's row goes */
        uint64_t epoch = ++L->plan_epoch;
        res = moe_ep__cuda_kernel(L, moe_ep__cuda_k_direct_publish(L->direct_args, (const int64_t*)(dev + m.table),
                                                                   (int64_t)L->world_size * S, epoch, L->stream),
                                  "direct publish kernel");
        if (res == MOE_EP_OK)
            res = moe_ep__cuda_kernel(L, moe_ep__cuda_k_direct_resolve(L->direct_args, P->slot_map, (const int32_t*)(dev + m.idx),
                                                                       L->expert_at, L->num_experts,
                                                                       (const int64_t*)(dev + m.send_off), S, slots,
                                                                       P->dest, epoch, L->stream),
                                      "direct resolve kernel");
        return res;
    }
    if (res == MOE_EP_OK && L->desc.a2a_layout == MOE_EP_CUDA_A2A_STAGED)
        res = moe_ep__cuda_cuda(L, (cudaError_t)moe_ep__cuda_k_stage_map((const int64_t*)(dev + m.chunk_start),
                                                                         (const int64_t*)(dev + m.chunk_dest), chunks,
                                                                         P->remote_rows, P->stage_map, L->stream),
                                "stage map kernel");
    return res;
}

/* Over the TP group first, whose ranks must hand in the same tokens and routing: then they
   receive the same rows, and the EP exchange after it takes any failure to every rank of
   the replica. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_plan_tp_check(moe_ep_cuda_layer* L, int64_t tokens, const int32_t* idx,
                                                        const float* weight, moe_ep_result status) {
    int64_t facts[2];
    moe_ep_agree_desc a = moe_ep__cuda_agree_step(NULL, status, &L->desc.allocator);
    facts[0] = tokens;
    facts[1] = status == MOE_EP_OK ? moe_ep__cuda_routing_hash(idx, weight, tokens * L->top_k) : 0;
    a.facts = facts;
    a.fact_count = 2;
    a.facts_name = "tokens or routing (a tensor-parallel group must share both)";
    a.on_mismatch = MOE_EP_ERROR_INVALID_ARGUMENT;
    return moe_ep__cuda_agree(L, &L->tp, status, &a, "moe_ep_cuda_plan_create");
}

/* Buffers sized for the plan (forward: the forward's own expert-side rows too), then every
   rank agrees: any rank can run out of memory. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_plan_reserve(moe_ep_cuda_layer* L, moe_ep_cuda_plan* P, int forward) {
    moe_ep_result status = MOE_EP_OK;
    if (P->info.send_rows > 0x3FFFFFFF || P->info.recv_rows > 0x3FFFFFFF)
        status = moe_ep__cuda_fail(L, MOE_EP_ERROR_UNSUPPORTED, "moe_ep_cuda_plan_create: more than 2^30 rows");
    if (status == MOE_EP_OK)
        status = moe_ep__cuda_reserve_plan(L, &P->bufs, P->info.tokens * L->top_k, P->info.send_rows, P->remote_rows);
    if (status == MOE_EP_OK) status = moe_ep__cuda_reserve_experts(L, P->info.recv_rows, forward);
    return moe_ep__cuda_verdict(L, status, "moe_ep_cuda_plan_create");
}

/* forward: also size the forward's own expert-side buffers. With full-size buffers at
   hand nothing after the count exchange can fail, so no further agreement is needed;
   otherwise buffers are sized and then every rank agrees. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_plan_build(moe_ep_cuda_layer* L, int64_t tokens, const int32_t* idx,
                                                     const float* weight, moe_ep_result status, int forward,
                                                     moe_ep_cuda_plan** out) {
    moe_ep_cuda_plan* P = NULL;
    moe_ep_plan* core = NULL;
    moe_ep_result res;
    int reserved = L->has_spare && L->spare.full;
    if (status == MOE_EP_OK && L->desc.max_tokens > 0 && tokens > L->desc.max_tokens)
        status = moe_ep__cuda_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT, "tokens (%lld) must be <= max_tokens (%lld)",
                                   (long long)tokens, (long long)L->desc.max_tokens);
    if (status == MOE_EP_OK) {
        P = (moe_ep_cuda_plan*)moe_ep_alloc(&L->desc.allocator, sizeof *P + sizeof(int64_t) * 4 *
                                            (size_t)L->world_size * (size_t)L->segments);
        if (!P) status = moe_ep__cuda_fail(L, MOE_EP_ERROR_OUT_OF_MEMORY, "moe_ep_cuda_plan_create: out of memory");
    }
    if (L->tp_size > 1) status = moe_ep__cuda_plan_tp_check(L, tokens, idx, weight, status);
    if (status != MOE_EP_OK) {
        /* take part in the count exchange with an invalid call: every other rank fails too */
        moe_ep_free(&L->desc.allocator, P);
        moe_ep_plan_create(L->core, -1, NULL, NULL, &core);
        return status;
    }
    res = moe_ep_plan_create(L->core, tokens, idx, weight, &core);
    if (res != MOE_EP_OK) {
        moe_ep_free(&L->desc.allocator, P);
        return moe_ep__cuda_fail(L, res, "%s", moe_ep_last_error(L->core));
    }
    memset(P, 0, sizeof *P);
    P->a2a_rows = (int64_t*)(P + 1);
    P->layer = L;
    P->core = core;
    P->info = moe_ep_plan_query(core);
    P->remote_rows = P->info.recv_rows - P->info.recv_counts[L->rank];
    if (L->has_spare) {
        P->bufs = L->spare;
        L->has_spare = 0;
    }
    if (!reserved) status = moe_ep__cuda_plan_reserve(L, P, forward);
    if (status == MOE_EP_OK) status = moe_ep__cuda_upload_plan(L, P, idx, weight);
    if (status == MOE_EP_OK) {
        *out = P;
        return MOE_EP_OK;
    }
    moe_ep__cuda_release_buffers(L, &P->bufs);
    moe_ep_free(&L->desc.allocator, P);
    moe_ep_plan_destroy(core);
    return status;
}

MOE_EP_API moe_ep_result moe_ep_cuda_plan_create(moe_ep_cuda_layer* L, int64_t tokens, const int32_t* topk_idx,
                                                 const float* topk_weight, moe_ep_cuda_plan** out) {
    moe_ep_result status = L ? moe_ep__cuda_enter(L) : MOE_EP_ERROR_INVALID_ARGUMENT;
    if (status != MOE_EP_OK) return status;
    if (L->ll) return moe_ep__cuda_fail(L, MOE_EP_ERROR_UNSUPPORTED, "moe_ep_cuda_plan_create: the stage calls are "
                                        "not available in low-latency mode (moe_ep_cuda_layer_desc.mode): use "
                                        "moe_ep_cuda_forward");
    if (!out) status = moe_ep__cuda_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT,
                                         "moe_ep_cuda_plan_create: out must not be NULL");
    else if (tokens < 0)
        status = moe_ep__cuda_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT,
                                   "moe_ep_cuda_plan_create: tokens (%lld) must be >= 0",
                                   (long long)tokens);
    return moe_ep__cuda_plan_build(L, tokens, topk_idx, topk_weight, status, 0, out);
}

MOE_EP_API void moe_ep_cuda_plan_destroy(moe_ep_cuda_plan* P) {
    moe_ep_cuda_layer* L;
    if (!P) return;
    L = P->layer;
    cudaSetDevice(L->device);
    if (P->request) {
        /* an open split-phase exchange: close it and let it finish before its buffers go */
        char err[MOE_EP__CUDA_ERR] = "";
        L->transport.all_to_all_v_end(L->transport.impl, P->request, err, sizeof err);
        P->request = NULL;
        cudaStreamSynchronize(L->stream);
    }
    if (P->xfer) {
        /* dispatched directly but never combined: free the peers' next dispatch all the same */
        if (!P->out_sent) moe_ep__cuda_k_direct_signal(L->direct_args, MOE_EP__CUDA_PHASE_OUT, P->xfer, L->stream);
        if (L->open_plan == P) L->open_plan = NULL;
    }
    moe_ep__cuda_release_buffers(L, &P->bufs);
    moe_ep_plan_destroy(P->core);
    moe_ep_free(&L->desc.allocator, P);
}

MOE_EP_API moe_ep_plan_info moe_ep_cuda_plan_query(const moe_ep_cuda_plan* plan) {
    moe_ep_plan_info info;
    if (plan) return plan->info;
    memset(&info, 0, sizeof info);
    return info;
}

/* >>gpu layer: exchanges */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_check_stage(moe_ep_cuda_layer* L, moe_ep_cuda_plan* P, const char* stage,
                                                      int pending_expected) {
    moe_ep_result res = L ? moe_ep__cuda_enter(L) : MOE_EP_ERROR_INVALID_ARGUMENT;
    const char* wrong = NULL;
    if (res != MOE_EP_OK) return res;
    if (!P || P->layer != L) wrong = "plan is NULL or belongs to another layer";
    else if (P->pending != pending_expected)
        wrong = P->pending ? "a split-phase operation on this plan is still open"
                           : "no split-phase operation is open on this plan";
    return wrong ? moe_ep__cuda_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT, "%s: %s", stage, wrong) : MOE_EP_OK;
}

/* The layer's rows over the network as all-to-all-v arguments (device memory, the layer's
   stream). forward: the token side sends (dispatch); else the expert side (combine). Own-
   rank rows never travel: their counts are 0. STAGED: one message per peer into (out of)
   the staging buffer; SEGMENTED: one per (peer, local expert), straight into place. */
MOE_EP_PRIVATE void moe_ep__cuda_exchange_args(moe_ep_cuda_layer* L, moe_ep_cuda_plan* P, int forward,
                                               char* expert_rows) {
    const moe_ep_plan_info* in = &P->info;
    int S = in->segments, staged = L->desc.a2a_layout == MOE_EP_CUDA_A2A_STAGED, per = staged ? 1 : S, p, s;
    int64_t n = (int64_t)L->world_size * per, stage_row = 0;
    int64_t *token_counts = P->a2a_rows, *token_offsets = token_counts + n;
    int64_t *expert_counts = token_offsets + n, *expert_offsets = expert_counts + n;
    moe_ep_a2a_args* a = &P->a2a;
    for (p = 0; p < L->world_size; ++p)
        for (s = 0; s < per; ++s) {
            int64_t i = (int64_t)p * per + s, seg = (int64_t)p * S + s;
            int mine = p == L->rank;
            token_counts[i] = mine ? 0 : staged ? in->send_counts[p] : in->seg_send_counts[seg];
            token_offsets[i] = in->seg_send_offsets[seg];
            expert_counts[i] = mine ? 0 : staged ? in->recv_counts[p] : in->seg_recv_counts[seg];
            expert_offsets[i] = staged ? stage_row : in->seg_recv_offsets[seg];
            stage_row += expert_counts[i];
        }
    memset(a, 0, sizeof *a);
    a->row_bytes = L->row_bytes;
    a->segments = per;
    a->memory_space = MOE_EP_MEMORY_DEVICE;
    a->stream = (void*)L->stream;
    if (staged) expert_rows = (char*)P->bufs.stage;
    a->send = forward ? P->bufs.send : (const void*)expert_rows;
    a->recv = forward ? (void*)expert_rows : P->bufs.send;
    a->send_counts = forward ? token_counts : expert_counts;
    a->send_offsets = forward ? token_offsets : expert_offsets;
    a->recv_counts = forward ? expert_counts : token_counts;
    a->recv_offsets = forward ? expert_offsets : token_offsets;
}

/* Starts the exchange through the transport's split-phase form (or its blocking one, when
   it has none); the layer stream is free for local work until moe_ep__cuda_finish. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_start(moe_ep_cuda_layer* L, moe_ep_cuda_plan* P, int forward,
                                                char* expert_rows) {
    char err[MOE_EP__CUDA_ERR] = "";
    const moe_ep_transport* t = &L->transport;
    moe_ep_result res;
    if (L->world_size == 1) return MOE_EP_OK;
    moe_ep__cuda_exchange_args(L, P, forward, expert_rows);
    res = t->all_to_all_v_begin ? t->all_to_all_v_begin(t->impl, &P->a2a, &P->request, err, sizeof err)
                                : t->all_to_all_v(t->impl, &P->a2a, err, sizeof err);
    if (res != MOE_EP_OK) {
        P->request = NULL;
        return moe_ep__cuda_net_fail(L, res, forward ? "moe_ep_cuda_dispatch" : "moe_ep_cuda_combine", err);
    }
    return MOE_EP_OK;
}

MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_finish(moe_ep_cuda_layer* L, moe_ep_cuda_plan* P) {
    char err[MOE_EP__CUDA_ERR] = "";
    moe_ep_result res;
    void* request = P->request;
    if (!request) return MOE_EP_OK;
    P->request = NULL;
    res = L->transport.all_to_all_v_end(L->transport.impl, request, err, sizeof err);
    if (res != MOE_EP_OK) return moe_ep__cuda_net_fail(L, res, "split-phase exchange", err);
    return MOE_EP_OK;
}

/* >>gpu layer: dispatch */
/* Rows for the network are gathered first; the exchange then runs on the side stream
   while the rows that stay on this rank are gathered beside it. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_dispatch_begin(moe_ep_cuda_layer* L, moe_ep_cuda_plan* P, const void* x,
                                                         void* recv_rows) {
    moe_ep_result res = moe_ep__cuda_check_stage(L, P, "moe_ep_cuda_dispatch", 0);
    int alone = L->world_size == 1, per_row = L->top_k;
    int64_t sources = P ? P->info.tokens : 0;
    if (res != MOE_EP_OK) return res;
    if ((P->info.tokens > 0 && !x) || (P->info.recv_rows > 0 && !recv_rows))
        return moe_ep__cuda_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT,
                                 "moe_ep_cuda_dispatch: x and recv_rows must not be NULL");
    if (P->scale && sources > 0) {
        /* scale_expert_input: one row per (token, k-slot), already weighted; the slot map and
           the direct path's dest are indexed by slot, so these rows move as tokens of one slot */
        res = moe_ep__cuda_grow(L, &L->scaled, &L->scaled_bytes, (size_t)(sources * L->top_k) * L->row_bytes, 0,
                                "moe_ep_cuda_dispatch: scaled rows");
        if (res == MOE_EP_OK)
            res = moe_ep__cuda_kernel(L, moe_ep__cuda_k_scale_rows(x, P->scale, sources, L->top_k, L->d_model, L->scaled,
                                                                   moe_ep__cuda_kdtype[L->dtype], L->stream),
                                      "input scaling kernel");
        if (res != MOE_EP_OK) return res;
        x = L->scaled;
        sources *= L->top_k;
        per_row = 1;
    }
    if (L->direct) {
        /* one store per row into its owner's region; the wait is in dispatch_end */
        uint64_t epoch;
        if (L->open_plan)
            return moe_ep__cuda_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT,
                                     "moe_ep_cuda_dispatch: the plan dispatched before must be combined first "
                                     "(the direct path has one set of buffers)");
        epoch = L->xfer_epoch + 1;
        res = moe_ep__cuda_kernel(L, moe_ep__cuda_k_direct_push(L->direct_args, x, P->dest, sources, per_row,
                                                                L->row_bytes, epoch, L->stream), "direct push kernel");
        if (res != MOE_EP_OK) return res;
        L->xfer_epoch = epoch;
        L->open_plan = P;
        P->xfer = epoch;
        P->out_sent = 0;
        P->pending = 1;
        P->open_rows = recv_rows;
        return MOE_EP_OK;
    }
    res = moe_ep__cuda_cuda(L, (cudaError_t)moe_ep__cuda_k_permute(x, P->bufs.send, recv_rows, P->slot_map, sources,
                                                                   per_row, L->row_bytes, alone ? 3 : 1, L->stream),
                            "permute kernel");
    if (res == MOE_EP_OK && !alone) res = moe_ep__cuda_start(L, P, 1, (char*)recv_rows);
    if (res == MOE_EP_OK && !alone)
        res = moe_ep__cuda_cuda(L, (cudaError_t)moe_ep__cuda_k_permute(x, P->bufs.send, recv_rows, P->slot_map,
                                                                       sources, per_row, L->row_bytes, 2, L->stream),
                                "permute kernel");
    if (res != MOE_EP_OK) return res;
    P->pending = 1;
    P->open_rows = recv_rows;
    return MOE_EP_OK;
}

MOE_EP_API moe_ep_result moe_ep_cuda_dispatch_end(moe_ep_cuda_layer* L, moe_ep_cuda_plan* P) {
    moe_ep_result res = moe_ep__cuda_check_stage(L, P, "moe_ep_cuda_dispatch_end", 1);
    if (res != MOE_EP_OK) return res;
    P->pending = 0;
    if (P->xfer) {
        res = moe_ep__cuda_kernel(L, moe_ep__cuda_k_direct_wait(L->direct_args, MOE_EP__CUDA_PHASE_DATA, P->xfer, L->stream),
                                  "direct wait kernel");
        if (res == MOE_EP_OK && P->open_rows != L->recv && P->info.recv_rows > 0)
            res = moe_ep__cuda_cuda(L, cudaMemcpyAsync(P->open_rows, L->recv, (size_t)P->info.recv_rows * L->row_bytes,
                                                       cudaMemcpyDeviceToDevice, L->stream), "moe_ep_cuda_dispatch");
        return res;
    }
    res = moe_ep__cuda_finish(L, P);
    if (res == MOE_EP_OK && L->desc.a2a_layout == MOE_EP_CUDA_A2A_STAGED)
        res = moe_ep__cuda_cuda(L, (cudaError_t)moe_ep__cuda_k_move_rows(P->bufs.stage, P->open_rows, P->stage_map,
                                                                         P->remote_rows, L->row_bytes, 1, L->stream),
                                "regroup kernel");
    return res;
}

MOE_EP_API moe_ep_result moe_ep_cuda_dispatch_begin(moe_ep_cuda_layer* L, moe_ep_cuda_plan* P, const void* x,
                                                    void* recv_rows) {
    return moe_ep__cuda_dispatch_begin(L, P, x, recv_rows);
}

MOE_EP_API moe_ep_result moe_ep_cuda_dispatch(moe_ep_cuda_layer* L, moe_ep_cuda_plan* P, const void* x,
                                              void* recv_rows) {
    moe_ep_result res = moe_ep__cuda_dispatch_begin(L, P, x, recv_rows);
    if (res != MOE_EP_OK) return res;
    return moe_ep_cuda_dispatch_end(L, P);
}

/* >>gpu layer: experts */
/* All experts' up projections in one grouped GEMM (one group per non-empty expert), one
   activation pass, all down projections in another. MOE_EP_ERROR_UNSUPPORTED when this
   cuBLAS refuses the types, before anything is queued. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_grouped_experts(moe_ep_cuda_layer* L, moe_ep_cuda_plan* P, const void* rows,
                                                          void* out) {
    size_t rb = L->row_bytes, hb = (size_t)L->up_rows * L->elem;
    int* m = L->group_ints;
    int E = L->local_experts;
    int *n = m + E, *k = m + 2 * E, *lda = m + 3 * E, *ldb = m + 4 * E, *ldc = m + 5 * E;
    int* sizes = m + 8 * E;
    cudaDataType_t t = moe_ep__cuda_cuda_type(L);
    int g = 0, l, pass;
    cublasStatus_t st;
    moe_ep_result res;
    void** ptr = L->ptrs_host;
    /* the previous call's upload must be done before its pinned source is rewritten */
    res = moe_ep__cuda_cuda(L, cudaEventSynchronize(L->ptrs_uploaded), "expert GEMM arrays");
    if (res != MOE_EP_OK) return res;
    for (l = 0; l < E; ++l) {
        int64_t rows_l = P->info.local_expert_counts[l], first = P->info.local_expert_offsets[l];
        if (rows_l == 0) continue;
        n[g] = (int)rows_l;
        ptr[g] = (char*)L->w_up + (size_t)l * L->up_rows * rb;
        ptr[E + g] = (char*)(uintptr_t)rows + (size_t)first * rb;
        ptr[2 * E + g] = (char*)L->hidden + (size_t)first * hb;
        ptr[3 * E + g] = (char*)L->w_down + (size_t)l * L->d_ff * rb;
        ptr[4 * E + g] = (char*)L->hidden + (size_t)first * hb;
        ptr[5 * E + g] = (char*)out + (size_t)first * rb;
        ++g;
    }
    res = moe_ep__cuda_cuda(L, cudaMemcpyAsync(L->ptrs_dev, L->ptrs_host, sizeof(void*) * 6 * (size_t)E,
                                               cudaMemcpyHostToDevice, L->stream), "expert GEMM arrays");
    if (res == MOE_EP_OK) res = moe_ep__cuda_cuda(L, cudaEventRecord(L->ptrs_uploaded, L->stream), "expert GEMM arrays");
    for (pass = 0; res == MOE_EP_OK && pass < 2; ++pass) {
        void** dev = L->ptrs_dev + 3 * (size_t)pass * E;
        int i;
        for (i = 0; i < g; ++i) {   /* up: [n, up_rows] = rows . w_up^T; down: [n, d] = hidden . w_down^T */
            m[i] = pass ? L->d_model : L->up_rows;
            k[i] = pass ? L->d_ff : L->d_model;
            lda[i] = k[i];
            ldb[i] = pass ? L->up_rows : L->d_model;
            ldc[i] = pass ? L->d_model : L->up_rows;
        }
        st = cublasGemmGroupedBatchedEx(L->blas, L->group_ops, L->group_ops + E, m, n, k, L->group_scalars,
                                        (const void* const*)dev, t, lda, (const void* const*)(dev + E), t, ldb,
                                        L->group_scalars + E, (void* const*)(dev + 2 * E), t, ldc, g, sizes,
                                        CUBLAS_COMPUTE_32F);
        if (pass == 0 && (st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE))
            return MOE_EP_ERROR_UNSUPPORTED;
        res = moe_ep__cuda_blas(L, st, pass ? "expert down projections" : "expert up projections");
        if (res == MOE_EP_OK && pass == 0) {
            moe_ep__cuda_k_act act = L->act;    /* every expert's rows: each takes its expert's biases */
            act.first_row = P->first_row;
            act.groups = L->local_experts;
            res = moe_ep__cuda_cuda(L, (cudaError_t)moe_ep__cuda_k_activation(L->hidden, P->info.recv_rows, L->d_ff,
                                                                              L->up_rows, &act,
                                                                              moe_ep__cuda_kdtype[L->dtype], L->stream),
                                    "activation kernel");
        }
    }
    return res;
}

/* All experts on moe_ep_cuda_gemm.cuh's kernel: gate+up with the bias and the activation into
   hidden [rows, d_ff], then down into out (fp32 partial sums with TP in bf16).
   MOE_EP_ERROR_UNSUPPORTED, nothing queued, when the kernel refuses the buffers. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_hopper_rows(moe_ep_cuda_layer* L, const void* rows, int64_t a_rows,
                                                      const int64_t* first_row, void* out) {
    moe_ep__cuda_k_gemm_args g;
    int gated = L->up_rows == 2 * L->d_ff, st;
    memset(&g, 0, sizeof g);
    g.a = rows;
    g.a_rows = a_rows;
    g.lda = L->d_model;
    g.w = L->w_up;
    g.w_rows = L->up_rows;
    g.first_row = first_row;
    g.experts = L->local_experts;
    g.k = L->d_model;
    g.n = L->d_ff;
    g.mode = gated ? 1 : 2;
    g.up_offset = gated ? L->d_ff : 0;
    g.activation = L->act.activation;
    g.alpha = L->act.alpha;
    g.limit = L->act.limit;
    g.bias = L->b_up;
    g.bias_ld = L->up_rows;
    g.out = L->hidden;
    g.ldo = L->d_ff;
    st = moe_ep__cuda_k_gemm(&g, L->stream);
    if (st == (int)cudaErrorInvalidValue) return MOE_EP_ERROR_UNSUPPORTED;
    g.a = L->hidden;
    g.lda = L->d_ff;
    g.w = L->w_down;
    g.w_rows = L->d_model;
    g.k = L->d_ff;
    g.n = L->d_model;
    g.mode = 0;
    g.up_offset = 0;
    g.bias = NULL;
    g.out = L->partial_f32 ? L->partial : out;
    g.ldo = L->d_model;
    g.out_f32 = L->partial_f32;
    if (st == 0) st = moe_ep__cuda_k_gemm(&g, L->stream);
    return moe_ep__cuda_kernel(L, st, "grouped expert GEMM");
}

MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_hopper_experts(moe_ep_cuda_layer* L, moe_ep_cuda_plan* P, const void* rows,
                                                         void* out) {
    return moe_ep__cuda_hopper_rows(L, rows, P->info.recv_rows, P->first_row, out);
}

/* The built-in experts of this rank (its d_ff slice with TP): the Hopper kernel, grouped
   GEMMs or the loop. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_local_experts(moe_ep_cuda_layer* L, moe_ep_cuda_plan* P, const void* rows,
                                                        void* out) {
    moe_ep_result res = moe_ep__cuda_reserve_experts(L, P->info.recv_rows, 0);  /* no-op after plan creation sized it */
    size_t rb = L->row_bytes, hb = (size_t)L->up_rows * L->elem;
    cudaStream_t stream = L->stream;
    cublasHandle_t blas = L->blas;
    int l, busy = 0;
    for (l = 0; l < L->local_experts; ++l) busy += P->info.local_expert_counts[l] > 0;
    /* DEFAULT: the Hopper kernel while the experts average at most 448 rows; cuBLAS's
       per-expert GEMMs were faster on larger ones (bench/RESULTS.md) */
    if (res == MOE_EP_OK && L->hopper &&
        (L->desc.expert_gemm == MOE_EP_CUDA_EXPERT_GEMM_HOPPER || P->info.recv_rows <= 448 * (int64_t)busy)) {
        res = moe_ep__cuda_hopper_experts(L, P, rows, out);
        if (res != MOE_EP_ERROR_UNSUPPORTED) return res;
        res = MOE_EP_OK;    /* buffers the kernel does not take (alignment): cuBLAS for this call */
    }
    if (res == MOE_EP_OK && L->grouped) {
        if (L->grouped == 1 || P->info.recv_rows <= 384 * (int64_t)busy) {
            res = moe_ep__cuda_grouped_experts(L, P, rows, out);
            if (res != MOE_EP_ERROR_UNSUPPORTED) return res;
            L->grouped = 0;     /* this cuBLAS lacks grouped GEMMs for these types: the loop from now on */
            res = MOE_EP_OK;
        }
    }
    if (res != MOE_EP_OK) return res;
    /* Expert after expert on the layer stream: up projection (w1 and w3 in one GEMM),
       activation, down projection. */
    for (l = 0; res == MOE_EP_OK && l < L->local_experts; ++l) {
        int64_t n = P->info.local_expert_counts[l], first = P->info.local_expert_offsets[l];
        char* hidden = (char*)L->hidden + (size_t)first * hb;
        const char* down = (const char*)L->w_down + (size_t)l * L->d_ff * rb;
        if (n == 0) continue;
        res = moe_ep__cuda_linear(L, blas, (const char*)L->w_up + (size_t)l * L->up_rows * rb, L->up_rows, L->d_model,
                                  (const char*)rows + (size_t)first * rb, L->d_model, n, hidden, L->up_rows,
                                  moe_ep__cuda_cuda_type(L), "expert up projection");
        if (res == MOE_EP_OK) {
            moe_ep__cuda_k_act act = L->act;    /* this expert's rows alone */
            act.bias = L->b_up ? (const char*)L->b_up + (size_t)l * L->up_rows * L->elem : NULL;
            act.first_row = NULL;
            act.groups = 1;
            res = moe_ep__cuda_cuda(L, (cudaError_t)moe_ep__cuda_k_activation(hidden, n, L->d_ff, L->up_rows, &act,
                                                                              moe_ep__cuda_kdtype[L->dtype], stream),
                                    "activation kernel");
        }
        if (res == MOE_EP_OK && L->partial_f32)
            res = moe_ep__cuda_linear(L, blas, down, L->d_model, L->d_ff, hidden, L->up_rows, n,
                                      (float*)L->partial + (size_t)first * (size_t)L->d_model, L->d_model, CUDA_R_32F,
                                      "expert down projection");
        else if (res == MOE_EP_OK)
            res = moe_ep__cuda_linear(L, blas, down, L->d_model, L->d_ff, hidden, L->up_rows, n,
                                      (char*)out + (size_t)first * rb, L->d_model, moe_ep__cuda_cuda_type(L),
                                      "expert down projection");
    }
    return res;
}

/* The d_ff slices' partial outputs summed over the TP group in TP-rank order: every rank
   sends its block to every rank (all_to_all_v on device memory, queued on the layer
   stream), then one kernel adds the blocks, (((r0 + r1) + r2) + ...) in fp32, and stores
   the sum in the layer's dtype (bf16: rounded once). The bits of a rank-ordered
   all_reduce_sum, without its wait. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_tp_sum(moe_ep_cuda_layer* L, const float* partial, int64_t count, void* out) {
    char err[MOE_EP__CUDA_ERR] = "";
    int T = L->tp_size, q;
    int64_t* rows = L->tp_rows;
    moe_ep_a2a_args a;
    moe_ep_result res = moe_ep__cuda_grow(L, (void**)&L->tp_gather, &L->tp_gather_bytes,
                                          sizeof(float) * (size_t)count * (size_t)T, 0, "tensor-parallel sum buffer");
    if (res != MOE_EP_OK) return res;
    for (q = 0; q < T; ++q) {
        rows[q] = 1;                /* send_counts: one block to each rank */
        rows[T + q] = 0;            /* send_offsets */
        rows[2 * T + q] = 1;        /* recv_counts */
        rows[3 * T + q] = q;        /* recv_offsets: rank q's block at q */
    }
    memset(&a, 0, sizeof a);
    a.send = partial;
    a.recv = L->tp_gather;
    a.row_bytes = sizeof(float) * (size_t)count;
    a.segments = 1;
    a.send_counts = rows;
    a.send_offsets = rows + T;
    a.recv_counts = rows + 2 * T;
    a.recv_offsets = rows + 3 * T;
    a.memory_space = MOE_EP_MEMORY_DEVICE;
    a.stream = (void*)L->stream;
    res = L->tp.all_to_all_v(L->tp.impl, &a, err, sizeof err);
    if (res != MOE_EP_OK) return moe_ep__cuda_net_fail(L, res, "moe_ep_cuda_experts: tensor-parallel sum", err);
    return moe_ep__cuda_cuda(L, (cudaError_t)moe_ep__cuda_k_sum_ranks(L->tp_gather, count, T, out,
                                                                      moe_ep__cuda_kdtype[L->dtype], L->stream),
                             "tensor-parallel sum kernel");
}

MOE_EP_API moe_ep_result moe_ep_cuda_experts(moe_ep_cuda_layer* L, moe_ep_cuda_plan* P, const void* rows, void* out) {
    moe_ep_result res = moe_ep__cuda_check_stage(L, P, "moe_ep_cuda_experts", 0);
    int l;
    size_t rb;
    if (res != MOE_EP_OK) return res;
    P->expert_status = MOE_EP_OK;
    if (P->info.recv_rows > 0 && (!rows || !out))
        return P->expert_status = moe_ep__cuda_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT,
                                                    "moe_ep_cuda_experts: rows and out must not be NULL");
    rb = L->row_bytes;
    if (L->desc.expert_fn) {
        for (l = 0; l < L->local_experts; ++l) {
            int64_t n = P->info.local_expert_counts[l], first = P->info.local_expert_offsets[l];
            int rc;
            if (n == 0) continue;
            rc = L->desc.expert_fn(l, L->local_ids[l], (const char*)rows + (size_t)first * rb, n, L->d_model,
                                   (char*)out + (size_t)first * rb, L->stream, L->desc.expert_user_data);
            if (rc != 0)
                return P->expert_status = moe_ep__cuda_fail(L, MOE_EP_ERROR_CALLBACK,
                                                            "moe_ep_cuda_experts: expert_fn returned %d for expert %d",
                                                            rc, L->local_ids[l]);
        }
        return MOE_EP_OK;
    }
    /* the TP group holds the same rows: all its ranks skip, or none */
    if (P->info.recv_rows == 0) return MOE_EP_OK;
    res = moe_ep__cuda_local_experts(L, P, rows, out);
    if (L->tp_size > 1) {
        /* reached after a local failure too, so that the group is not left waiting */
        int64_t count = P->info.recv_rows * (int64_t)L->d_model;
        moe_ep_result summed = moe_ep__cuda_tp_sum(L, L->partial_f32 ? (const float*)L->partial : (const float*)out,
                                                   count, out);
        if (res == MOE_EP_OK) res = summed;
    }
    if (res == MOE_EP_OK && L->b_down)     /* after the TP sum: each rank of the group adds it once */
        res = moe_ep__cuda_kernel(L, moe_ep__cuda_k_add_bias(out, P->info.recv_rows, L->d_model, L->b_down, P->first_row,
                                                             L->local_experts, moe_ep__cuda_kdtype[L->dtype], L->stream),
                                  "down bias kernel");
    return P->expert_status = res;
}

/* >>gpu layer: shared experts */
/* The shared FFN on x into ffn_out (un-gated), and the gate's logits into sh_logit, on the
   layer stream. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_shared_ffn(moe_ep_cuda_layer* L, const void* x, int64_t tokens, void* ffn_out) {
    cudaDataType_t t = moe_ep__cuda_cuda_type(L);
    moe_ep__cuda_k_act act = L->act;
    moe_ep_result res = moe_ep__cuda_grow(L, &L->sh_hidden, &L->sh_hidden_bytes,
                                          (size_t)tokens * (size_t)L->sh_up_rows * L->elem, 0, "shared expert buffers");
    if (res == MOE_EP_OK && L->sh_gate)
        res = moe_ep__cuda_grow(L, (void**)&L->sh_logit, &L->sh_logit_bytes, (size_t)tokens * sizeof(float), 0,
                                "shared expert buffers");
    act.bias = L->sh_b_up;
    act.first_row = NULL;
    act.groups = 1;
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_linear(L, L->blas, L->sh_up, L->sh_up_rows, L->d_model, x, L->d_model, tokens, L->sh_hidden,
                                  L->sh_up_rows, t, "shared expert up projection");
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_kernel(L, moe_ep__cuda_k_activation(L->sh_hidden, tokens, L->sh_ff, L->sh_up_rows, &act,
                                                               moe_ep__cuda_kdtype[L->dtype], L->stream),
                                  "shared expert activation kernel");
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_linear(L, L->blas, L->sh_down, L->d_model, L->sh_ff, L->sh_hidden, L->sh_up_rows, tokens,
                                  ffn_out, L->d_model, t, "shared expert down projection");
    if (res == MOE_EP_OK && L->sh_b_down)
        res = moe_ep__cuda_kernel(L, moe_ep__cuda_k_add_bias(ffn_out, tokens, L->d_model, L->sh_b_down, NULL, 1,
                                                             moe_ep__cuda_kdtype[L->dtype], L->stream),
                                  "shared expert bias kernel");
    if (res == MOE_EP_OK && L->sh_gate)
        res = moe_ep__cuda_linear(L, L->blas, L->sh_gate, 1, L->d_model, x, L->d_model, tokens, L->sh_logit, 1,
                                  CUDA_R_32F, "shared expert gate");
    return res;
}

/* y = (accumulate ? y : 0) + g * the shared FFN's output. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_shared_out(moe_ep_cuda_layer* L, const void* ffn_out, int64_t tokens, void* y,
                                                     int accumulate) {
    return moe_ep__cuda_kernel(L, moe_ep__cuda_k_shared_out(ffn_out, L->sh_gate ? L->sh_logit : NULL, tokens,
                                                            L->d_model, y, accumulate, moe_ep__cuda_kdtype[L->dtype],
                                                            L->stream),
                               "shared expert output kernel");
}

MOE_EP_API moe_ep_result moe_ep_cuda_shared_experts(moe_ep_cuda_layer* L, const void* x, int64_t tokens, void* out) {
    moe_ep_result res;
    if (!L) return MOE_EP_ERROR_INVALID_ARGUMENT;
    res = moe_ep__cuda_enter(L);
    if (res != MOE_EP_OK) return res;
    if (L->sh_ff <= 0)
        return moe_ep__cuda_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT, "moe_ep_cuda_shared_experts: the layer has no "
                                 "shared experts (moe_ep_cuda_layer_desc.shared.d_ff is 0)");
    if (tokens < 0 || (tokens > 0 && (!x || !out)))
        return moe_ep__cuda_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT, "moe_ep_cuda_shared_experts: tokens (%lld) must be "
                                 ">= 0, x and out not NULL", (long long)tokens);
    if (tokens == 0) return MOE_EP_OK;
    res = moe_ep__cuda_shared_ffn(L, x, tokens, out);
    if (res == MOE_EP_OK) res = moe_ep__cuda_shared_out(L, out, tokens, out, 0);
    return res;
}

/* >>gpu layer: combine */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_combine_begin(moe_ep_cuda_layer* L, moe_ep_cuda_plan* P,
                                                        const void* expert_out) {
    moe_ep_result res = moe_ep__cuda_check_stage(L, P, "moe_ep_cuda_combine", 0), status = MOE_EP_OK;
    if (res != MOE_EP_OK) return res;
    if (P->info.recv_rows > 0 && !expert_out)
        status = moe_ep__cuda_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT,
                                   "moe_ep_cuda_combine: expert_out must not be NULL");
    /* A callback can fail on one rank: tell the others before they wait for its rows. */
    if (L->desc.expert_fn) {
        if (status == MOE_EP_OK) status = P->expert_status;
        status = moe_ep__cuda_verdict(L, status, "moe_ep_cuda_combine");
    }
    P->expert_status = MOE_EP_OK;
    if (status != MOE_EP_OK) return status;
    if (P->xfer) {
        /* the outputs must sit in this rank's region, where the token owners read them */
        if (expert_out != L->out && P->info.recv_rows > 0)
            res = moe_ep__cuda_cuda(L, cudaMemcpyAsync(L->out, expert_out, (size_t)P->info.recv_rows * L->row_bytes,
                                                       cudaMemcpyDeviceToDevice, L->stream), "moe_ep_cuda_combine");
        if (res == MOE_EP_OK)
            res = moe_ep__cuda_kernel(L, moe_ep__cuda_k_direct_signal(L->direct_args, MOE_EP__CUDA_PHASE_OUT, P->xfer, L->stream),
                                      "direct signal kernel");
        if (res != MOE_EP_OK) return res;
        P->out_sent = 1;
        P->pending = 2;
        P->open_local = expert_out;
        return MOE_EP_OK;
    }
    if (L->desc.a2a_layout == MOE_EP_CUDA_A2A_STAGED)
        res = moe_ep__cuda_cuda(L, (cudaError_t)moe_ep__cuda_k_move_rows(expert_out, P->bufs.stage, P->stage_map,
                                                                         P->remote_rows, L->row_bytes, 0, L->stream),
                                "regroup kernel");
    if (res == MOE_EP_OK) res = moe_ep__cuda_start(L, P, 0, (char*)(uintptr_t)expert_out);
    if (res != MOE_EP_OK) return res;
    P->pending = 2;
    P->open_local = expert_out;
    return MOE_EP_OK;
}

MOE_EP_API moe_ep_result moe_ep_cuda_combine_begin(moe_ep_cuda_layer* L, moe_ep_cuda_plan* P, const void* expert_out) {
    return moe_ep__cuda_combine_begin(L, P, expert_out);
}

MOE_EP_API moe_ep_result moe_ep_cuda_combine_end(moe_ep_cuda_layer* L, moe_ep_cuda_plan* P, void* y) {
    moe_ep_result res = moe_ep__cuda_check_stage(L, P, "moe_ep_cuda_combine_end", 2);
    if (res != MOE_EP_OK) return res;
    P->pending = 0;
    if (P->xfer) {
        uint64_t epoch = P->xfer;
        P->xfer = 0;
        L->open_plan = NULL;
        if (P->info.tokens > 0 && !y)
            return moe_ep__cuda_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT, "moe_ep_cuda_combine: y must not be NULL");
        return moe_ep__cuda_kernel(L, moe_ep__cuda_k_direct_combine(L->direct_args, P->dest, P->weight, y, P->info.tokens,
                                                                    L->top_k, L->d_model,
                                                                    moe_ep__cuda_kdtype[L->dtype], epoch, L->stream),
                                   "direct combine kernel");
    }
    res = moe_ep__cuda_finish(L, P);
    if (res != MOE_EP_OK) return res;
    if (P->info.tokens > 0 && !y)
        return moe_ep__cuda_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT, "moe_ep_cuda_combine: y must not be NULL");
    return moe_ep__cuda_cuda(L, (cudaError_t)moe_ep__cuda_k_unpermute(P->bufs.send, P->open_local, P->slot_map,
                                                                      P->weight, y,
                                                                      P->info.tokens, L->top_k, L->d_model,
                                                                      moe_ep__cuda_kdtype[L->dtype], L->stream),
                             "un-permute kernel");
}

MOE_EP_API moe_ep_result moe_ep_cuda_combine(moe_ep_cuda_layer* L, moe_ep_cuda_plan* P, const void* expert_out,
                                             void* y) {
    moe_ep_result res = moe_ep__cuda_combine_begin(L, P, expert_out);
    if (res != MOE_EP_OK) return res;
    return moe_ep_cuda_combine_end(L, P, y);
}

/* >>gpu layer: forward on the GPU plan */
/* Hand-in routing, checked as the core's plan checks it (an expert in range, once per
   token, a finite weight), into the pinned mirror and up to the device. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_routing_upload(moe_ep_cuda_layer* L, int64_t tokens, const int32_t* idx,
                                                         const float* weight, int32_t* idx_dev) {
    int64_t slots = tokens * L->top_k, t;
    size_t idx_bytes = moe_ep__cuda_round16((size_t)slots * sizeof(int32_t));
    int k = L->top_k, j, i;
    moe_ep_result res;
    for (t = 0; t < tokens; ++t)
        for (j = 0; j < k; ++j) {
            int32_t e = idx[t * k + j];
            float w = weight[t * k + j];
            if (e < 0 || e >= L->num_experts)
                return moe_ep__cuda_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT, "topk_idx[%lld][%d] (%d) must be an expert "
                                         "in [0, %d)", (long long)t, j, (int)e, L->num_experts);
            for (i = 0; i < j; ++i)
                if (idx[t * k + i] == e)
                    return moe_ep__cuda_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT, "topk_idx[%lld] names expert %d twice "
                                             "(slots %d and %d)", (long long)t, (int)e, i, j);
            if (!(w == w) || w > 3.4e38f || w < -3.4e38f)
                return moe_ep__cuda_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT, "topk_weight[%lld][%d] must be finite",
                                         (long long)t, j);
        }
    res = moe_ep__cuda_cuda(L, cudaEventSynchronize(L->gp.routing_free), "routing upload");
    if (res != MOE_EP_OK) return res;
    memcpy(L->topk_host, idx, (size_t)slots * sizeof(int32_t));
    memcpy((char*)L->topk_host + idx_bytes, weight, (size_t)slots * sizeof(float));
    res = moe_ep__cuda_cuda(L, cudaMemcpyAsync(idx_dev, L->topk_host, idx_bytes + (size_t)slots * sizeof(float),
                                               cudaMemcpyHostToDevice, L->stream), "routing upload");
    if (res == MOE_EP_OK) res = moe_ep__cuda_cuda(L, cudaEventRecord(L->gp.routing_free, L->stream), "routing upload");
    return res;
}

/* The plan kernels on the routing in the router's buffers, for T tokens; *k gets their arguments. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_gpu_plan_run(moe_ep_cuda_layer* L, int64_t T, moe_ep__cuda_k_plan* k) {
    int64_t slots = T * L->top_k;
    *k = L->gp.k;
    k->topk_idx = (const int32_t*)L->topk_dev;
    k->topk_weight = (const float*)((char*)L->topk_dev + moe_ep__cuda_round16((size_t)slots * sizeof(int32_t)));
    k->slots = slots;
    k->capacity = -1;   /* the core's capacity rule, on this call's tokens */
    if (L->gp.capacity_factor > 0.0f)
        k->capacity = (int64_t)ceil((double)L->gp.capacity_factor * (double)T * L->top_k / (double)L->num_experts);
    return moe_ep__cuda_kernel(L, moe_ep__cuda_k_plan_send(k, L->stream), "plan kernels");
}

/* CHUNKED: the built-in experts over every chunk of the padded receive rows, sizes fixed at
   create (chunks that hold no rows compute rows nobody reads). */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_chunked_experts(moe_ep_cuda_layer* L) {
    const float one = 1.0f, zero = 0.0f;
    cudaDataType_t t = moe_ep__cuda_cuda_type(L);
    int64_t n = L->chunks, rows = n * L->chunk_rows;
    void** p = L->gp.chunk_ptrs;    /* A up, A down (the plan wrote them), B up, C up, B down, C down */
    moe_ep__cuda_k_act act = L->act;
    moe_ep_result res;
    act.first_row = L->gp.k.local_offsets;
    act.groups = L->local_experts;
    res = moe_ep__cuda_blas(L, cublasGemmBatchedEx(L->blas, CUBLAS_OP_T, CUBLAS_OP_N, L->up_rows, L->chunk_rows,
                                                   L->d_model, &one, (const void* const*)p, t, L->d_model,
                                                   (const void* const*)(p + 2 * n), t, L->d_model, &zero,
                                                   (void* const*)(p + 3 * n), t, L->up_rows, (int)n,
                                                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                            "expert up projections (chunked)");
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_kernel(L, moe_ep__cuda_k_activation(L->hidden, rows, L->d_ff, L->up_rows, &act,
                                                               moe_ep__cuda_kdtype[L->dtype], L->stream),
                                  "activation kernel");
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_blas(L, cublasGemmBatchedEx(L->blas, CUBLAS_OP_T, CUBLAS_OP_N, L->d_model, L->chunk_rows,
                                                       L->d_ff, &one, (const void* const*)(p + n), t, L->d_ff,
                                                       (const void* const*)(p + 4 * n), t, L->up_rows, &zero,
                                                       (void* const*)(p + 5 * n), t, L->d_model, (int)n,
                                                       CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                                "expert down projections (chunked)");
    if (res == MOE_EP_OK && L->b_down)
        res = moe_ep__cuda_kernel(L, moe_ep__cuda_k_add_bias(L->out, rows, L->d_model, L->b_down, act.first_row,
                                                             L->local_experts, moe_ep__cuda_kdtype[L->dtype], L->stream),
                                  "down bias kernel");
    return res;
}

/* HOPPER on the GPU plan: the kernel over the whole receive buffer, its tile list from the
   plan's offsets on the device (the rows past the last expert's are never computed), then
   the down bias on the same rows. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_hopper_planned(moe_ep_cuda_layer* L, const moe_ep__cuda_k_plan* k) {
    int64_t rows = (int64_t)(L->recv_bytes / L->row_bytes), hidden_rows;
    moe_ep_result res;
    hidden_rows = (int64_t)(L->hidden_bytes / ((size_t)L->up_rows * L->elem));
    if (hidden_rows < rows) rows = hidden_rows;
    res = moe_ep__cuda_hopper_rows(L, L->recv, rows, k->local_offsets, L->out);
    if (res == MOE_EP_ERROR_UNSUPPORTED)    /* create checked the shapes: the buffers themselves */
        return moe_ep__cuda_fail(L, MOE_EP_ERROR_INTERNAL, "expert buffers not 16-byte aligned for the Hopper kernel");
    if (res == MOE_EP_OK && L->b_down)
        res = moe_ep__cuda_kernel(L, moe_ep__cuda_k_add_bias(L->out, rows, L->d_model, L->b_down, k->local_offsets,
                                                             L->local_experts, moe_ep__cuda_kdtype[L->dtype], L->stream),
                                  "down bias kernel");
    return res;
}

/* The GPU-planned forward's routing, into the router's buffers: the router's, or the one
   handed in; with `download` also queued back to the pinned mirror for the caller. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_gpu_route(moe_ep_cuda_layer* L, const moe_ep_cuda_forward_args* a,
                                                    int download) {
    int64_t T = a->tokens, slots = T * L->top_k;
    size_t idx_bytes = moe_ep__cuda_round16((size_t)slots * sizeof(int32_t));
    int32_t* idx_dev = (int32_t*)L->topk_dev;
    float* weight_dev = (float*)((char*)L->topk_dev + idx_bytes);
    moe_ep_result res;
    if (a->routing_in) return moe_ep__cuda_routing_upload(L, T, a->topk_idx, a->topk_weight, idx_dev);
    res = moe_ep__cuda_linear(L, L->blas, L->router, L->num_experts, L->d_model, a->x, L->d_model, T, L->logits,
                              L->num_experts, CUDA_R_32F, "router logits");
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_kernel(L, moe_ep__cuda_k_topk((const float*)L->logits, T, L->num_experts, L->top_k,
                                                         &L->router_cfg, idx_dev, weight_dev, L->stream),
                                  "router top-k kernel");
    if (res == MOE_EP_OK && download)
        res = moe_ep__cuda_cuda(L, cudaMemcpyAsync(L->topk_host, L->topk_dev, idx_bytes + (size_t)slots * sizeof(float),
                                                   cudaMemcpyDeviceToHost, L->stream), "router download");
    if (res == MOE_EP_OK && download)
        res = moe_ep__cuda_cuda(L, cudaEventRecord(L->gp.routing_free, L->stream), "router download");
    return res;
}

/* The forward with the plan on the GPU (one rank, max_tokens): route (or upload the hand-in
   routing), three plan kernels, permute, experts, weighted un-permute, all queued on the
   stream. The host waits only for what it asked for: the sizes before cuBLAS's GEMMs
   (unless CHUNKED) and the routing, when topk_idx / topk_weight are to be filled. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_forward_gpu(moe_ep_cuda_layer* L, const moe_ep_cuda_forward_args* a) {
    moe_ep__cuda_gpu_plan* gp = &L->gp;
    int64_t T = a->tokens, slots = T * L->top_k, sources = T;
    size_t idx_bytes = moe_ep__cuda_round16((size_t)slots * sizeof(int32_t));
    float* weight_dev = (float*)((char*)L->topk_dev + idx_bytes);
    int download = !a->routing_in && a->topk_idx && a->topk_weight, per_row = L->top_k;
    int with_shared = L->sh_ff > 0;
    /* HOPPER by name: the kernel takes the plan's offsets from device memory, no sizes on the host */
    int hopper = L->hopper && L->desc.expert_gemm == MOE_EP_CUDA_EXPERT_GEMM_HOPPER;
    const void* x = a->x;
    moe_ep__cuda_k_plan k = gp->k;
    moe_ep_result res = MOE_EP_OK, shared = MOE_EP_OK;
    if (T > L->desc.max_tokens)
        return moe_ep__cuda_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT, "tokens (%lld) must be <= max_tokens (%lld)",
                                 (long long)T, (long long)L->desc.max_tokens);
    if (T == 0) return MOE_EP_OK;
    /* 1. routing, on the device */
    res = moe_ep__cuda_gpu_route(L, a, download);
    if (res != MOE_EP_OK) return res;
    /* 2. the plan */
    res = moe_ep__cuda_gpu_plan_run(L, T, &k);
    if (res == MOE_EP_OK && !L->chunks && !hopper)
        res = moe_ep__cuda_cuda(L, cudaMemcpyAsync(gp->sizes_host, k.local_counts, sizeof(int64_t) * (2 * (size_t)L->segments + 4),
                                                   cudaMemcpyDeviceToHost, L->stream), "plan sizes download");
    if (res == MOE_EP_OK && !L->chunks && !hopper)
        res = moe_ep__cuda_cuda(L, cudaEventRecord(gp->downloaded, L->stream), "plan sizes download");
    /* 3. dispatch: every row stays on this rank */
    if (res == MOE_EP_OK && L->desc.scale_expert_input) {
        res = moe_ep__cuda_kernel(L, moe_ep__cuda_k_scale_rows(x, weight_dev, T, L->top_k, L->d_model, L->scaled,
                                                               moe_ep__cuda_kdtype[L->dtype], L->stream),
                                  "input scaling kernel");
        x = L->scaled;
        sources *= L->top_k;
        per_row = 1;
    }
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_kernel(L, moe_ep__cuda_k_permute(x, NULL, L->recv, k.slot_map, sources, per_row, L->row_bytes,
                                                            3, L->stream), "permute kernel");
    if (res == MOE_EP_OK && with_shared) shared = moe_ep__cuda_shared_ffn(L, a->x, T, L->sh_out);
    /* 4. experts */
    if (res == MOE_EP_OK && L->chunks) {
        res = moe_ep__cuda_chunked_experts(L);
    } else if (res == MOE_EP_OK && hopper) {
        res = moe_ep__cuda_hopper_planned(L, &k);
    } else if (res == MOE_EP_OK) {
        moe_ep_cuda_plan* P = &gp->view;
        res = moe_ep__cuda_cuda(L, cudaEventSynchronize(gp->downloaded), "plan sizes download");
        P->info.tokens = T;
        P->info.recv_rows = gp->sizes_host[2 * L->segments + 1];
        P->info.send_rows = gp->sizes_host[2 * L->segments];
        P->pending = 0;
        if (res == MOE_EP_OK) res = moe_ep_cuda_experts(L, P, L->recv, L->out);
    }
    /* 5. combine: the k slots of each token in slot order */
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_kernel(L, moe_ep__cuda_k_unpermute(NULL, L->out, k.slot_map, k.weight, a->y, T, L->top_k,
                                                              L->d_model, moe_ep__cuda_kdtype[L->dtype], L->stream),
                                  "un-permute kernel");
    if (res == MOE_EP_OK && shared == MOE_EP_OK && with_shared)
        shared = moe_ep__cuda_shared_out(L, L->sh_out, T, a->y, 1);
    if (res == MOE_EP_OK) res = shared;
    if (res == MOE_EP_OK && download) {
        res = moe_ep__cuda_cuda(L, cudaEventSynchronize(gp->routing_free), "router download");
        if (res == MOE_EP_OK) {
            memcpy(a->topk_idx, L->topk_host, (size_t)slots * sizeof(int32_t));
            memcpy(a->topk_weight, (char*)L->topk_host + idx_bytes, (size_t)slots * sizeof(float));
        }
    }
    return res;
}

/* >>gpu layer: low-latency forward */
/* The experts over the received rows as the dispatch kernel laid them out: CHUNKED, or the
   Hopper kernel over the whole buffer (first_row, written by the dispatch, says whose each
   row is; rows past the last expert's are never computed). */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_ll_experts(moe_ep_cuda_layer* L) {
    const int64_t* first_row = L->gp.k.local_offsets;
    int64_t rows = L->region_rows, recv_rows = (int64_t)(L->recv_bytes / L->row_bytes);
    int64_t hidden_rows = (int64_t)(L->hidden_bytes / ((size_t)L->up_rows * L->elem));
    moe_ep_result res;
    if (L->local_experts == 0) return MOE_EP_OK;
    if (L->chunks > 0) return moe_ep__cuda_chunked_experts(L);
    /* every buffer has room for the rows this rank can receive; the kernel reads no further */
    if (recv_rows < rows) rows = recv_rows;
    if (hidden_rows < rows) rows = hidden_rows;
    res = moe_ep__cuda_hopper_rows(L, L->recv, rows, first_row, L->out);
    if (res == MOE_EP_ERROR_UNSUPPORTED)
        return moe_ep__cuda_fail(L, MOE_EP_ERROR_INTERNAL, "low-latency experts: the Hopper kernel refused the buffers");
    if (res == MOE_EP_OK && L->b_down)
        res = moe_ep__cuda_kernel(L, moe_ep__cuda_k_add_bias(L->out, rows, L->d_model, L->b_down, first_row,
                                                             L->local_experts, moe_ep__cuda_kdtype[L->dtype], L->stream),
                                  "down bias kernel");
    return res;
}

/* The forward in low-latency mode: route (or upload the hand-in routing), the plan's send
   half, dispatch (one kernel), the shared experts, the experts, combine (one kernel), all
   queued on the stream with no host synchronisation (unless the routing is to be brought
   back). Every rank must call it, also with 0 tokens: the peers wait for its flags. A call
   that fails here stops every rank's waits (they end in MOE_EP_ERROR_ABORTED) and the
   layer refuses further work: after the first kernel the step cannot be taken back. */
MOE_EP_PRIVATE moe_ep_result moe_ep__cuda_forward_ll(moe_ep_cuda_layer* L, const moe_ep_cuda_forward_args* a,
                                                     moe_ep_result status) {
    moe_ep__cuda_gpu_plan* gp = &L->gp;
    int64_t T = status == MOE_EP_OK ? a->tokens : 0, slots = T * L->top_k, sources = T;
    size_t idx_bytes = moe_ep__cuda_round16((size_t)slots * sizeof(int32_t));
    int download = status == MOE_EP_OK && !a->routing_in && a->topk_idx && a->topk_weight && T > 0;
    int per_row = L->top_k, with_shared = L->sh_ff > 0 && T > 0;
    const void* x = status == MOE_EP_OK ? a->x : NULL;
    moe_ep__cuda_k_plan k = gp->k;
    moe_ep_result res = status, shared = MOE_EP_OK;
    if (res == MOE_EP_OK && T > L->desc.max_tokens)
        res = moe_ep__cuda_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT, "tokens (%lld) must be <= max_tokens (%lld)",
                                (long long)T, (long long)L->desc.max_tokens);
    /* 1. routing, on the device */
    if (res == MOE_EP_OK && T > 0) res = moe_ep__cuda_gpu_route(L, a, download);
    /* 2. each slot's owner and landing row */
    k.topk_idx = (const int32_t*)L->topk_dev;
    k.topk_weight = (const float*)((char*)L->topk_dev + idx_bytes);
    k.slots = slots;
    k.capacity = -1;
    if (gp->capacity_factor > 0.0f)
        k.capacity = (int64_t)ceil((double)gp->capacity_factor * (double)T * L->top_k / (double)L->num_experts);
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_kernel(L, moe_ep__cuda_k_ll_plan(&k, L->ll_dest, L->desc.max_tokens, L->stream),
                                  "low-latency plan kernels");
    /* 3. dispatch */
    if (res == MOE_EP_OK && L->desc.scale_expert_input && T > 0) {
        res = moe_ep__cuda_kernel(L, moe_ep__cuda_k_scale_rows(x, k.topk_weight, T, L->top_k, L->d_model, L->scaled,
                                                               moe_ep__cuda_kdtype[L->dtype], L->stream),
                                  "input scaling kernel");
        x = L->scaled;
        sources *= L->top_k;
        per_row = 1;
    }
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_kernel(L, moe_ep__cuda_k_ll_dispatch(L->ll_args, &k, x, L->ll_dest, sources, per_row, L->recv,
                                                                L->stream), "low-latency dispatch kernel");
    if (res == MOE_EP_OK && with_shared) shared = moe_ep__cuda_shared_ffn(L, a->x, T, L->sh_out);
    /* 4. experts */
    if (res == MOE_EP_OK) res = moe_ep__cuda_ll_experts(L);
    /* 5. combine */
    if (res == MOE_EP_OK)
        res = moe_ep__cuda_kernel(L, moe_ep__cuda_k_ll_combine(L->ll_args, L->ll_dest, k.weight, T > 0 ? a->y : NULL, T,
                                                               L->top_k, L->d_model, moe_ep__cuda_kdtype[L->dtype],
                                                               L->stream), "low-latency combine kernel");
    if (res == MOE_EP_OK && shared == MOE_EP_OK && with_shared) shared = moe_ep__cuda_shared_out(L, L->sh_out, T, a->y, 1);
    if (res != MOE_EP_OK || shared != MOE_EP_OK) {
        /* the peers may wait for this rank's flags: release them, and take no further step */
        moe_ep__cuda_k_ll_stop(L->ll_args, 2, L->stream);
        moe_ep__cuda_break(L);
        return res != MOE_EP_OK ? res : shared;
    }
    if (download) {
        res = moe_ep__cuda_cuda(L, cudaEventSynchronize(gp->routing_free), "router download");
        if (res == MOE_EP_OK) {
            memcpy(a->topk_idx, L->topk_host, (size_t)slots * sizeof(int32_t));
            memcpy(a->topk_weight, (char*)L->topk_host + idx_bytes, (size_t)slots * sizeof(float));
        }
    }
    return res;
}

/* >>gpu layer: forward */
MOE_EP_API moe_ep_result moe_ep_cuda_forward(moe_ep_cuda_layer* L, const moe_ep_cuda_forward_args* a) {
    moe_ep_result status = MOE_EP_OK, res;
    moe_ep_cuda_plan* P = NULL;
    int32_t* idx = NULL;
    float* weight = NULL;
    int64_t tokens = 0;
    if (!L) return MOE_EP_ERROR_INVALID_ARGUMENT;
    status = moe_ep__cuda_enter(L);
    if (status != MOE_EP_OK) return status;
    if (!a) status = moe_ep__cuda_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT, "moe_ep_cuda_forward: args must not be NULL");
    else if (a->tokens < 0)
        status = moe_ep__cuda_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT,
                                   "moe_ep_cuda_forward_args.tokens (%lld) must be >= 0",
                                   (long long)a->tokens);
    else if (a->tokens > 0 && (!a->x || !a->y))
        status = moe_ep__cuda_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT,
                                   "moe_ep_cuda_forward_args.x and .y must not be NULL when tokens > 0");
    else if (a->routing_in && a->tokens > 0 && (!a->topk_idx || !a->topk_weight))
        status = moe_ep__cuda_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT,
                                   "moe_ep_cuda_forward_args.routing_in needs topk_idx and topk_weight");
    else if (!a->routing_in && !L->router)
        status = moe_ep__cuda_fail(L, MOE_EP_ERROR_INVALID_ARGUMENT,
                                   "moe_ep_cuda_layer_desc.router_weight is NULL: set it, or hand in routing (routing_in)");
    if (L->ll) return moe_ep__cuda_forward_ll(L, a, status);
    if (status == MOE_EP_OK && L->gpu_plan) return moe_ep__cuda_forward_gpu(L, a);
    if (status == MOE_EP_OK) {
        tokens = a->tokens;
        if (a->topk_idx && a->topk_weight) {
            idx = a->topk_idx;
            weight = a->topk_weight;
        } else if (tokens * L->top_k > L->routing_capacity) {
            const moe_ep_allocator* al = &L->desc.allocator;
            moe_ep_free(al, L->routing_idx);
            moe_ep_free(al, L->routing_weight);
            L->routing_idx = (int32_t*)moe_ep_alloc(al, sizeof(int32_t) * (size_t)(tokens * L->top_k));
            L->routing_weight = (float*)moe_ep_alloc(al, sizeof(float) * (size_t)(tokens * L->top_k));
            L->routing_capacity = L->routing_idx && L->routing_weight ? tokens * L->top_k : 0;
            if (!L->routing_capacity)
                status = moe_ep__cuda_fail(L, MOE_EP_ERROR_OUT_OF_MEMORY, "moe_ep_cuda_forward: out of memory");
        }
        if (!idx) {
            idx = L->routing_idx;
            weight = L->routing_weight;
        }
    }
    if (status == MOE_EP_OK && !a->routing_in) status = moe_ep_cuda_route(L, a->x, tokens, idx, weight);
    res = moe_ep__cuda_plan_build(L, tokens, idx, weight, status, 1, &P);
    if (res != MOE_EP_OK) return res;
    res = moe_ep__cuda_dispatch_begin(L, P, a->x, L->recv);
    if (res == MOE_EP_OK) {
        /* the shared experts are queued while the rows travel; like a launch failure of the
           built-in experts, their failure is this rank's alone, reported after the combine */
        int with_shared = L->sh_ff > 0 && tokens > 0;
        moe_ep_result shared = with_shared ? moe_ep__cuda_grow(L, &L->sh_out, &L->sh_out_bytes,
                                                               (size_t)tokens * L->row_bytes, 0, "shared expert buffers")
                                           : MOE_EP_OK;
        if (shared == MOE_EP_OK && with_shared) shared = moe_ep__cuda_shared_ffn(L, a->x, tokens, L->sh_out);
        res = moe_ep_cuda_dispatch_end(L, P);
        /* an expert_fn failure is agreed inside the combine; a launch failure of the built-in
           experts is this rank's alone, reported after the peers got their rows */
        if (res == MOE_EP_OK) {
            status = moe_ep_cuda_experts(L, P, L->recv, L->out);
            res = moe_ep_cuda_combine(L, P, L->out, a->y);
            if (res == MOE_EP_OK && status != MOE_EP_OK && !L->desc.expert_fn) res = status;
        }
        if (res == MOE_EP_OK && shared == MOE_EP_OK && with_shared)
            shared = moe_ep__cuda_shared_out(L, L->sh_out, tokens, a->y, 1);
        if (res == MOE_EP_OK) res = shared;
    }
    moe_ep_cuda_plan_destroy(P);
    return res;
}

#endif /* MOE_EP_CUDA_IMPL_INCLUDED */
#endif /* MOE_EP_CUDA_IMPLEMENTATION */
