/* example_util.h -- seeded random numbers for the examples (splitmix64), so that a run
   repeats from the seed it prints, and the output fingerprint they print. Each example is
   one file; this is the part they share. C99 and C++. */
#ifndef EXAMPLE_UTIL_H
#define EXAMPLE_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define EXAMPLE_GOLDEN 0x9E3779B97F4A7C15ull

/* The next draw; each draw adds EXAMPLE_GOLDEN to the state and mixes it. */
static inline unsigned long long example_next(unsigned long long* state) {
    unsigned long long z = (*state += EXAMPLE_GOLDEN);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* The state after `draws` draws from `seed`: a process can jump to its slice of a stream. */
static inline unsigned long long example_skip(unsigned long long seed, unsigned long long draws) {
    return seed + EXAMPLE_GOLDEN * draws;
}

/* v[i] uniform in [-scale, scale). */
static inline void example_fill(float* v, size_t n, float scale, unsigned long long* state) {
    size_t i;
    for (i = 0; i < n; ++i) v[i] = scale * ((float)(example_next(state) >> 40) / 8388608.0f - 1.0f);
}

/* The output fingerprint: FNV-1a over each float's bits, least significant byte first, so
   that the same values give the same number on a big-endian machine. Two builds whose
   fingerprints match gave the same bits. */
static inline unsigned long long example_fingerprint(const float* v, size_t n) {
    unsigned long long hash = 14695981039346656037ull;
    size_t i;
    int b;
    for (i = 0; i < n; ++i) {
        uint32_t bits;
        memcpy(&bits, &v[i], sizeof bits);
        for (b = 0; b < 32; b += 8) { hash ^= (bits >> b) & 0xFFu; hash *= 1099511628211ull; }
    }
    return hash;
}

#endif
