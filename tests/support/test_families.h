/* test_families.h -- the transformers reference cases of tests/families/ (gen_refs.py made
   them; README.md there gives the format): the loader, the case list, and the desc a user
   would write for a case: moe_ep_family_desc() plus the case's config values, with the
   checkpoint's tensors read as they are. Header only (static inline), plain C99 on libc and
   moe_ep.h; shared by the core suites and the MPI program. Paths are relative to the
   repository's root, where the tests run. */
#ifndef TEST_FAMILIES_H_INCLUDED
#define TEST_FAMILIES_H_INCLUDED

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "../../moe_ep.h"

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

static inline bool fam_load(fam_case* c, const char* name, char* err, size_t err_size) {
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
    {
        /* the arrays are little-endian (f32, i32, f64): into the host's byte order */
        const uint16_t one = 1;
        unsigned char first;
        int i, d;
        memcpy(&first, &one, 1);
        for (i = 0; first != 1 && i < c->tensors; ++i) {
            const fam_tensor* t = &c->tensor[i];
            long size = strcmp(t->dtype, "f64") == 0 ? 8 : 4, n = 1, e, b;
            unsigned char* p = c->bin + t->offset;
            for (d = 0; d < t->dims; ++d) n *= t->shape[d];
            if (t->offset < 0 || t->offset + n * size > c->bin_size) continue;     /* the accessors refuse it */
            for (e = 0; e < n; ++e, p += size)
                for (b = 0; b < size / 2; ++b) {
                    unsigned char tmp = p[b];
                    p[b] = p[size - 1 - b];
                    p[size - 1 - b] = tmp;
                }
        }
    }
    return true;
}

static inline void fam_free(fam_case* c) { free(c->bin); }

static inline const fam_tensor* fam_find(const fam_case* c, const char* name) {
    int i;
    for (i = 0; i < c->tensors; ++i)
        if (strcmp(c->tensor[i].name, name) == 0) return &c->tensor[i];
    return NULL;
}

static inline long fam_elements(const fam_tensor* t) {
    long n = 1;
    int i;
    for (i = 0; i < t->dims; ++i) n *= t->shape[i];
    return n;
}

/* The fp32 tensor `name`, or NULL (the assertion names what is missing). */
static inline const float* fam_f32(const fam_case* c, const char* name) {
    const fam_tensor* t = fam_find(c, name);
    if (!t || strcmp(t->dtype, "f32") != 0 || t->offset + fam_elements(t) * 4 > c->bin_size) return NULL;
    return (const float*)(c->bin + t->offset);
}

static inline const double* fam_f64(const fam_case* c, const char* name) {
    const fam_tensor* t = fam_find(c, name);
    if (!t || strcmp(t->dtype, "f64") != 0 || t->offset + fam_elements(t) * 8 > c->bin_size) return NULL;
    return (const double*)(c->bin + t->offset);
}

/* A config value, or `fallback` when the case does not name it. */
static inline double fam_config(const fam_case* c, const char* key, double fallback) {
    int i;
    for (i = 0; i < c->configs; ++i)
        if (strcmp(c->config_key[i], key) == 0) return c->config_value[i];
    return fallback;
}

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

/* The desc of a case as a user writes it: the family's preset, then the config's numbers and
   the tensors (experts: [64], global ids; desc->experts points at it). */
static inline bool fam_desc(const fam_case* c, const fam_spec* spec, moe_ep_expert_weights* experts, moe_ep_desc* out,
                            char* err, size_t err_size) {
    moe_ep_desc d = moe_ep_family_desc(spec->family);
    const float *gate_up = fam_f32(c, "experts.gate_up_proj"), *down = fam_f32(c, "experts.down_proj");
    const float *gate_up_bias = fam_f32(c, "experts.gate_up_proj_bias"), *down_bias = fam_f32(c, "experts.down_proj_bias");
    int e, I;
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
    if (!gate_up || !down || !fam_f32(c, spec->router) || !fam_f32(c, "input") || !fam_f64(c, "output_f64") ||
        d.num_experts > 64 || d.d_model <= 0 || I <= 0) {
        snprintf(err, err_size, "%s: a tensor or a config value is missing", c->name);
        return false;
    }
    memset(experts, 0, sizeof *experts * (size_t)d.num_experts);
    for (e = 0; e < d.num_experts; ++e) {          /* expert e's slice of each [E, ...] tensor */
        experts[e].w1 = gate_up + (size_t)e * 2 * (size_t)I * (size_t)d.d_model;
        experts[e].w2 = down + (size_t)e * (size_t)d.d_model * (size_t)I;
        if (gate_up_bias) experts[e].b1 = gate_up_bias + (size_t)e * 2 * (size_t)I;
        if (down_bias) experts[e].b2 = down_bias + (size_t)e * (size_t)d.d_model;
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
    d.router_weight = fam_f32(c, spec->router);
    d.router_bias = spec->router_bias ? fam_f32(c, spec->router_bias) : NULL;
    d.selection_bias = spec->selection_bias ? fam_f32(c, spec->selection_bias) : NULL;
    d.experts = experts;
    *out = d;
    return true;
}

/* The case's tokens: input [tokens, d_model] fp32 and transformers' float64 output. */
static inline int64_t fam_tokens(const fam_case* c, int d_model) {
    const fam_tensor* x = fam_find(c, "input");
    return x && d_model > 0 ? fam_elements(x) / d_model : 0;
}

#endif
