/* mpi_bench -- dispatch + combine through the MPI transport against raw MPI_Alltoallv.

   For the seed layer's routing (64 experts, top-2, random token -> expert choices) at
   several sizes, on a prepared plan, it times four things, interleaved in one run
   (the order rotates every repetition), after warm-up; each sample starts after a
   barrier and is the slowest rank's time; the table shows medians.

     ours       moe_ep_dispatch + moe_ep_combine: gather of the token rows into the send
                buffer, the segmented exchange (rows land grouped by local expert), the
                status agreement of combine, the exchange back, the weighted k-slot sum.
     a2a        the transport alone: the same two segmented exchanges (begin + end, as
                the core calls them), no gather, no sum, no agreement.
     raw        MPI_Alltoallv of the identical bytes per peer, there and back, from and
                into contiguous per-peer blocks (rows grouped by source, not by expert).
     hand       raw plus the local work a hand-written layer does: the same gather
                before and the same weighted sum after.

   ours/raw is the brief's ratio; ours/hand is the library's cost over hand-written MPI
   code that does the same work; a2a/raw is the transport's cost for the segmented layout.

   Each rank uses one thread (num_threads = 1): one process per core.

   mpirun -n 2 ./mpi_bench [--reps N] [--seed N] [--direct-bytes N]
   --direct-bytes sets the transport's threshold for segments sent as their own message
   (default the header's; 0 = never), to tune it. */
#define _POSIX_C_SOURCE 200112L
#define MOE_EP_IMPLEMENTATION
#include "../transports/moe_ep_mpi.h"
#include "../tests/support/test_support.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EXPERTS 64
#define TOP_K 2
#define METHODS 4

typedef struct bench_size { int tokens, d_model; } bench_size;

/* Rows per peer at 2 ranks: about tokens * k / 2; bytes per row 4 * d_model. */
static const bench_size sizes[] = {
    { 16, 64 },         /*   4 KiB per peer */
    { 256, 256 },       /* 256 KiB per peer */
    { 1024, 256 },      /*   1 MiB per peer */
    { 2048, 1024 },     /*   8 MiB per peer */
};
#define SIZES ((int)(sizeof sizes / sizeof sizes[0]))

static const char* method_names[METHODS] = { "ours", "a2a", "raw", "hand" };

static int compare_double(const void* a, const void* b) {
    double x = *(const double*)a, y = *(const double*)b;
    return x < y ? -1 : x > y;
}

static int never_called(int l, int e, const float* rows, int64_t n, int d, float* out, void* user) {
    (void)l; (void)e; (void)rows; (void)n; (void)d; (void)out; (void)user;
    return 1;
}

typedef struct bench_case {
    int R, rank, d;
    int64_t T;
    moe_ep_context* ctx;
    moe_ep_plan* plan;
    moe_ep_plan_info info;
    moe_ep_transport* transport;
    moe_ep_a2a_args forward, backward;
    float *x, *y, *y_hand, *recv, *send, *staged;   /* staged: raw's send buffer (hand gathers into it) */
    int *raw_send_counts, *raw_send_displs, *raw_recv_counts, *raw_recv_displs;
    MPI_Datatype row;
} bench_case;

static void gather_rows(const bench_case* b) {
    int64_t r;
    for (r = 0; r < b->info.send_rows; ++r)
        memcpy(b->staged + r * b->d, b->x + b->info.permutation[r] * b->d, sizeof(float) * (size_t)b->d);
}

/* The same weighted sum as combine: k-slot order, fp32, from the rows that came back. */
static void weighted_sum(const bench_case* b, float* y) {
    int64_t t, i;
    int j;
    for (t = 0; t < b->T; ++t) {
        float* yt = y + t * b->d;
        for (i = 0; i < b->d; ++i) yt[i] = 0.0f;
        for (j = 0; j < TOP_K; ++j) {
            int64_t row = b->info.slot_rows[t * TOP_K + j];
            float w = b->info.topk_weight[t * TOP_K + j];
            const float* src = b->staged + row * b->d;
            if (row < 0) continue;
            for (i = 0; i < b->d; ++i) yt[i] += w * src[i];
        }
    }
}

static int run_method(bench_case* b, int method) {
    char err[512] = "";
    void* request = NULL;
    int ok = 1;
    switch (method) {
    case 0:
        ok = moe_ep_dispatch(b->ctx, b->plan, b->x, b->recv) == MOE_EP_OK &&
             moe_ep_combine(b->ctx, b->plan, b->recv, b->y) == MOE_EP_OK;
        break;
    case 1:
        ok = b->transport->all_to_all_v_begin(b->transport->impl, &b->forward, &request, err, sizeof err) == MOE_EP_OK &&
             b->transport->all_to_all_v_end(b->transport->impl, request, err, sizeof err) == MOE_EP_OK &&
             b->transport->all_to_all_v_begin(b->transport->impl, &b->backward, &request, err, sizeof err) == MOE_EP_OK &&
             b->transport->all_to_all_v_end(b->transport->impl, request, err, sizeof err) == MOE_EP_OK;
        break;
    case 2:
    case 3:
        if (method == 3) gather_rows(b);
        ok = MPI_Alltoallv(b->staged, b->raw_send_counts, b->raw_send_displs, b->row, b->recv, b->raw_recv_counts,
                           b->raw_recv_displs, b->row, MPI_COMM_WORLD) == MPI_SUCCESS &&
             MPI_Alltoallv(b->recv, b->raw_recv_counts, b->raw_recv_displs, b->row, b->staged, b->raw_send_counts,
                           b->raw_send_displs, b->row, MPI_COMM_WORLD) == MPI_SUCCESS;
        if (method == 3) weighted_sum(b, b->y_hand);
        break;
    default:
        ok = 0;
    }
    if (!ok) fprintf(stderr, "mpi_bench: rank %d: %s failed %s %s\n", b->rank, method_names[method], err,
                     method == 0 ? moe_ep_last_error(b->ctx) : "");
    return ok;
}

int main(int argc, char** argv) {
    int rank, R, reps = 0, s, i, m, failed = 0;
    unsigned long long seed = 1;
    long long direct_bytes = -1;
    moe_ep_transport transport;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &R);
    for (i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--reps") == 0) reps = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--seed") == 0) seed = strtoull(argv[i + 1], NULL, 10);
        else if (strcmp(argv[i], "--direct-bytes") == 0) direct_bytes = atoll(argv[i + 1]);
    }
    if (moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD }, &transport) != MOE_EP_OK) {
        fprintf(stderr, "mpi_bench: cannot create the transport\n");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    if (direct_bytes >= 0) ((moe_ep__mpi_impl*)transport.impl)->rule.direct_bytes = direct_bytes;
    if (rank == 0) {
        printf("mpi_bench: %d ranks, %d experts, top-%d, random routing, direct segments from %lld bytes; medians of "
               "interleaved repetitions, slowest rank per sample\n\n", R, EXPERTS, TOP_K,
               (long long)((moe_ep__mpi_impl*)transport.impl)->rule.direct_bytes);
        printf("%8s %7s %11s %6s %10s %10s %10s %10s %9s %9s %9s\n", "tokens", "d_model", "KiB/peer", "reps",
               "ours us", "a2a us", "raw us", "hand us", "ours/raw", "a2a/raw", "ours/hand");
    }
    for (s = 0; s < SIZES && !failed; ++s) {
        bench_case b;
        int32_t* idx;
        float* weight;
        int64_t t, r, send_off = 0, recv_off = 0, peer_rows;
        int p, n, identical;
        double* samples[METHODS];
        double median[METHODS];
        uint64_t rng = seed * 7919u + (uint64_t)rank * 104729u + (uint64_t)s;
        memset(&b, 0, sizeof b);
        b.R = R; b.rank = rank; b.T = sizes[s].tokens; b.d = sizes[s].d_model;
        b.transport = &transport;
        n = reps > 0 ? reps : (b.d * b.T >= 1 << 20 ? 60 : 400);
        idx = (int32_t*)malloc(sizeof(int32_t) * (size_t)(b.T * TOP_K));
        weight = (float*)malloc(sizeof(float) * (size_t)(b.T * TOP_K));
        b.x = (float*)malloc(sizeof(float) * (size_t)(b.T * b.d));
        b.y = (float*)malloc(sizeof(float) * (size_t)(b.T * b.d));
        b.y_hand = (float*)malloc(sizeof(float) * (size_t)(b.T * b.d));
        test_fill(b.x, (size_t)(b.T * b.d), 1.0f, &rng);
        for (t = 0; t < b.T; ++t) {
            idx[t * TOP_K] = (int32_t)(test_rng_next(&rng) % EXPERTS);
            idx[t * TOP_K + 1] = (int32_t)((idx[t * TOP_K] + 1 + (int32_t)(test_rng_next(&rng) % (EXPERTS - 1))) % EXPERTS);
            weight[t * TOP_K] = 0.6f;
            weight[t * TOP_K + 1] = 0.4f;
        }
        if (moe_ep_create(&(moe_ep_desc){ .d_model = b.d, .num_experts = EXPERTS, .top_k = TOP_K,
                                          .num_threads = 1, .expert_fn = never_called, .transport = &transport },
                          &b.ctx) != MOE_EP_OK ||
            moe_ep_plan_create(b.ctx, b.T, idx, weight, &b.plan) != MOE_EP_OK) {
            fprintf(stderr, "mpi_bench: rank %d: cannot create the layer or its plan\n", rank);
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
        b.info = moe_ep_plan_query(b.plan);
        b.recv = (float*)malloc(sizeof(float) * (size_t)(b.info.recv_rows * b.d + 1));
        b.send = (float*)malloc(sizeof(float) * (size_t)(b.info.send_rows * b.d + 1));
        b.staged = (float*)malloc(sizeof(float) * (size_t)(b.info.send_rows * b.d + 1));
        memset(b.recv, 0, sizeof(float) * (size_t)(b.info.recv_rows * b.d + 1));
        for (r = 0; r < b.info.send_rows * b.d; ++r) b.send[r] = b.staged[r] = 1.0f;
        /* the transport's arguments exactly as the core builds them */
        b.forward.send = b.send; b.forward.recv = b.recv; b.forward.row_bytes = sizeof(float) * (size_t)b.d;
        b.forward.segments = b.info.segments;
        b.forward.send_counts = b.info.seg_send_counts; b.forward.send_offsets = b.info.seg_send_offsets;
        b.forward.recv_counts = b.info.seg_recv_counts; b.forward.recv_offsets = b.info.seg_recv_offsets;
        b.backward = b.forward;
        b.backward.send = b.recv; b.backward.recv = b.send;
        b.backward.send_counts = b.info.seg_recv_counts; b.backward.send_offsets = b.info.seg_recv_offsets;
        b.backward.recv_counts = b.info.seg_send_counts; b.backward.recv_offsets = b.info.seg_send_offsets;
        /* raw: per-peer contiguous blocks of rows */
        b.raw_send_counts = (int*)malloc(sizeof(int) * (size_t)R);
        b.raw_send_displs = (int*)malloc(sizeof(int) * (size_t)R);
        b.raw_recv_counts = (int*)malloc(sizeof(int) * (size_t)R);
        b.raw_recv_displs = (int*)malloc(sizeof(int) * (size_t)R);
        for (p = 0; p < R; ++p) {
            b.raw_send_counts[p] = (int)b.info.send_counts[p];
            b.raw_send_displs[p] = (int)send_off;
            b.raw_recv_counts[p] = (int)b.info.recv_counts[p];
            b.raw_recv_displs[p] = (int)recv_off;
            send_off += b.info.send_counts[p];
            recv_off += b.info.recv_counts[p];
        }
        MPI_Type_contiguous(b.d * (int)sizeof(float), MPI_BYTE, &b.row);
        MPI_Type_commit(&b.row);
        peer_rows = b.info.send_rows - b.info.send_counts[rank];
        MPI_Allreduce(MPI_IN_PLACE, &peer_rows, 1, MPI_INT64_T, MPI_MAX, MPI_COMM_WORLD);

        for (m = 0; m < METHODS; ++m) samples[m] = (double*)malloc(sizeof(double) * (size_t)n);
        for (i = -10; i < n && !failed; ++i) {
            int k;
            for (k = 0; k < METHODS; ++k) {
                int method = (k + (i < 0 ? 0 : i)) % METHODS;
                double t0, dt;
                MPI_Barrier(MPI_COMM_WORLD);
                t0 = MPI_Wtime();
                if (!run_method(&b, method)) failed = 1;
                dt = MPI_Wtime() - t0;
                MPI_Allreduce(MPI_IN_PLACE, &dt, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
                MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
                if (failed) break;
                if (i >= 0) samples[method][i] = dt;
            }
        }
        /* the library's output equals the hand-written layer's, bit for bit */
        identical = !failed && memcmp(b.y, b.y_hand, sizeof(float) * (size_t)(b.T * b.d)) == 0;
        MPI_Allreduce(MPI_IN_PLACE, &identical, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
        if (!failed && !identical) {
            if (rank == 0) fprintf(stderr, "mpi_bench: the library's y differs from the hand-written layer's\n");
            failed = 1;
        }
        for (m = 0; m < METHODS && !failed; ++m) {
            qsort(samples[m], (size_t)n, sizeof(double), compare_double);
            median[m] = samples[m][n / 2] * 1e6;
        }
        if (rank == 0 && !failed)
            printf("%8lld %7d %11.1f %6d %10.1f %10.1f %10.1f %10.1f %9.3f %9.3f %9.3f\n", (long long)b.T, b.d,
                   (double)peer_rows * (double)b.d * 4.0 / 1024.0 / (R > 1 ? R - 1 : 1), n, median[0], median[1],
                   median[2], median[3], median[0] / median[2], median[1] / median[2], median[0] / median[3]);
        for (m = 0; m < METHODS; ++m) free(samples[m]);
        MPI_Type_free(&b.row);
        moe_ep_plan_destroy(b.plan);
        moe_ep_destroy(b.ctx);
        free(idx); free(weight); free(b.x); free(b.y); free(b.y_hand); free(b.recv); free(b.send); free(b.staged);
        free(b.raw_send_counts); free(b.raw_send_displs); free(b.raw_recv_counts); free(b.raw_recv_displs);
    }
    if (rank == 0 && !failed)
        printf("\nours = dispatch + combine (gather, exchange, agreement, exchange back, weighted sum); a2a = the two\n"
               "segmented exchanges alone; raw = MPI_Alltoallv there and back; hand = raw + the same gather and sum.\n"
               "KiB/peer: bytes one rank sends to one other rank (average over peers of the largest sender).\n");
    moe_ep_mpi_transport_destroy(&transport);
    MPI_Finalize();
    return failed;
}
