/* test_mpi.h -- what the MPI test programs share: the world-size guard, quiet
   collectives that agree on verdicts, and gathering rows to rank 0.

   Header only (static inline), included by MPI programs only, which define
   _POSIX_C_SOURCE 200112L first; plain C99, no Check. Verdict helpers are collective on the communicator given: every rank calls
   them in the same order, so that a failure on one rank never leaves the others waiting. */
#ifndef TEST_MPI_H_INCLUDED
#define TEST_MPI_H_INCLUDED

#include <mpi.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#if !defined(_POSIX_C_SOURCE) || _POSIX_C_SOURCE < 199309L
#error "test_mpi.h: define _POSIX_C_SOURCE 200112L before the first include (nanosleep)"
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* 1 if the job has the size the first argument names (and `required` processes, if
   required > 0); otherwise rank 0 says why and it returns 0. A launcher of another MPI
   starts N singletons: asserting the size is what catches it. */
static inline int test_mpi_world_size_ok(int argc, char** argv, const char* program, int required) {
    int rank, size, expected;
    char* end = NULL;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    expected = argc > 1 ? (int)strtol(argv[1], &end, 10) : -1;
    if (argc > 1 && *end == '\0' && expected == size && (required <= 0 || size == required)) return 1;
    if (rank == 0) {
        if (required > 0)
            fprintf(stderr, "%s: launched as %d process(es), expected %d (usage: mpirun -n %d %s %d; a launcher "
                            "of another MPI starts N singletons)\n", program, size, required, required, argv[0], required);
        else
            fprintf(stderr, "%s: launched as %d process(es), expected %s (usage: mpirun -n N %s N; a launcher of "
                            "another MPI starts N singletons)\n", program, size, argc > 1 ? argv[1] : "a size argument",
                    argv[0]);
    }
    return 0;
}

/* Waits without spinning: while rank 0 computes a reference, the others sleep instead
   of taking the cores from it (processes outnumber cores in these runs, and MPICH
   polls without yielding). */
static inline void test_mpi_quiet_wait(MPI_Request* request) {
    struct timespec pause = { 0, 200000 };
    int done = 0;
    for (;;) {
        MPI_Test(request, &done, MPI_STATUS_IGNORE);
        if (done) return;
        nanosleep(&pause, NULL);
    }
}

/* Every rank's verdict, agreed: 1 only if all ranks pass 1. */
static inline int test_mpi_all_ok(MPI_Comm comm, int ok) {
    int all = 0;
    MPI_Request request;
    MPI_Iallreduce(&ok, &all, 1, MPI_INT, MPI_MIN, comm, &request);
    test_mpi_quiet_wait(&request);
    return all;
}

/* The lowest rank on which a fact does not hold (holds == 0), or -1 if it holds on
   every rank. A fact only rank 0 can judge: the others pass holds = 1. */
static inline int test_mpi_first_failing(MPI_Comm comm, int holds) {
    int rank, mine, first = INT_MAX;
    MPI_Request request;
    MPI_Comm_rank(comm, &rank);
    mine = holds ? INT_MAX : rank;
    MPI_Iallreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm, &request);
    test_mpi_quiet_wait(&request);
    return first == INT_MAX ? -1 : first;
}

/* Every rank's `rows` rows of `row_floats` floats, in rank order, into `all` on rank 0
   (ignored elsewhere). Counts are in rows, a row type of row_floats floats, so that
   the element counts may pass INT_MAX. */
static inline void test_mpi_gather_rows(MPI_Comm comm, const float* mine, int64_t rows, int row_floats, float* all) {
    MPI_Datatype row;
    int rank, size, r, count = (int)rows;
    int *counts = NULL, *displs = NULL;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
    if (rank == 0) {
        counts = (int*)malloc(sizeof(int) * (size_t)size);
        displs = (int*)malloc(sizeof(int) * (size_t)size);
        if (!counts || !displs) {
            fprintf(stderr, "test_mpi_gather_rows: out of memory\n");
            MPI_Abort(MPI_COMM_WORLD, 3);
        }
    }
    MPI_Gather(&count, 1, MPI_INT, counts, 1, MPI_INT, 0, comm);
    if (rank == 0)
        for (r = 0; r < size; ++r) displs[r] = r == 0 ? 0 : displs[r - 1] + counts[r - 1];
    MPI_Type_contiguous(row_floats, MPI_FLOAT, &row);
    MPI_Type_commit(&row);
    MPI_Gatherv(mine, count, row, all, counts, displs, row, 0, comm);
    MPI_Type_free(&row);
    free(counts);
    free(displs);
}

#ifdef __cplusplus
}
#endif

#endif /* TEST_MPI_H_INCLUDED */
