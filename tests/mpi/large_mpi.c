/* large_mpi -- more than 2^31 bytes through the MPI transport, for real (about 2.3 GiB per
   process; not part of `make test`, run by `make check-mpi-large`).

       mpirun -n 2 ./large_mpi 2

   Rank 0 sends rank 1 one segment of 2.25 GiB (589824 rows of 4 KiB: an int count of
   rows, not of bytes) and one of 40 KiB that lies past 2 GiB in both buffers (an MPI_Aint
   displacement). The exchange runs three ways: the big segment as its own message and the
   small one in the collective (the default rule), everything point-to-point because the
   pair exceeds 2 GiB (no size rule), and the same split into messages of at most 2^28
   rows. Rank 1 checks every row, and that the gap between the segments is untouched. */
#define _POSIX_C_SOURCE 200112L
#define MOE_EP_IMPLEMENTATION
#include "../../transports/moe_ep_mpi.h"
#include "../support/test_mpi.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ROW 4096

static unsigned char row_mark(int64_t row, int end) { return (unsigned char)(end ? row * 3 + 1 : row * 7 + 5); }

int main(int argc, char** argv) {
    const int64_t big = (int64_t)9 << 16, small = 10, gap = 7;   /* 2.25 GiB and 40 KiB */
    int rank, mode, failed = 0;
    int64_t send_counts[4] = { 0 }, send_offsets[4] = { 0 }, recv_counts[4] = { 0 }, recv_offsets[4] = { 0 };
    size_t bytes = (size_t)(big + gap + small) * ROW;
    unsigned char *buffer, *other;    /* rank 0 sends from buffer, rank 1 receives into it */
    moe_ep_transport t;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (!test_mpi_world_size_ok(argc, argv, "large_mpi", 2)) {
        MPI_Finalize();
        return 2;
    }
    buffer = (unsigned char*)malloc(bytes);
    other = (unsigned char*)malloc(16);    /* MPI forbids one buffer for both directions */
    if (!buffer || !other || moe_ep_mpi_transport_create(&(moe_ep_mpi_desc){ .comm = MPI_COMM_WORLD }, &t) != MOE_EP_OK) {
        fprintf(stderr, "large_mpi: rank %d: no memory or no transport\n", rank);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    /* segment 0: big, segment 1: small; both past each other with a gap between */
    if (rank == 0) {
        send_counts[2] = big; send_offsets[2] = 0;
        send_counts[3] = small; send_offsets[3] = big + gap;
    } else {
        recv_counts[0] = big; recv_offsets[0] = 0;
        recv_counts[1] = small; recv_offsets[1] = big + gap;
    }
    for (mode = 0; mode < 3; ++mode) {
        moe_ep__mpi_impl* m = (moe_ep__mpi_impl*)t.impl;
        moe_ep_a2a_args a;
        char err[512] = "";
        double t0;
        int64_t r;
        int ok;
        moe_ep_result res;
        m->rule.direct_bytes = mode == 0 ? 65536 : 0;
        m->rule.chunk_rows = mode == 2 ? (int64_t)1 << 28 : INT_MAX;
        if (rank == 0) {
            for (r = 0; r < big + gap + small; ++r) {
                buffer[(size_t)r * ROW] = row_mark(r, 0);
                buffer[(size_t)r * ROW + ROW - 1] = row_mark(r, 1);
            }
        } else {
            memset(buffer, 0xEE, bytes);
        }
        memset(&a, 0, sizeof a);
        a.send = rank == 0 ? buffer : other;
        a.recv = rank == 0 ? other : buffer;
        a.row_bytes = ROW; a.segments = 2;
        a.send_counts = send_counts; a.send_offsets = send_offsets;
        a.recv_counts = recv_counts; a.recv_offsets = recv_offsets;
        MPI_Barrier(MPI_COMM_WORLD);
        t0 = MPI_Wtime();
        res = t.all_to_all_v(t.impl, &a, err, sizeof err);
        ok = res == MOE_EP_OK;
        for (r = 0; rank == 1 && ok && r < big + gap + small; ++r) {
            int in_gap = r >= big && r < big + gap;
            const unsigned char* row = buffer + (size_t)r * ROW;
            ok = in_gap ? row[0] == 0xEE && row[ROW - 1] == 0xEE : row[0] == row_mark(r, 0) && row[ROW - 1] == row_mark(r, 1);
            if (!ok) fprintf(stderr, "large_mpi: mode %d: row %lld is wrong\n", mode, (long long)r);
        }
        if (rank == 1)
            printf("large_mpi: mode %d (%s): %s in %.2f s, %s %s\n", mode,
                   mode == 0 ? "big segment direct, small in the collective" :
                   mode == 1 ? "the pair exceeds 2 GiB: all point-to-point" : "point-to-point in 2^28-row messages",
                   moe_ep_result_string(res), MPI_Wtime() - t0, ok ? "every row right" : "WRONG", err);
        failed |= !test_mpi_all_ok(MPI_COMM_WORLD, ok);
    }
    moe_ep_mpi_transport_destroy(&t);
    free(buffer);
    free(other);
    MPI_Finalize();
    return failed;
}
