/* test_support.h -- what every moe_ep test program shares: seeded random data, bf16
   rounding, NaN poison, a counting allocator and a recording logger.

   Plain C99 on libc and pthreads; it needs moe_ep.h's declarations only, not Check and
   not an implementation, so Check suites, MPI and GPU programs and benchmarks all link
   tests/support/test_support.c. The header also compiles as C++ (nvcc). */
#ifndef TEST_SUPPORT_H_INCLUDED
#define TEST_SUPPORT_H_INCLUDED

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "../../moe_ep.h"

#ifdef __cplusplus
extern "C" {
#endif

/* >>random: splitmix64, so that a seed printed by a failing run repeats it. */
uint64_t test_rng_next(uint64_t* state);
/* Uniform in [-1, 1), 24 bits of the next draw. */
float test_rng_uniform(uint64_t* state);
/* values[i] = scale * uniform, in [-scale, scale). */
void test_fill(float* values, size_t count, float scale, uint64_t* state);
/* A new block of count random floats from seed (exits on out of memory); free() it. */
float* test_random_floats(size_t count, float scale, uint64_t seed);

/* >>bf16 on the host: round to nearest even, as the device's conversion does. */
uint16_t test_bf16_from_float(float value);
float test_bf16_to_float(uint16_t value);

/* >>reference: the expert activation in double: SwiGLU silu(gate) * up (also the
   default), GELU with the exact erf (up unused), ReLU (up unused). */
double test_ref_activation(moe_ep_activation activation, double gate, double up);
/* GPT-OSS's clamped SwiGLU: (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha g), g = min(gate, limit). */
double test_ref_swiglu_clamped(double gate, double up, double alpha, double limit);

/* >>poison: all-ones bytes, a NaN that no computation writes, so unwritten elements show. */
void test_poison(float* values, size_t count);
bool test_is_poisoned(const float* values, size_t count);
/* Index of the first element where a and b differ bitwise, or count if none does. */
size_t test_first_difference(const float* a, const float* b, size_t count);

/* >>counting allocator: thread safe, no header in front of a block, so that a block
   allocated by one half of an allocator and freed by the other shows up as a count
   that does not return to zero rather than as a crash. */
typedef struct test_counter {
    pthread_mutex_t mutex;
    long attempts;                  /* calls of alloc_fn */
    long allocs;                    /* blocks handed out */
    long frees;                     /* calls of free_fn */
    long fail_at;                   /* attempt number (1-based) that returns NULL; 0: none */
} test_counter;

void test_counter_init(test_counter* counter);
void test_counter_destroy(test_counter* counter);
/* allocs - frees, read under the lock. */
long test_counter_outstanding(test_counter* counter);
moe_ep_allocator test_counter_allocator(test_counter* counter);

/* >>recording logger: thread safe; keeps the first TEST_LOG_LINES lines. */
#define TEST_LOG_LINES 32
#define TEST_LOG_TEXT 512
typedef struct test_log {
    pthread_mutex_t mutex;
    int lines;                      /* lines received (only the first TEST_LOG_LINES are kept) */
    int rank[TEST_LOG_LINES];
    int item[TEST_LOG_LINES];       /* a core message's moe_ep_log_item; -1 for another tag */
    char text[TEST_LOG_LINES][TEST_LOG_TEXT];
} test_log;

void test_log_init(test_log* log);
void test_log_destroy(test_log* log);
moe_ep_logger test_log_logger(test_log* log);
/* Lines received so far, kept or not. */
int test_log_count(test_log* log);
/* Kept line i, or "" if there is none. */
const char* test_log_line(test_log* log, int i);
/* Index of the first kept line that contains needle, or -1. */
int test_log_find(test_log* log, const char* needle);
/* Index of the first kept line of the core (tag "moe_ep") with this log item, or -1. */
int test_log_find_item(test_log* log, moe_ep_log_item item);
/* All kept lines joined with " | ", for assertion messages. */
const char* test_log_join(test_log* log, char* buffer, size_t size);

#ifdef __cplusplus
}
#endif

#endif /* TEST_SUPPORT_H_INCLUDED */
