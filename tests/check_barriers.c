/* check_barriers.c -- the pthreads transport's barriers, which poll before they sleep.

   On 2 ranks (so that a machine with 2 or more CPUs spins), with spin_count the default,
   1 (every wait sleeps after one poll), -1 (sleep at once) and MOE_EP_PTHREADS_SPIN_MAX:
   - 300 rounds of exchange_counts, all_reduce_sum and all_to_all_v on fresh random data,
     with one rank or the other late by a varying amount of work, deliver the values a
     plain reference computes (the sum in rank order, in float, bit for bit);
   - a rank that is 3 s late against a 1 s timeout makes the waiting rank return TIMEOUT
     within 2 s; an abort from a peer, and a peer that returns without entering, make the
     waiting rank return ABORTED;
   - spin_count above MOE_EP_PTHREADS_SPIN_MAX is refused, the out-param untouched. */
#include "check_moe_ep.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

#define B_R 2
#define B_ROUNDS 300
#define B_COUNT 5           /* exchange_counts words per peer */
#define B_FLOATS 37         /* all_reduce_sum elements */
#define B_D 3               /* floats per all_to_all_v row */
#define B_ROWS 4            /* the most rows a rank sends a peer */

static const int spin_cases[4] = { 0, 1, -1, MOE_EP_PTHREADS_SPIN_MAX };

/* a value in [-1, 1) for (round, rank, what, i): splitmix64 of the four */
static float b_value(int round, int rank, int what, int i) {
    uint64_t z = (uint64_t)round * 0x9E3779B97F4A7C15ull + (uint64_t)rank * 0xBF58476D1CE4E5B9ull +
                 (uint64_t)what * 0x94D049BB133111EBull + (uint64_t)i + 1;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)((double)(z >> 40) / (double)(1ull << 24) * 2.0 - 1.0);
}

/* rows rank q sends rank p in a round: 0 to B_ROWS */
static int64_t b_rows(int round, int q, int p) { return (int64_t)((round * 7 + q * 3 + p * 5) % (B_ROWS + 1)); }

typedef struct b_state {
    moe_ep_result result[B_R];
    long mismatches[B_R];
    char first[B_R][160];           /* the first mismatch */
} b_state;

static void b_miss(b_state* st, int me, const char* what, int round, int i) {
    if (st->mismatches[me]++ == 0)
        snprintf(st->first[me], sizeof st->first[me], "round %d: %s, element %d", round, what, i);
}

/* work that makes one rank late by 0 to ~0.2 ms, varying from round to round */
static volatile double b_sink[B_R];     /* the work's result per rank, so that it is done */

static void b_busy(int round, int me) {
    int k, n = (round + me) % 3 == 0 ? 20000 * (round % 5) : 0;
    for (k = 0; k < n; ++k) b_sink[me] = b_sink[me] + (double)k;
}

static moe_ep_result b_round(const moe_ep_transport* t, b_state* st, int round) {
    int me = t->rank, p, i;
    int64_t send_words[B_R * B_COUNT], recv_words[B_R * B_COUNT];
    int64_t counts[B_R], offsets[B_R], rcounts[B_R], roffsets[B_R], o = 0, ro = 0, r;
    float data[B_FLOATS], send[B_R * B_ROWS * B_D], recv[B_R * B_ROWS * B_D];
    moe_ep_a2a_args a;
    moe_ep_result res;
    char err[256] = "";
    b_busy(round, me);
    for (i = 0; i < B_R * B_COUNT; ++i) send_words[i] = (int64_t)(b_value(round, me, 0, i) * 1e6);
    res = t->exchange_counts(t->impl, send_words, recv_words, B_COUNT, err, sizeof err);
    if (res != MOE_EP_OK) return res;
    for (p = 0; p < B_R; ++p)
        for (i = 0; i < B_COUNT; ++i)
            if (recv_words[p * B_COUNT + i] != (int64_t)(b_value(round, p, 0, me * B_COUNT + i) * 1e6))
                b_miss(st, me, "exchange_counts", round, p * B_COUNT + i);
    b_busy(round + 1, me);
    for (i = 0; i < B_FLOATS; ++i) data[i] = b_value(round, me, 1, i);
    res = t->all_reduce_sum(t->impl, data, B_FLOATS, MOE_EP_MEMORY_HOST, NULL, err, sizeof err);
    if (res != MOE_EP_OK) return res;
    for (i = 0; i < B_FLOATS; ++i) {
        float sum = b_value(round, 0, 1, i);
        for (p = 1; p < B_R; ++p) sum += b_value(round, p, 1, i);
        if (memcmp(&sum, &data[i], sizeof sum) != 0) b_miss(st, me, "all_reduce_sum", round, i);
    }
    for (p = 0; p < B_R; ++p) {
        counts[p] = b_rows(round, me, p);
        offsets[p] = o;
        o += counts[p];
        rcounts[p] = b_rows(round, p, me);
        roffsets[p] = ro;
        ro += rcounts[p];
    }
    for (i = 0; i < (int)(o * B_D); ++i) send[i] = b_value(round, me, 2, i);
    test_poison(recv, B_R * B_ROWS * B_D);
    memset(&a, 0, sizeof a);
    a.send = send;
    a.recv = recv;
    a.row_bytes = sizeof(float) * B_D;
    a.segments = 1;
    a.send_counts = counts;
    a.send_offsets = offsets;
    a.recv_counts = rcounts;
    a.recv_offsets = roffsets;
    a.memory_space = MOE_EP_MEMORY_HOST;
    res = t->all_to_all_v(t->impl, &a, err, sizeof err);
    if (res != MOE_EP_OK) return res;
    for (p = 0; p < B_R; ++p) {
        int64_t first = 0;      /* where rank p's rows for me start in its send buffer */
        int q;
        for (q = 0; q < me; ++q) first += b_rows(round, p, q);
        for (r = 0; r < rcounts[p] * B_D; ++r) {
            float want = b_value(round, p, 2, (int)(first * B_D + r));
            if (memcmp(&want, &recv[roffsets[p] * B_D + r], sizeof want) != 0)
                b_miss(st, me, "all_to_all_v", round, (int)(roffsets[p] * B_D + r));
        }
    }
    if (!test_is_poisoned(recv + ro * B_D, (size_t)(B_R * B_ROWS * B_D - ro * B_D)))
        b_miss(st, me, "all_to_all_v wrote past its rows", round, (int)(ro * B_D));
    return MOE_EP_OK;
}

static moe_ep_result b_rank(const moe_ep_transport* t, void* user_data) {
    b_state* st = (b_state*)user_data;
    int round;
    moe_ep_result res = MOE_EP_OK;
    for (round = 0; round < B_ROUNDS && res == MOE_EP_OK; ++round) res = b_round(t, st, round);
    st->result[t->rank] = res;
    return res;
}

START_TEST(barriers_same_values) {
    b_state st;
    moe_ep_pthreads_world* world = NULL;
    int r;
    memset(&st, 0, sizeof st);
    ck_assert_int_eq(moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = B_R, .timeout_ms = 60000,
                                                                           .spin_count = spin_cases[_i] }, &world),
                     MOE_EP_OK);
    ck_assert_int_eq(moe_ep_pthreads_run(world, b_rank, &st, NULL), MOE_EP_OK);
    moe_ep_pthreads_world_destroy(world);
    for (r = 0; r < B_R; ++r) {
        ck_assert_msg(st.result[r] == MOE_EP_OK, "spin_count %d: rank %d returned %s", spin_cases[_i], r,
                      moe_ep_result_string(st.result[r]));
        ck_assert_msg(st.mismatches[r] == 0, "spin_count %d: rank %d received %ld wrong values, first %s",
                      spin_cases[_i], r, st.mismatches[r], st.first[r]);
    }
}
END_TEST

/* >>a late rank, an abort, an early return: the waiting rank 0 is told, spinning or not */
typedef struct b_fail_state {
    int mode;                       /* 0: rank 1 is 3 s late; 1: rank 1 aborts; 2: rank 1 returns at once */
    time_t start;
    long seconds[B_R];
    moe_ep_result result[B_R];
    char error[B_R][256];
} b_fail_state;

static moe_ep_result b_fail_rank(const moe_ep_transport* t, void* user_data) {
    b_fail_state* st = (b_fail_state*)user_data;
    int me = t->rank;
    if (me == 1) {
        volatile unsigned long spins = 0;
        if (st->mode == 2) return MOE_EP_OK;
        if (st->mode == 1) {
            while (spins < 2000000ul) spins++;      /* rank 0 is waiting by now, most likely */
            t->abort(t->impl);
        } else {
            while (time(NULL) - st->start < 3) spins++;   /* strict C99 has no sleep */
        }
    }
    st->result[me] = t->barrier(t->impl, st->error[me], sizeof st->error[me]);
    st->seconds[me] = (long)(time(NULL) - st->start);
    return st->result[me];
}

/* the late rank (3 s) with the default spin_count only; the abort and the early return with each */
static const int wait_cases[9][2] = { { 0, 0 }, { 1, 0 }, { 1, 1 }, { 1, 2 }, { 1, 3 }, { 2, 0 }, { 2, 1 }, { 2, 2 },
                                      { 2, 3 } };

START_TEST(barriers_waits_end) {
    static const char* const modes[3] = { "a late rank", "an abort", "an early return" };
    b_fail_state st;
    moe_ep_pthreads_world* world = NULL;
    int mode = wait_cases[_i][0], spin = spin_cases[wait_cases[_i][1]];
    memset(&st, 0, sizeof st);
    st.mode = mode;
    ck_assert_int_eq(moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = B_R,
                                                                           .timeout_ms = mode == 0 ? 1000 : 60000,
                                                                           .spin_count = spin }, &world),
                     MOE_EP_OK);
    st.start = time(NULL);
    moe_ep_pthreads_run(world, b_fail_rank, &st, NULL);
    moe_ep_pthreads_world_destroy(world);
    ck_assert_msg(st.result[0] == (mode == 0 ? MOE_EP_ERROR_TIMEOUT : MOE_EP_ERROR_ABORTED),
                  "%s, spin_count %d: the waiting rank got %s (%s)", modes[mode], spin,
                  moe_ep_result_string(st.result[0]), st.error[0]);
    if (mode == 0) {
        ck_assert_msg(st.seconds[0] <= 2, "spin_count %d: the waiting rank returned after %ld s, the timeout is 1 s",
                      spin, st.seconds[0]);
        ck_assert_msg(st.result[1] == MOE_EP_ERROR_ABORTED, "spin_count %d: the late rank got %s", spin,
                      moe_ep_result_string(st.result[1]));
    }
    if (mode == 2)
        ck_assert_msg(strstr(st.error[0], "returned early") != NULL, "spin_count %d: the waiting rank's error: %s",
                      spin, st.error[0]);
}
END_TEST

START_TEST(barriers_spin_count_checked) {
    static int poison;
    moe_ep_pthreads_world* world = (moe_ep_pthreads_world*)(void*)&poison;     /* must stay */
    moe_ep_pthreads_world* kept = world;
    ck_assert_int_eq(moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = 2,
                                                                           .spin_count = MOE_EP_PTHREADS_SPIN_MAX + 1 },
                                                  &world), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_ptr_eq(world, kept);
    ck_assert_int_eq(moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = 2, .spin_count = -7 }, &world),
                     MOE_EP_OK);
    moe_ep_pthreads_world_destroy(world);
}
END_TEST

Suite* barriers_suite(void) {
    Suite* s = suite_create("barriers");
    TCase* tc = tcase_create("pthreads");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, barriers_same_values, 0, 4);
    tcase_add_loop_test(tc, barriers_waits_end, 0, 9);
    tcase_add_test(tc, barriers_spin_count_checked);
    suite_add_tcase(s, tc);
    return s;
}
