/* moe_ep_mpi.h -- the MPI transport of moe_ep: one rank per MPI process -- MIT or public domain

   Connects the ranks of a moe_ep layer through an MPI communicator (any MPI-3
   library: Open MPI, MPICH, ...). Counts travel with MPI_Alltoall, token rows with
   MPI_Ialltoallw over derived datatypes (large segments as messages of their own),
   so that the segmented layout of the core (rows grouped by destination expert on
   one side, by local expert on the other) needs no staging copy, and every count is
   in rows, not bytes.

   DO THIS
   =======
   In exactly one C or C++ file:

       #define MOE_EP_IMPLEMENTATION          (builds the core and this transport)
       #include "transports/moe_ep_mpi.h"

   Everywhere else include the header without the define. Compile with your MPI's
   wrapper (mpicc) or its flags (pkg-config ompi-c / mpich). MOE_EP_MPI_IMPLEMENTATION
   alone builds only this transport, for a program whose core lives in another file.

   STEP BY STEP
   ============
   1. MPI_Init (moe_ep never initialises or finalises MPI).
   2. moe_ep_transport t;
      moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD }, &t);
                                                          collective over comm
   3. moe_ep_create(&(moe_ep_desc){ ..., .transport = &t }, &ctx) on every rank, then
      use the layer as with any transport. Several contexts may share one transport.
      For EP x DP or EP x TP x DP, split t with moe_ep_layout_split (moe_ep.h, >>layout).
   4. moe_ep_destroy(ctx) for each; moe_ep_mpi_transport_destroy(&t); MPI_Finalize.

   HOW IT WORKS
   ============
   create duplicates the communicator (MPI_Comm_dup), so the library's messages
   never match the application's, and sets MPI_ERRORS_RETURN on the duplicate.
   rank and world_size are the duplicate's; local_ranks is 1.

   all_to_all_v builds, for every peer and each side, the cheapest description MPI
   accepts: a run of rows that is contiguous and starts below 2 GiB is `n` rows of
   a contiguous row type at an int byte displacement; anything else (the segments of
   one peer scattered over the buffer, as on the receive side of dispatch and the
   send side of combine, or an offset past 2 GiB) becomes an hindexed type of row
   runs with 64-bit byte displacements. One MPI_Ialltoallw moves all of it, and
   every rank calls it whatever its layout: a rank's choice of datatype is its own.
   Two kinds of rows stay out of the collective:
   - the rank's own segments, copied with memcpy;
   - segments of 64 KiB and more, sent as messages of their own (MPI_Isend /
     MPI_Irecv straight between the two buffers): a datatype is packed and unpacked
     by MPI, a contiguous message can take a single copy (Open MPI's CMA, for one).
     Sender and receiver see the same row counts, so both pick the same segments.
   all_to_all_v_begin posts all of it, all_to_all_v_end waits (the core uses the
   split phase for dispatch and combine); all_to_all_v is the two back to back.

   RANK FAULTS
   ===========
   Every collective is point-to-point messages under a tag made from the transport's
   sequence number, and its first message to each peer is a header: the kind, the word
   count and the number. A peer in another collective is seen by every rank
   (MOE_EP_ERROR_OUT_OF_STEP). A rank that gives a collective up (the core's skip, a
   timeout, an MPI error) sends a control message to every peer on a second duplicate;
   every wait polls it, so the peers return at once (ABORTED, or TIMEOUT for a timeout):
   1-4 ms on one host (bench/RESULTS.md). Every wait has a deadline, desc.timeout_ms
   (default 300 s; -1 none): a killed process costs the others MOE_EP_ERROR_TIMEOUT, where
   the launcher lets them live (Open MPI 4.1: --mca orte_abort_on_non_zero_status 0). The
   messages of a collective given up stay queued in MPI under a tag no later collective
   uses (until 2^31 / 4 collectives on Open MPI); each transport starts its tags at a base
   of its own, as MPICH reuses a freed communicator's context. split meets the peers
   first, then calls MPI_Comm_split, which has no deadline; create and destroy
   (MPI_Comm_dup / MPI_Comm_free) neither.

   split (for EP x DP and EP x TP x DP, through moe_ep_layout_split) is MPI_Comm_split;
   the group is a transport of its own: release it with moe_ep_mpi_transport_destroy
   (or its destroy callback) before the transport it came from. all_reduce_sum (the
   tensor-parallel sum) adds the ranks' values in rank order, (((r0 + r1) + r2) + ...),
   so the bits are the same on every rank, in every run and as with the pthreads
   transport: rank c gathers chunk c from all (MPI_Alltoallv), adds, and shares the sum
   (MPI_Allgatherv). MPI_Allreduce promises no order, so it is not used.

   LARGE LAYERS
   ============
   Counts are in rows and displacements are 64-bit, so a rank may send and receive
   more than 2^31 bytes, also to a single peer. A peer whose rows in the collective
   would pass 2 GiB gets all its segments as separate messages instead; a segment of
   more than INT_MAX rows goes in several. The only hard limits: a row (d_model * 4
   bytes) must be at most INT_MAX bytes, and a byte offset must fit MPI_Aint; past
   them all_to_all_v fails with MOE_EP_ERROR_UNSUPPORTED and says which value is out
   of range. tests/mpi/large_mpi.c moves 2.25 GiB to one peer (make check-mpi-large).

   moe_ep_mpi DOES NOT
   ===================
   - call MPI_Init, MPI_Finalize or MPI_Abort, nor touch the application's
     communicator beyond duplicating it (its error handler is switched to
     MPI_ERRORS_RETURN only for the duration of the duplication, then restored);
   - move device memory (MOE_EP_MEMORY_DEVICE is refused: use the NCCL transport, or
     a CUDA-aware MPI through your own transport);
   - exchange in place: send and recv must be two buffers (MPI's rule);
   - provide `abort` (an outside thread cannot interrupt MPI): a rank that fails before a
     collective tells the others instead (skip, below), and every wait has a deadline.

   THREADING AND COLLECTIVE SEMANTICS
   ==================================
   create and destroy are collective over the communicator, like MPI_Comm_dup and
   MPI_Comm_free. The callbacks are collective over the duplicate and are called
   by the core from the thread that owns the context, never inside an OpenMP
   region, so MPI_THREAD_FUNNELED is enough. A transport, like a context, is used
   by one thread at a time; every rank must start the exchanges in the same order
   (MPI's rule for collectives). Several split-phase exchanges may be open at once
   and may end in any order.

   ERRORS AND LOGGING
   ==================
   Every MPI return code is checked; a failure becomes MOE_EP_ERROR_TRANSPORT with
   "MPI_<call>: <MPI_Error_string>" as the transport's error text, which the core
   keeps in moe_ep_last_error(ctx). Nothing aborts the job. If create fails, the
   cause goes to desc.logger (there is no context to hold it).

   MEMORY
   ======
   Host allocations go through desc.allocator (default malloc/free). The duplicate
   communicator, cached datatypes and request records are released by
   moe_ep_mpi_transport_destroy, which must run before MPI_Finalize and after every
   open split-phase exchange has ended.

   LICENSE
   =======
   MIT or public domain, as moe_ep.h (see the end of that file).
*/
#ifndef MOE_EP_MPI_H_INCLUDED
#define MOE_EP_MPI_H_INCLUDED

/* C++: Open MPI's and MPICH's old C++ bindings (removed in MPI-3) break a C++ build that
   includes mpi.h without linking them; this header needs only the C API. Define them
   yourself before including mpi.h if you include it first. */
#if defined(__cplusplus) && !defined(OMPI_SKIP_MPICXX)
#define OMPI_SKIP_MPICXX 1
#endif
#if defined(__cplusplus) && !defined(MPICH_SKIP_MPICXX)
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>
#if !defined(MOE_EP_H_INCLUDED) || (defined(MOE_EP_IMPLEMENTATION) && !defined(MOE_EP_IMPL_INCLUDED))
#ifdef MOE_EP_CORE_HEADER
#include MOE_EP_CORE_HEADER
#else
#include "../moe_ep.h"      /* headers in one flat folder: include "moe_ep.h" before this one */
#endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef struct moe_ep_mpi_desc {
    MPI_Comm comm;                  /* default (zero) MPI_COMM_WORLD; duplicated, never used directly */
    moe_ep_allocator allocator;     /* default malloc/free */
    moe_ep_logger logger;           /* default none; told why create failed */
    int timeout_ms;                 /* default 0: 300000; the longest a collective waits for the peers
                                       (MOE_EP_ERROR_TIMEOUT); -1: no deadline */
} moe_ep_mpi_desc;

/* Makes the transport of this process over desc->comm. Collective over comm.
   out: untouched on failure. */
MOE_EP_API moe_ep_result moe_ep_mpi_transport_create(const moe_ep_mpi_desc* desc, moe_ep_transport* out);
/* Frees the duplicate communicator and everything else; zeroes *transport.
   Collective over the communicator; call before MPI_Finalize. */
MOE_EP_API void moe_ep_mpi_transport_destroy(moe_ep_transport* transport);

#ifdef __cplusplus
}
#endif
#endif /* MOE_EP_MPI_H_INCLUDED */

#if defined(MOE_EP_IMPLEMENTATION) && !defined(MOE_EP_MPI_IMPLEMENTATION)
#define MOE_EP_MPI_IMPLEMENTATION
#endif

#ifdef MOE_EP_MPI_IMPLEMENTATION
#ifndef MOE_EP_MPI_IMPL_INCLUDED
#define MOE_EP_MPI_IMPL_INCLUDED

#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef MOE_EP_PRIVATE
#define MOE_EP_PRIVATE static
#endif

#define MOE_EP__MPI_ROW_TYPES 8     /* distinct row sizes whose datatype is kept */
#define MOE_EP__MPI_DIRECT_BYTES 65536  /* a segment this large travels as its own message */
#define MOE_EP__MPI_REDUCE_CHUNK 1048576 /* floats per rank and round of all_reduce_sum */
#define MOE_EP__MPI_NOTICES 64          /* notices in flight at once */
#define MOE_EP__MPI_TIMEOUT_MS 300000   /* a wait's deadline when the desc leaves it 0 */

/* >>mpi layout: pure arithmetic, no MPI calls, so that the limits can be tested
   with numbers instead of gigabytes. */

/* What MPI can take, in rows and bytes. The transport uses INT_MAX / INT_MAX /
   the largest MPI_Aint; tests shrink them to reach the boundaries with small buffers. */
typedef struct moe_ep__mpi_limits {
    int64_t max_block_rows;         /* rows in one count or block: an int */
    int64_t max_plain_offset;       /* bytes: MPI_Alltoallw's int displacement */
    int64_t max_offset;             /* bytes: MPI_Aint (and the address space) */
} moe_ep__mpi_limits;

/* One peer's side of an exchange. plain: `rows` rows of the row type at byte
   displacement `plain_offset`. Otherwise `blocks` (rows, byte offset) runs for an
   hindexed type. */
typedef struct moe_ep__mpi_peer {
    int plain;
    int64_t rows;
    int64_t plain_offset;
    int64_t blocks;
} moe_ep__mpi_peer;

/* Appends one run of rows as blocks of at most max_block_rows rows. */
MOE_EP_PRIVATE void moe_ep__mpi_run(int64_t start, int64_t rows, size_t row_bytes, int64_t max_block_rows,
                                     int64_t* blocks, int64_t* block_rows, int64_t* block_offsets, int64_t capacity) {
    int64_t done = 0;
    while (done < rows) {
        int64_t piece = rows - done < max_block_rows ? rows - done : max_block_rows;
        if (*blocks < capacity) {
            block_rows[*blocks] = piece;
            block_offsets[*blocks] = (start + done) * (int64_t)row_bytes;
        }
        ++*blocks;
        done += piece;
    }
}

/* Describes the `segments` segments (counts, offsets in rows) of one peer. Adjacent
   segments merge into one run; a run longer than max_block_rows is split. Fills
   block_rows / block_offsets (bytes) when the blocks fit `capacity` (pass 0 to count).
   Returns MOE_EP_OK, or an error with a message naming the value out of range. */
MOE_EP_PRIVATE moe_ep_result moe_ep__mpi_describe(const int64_t* counts, const int64_t* offsets, int segments,
                                                  size_t row_bytes, const moe_ep__mpi_limits* lim, int peer,
                                                  moe_ep__mpi_peer* out, int64_t* block_rows,
                                                  int64_t* block_offsets, int64_t capacity, char* err_text,
                                                  size_t err_size) {
    int64_t run_start = 0, run_rows = 0, first_start = 0, max_rows, sum = 0;
    int s, runs = 0;
    memset(out, 0, sizeof *out);
    if (row_bytes == 0 || (uint64_t)row_bytes > (uint64_t)lim->max_offset) {
        if (err_text) snprintf(err_text, err_size, "row_bytes (%zu) must be in [1, %lld]", row_bytes,
                               (long long)lim->max_offset);
        return MOE_EP_ERROR_UNSUPPORTED;
    }
    max_rows = lim->max_offset / (int64_t)row_bytes;   /* rows addressable by a byte offset */
    for (s = 0; s < segments; ++s) {
        int64_t n = counts[s], at = offsets[s];
        if (n < 0 || at < 0 || at > max_rows || n > max_rows - at || n > max_rows - sum) {
            if (err_text)
                snprintf(err_text, err_size, "rank %d, segment %d: %lld rows at row %lld (rows of %zu bytes) %s", peer,
                         s, (long long)n, (long long)at, row_bytes,
                         n < 0 || at < 0 ? "is negative" : "ends past the largest byte offset MPI_Aint can hold");
            return MOE_EP_ERROR_UNSUPPORTED;
        }
        if (n == 0) continue;
        sum += n;
        if (runs > 0 && at == run_start + run_rows) {   /* the next segment continues the run */
            run_rows += n;
            continue;
        }
        if (runs > 0)
            moe_ep__mpi_run(run_start, run_rows, row_bytes, lim->max_block_rows, &out->blocks, block_rows,
                            block_offsets, capacity);
        else
            first_start = at;
        runs++;
        out->rows += run_rows;
        run_start = at;
        run_rows = n;
    }
    if (runs > 0)
        moe_ep__mpi_run(run_start, run_rows, row_bytes, lim->max_block_rows, &out->blocks, block_rows, block_offsets,
                        capacity);
    out->rows += run_rows;
    out->plain_offset = first_start * (int64_t)row_bytes;
    out->plain = runs == 0 || (runs == 1 && out->rows <= lim->max_block_rows && out->plain_offset <= lim->max_plain_offset);
    return MOE_EP_OK;
}

/* Which segments travel as messages of their own, straight between the two buffers,
   instead of inside the collective:
   - a large one (at least `rule.direct_bytes`): one copy, which a single-copy transport
     (CMA, XPMEM) serves for a contiguous message, instead of packing and unpacking;
   - all of a peer's, when what would stay in the collective exceeds
     `rule.collective_bytes` (INT_MAX): a peer's share of a collective then stays below
     2 GiB, where MPI libraries have kept int byte counts inside their collectives (Open
     MPI 4.1 and MPICH 4.0 were tested past it and are fine either way).
   A direct segment longer than `rule.chunk_rows` goes in several messages, in order.
   Both ends decide alike: the inputs are the pair's row counts (the sender's send counts
   are the receiver's receive counts), the row size and constants equal on every rank. */
typedef struct moe_ep__mpi_direct_rule {
    int64_t direct_bytes;           /* 0: never by size */
    int64_t collective_bytes;
    int64_t chunk_rows;
} moe_ep__mpi_direct_rule;

/* 1 when every segment of this peer must go directly. */
MOE_EP_PRIVATE int moe_ep__mpi_pair_direct(const int64_t* counts, int segments, size_t row_bytes,
                                           const moe_ep__mpi_direct_rule* rule) {
    int64_t rest = 0, limit = rule->collective_bytes / (int64_t)row_bytes;
    int s;
    for (s = 0; s < segments; ++s) {
        int large = rule->direct_bytes > 0 &&
                    counts[s] >= (rule->direct_bytes + (int64_t)row_bytes - 1) / (int64_t)row_bytes;
        if (counts[s] <= 0 || large) continue;
        if (counts[s] > limit - rest) return 1;
        rest += counts[s];
    }
    return 0;
}

/* Messages segment `rows` travels in: 0 when it stays in the collective. */
MOE_EP_PRIVATE int64_t moe_ep__mpi_direct_messages(int64_t rows, size_t row_bytes, int pair_direct,
                                                   const moe_ep__mpi_direct_rule* rule) {
    int large = rule->direct_bytes > 0 && rows >= (rule->direct_bytes + (int64_t)row_bytes - 1) / (int64_t)row_bytes;
    if (rows <= 0 || !(pair_direct || large)) return 0;
    return (rows + rule->chunk_rows - 1) / rule->chunk_rows;
}

/* >>mpi state */
typedef struct moe_ep__mpi_request {
    struct moe_ep__mpi_request* next;   /* free list */
    MPI_Request* requests;              /* [0] the collective, then the direct messages */
    int request_count, request_capacity;
    int peers;                          /* capacity of the arrays below: world_size */
    int* counts;                        /* [2R]: send, then receive */
    int* displs;                        /* [2R] bytes */
    MPI_Datatype* types;                /* [2R] */
    unsigned char* owned;               /* [2R] 1: a type built for this call, freed at the end */
    MPI_Datatype row_owned;             /* a row type outside the cache, or MPI_DATATYPE_NULL */
    uint64_t sequence;                  /* the collective's number */
    int receive_count;                  /* requests[0 .. receive_count) are receives, the headers' first */
    int64_t* heads;                     /* [5R]: the peers' headers and rows [2R], this rank's to each [2R],
                                           the rows this rank expects from each [R] */
} moe_ep__mpi_request;

typedef struct moe_ep__mpi_impl {
    MPI_Comm comm;
    int rank, world_size;
    moe_ep_allocator allocator;
    moe_ep__mpi_limits limits;
    moe_ep__mpi_direct_rule rule;       /* which segments go alone; the same on every rank */
    int tag_ub;                         /* the largest tag: a direct segment's tag is its index mod tag_ub+1 */
    size_t row_bytes[MOE_EP__MPI_ROW_TYPES];
    MPI_Datatype row_types[MOE_EP__MPI_ROW_TYPES];
    int row_type_count;
    moe_ep__mpi_request* spare;         /* request records ready for reuse */
    int64_t* block_rows;                /* scratch for one peer's blocks */
    int64_t* block_offsets;
    int* block_lengths;
    MPI_Aint* block_displs;
    int64_t block_capacity;
    int64_t* side_counts;               /* [segments] one peer's counts without its direct segments */
    int side_capacity;
    int64_t reduce_chunk;               /* all_reduce_sum: floats per rank and round; the same on every rank */
    MPI_Comm control;                   /* notices: a rank gave a collective up */
    uint64_t sequence;                  /* collectives begun; the same on every rank in step */
    int64_t incarnation;                /* this transport among the ones made on this process: notices carry it */
    uint64_t tag_base;
    int timeout_ms;                     /* a wait's deadline; <= 0: none */
    int64_t* notices;                   /* [notice_count] x (sequence, result, rank) read, not yet taken */
    int notice_count, notice_capacity;
    int64_t told[MOE_EP__MPI_NOTICES][3];   /* notices in flight (sequence, result, incarnation), each with its request */
    MPI_Request told_requests[MOE_EP__MPI_NOTICES];
    MPI_Request* requests;              /* scratch of the collectives other than all_to_all_v */
    MPI_Status* statuses;
    int request_capacity;
    MPI_Status* wait_statuses;          /* moe_ep__mpi_wait's own, when the caller has none */
    int wait_status_capacity;
    int64_t* meet_words;                /* the first messages' words */
    size_t meet_capacity;
} moe_ep__mpi_impl;

/* "MPI_<call>: <MPI's text>" into err_text; returns MOE_EP_ERROR_TRANSPORT. */
MOE_EP_PRIVATE moe_ep_result moe_ep__mpi_error(int code, const char* call, char* err_text, size_t err_size) {
    char text[MPI_MAX_ERROR_STRING + 1];
    int len = 0;
    if (MPI_Error_string(code, text, &len) != MPI_SUCCESS || len <= 0) len = snprintf(text, sizeof text, "error %d", code);
    text[len < MPI_MAX_ERROR_STRING ? len : MPI_MAX_ERROR_STRING] = '\0';
    if (err_text) snprintf(err_text, err_size, "%s: %s", call, text);
    return MOE_EP_ERROR_TRANSPORT;
}

/* >>mpi steps: every collective is point-to-point messages on the duplicate communicator,
   under one tag made from the transport's sequence number, and every wait also listens on
   the control communicator and has a deadline. A collective's first message from each peer
   is [header, words...], the header naming its kind, its word count and the sequence
   number: a peer in another collective is seen by every rank (OUT_OF_STEP). A rank that
   gives a collective up (the core's skip, a timeout, an error) tells every peer on the
   control communicator; a peer waiting in (or later entering) that collective returns at
   once. Messages of a collective that was given up carry a tag no later collective uses
   (until the sequence number wraps the tag space), so they are never matched. */
enum {
    MOE_EP__MPI_EXCHANGE = 1, MOE_EP__MPI_A2A, MOE_EP__MPI_REDUCE, MOE_EP__MPI_BARRIER, MOE_EP__MPI_SPLIT
};

MOE_EP_PRIVATE const char* moe_ep__mpi_kind_name(int64_t kind) {
    static const char* const names[] = { "?", "exchange_counts", "all_to_all_v", "all_reduce_sum", "barrier", "split" };
    return kind > 0 && kind <= MOE_EP__MPI_SPLIT ? names[kind] : "?";
}

MOE_EP_PRIVATE int64_t moe_ep__mpi_header(int kind, int count, uint64_t sequence) {
    return ((int64_t)kind << 56) | ((int64_t)(count & 0xFFFFFF) << 32) | (int64_t)(sequence & 0xFFFFFFFFu);
}

/* The tag of collective `sequence`: 1 .. tag_ub (0 is left to the control messages),
   from a base of this transport's own. An MPI may reuse a freed communicator's context for
   the next one (MPICH does), and with it deliver messages of a collective given up on the
   old one: the base puts the new transport's tags elsewhere. Computed in 64 bits: Open
   MPI's MPI_TAG_UB is INT_MAX. */
MOE_EP_PRIVATE int moe_ep__mpi_tag(const moe_ep__mpi_impl* m, uint64_t sequence, int slot) {
    return 1 + (int)(((m->tag_base + sequence) * 4 + (uint64_t)slot) % (uint64_t)(m->tag_ub >= 1 ? (int64_t)m->tag_ub : 1));
}
/* A collective's tags, one per kind of message: the headers (every kind alike, so a peer in
   another collective is seen), and the payloads of each kind apart, so that a payload never
   meets a receive of another kind's (a truncated message aborts MPICH). */
enum { MOE_EP__MPI_TAG_HEADER, MOE_EP__MPI_TAG_WORDS, MOE_EP__MPI_TAG_ROWS, MOE_EP__MPI_TAG_SUMS };

/* Reads every control message that has arrived; keeps those of collectives not yet done. */
MOE_EP_PRIVATE void moe_ep__mpi_read_notices(moe_ep__mpi_impl* m) {
    for (;;) {
        int flag = 0;
        int64_t notice[3];
        MPI_Status status;
        if (MPI_Iprobe(MPI_ANY_SOURCE, 0, m->control, &flag, &status) != MPI_SUCCESS || !flag) return;
        if (MPI_Recv(notice, 3, MPI_INT64_T, status.MPI_SOURCE, 0, m->control, MPI_STATUS_IGNORE) != MPI_SUCCESS)
            return;
        if (notice[2] != m->incarnation) continue;                                  /* of an earlier transport */
        if ((uint64_t)notice[0] < m->sequence - 1 && m->sequence > 0) continue;    /* of a collective already done */
        if (m->notice_count == m->notice_capacity) {
            int capacity = m->notice_capacity ? 2 * m->notice_capacity : 8;
            int64_t* grown = (int64_t*)moe_ep_alloc(&m->allocator, sizeof(int64_t) * 3 * (size_t)capacity);
            if (!grown) return;     /* the deadline still bounds the wait */
            if (m->notice_count) memcpy(grown, m->notices, sizeof(int64_t) * 3 * (size_t)m->notice_count);
            moe_ep_free(&m->allocator, m->notices);
            m->notices = grown;
            m->notice_capacity = capacity;
        }
        m->notices[3 * m->notice_count] = notice[0];
        m->notices[3 * m->notice_count + 1] = notice[1];
        m->notices[3 * m->notice_count + 2] = status.MPI_SOURCE;
        m->notice_count++;
    }
}

/* A notice for collective `sequence`, taken off the list: the peer's verdict (TIMEOUT stays
   TIMEOUT, anything else is ABORTED), or OK if there is none. */
MOE_EP_PRIVATE moe_ep_result moe_ep__mpi_take_notice(moe_ep__mpi_impl* m, uint64_t sequence, char* err_text,
                                                     size_t err_size) {
    int i;
    moe_ep__mpi_read_notices(m);
    for (i = 0; i < m->notice_count; ++i)
        if ((uint64_t)m->notices[3 * i] == sequence) {
            moe_ep_result peer = (moe_ep_result)m->notices[3 * i + 1];
            int rank = (int)m->notices[3 * i + 2];
            memmove(m->notices + 3 * i, m->notices + 3 * (i + 1), sizeof(int64_t) * 3 * (size_t)(m->notice_count - i - 1));
            m->notice_count--;
            if (err_text)
                snprintf(err_text, err_size, "rank %d gave up this collective (%s)", rank, moe_ep_result_string(peer));
            return peer == MOE_EP_ERROR_TIMEOUT ? MOE_EP_ERROR_TIMEOUT : MOE_EP_ERROR_ABORTED;
        }
    return MOE_EP_OK;
}

/* Tells every peer that this rank gave up collective `sequence` with `result`. */
MOE_EP_PRIVATE void moe_ep__mpi_tell(moe_ep__mpi_impl* m, uint64_t sequence, moe_ep_result result) {
    int p, slot = 0;
    for (p = 0; p < m->world_size; ++p) {
        if (p == m->rank) continue;
        /* a free slot: two words go eagerly, so a notice's send is done almost at once */
        for (; slot < MOE_EP__MPI_NOTICES; ++slot) {
            int done = 1;
            if (m->told_requests[slot] != MPI_REQUEST_NULL) MPI_Test(&m->told_requests[slot], &done, MPI_STATUS_IGNORE);
            if (done) break;
        }
        if (slot == MOE_EP__MPI_NOTICES) return;    /* none: the peer's deadline still bounds its wait */
        m->told[slot][0] = (int64_t)sequence;
        m->told[slot][1] = (int64_t)result;
        m->told[slot][2] = m->incarnation;
        if (MPI_Isend(m->told[slot], 3, MPI_INT64_T, p, 0, m->control, &m->told_requests[slot]) != MPI_SUCCESS)
            m->told_requests[slot] = MPI_REQUEST_NULL;
        slot++;
    }
}

/* Gives up the first `receives` (receives) and the rest (sends) of requests: receives are
   cancelled (and given a moment to finish cancelling, so that nothing lands in the caller's
   buffer later), sends are left to complete on their own. */
MOE_EP_PRIVATE void moe_ep__mpi_abandon(MPI_Request* requests, int count, int receives) {
    double until = MPI_Wtime() + 0.1;
    int i, done = 0;
    for (i = 0; i < count; ++i)
        if (requests[i] != MPI_REQUEST_NULL && i < receives) MPI_Cancel(&requests[i]);
    while (!done && MPI_Wtime() < until) {
        done = 1;
        for (i = 0; i < receives && i < count; ++i) {
            int flag = 1;
            if (requests[i] != MPI_REQUEST_NULL) MPI_Test(&requests[i], &flag, MPI_STATUS_IGNORE);
            done &= flag;
        }
    }
    for (i = 0; i < count; ++i)
        if (requests[i] != MPI_REQUEST_NULL) MPI_Request_free(&requests[i]);
}

/* Waits for requests[0..count) of collective `sequence` (the first `receives` are receives),
   listening for notices, until the deadline. On failure the requests are given up and, for
   a timeout or an MPI error, the peers are told. statuses [count] (optional) for the caller. */
MOE_EP_PRIVATE moe_ep_result moe_ep__mpi_wait(moe_ep__mpi_impl* m, uint64_t sequence, MPI_Request* requests, int count,
                                              int receives, MPI_Status* statuses, char* err_text, size_t err_size) {
    double deadline = m->timeout_ms > 0 ? MPI_Wtime() + m->timeout_ms / 1000.0 : 0.0;
    if (!statuses) {
        if (count > m->wait_status_capacity) {
            moe_ep_free(&m->allocator, m->wait_statuses);
            m->wait_statuses = (MPI_Status*)moe_ep_alloc(&m->allocator, (size_t)count * sizeof(MPI_Status));
            m->wait_status_capacity = m->wait_statuses ? count : 0;
            if (!m->wait_statuses) {
                moe_ep__mpi_abandon(requests, count, receives);
                moe_ep__mpi_tell(m, sequence, MOE_EP_ERROR_OUT_OF_MEMORY);
                if (err_text) snprintf(err_text, err_size, "out of memory for %d statuses", count);
                return MOE_EP_ERROR_OUT_OF_MEMORY;
            }
        }
        statuses = m->wait_statuses;
    }
    for (;;) {
        /* one request at a time: an error (a truncated message) stays with its request's
           communicator, where MPI_ERRORS_RETURN is set (MPICH's MPI_Testall raises it on
           MPI_COMM_WORLD) */
        int done = 1, i, rc = MPI_SUCCESS, cls = MPI_SUCCESS, failed = -1;
        moe_ep_result res;
        for (i = 0; i < count && rc == MPI_SUCCESS; ++i) {
            int flag = 0;
            if (requests[i] == MPI_REQUEST_NULL) continue;      /* done before; its status is kept */
            rc = MPI_Test(&requests[i], &flag, &statuses[i]);
            if (rc != MPI_SUCCESS) failed = i;
            done &= flag;
        }
        if (rc != MPI_SUCCESS) {
            MPI_Error_class(rc, &cls);
            moe_ep__mpi_abandon(requests, count, receives);
            if (cls == MPI_ERR_TRUNCATE) {
                /* a peer sent a longer message than this collective's: it is in another one */
                if (err_text) snprintf(err_text, err_size, "a message of rank %d is longer than this collective's: "
                                       "it is in another collective", statuses[failed].MPI_SOURCE);
                return MOE_EP_ERROR_OUT_OF_STEP;
            }
            moe_ep__mpi_tell(m, sequence, MOE_EP_ERROR_TRANSPORT);
            return moe_ep__mpi_error(rc, "MPI_Test", err_text, err_size);
        }
        /* a peer that gave this collective up did not finish it: neither does this rank, even
           where its own messages all arrived */
        res = moe_ep__mpi_take_notice(m, sequence, err_text, err_size);
        if (res != MOE_EP_OK) {
            if (!done) moe_ep__mpi_abandon(requests, count, receives);
            return res;
        }
        if (done) return MOE_EP_OK;
        if (m->timeout_ms > 0 && MPI_Wtime() > deadline) {
            moe_ep__mpi_abandon(requests, count, receives);
            moe_ep__mpi_tell(m, sequence, MOE_EP_ERROR_TIMEOUT);
            if (err_text) snprintf(err_text, err_size, "no progress for %d ms (a peer is gone, or far behind)", m->timeout_ms);
            return MOE_EP_ERROR_TIMEOUT;
        }
    }
}

/* Room for `count` requests and statuses in m's scratch. */
MOE_EP_PRIVATE int moe_ep__mpi_grow_requests(moe_ep__mpi_impl* m, int64_t count) {
    if (count <= m->request_capacity) return 1;
    if ((uint64_t)count > (uint64_t)(SIZE_MAX / sizeof(MPI_Status)) || count > INT_MAX) return 0;
    moe_ep_free(&m->allocator, m->requests);
    moe_ep_free(&m->allocator, m->statuses);
    m->requests = (MPI_Request*)moe_ep_alloc(&m->allocator, (size_t)count * sizeof(MPI_Request));
    m->statuses = (MPI_Status*)moe_ep_alloc(&m->allocator, (size_t)count * sizeof(MPI_Status));
    m->request_capacity = m->requests && m->statuses ? (int)count : 0;
    return m->request_capacity > 0;
}

/* The first messages of a collective: to every peer [header, first word] (two words, so a
   peer in another collective never sends a longer one: MPICH aborts on a truncated message
   whatever the error handler), then, once every header has been checked, the other
   count - 1 words. recv: [R][1 + count], the header first, this rank's own copied. Returns
   OUT_OF_STEP, on every rank, when a peer's header differs. */
MOE_EP_PRIVATE moe_ep_result moe_ep__mpi_meet(moe_ep__mpi_impl* m, int kind, uint64_t sequence, const int64_t* send,
                                              int count, int64_t* recv, char* err_text, size_t err_size) {
    int R = m->world_size, me = m->rank, W = count + 1, V = W > 2 ? W : 2, p, n = 0;
    int tag = moe_ep__mpi_tag(m, sequence, MOE_EP__MPI_TAG_HEADER), words_tag = moe_ep__mpi_tag(m, sequence, MOE_EP__MPI_TAG_WORDS);
    int rc = MPI_SUCCESS;
    int64_t header = moe_ep__mpi_header(kind, count, sequence);
    int64_t *out, *heads;
    moe_ep_result res = moe_ep__mpi_take_notice(m, sequence, err_text, err_size);
    if (res != MOE_EP_OK) return res;     /* a peer gave this collective up before we came */
    if ((size_t)(V + 2) * (size_t)R > m->meet_capacity) {
        moe_ep_free(&m->allocator, m->meet_words);
        m->meet_words = (int64_t*)moe_ep_alloc(&m->allocator, sizeof(int64_t) * (size_t)(V + 2) * (size_t)R);
        m->meet_capacity = m->meet_words ? (size_t)(V + 2) * (size_t)R : 0;
    }
    if (!m->meet_words || !moe_ep__mpi_grow_requests(m, 4 * (int64_t)R)) {
        moe_ep__mpi_tell(m, sequence, MOE_EP_ERROR_OUT_OF_MEMORY);
        if (err_text) snprintf(err_text, err_size, "out of memory for a collective's first messages");
        return MOE_EP_ERROR_OUT_OF_MEMORY;
    }
    out = m->meet_words;                    /* [R][V]: [header, words..., 0] */
    heads = m->meet_words + (size_t)V * R;  /* [R][2] */
    for (p = 0; p < R; ++p) {
        out[(size_t)p * V] = header;
        out[(size_t)p * V + 1] = 0;
        if (count > 0) memcpy(out + (size_t)p * V + 1, send + (size_t)p * count, sizeof(int64_t) * (size_t)count);
    }
    memcpy(recv + (size_t)me * W, out + (size_t)me * V, sizeof(int64_t) * (size_t)W);
    for (p = 0; p < R && rc == MPI_SUCCESS; ++p)
        if (p != me) {
            rc = MPI_Irecv(heads + 2 * p, 2, MPI_INT64_T, p, tag, m->comm, &m->requests[n]);
            if (rc == MPI_SUCCESS) n++;
        }
    for (p = 0; p < R && rc == MPI_SUCCESS; ++p)
        if (p != me) {
            rc = MPI_Isend(out + (size_t)p * V, 2, MPI_INT64_T, p, tag, m->comm, &m->requests[n]);
            if (rc == MPI_SUCCESS && count > 1) {
                n++;
                rc = MPI_Isend(out + (size_t)p * V + 2, count - 1, MPI_INT64_T, p, words_tag, m->comm, &m->requests[n]);
            }
            if (rc == MPI_SUCCESS) n++;
        }
    if (rc != MPI_SUCCESS) {
        moe_ep__mpi_abandon(m->requests, n, n < R - 1 ? n : R - 1);
        moe_ep__mpi_tell(m, sequence, MOE_EP_ERROR_TRANSPORT);
        return moe_ep__mpi_error(rc, "MPI_Isend / MPI_Irecv", err_text, err_size);
    }
    /* the headers first; the sends complete with the payloads below */
    res = moe_ep__mpi_wait(m, sequence, m->requests, R - 1, R - 1, m->statuses, err_text, err_size);
    if (res != MOE_EP_OK) {
        moe_ep__mpi_abandon(m->requests + (R - 1), n - (R - 1), 0);
        return res;
    }
    for (p = 0; p < R; ++p) {
        int64_t h = p == me ? header : heads[2 * p];
        if (h != header) {
            moe_ep__mpi_abandon(m->requests + (R - 1), n - (R - 1), 0);
            if (err_text)
                snprintf(err_text, err_size, "rank %d is in %s (%d words, #%u), rank %d in %s (%d words, #%u): a rank "
                         "skipped a collective or entered another", p, moe_ep__mpi_kind_name((h >> 56) & 0xFF),
                         (int)((h >> 32) & 0xFFFFFF), (unsigned)(h & 0xFFFFFFFF), me, moe_ep__mpi_kind_name(kind), count,
                         (unsigned)(sequence & 0xFFFFFFFFu));
            return MOE_EP_ERROR_OUT_OF_STEP;
        }
        if (p != me) {
            recv[(size_t)p * W] = h;
            if (count > 0) recv[(size_t)p * W + 1] = heads[2 * p + 1];
        }
    }
    /* every peer is in this collective: the rest of the words (the sends are already posted) */
    if (count > 1) {
        int first = n;
        for (p = 0; p < R && rc == MPI_SUCCESS; ++p)
            if (p != me) {
                rc = MPI_Irecv(recv + (size_t)p * W + 2, count - 1, MPI_INT64_T, p, words_tag, m->comm, &m->requests[n]);
                if (rc == MPI_SUCCESS) n++;
            }
        if (rc != MPI_SUCCESS) {
            moe_ep__mpi_abandon(m->requests + (R - 1), n - (R - 1), 0);
            moe_ep__mpi_tell(m, sequence, MOE_EP_ERROR_TRANSPORT);
            return moe_ep__mpi_error(rc, "MPI_Irecv", err_text, err_size);
        }
        /* receives first for moe_ep__mpi_wait: move the payload receives before the sends */
        {
            int i, sends = first - (R - 1), recvs = n - first;
            MPI_Request* r = m->requests + (R - 1);
            for (i = 0; i < recvs; ++i) {
                MPI_Request keep = r[sends + i];
                memmove(r + i + 1, r + i, sizeof *r * (size_t)sends);
                r[i] = keep;
            }
            return moe_ep__mpi_wait(m, sequence, r, sends + recvs, recvs, m->statuses, err_text, err_size);
        }
    }
    return moe_ep__mpi_wait(m, sequence, m->requests + (R - 1), n - (R - 1), 0, m->statuses, err_text, err_size);
}

/* The next collective's number. */
MOE_EP_PRIVATE uint64_t moe_ep__mpi_next(moe_ep__mpi_impl* m) { return m->sequence++; }

/* >>mpi collectives */
MOE_EP_PRIVATE moe_ep_result moe_ep__mpi_exchange(void* impl, const int64_t* send, int64_t* recv, int count,
                                                  char* err_text, size_t err_size) {
    moe_ep__mpi_impl* m = (moe_ep__mpi_impl*)impl;
    uint64_t sequence = moe_ep__mpi_next(m);
    int R = m->world_size, W = count + 1, p;
    int64_t* words;
    moe_ep_result res;
    if (count < 0 || count >= 0xFFFFFF) {
        moe_ep__mpi_tell(m, sequence, MOE_EP_ERROR_INVALID_ARGUMENT);
        if (err_text) snprintf(err_text, err_size, "exchange_counts: count (%d) must be in [0, %d)", count, 0xFFFFFF);
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    words = (int64_t*)moe_ep_alloc(&m->allocator, sizeof(int64_t) * (size_t)W * (size_t)R);
    if (!words) {
        moe_ep__mpi_tell(m, sequence, MOE_EP_ERROR_OUT_OF_MEMORY);
        if (err_text) snprintf(err_text, err_size, "exchange_counts: out of memory");
        return MOE_EP_ERROR_OUT_OF_MEMORY;
    }
    res = moe_ep__mpi_meet(m, MOE_EP__MPI_EXCHANGE, sequence, send, count, words, err_text, err_size);
    for (p = 0; res == MOE_EP_OK && p < R; ++p)
        if (count > 0) memcpy(recv + (size_t)p * count, words + (size_t)p * W + 1, sizeof(int64_t) * (size_t)count);
    moe_ep_free(&m->allocator, words);
    return res;
}

MOE_EP_PRIVATE moe_ep_result moe_ep__mpi_barrier(void* impl, char* err_text, size_t err_size) {
    moe_ep__mpi_impl* m = (moe_ep__mpi_impl*)impl;
    int64_t stack[64];
    int64_t* words = m->world_size <= 64 ? stack : (int64_t*)moe_ep_alloc(&m->allocator, sizeof(int64_t) * (size_t)m->world_size);
    uint64_t sequence = moe_ep__mpi_next(m);
    moe_ep_result res;
    if (!words) {
        moe_ep__mpi_tell(m, sequence, MOE_EP_ERROR_OUT_OF_MEMORY);
        if (err_text) snprintf(err_text, err_size, "barrier: out of memory");
        return MOE_EP_ERROR_OUT_OF_MEMORY;
    }
    res = moe_ep__mpi_meet(m, MOE_EP__MPI_BARRIER, sequence, NULL, 0, words, err_text, err_size);
    if (words != stack) moe_ep_free(&m->allocator, words);
    return res;
}

/* The core's skip: this rank will not enter its next collective; the peers are told. */
MOE_EP_PRIVATE void moe_ep__mpi_skip(void* impl, moe_ep_result status) {
    moe_ep__mpi_impl* m = (moe_ep__mpi_impl*)impl;
    moe_ep__mpi_tell(m, moe_ep__mpi_next(m), status == MOE_EP_OK ? MOE_EP_ERROR_ABORTED : status);
}


/* The contiguous type of one row, cached per row size (a layer has one). A size
   that does not fit the cache gets a type of its own, freed with the request. */
MOE_EP_PRIVATE moe_ep_result moe_ep__mpi_row_type(moe_ep__mpi_impl* m, size_t row_bytes, moe_ep__mpi_request* req,
                                                  MPI_Datatype* out, char* err_text, size_t err_size) {
    MPI_Datatype t;
    int i, rc;
    for (i = 0; i < m->row_type_count; ++i)
        if (m->row_bytes[i] == row_bytes) { *out = m->row_types[i]; return MOE_EP_OK; }
    if (row_bytes == 0 || row_bytes > (size_t)INT_MAX) {
        if (err_text) snprintf(err_text, err_size, "row_bytes (%zu) must be in [1, INT_MAX]: a row is one MPI count of bytes",
                               row_bytes);
        return MOE_EP_ERROR_UNSUPPORTED;
    }
    rc = MPI_Type_contiguous((int)row_bytes, MPI_BYTE, &t);
    if (rc == MPI_SUCCESS) rc = MPI_Type_commit(&t);
    if (rc != MPI_SUCCESS) return moe_ep__mpi_error(rc, "MPI_Type_contiguous", err_text, err_size);
    if (m->row_type_count < MOE_EP__MPI_ROW_TYPES) {
        m->row_bytes[m->row_type_count] = row_bytes;
        m->row_types[m->row_type_count++] = t;
    } else {
        req->row_owned = t;
    }
    *out = t;
    return MOE_EP_OK;
}

MOE_EP_PRIVATE void moe_ep__mpi_request_release(moe_ep__mpi_impl* m, moe_ep__mpi_request* req) {
    int i;
    for (i = 0; i < 2 * req->peers; ++i)
        if (req->owned[i]) { MPI_Type_free(&req->types[i]); req->owned[i] = 0; }
    if (req->row_owned != MPI_DATATYPE_NULL) MPI_Type_free(&req->row_owned);
    req->row_owned = MPI_DATATYPE_NULL;
    req->next = m->spare;
    m->spare = req;
}

MOE_EP_PRIVATE moe_ep__mpi_request* moe_ep__mpi_request_get(moe_ep__mpi_impl* m) {
    moe_ep__mpi_request* req = m->spare;
    size_t R = (size_t)m->world_size;
    if (req) {
        m->spare = req->next;
        return req;
    }
    req = (moe_ep__mpi_request*)moe_ep_alloc(&m->allocator, sizeof *req);
    if (!req) return NULL;
    memset(req, 0, sizeof *req);
    req->peers = m->world_size;
    req->counts = (int*)moe_ep_alloc(&m->allocator, 2 * R * sizeof(int));
    req->displs = (int*)moe_ep_alloc(&m->allocator, 2 * R * sizeof(int));
    req->types = (MPI_Datatype*)moe_ep_alloc(&m->allocator, 2 * R * sizeof(MPI_Datatype));
    req->owned = (unsigned char*)moe_ep_alloc(&m->allocator, 2 * R);
    req->heads = (int64_t*)moe_ep_alloc(&m->allocator, 5 * R * sizeof(int64_t));
    req->requests = (MPI_Request*)moe_ep_alloc(&m->allocator, sizeof(MPI_Request));
    req->request_capacity = 1;
    req->row_owned = MPI_DATATYPE_NULL;
    if (!req->counts || !req->displs || !req->types || !req->owned || !req->requests || !req->heads) {
        moe_ep_free(&m->allocator, req->heads);
        moe_ep_free(&m->allocator, req->requests);
        moe_ep_free(&m->allocator, req->counts);
        moe_ep_free(&m->allocator, req->displs);
        moe_ep_free(&m->allocator, req->types);
        moe_ep_free(&m->allocator, req->owned);
        moe_ep_free(&m->allocator, req);
        return NULL;
    }
    memset(req->owned, 0, 2 * R);
    return req;
}

MOE_EP_PRIVATE int moe_ep__mpi_grow_blocks(moe_ep__mpi_impl* m, int64_t need) {
    int64_t cap = m->block_capacity;
    if (need <= cap) return 1;
    while (cap < need) cap = cap < 16 ? 16 : 2 * cap;
    if ((uint64_t)cap > (uint64_t)(SIZE_MAX / sizeof(int64_t))) return 0;
    moe_ep_free(&m->allocator, m->block_rows);
    moe_ep_free(&m->allocator, m->block_offsets);
    moe_ep_free(&m->allocator, m->block_lengths);
    moe_ep_free(&m->allocator, m->block_displs);
    m->block_rows = (int64_t*)moe_ep_alloc(&m->allocator, (size_t)cap * sizeof(int64_t));
    m->block_offsets = (int64_t*)moe_ep_alloc(&m->allocator, (size_t)cap * sizeof(int64_t));
    m->block_lengths = (int*)moe_ep_alloc(&m->allocator, (size_t)cap * sizeof(int));
    m->block_displs = (MPI_Aint*)moe_ep_alloc(&m->allocator, (size_t)cap * sizeof(MPI_Aint));
    m->block_capacity = cap;
    if (!m->block_rows || !m->block_offsets || !m->block_lengths || !m->block_displs) {
        m->block_capacity = 0;
        return 0;
    }
    return 1;
}

/* counts[slot], displs[slot], types[slot] for one peer's side of the exchange, leaving
   out the segments that travel directly. Returns the number of those in *direct. */
MOE_EP_PRIVATE moe_ep_result moe_ep__mpi_side(moe_ep__mpi_impl* m, moe_ep__mpi_request* req, int slot,
                                              const int64_t* counts, const int64_t* offsets, int segments,
                                              size_t row_bytes, MPI_Datatype row, int peer, int64_t* direct,
                                              char* err_text, size_t err_size) {
    moe_ep__mpi_peer desc;
    moe_ep_result res;
    int64_t b;
    int rc, s, pair = moe_ep__mpi_pair_direct(counts, segments, row_bytes, &m->rule);
    for (s = 0; s < segments; ++s) {
        int64_t messages = moe_ep__mpi_direct_messages(counts[s], row_bytes, pair, &m->rule);
        m->side_counts[s] = messages > 0 ? 0 : counts[s];
        *direct += messages;
    }
    res = moe_ep__mpi_describe(m->side_counts, offsets, segments, row_bytes, &m->limits, peer, &desc, m->block_rows,
                               m->block_offsets, m->block_capacity, err_text, err_size);
    if (res != MOE_EP_OK) return res;
    req->types[slot] = row;
    if (desc.plain) {
        req->counts[slot] = (int)desc.rows;
        req->displs[slot] = (int)desc.plain_offset;
        return MOE_EP_OK;
    }
    if (desc.blocks > m->block_capacity) {
        if (desc.blocks > INT_MAX) {
            if (err_text) snprintf(err_text, err_size, "rank %d: %lld row blocks exceed an MPI count", peer,
                                   (long long)desc.blocks);
            return MOE_EP_ERROR_UNSUPPORTED;
        }
        if (!moe_ep__mpi_grow_blocks(m, desc.blocks)) {
            if (err_text) snprintf(err_text, err_size, "out of memory for %lld row blocks", (long long)desc.blocks);
            return MOE_EP_ERROR_OUT_OF_MEMORY;
        }
        moe_ep__mpi_describe(m->side_counts, offsets, segments, row_bytes, &m->limits, peer, &desc, m->block_rows,
                             m->block_offsets, m->block_capacity, NULL, 0);
    }
    for (b = 0; b < desc.blocks; ++b) {
        m->block_lengths[b] = (int)m->block_rows[b];
        m->block_displs[b] = (MPI_Aint)m->block_offsets[b];
    }
    rc = MPI_Type_create_hindexed((int)desc.blocks, m->block_lengths, m->block_displs, row, &req->types[slot]);
    if (rc == MPI_SUCCESS) {
        req->owned[slot] = 1;
        rc = MPI_Type_commit(&req->types[slot]);
    }
    if (rc != MPI_SUCCESS) return moe_ep__mpi_error(rc, "MPI_Type_create_hindexed", err_text, err_size);
    req->counts[slot] = 1;
    req->displs[slot] = 0;
    return MOE_EP_OK;
}

/* Describes both sides for every peer, copies the rank's own segments and makes room
   for the requests of the direct segments. */
MOE_EP_PRIVATE moe_ep_result moe_ep__mpi_prepare(moe_ep__mpi_impl* m, const moe_ep_a2a_args* a,
                                                 moe_ep__mpi_request* req, MPI_Datatype* row, char* err_text,
                                                 size_t err_size) {
    int R = m->world_size, S = a->segments, me = m->rank, p, s;
    int64_t direct = 0;
    moe_ep_result res;
    if (a->memory_space == MOE_EP_MEMORY_DEVICE) {
        if (err_text) snprintf(err_text, err_size, "device memory is not supported by the MPI transport");
        return MOE_EP_ERROR_UNSUPPORTED;
    }
    if (S < 1) {
        if (err_text) snprintf(err_text, err_size, "segments (%d) must be >= 1", S);
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    if (a->send_rows || a->recv_fn) {     /* row_lists is 0: the core packs the rows for this transport */
        if (err_text) snprintf(err_text, err_size, "moe_ep_a2a_args.send_rows, .recv_fn: the MPI transport moves "
                               "packed rows only (its row_lists is 0); leave them NULL");
        return MOE_EP_ERROR_UNSUPPORTED;
    }
    if (a->send == a->recv && a->send) {
        /* MPI forbids it, and Open MPI would take it for MPI_IN_PLACE */
        if (err_text) snprintf(err_text, err_size, "send and recv are the same buffer; MPI needs two");
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    if (S > m->side_capacity) {
        moe_ep_free(&m->allocator, m->side_counts);
        m->side_counts = (int64_t*)moe_ep_alloc(&m->allocator, (size_t)S * sizeof(int64_t));
        m->side_capacity = m->side_counts ? S : 0;
        if (!m->side_counts) {
            if (err_text) snprintf(err_text, err_size, "out of memory for %d segments", S);
            return MOE_EP_ERROR_OUT_OF_MEMORY;
        }
    }
    res = moe_ep__mpi_row_type(m, a->row_bytes, req, row, err_text, err_size);
    if (res != MOE_EP_OK) return res;
    for (p = 0; p < R; ++p) {
        size_t at = (size_t)p * (size_t)S;
        if (p == me) {
            req->counts[p] = req->counts[R + p] = 0;
            req->displs[p] = req->displs[R + p] = 0;
            req->types[p] = req->types[R + p] = *row;
            continue;
        }
        res = moe_ep__mpi_side(m, req, p, a->send_counts + at, a->send_offsets + at, S, a->row_bytes, *row, p,
                               &direct, err_text, err_size);
        if (res == MOE_EP_OK)
            res = moe_ep__mpi_side(m, req, R + p, a->recv_counts + at, a->recv_offsets + at, S, a->row_bytes, *row,
                                   p, &direct, err_text, err_size);
        if (res != MOE_EP_OK) return res;
    }
    if (4 * (int64_t)R + direct > req->request_capacity) {
        if (direct >= INT_MAX - 4 * (int64_t)R) {
            if (err_text) snprintf(err_text, err_size, "%lld direct segments exceed an MPI count", (long long)direct);
            return MOE_EP_ERROR_UNSUPPORTED;
        }
        moe_ep_free(&m->allocator, req->requests);
        req->requests = (MPI_Request*)moe_ep_alloc(&m->allocator, (size_t)(4 * R + direct) * sizeof(MPI_Request));
        req->request_capacity = req->requests ? (int)(4 * R + direct) : 0;
        if (!req->requests) {
            if (err_text) snprintf(err_text, err_size, "out of memory for %lld requests", (long long)(4 * R + direct));
            return MOE_EP_ERROR_OUT_OF_MEMORY;
        }
    }
    /* The rank's own rows: the same range checks, then memcpy per segment. */
    {
        const int64_t* sc = a->send_counts + (size_t)me * (size_t)S;
        const int64_t* rc = a->recv_counts + (size_t)me * (size_t)S;
        moe_ep__mpi_peer check;
        res = moe_ep__mpi_describe(sc, a->send_offsets + (size_t)me * (size_t)S, S, a->row_bytes, &m->limits, me,
                                   &check, NULL, NULL, 0, err_text, err_size);
        if (res == MOE_EP_OK)
            res = moe_ep__mpi_describe(rc, a->recv_offsets + (size_t)me * (size_t)S, S, a->row_bytes, &m->limits, me,
                                       &check, NULL, NULL, 0, err_text, err_size);
        if (res != MOE_EP_OK) return res;
        for (s = 0; s < S; ++s) {
            if (sc[s] != rc[s]) {
                if (err_text) snprintf(err_text, err_size, "rank %d sends itself %lld rows in segment %d but expects %lld",
                                       me, (long long)sc[s], s, (long long)rc[s]);
                return MOE_EP_ERROR_TRANSPORT;
            }
            if (sc[s] > 0)
                memcpy((char*)a->recv + (size_t)a->recv_offsets[(size_t)me * (size_t)S + s] * a->row_bytes,
                       (const char*)a->send + (size_t)a->send_offsets[(size_t)me * (size_t)S + s] * a->row_bytes,
                       (size_t)sc[s] * a->row_bytes);
        }
    }
    return MOE_EP_OK;
}

/* Posts the receives (send = 0) or sends (send = 1) of the direct segments under `tag`,
   peers in rotated order so that not every rank starts with rank 0. Between two ranks the
   messages go after the collective part, in segment order, chunk by chunk, on both ends,
   so MPI's non-overtaking rule matches them under one tag. */
MOE_EP_PRIVATE int moe_ep__mpi_post_direct(moe_ep__mpi_impl* m, const moe_ep_a2a_args* a, moe_ep__mpi_request* req,
                                           MPI_Datatype row, int send, int tag) {
    int R = m->world_size, S = a->segments, i, s, rc = MPI_SUCCESS;
    const int64_t* counts = send ? a->send_counts : a->recv_counts;
    const int64_t* offsets = send ? a->send_offsets : a->recv_offsets;
    for (i = 1; i < R && rc == MPI_SUCCESS; ++i) {
        int p = send ? (m->rank + i) % R : (m->rank + R - i) % R;
        size_t at = (size_t)p * (size_t)S;
        int pair = moe_ep__mpi_pair_direct(counts + at, S, a->row_bytes, &m->rule);
        for (s = 0; s < S && rc == MPI_SUCCESS; ++s) {
            int64_t rows = counts[at + s], done = 0;
            if (moe_ep__mpi_direct_messages(rows, a->row_bytes, pair, &m->rule) == 0) continue;
            while (done < rows && rc == MPI_SUCCESS) {
                int piece = (int)(rows - done < m->rule.chunk_rows ? rows - done : m->rule.chunk_rows);
                size_t byte = (size_t)(offsets[at + s] + done) * a->row_bytes;
                MPI_Request* r = &req->requests[req->request_count];
                if (send) rc = MPI_Isend((const char*)a->send + byte, piece, row, p, tag, m->comm, r);
                else rc = MPI_Irecv((char*)a->recv + byte, piece, row, p, tag, m->comm, r);
                if (rc == MPI_SUCCESS) req->request_count++;
                done += piece;
            }
        }
    }
    return rc;
}

/* The collective part of one side: a message per peer with rows there (the types and
   displacements of moe_ep__mpi_prepare). */
MOE_EP_PRIVATE int moe_ep__mpi_post_part(moe_ep__mpi_impl* m, const moe_ep_a2a_args* a, moe_ep__mpi_request* req,
                                         int send, int tag) {
    int R = m->world_size, i, rc = MPI_SUCCESS;
    for (i = 1; i < R && rc == MPI_SUCCESS; ++i) {
        int p = send ? (m->rank + i) % R : (m->rank + R - i) % R, slot = send ? p : R + p;
        MPI_Request* r = &req->requests[req->request_count];
        if (req->counts[slot] == 0) continue;
        if (send) rc = MPI_Isend((const char*)a->send + req->displs[slot], req->counts[slot], req->types[slot], p, tag,
                                 m->comm, r);
        else rc = MPI_Irecv((char*)a->recv + req->displs[slot], req->counts[slot], req->types[slot], p, tag, m->comm, r);
        if (rc == MPI_SUCCESS) req->request_count++;
    }
    return rc;
}

/* The rows each peer is sent, summed over segments: what the first message carries. */
MOE_EP_PRIVATE int64_t moe_ep__mpi_rows_to(const int64_t* counts, int p, int S) {
    int64_t rows = 0;
    int s;
    for (s = 0; s < S; ++s) rows += counts[(size_t)p * (size_t)S + s];
    return rows;
}

/* Posts, all at once: the peers' headers (kind, sequence number, rows sent to this rank),
   the receives of rows (the collective part, then the direct segments), this rank's headers
   and its sends in the same order. The headers are checked when the exchange ends. */
MOE_EP_PRIVATE moe_ep_result moe_ep__mpi_a2a_begin(void* impl, const moe_ep_a2a_args* args, void** request,
                                                   char* err_text, size_t err_size) {
    moe_ep__mpi_impl* m = (moe_ep__mpi_impl*)impl;
    uint64_t sequence = moe_ep__mpi_next(m);
    moe_ep__mpi_request* req = moe_ep__mpi_request_get(m);
    MPI_Datatype row = MPI_DATATYPE_NULL;
    moe_ep_result res;
    int rc = MPI_SUCCESS, R = m->world_size, S = args->segments, p, me = m->rank;
    int head_tag = moe_ep__mpi_tag(m, sequence, MOE_EP__MPI_TAG_HEADER);
    int tag = moe_ep__mpi_tag(m, sequence, MOE_EP__MPI_TAG_ROWS);
    int64_t header = moe_ep__mpi_header(MOE_EP__MPI_A2A, 1, sequence);
    if (!req) {
        moe_ep__mpi_tell(m, sequence, MOE_EP_ERROR_OUT_OF_MEMORY);
        if (err_text) snprintf(err_text, err_size, "out of memory for a request record");
        return MOE_EP_ERROR_OUT_OF_MEMORY;
    }
    req->sequence = sequence;
    /* this rank's own cause first, as a rank that fails before the exchange would have it */
    res = moe_ep__mpi_prepare(m, args, req, &row, err_text, err_size);
    if (res != MOE_EP_OK) moe_ep__mpi_tell(m, sequence, res);
    else res = moe_ep__mpi_take_notice(m, sequence, err_text, err_size);     /* a peer gave it up before we came */
    if (res != MOE_EP_OK) {
        moe_ep__mpi_request_release(m, req);
        return res;
    }
    req->request_count = 0;
    for (p = 0; p < R && rc == MPI_SUCCESS; ++p)
        if (p != me) {
            rc = MPI_Irecv(req->heads + 2 * p, 2, MPI_INT64_T, p, head_tag, m->comm, &req->requests[req->request_count]);
            if (rc == MPI_SUCCESS) req->request_count++;
        }
    if (rc == MPI_SUCCESS) rc = moe_ep__mpi_post_part(m, args, req, 0, tag);
    if (rc == MPI_SUCCESS) rc = moe_ep__mpi_post_direct(m, args, req, row, 0, tag);
    req->receive_count = req->request_count;
    for (p = 0; p < R && rc == MPI_SUCCESS; ++p)
        if (p != me) {
            int64_t* mine = req->heads + 2 * (R + p);
            mine[0] = header;
            mine[1] = moe_ep__mpi_rows_to(args->send_counts, p, S);
            req->heads[4 * R + p] = moe_ep__mpi_rows_to(args->recv_counts, p, S);
            rc = MPI_Isend(mine, 2, MPI_INT64_T, p, head_tag, m->comm, &req->requests[req->request_count]);
            if (rc == MPI_SUCCESS) req->request_count++;
        }
    if (rc == MPI_SUCCESS) rc = moe_ep__mpi_post_part(m, args, req, 1, tag);
    if (rc == MPI_SUCCESS) rc = moe_ep__mpi_post_direct(m, args, req, row, 1, tag);
    if (rc != MPI_SUCCESS) {
        moe_ep__mpi_abandon(req->requests, req->request_count, req->receive_count);
        moe_ep__mpi_tell(m, sequence, MOE_EP_ERROR_TRANSPORT);
        moe_ep__mpi_request_release(m, req);
        return moe_ep__mpi_error(rc, "MPI_Isend / MPI_Irecv", err_text, err_size);
    }
    *request = req;
    return MOE_EP_OK;
}

/* The headers first: a peer in another collective (OUT_OF_STEP on every rank) or one that
   sends other row counts than this rank expects (told to the peers) ends it there; then
   the rows. */
MOE_EP_PRIVATE moe_ep_result moe_ep__mpi_a2a_end(void* impl, void* request, char* err_text, size_t err_size) {
    moe_ep__mpi_impl* m = (moe_ep__mpi_impl*)impl;
    moe_ep__mpi_request* req = (moe_ep__mpi_request*)request;
    moe_ep_result res;
    int R, p, heads;
    if (!req) {
        if (err_text) snprintf(err_text, err_size, "no exchange is open (request is NULL)");
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    R = m->world_size;
    heads = R - 1;
    res = moe_ep__mpi_wait(m, req->sequence, req->requests, heads, heads, NULL, err_text, err_size);
    for (p = 0; res == MOE_EP_OK && p < R; ++p) {
        int64_t h = req->heads[2 * p], rows = req->heads[2 * p + 1];
        if (p == m->rank) continue;
        if (h != moe_ep__mpi_header(MOE_EP__MPI_A2A, 1, req->sequence)) {
            if (err_text)
                snprintf(err_text, err_size, "rank %d is in %s (#%u), rank %d in all_to_all_v (#%u): a rank skipped a "
                         "collective or entered another", p, moe_ep__mpi_kind_name((h >> 56) & 0xFF),
                         (unsigned)(h & 0xFFFFFFFF), m->rank, (unsigned)(req->sequence & 0xFFFFFFFFu));
            res = MOE_EP_ERROR_OUT_OF_STEP;
        } else if (rows != req->heads[4 * R + p]) {
            if (err_text) snprintf(err_text, err_size, "rank %d sends %lld rows, rank %d expects %lld", p,
                                   (long long)rows, m->rank, (long long)req->heads[4 * R + p]);
            res = MOE_EP_ERROR_TRANSPORT;
            moe_ep__mpi_tell(m, req->sequence, res);    /* the sender cannot see it: it would wait for this rank */
        }
    }
    if (res == MOE_EP_OK)
        res = moe_ep__mpi_wait(m, req->sequence, req->requests + heads, req->request_count - heads,
                               req->receive_count - heads, NULL, err_text, err_size);
    else
        moe_ep__mpi_abandon(req->requests + heads, req->request_count - heads, req->receive_count - heads);
    moe_ep__mpi_request_release(m, req);
    return res;
}

/* Blocking: the split phase back to back (MPI_Ialltoallw + MPI_Waitall costs the same as
   MPI_Alltoallw here, and the direct segments need the nonblocking form anyway). */
MOE_EP_PRIVATE moe_ep_result moe_ep__mpi_a2a(void* impl, const moe_ep_a2a_args* args, char* err_text,
                                             size_t err_size) {
    void* request = NULL;
    moe_ep_result res = moe_ep__mpi_a2a_begin(impl, args, &request, err_text, err_size);
    if (res != MOE_EP_OK) return res;
    return moe_ep__mpi_a2a_end(impl, request, err_text, err_size);
}

/* >>mpi create and destroy */
MOE_EP_PRIVATE void moe_ep__mpi_destroy(void* impl) {
    moe_ep__mpi_impl* m = (moe_ep__mpi_impl*)impl;
    moe_ep_allocator a;
    int finalized = 0, i;
    if (!m) return;
    a = m->allocator;
    MPI_Finalized(&finalized);
    while (m->spare) {
        moe_ep__mpi_request* req = m->spare;
        m->spare = req->next;
        moe_ep_free(&a, req->counts);
        moe_ep_free(&a, req->displs);
        moe_ep_free(&a, req->types);
        moe_ep_free(&a, req->owned);
        moe_ep_free(&a, req->heads);
        moe_ep_free(&a, req->requests);
        moe_ep_free(&a, req);
    }
    if (!finalized) {
        moe_ep__mpi_read_notices(m);    /* what has arrived does not outlive the communicator */
        for (i = 0; i < MOE_EP__MPI_NOTICES; ++i)
            if (m->told_requests[i] != MPI_REQUEST_NULL) {
                MPI_Cancel(&m->told_requests[i]);
                MPI_Request_free(&m->told_requests[i]);
            }
        for (i = 0; i < m->row_type_count; ++i) MPI_Type_free(&m->row_types[i]);
        if (m->comm != MPI_COMM_NULL) MPI_Comm_free(&m->comm);
        if (m->control != MPI_COMM_NULL) MPI_Comm_free(&m->control);
    }
    moe_ep_free(&a, m->notices);
    moe_ep_free(&a, m->requests);
    moe_ep_free(&a, m->statuses);
    moe_ep_free(&a, m->wait_statuses);
    moe_ep_free(&a, m->meet_words);
    moe_ep_free(&a, m->block_rows);
    moe_ep_free(&a, m->block_offsets);
    moe_ep_free(&a, m->block_lengths);
    moe_ep_free(&a, m->block_displs);
    moe_ep_free(&a, m->side_counts);
    moe_ep_free(&a, m);
}

/* >>mpi groups and sums */
MOE_EP_PRIVATE moe_ep_result moe_ep__mpi_split(void* impl, int color, int key, moe_ep_transport* out, char* err_text,
                                               size_t err_size);
MOE_EP_PRIVATE moe_ep_result moe_ep__mpi_all_reduce(void* impl, float* data, int64_t count,
                                                    moe_ep_memory_space memory_space, void* stream, char* err_text,
                                                    size_t err_size);

/* A transport over `comm`, which it owns from here on (freed on failure too). */
MOE_EP_PRIVATE moe_ep_result moe_ep__mpi_wrap(MPI_Comm comm, const moe_ep_allocator* allocator, int timeout_ms,
                                              moe_ep_transport* out, char* err_text, size_t err_size) {
    moe_ep__mpi_impl* m;
    moe_ep_transport t;
    MPI_Comm control = MPI_COMM_NULL;
    int64_t incarnation = 0;
    int rc, rank = 0, size = 0, i;
    rc = MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_rank(comm, &rank);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_size(comm, &size);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_dup(comm, &control);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_set_errhandler(control, MPI_ERRORS_RETURN);
    if (rc == MPI_SUCCESS) {
        /* the largest clock reading: later than every earlier transport's on every rank */
        int64_t now = (int64_t)(MPI_Wtime() * 1e9);
        rc = MPI_Allreduce(&now, &incarnation, 1, MPI_INT64_T, MPI_MAX, comm);
    }
    m = rc == MPI_SUCCESS ? (moe_ep__mpi_impl*)moe_ep_alloc(allocator, sizeof *m) : NULL;
    if (!m) {
        MPI_Comm_free(&comm);
        if (control != MPI_COMM_NULL) MPI_Comm_free(&control);
        if (rc != MPI_SUCCESS) return moe_ep__mpi_error(rc, "MPI_Comm_set_errhandler / MPI_Comm_dup", err_text, err_size);
        if (err_text) snprintf(err_text, err_size, "out of memory");
        return MOE_EP_ERROR_OUT_OF_MEMORY;
    }
    memset(m, 0, sizeof *m);
    m->comm = comm;
    m->control = control;
    m->incarnation = incarnation;
    m->tag_base = (uint64_t)incarnation * 0x9E3779B97F4A7C15ull >> 16;
    m->timeout_ms = timeout_ms == 0 ? MOE_EP__MPI_TIMEOUT_MS : timeout_ms;
    for (i = 0; i < MOE_EP__MPI_NOTICES; ++i) m->told_requests[i] = MPI_REQUEST_NULL;
    m->rank = rank;
    m->world_size = size;
    m->allocator = *allocator;
    m->limits.max_block_rows = INT_MAX;
    m->limits.max_plain_offset = INT_MAX;
    m->limits.max_offset = sizeof(MPI_Aint) >= sizeof(int64_t) ? INT64_MAX : (int64_t)((1ull << (8 * sizeof(MPI_Aint) - 1)) - 1);
    if ((uint64_t)m->limits.max_offset > (uint64_t)PTRDIFF_MAX) m->limits.max_offset = (int64_t)PTRDIFF_MAX;
    m->rule.direct_bytes = MOE_EP__MPI_DIRECT_BYTES;
    m->rule.collective_bytes = INT_MAX;
    m->rule.chunk_rows = INT_MAX;
    m->reduce_chunk = MOE_EP__MPI_REDUCE_CHUNK;
    {
        void* value = NULL;
        int flag = 0;
        m->tag_ub = 32767;                  /* the least MPI promises; tags are 0 .. tag_ub */
        if (MPI_Comm_get_attr(comm, MPI_TAG_UB, &value, &flag) == MPI_SUCCESS && flag && value && *(int*)value >= 32767)
            m->tag_ub = *(int*)value;
    }
    memset(&t, 0, sizeof t);
    t.impl = m;
    t.name = "mpi";
    t.rank = rank;
    t.world_size = size;
    t.local_ranks = 1;
    t.exchange_counts = moe_ep__mpi_exchange;
    t.all_to_all_v = moe_ep__mpi_a2a;
    t.all_to_all_v_begin = moe_ep__mpi_a2a_begin;
    t.all_to_all_v_end = moe_ep__mpi_a2a_end;
    t.barrier = moe_ep__mpi_barrier;
    t.destroy = moe_ep__mpi_destroy;
    t.all_reduce_sum = moe_ep__mpi_all_reduce;
    t.split = moe_ep__mpi_split;
    t.skip = moe_ep__mpi_skip;
    *out = t;
    return MOE_EP_OK;
}

/* MPI_Comm_split: ranks of one color, ordered by (key, rank) as MPI orders them. A rank
   with a negative color still takes part (MPI_UNDEFINED), so the others are not left
   waiting, and gets an error. */
MOE_EP_PRIVATE moe_ep_result moe_ep__mpi_split(void* impl, int color, int key, moe_ep_transport* out, char* err_text,
                                               size_t err_size) {
    moe_ep__mpi_impl* m = (moe_ep__mpi_impl*)impl;
    MPI_Comm group = MPI_COMM_NULL;
    int rc;
    /* MPI_Comm_split blocks without a deadline: meet first, so that a rank elsewhere is
       an error (OUT_OF_STEP, a notice or the timeout) instead of a hang */
    moe_ep_result res = moe_ep__mpi_barrier(impl, err_text, err_size);
    if (res != MOE_EP_OK) return res;
    rc = MPI_Comm_split(m->comm, color >= 0 ? color : MPI_UNDEFINED, key, &group);
    if (rc != MPI_SUCCESS) return moe_ep__mpi_error(rc, "MPI_Comm_split", err_text, err_size);
    if (color < 0) {
        if (group != MPI_COMM_NULL) MPI_Comm_free(&group);
        if (err_text) snprintf(err_text, err_size, "split: color (%d) must be >= 0", color);
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    return moe_ep__mpi_wrap(group, &m->allocator, m->timeout_ms, out, err_text, err_size);
}

/* The sum in rank order, (((r0 + r1) + r2) + ...), the same bits on every rank and in
   every run (MPI_Allreduce promises neither): the data goes in windows; in each, rank c
   gathers chunk c from every rank, adds the copies in rank order and hands its sum to all.
   Every rank first tells the others its count (or why it cannot take part), so a mismatch
   fails everywhere instead of hanging. Point-to-point, under the collective's tag. */
MOE_EP_PRIVATE moe_ep_result moe_ep__mpi_all_reduce(void* impl, float* data, int64_t count,
                                                    moe_ep_memory_space memory_space, void* stream, char* err_text,
                                                    size_t err_size) {
    const int64_t BAD_COUNT = -1, DEVICE = -2, NO_MEMORY = -3;     /* int64_t, as the counts: no enum/int mix in C++ */
    moe_ep__mpi_impl* m = (moe_ep__mpi_impl*)impl;
    const moe_ep_allocator* a = &m->allocator;
    uint64_t sequence = moe_ep__mpi_next(m);
    int R = m->world_size, me = m->rank, q, rc = MPI_SUCCESS, tag = moe_ep__mpi_tag(m, sequence, MOE_EP__MPI_TAG_SUMS);
    int64_t chunk, window, done, i, status;
    int64_t* words = (int64_t*)moe_ep_alloc(a, 3 * (size_t)R * sizeof(int64_t));
    int64_t* part = (int64_t*)moe_ep_alloc(a, 2 * (size_t)R * sizeof(int64_t));
    float* gathered = NULL;
    moe_ep_result res = MOE_EP_OK;
    (void)stream;
    chunk = m->reduce_chunk < (int64_t)(INT_MAX / R) ? m->reduce_chunk : (int64_t)(INT_MAX / R);
    if (count >= 0 && count / R + 1 < chunk) chunk = count / R + 1;
    if (count > 0 && memory_space != MOE_EP_MEMORY_DEVICE)
        gathered = (float*)moe_ep_alloc(a, (size_t)R * (size_t)chunk * sizeof(float));
    if (!words || !part || !moe_ep__mpi_grow_requests(m, 2 * (int64_t)R)) {
        moe_ep_free(a, words);
        moe_ep_free(a, part);
        moe_ep_free(a, gathered);
        moe_ep__mpi_tell(m, sequence, MOE_EP_ERROR_OUT_OF_MEMORY);
        if (err_text) snprintf(err_text, err_size, "all_reduce_sum: out of memory");
        return MOE_EP_ERROR_OUT_OF_MEMORY;
    }
    /* Every rank's count, or why it cannot take part: all ranks reach the same verdict. */
    status = memory_space == MOE_EP_MEMORY_DEVICE ? DEVICE : count < 0 ? BAD_COUNT
           : count > 0 && !gathered ? NO_MEMORY : count;
    for (q = 0; q < R; ++q) words[q] = status;
    res = moe_ep__mpi_meet(m, MOE_EP__MPI_REDUCE, sequence, words, 1, words + R, err_text, err_size);
    for (q = 0; res == MOE_EP_OK && q < R; ++q) {
        int64_t theirs = words[R + 2 * q + 1];
        if (theirs == DEVICE) {
            res = MOE_EP_ERROR_UNSUPPORTED;
            if (err_text) snprintf(err_text, err_size, "all_reduce_sum: device memory is not supported by the MPI transport");
        } else if (theirs == NO_MEMORY) {
            res = q == me ? MOE_EP_ERROR_OUT_OF_MEMORY : MOE_EP_ERROR_ABORTED;
            if (err_text) snprintf(err_text, err_size, "all_reduce_sum: rank %d is out of memory", q);
        } else if (theirs != status) {
            res = MOE_EP_ERROR_INVALID_ARGUMENT;
            if (err_text) snprintf(err_text, err_size, "all_reduce_sum: rank %d passes %lld elements, rank %d %lld", q,
                                   (long long)theirs, me, (long long)status);
        } else if (theirs < 0) {
            res = MOE_EP_ERROR_INVALID_ARGUMENT;
            if (err_text) snprintf(err_text, err_size, "all_reduce_sum: count (%lld) must be >= 0", (long long)count);
        }
    }
    for (done = 0; res == MOE_EP_OK && done < count; done += window) {
        int64_t* part_count = part;
        int64_t* part_start = part + R;
        int64_t mine_len;
        int n = 0, receives;
        window = count - done < chunk * R ? count - done : chunk * R;
        for (q = 0; q < R; ++q) {
            part_start[q] = window * q / R;
            part_count[q] = window * (q + 1) / R - part_start[q];
        }
        mine_len = part_count[me];
        /* rank me's part from every rank, into gathered[q * mine_len ..) */
        for (q = 0; q < R && rc == MPI_SUCCESS; ++q)
            if (q != me && mine_len > 0) {
                rc = MPI_Irecv(gathered + (int64_t)q * mine_len, (int)mine_len, MPI_FLOAT, q, tag, m->comm, &m->requests[n]);
                if (rc == MPI_SUCCESS) n++;
            }
        receives = n;
        for (q = 0; q < R && rc == MPI_SUCCESS; ++q)
            if (q != me && part_count[q] > 0) {
                rc = MPI_Isend(data + done + part_start[q], (int)part_count[q], MPI_FLOAT, q, tag, m->comm, &m->requests[n]);
                if (rc == MPI_SUCCESS) n++;
            }
        if (mine_len > 0) memcpy(gathered + (int64_t)me * mine_len, data + done + part_start[me], sizeof(float) * (size_t)mine_len);
        if (rc != MPI_SUCCESS) break;
        res = moe_ep__mpi_wait(m, sequence, m->requests, n, receives, NULL, err_text, err_size);
        if (res != MOE_EP_OK) break;
        for (i = 0; i < mine_len; ++i) {
            float sum = gathered[i];
            for (q = 1; q < R; ++q) sum += gathered[(int64_t)q * mine_len + i];
            data[done + part_start[me] + i] = sum;
        }
        /* every rank's sum to every rank */
        n = 0;
        for (q = 0; q < R && rc == MPI_SUCCESS; ++q)
            if (q != me && part_count[q] > 0) {
                rc = MPI_Irecv(data + done + part_start[q], (int)part_count[q], MPI_FLOAT, q, tag, m->comm, &m->requests[n]);
                if (rc == MPI_SUCCESS) n++;
            }
        receives = n;
        for (q = 0; q < R && rc == MPI_SUCCESS; ++q)
            if (q != me && mine_len > 0) {
                rc = MPI_Isend(data + done + part_start[me], (int)mine_len, MPI_FLOAT, q, tag, m->comm, &m->requests[n]);
                if (rc == MPI_SUCCESS) n++;
            }
        if (rc != MPI_SUCCESS) break;
        res = moe_ep__mpi_wait(m, sequence, m->requests, n, receives, NULL, err_text, err_size);
    }
    moe_ep_free(a, words);
    moe_ep_free(a, part);
    moe_ep_free(a, gathered);
    if (rc != MPI_SUCCESS) {
        moe_ep__mpi_tell(m, sequence, MOE_EP_ERROR_TRANSPORT);
        return moe_ep__mpi_error(rc, "all_reduce_sum (MPI_Isend / MPI_Irecv)", err_text, err_size);
    }
    return res;
}

MOE_EP_PRIVATE moe_ep_result moe_ep__mpi_create_fail(const moe_ep_mpi_desc* desc, moe_ep_result result,
                                                     const char* fmt, ...) {
    char text[MPI_MAX_ERROR_STRING + 256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    if (desc && desc->logger.func) desc->logger.func("moe_ep_mpi", 1, MOE_EP_LOG_ITEM_NONE, -1, text, desc->logger.user_data);
    return result;
}

MOE_EP_API moe_ep_result moe_ep_mpi_transport_create(const moe_ep_mpi_desc* desc, moe_ep_transport* out) {
    MPI_Comm comm;
    MPI_Errhandler previous;
    int initialized = 0, finalized = 0, inter = 0, rc;
    char err[MPI_MAX_ERROR_STRING + 64] = "";
    if (!desc || !out) return moe_ep__mpi_create_fail(desc, MOE_EP_ERROR_INVALID_ARGUMENT,
                                                      "moe_ep_mpi_transport_create: desc and out must not be NULL");
    if ((desc->allocator.alloc_fn == NULL) != (desc->allocator.free_fn == NULL))
        return moe_ep__mpi_create_fail(desc, MOE_EP_ERROR_INVALID_ARGUMENT,
                                       "moe_ep_mpi_desc.allocator: set both alloc_fn and free_fn, or neither");
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    if (!initialized || finalized)
        return moe_ep__mpi_create_fail(desc, MOE_EP_ERROR_INVALID_ARGUMENT,
                                       "moe_ep_mpi_transport_create: MPI is %s (call it between MPI_Init and "
                                       "MPI_Finalize; moe_ep never initialises MPI)",
                                       finalized ? "already finalized" : "not initialised");
    comm = desc->comm == (MPI_Comm)0 ? MPI_COMM_WORLD : desc->comm;
    if (comm == MPI_COMM_NULL)
        return moe_ep__mpi_create_fail(desc, MOE_EP_ERROR_INVALID_ARGUMENT,
                                       "moe_ep_mpi_desc.comm is MPI_COMM_NULL: pass a communicator (zero means MPI_COMM_WORLD)");
    /* The duplication fails into a return code, not into the application's handler. */
    rc = MPI_Comm_get_errhandler(comm, &previous);
    if (rc != MPI_SUCCESS) {
        moe_ep__mpi_error(rc, "MPI_Comm_get_errhandler", err, sizeof err);
        return moe_ep__mpi_create_fail(desc, MOE_EP_ERROR_TRANSPORT, "moe_ep_mpi_transport_create: %s", err);
    }
    MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
    rc = MPI_Comm_test_inter(comm, &inter);
    if (rc == MPI_SUCCESS && inter) {
        MPI_Comm_set_errhandler(comm, previous);
        MPI_Errhandler_free(&previous);
        return moe_ep__mpi_create_fail(desc, MOE_EP_ERROR_INVALID_ARGUMENT,
                                       "moe_ep_mpi_desc.comm is an intercommunicator: pass an intracommunicator");
    }
    {
        MPI_Comm dup = MPI_COMM_NULL;
        if (rc == MPI_SUCCESS) rc = MPI_Comm_dup(comm, &dup);
        MPI_Comm_set_errhandler(comm, previous);
        MPI_Errhandler_free(&previous);
        if (rc != MPI_SUCCESS) {
            moe_ep__mpi_error(rc, "MPI_Comm_dup", err, sizeof err);
            return moe_ep__mpi_create_fail(desc, MOE_EP_ERROR_TRANSPORT, "moe_ep_mpi_transport_create: %s", err);
        }
        comm = dup;
    }
    {
        moe_ep_result res;
        if (desc->timeout_ms < 0 && desc->timeout_ms != -1) {
            MPI_Comm_free(&comm);
            return moe_ep__mpi_create_fail(desc, MOE_EP_ERROR_INVALID_ARGUMENT, "moe_ep_mpi_desc.timeout_ms (%d) must be "
                                           ">= 0 (0: %d ms), or -1 (no deadline)", desc->timeout_ms, MOE_EP__MPI_TIMEOUT_MS);
        }
        res = moe_ep__mpi_wrap(comm, &desc->allocator, desc->timeout_ms, out, err, sizeof err);
        if (res != MOE_EP_OK)
            return moe_ep__mpi_create_fail(desc, res, "moe_ep_mpi_transport_create: %s", err);
    }
    return MOE_EP_OK;
}

MOE_EP_API void moe_ep_mpi_transport_destroy(moe_ep_transport* transport) {
    if (!transport) return;
    if (transport->destroy && transport->impl) transport->destroy(transport->impl);
    memset(transport, 0, sizeof *transport);
}

#endif /* MOE_EP_MPI_IMPL_INCLUDED */
#endif /* MOE_EP_MPI_IMPLEMENTATION */
