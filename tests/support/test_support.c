/* test_support.c -- the helpers of test_support.h. */
#include "test_support.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* >>random */
uint64_t test_rng_next(uint64_t* s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

float test_rng_uniform(uint64_t* s) { return (float)(test_rng_next(s) >> 40) / 8388608.0f - 1.0f; }

void test_fill(float* v, size_t n, float scale, uint64_t* s) {
    size_t i;
    for (i = 0; i < n; ++i) v[i] = scale * test_rng_uniform(s);
}

float* test_random_floats(size_t n, float scale, uint64_t seed) {
    float* v = (float*)malloc(sizeof(float) * (n > 0 ? n : 1));
    if (!v) {
        fprintf(stderr, "test_random_floats: out of memory (%lu floats)\n", (unsigned long)n);
        exit(EXIT_FAILURE);
    }
    test_fill(v, n, scale, &seed);
    return v;
}

/* >>bf16 */
uint16_t test_bf16_from_float(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float test_bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* >>reference */
double test_ref_activation(moe_ep_activation act, double g, double u) {
    switch (act) {
    case MOE_EP_ACTIVATION_GELU: return 0.5 * g * (1.0 + erf(g / sqrt(2.0)));
    case MOE_EP_ACTIVATION_RELU: return g > 0.0 ? g : 0.0;
    case MOE_EP_ACTIVATION_SWIGLU_CLAMPED: return test_ref_swiglu_clamped(g, u, 1.702, 7.0);
    default: return g / (1.0 + exp(-g)) * u;
    }
}

double test_ref_swiglu_clamped(double g, double u, double alpha, double limit) {
    g = fmin(g, limit);
    u = fmax(fmin(u, limit), -limit);
    return (u + 1.0) * g / (1.0 + exp(-alpha * g));
}

/* >>poison */
void test_poison(float* v, size_t n) {
    if (n > 0) memset(v, 0xFF, n * sizeof *v);
}

bool test_is_poisoned(const float* v, size_t n) {
    const unsigned char* bytes = (const unsigned char*)v;
    size_t i;
    for (i = 0; i < n * sizeof *v; ++i)
        if (bytes[i] != 0xFF) return false;
    return true;
}

size_t test_first_difference(const float* a, const float* b, size_t n) {
    size_t i;
    for (i = 0; i < n; ++i)
        if (memcmp(&a[i], &b[i], sizeof *a) != 0) return i;
    return n;
}

/* >>counting allocator */
static void* test__alloc(size_t size, void* user_data) {
    test_counter* c = (test_counter*)user_data;
    void* ptr = NULL;
    int fail;
    pthread_mutex_lock(&c->mutex);
    c->attempts++;
    fail = c->fail_at > 0 && c->attempts == c->fail_at;
    if (!fail) {
        ptr = malloc(size);
        if (ptr) c->allocs++;
    }
    pthread_mutex_unlock(&c->mutex);
    return ptr;
}

static void test__free(void* ptr, void* user_data) {
    test_counter* c = (test_counter*)user_data;
    pthread_mutex_lock(&c->mutex);
    c->frees++;
    pthread_mutex_unlock(&c->mutex);
    free(ptr);
}

void test_counter_init(test_counter* c) {
    memset(c, 0, sizeof *c);
    pthread_mutex_init(&c->mutex, NULL);
}

void test_counter_destroy(test_counter* c) { pthread_mutex_destroy(&c->mutex); }

long test_counter_outstanding(test_counter* c) {
    long n;
    pthread_mutex_lock(&c->mutex);
    n = c->allocs - c->frees;
    pthread_mutex_unlock(&c->mutex);
    return n;
}

moe_ep_allocator test_counter_allocator(test_counter* c) {
    moe_ep_allocator a;
    a.alloc_fn = test__alloc;
    a.free_fn = test__free;
    a.user_data = c;
    return a;
}

/* >>recording logger */
static void test__log(const char* tag, uint32_t level, uint32_t item, int rank, const char* message,
                      void* user_data) {
    test_log* log = (test_log*)user_data;
    (void)level;
    pthread_mutex_lock(&log->mutex);
    if (log->lines < TEST_LOG_LINES) {
        log->rank[log->lines] = rank;
        log->item[log->lines] = tag && strcmp(tag, "moe_ep") == 0 ? (int)item : -1;
        snprintf(log->text[log->lines], TEST_LOG_TEXT, "%s", message ? message : "(null)");
    }
    log->lines++;
    pthread_mutex_unlock(&log->mutex);
}

void test_log_init(test_log* log) {
    memset(log, 0, sizeof *log);
    pthread_mutex_init(&log->mutex, NULL);
}

void test_log_destroy(test_log* log) { pthread_mutex_destroy(&log->mutex); }

moe_ep_logger test_log_logger(test_log* log) {
    moe_ep_logger l;
    l.func = test__log;
    l.user_data = log;
    return l;
}

int test_log_count(test_log* log) {
    int n;
    pthread_mutex_lock(&log->mutex);
    n = log->lines;
    pthread_mutex_unlock(&log->mutex);
    return n;
}

const char* test_log_line(test_log* log, int i) {
    const char* line = "";
    pthread_mutex_lock(&log->mutex);
    if (i >= 0 && i < log->lines && i < TEST_LOG_LINES) line = log->text[i];
    pthread_mutex_unlock(&log->mutex);
    return line;
}

int test_log_find(test_log* log, const char* needle) {
    int i, n, found = -1;
    pthread_mutex_lock(&log->mutex);
    n = log->lines < TEST_LOG_LINES ? log->lines : TEST_LOG_LINES;
    for (i = 0; i < n && found < 0; ++i)
        if (strstr(log->text[i], needle)) found = i;
    pthread_mutex_unlock(&log->mutex);
    return found;
}

int test_log_find_item(test_log* log, moe_ep_log_item item) {
    int i, n, found = -1;
    pthread_mutex_lock(&log->mutex);
    n = log->lines < TEST_LOG_LINES ? log->lines : TEST_LOG_LINES;
    for (i = 0; i < n && found < 0; ++i)
        if (log->item[i] == (int)item) found = i;
    pthread_mutex_unlock(&log->mutex);
    return found;
}

const char* test_log_join(test_log* log, char* buffer, size_t size) {
    int i, n;
    size_t used = 0;
    buffer[0] = '\0';
    pthread_mutex_lock(&log->mutex);
    n = log->lines < TEST_LOG_LINES ? log->lines : TEST_LOG_LINES;
    for (i = 0; i < n && used + 1 < size; ++i) {
        int w = snprintf(buffer + used, size - used, "%s[%d] (item %d) %s", i ? " | " : "", log->rank[i],
                         log->item[i], log->text[i]);
        if (w < 0) break;
        used += (size_t)w;
    }
    pthread_mutex_unlock(&log->mutex);
    if (n == 0) snprintf(buffer, size, "(nothing logged)");
    return buffer;
}
