/* gpu_test_support.h -- helpers the GPU test programs share: seeded random numbers and
   bf16 rounding on the host (round to nearest even, as the device's conversion does). */
#ifndef GPU_TEST_SUPPORT_H
#define GPU_TEST_SUPPORT_H

#include <stdint.h>
#include <string.h>

static unsigned long long next_u64(unsigned long long* s) {    /* splitmix64 */
    unsigned long long z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static float uniform(unsigned long long* s) { return (float)(next_u64(s) >> 40) / 8388608.0f - 1.0f; }

static uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#endif
