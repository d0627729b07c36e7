/* moe_ep_nccl.h -- the NCCL transport of moe_ep: one rank per GPU -- MIT or public domain

   A moe_ep_transport over an ncclComm_t that you create (one rank per GPU). Counts and
   status words are exchanged with grouped ncclSend/ncclRecv and copied to the host; row
   all-to-alls run as grouped ncclSend/ncclRecv on your CUDA stream, for rows in device or
   in host memory. With it the core's CPU layer (moe_ep_forward) runs across processes and
   nodes, and the GPU layer (moe_ep_cuda.h) keeps its rows in device memory. It also splits
   (ncclCommSplit) into the EP and TP groups of moe_ep_layout_split and sums in rank order
   (all_reduce_sum), so EP x DP and EP x TP x DP run over NCCL.

   DO THIS
   =======
   In exactly one C file:

       #define MOE_EP_IMPLEMENTATION
       #include "transports/moe_ep_nccl.h"     (builds the core and the transport)

   MOE_EP_NCCL_IMPLEMENTATION builds the transport alone (the core built elsewhere).
   Strict C99 users compile with -isystem /usr/local/cuda/include (nccl.h pulls in the
   CUDA runtime headers, which -pedantic rejects otherwise). Link with -lnccl -lcudart.
   No CUDA file and no cuBLAS: the GPU layer, which needs both, is moe_ep_cuda.h.

   TRANSPORTS
   ==========
   This is one of the core's transports (see moe_ep.h): the callbacks it fills are
   exchange_counts, all_to_all_v and its split-phase begin/end, barrier, abort, split,
   all_reduce_sum and destroy.

   CONFIGURATION MACROS
   ====================
   MOE_EP_IMPLEMENTATION       (undefined)   build the core and this transport in this file
   MOE_EP_NCCL_IMPLEMENTATION  (undefined)   build this transport only (the core built elsewhere)
   The core's macros (MOE_EP_STATIC, MOE_EP_API, ...) apply as documented in moe_ep.h.

   STEP BY STEP
   ============
   1. One process per GPU: rank 0 calls ncclGetUniqueId and shares it (e.g. MPI_Bcast;
      examples/nccl_mpi_demo.c), every rank cudaSetDevice()s and ncclCommInitRank()s.
      Or one thread per GPU in one process: ncclCommInitAll() on the main thread, then
      one thread per comm (tests/gpu/check_nccl.c).
   2. moe_ep_nccl_transport_create(&(moe_ep_nccl_desc){ .comm = comm, .stream = s }, &t);
   3. Use it: .transport = &t in a moe_ep_desc (the core's CPU layer, host rows) or in a
      moe_ep_cuda_layer_desc (the GPU layer, device rows).
   4. moe_ep_nccl_transport_destroy(&t); then your ncclCommDestroy and cudaStreamDestroy.

   moe_ep_nccl DOES NOT
   ====================
   - create, own or destroy your communicator (only those that split makes);
   - run kernels or the MoE layer on the GPU: that is moe_ep_cuda.h, over this or any
     transport that moves device memory.

   THREADING, STREAMS AND COLLECTIVE SEMANTICS
   ===========================================
   One transport per rank, used by one thread at a time (transport.abort excepted: any
   thread). Every callback except abort and destroy is collective over the communicator.
   Device work is queued on args->stream, or on desc.stream when that is NULL (0 = the
   legacy default stream). exchange_counts and barrier wait for their numbers.
   all_to_all_v on device memory queues the exchange: "recv holds the data" means "for
   work queued after it on the stream". On host memory it stages the rows through device
   buffers and returns when they have arrived. The begin/end forms run the exchange on an
   internal stream that waits for the caller's; end makes the caller's wait for it.

   GROUPS: EP x DP AND EP x TP x DP
   ================================
   transport.split (called by moe_ep_layout_split) is ncclCommSplit over your
   communicator, collective over it; the group transport owns the new communicator and
   destroys it in moe_ep_nccl_transport_destroy (destroy groups before their parent's
   communicator). Groups inherit the stream, timeout and allocator. All ranks of the
   parent get the same verdict (a negative color fails the split on every rank).

   all_reduce_sum gathers every rank's block (ncclAllGather) and adds the blocks on the
   host in rank order, (((r0 + r1) + r2) + ...) in fp32, so the sum is the same on every
   rank and in every run (ncclAllReduce promises no order). Device memory is copied to
   the host, summed and copied back: the call waits. (The GPU layer sums its tensor-
   parallel partials with a kernel of its own, to the same bits.) Every rank must pass
   the same count.

       moe_ep_layout_desc lay = { .world_size = R, .ep_size = 2, .tp_size = 2, .num_experts = E };
       moe_ep_layout_split(&lay, &world, MOE_EP_GROUP_EP, &ep, NULL, 0);   (collective)
       moe_ep_layout_split(&lay, &world, MOE_EP_GROUP_TP, &tp, NULL, 0);   (collective)
       .transport = &ep, .tp_transport = &tp                         (GPU layer or core)
       ...; moe_ep_nccl_transport_destroy(&tp); moe_ep_nccl_transport_destroy(&ep);

   ERRORS AND FAILURE
   ==================
   Callbacks write the cause, with NCCL's or CUDA's own text, into err_text. An
   asynchronous NCCL error, a host wait longer than desc.timeout_ms, or transport.abort()
   aborts the communicator (ncclCommAbort): the call returns MOE_EP_ERROR_TRANSPORT,
   TIMEOUT or ABORTED, the transport refuses further work, and you must not use or
   destroy that communicator again. abort() may come from any thread; it takes effect in
   the wait of a call in progress, or at the next call (or at destroy). The communicator
   must be a blocking one (the default config).

   MEMORY
   ======
   Host allocations use desc.allocator; device buffers (counts, host-row staging, the
   all-reduce's gathered blocks) are cudaMalloc'ed and pinned host memory
   cudaMallocHost'ed; they grow (by half again) when a call needs more, and stay until
   destroy.

   LICENSE
   =======
   See the end of moe_ep.h.
*/
#ifndef MOE_EP_NCCL_H_INCLUDED
#define MOE_EP_NCCL_H_INCLUDED

#if !defined(MOE_EP_H_INCLUDED) || (defined(MOE_EP_IMPLEMENTATION) && !defined(MOE_EP_IMPL_INCLUDED))
#ifdef MOE_EP_CORE_HEADER
#include MOE_EP_CORE_HEADER
#else
#include "../moe_ep.h"      /* headers in one flat folder: include "moe_ep.h" before this one */
#endif
#endif
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
#include <cuda_runtime.h>

#ifndef MOE_EP_PRIVATE
#define MOE_EP_PRIVATE static
#endif

#define MOE_EP__NCCL_REQUESTS 8
#define MOE_EP__NCCL_ERR 512

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
    float* gather_host;             /* pinned mirror: the sums are made on the host */
    size_t gather_dev_bytes, gather_host_bytes;
} moe_ep__nccl;

/* err may be NULL (the caller wants no text). */
MOE_EP_PRIVATE void moe_ep__nccl_text(char* err, size_t size, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    if (err && size > 0) vsnprintf(err, size, fmt, ap);
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

/* Grows a device buffer (pinned host memory with `pinned`) by half again; the old contents
   are not kept. On failure the buffer is gone and its capacity 0. */
MOE_EP_PRIVATE cudaError_t moe_ep__nccl_grow(void** buffer, size_t* capacity, size_t need, int pinned) {
    cudaError_t e = cudaSuccess;
    if (need > *capacity) {
        if (pinned) cudaFreeHost(*buffer);
        else cudaFree(*buffer);
        *capacity = need + need / 2;
        e = pinned ? cudaMallocHost(buffer, *capacity) : cudaMalloc(buffer, *capacity);
        if (e != cudaSuccess) {
            *buffer = NULL;
            *capacity = 0;
            (void)cudaGetLastError();
        }
    }
    return e;
}

/* Abort the communicator: the only way to release peers (and ourselves) from a
   collective that cannot complete. */
MOE_EP_PRIVATE void moe_ep__nccl_break(moe_ep__nccl* n) {
    if (n->broken) return;
    n->broken = 1;
    ncclCommAbort(n->comm);
}

MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_usable(moe_ep__nccl* n, char* err, size_t size) {
    if (n->abort_requested && !n->broken) {
        moe_ep__nccl_break(n);
        moe_ep__nccl_text(err, size, "transport.abort was called: the communicator was aborted");
        return MOE_EP_ERROR_ABORTED;
    }
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
        e = moe_ep__nccl_grow(&host, &cap_host, 2 * bytes, 1);
        if (e == cudaSuccess) e = moe_ep__nccl_grow(&dev, &cap_dev, 2 * bytes, 0);
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
    int64_t* buf = n->world_size <= 1 ? words : (int64_t*)moe_ep_alloc(&n->allocator,
                                                    sizeof(int64_t) * 2 * (size_t)n->world_size);
    moe_ep_result res;
    if (!buf) return MOE_EP_ERROR_OUT_OF_MEMORY;
    memset(buf, 0, sizeof(int64_t) * 2 * (size_t)(n->world_size <= 1 ? 1 : n->world_size));
    res = moe_ep__nccl_exchange(impl, buf, buf + n->world_size, 1, err, size);
    if (buf != words) moe_ep_free(&n->allocator, buf);
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
    if (a->send_rows || a->recv_fn) {     /* row_lists is 0: the core packs the rows for this transport */
        moe_ep__nccl_text(err, size, "moe_ep_a2a_args.send_rows, .recv_fn: the NCCL transport moves packed rows only "
                          "(its row_lists is 0); leave them NULL");
        return MOE_EP_ERROR_UNSUPPORTED;
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
        e = moe_ep__nccl_grow(&n->stage_send, &n->stage_send_bytes, (size_t)s1 * a->row_bytes, 0);
        if (e == cudaSuccess) e = moe_ep__nccl_grow(&n->stage_recv, &n->stage_recv_bytes, (size_t)r1 * a->row_bytes, 0);
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
        if (a->send_rows || a->recv_fn) {
            moe_ep__nccl_text(err, size, "moe_ep_a2a_args.send_rows, .recv_fn: the NCCL transport moves packed rows "
                              "only (its row_lists is 0); leave them NULL");
            return MOE_EP_ERROR_UNSUPPORTED;
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

/* Every rank's block gathered (ncclAllGather) and added on the host in rank order, in
   fp32: the same bits as a kernel that adds the blocks in rank order. ncclAllReduce would
   be faster but promises no order. The call waits, device memory included. */
MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_all_reduce(void* impl, float* data, int64_t count,
                                                     moe_ep_memory_space memory_space, void* stream, char* err,
                                                     size_t size) {
    moe_ep__nccl* n = (moe_ep__nccl*)impl;
    size_t bytes = (size_t)(count > 0 ? count : 0) * sizeof(float), all = bytes * (size_t)n->world_size;
    int device = memory_space == MOE_EP_MEMORY_DEVICE;
    cudaStream_t s = device ? (stream ? (cudaStream_t)stream : n->stream) : n->side;
    float* mine;
    void* buffer;
    cudaError_t e;
    ncclResult_t r;
    moe_ep_result res = moe_ep__nccl_usable(n, err, size);
    if (res != MOE_EP_OK) return res;
    if (count < 0 || (count > 0 && !data)) {
        moe_ep__nccl_text(err, size, "all_reduce_sum: count (%lld) must be >= 0 and data non-NULL", (long long)count);
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    if (count == 0 || n->world_size == 1) return MOE_EP_OK;
    /* the previous call waited for its stream: both buffers are free */
    buffer = n->gather_dev;
    e = moe_ep__nccl_grow(&buffer, &n->gather_dev_bytes, all, 0);
    n->gather_dev = (float*)buffer;
    buffer = n->gather_host;
    if (e == cudaSuccess) e = moe_ep__nccl_grow(&buffer, &n->gather_host_bytes, all, 1);
    n->gather_host = (float*)buffer;
    if (e != cudaSuccess) return moe_ep__nccl_cuda_fail(e, "all_reduce_sum buffers", err, size);
    mine = n->gather_dev + (size_t)n->rank * (size_t)count;
    if (!device) {
        e = cudaMemcpyAsync(mine, data, bytes, cudaMemcpyHostToDevice, s);
        if (e != cudaSuccess) return moe_ep__nccl_cuda_fail(e, "all_reduce_sum upload", err, size);
    }
    r = ncclAllGather(device ? (const void*)data : (const void*)mine, n->gather_dev, (size_t)count, ncclFloat, n->comm, s);
    if (r != ncclSuccess) return moe_ep__nccl_nccl_fail(n, r, "all_reduce_sum gather", err, size);
    e = cudaMemcpyAsync(n->gather_host, n->gather_dev, all, cudaMemcpyDeviceToHost, s);
    if (e != cudaSuccess) return moe_ep__nccl_cuda_fail(e, "all_reduce_sum download", err, size);
    res = moe_ep__nccl_wait(n, s, NULL, err, size);
    if (res != MOE_EP_OK) return res;
    /* host memory: straight into data; device memory: in the pinned buffer's first
       block, then uploaded */
    moe_ep__nccl_sum_host(n, device ? n->gather_host : data, count);
    if (!device) return MOE_EP_OK;
    e = cudaMemcpyAsync(data, n->gather_host, bytes, cudaMemcpyHostToDevice, s);
    if (e != cudaSuccess) return moe_ep__nccl_cuda_fail(e, "all_reduce_sum result upload", err, size);
    return moe_ep__nccl_wait(n, s, NULL, err, size);    /* before the pinned buffer is reused */
}

/* >>nccl transport: split */
/* This transport's callbacks around n (what create hands out, and what moe_ep_agree needs). */
MOE_EP_PRIVATE moe_ep_transport moe_ep__nccl_vtable(moe_ep__nccl* n);

/* One verdict on every rank of n, by the core's agreement: res if this rank failed, else
   ABORTED if another did (err says which), else OK. */
MOE_EP_PRIVATE moe_ep_result moe_ep__nccl_verdict(moe_ep__nccl* n, moe_ep_result res, const char* what, char* err,
                                                  size_t size) {
    moe_ep_transport t = moe_ep__nccl_vtable(n);
    moe_ep_agree_desc a;
    memset(&a, 0, sizeof a);
    a.stage = what;
    a.status = res;
    a.allocator = n->allocator;
    return moe_ep_agree(&t, &a, err, size);
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
    if (n->abort_requested && !n->broken) moe_ep__nccl_break(n);
    if (!n->broken) cudaStreamSynchronize(n->side);
    for (i = 0; i < MOE_EP__NCCL_REQUESTS; ++i) {
        if (n->requests[i].ready) cudaEventDestroy(n->requests[i].ready);
        if (n->requests[i].done) cudaEventDestroy(n->requests[i].done);
    }
    {
        void* device[4];
        device[0] = n->counts_dev;
        device[1] = n->stage_send;
        device[2] = n->stage_recv;
        device[3] = n->gather_dev;
        for (i = 0; i < 4; ++i) cudaFree(device[i]);
    }
    cudaFreeHost(n->counts_host);
    cudaFreeHost(n->gather_host);
    if (n->side) cudaStreamDestroy(n->side);
    (void)cudaGetLastError();
    /* a split communicator is ours; an aborted one is already gone (ncclCommAbort frees it) */
    if (n->owns_comm && !n->broken) ncclCommDestroy(n->comm);
    moe_ep_free(&a, n);
}

MOE_EP_API moe_ep_result moe_ep_nccl_transport_create(const moe_ep_nccl_desc* desc, moe_ep_transport* out) {
    moe_ep__nccl* n;
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
    n = (moe_ep__nccl*)moe_ep_alloc(&desc->allocator, sizeof *n);
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
        moe_ep_free(&n->allocator, n);
        return MOE_EP_ERROR_TRANSPORT;
    }
    *out = moe_ep__nccl_vtable(n);
    return MOE_EP_OK;
}

MOE_EP_PRIVATE moe_ep_transport moe_ep__nccl_vtable(moe_ep__nccl* n) {
    moe_ep_transport t;
    memset(&t, 0, sizeof t);
    t.impl = n;
    t.name = "nccl";
    t.rank = n->rank;
    t.world_size = n->world_size;
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
    return t;
}

MOE_EP_API void moe_ep_nccl_transport_destroy(moe_ep_transport* transport) {
    if (!transport) return;
    if (transport->destroy == moe_ep__nccl_destroy_cb) moe_ep__nccl_destroy_cb(transport->impl);
    memset(transport, 0, sizeof *transport);
}

#endif /* MOE_EP_NCCL_IMPL_INCLUDED */
#endif /* MOE_EP_NCCL_IMPLEMENTATION */
