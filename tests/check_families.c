/* check_families.c -- the model families against transformers' own MoE blocks.

   tests/families/ holds, per case, the weights of a transformers MoE block (random, fp32),
   an input of at least 20 tokens and the block's output computed by transformers in float64
   (tests/families/gen_refs.py made them; README.md there says how). Each case is loaded into
   a desc that starts from moe_ep_family_desc() and takes the case's config values, then
   runs at 1 to 5 pthreads ranks: within 1e-5 relative of transformers' float64 output, and
   every rank count bitwise equal to one rank. */
#include "check_moe_ep.h"
#include "support/test_families.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* >>cases: a case's desc (test_families.h) as the check_model that the R-rank runner takes. */
typedef struct fam_model {
    check_model model;
    moe_ep_expert_weights experts[64];
    const float* x;
    const double* reference;
    int64_t tokens;
} fam_model;

static bool fam_model_init(fam_model* m, const fam_case* c, const fam_spec* spec, char* err, size_t err_size) {
    moe_ep_desc d;
    memset(m, 0, sizeof *m);
    if (!fam_desc(c, spec, m->experts, &d, err, err_size)) return false;
    m->model.d_model = d.d_model;
    m->model.d_ff = d.d_ff;
    m->model.num_experts = d.num_experts;
    m->model.top_k = d.top_k;
    m->model.activation = d.activation;
    m->model.normalize_topk = d.normalize_topk;
    m->model.routing.scoring = d.scoring;
    m->model.routing.routed_scaling_factor = d.routed_scaling_factor;
    m->model.routing.num_groups = d.num_groups;
    m->model.routing.topk_groups = d.topk_groups;
    m->model.routing.scale_expert_input = d.scale_expert_input;
    m->model.routing.selection_bias = d.selection_bias;
    m->model.routing.router_bias = d.router_bias;
    m->model.shared = d.shared;
    m->model.weight_layout = d.weight_layout;
    m->model.router = (float*)d.router_weight;
    m->model.experts = m->experts;
    m->x = fam_f32(c, "input");
    m->reference = fam_f64(c, "output_f64");
    m->tokens = fam_tokens(c, d.d_model);
    return true;
}

START_TEST(families_match_transformers) {
    static const int worlds[] = { 1, 2, 3, 4, 5 };
    const fam_spec* spec = &fam_specs[_i];
    fam_case c;
    fam_model m;
    check_layer L;
    int64_t tokens[5];
    float *y1, *yr;
    double err;
    char text[2048] = "";
    int w, r;
    ck_assert_msg(fam_load(&c, spec->name, text, sizeof text), "%s", text);
    ck_assert_msg(fam_model_init(&m, &c, spec, text, sizeof text), "%s", text);
    ck_assert_msg(m.tokens >= 20, "%s: %lld tokens", spec->name, (long long)m.tokens);
    y1 = (float*)malloc(sizeof(float) * (size_t)(m.tokens * m.model.d_model));
    yr = (float*)malloc(sizeof(float) * (size_t)(m.tokens * m.model.d_model));
    for (w = 0; w < 5; ++w) {
        int R = worlds[w];
        int64_t left = m.tokens;
        for (r = 0; r < R; ++r) {           /* uneven shares: rank r gets about (r + 1) parts */
            tokens[r] = r == R - 1 ? left : m.tokens * (r + 1) * 2 / (R * (R + 1));
            left -= tokens[r];
        }
        test_poison(w == 0 ? y1 : yr, (size_t)(m.tokens * m.model.d_model));
        check_layer_init(&L, &m.model, R, tokens, m.x, w == 0 ? y1 : yr);
        L.num_threads = 1;
        check_run_layer(&L);
        ck_assert_msg(L.result == MOE_EP_OK, "%s at %d ranks: %s", spec->name, R,
                      check_layer_errors(&L, text, sizeof text));
        if (w == 0) {
            err = check_rel_error(y1, m.reference, (size_t)(m.tokens * m.model.d_model));
            ck_assert_msg(err <= 1e-5, "%s: relative error %.3g against transformers' float64 output", spec->name, err);
        } else {
            ck_assert_msg(memcmp(y1, yr, sizeof(float) * (size_t)(m.tokens * m.model.d_model)) == 0,
                          "%s: %d ranks differ from 1 rank", spec->name, R);
        }
    }
    free(y1);
    free(yr);
    fam_free(&c);
}
END_TEST

Suite* families_suite(void) {
    Suite* s = suite_create("families");
    TCase* tc = tcase_create("transformers");
    tcase_add_loop_test(tc, families_match_transformers, 0, FAM_SPECS);
    tcase_set_timeout(tc, 120);
    suite_add_tcase(s, tc);
    return s;
}
