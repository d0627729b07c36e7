/* moe_ep_cuda_kernels.cuh -- the CUDA kernels of moe_ep's GPU layer -- MIT or public domain

   The GPU layer (moe_ep_cuda.h) calls these through plain C launchers, so that the rest
   of the library can stay C99. Build them once, in one CUDA file:

       #define MOE_EP_CUDA_KERNELS_IMPLEMENTATION
       #include "moe_ep_cuda_kernels.cuh"

   (nvcc -arch=sm_90 -c that.cu). A file that nvcc compiles with MOE_EP_IMPLEMENTATION
   and includes moe_ep_cuda.h gets them without this step. Everything declared here is
   private to moe_ep_cuda.h (moe_ep__cuda_k_*): only its implementation includes this file.

   Kernels: permute (token rows into send order), row regrouping (rank-major <->
   expert-major), the activation (SwiGLU / GELU / ReLU / clamped SwiGLU with the up
   biases, fp32 math), the down bias, input scaling, weight relayout, the shared experts'
   gated sum, weighted
   un-permute (fp32 accumulation, k-slot order), softmax + top-k, and the rank-order sum
   of the tensor-parallel partial sums. Rows are fp32 or
   bf16; every launcher returns a cudaError_t as int (0 = success).

   A slot map (int32, one entry per (token, k-slot)) says where each assignment's row
   lives: v >= 0 is row v of the send buffer, v <= -2 is row -v-2 of the expert-side
   buffer (the token's expert is on this rank, the row skips the network), -1 is
   dropped by capacity. */
#ifndef MOE_EP_CUDA_KERNELS_CUH_INCLUDED
#define MOE_EP_CUDA_KERNELS_CUH_INCLUDED

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Row element types, as in moe_ep_cuda_dtype (1 = fp32, 2 = bf16). */
#define MOE_EP__CUDA_K_F32 1
#define MOE_EP__CUDA_K_BF16 2

/* x [tokens, row_bytes] -> send / expert-side rows, as the slot map says. pass 1 writes
   the rows for the network (v >= 0), pass 2 the local ones (v <= -2), pass 3 both. */
int moe_ep__cuda_k_permute(const void* x, void* send, void* local, const int32_t* slot_map, int64_t tokens,
                           int top_k, size_t row_bytes, int pass, void* stream);
/* scatter: dst[map[i]] = src[i]; else gather: dst[i] = src[map[i]]; i < rows. */
int moe_ep__cuda_k_move_rows(const void* src, void* dst, const int32_t* map, int64_t rows, size_t row_bytes,
                             int scatter, void* stream);
/* The expert activation's settings. activation: 1 SwiGLU, 2 GELU, 3 ReLU, 4 clamped SwiGLU
   (moe_ep_activation; alpha and limit are the clamped SwiGLU's). bias: [groups, ld] in the
   row dtype, added to the up products before the activation, or NULL. Row r takes the bias
   of the last group g with first_row[g] <= r (first_row: device [groups], ascending, as a
   plan's local expert offsets; NULL: group 0 for every row). */
typedef struct moe_ep__cuda_k_act {
    int activation;
    float alpha, limit;
    const void* bias;
    const int64_t* first_row;
    int groups;
} moe_ep__cuda_k_act;
/* In place over h [rows, ld], after the bias: SwiGLU h[:, i] = silu(h[:, i]) * h[:, ff + i];
   clamped SwiGLU likewise with GPT-OSS's formula; GELU/ReLU h[:, i] = act(h[:, i]). */
int moe_ep__cuda_k_activation(void* h, int64_t rows, int ff, int64_t ld, const moe_ep__cuda_k_act* act, int dtype,
                              void* stream);
/* h [rows, cols] += the bias of each row's group (bias [groups, cols], groups and first_row
   as in moe_ep__cuda_k_act), added in fp32 and stored in the row dtype. */
int moe_ep__cuda_k_add_bias(void* h, int64_t rows, int cols, const void* bias, const int64_t* first_row, int groups,
                            int dtype, void* stream);
/* scaled[t * k + j] = weight[t * k + j] * x[t] for rows of d elements (scale_expert_input:
   the token's weight on the expert's input), the product in fp32, stored in the row dtype. */
int moe_ep__cuda_k_scale_rows(const void* x, const float* weight, int64_t tokens, int top_k, int d, void* scaled,
                              int dtype, void* stream);
/* dst [rows, cols] = src[offset + i * row_stride + c * col_stride], elements of elem_bytes
   (2 or 4): one copy of a weight in any layout, slice or transpose into nn.Linear's. */
int moe_ep__cuda_k_strided_copy(const void* src, int64_t offset, int64_t row_stride, int64_t col_stride, int64_t rows,
                                int64_t cols, void* dst, int elem_bytes, void* stream);
/* The shared experts' contribution: y[t] = (accumulate ? y[t] : 0) + g_t * shared[t] over rows
   of d elements, g_t = sigmoid(gate_logit[t]) (fp32 [tokens]), or 1 when gate_logit is NULL;
   fp32 math, stored in the row dtype. */
int moe_ep__cuda_k_shared_out(const void* shared, const float* gate_logit, int64_t tokens, int d, void* y,
                              int accumulate, int dtype, void* stream);
/* y[t] = sum over k-slots j, in order, of weight[t,j] * row(slot_map[t,j]); fp32 accumulation. */
int moe_ep__cuda_k_unpermute(const void* send, const void* local, const int32_t* slot_map, const float* weight,
                             void* y, int64_t tokens, int top_k, int d_model, int dtype, void* stream);
/* The slot map from the core plan's slot rows: owner_local[e] is e's local index if e is
   on this rank, else -1; self_shift[l] = receive offset - send offset of local expert l's
   own segment. */
int moe_ep__cuda_k_slot_map(const int64_t* slot_rows, const int32_t* topk_idx, const int32_t* owner_local,
                            const int64_t* self_shift, int64_t slots, int32_t* slot_map, void* stream);
/* stage_map[r] = chunk_dest[c] + r - chunk_start[c] for chunk_start[c] <= r < chunk_start[c + 1]
   (the last such c; chunks may be empty). */
int moe_ep__cuda_k_stage_map(const int64_t* chunk_start, const int64_t* chunk_dest, int chunks, int64_t rows,
                             int32_t* stage_map, void* stream);
/* The router's settings, as moe_ep_desc's (scoring: 1 softmax, 2 sigmoid, 3 top-k then
   softmax, 4 top-k then sigmoid; biases in device memory or NULL; groups >= 1). */
typedef struct moe_ep__cuda_k_router {
    int scoring, normalize, groups, topk_groups;
    float scaling;
    const float* router_bias;
    const float* selection_bias;
} moe_ep__cuda_k_router;
/* logits [tokens, E] fp32 (+ router_bias) -> scores -> the choice (+ selection_bias, within
   the best topk_groups groups) -> top-k (ties to the lower index) -> weights from the
   unbiased scores, renormalised, scaled -> idx, weight [tokens, k]; as the core's router. */
int moe_ep__cuda_k_topk(const float* logits, int64_t tokens, int num_experts, int top_k,
                        const moe_ep__cuda_k_router* router, int32_t* idx, float* weight, void* stream);
/* out[i] = ((parts[i] + parts[count + i]) + parts[2 * count + i]) + ... over `ranks` blocks of
   count floats, added in block order in fp32, stored as dtype (bf16 rounds to nearest even
   once, at the end). ranks = 1 converts. In fp32, out may be parts itself. */
int moe_ep__cuda_k_sum_ranks(const float* parts, int64_t count, int ranks, void* out, int dtype, void* stream);

/* Planning on the GPU (moe_ep_cuda.h, PLANNING ON THE GPU): the core's plan for one rank,
   computed by three kernels from device routing, the same rows as moe_ep_plan_create's.
   A (token, k-slot) assignment i of expert e is kept when fewer than `capacity` earlier
   slots (in slot order) chose e (capacity < 0: always); its rank among e's slots places
   it: send row seg_send_offsets[seg(e)] + rank, seg(e) = owner * S + local index. The
   receive side orders rows by (local expert, source rank, token); with chunk > 0 each
   local expert's rows start at a multiple of chunk (the chunked expert GEMMs). Arrays of
   int64 unless said; all device memory. */
#define MOE_EP__CUDA_PLAN_BLOCK 1024    /* slots per block of the counting and the map kernel */
typedef struct moe_ep__cuda_k_plan {
    const int32_t* topk_idx;        /* [slots], experts in [0, E) */
    const float* topk_weight;       /* [slots] */
    const int32_t* expert_at;       /* int32 [2E]: the owner rank of each expert, then its local index */
    int64_t slots, capacity;        /* capacity: rows each expert keeps from this rank, -1 = dropless */
    int E, R, S, rank, local_experts;
    int scale_input;                /* scale_expert_input: weight[] = 1 (the weights scale the input rows) */
    int chunk;                      /* > 0: the receive rows of each local expert start at a multiple of it */
    int32_t* slot_rank;             /* scratch int32 [slots]: rank among its expert's slots of its block */
    int32_t* block_counts;          /* scratch int32 [blocks * E], blocks of MOE_EP__CUDA_PLAN_BLOCK slots: per
                                       block and expert, then each block's base */
    int64_t *counts, *kept;         /* [E] assignments of this rank per expert, before and after capacity */
    int64_t *seg_send_counts, *seg_send_offsets, *seg_recv_counts, *seg_recv_offsets;   /* [R * S] */
    int64_t *local_counts, *local_offsets;  /* [S] received rows per local expert, its first row */
    int64_t* totals;                /* [4]: send rows, receive rows, receive rows with the padding, chunks used */
    int32_t* slot_map;              /* out [slots]: as moe_ep__cuda_k_slot_map's */
    float* weight;                  /* out [slots]: the combine's weights (1 with scale_input) */
    void** chunk_weights;           /* chunk > 0: out [2 * chunks]: each chunk's up, then down weights */
    int64_t chunks;
    const char* w_up;               /* [local_experts] blocks of up_bytes, and of down_bytes */
    const char* w_down;
    size_t up_bytes, down_bytes;
} moe_ep__cuda_k_plan;
/* send: each slot's rank and the counts, then the send side (kept, seg_send_counts and
   offsets); with R == 1 the receive side too. receive (R > 1, once seg_recv_counts [q * S
   + s] holds what rank q sends to local expert s): the receive side (local counts and
   offsets, seg_recv_offsets, totals, the chunk table), then the slot map and the weights. */
int moe_ep__cuda_k_plan_send(const moe_ep__cuda_k_plan* p, void* stream);
int moe_ep__cuda_k_plan_receive(const moe_ep__cuda_k_plan* p, void* stream);

/* The direct path (moe_ep_cuda.h, "DIRECT NVLINK PATH"). Every rank has one region of
   device memory that its peers map: uint64 flags [4][world] at its start (flags[phase *
   world + source] = the last epoch that source signalled), the rank's receive-offset
   table, its received rows and its expert outputs. A wait spins until every source's
   flag of a phase reaches the epoch; one that runs past timeout_ns sets ctl[1] = 1 and
   gives up (the kernel then skips its work). */
#define MOE_EP__CUDA_PHASE_TABLE 0   /* the offset table is published */
#define MOE_EP__CUDA_PHASE_READ 1    /* the peers' tables were read */
#define MOE_EP__CUDA_PHASE_DATA 2    /* the dispatched rows have landed */
#define MOE_EP__CUDA_PHASE_OUT 3     /* the expert outputs are ready (and the received rows free) */
typedef struct moe_ep__cuda_k_direct {
    char* const* peers;             /* device [world]: each rank's region as this GPU sees it */
    int rank, world;
    size_t table_off, recv_off, out_off;    /* bytes into a region */
    unsigned* counters;             /* device [2], this rank's: blocks finished (push, resolve) */
    int* ctl;                       /* host-mapped [2]; [1]: a wait timed out */
    uint64_t timeout_ns;            /* 0: wait without limit */
} moe_ep__cuda_k_direct;

/* Wait for READ(epoch - 1) from every rank, copy table [count] to this rank's region,
   then signal TABLE(epoch) to every rank. */
int moe_ep__cuda_k_direct_publish(moe_ep__cuda_k_direct g, const int64_t* table, int64_t count, uint64_t epoch,
                                  void* stream);
/* Wait for TABLE(epoch); dest[i] = (rank << 32) | row where slot i's row goes (-1: dropped),
   from the slot map, the owners (expert_at [2 * E]: rank of each expert, then its local
   index), this rank's send offsets [world * S] and the owners' tables; signal READ(epoch). */
int moe_ep__cuda_k_direct_resolve(moe_ep__cuda_k_direct g, const int32_t* slot_map, const int32_t* topk_idx,
                                  const int32_t* expert_at, int num_experts, const int64_t* send_off, int S,
                                  int64_t slots, int64_t* dest, uint64_t epoch, void* stream);
/* Wait for OUT(epoch - 1) (the receivers' rows are free), store each token's row at its
   dest in the owners' regions, then signal DATA(epoch). */
int moe_ep__cuda_k_direct_push(moe_ep__cuda_k_direct g, const void* x, const int64_t* dest, int64_t tokens, int top_k,
                               size_t row_bytes, uint64_t epoch, void* stream);
int moe_ep__cuda_k_direct_signal(moe_ep__cuda_k_direct g, int phase, uint64_t epoch, void* stream);
int moe_ep__cuda_k_direct_wait(moe_ep__cuda_k_direct g, int phase, uint64_t epoch, void* stream);
/* Wait for OUT(epoch); y[t] = sum over k-slots of weight * the expert output row at dest,
   read from the owner's region: the same sums as moe_ep__cuda_k_unpermute. */
int moe_ep__cuda_k_direct_combine(moe_ep__cuda_k_direct g, const int64_t* dest, const float* weight, void* y,
                                  int64_t tokens, int top_k, int d_model, int dtype, uint64_t epoch, void* stream);

/* The low-latency mode (moe_ep_cuda.h, LOW-LATENCY DECODE). Every rank has one region that
   its peers map, laid out alike everywhere: uint64 flags [4][world] at its start (as the
   direct path's: flags[phase * world + source]; DATA and OUT are used), a control block
   (moe_ep__cuda_k_ll_ctl), the counts [S][world] the sources write (rows source q sent to
   local expert s), the table [world][S] where the owner publishes the first received row
   of each (source, local expert), the landing rows [S][world][max_tokens] (source q's i-th
   row for local expert s is row (s * world + q) * max_tokens + i: a known place, so no
   counts are exchanged first), and the expert outputs. The epoch of a forward is on the
   device (ctl.step + 1), so that the replays of a CUDA graph count on by themselves. A
   wait that gives up (timeout_ns, the host's abort in ctl[1], or a peer's stop word) keeps
   why in ctl[1] and writes it to every rank's stop word: no rank waits on. */
typedef struct moe_ep__cuda_k_ll_ctl {
    uint64_t stop;                  /* why a wait gave up, any rank's: 1 timed out, 2 aborted; 0 none */
    uint64_t step;                  /* forwards this rank has completed */
    unsigned counters[2];           /* blocks finished: dispatch, combine */
} moe_ep__cuda_k_ll_ctl;
typedef struct moe_ep__cuda_k_ll {
    char* const* peers;             /* device [world]: each rank's region as this GPU sees it */
    int rank, world, S, grid;       /* S: a plan's segments (the most experts a rank holds); grid: blocks
                                       of the dispatch and combine kernels */
    int64_t max_tokens;
    size_t ctl_off, counts_off, table_off, land_off, out_off, row_bytes;  /* bytes into a region */
    int* ctl;                       /* host-mapped [2]; [1]: why this rank's wait gave up (1 timeout,
                                       2 aborted); the host writes 2 to abort */
    uint64_t timeout_ns;            /* 0: wait without limit */
} moe_ep__cuda_k_ll;
/* The send half of the plan (moe_ep__cuda_k_plan_send's count and sizes kernels: each slot's
   rank among its expert's slots, kept and the counts per expert), then dest[i] = (owner << 32)
   | the landing row of slot i in its owner's region (-1: dropped by capacity) and the
   combine weights p->weight. */
int moe_ep__cuda_k_ll_plan(const moe_ep__cuda_k_plan* p, int64_t* dest, int64_t max_tokens, void* stream);
/* One kernel: every row x[t] (per_row slots each, dest as moe_ep__cuda_k_ll_plan made it)
   stored at its landing row in its owner's region; the last block writes this rank's counts
   (p->kept) to the owners and signals DATA(epoch) to every rank; then each block waits for
   DATA(epoch) from every rank and the rows are moved into recv, grouped by local expert,
   then source, then slot order (each expert from a multiple of p->chunk with chunk > 0), as
   the plan kernels lay them out; block 0 writes p->local_counts, local_offsets, totals[0]
   (the rows' end), the chunk table and this rank's table. */
int moe_ep__cuda_k_ll_dispatch(moe_ep__cuda_k_ll g, const moe_ep__cuda_k_plan* p, const void* x, const int64_t* dest,
                               int64_t sources, int per_row, void* recv, void* stream);
/* One kernel: OUT(epoch) to every rank (this rank's expert outputs are done: the stream ran
   them before), wait for OUT(epoch) from every rank, then y[t] = sum over k-slots, in order,
   of weight * the expert output of the slot, read from its owner's region (the owner's
   table says where): the sums of moe_ep__cuda_k_unpermute. The last block ends the step. */
int moe_ep__cuda_k_ll_combine(moe_ep__cuda_k_ll g, const int64_t* dest, const float* weight, void* y, int64_t tokens,
                              int top_k, int d_model, int dtype, void* stream);
/* Stops every rank's waits with `why` (1 timed out, 2 aborted): this rank's ctl[1] and every
   rank's stop word. For a rank that cannot take part in a forward. */
int moe_ep__cuda_k_ll_stop(moe_ep__cuda_k_ll g, int why, void* stream);

#ifdef __cplusplus
}
#endif
#endif /* MOE_EP_CUDA_KERNELS_CUH_INCLUDED */

#ifdef MOE_EP_CUDA_KERNELS_IMPLEMENTATION
#ifndef MOE_EP_CUDA_KERNELS_IMPL_INCLUDED
#define MOE_EP_CUDA_KERNELS_IMPL_INCLUDED

#ifndef __CUDACC__
#error "moe_ep_cuda_kernels.cuh: the implementation must be compiled by nvcc"
#endif

#include <cuda_runtime.h>
#include <cuda_bf16.h>

namespace moe_ep_cuda_kernels {

/* The widest unit (16, 8, 4 or 2 bytes) that divides the row and every base address. */
static int unit_bytes(size_t row_bytes, const void* a, const void* b, const void* c) {
    uintptr_t bits = (uintptr_t)row_bytes | (uintptr_t)a | (uintptr_t)b | (uintptr_t)c;
    if ((bits & 15) == 0) return 16;
    if ((bits & 7) == 0) return 8;
    if ((bits & 3) == 0) return 4;
    return 2;
}

static unsigned grid_for(int64_t items, int per_block) {
    int64_t blocks = (items + per_block - 1) / per_block;
    if (blocks < 1) blocks = 1;
    if (blocks > 65535 * 16) blocks = 65535 * 16;  /* grid-stride loops cover the rest */
    return (unsigned)blocks;
}

/* Grid-stride loops by warps: this thread's warp in the grid, and the warps of the grid. */
__device__ __forceinline__ int64_t global_warp() { return ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; }
__device__ __forceinline__ int64_t warp_count() { return ((int64_t)gridDim.x * blockDim.x) >> 5; }

__device__ __forceinline__ bool permute_wanted(int32_t v, int pass) {
    return v >= 0 ? (pass & 1) != 0 : v <= -2 && (pass & 2) != 0;
}

/* One warp per token: the row is read once and written to each of its wanted slots. */
template <typename U>
__global__ void permute_kernel(const char* __restrict__ x, char* __restrict__ send, char* __restrict__ local,
                               const int32_t* __restrict__ slot_map, int64_t tokens, int top_k, size_t row_bytes,
                               int pass) {
    int64_t units = (int64_t)(row_bytes / sizeof(U));
    int lane = threadIdx.x & 31;
    int64_t warp = global_warp(), warps = warp_count();
    for (int64_t t = warp; t < tokens; t += warps) {
        const int32_t* map = slot_map + t * top_k;
        bool any = false;
        for (int j = lane; j < top_k; j += 32) any |= permute_wanted(map[j], pass);
        if (!__any_sync(0xffffffffu, any)) continue;
        const U* src = (const U*)(x + (size_t)t * row_bytes);
        for (int64_t i = lane; i < units; i += 32) {
            U value = src[i];
            for (int j = 0; j < top_k; ++j) {
                int32_t v = map[j];
                if (!permute_wanted(v, pass)) continue;
                U* dst = (U*)(v >= 0 ? send + (size_t)v * row_bytes : local + (size_t)(-(int64_t)v - 2) * row_bytes);
                dst[i] = value;
            }
        }
    }
}

template <typename U>
__global__ void move_rows_kernel(const char* __restrict__ src, char* __restrict__ dst, const int32_t* __restrict__ map,
                                 int64_t rows, size_t row_bytes, int scatter) {
    int64_t units = (int64_t)(row_bytes / sizeof(U));
    int lane = threadIdx.x & 31;
    int64_t warp = global_warp(), warps = warp_count();
    for (int64_t r = warp; r < rows; r += warps) {
        size_t from = scatter ? (size_t)r : (size_t)map[r];
        size_t to = scatter ? (size_t)map[r] : (size_t)r;
        const U* s = (const U*)(src + from * row_bytes);
        U* d = (U*)(dst + to * row_bytes);
        for (int64_t i = lane; i < units; i += 32) d[i] = s[i];
    }
}

template <typename U>
static cudaError_t launch_permute(const void* x, void* send, void* local, const int32_t* map, int64_t tokens, int k,
                                  size_t rb, int pass, cudaStream_t s) {
    permute_kernel<U><<<grid_for(tokens, 8), 256, 0, s>>>((const char*)x, (char*)send, (char*)local, map, tokens, k, rb,
                                                         pass);
    return cudaGetLastError();
}

template <typename U>
static cudaError_t launch_move(const void* src, void* dst, const int32_t* map, int64_t rows, size_t rb, int scatter,
                               cudaStream_t s) {
    move_rows_kernel<U><<<grid_for(rows, 8), 256, 0, s>>>((const char*)src, (char*)dst, map, rows, rb, scatter);
    return cudaGetLastError();
}

__device__ __forceinline__ float load_f(const float* p) { return *p; }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store_f(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_f(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

/* Same formulas as the CPU kernel of moe_ep.h. */
__device__ __forceinline__ float act_f(const moe_ep__cuda_k_act& a, float g, float u) {
    if (a.activation == 2) return 0.5f * g * (1.0f + erff(g * 0.70710678118654752f));
    if (a.activation == 3) return g > 0.0f ? g : 0.0f;
    if (a.activation == 4) {
        g = g < a.limit ? g : a.limit;
        u = u < -a.limit ? -a.limit : u > a.limit ? a.limit : u;
        return (u + 1.0f) * (g / (1.0f + expf(-a.alpha * g)));
    }
    return g / (1.0f + expf(-g)) * u;
}

/* The last group g with first_row[g] <= r (0 without a table). */
__device__ __forceinline__ int64_t row_group(const int64_t* first_row, int groups, int64_t r) {
    int lo = 0, hi = groups - 1;
    if (!first_row) return 0;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (first_row[mid] <= r) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

/* V consecutive elements per thread; V divides ff and the addresses are V-aligned. */
template <typename T, int V>
__global__ void activation_kernel(T* __restrict__ h, int64_t rows, int ff, int64_t ld, moe_ep__cuda_k_act act) {
    int64_t per_row = ff / V;
    int64_t items = rows * per_row;
    bool gated = act.activation == 1 || act.activation == 4;
    const T* bias = (const T*)act.bias;
    for (int64_t it = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; it < items;
         it += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = it / per_row;
        int64_t i = (it - r * per_row) * V;
        T* a = h + r * ld + i;
        const T* b = a + ff;
        const T* bias_row = bias ? bias + row_group(act.first_row, act.groups, r) * ld + i : (const T*)0;
        __align__(16) T av[V];
        __align__(16) T bv[V];
        if (V * sizeof(T) == 16) {
            *(uint4*)av = *(const uint4*)a;
            if (gated) *(uint4*)bv = *(const uint4*)b;
        } else {
            for (int v = 0; v < V; ++v) { av[v] = a[v]; if (gated) bv[v] = b[v]; }
        }
        for (int v = 0; v < V; ++v) {
            float x = load_f(&av[v]);
            float y = gated ? load_f(&bv[v]) : 0.0f;
            if (bias_row) {
                x += load_f(&bias_row[v]);
                if (gated) y += load_f(&bias_row[ff + v]);
            }
            store_f(&av[v], act_f(act, x, y));
        }
        if (V * sizeof(T) == 16) *(uint4*)a = *(const uint4*)av;
        else for (int v = 0; v < V; ++v) a[v] = av[v];
    }
}

template <typename T, int V>
static cudaError_t launch_activation(void* h, int64_t rows, int ff, int64_t ld, const moe_ep__cuda_k_act& act,
                                     cudaStream_t s) {
    int64_t items = rows * (ff / V);
    activation_kernel<T, V><<<grid_for(items, 256), 256, 0, s>>>((T*)h, rows, ff, ld, act);
    return cudaGetLastError();
}

template <typename T>
__global__ void add_bias_kernel(T* __restrict__ h, int64_t rows, int cols, const T* __restrict__ bias,
                                const int64_t* __restrict__ first_row, int groups) {
    int64_t items = rows * cols;
    for (int64_t it = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; it < items;
         it += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = it / cols, c = it - r * cols;
        store_f(&h[it], load_f(&h[it]) + load_f(&bias[row_group(first_row, groups, r) * cols + c]));
    }
}

template <typename T>
__global__ void scale_rows_kernel(const T* __restrict__ x, const float* __restrict__ weight, int64_t tokens, int k,
                                  int d, T* __restrict__ scaled) {
    int64_t items = tokens * k * d;
    for (int64_t it = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; it < items;
         it += (int64_t)gridDim.x * blockDim.x) {
        int64_t slot = it / d, i = it - slot * d;
        store_f(&scaled[it], weight[slot] * load_f(&x[(slot / k) * d + i]));
    }
}

template <typename U>
__global__ void strided_copy_kernel(const U* __restrict__ src, int64_t offset, int64_t row_stride, int64_t col_stride,
                                    int64_t rows, int64_t cols, U* __restrict__ dst) {
    int64_t items = rows * cols;
    for (int64_t it = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; it < items;
         it += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = it / cols, c = it - r * cols;
        dst[it] = src[offset + r * row_stride + c * col_stride];
    }
}

template <typename T>
__global__ void shared_out_kernel(const T* shared, const float* __restrict__ gate_logit, int64_t tokens,
                                  int d, T* y, int accumulate) {
    int64_t items = tokens * d;
    for (int64_t it = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; it < items;
         it += (int64_t)gridDim.x * blockDim.x) {
        int64_t t = it / d;
        float g = gate_logit ? 1.0f / (1.0f + expf(-gate_logit[t])) : 1.0f;
        float v = __fmul_rn(g, load_f(&shared[it]));
        store_f(&y[it], accumulate ? __fadd_rn(load_f(&y[it]), v) : v);
    }
}

/* Where a token's k-slot rows are: rows of the send buffer and the expert-side buffer
   (the slot map), or rows of the owners' regions (the direct path's dest). */
template <typename T>
struct slot_rows {
    const T* send;
    const T* local;
    const int32_t* map;
    int d;
    __device__ const T* operator()(int64_t i) const {
        int32_t v = map[i];
        return v == -1 ? (const T*)0 : v >= 0 ? send + (size_t)v * d : local + (size_t)(-(int64_t)v - 2) * d;
    }
};

template <typename T>
struct region_rows {
    char* const* peers;
    size_t offset, row_bytes;
    const int64_t* dest;
    __device__ const T* operator()(int64_t i) const {
        int64_t v = dest[i];
        return v < 0 ? (const T*)0 : (const T*)(peers[v >> 32] + offset + (size_t)(v & 0xFFFFFFFF) * row_bytes);
    }
};

__device__ __forceinline__ void st_release_sys(uint64_t* p, uint64_t v) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* p) {
    uint64_t v;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ uint64_t global_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

/* One thread: until every rank's flag of `phase` in this rank's region reaches epoch.
   false: timed out (ctl[1] set), or another wait of this rank did. */
__device__ bool wait_flags(const moe_ep__cuda_k_direct& g, int phase, uint64_t epoch) {
    const uint64_t* flags = (const uint64_t*)g.peers[g.rank] + (size_t)phase * g.world;
    volatile int* ctl = g.ctl;
    uint64_t start = 0;
    for (int q = 0; q < g.world; ++q) {
        unsigned spins = 0;
        while (ld_acquire_sys(flags + q) < epoch) {
            if (++spins % 256 != 0) continue;
            if (ctl[1]) return false;
            uint64_t now = global_ns();
            if (start == 0) start = now;
            else if (g.timeout_ns > 0 && now - start > g.timeout_ns) {
                ctl[1] = 1;
                return false;
            }
        }
    }
    return true;
}

/* One thread per rank: after this rank's earlier writes, flags[phase][rank] = epoch in
   every region. */
__device__ __forceinline__ void signal_all(const moe_ep__cuda_k_direct& g, int phase, uint64_t epoch, int first,
                                          int step) {
    __threadfence_system();
    for (int q = first; q < g.world; q += step)
        st_release_sys((uint64_t*)g.peers[q] + (size_t)phase * g.world + g.rank, epoch);
}

/* The block's writes are done: the last block of the grid to get here signals. */
__device__ void grid_done_signal(const moe_ep__cuda_k_direct& g, unsigned* counter, int phase, uint64_t epoch) {
    __shared__ bool last;
    __threadfence_system();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    if (threadIdx.x == 0) *counter = 0;     /* for the next launch, which the stream orders after this one */
    if (((volatile int*)g.ctl)[1]) return;  /* a wait timed out: let the peers time out too */
    signal_all(g, phase, epoch, threadIdx.x, blockDim.x);
}

/* Block-wide: thread 0 waits, the block learns the verdict. */
__device__ bool block_wait(const moe_ep__cuda_k_direct& g, int phase, uint64_t epoch) {
    __shared__ bool ok;
    if (threadIdx.x == 0) ok = epoch == 0 || wait_flags(g, phase, epoch);
    __syncthreads();
    return ok;
}

/* One block per token; threads over d in groups of V elements; the k sources and weights
   of the token sit in shared memory. */
template <typename T, int V, typename Rows>
__global__ void unpermute_kernel(Rows rows, const float* __restrict__ weight, T* __restrict__ y, int64_t tokens,
                                 int top_k, int d) {
    extern __shared__ unsigned char smem[];
    const T** src = (const T**)smem;
    float* w = (float*)(smem + sizeof(T*) * (size_t)top_k);
    for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
        __syncthreads();
        for (int j = threadIdx.x; j < top_k; j += blockDim.x) {
            src[j] = rows(t * top_k + j);
            w[j] = weight[t * top_k + j];
        }
        __syncthreads();
        T* yt = y + (size_t)t * d;
        for (int i = threadIdx.x * V; i < d; i += blockDim.x * V) {
            float acc[V];
            for (int v = 0; v < V; ++v) acc[v] = 0.0f;
            for (int j = 0; j < top_k; ++j) {     /* k-slot order */
                const T* s = src[j];
                __align__(16) T in[V];
                if (!s) continue;                 /* dropped: contributes zero */
                if (V * sizeof(T) == 16) *(uint4*)in = *(const uint4*)(s + i);
                else for (int v = 0; v < V; ++v) in[v] = s[i + v];
                for (int v = 0; v < V; ++v) acc[v] += w[j] * load_f(&in[v]);
            }
            __align__(16) T out[V];
            for (int v = 0; v < V; ++v) store_f(&out[v], acc[v]);
            if (V * sizeof(T) == 16) *(uint4*)(yt + i) = *(const uint4*)out;
            else for (int v = 0; v < V; ++v) yt[i + v] = out[v];
        }
    }
}

template <typename T, int V, typename Rows>
static cudaError_t launch_unpermute(Rows rows, const float* weight, void* y, int64_t tokens, int k, int d,
                                    cudaStream_t s) {
    int threads = d / V >= 256 ? 256 : d / V >= 128 ? 128 : 64;
    size_t shared = (sizeof(T*) + sizeof(float)) * (size_t)k;
    unsigned blocks = (unsigned)(tokens < 65535 * 16 ? tokens : 65535 * 16);
    if (tokens <= 0) return cudaSuccess;
    if (shared > 48 * 1024) {
        cudaError_t e = cudaFuncSetAttribute(unpermute_kernel<T, V, Rows>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             (int)shared);
        if (e != cudaSuccess) return e;
    }
    unpermute_kernel<T, V, Rows><<<blocks, threads, shared, s>>>(rows, weight, (T*)y, tokens, k, d);
    return cudaGetLastError();
}

static bool aligned(const void* p, size_t n) { return ((uintptr_t)p % n) == 0; }

/* The warp's best of v[0..n) not marked taken (-inf, and an index no lane holds, when none). */
__device__ void warp_best(const float* v, const float* mark, int n, float* best_out, int* idx_out) {
    int lane = threadIdx.x & 31;
    float best = __int_as_float(0xff800000);
    int best_e = 0x7FFFFFFF;
    for (int e = lane; e < n; e += 32)
        if (mark[e] == 0.0f && (best_e == 0x7FFFFFFF || v[e] > best)) { best = v[e]; best_e = e; }
    for (int o = 16; o > 0; o >>= 1) {
        float ob = __shfl_xor_sync(0xffffffffu, best, o);
        int oe = __shfl_xor_sync(0xffffffffu, best_e, o);
        if (oe != 0x7FFFFFFF && (best_e == 0x7FFFFFFF || ob > best || (ob == best && oe < best_e))) {
            best = ob;
            best_e = oe;
        }
    }
    *best_out = best;
    *idx_out = best_e;
}

/* One warp per token, as the core's router: scores (softmax normalised before selection, so
   two experts tie exactly when they tie there), the choice with the selection bias within the
   best groups, top-k with ties to the lower index, weights from the unbiased scores. Shared
   memory per warp: scores, choices and taken marks [E] each, group scores and marks [G]
   (then the k weights, renormalised there before one store each). */
__global__ void topk_kernel(const float* __restrict__ logits, int64_t tokens, int E, int k, moe_ep__cuda_k_router r,
                            int32_t* __restrict__ idx, float* __restrict__ weight) {
    extern __shared__ float router_shared[];
    int lane = threadIdx.x & 31, warp_in_block = threadIdx.x >> 5, G = r.groups, n = E / G;
    int64_t t = (int64_t)blockIdx.x * (blockDim.x >> 5) + warp_in_block;
    if (t >= tokens) return;
    float* p = router_shared + (size_t)warp_in_block * (3 * (size_t)E + (size_t)(2 * G > k ? 2 * G : k));
    float* c = p + E;
    float* taken = c + E;
    float* gs = taken + E;
    float* gtaken = gs + G;
    const float* l = logits + t * E;
    float m = __int_as_float(0xff800000), sum = 0.0f, wsum = 0.0f;
    for (int e = lane; e < E; e += 32) {
        p[e] = r.router_bias ? l[e] + r.router_bias[e] : l[e];
        m = fmaxf(m, p[e]);
        taken[e] = 0.0f;
    }
    if (r.scoring == 1) {
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        for (int e = lane; e < E; e += 32) { float q = expf(p[e] - m); p[e] = q; sum += q; }
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        for (int e = lane; e < E; e += 32) p[e] = p[e] / sum;
    } else if (r.scoring == 2) {
        for (int e = lane; e < E; e += 32) p[e] = 1.0f / (1.0f + expf(-p[e]));
    }
    for (int e = lane; e < E; e += 32) c[e] = r.selection_bias ? p[e] + r.selection_bias[e] : p[e];
    __syncwarp();
    if (G > 1) {
        for (int g = lane; g < G; g += 32) {        /* a group scores the sum of its two best */
            int first = 0, second = -1;
            for (int i = 1; i < n; ++i) {
                float v = c[g * n + i];
                if (v > c[g * n + first]) { second = first; first = i; }
                else if (second < 0 || v > c[g * n + second]) second = i;
            }
            gs[g] = second < 0 ? c[g * n + first] : c[g * n + first] + c[g * n + second];
            gtaken[g] = 0.0f;
        }
        __syncwarp();
        for (int j = 0; j < r.topk_groups; ++j) {
            float best;
            int best_g;
            warp_best(gs, gtaken, G, &best, &best_g);
            if (lane == 0) gtaken[best_g] = 1.0f;
            __syncwarp();
        }
        for (int e = lane; e < E; e += 32)
            if (gtaken[e / n] == 0.0f) taken[e] = 1.0f;  /* outside the kept groups */
        __syncwarp();
    }
    float first = 0.0f;                              /* the first choice's logit (TOPK_SOFTMAX) */
    float* w = gs;                                   /* the k weights, in shared memory (groups are done) */
    for (int j = 0; j < k; ++j) {
        float best;
        int best_e;
        warp_best(c, taken, E, &best, &best_e);
        if (lane == 0) {
            float v = p[best_e];
            if (j == 0) first = p[best_e];
            if (r.scoring == 3) v = expf(p[best_e] - first);
            else if (r.scoring == 4) v = 1.0f / (1.0f + expf(-p[best_e]));
            idx[t * k + j] = best_e;
            w[j] = v;
            taken[best_e] = 1.0f;
        }
        __syncwarp();
    }
    if (lane == 0) {                                 /* slot order, as on the CPU */
        if (r.scoring == 3) {
            for (int j = 0; j < k; ++j) wsum += w[j];
            for (int j = 0; j < k; ++j) w[j] = w[j] / wsum;
        }
        if (r.normalize) {
            wsum = 0.0f;
            for (int j = 0; j < k; ++j) wsum += w[j];
            for (int j = 0; j < k; ++j) w[j] = w[j] / wsum;
        }
        if (r.scaling != 1.0f)
            for (int j = 0; j < k; ++j) w[j] = w[j] * r.scaling;
    }
    __syncwarp();
    for (int j = lane; j < k; j += 32) weight[t * k + j] = w[j];
}

/* The same router with each lane's experts in registers (expert j * 32 + lane in slot j),
   for E <= 32 V, k <= 32 and groups of whole slots (E / groups a multiple of 32, or one
   group): no shared memory, a warp-wide argmax per choice. Every value is computed as in
   topk_kernel, in the same order, so the two give the same ids and the same bits. */
__device__ __forceinline__ bool better(float v, int e, float bv, int be) {
    return be == 0x7FFFFFFF || v > bv || (v == bv && e < be);
}

template <int V>
__global__ void topk_reg_kernel(const float* __restrict__ logits, int64_t tokens, int E, int k, moe_ep__cuda_k_router r,
                                int32_t* __restrict__ idx, float* __restrict__ weight) {
    const float ninf = __int_as_float(0xff800000);
    int lane = threadIdx.x & 31;
    int64_t t = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (t >= tokens) return;
    const float* l = logits + t * E;
    float p[V], c[V];
    unsigned live = 0;              /* bit j: slot j holds an expert that may still be chosen */
    float m = ninf, sum = 0.0f;
#pragma unroll
    for (int j = 0; j < V; ++j) {
        int e = j * 32 + lane;
        p[j] = ninf;
        if (e < E) {
            p[j] = r.router_bias ? l[e] + r.router_bias[e] : l[e];
            m = fmaxf(m, p[j]);
            live |= 1u << j;
        }
    }
    if (r.scoring == 1) {
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
#pragma unroll
        for (int j = 0; j < V; ++j)
            if (live >> j & 1u) { p[j] = expf(p[j] - m); sum += p[j]; }
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
#pragma unroll
        for (int j = 0; j < V; ++j) if (live >> j & 1u) p[j] = p[j] / sum;
    } else if (r.scoring == 2) {
#pragma unroll
        for (int j = 0; j < V; ++j) if (live >> j & 1u) p[j] = 1.0f / (1.0f + expf(-p[j]));
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
        int e = j * 32 + lane;
        c[j] = (live >> j & 1u) && r.selection_bias ? p[j] + r.selection_bias[e] : p[j];
    }
    if (r.groups > 1) {             /* a group: slots [g S, (g + 1) S) of every lane */
        int G = r.groups, S = E / G / 32;
        unsigned kept = 0;
        float gs[V];
        for (int g = 0; g < G; ++g) {   /* the sum of its two best, as a multiset of values */
            float a1 = ninf, a2 = ninf;
#pragma unroll
            for (int j = 0; j < V; ++j)
                if (j / S == g) {
                    if (c[j] > a1) { a2 = a1; a1 = c[j]; }
                    else if (c[j] > a2) a2 = c[j];
                }
            for (int o = 16; o > 0; o >>= 1) {
                float b1 = __shfl_xor_sync(0xffffffffu, a1, o), b2 = __shfl_xor_sync(0xffffffffu, a2, o);
                float hi = fmaxf(a1, b1), lo = fminf(a1, b1);
                a2 = fmaxf(lo, fmaxf(a2, b2));
                a1 = hi;
            }
            gs[g] = a1 + a2;            /* n >= 32: two values always exist */
        }
        for (int j = 0; j < r.topk_groups; ++j) {   /* the best groups, ties to the lower one */
            int best = -1;
            for (int g = 0; g < G; ++g)
                if (!(kept >> g & 1u) && (best < 0 || gs[g] > gs[best])) best = g;
            kept |= 1u << best;
        }
#pragma unroll
        for (int j = 0; j < V; ++j) if (!(kept >> (j / S) & 1u)) live &= ~(1u << j);
    }
    float first = 0.0f, mine = 0.0f, wsum = 0.0f;
    int mine_e = 0;
    for (int j = 0; j < k; ++j) {
        float bv = ninf;
        int be = 0x7FFFFFFF;
#pragma unroll
        for (int s = 0; s < V; ++s)
            if ((live >> s & 1u) && better(c[s], s * 32 + lane, bv, be)) { bv = c[s]; be = s * 32 + lane; }
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oe = __shfl_xor_sync(0xffffffffu, be, o);
            if (oe != 0x7FFFFFFF && better(ov, oe, bv, be)) { bv = ov; be = oe; }
        }
        float score = 0.0f;
#pragma unroll
        for (int s = 0; s < V; ++s)
            if (be == s * 32 + lane) { score = p[s]; live &= ~(1u << s); }
        score = __shfl_sync(0xffffffffu, score, be & 31);
        if (j == 0) first = score;
        float v = score;
        if (r.scoring == 3) v = expf(score - first);
        else if (r.scoring == 4) v = 1.0f / (1.0f + expf(-score));
        if (lane == j) { mine = v; mine_e = be; }
    }
    /* slot order, as on the CPU: the sums run j = 0..k-1 on every lane */
    if (r.scoring == 3) {
        for (int j = 0; j < k; ++j) wsum += __shfl_sync(0xffffffffu, mine, j);
        mine = mine / wsum;
    }
    if (r.normalize) {
        wsum = 0.0f;
        for (int j = 0; j < k; ++j) wsum += __shfl_sync(0xffffffffu, mine, j);
        mine = mine / wsum;
    }
    if (r.scaling != 1.0f) mine = mine * r.scaling;
    if (lane < k) {
        idx[t * k + lane] = mine_e;
        weight[t * k + lane] = mine;
    }
}

__global__ void slot_map_kernel(const int64_t* __restrict__ slot_rows, const int32_t* __restrict__ topk_idx,
                                const int32_t* __restrict__ owner_local, const int64_t* __restrict__ self_shift,
                                int64_t slots, int32_t* __restrict__ slot_map) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < slots; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t row = slot_rows[i];
        int32_t local = row < 0 ? -1 : owner_local[topk_idx[i]];
        slot_map[i] = row < 0 ? -1 : local < 0 ? (int32_t)row : (int32_t)(-(row + self_shift[local]) - 2);
    }
}

__global__ void stage_map_kernel(const int64_t* __restrict__ chunk_start, const int64_t* __restrict__ chunk_dest,
                                 int chunks, int64_t rows, int32_t* __restrict__ stage_map) {
    for (int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += (int64_t)gridDim.x * blockDim.x) {
        int lo = 0, hi = chunks - 1;     /* the last chunk that starts at or before r */
        while (lo < hi) {
            int mid = (lo + hi + 1) / 2;
            if (chunk_start[mid] <= r) lo = mid;
            else hi = mid - 1;
        }
        stage_map[r] = (int32_t)(chunk_dest[lo] + r - chunk_start[lo]);
    }
}

} /* namespace moe_ep_cuda_kernels */

namespace moe_ep_cuda_kernels {
#define MOE_EP__CUDA_PLAN_WARPS (MOE_EP__CUDA_PLAN_BLOCK / 32)

/* Each slot's rank among the slots of its block that chose the same expert, in slot order,
   and each block's count per expert: lanes of one expert find each other (match), the
   warps' counts are added in warp order. */
__global__ void __launch_bounds__(MOE_EP__CUDA_PLAN_BLOCK) plan_count_kernel(moe_ep__cuda_k_plan p) {
    extern __shared__ int32_t warp_counts[];    /* [warps][E] */
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, E = p.E;
    int64_t i = (int64_t)blockIdx.x * MOE_EP__CUDA_PLAN_BLOCK + tid;
    for (int x = tid; x < MOE_EP__CUDA_PLAN_WARPS * E; x += blockDim.x) warp_counts[x] = 0;
    __syncthreads();
    int e = i < p.slots ? p.topk_idx[i] : -1;
    unsigned peers = __match_any_sync(0xffffffffu, e);
    int before = __popc(peers & ((1u << lane) - 1u));
    if (e >= 0 && before == 0) warp_counts[warp * E + e] = __popc(peers);
    __syncthreads();
    for (int x = tid; x < E; x += blockDim.x) {
        int32_t run = 0;
        for (int w = 0; w < MOE_EP__CUDA_PLAN_WARPS; ++w) {
            int32_t c = warp_counts[w * E + x];
            warp_counts[w * E + x] = run;
            run += c;
        }
        p.block_counts[(int64_t)blockIdx.x * E + x] = run;
    }
    __syncthreads();
    if (e >= 0) p.slot_rank[i] = warp_counts[warp * E + e] + before;
}

/* In place, over one block: v[i] = v[0] + ... + v[i - 1]; returns the total to every thread. */
__device__ int64_t block_exclusive_scan(int64_t* v, int n) {
    __shared__ int64_t warp_sums[32];
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = (blockDim.x + 31) >> 5;
    int per = (n + (int)blockDim.x - 1) / (int)blockDim.x, first = tid * per;
    int last = first + per < n ? first + per : n;
    int64_t mine = 0, total;
    for (int i = first; i < last; ++i) mine += v[i];
    int64_t incl = mine;
    for (int o = 1; o < 32; o <<= 1) {
        int64_t up = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += up;
    }
    if (lane == 31) warp_sums[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        int64_t s = lane < warps ? warp_sums[lane] : 0;
        for (int o = 1; o < 32; o <<= 1) {
            int64_t up = __shfl_up_sync(0xffffffffu, s, o);
            if (lane >= o) s += up;
        }
        warp_sums[lane] = s;    /* inclusive over warps */
    }
    __syncthreads();
    int64_t run = incl - mine + (warp > 0 ? warp_sums[warp - 1] : 0);
    total = warp_sums[31];
    for (int i = first; i < last; ++i) {
        int64_t c = v[i];
        v[i] = run;
        run += c;
    }
    __syncthreads();
    return total;
}

/* One block; S <= 1024. phase & 1: the blocks' bases per expert (a warp per expert), the
   counts, kept, the send side; phase & 2: the receive side and the chunk table. */
__global__ void __launch_bounds__(1024) plan_sizes_kernel(moe_ep__cuda_k_plan p, int64_t blocks, int phase) {
    __shared__ int64_t first[1024];     /* each local expert's first receive row */
    __shared__ unsigned long long received;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = (int)(blockDim.x >> 5);
    int E = p.E, RS = p.R * p.S, S = p.S;
    if (phase & 1) {
        /* warp w scans the block counts of experts w, w + 32, ..., eight at a time, lane = block:
           the loads of the eight are in flight together */
        for (int j0 = 0; warp + warps * j0 < E; j0 += 8) {
            int32_t run[8];
            for (int j = 0; j < 8; ++j) run[j] = 0;
            for (int64_t b0 = 0; b0 < blocks; b0 += 32) {
                int64_t b = b0 + lane;
                int32_t c[8];
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    int e = warp + warps * (j0 + j);
                    c[j] = b < blocks && e < E ? p.block_counts[b * E + e] : 0;
                }
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    int e = warp + warps * (j0 + j);
                    int32_t incl = c[j];
                    for (int o = 1; o < 32; o <<= 1) {
                        int32_t up = __shfl_up_sync(0xffffffffu, incl, o);
                        if (lane >= o) incl += up;
                    }
                    if (b < blocks && e < E) p.block_counts[b * E + e] = run[j] + incl - c[j];
                    run[j] += __shfl_sync(0xffffffffu, incl, 31);
                }
            }
            for (int j = 0; lane == 0 && j < 8; ++j) {
                int e = warp + warps * (j0 + j);
                if (e >= E) break;
                p.counts[e] = run[j];
                p.kept[e] = p.capacity >= 0 && run[j] > p.capacity ? p.capacity : run[j];
            }
        }
        __syncthreads();
        for (int x = tid; x < RS; x += blockDim.x) p.seg_send_counts[x] = 0;
        __syncthreads();
        for (int e = tid; e < E; e += blockDim.x)
            p.seg_send_counts[p.expert_at[e] * S + p.expert_at[E + e]] = p.kept[e];
        __syncthreads();
        for (int x = tid; x < RS; x += blockDim.x) {
            p.seg_send_offsets[x] = p.seg_send_counts[x];
            if (p.R == 1) p.seg_recv_counts[x] = p.seg_send_counts[x];
        }
        __syncthreads();
        int64_t sent = block_exclusive_scan(p.seg_send_offsets, RS);
        if (tid == 0) p.totals[0] = sent;
    }
    if (!(phase & 2)) return;
    if (tid == 0) received = 0;
    __syncthreads();
    for (int s = tid; s < S; s += blockDim.x) {         /* per local expert: its rows, padded */
        int64_t n = 0;
        for (int q = 0; q < p.R; ++q) n += p.seg_recv_counts[q * S + s];
        p.local_counts[s] = n;
        first[s] = p.chunk > 0 ? (n + p.chunk - 1) / p.chunk * p.chunk : n;
        atomicAdd(&received, (unsigned long long)n);
    }
    __syncthreads();
    int64_t padded = block_exclusive_scan(first, S);
    for (int s = tid; s < S; s += blockDim.x) {
        int64_t row = first[s];
        p.local_offsets[s] = row;
        for (int q = 0; q < p.R; ++q) {
            p.seg_recv_offsets[q * S + s] = row;
            row += p.seg_recv_counts[q * S + s];
        }
    }
    if (tid == 0) {
        p.totals[1] = (int64_t)received;
        p.totals[2] = padded;
        p.totals[3] = p.chunk > 0 ? padded / p.chunk : 0;
    }
    if (p.chunk <= 0 || p.local_experts <= 0) return;
    for (int64_t c = tid; c < p.chunks; c += blockDim.x) {     /* the expert whose rows chunk c holds */
        int64_t row = c * p.chunk;
        int lo = 0, hi = p.local_experts - 1;
        while (lo < hi) {
            int mid = (lo + hi + 1) >> 1;
            if (first[mid] <= row) lo = mid;
            else hi = mid - 1;
        }
        p.chunk_weights[c] = (void*)(p.w_up + (size_t)lo * p.up_bytes);
        p.chunk_weights[p.chunks + c] = (void*)(p.w_down + (size_t)lo * p.down_bytes);
    }
}

/* Where each slot's row goes, as the core's plan places it, and its combine weight. */
__global__ void __launch_bounds__(MOE_EP__CUDA_PLAN_BLOCK) plan_map_kernel(moe_ep__cuda_k_plan p) {
    int64_t i = (int64_t)blockIdx.x * MOE_EP__CUDA_PLAN_BLOCK + threadIdx.x;
    if (i >= p.slots) return;
    int e = p.topk_idx[i], owner = p.expert_at[e], l = p.expert_at[p.E + e];
    int64_t rank = (int64_t)p.block_counts[(int64_t)blockIdx.x * p.E + e] + p.slot_rank[i];
    int32_t v = -1;
    if (p.capacity < 0 || rank < p.capacity)
        v = owner == p.rank ? (int32_t)(-(p.seg_recv_offsets[(int64_t)p.rank * p.S + l] + rank) - 2)
                            : (int32_t)(p.seg_send_offsets[(int64_t)owner * p.S + l] + rank);
    p.slot_map[i] = v;
    p.weight[i] = p.scale_input ? 1.0f : p.topk_weight[i];
}
} /* namespace moe_ep_cuda_kernels */

extern "C" int moe_ep__cuda_k_plan_send(const moe_ep__cuda_k_plan* p, void* stream) {
    using namespace moe_ep_cuda_kernels;
    cudaStream_t s = (cudaStream_t)stream;
    int64_t blocks = (p->slots + MOE_EP__CUDA_PLAN_BLOCK - 1) / MOE_EP__CUDA_PLAN_BLOCK;
    size_t shared = sizeof(int32_t) * MOE_EP__CUDA_PLAN_WARPS * (size_t)p->E;
    if (blocks > 0) {
        if (shared > 48 * 1024) {
            cudaError_t e = cudaFuncSetAttribute(plan_count_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 (int)shared);
            if (e != cudaSuccess) return (int)e;
        }
        plan_count_kernel<<<(unsigned)blocks, MOE_EP__CUDA_PLAN_BLOCK, shared, s>>>(*p);
    }
    plan_sizes_kernel<<<1, 1024, 0, s>>>(*p, blocks, p->R == 1 ? 3 : 1);
    if (p->R == 1 && blocks > 0) plan_map_kernel<<<(unsigned)blocks, MOE_EP__CUDA_PLAN_BLOCK, 0, s>>>(*p);
    return (int)cudaGetLastError();
}

extern "C" int moe_ep__cuda_k_plan_receive(const moe_ep__cuda_k_plan* p, void* stream) {
    using namespace moe_ep_cuda_kernels;
    cudaStream_t s = (cudaStream_t)stream;
    int64_t blocks = (p->slots + MOE_EP__CUDA_PLAN_BLOCK - 1) / MOE_EP__CUDA_PLAN_BLOCK;
    plan_sizes_kernel<<<1, 1024, 0, s>>>(*p, blocks, 2);
    if (blocks > 0) plan_map_kernel<<<(unsigned)blocks, MOE_EP__CUDA_PLAN_BLOCK, 0, s>>>(*p);
    return (int)cudaGetLastError();
}

extern "C" int moe_ep__cuda_k_slot_map(const int64_t* slot_rows, const int32_t* topk_idx, const int32_t* owner_local,
                                       const int64_t* self_shift, int64_t slots, int32_t* slot_map, void* stream) {
    using namespace moe_ep_cuda_kernels;
    if (slots <= 0) return 0;
    slot_map_kernel<<<grid_for(slots, 256), 256, 0, (cudaStream_t)stream>>>(slot_rows, topk_idx, owner_local, self_shift,
                                                                            slots, slot_map);
    return (int)cudaGetLastError();
}

extern "C" int moe_ep__cuda_k_stage_map(const int64_t* chunk_start, const int64_t* chunk_dest, int chunks, int64_t rows,
                                        int32_t* stage_map, void* stream) {
    using namespace moe_ep_cuda_kernels;
    if (rows <= 0 || chunks <= 0) return 0;
    stage_map_kernel<<<grid_for(rows, 256), 256, 0, (cudaStream_t)stream>>>(chunk_start, chunk_dest, chunks, rows,
                                                                             stage_map);
    return (int)cudaGetLastError();
}

extern "C" int moe_ep__cuda_k_permute(const void* x, void* send, void* local, const int32_t* slot_map, int64_t tokens,
                                      int top_k, size_t row_bytes, int pass, void* stream) {
    using namespace moe_ep_cuda_kernels;
    cudaStream_t s = (cudaStream_t)stream;
    if (tokens <= 0) return 0;
    switch (unit_bytes(row_bytes, x, send, local)) {
    case 16: return (int)launch_permute<uint4>(x, send, local, slot_map, tokens, top_k, row_bytes, pass, s);
    case 8: return (int)launch_permute<uint2>(x, send, local, slot_map, tokens, top_k, row_bytes, pass, s);
    case 4: return (int)launch_permute<uint32_t>(x, send, local, slot_map, tokens, top_k, row_bytes, pass, s);
    default: return (int)launch_permute<uint16_t>(x, send, local, slot_map, tokens, top_k, row_bytes, pass, s);
    }
}

extern "C" int moe_ep__cuda_k_move_rows(const void* src, void* dst, const int32_t* map, int64_t rows,
                                        size_t row_bytes, int scatter, void* stream) {
    using namespace moe_ep_cuda_kernels;
    cudaStream_t s = (cudaStream_t)stream;
    if (rows <= 0) return 0;
    switch (unit_bytes(row_bytes, src, dst, 0)) {
    case 16: return (int)launch_move<uint4>(src, dst, map, rows, row_bytes, scatter, s);
    case 8: return (int)launch_move<uint2>(src, dst, map, rows, row_bytes, scatter, s);
    case 4: return (int)launch_move<uint32_t>(src, dst, map, rows, row_bytes, scatter, s);
    default: return (int)launch_move<uint16_t>(src, dst, map, rows, row_bytes, scatter, s);
    }
}

extern "C" int moe_ep__cuda_k_activation(void* h, int64_t rows, int ff, int64_t ld, const moe_ep__cuda_k_act* act,
                                         int dtype, void* stream) {
    using namespace moe_ep_cuda_kernels;
    cudaStream_t s = (cudaStream_t)stream;
    if (rows <= 0 || ff <= 0) return 0;
    if (dtype == MOE_EP__CUDA_K_BF16) {
        if (ff % 8 == 0 && ld % 8 == 0 && aligned(h, 16) && aligned(act->bias, 16))
            return (int)launch_activation<__nv_bfloat16, 8>(h, rows, ff, ld, *act, s);
        return (int)launch_activation<__nv_bfloat16, 1>(h, rows, ff, ld, *act, s);
    }
    if (ff % 4 == 0 && ld % 4 == 0 && aligned(h, 16) && aligned(act->bias, 16))
        return (int)launch_activation<float, 4>(h, rows, ff, ld, *act, s);
    return (int)launch_activation<float, 1>(h, rows, ff, ld, *act, s);
}

extern "C" int moe_ep__cuda_k_add_bias(void* h, int64_t rows, int cols, const void* bias, const int64_t* first_row,
                                       int groups, int dtype, void* stream) {
    using namespace moe_ep_cuda_kernels;
    cudaStream_t s = (cudaStream_t)stream;
    if (rows <= 0 || cols <= 0) return 0;
    if (dtype == MOE_EP__CUDA_K_BF16)
        add_bias_kernel<__nv_bfloat16><<<grid_for(rows * cols, 256), 256, 0, s>>>(
            (__nv_bfloat16*)h, rows, cols, (const __nv_bfloat16*)bias, first_row, groups);
    else
        add_bias_kernel<float><<<grid_for(rows * cols, 256), 256, 0, s>>>((float*)h, rows, cols, (const float*)bias,
                                                                          first_row, groups);
    return (int)cudaGetLastError();
}

extern "C" int moe_ep__cuda_k_scale_rows(const void* x, const float* weight, int64_t tokens, int top_k, int d,
                                         void* scaled, int dtype, void* stream) {
    using namespace moe_ep_cuda_kernels;
    cudaStream_t s = (cudaStream_t)stream;
    int64_t items = tokens * top_k * d;
    if (items <= 0) return 0;
    if (dtype == MOE_EP__CUDA_K_BF16)
        scale_rows_kernel<__nv_bfloat16><<<grid_for(items, 256), 256, 0, s>>>(
            (const __nv_bfloat16*)x, weight, tokens, top_k, d, (__nv_bfloat16*)scaled);
    else
        scale_rows_kernel<float><<<grid_for(items, 256), 256, 0, s>>>((const float*)x, weight, tokens, top_k, d,
                                                                      (float*)scaled);
    return (int)cudaGetLastError();
}

extern "C" int moe_ep__cuda_k_strided_copy(const void* src, int64_t offset, int64_t row_stride, int64_t col_stride,
                                           int64_t rows, int64_t cols, void* dst, int elem_bytes, void* stream) {
    using namespace moe_ep_cuda_kernels;
    cudaStream_t s = (cudaStream_t)stream;
    if (rows <= 0 || cols <= 0) return 0;
    if (elem_bytes == 2)
        strided_copy_kernel<uint16_t><<<grid_for(rows * cols, 256), 256, 0, s>>>(
            (const uint16_t*)src, offset, row_stride, col_stride, rows, cols, (uint16_t*)dst);
    else
        strided_copy_kernel<uint32_t><<<grid_for(rows * cols, 256), 256, 0, s>>>(
            (const uint32_t*)src, offset, row_stride, col_stride, rows, cols, (uint32_t*)dst);
    return (int)cudaGetLastError();
}

extern "C" int moe_ep__cuda_k_shared_out(const void* shared, const float* gate_logit, int64_t tokens, int d, void* y,
                                         int accumulate, int dtype, void* stream) {
    using namespace moe_ep_cuda_kernels;
    cudaStream_t s = (cudaStream_t)stream;
    if (tokens <= 0 || d <= 0) return 0;
    if (dtype == MOE_EP__CUDA_K_BF16)
        shared_out_kernel<__nv_bfloat16><<<grid_for(tokens * d, 256), 256, 0, s>>>(
            (const __nv_bfloat16*)shared, gate_logit, tokens, d, (__nv_bfloat16*)y, accumulate);
    else
        shared_out_kernel<float><<<grid_for(tokens * d, 256), 256, 0, s>>>((const float*)shared, gate_logit, tokens, d,
                                                                           (float*)y, accumulate);
    return (int)cudaGetLastError();
}

extern "C" int moe_ep__cuda_k_unpermute(const void* send, const void* local, const int32_t* slot_map,
                                        const float* weight, void* y, int64_t tokens, int top_k, int d_model,
                                        int dtype, void* stream) {
    using namespace moe_ep_cuda_kernels;
    cudaStream_t s = (cudaStream_t)stream;
    if (tokens <= 0) return 0;
    if (dtype == MOE_EP__CUDA_K_BF16) {
        slot_rows<__nv_bfloat16> rows = { (const __nv_bfloat16*)send, (const __nv_bfloat16*)local, slot_map, d_model };
        if (d_model % 8 == 0 && aligned(send, 16) && aligned(local, 16) && aligned(y, 16))
            return (int)launch_unpermute<__nv_bfloat16, 8>(rows, weight, y, tokens, top_k, d_model, s);
        return (int)launch_unpermute<__nv_bfloat16, 1>(rows, weight, y, tokens, top_k, d_model, s);
    }
    slot_rows<float> rows = { (const float*)send, (const float*)local, slot_map, d_model };
    if (d_model % 4 == 0 && aligned(send, 16) && aligned(local, 16) && aligned(y, 16))
        return (int)launch_unpermute<float, 4>(rows, weight, y, tokens, top_k, d_model, s);
    return (int)launch_unpermute<float, 1>(rows, weight, y, tokens, top_k, d_model, s);
}

extern "C" int moe_ep__cuda_k_topk(const float* logits, int64_t tokens, int num_experts, int top_k,
                                   const moe_ep__cuda_k_router* router, int32_t* idx, float* weight, void* stream) {
    using namespace moe_ep_cuda_kernels;
    cudaStream_t s = (cudaStream_t)stream;
    int warps = num_experts <= 1024 ? 4 : 1;
    size_t tail = 2 * (size_t)router->groups > (size_t)top_k ? 2 * (size_t)router->groups : (size_t)top_k;
    size_t shared = sizeof(float) * (3 * (size_t)num_experts + tail) * (size_t)warps;
    int slots = (num_experts + 31) / 32, G = router->groups;
    unsigned blocks = (unsigned)((tokens + 3) / 4);
    if (tokens <= 0) return 0;
    if (slots <= 8 && top_k <= 32 && (G <= 1 || (num_experts / G) % 32 == 0)) {
        if (slots <= 1) topk_reg_kernel<1><<<blocks, 128, 0, s>>>(logits, tokens, num_experts, top_k, *router, idx, weight);
        else if (slots <= 2)
            topk_reg_kernel<2><<<blocks, 128, 0, s>>>(logits, tokens, num_experts, top_k, *router, idx, weight);
        else if (slots <= 4)
            topk_reg_kernel<4><<<blocks, 128, 0, s>>>(logits, tokens, num_experts, top_k, *router, idx, weight);
        else topk_reg_kernel<8><<<blocks, 128, 0, s>>>(logits, tokens, num_experts, top_k, *router, idx, weight);
        return (int)cudaGetLastError();
    }
    if (shared > 48 * 1024) {
        cudaError_t e = cudaFuncSetAttribute(topk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shared);
        if (e != cudaSuccess) return (int)e;
    }
    topk_kernel<<<(unsigned)((tokens + warps - 1) / warps), 32 * warps, shared, s>>>(logits, tokens, num_experts, top_k,
                                                                                    *router, idx, weight);
    return (int)cudaGetLastError();
}

namespace moe_ep_cuda_kernels {
/* Rank order, one rounding per addition: the bits do not depend on the grid. */
template <typename T>
__global__ void sum_ranks_kernel(const float* parts, int64_t count, int ranks, T* out) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += (int64_t)gridDim.x * blockDim.x) {
        float acc = parts[i];
        for (int r = 1; r < ranks; ++r) acc = __fadd_rn(acc, parts[(int64_t)r * count + i]);
        store_f(&out[i], acc);
    }
}
}

extern "C" int moe_ep__cuda_k_sum_ranks(const float* parts, int64_t count, int ranks, void* out, int dtype,
                                        void* stream) {
    using namespace moe_ep_cuda_kernels;
    cudaStream_t s = (cudaStream_t)stream;
    if (count <= 0 || ranks <= 0) return 0;
    if (dtype == MOE_EP__CUDA_K_BF16)
        sum_ranks_kernel<__nv_bfloat16><<<grid_for(count, 256), 256, 0, s>>>(parts, count, ranks, (__nv_bfloat16*)out);
    else
        sum_ranks_kernel<float><<<grid_for(count, 256), 256, 0, s>>>(parts, count, ranks, (float*)out);
    return (int)cudaGetLastError();
}

namespace moe_ep_cuda_kernels {
__global__ void direct_publish_kernel(moe_ep__cuda_k_direct g, const int64_t* __restrict__ table, int64_t count,
                                      uint64_t epoch) {
    if (!block_wait(g, MOE_EP__CUDA_PHASE_READ, epoch - 1)) return;
    int64_t* mine = (int64_t*)(g.peers[g.rank] + g.table_off);
    for (int64_t i = threadIdx.x; i < count; i += blockDim.x) mine[i] = table[i];
    __syncthreads();
    signal_all(g, MOE_EP__CUDA_PHASE_TABLE, epoch, threadIdx.x, blockDim.x);
}

__global__ void direct_resolve_kernel(moe_ep__cuda_k_direct g, const int32_t* __restrict__ slot_map,
                                      const int32_t* __restrict__ topk_idx, const int32_t* __restrict__ expert_at,
                                      int E, const int64_t* __restrict__ send_off, int S, int64_t slots,
                                      int64_t* __restrict__ dest, uint64_t epoch) {
    if (!block_wait(g, MOE_EP__CUDA_PHASE_TABLE, epoch)) return;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < slots; i += (int64_t)gridDim.x * blockDim.x) {
        int32_t v = slot_map[i];
        int64_t out = -1;
        if (v <= -2) {
            out = ((int64_t)g.rank << 32) | (int64_t)(-(int64_t)v - 2);
        } else if (v >= 0) {
            int e = topk_idx[i];
            int r = expert_at[e], l = expert_at[E + e];
            const int64_t* table = (const int64_t*)(g.peers[r] + g.table_off);
            out = ((int64_t)r << 32) | (table[(size_t)g.rank * S + l] + v - send_off[(size_t)r * S + l]);
        }
        dest[i] = out;
    }
    grid_done_signal(g, g.counters + 1, MOE_EP__CUDA_PHASE_READ, epoch);
}

/* One warp per token, as permute_kernel: the row is read once and stored to each of its
   slots' places, four units at a time per lane so that several stores are in flight. */
template <typename U>
__global__ void direct_push_kernel(moe_ep__cuda_k_direct g, const char* __restrict__ x, const int64_t* __restrict__ dest,
                                   int64_t tokens, int top_k, size_t row_bytes, uint64_t epoch) {
    if (block_wait(g, MOE_EP__CUDA_PHASE_OUT, epoch - 1)) {
        int64_t units = (int64_t)(row_bytes / sizeof(U));
        int lane = threadIdx.x & 31;
        int64_t warp = global_warp(), warps = warp_count();
        for (int64_t t = warp; t < tokens; t += warps) {
            const int64_t* slot = dest + t * top_k;
            const U* src = (const U*)(x + (size_t)t * row_bytes);
            for (int64_t i0 = lane; i0 < units; i0 += 32 * 4) {
                U value[4];
                for (int u = 0; u < 4; ++u)
                    if (i0 + 32 * u < units) value[u] = src[i0 + 32 * u];
                for (int j = 0; j < top_k; ++j) {
                    int64_t v = slot[j];
                    if (v < 0) continue;
                    U* to = (U*)(g.peers[v >> 32] + g.recv_off + (size_t)(v & 0xFFFFFFFF) * row_bytes);
                    for (int u = 0; u < 4; ++u)
                        if (i0 + 32 * u < units) to[i0 + 32 * u] = value[u];
                }
            }
        }
    }
    grid_done_signal(g, g.counters, MOE_EP__CUDA_PHASE_DATA, epoch);
}

__global__ void direct_signal_kernel(moe_ep__cuda_k_direct g, int phase, uint64_t epoch) {
    signal_all(g, phase, epoch, threadIdx.x, blockDim.x);
}

__global__ void direct_wait_kernel(moe_ep__cuda_k_direct g, int phase, uint64_t epoch) {
    block_wait(g, phase, epoch);
}

template <typename U>
static cudaError_t launch_push(moe_ep__cuda_k_direct g, const void* x, const int64_t* dest, int64_t tokens, int k,
                               size_t rb, uint64_t epoch, cudaStream_t s) {
    direct_push_kernel<U><<<grid_for(tokens, 8), 256, 0, s>>>(g, (const char*)x, dest, tokens, k, rb, epoch);
    return cudaGetLastError();
}
} /* namespace moe_ep_cuda_kernels */

extern "C" int moe_ep__cuda_k_direct_publish(moe_ep__cuda_k_direct g, const int64_t* table, int64_t count,
                                             uint64_t epoch, void* stream) {
    using namespace moe_ep_cuda_kernels;
    direct_publish_kernel<<<1, 256, 0, (cudaStream_t)stream>>>(g, table, count, epoch);
    return (int)cudaGetLastError();
}

extern "C" int moe_ep__cuda_k_direct_resolve(moe_ep__cuda_k_direct g, const int32_t* slot_map, const int32_t* topk_idx,
                                             const int32_t* expert_at, int num_experts, const int64_t* send_off,
                                             int S, int64_t slots, int64_t* dest, uint64_t epoch, void* stream) {
    using namespace moe_ep_cuda_kernels;
    direct_resolve_kernel<<<grid_for(slots, 256), 256, 0, (cudaStream_t)stream>>>(g, slot_map, topk_idx, expert_at,
                                                                                  num_experts, send_off, S, slots,
                                                                                  dest, epoch);
    return (int)cudaGetLastError();
}

extern "C" int moe_ep__cuda_k_direct_push(moe_ep__cuda_k_direct g, const void* x, const int64_t* dest, int64_t tokens,
                                          int top_k, size_t row_bytes, uint64_t epoch, void* stream) {
    using namespace moe_ep_cuda_kernels;
    cudaStream_t s = (cudaStream_t)stream;
    if (tokens < 0) tokens = 0;
    switch (unit_bytes(row_bytes, x, (const void*)(uintptr_t)g.recv_off, 0)) {
    case 16: return (int)launch_push<uint4>(g, x, dest, tokens, top_k, row_bytes, epoch, s);
    case 8: return (int)launch_push<uint2>(g, x, dest, tokens, top_k, row_bytes, epoch, s);
    case 4: return (int)launch_push<uint32_t>(g, x, dest, tokens, top_k, row_bytes, epoch, s);
    default: return (int)launch_push<uint16_t>(g, x, dest, tokens, top_k, row_bytes, epoch, s);
    }
}

extern "C" int moe_ep__cuda_k_direct_signal(moe_ep__cuda_k_direct g, int phase, uint64_t epoch, void* stream) {
    using namespace moe_ep_cuda_kernels;
    direct_signal_kernel<<<1, 32, 0, (cudaStream_t)stream>>>(g, phase, epoch);
    return (int)cudaGetLastError();
}

extern "C" int moe_ep__cuda_k_direct_wait(moe_ep__cuda_k_direct g, int phase, uint64_t epoch, void* stream) {
    using namespace moe_ep_cuda_kernels;
    direct_wait_kernel<<<1, 32, 0, (cudaStream_t)stream>>>(g, phase, epoch);
    return (int)cudaGetLastError();
}

extern "C" int moe_ep__cuda_k_direct_combine(moe_ep__cuda_k_direct g, const int64_t* dest, const float* weight, void* y,
                                             int64_t tokens, int top_k, int d_model, int dtype, uint64_t epoch,
                                             void* stream) {
    using namespace moe_ep_cuda_kernels;
    cudaStream_t s = (cudaStream_t)stream;
    /* every region's out_off and row size are 16-aligned when d is a multiple of 8 (bf16) or 4 (fp32) */
    bool wide = aligned((const void*)(uintptr_t)g.out_off, 16) && aligned(y, 16);
    /* one thread waits, in a kernel of its own: blocks that each waited would keep every
       SM of an early rank spinning until the slowest rank's experts are done */
    direct_wait_kernel<<<1, 32, 0, s>>>(g, MOE_EP__CUDA_PHASE_OUT, epoch);
    if (cudaPeekAtLastError() != cudaSuccess) return (int)cudaGetLastError();
    if (dtype == MOE_EP__CUDA_K_BF16) {
        region_rows<__nv_bfloat16> rows = { g.peers, g.out_off, (size_t)d_model * 2, dest };
        if (d_model % 8 == 0 && wide)
            return (int)launch_unpermute<__nv_bfloat16, 8>(rows, weight, y, tokens, top_k, d_model, s);
        return (int)launch_unpermute<__nv_bfloat16, 1>(rows, weight, y, tokens, top_k, d_model, s);
    }
    region_rows<float> rows = { g.peers, g.out_off, (size_t)d_model * 4, dest };
    if (d_model % 4 == 0 && wide)
        return (int)launch_unpermute<float, 4>(rows, weight, y, tokens, top_k, d_model, s);
    return (int)launch_unpermute<float, 1>(rows, weight, y, tokens, top_k, d_model, s);
}

namespace moe_ep_cuda_kernels {
/* >>low-latency mode */
__device__ __forceinline__ moe_ep__cuda_k_ll_ctl* ll_ctl(const moe_ep__cuda_k_ll& g, int q) {
    return (moe_ep__cuda_k_ll_ctl*)(g.peers[q] + g.ctl_off);
}

__device__ __forceinline__ uint64_t* ll_flag(const moe_ep__cuda_k_ll& g, int q, int phase) {
    return (uint64_t*)g.peers[q] + (size_t)phase * g.world + g.rank;
}

/* Counts, tables and rows that other blocks or ranks wrote during this kernel: read past L1. */
__device__ __forceinline__ int64_t ll_load(const int64_t* p) { return (int64_t)__ldcg((const long long*)p); }
__device__ __forceinline__ uint4 ll_load(const uint4* p) { return __ldcg(p); }
__device__ __forceinline__ uint2 ll_load(const uint2* p) { return __ldcg(p); }
__device__ __forceinline__ uint32_t ll_load(const uint32_t* p) { return __ldcg((const unsigned int*)p); }
__device__ __forceinline__ uint16_t ll_load(const uint16_t* p) { return __ldcg((const unsigned short*)p); }
__device__ __forceinline__ float ll_load(const float* p) { return __ldcg(p); }
__device__ __forceinline__ __nv_bfloat16 ll_load(const __nv_bfloat16* p) {
    unsigned short bits = __ldcg((const unsigned short*)p);
    return *(const __nv_bfloat16*)&bits;
}

/* Tell every rank to give up, unless this rank's own stop word says one already did: that
   rank told every rank, and the peers may have destroyed their regions since. */
__device__ void ll_stop_all(const moe_ep__cuda_k_ll& g, int why) {
    if (ld_acquire_sys(&ll_ctl(g, g.rank)->stop)) return;
    __threadfence_system();
    for (int q = 0; q < g.world; ++q) st_release_sys(&ll_ctl(g, q)->stop, (uint64_t)why);
}

/* Why this rank must not start a step: its host's abort or give-up (ctl[1]) or a peer's stop
   word; 0: it may. A rank that arrives after the others gave up writes nothing into their
   regions, which they may have freed. A peer's stop word is kept in ctl[1], as a wait keeps it. */
__device__ int ll_stopped(const moe_ep__cuda_k_ll& g) {
    volatile int* ctl = g.ctl;
    int why = ctl[1];
    if (!why && (why = (int)ld_acquire_sys(&ll_ctl(g, g.rank)->stop)) != 0) ctl[1] = why;
    return why;
}

/* One thread: until every rank's flag of `phase` in this rank's region reaches epoch. 0: it
   did; else why not (1: timed out, 2: aborted by this rank's host or, through its stop word,
   by a peer), kept in ctl[1] and told to every rank. */
__device__ int ll_wait(const moe_ep__cuda_k_ll& g, int phase, uint64_t epoch) {
    const uint64_t* flags = (const uint64_t*)g.peers[g.rank] + (size_t)phase * g.world;
    const uint64_t* stop = &ll_ctl(g, g.rank)->stop;
    volatile int* ctl = g.ctl;
    uint64_t start = global_ns();
    int why = 0;
    for (int q = 0; q < g.world && !why; ++q) {
        unsigned spins = 0;
        while (ld_acquire_sys(flags + q) < epoch) {
            if (++spins % 64 != 0) continue;
            why = ctl[1] ? ctl[1] : (int)ld_acquire_sys(stop);
            if (!why && g.timeout_ns > 0 && global_ns() - start > g.timeout_ns) why = 1;
            if (why) break;
        }
    }
    if (why) {
        if (!ctl[1]) ctl[1] = why;
        ll_stop_all(g, why);
    }
    return why;
}

/* Block-uniform: the block's writes are done; true in the last block of the grid to get
   here, which then sees every other block's writes (and resets the counter for the next
   launch, which the stream orders after this one). */
__device__ bool ll_last_block(unsigned* counter) {
    __shared__ bool last;
    __threadfence_system();
    __syncthreads();
    if (threadIdx.x == 0) {
        last = atomicAdd(counter, 1u) == gridDim.x - 1;
        if (last) *counter = 0;
    }
    __syncthreads();
    return last;
}

__global__ void __launch_bounds__(MOE_EP__CUDA_PLAN_BLOCK) ll_map_kernel(moe_ep__cuda_k_plan p, int64_t* dest,
                                                                         int64_t max_tokens) {
    int64_t i = (int64_t)blockIdx.x * MOE_EP__CUDA_PLAN_BLOCK + threadIdx.x;
    if (i >= p.slots) return;
    int e = p.topk_idx[i], owner = p.expert_at[e], l = p.expert_at[p.E + e];
    int64_t rank = (int64_t)p.block_counts[(int64_t)blockIdx.x * p.E + e] + p.slot_rank[i];
    int64_t v = -1;
    if (p.capacity < 0 || rank < p.capacity) v = ((int64_t)owner << 32) | (((int64_t)l * p.R + p.rank) * max_tokens + rank);
    dest[i] = v;
    p.weight[i] = p.scale_input ? 1.0f : p.topk_weight[i];
}

/* The receive layout from the counts (none after a failed wait), as plan_sizes_kernel's
   phase 2 makes it: first[s] = local expert s's first row. Block 0 publishes it. */
__device__ void ll_layout(const moe_ep__cuda_k_ll& g, const moe_ep__cuda_k_plan& p, int64_t* first, int why) {
    const int64_t* counts = (const int64_t*)(g.peers[g.rank] + g.counts_off);
    int S = p.S, W = g.world;
    for (int s = threadIdx.x; s < S; s += blockDim.x) {
        int64_t n = 0;
        for (int q = 0; !why && q < W; ++q) n += ll_load(counts + (size_t)s * W + q);
        if (blockIdx.x == 0) p.local_counts[s] = n;
        first[s] = p.chunk > 0 ? (n + p.chunk - 1) / p.chunk * p.chunk : n;
    }
    __syncthreads();
    int64_t total = block_exclusive_scan(first, S);
    if (blockIdx.x != 0) return;
    int64_t* table = (int64_t*)(g.peers[g.rank] + g.table_off);
    for (int s = threadIdx.x; s < S; s += blockDim.x) {
        int64_t row = first[s];
        p.local_offsets[s] = row;
        for (int q = 0; q < W; ++q) {
            table[(size_t)q * S + s] = row;
            row += why ? 0 : ll_load(counts + (size_t)s * W + q);
        }
    }
    if (threadIdx.x == 0) p.totals[0] = total;  /* local_offsets[S]: the rows' end */
    if (p.chunk <= 0 || p.local_experts <= 0) return;
    for (int64_t c = threadIdx.x; c < p.chunks; c += blockDim.x) {     /* the expert whose rows chunk c holds */
        int64_t row = c * p.chunk;
        int lo = 0, hi = p.local_experts - 1;
        while (lo < hi) {
            int mid = (lo + hi + 1) >> 1;
            if (first[mid] <= row) lo = mid;
            else hi = mid - 1;
        }
        p.chunk_weights[c] = (void*)(p.w_up + (size_t)lo * p.up_bytes);
        p.chunk_weights[p.chunks + c] = (void*)(p.w_down + (size_t)lo * p.down_bytes);
    }
}

template <typename U>
__global__ void __launch_bounds__(256) ll_dispatch_kernel(moe_ep__cuda_k_ll g, moe_ep__cuda_k_plan p,
                                                          const char* __restrict__ x, const int64_t* __restrict__ dest,
                                                          int64_t sources, int per_row, char* __restrict__ recv) {
    __shared__ int64_t first[1024];
    __shared__ int why;
    moe_ep__cuda_k_ll_ctl* ctl = ll_ctl(g, g.rank);
    const uint64_t epoch = *(volatile uint64_t*)&ctl->step + 1;
    const size_t rb = g.row_bytes;
    const int64_t units = (int64_t)(rb / sizeof(U));
    const int lane = threadIdx.x & 31, W = g.world;
    const int64_t warp = global_warp(), warps = warp_count();
    if (threadIdx.x == 0) why = ll_stopped(g);
    __syncthreads();
    /* 1. every (token, slot) row to its landing row in its owner's region: a warp each (a
       decode step has few tokens and k slots each), four units per lane in flight */
    for (int64_t item = warp; !why && item < sources * per_row; item += warps) {
        int64_t v = dest[item];
        if (v < 0) continue;
        const U* src = (const U*)(x + (size_t)(item / per_row) * rb);
        U* to = (U*)(g.peers[v >> 32] + g.land_off + (size_t)(v & 0xFFFFFFFF) * rb);
        for (int64_t i0 = lane; i0 < units; i0 += 32 * 4) {
            U value[4];
            for (int u = 0; u < 4; ++u)
                if (i0 + 32 * u < units) value[u] = src[i0 + 32 * u];
            for (int u = 0; u < 4; ++u)
                if (i0 + 32 * u < units) to[i0 + 32 * u] = value[u];
        }
    }
    /* 2. the last block: this rank's count for every (owner, local expert), then DATA(epoch) */
    if (ll_last_block(&ctl->counters[0]) && !why) {
        for (int e = threadIdx.x; e < p.E; e += blockDim.x) {
            int owner = p.expert_at[e], l = p.expert_at[p.E + e];
            ((int64_t*)(g.peers[owner] + g.counts_off))[(size_t)l * W + g.rank] = p.kept[e];
        }
        __threadfence_system();
        __syncthreads();
        for (int q = threadIdx.x; q < W; q += blockDim.x) st_release_sys(ll_flag(g, q, MOE_EP__CUDA_PHASE_DATA), epoch);
    }
    /* 3. every rank's rows and counts are here */
    if (threadIdx.x == 0 && !why) why = ll_wait(g, MOE_EP__CUDA_PHASE_DATA, epoch);
    __syncthreads();
    ll_layout(g, p, first, why);
    if (why) return;
    /* 4. each (local expert, source) segment from its landing rows to its place */
    const int64_t* counts = (const int64_t*)(g.peers[g.rank] + g.counts_off);
    for (int64_t seg = blockIdx.x; seg < (int64_t)p.S * W; seg += gridDim.x) {
        int s = (int)(seg / W), q = (int)(seg % W);
        int64_t n = ll_load(counts + seg), base = first[s];
        for (int q2 = 0; q2 < q; ++q2) base += ll_load(counts + (size_t)s * W + q2);
        const char* from = g.peers[g.rank] + g.land_off + (size_t)seg * (size_t)g.max_tokens * rb;
        char* to = recv + (size_t)base * rb;
        /* a few rows per segment in decode: the block's warps share each row, a part each */
        const int parts = (int)(blockDim.x >> 5);
        for (int64_t item = threadIdx.x >> 5; item < n * parts; item += parts) {
            int64_t r = item / parts, part = item % parts;
            int64_t begin = units * part / parts, end = units * (part + 1) / parts;
            const U* a = (const U*)(from + (size_t)r * rb);
            U* b = (U*)(to + (size_t)r * rb);
            for (int64_t i = begin + lane; i < end; i += 32) b[i] = ll_load(a + i);
        }
    }
}

/* dest's landing row (s * world + q) * max_tokens + i (q: this rank) -> the owner's
   received row, from the owner's table. */
template <typename T>
struct ll_rows {
    char* const* peers;
    const int64_t* dest;
    size_t table_off, out_off, row_bytes;
    int64_t max_tokens;
    int rank, world, S;
    __device__ const T* operator()(int64_t i) const {
        int64_t v = dest[i];
        if (v < 0) return (const T*)0;
        const char* region = peers[v >> 32];
        int64_t landing = v & 0xFFFFFFFF, s = landing / ((int64_t)world * max_tokens);
        int64_t row = ll_load((const int64_t*)(region + table_off) + (size_t)rank * S + s) + landing % max_tokens;
        return (const T*)(region + out_off + (size_t)row * row_bytes);
    }
};

/* unpermute_kernel's sums (the same order and operations: the same bits), after the OUT
   handshake; one block per token, grid-stride. */
template <typename T, int V>
__global__ void ll_combine_kernel(moe_ep__cuda_k_ll g, ll_rows<T> rows, const float* __restrict__ weight,
                                  T* __restrict__ y, int64_t tokens, int top_k, int d) {
    extern __shared__ unsigned char smem[];
    __shared__ int why;
    const T** src = (const T**)smem;
    float* w = (float*)(smem + sizeof(T*) * (size_t)top_k);
    moe_ep__cuda_k_ll_ctl* ctl = ll_ctl(g, g.rank);
    const uint64_t epoch = *(volatile uint64_t*)&ctl->step + 1;
    if (threadIdx.x == 0) why = ll_stopped(g);
    __syncthreads();
    if (blockIdx.x == 0 && !why) {
        __threadfence_system();
        for (int q = threadIdx.x; q < g.world; q += blockDim.x) st_release_sys(ll_flag(g, q, MOE_EP__CUDA_PHASE_OUT), epoch);
    }
    if (threadIdx.x == 0 && !why) why = ll_wait(g, MOE_EP__CUDA_PHASE_OUT, epoch);
    __syncthreads();
    for (int64_t t = blockIdx.x; !why && t < tokens; t += gridDim.x) {
        __syncthreads();
        for (int j = threadIdx.x; j < top_k; j += blockDim.x) {
            src[j] = rows(t * top_k + j);
            w[j] = weight[t * top_k + j];
        }
        __syncthreads();
        T* yt = y + (size_t)t * d;
        for (int i = threadIdx.x * V; i < d; i += blockDim.x * V) {
            float acc[V];
            for (int v = 0; v < V; ++v) acc[v] = 0.0f;
            for (int j = 0; j < top_k; ++j) {     /* k-slot order */
                const T* s = src[j];
                __align__(16) T in[V];
                if (!s) continue;                 /* dropped: contributes zero */
                if (V * sizeof(T) == 16) *(uint4*)in = ll_load((const uint4*)(s + i));
                else for (int v = 0; v < V; ++v) in[v] = ll_load(s + i + v);
                for (int v = 0; v < V; ++v) acc[v] += w[j] * load_f(&in[v]);
            }
            __align__(16) T out[V];
            for (int v = 0; v < V; ++v) store_f(&out[v], acc[v]);
            if (V * sizeof(T) == 16) *(uint4*)(yt + i) = *(const uint4*)out;
            else for (int v = 0; v < V; ++v) yt[i + v] = out[v];
        }
    }
    if (ll_last_block(&ctl->counters[1]) && threadIdx.x == 0) *(volatile uint64_t*)&ctl->step = epoch;
}

template <typename U>
static cudaError_t launch_ll_dispatch(const moe_ep__cuda_k_ll& g, const moe_ep__cuda_k_plan& p, const void* x,
                                      const int64_t* dest, int64_t sources, int per_row, void* recv, cudaStream_t s) {
    ll_dispatch_kernel<U><<<(unsigned)g.grid, 256, 0, s>>>(g, p, (const char*)x, dest, sources, per_row, (char*)recv);
    return cudaGetLastError();
}

template <typename T, int V>
static cudaError_t launch_ll_combine(const moe_ep__cuda_k_ll& g, ll_rows<T> rows, const float* weight, void* y,
                                     int64_t tokens, int k, int d, cudaStream_t s) {
    int threads = d / V >= 256 ? 256 : d / V >= 128 ? 128 : 64;
    size_t shared = (sizeof(T*) + sizeof(float)) * (size_t)k;
    if (shared > 48 * 1024) {
        cudaError_t e = cudaFuncSetAttribute(ll_combine_kernel<T, V>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             (int)shared);
        if (e != cudaSuccess) return e;
    }
    ll_combine_kernel<T, V><<<(unsigned)g.grid, threads, shared, s>>>(g, rows, weight, (T*)y, tokens, k, d);
    return cudaGetLastError();
}

__global__ void ll_stop_kernel(moe_ep__cuda_k_ll g, int why) {
    if (!((volatile int*)g.ctl)[1]) ((volatile int*)g.ctl)[1] = why;
    ll_stop_all(g, why);
}
} /* namespace moe_ep_cuda_kernels */

extern "C" int moe_ep__cuda_k_ll_plan(const moe_ep__cuda_k_plan* p, int64_t* dest, int64_t max_tokens, void* stream) {
    using namespace moe_ep_cuda_kernels;
    cudaStream_t s = (cudaStream_t)stream;
    int64_t blocks = (p->slots + MOE_EP__CUDA_PLAN_BLOCK - 1) / MOE_EP__CUDA_PLAN_BLOCK;
    size_t shared = sizeof(int32_t) * MOE_EP__CUDA_PLAN_WARPS * (size_t)p->E;
    if (blocks > 0) {
        if (shared > 48 * 1024) {
            cudaError_t e = cudaFuncSetAttribute(plan_count_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 (int)shared);
            if (e != cudaSuccess) return (int)e;
        }
        plan_count_kernel<<<(unsigned)blocks, MOE_EP__CUDA_PLAN_BLOCK, shared, s>>>(*p);
    }
    plan_sizes_kernel<<<1, 1024, 0, s>>>(*p, blocks, 1);
    if (blocks > 0) ll_map_kernel<<<(unsigned)blocks, MOE_EP__CUDA_PLAN_BLOCK, 0, s>>>(*p, dest, max_tokens);
    return (int)cudaGetLastError();
}

extern "C" int moe_ep__cuda_k_ll_dispatch(moe_ep__cuda_k_ll g, const moe_ep__cuda_k_plan* p, const void* x,
                                          const int64_t* dest, int64_t sources, int per_row, void* recv, void* stream) {
    using namespace moe_ep_cuda_kernels;
    cudaStream_t s = (cudaStream_t)stream;
    if (p->S > 1024 || g.grid < 1) return (int)cudaErrorInvalidValue;
    if (sources < 0) sources = 0;
    switch (unit_bytes(g.row_bytes, x, recv, (const void*)(uintptr_t)g.land_off)) {
    case 16: return (int)launch_ll_dispatch<uint4>(g, *p, x, dest, sources, per_row, recv, s);
    case 8: return (int)launch_ll_dispatch<uint2>(g, *p, x, dest, sources, per_row, recv, s);
    case 4: return (int)launch_ll_dispatch<uint32_t>(g, *p, x, dest, sources, per_row, recv, s);
    default: return (int)launch_ll_dispatch<uint16_t>(g, *p, x, dest, sources, per_row, recv, s);
    }
}

extern "C" int moe_ep__cuda_k_ll_combine(moe_ep__cuda_k_ll g, const int64_t* dest, const float* weight, void* y,
                                         int64_t tokens, int top_k, int d_model, int dtype, void* stream) {
    using namespace moe_ep_cuda_kernels;
    cudaStream_t s = (cudaStream_t)stream;
    /* every region's out_off is 16-aligned, and so is each row when d is a multiple of 8 (bf16) or 4 (fp32) */
    bool wide = aligned((const void*)(uintptr_t)g.out_off, 16) && aligned(y, 16);
    if (tokens < 0) tokens = 0;
    if (dtype == MOE_EP__CUDA_K_BF16) {
        ll_rows<__nv_bfloat16> rows = { g.peers, dest, g.table_off, g.out_off, g.row_bytes, g.max_tokens, g.rank,
                                        g.world, g.S };
        if (d_model % 8 == 0 && wide)
            return (int)launch_ll_combine<__nv_bfloat16, 8>(g, rows, weight, y, tokens, top_k, d_model, s);
        return (int)launch_ll_combine<__nv_bfloat16, 1>(g, rows, weight, y, tokens, top_k, d_model, s);
    }
    ll_rows<float> rows = { g.peers, dest, g.table_off, g.out_off, g.row_bytes, g.max_tokens, g.rank, g.world, g.S };
    if (d_model % 4 == 0 && wide)
        return (int)launch_ll_combine<float, 4>(g, rows, weight, y, tokens, top_k, d_model, s);
    return (int)launch_ll_combine<float, 1>(g, rows, weight, y, tokens, top_k, d_model, s);
}

extern "C" int moe_ep__cuda_k_ll_stop(moe_ep__cuda_k_ll g, int why, void* stream) {
    using namespace moe_ep_cuda_kernels;
    ll_stop_kernel<<<1, 1, 0, (cudaStream_t)stream>>>(g, why);
    return (int)cudaGetLastError();
}

#endif /* MOE_EP_CUDA_KERNELS_IMPL_INCLUDED */
#endif /* MOE_EP_CUDA_KERNELS_IMPLEMENTATION */

/* the Hopper grouped expert GEMM: declarations, and its kernel beside these */
#include "moe_ep_cuda_gemm.cuh"
