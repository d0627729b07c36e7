/* check_support.c -- helpers of the core suites on top of tests/support: float64
   references, the echo transport and an R-rank layer runner. */
#include "check_moe_ep.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* >>refused creates */
void check_create_refused(moe_ep_desc* desc, moe_ep_log_item item, const char* what) {
    moe_ep_context* ctx = (moe_ep_context*)(uintptr_t)0x1;   /* must stay untouched */
    test_log log;
    test_counter counter;
    moe_ep_result res;
    char err[512] = "";
    test_log_init(&log);
    test_counter_init(&counter);
    desc->logger = test_log_logger(&log);
    desc->allocator = test_counter_allocator(&counter);
    desc->create_error = err;
    desc->create_error_size = sizeof err;
    res = moe_ep_create(desc, &ctx);
    ck_assert_msg(res == MOE_EP_ERROR_INVALID_ARGUMENT, "%s: %s", what, moe_ep_result_string(res));
    ck_assert_msg(ctx == (moe_ep_context*)(uintptr_t)0x1, "%s: out was written", what);
    ck_assert_msg(test_log_find_item(&log, item) >= 0, "%s: expected %s, got: %s", what,
                  moe_ep_log_item_string(item), err);
    ck_assert_msg(strstr(err, "moe_ep_desc") != NULL, "%s: the message names no field: %s", what, err);
    ck_assert_msg(test_counter_outstanding(&counter) == 0, "%s: %ld allocations left", what,
                  test_counter_outstanding(&counter));
    test_log_destroy(&log);
    test_counter_destroy(&counter);
    memset(&desc->logger, 0, sizeof desc->logger);     /* nothing left pointing at the dead log */
    memset(&desc->allocator, 0, sizeof desc->allocator);
    desc->create_error = NULL;
    desc->create_error_size = 0;
}

/* >>references */
void check_ref_ffn(moe_ep_activation act, int d_model, int d_ff, const moe_ep_expert_weights* w, const float* x,
                   int64_t rows, double* out) {
    double* hidden = (double*)malloc(sizeof(double) * (size_t)(d_ff > 0 ? d_ff : 1));
    bool gated = act == MOE_EP_ACTIVATION_DEFAULT || act == MOE_EP_ACTIVATION_SWIGLU ||
                 act == MOE_EP_ACTIVATION_SWIGLU_CLAMPED;
    int64_t r;
    int f, i, o;
    for (r = 0; r < rows; ++r) {
        const float* xr = x + r * d_model;
        for (f = 0; f < d_ff; ++f) {
            double a = w->b1 ? (double)w->b1[f] : 0.0, b = gated && w->b3 ? (double)w->b3[f] : 0.0;
            for (i = 0; i < d_model; ++i) {
                a += (double)w->w1[(size_t)f * (size_t)d_model + (size_t)i] * (double)xr[i];
                if (gated) b += (double)w->w3[(size_t)f * (size_t)d_model + (size_t)i] * (double)xr[i];
            }
            hidden[f] = test_ref_activation(act, a, b);
        }
        for (o = 0; o < d_model; ++o) {
            double acc = w->b2 ? (double)w->b2[o] : 0.0;
            for (f = 0; f < d_ff; ++f) acc += (double)w->w2[(size_t)o * (size_t)d_ff + (size_t)f] * hidden[f];
            out[r * d_model + o] = acc;
        }
    }
    free(hidden);
}

double check_rel_error(const float* got, const double* ref, size_t n) {
    double max_diff = 0.0, max_ref = 0.0;
    size_t i;
    for (i = 0; i < n; ++i) {
        double d;
        if (!isfinite(got[i])) return INFINITY;
        d = fabs((double)got[i] - ref[i]);
        if (d > max_diff) max_diff = d;
        if (fabs(ref[i]) > max_ref) max_ref = fabs(ref[i]);
    }
    return max_ref > 0.0 ? max_diff / max_ref : max_diff;
}

void check_model_init(check_model* m, int d_model, int d_ff, int num_experts, int top_k, moe_ep_activation act,
                      bool normalize_topk, uint64_t seed) {
    size_t per = (size_t)d_model * (size_t)d_ff, e;
    memset(m, 0, sizeof *m);
    m->d_model = d_model;
    m->d_ff = d_ff;
    m->num_experts = num_experts;
    m->top_k = top_k;
    m->activation = act;
    m->normalize_topk = normalize_topk;
    m->router = (float*)malloc(sizeof(float) * (size_t)num_experts * (size_t)d_model);
    m->weights = (float*)malloc(sizeof(float) * 3 * per * (size_t)num_experts);
    m->experts = (moe_ep_expert_weights*)calloc((size_t)num_experts, sizeof(moe_ep_expert_weights));
    /* router logits of order 1 so that routing varies from token to token */
    test_fill(m->router, (size_t)num_experts * (size_t)d_model, 2.0f / sqrtf((float)d_model), &seed);
    for (e = 0; e < (size_t)num_experts; ++e) {
        float* w1 = m->weights + e * 3 * per;
        test_fill(w1, 2 * per, 1.5f / sqrtf((float)d_model), &seed);
        test_fill(w1 + 2 * per, per, 1.5f / sqrtf((float)d_ff), &seed);
        m->experts[e].w1 = w1;
        m->experts[e].w3 = w1 + per;
        m->experts[e].w2 = w1 + 2 * per;
    }
}

void check_model_add_biases(check_model* m, uint64_t seed) {
    size_t per = 2 * (size_t)m->d_ff + (size_t)m->d_model;
    int e;
    m->biases = (float*)malloc(sizeof(float) * per * (size_t)m->num_experts);
    test_fill(m->biases, per * (size_t)m->num_experts, 0.5f, &seed);
    for (e = 0; e < m->num_experts; ++e) {
        m->experts[e].b1 = m->biases + (size_t)e * per;
        m->experts[e].b3 = m->experts[e].b1 + m->d_ff;
        m->experts[e].b2 = m->experts[e].b3 + m->d_ff;
    }
}

void check_model_free(check_model* m) {
    free(m->biases);
    free(m->router);
    free(m->weights);
    free(m->experts);
    memset(m, 0, sizeof *m);
}

/* One token's logits and scores in double: softmax, sigmoid, or (TOPK_ scorings) the logits. */
static void check__scores(const check_model* m, const float* x, double* logit, double* score) {
    const check_routing* r = &m->routing;
    int E = m->num_experts, D = m->d_model, e, i;
    double mx = -INFINITY, sum = 0.0;
    for (e = 0; e < E; ++e) {
        double l = r->router_bias ? (double)r->router_bias[e] : 0.0;
        for (i = 0; i < D; ++i) l += (double)x[i] * (double)m->router[e * D + i];
        logit[e] = l;
        if (l > mx) mx = l;
    }
    for (e = 0; e < E; ++e) { score[e] = exp(logit[e] - mx); sum += score[e]; }
    for (e = 0; e < E; ++e) {
        if (r->scoring == MOE_EP_SCORING_DEFAULT || r->scoring == MOE_EP_SCORING_SOFTMAX) score[e] /= sum;
        else if (r->scoring == MOE_EP_SCORING_SIGMOID) score[e] = 1.0 / (1.0 + exp(-logit[e]));
        else score[e] = logit[e];
    }
}

/* out[e]: expert e is outside the best topk_groups groups (a group scores its two best). */
static void check__groups(const check_model* m, const double* choice, bool* out) {
    int E = m->num_experts, G = m->routing.num_groups, keep = m->routing.topk_groups ? m->routing.topk_groups : G;
    int n = E / G, g, i, j;
    double score[256];
    bool kept[256];
    for (g = 0; g < G; ++g) {
        double best = -INFINITY, second = -INFINITY;
        for (i = 0; i < n; ++i) {
            double c = choice[g * n + i];
            if (c > best) { second = best; best = c; }
            else if (c > second) second = c;
        }
        score[g] = n > 1 ? best + second : best;
        kept[g] = false;
    }
    for (j = 0; j < keep; ++j) {
        int b = -1;
        for (g = 0; g < G; ++g)
            if (!kept[g] && (b < 0 || score[g] > score[b])) b = g;
        kept[b] = true;
    }
    for (i = 0; i < E; ++i) out[i] = !kept[i / n];
}

void check_ref_route(const check_model* m, const float* x, int64_t tokens, int32_t* idx, double* weight) {
    const check_routing* r = &m->routing;
    int E = m->num_experts, k = m->top_k, D = m->d_model, e, j;
    double* logit = (double*)malloc(sizeof(double) * (size_t)E * 3);
    double* score = logit + E;
    double* choice = logit + 2 * E;
    bool* out = (bool*)malloc(sizeof(bool) * (size_t)E);
    int64_t t;
    for (t = 0; t < tokens; ++t) {
        int32_t* ti = idx + t * k;
        double* tw = weight + t * k;
        double sum = 0.0;
        check__scores(m, x + t * D, logit, score);
        for (e = 0; e < E; ++e) {
            choice[e] = score[e] + (r->selection_bias ? (double)r->selection_bias[e] : 0.0);
            out[e] = false;
        }
        if (r->num_groups > 1) check__groups(m, choice, out);
        for (j = 0; j < k; ++j) {
            int best = -1;
            for (e = 0; e < E; ++e)
                if (!out[e] && (best < 0 || choice[e] > choice[best])) best = e;
            ti[j] = best;
            out[best] = true;
        }
        for (j = 0; j < k; ++j) {
            if (r->scoring == MOE_EP_SCORING_TOPK_SOFTMAX) tw[j] = exp(logit[ti[j]] - logit[ti[0]]);
            else if (r->scoring == MOE_EP_SCORING_TOPK_SIGMOID) tw[j] = 1.0 / (1.0 + exp(-logit[ti[j]]));
            else tw[j] = score[ti[j]];
            sum += tw[j];
        }
        if (r->scoring == MOE_EP_SCORING_TOPK_SOFTMAX || m->normalize_topk)
            for (j = 0; j < k; ++j) tw[j] /= sum;
        if (r->scoring == MOE_EP_SCORING_TOPK_SOFTMAX && m->normalize_topk) {
            /* renormalising weights that already sum to one */
            for (sum = 0.0, j = 0; j < k; ++j) sum += tw[j];
            for (j = 0; j < k; ++j) tw[j] /= sum;
        }
        if (r->routed_scaling_factor != 0.0f)
            for (j = 0; j < k; ++j) tw[j] *= (double)r->routed_scaling_factor;
    }
    free(out);
    free(logit);
}

void check_ref_layer(const check_model* m, const float* x, int64_t tokens, const int32_t* idx, const double* weight,
                     double* y) {
    int D = m->d_model, k = m->top_k, j, i;
    double* one = (double*)malloc(sizeof(double) * (size_t)D);
    float* scaled = (float*)malloc(sizeof(float) * (size_t)D);
    int64_t t;
    for (t = 0; t < tokens; ++t) {
        for (i = 0; i < D; ++i) y[t * D + i] = 0.0;
        for (j = 0; j < k; ++j) {
            if (m->routing.scale_expert_input) {
                for (i = 0; i < D; ++i) scaled[i] = (float)weight[t * k + j] * x[t * D + i];
                check_ref_ffn(m->activation, D, m->d_ff, &m->experts[idx[t * k + j]], scaled, 1, one);
                for (i = 0; i < D; ++i) y[t * D + i] += one[i];
            } else {
                check_ref_ffn(m->activation, D, m->d_ff, &m->experts[idx[t * k + j]], x + t * D, 1, one);
                for (i = 0; i < D; ++i) y[t * D + i] += weight[t * k + j] * one[i];
            }
        }
    }
    if (m->shared.d_ff > 0)
        for (t = 0; t < tokens; ++t) {
            double g = 1.0;
            if (m->shared.gate) {
                double logit = 0.0;
                for (i = 0; i < D; ++i) logit += (double)m->shared.gate[i] * (double)x[t * D + i];
                g = 1.0 / (1.0 + exp(-logit));
            }
            check_ref_ffn(m->activation, D, m->shared.d_ff, &m->shared.weights, x + t * D, 1, one);
            for (i = 0; i < D; ++i) y[t * D + i] += g * one[i];
        }
    free(scaled);
    free(one);
}

/* >>echo transport */
static moe_ep_result check__echo_exchange(void* impl, const int64_t* send, int64_t* recv, int count, char* err_text,
                                          size_t err_size) {
    const check_echo* echo = (const check_echo*)impl;
    int q, i;
    (void)err_text;
    (void)err_size;
    for (q = 0; q < echo->world_size; ++q)
        for (i = 0; i < count; ++i) recv[q * count + i] = send[echo->rank * count + i];
    return MOE_EP_OK;
}

static moe_ep_result check__echo_a2a(void* impl, const moe_ep_a2a_args* args, char* err_text, size_t err_size) {
    (void)impl;
    (void)args;
    if (err_text) snprintf(err_text, err_size, "the echo transport moves no rows");
    return MOE_EP_ERROR_UNSUPPORTED;
}

moe_ep_transport check_echo_transport(check_echo* echo, int rank, int world_size) {
    moe_ep_transport t;
    memset(&t, 0, sizeof t);
    echo->rank = rank;
    echo->world_size = world_size;
    t.impl = echo;
    t.name = "echo";
    t.rank = rank;
    t.world_size = world_size;
    t.local_ranks = 1;
    t.exchange_counts = check__echo_exchange;
    t.all_to_all_v = check__echo_a2a;
    return t;
}

/* >>layer runner */
void check_layer_init(check_layer* L, const check_model* model, int ranks, const int64_t* tokens, const float* x,
                      float* y) {
    memset(L, 0, sizeof *L);
    L->model = model;
    L->ranks = ranks;
    L->tokens = tokens;
    L->x = x;
    L->y = y;
}

int64_t check_total_tokens(const int64_t* tokens, int ranks) {
    int64_t n = 0;
    int r;
    for (r = 0; r < (ranks > 0 ? ranks : 1); ++r) n += tokens[r];
    return n;
}

/* The stages one by one, plain or split-phase. */
static moe_ep_result check__stages(moe_ep_context* ctx, const check_layer* L, int64_t T, const float* x, float* y,
                                   int32_t* idx, float* weight, bool handed) {
    moe_ep_plan* plan = NULL;
    moe_ep_plan_info info;
    float *rows = NULL, *out = NULL;
    moe_ep_result res = MOE_EP_OK;
    size_t n;
    if (!handed) res = moe_ep_route(ctx, x, T, idx, weight, NULL);
    if (res == MOE_EP_OK) res = moe_ep_plan_create(ctx, T, idx, weight, &plan);
    if (res != MOE_EP_OK) return res;
    info = moe_ep_plan_query(plan);
    n = (size_t)info.recv_rows * (size_t)L->model->d_model + 1;
    rows = (float*)malloc(sizeof(float) * n);
    out = (float*)malloc(sizeof(float) * n);
    test_poison(rows, n);
    test_poison(out, n);
    if (L->path == CHECK_PATH_SPLIT) {
        res = moe_ep_dispatch_begin(ctx, plan, x, rows);
        if (res == MOE_EP_OK) res = moe_ep_dispatch_end(ctx, plan);
        if (res == MOE_EP_OK) res = moe_ep_experts(ctx, plan, rows, out);
        if (res == MOE_EP_OK) res = moe_ep_combine_begin(ctx, plan, out);
        if (res == MOE_EP_OK) res = moe_ep_combine_end(ctx, plan, y);
    } else {
        res = moe_ep_dispatch(ctx, plan, x, rows);
        if (res == MOE_EP_OK) res = moe_ep_experts(ctx, plan, rows, out);
        if (res == MOE_EP_OK) res = moe_ep_combine(ctx, plan, out, y);
    }
    moe_ep_plan_destroy(plan);
    free(rows);
    free(out);
    return res;
}

/* The rank's transport, wrapped to count the exchanges of rows that carry a row list: one
   slot per rank (the rank threads of one layer run at a time), found by the inner impl. */
typedef struct check__counted {
    const void* impl;
    moe_ep_result (*a2a)(void*, const moe_ep_a2a_args*, char*, size_t);
    moe_ep_result (*a2a_begin)(void*, const moe_ep_a2a_args*, void**, char*, size_t);
    int64_t* row_lists;
} check__counted;
static check__counted check__counted_ranks[CHECK_MAX_RANKS];

static check__counted* check__counted_find(const void* impl, const moe_ep_a2a_args* args) {
    int r;
    for (r = 0; r < CHECK_MAX_RANKS; ++r)
        if (check__counted_ranks[r].impl == impl) {
            if (args->send_rows || args->recv_fn) ++*check__counted_ranks[r].row_lists;
            return &check__counted_ranks[r];
        }
    return NULL;
}

static moe_ep_result check__counted_a2a(void* impl, const moe_ep_a2a_args* args, char* err, size_t size) {
    return check__counted_find(impl, args)->a2a(impl, args, err, size);
}

static moe_ep_result check__counted_begin(void* impl, const moe_ep_a2a_args* args, void** request, char* err,
                                          size_t size) {
    return check__counted_find(impl, args)->a2a_begin(impl, args, request, err, size);
}

static moe_ep_result check__layer_rank(const moe_ep_transport* transport, void* user_data) {
    check_layer* L = (check_layer*)user_data;
    const check_model* m = L->model;
    int rank = transport ? transport->rank : 0, R = L->ranks > 0 ? L->ranks : 1;
    int E = m->num_experts, k = m->top_k, D = m->d_model, e, l = 0, r;
    int64_t offset = 0, T = L->tokens[rank];
    bool handed = L->topk_idx != NULL;
    int* owner = (int*)malloc(sizeof(int) * (size_t)E);
    moe_ep_expert_weights* mine = (moe_ep_expert_weights*)calloc((size_t)E + 1, sizeof *mine);
    int32_t* idx = (int32_t*)malloc(sizeof(int32_t) * (size_t)(T * k + 1));
    float* weight = (float*)malloc(sizeof(float) * (size_t)(T * k + 1));
    moe_ep_context* ctx = NULL;
    moe_ep_desc desc;
    moe_ep_transport counted;
    moe_ep_result res;
    for (r = 0; r < rank; ++r) offset += L->tokens[r];
    if (transport) {
        check__counted* slot = &check__counted_ranks[rank];
        slot->impl = transport->impl;
        slot->a2a = transport->all_to_all_v;
        slot->a2a_begin = transport->all_to_all_v_begin;
        slot->row_lists = &L->row_list_exchanges[rank];
        counted = *transport;
        counted.all_to_all_v = check__counted_a2a;
        if (counted.all_to_all_v_begin) counted.all_to_all_v_begin = check__counted_begin;
        if (L->decline_row_lists) counted.row_lists = 0;
        transport = &counted;
    }
    res = moe_ep_placement_compute(&L->placement, E, R, owner);
    if (res == MOE_EP_OK) {
        /* a rank is given only its own experts, in ascending id order */
        for (e = 0; e < E; ++e)
            if (owner[e] == rank) mine[l++] = m->experts[e];
        memset(&desc, 0, sizeof desc);
        desc.d_model = D;
        desc.d_ff = m->d_ff;
        desc.num_experts = E;
        desc.top_k = k;
        desc.activation = m->activation;
        desc.normalize_topk = m->normalize_topk;
        desc.scoring = m->routing.scoring;
        desc.routed_scaling_factor = m->routing.routed_scaling_factor;
        desc.router_bias = m->routing.router_bias;
        desc.selection_bias = m->routing.selection_bias;
        desc.num_groups = m->routing.num_groups;
        desc.topk_groups = m->routing.topk_groups;
        desc.scale_expert_input = m->routing.scale_expert_input;
        desc.shared = m->shared;
        desc.weight_layout = m->weight_layout;
        desc.weight_format = m->weight_format;
        desc.arithmetic = m->arithmetic;
        desc.kernel = L->kernel;
        desc.capacity_factor = L->capacity_factor;
        desc.placement = L->placement;
        desc.num_threads = L->num_threads;
        desc.router_weight = m->router;
        desc.experts = mine;
        desc.experts_count = l;
        desc.expert_fn = L->expert_fn;
        desc.expert_user_data = L->expert_user_data[rank];
        desc.transport = transport;
        if (L->allocator) desc.allocator = *L->allocator;
        res = moe_ep_create(&desc, &ctx);
        if (res != MOE_EP_OK) snprintf(L->rank_error[rank], sizeof L->rank_error[0], "rank %d: moe_ep_create: %s",
                                       rank, moe_ep_result_string(res));
    } else {
        snprintf(L->rank_error[rank], sizeof L->rank_error[0], "rank %d: bad placement", rank);
    }
    if (res == MOE_EP_OK) {
        const float* x = L->x + offset * D;
        float* y = L->y + offset * D;
        if (handed && T > 0) {
            memcpy(idx, L->topk_idx + offset * k, sizeof(int32_t) * (size_t)(T * k));
            memcpy(weight, L->topk_weight + offset * k, sizeof(float) * (size_t)(T * k));
        }
        if (L->path == CHECK_PATH_FORWARD) {
            moe_ep_forward_args args;
            memset(&args, 0, sizeof args);
            args.tokens = T;
            args.x = x;
            args.y = y;
            args.routing_in = handed;
            if (handed || L->idx_out) {
                args.topk_idx = idx;
                args.topk_weight = weight;
            }
            res = moe_ep_forward(ctx, &args);
        } else {
            res = check__stages(ctx, L, T, x, y, idx, weight, handed);
        }
        if (res == MOE_EP_OK && L->idx_out && !handed && T > 0) {
            memcpy(L->idx_out + offset * k, idx, sizeof(int32_t) * (size_t)(T * k));
            memcpy(L->weight_out + offset * k, weight, sizeof(float) * (size_t)(T * k));
        }
        if (res != MOE_EP_OK)
            snprintf(L->rank_error[rank], sizeof L->rank_error[0], "rank %d: %s: %s", rank, moe_ep_result_string(res),
                     moe_ep_last_error(ctx));
        moe_ep_destroy(ctx);
    }
    free(owner);
    free(mine);
    free(idx);
    free(weight);
    L->rank_result[rank] = res;
    return res;
}

moe_ep_result check_run_layer(check_layer* L) {
    moe_ep_pthreads_world* world = NULL;
    moe_ep_pthreads_desc wd;
    moe_ep_result res;
    int r;
    for (r = 0; r < CHECK_MAX_RANKS; ++r) {
        L->rank_result[r] = MOE_EP_ERROR_INTERNAL;
        L->rank_error[r][0] = '\0';
        L->row_list_exchanges[r] = 0;
        check__counted_ranks[r].impl = NULL;    /* no slot of an earlier world is found again */
    }
    if (L->ranks <= 0) {
        L->result = check__layer_rank(NULL, L);
        return L->result;
    }
    memset(&wd, 0, sizeof wd);
    wd.world_size = L->ranks;
    wd.timeout_ms = L->timeout_ms > 0 ? L->timeout_ms : 60000;
    if (L->allocator) wd.allocator = *L->allocator;
    res = moe_ep_pthreads_world_create(&wd, &world);
    if (res == MOE_EP_OK) {
        res = moe_ep_pthreads_run(world, check__layer_rank, L, L->rank_result);
        moe_ep_pthreads_world_destroy(world);
    }
    L->result = res;
    return res;
}

const char* check_layer_errors(const check_layer* L, char* buffer, size_t size) {
    int r;
    size_t used = 0;
    buffer[0] = '\0';
    for (r = 0; r < CHECK_MAX_RANKS && used + 1 < size; ++r) {
        int w;
        if (!L->rank_error[r][0]) continue;
        w = snprintf(buffer + used, size - used, "%s%s", used ? " | " : "", L->rank_error[r]);
        if (w < 0) break;
        used += (size_t)w;
    }
    if (!buffer[0]) snprintf(buffer, size, "(no rank error recorded)");
    return buffer;
}
