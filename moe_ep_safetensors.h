/* moe_ep_safetensors.h -- load one MoE layer of a checkpoint for one rank -- optional, beside moe_ep.h

   A model directory as Hugging Face writes it (config.json, and model.safetensors or the
   shards that model.safetensors.index.json lists) in; the moe_ep_desc of one MoE layer on
   one rank out, holding the router, the shared experts and this rank's experts only. Only
   the bytes of those tensors are read. Needs libc and POSIX open/read/lseek/fstat; the core
   (moe_ep.h) stays free of them.

   DO THIS
   =======
   In the one C or C++ file that defines MOE_EP_IMPLEMENTATION, include this header after
   (or instead of) moe_ep.h:

       #define MOE_EP_IMPLEMENTATION
       #include "moe_ep_safetensors.h"          (includes moe_ep.h)

   Elsewhere include it without the define.

   STEP BY STEP
   ============
   1. moe_ep_model_open(&(moe_ep_model_desc){ .path = "Qwen3-30B-A3B" }, &model, err, sizeof err);
      reads config.json (and the shard index), recognises the family (moe_ep_model_query).
   2. moe_ep_model_load_layer(model, &(moe_ep_model_layer_desc){ .layer = 3, .rank = r,
          .world_size = R }, &layer, err, sizeof err);
      reads layer 3's router, shared experts and the experts rank r of R holds (the
      placement's, default contiguous; or .layout for EP x TP x DP), converted to fp32.
      A dense layer is refused, with the config rule that makes it dense.
   3. moe_ep_desc d = moe_ep_model_layer_query(layer);   the family's preset, the config's
      numbers and the weights; set d.transport (and num_threads, logger) and call
      moe_ep_create(&d, &ctx). The layer may be freed once create has returned (create
      copies the weights).
   4. moe_ep_model_layer_free(layer); moe_ep_model_close(model).

   moe_ep_safetensors.h DOES NOT
   =============================
   - load anything but MoE layers' router, shared experts and experts: no attention, norms,
     embeddings or dense MLPs;
   - mmap, cache or keep files open beyond its model (a layer holds no file);
   - keep weights in their stored type: everything it hands out is fp32;
   - read a remote repository, a .bin (pickle) checkpoint or GGUF.

   FAMILIES (model_type, or architectures[0] when model_type is absent)
   ========
   mixtral         MixtralForCausalLM          every layer MoE
   qwen2_moe       Qwen2MoeForCausalLM         MoE unless in mlp_only_layers or (L+1) % decoder_sparse_step
   qwen3_moe       Qwen3MoeForCausalLM         the same rule
   deepseek_v3     DeepseekV3ForCausalLM       MoE from first_k_dense_replace on, where L % moe_layer_freq == 0
   deepseek_v2     DeepseekV2ForCausalLM       the same rule; topk_method "greedy" only (softmax, no groups)
   gpt_oss         GptOssForCausalLM           every layer MoE
   llama4_text     Llama4ForCausalLM           MoE in moe_layers (default: every interleave_moe_layer_step-th)
   llama4          Llama4ForConditionalGeneration (its text_config)
   hidden_act must be silu (GPT-OSS: its clamped SwiGLU, swiglu_limit from the config, default 7).

   TENSORS
   =======
   Names under model.layers.L. (also language_model.model.layers.L., model.language_model.
   layers.L.), in the block module mlp (Mixtral: also block_sparse_moe; Llama-4: feed_forward):
     router       gate.weight [E, d] (gpt_oss, llama4: router.weight); router.bias (gpt_oss);
                  gate.e_score_correction_bias [E] (deepseek_v3, the selection bias)
     experts      fused, as transformers 5 writes them: experts.gate_up_proj and experts.down_proj
                  (Mixtral, Qwen, DeepSeek [E, 2I, d] / [E, d, I]; GPT-OSS and Llama-4 [E, d, 2I] /
                  [E, I, d], with GPT-OSS's biases experts.gate_up_proj_bias, down_proj_bias);
                  or per expert, as the published checkpoints: experts.N.{gate,up,down}_proj.weight,
                  Mixtral's experts.N.{w1,w3,w2}.weight;
                  GPT-OSS's MXFP4 experts.gate_up_proj_blocks/_scales, down_proj_blocks/_scales
     shared       shared_expert.{gate,up,down}_proj.weight and shared_expert_gate.weight (qwen2_moe),
                  shared_experts.* (deepseek), shared_expert.* (llama4)
   Types: F32, BF16, F16, F64 (converted to fp32 once, exactly; F64 rounded); F8_E4M3 with
   its weight_scale_inv block scales (quantization_config.weight_block_size, default
   128 x 128), w = fp8 * scale; MXFP4 (FP4 E2M1 values, two per byte, low nibble first, 32
   per E8M0 scale byte), w = value * 2^(scale - 127). Any other type is an error that names
   the tensor. Shapes are checked against the config.

   ERRORS
   ======
   Every call that can fail returns a moe_ep_result and writes the cause to err (err_size
   bytes; may be NULL), naming the file and the tensor or the config key:
       "m/model.safetensors: tensor 'model.layers.0.mlp.gate.weight': data_offsets [0, 96]
        hold 96 bytes, F32 [8, 32] needs 1024"
   Out-params are untouched on failure and nothing is left allocated. Files are read with
   bounds checked before every read: a truncated file, a header past the end of the file,
   overlapping, backward, gapped or overflowing offsets, unknown dtypes, and malformed JSON
   (nesting deeper than max_json_depth, numbers out of range, bad escapes, invalid UTF-8,
   duplicate keys) are errors, never reads outside the file.

   THREADING AND MEMORY
   ====================
   A model is used by one thread at a time; with rank threads, let each open its own
   (open reads only config.json and the index; shards are opened when a layer needs
   them). A layer is independent of its model once loaded. Every allocation goes through
   the allocator of the desc (default malloc/free); a layer holds the router, the shared
   experts and its rank's experts in fp32, plus a few words per expert; loading also
   borrows one read buffer of 256 KiB, returned before the call returns.

   The JSON reader and the safetensors header parser are public too (moe_ep_json_check,
   moe_ep_st_parse, moe_ep_st_open, moe_ep_st_find, moe_ep_st_read), for other tools
   and for fuzzing.

   LICENSE: as moe_ep.h.
*/
#ifndef MOE_EP_SAFETENSORS_H_INCLUDED
#define MOE_EP_SAFETENSORS_H_INCLUDED

#include "moe_ep.h"

#ifdef __cplusplus
extern "C" {
#endif

/* >>safetensors: one file. */
typedef enum moe_ep_st_dtype {
    MOE_EP_ST_DTYPE_UNKNOWN = 0,
    MOE_EP_ST_BOOL, MOE_EP_ST_U8, MOE_EP_ST_I8, MOE_EP_ST_F8_E5M2, MOE_EP_ST_F8_E4M3, MOE_EP_ST_F8_E8M0,
    MOE_EP_ST_I16, MOE_EP_ST_U16, MOE_EP_ST_F16, MOE_EP_ST_BF16, MOE_EP_ST_I32, MOE_EP_ST_U32, MOE_EP_ST_F32,
    MOE_EP_ST_C64, MOE_EP_ST_F64, MOE_EP_ST_I64, MOE_EP_ST_U64, MOE_EP_ST_F4, MOE_EP_ST_F6_E2M3, MOE_EP_ST_F6_E3M2,
    MOE_EP_ST_DTYPE_COUNT
} moe_ep_st_dtype;

#define MOE_EP_ST_MAX_DIMS 8

typedef struct moe_ep_st_tensor {
    const char* name;
    moe_ep_st_dtype dtype;
    int ndim;
    int64_t shape[MOE_EP_ST_MAX_DIMS];
    uint64_t offset;                /* first byte in the file (header included) */
    uint64_t size;                  /* bytes */
} moe_ep_st_tensor;

typedef struct moe_ep_st_file moe_ep_st_file;

typedef struct moe_ep_st_limits {
    int max_json_depth;             /* default 64; at most 1024 (the reader recurses) */
    uint64_t max_header_bytes;      /* default 100 MB (the safetensors format's own limit) */
} moe_ep_st_limits;

/* Opens path and parses its header (the data is read later, on demand). Tensors must
   cover the data exactly, without overlap or gap, as the format requires. */
MOE_EP_API moe_ep_result moe_ep_st_open(const char* path, const moe_ep_st_limits* limits,
                                        const moe_ep_allocator* allocator, moe_ep_st_file** out,
                                        char* err, size_t err_size);
/* The same for a file held in memory (size bytes at data, kept by the caller while the file
   is open); name is what errors call it (default "<memory>"). */
MOE_EP_API moe_ep_result moe_ep_st_parse(const void* data, size_t size, const char* name,
                                         const moe_ep_st_limits* limits, const moe_ep_allocator* allocator,
                                         moe_ep_st_file** out, char* err, size_t err_size);
MOE_EP_API void moe_ep_st_close(moe_ep_st_file* file);
MOE_EP_API int moe_ep_st_tensor_count(const moe_ep_st_file* file);
/* Tensors in name order. */
MOE_EP_API const moe_ep_st_tensor* moe_ep_st_tensor_at(const moe_ep_st_file* file, int index);
MOE_EP_API const moe_ep_st_tensor* moe_ep_st_find(const moe_ep_st_file* file, const char* name);
/* A __metadata__ string, or NULL. */
MOE_EP_API const char* moe_ep_st_metadata(const moe_ep_st_file* file, const char* key);
/* size bytes of tensor t from byte `offset` within it, as stored. */
MOE_EP_API moe_ep_result moe_ep_st_read(moe_ep_st_file* file, const moe_ep_st_tensor* t, uint64_t offset,
                                        void* out, uint64_t size, char* err, size_t err_size);
/* The whole tensor as fp32 (F32, BF16, F16 exactly; F64 rounded); count: out's capacity in floats. */
MOE_EP_API moe_ep_result moe_ep_st_read_f32(moe_ep_st_file* file, const moe_ep_st_tensor* t, float* out,
                                            int64_t count, char* err, size_t err_size);
MOE_EP_API const char* moe_ep_st_dtype_string(moe_ep_st_dtype dtype);

/* Checks that text[0, size) is one JSON value under the reader's rules (RFC 8259; UTF-8;
   nesting at most max_depth, default 64; no duplicate keys read). For tools and fuzzing. */
MOE_EP_API moe_ep_result moe_ep_json_check(const void* text, size_t size, int max_depth, char* err, size_t err_size);

/* >>model: a checkpoint directory. */
typedef struct moe_ep_model moe_ep_model;
typedef struct moe_ep_model_layer moe_ep_model_layer;

typedef struct moe_ep_model_desc {
    const char* path;               /* required: the directory holding config.json */
    moe_ep_st_limits limits;        /* JSON depth and header size limits, for every file read */
    moe_ep_allocator allocator;     /* default malloc/free; the model and its layers use it */
} moe_ep_model_desc;

/* What moe_ep_model_query tells; its strings live as long as the model. */
typedef struct moe_ep_model_info {
    moe_ep_family family;
    const char* model_type;         /* config.json's model_type ("deepseek_v2" is served as DEEPSEEK_V3's kin) */
    const char* architecture;       /* architectures[0] or "" */
    int num_layers;                 /* num_hidden_layers */
    int moe_layers;                 /* how many of them are MoE layers */
    int d_model;
    int d_ff;                       /* an expert's width */
    int num_experts;
    int top_k;
    int shared_d_ff;                /* 0: no shared experts */
    int files;                      /* safetensors files (shards) */
    bool sharded;                   /* model.safetensors.index.json */
    const char* quantization;       /* "", "fp8" or "mxfp4" (config.json's quantization_config) */
} moe_ep_model_info;

MOE_EP_API moe_ep_result moe_ep_model_open(const moe_ep_model_desc* desc, moe_ep_model** out,
                                           char* err, size_t err_size);
MOE_EP_API void moe_ep_model_close(moe_ep_model* model);
MOE_EP_API moe_ep_model_info moe_ep_model_query(const moe_ep_model* model);
/* Whether decoder layer `layer` is an MoE layer; if not, why (the config rule), in reason. */
MOE_EP_API bool moe_ep_model_layer_is_moe(const moe_ep_model* model, int layer, char* reason, size_t reason_size);

typedef struct moe_ep_model_layer_desc {
    int layer;                      /* decoder layer index */
    int rank;                       /* this rank: in [0, world_size), or in the layout's world */
    int world_size;                 /* default 1; ignored with a layout */
    moe_ep_placement placement;     /* default contiguous; ignored with a layout (its table is read, not kept) */
    const moe_ep_layout_desc* layout;  /* EP x TP x DP: the experts of moe_ep_layout_experts(layout, rank);
                                       layout->num_experts 0 means the model's */
} moe_ep_model_layer_desc;

MOE_EP_API moe_ep_result moe_ep_model_load_layer(moe_ep_model* model, const moe_ep_model_layer_desc* desc,
                                                 moe_ep_model_layer** out, char* err, size_t err_size);
/* The layer's desc: the family's preset, the config's numbers, router, biases, shared experts,
   this rank's experts and the placement. Pointers stay valid until the layer is freed. Set
   transport (and tp_transport, num_threads, logger, allocator) before moe_ep_create. */
MOE_EP_API moe_ep_desc moe_ep_model_layer_query(const moe_ep_model_layer* layer);
/* The global ids of the experts this layer holds, ascending; returns how many. */
MOE_EP_API int moe_ep_model_layer_experts(const moe_ep_model_layer* layer, const int** experts);
/* Bytes the layer holds: weights (fp32) and its bookkeeping. */
MOE_EP_API uint64_t moe_ep_model_layer_bytes(const moe_ep_model_layer* layer);
/* Bytes read from the files to load it. */
MOE_EP_API uint64_t moe_ep_model_layer_bytes_read(const moe_ep_model_layer* layer);
MOE_EP_API void moe_ep_model_layer_free(moe_ep_model_layer* layer);

#ifdef __cplusplus
}
#endif
#endif /* MOE_EP_SAFETENSORS_H_INCLUDED */

/* ======================================================================== */
#ifdef MOE_EP_IMPLEMENTATION
#ifndef MOE_EP_SAFETENSORS_IMPL_INCLUDED
#define MOE_EP_SAFETENSORS_IMPL_INCLUDED

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <locale.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define MOE_EP__ST_DEPTH 64
#define MOE_EP__ST_MAX_DEPTH 1024               /* the reader recurses: a bound on its stack */
#define MOE_EP__ST_MAX_HEADER 100000000ull
#define MOE_EP__ST_CONFIG_MAX (64ull << 20)     /* config.json and the index */
#define MOE_EP__ST_CHUNK (256u << 10)           /* read buffer for conversions: stays in L2 */

MOE_EP_PRIVATE void moe_ep__st_err(char* err, size_t err_size, const char* fmt, ...) {
    va_list ap;
    if (!err || err_size == 0) return;
    va_start(ap, fmt);
    vsnprintf(err, err_size, fmt, ap);
    va_end(ap);
}

/* >>json: a bounded reader into a node array. Decoded strings live in one arena of the
   input's size (a decoded string is never longer than its source). */
enum { MOE_EP__J_NULL, MOE_EP__J_FALSE, MOE_EP__J_TRUE, MOE_EP__J_NUMBER, MOE_EP__J_STRING,
       MOE_EP__J_ARRAY, MOE_EP__J_OBJECT };

typedef struct moe_ep__jnode {
    int type;
    int first, next, count;         /* children (arrays, objects); next sibling; -1: none */
    const char* key;                /* member key (objects' children) */
    const char* str;                /* string value */
    double number;
    uint64_t magnitude;             /* integers: |value| */
    bool integer, negative;
} moe_ep__jnode;

typedef struct moe_ep__json {
    const moe_ep_allocator* allocator;
    const char* text;
    size_t size, pos;
    int max_depth;
    moe_ep__jnode* nodes;
    int count, capacity;
    char* arena;
    size_t arena_used;
    char* err;
    size_t err_size;
    const char* what;               /* the file's name, for messages */
} moe_ep__json;

MOE_EP_PRIVATE bool moe_ep__jfail(moe_ep__json* j, const char* fmt, ...) {
    char msg[256];
    size_t i, line = 1, col = 1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    for (i = 0; i < j->pos && i < j->size; ++i) {
        if (j->text[i] == '\n') { ++line; col = 1; } else ++col;
    }
    moe_ep__st_err(j->err, j->err_size, "%s: malformed JSON at line %zu, column %zu: %s", j->what, line, col, msg);
    return false;
}

MOE_EP_PRIVATE int moe_ep__jnew(moe_ep__json* j, int type) {
    moe_ep__jnode* n;
    if (j->count == j->capacity) {
        int cap = j->capacity ? j->capacity * 2 : 64;
        moe_ep__jnode* grown;
        if (j->capacity > INT_MAX / 2) return -1;
        grown = (moe_ep__jnode*)moe_ep_alloc(j->allocator, (size_t)cap * sizeof *grown);
        if (!grown) return -1;
        if (j->count) memcpy(grown, j->nodes, (size_t)j->count * sizeof *grown);
        moe_ep_free(j->allocator, j->nodes);
        j->nodes = grown;
        j->capacity = cap;
    }
    n = &j->nodes[j->count];
    memset(n, 0, sizeof *n);
    n->type = type;
    n->first = n->next = -1;
    return j->count++;
}

MOE_EP_PRIVATE void moe_ep__jspace(moe_ep__json* j) {
    while (j->pos < j->size) {
        char c = j->text[j->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        j->pos++;
    }
}

MOE_EP_PRIVATE int moe_ep__jhex(moe_ep__json* j, size_t at) {
    int v = 0, i;
    if (at + 4 > j->size) return -1;
    for (i = 0; i < 4; ++i) {
        char c = j->text[at + (size_t)i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= c - '0';
        else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
        else return -1;
    }
    return v;
}

/* The length of the valid UTF-8 sequence at s[0, n), or 0 (RFC 3629: no overlong forms,
   no surrogates, nothing above U+10FFFF). */
MOE_EP_PRIVATE int moe_ep__utf8_len(const unsigned char* s, size_t n) {
    unsigned char c = s[0];
    int len, i;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c >= 0xE0 && c <= 0xEF) { len = 3; if (c == 0xE0) lo = 0xA0; if (c == 0xED) hi = 0x9F; }
    else if (c >= 0xF0 && c <= 0xF4) { len = 4; if (c == 0xF0) lo = 0x90; if (c == 0xF4) hi = 0x8F; }
    else return 0;
    if ((size_t)len > n) return 0;
    if (s[1] < lo || s[1] > hi) return 0;
    for (i = 2; i < len; ++i)
        if (s[i] < 0x80 || s[i] > 0xBF) return 0;
    return len;
}

MOE_EP_PRIVATE char* moe_ep__utf8_put(char* out, uint32_t cp) {
    if (cp < 0x80) { *out++ = (char)cp; }
    else if (cp < 0x800) { *out++ = (char)(0xC0 | (cp >> 6)); *out++ = (char)(0x80 | (cp & 0x3F)); }
    else if (cp < 0x10000) {
        *out++ = (char)(0xE0 | (cp >> 12)); *out++ = (char)(0x80 | ((cp >> 6) & 0x3F));
        *out++ = (char)(0x80 | (cp & 0x3F));
    } else {
        *out++ = (char)(0xF0 | (cp >> 18)); *out++ = (char)(0x80 | ((cp >> 12) & 0x3F));
        *out++ = (char)(0x80 | ((cp >> 6) & 0x3F)); *out++ = (char)(0x80 | (cp & 0x3F));
    }
    return out;
}

/* A string at j->pos (the opening quote), decoded into the arena. */
MOE_EP_PRIVATE const char* moe_ep__jstring(moe_ep__json* j) {
    char* start = j->arena + j->arena_used;
    char* out = start;
    j->pos++;
    for (;;) {
        unsigned char c;
        if (j->pos >= j->size) { moe_ep__jfail(j, "unterminated string"); return NULL; }
        c = (unsigned char)j->text[j->pos];
        if (c == '"') { j->pos++; break; }
        if (c < 0x20) { moe_ep__jfail(j, "control character 0x%02x in a string", c); return NULL; }
        if (c == '\\') {
            char e;
            if (j->pos + 1 >= j->size) { moe_ep__jfail(j, "unterminated escape"); return NULL; }
            e = j->text[j->pos + 1];
            j->pos += 2;
            switch (e) {
            case '"': *out++ = '"'; break;
            case '\\': *out++ = '\\'; break;
            case '/': *out++ = '/'; break;
            case 'b': *out++ = '\b'; break;
            case 'f': *out++ = '\f'; break;
            case 'n': *out++ = '\n'; break;
            case 'r': *out++ = '\r'; break;
            case 't': *out++ = '\t'; break;
            case 'u': {
                int hi = moe_ep__jhex(j, j->pos);
                uint32_t cp;
                if (hi < 0) { moe_ep__jfail(j, "bad \\u escape (four hex digits expected)"); return NULL; }
                j->pos += 4;
                cp = (uint32_t)hi;
                if (hi >= 0xDC00 && hi <= 0xDFFF) { moe_ep__jfail(j, "\\u%04x: a low surrogate without its high one", hi); return NULL; }
                if (hi >= 0xD800 && hi <= 0xDBFF) {
                    int lo = (j->pos + 1 < j->size && j->text[j->pos] == '\\' && j->text[j->pos + 1] == 'u')
                                 ? moe_ep__jhex(j, j->pos + 2) : -1;
                    if (lo < 0xDC00 || lo > 0xDFFF) { moe_ep__jfail(j, "\\u%04x: a high surrogate without its low one", hi); return NULL; }
                    j->pos += 6;
                    cp = 0x10000u + (((uint32_t)hi - 0xD800u) << 10) + ((uint32_t)lo - 0xDC00u);
                }
                if (cp == 0) { moe_ep__jfail(j, "\\u0000 in a string is not accepted"); return NULL; }
                out = moe_ep__utf8_put(out, cp);
                break;
            }
            default:
                j->pos--;
                if ((unsigned char)e < 0x20 || (unsigned char)e >= 0x7F) moe_ep__jfail(j, "bad escape (byte 0x%02x)", (unsigned char)e);
                else moe_ep__jfail(j, "bad escape '\\%c'", e);
                return NULL;
            }
            continue;
        }
        if (c >= 0x80) {
            int len = moe_ep__utf8_len((const unsigned char*)j->text + j->pos, j->size - j->pos);
            if (!len) { moe_ep__jfail(j, "invalid UTF-8 (byte 0x%02x)", c); return NULL; }
            memcpy(out, j->text + j->pos, (size_t)len);
            out += len;
            j->pos += (size_t)len;
            continue;
        }
        *out++ = (char)c;
        j->pos++;
    }
    *out++ = '\0';
    j->arena_used += (size_t)(out - start);
    return start;
}

MOE_EP_PRIVATE bool moe_ep__jnumber(moe_ep__json* j, moe_ep__jnode* n) {
    size_t start = j->pos, digits = 0;
    bool integer = true, overflow = false;
    uint64_t mag = 0;
    char buf[64];
    if (j->pos < j->size && j->text[j->pos] == '-') { n->negative = true; j->pos++; }
    if (j->pos >= j->size || j->text[j->pos] < '0' || j->text[j->pos] > '9') return moe_ep__jfail(j, "bad number");
    if (j->text[j->pos] == '0' && j->pos + 1 < j->size && j->text[j->pos + 1] >= '0' && j->text[j->pos + 1] <= '9')
        return moe_ep__jfail(j, "number with a leading zero");
    while (j->pos < j->size && j->text[j->pos] >= '0' && j->text[j->pos] <= '9') {
        unsigned d = (unsigned)(j->text[j->pos] - '0');
        if (mag > (UINT64_MAX - d) / 10) overflow = true;
        else mag = mag * 10 + d;
        j->pos++; digits++;
    }
    if (j->pos < j->size && j->text[j->pos] == '.') {
        integer = false;
        j->pos++;
        if (j->pos >= j->size || j->text[j->pos] < '0' || j->text[j->pos] > '9') return moe_ep__jfail(j, "bad fraction");
        while (j->pos < j->size && j->text[j->pos] >= '0' && j->text[j->pos] <= '9') { j->pos++; digits++; }
    }
    if (j->pos < j->size && (j->text[j->pos] == 'e' || j->text[j->pos] == 'E')) {
        integer = false;
        j->pos++;
        if (j->pos < j->size && (j->text[j->pos] == '+' || j->text[j->pos] == '-')) j->pos++;
        if (j->pos >= j->size || j->text[j->pos] < '0' || j->text[j->pos] > '9') return moe_ep__jfail(j, "bad exponent");
        while (j->pos < j->size && j->text[j->pos] >= '0' && j->text[j->pos] <= '9') j->pos++;
    }
    if (j->pos - start >= sizeof buf) {
        j->pos = start;
        return moe_ep__jfail(j, "number longer than %d characters", (int)sizeof buf - 1);
    }
    if (integer && overflow) {
        j->pos = start;
        return moe_ep__jfail(j, "integer out of range (above 2^64 - 1)");
    }
    memcpy(buf, j->text + start, j->pos - start);
    buf[j->pos - start] = '\0';
    {   /* strtod reads the C locale's decimal point only if the program did not change it */
        const struct lconv* lc = localeconv();
        char* dot = strchr(buf, '.');
        if (dot && lc && lc->decimal_point && lc->decimal_point[0] && lc->decimal_point[0] != '.' &&
            !lc->decimal_point[1])
            *dot = lc->decimal_point[0];
    }
    n->number = strtod(buf, NULL);
    if (!isfinite(n->number)) {
        j->pos = start;
        return moe_ep__jfail(j, "number out of range: %s", buf);
    }
    n->integer = integer;
    n->magnitude = mag;
    (void)digits;
    return true;
}

MOE_EP_PRIVATE int moe_ep__jvalue(moe_ep__json* j, int depth);

MOE_EP_PRIVATE int moe_ep__jcontainer(moe_ep__json* j, int depth, bool object) {
    int self = moe_ep__jnew(j, object ? MOE_EP__J_OBJECT : MOE_EP__J_ARRAY), last = -1;
    char close = object ? '}' : ']';
    if (self < 0) { moe_ep__jfail(j, "out of memory"); return -1; }
    if (depth >= j->max_depth) { moe_ep__jfail(j, "nesting deeper than %d", j->max_depth); return -1; }
    j->pos++;
    moe_ep__jspace(j);
    if (j->pos < j->size && j->text[j->pos] == close) { j->pos++; return self; }
    for (;;) {
        const char* key = NULL;
        int child;
        moe_ep__jspace(j);
        if (object) {
            if (j->pos >= j->size || j->text[j->pos] != '"') { moe_ep__jfail(j, "a member's key (a string) expected"); return -1; }
            key = moe_ep__jstring(j);
            if (!key) return -1;
            moe_ep__jspace(j);
            if (j->pos >= j->size || j->text[j->pos] != ':') { moe_ep__jfail(j, "':' expected after key \"%.64s\"", key); return -1; }
            j->pos++;
        }
        child = moe_ep__jvalue(j, depth + 1);
        if (child < 0) return -1;
        j->nodes[child].key = key;
        if (last < 0) j->nodes[self].first = child;
        else j->nodes[last].next = child;
        last = child;
        if (j->nodes[self].count == INT_MAX) { moe_ep__jfail(j, "too many members"); return -1; }
        j->nodes[self].count++;
        moe_ep__jspace(j);
        if (j->pos < j->size && j->text[j->pos] == ',') { j->pos++; continue; }
        if (j->pos < j->size && j->text[j->pos] == close) { j->pos++; return self; }
        moe_ep__jfail(j, "%s',' or '%c' expected", j->pos >= j->size ? "unexpected end of the text: " : "", close);
        return -1;
    }
}

MOE_EP_PRIVATE int moe_ep__jvalue(moe_ep__json* j, int depth) {
    int n;
    char c;
    moe_ep__jspace(j);
    if (j->pos >= j->size) { moe_ep__jfail(j, "unexpected end of the text"); return -1; }
    c = j->text[j->pos];
    if (c == '{' || c == '[') return moe_ep__jcontainer(j, depth, c == '{');
    if (c == '"') {
        const char* s;
        n = moe_ep__jnew(j, MOE_EP__J_STRING);
        if (n < 0) { moe_ep__jfail(j, "out of memory"); return -1; }
        s = moe_ep__jstring(j);
        if (!s) return -1;
        j->nodes[n].str = s;
        return n;
    }
    if (c == '-' || (c >= '0' && c <= '9')) {
        n = moe_ep__jnew(j, MOE_EP__J_NUMBER);
        if (n < 0) { moe_ep__jfail(j, "out of memory"); return -1; }
        return moe_ep__jnumber(j, &j->nodes[n]) ? n : -1;
    }
    if (j->size - j->pos >= 4 && memcmp(j->text + j->pos, "true", 4) == 0) { j->pos += 4; n = moe_ep__jnew(j, MOE_EP__J_TRUE); }
    else if (j->size - j->pos >= 5 && memcmp(j->text + j->pos, "false", 5) == 0) { j->pos += 5; n = moe_ep__jnew(j, MOE_EP__J_FALSE); }
    else if (j->size - j->pos >= 4 && memcmp(j->text + j->pos, "null", 4) == 0) { j->pos += 4; n = moe_ep__jnew(j, MOE_EP__J_NULL); }
    else {
        if ((unsigned char)c >= 0x20 && (unsigned char)c < 0x7F) moe_ep__jfail(j, "unexpected '%c'", c);
        else moe_ep__jfail(j, "unexpected byte 0x%02x", (unsigned char)c);
        return -1;
    }
    if (n < 0) moe_ep__jfail(j, "out of memory");
    return n;
}

MOE_EP_PRIVATE void moe_ep__json_free(moe_ep__json* j) {
    moe_ep_free(j->allocator, j->nodes);
    moe_ep_free(j->allocator, j->arena);
    j->nodes = NULL;
    j->arena = NULL;
}

/* Parses text[0, size) whole; the root is node 0. */
MOE_EP_PRIVATE bool moe_ep__json_parse(moe_ep__json* j, const moe_ep_allocator* allocator, const char* text, size_t size,
                                       int max_depth, const char* what, char* err, size_t err_size) {
    memset(j, 0, sizeof *j);
    j->allocator = allocator;
    j->text = text;
    j->size = size;
    j->max_depth = max_depth > 0 ? (max_depth < MOE_EP__ST_MAX_DEPTH ? max_depth : MOE_EP__ST_MAX_DEPTH) : MOE_EP__ST_DEPTH;
    j->err = err;
    j->err_size = err_size;
    j->what = what;
    j->arena = (char*)moe_ep_alloc(allocator, size + 1);
    if (!j->arena) { moe_ep__st_err(err, err_size, "%s: out of memory", what); return false; }
    if (size >= 3 && memcmp(text, "\xEF\xBB\xBF", 3) == 0) j->pos = 3;   /* a UTF-8 byte order mark */
    if (moe_ep__jvalue(j, 0) != 0) { moe_ep__json_free(j); return false; }
    moe_ep__jspace(j);
    if (j->pos != j->size) { moe_ep__jfail(j, "text after the value"); moe_ep__json_free(j); return false; }
    return true;
}

MOE_EP_API moe_ep_result moe_ep_json_check(const void* text, size_t size, int max_depth, char* err, size_t err_size) {
    moe_ep__json j;
    if (!text && size) { moe_ep__st_err(err, err_size, "moe_ep_json_check: text is NULL"); return MOE_EP_ERROR_INVALID_ARGUMENT; }
    if (!moe_ep__json_parse(&j, NULL, text ? (const char*)text : "", size, max_depth, "<json>", err, err_size))
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    moe_ep__json_free(&j);
    return MOE_EP_OK;
}

/* Member `key` of object node `obj`: its node, -1 if absent, -2 if the key appears twice. */
MOE_EP_PRIVATE int moe_ep__jget(const moe_ep__json* j, int obj, const char* key) {
    int c, found = -1;
    if (obj < 0 || j->nodes[obj].type != MOE_EP__J_OBJECT) return -1;
    for (c = j->nodes[obj].first; c >= 0; c = j->nodes[c].next) {
        if (strcmp(j->nodes[c].key, key) == 0) {
            if (found >= 0) return -2;
            found = c;
        }
    }
    return found;
}

/* >>files: bounded reads. */
MOE_EP_PRIVATE bool moe_ep__read_at(int fd, uint64_t offset, void* out, uint64_t size) {
    unsigned char* p = (unsigned char*)out;
    if (offset > (uint64_t)LLONG_MAX || (off_t)offset < 0 || (uint64_t)(off_t)offset != offset) return false;
    if (lseek(fd, (off_t)offset, SEEK_SET) == (off_t)-1) return false;
    while (size > 0) {
        size_t want = size > (1u << 30) ? (1u << 30) : (size_t)size;
        ssize_t got = read(fd, p, want);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) return false;
        p += got;
        size -= (uint64_t)got;
    }
    return true;
}

/* The whole small file at path, NUL-terminated, at most max bytes. */
MOE_EP_PRIVATE moe_ep_result moe_ep__slurp(const moe_ep_allocator* a, const char* path, uint64_t max, char** out,
                                           size_t* size, char* err, size_t err_size) {
    struct stat st;
    char* text;
    int fd = open(path, O_RDONLY);
    if (fd < 0) { moe_ep__st_err(err, err_size, "%s: cannot open: %s", path, strerror(errno)); return MOE_EP_ERROR_INVALID_ARGUMENT; }
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        moe_ep__st_err(err, err_size, "%s: not a regular file", path);
        close(fd);
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    if ((uint64_t)st.st_size > max) {
        moe_ep__st_err(err, err_size, "%s: %llu bytes, above the limit of %llu", path, (unsigned long long)st.st_size,
                       (unsigned long long)max);
        close(fd);
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    text = (char*)moe_ep_alloc(a, (size_t)st.st_size + 1);
    if (!text) { close(fd); moe_ep__st_err(err, err_size, "%s: out of memory", path); return MOE_EP_ERROR_OUT_OF_MEMORY; }
    if (!moe_ep__read_at(fd, 0, text, (uint64_t)st.st_size)) {
        moe_ep__st_err(err, err_size, "%s: read failed (%llu bytes)", path, (unsigned long long)st.st_size);
        moe_ep_free(a, text);
        close(fd);
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    close(fd);
    text[st.st_size] = '\0';
    *out = text;
    *size = (size_t)st.st_size;
    return MOE_EP_OK;
}

/* >>safetensors */
static const struct { const char* name; int bits; } moe_ep__st_dtypes[MOE_EP_ST_DTYPE_COUNT] = {
    { "?", 0 }, { "BOOL", 8 }, { "U8", 8 }, { "I8", 8 }, { "F8_E5M2", 8 }, { "F8_E4M3", 8 }, { "F8_E8M0", 8 },
    { "I16", 16 }, { "U16", 16 }, { "F16", 16 }, { "BF16", 16 }, { "I32", 32 }, { "U32", 32 }, { "F32", 32 },
    { "C64", 64 }, { "F64", 64 }, { "I64", 64 }, { "U64", 64 }, { "F4", 4 }, { "F6_E2M3", 6 }, { "F6_E3M2", 6 },
};

MOE_EP_API const char* moe_ep_st_dtype_string(moe_ep_st_dtype dtype) {
    if ((int)dtype <= 0 || dtype >= MOE_EP_ST_DTYPE_COUNT) return "unknown";
    return moe_ep__st_dtypes[dtype].name;
}

struct moe_ep_st_file {
    moe_ep_allocator allocator;
    int fd;                         /* -1 for a file in memory */
    const unsigned char* memory;
    uint64_t file_size, data_start;
    char* path;
    moe_ep_st_tensor* tensors;      /* sorted by name */
    int count;
    char** meta;                    /* key, value pairs */
    int meta_count;
    char* strings;                  /* names and metadata */
};

MOE_EP_API void moe_ep_st_close(moe_ep_st_file* f) {
    if (!f) return;
    if (f->fd >= 0) close(f->fd);
    moe_ep_free(&f->allocator, f->tensors);
    moe_ep_free(&f->allocator, f->meta);
    moe_ep_free(&f->allocator, f->strings);
    moe_ep_free(&f->allocator, f->path);
    moe_ep_free(&f->allocator, f);
}

MOE_EP_PRIVATE int moe_ep__st_by_name(const void* a, const void* b) {
    return strcmp(((const moe_ep_st_tensor*)a)->name, ((const moe_ep_st_tensor*)b)->name);
}

MOE_EP_PRIVATE int moe_ep__st_by_offset(const void* a, const void* b) {
    const moe_ep_st_tensor* x = *(const moe_ep_st_tensor* const*)a;
    const moe_ep_st_tensor* y = *(const moe_ep_st_tensor* const*)b;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    if (x->size != y->size) return x->size < y->size ? -1 : 1;
    return strcmp(x->name, y->name);
}

MOE_EP_PRIVATE char* moe_ep__st_dup(moe_ep_st_file* f, const char* s, size_t* used) {
    size_t n = strlen(s) + 1;
    char* out = f->strings + *used;
    memcpy(out, s, n);
    *used += n;
    return out;
}

MOE_EP_PRIVATE void moe_ep__st_shape_text(const moe_ep_st_tensor* t, char* out, size_t size) {
    size_t used = 0;
    int i;
    out[0] = '\0';
    used += (size_t)snprintf(out, size, "[");
    for (i = 0; i < t->ndim && used < size; ++i)
        used += (size_t)snprintf(out + used, size - used, i ? ", %lld" : "%lld", (long long)t->shape[i]);
    if (used < size) snprintf(out + used, size - used, "]");
}

/* One tensor entry of the header (node n, key = its name) into t. */
MOE_EP_PRIVATE bool moe_ep__st_entry(moe_ep_st_file* f, const moe_ep__json* j, int n, moe_ep_st_tensor* t,
                                     uint64_t data_size, char* err, size_t err_size) {
    const char* name = j->nodes[n].key;
    int dt = moe_ep__jget(j, n, "dtype"), sh = moe_ep__jget(j, n, "shape"), off = moe_ep__jget(j, n, "data_offsets");
    int c, d;
    uint64_t elements = 1, begin, end, bits;
    if (j->nodes[n].type != MOE_EP__J_OBJECT || dt == -1 || sh == -1 || off == -1) {
        moe_ep__st_err(err, err_size, "%s: tensor '%s': an object with dtype, shape and data_offsets expected", f->path, name);
        return false;
    }
    if (dt == -2 || sh == -2 || off == -2) {
        moe_ep__st_err(err, err_size, "%s: tensor '%s': a key appears twice", f->path, name);
        return false;
    }
    if (j->nodes[dt].type != MOE_EP__J_STRING) {
        moe_ep__st_err(err, err_size, "%s: tensor '%s': dtype is not a string", f->path, name);
        return false;
    }
    t->dtype = MOE_EP_ST_DTYPE_UNKNOWN;
    for (d = 1; d < MOE_EP_ST_DTYPE_COUNT; ++d)
        if (strcmp(j->nodes[dt].str, moe_ep__st_dtypes[d].name) == 0) t->dtype = (moe_ep_st_dtype)d;
    if (t->dtype == MOE_EP_ST_DTYPE_UNKNOWN) {
        moe_ep__st_err(err, err_size, "%s: tensor '%s': unknown dtype '%.32s'", f->path, name, j->nodes[dt].str);
        return false;
    }
    if (j->nodes[sh].type != MOE_EP__J_ARRAY || j->nodes[sh].count > MOE_EP_ST_MAX_DIMS) {
        moe_ep__st_err(err, err_size, "%s: tensor '%s': shape must be an array of at most %d sizes", f->path, name,
                       MOE_EP_ST_MAX_DIMS);
        return false;
    }
    t->ndim = 0;
    for (c = j->nodes[sh].first; c >= 0; c = j->nodes[c].next) {
        const moe_ep__jnode* v = &j->nodes[c];
        if (v->type != MOE_EP__J_NUMBER || !v->integer || v->negative || v->magnitude > (uint64_t)INT64_MAX) {
            moe_ep__st_err(err, err_size, "%s: tensor '%s': shape[%d] is not a size", f->path, name, t->ndim);
            return false;
        }
        t->shape[t->ndim++] = (int64_t)v->magnitude;
        if (v->magnitude && elements > UINT64_MAX / v->magnitude) {
            moe_ep__st_err(err, err_size, "%s: tensor '%s': shape overflows (more than 2^64 elements)", f->path, name);
            return false;
        }
        elements *= v->magnitude;
    }
    if (j->nodes[off].type != MOE_EP__J_ARRAY || j->nodes[off].count != 2) {
        moe_ep__st_err(err, err_size, "%s: tensor '%s': data_offsets must be [begin, end]", f->path, name);
        return false;
    }
    c = j->nodes[off].first;
    d = j->nodes[c].next;
    if (j->nodes[c].type != MOE_EP__J_NUMBER || !j->nodes[c].integer || j->nodes[c].negative ||
        j->nodes[d].type != MOE_EP__J_NUMBER || !j->nodes[d].integer || j->nodes[d].negative) {
        moe_ep__st_err(err, err_size, "%s: tensor '%s': data_offsets must be two byte offsets", f->path, name);
        return false;
    }
    begin = j->nodes[c].magnitude;
    end = j->nodes[d].magnitude;
    if (end < begin) {
        moe_ep__st_err(err, err_size, "%s: tensor '%s': data_offsets [%llu, %llu] run backwards", f->path, name,
                       (unsigned long long)begin, (unsigned long long)end);
        return false;
    }
    bits = (uint64_t)moe_ep__st_dtypes[t->dtype].bits;
    if (elements > UINT64_MAX / bits || (elements * bits) % 8 != 0) {
        moe_ep__st_err(err, err_size, "%s: tensor '%s': %s of %llu elements is not a whole number of bytes or overflows",
                       f->path, name, moe_ep__st_dtypes[t->dtype].name, (unsigned long long)elements);
        return false;
    }
    if (end - begin != elements * bits / 8) {
        char shape[160];
        moe_ep__st_shape_text(t, shape, sizeof shape);
        moe_ep__st_err(err, err_size, "%s: tensor '%s': data_offsets [%llu, %llu] hold %llu bytes, %s %s needs %llu",
                       f->path, name, (unsigned long long)begin, (unsigned long long)end,
                       (unsigned long long)(end - begin), moe_ep__st_dtypes[t->dtype].name, shape,
                       (unsigned long long)(elements * bits / 8));
        return false;
    }
    if (end > data_size) {
        moe_ep__st_err(err, err_size, "%s: tensor '%s': data_offsets [%llu, %llu] run past the end of the file "
                       "(%llu bytes of data; truncated?)", f->path, name, (unsigned long long)begin,
                       (unsigned long long)end, (unsigned long long)data_size);
        return false;
    }
    t->offset = f->data_start + begin;
    t->size = end - begin;
    return true;
}

/* Parses header[0, header_size) of a file of file_size bytes into f. */
MOE_EP_PRIVATE moe_ep_result moe_ep__st_header(moe_ep_st_file* f, const char* header, uint64_t header_size,
                                               const moe_ep_st_limits* limits, char* err, size_t err_size) {
    moe_ep__json j;
    const moe_ep_st_tensor** order = NULL;
    int c, count = 0, metas = 0, i;
    size_t used = 0;
    uint64_t data_size = f->file_size - f->data_start, expect = 0;
    moe_ep_result result = MOE_EP_ERROR_INVALID_ARGUMENT;
    if (!moe_ep__json_parse(&j, &f->allocator, header, (size_t)header_size, limits ? limits->max_json_depth : 0,
                            f->path, err, err_size))
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    if (j.nodes[0].type != MOE_EP__J_OBJECT) {
        moe_ep__st_err(err, err_size, "%s: the header is not a JSON object", f->path);
        goto done;
    }
    for (c = j.nodes[0].first; c >= 0; c = j.nodes[c].next) {
        if (strcmp(j.nodes[c].key, "__metadata__") == 0) {
            int m;
            if (j.nodes[c].type != MOE_EP__J_OBJECT) {
                moe_ep__st_err(err, err_size, "%s: __metadata__ is not an object", f->path);
                goto done;
            }
            for (m = j.nodes[c].first; m >= 0; m = j.nodes[m].next) {
                if (j.nodes[m].type != MOE_EP__J_STRING) {
                    moe_ep__st_err(err, err_size, "%s: __metadata__ '%s' is not a string", f->path, j.nodes[m].key);
                    goto done;
                }
                metas++;
            }
        } else {
            count++;
        }
    }
    f->tensors = (moe_ep_st_tensor*)moe_ep_alloc(&f->allocator, (size_t)count * sizeof *f->tensors);
    f->meta = (char**)moe_ep_alloc(&f->allocator, (size_t)metas * 2 * sizeof *f->meta);
    f->strings = (char*)moe_ep_alloc(&f->allocator, j.arena_used + 1);
    order = (const moe_ep_st_tensor**)moe_ep_alloc(&f->allocator, (size_t)count * sizeof *order);
    if (!f->tensors || !f->meta || !f->strings || !order) {
        moe_ep__st_err(err, err_size, "%s: out of memory", f->path);
        result = MOE_EP_ERROR_OUT_OF_MEMORY;
        goto done;
    }
    for (c = j.nodes[0].first; c >= 0; c = j.nodes[c].next) {
        if (strcmp(j.nodes[c].key, "__metadata__") == 0) {
            int m;
            for (m = j.nodes[c].first; m >= 0; m = j.nodes[m].next) {
                f->meta[2 * f->meta_count] = moe_ep__st_dup(f, j.nodes[m].key, &used);
                f->meta[2 * f->meta_count + 1] = moe_ep__st_dup(f, j.nodes[m].str, &used);
                f->meta_count++;
            }
            continue;
        }
        memset(&f->tensors[f->count], 0, sizeof *f->tensors);
        if (!moe_ep__st_entry(f, &j, c, &f->tensors[f->count], data_size, err, err_size)) goto done;
        f->tensors[f->count].name = moe_ep__st_dup(f, j.nodes[c].key, &used);
        f->count++;
    }
    qsort(f->tensors, (size_t)f->count, sizeof *f->tensors, moe_ep__st_by_name);
    for (i = 1; i < f->count; ++i) {
        if (strcmp(f->tensors[i - 1].name, f->tensors[i].name) == 0) {
            moe_ep__st_err(err, err_size, "%s: tensor '%s' appears twice in the header", f->path, f->tensors[i].name);
            goto done;
        }
    }
    /* The data must be covered exactly, in offset order (as the format's own reader demands). */
    for (i = 0; i < f->count; ++i) order[i] = &f->tensors[i];
    qsort(order, (size_t)f->count, sizeof *order, moe_ep__st_by_offset);
    for (i = 0; i < f->count; ++i) {
        uint64_t begin = order[i]->offset - f->data_start;
        if (begin < expect) {
            moe_ep__st_err(err, err_size, "%s: tensor '%s' (bytes [%llu, %llu)) overlaps tensor '%s' (bytes [%llu, %llu))",
                           f->path, order[i]->name, (unsigned long long)begin,
                           (unsigned long long)(begin + order[i]->size), order[i - 1]->name,
                           (unsigned long long)(order[i - 1]->offset - f->data_start),
                           (unsigned long long)expect);
            goto done;
        }
        if (begin > expect) {
            moe_ep__st_err(err, err_size, "%s: tensor '%s' starts at byte %llu of the data, leaving a gap after byte %llu",
                           f->path, order[i]->name, (unsigned long long)begin, (unsigned long long)expect);
            goto done;
        }
        expect = begin + order[i]->size;
    }
    if (expect != data_size) {
        moe_ep__st_err(err, err_size, "%s: the tensors cover %llu bytes of data, the file holds %llu after its header%s",
                       f->path, (unsigned long long)expect, (unsigned long long)data_size,
                       expect < data_size ? "" : " (truncated)");
        goto done;
    }
    result = MOE_EP_OK;
done:
    moe_ep_free(&f->allocator, (void*)order);
    moe_ep__json_free(&j);
    return result;
}

MOE_EP_PRIVATE moe_ep_st_file* moe_ep__st_new(const moe_ep_allocator* allocator, const char* name) {
    moe_ep_st_file* f = (moe_ep_st_file*)moe_ep_alloc(allocator, sizeof *f);
    if (!f) return NULL;
    memset(f, 0, sizeof *f);
    if (allocator) f->allocator = *allocator;
    f->fd = -1;
    f->path = (char*)moe_ep_alloc(allocator, strlen(name) + 1);
    if (!f->path) { moe_ep_free(allocator, f); return NULL; }
    memcpy(f->path, name, strlen(name) + 1);
    return f;
}

MOE_EP_PRIVATE moe_ep_result moe_ep__st_check_length(moe_ep_st_file* f, uint64_t n, const moe_ep_st_limits* limits,
                                                     char* err, size_t err_size) {
    uint64_t max = limits && limits->max_header_bytes ? limits->max_header_bytes : MOE_EP__ST_MAX_HEADER;
    if (f->file_size < 8) {
        moe_ep__st_err(err, err_size, "%s: %llu bytes, too short for a safetensors file (truncated?)", f->path,
                       (unsigned long long)f->file_size);
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    if (n > f->file_size - 8) {
        moe_ep__st_err(err, err_size, "%s: header length %llu runs past the end of the file (%llu bytes)", f->path,
                       (unsigned long long)n, (unsigned long long)f->file_size);
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    if (n > max) {
        moe_ep__st_err(err, err_size, "%s: header length %llu is above the limit of %llu bytes", f->path,
                       (unsigned long long)n, (unsigned long long)max);
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    f->data_start = 8 + n;
    return MOE_EP_OK;
}

MOE_EP_PRIVATE uint64_t moe_ep__le64(const unsigned char* b) {
    uint64_t v = 0;
    int i;
    for (i = 7; i >= 0; --i) v = (v << 8) | b[i];
    return v;
}

MOE_EP_API moe_ep_result moe_ep_st_parse(const void* data, size_t size, const char* name,
                                         const moe_ep_st_limits* limits, const moe_ep_allocator* allocator,
                                         moe_ep_st_file** out, char* err, size_t err_size) {
    moe_ep_st_file* f;
    moe_ep_result r;
    if (!out || (!data && size)) {
        moe_ep__st_err(err, err_size, "moe_ep_st_parse: data or out is NULL");
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    f = moe_ep__st_new(allocator, name ? name : "<memory>");
    if (!f) { moe_ep__st_err(err, err_size, "out of memory"); return MOE_EP_ERROR_OUT_OF_MEMORY; }
    f->memory = (const unsigned char*)data;
    f->file_size = size;
    r = moe_ep__st_check_length(f, size >= 8 ? moe_ep__le64(f->memory) : 0, limits, err, err_size);
    if (r == MOE_EP_OK)
        r = moe_ep__st_header(f, (const char*)f->memory + 8, f->data_start - 8, limits, err, err_size);
    if (r != MOE_EP_OK) { moe_ep_st_close(f); return r; }
    *out = f;
    return MOE_EP_OK;
}

MOE_EP_API moe_ep_result moe_ep_st_open(const char* path, const moe_ep_st_limits* limits,
                                        const moe_ep_allocator* allocator, moe_ep_st_file** out,
                                        char* err, size_t err_size) {
    moe_ep_st_file* f;
    struct stat st;
    unsigned char len[8];
    char* header = NULL;
    moe_ep_result r;
    if (!path || !out) {
        moe_ep__st_err(err, err_size, "moe_ep_st_open: path or out is NULL");
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    f = moe_ep__st_new(allocator, path);
    if (!f) { moe_ep__st_err(err, err_size, "%s: out of memory", path); return MOE_EP_ERROR_OUT_OF_MEMORY; }
    f->fd = open(path, O_RDONLY);
    if (f->fd < 0) {
        moe_ep__st_err(err, err_size, "%s: cannot open: %s", path, strerror(errno));
        moe_ep_st_close(f);
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    if (fstat(f->fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        moe_ep__st_err(err, err_size, "%s: not a regular file", path);
        moe_ep_st_close(f);
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    f->file_size = (uint64_t)st.st_size;
    r = moe_ep__st_check_length(f, f->file_size >= 8 && moe_ep__read_at(f->fd, 0, len, 8) ? moe_ep__le64(len) : 0,
                                limits, err, err_size);
    if (r == MOE_EP_OK) {
        header = (char*)moe_ep_alloc(allocator, (size_t)(f->data_start - 8));
        if (!header) { moe_ep__st_err(err, err_size, "%s: out of memory", path); r = MOE_EP_ERROR_OUT_OF_MEMORY; }
        else if (!moe_ep__read_at(f->fd, 8, header, f->data_start - 8)) {
            moe_ep__st_err(err, err_size, "%s: cannot read the header (%llu bytes)", path,
                           (unsigned long long)(f->data_start - 8));
            r = MOE_EP_ERROR_INVALID_ARGUMENT;
        } else {
            r = moe_ep__st_header(f, header, f->data_start - 8, limits, err, err_size);
        }
    }
    moe_ep_free(allocator, header);
    if (r != MOE_EP_OK) { moe_ep_st_close(f); return r; }
    *out = f;
    return MOE_EP_OK;
}

MOE_EP_API int moe_ep_st_tensor_count(const moe_ep_st_file* f) { return f ? f->count : 0; }

MOE_EP_API const moe_ep_st_tensor* moe_ep_st_tensor_at(const moe_ep_st_file* f, int index) {
    return f && index >= 0 && index < f->count ? &f->tensors[index] : NULL;
}

MOE_EP_API const moe_ep_st_tensor* moe_ep_st_find(const moe_ep_st_file* f, const char* name) {
    int lo = 0, hi;
    if (!f || !name) return NULL;
    hi = f->count - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2, c = strcmp(f->tensors[mid].name, name);
        if (c == 0) return &f->tensors[mid];
        if (c < 0) lo = mid + 1; else hi = mid - 1;
    }
    return NULL;
}

MOE_EP_API const char* moe_ep_st_metadata(const moe_ep_st_file* f, const char* key) {
    int i;
    if (!f || !key) return NULL;
    for (i = 0; i < f->meta_count; ++i)
        if (strcmp(f->meta[2 * i], key) == 0) return f->meta[2 * i + 1];
    return NULL;
}

MOE_EP_API moe_ep_result moe_ep_st_read(moe_ep_st_file* f, const moe_ep_st_tensor* t, uint64_t offset, void* out,
                                        uint64_t size, char* err, size_t err_size) {
    if (!f || !t || (!out && size)) {
        moe_ep__st_err(err, err_size, "moe_ep_st_read: file, tensor or out is NULL");
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    if (offset > t->size || size > t->size - offset) {
        moe_ep__st_err(err, err_size, "%s: tensor '%s': bytes [%llu, +%llu) are outside its %llu bytes", f->path,
                       t->name, (unsigned long long)offset, (unsigned long long)size, (unsigned long long)t->size);
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    if (f->fd < 0) {
        memcpy(out, f->memory + t->offset + offset, (size_t)size);
        return MOE_EP_OK;
    }
    if (!moe_ep__read_at(f->fd, t->offset + offset, out, size)) {
        moe_ep__st_err(err, err_size, "%s: tensor '%s': read of %llu bytes at %llu failed (file truncated since it "
                       "was opened?)", f->path, t->name, (unsigned long long)size,
                       (unsigned long long)(t->offset + offset));
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    return MOE_EP_OK;
}

/* >>convert: stored formats to fp32, exactly where the format allows. */
MOE_EP_PRIVATE float moe_ep__bits_f32(uint32_t bits) {
    float v;
    memcpy(&v, &bits, 4);
    return v;
}

MOE_EP_PRIVATE float moe_ep__f16_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
    if (exp == 0x1F) return moe_ep__bits_f32(sign | 0x7F800000u | (man << 13));   /* inf, NaN */
    if (exp == 0) {                                                                /* zero, subnormal */
        float v = (float)man * (1.0f / 16777216.0f);                               /* man * 2^-24, exact */
        return sign ? -v : v;
    }
    return moe_ep__bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

/* FP8 E4M3 as torch's float8_e4m3fn: bias 7, no infinities, S.1111.111 is NaN. */
MOE_EP_PRIVATE float moe_ep__e4m3_f32(uint8_t b) {
    uint32_t exp = (b >> 3) & 0xFu, man = b & 7u;
    float v;
    if (exp == 0xF && man == 7) return moe_ep__bits_f32(0x7FC00000u);
    if (exp == 0) v = (float)man * (1.0f / 512.0f);                                /* man * 2^-9 */
    else v = moe_ep__bits_f32(((exp + 120u) << 23) | (man << 20));
    return (b & 0x80) ? -v : v;
}

MOE_EP_PRIVATE bool moe_ep__little_endian(void) {
    const uint16_t one = 1;
    unsigned char first;
    memcpy(&first, &one, 1);
    return first == 1;
}

/* A safetensors file is little-endian: its 4-byte words in the host's order. */
MOE_EP_PRIVATE void moe_ep__le32_words(uint32_t* words, size_t n) {
    size_t i;
    if (moe_ep__little_endian()) return;
    for (i = 0; i < n; ++i) {
        uint32_t w = words[i];
        words[i] = (w >> 24) | ((w >> 8) & 0xFF00u) | ((w << 8) & 0xFF0000u) | (w << 24);
    }
}

MOE_EP_PRIVATE void moe_ep__convert(moe_ep_st_dtype dtype, const unsigned char* in, float* out, size_t n) {
    size_t i;
    switch (dtype) {
    case MOE_EP_ST_F32:
        memcpy(out, in, n * 4);
        moe_ep__le32_words((uint32_t*)(void*)out, n);
        break;
    case MOE_EP_ST_BF16: {       /* the bf16 bits are the float's upper half */
        uint32_t* bits = (uint32_t*)(void*)out;
        if (moe_ep__little_endian()) {          /* the file's byte order: whole words, vectorised */
            for (i = 0; i < n; ++i) {
                uint16_t h;
                memcpy(&h, in + 2 * i, 2);
                bits[i] = (uint32_t)h << 16;
            }
        } else {
            for (i = 0; i < n; ++i) bits[i] = ((uint32_t)in[2 * i] << 16) | ((uint32_t)in[2 * i + 1] << 24);
        }
        break;
    }
    case MOE_EP_ST_F16:
        for (i = 0; i < n; ++i) out[i] = moe_ep__f16_f32((uint16_t)(in[2 * i] | (in[2 * i + 1] << 8)));
        break;
    case MOE_EP_ST_F64:
        for (i = 0; i < n; ++i) {
            uint64_t u = moe_ep__le64(in + 8 * i);
            double d;
            memcpy(&d, &u, 8);
            out[i] = (float)d;
        }
        break;
    case MOE_EP_ST_F8_E4M3:
        for (i = 0; i < n; ++i) out[i] = moe_ep__e4m3_f32(in[i]);
        break;
    default: break;
    }
}

MOE_EP_PRIVATE bool moe_ep__st_float(moe_ep_st_dtype d) {
    return d == MOE_EP_ST_F32 || d == MOE_EP_ST_BF16 || d == MOE_EP_ST_F16 || d == MOE_EP_ST_F64;
}

/* count elements of t from element `first` as fp32 into out, through buffer (chunk bytes). */
MOE_EP_PRIVATE moe_ep_result moe_ep__st_read_convert(moe_ep_st_file* f, const moe_ep_st_tensor* t, uint64_t first,
                                                     uint64_t count, float* out, unsigned char* buffer,
                                                     size_t chunk, char* err, size_t err_size) {
    size_t each = (size_t)moe_ep__st_dtypes[t->dtype].bits / 8;
    if (t->dtype == MOE_EP_ST_F32) {     /* straight into place */
        moe_ep_result r = moe_ep_st_read(f, t, first * 4, out, count * 4, err, err_size);
        if (r == MOE_EP_OK) moe_ep__le32_words((uint32_t*)(void*)out, (size_t)count);
        return r;
    }
    while (count > 0) {
        uint64_t n = count < chunk / each ? count : chunk / each;
        moe_ep_result r = moe_ep_st_read(f, t, first * each, buffer, n * each, err, err_size);
        if (r != MOE_EP_OK) return r;
        moe_ep__convert(t->dtype, buffer, out, (size_t)n);
        out += n;
        first += n;
        count -= n;
    }
    return MOE_EP_OK;
}

MOE_EP_API moe_ep_result moe_ep_st_read_f32(moe_ep_st_file* f, const moe_ep_st_tensor* t, float* out, int64_t count,
                                            char* err, size_t err_size) {
    uint64_t elements;
    unsigned char* buffer;
    moe_ep_result r;
    int i;
    if (!f || !t || !out) {
        moe_ep__st_err(err, err_size, "moe_ep_st_read_f32: file, tensor or out is NULL");
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    if (!moe_ep__st_float(t->dtype)) {
        moe_ep__st_err(err, err_size, "%s: tensor '%s': dtype %s is not supported here (F32, BF16, F16, F64)", f->path,
                       t->name, moe_ep_st_dtype_string(t->dtype));
        return MOE_EP_ERROR_UNSUPPORTED;
    }
    for (elements = 1, i = 0; i < t->ndim; ++i) elements *= (uint64_t)t->shape[i];
    if (count < 0 || (uint64_t)count < elements) {
        moe_ep__st_err(err, err_size, "%s: tensor '%s': %llu elements, out holds %lld", f->path, t->name,
                       (unsigned long long)elements, (long long)count);
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    buffer = (unsigned char*)moe_ep_alloc(&f->allocator, MOE_EP__ST_CHUNK);
    if (!buffer) { moe_ep__st_err(err, err_size, "out of memory"); return MOE_EP_ERROR_OUT_OF_MEMORY; }
    r = moe_ep__st_read_convert(f, t, 0, elements, out, buffer, MOE_EP__ST_CHUNK, err, err_size);
    moe_ep_free(&f->allocator, buffer);
    return r;
}

/* >>model */
enum { MOE_EP__Q_NONE, MOE_EP__Q_FP8, MOE_EP__Q_MXFP4 };

typedef struct moe_ep__cfg {
    moe_ep_family family;
    char model_type[32], architecture[96];
    bool deepseek_v2;
    int num_layers, d_model, d_ff, num_experts, top_k, shared_d_ff;
    bool normalize;
    float routed_scaling;
    int n_group, topk_group;
    int first_k_dense, moe_layer_freq, sparse_step;
    int* mlp_only;                  /* [mlp_only_count] */
    int mlp_only_count;
    int* moe_list;                  /* Llama-4's moe_layers, or NULL */
    int moe_list_count;
    int interleave_step;
    float swiglu_limit;
    int quant, fp8_block[2];
} moe_ep__cfg;

typedef struct moe_ep__map_entry { const char* name; int shard; } moe_ep__map_entry;

struct moe_ep_model {
    moe_ep_allocator allocator;
    moe_ep_st_limits limits;
    char* dir;
    moe_ep__cfg cfg;
    bool sharded;
    moe_ep__map_entry* map;         /* sorted by name (sharded) */
    int map_count;
    char** shard_names;             /* [shards] file names */
    moe_ep_st_file** shards;        /* [shards] opened on demand */
    int shard_count;
    char* strings;                  /* names of the map */
};

struct moe_ep_model_layer {
    moe_ep_allocator allocator;
    moe_ep_desc desc;
    float* weights;                 /* every float the desc points at */
    moe_ep_expert_weights* experts; /* [local] */
    int* expert_ids;                /* [local] */
    int* placement_table;           /* [E] or NULL */
    int local;
    uint64_t bytes, bytes_read;
};

static const char* const moe_ep__family_types[][3] = {     /* model_type, architecture, family */
    { "mixtral", "MixtralForCausalLM", "mixtral" },
    { "qwen2_moe", "Qwen2MoeForCausalLM", "qwen2_moe" },
    { "qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe" },
    { "deepseek_v3", "DeepseekV3ForCausalLM", "deepseek_v3" },
    { "deepseek_v2", "DeepseekV2ForCausalLM", "deepseek_v2" },
    { "gpt_oss", "GptOssForCausalLM", "gpt_oss" },
    { "llama4_text", "Llama4ForCausalLM", "llama4" },
    { "llama4", "Llama4ForConditionalGeneration", "llama4" },
};
#define MOE_EP__FAMILY_TYPES ((int)(sizeof moe_ep__family_types / sizeof moe_ep__family_types[0]))

MOE_EP_PRIVATE moe_ep_family moe_ep__family_of(const char* family_name) {
    if (strcmp(family_name, "mixtral") == 0) return MOE_EP_FAMILY_MIXTRAL;
    if (strcmp(family_name, "qwen2_moe") == 0) return MOE_EP_FAMILY_QWEN2_MOE;
    if (strcmp(family_name, "qwen3_moe") == 0) return MOE_EP_FAMILY_QWEN3_MOE;
    if (strcmp(family_name, "gpt_oss") == 0) return MOE_EP_FAMILY_GPT_OSS;
    if (strcmp(family_name, "llama4") == 0) return MOE_EP_FAMILY_LLAMA4;
    return MOE_EP_FAMILY_DEEPSEEK_V3;                        /* deepseek_v3, deepseek_v2 */
}

/* config.json readers: a missing key gives the default; a present one must have the type
   and the range, else the error names the key and the rule. */
typedef struct moe_ep__cfgread {
    const moe_ep__json* j;
    int obj;
    const char* file;
    char* err;
    size_t err_size;
} moe_ep__cfgread;

MOE_EP_PRIVATE int moe_ep__cfg_node(moe_ep__cfgread* c, const char* key, bool* ok) {
    int n = moe_ep__jget(c->j, c->obj, key);
    *ok = true;
    if (n == -2) {
        moe_ep__st_err(c->err, c->err_size, "%s: key \"%s\" appears twice", c->file, key);
        *ok = false;
        return -1;
    }
    if (n >= 0 && c->j->nodes[n].type == MOE_EP__J_NULL) return -1;   /* null: the default */
    return n;
}

MOE_EP_PRIVATE bool moe_ep__cfg_int(moe_ep__cfgread* c, const char* key, int def, int min, int max, int* out) {
    bool ok;
    int n = moe_ep__cfg_node(c, key, &ok);
    const moe_ep__jnode* v;
    if (!ok) return false;
    if (n < 0) { *out = def; return true; }
    v = &c->j->nodes[n];
    if (v->type != MOE_EP__J_NUMBER || !v->integer) {
        moe_ep__st_err(c->err, c->err_size, "%s: %s must be an integer", c->file, key);
        return false;
    }
    if (v->magnitude > (uint64_t)INT_MAX || (v->negative ? -(int64_t)v->magnitude : (int64_t)v->magnitude) < min ||
        (v->negative ? -(int64_t)v->magnitude : (int64_t)v->magnitude) > max) {
        moe_ep__st_err(c->err, c->err_size, "%s: %s (%s%llu) must be in [%d, %d]", c->file, key, v->negative ? "-" : "",
                       (unsigned long long)v->magnitude, min, max);
        return false;
    }
    *out = v->negative ? -(int)v->magnitude : (int)v->magnitude;
    return true;
}

MOE_EP_PRIVATE bool moe_ep__cfg_num(moe_ep__cfgread* c, const char* key, double def, double min, double max, double* out) {
    bool ok;
    int n = moe_ep__cfg_node(c, key, &ok);
    if (!ok) return false;
    if (n < 0) { *out = def; return true; }
    if (c->j->nodes[n].type != MOE_EP__J_NUMBER) {
        moe_ep__st_err(c->err, c->err_size, "%s: %s must be a number", c->file, key);
        return false;
    }
    if (!(c->j->nodes[n].number >= min && c->j->nodes[n].number <= max)) {
        moe_ep__st_err(c->err, c->err_size, "%s: %s (%g) must be in [%g, %g]", c->file, key, c->j->nodes[n].number, min, max);
        return false;
    }
    *out = c->j->nodes[n].number;
    return true;
}

MOE_EP_PRIVATE bool moe_ep__cfg_bool(moe_ep__cfgread* c, const char* key, bool def, bool* out) {
    bool ok;
    int n = moe_ep__cfg_node(c, key, &ok);
    if (!ok) return false;
    if (n < 0) { *out = def; return true; }
    if (c->j->nodes[n].type != MOE_EP__J_TRUE && c->j->nodes[n].type != MOE_EP__J_FALSE) {
        moe_ep__st_err(c->err, c->err_size, "%s: %s must be true or false", c->file, key);
        return false;
    }
    *out = c->j->nodes[n].type == MOE_EP__J_TRUE;
    return true;
}

/* A string value, or NULL when absent; *ok false on a wrong type. */
MOE_EP_PRIVATE const char* moe_ep__cfg_str(moe_ep__cfgread* c, const char* key, bool* ok) {
    int n = moe_ep__cfg_node(c, key, ok);
    if (!*ok || n < 0) return NULL;
    if (c->j->nodes[n].type != MOE_EP__J_STRING) {
        moe_ep__st_err(c->err, c->err_size, "%s: %s must be a string", c->file, key);
        *ok = false;
        return NULL;
    }
    return c->j->nodes[n].str;
}

/* A list of layer indices in [0, layers) into a fresh array (count -1 when absent). */
MOE_EP_PRIVATE bool moe_ep__cfg_layers(moe_ep__cfgread* c, const moe_ep_allocator* a, const char* key, int layers,
                                       int** out, int* count) {
    bool ok;
    int n = moe_ep__cfg_node(c, key, &ok), e, i = 0;
    *out = NULL;
    *count = -1;
    if (!ok) return false;
    if (n < 0) return true;
    if (c->j->nodes[n].type != MOE_EP__J_ARRAY) {
        moe_ep__st_err(c->err, c->err_size, "%s: %s must be a list of layer indices", c->file, key);
        return false;
    }
    *out = (int*)moe_ep_alloc(a, (size_t)c->j->nodes[n].count * sizeof **out);
    if (!*out) { moe_ep__st_err(c->err, c->err_size, "%s: out of memory", c->file); return false; }
    for (e = c->j->nodes[n].first; e >= 0; e = c->j->nodes[e].next, ++i) {
        const moe_ep__jnode* v = &c->j->nodes[e];
        if (v->type != MOE_EP__J_NUMBER || !v->integer || v->negative || v->magnitude >= (uint64_t)layers) {
            moe_ep__st_err(c->err, c->err_size, "%s: %s[%d] is not a layer index in [0, num_hidden_layers = %d)", c->file,
                           key, i, layers);
            moe_ep_free(a, *out);
            *out = NULL;
            return false;
        }
        (*out)[i] = (int)v->magnitude;
    }
    *count = i;
    return true;
}

MOE_EP_PRIVATE bool moe_ep__cfg_family(moe_ep__cfgread* c, moe_ep__cfg* cfg, int* text_obj) {
    bool ok;
    const char* type = moe_ep__cfg_str(c, "model_type", &ok);
    const char* arch = NULL;
    int archs, by_type = -1, by_arch = -1, i;
    if (!ok) return false;
    archs = moe_ep__jget(c->j, c->obj, "architectures");
    if (archs == -2) { moe_ep__st_err(c->err, c->err_size, "%s: key \"architectures\" appears twice", c->file); return false; }
    if (archs >= 0 && c->j->nodes[archs].type == MOE_EP__J_ARRAY && c->j->nodes[archs].count > 0) {
        int first = c->j->nodes[archs].first;
        if (c->j->nodes[first].type != MOE_EP__J_STRING) {
            moe_ep__st_err(c->err, c->err_size, "%s: architectures[0] must be a string", c->file);
            return false;
        }
        arch = c->j->nodes[first].str;
    }
    for (i = 0; i < MOE_EP__FAMILY_TYPES; ++i) {
        if (type && strcmp(type, moe_ep__family_types[i][0]) == 0) by_type = i;
        if (arch && strcmp(arch, moe_ep__family_types[i][1]) == 0) by_arch = i;
    }
    if (!type && !arch) {
        moe_ep__st_err(c->err, c->err_size, "%s: neither model_type nor architectures names the model", c->file);
        return false;
    }
    if ((type && by_type < 0) || (!type && by_arch < 0)) {
        moe_ep__st_err(c->err, c->err_size, "%s: %s \"%s\" is not a supported MoE family (mixtral, qwen2_moe, qwen3_moe, "
                       "deepseek_v3, deepseek_v2, gpt_oss, llama4_text, llama4)", c->file, type ? "model_type" : "architectures[0]",
                       type ? type : arch);
        return false;
    }
    if (type && arch && by_arch >= 0 &&
        strcmp(moe_ep__family_types[by_type][2], moe_ep__family_types[by_arch][2]) != 0) {
        moe_ep__st_err(c->err, c->err_size, "%s: model_type \"%s\" contradicts architectures[0] \"%s\"", c->file, type, arch);
        return false;
    }
    i = by_type >= 0 ? by_type : by_arch;
    snprintf(cfg->model_type, sizeof cfg->model_type, "%s", moe_ep__family_types[i][0]);
    snprintf(cfg->architecture, sizeof cfg->architecture, "%s", arch ? arch : "");
    cfg->family = moe_ep__family_of(moe_ep__family_types[i][2]);
    cfg->deepseek_v2 = strcmp(moe_ep__family_types[i][0], "deepseek_v2") == 0;
    *text_obj = c->obj;
    if (strcmp(moe_ep__family_types[i][0], "llama4") == 0) {     /* the multimodal config: its text_config */
        int t = moe_ep__jget(c->j, c->obj, "text_config");
        if (t < 0 || c->j->nodes[t].type != MOE_EP__J_OBJECT) {
            moe_ep__st_err(c->err, c->err_size, "%s: model_type llama4 needs a text_config object", c->file);
            return false;
        }
        *text_obj = t;
    }
    return true;
}

MOE_EP_PRIVATE bool moe_ep__cfg_quant(moe_ep__cfgread* c, moe_ep__cfg* cfg) {
    int q = moe_ep__jget(c->j, c->obj, "quantization_config"), saved = c->obj, b;
    bool ok;
    const char* method;
    cfg->fp8_block[0] = cfg->fp8_block[1] = 128;
    if (q < 0 || c->j->nodes[q].type == MOE_EP__J_NULL) return true;
    if (c->j->nodes[q].type != MOE_EP__J_OBJECT) {
        moe_ep__st_err(c->err, c->err_size, "%s: quantization_config must be an object", c->file);
        return false;
    }
    c->obj = q;
    method = moe_ep__cfg_str(c, "quant_method", &ok);
    if (ok && method && strcmp(method, "fp8") == 0) {
        cfg->quant = MOE_EP__Q_FP8;
        b = moe_ep__jget(c->j, q, "weight_block_size");
        if (b >= 0) {
            int e = c->j->nodes[b].first, i;
            if (c->j->nodes[b].type != MOE_EP__J_ARRAY || c->j->nodes[b].count != 2) e = -2;
            for (i = 0; e >= 0 && i < 2; e = c->j->nodes[e].next, ++i) {
                const moe_ep__jnode* v = &c->j->nodes[e];
                if (v->type != MOE_EP__J_NUMBER || !v->integer || v->negative || v->magnitude == 0 || v->magnitude > 1u << 20)
                    break;
                cfg->fp8_block[i] = (int)v->magnitude;
            }
            if (i != 2) {
                moe_ep__st_err(c->err, c->err_size, "%s: quantization_config.weight_block_size must be two sizes in [1, 2^20]",
                               c->file);
                ok = false;
            }
        }
    } else if (ok && method && strcmp(method, "mxfp4") == 0) {
        cfg->quant = MOE_EP__Q_MXFP4;
    } else if (ok) {
        moe_ep__st_err(c->err, c->err_size, "%s: quantization_config.quant_method \"%s\" is not supported (fp8, mxfp4)",
                       c->file, method ? method : "(none)");
        ok = false;
    }
    c->obj = saved;
    return ok;
}

/* The family's config keys, with transformers' defaults (the presets'). */
MOE_EP_PRIVATE bool moe_ep__cfg_parse(moe_ep__cfgread* c, const moe_ep_allocator* a, moe_ep__cfg* cfg) {
    moe_ep_desc preset;
    int text, alias;
    bool ok, v2_greedy = true;
    double scaling = 1.0, limit = 7.0;
    const char* act;
    if (!moe_ep__cfg_family(c, cfg, &text) || !moe_ep__cfg_quant(c, cfg)) return false;
    c->obj = text;
    preset = moe_ep_family_desc(cfg->family);
    cfg->normalize = preset.normalize_topk;
    if (!moe_ep__cfg_int(c, "hidden_size", preset.d_model, 1, 1 << 20, &cfg->d_model) ||
        !moe_ep__cfg_int(c, "num_hidden_layers", 0, 1, 1 << 16, &cfg->num_layers) ||
        !moe_ep__cfg_int(c, "num_experts_per_tok", preset.top_k, 1, 1 << 16, &cfg->top_k))
        return false;
    if (cfg->num_layers == 0) { moe_ep__st_err(c->err, c->err_size, "%s: num_hidden_layers is missing", c->file); return false; }
    act = moe_ep__cfg_str(c, "hidden_act", &ok);
    if (!ok) return false;
    if (act && cfg->family != MOE_EP_FAMILY_GPT_OSS && strcmp(act, "silu") != 0 && strcmp(act, "swish") != 0) {
        moe_ep__st_err(c->err, c->err_size, "%s: hidden_act \"%s\" is not supported (silu: SwiGLU experts)", c->file, act);
        return false;
    }
    switch (cfg->family) {
    case MOE_EP_FAMILY_MIXTRAL:
        if (!moe_ep__cfg_int(c, "num_local_experts", preset.num_experts, 1, 1 << 20, &cfg->num_experts) ||
            !moe_ep__cfg_int(c, "intermediate_size", preset.d_ff, 1, 1 << 24, &cfg->d_ff))
            return false;
        break;
    case MOE_EP_FAMILY_QWEN2_MOE:
    case MOE_EP_FAMILY_QWEN3_MOE:
        if (!moe_ep__cfg_int(c, "num_experts", preset.num_experts, 1, 1 << 20, &cfg->num_experts) ||
            !moe_ep__cfg_int(c, "num_local_experts", cfg->num_experts, 1, 1 << 20, &alias) ||
            !moe_ep__cfg_int(c, "moe_intermediate_size", preset.d_ff, 1, 1 << 24, &cfg->d_ff) ||
            !moe_ep__cfg_bool(c, "norm_topk_prob", preset.normalize_topk, &cfg->normalize) ||
            !moe_ep__cfg_int(c, "decoder_sparse_step", 1, 1, 1 << 16, &cfg->sparse_step) ||
            !moe_ep__cfg_layers(c, a, "mlp_only_layers", cfg->num_layers, &cfg->mlp_only, &cfg->mlp_only_count))
            return false;
        if (moe_ep__jget(c->j, c->obj, "num_experts") >= 0 && alias != cfg->num_experts) {
            moe_ep__st_err(c->err, c->err_size, "%s: num_experts (%d) contradicts num_local_experts (%d)", c->file,
                           cfg->num_experts, alias);
            return false;
        }
        cfg->num_experts = alias;
        if (cfg->family == MOE_EP_FAMILY_QWEN2_MOE &&
            !moe_ep__cfg_int(c, "shared_expert_intermediate_size", preset.shared.d_ff, 0, 1 << 24, &cfg->shared_d_ff))
            return false;
        break;
    case MOE_EP_FAMILY_DEEPSEEK_V3: {
        int shared;
        const char* method;
        if (!moe_ep__cfg_int(c, "n_routed_experts", preset.num_experts, 1, 1 << 20, &cfg->num_experts) ||
            !moe_ep__cfg_int(c, "moe_intermediate_size", preset.d_ff, 1, 1 << 24, &cfg->d_ff) ||
            !moe_ep__cfg_int(c, "n_shared_experts", cfg->deepseek_v2 ? 2 : 1, 0, 1 << 10, &shared) ||
            !moe_ep__cfg_bool(c, "norm_topk_prob", true, &cfg->normalize) ||
            !moe_ep__cfg_num(c, "routed_scaling_factor", cfg->deepseek_v2 ? 1.0 : 2.5, 1e-30, 1e30, &scaling) ||
            !moe_ep__cfg_int(c, "first_k_dense_replace", cfg->deepseek_v2 ? 0 : 3, 0, 1 << 16, &cfg->first_k_dense) ||
            !moe_ep__cfg_int(c, "moe_layer_freq", 1, 1, 1 << 16, &cfg->moe_layer_freq))
            return false;
        cfg->shared_d_ff = shared * cfg->d_ff;
        method = moe_ep__cfg_str(c, "topk_method", &ok);
        if (!ok) return false;
        if (cfg->deepseek_v2) {
            cfg->normalize = false;     /* transformers 5.17's DeepseekV2TopkRouter never renormalises */
            v2_greedy = !method || strcmp(method, "greedy") == 0;
            cfg->n_group = cfg->topk_group = 1;
            if (!v2_greedy) {
                moe_ep__st_err(c->err, c->err_size, "%s: topk_method \"%s\" is not supported for deepseek_v2 (\"greedy\" only: "
                               "its group_limited_greedy ranks groups by their best score, not the core's two best)",
                               c->file, method);
                return false;
            }
        } else {
            const char* scoring = moe_ep__cfg_str(c, "scoring_func", &ok);
            if (!ok) return false;
            if ((method && strcmp(method, "noaux_tc") != 0) || (scoring && strcmp(scoring, "sigmoid") != 0)) {
                moe_ep__st_err(c->err, c->err_size, "%s: topk_method \"%s\" / scoring_func \"%s\" is not DeepSeek-V3's "
                               "(noaux_tc, sigmoid)", c->file, method ? method : "", scoring ? scoring : "");
                return false;
            }
            if (!moe_ep__cfg_int(c, "n_group", preset.num_groups, 1, 1 << 20, &cfg->n_group) ||
                !moe_ep__cfg_int(c, "topk_group", preset.topk_groups, 1, 1 << 20, &cfg->topk_group))
                return false;
        }
        break;
    }
    case MOE_EP_FAMILY_GPT_OSS:
        if (!moe_ep__cfg_int(c, "num_local_experts", preset.num_experts, 1, 1 << 20, &cfg->num_experts) ||
            !moe_ep__cfg_int(c, "intermediate_size", preset.d_ff, 1, 1 << 24, &cfg->d_ff) ||
            !moe_ep__cfg_num(c, "swiglu_limit", 7.0, 1e-30, 1e30, &limit))
            return false;
        break;
    case MOE_EP_FAMILY_LLAMA4:
        if (!moe_ep__cfg_int(c, "num_local_experts", preset.num_experts, 1, 1 << 20, &cfg->num_experts) ||
            !moe_ep__cfg_int(c, "intermediate_size", preset.d_ff, 1, 1 << 24, &cfg->d_ff) ||
            !moe_ep__cfg_int(c, "interleave_moe_layer_step", 1, 1, 1 << 16, &cfg->interleave_step) ||
            !moe_ep__cfg_layers(c, a, "moe_layers", cfg->num_layers, &cfg->moe_list, &cfg->moe_list_count))
            return false;
        cfg->shared_d_ff = cfg->d_ff;
        break;
    default:
        break;
    }
    cfg->routed_scaling = (float)scaling;
    cfg->swiglu_limit = (float)limit;
    /* numbers that contradict each other */
    if (cfg->top_k > cfg->num_experts) {
        moe_ep__st_err(c->err, c->err_size, "%s: num_experts_per_tok (%d) is above the number of experts (%d)", c->file,
                       cfg->top_k, cfg->num_experts);
        return false;
    }
    if (cfg->family == MOE_EP_FAMILY_DEEPSEEK_V3 && !cfg->deepseek_v2) {
        if (cfg->num_experts % cfg->n_group != 0) {
            moe_ep__st_err(c->err, c->err_size, "%s: n_group (%d) does not divide n_routed_experts (%d)", c->file,
                           cfg->n_group, cfg->num_experts);
            return false;
        }
        if (cfg->topk_group > cfg->n_group) {
            moe_ep__st_err(c->err, c->err_size, "%s: topk_group (%d) is above n_group (%d)", c->file, cfg->topk_group,
                           cfg->n_group);
            return false;
        }
        if (cfg->top_k > cfg->topk_group * (cfg->num_experts / cfg->n_group)) {
            moe_ep__st_err(c->err, c->err_size, "%s: num_experts_per_tok (%d) is above the %d experts that topk_group (%d) "
                           "groups hold", c->file, cfg->top_k, cfg->topk_group * (cfg->num_experts / cfg->n_group),
                           cfg->topk_group);
            return false;
        }
    }
    if (cfg->quant == MOE_EP__Q_MXFP4 && cfg->family != MOE_EP_FAMILY_GPT_OSS) {
        moe_ep__st_err(c->err, c->err_size, "%s: quant_method mxfp4 is supported for gpt_oss only", c->file);
        return false;
    }
    if (cfg->quant == MOE_EP__Q_MXFP4 && (cfg->d_model % 32 || cfg->d_ff % 32)) {
        moe_ep__st_err(c->err, c->err_size, "%s: MXFP4 needs hidden_size (%d) and intermediate_size (%d) to be multiples of 32",
                       c->file, cfg->d_model, cfg->d_ff);
        return false;
    }
    return true;
}

MOE_EP_API bool moe_ep_model_layer_is_moe(const moe_ep_model* m, int layer, char* reason, size_t reason_size) {
    const moe_ep__cfg* c;
    int i;
    if (!m) { moe_ep__st_err(reason, reason_size, "model is NULL"); return false; }
    c = &m->cfg;
    if (layer < 0 || layer >= c->num_layers) {
        moe_ep__st_err(reason, reason_size, "layer %d is not in [0, num_hidden_layers = %d)", layer, c->num_layers);
        return false;
    }
    switch (c->family) {
    case MOE_EP_FAMILY_QWEN2_MOE:
    case MOE_EP_FAMILY_QWEN3_MOE:
        for (i = 0; i < c->mlp_only_count; ++i)
            if (c->mlp_only[i] == layer) {
                moe_ep__st_err(reason, reason_size, "layer %d is dense: it is in mlp_only_layers", layer);
                return false;
            }
        if ((layer + 1) % c->sparse_step != 0) {
            moe_ep__st_err(reason, reason_size, "layer %d is dense: (layer + 1) %% decoder_sparse_step (%d) != 0", layer,
                           c->sparse_step);
            return false;
        }
        return true;
    case MOE_EP_FAMILY_DEEPSEEK_V3:
        if (layer < c->first_k_dense) {
            moe_ep__st_err(reason, reason_size, "layer %d is dense: below first_k_dense_replace (%d)", layer, c->first_k_dense);
            return false;
        }
        if (layer % c->moe_layer_freq != 0) {
            moe_ep__st_err(reason, reason_size, "layer %d is dense: layer %% moe_layer_freq (%d) != 0", layer, c->moe_layer_freq);
            return false;
        }
        return true;
    case MOE_EP_FAMILY_LLAMA4:
        if (c->moe_list_count >= 0) {
            for (i = 0; i < c->moe_list_count; ++i)
                if (c->moe_list[i] == layer) return true;
            moe_ep__st_err(reason, reason_size, "layer %d is dense: it is not in moe_layers", layer);
            return false;
        }
        if ((layer + 1) % c->interleave_step != 0) {
            moe_ep__st_err(reason, reason_size, "layer %d is dense: (layer + 1) %% interleave_moe_layer_step (%d) != 0",
                           layer, c->interleave_step);
            return false;
        }
        return true;
    default:
        return true;
    }
}

MOE_EP_PRIVATE char* moe_ep__join(const moe_ep_allocator* a, const char* dir, const char* name) {
    size_t n = strlen(dir), k = strlen(name);
    char* p = (char*)moe_ep_alloc(a, n + k + 2);
    if (!p) return NULL;
    memcpy(p, dir, n);
    p[n] = '/';
    memcpy(p + n + 1, name, k + 1);
    return p;
}

MOE_EP_API void moe_ep_model_close(moe_ep_model* m) {
    int i;
    if (!m) return;
    for (i = 0; i < m->shard_count; ++i) {
        if (m->shards) moe_ep_st_close(m->shards[i]);
        moe_ep_free(&m->allocator, m->shard_names[i]);
    }
    moe_ep_free(&m->allocator, m->shards);
    moe_ep_free(&m->allocator, m->shard_names);
    moe_ep_free(&m->allocator, m->map);
    moe_ep_free(&m->allocator, m->strings);
    moe_ep_free(&m->allocator, m->cfg.mlp_only);
    moe_ep_free(&m->allocator, m->cfg.moe_list);
    moe_ep_free(&m->allocator, m->dir);
    moe_ep_free(&m->allocator, m);
}

MOE_EP_PRIVATE int moe_ep__map_cmp(const void* a, const void* b) {
    return strcmp(((const moe_ep__map_entry*)a)->name, ((const moe_ep__map_entry*)b)->name);
}

/* model.safetensors.index.json's weight_map: tensor name -> shard file (a plain file name). */
MOE_EP_PRIVATE moe_ep_result moe_ep__model_index(moe_ep_model* m, const char* path, const char* text, size_t size,
                                                 char* err, size_t err_size) {
    moe_ep__json j;
    int map, e, i, n = 0;
    size_t used = 0;
    moe_ep_result r = MOE_EP_ERROR_INVALID_ARGUMENT;
    if (!moe_ep__json_parse(&j, &m->allocator, text, size, m->limits.max_json_depth, path, err, err_size))
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    map = moe_ep__jget(&j, 0, "weight_map");
    if (map < 0 || j.nodes[map].type != MOE_EP__J_OBJECT) {
        moe_ep__st_err(err, err_size, "%s: weight_map %s", path, map == -2 ? "appears twice" : "(an object) is missing");
        goto done;
    }
    m->map = (moe_ep__map_entry*)moe_ep_alloc(&m->allocator, (size_t)j.nodes[map].count * sizeof *m->map);
    m->shard_names = (char**)moe_ep_alloc(&m->allocator, (size_t)j.nodes[map].count * sizeof *m->shard_names);
    m->strings = (char*)moe_ep_alloc(&m->allocator, j.arena_used + 1);
    if (!m->map || !m->shard_names || !m->strings) {
        moe_ep__st_err(err, err_size, "%s: out of memory", path);
        r = MOE_EP_ERROR_OUT_OF_MEMORY;
        goto done;
    }
    for (e = j.nodes[map].first; e >= 0; e = j.nodes[e].next) {
        const char* file = j.nodes[e].str;
        size_t k;
        if (j.nodes[e].type != MOE_EP__J_STRING || !file[0] || strchr(file, '/') || strchr(file, '\\') ||
            strcmp(file, "..") == 0 || strcmp(file, ".") == 0) {
            moe_ep__st_err(err, err_size, "%s: weight_map: tensor '%s' must name a file of the directory", path, j.nodes[e].key);
            goto done;
        }
        for (i = 0; i < m->shard_count; ++i)
            if (strcmp(m->shard_names[i], file) == 0) break;
        if (i == m->shard_count) {
            k = strlen(file) + 1;
            m->shard_names[i] = (char*)moe_ep_alloc(&m->allocator, k);
            if (!m->shard_names[i]) { moe_ep__st_err(err, err_size, "%s: out of memory", path); r = MOE_EP_ERROR_OUT_OF_MEMORY; goto done; }
            memcpy(m->shard_names[i], file, k);
            m->shard_count++;
        }
        k = strlen(j.nodes[e].key) + 1;
        memcpy(m->strings + used, j.nodes[e].key, k);
        m->map[n].name = m->strings + used;
        m->map[n].shard = i;
        used += k;
        n++;
    }
    m->map_count = n;
    qsort(m->map, (size_t)n, sizeof *m->map, moe_ep__map_cmp);
    for (i = 1; i < n; ++i)
        if (strcmp(m->map[i - 1].name, m->map[i].name) == 0) {
            moe_ep__st_err(err, err_size, "%s: weight_map names tensor '%s' twice", path, m->map[i].name);
            goto done;
        }
    r = MOE_EP_OK;
done:
    moe_ep__json_free(&j);
    return r;
}

MOE_EP_API moe_ep_result moe_ep_model_open(const moe_ep_model_desc* desc, moe_ep_model** out, char* err, size_t err_size) {
    moe_ep_model* m;
    char *path = NULL, *text = NULL;
    size_t size;
    moe_ep__json j;
    moe_ep__cfgread c;
    moe_ep_result r;
    struct stat st;
    if (!desc || !desc->path || !out) {
        moe_ep__st_err(err, err_size, "moe_ep_model_open: desc, desc->path or out is NULL");
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    if ((desc->allocator.alloc_fn == NULL) != (desc->allocator.free_fn == NULL)) {
        moe_ep__st_err(err, err_size, "moe_ep_model_open: desc.allocator needs both alloc_fn and free_fn, or neither");
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    m = (moe_ep_model*)moe_ep_alloc(&desc->allocator, sizeof *m);
    if (!m) { moe_ep__st_err(err, err_size, "out of memory"); return MOE_EP_ERROR_OUT_OF_MEMORY; }
    memset(m, 0, sizeof *m);
    m->allocator = desc->allocator;
    m->limits = desc->limits;
    m->cfg.mlp_only_count = m->cfg.moe_list_count = -1;
    m->dir = moe_ep__join(&m->allocator, desc->path, "");
    if (!m->dir) { moe_ep_model_close(m); moe_ep__st_err(err, err_size, "out of memory"); return MOE_EP_ERROR_OUT_OF_MEMORY; }
    m->dir[strlen(m->dir) - 1] = '\0';
    path = moe_ep__join(&m->allocator, m->dir, "config.json");
    r = path ? moe_ep__slurp(&m->allocator, path, MOE_EP__ST_CONFIG_MAX, &text, &size, err, err_size) : MOE_EP_ERROR_OUT_OF_MEMORY;
    if (r == MOE_EP_OK) {
        if (!moe_ep__json_parse(&j, &m->allocator, text, size, m->limits.max_json_depth, path, err, err_size)) {
            r = MOE_EP_ERROR_INVALID_ARGUMENT;
        } else {
            c.j = &j; c.obj = 0; c.file = path; c.err = err; c.err_size = err_size;
            if (j.nodes[0].type != MOE_EP__J_OBJECT) {
                moe_ep__st_err(err, err_size, "%s: not a JSON object", path);
                r = MOE_EP_ERROR_INVALID_ARGUMENT;
            } else if (!moe_ep__cfg_parse(&c, &m->allocator, &m->cfg)) {
                r = MOE_EP_ERROR_INVALID_ARGUMENT;
            }
            moe_ep__json_free(&j);
        }
    }
    moe_ep_free(&m->allocator, text);
    moe_ep_free(&m->allocator, path);
    text = path = NULL;
    if (r == MOE_EP_OK) {             /* sharded, or one file */
        path = moe_ep__join(&m->allocator, m->dir, "model.safetensors.index.json");
        if (!path) r = MOE_EP_ERROR_OUT_OF_MEMORY;
        else if (stat(path, &st) == 0) {
            m->sharded = true;
            r = moe_ep__slurp(&m->allocator, path, MOE_EP__ST_CONFIG_MAX, &text, &size, err, err_size);
            if (r == MOE_EP_OK) r = moe_ep__model_index(m, path, text, size, err, err_size);
        } else {
            moe_ep_free(&m->allocator, path);
            path = moe_ep__join(&m->allocator, m->dir, "model.safetensors");
            m->shard_names = (char**)moe_ep_alloc(&m->allocator, sizeof *m->shard_names);
            if (!path || !m->shard_names) r = MOE_EP_ERROR_OUT_OF_MEMORY;
            else if (stat(path, &st) != 0) {
                moe_ep__st_err(err, err_size, "%s: neither model.safetensors nor model.safetensors.index.json is there",
                               m->dir);
                r = MOE_EP_ERROR_INVALID_ARGUMENT;
            } else {
                m->shard_names[0] = moe_ep__join(&m->allocator, "", "model.safetensors");
                if (!m->shard_names[0]) r = MOE_EP_ERROR_OUT_OF_MEMORY;
                else {
                    memmove(m->shard_names[0], m->shard_names[0] + 1, strlen(m->shard_names[0]));
                    m->shard_count = 1;
                }
            }
        }
        if (r == MOE_EP_OK) {
            m->shards = (moe_ep_st_file**)moe_ep_alloc(&m->allocator, (size_t)m->shard_count * sizeof *m->shards);
            if (!m->shards) r = MOE_EP_ERROR_OUT_OF_MEMORY;
            else memset(m->shards, 0, (size_t)m->shard_count * sizeof *m->shards);
        }
        if (r == MOE_EP_ERROR_OUT_OF_MEMORY) moe_ep__st_err(err, err_size, "%s: out of memory", m->dir);
    }
    moe_ep_free(&m->allocator, text);
    moe_ep_free(&m->allocator, path);
    if (r != MOE_EP_OK) { moe_ep_model_close(m); return r; }
    *out = m;
    return MOE_EP_OK;
}

MOE_EP_API moe_ep_model_info moe_ep_model_query(const moe_ep_model* m) {
    moe_ep_model_info info;
    int l;
    memset(&info, 0, sizeof info);
    if (!m) return info;
    info.family = m->cfg.family;
    info.model_type = m->cfg.model_type;
    info.architecture = m->cfg.architecture;
    info.num_layers = m->cfg.num_layers;
    for (l = 0; l < m->cfg.num_layers; ++l) info.moe_layers += moe_ep_model_layer_is_moe(m, l, NULL, 0);
    info.d_model = m->cfg.d_model;
    info.d_ff = m->cfg.d_ff;
    info.num_experts = m->cfg.num_experts;
    info.top_k = m->cfg.top_k;
    info.shared_d_ff = m->cfg.shared_d_ff;
    info.files = m->shard_count;
    info.sharded = m->sharded;
    info.quantization = m->cfg.quant == MOE_EP__Q_FP8 ? "fp8" : m->cfg.quant == MOE_EP__Q_MXFP4 ? "mxfp4" : "";
    return info;
}

/* The tensor `name`: 1 found (*file, *t), 0 absent, -1 error (err written). */
MOE_EP_PRIVATE int moe_ep__model_find(moe_ep_model* m, const char* name, moe_ep_st_file** file,
                                      const moe_ep_st_tensor** t, char* err, size_t err_size) {
    int shard = 0;
    if (m->sharded) {
        moe_ep__map_entry key;
        const moe_ep__map_entry* hit;
        key.name = name;
        key.shard = 0;
        hit = (const moe_ep__map_entry*)bsearch(&key, m->map, (size_t)m->map_count, sizeof *m->map, moe_ep__map_cmp);
        if (!hit) return 0;
        shard = hit->shard;
    }
    if (!m->shards[shard]) {
        char* path = moe_ep__join(&m->allocator, m->dir, m->shard_names[shard]);
        moe_ep_result r;
        char why[400];
        if (!path) { moe_ep__st_err(err, err_size, "out of memory"); return -1; }
        r = moe_ep_st_open(path, &m->limits, &m->allocator, &m->shards[shard], why, sizeof why);
        if (r != MOE_EP_OK) {
            if (m->sharded)
                moe_ep__st_err(err, err_size, "%s (the shard of tensor '%s' in model.safetensors.index.json): %s", path,
                               name, why);
            else
                moe_ep__st_err(err, err_size, "%s", why);
            moe_ep_free(&m->allocator, path);
            return -1;
        }
        moe_ep_free(&m->allocator, path);
    }
    *t = moe_ep_st_find(m->shards[shard], name);
    *file = m->shards[shard];
    if (!*t && m->sharded) {
        moe_ep__st_err(err, err_size, "%s/%s: tensor '%s' is missing (model.safetensors.index.json puts it in this file)",
                       m->dir, m->shard_names[shard], name);
        return -1;
    }
    return *t ? 1 : 0;
}

MOE_EP_PRIVATE const char* moe_ep__model_where(const moe_ep_model* m) {
    return m->sharded ? "model.safetensors.index.json" : "model.safetensors";
}

/* >>layer: one MoE layer on one rank. */
typedef struct moe_ep__loader {
    moe_ep_model* m;
    char prefix[160];               /* "model.layers.3.mlp." */
    unsigned char* buffer;          /* MOE_EP__ST_CHUNK bytes */
    uint64_t bytes_read;
    char* err;
    size_t err_size;
} moe_ep__loader;

/* name = prefix + leaf (+ printf arguments). */
MOE_EP_PRIVATE void moe_ep__name(const moe_ep__loader* L, char* out, size_t size, const char* leaf_fmt, ...) {
    va_list ap;
    size_t n = (size_t)snprintf(out, size, "%s", L->prefix);
    va_start(ap, leaf_fmt);
    if (n < size) vsnprintf(out + n, size - n, leaf_fmt, ap);
    va_end(ap);
}

/* Whether tensor `name` is there. Sharded: the index answers, no shard is opened. */
MOE_EP_PRIVATE bool moe_ep__exists(moe_ep__loader* L, const char* name, int* status) {
    moe_ep_st_file* f;
    const moe_ep_st_tensor* t;
    if (L->m->sharded) {
        moe_ep__map_entry key;
        key.name = name;
        key.shard = 0;
        *status = bsearch(&key, L->m->map, (size_t)L->m->map_count, sizeof *L->m->map, moe_ep__map_cmp) ? 1 : 0;
        return *status == 1;
    }
    *status = moe_ep__model_find(L->m, name, &f, &t, L->err, L->err_size);
    return *status == 1;
}

/* Finds `name`, checks its shape against dims[0, ndim) (what the config implies). */
MOE_EP_PRIVATE bool moe_ep__tensor(moe_ep__loader* L, const char* name, int ndim, const int64_t* dims,
                                   moe_ep_st_file** file, const moe_ep_st_tensor** t) {
    int found = moe_ep__model_find(L->m, name, file, t, L->err, L->err_size), i;
    bool same;
    if (found < 0) return false;
    if (found == 0) {
        moe_ep__st_err(L->err, L->err_size, "%s/%s: tensor '%s' is missing", L->m->dir, moe_ep__model_where(L->m), name);
        return false;
    }
    same = (*t)->ndim == ndim;
    for (i = 0; same && i < ndim; ++i) same = (*t)->shape[i] == dims[i];
    if (!same) {
        char has[160], want[160];
        moe_ep_st_tensor expect;
        memset(&expect, 0, sizeof expect);
        expect.ndim = ndim;
        for (i = 0; i < ndim; ++i) expect.shape[i] = dims[i];
        moe_ep__st_shape_text(*t, has, sizeof has);
        moe_ep__st_shape_text(&expect, want, sizeof want);
        moe_ep__st_err(L->err, L->err_size, "%s: tensor '%s' has shape %s, the config implies %s", (*file)->path, name, has, want);
        return false;
    }
    return true;
}

MOE_EP_PRIVATE bool moe_ep__unsupported(moe_ep__loader* L, const moe_ep_st_file* f, const moe_ep_st_tensor* t) {
    moe_ep__st_err(L->err, L->err_size, "%s: tensor '%s': dtype %s is not supported (F32, BF16, F16, F64; F8_E4M3 with "
                   "weight_scale_inv; MXFP4 _blocks/_scales for GPT-OSS experts)", f->path, t->name,
                   moe_ep_st_dtype_string(t->dtype));
    return false;
}

/* FP8 E4M3 [rows, cols] with its block scales name_scale_inv, dequantised into out. */
MOE_EP_PRIVATE bool moe_ep__load_fp8(moe_ep__loader* L, moe_ep_st_file* f, const moe_ep_st_tensor* t, float* out) {
    char name[320];
    int64_t rows = t->shape[0], cols = t->shape[1], bo = L->m->cfg.fp8_block[0], bi = L->m->cfg.fp8_block[1];
    int64_t dims[2], r, chunk_rows, done;
    moe_ep_st_file* sf;
    const moe_ep_st_tensor* st;
    float* scale;
    bool ok;
    snprintf(name, sizeof name, "%s_scale_inv", t->name);
    dims[0] = (rows + bo - 1) / bo;
    dims[1] = (cols + bi - 1) / bi;
    if (!moe_ep__tensor(L, name, 2, dims, &sf, &st)) return false;
    if (!moe_ep__st_float(st->dtype)) return moe_ep__unsupported(L, sf, st);
    scale = (float*)moe_ep_alloc(&L->m->allocator, (size_t)(dims[0] * dims[1]) * sizeof *scale);
    if (!scale) { moe_ep__st_err(L->err, L->err_size, "out of memory"); return false; }
    ok = moe_ep__st_read_convert(sf, st, 0, (uint64_t)(dims[0] * dims[1]), scale, L->buffer, MOE_EP__ST_CHUNK, L->err,
                                 L->err_size) == MOE_EP_OK;
    L->bytes_read += st->size;
    chunk_rows = cols > 0 ? (int64_t)MOE_EP__ST_CHUNK / cols : rows;
    if (chunk_rows < 1) chunk_rows = 1;
    for (done = 0; ok && done < rows; done += chunk_rows) {
        int64_t n = rows - done < chunk_rows ? rows - done : chunk_rows;
        uint64_t bytes = (uint64_t)(n * cols);
        /* a row longer than the buffer is read a row at a time in pieces */
        if (cols > (int64_t)MOE_EP__ST_CHUNK) {
            int64_t c0;
            for (c0 = 0; ok && c0 < cols; c0 += MOE_EP__ST_CHUNK) {
                int64_t k = cols - c0 < (int64_t)MOE_EP__ST_CHUNK ? cols - c0 : (int64_t)MOE_EP__ST_CHUNK, c;
                ok = moe_ep_st_read(f, t, (uint64_t)(done * cols + c0), L->buffer, (uint64_t)k, L->err, L->err_size) == MOE_EP_OK;
                for (c = 0; ok && c < k; ++c)
                    out[done * cols + c0 + c] = moe_ep__e4m3_f32(L->buffer[c]) * scale[(done / bo) * dims[1] + (c0 + c) / bi];
            }
            continue;
        }
        ok = moe_ep_st_read(f, t, (uint64_t)(done * cols), L->buffer, bytes, L->err, L->err_size) == MOE_EP_OK;
        for (r = 0; ok && r < n; ++r) {
            const float* srow = scale + ((done + r) / bo) * dims[1];
            const unsigned char* q = L->buffer + r * cols;
            float* o = out + (done + r) * cols;
            int64_t c;
            for (c = 0; c < cols; ++c) o[c] = moe_ep__e4m3_f32(q[c]) * srow[c / bi];
        }
    }
    L->bytes_read += t->size;
    moe_ep_free(&L->m->allocator, scale);
    return ok;
}

/* Tensor `name` of shape dims (slice >= 0: only dims[1..] of index `slice` of dim 0) as fp32. */
MOE_EP_PRIVATE bool moe_ep__load(moe_ep__loader* L, const char* name, int ndim, const int64_t* dims, int slice, float* out) {
    moe_ep_st_file* f;
    const moe_ep_st_tensor* t;
    uint64_t each = 1, first = 0;
    int i;
    if (!moe_ep__tensor(L, name, ndim, dims, &f, &t)) return false;
    for (i = slice >= 0 ? 1 : 0; i < ndim; ++i) each *= (uint64_t)dims[i];
    if (slice >= 0) first = (uint64_t)slice * each;
    if (t->dtype == MOE_EP_ST_F8_E4M3) {
        if (ndim != 2 || slice >= 0) {
            moe_ep__st_err(L->err, L->err_size, "%s: tensor '%s': F8_E4M3 is supported for 2-D weights with weight_scale_inv "
                           "(per-expert names), not in fused tensors", f->path, name);
            return false;
        }
        return moe_ep__load_fp8(L, f, t, out);
    }
    if (!moe_ep__st_float(t->dtype)) return moe_ep__unsupported(L, f, t);
    if (moe_ep__st_read_convert(f, t, first, each, out, L->buffer, MOE_EP__ST_CHUNK, L->err, L->err_size) != MOE_EP_OK)
        return false;
    L->bytes_read += each * (uint64_t)moe_ep__st_dtypes[t->dtype].bits / 8;
    return true;
}

/* GPT-OSS's MXFP4 expert `e` of base (experts.gate_up_proj / experts.down_proj): blocks
   [E, out, in/32, 16], scales [E, out, in/32], out-major; written transposed, [in, out],
   as GptOssExperts holds it (MOE_EP_WEIGHT_LAYOUT_GPT_OSS). */
MOE_EP_PRIVATE bool moe_ep__load_mxfp4(moe_ep__loader* L, const char* base, int64_t E, int64_t outs, int64_t ins, int e,
                                       float* out) {
    static const float fp4[16] = { 0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                   -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f };
    char name[320];
    int64_t bdims[4], sdims[3], groups = ins / 32, rows_per, done;
    moe_ep_st_file *bf, *sf;
    const moe_ep_st_tensor *bt, *st;
    bdims[0] = sdims[0] = E; bdims[1] = sdims[1] = outs; bdims[2] = sdims[2] = groups; bdims[3] = 16;
    snprintf(name, sizeof name, "%s_blocks", base);
    if (!moe_ep__tensor(L, name, 4, bdims, &bf, &bt)) return false;
    if (bt->dtype != MOE_EP_ST_U8) return moe_ep__unsupported(L, bf, bt);
    snprintf(name, sizeof name, "%s_scales", base);
    if (!moe_ep__tensor(L, name, 3, sdims, &sf, &st)) return false;
    if (st->dtype != MOE_EP_ST_U8) return moe_ep__unsupported(L, sf, st);
    /* a chunk holds rows_per rows: their blocks (ins / 2 bytes) and scales (groups bytes) */
    rows_per = (int64_t)MOE_EP__ST_CHUNK / (ins / 2 + groups);
    if (rows_per < 1) {
        moe_ep__st_err(L->err, L->err_size, "%s: tensor '%s': rows of %lld values are too long", bf->path, bt->name,
                       (long long)ins);
        return false;
    }
    for (done = 0; done < outs; done += rows_per) {
        int64_t n = outs - done < rows_per ? outs - done : rows_per, r, g, k;
        unsigned char* blocks = L->buffer;
        unsigned char* scales = L->buffer + n * (ins / 2);
        if (moe_ep_st_read(bf, bt, (uint64_t)((e * outs + done) * (ins / 2)), blocks, (uint64_t)(n * (ins / 2)), L->err,
                           L->err_size) != MOE_EP_OK ||
            moe_ep_st_read(sf, st, (uint64_t)((e * outs + done) * groups), scales, (uint64_t)(n * groups), L->err,
                           L->err_size) != MOE_EP_OK)
            return false;
        for (r = 0; r < n; ++r)
            for (g = 0; g < groups; ++g) {
                int exponent = (int)scales[r * groups + g] - 127;
                const unsigned char* b = blocks + r * (ins / 2) + g * 16;
                for (k = 0; k < 16; ++k) {
                    int64_t i = g * 32 + 2 * k;
                    out[i * outs + done + r] = ldexpf(fp4[b[k] & 15], exponent);
                    out[(i + 1) * outs + done + r] = ldexpf(fp4[b[k] >> 4], exponent);
                }
            }
    }
    L->bytes_read += (uint64_t)(outs * (ins / 2 + groups));
    return true;
}

MOE_EP_API void moe_ep_model_layer_free(moe_ep_model_layer* layer) {
    moe_ep_allocator a;
    if (!layer) return;
    a = layer->allocator;
    moe_ep_free(&a, layer->weights);
    moe_ep_free(&a, layer->experts);
    moe_ep_free(&a, layer->expert_ids);
    moe_ep_free(&a, layer->placement_table);
    moe_ep_free(&a, layer);
}

MOE_EP_API moe_ep_desc moe_ep_model_layer_query(const moe_ep_model_layer* layer) {
    moe_ep_desc d;
    if (layer) return layer->desc;
    memset(&d, 0, sizeof d);
    return d;
}

MOE_EP_API int moe_ep_model_layer_experts(const moe_ep_model_layer* layer, const int** experts) {
    if (!layer) return 0;
    if (experts) *experts = layer->expert_ids;
    return layer->local;
}

MOE_EP_API uint64_t moe_ep_model_layer_bytes(const moe_ep_model_layer* layer) { return layer ? layer->bytes : 0; }
MOE_EP_API uint64_t moe_ep_model_layer_bytes_read(const moe_ep_model_layer* layer) { return layer ? layer->bytes_read : 0; }

/* The experts rank `rank` holds, ascending, into layer->expert_ids; the placement into the desc. */
MOE_EP_PRIVATE moe_ep_result moe_ep__layer_experts(moe_ep_model_layer* layer, const moe_ep_model* m,
                                                   const moe_ep_model_layer_desc* desc, char* err, size_t err_size) {
    int E = m->cfg.num_experts, e, n = 0;
    moe_ep_placement placement;
    int* owner;
    layer->expert_ids = (int*)moe_ep_alloc(&layer->allocator, (size_t)E * sizeof(int));
    if (!layer->expert_ids) { moe_ep__st_err(err, err_size, "out of memory"); return MOE_EP_ERROR_OUT_OF_MEMORY; }
    if (desc->layout) {
        moe_ep_layout_desc lay = *desc->layout, resolved;
        char why[256];
        if (lay.num_experts == 0) lay.num_experts = E;
        if (lay.num_experts != E) {
            moe_ep__st_err(err, err_size, "layout.num_experts (%d) is not the model's %d experts", lay.num_experts, E);
            return MOE_EP_ERROR_INVALID_ARGUMENT;
        }
        if (moe_ep_layout_resolve(&lay, &resolved, why, sizeof why) != MOE_EP_OK) {
            moe_ep__st_err(err, err_size, "layout: %s", why);
            return MOE_EP_ERROR_INVALID_ARGUMENT;
        }
        if (desc->rank < 0 || desc->rank >= resolved.world_size) {
            moe_ep__st_err(err, err_size, "rank (%d) must be in [0, layout.world_size = %d)", desc->rank, resolved.world_size);
            return MOE_EP_ERROR_INVALID_ARGUMENT;
        }
        n = moe_ep_layout_experts(&resolved, desc->rank, layer->expert_ids, E);
        placement = resolved.placement;
    } else {
        int world = desc->world_size ? desc->world_size : 1;
        if (world < 1 || desc->rank < 0 || desc->rank >= world) {
            moe_ep__st_err(err, err_size, "rank (%d) must be in [0, world_size = %d)", desc->rank, world);
            return MOE_EP_ERROR_INVALID_ARGUMENT;
        }
        owner = (int*)moe_ep_alloc(&layer->allocator, (size_t)E * sizeof(int));
        if (!owner) { moe_ep__st_err(err, err_size, "out of memory"); return MOE_EP_ERROR_OUT_OF_MEMORY; }
        if (moe_ep_placement_compute(&desc->placement, E, world, owner) != MOE_EP_OK) {
            moe_ep__st_err(err, err_size, "placement: not a valid placement of %d experts on %d ranks (kind %d; a table "
                           "needs an entry in [0, world_size) for every expert)", E, world, (int)desc->placement.kind);
            moe_ep_free(&layer->allocator, owner);
            return MOE_EP_ERROR_INVALID_ARGUMENT;
        }
        for (e = 0; e < E; ++e)
            if (owner[e] == desc->rank) layer->expert_ids[n++] = e;
        moe_ep_free(&layer->allocator, owner);
        placement = desc->placement;
    }
    if (n < 0) { moe_ep__st_err(err, err_size, "layout: cannot list the experts of rank %d", desc->rank); return MOE_EP_ERROR_INVALID_ARGUMENT; }
    layer->local = n;
    if (placement.kind == MOE_EP_PLACEMENT_TABLE && placement.table) {
        layer->placement_table = (int*)moe_ep_alloc(&layer->allocator, (size_t)E * sizeof(int));
        if (!layer->placement_table) { moe_ep__st_err(err, err_size, "out of memory"); return MOE_EP_ERROR_OUT_OF_MEMORY; }
        memcpy(layer->placement_table, placement.table, (size_t)E * sizeof(int));
        placement.table = layer->placement_table;
    }
    layer->desc.placement = placement;
    return MOE_EP_OK;
}

enum { MOE_EP__EXPERTS_FUSED, MOE_EP__EXPERTS_PER_EXPERT, MOE_EP__EXPERTS_MXFP4 };

MOE_EP_API moe_ep_result moe_ep_model_load_layer(moe_ep_model* m, const moe_ep_model_layer_desc* desc,
                                                 moe_ep_model_layer** out, char* err, size_t err_size) {
    static const char* const prefixes[] = { "model.layers.", "language_model.model.layers.", "model.language_model.layers." };
    static const char* const names_hf[3] = { "gate_proj", "up_proj", "down_proj" };
    static const char* const names_mixtral[3] = { "w1", "w3", "w2" };
    const moe_ep__cfg* c;
    moe_ep__loader L;
    moe_ep_model_layer* layer;
    moe_ep_desc* d;
    char name[320], reason[200];
    const char* modules[2];
    const char* router_leaf;
    const char* const* per_names = names_hf;
    int64_t D, I, E, S, dims[3];
    int p, k, status = 0, format, e;
    bool found = false, gpt_oss, llama4;
    uint64_t floats, per_expert_floats;
    float* w;
    moe_ep_result r = MOE_EP_ERROR_INVALID_ARGUMENT;
    if (!m || !desc || !out) {
        moe_ep__st_err(err, err_size, "moe_ep_model_load_layer: model, desc or out is NULL");
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    c = &m->cfg;
    if (!moe_ep_model_layer_is_moe(m, desc->layer, reason, sizeof reason)) {
        moe_ep__st_err(err, err_size, "%s/config.json: %s; it has no experts to load", m->dir, reason);
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    gpt_oss = c->family == MOE_EP_FAMILY_GPT_OSS;
    llama4 = c->family == MOE_EP_FAMILY_LLAMA4;
    D = c->d_model; I = c->d_ff; E = c->num_experts; S = c->shared_d_ff;
    memset(&L, 0, sizeof L);
    L.m = m; L.err = err; L.err_size = err_size;
    /* where the block lives: the first prefix and module whose router is there */
    modules[0] = llama4 ? "feed_forward" : "mlp";
    modules[1] = c->family == MOE_EP_FAMILY_MIXTRAL ? "block_sparse_moe" : NULL;
    router_leaf = gpt_oss || llama4 ? "router.weight" : "gate.weight";
    for (p = 0; !found && p < 3; ++p)
        for (k = 0; !found && k < 2 && modules[k]; ++k) {
            snprintf(L.prefix, sizeof L.prefix, "%s%d.%s.", prefixes[p], desc->layer, modules[k]);
            moe_ep__name(&L, name, sizeof name, "%s", router_leaf);
            found = moe_ep__exists(&L, name, &status);
            if (status < 0) return MOE_EP_ERROR_INVALID_ARGUMENT;
        }
    if (!found) {
        char other[200] = "";
        if (modules[1])
            snprintf(other, sizeof other, " (nor '%s%d.%s.%s')", prefixes[0], desc->layer, modules[1], router_leaf);
        moe_ep__st_err(err, err_size, "%s/%s: tensor '%s%d.%s.%s'%s, layer %d's router, is missing", m->dir,
                       moe_ep__model_where(m), prefixes[0], desc->layer, modules[0], router_leaf, other, desc->layer);
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    /* the experts' naming */
    moe_ep__name(&L, name, sizeof name, "experts.gate_up_proj");
    if (moe_ep__exists(&L, name, &status)) format = MOE_EP__EXPERTS_FUSED;
    else {
        if (status < 0) return MOE_EP_ERROR_INVALID_ARGUMENT;
        moe_ep__name(&L, name, sizeof name, "experts.gate_up_proj_blocks");
        if (gpt_oss && moe_ep__exists(&L, name, &status)) format = MOE_EP__EXPERTS_MXFP4;
        else {
            if (status < 0) return MOE_EP_ERROR_INVALID_ARGUMENT;
            format = MOE_EP__EXPERTS_PER_EXPERT;
            moe_ep__name(&L, name, sizeof name, "experts.0.w1.weight");
            if (c->family == MOE_EP_FAMILY_MIXTRAL && moe_ep__exists(&L, name, &status)) per_names = names_mixtral;
            if (status < 0) return MOE_EP_ERROR_INVALID_ARGUMENT;
            if (gpt_oss || llama4) {
                moe_ep__st_err(err, err_size, "%s/%s: tensor '%sexperts.gate_up_proj' is missing", m->dir,
                               moe_ep__model_where(m), L.prefix);
                return MOE_EP_ERROR_INVALID_ARGUMENT;
            }
        }
    }
    layer = (moe_ep_model_layer*)moe_ep_alloc(&m->allocator, sizeof *layer);
    if (!layer) { moe_ep__st_err(err, err_size, "out of memory"); return MOE_EP_ERROR_OUT_OF_MEMORY; }
    memset(layer, 0, sizeof *layer);
    layer->allocator = m->allocator;
    d = &layer->desc;
    r = moe_ep__layer_experts(layer, m, desc, err, err_size);
    if (r != MOE_EP_OK) goto fail;
    r = MOE_EP_ERROR_OUT_OF_MEMORY;
    /* one block for every float: router [E, D] (+ bias [E]), selection bias [E], shared
       experts (3 S D + gate D), this rank's experts (3 I D, + 2I + D biases for GPT-OSS) */
    per_expert_floats = (uint64_t)(3 * I * D + (gpt_oss ? 2 * I + D : 0));
    if ((double)per_expert_floats * (double)layer->local + (double)(E + 4) * (double)D + 3.0 * (double)S * (double)D >
        (double)(SIZE_MAX / 8)) {
        moe_ep__st_err(err, err_size, "%s/config.json: layer %d of rank %d would hold more floats than this machine "
                       "can address", m->dir, desc->layer, desc->rank);
        r = MOE_EP_ERROR_OUT_OF_MEMORY;
        goto fail;
    }
    floats = (uint64_t)(E * D + (gpt_oss ? E : 0) + (c->family == MOE_EP_FAMILY_DEEPSEEK_V3 && !c->deepseek_v2 ? E : 0) +
                        3 * S * D + (c->family == MOE_EP_FAMILY_QWEN2_MOE ? D : 0)) +
             (uint64_t)layer->local * per_expert_floats;
    layer->weights = (float*)moe_ep_alloc(&m->allocator, (size_t)floats * sizeof(float));
    layer->experts = (moe_ep_expert_weights*)moe_ep_alloc(&m->allocator, (size_t)layer->local * sizeof *layer->experts);
    L.buffer = (unsigned char*)moe_ep_alloc(&m->allocator, MOE_EP__ST_CHUNK);
    if (!layer->weights || !layer->experts || !L.buffer) { moe_ep__st_err(err, err_size, "out of memory"); goto fail; }
    memset(layer->experts, 0, (size_t)layer->local * sizeof *layer->experts);
    layer->bytes = floats * sizeof(float) + (uint64_t)layer->local * sizeof *layer->experts + (uint64_t)E * sizeof(int) +
                   sizeof *layer +
                   (layer->placement_table ? (uint64_t)E * sizeof(int) : 0);
    r = MOE_EP_ERROR_INVALID_ARGUMENT;
    w = layer->weights;
    /* the desc: the family's preset and the config's numbers */
    {
        moe_ep_placement placement = d->placement;
        *d = moe_ep_family_desc(c->family);
        d->placement = placement;
    }
    d->d_model = (int)D;
    d->d_ff = (int)I;
    d->num_experts = (int)E;
    d->top_k = c->top_k;
    d->normalize_topk = c->normalize;
    if (c->family == MOE_EP_FAMILY_DEEPSEEK_V3) {
        d->num_groups = c->n_group;
        d->topk_groups = c->topk_group;
        d->routed_scaling_factor = c->routed_scaling;
        if (c->deepseek_v2) d->scoring = MOE_EP_SCORING_SOFTMAX;
    }
    if (gpt_oss) d->swiglu_limit = c->swiglu_limit;
    /* router */
    dims[0] = E; dims[1] = D;
    moe_ep__name(&L, name, sizeof name, "%s", router_leaf);
    if (!moe_ep__load(&L, name, 2, dims, -1, w)) goto fail;
    d->router_weight = w;
    w += E * D;
    if (gpt_oss) {
        moe_ep__name(&L, name, sizeof name, "router.bias");
        if (!moe_ep__load(&L, name, 1, dims, -1, w)) goto fail;
        d->router_bias = w;
        w += E;
    }
    if (c->family == MOE_EP_FAMILY_DEEPSEEK_V3 && !c->deepseek_v2) {
        moe_ep__name(&L, name, sizeof name, "gate.e_score_correction_bias");
        if (!moe_ep__load(&L, name, 1, dims, -1, w)) goto fail;
        d->selection_bias = w;
        w += E;
    }
    /* shared experts */
    d->shared.d_ff = (int)S;
    if (S > 0) {
        const char* shared = c->family == MOE_EP_FAMILY_DEEPSEEK_V3 ? "shared_experts" : "shared_expert";
        dims[0] = S; dims[1] = D;
        moe_ep__name(&L, name, sizeof name, "%s.gate_proj.weight", shared);
        if (!moe_ep__load(&L, name, 2, dims, -1, w)) goto fail;
        d->shared.weights.w1 = w;
        w += S * D;
        moe_ep__name(&L, name, sizeof name, "%s.up_proj.weight", shared);
        if (!moe_ep__load(&L, name, 2, dims, -1, w)) goto fail;
        d->shared.weights.w3 = w;
        w += S * D;
        dims[0] = D; dims[1] = S;
        moe_ep__name(&L, name, sizeof name, "%s.down_proj.weight", shared);
        if (!moe_ep__load(&L, name, 2, dims, -1, w)) goto fail;
        d->shared.weights.w2 = w;
        w += S * D;
        if (c->family == MOE_EP_FAMILY_QWEN2_MOE) {
            dims[0] = 1; dims[1] = D;
            moe_ep__name(&L, name, sizeof name, "shared_expert_gate.weight");
            if (!moe_ep__load(&L, name, 2, dims, -1, w)) goto fail;
            d->shared.gate = w;
            w += D;
        }
    }
    /* this rank's experts */
    if (format == MOE_EP__EXPERTS_PER_EXPERT) d->weight_layout = MOE_EP_WEIGHT_LAYOUT_SEPARATE;
    else if (gpt_oss) d->weight_layout = MOE_EP_WEIGHT_LAYOUT_GPT_OSS;
    else if (llama4) d->weight_layout = MOE_EP_WEIGHT_LAYOUT_LLAMA4;
    else d->weight_layout = MOE_EP_WEIGHT_LAYOUT_FUSED_GATE_UP;
    for (k = 0; k < layer->local; ++k) {
        moe_ep_expert_weights* x = &layer->experts[k];
        e = layer->expert_ids[k];
        if (format == MOE_EP__EXPERTS_PER_EXPERT) {
            dims[0] = I; dims[1] = D;
            moe_ep__name(&L, name, sizeof name, "experts.%d.%s.weight", e, per_names[0]);
            if (!moe_ep__load(&L, name, 2, dims, -1, w)) goto fail;
            x->w1 = w; w += I * D;
            moe_ep__name(&L, name, sizeof name, "experts.%d.%s.weight", e, per_names[1]);
            if (!moe_ep__load(&L, name, 2, dims, -1, w)) goto fail;
            x->w3 = w; w += I * D;
            dims[0] = D; dims[1] = I;
            moe_ep__name(&L, name, sizeof name, "experts.%d.%s.weight", e, per_names[2]);
            if (!moe_ep__load(&L, name, 2, dims, -1, w)) goto fail;
            x->w2 = w; w += I * D;
            continue;
        }
        if (format == MOE_EP__EXPERTS_MXFP4) {
            moe_ep__name(&L, name, sizeof name, "experts.gate_up_proj");
            if (!moe_ep__load_mxfp4(&L, name, E, 2 * I, D, e, w)) goto fail;
            x->w1 = w; w += 2 * I * D;
            moe_ep__name(&L, name, sizeof name, "experts.down_proj");
            if (!moe_ep__load_mxfp4(&L, name, E, D, I, e, w)) goto fail;
            x->w2 = w; w += I * D;
        } else {
            dims[0] = E;
            if (gpt_oss || llama4) { dims[1] = D; dims[2] = 2 * I; } else { dims[1] = 2 * I; dims[2] = D; }
            moe_ep__name(&L, name, sizeof name, "experts.gate_up_proj");
            if (!moe_ep__load(&L, name, 3, dims, e, w)) goto fail;
            x->w1 = w; w += 2 * I * D;
            if (gpt_oss || llama4) { dims[1] = I; dims[2] = D; } else { dims[1] = D; dims[2] = I; }
            moe_ep__name(&L, name, sizeof name, "experts.down_proj");
            if (!moe_ep__load(&L, name, 3, dims, e, w)) goto fail;
            x->w2 = w; w += I * D;
        }
        if (gpt_oss) {
            dims[0] = E; dims[1] = 2 * I;
            moe_ep__name(&L, name, sizeof name, "experts.gate_up_proj_bias");
            if (!moe_ep__load(&L, name, 2, dims, e, w)) goto fail;
            x->b1 = w; w += 2 * I;
            dims[1] = D;
            moe_ep__name(&L, name, sizeof name, "experts.down_proj_bias");
            if (!moe_ep__load(&L, name, 2, dims, e, w)) goto fail;
            x->b2 = w; w += D;
        }
    }
    MOE_EP_ASSERT((uint64_t)(w - layer->weights) == floats);
    d->experts = layer->experts;
    d->experts_count = (int)layer->local;   /* this rank's experts, in local order */
    layer->bytes_read = L.bytes_read;
    moe_ep_free(&m->allocator, L.buffer);
    *out = layer;
    return MOE_EP_OK;
fail:
    moe_ep_free(&m->allocator, L.buffer);
    moe_ep_model_layer_free(layer);
    return r;
}

#endif /* MOE_EP_SAFETENSORS_IMPL_INCLUDED */
#endif /* MOE_EP_IMPLEMENTATION */
