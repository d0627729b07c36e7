/* check_safetensors.c -- moe_ep_safetensors.h against models written by transformers.

   tests/data/<model>/ holds a tiny random model of each family, written by transformers'
   own save_pretrained (tests/data/gen_models.py; README.md there), and reference.safetensors:
   the input of every MoE layer in a forward pass and the block's output from transformers.
   Each MoE layer is loaded rank by rank (each rank thread opens the model and loads its own
   experts, one call per rank), run at 1, 2, 3, 4 and 8 pthreads ranks: within 1e-5 of
   transformers' float64 output, bitwise equal across rank counts. Dense layers are refused with their rule;
   bad files (made here from the good ones) get errors that name the file and the tensor, and
   leave nothing allocated; a rank of 8 holds its share of the experts and no more. */
#define _POSIX_C_SOURCE 200809L   /* mkdtemp, ftruncate */
#include "check_moe_ep.h"
#include "../moe_ep_safetensors.h"

#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define ST_DATA "tests/data/"
#define ST_MAX_RANKS 8

/* >>runner: R rank threads, each opens the model, loads its layer and runs its tokens. */
typedef struct st_run {
    const char* dir;
    int layer, ranks;
    int64_t tokens;
    const float* x;                 /* [tokens, d] */
    float* y;                       /* [tokens, d] */
    int d_model;
    moe_ep_placement placement;     /* default contiguous */
    moe_ep_allocator allocator;
    moe_ep_result result[ST_MAX_RANKS];
    char error[ST_MAX_RANKS][512];
} st_run;

typedef struct st_rank_arg { st_run* run; } st_rank_arg;

static void st_share(int64_t tokens, int ranks, int rank, int64_t* first, int64_t* count) {
    *first = tokens * rank / ranks;
    *count = tokens * (rank + 1) / ranks - *first;
}

static moe_ep_result st_rank(const moe_ep_transport* transport, void* user_data) {
    st_run* run = (st_run*)user_data;
    int rank = transport->rank;
    moe_ep_model* model = NULL;
    moe_ep_model_layer* layer = NULL;
    moe_ep_context* ctx = NULL;
    moe_ep_desc d;
    int64_t first, count;
    moe_ep_result r;
    r = moe_ep_model_open(&(moe_ep_model_desc){ .path = run->dir, .allocator = run->allocator }, &model,
                          run->error[rank], sizeof run->error[rank]);
    if (r == MOE_EP_OK)
        r = moe_ep_model_load_layer(model, &(moe_ep_model_layer_desc){ .layer = run->layer, .rank = rank,
                                                                        .world_size = run->ranks,
                                                                        .placement = run->placement },
                                    &layer, run->error[rank], sizeof run->error[rank]);
    moe_ep_model_close(model);
    if (r == MOE_EP_OK) {
        d = moe_ep_model_layer_query(layer);
        d.transport = transport;
        d.num_threads = 1;
        d.allocator = run->allocator;
        r = moe_ep_create(&d, &ctx);
        moe_ep_model_layer_free(layer);     /* create copied what it needs */
        if (r != MOE_EP_OK) snprintf(run->error[rank], sizeof run->error[rank], "moe_ep_create failed");
    }
    if (r == MOE_EP_OK) {
        st_share(run->tokens, run->ranks, rank, &first, &count);
        r = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = count, .x = run->x + first * run->d_model,
                                                        .y = run->y + first * run->d_model });
        if (r != MOE_EP_OK) snprintf(run->error[rank], sizeof run->error[rank], "forward: %s", moe_ep_last_error(ctx));
    }
    moe_ep_destroy(ctx);
    run->result[rank] = r;
    return r;
}

static moe_ep_result st_run_layer(st_run* run) {
    moe_ep_pthreads_world* world = NULL;
    moe_ep_result results[ST_MAX_RANKS], r;
    int i;
    for (i = 0; i < ST_MAX_RANKS; ++i) { run->result[i] = MOE_EP_OK; run->error[i][0] = '\0'; }
    r = moe_ep_pthreads_world_create(&(moe_ep_pthreads_desc){ .world_size = run->ranks, .timeout_ms = 60000 }, &world);
    if (r != MOE_EP_OK) return r;
    r = moe_ep_pthreads_run(world, st_rank, run, results);
    moe_ep_pthreads_world_destroy(world);
    return r;
}

static const char* st_errors(const st_run* run, char* out, size_t size) {
    int i;
    size_t used = 0;
    out[0] = '\0';
    for (i = 0; i < run->ranks && used < size; ++i)
        if (run->error[i][0]) used += (size_t)snprintf(out + used, size - used, "[rank %d] %s ", i, run->error[i]);
    return out;
}

/* >>references: reference.safetensors, read as raw arrays. */
typedef struct st_ref {
    moe_ep_st_file* file;
    int moe_layers[16], moe_count, dense_layers[16], dense_count;
} st_ref;

static void st_layers(const char* text, int* out, int* count) {
    *count = 0;
    while (text && *text && *count < 16) {
        out[(*count)++] = (int)strtol(text, (char**)&text, 10);
        if (*text == ',') text++;
    }
}

static bool st_ref_open(st_ref* ref, const char* model, char* err, size_t err_size) {
    char path[256];
    memset(ref, 0, sizeof *ref);
    snprintf(path, sizeof path, ST_DATA "%s/reference.safetensors", model);
    if (moe_ep_st_open(path, NULL, NULL, &ref->file, err, err_size) != MOE_EP_OK) return false;
    st_layers(moe_ep_st_metadata(ref->file, "moe_layers"), ref->moe_layers, &ref->moe_count);
    st_layers(moe_ep_st_metadata(ref->file, "dense_layers"), ref->dense_layers, &ref->dense_count);
    return true;
}

/* n little-endian words of `size` bytes (a safetensors file's order) into the host's order. */
static void st_to_host(void* data, size_t n, size_t size) {
    const uint16_t one = 1;
    unsigned char first, *p = (unsigned char*)data;
    size_t i, b;
    memcpy(&first, &one, 1);
    if (first == 1) return;
    for (i = 0; i < n; ++i, p += size)
        for (b = 0; b < size / 2; ++b) {
            unsigned char tmp = p[b];
            p[b] = p[size - 1 - b];
            p[size - 1 - b] = tmp;
        }
}

/* Tensor layers.<layer>.<what> as a fresh array (float or double, in the host's byte order),
   its element count in *n. */
static void* st_ref_read(st_ref* ref, int layer, const char* what, moe_ep_st_dtype want, int64_t* n) {
    char name[96], err[512];
    const moe_ep_st_tensor* t;
    void* out;
    snprintf(name, sizeof name, "layers.%d.%s", layer, what);
    t = moe_ep_st_find(ref->file, name);
    if (!t) return NULL;
    ck_assert_msg(t->dtype == want, "%s: dtype %s", name, moe_ep_st_dtype_string(t->dtype));
    out = malloc((size_t)t->size);
    ck_assert_msg(moe_ep_st_read(ref->file, t, 0, out, t->size, err, sizeof err) == MOE_EP_OK, "%s", err);
    *n = (int64_t)(t->size / (want == MOE_EP_ST_F64 ? 8 : 4));
    st_to_host(out, (size_t)*n, want == MOE_EP_ST_F64 ? 8 : 4);
    return out;
}

/* max |a - b| / max |b| */
static double st_rel(const float* a, const double* b, int64_t n) {
    double num = 0, den = 0;
    int64_t i;
    for (i = 0; i < n; ++i) {
        double e = fabs((double)a[i] - b[i]);
        if (!(e <= num)) num = e;
        if (fabs(b[i]) > den) den = fabs(b[i]);
    }
    return den > 0 ? num / den : num;
}

/* >>equality */
typedef struct st_model_case {
    const char* model;
    const char* same_as;            /* the same weights under the other naming: bitwise the same output */
    const char* note;               /* how the weights are stored */
} st_model_case;

static const st_model_case st_models[] = {
    { "mixtral", NULL, "F32, published per-expert names (block_sparse_moe.experts.N.w1), one file" },
    { "mixtral_fused", "mixtral", "F32, transformers 5's fused names (mlp.experts.gate_up_proj), 3 shards" },
    { "qwen2_moe", NULL, "F32, per-expert names, shared expert with its gate, mlp_only_layers" },
    { "qwen2_moe_fused", "qwen2_moe", "F32, fused names, 3 shards" },
    { "qwen3_moe", NULL, "BF16, sharded by save_pretrained (4 files), decoder_sparse_step 2" },
    { "deepseek_v3", NULL, "F32, per-expert names, groups, selection bias, shared expert, first_k_dense_replace" },
    { "deepseek_v3_fused", "deepseek_v3", "F32, fused names, 3 shards" },
    { "deepseek_v3_fp8", NULL, "F8_E4M3 with 16x16 weight_scale_inv blocks, per-expert names, 2 shards" },
    { "deepseek_v2", NULL, "F32, softmax greedy top-k, routed_scaling_factor, two shared experts" },
    { "gpt_oss", NULL, "F32, fused (as published), router and expert biases, clamped SwiGLU" },
    { "gpt_oss_mxfp4", NULL, "MXFP4 experts (_blocks, _scales)" },
    { "llama4", NULL, "F32, Llama4ForCausalLM, fused (as published), moe_layers [1]" },
};
#define ST_MODELS ((int)(sizeof st_models / sizeof st_models[0]))

static bool st_have(const char* model) {
    char path[256];
    struct stat st;
    snprintf(path, sizeof path, ST_DATA "%s/config.json", model);
    return stat(path, &st) == 0;
}

/* Runs every MoE layer of `model` at 1, 2, 3, 4 and 8 ranks; y_out (optional) gets the 1-rank outputs, layer after layer. */
static void st_check_model(const st_model_case* mc, float** y_out, int64_t* y_size) {
    st_ref ref;
    char err[2048], dir[256];
    int li, R;
    int64_t total = 0;
    float* all = NULL;
    ck_assert_msg(st_have(mc->model), "tests/data/%s is missing (tests/data/gen_models.py makes it)", mc->model);
    ck_assert_msg(st_ref_open(&ref, mc->model, err, sizeof err), "%s", err);
    ck_assert_msg(ref.moe_count > 0, "%s: no MoE layer in the reference", mc->model);
    snprintf(dir, sizeof dir, ST_DATA "%s", mc->model);
    for (li = 0; li < ref.moe_count; ++li) {
        int layer = ref.moe_layers[li];
        int64_t n, n64, nq = 0;
        float* x = (float*)st_ref_read(&ref, layer, "input", MOE_EP_ST_F32, &n);
        double* y64 = (double*)st_ref_read(&ref, layer, "output_f64", MOE_EP_ST_F64, &n64);
        double* orig = (double*)st_ref_read(&ref, layer, "output_orig_f64", MOE_EP_ST_F64, &nq);
        float *y1 = (float*)malloc(sizeof(float) * (size_t)n), *yr = (float*)malloc(sizeof(float) * (size_t)n);
        st_run run;
        ck_assert_msg(x && y64 && n == n64, "%s layer %d: reference tensors missing", mc->model, layer);
        for (R = 1; R <= 8; R = R < 4 ? R + 1 : 2 * R) {    /* 1, 2, 3, 4, 8 */
            memset(&run, 0, sizeof run);
            run.dir = dir;
            run.layer = layer;
            run.ranks = R;
            run.x = x;
            run.y = R == 1 ? y1 : yr;
            {
                char name[64];
                snprintf(name, sizeof name, "layers.%d.input", layer);
                run.d_model = (int)moe_ep_st_find(ref.file, name)->shape[1];
            }
            run.tokens = n / run.d_model;
            test_poison(run.y, (size_t)n);
            ck_assert_msg(st_run_layer(&run) == MOE_EP_OK, "%s layer %d at %d ranks: %s", mc->model, layer, R,
                          st_errors(&run, err, sizeof err));
            {   /* every element written, none NaN */
                int64_t i;
                for (i = 0; i < n && run.y[i] == run.y[i]; ++i) continue;
                ck_assert_msg(i == n, "%s layer %d at %d ranks: element %lld unwritten or NaN", mc->model, layer, R,
                              (long long)i);
            }
            if (R == 1) {
                double e = st_rel(y1, y64, n);
                ck_assert_msg(e <= 1e-5, "%s layer %d: relative error %.3g against transformers' float64 output",
                              mc->model, layer, e);
                if (orig) {     /* quantised: our error against the unquantised block is the format's own */
                    double fmt = 0, den = 0, ours;
                    int64_t i;
                    for (i = 0; i < n; ++i) {
                        if (fabs(y64[i] - orig[i]) > fmt) fmt = fabs(y64[i] - orig[i]);
                        if (fabs(orig[i]) > den) den = fabs(orig[i]);
                    }
                    ours = st_rel(y1, orig, n);
                    ck_assert_msg(ours <= fmt / den + 1e-5, "%s layer %d: %.3g from the unquantised block, the format's "
                                  "own error is %.3g", mc->model, layer, ours, fmt / den);
                }
            } else {
                ck_assert_msg(memcmp(y1, yr, sizeof(float) * (size_t)n) == 0, "%s layer %d: %d ranks differ from 1 rank",
                              mc->model, layer, R);
            }
        }
        all = (float*)realloc(all, sizeof(float) * (size_t)(total + n));
        memcpy(all + total, y1, sizeof(float) * (size_t)n);
        total += n;
        free(x); free(y64); free(orig); free(y1); free(yr);
    }
    moe_ep_st_close(ref.file);
    if (y_out) { *y_out = all; *y_size = total; } else free(all);
}

START_TEST(st_layers_match_transformers) {
    const st_model_case* mc = &st_models[_i];
    float *y = NULL, *same = NULL;
    int64_t n = 0, m = 0;
    st_check_model(mc, &y, &n);
    if (mc->same_as) {
        const st_model_case* other = NULL;
        int i;
        for (i = 0; i < ST_MODELS; ++i)
            if (strcmp(st_models[i].model, mc->same_as) == 0) other = &st_models[i];
        st_check_model(other, &same, &m);
        ck_assert_msg(n == m && memcmp(y, same, sizeof(float) * (size_t)n) == 0,
                      "%s: not bitwise the output of %s (the same weights)", mc->model, mc->same_as);
    }
    free(y);
    free(same);
}
END_TEST

/* >>reads: over the ranks of R, the experts' bytes are read once: the sum of what R ranks read
   is R times what a rank without experts reads (router, biases, shared experts) plus what one
   rank holding every expert reads beyond that. */
START_TEST(st_reads_own_experts) {
    const st_model_case* mc = &st_models[_i];
    static const int worlds[] = { 2, 3, 4, 8 };
    char dir[256], err[512];
    st_ref ref;
    moe_ep_model* model;
    moe_ep_model_layer* layer;
    moe_ep_model_info info;
    uint64_t all, none, sum;
    int w, r;
    snprintf(dir, sizeof dir, ST_DATA "%s", mc->model);
    ck_assert_msg(st_ref_open(&ref, mc->model, err, sizeof err), "%s", err);
    ck_assert_msg(moe_ep_model_open(&(moe_ep_model_desc){ .path = dir }, &model, err, sizeof err) == MOE_EP_OK, "%s", err);
    info = moe_ep_model_query(model);
    ck_assert_msg(moe_ep_model_load_layer(model, &(moe_ep_model_layer_desc){ .layer = ref.moe_layers[0] }, &layer, err,
                                          sizeof err) == MOE_EP_OK, "%s", err);
    all = moe_ep_model_layer_bytes_read(layer);
    moe_ep_model_layer_free(layer);
    /* one rank more than experts: the last holds none */
    ck_assert(moe_ep_model_load_layer(model, &(moe_ep_model_layer_desc){ .layer = ref.moe_layers[0],
                                      .rank = info.num_experts, .world_size = info.num_experts + 1 }, &layer, err,
                                      sizeof err) == MOE_EP_OK);
    ck_assert_int_eq(moe_ep_model_layer_experts(layer, NULL), 0);
    none = moe_ep_model_layer_bytes_read(layer);
    moe_ep_model_layer_free(layer);
    ck_assert_msg(none > 0 && none < all, "%s: %llu bytes without experts, %llu with all", mc->model,
                  (unsigned long long)none, (unsigned long long)all);
    for (w = 0; w < 4; ++w) {
        for (sum = 0, r = 0; r < worlds[w]; ++r) {
            ck_assert(moe_ep_model_load_layer(model, &(moe_ep_model_layer_desc){ .layer = ref.moe_layers[0], .rank = r,
                                              .world_size = worlds[w] }, &layer, err, sizeof err) == MOE_EP_OK);
            sum += moe_ep_model_layer_bytes_read(layer);
            moe_ep_model_layer_free(layer);
        }
        ck_assert_msg(sum == (uint64_t)worlds[w] * none + (all - none), "%s at %d ranks: %llu bytes read, expected %llu",
                      mc->model, worlds[w], (unsigned long long)sum,
                      (unsigned long long)((uint64_t)worlds[w] * none + (all - none)));
    }
    moe_ep_model_close(model);
    moe_ep_st_close(ref.file);
}
END_TEST

/* >>dense: a dense layer is refused with its config rule. */
START_TEST(st_dense_layer_refused) {
    static const struct { const char* model; int layer; const char* rule; } cases[] = {
        { "qwen2_moe", 1, "mlp_only_layers" },
        { "qwen3_moe", 0, "decoder_sparse_step" },
        { "deepseek_v3", 0, "first_k_dense_replace" },
        { "llama4", 0, "moe_layers" },
    };
    int i;
    for (i = 0; i < (int)(sizeof cases / sizeof cases[0]); ++i) {
        char dir[256], err[512] = "";
        moe_ep_model* model;
        moe_ep_model_layer* layer = (moe_ep_model_layer*)&err;   /* must stay untouched */
        snprintf(dir, sizeof dir, ST_DATA "%s", cases[i].model);
        ck_assert_msg(moe_ep_model_open(&(moe_ep_model_desc){ .path = dir }, &model, err, sizeof err) == MOE_EP_OK, "%s", err);
        ck_assert(!moe_ep_model_layer_is_moe(model, cases[i].layer, NULL, 0));
        ck_assert_int_eq(moe_ep_model_load_layer(model, &(moe_ep_model_layer_desc){ .layer = cases[i].layer }, &layer,
                                                 err, sizeof err), MOE_EP_ERROR_INVALID_ARGUMENT);
        ck_assert_ptr_eq(layer, (moe_ep_model_layer*)&err);
        ck_assert_msg(strstr(err, "dense") && strstr(err, cases[i].rule) && strstr(err, "config.json"),
                      "%s layer %d: %s", cases[i].model, cases[i].layer, err);
        moe_ep_model_close(model);
    }
}
END_TEST

/* >>files: helpers that copy a model and break one thing. */
static char* st_slurp(const char* path, size_t* size) {
    FILE* f = fopen(path, "rb");
    char* data;
    long n;
    ck_assert_msg(f != NULL, "cannot open %s", path);
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    data = (char*)malloc((size_t)n + 1);
    ck_assert(fread(data, 1, (size_t)n, f) == (size_t)n);
    fclose(f);
    data[n] = '\0';
    *size = (size_t)n;
    return data;
}

static void st_spit(const char* path, const void* data, size_t size) {
    FILE* f = fopen(path, "wb");
    ck_assert_msg(f != NULL, "cannot write %s", path);
    ck_assert(fwrite(data, 1, size, f) == size);
    fclose(f);
}

/* A fresh copy of tests/data/<model> in a temporary directory (its path in dir). */
static void st_copy_model(const char* model, char* dir, size_t dir_size) {
    static const char* const files[] = { "config.json", "model.safetensors", "model.safetensors.index.json",
                                         "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                                         "model-00003-of-00003.safetensors" };
    char tmpl[] = "/tmp/moe_ep_st_XXXXXX", src[320], dst[320];
    size_t i, size;
    ck_assert(mkdtemp(tmpl) != NULL);
    snprintf(dir, dir_size, "%s", tmpl);
    for (i = 0; i < sizeof files / sizeof files[0]; ++i) {
        struct stat st;
        char* data;
        snprintf(src, sizeof src, ST_DATA "%s/%s", model, files[i]);
        if (stat(src, &st) != 0) continue;
        data = st_slurp(src, &size);
        snprintf(dst, sizeof dst, "%s/%s", dir, files[i]);
        st_spit(dst, data, size);
        free(data);
    }
}

static void st_remove_model(const char* dir) {
    static const char* const files[] = { "config.json", "model.safetensors", "model.safetensors.index.json",
                                         "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                                         "model-00003-of-00003.safetensors" };
    char path[320];
    size_t i;
    for (i = 0; i < sizeof files / sizeof files[0]; ++i) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        unlink(path);
    }
    rmdir(dir);
}

/* text with the first `from` replaced by `to` (a fresh string). */
static char* st_replace(const char* text, const char* from, const char* to) {
    const char* at = strstr(text, from);
    char* out;
    size_t head, n;
    ck_assert_msg(at != NULL, "'%s' not found", from);
    head = (size_t)(at - text);
    n = strlen(text) - strlen(from) + strlen(to);
    out = (char*)malloc(n + 1);
    memcpy(out, text, head);
    memcpy(out + head, to, strlen(to));
    strcpy(out + head + strlen(to), at + strlen(from));
    return out;
}

static char* st_replace_all(const char* text, const char* from, const char* to) {
    char* out = st_replace(text, from, to);
    while (strstr(out, from)) {
        char* next = st_replace(out, from, to);
        free(out);
        out = next;
    }
    return out;
}

/* The JSON header of a safetensors file, and its data. */
static char* st_header(const char* path, char** data, size_t* data_size) {
    size_t size;
    char* file = st_slurp(path, &size);
    uint64_t n = 0;
    int i;
    char* header;
    for (i = 7; i >= 0; --i) n = (n << 8) | (unsigned char)file[i];
    header = (char*)malloc((size_t)n + 1);
    memcpy(header, file + 8, (size_t)n);
    header[n] = '\0';
    *data_size = size - 8 - (size_t)n;
    *data = (char*)malloc(*data_size + 1);
    memcpy(*data, file + 8 + n, *data_size);
    free(file);
    return header;
}

static void st_write_safetensors(const char* path, const char* header, const void* data, size_t data_size) {
    size_t n = strlen(header), i;
    unsigned char* file = (unsigned char*)malloc(8 + n + data_size);
    for (i = 0; i < 8; ++i) file[i] = (unsigned char)((uint64_t)n >> (8 * i));
    memcpy(file + 8, header, n);
    memcpy(file + 8 + n, data, data_size);
    st_spit(path, file, 8 + n + data_size);
    free(file);
}

/* The `"data_offsets":[a,b]` text of tensor `name` in header, into out. */
static void st_offsets_text(const char* header, const char* name, char* out, size_t size, uint64_t* begin, uint64_t* end) {
    char key[256];
    const char *at, *off, *close;
    snprintf(key, sizeof key, "\"%s\":", name);
    at = strstr(header, key);
    ck_assert_msg(at != NULL, "tensor %s not in the header", name);
    off = strstr(at, "\"data_offsets\":[");
    close = strchr(off, ']');
    snprintf(out, size, "%.*s", (int)(close - off + 1), off);
    ck_assert(sscanf(off, "\"data_offsets\":[%llu,%llu]", (unsigned long long*)begin, (unsigned long long*)end) == 2);
}

/* Opens dir and loads `layer` on rank 0 of 2 with a counting allocator: the result, the error
   in err; asserts that nothing stays allocated and the out-param is untouched on failure. */
static moe_ep_result st_try(const char* dir, int layer, char* err, size_t err_size) {
    test_counter counter;
    moe_ep_model* model = NULL;
    moe_ep_model_layer* loaded = (moe_ep_model_layer*)&counter;
    moe_ep_result r;
    test_counter_init(&counter);
    err[0] = '\0';
    r = moe_ep_model_open(&(moe_ep_model_desc){ .path = dir, .allocator = test_counter_allocator(&counter) }, &model,
                          err, err_size);
    if (r == MOE_EP_OK) {
        r = moe_ep_model_load_layer(model, &(moe_ep_model_layer_desc){ .layer = layer, .rank = 0, .world_size = 2 },
                                    &loaded, err, err_size);
        if (r == MOE_EP_OK) moe_ep_model_layer_free(loaded);
        else ck_assert_ptr_eq(loaded, (moe_ep_model_layer*)&counter);
        moe_ep_model_close(model);
    } else {
        ck_assert_ptr_null(model);
    }
    ck_assert_int_eq(test_counter_outstanding(&counter), 0);
    test_counter_destroy(&counter);
    return r;
}

/* Asserts a failure whose message holds every one of up to three phrases. */
static void st_expect(const char* what, const char* dir, int layer, const char* a, const char* b, const char* c) {
    char err[1024];
    moe_ep_result r = st_try(dir, layer, err, sizeof err);
    ck_assert_msg(r != MOE_EP_OK, "%s: loaded without an error", what);
    ck_assert_msg(err[0] && (!a || strstr(err, a)) && (!b || strstr(err, b)) && (!c || strstr(err, c)),
                  "%s: the error does not name [%s] [%s] [%s]: %s", what, a ? a : "", b ? b : "", c ? c : "", err);
}

#define ST_ROUTER0 "model.layers.0.block_sparse_moe.gate.weight"
#define ST_DOWN0 "model.layers.0.block_sparse_moe.experts.3.w2.weight"

/* >>bad safetensors files: mixtral (one file) with one thing broken. */
START_TEST(st_bad_safetensors) {
    char dir[256], path[320], err[1024], text[160], other[160];
    char *header, *data, *bad;
    size_t data_size;
    uint64_t begin, end, b2, e2;
    st_copy_model("mixtral", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    ck_assert_msg(st_try(dir, 0, err, sizeof err) == MOE_EP_OK, "the copy itself: %s", err);
    header = st_header(path, &data, &data_size);

    /* truncated: the last tensor runs past the end */
    st_write_safetensors(path, header, data, data_size - 100);
    st_expect("truncated file", dir, 0, "model.safetensors", "tensor '", "truncated");
    /* the header's length past the end of the file */
    {
        size_t n = strlen(header), i;
        unsigned char* file = (unsigned char*)malloc(8 + n);
        uint64_t len = n + 1000;
        for (i = 0; i < 8; ++i) file[i] = (unsigned char)(len >> (8 * i));
        memcpy(file + 8, header, n);
        st_spit(path, file, 8 + n);
        free(file);
        st_expect("header length past the end", dir, 0, "model.safetensors", "header length", "past the end");
        st_spit(path, "\x05\x00\x00", 3);
        st_expect("a 3-byte file", dir, 0, "model.safetensors", "too short", NULL);
    }
    /* offsets that run backwards, overlap, leave a gap, overflow */
    st_offsets_text(header, ST_ROUTER0, text, sizeof text, &begin, &end);
    snprintf(other, sizeof other, "\"data_offsets\":[%llu,%llu]", (unsigned long long)end, (unsigned long long)begin);
    bad = st_replace(header, text, other);
    st_write_safetensors(path, bad, data, data_size);
    free(bad);
    st_expect("backwards offsets", dir, 0, ST_ROUTER0, "backwards", "model.safetensors");
    {
        char moved[160], key[300];
        moe_ep_st_file* good;
        const moe_ep_st_tensor *first = NULL, *last = NULL;
        int i;
        /* the tensor that ends the data moved onto the start of the first: an overlap */
        free(header);
        free(data);
        st_copy_model("mixtral", other, sizeof other);     /* a good copy to read the offsets from */
        snprintf(key, sizeof key, "%s/model.safetensors", other);
        ck_assert_msg(moe_ep_st_open(key, NULL, NULL, &good, err, sizeof err) == MOE_EP_OK, "%s", err);
        for (i = 0; i < moe_ep_st_tensor_count(good); ++i) {
            const moe_ep_st_tensor* t = moe_ep_st_tensor_at(good, i);
            if (!first || t->offset < first->offset) first = t;
            if (!last || t->offset > last->offset) last = t;
        }
        header = st_header(key, &data, &data_size);
        st_offsets_text(header, last->name, text, sizeof text, &b2, &e2);
        snprintf(moved, sizeof moved, "\"data_offsets\":[%llu,%llu]", (unsigned long long)0,
                 (unsigned long long)(e2 - b2));
        bad = st_replace(header, text, moved);
        st_write_safetensors(path, bad, data, data_size);
        free(bad);
        st_expect("overlapping offsets", dir, 0, "overlaps", "model.safetensors", first->name);
        moe_ep_st_close(good);
        st_remove_model(other);
        st_offsets_text(header, ST_ROUTER0, text, sizeof text, &begin, &end);
        snprintf(moved, sizeof moved, "\"data_offsets\":[%llu,18446744073709551615]", (unsigned long long)begin);
        bad = st_replace(header, text, moved);
        st_write_safetensors(path, bad, data, data_size);
        free(bad);
        st_expect("offsets at 2^64 - 1", dir, 0, ST_ROUTER0, "data_offsets", "model.safetensors");
        snprintf(moved, sizeof moved, "\"data_offsets\":[%llu,184467440737095516150]", (unsigned long long)begin);
        bad = st_replace(header, text, moved);
        st_write_safetensors(path, bad, data, data_size);
        free(bad);
        st_expect("offsets past 2^64", dir, 0, "model.safetensors", "integer out of range", "line 1");
    }
    /* a shape whose element count overflows */
    bad = st_replace(header, "\"shape\":[8,32]", "\"shape\":[4294967296,4294967296,4294967296]");
    st_write_safetensors(path, bad, data, data_size);
    free(bad);
    st_expect("overflowing shape", dir, 0, ST_ROUTER0, "overflows", "model.safetensors");
    /* a dtype, a shape that do not match the config */
    bad = st_replace(header, "\"dtype\":\"F32\",\"shape\":[8,32]", "\"dtype\":\"I32\",\"shape\":[8,32]");
    st_write_safetensors(path, bad, data, data_size);
    free(bad);
    st_expect("I32 router", dir, 0, ST_ROUTER0, "I32", "not supported");
    bad = st_replace(header, "\"dtype\":\"F32\",\"shape\":[8,32]", "\"dtype\":\"F32\",\"shape\":[16,16]");
    st_write_safetensors(path, bad, data, data_size);
    free(bad);
    st_expect("router of the wrong shape", dir, 0, ST_ROUTER0, "[16, 16]", "[8, 32]");
    bad = st_replace(header, "\"dtype\":\"F32\",\"shape\":[8,32]", "\"dtype\":\"F6_E9M9\",\"shape\":[8,32]");
    st_write_safetensors(path, bad, data, data_size);
    free(bad);
    st_expect("unknown dtype", dir, 0, ST_ROUTER0, "unknown dtype", "model.safetensors");
    /* missing tensors: the router, the experts' down projection */
    bad = st_replace(header, "\"" ST_ROUTER0 "\"", "\"model.layers.0.block_sparse_moe.gate.weigh_\"");
    st_write_safetensors(path, bad, data, data_size);
    free(bad);
    st_expect("missing router", dir, 0, ST_ROUTER0, "missing", "model.safetensors");
    bad = st_replace(header, "\"" ST_DOWN0 "\"", "\"model.layers.0.block_sparse_moe.experts.3.w2.weighX\"");
    st_write_safetensors(path, bad, data, data_size);
    free(bad);
    st_expect("missing down_proj", dir, 0, ST_DOWN0, "missing", "model.safetensors");
    /* malformed JSON in the header: a bad escape, invalid UTF-8, deep nesting, a duplicate name */
    bad = st_replace(header, "\"" ST_ROUTER0 "\"", "\"model.layers.0.block_sparse_moe.gate.\\qeight\"");
    st_write_safetensors(path, bad, data, data_size);
    free(bad);
    st_expect("bad escape", dir, 0, "model.safetensors", "bad escape", "malformed JSON");
    bad = st_replace(header, "\"" ST_ROUTER0 "\"", "\"model.layers.0.block_sparse_moe.gate.\xC3\x28weight\"");
    st_write_safetensors(path, bad, data, data_size);
    free(bad);
    st_expect("invalid UTF-8", dir, 0, "model.safetensors", "invalid UTF-8", NULL);
    {
        size_t depth = 5000, n = strlen(header);
        char* deep = (char*)malloc(n + 2 * depth + 32);
        strcpy(deep, "{\"x\":");
        memset(deep + 5, '[', depth);
        memset(deep + 5 + depth, ']', depth);
        deep[5 + 2 * depth] = ',';
        strcpy(deep + 6 + 2 * depth, header + 1);
        st_write_safetensors(path, deep, data, data_size);
        free(deep);
        st_expect("deep nesting", dir, 0, "model.safetensors", "nesting deeper than 64", NULL);
    }
    bad = st_replace(header, "\"" ST_DOWN0 "\"", "\"" ST_ROUTER0 "\"");
    st_write_safetensors(path, bad, data, data_size);
    free(bad);
    st_expect("duplicate tensor", dir, 0, ST_ROUTER0, "twice", "model.safetensors");
    free(header);
    free(data);
    st_remove_model(dir);
}
END_TEST

/* >>bad model directories: a shard named in the index that is absent; shards that disagree. */
START_TEST(st_bad_shards) {
    char dir[256], path[320], err[1024];
    size_t size;
    char *index, *bad;
    st_copy_model("mixtral_fused", dir, sizeof dir);
    ck_assert_msg(st_try(dir, 1, err, sizeof err) == MOE_EP_OK, "the copy itself: %s", err);
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    index = st_slurp(path, &size);
    /* the index puts tensors in a shard that does not hold them */
    bad = st_replace_all(index, "model-00002-of-00003.safetensors", "model-00001-of-00003.safetensors");
    st_spit(path, bad, strlen(bad));
    free(bad);
    st_expect("tensors not where the index says", dir, 1, "model-00001-of-00003.safetensors", "missing", "tensor '");
    bad = st_replace(index, "model-00002-of-00003.safetensors", "../model-00002-of-00003.safetensors");
    st_spit(path, bad, strlen(bad));
    free(bad);
    st_expect("a shard outside the directory", dir, 1, "model.safetensors.index.json", "weight_map", "tensor '");
    st_spit(path, index, strlen(index));
    snprintf(path, sizeof path, "%s/model-00002-of-00003.safetensors", dir);
    unlink(path);
    st_expect("absent shard", dir, 1, "model-00002-of-00003.safetensors", "model.safetensors.index.json", "tensor '");
    free(index);
    st_remove_model(dir);
}
END_TEST

/* >>bad config.json: malformed JSON and numbers that contradict each other. */
START_TEST(st_bad_config) {
    static const struct { const char* model; const char* from; const char* to; const char* a; const char* b; const char* c; } cases[] = {
        { "mixtral", "\"hidden_size\": 32", "\"hidden_size\": 1e999", "config.json", "out of range", NULL },
        { "mixtral", "\"hidden_size\": 32", "\"hidden_size\": 123456789012345678901234567890", "config.json",
          "integer out of range", NULL },
        { "mixtral", "\"hidden_size\": 32", "\"hidden_size\": 4294967296", "hidden_size", "must be in", NULL },
        { "mixtral", "\"hidden_size\": 32", "\"hidden_size\": 48", "[8, 32]", "[8, 48]", ST_ROUTER0 },
        { "mixtral", "\"hidden_size\": 32", "\"hidden_size\": 3.5", "hidden_size", "integer", NULL },
        { "mixtral", "\"model_type\": \"mixtral\"", "\"model_type\": \"mix\\qtral\"", "config.json", "bad escape", NULL },
        { "mixtral", "\"model_type\": \"mixtral\"", "\"model_type\": \"mix\xFFtral\"", "config.json", "invalid UTF-8", NULL },
        { "mixtral", "\"model_type\": \"mixtral\"", "\"model_type\": \"mixtral\\ud800\"", "config.json", "surrogate", NULL },
        { "mixtral", "\"model_type\": \"mixtral\"", "\"model_type\": \"mixtral\", \"model_type\": \"mixtral\"",
          "model_type", "twice", NULL },
        { "mixtral", "\"num_experts_per_tok\": 2", "\"num_experts_per_tok\": 9", "num_experts_per_tok (9)", "above", NULL },
        { "mixtral", "\"model_type\": \"mixtral\"", "\"model_type\": \"qwen3_moe\"", "model_type \"qwen3_moe\"",
          "contradicts", "MixtralForCausalLM" },
        { "mixtral", "\"model_type\": \"mixtral\"", "\"model_type\": \"bert\"", "bert", "not a supported", NULL },
        { "deepseek_v3", "\"n_group\": 4", "\"n_group\": 3", "n_group (3)", "does not divide", NULL },
        { "deepseek_v3", "\"topk_group\": 2", "\"topk_group\": 5", "topk_group (5)", "above n_group", NULL },
        { "qwen2_moe", "\"mlp_only_layers\": [\n    1\n  ]", "\"mlp_only_layers\": [7]", "mlp_only_layers[0]",
          "num_hidden_layers = 3", NULL },
        { "mixtral", "\"hidden_act\": \"silu\"", "\"hidden_act\": \"gelu\"", "hidden_act", "not supported", NULL },
    };
    int i;
    for (i = 0; i < (int)(sizeof cases / sizeof cases[0]); ++i) {
        char dir[256], path[320], what[64];
        size_t size;
        char *config, *bad;
        st_copy_model(cases[i].model, dir, sizeof dir);
        snprintf(path, sizeof path, "%s/config.json", dir);
        config = st_slurp(path, &size);
        bad = st_replace(config, cases[i].from, cases[i].to);
        st_spit(path, bad, strlen(bad));
        snprintf(what, sizeof what, "config case %d", i);
        st_expect(what, dir, cases[i].model[0] == 'd' ? 1 : 0, cases[i].a, cases[i].b, cases[i].c);
        free(config);
        free(bad);
        st_remove_model(dir);
    }
    {   /* nesting far past the limit, and a truncated text */
        char dir[256], path[320];
        size_t depth = 100000, k;
        char* deep = (char*)malloc(2 * depth + 64);
        st_copy_model("mixtral", dir, sizeof dir);
        snprintf(path, sizeof path, "%s/config.json", dir);
        strcpy(deep, "{\"model_type\": \"mixtral\", \"x\": ");
        k = strlen(deep);
        memset(deep + k, '[', depth);
        memset(deep + k + depth, ']', depth);
        strcpy(deep + k + 2 * depth, "}");
        st_spit(path, deep, strlen(deep));
        st_expect("deep config", dir, 0, "config.json", "nesting deeper than 64", NULL);
        st_spit(path, "{\"model_type\": \"mixtral\", \"hidden_size\": 3", 40);
        st_expect("truncated config", dir, 0, "config.json", "malformed JSON", NULL);
        free(deep);
        st_remove_model(dir);
    }
}
END_TEST

/* >>placements: round-robin and a table give every rank the experts the core expects, and the
   same output bits as one rank; a layout gives the experts of moe_ep_layout_experts. */
START_TEST(st_placements) {
    static const int table[16] = { 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2 };
    st_ref ref;
    char err[2048], name[64];
    int64_t n, n64;
    float *x, *y1, *yr;
    double* y64;
    int kind;
    st_run run;
    ck_assert_msg(st_ref_open(&ref, "deepseek_v3", err, sizeof err), "%s", err);
    x = (float*)st_ref_read(&ref, 1, "input", MOE_EP_ST_F32, &n);
    y64 = (double*)st_ref_read(&ref, 1, "output_f64", MOE_EP_ST_F64, &n64);
    snprintf(name, sizeof name, "layers.1.input");
    y1 = (float*)malloc(sizeof(float) * (size_t)n);
    yr = (float*)malloc(sizeof(float) * (size_t)n);
    for (kind = 0; kind < 3; ++kind) {
        memset(&run, 0, sizeof run);
        run.dir = ST_DATA "deepseek_v3";
        run.layer = 1;
        run.ranks = kind == 0 ? 1 : 3;
        run.x = x;
        run.y = kind == 0 ? y1 : yr;
        run.d_model = (int)moe_ep_st_find(ref.file, name)->shape[1];
        run.tokens = n / run.d_model;
        run.placement.kind = kind == 2 ? MOE_EP_PLACEMENT_TABLE : MOE_EP_PLACEMENT_ROUND_ROBIN;
        run.placement.table = kind == 2 ? table : NULL;
        test_poison(run.y, (size_t)n);
        ck_assert_msg(st_run_layer(&run) == MOE_EP_OK, "placement %d: %s", kind, st_errors(&run, err, sizeof err));
        if (kind == 0) ck_assert(st_rel(y1, y64, n) <= 1e-5);
        else ck_assert_msg(memcmp(y1, yr, sizeof(float) * (size_t)n) == 0, "placement %d differs from one rank", kind);
    }
    {   /* EP 2 x TP 2: rank 3 (ep 1, tp 1) holds experts 8..15, whole (create slices them) */
        moe_ep_layout_desc layout = { 4, 2, 2, 1, 0, { MOE_EP_PLACEMENT_CONTIGUOUS, NULL } }, resolved;
        moe_ep_model* model;
        moe_ep_model_layer* layer;
        int want[16], got_n, want_n, i;
        const int* got;
        moe_ep_desc d;
        ck_assert(moe_ep_model_open(&(moe_ep_model_desc){ .path = ST_DATA "deepseek_v3" }, &model, err, sizeof err) == MOE_EP_OK);
        ck_assert_msg(moe_ep_model_load_layer(model, &(moe_ep_model_layer_desc){ .layer = 1, .rank = 3, .layout = &layout },
                                              &layer, err, sizeof err) == MOE_EP_OK, "%s", err);
        layout.num_experts = 16;
        ck_assert(moe_ep_layout_resolve(&layout, &resolved, NULL, 0) == MOE_EP_OK);
        want_n = moe_ep_layout_experts(&resolved, 3, want, 16);
        got_n = moe_ep_model_layer_experts(layer, &got);
        ck_assert_int_eq(got_n, want_n);
        for (i = 0; i < got_n; ++i) ck_assert_int_eq(got[i], want[i]);
        d = moe_ep_model_layer_query(layer);
        ck_assert_int_eq(d.d_ff, 24);       /* whole experts: the context slices d_ff over its TP group */
        moe_ep_model_layer_free(layer);
        /* a rank outside the layout's world, a layout of other experts */
        ck_assert_int_eq(moe_ep_model_load_layer(model, &(moe_ep_model_layer_desc){ .layer = 1, .rank = 4, .layout = &layout },
                                                 &layer, err, sizeof err), MOE_EP_ERROR_INVALID_ARGUMENT);
        ck_assert_msg(strstr(err, "rank (4)") != NULL, "%s", err);
        layout.num_experts = 12;
        ck_assert_int_eq(moe_ep_model_load_layer(model, &(moe_ep_model_layer_desc){ .layer = 1, .rank = 0, .layout = &layout },
                                                 &layer, err, sizeof err), MOE_EP_ERROR_INVALID_ARGUMENT);
        ck_assert_msg(strstr(err, "layout.num_experts (12)") != NULL, "%s", err);
        ck_assert_int_eq(moe_ep_model_load_layer(model, &(moe_ep_model_layer_desc){ .layer = 1, .rank = 3, .world_size = 3 },
                                                 &layer, err, sizeof err), MOE_EP_ERROR_INVALID_ARGUMENT);
        ck_assert_msg(strstr(err, "rank (3)") != NULL, "%s", err);
        ck_assert_int_eq(moe_ep_model_load_layer(model, &(moe_ep_model_layer_desc){ .layer = 7 }, &layer, err, sizeof err),
                         MOE_EP_ERROR_INVALID_ARGUMENT);
        ck_assert_msg(strstr(err, "num_hidden_layers = 3") != NULL, "%s", err);
        moe_ep_model_close(model);
    }
    free(x); free(y64); free(y1); free(yr);
    moe_ep_st_close(ref.file);
}
END_TEST

/* >>types: F16 and F64 tensors (no test model stores them) read back as the F32 ones; a tensor
   in an unsupported type is named. */
START_TEST(st_other_types) {
    static const uint16_t f16[6] = { 0x3C00, 0xBC00, 0x0001, 0x7BFF, 0x8000, 0x3555 };   /* 1, -1, 2^-24, 65504, -0, 0.333 */
    static const float f32[6] = { 1.0f, -1.0f, 5.9604644775390625e-08f, 65504.0f, -0.0f, 0.333251953125f };
    unsigned char file[512];
    char header[256], err[256];
    size_t n, i;
    moe_ep_st_file* f;
    float out[6];
    double d[2] = { 0.1, -3.0 };
    snprintf(header, sizeof header, "{\"h\":{\"dtype\":\"F16\",\"shape\":[2,3],\"data_offsets\":[0,12]},"
             "\"d\":{\"dtype\":\"F64\",\"shape\":[2],\"data_offsets\":[12,28]},"
             "\"q\":{\"dtype\":\"I16\",\"shape\":[2],\"data_offsets\":[28,32]}}");
    n = strlen(header);
    for (i = 0; i < 8; ++i) file[i] = (unsigned char)((uint64_t)n >> (8 * i));
    memcpy(file + 8, header, n);
    for (i = 0; i < 6; ++i) { file[8 + n + 2 * i] = (unsigned char)(f16[i] & 0xFF); file[9 + n + 2 * i] = (unsigned char)(f16[i] >> 8); }
    memcpy(file + 8 + n + 12, d, 16);
    st_to_host(file + 8 + n + 12, 2, 8);     /* the file is little-endian (a no-op on such a host) */
    memset(file + 8 + n + 28, 0, 4);
    ck_assert_msg(moe_ep_st_parse(file, 8 + n + 32, "mem", NULL, NULL, &f, err, sizeof err) == MOE_EP_OK, "%s", err);
    ck_assert(moe_ep_st_read_f32(f, moe_ep_st_find(f, "h"), out, 6, err, sizeof err) == MOE_EP_OK);
    ck_assert(memcmp(out, f32, sizeof f32) == 0);
    ck_assert(moe_ep_st_read_f32(f, moe_ep_st_find(f, "d"), out, 2, err, sizeof err) == MOE_EP_OK);
    ck_assert(out[0] == 0.1f && out[1] == -3.0f);
    ck_assert_int_eq(moe_ep_st_read_f32(f, moe_ep_st_find(f, "q"), out, 2, err, sizeof err), MOE_EP_ERROR_UNSUPPORTED);
    ck_assert_msg(strstr(err, "'q'") && strstr(err, "I16"), "%s", err);
    ck_assert_int_eq(moe_ep_st_read_f32(f, moe_ep_st_find(f, "h"), out, 5, err, sizeof err), MOE_EP_ERROR_INVALID_ARGUMENT);
    moe_ep_st_close(f);
}
END_TEST

/* >>multimodal: Llama-4's published layout, the text model under language_model.model.layers and
   its config in text_config of a "llama4" config, gives the llama4 model's output bit for bit. */
START_TEST(st_llama4_multimodal) {
    char dir[256], path[320], err[2048];
    char *header, *data, *bad, *config, *wrapped;
    size_t data_size, size;
    st_ref ref;
    st_run run;
    int64_t n, n64;
    float *x, *y;
    double* y64;
    st_copy_model("llama4", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    header = st_header(path, &data, &data_size);
    bad = st_replace_all(header, "\"model.layers.", "\"language_model.model.layers.");
    st_write_safetensors(path, bad, data, data_size);
    free(bad); free(header); free(data);
    snprintf(path, sizeof path, "%s/config.json", dir);
    config = st_slurp(path, &size);
    wrapped = (char*)malloc(strlen(config) + 128);
    sprintf(wrapped, "{\"model_type\": \"llama4\", \"architectures\": [\"Llama4ForConditionalGeneration\"], "
            "\"text_config\": %s}", config);
    st_spit(path, wrapped, strlen(wrapped));
    free(config); free(wrapped);
    ck_assert_msg(st_ref_open(&ref, "llama4", err, sizeof err), "%s", err);
    x = (float*)st_ref_read(&ref, 1, "input", MOE_EP_ST_F32, &n);
    y64 = (double*)st_ref_read(&ref, 1, "output_f64", MOE_EP_ST_F64, &n64);
    y = (float*)malloc(sizeof(float) * (size_t)n);
    memset(&run, 0, sizeof run);
    run.dir = dir;
    run.layer = 1;
    run.ranks = 2;
    run.x = x;
    run.y = y;
    run.d_model = 32;
    run.tokens = n / 32;
    test_poison(y, (size_t)n);
    ck_assert_msg(st_run_layer(&run) == MOE_EP_OK, "%s", st_errors(&run, err, sizeof err));
    ck_assert_msg(st_rel(y, y64, n) <= 1e-5, "relative error %.3g", st_rel(y, y64, n));
    free(x); free(y64); free(y);
    moe_ep_st_close(ref.file);
    st_remove_model(dir);
}
END_TEST

/* >>json: the reader's rules, one text each. */
START_TEST(st_json_rules) {
    static const struct { const char* text; const char* error; } cases[] = {
        { "{\"a\": [1, -2.5e3, true, false, null, \"\\u00e9\\ud83d\\ude00\\n\"]}", NULL },
        { "  [0, -0, 18446744073709551615, 1e308]  ", NULL },
        { "\xEF\xBB\xBF{}", NULL },                              /* a byte order mark */
        { "[1, 2", "unexpected end" },
        { "[1 2]", "',' or ']' expected" },
        { "{\"a\" 1}", "':' expected" },
        { "{1: 2}", "key (a string) expected" },
        { "[01]", "leading zero" },
        { "[1.]", "bad fraction" },
        { "[1e]", "bad exponent" },
        { "[18446744073709551616]", "integer out of range" },
        { "[1e400]", "out of range" },
        { "[\"\\x\"]", "bad escape" },
        { "[\"\\u12G4\"]", "bad \\u escape" },
        { "[\"\\udc00\"]", "low surrogate" },
        { "[\"\\ud800x\"]", "high surrogate" },
        { "[\"\\u0000\"]", "\\u0000" },
        { "[\"a\tb\"]", "control character" },
        { "[\"\xC0\xAF\"]", "invalid UTF-8" },                   /* an overlong '/' */
        { "[\"\xED\xA0\x80\"]", "invalid UTF-8" },               /* a surrogate in UTF-8 */
        { "[\"\xF4\x90\x80\x80\"]", "invalid UTF-8" },           /* above U+10FFFF */
        { "[\"abc", "unterminated string" },
        { "[tru]", "unexpected 't'" },
        { "[] []", "text after the value" },
        { "", "unexpected end" },
    };
    char err[512], deep[2 * 1100 + 1];
    int i;
    for (i = 0; i < (int)(sizeof cases / sizeof cases[0]); ++i) {
        moe_ep_result r;
        err[0] = '\0';
        r = moe_ep_json_check(cases[i].text, strlen(cases[i].text), 0, err, sizeof err);
        if (!cases[i].error) ck_assert_msg(r == MOE_EP_OK, "case %d: %s", i, err);
        else ck_assert_msg(r == MOE_EP_ERROR_INVALID_ARGUMENT && strstr(err, cases[i].error) && strstr(err, "line 1"),
                           "case %d: expected '%s', got: %s", i, cases[i].error, err);
    }
    /* depth: 64 by default, the caller's below, never above 1024 */
    memset(deep, '[', 64);
    memset(deep + 64, ']', 64);
    ck_assert_int_eq(moe_ep_json_check(deep, 128, 0, err, sizeof err), MOE_EP_OK);
    ck_assert_int_eq(moe_ep_json_check(deep, 128, 63, err, sizeof err), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_msg(strstr(err, "nesting deeper than 63") != NULL, "%s", err);
    memset(deep, '[', 1100);
    memset(deep + 1100, ']', 1100);
    ck_assert_int_eq(moe_ep_json_check(deep, 2200, 1 << 30, err, sizeof err), MOE_EP_ERROR_INVALID_ARGUMENT);
    ck_assert_msg(strstr(err, "nesting deeper than 1024") != NULL, "%s", err);
}
END_TEST

/* >>memory: a rank of 8 holds its share of the experts, the router and no more. */
typedef struct st_bytes {
    pthread_mutex_t mutex;
    int64_t now, peak;
} st_bytes;

static void* st_bytes_alloc(size_t size, void* user) {
    st_bytes* b = (st_bytes*)user;
    size_t* p = (size_t*)malloc(size + 16);
    if (!p) return NULL;
    p[0] = size;
    pthread_mutex_lock(&b->mutex);
    b->now += (int64_t)size;
    if (b->now > b->peak) b->peak = b->now;
    pthread_mutex_unlock(&b->mutex);
    return (char*)p + 16;
}

static void st_bytes_free(void* ptr, void* user) {
    st_bytes* b = (st_bytes*)user;
    size_t* p = (size_t*)((char*)ptr - 16);
    pthread_mutex_lock(&b->mutex);
    b->now -= (int64_t)p[0];
    pthread_mutex_unlock(&b->mutex);
    free(p);
}

static int64_t st_rss_bytes(void) {
    FILE* f = fopen("/proc/self/statm", "r");
    long pages = -1, resident = -1;
    if (!f) return -1;
    if (fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = -1;
    fclose(f);
    return resident < 0 ? -1 : (int64_t)resident * sysconf(_SC_PAGESIZE);
}

/* A Mixtral layer of 64 experts, d 256, d_ff 512 (96 MiB of F32 experts), as a sparse file:
   the header and holes, so that writing it costs nothing. */
#define ST_MEM_E 64
#define ST_MEM_D 256
#define ST_MEM_I 512
static void st_write_big_model(const char* dir) {
    char path[320], header[1024];
    uint64_t router = (uint64_t)ST_MEM_E * ST_MEM_D * 4, gate_up = (uint64_t)ST_MEM_E * 2 * ST_MEM_I * ST_MEM_D * 4;
    uint64_t down = (uint64_t)ST_MEM_E * ST_MEM_D * ST_MEM_I * 4;
    size_t n, i;
    unsigned char len[8];
    int fd;
    snprintf(path, sizeof path, "%s/config.json", dir);
    snprintf(header, sizeof header, "{\"model_type\": \"mixtral\", \"architectures\": [\"MixtralForCausalLM\"], "
             "\"hidden_size\": %d, \"intermediate_size\": %d, \"num_local_experts\": %d, \"num_experts_per_tok\": 2, "
             "\"num_hidden_layers\": 1, \"hidden_act\": \"silu\"}", ST_MEM_D, ST_MEM_I, ST_MEM_E);
    st_spit(path, header, strlen(header));
    snprintf(header, sizeof header, "{\"model.layers.0.mlp.gate.weight\":{\"dtype\":\"F32\",\"shape\":[%d,%d],"
             "\"data_offsets\":[0,%llu]},\"model.layers.0.mlp.experts.gate_up_proj\":{\"dtype\":\"F32\",\"shape\":"
             "[%d,%d,%d],\"data_offsets\":[%llu,%llu]},\"model.layers.0.mlp.experts.down_proj\":{\"dtype\":\"F32\","
             "\"shape\":[%d,%d,%d],\"data_offsets\":[%llu,%llu]}}", ST_MEM_E, ST_MEM_D, (unsigned long long)router,
             ST_MEM_E, 2 * ST_MEM_I, ST_MEM_D, (unsigned long long)router, (unsigned long long)(router + gate_up),
             ST_MEM_E, ST_MEM_D, ST_MEM_I, (unsigned long long)(router + gate_up),
             (unsigned long long)(router + gate_up + down));
    n = strlen(header);
    for (i = 0; i < 8; ++i) len[i] = (unsigned char)((uint64_t)n >> (8 * i));
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ck_assert(fd >= 0);
    ck_assert(write(fd, len, 8) == 8 && write(fd, header, n) == (ssize_t)n);
    ck_assert(ftruncate(fd, (off_t)(8 + n + router + gate_up + down)) == 0);
    close(fd);
}

/* Under ThreadSanitizer resident memory counts its shadow too: the allocator's count still holds. */
#if defined(__SANITIZE_THREAD__)
#define ST_RSS_MEANINGFUL 0
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define ST_RSS_MEANINGFUL 0
#endif
#endif
#ifndef ST_RSS_MEANINGFUL
#define ST_RSS_MEANINGFUL 1
#endif

START_TEST(st_rank_share_of_memory) {
    char tmpl[] = "/tmp/moe_ep_st_XXXXXX", err[512], path[320];
    st_bytes bytes;
    moe_ep_model* model;
    moe_ep_model_layer* layer;
    int rank = _i;
    uint64_t expert = 3ull * ST_MEM_I * ST_MEM_D * 4, router = (uint64_t)ST_MEM_E * ST_MEM_D * 4;
    uint64_t share = expert * (ST_MEM_E / 8), limit = (uint64_t)((double)(share + router) * 1.1);
    int64_t rss0, rss1;
    const int* ids;
    int n;
    ck_assert(mkdtemp(tmpl) != NULL);
    st_write_big_model(tmpl);
    memset(&bytes, 0, sizeof bytes);
    pthread_mutex_init(&bytes.mutex, NULL);
    rss0 = st_rss_bytes();
    ck_assert_msg(moe_ep_model_open(&(moe_ep_model_desc){ .path = tmpl, .allocator = { st_bytes_alloc, st_bytes_free,
                                                                                       &bytes } },
                                    &model, err, sizeof err) == MOE_EP_OK, "%s", err);
    ck_assert_msg(moe_ep_model_load_layer(model, &(moe_ep_model_layer_desc){ .layer = 0, .rank = rank, .world_size = 8 },
                                          &layer, err, sizeof err) == MOE_EP_OK, "%s", err);
    moe_ep_model_close(model);
    rss1 = st_rss_bytes();
    n = moe_ep_model_layer_experts(layer, &ids);
    ck_assert_int_eq(n, ST_MEM_E / 8);
    ck_assert_int_eq(ids[0], rank * (ST_MEM_E / 8));
    /* read: the router and this rank's experts, nothing else */
    ck_assert_uint_eq(moe_ep_model_layer_bytes_read(layer), share + router);
    ck_assert_msg((uint64_t)bytes.now <= limit, "rank %d keeps %lld bytes, its share + router + 10%% is %llu", rank,
                  (long long)bytes.now, (unsigned long long)limit);
    ck_assert_msg((uint64_t)bytes.now == moe_ep_model_layer_bytes(layer), "layer_bytes %llu, allocated %lld",
                  (unsigned long long)moe_ep_model_layer_bytes(layer), (long long)bytes.now);
    /* while loading: the layer, the parsed headers and the 256 KiB read buffer */
    ck_assert_msg((uint64_t)bytes.peak <= limit + (1u << 20), "rank %d peaked at %lld bytes", rank, (long long)bytes.peak);
    if (ST_RSS_MEANINGFUL && rss0 > 0 && rss1 > 0)
        ck_assert_msg(rss1 - rss0 <= (int64_t)limit, "rank %d: resident memory grew by %lld bytes, limit %llu", rank,
                      (long long)(rss1 - rss0), (unsigned long long)limit);
    moe_ep_model_layer_free(layer);
    ck_assert_int_eq(bytes.now, 0);
    pthread_mutex_destroy(&bytes.mutex);
    snprintf(path, sizeof path, "%s/config.json", tmpl);
    unlink(path);
    snprintf(path, sizeof path, "%s/model.safetensors", tmpl);
    unlink(path);
    rmdir(tmpl);
}
END_TEST

Suite* safetensors_suite(void) {
    Suite* s = suite_create("safetensors");
    TCase* tc = tcase_create("models");
    tcase_add_loop_test(tc, st_layers_match_transformers, 0, ST_MODELS);
    tcase_add_loop_test(tc, st_reads_own_experts, 0, ST_MODELS);
    tcase_add_test(tc, st_dense_layer_refused);
    tcase_add_test(tc, st_placements);
    tcase_add_test(tc, st_other_types);
    tcase_add_test(tc, st_llama4_multimodal);
    tcase_set_timeout(tc, 120);
    suite_add_tcase(s, tc);
    tc = tcase_create("bad files");
    tcase_add_test(tc, st_json_rules);
    tcase_add_test(tc, st_bad_safetensors);
    tcase_add_test(tc, st_bad_shards);
    tcase_add_test(tc, st_bad_config);
    tcase_set_timeout(tc, 60);
    suite_add_tcase(s, tc);
    tc = tcase_create("memory");
    tcase_add_loop_test(tc, st_rank_share_of_memory, 0, 8);
    tcase_set_timeout(tc, 60);
    suite_add_tcase(s, tc);
    return s;
}
