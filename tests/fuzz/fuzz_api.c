/* fuzz_api.c -- the public API under bytes an attacker chooses.

   The bytes become a desc (sizes, top_k, activation, scoring, capacity, placement, thread
   count), each rank's token count, x and, half of the time, hand-in routing; some values
   are deliberately out of range (top_k above E, an enum past its COUNT, a negative count, an
   expert id of E or a repeated one, a NaN weight or x). The layer then runs through create,
   forward and destroy at 1 to 3 pthreads ranks, and through the stage API. Checks:
   - success exactly when the inputs are valid (the fuzzer's own rules, written apart from
     the library's);
   - y untouched (poisoned) on failure;
   - the stage API gives forward's bits;
   - R ranks give one rank's bits (dropless; with a capacity the drops depend on the split).
   A failed check aborts (the fuzzer's crash).

   Built two ways: with -fsanitize=fuzzer (make fuzz: libFuzzer drives it), or with
   -DFUZZ_REPLAY, whose main() runs every file named on the command line (make check-fuzz
   replays the committed corpus, tests/fuzz/corpus, without the libFuzzer runtime). */
#define MOE_EP_IMPLEMENTATION
#include "../../transports/moe_ep_pthreads.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FZ_MAX_R 3
#define FZ_MAX_T 6                  /* tokens per rank */
#define FZ_MAX_D 12
#define FZ_MAX_F 12
#define FZ_MAX_E 10

#define FZ_CHECK(c, ...) do { if (!(c)) { fprintf(stderr, "fuzz_api: " __VA_ARGS__); fputc('\n', stderr); abort(); } } while (0)

typedef struct fz_bytes { const uint8_t* data; size_t size, at; } fz_bytes;

static uint8_t fz_byte(fz_bytes* b) { return b->at < b->size ? b->data[b->at++] : 0; }

typedef struct fz_case {
    int R, d, ff, E, k, threads;
    moe_ep_activation activation;
    moe_ep_scoring scoring;
    moe_ep_placement_kind placement;
    bool normalize, routing_in;
    float capacity;
    int64_t tokens[FZ_MAX_R];
    int64_t total;
    bool valid;                     /* the fuzzer's verdict */
    float router[FZ_MAX_E * FZ_MAX_D];
    float weights[FZ_MAX_E * 3 * FZ_MAX_D * FZ_MAX_F];
    moe_ep_expert_weights experts[FZ_MAX_E];
    float x[FZ_MAX_R * FZ_MAX_T * FZ_MAX_D];
    int32_t idx[FZ_MAX_R * FZ_MAX_T * FZ_MAX_E];
    float weight[FZ_MAX_R * FZ_MAX_T * FZ_MAX_E];
} fz_case;

/* A value in [-1, 1) from a byte: inputs of order 1, so that nothing overflows. */
static float fz_unit(uint8_t v) { return (float)v / 128.0f - 1.0f; }

static void fz_decode(fz_case* c, fz_bytes* b) {
    int i, e, t, r, j, k_eff;
    uint8_t flags;
    memset(c, 0, sizeof *c);
    c->R = 1 + fz_byte(b) % FZ_MAX_R;
    c->d = 1 + fz_byte(b) % FZ_MAX_D;
    c->ff = 1 + fz_byte(b) % FZ_MAX_F;
    c->E = 1 + fz_byte(b) % FZ_MAX_E;
    c->k = fz_byte(b) % (c->E + 2);                                  /* 0: default 1; E + 1: invalid */
    c->activation = (moe_ep_activation)(fz_byte(b) % (MOE_EP_ACTIVATION_COUNT + 1));
    c->scoring = (moe_ep_scoring)(fz_byte(b) % (MOE_EP_SCORING_COUNT + 1));
    c->placement = (moe_ep_placement_kind)(fz_byte(b) % MOE_EP_PLACEMENT_COUNT);  /* TABLE excluded below */
    if (c->placement == MOE_EP_PLACEMENT_TABLE) c->placement = MOE_EP_PLACEMENT_COUNT;   /* invalid */
    flags = fz_byte(b);
    c->normalize = flags & 1;
    c->routing_in = (flags >> 1) & 1;
    c->capacity = (flags >> 2) % 4 == 1 ? 0.5f : (flags >> 2) % 4 == 2 ? 2.0f : (flags >> 2) % 4 == 3 && (flags & 64) ? -1.0f : 0.0f;
    c->threads = (flags & 128) ? 2 : 1;
    k_eff = c->k == 0 ? 1 : c->k;
    c->valid = k_eff <= c->E && c->activation != MOE_EP_ACTIVATION_COUNT && c->scoring != MOE_EP_SCORING_COUNT &&
               c->placement != MOE_EP_PLACEMENT_COUNT && c->capacity >= 0.0f;
    for (r = 0; r < c->R; ++r) {
        uint8_t v = fz_byte(b);
        c->tokens[r] = v == 255 ? -1 : v % (FZ_MAX_T + 1);
        if (c->tokens[r] < 0) c->valid = false;
        else c->total += c->tokens[r];
    }
    for (i = 0; i < c->E * c->d; ++i) c->router[i] = fz_unit(fz_byte(b));
    for (e = 0; e < c->E; ++e) {
        float* w = c->weights + (size_t)e * 3 * FZ_MAX_D * FZ_MAX_F;
        for (i = 0; i < 3 * c->d * c->ff; ++i) w[i] = 0.5f * fz_unit((uint8_t)(i * 37 + e * 11 + fz_byte(b)));
        c->experts[e].w1 = w;
        c->experts[e].w3 = w + c->d * c->ff;
        c->experts[e].w2 = w + 2 * c->d * c->ff;
    }
    for (t = 0; t < c->total; ++t)
        for (i = 0; i < c->d; ++i) {
            uint8_t v = fz_byte(b);
            c->x[t * c->d + i] = fz_unit(v);
            /* a NaN in x: the router refuses it; hand-in routing never reads x's values for a choice,
               and the experts carry the NaN into y, which is allowed */
            if (v == 0xEE && !c->routing_in) { c->x[t * c->d + i] = NAN; c->valid = false; }
        }
    if (c->routing_in && c->valid)
        for (t = 0; t < c->total; ++t)
            for (j = 0; j < k_eff; ++j) {
                uint8_t v = fz_byte(b);
                int32_t e2 = (int32_t)((t + j * 3 + v / 64) % c->E);    /* mostly distinct */
                int q;
                if (v == 0xFD) e2 = c->E;                               /* not an expert */
                c->idx[t * k_eff + j] = e2;
                c->weight[t * k_eff + j] = v == 0xFE ? NAN : fz_unit(v);
                if (e2 >= c->E || v == 0xFE) c->valid = false;
                for (q = 0; q < j; ++q) if (c->idx[t * k_eff + q] == e2) c->valid = false;  /* twice */
            }
}

static moe_ep_desc fz_desc(const fz_case* c, const moe_ep_transport* t, int rank, int world) {
    moe_ep_desc d;
    memset(&d, 0, sizeof d);
    d.d_model = c->d; d.d_ff = c->ff; d.num_experts = c->E; d.top_k = c->k;
    d.activation = c->activation; d.scoring = c->scoring; d.normalize_topk = c->normalize;
    d.capacity_factor = c->capacity; d.placement.kind = c->placement; d.num_threads = c->threads;
    d.router_weight = c->router; d.experts = c->experts; d.experts_count = c->E; d.transport = t;
    (void)rank; (void)world;
    return d;
}

typedef struct fz_run {
    const fz_case* c;
    bool stages;
    float* y;                       /* [total, d] */
    moe_ep_result result[FZ_MAX_R];
    bool untouched[FZ_MAX_R];
} fz_run;

static int64_t fz_first(const fz_case* c, int rank) {
    int64_t first = 0;
    int r;
    for (r = 0; r < rank; ++r) first += c->tokens[r] > 0 ? c->tokens[r] : 0;
    return first;
}

static bool fz_poisoned(const float* y, int64_t n) {
    int64_t i;
    for (i = 0; i < n; ++i) {
        uint32_t bits;
        memcpy(&bits, &y[i], sizeof bits);
        if (bits != 0x7FC0DEADu) return false;
    }
    return true;
}

/* One rank's layer: forward, or the stages one by one. */
static moe_ep_result fz_rank(const moe_ep_transport* t, void* user) {
    fz_run* run = (fz_run*)user;
    const fz_case* c = run->c;
    int rank = t ? t->rank : 0, k = c->k == 0 ? 1 : c->k;
    int64_t T = t ? c->tokens[rank] : c->total, first = t ? fz_first(c, rank) : 0, n = T > 0 ? T * c->d : 0;
    moe_ep_desc d = fz_desc(c, t, rank, t ? t->world_size : 1);
    moe_ep_context* ctx = NULL;
    moe_ep_result res;
    float* y = run->y + first * c->d;
    const float* x = c->x + first * c->d;
    int32_t* idx = (int32_t*)(uintptr_t)(c->idx + first * k);
    float* w = (float*)(uintptr_t)(c->weight + first * k);
    res = moe_ep_create(&d, &ctx);
    if (res == MOE_EP_OK && !run->stages) {
        res = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = T, .x = x, .y = y, .routing_in = c->routing_in,
                                                          .topk_idx = c->routing_in ? idx : NULL,
                                                          .topk_weight = c->routing_in ? w : NULL });
    } else if (res == MOE_EP_OK) {
        /* the stages; routing from the router lands in buffers of this rank's own */
        int32_t own_idx[FZ_MAX_R * FZ_MAX_T * FZ_MAX_E];
        float own_w[FZ_MAX_R * FZ_MAX_T * FZ_MAX_E];
        static const int64_t rows_max = FZ_MAX_R * FZ_MAX_R * FZ_MAX_T * FZ_MAX_E * FZ_MAX_D;
        float* rows = (float*)malloc(sizeof(float) * (size_t)rows_max);
        float* out = (float*)malloc(sizeof(float) * (size_t)rows_max);
        moe_ep_plan* plan = NULL;
        moe_ep_result routed = MOE_EP_OK, st;
        if (!c->routing_in) {
            routed = moe_ep_route(ctx, x, T, own_idx, own_w, NULL);
            idx = own_idx;
            w = own_w;
        }
        /* a rank whose routing failed still takes part in plan_create (it carries the failure) */
        st = moe_ep_plan_create(ctx, routed == MOE_EP_OK ? T : -1, idx, w, &plan);
        res = routed != MOE_EP_OK ? routed : st;
        if (st == MOE_EP_OK) {
            FZ_CHECK(moe_ep_plan_query(plan).recv_rows * c->d <= rows_max, "recv_rows past the bound");
            res = moe_ep_dispatch(ctx, plan, x, rows);
            if (res == MOE_EP_OK) moe_ep_experts(ctx, plan, rows, out);
            st = moe_ep_combine(ctx, plan, out, y);
            if (res == MOE_EP_OK) res = st;
        }
        moe_ep_plan_destroy(plan);
        free(rows);
        free(out);
    }
    if (t) run->result[rank] = res;
    run->untouched[rank] = res == MOE_EP_OK || fz_poisoned(y, n);
    moe_ep_destroy(ctx);
    return res;
}

static void fz_poison(float* y, int64_t n) {
    uint32_t bits = 0x7FC0DEADu;
    int64_t i;
    for (i = 0; i < n; ++i) memcpy(&y[i], &bits, sizeof bits);
}

/* The layer at R ranks (forward or stages); returns whether every rank succeeded. */
static bool fz_world(const fz_case* c, bool stages, float* y) {
    moe_ep_pthreads_world* world = NULL;
    fz_run run;
    int r;
    bool ok = true;
    memset(&run, 0, sizeof run);
    run.c = c;
    run.stages = stages;
    run.y = y;
    fz_poison(y, FZ_MAX_R * FZ_MAX_T * FZ_MAX_D);
    FZ_CHECK(moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = c->R, .timeout_ms = 60000 }, &world)
             == MOE_EP_OK, "world_create");
    moe_ep_pthreads_run(world, fz_rank, &run, NULL);
    moe_ep_pthreads_world_destroy(world);
    for (r = 0; r < c->R; ++r) {
        FZ_CHECK(run.untouched[r], "rank %d of %d (%s): y written on failure (%s)", r, c->R, stages ? "stages" : "forward",
                 moe_ep_result_string(run.result[r]));
        ok = ok && run.result[r] == MOE_EP_OK;
        /* every rank the same verdict: all succeed or none */
        FZ_CHECK((run.result[r] == MOE_EP_OK) == (run.result[0] == MOE_EP_OK), "ranks disagree: rank 0 %s, rank %d %s",
                 moe_ep_result_string(run.result[0]), r, moe_ep_result_string(run.result[r]));
    }
    return ok;
}

static long fz_valid_inputs, fz_invalid_inputs;    /* for the replay's summary */

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    static fz_case c;
    static float y_forward[FZ_MAX_R * FZ_MAX_T * FZ_MAX_D], y_stages[FZ_MAX_R * FZ_MAX_T * FZ_MAX_D];
    static float y_one[FZ_MAX_R * FZ_MAX_T * FZ_MAX_D];
    fz_bytes b;
    bool ok;
    b.data = data; b.size = size; b.at = 0;
    fz_decode(&c, &b);
    ok = fz_world(&c, false, y_forward);
    FZ_CHECK(ok == c.valid, "forward at %d ranks: %s, but the inputs are %s (E %d, k %d, act %d, scoring %d, placement "
             "%d, capacity %g, routing_in %d)", c.R, ok ? "succeeded" : "failed", c.valid ? "valid" : "invalid", c.E, c.k,
             (int)c.activation, (int)c.scoring, (int)c.placement, (double)c.capacity, (int)c.routing_in);
    FZ_CHECK(fz_world(&c, true, y_stages) == ok, "the stage API and forward disagree on success");
    if (ok) fz_valid_inputs++;
    else fz_invalid_inputs++;
    if (!ok) return 0;
    FZ_CHECK(memcmp(y_forward, y_stages, sizeof(float) * (size_t)(c.total * c.d)) == 0, "the stage API's y differs");
    if (c.capacity == 0.0f) {
        /* one rank with every token: the same bits */
        fz_case one = c;
        fz_run run;
        memset(&run, 0, sizeof run);
        one.R = 1;
        one.tokens[0] = c.total;
        run.c = &one;
        run.y = y_one;
        fz_poison(y_one, FZ_MAX_R * FZ_MAX_T * FZ_MAX_D);
        FZ_CHECK(fz_rank(NULL, &run) == MOE_EP_OK, "one rank failed where %d succeeded", c.R);
        FZ_CHECK(memcmp(y_forward, y_one, sizeof(float) * (size_t)(c.total * c.d)) == 0, "%d ranks differ from one", c.R);
    }
    return 0;
}

#ifdef FUZZ_REPLAY
/* Replays files (the committed corpus); exit status 0 when every one passed. */
int main(int argc, char** argv) {
    int i, replayed = 0;
    for (i = 1; i < argc; ++i) {
        FILE* f = fopen(argv[i], "rb");
        uint8_t buffer[65536];
        size_t n;
        if (!f) { fprintf(stderr, "fuzz_api: cannot open %s\n", argv[i]); return 1; }
        n = fread(buffer, 1, sizeof buffer, f);
        fclose(f);
        LLVMFuzzerTestOneInput(buffer, n);
        replayed++;
    }
    printf("fuzz_api: %d inputs replayed (%ld valid, %ld refused as they should be), every check held\n", replayed,
           fz_valid_inputs, fz_invalid_inputs);
    return replayed > 0 ? 0 : 1;
}
#endif
