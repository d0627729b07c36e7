/* load_bench -- loading one layer's experts for one rank (moe_ep_safetensors.h) against
   read() of the same bytes, side by side, from a warm page cache and, where the kernel drops
   the file's pages on request (posix_fadvise DONTNEED), from a cold one; then the memory a
   rank keeps for R = 1, 2, 4, 8.

   The model is written here, once, into --dir (default /tmp/moe_ep_load_bench): a Mixtral
   layer of E experts of d_model x d_ff with random weights, in F32 and in BF16 (fused names,
   transformers 5's). The anchor reads exactly the byte ranges the loader reads (the router
   and the rank's experts' slices of gate_up_proj and down_proj) with read() into one buffer;
   the loader also converts (BF16) and allocates.

       ./load_bench [--experts 32] [--d-model 1024] [--d-ff 1024] [--ranks 8] [--reps 7]

   Prints the median of --reps alternating runs of each, and the ratio of their rates. */
#define _POSIX_C_SOURCE 200809L   /* clock_gettime, posix_fadvise, fork */
#define MOE_EP_IMPLEMENTATION
#include "../moe_ep_safetensors.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>

#include "bench_util.h"
#include <unistd.h>

typedef struct bench_opt {
    const char* dir;
    int experts, d_model, d_ff, ranks, reps;
} bench_opt;


static unsigned long long rng = 0x9E3779B97F4A7C15ull;
static uint32_t next32(void) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}

/* One model directory: config.json and model.safetensors with dtype F32 or BF16. */
static void write_model(const bench_opt* o, const char* sub, const char* dtype) {
    char path[512], header[2048];
    int each = strcmp(dtype, "F32") == 0 ? 4 : 2;
    unsigned long long E = (unsigned long long)o->experts, D = (unsigned long long)o->d_model, I = (unsigned long long)o->d_ff;
    unsigned long long router = E * D * 4, gate_up = E * 2 * I * D * each, down = E * D * I * each, i, n;
    unsigned char len[8], *block;
    FILE* f;
    struct stat st;
    snprintf(path, sizeof path, "%s/%s", o->dir, sub);
    mkdir(o->dir, 0755);
    mkdir(path, 0755);
    snprintf(path, sizeof path, "%s/%s/model.safetensors", o->dir, sub);
    if (stat(path, &st) == 0 && (unsigned long long)st.st_size > router + gate_up + down) return;   /* made earlier */
    snprintf(header, sizeof header, "{\"model.layers.0.mlp.gate.weight\":{\"dtype\":\"F32\",\"shape\":[%llu,%llu],"
             "\"data_offsets\":[0,%llu]},\"model.layers.0.mlp.experts.gate_up_proj\":{\"dtype\":\"%s\",\"shape\":"
             "[%llu,%llu,%llu],\"data_offsets\":[%llu,%llu]},\"model.layers.0.mlp.experts.down_proj\":{\"dtype\":\"%s\","
             "\"shape\":[%llu,%llu,%llu],\"data_offsets\":[%llu,%llu]}}", E, D, router, dtype, E, 2 * I, D, router,
             router + gate_up, dtype, E, D, I, router + gate_up, router + gate_up + down);
    n = strlen(header);
    for (i = 0; i < 8; ++i) len[i] = (unsigned char)(n >> (8 * i));
    f = fopen(path, "wb");
    fwrite(len, 1, 8, f);
    fwrite(header, 1, n, f);
    block = (unsigned char*)malloc(1 << 20);
    for (i = 0; i < router + gate_up + down; i += 1 << 20) {
        unsigned long long k = router + gate_up + down - i < (1u << 20) ? router + gate_up + down - i : (1u << 20), j;
        for (j = 0; j + 4 <= k; j += 4) {     /* small normal-ish values: F32 or two BF16 */
            float v = ((float)(next32() & 0xFFFF) / 65536.0f - 0.5f) * 0.1f;
            uint32_t bits;
            memcpy(&bits, &v, 4);
            if (each == 2) bits = (bits & 0xFFFF0000u) | (bits >> 16);
            memcpy(block + j, &bits, 4);
        }
        fwrite(block, 1, (size_t)k, f);
    }
    free(block);
    fclose(f);
    snprintf(path, sizeof path, "%s/%s/config.json", o->dir, sub);
    f = fopen(path, "w");
    fprintf(f, "{\"model_type\": \"mixtral\", \"hidden_size\": %d, \"intermediate_size\": %d, \"num_local_experts\": %d, "
               "\"num_experts_per_tok\": 2, \"num_hidden_layers\": 1, \"hidden_act\": \"silu\"}\n",
            o->d_model, o->d_ff, o->experts);
    fclose(f);
}

/* A bump allocator over one block faulted in beforehand: the loader writing into resident
   memory, as read() does into its resident buffer. Reset before each load. */
typedef struct bench_pool { unsigned char* base; size_t size, used; } bench_pool;

static void* pool_alloc(size_t size, void* user) {
    bench_pool* p = (bench_pool*)user;
    size_t at = (p->used + 63) & ~(size_t)63;
    if (at + size > p->size) return NULL;
    p->used = at + size;
    return p->base + at;
}

static void pool_free(void* ptr, void* user) { (void)ptr; (void)user; }

/* The loader: open, load rank 0 of R, free. Returns bytes read. pool: NULL for malloc. */
static unsigned long long load_once_with(const char* dir, int ranks, bench_pool* pool) {
    char err[512];
    moe_ep_model* model;
    moe_ep_model_layer* layer;
    unsigned long long bytes;
    moe_ep_allocator a = { NULL, NULL, NULL };
    if (pool) { pool->used = 0; a.alloc_fn = pool_alloc; a.free_fn = pool_free; a.user_data = pool; }
    if (moe_ep_model_open(&(moe_ep_model_desc){ .path = dir, .allocator = a }, &model, err, sizeof err) != MOE_EP_OK ||
        moe_ep_model_load_layer(model, &(moe_ep_model_layer_desc){ .layer = 0, .rank = 0, .world_size = ranks },
                                &layer, err, sizeof err) != MOE_EP_OK) {
        fprintf(stderr, "%s\n", err);
        exit(1);
    }
    moe_ep_model_close(model);
    bytes = (unsigned long long)moe_ep_model_layer_bytes_read(layer);
    moe_ep_model_layer_free(layer);
    return bytes;
}

static unsigned long long load_once(const char* dir, int ranks) { return load_once_with(dir, ranks, NULL); }

/* The anchor: read() of the router and rank 0's experts' byte ranges, into one buffer. */
static unsigned long long read_once(const char* dir, const bench_opt* o, int each, int ranks, unsigned char* buffer) {
    char path[512], err[512];
    moe_ep_st_file* f;
    const moe_ep_st_tensor *router, *gate_up, *down;
    unsigned long long local = (unsigned long long)((o->experts + ranks - 1) / ranks), total = 0;
    unsigned long long gu = 2ull * o->d_ff * o->d_model * each, dn = (unsigned long long)o->d_model * o->d_ff * each;
    int fd;
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if (moe_ep_st_open(path, NULL, NULL, &f, err, sizeof err) != MOE_EP_OK) { fprintf(stderr, "%s\n", err); exit(1); }
    router = moe_ep_st_find(f, "model.layers.0.mlp.gate.weight");
    gate_up = moe_ep_st_find(f, "model.layers.0.mlp.experts.gate_up_proj");
    down = moe_ep_st_find(f, "model.layers.0.mlp.experts.down_proj");
    fd = open(path, O_RDONLY);
    {
        unsigned long long ranges[3][2] = { { router->offset, router->size }, { gate_up->offset, local * gu },
                                            { down->offset, local * dn } };
        int r;
        for (r = 0; r < 3; ++r) {
            unsigned long long left = ranges[r][1];
            lseek(fd, (off_t)ranges[r][0], SEEK_SET);
            while (left > 0) {
                ssize_t got = read(fd, buffer + total, left > (1u << 30) ? (1u << 30) : (size_t)left);
                if (got <= 0) { fprintf(stderr, "read failed\n"); exit(1); }
                left -= (unsigned long long)got;
                total += (unsigned long long)got;
            }
        }
    }
    close(fd);
    moe_ep_st_close(f);
    return total;
}

static bool drop_cache(const char* dir) {
    char path[512];
    int fd, rc;
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    fd = open(path, O_RDONLY);
    if (fd < 0) return false;
    fdatasync(fd);
    rc = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    close(fd);
    return rc == 0;
}

static long long rss_kib(void) {
    FILE* f = fopen("/proc/self/status", "r");
    char line[256];
    long long v = -1;
    if (!f) return -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmRSS: %lld", &v) == 1) break;
    fclose(f);
    return v;
}

/* read_once into a buffer allocated (and so faulted in) by the run itself, as the loader's is. */
static unsigned long long read_fresh(const char* dir, const bench_opt* o, int each, int ranks, size_t size) {
    unsigned char* buffer = (unsigned char*)malloc(size);
    unsigned long long n = read_once(dir, o, each, ranks, buffer);
    free(buffer);
    return n;
}

static void bench_dtype(const bench_opt* o, const char* sub, int each) {
    char dir[512];
    unsigned long long fsize = (unsigned long long)o->experts * 3ull * o->d_model * o->d_ff * each +
                               (unsigned long long)o->experts * o->d_model * 4;
    unsigned char* buffer = (unsigned char*)malloc((size_t)fsize);
    double tl[64], tr[64], tf[64], tp[64], t0, load_med, read_med, fresh_med, pool_med;
    bench_pool pool;
    unsigned long long bytes = 0, rbytes = 0;
    int i, reps = o->reps > 64 ? 64 : o->reps;
    bool cold;
    snprintf(dir, sizeof dir, "%s/%s", o->dir, sub);
    memset(buffer, 1, (size_t)fsize);                 /* resident before the runs */
    pool.size = (size_t)fsize * (each == 4 ? 1 : 2) + (8u << 20);
    pool.base = (unsigned char*)malloc(pool.size);
    memset(pool.base, 1, pool.size);
    load_once(dir, o->ranks);                         /* warm the cache */
    read_once(dir, o, each, o->ranks, buffer);
    for (i = 0; i < reps; ++i) {
        t0 = bench_now(); bytes = load_once(dir, o->ranks); tl[i] = bench_now() - t0;
        t0 = bench_now(); rbytes = read_once(dir, o, each, o->ranks, buffer); tr[i] = bench_now() - t0;
        t0 = bench_now(); read_fresh(dir, o, each, o->ranks, (size_t)fsize); tf[i] = bench_now() - t0;
        t0 = bench_now(); load_once_with(dir, o->ranks, &pool); tp[i] = bench_now() - t0;
    }
    pool_med = bench_median(tp, reps);
    load_med = bench_median(tl, reps);
    read_med = bench_median(tr, reps);
    fresh_med = bench_median(tf, reps);
    printf("%-5s warm  rank 0 of %d, %llu bytes of the file (read() the same %llu):\n", sub, o->ranks, bytes, rbytes);
    printf("      loader %8.2f ms  %6.2f GB/s of file\n", 1e3 * load_med, bytes / load_med / 1e9);
    printf("      read() into a fresh malloc    %8.2f ms  %6.2f GB/s   loader (malloc) / read rate %.2f x\n",
           1e3 * fresh_med, rbytes / fresh_med / 1e9, fresh_med / load_med);
    printf("      read() into a resident buffer %8.2f ms  %6.2f GB/s   loader (malloc) / read rate %.2f x\n",
           1e3 * read_med, rbytes / read_med / 1e9, read_med / load_med);
    printf("      loader, allocator of resident memory %6.2f ms  %6.2f GB/s   / read() into a resident buffer %.2f x\n",
           1e3 * pool_med, bytes / pool_med / 1e9, read_med / pool_med);
    cold = drop_cache(dir);
    if (cold) {
        for (i = 0; i < reps; ++i) {
            drop_cache(dir); t0 = bench_now(); load_once(dir, o->ranks); tl[i] = bench_now() - t0;
            drop_cache(dir); t0 = bench_now(); read_once(dir, o, each, o->ranks, buffer); tr[i] = bench_now() - t0;
        }
        load_med = bench_median(tl, reps);
        read_med = bench_median(tr, reps);
        printf("%-5s cold  rank 0 of %d: loader %8.2f ms (%6.2f GB/s of file)  read() into a resident buffer %8.2f ms "
               "(%6.2f GB/s)  loader/read rate %.2f x  (posix_fadvise DONTNEED before each)\n", sub, o->ranks, 1e3 * load_med,
               bytes / load_med / 1e9, 1e3 * read_med, rbytes / read_med / 1e9, read_med / load_med);
    } else {
        printf("%-5s cold: the page cache could not be dropped here\n", sub);
    }
    free(buffer);
    free(pool.base);
}

/* Resident memory of a process that loads rank 0 of R and keeps its layer (a child each). */
static void bench_rss(const bench_opt* o, const char* sub) {
    char dir[512];
    int R;
    snprintf(dir, sizeof dir, "%s/%s", o->dir, sub);
    for (R = 1; R <= 8; R *= 2) {
        pid_t pid;
        fflush(stdout);
        pid = fork();
        if (pid == 0) {
            char err[512];
            moe_ep_model* model;
            moe_ep_model_layer* layer;
            long long before = rss_kib(), after;
            moe_ep_model_open(&(moe_ep_model_desc){ .path = dir }, &model, err, sizeof err);
            if (moe_ep_model_load_layer(model, &(moe_ep_model_layer_desc){ .layer = 0, .rank = 0, .world_size = R },
                                        &layer, err, sizeof err) != MOE_EP_OK) { fprintf(stderr, "%s\n", err); _exit(1); }
            moe_ep_model_close(model);
            after = rss_kib();
            printf("%-5s R = %d: rank 0 holds %d experts; layer %.1f MiB; resident %.1f MiB before, %.1f MiB after "
                   "(+%.1f MiB)\n", sub, R, moe_ep_model_layer_experts(layer, NULL),
                   moe_ep_model_layer_bytes(layer) / 1048576.0, before / 1024.0, after / 1024.0,
                   (after - before) / 1024.0);
            fflush(stdout);
            moe_ep_model_layer_free(layer);
            _exit(0);
        }
        waitpid(pid, NULL, 0);
    }
}

int main(int argc, char** argv) {
    bench_opt o = { "/tmp/moe_ep_load_bench", 32, 1024, 1024, 8, 7 };
    int i;
    for (i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--dir") == 0) o.dir = argv[i + 1];
        else if (strcmp(argv[i], "--experts") == 0) o.experts = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--d-model") == 0) o.d_model = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--d-ff") == 0) o.d_ff = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--ranks") == 0) o.ranks = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--reps") == 0) o.reps = atoi(argv[i + 1]);
        else { fprintf(stderr, "unknown option %s\n", argv[i]); return 1; }
    }
    printf("model: %d experts, d_model %d, d_ff %d (Mixtral layer, fused names); %s\n", o.experts, o.d_model, o.d_ff, o.dir);
    write_model(&o, "f32", "F32");
    write_model(&o, "bf16", "BF16");
    bench_dtype(&o, "f32", 4);
    bench_dtype(&o, "bf16", 2);
    bench_rss(&o, "f32");
    bench_rss(&o, "bf16");
    return 0;
}
