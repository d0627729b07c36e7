/* fuzz_safetensors.c -- the JSON reader and the safetensors header parser of
   moe_ep_safetensors.h on arbitrary bytes.

   Every input goes through both: moe_ep_json_check (as JSON text) and moe_ep_st_parse (as a
   whole safetensors file in memory); where the header parses, every float tensor is read
   back. Built two ways:
     make fuzz-safetensors   libFuzzer + ASan + UBSan (clang): explores, grows the corpus;
     make check-fuzz         a plain main that replays tests/fuzz/corpus/ under ASan + UBSan
                             (any compiler, no libFuzzer), run by make test. */
#define _POSIX_C_SOURCE 200809L   /* opendir */
#define MOE_EP_IMPLEMENTATION
#include "../../moe_ep_safetensors.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    char err[512];
    moe_ep_st_file* file = NULL;
    moe_ep_st_limits limits = { 16, 1u << 20 };
    moe_ep_json_check(data, size, 0, err, sizeof err);
    moe_ep_json_check(data, size, 8, err, sizeof err);
    if (moe_ep_st_parse(data, size, "fuzz", &limits, NULL, &file, err, sizeof err) == MOE_EP_OK) {
        int i;
        for (i = 0; i < moe_ep_st_tensor_count(file); ++i) {
            const moe_ep_st_tensor* t = moe_ep_st_tensor_at(file, i);
            int64_t n = 1;
            int d;
            float* out;
            for (d = 0; d < t->ndim && n <= (1 << 20); ++d) n *= t->shape[d];
            if (n > (1 << 20) || !(out = (float*)malloc(sizeof(float) * (size_t)(n ? n : 1)))) continue;
            moe_ep_st_read_f32(file, t, out, n, err, sizeof err);
            free(out);
        }
        moe_ep_st_metadata(file, "format");
        moe_ep_st_close(file);
    }
    return 0;
}

#ifndef MOE_EP_FUZZ_LIBFUZZER
static int replay_file(const char* path) {
    FILE* f = fopen(path, "rb");
    long n;
    unsigned char* data;
    if (!f) { fprintf(stderr, "cannot open %s\n", path); return 1; }
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    data = (unsigned char*)malloc((size_t)n + 1);
    if (!data || fread(data, 1, (size_t)n, f) != (size_t)n) { fclose(f); free(data); return 1; }
    fclose(f);
    LLVMFuzzerTestOneInput(data, (size_t)n);
    free(data);
    return 0;
}

/* Replays every file named, and every file in every directory named. */
int main(int argc, char** argv) {
    int i, files = 0, failed = 0;
    for (i = 1; i < argc; ++i) {
        DIR* dir = opendir(argv[i]);
        struct dirent* e;
        if (!dir) { failed += replay_file(argv[i]); files++; continue; }
        while ((e = readdir(dir)) != NULL) {
            char path[4096];
            if (e->d_name[0] == '.') continue;
            snprintf(path, sizeof path, "%s/%s", argv[i], e->d_name);
            failed += replay_file(path);
            files++;
        }
        closedir(dir);
    }
    printf("fuzz_safetensors: replayed %d inputs, %d unreadable\n", files, failed);
    return failed || files == 0 ? 1 : 0;
}
#endif
