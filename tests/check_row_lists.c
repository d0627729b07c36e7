/* check_row_lists.c -- the pthreads transport's row lists (moe_ep_a2a_args.send_rows).

   On 3 ranks, 2 segments per peer, with counts that include empty segments and row lists
   that repeat rows (a token sent to two experts) and leave some out:
   - an exchange handed a row list (blocking and split-phase) delivers the bytes of the
     same exchange handed the rows packed by hand, and both are the rows the list names;
     receive buffers are poisoned, one row past the end must stay poisoned;
   - an exchange handed recv_fn (with and without a row list on the send side) hands over
     every received row where the packed exchange puts it, and calls recv_done_fn once,
     after the last;
   - a row index outside [0, send_buffer_rows) fails that rank with INVALID_ARGUMENT and
     an error that names send_rows and the bound, the peers' exchange with ABORTED, no
     receive buffer is written, and the next exchange works (the ranks stay in step).
   The layer built on it (row lists used against declined) is in check_layer.c. */
#include "check_moe_ep.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define RL_R 3
#define RL_S 2
#define RL_D 5
#define RL_N 11            /* rows in each rank's send buffer */

/* Rows rank q sends to rank p in segment s: 0 to 3, some segments empty. */
static int64_t rl_count(int q, int p, int s) { return (int64_t)((q * 5 + p * 3 + s * 2) % 4); }

typedef struct rl_state {
    float src[RL_R][RL_N * RL_D];
    int64_t rows[RL_R][RL_R * RL_S * 3];   /* each rank's row list in send order */
    int64_t sent[RL_R];                    /* its length */
    float* recv[RL_R][5];                  /* 0: packed, 1: row list, 2: row list, split-phase,
                                              3: recv_fn, 4: recv_fn from a row list */
    int done_calls[RL_R][5];               /* recv_done_fn calls, and rows handed over before the first */
    int64_t rows_before_done[RL_R][5];
    int64_t received[RL_R];
    int bad_rank;                          /* -1: every index good */
    int64_t bad_value;
    moe_ep_result result[RL_R][5];
    moe_ep_result after[RL_R];             /* the good exchange after a bad one */
    char error[RL_R][256];
} rl_state;

static void rl_args(int rank, int64_t* counts, int64_t* offsets, int64_t* rcounts,
                    int64_t* roffsets, moe_ep_a2a_args* a) {
    int p, s;
    int64_t o = 0, ro = 0;
    for (p = 0; p < RL_R; ++p)
        for (s = 0; s < RL_S; ++s) {
            counts[p * RL_S + s] = rl_count(rank, p, s);
            offsets[p * RL_S + s] = o;
            o += counts[p * RL_S + s];
            rcounts[p * RL_S + s] = rl_count(p, rank, s);
            roffsets[p * RL_S + s] = ro;
            ro += rcounts[p * RL_S + s];
        }
    memset(a, 0, sizeof *a);
    a->row_bytes = sizeof(float) * RL_D;
    a->segments = RL_S;
    a->send_counts = counts;
    a->send_offsets = offsets;
    a->recv_counts = rcounts;
    a->recv_offsets = roffsets;
    a->memory_space = MOE_EP_MEMORY_HOST;
}

/* recv_fn's user data: one rank's exchange v, copying each handed-over row into place */
typedef struct rl_taker {
    rl_state* st;
    int rank, v;
    int64_t rows;
} rl_taker;

static void rl_take(void* user, int64_t first, const void* src, int64_t rows) {
    rl_taker* k = (rl_taker*)user;
    memcpy(k->st->recv[k->rank][k->v] + first * RL_D, src, sizeof(float) * RL_D * (size_t)rows);
    k->rows += rows;
}

static void rl_done(void* user) {
    rl_taker* k = (rl_taker*)user;
    if (k->st->done_calls[k->rank][k->v]++ == 0) k->st->rows_before_done[k->rank][k->v] = k->rows;
}

static moe_ep_result rl_rank(const moe_ep_transport* t, void* user_data) {
    rl_state* st = (rl_state*)user_data;
    int me = t->rank, v;
    int64_t counts[RL_R * RL_S], offsets[RL_R * RL_S], rcounts[RL_R * RL_S], roffsets[RL_R * RL_S], r;
    float packed[RL_R * RL_S * 3 * RL_D];
    moe_ep_a2a_args a;
    rl_args(me, counts, offsets, rcounts, roffsets, &a);
    memset(packed, 0, sizeof packed);
    for (r = 0; r < st->sent[me]; ++r)      /* packed by hand (a bad index packs nothing) */
        if (st->rows[me][r] >= 0 && st->rows[me][r] < RL_N)
            memcpy(packed + r * RL_D, st->src[me] + st->rows[me][r] * RL_D, sizeof(float) * RL_D);
    /* a bad index: only the blocking exchange with the row list, then a good one */
    for (v = st->bad_rank >= 0 ? 1 : 0; v < (st->bad_rank >= 0 ? 2 : 5); ++v) {
        void* request = NULL;
        rl_taker taker;
        taker.st = st;
        taker.rank = me;
        taker.v = v;
        taker.rows = 0;
        a.recv = v >= 3 ? NULL : st->recv[me][v];     /* recv_fn: recv unused */
        a.send = v == 0 || v == 3 ? (const void*)packed : (const void*)st->src[me];
        a.send_rows = v == 0 || v == 3 ? NULL : st->rows[me];
        a.send_buffer_rows = v == 0 || v == 3 ? 0 : RL_N;
        a.recv_fn = v >= 3 ? rl_take : NULL;
        a.recv_done_fn = v >= 3 ? rl_done : NULL;
        a.recv_user = &taker;
        if (v != 2) {
            st->result[me][v] = t->all_to_all_v(t->impl, &a, st->error[me], sizeof st->error[me]);
        } else {
            st->result[me][v] = t->all_to_all_v_begin(t->impl, &a, &request, st->error[me], sizeof st->error[me]);
            if (st->result[me][v] == MOE_EP_OK)
                st->result[me][v] = t->all_to_all_v_end(t->impl, request, st->error[me], sizeof st->error[me]);
        }
    }
    if (st->bad_rank >= 0) {
        char err[256] = "";
        a.recv = st->recv[me][0];
        a.send = packed;
        a.send_rows = NULL;
        st->after[me] = t->all_to_all_v(t->impl, &a, err, sizeof err);
    }
    return MOE_EP_OK;
}

/* Row lists that repeat rows and skip some; the bad rank's list gets bad_value in its
   last row. */
static void rl_init(rl_state* st, int bad_rank, int64_t bad_value) {
    uint64_t seed = 77;
    int q, p, s, v;
    memset(st, 0, sizeof *st);
    st->bad_rank = bad_rank;
    st->bad_value = bad_value;
    for (q = 0; q < RL_R; ++q) {
        test_fill(st->src[q], RL_N * RL_D, 1.0f, &seed);
        for (p = 0; p < RL_R; ++p)
            for (s = 0; s < RL_S; ++s) {
                int64_t i;
                for (i = 0; i < rl_count(q, p, s); ++i) st->rows[q][st->sent[q]++] = (int64_t)(test_rng_next(&seed) % 7);
                st->received[q] += rl_count(p, q, s);
            }
        if (q == bad_rank) st->rows[q][st->sent[q] - 1] = bad_value;
        for (v = 0; v < 5; ++v) {
            st->recv[q][v] = (float*)malloc(sizeof(float) * (size_t)(st->received[q] + 1) * RL_D);
            test_poison(st->recv[q][v], (size_t)(st->received[q] + 1) * RL_D);
        }
    }
}

static void rl_free(rl_state* st) {
    int q, v;
    for (q = 0; q < RL_R; ++q)
        for (v = 0; v < 5; ++v) free(st->recv[q][v]);
}

static moe_ep_result rl_run(rl_state* st) {
    moe_ep_pthreads_world* world = NULL;
    moe_ep_result res = moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = RL_R, .timeout_ms = 60000 },
                                                     &world);
    if (res != MOE_EP_OK) return res;
    res = moe_ep_pthreads_run(world, rl_rank, st, NULL);
    moe_ep_pthreads_world_destroy(world);
    return res;
}

START_TEST(row_lists_same_bytes) {
    rl_state* st = (rl_state*)malloc(sizeof *st);
    int q, p, s, v;
    rl_init(st, -1, 0);
    ck_assert_int_eq(rl_run(st), MOE_EP_OK);
    for (q = 0; q < RL_R; ++q) {
        int64_t at = 0;
        for (v = 0; v < 5; ++v)
            ck_assert_msg(st->result[q][v] == MOE_EP_OK, "rank %d, exchange %d: %s (%s)", q, v,
                          moe_ep_result_string(st->result[q][v]), st->error[q]);
        for (v = 3; v < 5; ++v) {
            ck_assert_msg(memcmp(st->recv[q][0], st->recv[q][v], sizeof(float) * (size_t)st->received[q] * RL_D) == 0,
                          "rank %d: recv_fn (exchange %d) was handed other rows than the packed exchange delivers", q,
                          v);
            ck_assert_msg(st->done_calls[q][v] == 1 && st->rows_before_done[q][v] == st->received[q],
                          "rank %d, exchange %d: recv_done_fn called %d times, after %lld of %lld rows", q, v,
                          st->done_calls[q][v], (long long)st->rows_before_done[q][v], (long long)st->received[q]);
        }
        ck_assert_msg(memcmp(st->recv[q][0], st->recv[q][1], sizeof(float) * (size_t)st->received[q] * RL_D) == 0,
                      "rank %d: the row list delivered other bytes than the packed rows", q);
        ck_assert_msg(memcmp(st->recv[q][0], st->recv[q][2], sizeof(float) * (size_t)st->received[q] * RL_D) == 0,
                      "rank %d: the split-phase row list delivered other bytes than the packed rows", q);
        for (v = 0; v < 5; ++v)
            ck_assert_msg(test_is_poisoned(st->recv[q][v] + st->received[q] * RL_D, RL_D),
                          "rank %d, exchange %d: wrote past the received rows", q, v);
        /* and they are the rows the senders' lists name: from rank p, segment s, in order */
        for (s = 0; s < RL_S; ++s)
            for (p = 0; p < RL_R; ++p) {
                int64_t first = 0, i;
                int pp, ss;
                for (pp = 0; pp < RL_R; ++pp)
                    for (ss = 0; ss < RL_S; ++ss)
                        if (pp * RL_S + ss < q * RL_S + s) first += rl_count(p, pp, ss);
                for (i = 0; i < rl_count(p, q, s); ++i) {
                    /* the receive side is ordered (peer, segment) as rl_args lays it out */
                    int64_t rat = 0, sat = first + i;
                    int qq, s2;
                    for (qq = 0; qq < RL_R; ++qq)
                        for (s2 = 0; s2 < RL_S; ++s2)
                            if (qq * RL_S + s2 < p * RL_S + s) rat += rl_count(qq, q, s2);
                    rat += i;
                    ck_assert_msg(memcmp(st->recv[q][1] + rat * RL_D, st->src[p] + st->rows[p][sat] * RL_D,
                                         sizeof(float) * RL_D) == 0,
                                  "rank %d: row %lld from rank %d is not that rank's row %lld", q, (long long)rat, p,
                                  (long long)st->rows[p][sat]);
                    ++at;
                }
            }
        ck_assert_int_eq(at, st->received[q]);
    }
    rl_free(st);
    free(st);
}
END_TEST

START_TEST(row_lists_bad_index) {
    static const int64_t bad[2] = { RL_N, -1 };
    rl_state* st = (rl_state*)malloc(sizeof *st);
    char want[64];
    int q;
    rl_init(st, 1, bad[_i]);
    ck_assert_int_eq(rl_run(st), MOE_EP_OK);
    snprintf(want, sizeof want, "is %lld", (long long)bad[_i]);
    for (q = 0; q < RL_R; ++q) {
        if (q == 1) {
            ck_assert_msg(st->result[q][1] == MOE_EP_ERROR_INVALID_ARGUMENT, "bad index %lld: the rank returned %s",
                          (long long)bad[_i], moe_ep_result_string(st->result[q][1]));
            ck_assert_msg(strstr(st->error[q], "send_rows[") && strstr(st->error[q], want) &&
                              strstr(st->error[q], "send_buffer_rows = 11"),
                          "bad index %lld: the error '%s' does not name send_rows, the index and the bound",
                          (long long)bad[_i], st->error[q]);
        } else {
            ck_assert_msg(st->result[q][1] == MOE_EP_ERROR_ABORTED, "bad index on rank 1: rank %d returned %s (%s)",
                          q, moe_ep_result_string(st->result[q][1]), st->error[q]);
        }
        ck_assert_msg(test_is_poisoned(st->recv[q][1], (size_t)(st->received[q] + 1) * RL_D),
                      "bad index %lld: rank %d's receive rows were written", (long long)bad[_i], q);
        ck_assert_msg(st->after[q] == MOE_EP_OK, "bad index %lld: rank %d's next exchange returned %s",
                      (long long)bad[_i], q, moe_ep_result_string(st->after[q]));
    }
    rl_free(st);
    free(st);
}
END_TEST

Suite* row_lists_suite(void) {
    Suite* s = suite_create("row_lists");
    TCase* tc = tcase_create("pthreads");
    tcase_add_test(tc, row_lists_same_bytes);
    tcase_add_loop_test(tc, row_lists_bad_index, 0, 2);
    suite_add_tcase(s, tc);
    return s;
}
