/* check_nccl -- the NCCL transport alone (transports/moe_ep_nccl.h): no CUDA file, no cuBLAS.

   One process, one thread per GPU (ncclCommInitAll). For each world size 1, 2, 4, 8 that
   this machine has GPUs for (one Check loop test each, one assertion per subtest:
   tests/gpu/gpu_check.h):
   - the world transport: exchange_counts (and barrier), and the segmented all_to_all_v
     on device and host memory, blocking and split-phase: every row lands where the
     contract says, nothing else is written; the core's CPU layer over it (host rows)
     equals the single-rank CPU layer bitwise;
   - every layout (EP x TP x DP) of that size, split from the world transport with
     moe_ep_layout_split:
     - groups: each group's rank and size are moe_ep_layout_group's, and an exchange
       inside it reaches exactly the ranks that the layout names, in that order;
     - all_reduce_sum on the world, EP, TP and DP transports, device and host memory, odd
       and large counts, values over 40 binary orders of magnitude (so the order of the
       additions shows): bitwise equal to the sum in group-rank order made on the host,
       and nothing past count is written;
     - the core's CPU layer (moe_ep_forward, host rows, .transport = EP group,
       .tp_transport = TP group) against one rank that holds every expert: bitwise
       without TP; with TP within 1e-6 relative, and bitwise equal on every rank of a TP
       group;
   - last in each world: a split with a negative color on the last rank fails on every
     rank, and the world still works after it.
   A failed subtest stops its suite on every rank; after a timeout aborted a world
   communicator, the rest of that world size is reported as not run.
   MOE_EP_TEST_PROGRESS=1 (or 2: every rank) prints each step as it starts.
   Without a GPU it prints "check_nccl: no GPU, skipped" and exits 77 (--require-gpu or
   MOE_EP_REQUIRE_GPU=1: exits 1). --max-gpus N. Run with CK_FORK=no. */
#define MOE_EP_IMPLEMENTATION
#include "../../transports/moe_ep_nccl.h"

#include "../support/test_support.h"
#include "gpu_check.h"
#include "gpu_layout_suite.h"

#define PROGRAM "check_nccl"

/* A bad color on the last rank: every rank fails, nobody waits, the world works on. Its
   own suite, last in a world, so that a failure here hides none of the layouts. */
static void bad_split_suite(rank_env* env) {
    moe_ep_transport bad;
    char err[256] = "";
    moe_ep_result res;
    env->sub = 0;
    progress(env, "split with a bad color");
    memset(&bad, 0, sizeof bad);
    res = env->transport.split(env->transport.impl, env->rank == env->world - 1 ? -1 : 0, env->rank, &bad, err, sizeof err);
    if (res == MOE_EP_OK) {
        rank_fail(env, "split with a negative color on rank %d succeeded here", env->world - 1);
        moe_ep_nccl_transport_destroy(&bad);
    }
    progress(env, "barrier");
    if (env->transport.barrier(env->transport.impl, err, sizeof err) != MOE_EP_OK) rank_fail(env, "barrier after the bad split: %s", err);
    note(env, "rank 0: %s", moe_ep_result_string(res));
    checkpoint(env);
}

/* >>all-reduce */
static float contribution(int world_rank, int64_t i) {
    uint64_t s = 0x1234567ull + (uint64_t)world_rank * 1000003ull + (uint64_t)i * 7919ull;
    uint64_t h = test_rng_next(&s);
    float u = (float)(h >> 40) / 8388608.0f - 1.0f;
    return ldexpf(u, (int)((h >> 8) % 41) - 20);
}

static void reduce_one(rank_env* env, const moe_ep_transport* t, const int* members, int64_t count, const char* name,
                       int* order_matters) {
    size_t bytes = (size_t)count * sizeof(float), pad = 16 * sizeof(float);
    float* expect = (float*)malloc(bytes + 4);
    float* data = (float*)malloc(bytes + pad);
    float* got = (float*)malloc(bytes + pad);
    void* dev = NULL;
    char err[256] = "";
    int64_t i;
    int q, space;
    for (i = 0; i < count; ++i) {
        float sum = contribution(members[0], i), back = contribution(members[t->world_size - 1], i);
        for (q = 1; q < t->world_size; ++q) sum += contribution(members[q], i);
        for (q = t->world_size - 2; q >= 0; --q) back += contribution(members[q], i);
        expect[i] = sum;
        if (back != sum) *order_matters += 1;
    }
    for (space = 0; space < 2; ++space) {
        moe_ep_result res;
        for (i = 0; i < count; ++i) data[i] = contribution(env->rank, i);
        for (i = 0; i < 16; ++i) data[count + i] = 12345.0f;
        if (space == 0) {
            if (cudaMalloc(&dev, bytes + pad) != cudaSuccess ||
                cudaMemcpy(dev, data, bytes + pad, cudaMemcpyHostToDevice) != cudaSuccess) {
                rank_fail(env, "cudaMalloc/cudaMemcpy");
            }
            res = t->all_reduce_sum(t->impl, (float*)dev, count, MOE_EP_MEMORY_DEVICE, env->stream, err, sizeof err);
            if (cudaStreamSynchronize(env->stream) != cudaSuccess ||
                cudaMemcpy(got, dev, bytes + pad, cudaMemcpyDeviceToHost) != cudaSuccess)
                rank_fail(env, "cudaMemcpy back");
            cudaFree(dev);
        } else {
            res = t->all_reduce_sum(t->impl, data, count, MOE_EP_MEMORY_HOST, NULL, err, sizeof err);
            memcpy(got, data, bytes + pad);
        }
        if (res != MOE_EP_OK) {
            rank_fail(env, "%s all_reduce_sum (%s, %lld): %s: %s", name, space ? "host" : "device", (long long)count,
                 moe_ep_result_string(res), err);
            continue;
        }
        if (memcmp(got, expect, bytes) != 0) {
            for (i = 0; i < count && got[i] == expect[i]; ++i) {}
            rank_fail(env, "%s all_reduce_sum (%s, %lld): element %lld is %.9g, rank order gives %.9g", name,
                 space ? "host" : "device", (long long)count, (long long)i, got[i], expect[i]);
        }
        for (i = 0; i < 16; ++i)
            if (got[count + i] != 12345.0f) {
                rank_fail(env, "%s all_reduce_sum (%s, %lld) wrote past count", name, space ? "host" : "device", (long long)count);
                break;
            }
    }
    free(expect); free(data); free(got);
}

static void test_all_reduce(rank_env* env, groups* g) {
    suite* su = (suite*)env->suite;
    const moe_ep_layout_desc* l = &su->layout;
    static const int64_t counts[] = { 0, 1, 7, 1000, (3 << 18) + 1 };
    int c, k, order_matters = 0;
    int everyone[MAX_GPUS];
    for (k = 0; k < env->world; ++k) everyone[k] = k;
    for (c = 0; c < (int)(sizeof counts / sizeof counts[0]); ++c) {
        int members[MAX_GPUS];
        reduce_one(env, &env->transport, everyone, counts[c], "world", &order_matters);
        moe_ep_layout_group(l, env->rank, MOE_EP_GROUP_EP, members, MAX_GPUS);
        reduce_one(env, &g->ep, members, counts[c], "EP", &order_matters);
        moe_ep_layout_group(l, env->rank, MOE_EP_GROUP_TP, members, MAX_GPUS);
        reduce_one(env, &g->tp, members, counts[c], "TP", &order_matters);
        moe_ep_layout_group(l, env->rank, MOE_EP_GROUP_DP, members, MAX_GPUS);
        reduce_one(env, &g->dp, members, counts[c], "DP", &order_matters);
    }
    note(env, "%d sums here would round differently in reverse rank order", order_matters);
}

/* >>core CPU layer over the groups (host rows through NCCL) */
static void test_core(rank_env* env, groups* g) {
    suite* su = (suite*)env->suite;
    const moe_ep_layout_desc* l = &su->layout;
    int shard = shard_of(l, env->rank), T = shard_tokens(shard), experts[E_ALL], n, i;
    model m;
    moe_ep_expert_weights mine[E_ALL];
    moe_ep_context* ctx = NULL;
    float *x, *y, *ref;
    int32_t idx[128 * TOP_K];
    float w[128 * TOP_K];
    size_t count;
    moe_ep_result res;
    model_make(&m, 40, 56, 0, 901);
    count = (size_t)T * (size_t)m.d;
    x = shard_x(&m, shard, T);
    y = (float*)malloc(sizeof(float) * (count + 1));
    ref = (float*)malloc(sizeof(float) * (count + 1));
    n = moe_ep_layout_experts(l, env->rank, experts, E_ALL);
    for (i = 0; i < n; ++i) mine[i] = m.all[experts[i]];
    res = moe_ep_create(&(moe_ep_desc){ .d_model = m.d, .d_ff = m.ff, .num_experts = E_ALL, .top_k = TOP_K,
                                        .router_weight = m.router, .experts = mine, .experts_count = n,
                                        .num_threads = 1, .transport = &g->ep, .tp_transport = l->tp_size > 1 ? &g->tp : NULL }, &ctx);
    if (res != MOE_EP_OK) {
        rank_fail(env, "moe_ep_create over the groups: %s", moe_ep_result_string(res));
    } else {
        memset(y, 0xFF, sizeof(float) * count);
        res = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = T, .x = x, .y = y, .topk_idx = idx, .topk_weight = w });
        if (res != MOE_EP_OK) {
            rank_fail(env, "moe_ep_forward: %s (%s)", moe_ep_result_string(res), moe_ep_last_error(ctx));
        } else if (cpu_reference(&m, T, x, idx, w, ref) != MOE_EP_OK) {
            rank_fail(env, "CPU reference failed");
        } else if (l->tp_size == 1) {
            if (memcmp(y, ref, sizeof(float) * count) != 0) rank_fail(env, "not bitwise equal to one rank");
            note(env, "bitwise equal to one rank");
        } else {
            double err = rel_error(y, ref, count);
            if (!(err <= 1e-6)) rank_fail(env, "relative error %.3g > 1e-6", err);
            note(env, "rel.err %.2e", err);
        }
        keep(env, y, sizeof(float) * count);
    }
    moe_ep_destroy(ctx);
    model_free(&m);
    free(x); free(y); free(ref);
}

/* >>the world transport: counts, rows, the core's layer */
#define CHECK_CUDA(env, call) do { cudaError_t e_ = (call); \
    if (e_ != cudaSuccess) { rank_fail(env, "%s:%d %s: %s", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); return; } } while (0)

typedef struct a2a_case {
    int segments, row_bytes, host, split;
    uint64_t seed;
} a2a_case;

static const a2a_case g_a2a_cases[] = {
    { 1, 64, 0, 0, 11 }, { 3, 12, 0, 0, 12 }, { 4, 6, 0, 1, 13 }, { 2, 40, 1, 0, 14 }, { 5, 2, 1, 1, 15 },
};
#define A2A_CASES ((int)(sizeof g_a2a_cases / sizeof g_a2a_cases[0]))

static int64_t seg_rows(uint64_t seed, int src, int dst, int seg) {
    uint64_t s = seed ^ ((uint64_t)src << 40) ^ ((uint64_t)dst << 20) ^ (uint64_t)seg;
    return (int64_t)(test_rng_next(&s) % 7);  /* 0..6 rows, zeros included */
}

static unsigned char cell(int src, int dst, int seg, int64_t row, int byte) {
    return (unsigned char)(src * 131 + dst * 31 + seg * 17 + row * 7 + byte * 3 + 1);
}

static void test_counts(rank_env* env) {
    int R = env->world, q, i, count = 5;
    int64_t* send = (int64_t*)calloc((size_t)(R * count) + 1, sizeof(int64_t));
    int64_t* recv = (int64_t*)calloc((size_t)(R * count) + 1, sizeof(int64_t));
    char err[256] = "";
    if (!send || !recv) { rank_fail(env, "out of memory"); free(send); free(recv); return; }
    for (q = 0; q < R; ++q)
        for (i = 0; i < count; ++i) send[q * count + i] = (int64_t)env->rank * 1000003 + q * 1009 + i - 77;
    for (i = 0; i < R * count; ++i) recv[i] = -123456789;
    if (env->transport.exchange_counts(env->transport.impl, send, recv, count, err, sizeof err) != MOE_EP_OK)
        rank_fail(env, "exchange_counts: %s", err);
    for (q = 0; q < R && !env->failed[env->sub]; ++q)
        for (i = 0; i < count; ++i)
            if (recv[q * count + i] != (int64_t)q * 1000003 + env->rank * 1009 + i - 77) {
                rank_fail(env, "exchange_counts: value %d from rank %d is %lld", i, q, (long long)recv[q * count + i]);
                break;
            }
    if (!env->failed[env->sub] && env->transport.barrier(env->transport.impl, err, sizeof err) != MOE_EP_OK)
        rank_fail(env, "barrier: %s", err);
    free(send);
    free(recv);
}

/* Send rows in (peer, segment) order with a gap of one row between blocks; receive rows in
   (segment, peer) order, also with gaps that must stay untouched. */
static void test_a2a(rank_env* env, const a2a_case* c) {
    int R = env->world, S = c->segments, me = env->rank, p, s, b;
    size_t rb = (size_t)c->row_bytes;
    int64_t* sc = (int64_t*)calloc((size_t)(R * S), 8);
    int64_t* so = (int64_t*)calloc((size_t)(R * S), 8);
    int64_t* rc = (int64_t*)calloc((size_t)(R * S), 8);
    int64_t* ro = (int64_t*)calloc((size_t)(R * S), 8);
    int64_t send_rows = 0, recv_rows = 0, r;
    unsigned char *send, *recv, *expect;
    void *dsend = NULL, *drecv = NULL;
    moe_ep_a2a_args args;
    char err[256] = "";
    moe_ep_result res;
    for (p = 0; p < R; ++p)
        for (s = 0; s < S; ++s) {
            sc[p * S + s] = seg_rows(c->seed, me, p, s);
            so[p * S + s] = send_rows;
            send_rows += sc[p * S + s] + 1;
        }
    for (s = 0; s < S; ++s)
        for (p = 0; p < R; ++p) {
            rc[p * S + s] = seg_rows(c->seed, p, me, s);
            ro[p * S + s] = recv_rows;
            recv_rows += rc[p * S + s] + 1;
        }
    send = (unsigned char*)malloc((size_t)send_rows * rb + 1);
    recv = (unsigned char*)malloc((size_t)recv_rows * rb + 1);
    expect = (unsigned char*)malloc((size_t)recv_rows * rb + 1);
    memset(send, 0xEE, (size_t)send_rows * rb);
    memset(recv, 0xA5, (size_t)recv_rows * rb);
    memset(expect, 0xA5, (size_t)recv_rows * rb);
    for (p = 0; p < R; ++p)
        for (s = 0; s < S; ++s)
            for (r = 0; r < sc[p * S + s]; ++r)
                for (b = 0; b < (int)rb; ++b) send[(size_t)(so[p * S + s] + r) * rb + (size_t)b] = cell(me, p, s, r, b);
    for (p = 0; p < R; ++p)
        for (s = 0; s < S; ++s)
            for (r = 0; r < rc[p * S + s]; ++r)
                for (b = 0; b < (int)rb; ++b) expect[(size_t)(ro[p * S + s] + r) * rb + (size_t)b] = cell(p, me, s, r, b);
    memset(&args, 0, sizeof args);
    args.row_bytes = rb;
    args.segments = S;
    args.send_counts = sc;
    args.send_offsets = so;
    args.recv_counts = rc;
    args.recv_offsets = ro;
    if (c->host) {
        args.send = send;
        args.recv = recv;
        args.memory_space = MOE_EP_MEMORY_HOST;
    } else {
        CHECK_CUDA(env, cudaMalloc(&dsend, (size_t)send_rows * rb + 1));
        CHECK_CUDA(env, cudaMalloc(&drecv, (size_t)recv_rows * rb + 1));
        CHECK_CUDA(env, cudaMemcpy(dsend, send, (size_t)send_rows * rb, cudaMemcpyHostToDevice));
        CHECK_CUDA(env, cudaMemcpy(drecv, recv, (size_t)recv_rows * rb, cudaMemcpyHostToDevice));
        args.send = dsend;
        args.recv = drecv;
        args.memory_space = MOE_EP_MEMORY_DEVICE;
        args.stream = env->stream;
    }
    if (c->split) {
        void* request = NULL;
        res = env->transport.all_to_all_v_begin(env->transport.impl, &args, &request, err, sizeof err);
        if (res == MOE_EP_OK) res = env->transport.all_to_all_v_end(env->transport.impl, request, err, sizeof err);
    } else {
        res = env->transport.all_to_all_v(env->transport.impl, &args, err, sizeof err);
    }
    if (res != MOE_EP_OK) rank_fail(env, "all_to_all_v: %s: %s", moe_ep_result_string(res), err);
    if (!c->host) {
        CHECK_CUDA(env, cudaStreamSynchronize(env->stream));
        CHECK_CUDA(env, cudaMemcpy(recv, drecv, (size_t)recv_rows * rb, cudaMemcpyDeviceToHost));
        cudaFree(dsend);
        cudaFree(drecv);
    }
    if (!env->failed[env->sub] && memcmp(recv, expect, (size_t)recv_rows * rb) != 0) {
        size_t i = 0;
        while (recv[i] == expect[i]) ++i;
        rank_fail(env, "received rows differ at byte %zu (row %zu)", i, i / rb);
    }
    free(send); free(recv); free(expect); free(sc); free(so); free(rc); free(ro);
}

/* The core's CPU layer over the world transport (host rows through NCCL): E = 6, k = 2,
   d = 20, ff = 28, 33 / 0 / 17 / 5 tokens by rank, bitwise equal to one rank that holds
   every expert. */
static void test_core_world(rank_env* env) {
    static const int tokens[4] = { 33, 0, 17, 5 };
    enum { E = 6, K = 2, D = 20, FF = 28 };
    int me = env->rank, T = tokens[me % 4], owner[E], e, l;
    size_t n = (size_t)T * D, per = (size_t)D * FF;
    float* weights = (float*)malloc(sizeof(float) * 3 * per * E);
    float* router = (float*)malloc(sizeof(float) * E * D);
    float* x = (float*)malloc(sizeof(float) * (n + 1));
    float* y = (float*)malloc(sizeof(float) * (n + 1));
    float* ref = (float*)malloc(sizeof(float) * (n + 1));
    int32_t* idx = (int32_t*)malloc(sizeof(int32_t) * (size_t)(T * K + 1));
    float* w = (float*)malloc(sizeof(float) * (size_t)(T * K + 1));
    moe_ep_expert_weights all[E], mine[E];
    moe_ep_context *ctx = NULL, *one = NULL;
    moe_ep_result res;
    memset(all, 0, sizeof all);     /* the biases stay NULL */
    fill(router, (size_t)E * D, 3.0f / sqrtf((float)D), 0, 901);
    fill(weights, 3 * per * E, 1.7f / sqrtf((float)D), 0, 902);
    fill(x, n, 1.0f, 0, 903 + (uint64_t)me);
    moe_ep_placement_compute(NULL, E, env->world, owner);
    for (e = 0, l = 0; e < E; ++e) {
        all[e].w1 = weights + 3 * per * (size_t)e;
        all[e].w3 = all[e].w1 + per;
        all[e].w2 = all[e].w1 + 2 * per;
        if (owner[e] == me) mine[l++] = all[e];
    }
    res = moe_ep_create(&(moe_ep_desc){ .d_model = D, .d_ff = FF, .num_experts = E, .top_k = K, .router_weight = router,
                                        .experts = mine, .experts_count = l, .num_threads = 1,
                                        .transport = &env->transport }, &ctx);
    if (res != MOE_EP_OK) { rank_fail(env, "moe_ep_create over NCCL: %s", moe_ep_result_string(res)); goto done; }
    memset(y, 0xFF, sizeof(float) * n);
    res = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = T, .x = x, .y = y, .topk_idx = idx, .topk_weight = w });
    if (res != MOE_EP_OK) {
        rank_fail(env, "moe_ep_forward over NCCL: %s (%s)", moe_ep_result_string(res), moe_ep_last_error(ctx));
        goto done;
    }
    res = moe_ep_create(&(moe_ep_desc){ .d_model = D, .d_ff = FF, .num_experts = E, .top_k = K, .router_weight = router,
                                        .experts = all, .num_threads = 1 }, &one);
    if (res == MOE_EP_OK)
        res = moe_ep_forward(one, &(moe_ep_forward_args){ .tokens = T, .x = x, .y = ref, .routing_in = true,
                                                          .topk_idx = idx, .topk_weight = w });
    if (res != MOE_EP_OK || memcmp(y, ref, sizeof(float) * n) != 0)
        rank_fail(env, "CPU layer over NCCL is not bitwise equal to one rank (%s)", moe_ep_result_string(res));
    else note(env, "bitwise equal to one rank");
done:
    moe_ep_destroy(ctx);
    moe_ep_destroy(one);
    free(weights); free(router); free(x); free(y); free(ref); free(idx); free(w);
}

/* >>suite */
static void layout_suite(rank_env* env) {
    groups g;
    if (!split_groups(env, &g)) return;
    if (!begin(env, 0, "groups")) goto out;
    test_groups(env, &g);
    if (!begin(env, 1, "all_reduce_sum")) goto out;
    test_all_reduce(env, &g);
    if (!begin(env, 2, "core")) goto out;
    test_core(env, &g);
    checkpoint(env);
out:
    destroy_groups(env, &g);
}

static void run_layout(world* w, int ep, int tp, int dp) {
    suite su;
    if (!layout_suite_begin(&su, w, ep, tp, dp, layout_suite)) return;
    su.names[su.count++] = "all_reduce_sum = rank-order sum (world, EP, TP, DP)";
    su.tp_equal[su.count] = 1;
    su.names[su.count++] = "core moe_ep_forward over the groups (host rows)";
    run_suite(w, &su);
}

/* The world transport itself: exchange_counts and barrier, every all_to_all_v case, the
   core's layer over it. */
static void transport_suite(rank_env* env) {
    int i;
    if (!begin(env, 0, "exchange_counts + barrier")) return;
    test_counts(env);
    for (i = 0; i < A2A_CASES; ++i) {
        if (!begin(env, 1 + i, "all_to_all_v")) return;
        test_a2a(env, &g_a2a_cases[i]);
    }
    if (!begin(env, 1 + A2A_CASES, "core over NCCL")) return;
    test_core_world(env);
    checkpoint(env);
}

static void run_transport(world* w) {
    static char names[A2A_CASES][96];
    suite su;
    int i;
    memset(&su, 0, sizeof su);
    su.fn = transport_suite;
    moe_ep_layout_resolve(&(moe_ep_layout_desc){ .world_size = w->size, .num_experts = E_ALL }, &su.layout, NULL, 0);
    su.names[su.count++] = "transport exchange_counts + barrier";
    for (i = 0; i < A2A_CASES; ++i) {
        const a2a_case* c = &g_a2a_cases[i];
        snprintf(names[i], sizeof names[i], "transport all_to_all_v S=%d row=%dB %s%s", c->segments, c->row_bytes,
                 c->host ? "host" : "device", c->split ? " split-phase" : "");
        su.names[su.count++] = names[i];
    }
    su.names[su.count++] = "core moe_ep_forward over NCCL (host rows)";
    run_suite(w, &su);
}

static void run_bad_split(world* w) {
    suite su;
    memset(&su, 0, sizeof su);
    su.fn = bad_split_suite;
    moe_ep_layout_resolve(&(moe_ep_layout_desc){ .world_size = w->size, .num_experts = E_ALL }, &su.layout, NULL, 0);
    su.names[su.count++] = "split, negative color on the last rank: all fail";
    run_suite(w, &su);
}

/* One world size: every EP x TP x DP layout of it, then the bad split (last: a failure there
   hides none of the layouts). */
static void run_size(int size) {
    world w;
    int ep, tp;
    if (getenv("MOE_EP_TEST_PROGRESS")) { printf("      world %d: ncclCommInitAll\n", size); fflush(stdout); }
    memset(&w, 0, sizeof w);
    if (!make_world(&w, size)) return;
    run_transport(&w);
    for (tp = 1; tp <= size; tp *= 2)
        for (ep = 1; ep * tp <= size; ep *= 2) {
            if (w.aborted) {
                gpu_fact(1, "world=%d EP %d x TP %d x DP %d  not run: a world communicator was aborted", size, ep, tp,
                         size / (ep * tp));
                continue;
            }
            run_layout(&w, ep, tp, size / (ep * tp));
        }
    if (!w.aborted) run_bad_split(&w);
    free_world(&w);
}

static void banner(int gpus) {
    printf("%s: %d GPU(s)\n", PROGRAM, gpus);
}

int main(int argc, char** argv) {
    return gpu_main(argc, argv, PROGRAM, 0, run_size, banner);
}

#ifndef MOE_EP_NCCL_IMPL_INCLUDED
#error "MOE_EP_IMPLEMENTATION did not build the NCCL transport"
#endif
