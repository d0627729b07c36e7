/* bf16_peak.c -- the arithmetic peak of one core: AVX-512 vfmadd231ps against AVX512-BF16's
   vdpbf16ps, the instructions of the exact and the BF16_DOT arithmetic's prefill kernels.

   Each loop runs 24 independent accumulators (more than either instruction's latency times
   its throughput needs) in inline assembly, so that the compiler can neither merge nor drop
   them; inputs are normal numbers (1.0). Multiply-adds per instruction: 16 for vfmadd231ps
   zmm (16 lanes), 32 for vdpbf16ps zmm (16 lanes, 2 pairs each). Prints the median of
   --reps rounds of each (instructions and multiply-adds per second, and their ratio).
   x86-64 with gcc or clang; the CPU needs AVX-512F and AVX512-BF16. */
#define _POSIX_C_SOURCE 200809L   /* clock_gettime */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_util.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>

#define PEAK_OP24(op) \
    op " %%zmm24, %%zmm25, %%zmm0\n\t" op " %%zmm24, %%zmm25, %%zmm1\n\t" op " %%zmm24, %%zmm25, %%zmm2\n\t" \
    op " %%zmm24, %%zmm25, %%zmm3\n\t" op " %%zmm24, %%zmm25, %%zmm4\n\t" op " %%zmm24, %%zmm25, %%zmm5\n\t" \
    op " %%zmm24, %%zmm25, %%zmm6\n\t" op " %%zmm24, %%zmm25, %%zmm7\n\t" op " %%zmm24, %%zmm25, %%zmm8\n\t" \
    op " %%zmm24, %%zmm25, %%zmm9\n\t" op " %%zmm24, %%zmm25, %%zmm10\n\t" op " %%zmm24, %%zmm25, %%zmm11\n\t" \
    op " %%zmm24, %%zmm25, %%zmm12\n\t" op " %%zmm24, %%zmm25, %%zmm13\n\t" op " %%zmm24, %%zmm25, %%zmm14\n\t" \
    op " %%zmm24, %%zmm25, %%zmm15\n\t" op " %%zmm24, %%zmm25, %%zmm16\n\t" op " %%zmm24, %%zmm25, %%zmm17\n\t" \
    op " %%zmm24, %%zmm25, %%zmm18\n\t" op " %%zmm24, %%zmm25, %%zmm19\n\t" op " %%zmm24, %%zmm25, %%zmm20\n\t" \
    op " %%zmm24, %%zmm25, %%zmm21\n\t" op " %%zmm24, %%zmm25, %%zmm22\n\t" op " %%zmm24, %%zmm25, %%zmm23\n\t"
#define PEAK_CLOBBERS "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", \
    "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", \
    "xmm23", "xmm24", "xmm25", "cc", "memory"
/* 0x3F803F80: the bf16 pair (1, 1), and as a float 1.0039 */
#define PEAK_INIT "vpbroadcastd (%1), %%zmm24\n\tvmovdqa64 %%zmm24, %%zmm25\n\t" \
    "vpxord %%zmm0, %%zmm0, %%zmm0\n\tvmovdqa64 %%zmm0, %%zmm1\n\tvmovdqa64 %%zmm0, %%zmm2\n\t" \
    "vmovdqa64 %%zmm0, %%zmm3\n\tvmovdqa64 %%zmm0, %%zmm4\n\tvmovdqa64 %%zmm0, %%zmm5\n\t" \
    "vmovdqa64 %%zmm0, %%zmm6\n\tvmovdqa64 %%zmm0, %%zmm7\n\tvmovdqa64 %%zmm0, %%zmm8\n\t" \
    "vmovdqa64 %%zmm0, %%zmm9\n\tvmovdqa64 %%zmm0, %%zmm10\n\tvmovdqa64 %%zmm0, %%zmm11\n\t" \
    "vmovdqa64 %%zmm0, %%zmm12\n\tvmovdqa64 %%zmm0, %%zmm13\n\tvmovdqa64 %%zmm0, %%zmm14\n\t" \
    "vmovdqa64 %%zmm0, %%zmm15\n\tvmovdqa64 %%zmm0, %%zmm16\n\tvmovdqa64 %%zmm0, %%zmm17\n\t" \
    "vmovdqa64 %%zmm0, %%zmm18\n\tvmovdqa64 %%zmm0, %%zmm19\n\tvmovdqa64 %%zmm0, %%zmm20\n\t" \
    "vmovdqa64 %%zmm0, %%zmm21\n\tvmovdqa64 %%zmm0, %%zmm22\n\tvmovdqa64 %%zmm0, %%zmm23\n\t"

static const unsigned peak_one[16] __attribute__((aligned(64))) = {
    0x3F803F80u, 0x3F803F80u, 0x3F803F80u, 0x3F803F80u, 0x3F803F80u, 0x3F803F80u, 0x3F803F80u, 0x3F803F80u,
    0x3F803F80u, 0x3F803F80u, 0x3F803F80u, 0x3F803F80u, 0x3F803F80u, 0x3F803F80u, 0x3F803F80u, 0x3F803F80u
};

__attribute__((target("avx512f"))) static double peak_fma(long iterations) {
    double t0 = bench_now();
    __asm__ volatile(PEAK_INIT "1:\n\t" PEAK_OP24("vfmadd231ps") "dec %0\n\tjnz 1b"
                     : "+r"(iterations) : "r"(peak_one) : PEAK_CLOBBERS);
    return bench_now() - t0;
}

__attribute__((target("avx512f,avx512bf16"))) static double peak_dot(long iterations) {
    double t0 = bench_now();
    __asm__ volatile(PEAK_INIT "1:\n\t" PEAK_OP24("vdpbf16ps") "dec %0\n\tjnz 1b"
                     : "+r"(iterations) : "r"(peak_one) : PEAK_CLOBBERS);
    return bench_now() - t0;
}

int main(int argc, char** argv) {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    long iterations = 20000000;
    int reps = 5, r;
    double fma_s[64], dot_s[64], fma, dot;
    if (argc == 3 && strcmp(argv[1], "--reps") == 0) reps = atoi(argv[2]);
    if (reps < 1 || reps > 63) reps = 5;
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512f") || !__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) || !(eax & (1u << 5))) {
        printf("bf16_peak: this CPU has no AVX512-BF16\n");
        return 0;
    }
    peak_fma(iterations / 10);      /* warm-up */
    peak_dot(iterations / 10);
    for (r = 0; r < reps; ++r) {    /* interleaved */
        fma_s[r] = peak_fma(iterations);
        dot_s[r] = peak_dot(iterations);
    }
    fma = 24.0 * (double)iterations / bench_median(fma_s, reps);
    dot = 24.0 * (double)iterations / bench_median(dot_s, reps);
    printf("bf16_peak: one core, 24 accumulators, median of %d\n\n", reps);
    printf("| instruction (zmm) | G instructions/s | multiply-adds each | G multiply-adds/s |\n|---|---|---|---|\n");
    printf("| vfmadd231ps | %.2f | 16 | %.1f |\n", fma * 1e-9, 16.0 * fma * 1e-9);
    printf("| vdpbf16ps | %.2f | 32 | %.1f |\n", dot * 1e-9, 32.0 * dot * 1e-9);
    printf("\nvdpbf16ps / vfmadd231ps: %.2f x the instructions, %.2f x the multiply-adds per second\n", dot / fma,
           2.0 * dot / fma);
    return 0;
}
#else
int main(void) {
    printf("bf16_peak: x86-64 with gcc or clang only\n");
    return 0;
}
#endif
