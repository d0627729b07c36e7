/* check_families.c -- the model families against transformers' own MoE blocks.

   tests/families/ holds, per case, the weights of a transformers MoE block (random, fp32),
   an input of at least 20 tokens and the block's output computed by transformers in float64
   (tests/families/gen_refs.py made them; README.md there says how). Each case is loaded into
   a desc that starts from moe_ep_family_desc() and takes the case's config values, then
   runs at 1 to 5 pthreads ranks: within 1e-5 relative of transformers' float64 output, and
   every rank count bitwise equal to one rank. */
#include "check_moe_ep.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FAM_DIR "tests/families/"
#define FAM_MAX_TENSORS 64
#define FAM_MAX_CONFIG 64

/* >>loader: tests/families/<case>.txt (manifest) and <case>.bin (the arrays). */
typedef struct fam_tensor {
    char name[96];
    char dtype[8];
    long offset;
    int dims, shape[4];
} fam_tensor;

typedef struct fam_case {
    char name[32];
    char config_key[FAM_MAX_CONFIG][96];
    double config_value[FAM_MAX_CONFIG];
    int configs, tensors;
    fam_tensor tensor[FAM_MAX_TENSORS];
    char router_dtype[8];
    unsigned char* bin;
    long bin_size;
} fam_case;

static bool fam_load(fam_case* c, const char* name, char* err, size_t err_size) {
    char path[256], line[512];
    FILE* f;
    memset(c, 0, sizeof *c);
    snprintf(c->name, sizeof c->name, "%s", name);
    snprintf(path, sizeof path, FAM_DIR "%s.txt", name);
    f = fopen(path, "r");
    if (!f) { snprintf(err, err_size, "cannot open %s", path); return false; }
    while (fgets(line, sizeof line, f)) {
        fam_tensor* t = &c->tensor[c->tensors];
        char key[96];
        double value;
        if (line[0] == '#') continue;
        if (sscanf(line, "config %95s %lf", key, &value) == 2 && c->configs < FAM_MAX_CONFIG) {
            snprintf(c->config_key[c->configs], sizeof c->config_key[0], "%s", key);
            c->config_value[c->configs++] = value;
        } else if (sscanf(line, "router_dtype %7s", c->router_dtype) == 1) {
            continue;
        } else if (c->tensors < FAM_MAX_TENSORS &&
                   (t->dims = sscanf(line, "tensor %95s %7s %ld %d %d %d %d", t->name, t->dtype, &t->offset,
                                     &t->shape[0], &t->shape[1], &t->shape[2], &t->shape[3]) - 3) >= 1) {
            c->tensors++;
        }
    }
    fclose(f);
    snprintf(path, sizeof path, FAM_DIR "%s.bin", name);
    f = fopen(path, "rb");
    if (!f) { snprintf(err, err_size, "cannot open %s", path); return false; }
    fseek(f, 0, SEEK_END);
    c->bin_size = ftell(f);
    fseek(f, 0, SEEK_SET);
    c->bin = (unsigned char*)malloc((size_t)c->bin_size + 8);
    if (fread(c->bin, 1, (size_t)c->bin_size, f) != (size_t)c->bin_size) {
        fclose(f);
        snprintf(err, err_size, "cannot read %s", path);
        return false;
    }
    fclose(f);
    return true;
}

static void fam_free(fam_case* c) { free(c->bin); }

static const fam_tensor* fam_find(const fam_case* c, const char* name) {
    int i;
    for (i = 0; i < c->tensors; ++i)
        if (strcmp(c->tensor[i].name, name) == 0) return &c->tensor[i];
    return NULL;
}

static long fam_elements(const fam_tensor* t) {
    long n = 1;
    int i;
    for (i = 0; i < t->dims; ++i) n *= t->shape[i];
    return n;
}

/* The fp32 tensor `name`, or NULL (the assertion names what is missing). */
static const float* fam_f32(const fam_case* c, const char* name) {
    const fam_tensor* t = fam_find(c, name);
    if (!t || strcmp(t->dtype, "f32") != 0 || t->offset + fam_elements(t) * 4 > c->bin_size) return NULL;
    return (const float*)(c->bin + t->offset);
}

static const double* fam_f64(const fam_case* c, const char* name) {
    const fam_tensor* t = fam_find(c, name);
    if (!t || strcmp(t->dtype, "f64") != 0 || t->offset + fam_elements(t) * 8 > c->bin_size) return NULL;
    return (const double*)(c->bin + t->offset);
}

/* A config value, or `fallback` when the case does not name it. */
static double fam_config(const fam_case* c, const char* key, double fallback) {
    int i;
    for (i = 0; i < c->configs; ++i)
        if (strcmp(c->config_key[i], key) == 0) return c->config_value[i];
    return fallback;
}

/* >>cases: each family's case as a check_model (pointers into the loaded arrays). */
typedef struct fam_model {
    check_model model;
    moe_ep_expert_weights experts[64];
    const float* x;
    const double* reference;
    int64_t tokens;
} fam_model;

typedef struct fam_spec {
    const char* name;               /* tests/families/<name>.txt */
    moe_ep_family family;
    const char* router;             /* state_dict names */
    const char* router_bias;
    const char* selection_bias;
    const char* shared_prefix;      /* "<prefix>.gate_proj.weight" ...; NULL: none */
    const char* shared_gate;
} fam_spec;

static const fam_spec fam_specs[] = {
    { "mixtral", MOE_EP_FAMILY_MIXTRAL, "gate.weight", NULL, NULL, NULL, NULL },
    { "qwen2_moe", MOE_EP_FAMILY_QWEN2_MOE, "gate.weight", NULL, NULL, "shared_expert", "shared_expert_gate.weight" },
    { "qwen3_moe", MOE_EP_FAMILY_QWEN3_MOE, "gate.weight", NULL, NULL, NULL, NULL },
    { "deepseek_v3", MOE_EP_FAMILY_DEEPSEEK_V3, "gate.weight", NULL, "gate.e_score_correction_bias", "shared_experts",
      NULL },
    { "deepseek_v3_nogroup", MOE_EP_FAMILY_DEEPSEEK_V3, "gate.weight", NULL, "gate.e_score_correction_bias",
      "shared_experts", NULL },
    { "gpt_oss", MOE_EP_FAMILY_GPT_OSS, "router.weight", "router.bias", NULL, NULL, NULL },
    { "llama4", MOE_EP_FAMILY_LLAMA4, "router.weight", NULL, NULL, "shared_expert", NULL },
    { "llama4_top2", MOE_EP_FAMILY_LLAMA4, "router.weight", NULL, NULL, "shared_expert", NULL },
};
#define FAM_SPECS ((int)(sizeof fam_specs / sizeof fam_specs[0]))

/* The desc of the family, with the case's config numbers, as a user would set them. */
static bool fam_model_init(fam_model* m, const fam_case* c, const fam_spec* spec, char* err, size_t err_size) {
    moe_ep_desc d = moe_ep_family_desc(spec->family);
    const float *gate_up = fam_f32(c, "experts.gate_up_proj"), *down = fam_f32(c, "experts.down_proj");
    const fam_tensor* x = fam_find(c, "input");
    int e, I;
    memset(m, 0, sizeof *m);
    d.d_model = (int)fam_config(c, "hidden_size", 0);
    d.d_ff = (int)fam_config(c, "moe_intermediate_size", fam_config(c, "intermediate_size", 0));
    d.num_experts = (int)fam_config(c, "num_experts", fam_config(c, "n_routed_experts",
                                                                 fam_config(c, "num_local_experts", 0)));
    d.top_k = (int)fam_config(c, "num_experts_per_tok", 0);
    if (spec->family != MOE_EP_FAMILY_MIXTRAL) d.normalize_topk = fam_config(c, "norm_topk_prob", 0) != 0;
    if (spec->family == MOE_EP_FAMILY_DEEPSEEK_V3) {
        d.num_groups = (int)fam_config(c, "n_group", 1);
        d.topk_groups = (int)fam_config(c, "topk_group", 1);
        d.routed_scaling_factor = (float)fam_config(c, "routed_scaling_factor", 1.0);
        d.shared.d_ff = (int)fam_config(c, "n_shared_experts", 0) * d.d_ff;
    }
    if (spec->family == MOE_EP_FAMILY_QWEN2_MOE) d.shared.d_ff = (int)fam_config(c, "shared_expert_intermediate_size", 0);
    if (spec->family == MOE_EP_FAMILY_LLAMA4) d.shared.d_ff = d.d_ff;       /* intermediate_size */
    /* transformers 5's fused tensors as they are: Mixtral, Qwen and DeepSeek in the fused
       gate_up layout; GPT-OSS's and Llama-4's transposed ones are their presets' layouts */
    if (d.weight_layout == MOE_EP_WEIGHT_LAYOUT_SEPARATE || d.weight_layout == MOE_EP_WEIGHT_LAYOUT_DEFAULT)
        d.weight_layout = MOE_EP_WEIGHT_LAYOUT_FUSED_GATE_UP;
    I = d.d_ff;
    if (!gate_up || !down || !x || !fam_f32(c, spec->router) || !fam_f64(c, "output_f64") || d.num_experts > 64 ||
        d.d_model <= 0 || I <= 0) {
        snprintf(err, err_size, "%s: a tensor or a config value is missing", c->name);
        return false;
    }
    for (e = 0; e < d.num_experts; ++e) {          /* expert e's slice of each [E, ...] tensor */
        const float *gate_up_bias = fam_f32(c, "experts.gate_up_proj_bias"), *down_bias = fam_f32(c, "experts.down_proj_bias");
        m->experts[e].w1 = gate_up + (size_t)e * 2 * (size_t)I * (size_t)d.d_model;
        m->experts[e].w2 = down + (size_t)e * (size_t)d.d_model * (size_t)I;
        if (gate_up_bias) m->experts[e].b1 = gate_up_bias + (size_t)e * 2 * (size_t)I;
        if (down_bias) m->experts[e].b2 = down_bias + (size_t)e * (size_t)d.d_model;
    }
    if (d.shared.d_ff > 0 && spec->shared_prefix) {
        char name[128];
        snprintf(name, sizeof name, "%s.gate_proj.weight", spec->shared_prefix);
        d.shared.weights.w1 = fam_f32(c, name);
        snprintf(name, sizeof name, "%s.up_proj.weight", spec->shared_prefix);
        d.shared.weights.w3 = fam_f32(c, name);
        snprintf(name, sizeof name, "%s.down_proj.weight", spec->shared_prefix);
        d.shared.weights.w2 = fam_f32(c, name);
        if (spec->shared_gate) d.shared.gate = fam_f32(c, spec->shared_gate);
    }
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
    m->model.routing.selection_bias = spec->selection_bias ? fam_f32(c, spec->selection_bias) : NULL;
    m->model.routing.router_bias = spec->router_bias ? fam_f32(c, spec->router_bias) : NULL;
    m->model.weight_layout = d.weight_layout;
    m->model.shared = d.shared;
    m->model.router = (float*)fam_f32(c, spec->router);
    m->model.experts = m->experts;
    m->x = fam_f32(c, "input");
    m->reference = fam_f64(c, "output_f64");
    m->tokens = fam_elements(x) / d.d_model;
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
