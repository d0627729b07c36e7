/* check_math.c -- the library's own arithmetic, on the build it was compiled for:

   - moe_ep__fmaf against the C library's fmaf, bit for bit: triples whose exact sum lies
     just off a tie of float (where rounding a double sum to float rounds twice and goes
     wrong), sums that cancel, results that are subnormal or overflow, and random triples
     over a wide exponent range. Without hardware FMA in the build's flags this is the
     software fmaf (gcc and clang on x86 also have the FMA instruction chosen at run time,
     and both are checked);
   - moe_ep__expf against exp in double over [-87, 88]: at most 2 ulp;
   - moe_ep__log (the router statistics' log-sum-exp, in double) against log: at most 2 ulp;
   - moe_ep__gelu against 0.5 a erfc(-a / sqrt 2) (= 0.5 a (1 + erf(a / sqrt 2))) in double: at most 2 ulp of the
     result plus 2^-23 |a| (what a's last bit moves GELU by), for a in [-13.5, 13.5]; the
     worst relative error is printed (it is largest in the negative tail, where GELU is tiny).

   Plain C, no Check, so that it runs under qemu-user wherever the fingerprint runs.
   Exit status 0 when everything holds; the first failures are printed. */
#define MOE_EP_IMPLEMENTATION
#include "../../moe_ep.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;

static uint32_t math_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static float math_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint64_t math_state = 0x243F6A8885A308D3ull;
static uint64_t math_next(void) {
    uint64_t z = (math_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* A float with a random mantissa and sign and an exponent in [lo, hi] (unbiased). */
static float math_random(int lo, int hi) {
    uint64_t r = math_next();
    uint32_t exponent = (uint32_t)(lo + (int)(r % (uint64_t)(hi - lo + 1)) + 127);
    return math_float((uint32_t)(r >> 32 & 0x807FFFFFu) | exponent << 23);
}

static void check_fma(float a, float b, float c) {
    float got = moe_ep__fmaf(a, b, c), want = fmaf(a, b, c);
    if (math_bits(got) != math_bits(want) && !(got != got && want != want)) {
        if (++failures <= 10)
            printf("FAIL fmaf(%a, %a, %a): %a, the C library says %a\n", (double)a, (double)b, (double)c, (double)got,
                   (double)want);
    }
#ifndef MOE_EP__HW_FMA
    got = moe_ep__fmaf_soft(a, b, c);
    if (math_bits(got) != math_bits(want) && !(got != got && want != want)) {
        if (++failures <= 10)
            printf("FAIL software fmaf(%a, %a, %a): %a, the C library says %a\n", (double)a, (double)b, (double)c,
                   (double)got, (double)want);
    }
#endif
}

static void check_fmaf(void) {
    int e, i, s;
    long n = 0;
    /* c + a*b just off the tie between c and its neighbour: a*b = ulp(c)/2 (1 +- 2^-46). */
    for (e = -120; e <= 120; e += 7)
        for (s = 0; s < 4; ++s) {
            float c = ldexpf(1.0f + (float)(s & 1) * ldexpf(1.0f, -23), e);      /* even and odd last bits */
            float a = ldexpf(1.0f + ldexpf(1.0f, -23), e - 24), b = (s & 2) ? 1.0f - ldexpf(1.0f, -23) : 1.0f + ldexpf(1.0f, -23);
            check_fma(a, b, c);
            check_fma(-a, b, c);
            check_fma(a, b, -c);
            check_fma(-a, -b, -c);
            n += 4;
        }
    check_fma(ldexpf(1.0f, -75), ldexpf(1.0f, -75), 0.0f);                /* underflows to a subnormal */
    check_fma(ldexpf(1.5f, -80), ldexpf(1.0f, -70), -ldexpf(1.0f, -149));
    check_fma(ldexpf(1.0f, -100), ldexpf(1.0f, -60), ldexpf(1.0f, -149));
    check_fma(ldexpf(1.0f, 100), ldexpf(1.0f, 100), -1.0f);               /* overflows */
    check_fma(1.0f, 1.0f, -1.0f);                       /* exact zero */
    check_fma(-0.0f, 1.0f, 0.0f);
    check_fma(INFINITY, 1.0f, -INFINITY);
    check_fma(NAN, 1.0f, 1.0f);
    n += 8;
    for (i = 0; i < 500000; ++i, n += 3) {
        float a = math_random(-60, 60), b = math_random(-60, 60), c = math_random(-120, 120);
        check_fma(a, b, c);
        check_fma(a, b, -(a * b) * (1.0f + math_random(-30, -20)));    /* cancellation */
        check_fma(a, b, math_random(-149 + 30, -100));                  /* near underflow */
    }
    printf("fmaf (%s): %ld triples against the C library's\n",
#if defined(MOE_EP__HW_FMA)
           "hardware"
#elif defined(MOE_EP__DISPATCH)
           "software, and the FMA instruction where the CPU has one"
#else
           "software"
#endif
           , n);
}

static double math_ulp(double v) {
    int e;
    frexp(v, &e);
    return ldexp(1.0, (e - 24 > -149 ? e - 24 : -149));
}

static void check_expf(void) {
    double worst = 0.0;
    int i;
    for (i = 0; i <= 1000000; ++i) {
        float x = -87.0f + (float)i * (175.0f / 1000000.0f);
        double want = exp((double)x), err = fabs((double)moe_ep__expf(x) - want) / math_ulp(want);
        worst = err > worst ? err : worst;
        if (err > 2.0 && ++failures <= 10) printf("FAIL expf(%a): %.2f ulp\n", (double)x, err);
    }
    printf("expf: worst %.3f ulp over [-87, 88]\n", worst);
}

static void check_gelu(void) {
    double worst = 0.0, worst_abs = 0.0;
    int i;
    for (i = 0; i <= 1000000; ++i) {
        float a = -13.5f + (float)i * (27.0f / 1000000.0f);
        double want = 0.5 * (double)a * erfc(-(double)a * 0.70710678118654752440);   /* 1 + erf(u) = erfc(-u) */
        double diff = fabs((double)moe_ep__gelu(a) - want), ulps = diff / math_ulp(want);
        double bound = 2.0 * math_ulp(want) + ldexp(1.0, -23) * fabs((double)a);
        if (fabs(want) >= ldexp(1.0, -126)) worst = ulps > worst ? ulps : worst;     /* normal results */
        worst_abs = diff / fabs((double)a) > worst_abs ? diff / fabs((double)a) : worst_abs;
        if (diff > bound && ++failures <= 10)
            printf("FAIL gelu(%a): %a, want %a (%.2f ulp)\n", (double)a, (double)moe_ep__gelu(a), want, ulps);
    }
    printf("gelu: worst %.3f ulp (normal results), worst |error| / |a| %.3g, over [-13.5, 13.5]\n", worst, worst_abs);
}

/* moe_ep__log against log: at most 2 ulp of double (1 seen: both round faithfully) for
   x = 2^e m, e in [-1022, 1023], both sides of m = sqrt(2), x in [1, 2^31] (the router
   statistics' range) densely; 1 and powers of two exactly. */
static void check_log(void) {
    static const double exact[] = { 1.0, 2.0, 0.5, 1024.0, 1.0 / 1024.0, DBL_MIN };
    double worst = 0.0;
    long i, n = 0;
    for (i = 0; i < 2000000; ++i) {
        uint64_t r = math_next(), bits;
        double x, want, err;
        int e = i < 1000000 ? (int)(r % 31u) : (int)(r % 2045u) - 1022;
        bits = ((uint64_t)(e + 1023) << 52) | (math_next() >> 12);
        if (i % 7 == 0) bits = ((uint64_t)(e + 1023) << 52) | (0x6A09E667F3BCDull + (r >> 60) - 8u);   /* m ~ sqrt 2 */
        memcpy(&x, &bits, sizeof x);
        want = log(x);
        err = fabs(moe_ep__log(x) - want) / ldexp(1.0, ilogb(want) - 52);
        if (want == 0.0) err = moe_ep__log(x) == 0.0 ? 0.0 : INFINITY;
        worst = err > worst ? err : worst;
        ++n;
        if (err > 2.0 && ++failures <= 10) printf("FAIL log(%a): %a, the C library says %a (%.2f ulp)\n", x,
                                                   moe_ep__log(x), want, err);
    }
    for (i = 0; i < (long)(sizeof exact / sizeof exact[0]); ++i)
        if (moe_ep__log(exact[i]) != log(exact[i]) && ++failures <= 10)
            printf("FAIL log(%a): %a, the C library says %a\n", exact[i], moe_ep__log(exact[i]), log(exact[i]));
    printf("log: worst %.3f ulp (double) over %ld values in [2^-1022, 2^1024), half of them in [1, 2^31)\n", worst, n);
}

int main(void) {
    check_fmaf();
    check_expf();
    check_gelu();
    check_log();
    printf("%s\n", failures ? "FAILED" : "all passed");
    return failures ? 1 : 0;
}
