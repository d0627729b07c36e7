/* moe_ep.h -- Mixture-of-Experts expert parallelism in one header -- v0.1.0 -- MIT or public domain

   moe_ep routes tokens to experts, sends every token to the ranks that hold its
   experts (all-to-all "dispatch"), runs the local experts and brings the results
   back to be summed with the routing weights (all-to-all "combine"). Ranks are
   CPU threads, processes or GPUs; the transport that connects them is a small
   struct of callbacks, chosen by which transport header a program includes.

   DO THIS
   =======
   In exactly one C or C++ file:

       #define MOE_EP_IMPLEMENTATION
       #include "moe_ep.h"                      (or a transport header, which includes it)

   Everywhere else include the header without the define. The switch builds the
   core and every transport header included in that file, each exactly once.

   TRANSPORTS
   ==========
   built in                        one rank, no threads (transport = NULL in the desc)
   transports/moe_ep_pthreads.h    N ranks as N threads of one process; link -pthread
   transports/moe_ep_mpi.h         one rank per MPI process; compile with mpicc
   transports/moe_ep_nccl.h        one rank per GPU over NCCL; rows in device or host memory
   your own                        fill a moe_ep_transport (WRITING A CUSTOM TRANSPORT)

   Built on the core, beside it: moe_ep_cuda.h (+ moe_ep_cuda_kernels.cuh), the MoE
   layer on the GPU (router, plan, experts and combine in device memory), over any
   transport that moves device memory; moe_ep_safetensors.h, one MoE layer of a Hugging
   Face checkpoint for one rank (reads only that rank's experts; libc and POSIX files).

   CONFIGURATION MACROS
   ====================
   MOE_EP_IMPLEMENTATION   (undefined)   build the implementation in this file
   MOE_EP_STATIC           (undefined)   make every public function static
   MOE_EP_API              extern        prefix of every public declaration
   MOE_EP_ASSERT(c)        assert(c)     internal invariants only, never user input
   MOE_EP_NO_SIMD          (undefined)   portable C expert kernel only: no AVX-512, AVX2 or
                                         NEON path, chosen at run time or by target flags
   MOE_EP_CBLAS            (undefined)   expert products by cblas_sgemm of a CBLAS you link;
                                         results then depend on the BLAS (not bitwise
                                         reproducible across row counts or threads), and
                                         so does its thread count (e.g. OPENBLAS_NUM_THREADS:
                                         with several ranks in a process, divide it yourself)
   MOE_EP_CBLAS_HEADER     <cblas.h>     the header that MOE_EP_CBLAS includes
   MOE_EP_ALLOW_DIFFERENT_BITS (undefined) build where the same bits cannot be promised
                                         (see SAME BITS EVERYWHERE) instead of #error
   MOE_EP_CORE_HEADER      (undefined)   how a transport header includes the core, e.g.
                                         "moe_ep.h"; default "../moe_ep.h" (see FILES)
   MOE_EP_MAX_THREADS      1024          the largest desc.num_threads accepted (an OpenMP
                                         runtime that cannot start a team exits the process)
   KERNEL PATHS: with gcc or clang on x86 the header builds the AVX-512 and AVX2+FMA
   kernels as functions with __attribute__((target(...))) beside the portable one, and
   moe_ep_create takes the best the CPU runs (__builtin_cpu_supports), so a plain
   `cc -O2 -fopenmp` build needs no -march flag. Other compilers and architectures follow
   the compiler's target flags (AArch64: NEON; x86: -mavx2 -mfma or -march=native). A
   context's path: moe_ep_query(ctx).kernel; the one a new context gets: moe_ep_kernel_path();
   desc.kernel asks for one. Every path gives the same bits (SAME BITS EVERYWHERE). The
   opt-in BF16_DOT arithmetic has its own kernels: AVX512_BF16 (vdpbf16ps) and a portable
   emulation with the same bits (BF16 DOT ARITHMETIC).
   Compile with -fopenmp (or your compiler's flag) for OpenMP expert compute; without
   it everything runs on the calling thread and the results are bitwise the same.

   SAME BITS EVERYWHERE
   ====================
   The fp32 layer's output (y, topk_idx, topk_weight, the aux loss) is the same bits on
   every compiler (gcc, clang, tcc, g++ and clang++ as C++; any -O level, with or without
   -ffp-contract=fast), every architecture (x86-64, i686 with SSE2, armhf, aarch64,
   riscv64, s390x), every kernel path (portable, AVX2, AVX-512, NEON), and every world
   size, transport and thread count; so is the output of each weight format (bf16, fp16,
   int8: every weight widened to fp32 exactly, WEIGHT FORMATS), and so is that of the opt-in
   BF16_DOT arithmetic (its own bits, BF16 DOT ARITHMETIC). A reference output made on a laptop checks a board
   in the field: the demos print an output fingerprint to compare by eye. How:
   - every multiply-add the library means is one fused multiply-add (fmaf: one
     instruction where the hardware has FMA, an exact software one elsewhere, as on
     armhf's baseline VFPv3 and x86-64 without -mfma: slower, see bench/RESULTS.md);
     every other product is either exact or feeds no addition, so contraction by the
     compiler changes nothing (clang also gets #pragma STDC FP_CONTRACT OFF);
   - exp, sigmoid and GELU's erf are the library's own (+, -, *, /, fmaf, bit operations),
     not libm's, whose last bits differ between C libraries and architectures; so is the
     router statistics' log (in double, with the C library's correctly rounded fma), so
     the aux loss and the z-loss are the same bits too;
   - the portable kernel fuses where the SIMD kernels fuse, in the same order.
   Not covered, and said at compile time with #error unless MOE_EP_ALLOW_DIFFERENT_BITS is
   defined: FLT_EVAL_METHOD other than 0 (x87 without SSE2: use -msse2 -mfpmath=sse; gcc on
   s390x in ISO C mode: -fexcess-precision=fast) and -ffast-math. Not covered, without a
   message: MOE_EP_CBLAS (the BLAS decides), a rounding mode other than to-nearest or
   flush-to-zero set by the program, the GPU layer (deterministic
   run to run, within a tolerance of the CPU), and -funsafe-math-optimizations or other
   value-changing flags that leave no macro behind.

   FILES
   =====
   A transport header includes the core as "../moe_ep.h" (the source tree and
   `make install`'s layout), unless the core is already there: headers copied into one
   flat folder work when the file includes "moe_ep.h" before the transport header (with
   the same MOE_EP_IMPLEMENTATION), or with MOE_EP_CORE_HEADER defined ("moe_ep.h").
   moe_ep_mpi.h defines OMPI_SKIP_MPICXX and MPICH_SKIP_MPICXX for C++ before it includes
   mpi.h (the MPI C++ bindings are not needed); define them yourself if you include mpi.h
   first. MOE_EP_STATIC builds cleanly under -Wall -Wextra -Werror when a program calls
   only part of the API. moe_ep_version() returns the version the implementation was built
   with, beside the MOE_EP_VERSION_* macros of the header a file was compiled against.

   STEP BY STEP
   ============
   1. Make a transport (or pass NULL for one rank), e.g. with the pthreads helper
      moe_ep_pthreads_run(), which runs one function per rank thread.
   2. moe_ep_create(&(moe_ep_desc){ .d_model = 1024, .d_ff = 2816, .num_experts = 64,
          .top_k = 2, .router_weight = wg, .experts = my_local_experts,
          .transport = &transport }, &ctx);                          collective
      .experts_count says how .experts is indexed: this rank's expert count (local order)
      or num_experts (by global id; only this rank's entries are read); 0 is num_experts
      on one rank and refused on more.
      Expert weights are read at create as they are in memory: separate w1 (gate),
      w3 (up), w2 (down) in the nn.Linear layout by default; with .weight_layout also
      MOE_EP_WEIGHT_LAYOUT_FUSED_GATE_UP (transformers' experts.gate_up_proj[e]) and
      MOE_EP_WEIGHT_LAYOUT_GPT_OSS (GptOssExperts' gate_up_proj[e], transposed with gate
      and up interleaved, and down_proj[e]) and MOE_EP_WEIGHT_LAYOUT_LLAMA4 (transposed,
      gate then up); biases b1, b3, b2 are optional. They are fp32, or with .weight_format
      bf16, fp16 or int8 (WEIGHT FORMATS), handed in fp32 or already stored. Activations:
      SwiGLU (default), GELU, ReLU, and GPT-OSS's clamped SwiGLU (.swiglu_alpha,
      .swiglu_limit). See moe_ep_activation and moe_ep_weight_layout.
      A model family's layer starts from its preset instead:
          moe_ep_desc d = moe_ep_family_desc(MOE_EP_FAMILY_DEEPSEEK_V3);
      then set what the checkpoint's config.json changes, the weights and the transport
      (README: "Model families"). The router (scoring, router_bias, selection_bias,
      num_groups/topk_groups, routed_scaling_factor, scale_expert_input) and the shared
      experts (.shared) are described at their fields.
   3. moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = T, .x = x, .y = y });
                                                                      collective
      or the stages one by one:
          moe_ep_route()         x -> topk_idx, topk_weight, statistics   (local)
          moe_ep_plan_create()   routing -> counts, permutation; exchanges counts
          moe_ep_dispatch()      token rows to the experts' ranks, grouped by local expert
          moe_ep_experts()       the local expert FFNs (or your own kernel in between)
          moe_ep_shared_experts()  the shared experts on this rank's tokens (desc.shared)
          moe_ep_combine()       rows back, y[t] = sum over k-slots of w * expert(x)
          moe_ep_plan_destroy()
      (with shared experts, add moe_ep_shared_experts' output to combine's y, as forward does)
   4. moe_ep_destroy(ctx); then destroy the transport.

   EP x DP and EP x TP x DP: describe the layout (moe_ep_layout_desc: world, EP, TP and
   DP sizes), split the world transport into this rank's EP group (and TP group) with
   moe_ep_layout_split, give the experts of moe_ep_layout_experts, and create the context
   with .transport = &ep_group (and .tp_transport = &tp_group). See >>layout below.

   WEIGHT FORMATS
   ==============
   desc.weight_format: how the built-in FFN holds the routed and shared experts' weights.
   MOE_EP_WEIGHT_FORMAT_FP32 (default) 4 bytes; BF16 and FP16 2 bytes (to nearest even; fp16
   needs |w| < 65520); INT8 1 byte plus one fp32 scale per output channel, w = q * scale,
   q in [-127, 127] (from fp32: scale = max |w| / 127 over the channel's whole row, q rounded
   half away from zero). Weights come in fp32 (w1, w3, w2: converted once at create) or
   already in the format (w1_stored, w3_stored, w2_stored, in the same layout; int8 with
   w1_scale, w3_scale, w2_scale laid out as the biases). Activations and sums stay fp32: the
   kernel widens each slice of weights to fp32 exactly before the fp32 micro-kernel reads it,
   and int8's scale multiplies the finished sum once (fused with the bias). A format's
   output is thus the same bits on every path, build, world size, transport and thread
   count, and within rounding of a float64 layer over the same quantised weights; against
   the fp32 layer it differs by the weights' rounding (README: "Weight formats" has the
   measured figures). moe_ep_weight_bytes(ctx): this rank's weight memory in the format.
   The GPU layer reads fp32 weights. Errors: MOE_EP_LOG_ITEM_DESC_WEIGHT_FORMAT,
   _DESC_EXPERT_WEIGHTS_STORED (a tensor given twice, or stored for fp32),
   _DESC_EXPERT_SCALE (an int8 scale missing, <= 0 or not finite),
   _DESC_WEIGHT_NOT_CONVERTIBLE (an fp32 weight the format cannot hold).

   BF16 DOT ARITHMETIC
   ===================
   desc.arithmetic = MOE_EP_ARITHMETIC_BF16_DOT (opt-in, bf16 weights only) multiplies as
   AVX512-BF16's vdpbf16ps does instead of widening the weights (the default, EXACT):
   - each activation the FFN multiplies (x, and the hidden rows between the up and down
     products) is rounded to bf16 to nearest even, a subnormal to a zero of its sign (as
     vcvtne2ps2bf16); a subnormal bf16 weight is stored as a zero of its sign;
   - an output's sum runs over k in pairs (2i, 2i + 1), i = 0, 1, ..., from zero: acc +
     x[2i+1] w[2i+1], then + x[2i] w[2i], each the exact sum rounded once to nearest even,
     a sum below FLT_MIN once rounded (to 24 bits) flushed to a zero of its sign; an odd K
     ends with a zero pair;
   - the biases, the activation functions, the shared experts' gate, the router and
     combine are the exact arithmetic's.
   This is Intel's definition of the instructions; the AVX512_BF16 kernel runs them where
   the CPU has AVX512-BF16 and its vdpbf16ps gives the emulation's bits on a set of edge
   cases (checked at create), else the portable kernel emulates them (the same bits, 20-200x
   the SIMD kernels' time on the machine of bench/RESULTS.md: a fallback, not a fast path). The output is thus
   its own bits, the same on both kernels, every world size, transport and thread count;
   within 2e-3 (measured 1e-7) of a float64 layer over the bf16-rounded activations and
   weights, and about 2e-3 from the exact arithmetic over the same weights. Speed: where
   vdpbf16ps runs at half the multiply-adds per second of vfmadd231ps (as on the CPU of
   bench/RESULTS.md), prefill is slower than EXACT; decode streams the stored pairs without
   widening them (README: "Weight formats"). Errors: MOE_EP_LOG_ITEM_DESC_ARITHMETIC (not
   an arithmetic, or BF16_DOT without bf16 weights), _DESC_KERNEL (a kernel that does not
   run the arithmetic: AVX512_BF16 for EXACT, AVX2/AVX512/NEON for BF16_DOT).

   moe_ep DOES NOT
   ===============
   - initialise MPI, pick GPUs, or create threads other than OpenMP's and the
     pthreads helper's;
   - own your buffers: x, y, weights and routing arrays stay yours. Expert weights
     are copied once at create into a layout the kernel streams well;
   - print, abort or exit: errors are returned (ERRORS AND LOGGING);
   - train: there is no backward pass. The router statistics (loads, aux loss,
     z-loss) are reported for monitoring.

   THREADING AND COLLECTIVE SEMANTICS
   ==================================
   One context per rank. Calls marked "Collective: yes" must be made by every rank
   of the transport, in the same order, with the same collective parameters
   (d_model, d_ff, num_experts, top_k, activation with swiglu_alpha and swiglu_limit,
   weight_format, arithmetic, router scoring, renormalisation,
   capacity factor, placement). moe_ep_create checks that they agree (a fingerprint
   exchange) and fails with MOE_EP_ERROR_RANK_MISMATCH on every rank if they do not.
   A context is used by one thread at a time. Distinct contexts are independent.

   Determinism: on the CPU the output of a layer is bitwise identical for any world
   size, any transport and any thread count (dropless; with a capacity factor the limit
   applies per source rank, so what is dropped depends on how tokens are spread). Combine sums a token's k contributions
   in k-slot order in fp32, and the expert kernel's reduction order for one output
   element never depends on how many rows it got or how rows were split over threads.

   Failure: no rank fault crashes or hangs; every rank returns an error.
   - A rank whose arguments are bad, or whose expert callback fails, tells the others:
     moe_ep_forward and moe_ep_plan_create carry the failure into their exchange, and
     moe_ep_combine into its agreement; every rank returns an error (its own cause, or
     MOE_EP_ERROR_ABORTED "rank N failed").
   - moe_ep_dispatch with bad arguments returns at once and tells the peers through the
     transport's skip (the pthreads transport meets them at the dispatch; the MPI
     transport sends a control message that every wait listens for): their dispatch
     returns ABORTED. The plan remembers a failed dispatch, so the combine that follows
     (call it, as for any failure) fails on every rank without writing y. Then every
     rank is at the same step again and a retry with valid arguments works.
   - Every collective carries its kind and a sequence number (the context's); a rank that
     skips one or enters another (a dispatch on one rank, a combine on another) gets
     MOE_EP_ERROR_OUT_OF_STEP, the same code on every rank, and nothing is read from
     another collective's buffers; the next matching collectives work again.
   - A wait lasts at most the transport's timeout (moe_ep_pthreads_desc.timeout_ms,
     moe_ep_mpi_desc.timeout_ms, default 300 s on MPI): a rank that vanished (a killed
     process) costs the others MOE_EP_ERROR_TIMEOUT, where the launcher lets them live.
   Non-finite output: the router refuses a non-finite x or logit (naming x[t][i] or the
   router); finite inputs can still overflow in the experts (x of 1e25): forward returns
   OK and moe_ep_forward_args.nonfinite_tokens, if set, counts the rows of y with NaN or
   Inf (one pass over y, only when asked).
   Destroy order: plans, then contexts, then transports, then the world (pthreads) or
   MPI_Finalize. A plan may also outlive its context (it keeps the allocator); a context
   must not outlive its transport, nor a split group the transport it came from.

   ERRORS AND LOGGING
   ==================
   Every fallible call returns a moe_ep_result; moe_ep_result_string() names it.
   moe_ep_create has no context to keep its cause in: the logger gets it, and so does
   desc.create_error (a buffer of the caller's, thread-safe). The precise cause, in words
   that name the field and the rule, is kept per context:
   moe_ep_last_error(ctx), with a stable id for the rule, moe_ep_last_error_item(ctx)
   (a moe_ep_log_item such as MOE_EP_LOG_ITEM_DESC_TOP_K; moe_ep_log_item_string()
   names it). Out-params are untouched on failure. The optional logger hook gets the
   same text, item and rank; it is called from rank threads concurrently and must be
   re-entrant. The library is silent without it.

   MEMORY
   ======
   Every host allocation goes through desc.allocator {alloc_fn, free_fn, user_data}
   (both or neither; default malloc/free). The packed expert weights take
   moe_ep_weight_bytes(ctx) (the format's size, WEIGHT FORMATS). Allocations inside MPI, NCCL or CUDA are
   not covered. moe_ep_destroy releases everything the context allocated.

   WRITING A CUSTOM TRANSPORT
   ==========================
   Fill a moe_ep_transport: rank, world_size, exchange_counts and all_to_all_v are
   required; the rest is optional (see the comment above the struct). The core calls
   the callbacks from the rank's own thread, never from an OpenMP region. A transport
   or a header built on the core (as moe_ep_cuda.h is) shares its rules through the
   >>extension section: moe_ep_agree (every "all ranks reach the same verdict" step),
   moe_ep_alloc / moe_ep_free (the allocator hook) and moe_ep_hash (fingerprints).

   LICENSE
   =======
   At the end of this file.
*/
#ifndef MOE_EP_H_INCLUDED
#define MOE_EP_H_INCLUDED

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

#define MOE_EP_VERSION_MAJOR 0
#define MOE_EP_VERSION_MINOR 1
#define MOE_EP_VERSION_PATCH 0
#define MOE_EP_VERSION_STRING "0.1.0"

/* MOE_EP_STATIC: a program that calls only some of the API must not be told (-Wall
   -Werror) that the rest is unused. */
#if defined(__GNUC__) || defined(__clang__) || defined(__TINYC__)
#define MOE_EP__UNUSED __attribute__((unused))
#else
#define MOE_EP__UNUSED
#endif
#ifndef MOE_EP_MAX_THREADS
#define MOE_EP_MAX_THREADS 1024     /* the largest moe_ep_desc.num_threads accepted */
#endif

#ifndef MOE_EP_API
#ifdef MOE_EP_STATIC
#define MOE_EP_API static MOE_EP__UNUSED
#else
#define MOE_EP_API extern
#endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* >>results: one list gives the enum and the strings. */
#define MOE_EP_RESULT_LIST(X) \
    X(OK,                     "ok") \
    X(ERROR_INVALID_ARGUMENT, "invalid argument") \
    X(ERROR_OUT_OF_MEMORY,    "out of memory") \
    X(ERROR_TRANSPORT,        "transport failure") \
    X(ERROR_RANK_MISMATCH,    "ranks disagree on the collective parameters") \
    X(ERROR_TIMEOUT,          "timed out waiting for other ranks") \
    X(ERROR_ABORTED,          "aborted: another rank failed or left") \
    X(ERROR_UNSUPPORTED,      "unsupported") \
    X(ERROR_CALLBACK,         "user callback failed") \
    X(ERROR_INTERNAL,         "internal error") \
    X(ERROR_OUT_OF_STEP,      "ranks are in different collectives: one skipped a collective or entered another")

typedef enum moe_ep_result {
#define MOE_EP__RESULT_ENUM(name, text) MOE_EP_##name,
    MOE_EP_RESULT_LIST(MOE_EP__RESULT_ENUM)
#undef MOE_EP__RESULT_ENUM
    MOE_EP_RESULT_COUNT
} moe_ep_result;

/* Expert FFN, with g = w1 x + b1, u = w3 x + b3 (each bias optional, see
   moe_ep_expert_weights): y = w2 . h + b2, where h is
     SwiGLU:          silu(g) * u
     GELU, ReLU:      act(g)                          (w3 and b3 unused)
     clamped SwiGLU:  (clamp(u, -L, L) + 1) * g' * sigmoid(alpha g'), g' = min(g, L)
                      (GPT-OSS; alpha = desc.swiglu_alpha, L = desc.swiglu_limit) */
typedef enum moe_ep_activation {
    MOE_EP_ACTIVATION_DEFAULT = 0,  /* SwiGLU */
    MOE_EP_ACTIVATION_SWIGLU,
    MOE_EP_ACTIVATION_GELU,         /* exact erf form */
    MOE_EP_ACTIVATION_RELU,
    MOE_EP_ACTIVATION_SWIGLU_CLAMPED,
    MOE_EP_ACTIVATION_COUNT,
    MOE_EP_ACTIVATION_FORCE_U32 = 0x7FFFFFFF
} moe_ep_activation;

/* How moe_ep_expert_weights' pointers are laid out (each expert's tensors, row-major). */
typedef enum moe_ep_weight_layout {
    MOE_EP_WEIGHT_LAYOUT_DEFAULT = 0,  /* nn.Linear: w1, w3 [d_ff, d_model], w2 [d_model, d_ff] */
    MOE_EP_WEIGHT_LAYOUT_SEPARATE,     /* the same, by name */
    MOE_EP_WEIGHT_LAYOUT_FUSED_GATE_UP,/* w1 [2*d_ff, d_model]: rows [0, d_ff) gate, [d_ff, 2*d_ff) up
                                          (transformers' experts.gate_up_proj[e]); b1 [2*d_ff] likewise;
                                          w3, b3 unused; w2 as DEFAULT */
    MOE_EP_WEIGHT_LAYOUT_GPT_OSS,      /* w1 [d_model, 2*d_ff], gate in even columns, up in odd ones
                                          (GptOssExperts' gate_up_proj[e]); b1 [2*d_ff] interleaved
                                          likewise (gate_up_proj_bias[e]); w3, b3 unused;
                                          w2 [d_ff, d_model] (down_proj[e]); b2 (down_proj_bias[e]) */
    MOE_EP_WEIGHT_LAYOUT_LLAMA4,       /* w1 [d_model, 2*d_ff]: gate in columns [0, d_ff), up in the rest
                                          (Llama4TextExperts' gate_up_proj[e]); b1 [2*d_ff] likewise;
                                          w3, b3 unused; w2 [d_ff, d_model] (down_proj[e]) */
    MOE_EP_WEIGHT_LAYOUT_COUNT,
    MOE_EP_WEIGHT_LAYOUT_FORCE_U32 = 0x7FFFFFFF
} moe_ep_weight_layout;

/* How the built-in FFN holds the expert (and shared expert) weights. Activations and sums
   stay fp32: each weight is widened to fp32 exactly as the kernel reads it, so a format's
   output is the same bits on every path, thread count, world size and transport, and
   differs from fp32's only by the weights' own rounding (README: "Weight formats"). */
typedef enum moe_ep_weight_format {
    MOE_EP_WEIGHT_FORMAT_DEFAULT = 0,  /* fp32 */
    MOE_EP_WEIGHT_FORMAT_FP32,
    MOE_EP_WEIGHT_FORMAT_BF16,         /* bfloat16 (uint16_t bits): half the memory */
    MOE_EP_WEIGHT_FORMAT_FP16,         /* IEEE binary16 (uint16_t bits): half the memory, |w| < 65520 */
    MOE_EP_WEIGHT_FORMAT_INT8,         /* int8_t, symmetric, one fp32 scale per output channel: w = q * scale
                                          (q in [-127, 127]); a quarter of the memory */
    MOE_EP_WEIGHT_FORMAT_COUNT,
    MOE_EP_WEIGHT_FORMAT_FORCE_U32 = 0x7FFFFFFF
} moe_ep_weight_format;

/* How the built-in FFN multiplies activations by weights (BF16 DOT ARITHMETIC). */
typedef enum moe_ep_arithmetic {
    MOE_EP_ARITHMETIC_DEFAULT = 0,  /* exact */
    MOE_EP_ARITHMETIC_EXACT,        /* fp32 activations, the weights widened exactly, one fused multiply-add per
                                       product in k order: the same bits on every path (SAME BITS EVERYWHERE) */
    MOE_EP_ARITHMETIC_BF16_DOT,     /* opt-in, bf16 weights only: the activations rounded to bf16 and the
                                       products summed in pairs, as AVX512-BF16's vdpbf16ps does; its own bits,
                                       the same on every path, world size, transport and thread count */
    MOE_EP_ARITHMETIC_COUNT,
    MOE_EP_ARITHMETIC_FORCE_U32 = 0x7FFFFFFF
} moe_ep_arithmetic;

/* The CPU expert kernel. DEFAULT takes the best this build has and this CPU runs: with gcc
   or clang on x86, AVX-512, else AVX2+FMA, else portable, chosen at create whatever the
   compiler flags; elsewhere what the target flags give (NEON on AArch64). Every path gives
   the same bits; naming one is for tests and benchmarks. The BF16_DOT arithmetic runs on
   AVX512_BF16 where the CPU has it, else on PORTABLE (an emulation, the same bits, slow). */
typedef enum moe_ep_kernel {
    MOE_EP_KERNEL_DEFAULT = 0,
    MOE_EP_KERNEL_PORTABLE,         /* plain C, everywhere */
    MOE_EP_KERNEL_AVX2,             /* AVX2 with FMA and F16C */
    MOE_EP_KERNEL_AVX512,           /* AVX-512F */
    MOE_EP_KERNEL_NEON,             /* AArch64 */
    MOE_EP_KERNEL_CBLAS,            /* MOE_EP_CBLAS builds (reported, not chosen) */
    MOE_EP_KERNEL_AVX512_BF16,      /* AVX-512 with AVX512-BF16's vdpbf16ps: the BF16_DOT arithmetic only */
    MOE_EP_KERNEL_COUNT,
    MOE_EP_KERNEL_FORCE_U32 = 0x7FFFFFFF
} moe_ep_kernel;

typedef enum moe_ep_scoring {
    MOE_EP_SCORING_DEFAULT = 0,     /* softmax */
    MOE_EP_SCORING_SOFTMAX,         /* softmax over all E logits, then top-k (Mixtral, Qwen2/3-MoE) */
    MOE_EP_SCORING_SIGMOID,         /* sigmoid of each logit, then top-k (DeepSeek-V3) */
    MOE_EP_SCORING_TOPK_SOFTMAX,    /* top-k of the logits, then softmax over the k chosen (GPT-OSS) */
    MOE_EP_SCORING_TOPK_SIGMOID,    /* top-k of the logits, then sigmoid of each chosen one (Llama-4) */
    MOE_EP_SCORING_COUNT,
    MOE_EP_SCORING_FORCE_U32 = 0x7FFFFFFF
} moe_ep_scoring;

typedef enum moe_ep_placement_kind {
    MOE_EP_PLACEMENT_DEFAULT = 0,   /* contiguous */
    MOE_EP_PLACEMENT_CONTIGUOUS,    /* rank = expert / experts_per_rank; the first E % R ranks hold one more */
    MOE_EP_PLACEMENT_ROUND_ROBIN,   /* rank = expert % R */
    MOE_EP_PLACEMENT_TABLE,         /* rank = table[expert] */
    MOE_EP_PLACEMENT_COUNT,
    MOE_EP_PLACEMENT_FORCE_U32 = 0x7FFFFFFF
} moe_ep_placement_kind;

/* Where a buffer lives: the core's CPU paths use host memory; the GPU layer (moe_ep_cuda.h)
   device memory; the NCCL transport moves both. */
typedef enum moe_ep_memory_space {
    MOE_EP_MEMORY_DEFAULT = 0,      /* host */
    MOE_EP_MEMORY_HOST,
    MOE_EP_MEMORY_DEVICE,
    MOE_EP_MEMORY_COUNT,
    MOE_EP_MEMORY_FORCE_U32 = 0x7FFFFFFF
} moe_ep_memory_space;

typedef struct moe_ep_allocator {
    void* (*alloc_fn)(size_t size, void* user_data);
    void (*free_fn)(void* ptr, void* user_data);
    void* user_data;
} moe_ep_allocator;

/* >>log items: every message the core logs has a stable id (as sokol's log items), so a
   program or a test can tell which rule fired without reading the prose. The list only
   grows; ids of existing items do not change. Transport and extension headers use these
   where one fits and MOE_EP_LOG_ITEM_NONE otherwise (their tag names the header). */
#define MOE_EP_LOG_ITEM_LIST(X) \
    X(NONE)                        /* no item (a message of an extension header) */ \
    X(OUT_OF_MEMORY) \
    X(TRANSPORT_FAILED)            /* a transport callback returned an error; its text follows */ \
    X(PEER_FAILED)                 /* another rank failed the same step */ \
    X(RANK_MISMATCH)               /* ranks disagree on the collective parameters */ \
    X(CREATE_ARGS)                 /* moe_ep_create: desc or out is NULL */ \
    X(DESC_D_MODEL) \
    X(DESC_D_FF) \
    X(DESC_NUM_EXPERTS) \
    X(DESC_TOP_K) \
    X(DESC_TOP_K_ABOVE_EXPERTS) \
    X(DESC_ACTIVATION) \
    X(DESC_SCORING) \
    X(DESC_CAPACITY_FACTOR) \
    X(DESC_PLACEMENT_KIND) \
    X(DESC_PLACEMENT_TABLE_MISSING) \
    X(DESC_PLACEMENT_TABLE_RANK) \
    X(DESC_NUM_THREADS) \
    X(DESC_ALLOCATOR_HALF) \
    X(DESC_TRANSPORT_RANK) \
    X(DESC_TRANSPORT_REQUIRED_CALLBACKS) \
    X(DESC_TRANSPORT_SPLIT_PHASE_HALF) \
    X(DESC_TP_TRANSPORT_RANK) \
    X(DESC_TP_TRANSPORT_ALL_REDUCE) \
    X(DESC_TP_D_FF) \
    X(DESC_TP_EXPERT_FN) \
    X(DESC_EXPERTS_MISSING) \
    X(DESC_EXPERT_WEIGHTS_NULL) \
    X(DESC_ROUTED_SCALING_FACTOR) \
    X(DESC_BIAS_NOT_FINITE)        /* router_bias or selection_bias holds NaN or Inf */ \
    X(DESC_NUM_GROUPS)             /* num_groups < 0 or not a divisor of num_experts */ \
    X(DESC_TOPK_GROUPS)            /* topk_groups outside [1, num_groups] */ \
    X(DESC_TOP_K_ABOVE_GROUPS)     /* top_k above the experts that topk_groups groups hold */ \
    X(DESC_SHARED_D_FF) \
    X(DESC_SHARED_WEIGHTS_NULL) \
    X(DESC_SHARED_GATE_NOT_FINITE) \
    X(SHARED_ARGS)                 /* moe_ep_shared_experts without shared experts, or with NULL rows */ \
    X(ROUTE_TOKENS) \
    X(ROUTE_NULL) \
    X(ROUTER_WEIGHT_MISSING) \
    X(ROUTE_NOT_FINITE)            /* a token's router logit is NaN or Inf: nothing is chosen silently */ \
    X(ROUTING_EXPERT_RANGE)        /* a topk_idx entry is not an expert */ \
    X(ROUTING_EXPERT_TWICE)        /* a token names an expert in two slots */ \
    X(ROUTING_WEIGHT_NOT_FINITE) \
    X(PLAN_ARGS) \
    X(STAGE_PLAN)                  /* plan NULL or of another context */ \
    X(STAGE_SPLIT_PHASE)           /* a begin without end, or an end without begin */ \
    X(STAGE_NULL)                  /* a buffer of dispatch, experts or combine is NULL */ \
    X(EXPERT_FN_FAILED) \
    X(FORWARD_ARGS_NULL) \
    X(FORWARD_TOKENS) \
    X(FORWARD_NULL)                /* x or y NULL with tokens > 0 */ \
    X(FORWARD_ROUTING_IN)          /* routing_in without topk_idx and topk_weight */ \
    X(FFN_ARGS) \
    X(FFN_NO_WEIGHTS) \
    X(DESC_SWIGLU_ALPHA)           /* swiglu_alpha not finite or <= 0 */ \
    X(DESC_SWIGLU_LIMIT)           /* swiglu_limit not finite or <= 0 */ \
    X(DESC_WEIGHT_LAYOUT)          /* weight_layout is not a moe_ep_weight_layout */ \
    X(OUT_OF_STEP)                 /* ranks are in different collectives (kind or sequence number differ) */ \
    X(DESC_EXPERTS_COUNT)          /* experts_count is neither this rank's expert count nor num_experts */ \
    X(STAGE_FAILED_BEFORE)         /* a dispatch of this plan failed: its combine fails on every rank */ \
    X(DESC_WEIGHT_FORMAT)          /* weight_format is not a moe_ep_weight_format, or not one this build runs */ \
    X(DESC_KERNEL)                 /* kernel is not a moe_ep_kernel, or not one this build and CPU run */ \
    X(DESC_EXPERT_WEIGHTS_STORED)  /* a tensor given both in fp32 and stored, or stored for the fp32 format */ \
    X(DESC_EXPERT_SCALE)           /* int8 stored weights: a scale missing, zero, negative or not finite */ \
    X(DESC_WEIGHT_NOT_CONVERTIBLE) /* an fp32 weight the format cannot hold (fp16 overflow, int8 NaN) */ \
    X(DESC_ARITHMETIC)             /* arithmetic is not a moe_ep_arithmetic, or BF16_DOT without bf16 weights */

typedef enum moe_ep_log_item {
#define MOE_EP__LOG_ITEM_ENUM(name) MOE_EP_LOG_ITEM_##name,
    MOE_EP_LOG_ITEM_LIST(MOE_EP__LOG_ITEM_ENUM)
#undef MOE_EP__LOG_ITEM_ENUM
    MOE_EP_LOG_ITEM_COUNT
} moe_ep_log_item;

/* level: 1 error, 2 warning, 3 info; item: a moe_ep_log_item (for tag "moe_ep").
   Called concurrently from rank threads. */
typedef struct moe_ep_logger {
    void (*func)(const char* tag, uint32_t level, uint32_t item, int rank, const char* message, void* user_data);
    void* user_data;
} moe_ep_logger;

/* Placement of experts on ranks. The table (kind TABLE) has num_experts entries, each
   a rank in [0, world_size); it is copied at create. */
typedef struct moe_ep_placement {
    moe_ep_placement_kind kind;
    const int* table;
} moe_ep_placement;

/* >>transport
   The contract between the core and a transport.

   exchange_counts (required): an all-to-all of int64 values, `count` values per peer:
       send[p*count .. p*count+count) goes to rank p, and recv[q*count ..) is what rank q
       sent to this rank. Blocking. Used for routing counts, status words and the
       create-time fingerprint.
   all_to_all_v (required): moves rows of args->row_bytes bytes. Each peer's message is
       split into args->segments segments; segment s for peer p is send_counts[p*S+s]
       rows at row offset send_offsets[p*S+s] of args->send, and it lands at row offset
       recv_offsets[q*S+s] of args->recv on rank p, where q is this rank and
       recv_counts[q*S+s] on p equals send_counts[p*S+s] here. Offsets are in rows.
       Both buffers are in args->memory_space (with args->stream for device memory).
       Blocking: when it returns, recv holds the data and send may be reused.
   all_to_all_v_begin / all_to_all_v_end (optional, both or neither): the split-phase
       form; begin starts the exchange and stores a handle in *request; end completes
       it. Buffers and arrays of args must stay valid until end returns. Without them
       the core calls all_to_all_v in begin and does nothing in end.
   barrier (optional): without it the core exchanges one count per peer.
   abort (optional): called by the core never; by a helper such as moe_ep_pthreads_run
       when a rank fails, so that peers blocked in a call return MOE_EP_ERROR_ABORTED.
   skip (optional): this rank failed before a collective and will not enter it (a stage
       call with bad arguments); the peers' same collective then fails with
       MOE_EP_ERROR_ABORTED ("rank N failed") instead of waiting for it, and every rank
       stays at the same step: the skipped collective counts as done on every rank. It may
       block until the peers reach that collective (pthreads) or only tell them (MPI).
       Without it the peers wait for the transport's timeout or mismatch check.
   destroy (optional): releases impl; called by the transport's own destroy function.
   row_lists (optional, 0 by default): 1 if all_to_all_v gathers send rows by index
       (args->send_rows) and hands received rows to args->recv_fn; the core then
       dispatches in one pass (moe_ep_dispatch, moe_ep_forward: the transport reads each
       row straight from x into the receiver's rows) instead of packing the rows into a
       send buffer first, and its blocking combine sums the rows where they arrive instead
       of copying them first. A transport that sets it must check every index it is given
       (args->send_buffer_rows) and fail clearly.
   local_ranks: how many ranks of this transport share this process (pthreads: all of
       them, MPI: 1); the default OpenMP thread count is divided by it. 0 means 1.

   Ranks out of step: a transport should tell one collective from another (its kind, its
   parameters, its sequence number, and moe_ep_a2a_args.step) and fail every rank with
   MOE_EP_ERROR_OUT_OF_STEP when they differ, as the pthreads and MPI transports do.

   All callbacks are called from the rank's own thread, never inside an OpenMP region,
   and return MOE_EP_OK or an error; a transport may write a description of the error
   into err_text (err_size bytes, may be NULL) for the context's last-error text. */
typedef struct moe_ep_a2a_args {
    const void* send;
    void* recv;
    size_t row_bytes;
    int segments;                   /* S >= 1 */
    const int64_t* send_counts;     /* [world_size * S] rows */
    const int64_t* send_offsets;    /* [world_size * S] rows */
    const int64_t* recv_counts;     /* [world_size * S] rows */
    const int64_t* recv_offsets;    /* [world_size * S] rows */
    moe_ep_memory_space memory_space;
    void* stream;                   /* cudaStream_t for device memory; NULL: the transport's own stream */
    int64_t step;                   /* the core's tag of this exchange (kind and sequence number): equal on
                                       every rank that is in step; 0: untagged */
    /* Optional row list (NULL: none), given only to a transport whose row_lists is 1: send
       row r (numbered as in send_offsets) is then row send_rows[r] of send, which holds
       send_buffer_rows rows; every index must be in [0, send_buffer_rows). The transport
       gathers the rows by index as it moves them, so the sender need not pack them first. */
    const int64_t* send_rows;       /* [sum of send_counts] */
    int64_t send_buffer_rows;
    /* Optional receive callbacks (NULL: none), given only to a transport whose row_lists is
       1, in a blocking all_to_all_v: instead of copying the rows into recv (unused then), the
       transport calls recv_fn for each segment it receives (rows rows of row_bytes at src,
       whose place in recv would be row `first`), and once they have all arrived,
       recv_done_fn; src must stay readable until recv_done_fn returns. The core's combine
       sums the rows in place this way, in one pass. */
    void (*recv_fn)(void* user, int64_t first, const void* src, int64_t rows);
    void (*recv_done_fn)(void* user);
    void* recv_user;
} moe_ep_a2a_args;

typedef struct moe_ep_transport {
    void* impl;
    const char* name;
    int rank;
    int world_size;
    int local_ranks;
    moe_ep_result (*exchange_counts)(void* impl, const int64_t* send, int64_t* recv, int count,
                                     char* err_text, size_t err_size);
    moe_ep_result (*all_to_all_v)(void* impl, const moe_ep_a2a_args* args, char* err_text, size_t err_size);
    moe_ep_result (*all_to_all_v_begin)(void* impl, const moe_ep_a2a_args* args, void** request,
                                        char* err_text, size_t err_size);
    moe_ep_result (*all_to_all_v_end)(void* impl, void* request, char* err_text, size_t err_size);
    moe_ep_result (*barrier)(void* impl, char* err_text, size_t err_size);
    void (*abort)(void* impl);
    void (*destroy)(void* impl);
    /* Optional, for tensor parallelism: data[0..count) becomes the sum over all ranks,
       added in rank order (((r0 + r1) + r2) + ...) so the result is the same on every
       rank and in every run. memory_space/stream as in moe_ep_a2a_args. */
    moe_ep_result (*all_reduce_sum)(void* impl, float* data, int64_t count, moe_ep_memory_space memory_space,
                                    void* stream, char* err_text, size_t err_size);
    /* Optional, for EP x DP and EP x TP x DP: collective over this transport; ranks with the
       same color form a new transport in which they are ordered by (key, rank). The new
       transport is released with its own destroy callback. */
    moe_ep_result (*split)(void* impl, int color, int key, struct moe_ep_transport* out,
                           char* err_text, size_t err_size);
    /* Optional: this rank will not enter its next collective (see skip above). */
    void (*skip)(void* impl, moe_ep_result status);
    /* 1: all_to_all_v (and _begin) honour moe_ep_a2a_args.send_rows and .recv_fn (the
       pthreads transport), so the core's dispatch hands over x and the plan's row order
       instead of packed rows, and its blocking combine sums the rows where they arrive;
       0 (MPI, NCCL, a transport of your own): the core packs and never sets them. */
    int row_lists;
} moe_ep_transport;

/* The weights of one expert; with the default desc.weight_layout the PyTorch nn.Linear
   layout, row-major: w1 (gate), w3 (up): [d_ff, d_model]; w2 (down): [d_model, d_ff]; the
   other layouts are described at moe_ep_weight_layout. w3 and b3 are used by the gated
   activations (SwiGLU, clamped SwiGLU) only. The biases are optional (NULL: none): b1, b3
   [d_ff] are added to the finished up products before the activation, b2 [d_model] to the
   output. Everything is copied at create. With tensor parallelism b1 and b3 are sliced
   with their rows and b2 is added by TP rank 0 alone (before the rank-ordered sum).
   Zero the struct before you fill it (= { 0 }, calloc, memset): a field you leave
   uninitialised is read as a pointer, and later versions may add fields. */
typedef struct moe_ep_expert_weights {
    const float* w1;
    const float* w3;
    const float* w2;
    const float* b1;
    const float* b3;
    const float* b2;
    /* Weights already in desc.weight_format (not fp32), each in place of the fp32 tensor
       of the same name, in the same layout: uint16_t bits for bf16 and fp16, int8_t for
       int8. Give a tensor once: w1 or w1_stored, and so on. */
    const void* w1_stored;
    const void* w3_stored;
    const void* w2_stored;
    /* int8 stored weights: the fp32 scale of each output channel (w = q * scale), laid out
       as the bias of the same tensor (w1_scale as b1, ...); finite and > 0. fp32 weights
       handed to the int8 format get max |w| / 127 per output channel instead. */
    const float* w1_scale;
    const float* w3_scale;
    const float* w2_scale;
} moe_ep_expert_weights;

/* Always-on experts that every rank holds and runs on its own tokens, with no traffic:
   DeepSeek-V3's shared experts (n_shared_experts of them form one FFN of width
   n_shared_experts * moe_intermediate_size), Qwen2-MoE's and Llama-4's shared expert.
   y[t] = routed[t] + g_t * shared(x[t]), g_t = sigmoid(gate . x[t]) with a gate
   (Qwen2-MoE's shared_expert_gate), else 1. The FFN is the routed experts' (activation,
   kernel), built in; weights and gate are copied at create. With a TP group every TP rank
   computes it whole. */
typedef struct moe_ep_shared_desc {
    int d_ff;                       /* default 0: no shared experts */
    moe_ep_expert_weights weights;  /* w1, w3 [d_ff, d_model], w2 [d_model, d_ff] */
    const float* gate;              /* [d_model] or NULL */
} moe_ep_shared_desc;

/* A replacement for the built-in expert compute, e.g. an accelerator kernel.
   rows: [row_count, d_model] inputs of local expert `local_expert` (global id
   `expert`); out: [row_count, d_model]. Return 0 on success, non-zero on failure
   (the layer then fails with MOE_EP_ERROR_CALLBACK on this rank and ABORTED on the others). */
typedef int (*moe_ep_expert_fn)(int local_expert, int expert, const float* rows, int64_t row_count,
                                int d_model, float* out, void* user_data);

/* Setup of one MoE layer on one rank. Zero means default everywhere. */
typedef struct moe_ep_desc {
    int d_model;                    /* required, > 0 */
    int d_ff;                       /* required, > 0 (unless expert_fn is set; then 0 is allowed) */
    int num_experts;                /* required, > 0 */
    int top_k;                      /* default 1; 1 <= top_k <= num_experts */
    moe_ep_activation activation;   /* default SwiGLU */
    float swiglu_alpha;             /* default 0 = 1.702: clamped SwiGLU's sigmoid scale; > 0 */
    float swiglu_limit;             /* default 0 = 7.0: clamped SwiGLU's clamp; > 0 */
    moe_ep_weight_layout weight_layout;  /* default nn.Linear, separate w1, w3, w2 */
    moe_ep_weight_format weight_format;  /* default fp32: how the built-in FFN holds the expert and shared
                                       weights (bf16, fp16, int8 per channel); fp32 tensors are
                                       converted at create, or hand them in stored (w1_stored, ...) */
    moe_ep_kernel kernel;           /* default: the best CPU kernel this build and CPU have */
    moe_ep_arithmetic arithmetic;   /* default exact; BF16_DOT (bf16 weights): activations rounded to bf16,
                                       pairs summed as vdpbf16ps does (BF16 DOT ARITHMETIC) */
    moe_ep_scoring scoring;         /* default softmax */
    bool normalize_topk;            /* default false: divide the k weights by their sum */
    float routed_scaling_factor;    /* default 0 = 1: the k weights are multiplied by it, after
                                       normalize_topk (DeepSeek-V3's routed_scaling_factor) */
    const float* router_bias;       /* [num_experts] or NULL: added to the logits (GPT-OSS); copied */
    const float* selection_bias;    /* [num_experts] or NULL: added to the scores to choose the experts
                                       only; the weights come from the unbiased scores (DeepSeek-V3's
                                       e_score_correction_bias); copied */
    int num_groups;                 /* default 0 = 1: the experts form num_groups equal groups, a group
                                       scores the sum of its two best (biased) scores, and only the
                                       best topk_groups groups compete (DeepSeek-V3's n_group) */
    int topk_groups;                /* default 0 = num_groups (DeepSeek-V3's topk_group) */
    bool scale_expert_input;        /* default false: a token's weight scales the expert's output;
                                       true: its input, and the outputs add unweighted (Llama-4) */
    float capacity_factor;          /* default 0 = dropless; else > 0 */
    moe_ep_placement placement;     /* default contiguous */
    int num_threads;                /* default 0 = OpenMP's default divided by transport.local_ranks */
    const float* router_weight;     /* [num_experts, d_model]; required unless every call hands in routing;
                                       copied at create (transposed, for the router's vector loop) */
    const moe_ep_expert_weights* experts;  /* [experts_count]; required unless expert_fn is set */
    int experts_count;              /* how experts is indexed, checked: this rank's expert count
                                       (experts[l] is local expert l, as moe_ep_rank_experts lists
                                       them) or num_experts (experts[e] is expert e; only this rank's
                                       entries are read, the others may be zeroed). Default 0 means
                                       num_experts on one rank and is refused on more, where a global
                                       array read as local experts would give a wrong layer. */
    moe_ep_expert_fn expert_fn;     /* default NULL: built-in kernel */
    void* expert_user_data;
    moe_ep_shared_desc shared;      /* default none: shared experts, see moe_ep_shared_desc */
    const moe_ep_transport* transport;     /* default NULL: built-in single rank; copied at create.
                                       With tensor parallelism: this rank's EP group. */
    const moe_ep_transport* tp_transport;  /* default NULL: no tensor parallelism. Otherwise this
                                       rank's TP group (needs all_reduce_sum): every expert's FFN
                                       is split over it by d_ff (w1, w3 by rows, w2 by columns;
                                       rank t of T holds d_ff rows [t*d_ff/T, (t+1)*d_ff/T)),
                                       the group's ranks hand in the same tokens, and the partial
                                       expert outputs are summed in TP-rank order. `experts`
                                       still holds the full weights; only the slice is copied. */
    moe_ep_allocator allocator;     /* default malloc/free */
    moe_ep_logger logger;           /* default none */
    char* create_error;             /* default NULL; else [create_error_size] out: why moe_ep_create failed
                                       (its first cause), "" when it worked; for a caller without a logger */
    size_t create_error_size;
} moe_ep_desc;

/* >>families: a model family's MoE layer as its transformers config's defaults describe it. */
typedef enum moe_ep_family {
    MOE_EP_FAMILY_DEFAULT = 0,      /* none: moe_ep_desc's own defaults */
    MOE_EP_FAMILY_MIXTRAL,          /* MixtralSparseMoeBlock */
    MOE_EP_FAMILY_QWEN2_MOE,        /* Qwen2MoeSparseMoeBlock: gated shared expert */
    MOE_EP_FAMILY_QWEN3_MOE,        /* Qwen3MoeSparseMoeBlock */
    MOE_EP_FAMILY_DEEPSEEK_V3,      /* DeepseekV3MoE (also Kimi K2 and GLM-4.5's router) */
    MOE_EP_FAMILY_GPT_OSS,          /* GptOssMLP */
    MOE_EP_FAMILY_LLAMA4,           /* Llama4TextMoe */
    MOE_EP_FAMILY_COUNT,
    MOE_EP_FAMILY_FORCE_U32 = 0x7FFFFFFF
} moe_ep_family;

/* Router statistics of one call over this rank's tokens. All arrays optional (NULL). */
typedef struct moe_ep_router_stats {
    int64_t* tokens_per_expert;     /* [num_experts] out: assignments (token, slot) per expert */
    double aux_loss;                /* out: E * sum_i f_i * P_i, f_i = tokens_per_expert[i] / (T*k),
                                       P_i = mean over tokens of the router probability of i (the
                                       softmax of the logits, whatever the scoring).
                                       1.0 at perfect balance; 0 when T = 0. */
    double z_loss;                  /* out: mean over tokens of logsumexp(logits)^2; 0 when T = 0 */
} moe_ep_router_stats;

typedef struct moe_ep_plan moe_ep_plan;
typedef struct moe_ep_context moe_ep_context;

/* What a plan knows. Pointers stay valid until moe_ep_plan_destroy. */
typedef struct moe_ep_plan_info {
    int world_size;
    int local_experts;
    int64_t tokens;                 /* this rank's tokens */
    int64_t capacity;               /* rows each expert accepts from this rank; -1 = dropless */
    const int64_t* send_counts;     /* [world_size] rows this rank sends to each rank */
    const int64_t* recv_counts;     /* [world_size] rows this rank receives from each rank */
    const int64_t* local_expert_counts;  /* [local_experts] received rows per local expert */
    const int64_t* local_expert_offsets; /* [local_experts] first row of each local expert */
    int64_t recv_rows;              /* rows received = sum of local_expert_counts */
    int64_t send_rows;              /* rows sent = kept assignments of this rank */
    const int64_t* expert_counts;   /* [num_experts] assignments of this rank per expert, before capacity */
    const int64_t* expert_kept;     /* [num_experts] the same after capacity */
    const int64_t* permutation;     /* [send_rows] token of each send row, in send order */
    /* The exact layout, for code that moves the rows itself (a device path, a custom kernel):
       send rows are ordered (destination rank, its local expert, token); segment p*S+s is
       local expert s of rank p. Receive rows are ordered (local expert, source rank, token). */
    int segments;                   /* S: the largest number of experts a rank holds (>= 1) */
    const int64_t* seg_send_counts; /* [world_size * S] */
    const int64_t* seg_send_offsets;/* [world_size * S] rows into the send order */
    const int64_t* seg_recv_counts; /* [world_size * S] */
    const int64_t* seg_recv_offsets;/* [world_size * S] rows into the receive order */
    const int64_t* slot_rows;       /* [tokens * top_k] send row of (token, slot), -1 if dropped */
    const float* topk_weight;       /* [tokens * top_k] the plan's copy of the weights */
} moe_ep_plan_info;

/* One layer call. x: [tokens, d_model]; y: [tokens, d_model] (written in full).
   topk_idx/topk_weight [tokens, top_k]: when routing_in is true they are read as the
   caller's routing (validated); otherwise, if non-NULL (both or neither), the router's
   choice is written there. stats may be NULL. topk_idx, topk_weight (router's choice),
   stats and nonfinite_tokens are written only when the call succeeds. */
typedef struct moe_ep_forward_args {
    int64_t tokens;
    const float* x;
    float* y;
    bool routing_in;
    int32_t* topk_idx;
    float* topk_weight;
    moe_ep_router_stats* stats;
    int64_t* nonfinite_tokens;      /* optional out: how many rows of y hold NaN or Inf (an overflow in the
                                       experts: the router refuses a non-finite x). Costs one pass over y. */
} moe_ep_forward_args;

/* >>api */
MOE_EP_API const char* moe_ep_result_string(moe_ep_result result);

/* The version of the implementation this program was built with ("0.1.0"), to report or
   compare with the MOE_EP_VERSION_STRING of the header a file was compiled against. */
MOE_EP_API const char* moe_ep_version(void);

/* Create a context for one rank. Collective: yes (fingerprint exchange).
   out: untouched on failure. On failure the cause is written to the logger (no
   context exists to hold it). */
MOE_EP_API moe_ep_result moe_ep_create(const moe_ep_desc* desc, moe_ep_context** out);
MOE_EP_API void moe_ep_destroy(moe_ep_context* ctx);
/* The resolved desc (defaults filled in). */
MOE_EP_API moe_ep_desc moe_ep_query(const moe_ep_context* ctx);
/* The cause of the last failure on this context, "" if none. */
MOE_EP_API const char* moe_ep_last_error(const moe_ep_context* ctx);
/* The log item of the last error (MOE_EP_LOG_ITEM_NONE if none), and an item's name ("DESC_TOP_K"). */
MOE_EP_API moe_ep_log_item moe_ep_last_error_item(const moe_ep_context* ctx);
MOE_EP_API const char* moe_ep_log_item_string(moe_ep_log_item item);
MOE_EP_API int moe_ep_rank(const moe_ep_context* ctx);
MOE_EP_API int moe_ep_world_size(const moe_ep_context* ctx);

/* Placement queries. Collective: no. */
MOE_EP_API int moe_ep_expert_owner(const moe_ep_context* ctx, int expert);          /* -1 if out of range */
MOE_EP_API int moe_ep_expert_local_index(const moe_ep_context* ctx, int expert);    /* index on its owner */
MOE_EP_API int moe_ep_rank_expert_count(const moe_ep_context* ctx, int rank);
/* Writes up to max experts of `rank` in ascending order; returns how many it holds. */
MOE_EP_API int moe_ep_rank_experts(const moe_ep_context* ctx, int rank, int* experts, int max);
/* The same arithmetic without a context, for tables and tests. owner_of: [num_experts] out. */
MOE_EP_API moe_ep_result moe_ep_placement_compute(const moe_ep_placement* placement, int num_experts,
                                                  int world_size, int* owner_of);

/* >>layout: EP x TP x DP.
   world_size = dp_size * ep_size * tp_size. Rank order: tp varies fastest, then ep, then dp:
       rank = (dp * ep_size + ep) * tp_size + tp
   (moe_ep_layout_rank_of / moe_ep_layout_coords convert). The EP group of a rank is the
   ranks with its dp and tp (varying ep): tokens travel only inside it. The TP group is the
   ranks with its dp and ep (varying tp): they hold the same tokens and the same experts,
   each a slice of d_ff. The DP group is the ranks with its ep and tp (varying dp): replicas.
   Each EP group holds all num_experts experts; EP index e holds the experts that the
   placement gives to rank e of ep_size (num_experts must be a multiple of ep_size). */
typedef enum moe_ep_group_kind {
    MOE_EP_GROUP_DEFAULT = 0,       /* EP */
    MOE_EP_GROUP_EP,
    MOE_EP_GROUP_TP,
    MOE_EP_GROUP_DP,
    MOE_EP_GROUP_COUNT,
    MOE_EP_GROUP_FORCE_U32 = 0x7FFFFFFF
} moe_ep_group_kind;

typedef struct moe_ep_layout_desc {
    int world_size;                 /* required */
    int ep_size;                    /* default: world_size / (tp_size * dp_size) */
    int tp_size;                    /* default 1 */
    int dp_size;                    /* default 1 */
    int num_experts;                /* required, a multiple of ep_size */
    moe_ep_placement placement;     /* placement of experts over the ep_size ranks of an EP group */
} moe_ep_layout_desc;

typedef struct moe_ep_coords { int dp, ep, tp; } moe_ep_coords;

/* Resolves defaults and checks the sizes; err (optional) gets the reason in words. */
MOE_EP_API moe_ep_result moe_ep_layout_resolve(const moe_ep_layout_desc* desc, moe_ep_layout_desc* out,
                                               char* err, size_t err_size);
MOE_EP_API moe_ep_result moe_ep_layout_coords(const moe_ep_layout_desc* desc, int rank, moe_ep_coords* out);
MOE_EP_API int moe_ep_layout_rank_of(const moe_ep_layout_desc* desc, moe_ep_coords coords);  /* -1 if invalid */
/* The ranks of `rank`'s group of the given kind, in group order (the order of the split
   transport); returns the group size, or -1 on invalid input. Writes up to max ranks. */
MOE_EP_API int moe_ep_layout_group(const moe_ep_layout_desc* desc, int rank, moe_ep_group_kind kind, int* ranks, int max);
/* The experts `rank` holds, ascending; returns the count, or -1 on invalid input. */
MOE_EP_API int moe_ep_layout_experts(const moe_ep_layout_desc* desc, int rank, int* experts, int max);
/* Splits `world` (a transport over all world_size ranks) into this rank's group of the
   given kind. Collective over world: every rank calls it with the same kind. err_text
   (err_size bytes, may be NULL) gets the cause on failure, the transport's own text
   included. */
MOE_EP_API moe_ep_result moe_ep_layout_split(const moe_ep_layout_desc* desc, const moe_ep_transport* world,
                                             moe_ep_group_kind kind, moe_ep_transport* out,
                                             char* err_text, size_t err_size);

/* Route this rank's tokens. Collective: no. topk_idx/topk_weight: [tokens, top_k] out. */
MOE_EP_API moe_ep_result moe_ep_route(moe_ep_context* ctx, const float* x, int64_t tokens,
                                      int32_t* topk_idx, float* topk_weight, moe_ep_router_stats* stats);

/* Build the dispatch plan from routing and exchange the counts. Collective: yes.
   The routing arrays are copied; the plan is reused by dispatch and combine. */
MOE_EP_API moe_ep_result moe_ep_plan_create(moe_ep_context* ctx, int64_t tokens, const int32_t* topk_idx,
                                            const float* topk_weight, moe_ep_plan** out);
MOE_EP_API void moe_ep_plan_destroy(moe_ep_plan* plan);
MOE_EP_API moe_ep_plan_info moe_ep_plan_query(const moe_ep_plan* plan);

/* Send token rows to the experts' ranks. x: [tokens, d_model] of this rank;
   recv_rows: [info.recv_rows, d_model], grouped by local expert (local_expert_offsets),
   within an expert by source rank, then by token. Collective: yes. With a transport that
   gathers by index (row_lists: the pthreads transport) and without scale_expert_input,
   the rows go from x to the peers' recv_rows in one pass, read during the call; else they
   are packed into the plan's send buffer first. The same bytes either way. */
MOE_EP_API moe_ep_result moe_ep_dispatch(moe_ep_context* ctx, moe_ep_plan* plan, const float* x, float* recv_rows);
/* Split-phase dispatch: buffers must stay valid until end returns. Collective: yes (both).
   begin packs the rows (x may change after it returns), whatever the transport. */
MOE_EP_API moe_ep_result moe_ep_dispatch_begin(moe_ep_context* ctx, moe_ep_plan* plan, const float* x, float* recv_rows);
MOE_EP_API moe_ep_result moe_ep_dispatch_end(moe_ep_context* ctx, moe_ep_plan* plan);

/* Run the local experts: rows and out are [info.recv_rows, d_model] in dispatch's order.
   Collective: no (a failure is reported to the peers by the next combine); with a
   tp_transport, collective over the TP group (the slices' outputs are summed). */
MOE_EP_API moe_ep_result moe_ep_experts(moe_ep_context* ctx, const moe_ep_plan* plan, const float* rows, float* out);

/* Bring expert outputs back and sum them: y[t] = sum_j topk_weight[t,j] * out_j, in
   k-slot order, fp32; dropped assignments add nothing. y: [tokens, d_model], written
   in full. expert_out: [info.recv_rows, d_model]. Collective: yes. With a transport
   that has row_lists (pthreads), moe_ep_combine (not the split-phase form) sums each
   row where it arrived, in one pass, inside the exchange: the same bytes; if the
   exchange then fails in its closing step, y may already be written. */
MOE_EP_API moe_ep_result moe_ep_combine(moe_ep_context* ctx, moe_ep_plan* plan, const float* expert_out, float* y);
MOE_EP_API moe_ep_result moe_ep_combine_begin(moe_ep_context* ctx, moe_ep_plan* plan, const float* expert_out);
MOE_EP_API moe_ep_result moe_ep_combine_end(moe_ep_context* ctx, moe_ep_plan* plan, float* y);

/* The whole layer: route (or take routing), plan, dispatch, experts, combine. Collective: yes. */
MOE_EP_API moe_ep_result moe_ep_forward(moe_ep_context* ctx, const moe_ep_forward_args* args);

/* The shared experts on this rank's own tokens: out[t] = g_t * shared(x[t]), what forward adds
   to the routed sum (desc.shared). x, out: [tokens, d_model]. Collective: no. */
MOE_EP_API moe_ep_result moe_ep_shared_experts(moe_ep_context* ctx, const float* x, int64_t tokens, float* out);

/* The built-in expert FFN on rows of one expert, for tests and custom pipelines.
   Uses desc's d_model, d_ff, activation and thread count. Collective: no. */
MOE_EP_API moe_ep_result moe_ep_expert_ffn(moe_ep_context* ctx, int local_expert, const float* rows,
                                           int64_t row_count, float* out);

/* A family's layer with its transformers config's defaults: sizes, router, activation and
   shared expert width; weights, transport and the rest zero. Set what your config.json
   changes and the weights (README: "Model families" maps each field to its config key).
   An unknown family gives a zeroed desc. */
MOE_EP_API moe_ep_desc moe_ep_family_desc(moe_ep_family family);

/* The expert kernel that a context created now with the default desc.kernel runs on this
   CPU: "AVX-512", "AVX2+FMA", "NEON", "portable" or "CBLAS". A context's own is
   moe_ep_query(ctx).kernel; moe_ep_kernel_string() names it. */
MOE_EP_API const char* moe_ep_kernel_path(void);
MOE_EP_API const char* moe_ep_kernel_string(moe_ep_kernel kernel);

/* Bytes of expert weights this rank holds (routed and shared, in desc.weight_format, with
   their biases, int8 scales and panel padding). */
MOE_EP_API int64_t moe_ep_weight_bytes(const moe_ep_context* ctx);

/* The single-rank transport (what transport = NULL uses). */
MOE_EP_API moe_ep_transport moe_ep_single_rank_transport(void);

/* A logger that writes "moe_ep[rank] level: message" lines to stderr. */
MOE_EP_API void moe_ep_log_stderr(const char* tag, uint32_t level, uint32_t item, int rank, const char* message,
                                  void* user_data);

/* >>extension: for transport authors and headers built on the core (the GPU layer).
   The rules they share with the core, written once. */

/* Host memory through an allocator; NULL, or one with no alloc_fn, means malloc/free.
   moe_ep_alloc(a, 0) returns a valid 1-byte block (NULL only when out of memory). */
MOE_EP_API void* moe_ep_alloc(const moe_ep_allocator* allocator, size_t size);
MOE_EP_API void moe_ep_free(const moe_ep_allocator* allocator, void* ptr);

/* FNV-1a over bytes, 64 bits, for fingerprints: chain calls starting from MOE_EP_HASH_SEED. */
#define MOE_EP_HASH_SEED 14695981039346656037ull
MOE_EP_API uint64_t moe_ep_hash(uint64_t hash, const void* data, size_t size);

/* One step at which every rank of a transport must reach the same verdict: each rank
   sends its status and fact_count facts (fingerprints, sizes) to every other in one
   exchange_counts call, and every rank then returns
   - MOE_EP_ERROR_OUT_OF_STEP, on every rank, if a rank's step differs from this rank's
     (they are in different collectives, or one fell behind);
   - its own status, if that is not OK (the caller already holds the cause);
   - the transport's error, if the exchange failed;
   - on_peer_failure (default MOE_EP_ERROR_ABORTED) if another rank's status is not OK;
   - on_mismatch (default MOE_EP_ERROR_RANK_MISMATCH) if a rank's facts differ from this
     rank's, unless facts_may_differ (a vote: read them in peer_facts);
   - MOE_EP_OK otherwise.
   err_text (err_size bytes, may be NULL) gets the cause when the verdict is not this
   rank's own status, naming the stage, the rank and the fact. peer_status [world_size]
   and peer_facts [world_size * fact_count] (both optional) receive every rank's words
   when the exchange succeeded. Collective over `transport`: a rank that fails before
   this step must still call it, with its failure as status. Up to 64 ranks x 3 words
   use no heap. */
typedef struct moe_ep_agree_desc {
    const char* stage;              /* default "moe_ep_agree": names the step in err_text */
    moe_ep_result status;           /* this rank's verdict so far */
    int64_t step;                   /* default 0: this step's tag (kind and sequence number), compared */
    const int64_t* facts;           /* [fact_count] or NULL */
    int fact_count;                 /* >= 0 */
    const char* facts_name;         /* default "collective parameters": "rank 2 has other <facts_name>" */
    bool facts_may_differ;
    moe_ep_result on_peer_failure;  /* default MOE_EP_ERROR_ABORTED */
    moe_ep_result on_mismatch;      /* default MOE_EP_ERROR_RANK_MISMATCH */
    int64_t* peer_status;           /* optional out [world_size] */
    int64_t* peer_facts;            /* optional out [world_size * fact_count] */
    moe_ep_allocator allocator;     /* for the exchange's words beyond the stack; default malloc/free */
} moe_ep_agree_desc;

MOE_EP_API moe_ep_result moe_ep_agree(const moe_ep_transport* transport, const moe_ep_agree_desc* desc,
                                      char* err_text, size_t err_size);

#ifdef __cplusplus
}
#endif
#endif /* MOE_EP_H_INCLUDED */

/* ======================================================================== */
#ifdef MOE_EP_IMPLEMENTATION
#ifndef MOE_EP_IMPL_INCLUDED
#define MOE_EP_IMPL_INCLUDED

#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <stdarg.h>
#include <math.h>
#ifndef MOE_EP_ASSERT
#include <assert.h>
#define MOE_EP_ASSERT(c) assert(c)
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define MOE_EP_PRIVATE static
#define MOE_EP__DEF(value, def) ((value) == 0 ? (def) : (value))
#define MOE_EP__MIN(a, b) ((a) < (b) ? (a) : (b))
#define MOE_EP__MAX(a, b) ((a) > (b) ? (a) : (b))
#define MOE_EP__ERR_SIZE 512

/* >>same bits: the rules that make a build's output the same bits as every other build's.
   - Every a*b+c the library means is written as one moe_ep__fmaf, so it is fused (one
     rounding) on every target; no product feeds an addition otherwise unless the product
     is exact (a power-of-two scale), so a compiler that contracts (gcc's default outside
     ISO mode, clang with -ffp-contract=fast) finds nothing it could change.
   - No libm function whose result varies between libms: exp, sigmoid and GELU's erf are
     the library's own, built from +, -, *, /, fmaf and bit operations.
   - float arithmetic in float: FLT_EVAL_METHOD must be 0 (checked below). */
#include <float.h>
#if defined(FLT_EVAL_METHOD)
#define MOE_EP__EVAL_METHOD FLT_EVAL_METHOD
#elif defined(__TINYC__) && defined(__x86_64__)
#define MOE_EP__EVAL_METHOD 0       /* tcc's float.h does not say; on x86-64 it computes floats in SSE, as float */
#else
#define MOE_EP__EVAL_METHOD (-1)
#endif
#if !defined(MOE_EP_ALLOW_DIFFERENT_BITS)
#if defined(__FAST_MATH__)
#error "moe_ep.h: -ffast-math (or -Ofast) changes the library's arithmetic, so its output would differ from other builds'. Build without it, or define MOE_EP_ALLOW_DIFFERENT_BITS to accept outputs reproducible within this build only."
#endif
/* 16 and 32 (ISO/IEC TS 18661-3; gcc's GNU modes with AVX512-FP16): float is still float */
#if MOE_EP__EVAL_METHOD != 0 && MOE_EP__EVAL_METHOD != 16 && MOE_EP__EVAL_METHOD != 32
#error "moe_ep.h: FLT_EVAL_METHOD is not 0 (or not known) (floats are evaluated in a wider type: x87 without SSE2, or gcc in ISO mode on s390x), so the output would differ from other builds'. On x86 use -msse2 -mfpmath=sse; with gcc on s390x (or elsewhere) -fexcess-precision=fast; or define MOE_EP_ALLOW_DIFFERENT_BITS to accept outputs reproducible within this build only."
#endif
#endif
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF        /* restored at the end of the implementation */
#endif

/* fmaf where the hardware fuses (the compiler then emits one instruction), else in
   software: the product of two floats is exact in double, so the double sum is the exact
   sum rounded once; rounding it to float is right unless it fell on a float tie, and then
   TwoSum gives the sum's error and rounding the double to odd first makes the two
   roundings one (round-to-odd at 53 bits, then to 24). glibc's fmaf does the same, but
   behind a call that also saves and restores the floating-point environment. */
/* gcc and clang on x86: every kernel path is built and chosen at run time (>>kernel), and
   fmaf is the FMA instruction where the CPU has one (the same value as the software one). */
#if !defined(MOE_EP_NO_SIMD) && !defined(MOE_EP_CBLAS) && (defined(__x86_64__) || defined(__i386__)) && \
    !defined(__TINYC__) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 5))
#define MOE_EP__DISPATCH 1
#endif
#if defined(FP_FAST_FMAF) || defined(__FP_FAST_FMAF) || defined(__FMA__) || defined(__ARM_FEATURE_FMA) || \
    defined(__aarch64__) || defined(__s390x__) || (defined(__riscv) && defined(__riscv_flen))
#define MOE_EP__HW_FMA 1
#define moe_ep__fmaf fmaf
#else
MOE_EP_PRIVATE float moe_ep__fmaf_soft(float a, float b, float c) {
    double p = (double)a * (double)b, s = p + (double)c, bv, err;
    uint64_t u;
    memcpy(&u, &s, sizeof u);
    /* Rounding s to float rounds a second time wrongly only if s fell on a float tie (its
       29 low bits 1000...0) or below FLT_MIN (subnormal floats tie elsewhere): rare. */
    if ((u & 0x1FFFFFFFu) != 0x10000000u && (s >= FLT_MIN || s <= -FLT_MIN)) return (float)s;
    bv = s - p;
    err = (p - (s - bv)) + ((double)c - bv);
    if (err != 0.0 && err == err && !(u & 1u)) {    /* inexact and even: round to odd, toward the sum */
        u += (err > 0.0) == (s > 0.0) ? 1u : (uint64_t)-1;
        memcpy(&s, &u, sizeof s);
    }
    return (float)s;
}
#ifdef MOE_EP__DISPATCH
MOE_EP_PRIVATE __attribute__((target("fma"))) float moe_ep__fmaf_fma(float a, float b, float c) {
    return __builtin_fmaf(a, b, c);
}
/* The CPU model is read once by the compiler's runtime (at startup); this only tests a bit. */
MOE_EP_PRIVATE float moe_ep__fmaf(float a, float b, float c) {
    return __builtin_cpu_supports("fma") ? moe_ep__fmaf_fma(a, b, c) : moe_ep__fmaf_soft(a, b, c);
}
#else
#define moe_ep__fmaf moe_ep__fmaf_soft
#endif
#endif

/* exp(x) for x clamped to [-87, 88]: 2^n times a degree-6 polynomial in r = x - n ln2
   (Cephes expf), n rounded by adding 1.5 * 2^23 in the same fused multiply-add that forms
   x log2(e). The SIMD kernels' moe_ep__vexp is this, op for op. 2^n p is exact (normal). */
MOE_EP_PRIVATE float moe_ep__expf(float x) {
    float n, r, p, scale;
    uint32_t bits;
    x = x > -87.0f ? x : -87.0f;
    x = x < 88.0f ? x : 88.0f;
    n = moe_ep__fmaf(x, 1.44269504088896341f, 12582912.0f) - 12582912.0f;
    r = moe_ep__fmaf(-n, 0.693359375f, x);
    r = moe_ep__fmaf(-n, -2.12194440e-4f, r);
    p = 1.9875691500e-4f;
    p = moe_ep__fmaf(p, r, 1.3981999507e-3f);
    p = moe_ep__fmaf(p, r, 8.3334519073e-3f);
    p = moe_ep__fmaf(p, r, 4.1665795894e-2f);
    p = moe_ep__fmaf(p, r, 1.6666665459e-1f);
    p = moe_ep__fmaf(p, r, 5.0000001201e-1f);
    p = moe_ep__fmaf(p, r * r, r + 1.0f);
    bits = (uint32_t)((int32_t)n + 127) << 23;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

MOE_EP_PRIVATE float moe_ep__sigmoid(float x) { return 1.0f / (1.0f + moe_ep__expf(-x)); }

/* GELU (erf form): 0.5 a (1 + erf(a / sqrt 2)). With u = a / sqrt 2: for |u| < 1,
   1 + erf(u) = 1 + u P(u^2) in one fused step (P: a degree-6 Chebyshev fit of erf(u)/u,
   relative error 1.2e-9); for 1 <= |u| < 4.5, erfc(|u|) = exp(Q(|u| - 2.5)) (Q: a
   degree-9 fit of log erfc, absolute error 8e-9) and 1 + erf(u) is 2 - erfc(|u|) above
   zero, erfc(|u|) below; below -4.5, erfc(|u|) = exp(-u^2) exp(G(1/u^2)) / (|u| sqrt pi)
   (G: a degree-4 fit of what is left, error 1.7e-9), with u^2 = a^2 / 2 split exactly;
   above 4.5, 2; below -9.3 (GELU under 2^-126), 0. In the tails u's own rounding is put
   back (erfc is steep there). tests/bits/check_math.c measures it against erfc in double. */
MOE_EP_PRIVATE float moe_ep__gelu(float a) {
    float u = a * 0.70710678118654752f, au = u < 0.0f ? -u : u, one_plus_erf, p;
    if (au < 1.0f) {
        float z = u * u;
        p = 7.875874871e-05f;
        p = moe_ep__fmaf(p, z, -8.016864303e-04f);
        p = moe_ep__fmaf(p, z, 5.189087242e-03f);
        p = moe_ep__fmaf(p, z, -2.685421146e-02f);
        p = moe_ep__fmaf(p, z, 1.128359437e-01f);
        p = moe_ep__fmaf(p, z, -3.761262596e-01f);
        p = moe_ep__fmaf(p, z, 1.128379107e+00f);
        one_plus_erf = moe_ep__fmaf(u, p, 1.0f);
    } else if (au < 4.5f) {
        /* |u| - 2.5 with u's rounding error put back (1/sqrt 2 = 0.70710677f + 1.2101617e-8f),
           else erfc's steep tail turns u's half ulp into tens of ulp */
        float u_lo = moe_ep__fmaf(a, 1.2101617486e-08f, moe_ep__fmaf(a, 0.70710678118654752f, -u));
        float s = (au - 2.5f) + (u < 0.0f ? -u_lo : u_lo), erfc;
        p = -7.582681860e-08f;
        p = moe_ep__fmaf(p, s, 1.615581141e-06f);
        p = moe_ep__fmaf(p, s, -1.292569596e-05f);
        p = moe_ep__fmaf(p, s, 7.738760178e-05f);
        p = moe_ep__fmaf(p, s, -4.207916500e-04f);
        p = moe_ep__fmaf(p, s, 2.165169921e-03f);
        p = moe_ep__fmaf(p, s, -1.085811295e-02f);
        p = moe_ep__fmaf(p, s, -9.438936710e-01f);
        p = moe_ep__fmaf(p, s, -5.352680683e+00f);
        p = moe_ep__fmaf(p, s, -7.806815147e+00f);
        erfc = moe_ep__expf(p);
        one_plus_erf = u > 0.0f ? 2.0f - erfc : erfc;
    } else if (u < 0.0f && a * a < 172.98f) {
        float a2 = a * a, hi = 0.5f * a2, lo = 0.5f * moe_ep__fmaf(a, a, -a2), v = 1.0f / hi;  /* u^2 = hi + lo */
        p = 3.006287336e+00f;
        p = moe_ep__fmaf(p, v, -1.417121053e+00f);
        p = moe_ep__fmaf(p, v, 6.218317151e-01f);
        p = moe_ep__fmaf(p, v, -4.999609590e-01f);
        p = moe_ep__fmaf(p, v, -1.822325686e-07f);
        one_plus_erf = moe_ep__expf(-hi) * (moe_ep__expf(p - lo) / (au * 1.772453851f));
    } else {
        one_plus_erf = u > 0.0f ? 2.0f : u < 0.0f ? 0.0f : u;     /* u: NaN stays NaN */
    }
    return 0.5f * a * one_plus_erf;
}

/* log(x) in double for a normal x > 0 (the router statistics' log-sum-exp, x in [1, E]):
   x = 2^k m with m in [sqrt(1/2), sqrt(2)), f = m - 1 (exact), s = f / (2 + f), and
   log(m) = f - (f^2/2 - s (f^2/2 + R(s^2))) with fdlibm's polynomial R; k ln2 in two
   parts (k ln2_hi exact). Every product that feeds a sum is one fma(), the C library's
   correctly rounded one (C99 F.9.10.1), or exact, or an fma()'s addend (which no
   compiler contracts), so the bits are the same everywhere; within
   2 ulp of libm's log, 1 seen (tests/bits/check_math.c). */
MOE_EP_PRIVATE double moe_ep__log(double x) {
    const double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
    double m, f, s, z, p, hf, r, dk;
    uint64_t u;
    int k;
    memcpy(&u, &x, sizeof u);
    k = (int)(u >> 52 & 0x7FFu) - 1023;
    u = (u & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull;    /* m in [1, 2) */
    if (u > 0x3FF6A09E667F3BCCull) {                             /* m > sqrt(2): halve it */
        u -= 0x0010000000000000ull;
        ++k;
    }
    memcpy(&m, &u, sizeof m);
    f = m - 1.0;
    s = f / (2.0 + f);
    z = s * s;
    p = fma(fma(fma(fma(fma(fma(1.479819860511658591e-01, z, 1.531383769920937332e-01), z,
                            1.818357216161805012e-01), z, 2.222219843214978396e-01), z, 2.857142874366239149e-01),
                z, 3.999999999940941908e-01), z, 6.666666666666735130e-01);
    hf = 0.5 * f;
    dk = (double)k;
    r = fma(s, fma(z, p, hf * f), dk * ln2_lo);                 /* s (f^2/2 + R) + k ln2_lo */
    return dk * ln2_hi - (fma(hf, f, -r) - f);
}

struct moe_ep_context {
    moe_ep_desc desc;               /* resolved */
    moe_ep_transport transport;
    int rank, world_size, num_threads;
    int local_experts, max_local_experts;
    int d_ff_full;                  /* desc.d_ff as given; desc.d_ff is this rank's TP slice */
    int tp_rank, tp_size, ff_begin;
    moe_ep_transport tp_transport;
    int* owner_of;                  /* [E] */
    int* local_index_of;            /* [E] */
    int* rank_expert_count;         /* [R] */
    int* rank_expert_start;         /* [R+1] offsets into rank_expert_list */
    int* rank_expert_list;          /* [E] experts sorted by (owner, id) */
    int* placement_table;           /* [E] copy of desc.placement.table or NULL */
    float* router_t;                /* [d_model, E] desc.router_weight transposed, or NULL */
    float* router_bias;             /* [E] copy of desc.router_bias or NULL */
    float* selection_bias;          /* [E] copy of desc.selection_bias or NULL */
    const struct moe_ep__path* path;     /* the CPU kernel (>>paths) */
    void** packed_up;               /* [local] w1 (and w3) panels, in desc.weight_format */
    void** packed_down;             /* [local] w2 panels */
    const float** bias_up;          /* [local] b1 (and b3) in panel order, inside packed_up; NULL: none */
    const float** bias_down;        /* [local] b2 in panel order, inside packed_down; NULL: none */
    const float** scale_up;         /* [local] int8: the scales in panel order, inside packed_up; else NULL */
    const float** scale_down;
    int64_t weight_bytes;           /* packed_up and packed_down's bytes (moe_ep_weight_bytes) */
    float* hidden;                  /* kernel workspaces (raw allocations, aligned on use) */
    int64_t hidden_capacity;        /* floats */
    float* kernel_scratch;
    int64_t kernel_scratch_capacity;
    float* kernel_rows;
    int64_t kernel_rows_capacity;
    float* recv_rows;               /* forward workspaces */
    float* expert_out;
    int64_t recv_capacity;
    int32_t* topk_idx;
    float* topk_weight;
    int64_t routing_capacity;
    moe_ep_result experts_status;   /* a failure of moe_ep_experts, for the next combine to tell the peers */
    int64_t sequence;               /* collectives of this context so far: the same on every rank in step */
    moe_ep_context* shared;         /* the shared experts: a single-rank context of one expert, or NULL */
    float* shared_gate;             /* [d_model] copy of desc.shared.gate or NULL */
    float* shared_out;              /* forward's workspace for the shared experts' output */
    int64_t shared_capacity;        /* floats */
    moe_ep_log_item last_error_item;
    char last_error[MOE_EP__ERR_SIZE];
};

struct moe_ep_plan {
    moe_ep_context* ctx;
    moe_ep_allocator allocator;     /* the context's, kept: a plan may be destroyed after its context */
    int64_t tokens;
    int top_k, segments;
    int64_t capacity;
    int64_t send_rows, recv_rows;
    int64_t* send_counts;           /* [R] */
    int64_t* recv_counts;           /* [R] */
    int64_t* seg_send_counts;       /* [R*S] */
    int64_t* seg_send_offsets;      /* [R*S] */
    int64_t* seg_recv_counts;       /* [R*S] */
    int64_t* seg_recv_offsets;      /* [R*S] */
    int64_t* local_expert_counts;   /* [S] */
    int64_t* local_expert_offsets;  /* [S] */
    int64_t* expert_counts;         /* [E] */
    int64_t* expert_kept;           /* [E] */
    int64_t* permutation;           /* [send_rows] */
    int64_t* slot_row;              /* [T*k] send row of (t, j), -1 if dropped */
    float* topk_weight;             /* [T*k] the combine's weights: a copy, or 1 with scale_expert_input */
    float* row_scale;               /* [send_rows] scale_expert_input: each send row's weight, or NULL */
    float* send_buffer;             /* [send_rows, d] */
    void* request;                  /* split-phase handle */
    int pending;                    /* 0 none, 1 dispatch, 2 combine */
    int blocking;                   /* inside moe_ep_dispatch / moe_ep_combine: use the blocking exchange */
    int x_kept;                     /* inside moe_ep_forward: x stays unchanged until dispatch_end */
    float* combine_y;               /* a blocking combine's y: summed as the rows arrive (row_lists) */
    int combined;                   /* the transport's recv_done_fn summed y */
    const float** row_at;           /* [send_rows] where each returning row arrived (row_lists) */
    moe_ep_result status;           /* a failed dispatch: the combine tells every rank */
    moe_ep_a2a_args args;
};

/* >>results */
MOE_EP_API const char* moe_ep_result_string(moe_ep_result result) {
    static const char* const strings[] = {
#define MOE_EP__RESULT_STRING(name, text) text,
        MOE_EP_RESULT_LIST(MOE_EP__RESULT_STRING)
#undef MOE_EP__RESULT_STRING
    };
    if ((int)result < 0 || result >= MOE_EP_RESULT_COUNT) return "unknown result code";
    return strings[result];
}

MOE_EP_API const char* moe_ep_version(void) { return MOE_EP_VERSION_STRING; }

/* >>memory */
MOE_EP_API void* moe_ep_alloc(const moe_ep_allocator* allocator, size_t size) {
    if (size == 0) size = 1;
    if (allocator && allocator->alloc_fn) return allocator->alloc_fn(size, allocator->user_data);
    return malloc(size);
}

MOE_EP_API void moe_ep_free(const moe_ep_allocator* allocator, void* ptr) {
    if (!ptr) return;
    if (allocator && allocator->free_fn) allocator->free_fn(ptr, allocator->user_data);
    else free(ptr);
}

/* size = count * each, or 0 on overflow (callers treat 0 for a non-zero count as out of memory). */
MOE_EP_PRIVATE void* moe_ep__calloc(const moe_ep_allocator* allocator, int64_t count, size_t each) {
    void* ptr;
    size_t size;
    if (count < 0 || (count > 0 && (uint64_t)count > (uint64_t)(SIZE_MAX / each))) return NULL;
    size = (size_t)count * each;
    ptr = moe_ep_alloc(allocator, size);
    if (ptr) memset(ptr, 0, size == 0 ? 1 : size);
    return ptr;
}

/* >>logging */
MOE_EP_API const char* moe_ep_log_item_string(moe_ep_log_item item) {
    static const char* const names[] = {
#define MOE_EP__LOG_ITEM_NAME(name) #name,
        MOE_EP_LOG_ITEM_LIST(MOE_EP__LOG_ITEM_NAME)
#undef MOE_EP__LOG_ITEM_NAME
    };
    if ((int)item < 0 || item >= MOE_EP_LOG_ITEM_COUNT) return "unknown log item";
    return names[item];
}

MOE_EP_API void moe_ep_log_stderr(const char* tag, uint32_t level, uint32_t item, int rank, const char* message,
                                  void* user_data) {
    static const char* const levels[] = { "panic", "error", "warning", "info" };
    (void)user_data;
    if (item != MOE_EP_LOG_ITEM_NONE && strcmp(tag, "moe_ep") == 0)
        fprintf(stderr, "%s[%d] %s [%s]: %s\n", tag, rank, level < 4 ? levels[level] : "log",
                moe_ep_log_item_string((moe_ep_log_item)item), message);
    else
        fprintf(stderr, "%s[%d] %s: %s\n", tag, rank, level < 4 ? levels[level] : "log", message);
}

MOE_EP_PRIVATE void moe_ep__vlog(const moe_ep_logger* logger, int rank, moe_ep_log_item item, const char* fmt,
                                 va_list ap, char* keep, size_t keep_size) {
    char text[MOE_EP__ERR_SIZE];
    vsnprintf(text, sizeof text, fmt, ap);
    if (keep) {
        size_t n = strlen(text);
        if (n >= keep_size) n = keep_size - 1;
        memcpy(keep, text, n);
        keep[n] = '\0';
    }
    if (logger && logger->func) logger->func("moe_ep", 1, (uint32_t)item, rank, text, logger->user_data);
}

/* Records the cause (item and words) on the context and logs it; returns `result` for
   `return moe_ep__fail(...)`. */
MOE_EP_PRIVATE moe_ep_result moe_ep__fail(moe_ep_context* ctx, moe_ep_result result, moe_ep_log_item item,
                                          const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    moe_ep__vlog(&ctx->desc.logger, ctx->rank, item, fmt, ap, ctx->last_error, sizeof ctx->last_error);
    va_end(ap);
    ctx->last_error_item = item;
    return result;
}

/* The same before a context exists. */
MOE_EP_PRIVATE void moe_ep__keep_create_error(const moe_ep_desc* desc, const char* text);
MOE_EP_PRIVATE moe_ep_result moe_ep__fail_desc(const moe_ep_desc* desc, int rank, moe_ep_result result,
                                               moe_ep_log_item item, const char* fmt, ...) {
    char text[MOE_EP__ERR_SIZE];
    va_list ap;
    va_start(ap, fmt);
    moe_ep__vlog(desc ? &desc->logger : NULL, rank, item, fmt, ap, text, sizeof text);
    va_end(ap);
    moe_ep__keep_create_error(desc, text);
    return result;
}

/* A transport error: keep the transport's own text beside ours. */
MOE_EP_PRIVATE moe_ep_result moe_ep__transport_fail(moe_ep_context* ctx, moe_ep_result result, const char* what,
                                                    const char* err_text) {
    return moe_ep__fail(ctx, result, MOE_EP_LOG_ITEM_TRANSPORT_FAILED, "%s: transport '%s' failed: %s%s%s", what,
                        ctx->transport.name ? ctx->transport.name : "?", moe_ep_result_string(result),
                        err_text[0] ? ": " : "", err_text);
}

/* `count` buffers of `need` elements that share one capacity counter, grown together. */
MOE_EP_PRIVATE moe_ep_result moe_ep__grow(moe_ep_context* ctx, void** buffer, int64_t* capacity, int64_t need,
                                          size_t each, int count) {
    int i;
    if (need <= *capacity) return MOE_EP_OK;
    for (i = 0; i < count; ++i) {
        void* fresh = moe_ep__calloc(&ctx->desc.allocator, need, each);
        if (!fresh) return moe_ep__fail(ctx, MOE_EP_ERROR_OUT_OF_MEMORY, MOE_EP_LOG_ITEM_OUT_OF_MEMORY,
                                        "out of memory for %lld rows of workspace",
                                        (long long)need);
        moe_ep_free(&ctx->desc.allocator, buffer[i]);
        buffer[i] = fresh;
    }
    *capacity = need;
    return MOE_EP_OK;
}

/* >>agreement: the one protocol behind every "all ranks reach the same verdict" step. */
MOE_EP_API uint64_t moe_ep_hash(uint64_t hash, const void* data, size_t size) {
    const unsigned char* p = (const unsigned char*)data;
    size_t i;
    for (i = 0; i < size; ++i) { hash ^= p[i]; hash *= 1099511628211ull; }
    return hash;
}

MOE_EP_PRIVATE void moe_ep__text(char* err_text, size_t err_size, const char* fmt, ...) {
    va_list ap;
    if (!err_text || err_size == 0) return;
    va_start(ap, fmt);
    vsnprintf(err_text, err_size, fmt, ap);
    va_end(ap);
}

/* The verdict from every rank's words ([status, step, facts...] per rank), as moe_ep_agree
   states it. Ranks at different steps hold words that mean different things: that comes
   first, and every rank sees it, whatever its own status. */
MOE_EP_PRIVATE moe_ep_result moe_ep__verdict(const moe_ep_agree_desc* a, int rank, int world_size,
                                             const int64_t* words, char* err_text, size_t err_size,
                                             moe_ep_log_item* item) {
    const char* stage = a->stage ? a->stage : "moe_ep_agree";
    int W = 2 + a->fact_count, p, j;
    for (p = 0; p < world_size; ++p)
        if (words[(size_t)p * W + 1] != a->step) {
            moe_ep__text(err_text, err_size, "%s: rank %d is in another collective (step %llx there, %llx here): "
                         "a rank skipped a collective or entered another", stage, p,
                         (unsigned long long)words[(size_t)p * W + 1], (unsigned long long)a->step);
            *item = MOE_EP_LOG_ITEM_OUT_OF_STEP;
            return MOE_EP_ERROR_OUT_OF_STEP;
        }
    if (a->status != MOE_EP_OK) return a->status;
    for (p = 0; p < world_size; ++p)
        if (words[(size_t)p * W] != MOE_EP_OK) {
            moe_ep__text(err_text, err_size, "%s: rank %d failed (%s)", stage, p,
                         moe_ep_result_string((moe_ep_result)words[(size_t)p * W]));
            *item = MOE_EP_LOG_ITEM_PEER_FAILED;
            return a->on_peer_failure ? a->on_peer_failure : MOE_EP_ERROR_ABORTED;
        }
    if (a->facts_may_differ) return MOE_EP_OK;
    for (p = 0; p < world_size; ++p)
        for (j = 0; j < a->fact_count; ++j)
            if (words[(size_t)p * W + 2 + j] != a->facts[j]) {
                moe_ep__text(err_text, err_size, "%s: rank %d has other %s than rank %d (fact %d: %lld there, %lld here)",
                             stage, p, a->facts_name ? a->facts_name : "collective parameters", rank, j,
                             (long long)words[(size_t)p * W + 2 + j], (long long)a->facts[j]);
                *item = MOE_EP_LOG_ITEM_RANK_MISMATCH;
                return a->on_mismatch ? a->on_mismatch : MOE_EP_ERROR_RANK_MISMATCH;
            }
    return MOE_EP_OK;
}

/* moe_ep_agree, and the log item of a verdict that is not this rank's own status.
   steps (optional out [world_size]): every rank's step, when the exchange succeeded. */
MOE_EP_PRIVATE moe_ep_result moe_ep__agree_item(const moe_ep_transport* t, const moe_ep_agree_desc* a, char* err_text,
                                                size_t err_size, moe_ep_log_item* item, int64_t* steps) {
    int64_t stack_words[384];
    int64_t* words = stack_words;
    char text[MOE_EP__ERR_SIZE] = "";
    moe_ep_result res;
    int R, W, p, j;
    if (!t || !a || !t->exchange_counts || t->world_size <= 0 || a->fact_count < 0 || (a->fact_count > 0 && !a->facts)) {
        moe_ep__text(err_text, err_size, "moe_ep_agree: needs a transport with exchange_counts, and fact_count facts");
        return a && a->status != MOE_EP_OK ? a->status : MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    R = t->world_size;
    W = 2 + a->fact_count;
    if ((size_t)2 * R * W > sizeof stack_words / sizeof stack_words[0]) {
        words = (int64_t*)moe_ep_alloc(&a->allocator, sizeof(int64_t) * 2 * (size_t)R * (size_t)W);
        /* Without words this rank cannot take part: it tells the peers (skip) where it can. */
        if (!words) {
            moe_ep__text(err_text, err_size, "%s: out of memory", a->stage ? a->stage : "moe_ep_agree");
            *item = MOE_EP_LOG_ITEM_OUT_OF_MEMORY;
            if (t->skip) t->skip(t->impl, MOE_EP_ERROR_OUT_OF_MEMORY);
            return a->status != MOE_EP_OK ? a->status : MOE_EP_ERROR_OUT_OF_MEMORY;
        }
    }
    for (p = 0; p < R; ++p) {
        words[(size_t)p * W] = (int64_t)a->status;
        words[(size_t)p * W + 1] = a->step;
        for (j = 0; j < a->fact_count; ++j) words[(size_t)p * W + 2 + j] = a->facts[j];
    }
    res = t->exchange_counts(t->impl, words, words + (size_t)R * W, W, text, sizeof text);
    if (res != MOE_EP_OK) {
        /* out of step at the transport: every rank's verdict, whatever its own status */
        bool out_of_step = res == MOE_EP_ERROR_OUT_OF_STEP;
        *item = out_of_step ? MOE_EP_LOG_ITEM_OUT_OF_STEP : MOE_EP_LOG_ITEM_TRANSPORT_FAILED;
        if (a->status == MOE_EP_OK || out_of_step)
            moe_ep__text(err_text, err_size, "%s: transport '%s' failed: %s%s%s", a->stage ? a->stage : "moe_ep_agree",
                         t->name ? t->name : "?", moe_ep_result_string(res), text[0] ? ": " : "", text);
        if (a->status != MOE_EP_OK && !out_of_step) res = a->status;
    } else {
        const int64_t* got = words + (size_t)R * W;
        for (p = 0; p < R; ++p) {
            if (a->peer_status) a->peer_status[p] = got[(size_t)p * W];
            if (steps) steps[p] = got[(size_t)p * W + 1];
            for (j = 0; a->peer_facts && j < a->fact_count; ++j)
                a->peer_facts[(size_t)p * a->fact_count + j] = got[(size_t)p * W + 2 + j];
        }
        res = moe_ep__verdict(a, t->rank, R, got, err_text, err_size, item);
    }
    if (words != stack_words) moe_ep_free(&a->allocator, words);
    return res;
}

MOE_EP_API moe_ep_result moe_ep_agree(const moe_ep_transport* t, const moe_ep_agree_desc* a, char* err_text,
                                      size_t err_size) {
    moe_ep_log_item item = MOE_EP_LOG_ITEM_NONE;
    return moe_ep__agree_item(t, a, err_text, err_size, &item, NULL);
}

/* >>single-rank transport */
MOE_EP_PRIVATE moe_ep_result moe_ep__single_exchange(void* impl, const int64_t* send, int64_t* recv, int count,
                                                     char* err_text, size_t err_size) {
    (void)impl; (void)err_text; (void)err_size;
    memmove(recv, send, (size_t)count * sizeof *send);
    return MOE_EP_OK;
}

MOE_EP_PRIVATE moe_ep_result moe_ep__single_a2a(void* impl, const moe_ep_a2a_args* args, char* err_text,
                                                size_t err_size) {
    int s;
    (void)impl;
    for (s = 0; s < args->segments; ++s) {
        int64_t rows = args->send_counts[s];
        if (rows != args->recv_counts[s]) {
            if (err_text) snprintf(err_text, err_size, "segment %d: sends %lld rows, expects %lld", s,
                                   (long long)rows, (long long)args->recv_counts[s]);
            return MOE_EP_ERROR_TRANSPORT;
        }
        if (rows > 0)
            memcpy((char*)args->recv + (size_t)args->recv_offsets[s] * args->row_bytes,
                   (const char*)args->send + (size_t)args->send_offsets[s] * args->row_bytes,
                   (size_t)rows * args->row_bytes);
    }
    return MOE_EP_OK;
}

MOE_EP_API moe_ep_transport moe_ep_single_rank_transport(void) {
    moe_ep_transport t;
    memset(&t, 0, sizeof t);
    t.name = "single";
    t.rank = 0;
    t.world_size = 1;
    t.local_ranks = 1;
    t.exchange_counts = moe_ep__single_exchange;
    t.all_to_all_v = moe_ep__single_a2a;
    return t;
}

/* >>placement */
/* The owner of expert e, or -1 if the placement is invalid. */
MOE_EP_PRIVATE int moe_ep__owner_of(const moe_ep_placement* placement, int num_experts, int world_size, int e) {
    moe_ep_placement_kind kind = placement ? placement->kind : MOE_EP_PLACEMENT_DEFAULT;
    if (kind == MOE_EP_PLACEMENT_TABLE) {
        int r = placement->table ? placement->table[e] : -1;
        return r >= 0 && r < world_size ? r : -1;
    }
    if (kind == MOE_EP_PLACEMENT_ROUND_ROBIN) return e % world_size;
    if (kind == MOE_EP_PLACEMENT_DEFAULT || kind == MOE_EP_PLACEMENT_CONTIGUOUS) {
        /* The first E % R ranks hold base + 1 experts, the rest base. */
        int base = num_experts / world_size, extra = num_experts % world_size;
        int split = extra * (base + 1);
        return e < split ? e / (base + 1) : extra + (e - split) / (base > 0 ? base : 1);
    }
    return -1;
}

MOE_EP_API moe_ep_result moe_ep_placement_compute(const moe_ep_placement* placement, int num_experts,
                                                  int world_size, int* owner_of) {
    int e;
    if (num_experts <= 0 || world_size <= 0 || !owner_of) return MOE_EP_ERROR_INVALID_ARGUMENT;
    for (e = 0; e < num_experts; ++e)
        if (moe_ep__owner_of(placement, num_experts, world_size, e) < 0) return MOE_EP_ERROR_INVALID_ARGUMENT;
    for (e = 0; e < num_experts; ++e) owner_of[e] = moe_ep__owner_of(placement, num_experts, world_size, e);
    return MOE_EP_OK;
}

MOE_EP_API int moe_ep_expert_owner(const moe_ep_context* ctx, int expert) {
    if (!ctx || expert < 0 || expert >= ctx->desc.num_experts) return -1;
    return ctx->owner_of[expert];
}

MOE_EP_API int moe_ep_expert_local_index(const moe_ep_context* ctx, int expert) {
    if (!ctx || expert < 0 || expert >= ctx->desc.num_experts) return -1;
    return ctx->local_index_of[expert];
}

MOE_EP_API int moe_ep_rank_expert_count(const moe_ep_context* ctx, int rank) {
    if (!ctx || rank < 0 || rank >= ctx->world_size) return -1;
    return ctx->rank_expert_count[rank];
}

MOE_EP_API int moe_ep_rank_experts(const moe_ep_context* ctx, int rank, int* experts, int max) {
    int i, n;
    if (!ctx || rank < 0 || rank >= ctx->world_size) return -1;
    n = ctx->rank_expert_count[rank];
    for (i = 0; i < n && i < max && experts; ++i) experts[i] = ctx->rank_expert_list[ctx->rank_expert_start[rank] + i];
    return n;
}

/* >>families */
MOE_EP_API moe_ep_desc moe_ep_family_desc(moe_ep_family family) {
    moe_ep_desc d;
    memset(&d, 0, sizeof d);
    d.activation = MOE_EP_ACTIVATION_SWIGLU;
    switch (family) {
    case MOE_EP_FAMILY_MIXTRAL:         /* hidden_size, intermediate_size, num_local_experts, num_experts_per_tok */
        d.d_model = 4096; d.d_ff = 14336; d.num_experts = 8; d.top_k = 2;
        d.normalize_topk = true;        /* Mixtral always renormalises */
        break;
    case MOE_EP_FAMILY_QWEN2_MOE:       /* moe_intermediate_size, num_experts, shared_expert_intermediate_size */
        d.d_model = 2048; d.d_ff = 1408; d.num_experts = 60; d.top_k = 4;
        d.normalize_topk = false;       /* norm_topk_prob */
        d.shared.d_ff = 5632;           /* and its gate: shared_expert_gate.weight */
        break;
    case MOE_EP_FAMILY_QWEN3_MOE:
        d.d_model = 2048; d.d_ff = 768; d.num_experts = 128; d.top_k = 8;
        d.normalize_topk = false;       /* norm_topk_prob: False by default, True in the published checkpoints */
        break;
    case MOE_EP_FAMILY_DEEPSEEK_V3:     /* n_routed_experts, n_group, topk_group, routed_scaling_factor */
        d.d_model = 7168; d.d_ff = 2048; d.num_experts = 256; d.top_k = 8;
        d.scoring = MOE_EP_SCORING_SIGMOID;
        d.normalize_topk = true;
        d.num_groups = 8; d.topk_groups = 4; d.routed_scaling_factor = 2.5f;
        d.shared.d_ff = 1 * 2048;       /* n_shared_experts * moe_intermediate_size */
        break;                          /* selection_bias: the gate's e_score_correction_bias */
    case MOE_EP_FAMILY_GPT_OSS:         /* router bias: router.bias */
        d.d_model = 2880; d.d_ff = 2880; d.num_experts = 128; d.top_k = 4;
        d.scoring = MOE_EP_SCORING_TOPK_SOFTMAX;
        d.activation = MOE_EP_ACTIVATION_SWIGLU_CLAMPED;     /* alpha 1.702, limit 7 */
        d.weight_layout = MOE_EP_WEIGHT_LAYOUT_GPT_OSS;      /* experts.gate_up_proj[e], down_proj[e] as they are */
        break;
    case MOE_EP_FAMILY_LLAMA4:          /* Llama-4 text: the routing weight scales the expert's input */
        d.d_model = 5120; d.d_ff = 8192; d.num_experts = 16; d.top_k = 1;
        d.scoring = MOE_EP_SCORING_TOPK_SIGMOID;
        d.scale_expert_input = true;
        d.weight_layout = MOE_EP_WEIGHT_LAYOUT_LLAMA4;       /* experts.gate_up_proj[e], down_proj[e] as they are */
        d.shared.d_ff = 8192;           /* intermediate_size */
        break;
    default:
        memset(&d, 0, sizeof d);
        break;
    }
    return d;
}

/* A weight format's element size and name. */
MOE_EP_PRIVATE int64_t moe_ep__format_bytes(moe_ep_weight_format f) {
    return f == MOE_EP_WEIGHT_FORMAT_INT8 ? 1 : f == MOE_EP_WEIGHT_FORMAT_BF16 || f == MOE_EP_WEIGHT_FORMAT_FP16 ? 2 : 4;
}

MOE_EP_PRIVATE const char* moe_ep__format_name(moe_ep_weight_format f) {
    switch (f) {
    case MOE_EP_WEIGHT_FORMAT_BF16: return "bf16";
    case MOE_EP_WEIGHT_FORMAT_FP16: return "fp16";
    case MOE_EP_WEIGHT_FORMAT_INT8: return "int8";
    default: return "fp32";
    }
}

/* The CPU kernel paths live with the kernels (>>paths). */
MOE_EP_PRIVATE const struct moe_ep__path* moe_ep__select_path(moe_ep_kernel kernel, const char** why);
MOE_EP_PRIVATE const struct moe_ep__path* moe_ep__select_path_for(moe_ep_kernel kernel, moe_ep_arithmetic arithmetic,
                                                                  const char** why);
MOE_EP_PRIVATE const char* moe_ep__kernel_name(moe_ep_kernel kernel);
#ifndef MOE_EP_CBLAS
MOE_EP_PRIVATE moe_ep_kernel moe_ep__path_kernel(const struct moe_ep__path* path);
#endif

/* >>defaults: the one place where zero becomes a value. */
MOE_EP_PRIVATE moe_ep_desc moe_ep__desc_defaults(const moe_ep_desc* in) {
    moe_ep_desc d = *in;
    d.top_k = MOE_EP__DEF(d.top_k, 1);
    d.activation = MOE_EP__DEF(d.activation, MOE_EP_ACTIVATION_SWIGLU);
    d.swiglu_alpha = MOE_EP__DEF(d.swiglu_alpha, 1.702f);
    d.swiglu_limit = MOE_EP__DEF(d.swiglu_limit, 7.0f);
    d.weight_layout = MOE_EP__DEF(d.weight_layout, MOE_EP_WEIGHT_LAYOUT_SEPARATE);
    d.weight_format = MOE_EP__DEF(d.weight_format, MOE_EP_WEIGHT_FORMAT_FP32);
    d.arithmetic = MOE_EP__DEF(d.arithmetic, MOE_EP_ARITHMETIC_EXACT);
    d.scoring = MOE_EP__DEF(d.scoring, MOE_EP_SCORING_SOFTMAX);
    d.routed_scaling_factor = MOE_EP__DEF(d.routed_scaling_factor, 1.0f);
    d.num_groups = MOE_EP__DEF(d.num_groups, 1);
    d.topk_groups = MOE_EP__DEF(d.topk_groups, d.num_groups);
    d.placement.kind = MOE_EP__DEF(d.placement.kind, MOE_EP_PLACEMENT_CONTIGUOUS);
    return d;
}

/* >>validation: every failing rule is logged; the first becomes the last-error text. */
typedef struct moe_ep__validator {
    const moe_ep_desc* desc;
    int rank;
    int failures;
    char first[MOE_EP__ERR_SIZE];
} moe_ep__validator;

/* Keeps a create failure's text in desc.create_error, if the caller gave one and it is still empty. */
MOE_EP_PRIVATE void moe_ep__keep_create_error(const moe_ep_desc* desc, const char* text) {
    size_t n;
    if (!desc || !desc->create_error || desc->create_error_size == 0 || desc->create_error[0]) return;
    n = strlen(text);
    if (n >= desc->create_error_size) n = desc->create_error_size - 1;
    memcpy(desc->create_error, text, n);
    desc->create_error[n] = '\0';
}

MOE_EP_PRIVATE void moe_ep__check(moe_ep__validator* v, bool ok, moe_ep_log_item item, const char* fmt, ...) {
    va_list ap;
    if (ok) return;
    va_start(ap, fmt);
    moe_ep__vlog(&v->desc->logger, v->rank, item, fmt, ap, v->failures == 0 ? v->first : NULL, sizeof v->first);
    va_end(ap);
    if (v->failures == 0) moe_ep__keep_create_error(v->desc, v->first);
    v->failures++;
}

MOE_EP_PRIVATE bool moe_ep__finite(float value) { return value == value && value <= 3.4e38f && value >= -3.4e38f; }

MOE_EP_PRIVATE void moe_ep__validate_bias(const moe_ep_desc* d, const float* bias, const char* name,
                                          moe_ep__validator* v) {
    int e;
    for (e = 0; bias && e < d->num_experts; ++e)
        if (!moe_ep__finite(bias[e])) {
            moe_ep__check(v, false, MOE_EP_LOG_ITEM_DESC_BIAS_NOT_FINITE,
                          "moe_ep_desc.%s[%d] (%g) must be finite", name, e, (double)bias[e]);
            break;
        }
}

/* The router's rules: scoring, scaling, biases and expert groups. */
MOE_EP_PRIVATE void moe_ep__validate_router(const moe_ep_desc* d, moe_ep__validator* v) {
    int E = d->num_experts, G = d->num_groups;
    moe_ep__check(v, d->scoring > 0 && d->scoring < MOE_EP_SCORING_COUNT,
                  MOE_EP_LOG_ITEM_DESC_SCORING, "moe_ep_desc.scoring (%d) is not a moe_ep_scoring", (int)d->scoring);
    moe_ep__check(v, moe_ep__finite(d->routed_scaling_factor) && d->routed_scaling_factor > 0.0f,
                  MOE_EP_LOG_ITEM_DESC_ROUTED_SCALING_FACTOR,
                  "moe_ep_desc.routed_scaling_factor (%g) must be 0 (meaning 1) or finite and > 0",
                  (double)d->routed_scaling_factor);
    if (E > 0) {
        moe_ep__validate_bias(d, d->router_bias, "router_bias", v);
        moe_ep__validate_bias(d, d->selection_bias, "selection_bias", v);
    }
    moe_ep__check(v, G > 0 && (E <= 0 || E % G == 0), MOE_EP_LOG_ITEM_DESC_NUM_GROUPS,
                  "moe_ep_desc.num_groups (%d) must divide num_experts (%d)", G, E);
    moe_ep__check(v, d->topk_groups > 0 && d->topk_groups <= G, MOE_EP_LOG_ITEM_DESC_TOPK_GROUPS,
                  "moe_ep_desc.topk_groups (%d) must be in [1, num_groups (%d)]", d->topk_groups, G);
    if (G > 0 && E > 0 && E % G == 0 && d->topk_groups > 0 && d->topk_groups <= G)
        moe_ep__check(v, d->top_k <= d->topk_groups * (E / G), MOE_EP_LOG_ITEM_DESC_TOP_K_ABOVE_GROUPS,
                      "moe_ep_desc.top_k (%d) must be <= the %d experts that topk_groups (%d) groups of %d hold",
                      d->top_k, d->topk_groups * (E / G), d->topk_groups, E / G);
}

/* The shared experts' rules: a width, the weights its activation needs, a finite gate. */
MOE_EP_PRIVATE void moe_ep__validate_shared(const moe_ep_desc* d, moe_ep__validator* v) {
    const moe_ep_shared_desc* sh = &d->shared;
    bool gated = d->activation == MOE_EP_ACTIVATION_SWIGLU || d->activation == MOE_EP_ACTIVATION_SWIGLU_CLAMPED;
    int i;
    moe_ep__check(v, sh->d_ff >= 0, MOE_EP_LOG_ITEM_DESC_SHARED_D_FF, "moe_ep_desc.shared.d_ff (%d) must be >= 0",
                  sh->d_ff);
    if (sh->d_ff <= 0) return;
    moe_ep__check(v, sh->weights.w1 && sh->weights.w2 && (!gated || sh->weights.w3),
                  MOE_EP_LOG_ITEM_DESC_SHARED_WEIGHTS_NULL, "moe_ep_desc.shared.weights: w1, w2%s must not be NULL",
                  gated ? " and w3" : "");
    for (i = 0; sh->gate && i < d->d_model; ++i)
        if (!moe_ep__finite(sh->gate[i])) {
            moe_ep__check(v, false, MOE_EP_LOG_ITEM_DESC_SHARED_GATE_NOT_FINITE,
                          "moe_ep_desc.shared.gate[%d] (%g) must be finite", i, (double)sh->gate[i]);
            break;
        }
}

/* The weight format and the kernel path: known, and runnable by this build and CPU. */
MOE_EP_PRIVATE void moe_ep__validate_kernel(const moe_ep_desc* d, moe_ep__validator* v) {
    const char* why = "";
    moe_ep__check(v, (int)d->weight_format > 0 && d->weight_format < MOE_EP_WEIGHT_FORMAT_COUNT,
                  MOE_EP_LOG_ITEM_DESC_WEIGHT_FORMAT,
                  "moe_ep_desc.weight_format (%d) is not a moe_ep_weight_format", (int)d->weight_format);
#ifdef MOE_EP_CBLAS
    moe_ep__check(v, d->weight_format == MOE_EP_WEIGHT_FORMAT_FP32 || d->expert_fn,
                  MOE_EP_LOG_ITEM_DESC_WEIGHT_FORMAT,
                  "moe_ep_desc.weight_format (%s) must be fp32 in a MOE_EP_CBLAS build (sgemm reads fp32 weights)",
                  moe_ep__format_name(d->weight_format));
    moe_ep__check(v, d->kernel == MOE_EP_KERNEL_DEFAULT || d->kernel == MOE_EP_KERNEL_CBLAS,
                  MOE_EP_LOG_ITEM_DESC_KERNEL,
                  "moe_ep_desc.kernel (%d) must be DEFAULT or CBLAS in a MOE_EP_CBLAS build", (int)d->kernel);
    moe_ep__check(v, d->arithmetic == MOE_EP_ARITHMETIC_EXACT, MOE_EP_LOG_ITEM_DESC_ARITHMETIC,
                  "moe_ep_desc.arithmetic (%d) must be DEFAULT or EXACT in a MOE_EP_CBLAS build", (int)d->arithmetic);
    (void)why;
#else
    bool known = (int)d->arithmetic > 0 && d->arithmetic < MOE_EP_ARITHMETIC_COUNT;
    moe_ep__check(v, known, MOE_EP_LOG_ITEM_DESC_ARITHMETIC,
                  "moe_ep_desc.arithmetic (%d) is not a moe_ep_arithmetic", (int)d->arithmetic);
    moe_ep__check(v, d->arithmetic != MOE_EP_ARITHMETIC_BF16_DOT || d->weight_format == MOE_EP_WEIGHT_FORMAT_BF16,
                  MOE_EP_LOG_ITEM_DESC_ARITHMETIC,
                  "moe_ep_desc.arithmetic BF16_DOT needs weight_format bf16 (it is %s)",
                  moe_ep__format_name(d->weight_format));
    moe_ep__check(v, (int)d->kernel >= 0 && d->kernel < MOE_EP_KERNEL_COUNT, MOE_EP_LOG_ITEM_DESC_KERNEL,
                  "moe_ep_desc.kernel (%d) is not a moe_ep_kernel", (int)d->kernel);
    if ((int)d->kernel >= 0 && d->kernel < MOE_EP_KERNEL_COUNT && known) {
        bool runs = moe_ep__select_path_for(d->kernel, d->arithmetic, &why) != NULL;   /* sets why first */
        moe_ep__check(v, runs, MOE_EP_LOG_ITEM_DESC_KERNEL, "moe_ep_desc.kernel (%s) cannot run here: %s",
                      moe_ep__kernel_name(d->kernel), why);
    }
#endif
}

MOE_EP_PRIVATE int moe_ep__validate_desc(const moe_ep_desc* d, const moe_ep_transport* t, moe_ep__validator* v) {
    moe_ep__check(v, d->d_model > 0, MOE_EP_LOG_ITEM_DESC_D_MODEL, "moe_ep_desc.d_model (%d) must be > 0", d->d_model);
    moe_ep__check(v, d->d_ff > 0 || (d->d_ff == 0 && d->expert_fn), MOE_EP_LOG_ITEM_DESC_D_FF,
                  "moe_ep_desc.d_ff (%d) must be > 0", d->d_ff);
    moe_ep__check(v, d->num_experts > 0, MOE_EP_LOG_ITEM_DESC_NUM_EXPERTS,
                  "moe_ep_desc.num_experts (%d) must be > 0", d->num_experts);
    moe_ep__check(v, d->top_k > 0, MOE_EP_LOG_ITEM_DESC_TOP_K, "moe_ep_desc.top_k (%d) must be > 0", d->top_k);
    moe_ep__check(v, d->num_experts <= 0 || d->top_k <= d->num_experts,
                  MOE_EP_LOG_ITEM_DESC_TOP_K_ABOVE_EXPERTS,
                  "moe_ep_desc.top_k (%d) must be <= num_experts (%d)", d->top_k, d->num_experts);
    moe_ep__check(v, d->activation > 0 && d->activation < MOE_EP_ACTIVATION_COUNT,
                  MOE_EP_LOG_ITEM_DESC_ACTIVATION,
                  "moe_ep_desc.activation (%d) is not a moe_ep_activation", (int)d->activation);
    moe_ep__check(v, moe_ep__finite(d->swiglu_alpha) && d->swiglu_alpha > 0.0f, MOE_EP_LOG_ITEM_DESC_SWIGLU_ALPHA,
                  "moe_ep_desc.swiglu_alpha (%g) must be finite and > 0", (double)d->swiglu_alpha);
    moe_ep__check(v, moe_ep__finite(d->swiglu_limit) && d->swiglu_limit > 0.0f, MOE_EP_LOG_ITEM_DESC_SWIGLU_LIMIT,
                  "moe_ep_desc.swiglu_limit (%g) must be finite and > 0", (double)d->swiglu_limit);
    moe_ep__check(v, d->weight_layout > 0 && d->weight_layout < MOE_EP_WEIGHT_LAYOUT_COUNT,
                  MOE_EP_LOG_ITEM_DESC_WEIGHT_LAYOUT,
                  "moe_ep_desc.weight_layout (%d) is not a moe_ep_weight_layout", (int)d->weight_layout);
    moe_ep__validate_kernel(d, v);
    moe_ep__validate_router(d, v);
    moe_ep__validate_shared(d, v);
    moe_ep__check(v, d->capacity_factor >= 0.0f && d->capacity_factor <= 1e6f,
                  MOE_EP_LOG_ITEM_DESC_CAPACITY_FACTOR,
                  "moe_ep_desc.capacity_factor (%g) must be 0 (dropless) or in (0, 1e6]", (double)d->capacity_factor);
    moe_ep__check(v, d->placement.kind > 0 && d->placement.kind < MOE_EP_PLACEMENT_COUNT,
                  MOE_EP_LOG_ITEM_DESC_PLACEMENT_KIND,
                  "moe_ep_desc.placement.kind (%d) is not a moe_ep_placement_kind", (int)d->placement.kind);
    moe_ep__check(v, d->placement.kind != MOE_EP_PLACEMENT_TABLE || d->placement.table,
                  MOE_EP_LOG_ITEM_DESC_PLACEMENT_TABLE_MISSING,
                  "moe_ep_desc.placement.table must be set when placement.kind is TABLE");
    if (d->placement.kind == MOE_EP_PLACEMENT_TABLE && d->placement.table && t->world_size > 0) {
        int e;
        for (e = 0; e < d->num_experts; ++e) {
            int r = d->placement.table[e];
            moe_ep__check(v, r >= 0 && r < t->world_size,
                          MOE_EP_LOG_ITEM_DESC_PLACEMENT_TABLE_RANK,
                          "moe_ep_desc.placement.table[%d] (%d) must be a rank in [0, %d)", e, r, t->world_size);
            if (r < 0 || r >= t->world_size) break;
        }
    }
    moe_ep__check(v, d->num_threads >= 0 && d->num_threads <= MOE_EP_MAX_THREADS, MOE_EP_LOG_ITEM_DESC_NUM_THREADS,
                  "moe_ep_desc.num_threads (%d) must be in [0, %d] (0: OpenMP's default)", d->num_threads,
                  MOE_EP_MAX_THREADS);
    moe_ep__check(v, (d->allocator.alloc_fn == NULL) == (d->allocator.free_fn == NULL),
                  MOE_EP_LOG_ITEM_DESC_ALLOCATOR_HALF,
                  "moe_ep_desc.allocator: set both alloc_fn and free_fn, or neither");
    moe_ep__check(v, t->world_size > 0 && t->rank >= 0 && t->rank < t->world_size,
                  MOE_EP_LOG_ITEM_DESC_TRANSPORT_RANK,
                  "moe_ep_desc.transport: rank (%d) must be in [0, world_size (%d))", t->rank, t->world_size);
    moe_ep__check(v, t->exchange_counts && t->all_to_all_v,
                  MOE_EP_LOG_ITEM_DESC_TRANSPORT_REQUIRED_CALLBACKS,
                  "moe_ep_desc.transport: exchange_counts and all_to_all_v are required");
    moe_ep__check(v, (t->all_to_all_v_begin == NULL) == (t->all_to_all_v_end == NULL),
                  MOE_EP_LOG_ITEM_DESC_TRANSPORT_SPLIT_PHASE_HALF,
                  "moe_ep_desc.transport: set both all_to_all_v_begin and all_to_all_v_end, or neither");
    if (d->tp_transport) {
        const moe_ep_transport* tp = d->tp_transport;
        moe_ep__check(v, tp->world_size > 0 && tp->rank >= 0 && tp->rank < tp->world_size,
                      MOE_EP_LOG_ITEM_DESC_TP_TRANSPORT_RANK,
                      "moe_ep_desc.tp_transport: rank (%d) must be in [0, world_size (%d))", tp->rank, tp->world_size);
        moe_ep__check(v, tp->all_reduce_sum != NULL, MOE_EP_LOG_ITEM_DESC_TP_TRANSPORT_ALL_REDUCE,
                      "moe_ep_desc.tp_transport: all_reduce_sum is required");
        moe_ep__check(v, tp->world_size <= 0 || d->d_ff >= tp->world_size,
                      MOE_EP_LOG_ITEM_DESC_TP_D_FF,
                      "moe_ep_desc.d_ff (%d) must be >= the tensor-parallel size (%d)", d->d_ff, tp->world_size);
        moe_ep__check(v, !d->expert_fn || tp->world_size == 1,
                      MOE_EP_LOG_ITEM_DESC_TP_EXPERT_FN,
                      "moe_ep_desc.expert_fn cannot be combined with tp_transport (the callback gets whole experts)");
    }
    return v->failures;
}

MOE_EP_PRIVATE int64_t moe_ep__fingerprint(const moe_ep_context* ctx) {
    const moe_ep_desc* d = &ctx->desc;
    int32_t fields[16];
    uint64_t h = MOE_EP_HASH_SEED;
    fields[0] = d->d_model; fields[1] = ctx->d_ff_full; fields[2] = d->num_experts; fields[3] = d->top_k;
    fields[4] = (int32_t)d->activation; fields[5] = (int32_t)d->scoring; fields[6] = d->normalize_topk;
    fields[7] = ctx->world_size; fields[8] = ctx->tp_size; fields[9] = d->num_groups; fields[10] = d->topk_groups;
    fields[11] = d->scale_expert_input; fields[12] = d->router_bias != NULL; fields[13] = d->selection_bias != NULL;
    fields[14] = d->shared.d_ff; fields[15] = d->shared.gate != NULL;
    h = moe_ep_hash(h, fields, sizeof fields);
    h = moe_ep_hash(h, &d->capacity_factor, sizeof d->capacity_factor);
    h = moe_ep_hash(h, &d->routed_scaling_factor, sizeof d->routed_scaling_factor);
    h = moe_ep_hash(h, &d->swiglu_alpha, sizeof d->swiglu_alpha);
    h = moe_ep_hash(h, &d->swiglu_limit, sizeof d->swiglu_limit);
    h = moe_ep_hash(h, &d->weight_format, sizeof d->weight_format);
    h = moe_ep_hash(h, &d->arithmetic, sizeof d->arithmetic);
    if (d->router_bias) h = moe_ep_hash(h, d->router_bias, sizeof(float) * (size_t)d->num_experts);
    if (d->selection_bias) h = moe_ep_hash(h, d->selection_bias, sizeof(float) * (size_t)d->num_experts);
    h = moe_ep_hash(h, ctx->owner_of, sizeof(int) * (size_t)d->num_experts);
    h &= 0x7FFFFFFFFFFFFFFFull;
    return h == 0 ? 1 : (int64_t)h;
}

/* The expert kernel is the header's last section (>>kernel); the pipeline needs these two,
   and the view of the user's weights it packs from. */
typedef struct moe_ep__wview {
    const void* base;               /* element (i, k) at index i * row_stride + k * k_stride of base */
    moe_ep_weight_format format;    /* base's elements: FP32 (the user's floats) or the stored format */
    int64_t row_stride, k_stride;
    const float* bias;              /* bias i at bias[i * bias_stride]; NULL: none */
    const float* scale;             /* int8 stored: scale i at scale[i * bias_stride]; else NULL */
    int64_t bias_stride;
    int64_t k_begin, k_full;        /* the view's k = 0 in the user's whole row, and that row's length */
    const char* name;               /* "w1", "w3", "w2" */
} moe_ep__wview;

/* One of an expert's tensors: the user's floats, or the stored elements of `format`. */
typedef struct moe_ep__wtensor {
    const void* data;
    moe_ep_weight_format format;
    const float* bias;
    const float* scale;
    const char* name;
} moe_ep__wtensor;

MOE_EP_PRIVATE moe_ep__wtensor moe_ep__wtensor_of(const float* fp32, const void* stored, moe_ep_weight_format format,
                                                const float* bias, const float* scale, const char* name) {
    moe_ep__wtensor t;
    t.data = stored ? stored : (const void*)fp32;
    t.format = stored ? format : MOE_EP_WEIGHT_FORMAT_FP32;
    t.bias = bias;
    t.scale = stored ? scale : NULL;
    t.name = name;
    return t;
}

/* The view of tensor t from element `offset` and bias (and scale) `channel` on. */
MOE_EP_PRIVATE moe_ep__wview moe_ep__view(moe_ep__wtensor t, int64_t offset, int64_t row_stride, int64_t k_stride,
                                          int64_t channel, int64_t bias_stride, int64_t k_full) {
    moe_ep__wview v;
    v.base = t.data ? (const void*)((const unsigned char*)t.data + offset * moe_ep__format_bytes(t.format)) : NULL;
    v.format = t.format;
    v.row_stride = row_stride;
    v.k_stride = k_stride;
    v.bias = t.bias ? t.bias + channel : NULL;
    v.scale = t.scale ? t.scale + channel : NULL;
    v.bias_stride = bias_stride;
    v.k_begin = 0;
    v.k_full = k_full;
    v.name = t.name;
    return v;
}

/* The activations that read w3 (the up projection) and pair it with w1 in one panel. */
MOE_EP_PRIVATE bool moe_ep__gated(moe_ep_activation act) {
    return act == MOE_EP_ACTIVATION_SWIGLU || act == MOE_EP_ACTIVATION_SWIGLU_CLAMPED;
}

MOE_EP_PRIVATE moe_ep_result moe_ep__pack_expert(moe_ep_context* ctx, int l, moe_ep__validator* v);
MOE_EP_PRIVATE moe_ep_result moe_ep__ffn(moe_ep_context* ctx, int local_expert, const float* rows, int64_t m,
                                         float* out);

/* >>create */
MOE_EP_PRIVATE void moe_ep__context_free(moe_ep_context* ctx) {
    const moe_ep_allocator a = ctx->desc.allocator;
    int l;
    if (ctx->packed_up)
        for (l = 0; l < ctx->local_experts; ++l) moe_ep_free(&a, ctx->packed_up[l]);
    if (ctx->packed_down)
        for (l = 0; l < ctx->local_experts; ++l) moe_ep_free(&a, ctx->packed_down[l]);
    moe_ep_free(&a, ctx->packed_up);
    moe_ep_free(&a, ctx->packed_down);
    moe_ep_free(&a, (void*)ctx->bias_up);
    moe_ep_free(&a, (void*)ctx->bias_down);
    moe_ep_free(&a, (void*)ctx->scale_up);
    moe_ep_free(&a, (void*)ctx->scale_down);
    moe_ep_free(&a, ctx->owner_of);
    moe_ep_free(&a, ctx->local_index_of);
    moe_ep_free(&a, ctx->rank_expert_count);
    moe_ep_free(&a, ctx->rank_expert_start);
    moe_ep_free(&a, ctx->rank_expert_list);
    moe_ep_free(&a, ctx->placement_table);
    moe_ep_free(&a, ctx->router_t);
    moe_ep_free(&a, ctx->router_bias);
    moe_ep_free(&a, ctx->selection_bias);
    moe_ep_destroy(ctx->shared);
    moe_ep_free(&a, ctx->shared_gate);
    moe_ep_free(&a, ctx->shared_out);
    moe_ep_free(&a, ctx->hidden);
    moe_ep_free(&a, ctx->kernel_scratch);
    moe_ep_free(&a, ctx->kernel_rows);
    moe_ep_free(&a, ctx->recv_rows);
    moe_ep_free(&a, ctx->expert_out);
    moe_ep_free(&a, ctx->topk_idx);
    moe_ep_free(&a, ctx->topk_weight);
    moe_ep_free(&a, ctx);
}

MOE_EP_PRIVATE moe_ep_result moe_ep__build_placement(moe_ep_context* ctx) {
    const moe_ep_allocator* a = &ctx->desc.allocator;
    int E = ctx->desc.num_experts, R = ctx->world_size, e, r;
    ctx->owner_of = (int*)moe_ep__calloc(a, E, sizeof(int));
    ctx->local_index_of = (int*)moe_ep__calloc(a, E, sizeof(int));
    ctx->rank_expert_count = (int*)moe_ep__calloc(a, R, sizeof(int));
    ctx->rank_expert_start = (int*)moe_ep__calloc(a, R + 1, sizeof(int));
    ctx->rank_expert_list = (int*)moe_ep__calloc(a, E, sizeof(int));
    if (!ctx->owner_of || !ctx->local_index_of || !ctx->rank_expert_count || !ctx->rank_expert_start ||
        !ctx->rank_expert_list)
        return MOE_EP_ERROR_OUT_OF_MEMORY;
    if (ctx->desc.placement.kind == MOE_EP_PLACEMENT_TABLE) {
        ctx->placement_table = (int*)moe_ep__calloc(a, E, sizeof(int));
        if (!ctx->placement_table) return MOE_EP_ERROR_OUT_OF_MEMORY;
        memcpy(ctx->placement_table, ctx->desc.placement.table, sizeof(int) * (size_t)E);
        ctx->desc.placement.table = ctx->placement_table;
    } else {
        ctx->desc.placement.table = NULL;
    }
    if (moe_ep_placement_compute(&ctx->desc.placement, E, R, ctx->owner_of) != MOE_EP_OK)
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    for (e = 0; e < E; ++e) ctx->local_index_of[e] = ctx->rank_expert_count[ctx->owner_of[e]]++;
    for (r = 0; r < R; ++r) {
        ctx->rank_expert_start[r + 1] = ctx->rank_expert_start[r] + ctx->rank_expert_count[r];
        ctx->max_local_experts = MOE_EP__MAX(ctx->max_local_experts, ctx->rank_expert_count[r]);
    }
    MOE_EP_ASSERT(ctx->rank_expert_start[R] == E);
    for (e = 0; e < E; ++e)
        ctx->rank_expert_list[ctx->rank_expert_start[ctx->owner_of[e]] + ctx->local_index_of[e]] = e;
    ctx->local_experts = ctx->rank_expert_count[ctx->rank];
    return MOE_EP_OK;
}

/* The router's weights and biases are the caller's: keep copies, as of the placement table;
   the weights transposed ([d_model, E]) so that the router's loop runs over experts in vectors. */
MOE_EP_PRIVATE moe_ep_result moe_ep__copy_router(moe_ep_context* ctx) {
    const moe_ep_allocator* a = &ctx->desc.allocator;
    size_t size = sizeof(float) * (size_t)ctx->desc.num_experts;
    int64_t E = ctx->desc.num_experts, D = ctx->desc.d_model, e, i;
    if (ctx->desc.router_weight) {
        ctx->router_t = (float*)moe_ep__calloc(a, E * D, sizeof(float));
        if (!ctx->router_t) return MOE_EP_ERROR_OUT_OF_MEMORY;
        for (e = 0; e < E; ++e)
            for (i = 0; i < D; ++i) ctx->router_t[i * E + e] = ctx->desc.router_weight[e * D + i];
    }
    if (ctx->desc.router_bias) {
        ctx->router_bias = (float*)moe_ep_alloc(a, size);
        if (!ctx->router_bias) return MOE_EP_ERROR_OUT_OF_MEMORY;
        memcpy(ctx->router_bias, ctx->desc.router_bias, size);
        ctx->desc.router_bias = ctx->router_bias;
    }
    if (ctx->desc.selection_bias) {
        ctx->selection_bias = (float*)moe_ep_alloc(a, size);
        if (!ctx->selection_bias) return MOE_EP_ERROR_OUT_OF_MEMORY;
        memcpy(ctx->selection_bias, ctx->desc.selection_bias, size);
        ctx->desc.selection_bias = ctx->selection_bias;
    }
    return MOE_EP_OK;
}

MOE_EP_PRIVATE moe_ep_result moe_ep__pack_experts(moe_ep_context* ctx, moe_ep__validator* v) {
    const moe_ep_allocator* a = &ctx->desc.allocator;
    moe_ep_result res = MOE_EP_OK;
    int l;
    ctx->packed_up = (void**)moe_ep__calloc(a, ctx->local_experts, sizeof(void*));
    ctx->packed_down = (void**)moe_ep__calloc(a, ctx->local_experts, sizeof(void*));
    ctx->bias_up = (const float**)moe_ep__calloc(a, ctx->local_experts, sizeof(float*));
    ctx->bias_down = (const float**)moe_ep__calloc(a, ctx->local_experts, sizeof(float*));
    ctx->scale_up = (const float**)moe_ep__calloc(a, ctx->local_experts, sizeof(float*));
    ctx->scale_down = (const float**)moe_ep__calloc(a, ctx->local_experts, sizeof(float*));
    if (!ctx->packed_up || !ctx->packed_down || !ctx->bias_up || !ctx->bias_down || !ctx->scale_up ||
        !ctx->scale_down)
        return MOE_EP_ERROR_OUT_OF_MEMORY;
    for (l = 0; l < ctx->local_experts && res == MOE_EP_OK; ++l) res = moe_ep__pack_expert(ctx, l, v);
    return res;
}

/* Where one expert's tensors are, as the kernel's packer reads them: element (i, k) of the
   nn.Linear-shaped [n, k] weight is base[i * row_stride + k * k_stride], bias i is
   bias[i * bias_stride]. This rank's TP slice (d_ff rows [ff_begin, ff_begin + desc.d_ff) of
   gate and up, those columns of down) and every weight layout are only offsets and strides,
   so the packer reads the user's tensors as they are. b2 is added on TP rank 0 only: the
   partial outputs are summed in TP-rank order, so it is added once and always in the same
   place. */
MOE_EP_PRIVATE const moe_ep_expert_weights* moe_ep__local_weights(const moe_ep_context* ctx, int l) {
    const moe_ep_desc* d = &ctx->desc;
    if (d->experts_count == d->num_experts)     /* by global id (the same on one rank) */
        return &d->experts[ctx->rank_expert_list[ctx->rank_expert_start[ctx->rank] + l]];
    return &d->experts[l];
}

MOE_EP_PRIVATE void moe_ep__expert_views(const moe_ep_context* ctx, int l, moe_ep__wview* gate, moe_ep__wview* up,
                                         moe_ep__wview* down) {
    const moe_ep_desc* d = &ctx->desc;
    const moe_ep_expert_weights* w = moe_ep__local_weights(ctx, l);
    int64_t D = d->d_model, F = ctx->d_ff_full, f0 = ctx->ff_begin;
    moe_ep_weight_format f = d->weight_format;
    moe_ep__wtensor w1 = moe_ep__wtensor_of(w->w1, w->w1_stored, f, w->b1, w->w1_scale, "w1");
    moe_ep__wtensor w3 = moe_ep__wtensor_of(w->w3, w->w3_stored, f, w->b3, w->w3_scale, "w3");
    moe_ep__wtensor w2 = moe_ep__wtensor_of(w->w2, w->w2_stored, f, ctx->tp_rank == 0 ? w->b2 : NULL, w->w2_scale,
                                          "w2");
    switch (d->weight_layout) {
    case MOE_EP_WEIGHT_LAYOUT_FUSED_GATE_UP:
        *gate = moe_ep__view(w1, f0 * D, D, 1, f0, 1, D);
        *up = moe_ep__view(w1, (F + f0) * D, D, 1, F + f0, 1, D);
        *down = moe_ep__view(w2, f0, F, 1, 0, 1, F);
        break;
    case MOE_EP_WEIGHT_LAYOUT_GPT_OSS:
        *gate = moe_ep__view(w1, 2 * f0, 2, 2 * F, 2 * f0, 2, D);
        *up = moe_ep__view(w1, 2 * f0 + 1, 2, 2 * F, 2 * f0 + 1, 2, D);
        *down = moe_ep__view(w2, f0 * D, 1, D, 0, 1, F);
        break;
    case MOE_EP_WEIGHT_LAYOUT_LLAMA4:
        *gate = moe_ep__view(w1, f0, 1, 2 * F, f0, 1, D);
        *up = moe_ep__view(w1, F + f0, 1, 2 * F, F + f0, 1, D);
        *down = moe_ep__view(w2, f0 * D, 1, D, 0, 1, F);
        break;
    default:
        *gate = moe_ep__view(w1, f0 * D, D, 1, f0, 1, D);
        *up = moe_ep__view(w3, f0 * D, D, 1, f0, 1, D);
        *down = moe_ep__view(w2, f0, F, 1, 0, 1, F);
        break;
    }
    down->k_begin = f0;             /* this TP rank's columns of w2 */
}

/* >>steps: every collective of the core carries its kind and the context's sequence number,
   so that a rank in another collective, or one that fell behind, is an error on every rank. */
enum {
    MOE_EP__STEP_CREATE = 1, MOE_EP__STEP_PLAN, MOE_EP__STEP_FORWARD, MOE_EP__STEP_COMBINE,
    MOE_EP__STEP_DISPATCH_ROWS, MOE_EP__STEP_COMBINE_ROWS
};
#define MOE_EP__STEP_SEQUENCE_MASK ((((int64_t)1) << 40) - 1)

MOE_EP_PRIVATE int64_t moe_ep__step(const moe_ep_context* ctx, int kind) {
    return ((int64_t)kind << 40) | (ctx->sequence & MOE_EP__STEP_SEQUENCE_MASK);
}

/* After a collective: the next number. Ranks that saw every rank's step (steps != NULL)
   take the largest plus one, so ranks that were out of step are in step again. */
MOE_EP_PRIVATE void moe_ep__step_done(moe_ep_context* ctx, const int64_t* steps) {
    int64_t next = ctx->sequence & MOE_EP__STEP_SEQUENCE_MASK;
    int p;
    for (p = 0; steps && p < ctx->world_size; ++p)
        if ((steps[p] & MOE_EP__STEP_SEQUENCE_MASK) > next) next = steps[p] & MOE_EP__STEP_SEQUENCE_MASK;
    ctx->sequence = (next + 1) & MOE_EP__STEP_SEQUENCE_MASK;
}

/* A stage's verdict over the EP group: OK only if every rank reported OK; otherwise the
   local cause, or ABORTED naming the first failed peer (kept as the last error). */
MOE_EP_PRIVATE moe_ep_result moe_ep__agree(moe_ep_context* ctx, moe_ep_result local, const char* stage, int kind) {
    moe_ep_agree_desc a;
    moe_ep_log_item item = MOE_EP_LOG_ITEM_NONE;
    char err[MOE_EP__ERR_SIZE] = "";
    int64_t stack_steps[64];
    int64_t* steps = ctx->world_size <= 64 ? stack_steps
                   : (int64_t*)moe_ep__calloc(&ctx->desc.allocator, ctx->world_size, sizeof(int64_t));
    moe_ep_result res;
    int p;
    memset(&a, 0, sizeof a);
    a.stage = stage;
    a.status = local;
    a.step = moe_ep__step(ctx, kind);
    a.allocator = ctx->desc.allocator;
    for (p = 0; steps && p < ctx->world_size; ++p) steps[p] = a.step;
    res = moe_ep__agree_item(&ctx->transport, &a, err, sizeof err, &item, steps);
    moe_ep__step_done(ctx, steps);
    if (steps != stack_steps) moe_ep_free(&ctx->desc.allocator, steps);
    if (res != local) moe_ep__fail(ctx, res, item, "%s", err);
    return res;
}

/* create, step 2: the context of a desc that passed validation, with its TP slice. */
MOE_EP_PRIVATE moe_ep_result moe_ep__context_alloc(const moe_ep_desc* d, const moe_ep_transport* t,
                                                   moe_ep_context** out) {
    moe_ep_context* ctx = (moe_ep_context*)moe_ep__calloc(&d->allocator, 1, sizeof *ctx);
    const char* why;
    if (!ctx) return moe_ep__fail_desc(d, t->rank, MOE_EP_ERROR_OUT_OF_MEMORY, MOE_EP_LOG_ITEM_OUT_OF_MEMORY,
                                       "out of memory for the context");
    ctx->desc = *d;
    ctx->desc.transport = NULL;
    ctx->desc.create_error = NULL;  /* the caller's buffer is create's alone */
    ctx->desc.create_error_size = 0;
    ctx->transport = *t;
    ctx->rank = t->rank;
    ctx->world_size = t->world_size;
    ctx->d_ff_full = d->d_ff;
    ctx->tp_size = 1;
#ifdef MOE_EP_CBLAS
    ctx->path = moe_ep__select_path(MOE_EP_KERNEL_PORTABLE, &why);     /* the router's */
    ctx->desc.kernel = MOE_EP_KERNEL_CBLAS;
#else
    ctx->path = moe_ep__select_path_for(d->kernel, d->arithmetic, &why);   /* validated: not NULL */
    ctx->desc.kernel = moe_ep__path_kernel(ctx->path);
#endif
    if (d->tp_transport) {
        ctx->tp_transport = *d->tp_transport;
        ctx->tp_rank = d->tp_transport->rank;
        ctx->tp_size = d->tp_transport->world_size;
        ctx->desc.tp_transport = NULL;
        /* rank t of T computes d_ff rows [t*F/T, (t+1)*F/T) */
        ctx->ff_begin = (int)((int64_t)d->d_ff * ctx->tp_rank / ctx->tp_size);
        ctx->desc.d_ff = (int)((int64_t)d->d_ff * (ctx->tp_rank + 1) / ctx->tp_size) - ctx->ff_begin;
    }
    *out = ctx;
    return MOE_EP_OK;
}

MOE_EP_PRIVATE int moe_ep__default_threads(int num_threads, const moe_ep_transport* t) {
    if (num_threads > 0) return num_threads;
#ifdef _OPENMP
    num_threads = omp_get_max_threads() / (t->local_ranks > 0 ? t->local_ranks : 1);
#else
    (void)t;
#endif
    return MOE_EP__MAX(num_threads, 1);
}

/* The shared experts, as a single-rank context of one expert (the same
   kernel, activation and threads), and the gate's copy. */
MOE_EP_PRIVATE moe_ep_result moe_ep__shared_create(moe_ep_context* ctx) {
    const moe_ep_desc* d = &ctx->desc;
    moe_ep_desc sd;
    moe_ep_result res;
    if (d->shared.d_ff <= 0) return MOE_EP_OK;
    memset(&sd, 0, sizeof sd);
    sd.d_model = d->d_model;
    sd.d_ff = d->shared.d_ff;
    sd.num_experts = 1;
    sd.top_k = 1;
    sd.activation = d->activation;
    sd.swiglu_alpha = d->swiglu_alpha;
    sd.swiglu_limit = d->swiglu_limit;
    sd.weight_layout = MOE_EP_WEIGHT_LAYOUT_SEPARATE;   /* shared experts come as separate tensors */
    sd.weight_format = d->weight_format;
    sd.arithmetic = d->arithmetic;
#ifndef MOE_EP_CBLAS
    sd.kernel = d->kernel;
#endif
    sd.num_threads = moe_ep__default_threads(d->num_threads, &ctx->transport);
    sd.experts = &d->shared.weights;
    sd.allocator = d->allocator;
    sd.logger = d->logger;
    res = moe_ep_create(&sd, &ctx->shared);
    if (res == MOE_EP_OK && d->shared.gate) {
        ctx->shared_gate = (float*)moe_ep_alloc(&d->allocator, sizeof(float) * (size_t)d->d_model);
        if (!ctx->shared_gate) return MOE_EP_ERROR_OUT_OF_MEMORY;
        memcpy(ctx->shared_gate, d->shared.gate, sizeof(float) * (size_t)d->d_model);
    }
    memset(&ctx->desc.shared.weights, 0, sizeof ctx->desc.shared.weights);
    ctx->desc.shared.gate = ctx->shared_gate;
    return res;
}

/* Weights handed in stored: each tensor once, for a format other than fp32, and int8's
   scales there, finite and > 0 (each one the kernel reads: this rank's TP slice). */
MOE_EP_PRIVATE void moe_ep__validate_stored(const moe_ep_context* ctx, int l, moe_ep__validator* v) {
    const moe_ep_desc* d = &ctx->desc;
    const moe_ep_expert_weights* w = moe_ep__local_weights(ctx, l);
    const void* stored[3];
    const float* fp32[3];
    const float* scales[3];
    static const char* const names[3] = { "w1", "w3", "w2" };
    moe_ep__wview views[3];
    int e = (int)(w - d->experts), t, n[3];
    int64_t i;
    stored[0] = w->w1_stored; stored[1] = w->w3_stored; stored[2] = w->w2_stored;
    fp32[0] = w->w1; fp32[1] = w->w3; fp32[2] = w->w2;
    scales[0] = w->w1_scale; scales[1] = w->w3_scale; scales[2] = w->w2_scale;
    for (t = 0; t < 3; ++t) {
        moe_ep__check(v, !(stored[t] && fp32[t]), MOE_EP_LOG_ITEM_DESC_EXPERT_WEIGHTS_STORED,
                      "moe_ep_desc.experts[%d]: give %s or %s_stored, not both", e, names[t], names[t]);
        moe_ep__check(v, !stored[t] || d->weight_format != MOE_EP_WEIGHT_FORMAT_FP32,
                      MOE_EP_LOG_ITEM_DESC_EXPERT_WEIGHTS_STORED,
                      "moe_ep_desc.experts[%d].%s_stored needs a weight_format other than fp32 (fp32 goes in %s)",
                      e, names[t], names[t]);
        moe_ep__check(v, !scales[t] || (stored[t] && d->weight_format == MOE_EP_WEIGHT_FORMAT_INT8),
                      MOE_EP_LOG_ITEM_DESC_EXPERT_SCALE,
                      "moe_ep_desc.experts[%d].%s_scale is read only with %s_stored and the int8 weight_format",
                      e, names[t], names[t]);
        moe_ep__check(v, !stored[t] || d->weight_format != MOE_EP_WEIGHT_FORMAT_INT8 || scales[t],
                      MOE_EP_LOG_ITEM_DESC_EXPERT_SCALE,
                      "moe_ep_desc.experts[%d].%s_scale must hold the scales of %s_stored (int8: one per output "
                      "channel)", e, names[t], names[t]);
    }
    if (v->failures || d->weight_format != MOE_EP_WEIGHT_FORMAT_INT8) return;
    moe_ep__expert_views(ctx, l, &views[0], &views[1], &views[2]);
    n[0] = n[1] = d->d_ff;
    n[2] = d->d_model;
    for (t = 0; t < 3; ++t)
        for (i = 0; views[t].scale && i < n[t]; ++i) {
            float s = views[t].scale[i * views[t].bias_stride];
            if (!(s > 0.0f) || !moe_ep__finite(s)) {
                const float* base = scales[views[t].name[1] == '1' ? 0 : views[t].name[1] == '3' ? 1 : 2];
                moe_ep__check(v, false, MOE_EP_LOG_ITEM_DESC_EXPERT_SCALE,
                              "moe_ep_desc.experts[%d].%s_scale[%lld] (%g) must be finite and > 0", e, views[t].name,
                              (long long)(views[t].scale - base + i * views[t].bias_stride), (double)s);
                return;
            }
        }
}

/* create, step 3: placement, then this rank's expert weights checked and packed. */
MOE_EP_PRIVATE moe_ep_result moe_ep__context_fill(moe_ep_context* ctx, moe_ep__validator* v) {
    const moe_ep_desc* d = &ctx->desc;
    moe_ep_result res = moe_ep__build_placement(ctx);
    int l;
    if (res == MOE_EP_OK) res = moe_ep__copy_router(ctx);
    if (res == MOE_EP_OK && d->experts) {
        /* 0 is num_experts where the two readings agree (one rank), and refused where they do not */
        if (ctx->desc.experts_count == 0 && ctx->local_experts == d->num_experts) ctx->desc.experts_count = d->num_experts;
        moe_ep__check(v, d->experts_count == ctx->local_experts || d->experts_count == d->num_experts,
                      MOE_EP_LOG_ITEM_DESC_EXPERTS_COUNT,
                      "moe_ep_desc.experts_count (%d) must be this rank's expert count (%d: experts[l] is local expert "
                      "l) or num_experts (%d: experts[e] is expert e)", d->experts_count, ctx->local_experts,
                      d->num_experts);
        if (v->failures) res = MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    if (res == MOE_EP_OK && !d->expert_fn && ctx->local_experts > 0) {
        moe_ep__check(v, d->experts != NULL,
                      MOE_EP_LOG_ITEM_DESC_EXPERTS_MISSING,
                      "moe_ep_desc.experts must hold the weights of this rank's %d experts (or set expert_fn)",
                      ctx->local_experts);
        for (l = 0; d->experts && l < ctx->local_experts; ++l) {
            /* w3 is a tensor of its own only in the separate layout */
            bool needs_w3 = moe_ep__gated(d->activation) && d->weight_layout == MOE_EP_WEIGHT_LAYOUT_SEPARATE;
            const moe_ep_expert_weights* w = moe_ep__local_weights(ctx, l);
            moe_ep__check(v, (w->w1 || w->w1_stored) && (w->w2 || w->w2_stored) && (!needs_w3 || w->w3 || w->w3_stored),
                          MOE_EP_LOG_ITEM_DESC_EXPERT_WEIGHTS_NULL,
                          "moe_ep_desc.experts[%d]: w1, w2%s must not be NULL%s",
                          (int)(w - d->experts), needs_w3 ? " and w3" : "",
                          d->weight_layout == MOE_EP_WEIGHT_LAYOUT_SEPARATE ? ""
                          : " (w1 holds gate and up in this weight_layout)");
            if (!v->failures) moe_ep__validate_stored(ctx, l, v);
        }
        if (v->failures) res = MOE_EP_ERROR_INVALID_ARGUMENT;
        else res = moe_ep__pack_experts(ctx, v);
    }
    if (res == MOE_EP_OK) res = moe_ep__shared_create(ctx);
    if (res == MOE_EP_ERROR_OUT_OF_MEMORY)
        moe_ep__fail_desc(d, ctx->rank, res, MOE_EP_LOG_ITEM_OUT_OF_MEMORY, "out of memory while creating the context");
    return res;
}

/* create, step 4: every rank, failed or not, sends its status and fingerprint; the
   verdict is the same everywhere. */
MOE_EP_PRIVATE moe_ep_result moe_ep__create_agree(const moe_ep_desc* d, const moe_ep_transport* t,
                                                  const moe_ep_context* ctx, moe_ep_result status) {
    moe_ep_agree_desc a;
    int64_t fingerprint = status == MOE_EP_OK ? moe_ep__fingerprint(ctx) : 0;
    moe_ep_log_item item = MOE_EP_LOG_ITEM_NONE;
    char err[MOE_EP__ERR_SIZE] = "";
    moe_ep_result res;
    memset(&a, 0, sizeof a);
    a.stage = "moe_ep_create";
    a.status = status;
    a.facts = &fingerprint;
    a.fact_count = 1;
    a.facts_name = "collective parameters (d_model, d_ff, num_experts, top_k, activation, weight_format, "
                   "arithmetic, the router's settings and biases, capacity_factor, placement)";
    a.on_peer_failure = MOE_EP_ERROR_RANK_MISMATCH;
    a.step = (int64_t)MOE_EP__STEP_CREATE << 40;
    a.allocator = d->allocator;
    res = moe_ep__agree_item(t, &a, err, sizeof err, &item, NULL);
    if (res != status) moe_ep__fail_desc(d, t->rank, res, item, "%s", err);
    return res;
}

MOE_EP_API moe_ep_result moe_ep_create(const moe_ep_desc* desc, moe_ep_context** out) {
    moe_ep_desc d;
    moe_ep_transport t;
    moe_ep_context* ctx = NULL;
    moe_ep__validator v;
    moe_ep_result res;
    if (desc && desc->create_error && desc->create_error_size > 0) desc->create_error[0] = '\0';
    if (!desc || !out) return moe_ep__fail_desc(desc, -1, MOE_EP_ERROR_INVALID_ARGUMENT, MOE_EP_LOG_ITEM_CREATE_ARGS,
                                                "desc and out must not be NULL");
    /* 1. defaults and the rank-local rules */
    d = moe_ep__desc_defaults(desc);
    t = d.transport ? *d.transport : moe_ep_single_rank_transport();
    memset(&v, 0, sizeof v);
    v.desc = &d;
    v.rank = t.rank;
    moe_ep__validate_desc(&d, &t, &v);
    /* Without a working exchange the verdict cannot be shared; fail locally. */
    if (!t.exchange_counts || t.world_size <= 0) return MOE_EP_ERROR_INVALID_ARGUMENT;
    /* Half an allocator is refused above; never allocate with one half and free with the other. */
    if ((d.allocator.alloc_fn == NULL) != (d.allocator.free_fn == NULL)) memset(&d.allocator, 0, sizeof d.allocator);
    /* 2. and 3. the context, its placement and packed weights */
    res = v.failures ? MOE_EP_ERROR_INVALID_ARGUMENT : moe_ep__context_alloc(&d, &t, &ctx);
    if (res == MOE_EP_OK) res = moe_ep__context_fill(ctx, &v);
    /* 4. the same verdict on every rank */
    res = moe_ep__create_agree(&d, &t, ctx, res);
    if (res != MOE_EP_OK) {
        if (ctx) moe_ep__context_free(ctx);
        return res;
    }
    ctx->num_threads = moe_ep__default_threads(d.num_threads, &t);
    *out = ctx;
    return MOE_EP_OK;
}

MOE_EP_API void moe_ep_destroy(moe_ep_context* ctx) {
    if (ctx) moe_ep__context_free(ctx);
}

MOE_EP_API moe_ep_desc moe_ep_query(const moe_ep_context* ctx) {
    moe_ep_desc d;
    if (!ctx) { memset(&d, 0, sizeof d); return d; }
    d = ctx->desc;
    d.num_threads = ctx->num_threads;
    d.d_ff = ctx->d_ff_full;
    return d;
}

MOE_EP_API const char* moe_ep_last_error(const moe_ep_context* ctx) { return ctx ? ctx->last_error : ""; }
MOE_EP_API moe_ep_log_item moe_ep_last_error_item(const moe_ep_context* ctx) {
    return ctx ? ctx->last_error_item : MOE_EP_LOG_ITEM_NONE;
}
MOE_EP_API int moe_ep_rank(const moe_ep_context* ctx) { return ctx ? ctx->rank : -1; }
MOE_EP_API int moe_ep_world_size(const moe_ep_context* ctx) { return ctx ? ctx->world_size : -1; }

/* The most tokens one call takes: tokens x max(E, k) x d_model floats must fit 64-bit sizes
   with room to spare, checked before any product is formed. */
MOE_EP_PRIVATE int64_t moe_ep__max_tokens(const moe_ep_context* ctx) {
    int64_t wide = MOE_EP__MAX(ctx->desc.num_experts, ctx->desc.top_k);
    return (INT64_MAX / 64) / (wide * MOE_EP__MAX(ctx->desc.d_model, 1));
}

/* >>router: one token at a time, in fp32, as transformers computes routers.

   logits l = x . W^T (+ router_bias); scores s: softmax(l), sigmoid(l), or l itself for
   the TOPK_ scorings; the choice ranks c = s (+ selection_bias), within the best
   topk_groups groups when num_groups > 1 (a group ranks by the sum of its two best c;
   the other groups' experts are out, as with -inf in DeepSeek's and vLLM's code); the
   weights come from the unbiased s (TOPK_SOFTMAX: softmax over the k chosen logits;
   TOPK_SIGMOID: sigmoid of each), then normalize_topk, then routed_scaling_factor. Ties
   go to the lower index, for groups too. A logit that is NaN or Inf chooses nothing: the
   token is refused. scratch: 3 * num_experts floats; flags: 2 * num_experts bytes. */

/* The best of values[0..n) not taken, or -1; ties to the lower index. */
MOE_EP_PRIVATE int moe_ep__best(const float* values, const unsigned char* taken, int n) {
    int i, best = -1;
    for (i = 0; i < n; ++i)
        if (!taken[i] && (best < 0 || values[i] > values[best])) best = i;
    return best;
}

/* Whether expert a ranks before expert b: the larger value, ties to the lower index. */
MOE_EP_PRIVATE bool moe_ep__before(const float* values, int a, int b) {
    return values[a] > values[b] || (values[a] == values[b] && a < b);
}

/* Restores the heap below slot i: heap[0] is the worst of the k best so far. */
MOE_EP_PRIVATE void moe_ep__sift(const float* values, int32_t* heap, int k, int i) {
    for (;;) {
        int worst = i, l = 2 * i + 1, r = l + 1;
        int32_t swap;
        if (l < k && moe_ep__before(values, heap[worst], heap[l])) worst = l;
        if (r < k && moe_ep__before(values, heap[worst], heap[r])) worst = r;
        if (worst == i) return;
        swap = heap[i]; heap[i] = heap[worst]; heap[worst] = swap;
        i = worst;
    }
}

/* The k best of values[0..n) not taken, best first, ties to the lower index: the choice of
   k rounds of moe_ep__best, in O(n log k). idx: [k] out; at least k must be free. */
MOE_EP_PRIVATE void moe_ep__top_k(const float* values, const unsigned char* taken, int n, int k, int32_t* idx) {
    int i, size = 0;
    for (i = 0; i < n; ++i) {
        if (taken[i]) continue;
        if (size < k) {
            int at = size++;
            idx[at] = i;
            while (at > 0 && moe_ep__before(values, idx[(at - 1) / 2], idx[at])) {   /* sift up */
                int32_t swap = idx[at];
                idx[at] = idx[(at - 1) / 2];
                idx[(at - 1) / 2] = swap;
                at = (at - 1) / 2;
            }
        } else if (moe_ep__before(values, i, idx[0])) {
            idx[0] = i;
            moe_ep__sift(values, idx, k, 0);
        }
    }
    /* heap sort: the worst goes to the end, then the next worst, ... */
    for (i = size - 1; i > 0; --i) {
        int32_t swap = idx[0];
        idx[0] = idx[i];
        idx[i] = swap;
        moe_ep__sift(values, idx, i, 0);
    }
}

/* Marks out (out = 1) the experts of every group but the best topk_groups. */
MOE_EP_PRIVATE void moe_ep__group_limit(const moe_ep_desc* d, const float* choice, float* group_score,
                                        unsigned char* kept, unsigned char* out) {
    int G = d->num_groups, n = d->num_experts / G, g, i, j;
    for (g = 0; g < G; ++g) {
        const float* c = choice + g * n;
        int first = 0, second = -1;
        for (i = 1; i < n; ++i)
            if (c[i] > c[first]) { second = first; first = i; }
            else if (second < 0 || c[i] > c[second]) second = i;
        group_score[g] = second < 0 ? c[first] : c[first] + c[second];
    }
    memset(kept, 0, (size_t)G);
    for (j = 0; j < d->topk_groups; ++j) kept[moe_ep__best(group_score, kept, G)] = 1;
    for (g = 0; g < G; ++g)
        for (i = 0; i < n; ++i) out[g * n + i] = !kept[g];
}

/* logits[r][e] = x[r] . W[e] for `rows` tokens (at most MOE_EP__ROUTER_ROWS), from W^T
   (wt [d_model, E]); defined with the kernels (>>router kernel). */
#define MOE_EP__ROUTER_ROWS 8
MOE_EP_PRIVATE void moe_ep__router_logits(const struct moe_ep__path* path, const float* x, int64_t rows, int D,
                                          const float* wt, int E, float* logits);

/* stats: also the softmax probabilities and the log-sum-exp (the statistics' inputs), which
   the other scorings do not need otherwise. */
MOE_EP_PRIVATE bool moe_ep__route_token(const moe_ep_desc* d, float* probs, float* scratch, unsigned char* flags,
                                        double* lse, int32_t* idx, float* weight, bool stats) {
    int E = d->num_experts, k = d->top_k, e, j;
    float* score = scratch;
    float* choice = scratch + E;
    unsigned char* taken = flags;
    float m, sum;
    for (e = 0; e < E; ++e) {       /* probs holds the logits on entry */
        float acc = probs[e];
        if (d->router_bias) acc += d->router_bias[e];
        if (!moe_ep__finite(acc)) return false;
        score[e] = acc;
    }
    if (stats || d->scoring == MOE_EP_SCORING_SOFTMAX) {
        m = score[0];
        for (e = 1; e < E; ++e) m = score[e] > m ? score[e] : m;
        sum = 0.0f;
        for (e = 0; e < E; ++e) { probs[e] = moe_ep__expf(score[e] - m); sum += probs[e]; }
        *lse = (double)m + moe_ep__log((double)sum);  /* sum in [1, E]: the largest term is exp(0) = 1 */
        for (e = 0; e < E; ++e) probs[e] /= sum;     /* softmax: the statistics' probabilities */
    }
    if (d->scoring == MOE_EP_SCORING_SOFTMAX) memcpy(score, probs, sizeof(float) * (size_t)E);
    else if (d->scoring == MOE_EP_SCORING_SIGMOID)
        for (e = 0; e < E; ++e) score[e] = moe_ep__sigmoid(score[e]);
    for (e = 0; e < E; ++e) choice[e] = d->selection_bias ? score[e] + d->selection_bias[e] : score[e];
    memset(taken, 0, (size_t)(E > 0 ? E : 0));     /* E > 0: validated at create; the bound tells 32-bit gcc so */
    if (d->num_groups > 1) moe_ep__group_limit(d, choice, scratch + 2 * E, flags + E, taken);
    moe_ep__top_k(choice, taken, E, k, idx);
    if (d->scoring == MOE_EP_SCORING_TOPK_SOFTMAX) {
        sum = 0.0f;
        for (j = 0; j < k; ++j) { weight[j] = moe_ep__expf(score[idx[j]] - score[idx[0]]); sum += weight[j]; }
        for (j = 0; j < k; ++j) weight[j] /= sum;
    } else if (d->scoring == MOE_EP_SCORING_TOPK_SIGMOID) {
        for (j = 0; j < k; ++j) weight[j] = moe_ep__sigmoid(score[idx[j]]);
    } else {
        for (j = 0; j < k; ++j) weight[j] = score[idx[j]];
    }
    if (d->normalize_topk) {
        sum = 0.0f;
        for (j = 0; j < k; ++j) sum += weight[j];
        for (j = 0; j < k; ++j) weight[j] /= sum;
    }
    if (d->routed_scaling_factor != 1.0f)
        for (j = 0; j < k; ++j) weight[j] *= d->routed_scaling_factor;
    return true;
}

MOE_EP_PRIVATE int moe_ep__thread_index(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

MOE_EP_API moe_ep_result moe_ep_route(moe_ep_context* ctx, const float* x, int64_t tokens, int32_t* topk_idx,
                                      float* topk_weight, moe_ep_router_stats* stats) {
    const moe_ep_desc* d;
    float* probs;
    float* scratch;
    float* weight;
    int32_t* idx;
    unsigned char* flags;
    double* lse;
    double* mean_p;
    int64_t* assigned;
    int64_t t, refused = -1;
    int E, threads;
    if (!ctx) return MOE_EP_ERROR_INVALID_ARGUMENT;
    d = &ctx->desc;
    E = d->num_experts;
    threads = ctx->num_threads;
    if (tokens < 0 || tokens > moe_ep__max_tokens(ctx))
        return moe_ep__fail(ctx, MOE_EP_ERROR_INVALID_ARGUMENT, MOE_EP_LOG_ITEM_ROUTE_TOKENS,
                            "moe_ep_route: tokens (%lld) must be in [0, %lld] (tokens x max(num_experts, top_k) x "
                            "d_model must fit 64-bit sizes)", (long long)tokens, (long long)moe_ep__max_tokens(ctx));
    if (tokens > 0 && (!x || !topk_idx || !topk_weight))
        return moe_ep__fail(ctx, MOE_EP_ERROR_INVALID_ARGUMENT, MOE_EP_LOG_ITEM_ROUTE_NULL,
                            "moe_ep_route: %s must not be NULL when tokens > 0",
                            !x ? "x" : !topk_idx ? "topk_idx" : "topk_weight");
    if (!d->router_weight)
        return moe_ep__fail(ctx, MOE_EP_ERROR_INVALID_ARGUMENT,
                            MOE_EP_LOG_ITEM_ROUTER_WEIGHT_MISSING,
                            "moe_ep_desc.router_weight is NULL: hand in your own routing instead");
    probs = (float*)moe_ep__calloc(&d->allocator, tokens * E, sizeof(float));
    lse = (double*)moe_ep__calloc(&d->allocator, tokens, sizeof(double));
    scratch = (float*)moe_ep__calloc(&d->allocator, (int64_t)threads * 3 * E, sizeof(float));
    flags = (unsigned char*)moe_ep__calloc(&d->allocator, (int64_t)threads * 2 * E, 1);
    /* the choice lands here first: a refused token leaves topk_idx and topk_weight untouched */
    idx = (int32_t*)moe_ep__calloc(&d->allocator, tokens * d->top_k, sizeof(int32_t));
    weight = (float*)moe_ep__calloc(&d->allocator, tokens * d->top_k, sizeof(float));
    /* the statistics' buffers too, before anything is written: outputs stay untouched on failure */
    mean_p = stats ? (double*)moe_ep__calloc(&d->allocator, E, sizeof(double)) : NULL;
    assigned = stats ? (int64_t*)moe_ep__calloc(&d->allocator, E, sizeof(int64_t)) : NULL;
    if (!probs || !lse || !scratch || !flags || !idx || !weight || (stats && (!mean_p || !assigned))) {
        moe_ep_free(&d->allocator, idx);
        moe_ep_free(&d->allocator, weight);
        moe_ep_free(&d->allocator, mean_p);
        moe_ep_free(&d->allocator, assigned);
        moe_ep_free(&d->allocator, probs);
        moe_ep_free(&d->allocator, lse);
        moe_ep_free(&d->allocator, scratch);
        moe_ep_free(&d->allocator, flags);
        return moe_ep__fail(ctx, MOE_EP_ERROR_OUT_OF_MEMORY, MOE_EP_LOG_ITEM_OUT_OF_MEMORY,
                            "moe_ep_route: out of memory for %lld x %d probabilities",
                            (long long)tokens, E);
    }
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && tokens > MOE_EP__ROUTER_ROWS)
#endif
    for (t = 0; t < tokens; t += MOE_EP__ROUTER_ROWS)
        moe_ep__router_logits(ctx->path, x + t * d->d_model, MOE_EP__MIN(MOE_EP__ROUTER_ROWS, tokens - t), d->d_model,
                              ctx->router_t, E, probs + t * E);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && tokens > 1)
#endif
    for (t = 0; t < tokens; ++t) {
        int me = moe_ep__thread_index();
        if (!moe_ep__route_token(d, probs + t * E, scratch + (int64_t)me * 3 * E,
                                 flags + (int64_t)me * 2 * E, lse + t, idx + t * d->top_k, weight + t * d->top_k,
                                 stats != NULL)) {
#ifdef _OPENMP
#pragma omp critical(moe_ep__refused)
#endif
            if (refused < 0 || t < refused) refused = t;
        }
    }
    moe_ep_free(&d->allocator, scratch);
    moe_ep_free(&d->allocator, flags);
    if (refused < 0 && tokens > 0) {
        memcpy(topk_idx, idx, sizeof(int32_t) * (size_t)(tokens * d->top_k));
        memcpy(topk_weight, weight, sizeof(float) * (size_t)(tokens * d->top_k));
    }
    moe_ep_free(&d->allocator, idx);
    moe_ep_free(&d->allocator, weight);
    if (refused >= 0) {
        const float* row = x + refused * d->d_model;
        int i = 0;
        moe_ep_free(&d->allocator, mean_p);
        moe_ep_free(&d->allocator, assigned);
        moe_ep_free(&d->allocator, probs);
        moe_ep_free(&d->allocator, lse);
        while (i < d->d_model && moe_ep__finite(row[i])) ++i;
        if (i < d->d_model)
            return moe_ep__fail(ctx, MOE_EP_ERROR_INVALID_ARGUMENT, MOE_EP_LOG_ITEM_ROUTE_NOT_FINITE,
                                "moe_ep_route: x[%lld][%d] (%g) is not finite: no expert is chosen for token %lld",
                                (long long)refused, i, (double)row[i], (long long)refused);
        return moe_ep__fail(ctx, MOE_EP_ERROR_INVALID_ARGUMENT, MOE_EP_LOG_ITEM_ROUTE_NOT_FINITE,
                            "moe_ep_route: token %lld has a router logit that is NaN or Inf although its x is finite "
                            "(moe_ep_desc.router_weight or router_bias holds NaN or Inf, or x is so large that the "
                            "logit overflows): no expert is chosen for it", (long long)refused);
    }
    if (stats) {
        /* sequential, in token order: the statistics do not depend on the thread count */
        double z = 0.0, aux = 0.0;
        int64_t* counts = stats->tokens_per_expert;
        int e;
        if (counts) memset(counts, 0, sizeof(int64_t) * (size_t)E);
        for (t = 0; t < tokens; ++t) {
            z = fma(lse[t], lse[t], z);
            for (e = 0; e < E; ++e) mean_p[e] += probs[t * E + e];
        }
        if (tokens > 0) {
            for (t = 0; t < tokens * d->top_k; ++t) assigned[topk_idx[t]]++;
            for (e = 0; e < E; ++e)
                aux = fma((double)assigned[e] / (double)(tokens * d->top_k), mean_p[e] / (double)tokens, aux);
            aux *= E;
            if (counts) memcpy(counts, assigned, sizeof(int64_t) * (size_t)E);
            z /= (double)tokens;
        }
        stats->aux_loss = aux;
        stats->z_loss = tokens > 0 ? z : 0.0;
        moe_ep_free(&d->allocator, assigned);
        moe_ep_free(&d->allocator, mean_p);
    }
    moe_ep_free(&d->allocator, probs);
    moe_ep_free(&d->allocator, lse);
    return MOE_EP_OK;
}

/* Caller's routing: every index an expert, no expert twice in one token, weights finite.
   O(tokens x k): seen[e] holds the last token that named e (plus one). */
MOE_EP_PRIVATE moe_ep_result moe_ep__check_routing(moe_ep_context* ctx, int64_t tokens, const int32_t* idx,
                                                   const float* weight) {
    int k = ctx->desc.top_k, E = ctx->desc.num_experts, j, i;
    int64_t t;
    int64_t* seen = (int64_t*)moe_ep__calloc(&ctx->desc.allocator, E, sizeof(int64_t));
    moe_ep_result res = MOE_EP_OK;
    if (!seen) return moe_ep__fail(ctx, MOE_EP_ERROR_OUT_OF_MEMORY, MOE_EP_LOG_ITEM_OUT_OF_MEMORY,
                                   "out of memory for %d experts' marks", E);
    for (t = 0; t < tokens && res == MOE_EP_OK; ++t)
        for (j = 0; j < k && res == MOE_EP_OK; ++j) {
            int32_t e = idx[t * k + j];
            float w = weight[t * k + j];
            if (e < 0 || e >= E)
                res = moe_ep__fail(ctx, MOE_EP_ERROR_INVALID_ARGUMENT, MOE_EP_LOG_ITEM_ROUTING_EXPERT_RANGE,
                                   "topk_idx[%lld][%d] (%d) must be an expert in [0, %d)", (long long)t, j, (int)e, E);
            else if (seen[e] == t + 1) {
                for (i = 0; i < j && idx[t * k + i] != e; ++i) continue;
                res = moe_ep__fail(ctx, MOE_EP_ERROR_INVALID_ARGUMENT, MOE_EP_LOG_ITEM_ROUTING_EXPERT_TWICE,
                                   "topk_idx[%lld] names expert %d twice (slots %d and %d)", (long long)t, (int)e, i, j);
            } else if (!(w == w) || w > 3.4e38f || w < -3.4e38f)
                res = moe_ep__fail(ctx, MOE_EP_ERROR_INVALID_ARGUMENT, MOE_EP_LOG_ITEM_ROUTING_WEIGHT_NOT_FINITE,
                                   "topk_weight[%lld][%d] must be finite", (long long)t, j);
            else
                seen[e] = t + 1;
        }
    moe_ep_free(&ctx->desc.allocator, seen);
    return res;
}

/* >>plan */
MOE_EP_API void moe_ep_plan_destroy(moe_ep_plan* plan) {
    const moe_ep_allocator* a;
    if (!plan) return;
    a = &plan->allocator;
    moe_ep_free(a, plan->send_counts);
    moe_ep_free(a, plan->recv_counts);
    moe_ep_free(a, plan->seg_send_counts);
    moe_ep_free(a, plan->seg_send_offsets);
    moe_ep_free(a, plan->seg_recv_counts);
    moe_ep_free(a, plan->seg_recv_offsets);
    moe_ep_free(a, plan->local_expert_counts);
    moe_ep_free(a, plan->local_expert_offsets);
    moe_ep_free(a, plan->expert_counts);
    moe_ep_free(a, plan->expert_kept);
    moe_ep_free(a, plan->permutation);
    moe_ep_free(a, plan->slot_row);
    moe_ep_free(a, plan->topk_weight);
    moe_ep_free(a, plan->row_scale);
    moe_ep_free(a, plan->send_buffer);
    moe_ep_free(a, (void*)plan->row_at);
    moe_ep_free(a, plan);
}

MOE_EP_API moe_ep_plan_info moe_ep_plan_query(const moe_ep_plan* plan) {
    moe_ep_plan_info info;
    memset(&info, 0, sizeof info);
    if (!plan) return info;
    info.world_size = plan->ctx->world_size;
    info.local_experts = plan->ctx->local_experts;
    info.tokens = plan->tokens;
    info.capacity = plan->capacity;
    info.send_counts = plan->send_counts;
    info.recv_counts = plan->recv_counts;
    info.local_expert_counts = plan->local_expert_counts;
    info.local_expert_offsets = plan->local_expert_offsets;
    info.recv_rows = plan->recv_rows;
    info.send_rows = plan->send_rows;
    info.expert_counts = plan->expert_counts;
    info.expert_kept = plan->expert_kept;
    info.permutation = plan->permutation;
    info.segments = plan->segments;
    info.seg_send_counts = plan->seg_send_counts;
    info.seg_send_offsets = plan->seg_send_offsets;
    info.seg_recv_counts = plan->seg_recv_counts;
    info.seg_recv_offsets = plan->seg_recv_offsets;
    info.slot_rows = plan->slot_row;
    info.topk_weight = plan->topk_weight;
    return info;
}

MOE_EP_PRIVATE moe_ep_result moe_ep__plan_alloc(moe_ep_context* ctx, int64_t tokens, moe_ep_plan** out) {
    const moe_ep_allocator* a = &ctx->desc.allocator;
    int R = ctx->world_size, S = MOE_EP__MAX(ctx->max_local_experts, 1), E = ctx->desc.num_experts;
    int64_t slots = tokens * ctx->desc.top_k;
    moe_ep_plan* plan = (moe_ep_plan*)moe_ep__calloc(a, 1, sizeof *plan);
    if (!plan) return MOE_EP_ERROR_OUT_OF_MEMORY;
    plan->ctx = ctx;
    plan->allocator = *a;
    plan->tokens = tokens;
    plan->top_k = ctx->desc.top_k;
    plan->segments = S;
    plan->send_counts = (int64_t*)moe_ep__calloc(a, R, sizeof(int64_t));
    plan->recv_counts = (int64_t*)moe_ep__calloc(a, R, sizeof(int64_t));
    plan->seg_send_counts = (int64_t*)moe_ep__calloc(a, (int64_t)R * S, sizeof(int64_t));
    plan->seg_send_offsets = (int64_t*)moe_ep__calloc(a, (int64_t)R * S, sizeof(int64_t));
    plan->seg_recv_counts = (int64_t*)moe_ep__calloc(a, (int64_t)R * S, sizeof(int64_t));
    plan->seg_recv_offsets = (int64_t*)moe_ep__calloc(a, (int64_t)R * S, sizeof(int64_t));
    plan->local_expert_counts = (int64_t*)moe_ep__calloc(a, S, sizeof(int64_t));
    plan->local_expert_offsets = (int64_t*)moe_ep__calloc(a, S, sizeof(int64_t));
    plan->expert_counts = (int64_t*)moe_ep__calloc(a, E, sizeof(int64_t));
    plan->expert_kept = (int64_t*)moe_ep__calloc(a, E, sizeof(int64_t));
    plan->slot_row = (int64_t*)moe_ep__calloc(a, slots, sizeof(int64_t));
    plan->topk_weight = (float*)moe_ep__calloc(a, slots, sizeof(float));
    if (!plan->send_counts || !plan->recv_counts || !plan->seg_send_counts || !plan->seg_send_offsets ||
        !plan->seg_recv_counts || !plan->seg_recv_offsets || !plan->local_expert_counts ||
        !plan->local_expert_offsets || !plan->expert_counts || !plan->expert_kept || !plan->slot_row ||
        !plan->topk_weight) {
        moe_ep_plan_destroy(plan);
        return MOE_EP_ERROR_OUT_OF_MEMORY;
    }
    *out = plan;
    return MOE_EP_OK;
}

/* Local bookkeeping: capacity, send layout (peer, local expert, token), permutation. */
/* scale_expert_input (Llama-4): a slot's weight moves from the expert's output to its input
   row, and the combine adds the outputs with weight 1. */
MOE_EP_PRIVATE moe_ep_result moe_ep__plan_row_scale(moe_ep_context* ctx, moe_ep_plan* plan) {
    int64_t slots = plan->tokens * plan->top_k, i;
    plan->row_scale = (float*)moe_ep__calloc(&ctx->desc.allocator, plan->send_rows, sizeof(float));
    if (!plan->row_scale)
        return moe_ep__fail(ctx, MOE_EP_ERROR_OUT_OF_MEMORY, MOE_EP_LOG_ITEM_OUT_OF_MEMORY,
                            "moe_ep_plan_create: out of memory for %lld send rows", (long long)plan->send_rows);
    for (i = 0; i < slots; ++i) {
        if (plan->slot_row[i] >= 0) plan->row_scale[plan->slot_row[i]] = plan->topk_weight[i];
        plan->topk_weight[i] = 1.0f;
    }
    return MOE_EP_OK;
}

MOE_EP_PRIVATE moe_ep_result moe_ep__plan_local(moe_ep_context* ctx, moe_ep_plan* plan, const int32_t* idx,
                                                const float* weight) {
    const moe_ep_allocator* a = &ctx->desc.allocator;
    int k = plan->top_k, S = plan->segments, R = ctx->world_size, E = ctx->desc.num_experts, e, p, s, j;
    int64_t slots = plan->tokens * k, i, t, row = 0;
    int64_t* cursor;
    plan->capacity = -1;
    if (ctx->desc.capacity_factor > 0.0f)
        plan->capacity = (int64_t)ceil((double)ctx->desc.capacity_factor * (double)plan->tokens * k / (double)E);
    if (plan->capacity < 0) {
        for (i = 0; i < slots; ++i) plan->expert_counts[idx[i]]++;
        memcpy(plan->expert_kept, plan->expert_counts, sizeof(int64_t) * (size_t)E);
    } else {
        for (i = 0; i < slots; ++i) {
            e = idx[i];
            plan->expert_counts[e]++;
            if (plan->expert_kept[e] < plan->capacity) plan->expert_kept[e]++;
            else plan->slot_row[i] = -1;    /* dropped; kept slots are 0 (calloc) until placed below */
        }
    }
    if (slots > 0) memcpy(plan->topk_weight, weight, sizeof(float) * (size_t)slots);
    for (e = 0; e < E; ++e) plan->seg_send_counts[ctx->owner_of[e] * S + ctx->local_index_of[e]] = plan->expert_kept[e];
    for (p = 0; p < R; ++p)
        for (s = 0; s < S; ++s) {
            plan->seg_send_offsets[p * S + s] = row;
            row += plan->seg_send_counts[p * S + s];
            plan->send_counts[p] += plan->seg_send_counts[p * S + s];
        }
    plan->send_rows = row;
    plan->permutation = (int64_t*)moe_ep__calloc(a, row, sizeof(int64_t));
    /* not zeroed: every row is written before it is read, and a device path never touches it */
    plan->send_buffer = row * ctx->desc.d_model <= (int64_t)(SIZE_MAX / sizeof(float) / 2)
                        ? (float*)moe_ep_alloc(a, sizeof(float) * (size_t)(row * ctx->desc.d_model)) : NULL;
    /* cursor[e]: the next send row of expert e (its segment's rows are its own) */
    cursor = (int64_t*)moe_ep__calloc(a, E, sizeof(int64_t));
    plan->row_at = ctx->transport.row_lists ? (const float**)moe_ep__calloc(a, row, sizeof(float*)) : NULL;
    if (!plan->permutation || !plan->send_buffer || !cursor || (ctx->transport.row_lists && !plan->row_at)) {
        moe_ep_free(a, cursor);
        return moe_ep__fail(ctx, MOE_EP_ERROR_OUT_OF_MEMORY, MOE_EP_LOG_ITEM_OUT_OF_MEMORY,
                            "moe_ep_plan_create: out of memory for %lld send rows",
                            (long long)row);
    }
    for (e = 0; e < E; ++e) cursor[e] = plan->seg_send_offsets[ctx->owner_of[e] * S + ctx->local_index_of[e]];
    for (t = 0, i = 0; t < plan->tokens; ++t)
        for (j = 0; j < k; ++j, ++i) {
            if (plan->slot_row[i] < 0) continue;
            row = cursor[idx[i]]++;
            plan->slot_row[i] = row;
            plan->permutation[row] = t;
        }
    /* every expert filled exactly its segment */
    for (e = 0; e < E; ++e)
        MOE_EP_ASSERT(cursor[e] == plan->seg_send_offsets[ctx->owner_of[e] * S + ctx->local_index_of[e]] +
                                   plan->expert_kept[e]);
    moe_ep_free(a, cursor);
    return ctx->desc.scale_expert_input ? moe_ep__plan_row_scale(ctx, plan) : MOE_EP_OK;
}

/* Receive layout: grouped by local expert, then source rank, then token. */
MOE_EP_PRIVATE void moe_ep__plan_receive(moe_ep_context* ctx, moe_ep_plan* plan, const int64_t* recv_words) {
    int R = ctx->world_size, S = plan->segments, q, s;
    int64_t offset = 0;
    for (q = 0; q < R; ++q)
        for (s = 0; s < S; ++s) {
            int64_t n = recv_words[q * (S + 2) + 2 + s];
            plan->seg_recv_counts[q * S + s] = n;
            plan->local_expert_counts[s] += n;
            plan->recv_counts[q] += n;
        }
    for (s = 0; s < S; ++s) {
        plan->local_expert_offsets[s] = offset;
        for (q = 0; q < R; ++q) {
            plan->seg_recv_offsets[q * S + s] = offset;
            offset += plan->seg_recv_counts[q * S + s];
        }
    }
    plan->recv_rows = offset;
}

/* Builds the plan and exchanges counts; `status` != OK means this rank already failed
   and only tells the others. Every rank returns an error if any rank failed. */
MOE_EP_PRIVATE moe_ep_result moe_ep__plan_build(moe_ep_context* ctx, int64_t tokens, const int32_t* idx,
                                                const float* weight, moe_ep_result status, moe_ep_plan** out) {
    int R = ctx->world_size, S = MOE_EP__MAX(ctx->max_local_experts, 1), W = S + 2, q, s;
    int64_t* words;
    int64_t step = moe_ep__step(ctx, MOE_EP__STEP_PLAN);
    moe_ep_plan* plan = NULL;
    moe_ep_result res;
    char err[MOE_EP__ERR_SIZE] = "";
    words = (int64_t*)moe_ep__calloc(&ctx->desc.allocator, 2 * (int64_t)R * W, sizeof(int64_t));
    if (!words) {
        if (ctx->transport.skip) ctx->transport.skip(ctx->transport.impl, MOE_EP_ERROR_OUT_OF_MEMORY);
        moe_ep__step_done(ctx, NULL);
        return moe_ep__fail(ctx, MOE_EP_ERROR_OUT_OF_MEMORY, MOE_EP_LOG_ITEM_OUT_OF_MEMORY,
                            "moe_ep_plan_create: out of memory");
    }
    if (status == MOE_EP_OK && tokens > 0) status = moe_ep__check_routing(ctx, tokens, idx, weight);
    if (status == MOE_EP_OK) {
        status = moe_ep__plan_alloc(ctx, tokens, &plan);
        if (status != MOE_EP_OK) moe_ep__fail(ctx, status, MOE_EP_LOG_ITEM_OUT_OF_MEMORY,
                                              "moe_ep_plan_create: out of memory");
    }
    if (status == MOE_EP_OK) status = moe_ep__plan_local(ctx, plan, idx, weight);
    for (q = 0; q < R; ++q) {
        words[q * W] = (int64_t)status;
        words[q * W + 1] = step;
        for (s = 0; plan && s < S; ++s) words[q * W + 2 + s] = plan->seg_send_counts[q * S + s];
    }
    res = ctx->transport.exchange_counts(ctx->transport.impl, words, words + (int64_t)R * W, W, err, sizeof err);
    if (res != MOE_EP_OK) {
        moe_ep__step_done(ctx, NULL);
        if (status == MOE_EP_OK || res == MOE_EP_ERROR_OUT_OF_STEP)
            status = moe_ep__transport_fail(ctx, res, "moe_ep_plan_create: count exchange", err);
    } else {
        const int64_t* recv = words + (int64_t)R * W;
        int64_t* steps = words;     /* the send words are spent: every rank's step, for step_done */
        for (q = 0; q < R; ++q) steps[q] = recv[q * W + 1];
        for (q = 0; q < R; ++q)
            if (steps[q] != step) {
                status = moe_ep__fail(ctx, MOE_EP_ERROR_OUT_OF_STEP, MOE_EP_LOG_ITEM_OUT_OF_STEP,
                                      "moe_ep_plan_create: rank %d is in another collective (step %llx there, %llx "
                                      "here): a rank skipped a collective or entered another", q,
                                      (unsigned long long)steps[q], (unsigned long long)step);
                break;
            }
        for (q = 0; q < R && status == MOE_EP_OK; ++q)
            if (recv[q * W] != MOE_EP_OK)
                status = moe_ep__fail(ctx, MOE_EP_ERROR_ABORTED, MOE_EP_LOG_ITEM_PEER_FAILED,
                                      "moe_ep_plan_create: rank %d failed (%s)", q,
                                      moe_ep_result_string((moe_ep_result)recv[q * W]));
        if (status == MOE_EP_OK) moe_ep__plan_receive(ctx, plan, recv);
        moe_ep__step_done(ctx, steps);
    }
    moe_ep_free(&ctx->desc.allocator, words);
    if (status != MOE_EP_OK) {
        moe_ep_plan_destroy(plan);
        return status;
    }
    *out = plan;
    return MOE_EP_OK;
}

MOE_EP_API moe_ep_result moe_ep_plan_create(moe_ep_context* ctx, int64_t tokens, const int32_t* topk_idx,
                                            const float* topk_weight, moe_ep_plan** out) {
    moe_ep_result status = MOE_EP_OK;
    if (!ctx) return MOE_EP_ERROR_INVALID_ARGUMENT;
    if (!out) status = moe_ep__fail(ctx, MOE_EP_ERROR_INVALID_ARGUMENT, MOE_EP_LOG_ITEM_PLAN_ARGS,
                                    "moe_ep_plan_create: out must not be NULL");
    else if (tokens < 0 || tokens > moe_ep__max_tokens(ctx))
        status = moe_ep__fail(ctx, MOE_EP_ERROR_INVALID_ARGUMENT, MOE_EP_LOG_ITEM_PLAN_ARGS,
                              "moe_ep_plan_create: tokens (%lld) must be in [0, %lld] (tokens x max(num_experts, "
                              "top_k) x d_model must fit 64-bit sizes)", (long long)tokens,
                              (long long)moe_ep__max_tokens(ctx));
    else if (tokens > 0 && (!topk_idx || !topk_weight))
        status = moe_ep__fail(ctx, MOE_EP_ERROR_INVALID_ARGUMENT,
                              MOE_EP_LOG_ITEM_PLAN_ARGS,
                              "moe_ep_plan_create: topk_idx and topk_weight must not be NULL when tokens > 0");
    if (status != MOE_EP_OK) {
        moe_ep_plan* unused = NULL;
        moe_ep__plan_build(ctx, 0, NULL, NULL, status, &unused);
        return status;
    }
    return moe_ep__plan_build(ctx, tokens, topk_idx, topk_weight, MOE_EP_OK, out);
}

/* >>dispatch */
/* One rank: the send order is the receive order, so dispatch gathers straight into the
   receive rows and combine sums straight from the expert rows; there is nothing to move. */
MOE_EP_PRIVATE bool moe_ep__local_only(const moe_ep_context* ctx) { return ctx->world_size == 1; }

MOE_EP_PRIVATE moe_ep_result moe_ep__a2a_begin(moe_ep_context* ctx, moe_ep_plan* plan, const char* stage) {
    char err[MOE_EP__ERR_SIZE] = "";
    moe_ep_result res;
    plan->request = NULL;
    if (moe_ep__local_only(ctx)) return MOE_EP_OK;
    if (ctx->transport.all_to_all_v_begin && !plan->blocking)
        res = ctx->transport.all_to_all_v_begin(ctx->transport.impl, &plan->args, &plan->request, err, sizeof err);
    else
        res = ctx->transport.all_to_all_v(ctx->transport.impl, &plan->args, err, sizeof err);
    if (res != MOE_EP_OK) return moe_ep__transport_fail(ctx, res, stage, err);
    return MOE_EP_OK;
}

MOE_EP_PRIVATE moe_ep_result moe_ep__a2a_end(moe_ep_context* ctx, moe_ep_plan* plan, const char* stage) {
    char err[MOE_EP__ERR_SIZE] = "";
    moe_ep_result res = MOE_EP_OK;
    if (ctx->transport.all_to_all_v_end && !moe_ep__local_only(ctx) && !plan->blocking)
        res = ctx->transport.all_to_all_v_end(ctx->transport.impl, plan->request, err, sizeof err);
    plan->request = NULL;
    plan->pending = 0;
    if (res != MOE_EP_OK) return moe_ep__transport_fail(ctx, res, stage, err);
    return MOE_EP_OK;
}

MOE_EP_PRIVATE void moe_ep__set_args(moe_ep_plan* plan, const void* send, void* recv, bool forward) {
    moe_ep_a2a_args* a = &plan->args;
    memset(a, 0, sizeof *a);
    a->send = send;
    a->recv = recv;
    a->row_bytes = sizeof(float) * (size_t)plan->ctx->desc.d_model;
    a->segments = plan->segments;
    a->send_counts = forward ? plan->seg_send_counts : plan->seg_recv_counts;
    a->send_offsets = forward ? plan->seg_send_offsets : plan->seg_recv_offsets;
    a->recv_counts = forward ? plan->seg_recv_counts : plan->seg_send_counts;
    a->recv_offsets = forward ? plan->seg_recv_offsets : plan->seg_send_offsets;
    a->memory_space = MOE_EP_MEMORY_HOST;
}

MOE_EP_PRIVATE moe_ep_result moe_ep__check_stage(moe_ep_context* ctx, moe_ep_plan* plan, const char* stage,
                                                 int pending_expected) {
    if (!ctx) return MOE_EP_ERROR_INVALID_ARGUMENT;
    if (!plan || plan->ctx != ctx)
        return moe_ep__fail(ctx, MOE_EP_ERROR_INVALID_ARGUMENT, MOE_EP_LOG_ITEM_STAGE_PLAN,
                            "%s: plan is NULL or belongs to another context", stage);
    if (plan->pending != pending_expected)
        return moe_ep__fail(ctx, MOE_EP_ERROR_INVALID_ARGUMENT, MOE_EP_LOG_ITEM_STAGE_SPLIT_PHASE, "%s: %s", stage,
                            plan->pending ? "a split-phase operation on this plan is still open"
                                          : "no split-phase operation is open on this plan");
    return MOE_EP_OK;
}

/* A rank that fails before an exchange of rows tells the peers (the transport's skip), so
   that their exchange fails too and every rank stays at the same step; the plan remembers
   it, and its combine fails on every rank. */
MOE_EP_PRIVATE moe_ep_result moe_ep__skip_rows(moe_ep_context* ctx, moe_ep_plan* plan, moe_ep_result res) {
    if (!moe_ep__local_only(ctx) && ctx->transport.skip) ctx->transport.skip(ctx->transport.impl, res);
    moe_ep__step_done(ctx, NULL);
    if (plan && plan->ctx == ctx && plan->status == MOE_EP_OK) plan->status = res;
    return res;
}

MOE_EP_API moe_ep_result moe_ep_dispatch_begin(moe_ep_context* ctx, moe_ep_plan* plan, const float* x, float* recv_rows) {
    moe_ep_result res = moe_ep__check_stage(ctx, plan, "moe_ep_dispatch", 0);
    int64_t r, d;
    if (!ctx) return res;
    /* with an exchange of this plan still open, this rank is inside a collective: no skip */
    if (res != MOE_EP_OK) return plan && plan->ctx == ctx && plan->pending ? res : moe_ep__skip_rows(ctx, plan, res);
    if ((plan->send_rows > 0 && !x) || (plan->recv_rows > 0 && !recv_rows))
        return moe_ep__skip_rows(ctx, plan, moe_ep__fail(ctx, MOE_EP_ERROR_INVALID_ARGUMENT, MOE_EP_LOG_ITEM_STAGE_NULL,
                                                         "moe_ep_dispatch: x and recv_rows must not be NULL"));
    d = ctx->desc.d_model;
    /* A transport that gathers by index reads x itself in its one pass, when x cannot change
       before the exchange ends (the blocking dispatch, the layer) and rows are not scaled. */
    if (!moe_ep__local_only(ctx) && ctx->transport.row_lists && !plan->row_scale && (plan->blocking || plan->x_kept)) {
        moe_ep__set_args(plan, x, recv_rows, true);
        plan->args.send_rows = plan->permutation;
        plan->args.send_buffer_rows = plan->tokens;
    } else {
        float* dst = moe_ep__local_only(ctx) ? recv_rows : plan->send_buffer;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(ctx->num_threads) if (ctx->num_threads > 1 && plan->send_rows > 64)
#endif
        for (r = 0; r < plan->send_rows; ++r) {
            const float* src = x + plan->permutation[r] * d;
            int64_t i;
            if (!plan->row_scale) memcpy(dst + r * d, src, sizeof(float) * (size_t)d);
            else for (i = 0; i < d; ++i) dst[r * d + i] = plan->row_scale[r] * src[i];
        }
        moe_ep__set_args(plan, plan->send_buffer, recv_rows, true);
    }
    plan->args.step = moe_ep__step(ctx, MOE_EP__STEP_DISPATCH_ROWS);
    moe_ep__step_done(ctx, NULL);
    plan->pending = 1;
    res = moe_ep__a2a_begin(ctx, plan, "moe_ep_dispatch");
    if (res != MOE_EP_OK) {
        plan->pending = 0;
        plan->status = res;
    }
    return res;
}

MOE_EP_API moe_ep_result moe_ep_dispatch_end(moe_ep_context* ctx, moe_ep_plan* plan) {
    moe_ep_result res = moe_ep__check_stage(ctx, plan, "moe_ep_dispatch_end", 1);
    if (res != MOE_EP_OK) return res;
    res = moe_ep__a2a_end(ctx, plan, "moe_ep_dispatch");
    plan->status = res;     /* a dispatch that worked (a retry) makes the plan good again */
    return res;
}

/* Whether plan may be marked for a blocking exchange (a valid plan of ctx with nothing open). */
MOE_EP_PRIVATE bool moe_ep__can_block(const moe_ep_context* ctx, const moe_ep_plan* plan) {
    return ctx && plan && plan->ctx == ctx && plan->pending == 0;
}

MOE_EP_API moe_ep_result moe_ep_dispatch(moe_ep_context* ctx, moe_ep_plan* plan, const float* x, float* recv_rows) {
    moe_ep_result res;
    bool blocking = moe_ep__can_block(ctx, plan);
    if (blocking) plan->blocking = 1;   /* one blocking exchange, not begin + end */
    res = moe_ep_dispatch_begin(ctx, plan, x, recv_rows);
    if (res == MOE_EP_OK) res = moe_ep_dispatch_end(ctx, plan);
    if (blocking) plan->blocking = 0;
    return res;
}

/* >>experts */
MOE_EP_PRIVATE moe_ep_result moe_ep__experts_local(moe_ep_context* ctx, const moe_ep_plan* plan, const float* rows,
                                                   float* out) {
    int64_t d = ctx->desc.d_model;
    int l;
    for (l = 0; l < ctx->local_experts; ++l) {
        int64_t n = plan->local_expert_counts[l], first = plan->local_expert_offsets[l];
        if (n == 0) continue;
        if (ctx->desc.expert_fn) {
            int expert = ctx->rank_expert_list[ctx->rank_expert_start[ctx->rank] + l];
            int rc = ctx->desc.expert_fn(l, expert, rows + first * d, n, (int)d, out + first * d,
                                         ctx->desc.expert_user_data);
            if (rc != 0)
                return moe_ep__fail(ctx, MOE_EP_ERROR_CALLBACK, MOE_EP_LOG_ITEM_EXPERT_FN_FAILED,
                                    "moe_ep_experts: expert_fn returned %d for expert %d",
                                    rc, expert);
        } else {
            moe_ep_result res = moe_ep_expert_ffn(ctx, l, rows + first * d, n, out + first * d);
            if (res != MOE_EP_OK) return res;
        }
    }
    return MOE_EP_OK;
}

MOE_EP_API moe_ep_result moe_ep_experts(moe_ep_context* ctx, const moe_ep_plan* plan, const float* rows, float* out) {
    moe_ep_result res = moe_ep__check_stage(ctx, (moe_ep_plan*)(uintptr_t)plan, "moe_ep_experts", 0);
    if (res != MOE_EP_OK) return res;
    if (plan->recv_rows > 0 && (!rows || !out))
        return ctx->experts_status = moe_ep__fail(ctx, MOE_EP_ERROR_INVALID_ARGUMENT,
                                                  MOE_EP_LOG_ITEM_STAGE_NULL,
                                                  "moe_ep_experts: rows and out must not be NULL");
    res = moe_ep__experts_local(ctx, plan, rows, out);
    if (ctx->tp_size > 1) {
        /* The TP group saw the same tokens, so its ranks hold the same rows: sum the d_ff
           slices. Reached even after a local failure, so the group is not left waiting. */
        char err[MOE_EP__ERR_SIZE] = "";
        moe_ep_result reduced = ctx->tp_transport.all_reduce_sum(ctx->tp_transport.impl, out,
                                                                 plan->recv_rows * ctx->desc.d_model,
                                                                 MOE_EP_MEMORY_HOST, NULL, err, sizeof err);
        if (res == MOE_EP_OK && reduced != MOE_EP_OK)
            res = moe_ep__transport_fail(ctx, reduced, "moe_ep_experts: tensor-parallel sum", err);
    }
    if (res != MOE_EP_OK) ctx->experts_status = res;
    return res;
}

/* >>combine */
MOE_EP_PRIVATE void moe_ep__combine_take(void* user, int64_t first, const void* src, int64_t rows);
MOE_EP_PRIVATE void moe_ep__combine_done(void* user);

MOE_EP_PRIVATE moe_ep_result moe_ep__combine_begin(moe_ep_context* ctx, moe_ep_plan* plan, const float* expert_out,
                                                   moe_ep_result status) {
    moe_ep_result res = moe_ep__check_stage(ctx, plan, "moe_ep_combine", 0);
    if (!ctx) return res;
    if (res != MOE_EP_OK) status = res;
    else if (plan->status != MOE_EP_OK && status == MOE_EP_OK)
        status = moe_ep__fail(ctx, plan->status, MOE_EP_LOG_ITEM_STAGE_FAILED_BEFORE,
                              "moe_ep_combine: this plan's dispatch failed (%s): there are no rows to combine",
                              moe_ep_result_string(plan->status));
    else if (plan->recv_rows > 0 && !expert_out)
        status = moe_ep__fail(ctx, MOE_EP_ERROR_INVALID_ARGUMENT, MOE_EP_LOG_ITEM_STAGE_NULL,
                              "moe_ep_combine: expert_out must not be NULL");
    /* The one agreement of a layer: a rank whose experts failed tells the others here. */
    res = moe_ep__agree(ctx, status, "moe_ep_combine", MOE_EP__STEP_COMBINE);
    if (res != MOE_EP_OK) return res;
    moe_ep__set_args(plan, expert_out, plan->send_buffer, false);
    plan->combined = 0;
    if (!moe_ep__local_only(ctx) && plan->row_at && plan->blocking && (plan->combine_y || plan->tokens == 0)) {
        plan->args.recv_fn = moe_ep__combine_take;
        plan->args.recv_done_fn = moe_ep__combine_done;
        plan->args.recv_user = plan;
    }
    plan->args.step = moe_ep__step(ctx, MOE_EP__STEP_COMBINE_ROWS);
    moe_ep__step_done(ctx, NULL);
    plan->pending = 2;
    res = moe_ep__a2a_begin(ctx, plan, "moe_ep_combine");
    if (res != MOE_EP_OK) plan->pending = plan->combined = 0;
    return res;
}

MOE_EP_API moe_ep_result moe_ep_combine_begin(moe_ep_context* ctx, moe_ep_plan* plan, const float* expert_out) {
    moe_ep_result status = ctx ? ctx->experts_status : MOE_EP_OK;
    if (ctx) ctx->experts_status = MOE_EP_OK;
    return moe_ep__combine_begin(ctx, plan, expert_out, status);
}

#if defined(__STDC_VERSION__) && __STDC_VERSION__ >= 199901L
#define MOE_EP__RESTRICT restrict
#else
#define MOE_EP__RESTRICT
#endif

/* y_t = sum over the k slots, in slot order, of w_j * row_j (from 0.0f; a dropped slot adds
   nothing). The first slot writes 0.0f + w * row, the same bytes as a zeroed row plus it. */
MOE_EP_PRIVATE void moe_ep__combine_row(float* MOE_EP__RESTRICT yt, const float* rows, const float* const* row_at,
                                        const int64_t* slot_row, const float* weight, int k, int64_t d) {
    int j, first = 1;
    int64_t i;
    for (j = 0; j < k; ++j) {
        const float* MOE_EP__RESTRICT src;
        float w = weight[j];
        if (slot_row[j] < 0) continue;
        src = row_at ? row_at[slot_row[j]] : rows + slot_row[j] * d;     /* where it arrived, or packed */
        if (first)
            for (i = 0; i < d; ++i) yt[i] = moe_ep__fmaf(w, src[i], 0.0f);
        else
            for (i = 0; i < d; ++i) yt[i] = moe_ep__fmaf(w, src[i], yt[i]);
        first = 0;
    }
    if (first)
        for (i = 0; i < d; ++i) yt[i] = 0.0f;
}

MOE_EP_PRIVATE void moe_ep__combine_sum(const moe_ep_context* ctx, const moe_ep_plan* plan, const float* rows,
                                        const float* const* row_at, float* y) {
    int64_t t, d = ctx->desc.d_model;
    int k = plan->top_k;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(ctx->num_threads) if (ctx->num_threads > 1 && plan->tokens > 16)
#endif
    for (t = 0; t < plan->tokens; ++t)
        moe_ep__combine_row(y + t * d, rows, row_at, plan->slot_row + t * k, plan->topk_weight + t * k, k, d);
}

/* The blocking combine over a transport with row lists: the transport hands over each
   returning segment where it lies in the expert rank's memory (recv_fn, noting where
   every send row is), then recv_done_fn sums y from there, the same sums in the same
   order as from the packed rows, before the transport lets the peers go on. */
MOE_EP_PRIVATE void moe_ep__combine_take(void* user, int64_t first, const void* src, int64_t rows) {
    moe_ep_plan* plan = (moe_ep_plan*)user;
    int64_t i, d = plan->ctx->desc.d_model;
    for (i = 0; i < rows; ++i) plan->row_at[first + i] = (const float*)src + i * d;
}

MOE_EP_PRIVATE void moe_ep__combine_done(void* user) {
    moe_ep_plan* plan = (moe_ep_plan*)user;
    moe_ep__combine_sum(plan->ctx, plan, NULL, plan->row_at, plan->combine_y);
    plan->combined = 1;
}

MOE_EP_API moe_ep_result moe_ep_combine_end(moe_ep_context* ctx, moe_ep_plan* plan, float* y) {
    moe_ep_result res = moe_ep__check_stage(ctx, plan, "moe_ep_combine_end", 2);
    if (res != MOE_EP_OK) return res;
    res = moe_ep__a2a_end(ctx, plan, "moe_ep_combine");
    if (plan->combined) {       /* summed into combine_y as the rows arrived */
        plan->combined = 0;
        return res;
    }
    if (res != MOE_EP_OK) return res;
    if (plan->tokens > 0 && !y)
        return moe_ep__fail(ctx, MOE_EP_ERROR_INVALID_ARGUMENT, MOE_EP_LOG_ITEM_STAGE_NULL,
                            "moe_ep_combine: y must not be NULL");
    moe_ep__combine_sum(ctx, plan, moe_ep__local_only(ctx) ? (const float*)plan->args.send : plan->send_buffer,
                        NULL, y);
    return MOE_EP_OK;
}

MOE_EP_API moe_ep_result moe_ep_combine(moe_ep_context* ctx, moe_ep_plan* plan, const float* expert_out, float* y) {
    moe_ep_result res;
    bool blocking = moe_ep__can_block(ctx, plan);
    if (blocking) {
        plan->blocking = 1;
        plan->combine_y = y;
    }
    res = moe_ep_combine_begin(ctx, plan, expert_out);
    if (res == MOE_EP_OK) res = moe_ep_combine_end(ctx, plan, y);
    if (blocking) {
        plan->blocking = 0;
        plan->combine_y = NULL;
    }
    return res;
}

/* >>shared experts: every rank runs them on its own tokens. */
MOE_EP_API moe_ep_result moe_ep_shared_experts(moe_ep_context* ctx, const float* x, int64_t tokens, float* out) {
    const float* gate;
    int64_t t, D;
    moe_ep_result res;
    if (!ctx) return MOE_EP_ERROR_INVALID_ARGUMENT;
    if (!ctx->shared || tokens < 0 || tokens > moe_ep__max_tokens(ctx) || (tokens > 0 && (!x || !out)))
        return moe_ep__fail(ctx, MOE_EP_ERROR_INVALID_ARGUMENT, MOE_EP_LOG_ITEM_SHARED_ARGS,
                            "moe_ep_shared_experts: %s", !ctx->shared ? "the context has no shared experts "
                            "(moe_ep_desc.shared.d_ff is 0)" : "tokens must be in [0, the layer's limit], x and out not NULL");
    res = moe_ep_expert_ffn(ctx->shared, 0, x, tokens, out);
    if (res != MOE_EP_OK)
        return moe_ep__fail(ctx, res, moe_ep_last_error_item(ctx->shared), "moe_ep_shared_experts: %s",
                            moe_ep_last_error(ctx->shared));
    gate = ctx->shared_gate;
    D = ctx->desc.d_model;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(ctx->num_threads) if (gate && ctx->num_threads > 1 && tokens > 16)
#endif
    for (t = 0; t < (gate ? tokens : 0); ++t) {
        float logit = 0.0f, g;
        int64_t i;
        for (i = 0; i < D; ++i) logit = moe_ep__fmaf(gate[i], x[t * D + i], logit);
        g = moe_ep__sigmoid(logit);
        for (i = 0; i < D; ++i) out[t * D + i] *= g;
    }
    return MOE_EP_OK;
}

/* >>forward */
/* Rows of y[tokens, d] that hold NaN or Inf (all exponent bits set): an integer OR per row,
   which the compiler vectorises (a float sum would have to keep its order). */
MOE_EP_PRIVATE int64_t moe_ep__nonfinite_rows(const float* y, int64_t tokens, int64_t d) {
    int64_t t, i, rows = 0;
    for (t = 0; t < tokens; ++t) {
        const float* row = y + t * d;
        uint32_t any = 0;
        for (i = 0; i < d; ++i) {
            uint32_t bits;
            memcpy(&bits, &row[i], sizeof bits);
            any |= (uint32_t)((bits & 0x7F800000u) == 0x7F800000u);
        }
        rows += any != 0;
    }
    return rows;
}

MOE_EP_PRIVATE moe_ep_result moe_ep__forward_check(moe_ep_context* ctx, const moe_ep_forward_args* a) {
    if (!a) return moe_ep__fail(ctx, MOE_EP_ERROR_INVALID_ARGUMENT, MOE_EP_LOG_ITEM_FORWARD_ARGS_NULL,
                                "moe_ep_forward: args must not be NULL");
    if (a->tokens < 0)
        return moe_ep__fail(ctx, MOE_EP_ERROR_INVALID_ARGUMENT, MOE_EP_LOG_ITEM_FORWARD_TOKENS,
                            "moe_ep_forward_args.tokens (%lld) must be >= 0", (long long)a->tokens);
    if (a->tokens > 0 && (!a->x || !a->y))
        return moe_ep__fail(ctx, MOE_EP_ERROR_INVALID_ARGUMENT,
                            MOE_EP_LOG_ITEM_FORWARD_NULL,
                            "moe_ep_forward_args.x and .y must not be NULL when tokens > 0");
    if (a->tokens > moe_ep__max_tokens(ctx))
        return moe_ep__fail(ctx, MOE_EP_ERROR_INVALID_ARGUMENT, MOE_EP_LOG_ITEM_FORWARD_TOKENS,
                            "moe_ep_forward_args.tokens (%lld) must be <= %lld: tokens x max(num_experts, top_k) x "
                            "d_model must fit 64-bit sizes", (long long)a->tokens, (long long)moe_ep__max_tokens(ctx));
    if (a->routing_in && a->tokens > 0 && (!a->topk_idx || !a->topk_weight))
        return moe_ep__fail(ctx, MOE_EP_ERROR_INVALID_ARGUMENT,
                            MOE_EP_LOG_ITEM_FORWARD_ROUTING_IN,
                            "moe_ep_forward_args.routing_in needs topk_idx and topk_weight");
    if (!a->topk_idx != !a->topk_weight)
        return moe_ep__fail(ctx, MOE_EP_ERROR_INVALID_ARGUMENT, MOE_EP_LOG_ITEM_FORWARD_ROUTING_IN,
                            "moe_ep_forward_args.topk_idx and .topk_weight: set both (the routing is written to or "
                            "read from both) or neither; %s is NULL", a->topk_idx ? "topk_weight" : "topk_idx");
    if (!a->routing_in && !ctx->desc.router_weight)
        return moe_ep__fail(ctx, MOE_EP_ERROR_INVALID_ARGUMENT,
                            MOE_EP_LOG_ITEM_ROUTER_WEIGHT_MISSING,
                            "moe_ep_desc.router_weight is NULL: set it, or hand in routing (routing_in)");
    return MOE_EP_OK;
}

/* Dispatch, with the shared experts run on this rank's tokens while the rows travel when the
   transport is split-phase (after them otherwise); their failure is told at the combine. */
MOE_EP_PRIVATE moe_ep_result moe_ep__forward_dispatch(moe_ep_context* ctx, moe_ep_plan* plan, const float* x,
                                                      int64_t tokens, moe_ep_result* shared_status) {
    moe_ep_result res;
    *shared_status = MOE_EP_OK;
    if (!ctx->shared) return moe_ep_dispatch(ctx, plan, x, ctx->recv_rows);
    if (!ctx->transport.all_to_all_v_begin) {
        res = moe_ep_dispatch(ctx, plan, x, ctx->recv_rows);
        if (res == MOE_EP_OK) *shared_status = moe_ep_shared_experts(ctx, x, tokens, ctx->shared_out);
        return res;
    }
    plan->x_kept = 1;   /* x is the layer's input: unchanged until the dispatch ends */
    res = moe_ep_dispatch_begin(ctx, plan, x, ctx->recv_rows);
    plan->x_kept = 0;
    if (res != MOE_EP_OK) return res;
    *shared_status = moe_ep_shared_experts(ctx, x, tokens, ctx->shared_out);
    return moe_ep_dispatch_end(ctx, plan);
}

MOE_EP_API moe_ep_result moe_ep_forward(moe_ep_context* ctx, const moe_ep_forward_args* args) {
    moe_ep_result status, res, shared_status = MOE_EP_OK;
    moe_ep_plan* plan = NULL;
    int32_t* idx = NULL;
    float* weight = NULL;
    int64_t tokens = 0;
    if (!ctx) return MOE_EP_ERROR_INVALID_ARGUMENT;
    moe_ep_router_stats stats;
    int64_t* counts = NULL;
    status = moe_ep__forward_check(ctx, args);
    if (status == MOE_EP_OK && args->stats) {
        /* the statistics land here first: the caller's are written only when the layer worked */
        stats = *args->stats;
        if (stats.tokens_per_expert) {
            counts = (int64_t*)moe_ep__calloc(&ctx->desc.allocator, ctx->desc.num_experts, sizeof(int64_t));
            if (!counts) status = moe_ep__fail(ctx, MOE_EP_ERROR_OUT_OF_MEMORY, MOE_EP_LOG_ITEM_OUT_OF_MEMORY,
                                               "moe_ep_forward: out of memory for the statistics");
            stats.tokens_per_expert = counts;
        }
    }
    if (status == MOE_EP_OK) {
        tokens = args->tokens;
        if (args->routing_in) {
            idx = args->topk_idx;
            weight = args->topk_weight;
        } else {    /* the router's choice lands in the context's buffers; the caller's get a copy at the end */
            void* bufs[2];
            bufs[0] = ctx->topk_idx;
            bufs[1] = ctx->topk_weight;
            /* int32_t indices and float weights: one element size serves both buffers */
            status = moe_ep__grow(ctx, bufs, &ctx->routing_capacity, tokens * ctx->desc.top_k, sizeof(float), 2);
            ctx->topk_idx = (int32_t*)bufs[0];
            ctx->topk_weight = (float*)bufs[1];
            idx = ctx->topk_idx;
            weight = ctx->topk_weight;
        }
    }
    if (status == MOE_EP_OK && !args->routing_in)
        status = moe_ep_route(ctx, args->x, tokens, idx, weight, args->stats ? &stats : NULL);
    res = moe_ep__plan_build(ctx, status == MOE_EP_OK ? tokens : 0, idx, weight, status, &plan);
    if (res != MOE_EP_OK) {
        moe_ep_free(&ctx->desc.allocator, counts);
        return res;
    }
    {
        void* bufs[2];
        bufs[0] = ctx->recv_rows;
        bufs[1] = ctx->expert_out;
        status = moe_ep__grow(ctx, bufs, &ctx->recv_capacity, plan->recv_rows * ctx->desc.d_model, sizeof(float), 2);
        ctx->recv_rows = (float*)bufs[0];
        ctx->expert_out = (float*)bufs[1];
        if (status == MOE_EP_OK && ctx->shared) {
            bufs[0] = ctx->shared_out;
            status = moe_ep__grow(ctx, bufs, &ctx->shared_capacity, tokens * ctx->desc.d_model, sizeof(float), 1);
            ctx->shared_out = (float*)bufs[0];
        }
    }
    /* A rank without room to receive must not enter the dispatch: agree first. */
    res = moe_ep__agree(ctx, status, "moe_ep_forward", MOE_EP__STEP_FORWARD);
    if (res == MOE_EP_OK) res = moe_ep__forward_dispatch(ctx, plan, args->x, tokens, &shared_status);
    if (res == MOE_EP_OK) {
        status = moe_ep_experts(ctx, plan, ctx->recv_rows, ctx->expert_out);
        ctx->experts_status = MOE_EP_OK;    /* handed to combine here */
        plan->blocking = 1;
        plan->combine_y = args->y;
        res = moe_ep__combine_begin(ctx, plan, ctx->expert_out, status != MOE_EP_OK ? status : shared_status);
        if (res == MOE_EP_OK) res = moe_ep_combine_end(ctx, plan, args->y);
    }
    if (res == MOE_EP_OK && ctx->shared) {
        /* routed first, then the shared experts: one addition per element, in that order */
        int64_t i, n = tokens * ctx->desc.d_model;
        for (i = 0; i < n; ++i) args->y[i] += ctx->shared_out[i];
    }
    if (res == MOE_EP_OK) {
        if (!args->routing_in && args->topk_idx && tokens > 0) {
            memcpy(args->topk_idx, idx, sizeof(int32_t) * (size_t)(tokens * ctx->desc.top_k));
            memcpy(args->topk_weight, weight, sizeof(float) * (size_t)(tokens * ctx->desc.top_k));
        }
        if (args->stats) {
            int64_t* theirs = args->stats->tokens_per_expert;
            *args->stats = stats;
            args->stats->tokens_per_expert = theirs;
            if (theirs) memcpy(theirs, counts, sizeof(int64_t) * (size_t)ctx->desc.num_experts);
        }
        if (args->nonfinite_tokens) *args->nonfinite_tokens = moe_ep__nonfinite_rows(args->y, tokens, ctx->desc.d_model);
    }
    moe_ep_free(&ctx->desc.allocator, counts);
    moe_ep_plan_destroy(plan);
    return res;
}

/* >>layout */
MOE_EP_API moe_ep_result moe_ep_layout_resolve(const moe_ep_layout_desc* desc, moe_ep_layout_desc* out,
                                               char* err, size_t err_size) {
    moe_ep_layout_desc d;
    char local[MOE_EP__ERR_SIZE];   /* the caller did not ask for the reason; keep it whole anyway */
    if (!err) { err = local; err_size = sizeof local; }
    if (!desc || !out) { snprintf(err, err_size, "desc and out must not be NULL"); return MOE_EP_ERROR_INVALID_ARGUMENT; }
    d = *desc;
    d.tp_size = MOE_EP__DEF(d.tp_size, 1);
    d.dp_size = MOE_EP__DEF(d.dp_size, 1);
    d.placement.kind = MOE_EP__DEF(d.placement.kind, MOE_EP_PLACEMENT_CONTIGUOUS);
    if (d.world_size <= 0 || d.tp_size <= 0 || d.dp_size <= 0 || d.ep_size < 0) {
        snprintf(err, err_size, "moe_ep_layout_desc: world_size (%d), tp_size (%d) and dp_size (%d) must be > 0 "
                 "and ep_size (%d) >= 0", d.world_size, d.tp_size, d.dp_size, d.ep_size);
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    /* in 64 bits, each product checked before the next: tp x dp and ep x tp x dp may pass an int */
    if ((int64_t)d.tp_size * d.dp_size > d.world_size ||
        (d.ep_size > 0 && (int64_t)d.ep_size * d.tp_size * d.dp_size != d.world_size)) {
        snprintf(err, err_size, "moe_ep_layout_desc: ep_size (%d) x tp_size (%d) x dp_size (%d) must equal "
                 "world_size (%d)", d.ep_size, d.tp_size, d.dp_size, d.world_size);
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    if (d.ep_size == 0) d.ep_size = (int)((int64_t)d.world_size / ((int64_t)d.tp_size * d.dp_size));
    if ((int64_t)d.ep_size * d.tp_size * d.dp_size != d.world_size || d.ep_size == 0) {
        snprintf(err, err_size, "moe_ep_layout_desc: ep_size (%d) x tp_size (%d) x dp_size (%d) must equal "
                 "world_size (%d)", d.ep_size, d.tp_size, d.dp_size, d.world_size);
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    if (d.num_experts <= 0 || d.num_experts % d.ep_size != 0) {
        snprintf(err, err_size, "moe_ep_layout_desc.num_experts (%d) must be a positive multiple of ep_size (%d)",
                 d.num_experts, d.ep_size);
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    if (d.placement.kind <= 0 || d.placement.kind >= MOE_EP_PLACEMENT_COUNT ||
        (d.placement.kind == MOE_EP_PLACEMENT_TABLE && !d.placement.table)) {
        snprintf(err, err_size, "moe_ep_layout_desc.placement is not valid");
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    *out = d;
    return MOE_EP_OK;
}

MOE_EP_API moe_ep_result moe_ep_layout_coords(const moe_ep_layout_desc* desc, int rank, moe_ep_coords* out) {
    moe_ep_layout_desc d;
    moe_ep_result res = moe_ep_layout_resolve(desc, &d, NULL, 0);
    if (res != MOE_EP_OK) return res;
    if (rank < 0 || rank >= d.world_size || !out) return MOE_EP_ERROR_INVALID_ARGUMENT;
    out->tp = rank % d.tp_size;
    out->ep = (rank / d.tp_size) % d.ep_size;
    out->dp = rank / (d.tp_size * d.ep_size);
    return MOE_EP_OK;
}

MOE_EP_API int moe_ep_layout_rank_of(const moe_ep_layout_desc* desc, moe_ep_coords c) {
    moe_ep_layout_desc d;
    if (moe_ep_layout_resolve(desc, &d, NULL, 0) != MOE_EP_OK) return -1;
    if (c.dp < 0 || c.dp >= d.dp_size || c.ep < 0 || c.ep >= d.ep_size || c.tp < 0 || c.tp >= d.tp_size) return -1;
    return (c.dp * d.ep_size + c.ep) * d.tp_size + c.tp;
}

MOE_EP_API int moe_ep_layout_group(const moe_ep_layout_desc* desc, int rank, moe_ep_group_kind kind, int* ranks, int max) {
    moe_ep_layout_desc d;
    moe_ep_coords c, member;
    int i, n;
    if (moe_ep_layout_resolve(desc, &d, NULL, 0) != MOE_EP_OK || moe_ep_layout_coords(&d, rank, &c) != MOE_EP_OK) return -1;
    kind = MOE_EP__DEF(kind, MOE_EP_GROUP_EP);
    if (kind <= 0 || kind >= MOE_EP_GROUP_COUNT) return -1;
    n = kind == MOE_EP_GROUP_EP ? d.ep_size : kind == MOE_EP_GROUP_TP ? d.tp_size : d.dp_size;
    for (i = 0; i < n && i < max && ranks; ++i) {
        member = c;
        if (kind == MOE_EP_GROUP_EP) member.ep = i;
        else if (kind == MOE_EP_GROUP_TP) member.tp = i;
        else member.dp = i;
        ranks[i] = moe_ep_layout_rank_of(&d, member);
    }
    return n;
}

MOE_EP_API int moe_ep_layout_experts(const moe_ep_layout_desc* desc, int rank, int* experts, int max) {
    moe_ep_layout_desc d;
    moe_ep_coords c;
    int e, n = 0;
    if (moe_ep_layout_resolve(desc, &d, NULL, 0) != MOE_EP_OK || moe_ep_layout_coords(&d, rank, &c) != MOE_EP_OK) return -1;
    for (e = 0; e < d.num_experts; ++e) {
        int owner = moe_ep__owner_of(&d.placement, d.num_experts, d.ep_size, e);
        if (owner < 0) return -1;
        if (owner == c.ep) {
            if (experts && n < max) experts[n] = e;
            n++;
        }
    }
    return n;
}

MOE_EP_API moe_ep_result moe_ep_layout_split(const moe_ep_layout_desc* desc, const moe_ep_transport* world,
                                             moe_ep_group_kind kind, moe_ep_transport* out,
                                             char* err_text, size_t err_size) {
    moe_ep_layout_desc d;
    moe_ep_coords c;
    int color, key;
    char err[MOE_EP__ERR_SIZE] = "";
    moe_ep_result res;
    if (!world || !out || !world->split) {
        moe_ep__text(err_text, err_size, "moe_ep_layout_split: world and out must not be NULL, and world needs split");
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    res = moe_ep_layout_resolve(desc, &d, err_text, err_size);
    if (res != MOE_EP_OK) return res;
    if (d.world_size != world->world_size || moe_ep_layout_coords(&d, world->rank, &c) != MOE_EP_OK) {
        moe_ep__text(err_text, err_size, "moe_ep_layout_split: the layout's world_size (%d) must be the transport's (%d)",
                     d.world_size, world->world_size);
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    kind = MOE_EP__DEF(kind, MOE_EP_GROUP_EP);
    /* color: the coordinates that stay fixed in the group; key: the one that varies */
    if (kind == MOE_EP_GROUP_EP) { color = c.dp * d.tp_size + c.tp; key = c.ep; }
    else if (kind == MOE_EP_GROUP_TP) { color = c.dp * d.ep_size + c.ep; key = c.tp; }
    else if (kind == MOE_EP_GROUP_DP) { color = c.ep * d.tp_size + c.tp; key = c.dp; }
    else {
        moe_ep__text(err_text, err_size, "moe_ep_layout_split: kind (%d) is not a moe_ep_group_kind", (int)kind);
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    }
    res = world->split(world->impl, color, key, out, err, sizeof err);
    if (res != MOE_EP_OK)
        moe_ep__text(err_text, err_size, "moe_ep_layout_split: transport '%s' failed to split: %s%s%s",
                     world->name ? world->name : "?", moe_ep_result_string(res), err[0] ? ": " : "", err);
    return res;
}

/* ======================================================================== */
/* KERNELS: the expert FFN on the CPU -- paths, weight formats, packing and blocking.
   Last in the file because it is the longest and the least read: the pipeline above
   reaches it through moe_ep__select_path, moe_ep__pack_expert, moe_ep__ffn and
   moe_ep__router_logits. */
/* >>kernel: packed weights and the deterministic FFN.

   Determinism: every output element is one multiply-add chain over k = 0, 1, ..., K-1
   that starts from zero. Row tiles, column panels, K blocks and threads decide only
   where a chain runs and where its running sum waits between K blocks (registers or a
   scratch tile, which holds it exactly), never its order; so a row's output does not
   depend on how many rows came with it or on the thread count. The SIMD paths fuse
   each multiply-add (one rounding), and so does the portable path (moe_ep__fma_row): every
   path gives the same bits.

   Paths (moe_ep_kernel): with gcc or clang on x86 every path is compiled -- the SIMD ones
   as functions with __attribute__((target(...))) -- and moe_ep_create takes the best one
   the CPU has (__builtin_cpu_supports: AVX-512F, else AVX2 with FMA and F16C, else the
   portable C), or the one desc.kernel names. Elsewhere the SIMD path follows the compiler's
   target macros (AVX-512F, AVX2+FMA, AArch64 NEON), beside the portable one.
   MOE_EP_NO_SIMD leaves only the portable path. SIMD code is only in leaf functions that
   the path's pointers reach, never in a function with an OpenMP region (an outlined region
   does not inherit its function's target attribute). MOE_EP_CBLAS sends the three products
   of an expert to cblas_sgemm instead (the CBLAS moe_ep__ffn below).

   Weight formats: a panel holds the format's elements (fp32, bf16, fp16, int8) in the same
   order. Before the micro-kernel reads a KC x NR slice of a narrow panel, the path widens it
   to fp32 in the thread's scratch (bf16, fp16 and int8 values are all floats, so exactly);
   the chains are then the fp32 kernel's over the widened weights, and the bits of a format
   are the same on every path. For decode (a block of at most NARROW_ROWS rows) the SIMD paths
   have kernels that read the stored panel and widen it in registers instead (micro_narrow):
   the same chains. int8's per-channel scale multiplies the finished chain once, fused with
   the bias (fmaf(sum, scale, bias), on every path).

   The BF16_DOT arithmetic (opt-in, bf16 weights): the activations (x, and the hidden rows
   between the two products) are rounded to bf16 as they are packed, and tiles and panels
   hold bf16 pairs (k = 2i, 2i + 1) in 32-bit elements, the even k first in memory (the
   activations' pairs are 32-bit values, the even k in the low half; the same bytes on a
   little-endian CPU, and the portable kernel reads each as it was written): the
   products above run unchanged over ceil(K / 2) such elements, and the path's micro_dot
   does what one lane of vdpbf16ps does with each (>>bf16 dot). Its chains are fixed as the
   exact arithmetic's are, so its bits are the same on every path and split.

   Layout: a weight W [n, k] (nn.Linear) is packed as ceil(n / NR) panels, each [k][NR]
   contiguous (columns past n are zero). For the gated activations (SwiGLU, clamped
   SwiGLU) a panel holds NR/2 columns of w1 followed by the same NR/2 columns of w3, so
   one pass over x feeds both and act(x w1 + b1, x w3 + b3) is formed in registers and
   written once. A weight's biases (and int8 scales) follow its panels, NR per panel in the
   panel's column order; the epilogue applies them once to the finished chains, so they
   change no chain's order. The user's tensors are read through moe_ep__wview (any weight
   layout, the TP slice, fp32 or already in the format). Activations are read as they are
   (row-major); the hidden rows are padded to whole panels. NR and MR are the path's.

   Blocking (per thread, over its share of the column panels): NCP panels x MC rows x
   KC-deep slices; the KC x NR weight slice stays in L1 while MR-row tiles stream past
   it, and unfinished sums wait in the thread's MC x NCP*NR scratch. */
/* g++ 12 reports the _mm512_undefined_ps() pass-through inside avx512fintrin.h's own
   intrinsics as used uninitialised (a false positive, C++ only); silenced for the
   kernels alone. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#ifdef MOE_EP__DISPATCH                     /* every x86 path built; chosen at create */
#define MOE_EP__AVX512 1
#define MOE_EP__AVX2 1
#define MOE_EP__AVX2_F16C 1
#define MOE_EP__TARGET_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#define MOE_EP__TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define MOE_EP__AVX512_BF16 1
#define MOE_EP__TARGET_AVX512_BF16 __attribute__((target("avx512f,avx512bf16,avx2,fma,f16c")))
#include <immintrin.h>
#include <cpuid.h>
#elif !defined(MOE_EP_NO_SIMD) && !defined(MOE_EP_CBLAS) && defined(__AVX512F__)
#define MOE_EP__AVX512 1
#define MOE_EP__TARGET_AVX512
#ifdef __AVX512BF16__
#define MOE_EP__AVX512_BF16 1
#define MOE_EP__TARGET_AVX512_BF16
#endif
#include <immintrin.h>
#elif !defined(MOE_EP_NO_SIMD) && !defined(MOE_EP_CBLAS) && defined(__AVX2__) && defined(__FMA__)
#define MOE_EP__AVX2 1
#ifdef __F16C__
#define MOE_EP__AVX2_F16C 1
#endif
#define MOE_EP__TARGET_AVX2
#include <immintrin.h>
#elif !defined(MOE_EP_NO_SIMD) && !defined(MOE_EP_CBLAS) && defined(__ARM_NEON) && defined(__aarch64__)
#define MOE_EP__NEON 1
#include <arm_neon.h>
#endif
#define MOE_EP__MR_MAX 12                   /* the largest row tile and panel of any path */
#define MOE_EP__NR_MAX 32
#define MOE_EP__PMR 4                       /* the portable path's */
#define MOE_EP__PNR 16
#define MOE_EP__KC 256                      /* K slice: KC x NR weights in L1 */
#define MOE_EP__ALIGN 64

#ifdef MOE_EP_CBLAS
#ifndef MOE_EP_CBLAS_HEADER
#define MOE_EP_CBLAS_HEADER <cblas.h>
#endif
#include MOE_EP_CBLAS_HEADER
#endif

MOE_EP_PRIVATE float* moe_ep__aligned(float* raw) {
    return (float*)(((uintptr_t)raw + (MOE_EP__ALIGN - 1)) & ~(uintptr_t)(MOE_EP__ALIGN - 1));
}

#ifndef MOE_EP_CBLAS
MOE_EP_PRIVATE unsigned char* moe_ep__aligned_bytes(void* raw) {
    return (unsigned char*)(((uintptr_t)raw + (MOE_EP__ALIGN - 1)) & ~(uintptr_t)(MOE_EP__ALIGN - 1));
}

MOE_EP_PRIVATE int64_t moe_ep__round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }
#endif

MOE_EP_PRIVATE float moe_ep__act(moe_ep_activation act, float a, float b) {
    switch (act) {
    case MOE_EP_ACTIVATION_GELU: return moe_ep__gelu(a);
    case MOE_EP_ACTIVATION_RELU: return a > 0.0f ? a : 0.0f;
    default: return a / (1.0f + moe_ep__expf(-a)) * b;
    }
}

/* GPT-OSS: (clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha g'), g' = min(g, limit).
   (The SIMD paths have their own, moe_ep__vswiglu_clamped.) */
MOE_EP_PRIVATE float moe_ep__swiglu_clamped(float g, float u, float alpha, float limit) {
    g = g < limit ? g : limit;
    u = u < -limit ? -limit : u > limit ? limit : u;
    return (u + 1.0f) * (g / (1.0f + moe_ep__expf(-alpha * g)));
}

/* >>formats: the weight formats' elements, and the exact widening to float. */
MOE_EP_PRIVATE float moe_ep__bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* As vcvtph2ps: subnormals exact, a NaN comes out quiet with its payload. */
MOE_EP_PRIVATE float moe_ep__fp16_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, u;
    float f;
    if (exp == 0x1F) u = sign | 0x7F800000u | (man << 13) | (man ? 0x400000u : 0u);
    else if (exp != 0) u = sign | ((exp + 112u) << 23) | (man << 13);
    else {
        f = (float)man * 5.9604644775390625e-8f;    /* man * 2^-24: exact */
        return sign ? -f : f;
    }
    memcpy(&f, &u, sizeof f);
    return f;
}

#ifndef MOE_EP_CBLAS
/* float -> bf16 and fp16, to nearest even (NaN stays a quiet NaN); *overflow is set when a
   finite value rounds to infinity. */
MOE_EP_PRIVATE uint16_t moe_ep__float_to_bf16(float f, bool* overflow) {
    uint32_t u, r;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40u);
    r = u + 0x7FFFu + ((u >> 16) & 1u);
    if ((u & 0x7F800000u) != 0x7F800000u && (r & 0x7F800000u) == 0x7F800000u) *overflow = true;
    return (uint16_t)(r >> 16);
}

MOE_EP_PRIVATE uint16_t moe_ep__float_to_fp16(float f, bool* overflow) {
    uint32_t u, sign, a;
    memcpy(&u, &f, sizeof u);
    sign = (u >> 16) & 0x8000u;
    a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (uint16_t)(sign | 0x7E00u | ((a >> 13) & 0x3FFu));
    if (a == 0x7F800000u) return (uint16_t)(sign | 0x7C00u);
    if (a >= 0x477FF000u) {         /* 65520 and above round to infinity */
        *overflow = true;
        return (uint16_t)(sign | 0x7C00u);
    }
    if (a >= 0x38800000u) {         /* a normal half: round at bit 13, rebias the exponent */
        uint32_t r = a + 0xFFFu + ((a >> 13) & 1u);
        return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
    }
    if (a < 0x33000000u) return (uint16_t)sign;     /* below 2^-25 */
    {                               /* a subnormal half: units of 2^-24 */
        uint32_t m = (a & 0x7FFFFFu) | 0x800000u;
        int shift = 126 - (int)(a >> 23);
        uint32_t q = m >> shift, rest = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
        if (rest > half || (rest == half && (q & 1u))) ++q;
        return (uint16_t)(sign | q);
    }
}

/* int8: q = w / scale rounded to nearest (ties away from zero), within [-127, 127]. */
MOE_EP_PRIVATE int8_t moe_ep__quantize(float w, float scale) {
    float r = w / scale, a = r < 0.0f ? -r : r;
    int q;
    if (a > 127.0f) a = 127.0f;
    q = (int)a;
    if (a - (float)q >= 0.5f) ++q;
    return (int8_t)(r < 0.0f ? -q : q);
}
#endif

/* >>bf16 dot: the BF16_DOT arithmetic, as AVX512-BF16 defines it (Intel SDM: VCVTNE2PS2BF16,
   VDPBF16PS) and this file's tests check against the instruction, bit for bit. */
/* A bf16 input of vdpbf16ps: a subnormal reads as a zero of its sign (DAZ). */
MOE_EP_PRIVATE float moe_ep__bf16_daz(uint32_t h) {
    return moe_ep__bf16_to_float((uint16_t)((h & 0x7F80u) ? h : h & 0x8000u));
}

/* A zero with the sign bit of `like` (FTZ and DAZ keep the sign). */
MOE_EP_PRIVATE float moe_ep__signed_zero(float like) {
    uint32_t u;
    memcpy(&u, &like, sizeof u);
    u &= 0x80000000u;
    memcpy(&like, &u, sizeof u);
    return like;
}

/* acc + a * b with the product a float can hold only in double: its exact sum, rounded to odd
   (TwoSum's error decides the last bit), then to float, so rounded once; a sum that is below
   FLT_MIN once rounded to 24 bits (as if the exponent had no floor) is flushed. */
MOE_EP_PRIVATE float moe_ep__dot_step_wide(float acc, float a, float b) {
    double p = (double)a * (double)b, s = p + (double)acc, bv = s - p, err = (p - (s - bv)) + ((double)acc - bv);
    uint64_t u;
    if (s - s != 0.0) return (float)s;      /* infinite or NaN */
    memcpy(&u, &s, sizeof u);
    if (err != 0.0 && !(u & 1u)) {
        u = (err > 0.0) == (s > 0.0) ? u + 1u : u - 1u;
        memcpy(&s, &u, sizeof s);
    }
    if (s < FLT_MIN && s > -FLT_MIN) {
        const float min_scaled = (float)(1.0 / 4611686018427387904.0);     /* FLT_MIN * 2^64 = 2^-62 */
        float scaled = (float)(s * 18446744073709551616.0);                /* s * 2^64, rounded at 24 bits */
        if (scaled < min_scaled && scaled > -min_scaled) return moe_ep__signed_zero((float)s);
    }
    return (float)s;
}

/* One step of vdpbf16ps: acc + a * b, a and b bf16 values (subnormals read as zeros), the
   exact sum rounded once to nearest even; a subnormal acc reads as zero and a subnormal
   result is flushed to a zero of its sign. a * b has at most 16 significant bits, so a float
   holds it exactly unless it falls below FLT_MIN or overflows; then the wide step. The sum
   of two such floats below FLT_MIN is exact (a subnormal), so flushing it is the rule. */
MOE_EP_PRIVATE float moe_ep__dot_step(float acc, float a, float b) {
    float p = a * b, sum;
    if (acc < FLT_MIN && acc > -FLT_MIN) acc = moe_ep__signed_zero(acc);
    if (!(p >= FLT_MIN && p <= FLT_MAX) && !(p <= -FLT_MIN && p >= -FLT_MAX) && a != 0.0f && b != 0.0f)
        return moe_ep__dot_step_wide(acc, a, b);
    sum = acc + p;
    return sum < FLT_MIN && sum > -FLT_MIN ? moe_ep__signed_zero(sum) : sum;
}

#ifndef MOE_EP_CBLAS
/* An activation to bf16: to nearest even; a subnormal becomes a zero of its sign; a NaN quiet. */
MOE_EP_PRIVATE uint16_t moe_ep__bf16_of_activation(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7F800000u) == 0) return (uint16_t)((u >> 16) & 0x8000u);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* Two activations as the pair that vdpbf16ps reads: the even k in the low half. */
MOE_EP_PRIVATE uint32_t moe_ep__bf16_pair(float even, float odd) {
    return (uint32_t)moe_ep__bf16_of_activation(even) | (uint32_t)moe_ep__bf16_of_activation(odd) << 16;
}
#endif

/* n elements of format f at src -> floats at dst (the portable widening, and every path's tail). */
MOE_EP_PRIVATE void moe_ep__widen_portable(moe_ep_weight_format f, const void* src, int64_t n, float* dst) {
    int64_t i;
    if (f == MOE_EP_WEIGHT_FORMAT_BF16) {
        const uint16_t* s = (const uint16_t*)src;
        for (i = 0; i < n; ++i) dst[i] = moe_ep__bf16_to_float(s[i]);
    } else if (f == MOE_EP_WEIGHT_FORMAT_FP16) {
        const uint16_t* s = (const uint16_t*)src;
        for (i = 0; i < n; ++i) dst[i] = moe_ep__fp16_to_float(s[i]);
    } else if (f == MOE_EP_WEIGHT_FORMAT_INT8) {
        const int8_t* s = (const int8_t*)src;
        for (i = 0; i < n; ++i) dst[i] = (float)s[i];
    } else {
        memcpy(dst, src, sizeof(float) * (size_t)n);
    }
}

/* Element (i, kk) of a view as a float (the user's fp32, or a stored element widened). */
MOE_EP_PRIVATE float moe_ep__wget(const moe_ep__wview* v, int64_t i, int64_t kk) {
    int64_t at = i * v->row_stride + kk * v->k_stride;
    switch (v->format) {
    case MOE_EP_WEIGHT_FORMAT_BF16: return moe_ep__bf16_to_float(((const uint16_t*)v->base)[at]);
    case MOE_EP_WEIGHT_FORMAT_FP16: return moe_ep__fp16_to_float(((const uint16_t*)v->base)[at]);
    case MOE_EP_WEIGHT_FORMAT_INT8: return (float)((const int8_t*)v->base)[at];
    default: return ((const float*)v->base)[at];
    }
}

/* What the micro-kernel does with its finished sums: with scale (int8), sum * scale + bias in
   one fused step (bias 0 without one), else add the bias (NR floats in panel order; NULL:
   none); then store them (gated 0), or write SwiGLU (1) or clamped SwiGLU (2) of the panel's
   two halves. */
typedef struct moe_ep__epilogue {
    const float* bias;
    const float* scale;
    int gated;
    float alpha, limit;
} moe_ep__epilogue;

/* The micro-kernel: C[rows][NR] = Cin (or 0) + A[rows][kc] . B[kc][NR], A and B slices
   of packed tiles ([kc][MR] and [kc][NR]), rows in [1, MR]. ep (NULL: store C as it is):
   the epilogue above; a gated epilogue writes NR/2 columns. */
typedef void (*moe_ep__micro_fn)(int rows, int kc, const float* a, const float* b, const float* cin, int64_t ldc,
                                 float* cout, int64_t ldo, const moe_ep__epilogue* ep);
typedef void (*moe_ep__kernel_fn)(int kc, const float* a, const float* b, const float* cin, int64_t ldc,
                                  float* cout, int64_t ldo, const moe_ep__epilogue* ep);
typedef void (*moe_ep__widen_fn)(moe_ep_weight_format f, const void* src, int64_t n, float* dst);
/* The router's logits of up to 8 tokens for experts [e, e + strip) (>>router kernel). */
typedef void (*moe_ep__strip_fn)(const float* x, int64_t rows, int D, const float* wt, int E, int e, float* logits);

typedef struct moe_ep__path moe_ep__path;
struct moe_ep__path {
    moe_ep_kernel kernel;
    int mr, nr;                     /* row tile, panel width */
    moe_ep__micro_fn micro;
    moe_ep__widen_fn widen;
    int strip;                      /* experts per router strip; 0: none */
    moe_ep__strip_fn router_strip;
    /* by format: a micro-kernel for rows in [1, MOE_EP__NARROW_ROWS] that reads the stored
       panel and widens it in registers (decode); NULL: widen each slice first */
    moe_ep__micro_fn micro_narrow[MOE_EP_WEIGHT_FORMAT_COUNT];
    /* the BF16_DOT arithmetic's micro-kernel (A and B of bf16 pairs, >>bf16 dot); NULL: none */
    moe_ep__micro_fn micro_dot;
};
#define MOE_EP__NARROW_ROWS 4

#define MOE_EP__ROWS1(X) X(0)
#define MOE_EP__ROWS2(X) MOE_EP__ROWS1(X) X(1)
#define MOE_EP__ROWS3(X) MOE_EP__ROWS2(X) X(2)
#define MOE_EP__ROWS4(X) MOE_EP__ROWS3(X) X(3)
#define MOE_EP__ROWS5(X) MOE_EP__ROWS4(X) X(4)
#define MOE_EP__ROWS6(X) MOE_EP__ROWS5(X) X(5)
#define MOE_EP__ROWS7(X) MOE_EP__ROWS6(X) X(6)
#define MOE_EP__ROWS8(X) MOE_EP__ROWS7(X) X(7)
#define MOE_EP__ROWS9(X) MOE_EP__ROWS8(X) X(8)
#define MOE_EP__ROWS10(X) MOE_EP__ROWS9(X) X(9)
#define MOE_EP__ROWS11(X) MOE_EP__ROWS10(X) X(10)
#define MOE_EP__ROWS12(X) MOE_EP__ROWS11(X) X(11)
#define MOE_EP__PASTE_(a, b) a##b
#define MOE_EP__PASTE(a, b) MOE_EP__PASTE_(a, b)

/* One micro-kernel per row count, for the path whose macros are defined (VP: its names'
   prefix, VT: its target attribute): K_PANEL loads step kk of the weight panel, K_FMA adds
   it into row r's accumulators, K_SCALE or K_BIAS applies int8's scale and the bias once
   to the finished sums, K_STORE / K_SWIGLU / K_CLAMPED write the rows out. */
#define MOE_EP__KERNEL(ROWS, n) MOE_EP__KERNEL_P(ROWS, _kernel##n, MOE_EP__K_PANEL)
/* PANEL: how step kk of the panel becomes vectors b0, b1 (K_PANEL: floats; the narrow
   formats' K_PANEL_BF16, _FP16, _INT8 widen the stored elements in registers, exactly). */
#define MOE_EP__KERNEL_P(ROWS, name, PANEL) \
    MOE_EP_PRIVATE MOE_EP__VT void MOE_EP__PASTE(MOE_EP__VP, name)(int kc, const float* a, const float* b, \
        const float* cin, int64_t ldc, float* cout, int64_t ldo, const moe_ep__epilogue* ep) { \
        int kk; \
        ROWS(MOE_EP__K_DECL) \
        if (cin) { ROWS(MOE_EP__K_LOAD) } else { ROWS(MOE_EP__K_ZERO) } \
        for (kk = 0; kk < kc; ++kk) { \
            PANEL \
            ROWS(MOE_EP__K_FMA) \
        } \
        if (!ep) { ROWS(MOE_EP__K_STORE) return; } \
        if (ep->scale) { MOE_EP__K_SCALE_LOAD ROWS(MOE_EP__K_SCALE) } \
        else if (ep->bias) { MOE_EP__K_BIAS_LOAD ROWS(MOE_EP__K_BIAS) } \
        if (ep->gated == 1) { ROWS(MOE_EP__K_SWIGLU) } \
        else if (ep->gated == 2) { MOE_EP__K_CLAMP_SETUP ROWS(MOE_EP__K_CLAMPED) } \
        else { ROWS(MOE_EP__K_STORE) } \
    }

/* Decode (one row tile of up to 4 rows): the narrow formats' kernels read the stored panel
   and widen it in registers, and the path's micro_narrow picks them. */
#define MOE_EP__NARROW_KERNELS(FMT) \
    MOE_EP__KERNEL_P(MOE_EP__ROWS1, _##FMT##_1, MOE_EP__K_PANEL_##FMT) \
    MOE_EP__KERNEL_P(MOE_EP__ROWS2, _##FMT##_2, MOE_EP__K_PANEL_##FMT) \
    MOE_EP__KERNEL_P(MOE_EP__ROWS3, _##FMT##_3, MOE_EP__K_PANEL_##FMT) \
    MOE_EP__KERNEL_P(MOE_EP__ROWS4, _##FMT##_4, MOE_EP__K_PANEL_##FMT) \
    MOE_EP_PRIVATE void MOE_EP__PASTE(MOE_EP__VP, _micro_##FMT)(int rows, int kc, const float* a, const float* b, \
        const float* cin, int64_t ldc, float* cout, int64_t ldo, const moe_ep__epilogue* ep) { \
        static const moe_ep__kernel_fn kernels[5] = { NULL, MOE_EP__PASTE(MOE_EP__VP, _##FMT##_1), \
            MOE_EP__PASTE(MOE_EP__VP, _##FMT##_2), MOE_EP__PASTE(MOE_EP__VP, _##FMT##_3), \
            MOE_EP__PASTE(MOE_EP__VP, _##FMT##_4) }; \
        kernels[rows](kc, a, b, cin, ldc, cout, ldo, ep); \
    }
/* The router's strip for the path whose macros are defined: the sums of 8 tokens x 2
   vectors of experts in registers while that strip of W^T streams by. */
#define MOE_EP__RZERO(r) acc[r][0] = acc[r][1] = MOE_EP__VSET1(0.0f);
#define MOE_EP__RROW(r) \
    if (r < rows) { \
        MOE_EP__V xv = MOE_EP__VSET1(x[(r) * D + i]); \
        acc[r][0] = MOE_EP__VFMA3(xv, w0, acc[r][0]); \
        acc[r][1] = MOE_EP__VFMA3(xv, w1, acc[r][1]); \
    }
#define MOE_EP__RSAVE(r) \
    if (r < rows) { \
        MOE_EP__VSTORE(logits + (r) * E + e, acc[r][0]); \
        MOE_EP__VSTORE(logits + (r) * E + e + MOE_EP__VW, acc[r][1]); \
    }
#define MOE_EP__STRIP \
    MOE_EP_PRIVATE MOE_EP__VT void MOE_EP__PASTE(MOE_EP__VP, _strip)(const float* x, int64_t rows, int D, \
        const float* wt, int E, int e, float* logits) { \
        MOE_EP__V acc[MOE_EP__ROUTER_ROWS][2]; \
        int64_t i; \
        MOE_EP__ROWS8(MOE_EP__RZERO) \
        for (i = 0; i < D; ++i) { \
            const float* w = wt + i * E + e; \
            MOE_EP__V w0 = MOE_EP__VLOAD(w), w1 = MOE_EP__VLOAD(w + MOE_EP__VW); \
            MOE_EP__ROWS8(MOE_EP__RROW) \
        } \
        MOE_EP__ROWS8(MOE_EP__RSAVE) \
    }

#if defined(MOE_EP__AVX512) || defined(MOE_EP__AVX2)
/* The x86 paths' code, written once over these vector macros and instantiated per path. */
/* exp(x) for x clamped to [-87, 88] (Cephes expf: 2^n times a degree-6 polynomial), as
   moe_ep__expf, op for op; silu(g) * u = g / (1 + exp(-g)) * u; clamped SwiGLU as
   moe_ep__swiglu_clamped, with nalpha = -alpha, nlimit = -limit. */
#define MOE_EP__X86_MATH \
    MOE_EP_PRIVATE MOE_EP__VT MOE_EP__V MOE_EP__PASTE(MOE_EP__VP, _vexp)(MOE_EP__V x) { \
        MOE_EP__V n, r, p; \
        x = MOE_EP__VMIN(MOE_EP__VMAX(x, MOE_EP__VSET1(-87.0f)), MOE_EP__VSET1(88.0f)); \
        n = MOE_EP__VSUB(MOE_EP__VFMA(x, MOE_EP__VSET1(1.44269504088896341f), MOE_EP__VSET1(12582912.0f)), \
                         MOE_EP__VSET1(12582912.0f)); \
        r = MOE_EP__VFNMA(n, MOE_EP__VSET1(0.693359375f), x); \
        r = MOE_EP__VFNMA(n, MOE_EP__VSET1(-2.12194440e-4f), r); \
        p = MOE_EP__VSET1(1.9875691500e-4f); \
        p = MOE_EP__VFMA(p, r, MOE_EP__VSET1(1.3981999507e-3f)); \
        p = MOE_EP__VFMA(p, r, MOE_EP__VSET1(8.3334519073e-3f)); \
        p = MOE_EP__VFMA(p, r, MOE_EP__VSET1(4.1665795894e-2f)); \
        p = MOE_EP__VFMA(p, r, MOE_EP__VSET1(1.6666665459e-1f)); \
        p = MOE_EP__VFMA(p, r, MOE_EP__VSET1(5.0000001201e-1f)); \
        p = MOE_EP__VFMA(p, MOE_EP__VMUL(r, r), MOE_EP__VADD(r, MOE_EP__VSET1(1.0f))); \
        return MOE_EP__VMUL(p, MOE_EP__VPOW2(n)); \
    } \
    MOE_EP_PRIVATE MOE_EP__VT MOE_EP__V MOE_EP__PASTE(MOE_EP__VP, _vswiglu)(MOE_EP__V g, MOE_EP__V u) { \
        MOE_EP__V e = MOE_EP__PASTE(MOE_EP__VP, _vexp)(MOE_EP__VMUL(g, MOE_EP__VSET1(-1.0f))); \
        return MOE_EP__VMUL(MOE_EP__VDIV(g, MOE_EP__VADD(MOE_EP__VSET1(1.0f), e)), u); \
    } \
    MOE_EP_PRIVATE MOE_EP__VT MOE_EP__V MOE_EP__PASTE(MOE_EP__VP, _vswiglu_clamped)(MOE_EP__V g, MOE_EP__V u, \
        MOE_EP__V nalpha, MOE_EP__V limit, MOE_EP__V nlimit) { \
        MOE_EP__V e, one = MOE_EP__VSET1(1.0f); \
        g = MOE_EP__VMIN(g, limit); \
        u = MOE_EP__VMAX(MOE_EP__VMIN(u, limit), nlimit); \
        e = MOE_EP__PASTE(MOE_EP__VP, _vexp)(MOE_EP__VMUL(g, nalpha)); \
        return MOE_EP__VMUL(MOE_EP__VADD(u, one), MOE_EP__VDIV(g, MOE_EP__VADD(one, e))); \
    }

/* Two vectors of accumulators per row: the panel is 2 * VW = NR columns wide. */
#define MOE_EP__K_DECL(r) MOE_EP__V c##r##a, c##r##b;
#define MOE_EP__K_ZERO(r) c##r##a = MOE_EP__VZERO(); c##r##b = c##r##a;
#define MOE_EP__K_LOAD(r) c##r##a = MOE_EP__VLOAD(cin + (r) * ldc); c##r##b = MOE_EP__VLOAD(cin + (r) * ldc + MOE_EP__VW);
#define MOE_EP__K_FMA(r) { MOE_EP__V av = MOE_EP__VBCAST(a + (int64_t)kk * MOE_EP__VMR + (r)); \
    c##r##a = MOE_EP__VFMA(av, b0, c##r##a); c##r##b = MOE_EP__VFMA(av, b1, c##r##b); }
#define MOE_EP__K_STORE(r) MOE_EP__VSTORE(cout + (r) * ldo, c##r##a); MOE_EP__VSTORE(cout + (r) * ldo + MOE_EP__VW, c##r##b);
#define MOE_EP__K_SWIGLU(r) MOE_EP__VSTORE(cout + (r) * ldo, MOE_EP__PASTE(MOE_EP__VP, _vswiglu)(c##r##a, c##r##b));
#define MOE_EP__K_CLAMPED(r) MOE_EP__VSTORE(cout + (r) * ldo, \
    MOE_EP__PASTE(MOE_EP__VP, _vswiglu_clamped)(c##r##a, c##r##b, nalpha, limit, nlimit));
#define MOE_EP__K_BIAS_LOAD MOE_EP__V bias0 = MOE_EP__VLOAD(ep->bias), bias1 = MOE_EP__VLOAD(ep->bias + MOE_EP__VW);
#define MOE_EP__K_BIAS(r) c##r##a = MOE_EP__VADD(c##r##a, bias0); c##r##b = MOE_EP__VADD(c##r##b, bias1);
#define MOE_EP__K_SCALE_LOAD MOE_EP__V s0 = MOE_EP__VLOAD(ep->scale), s1 = MOE_EP__VLOAD(ep->scale + MOE_EP__VW), \
    bias0 = ep->bias ? MOE_EP__VLOAD(ep->bias) : MOE_EP__VZERO(), \
    bias1 = ep->bias ? MOE_EP__VLOAD(ep->bias + MOE_EP__VW) : MOE_EP__VZERO();
#define MOE_EP__K_SCALE(r) c##r##a = MOE_EP__VFMA(c##r##a, s0, bias0); c##r##b = MOE_EP__VFMA(c##r##b, s1, bias1);
#define MOE_EP__K_CLAMP_SETUP MOE_EP__V nalpha = MOE_EP__VSET1(-ep->alpha), limit = MOE_EP__VSET1(ep->limit), \
    nlimit = MOE_EP__VSET1(-ep->limit);
#define MOE_EP__K_PANEL MOE_EP__V b0 = MOE_EP__VLOADA(b + (int64_t)kk * MOE_EP__VNR); \
    MOE_EP__V b1 = MOE_EP__VLOADA(b + (int64_t)kk * MOE_EP__VNR + MOE_EP__VW);
#define MOE_EP__VFMA3 MOE_EP__VFMA
#define MOE_EP__K_PANEL_NARROW(T, WIDEN) const T* bk = (const T*)(const void*)b + (int64_t)kk * MOE_EP__VNR; \
    MOE_EP__V b0 = WIDEN(bk), b1 = WIDEN(bk + MOE_EP__VW);
#define MOE_EP__K_PANEL_BF16 MOE_EP__K_PANEL_NARROW(uint16_t, MOE_EP__VWIDEN_BF16)
#define MOE_EP__K_PANEL_FP16 MOE_EP__K_PANEL_NARROW(uint16_t, MOE_EP__VWIDEN_FP16)
#define MOE_EP__K_PANEL_INT8 MOE_EP__K_PANEL_NARROW(int8_t, MOE_EP__VWIDEN_INT8)
#endif /* AVX-512 or AVX2 */

#ifdef MOE_EP__AVX512
/* >>AVX-512: MR 12 rows x NR 32 columns (two zmm per row). */
#define MOE_EP__VP moe_ep__avx512
#define MOE_EP__VT MOE_EP__TARGET_AVX512
#define MOE_EP__VMR 12
#define MOE_EP__VNR 32
#define MOE_EP__V __m512
#define MOE_EP__VW 16
#define MOE_EP__VSET1 _mm512_set1_ps
#define MOE_EP__VZERO _mm512_setzero_ps
#define MOE_EP__VLOAD _mm512_loadu_ps
#define MOE_EP__VLOADA _mm512_load_ps
#define MOE_EP__VSTORE _mm512_storeu_ps
#define MOE_EP__VFMA _mm512_fmadd_ps
#define MOE_EP__VFNMA _mm512_fnmadd_ps
#define MOE_EP__VMUL _mm512_mul_ps
#define MOE_EP__VADD _mm512_add_ps
#define MOE_EP__VDIV _mm512_div_ps
#define MOE_EP__VMIN _mm512_min_ps
#define MOE_EP__VMAX _mm512_max_ps
#define MOE_EP__VSUB _mm512_sub_ps
#define MOE_EP__VPOW2(n) _mm512_castsi512_ps(_mm512_slli_epi32( \
    _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23))
#define MOE_EP__VBCAST(p) _mm512_set1_ps(*(p))
#define MOE_EP__VWIDEN_BF16(p) _mm512_castsi512_ps(_mm512_slli_epi32( \
    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(const void*)(p))), 16))
#define MOE_EP__VWIDEN_FP16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(const void*)(p)))
#define MOE_EP__VWIDEN_INT8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(const void*)(p))))
MOE_EP__X86_MATH
MOE_EP__NARROW_KERNELS(BF16)
MOE_EP__NARROW_KERNELS(FP16)
MOE_EP__NARROW_KERNELS(INT8)
MOE_EP__KERNEL(MOE_EP__ROWS1, 1)
MOE_EP__KERNEL(MOE_EP__ROWS2, 2)
MOE_EP__KERNEL(MOE_EP__ROWS3, 3)
MOE_EP__KERNEL(MOE_EP__ROWS4, 4)
MOE_EP__KERNEL(MOE_EP__ROWS5, 5)
MOE_EP__KERNEL(MOE_EP__ROWS6, 6)
MOE_EP__KERNEL(MOE_EP__ROWS7, 7)
MOE_EP__KERNEL(MOE_EP__ROWS8, 8)
MOE_EP__KERNEL(MOE_EP__ROWS9, 9)
MOE_EP__KERNEL(MOE_EP__ROWS10, 10)
MOE_EP__KERNEL(MOE_EP__ROWS11, 11)
MOE_EP__KERNEL(MOE_EP__ROWS12, 12)
MOE_EP__STRIP

MOE_EP_PRIVATE void moe_ep__avx512_micro(int rows, int kc, const float* a, const float* b, const float* cin,
                                         int64_t ldc, float* cout, int64_t ldo, const moe_ep__epilogue* ep) {
    static const moe_ep__kernel_fn kernels[13] = {
        NULL, moe_ep__avx512_kernel1, moe_ep__avx512_kernel2, moe_ep__avx512_kernel3, moe_ep__avx512_kernel4,
        moe_ep__avx512_kernel5, moe_ep__avx512_kernel6, moe_ep__avx512_kernel7, moe_ep__avx512_kernel8,
        moe_ep__avx512_kernel9, moe_ep__avx512_kernel10, moe_ep__avx512_kernel11, moe_ep__avx512_kernel12
    };
    kernels[rows](kc, a, b, cin, ldc, cout, ldo, ep);
}

/* bf16: the bits shifted up; fp16: vcvtph2ps; int8: sign-extended, then converted. */
MOE_EP_PRIVATE MOE_EP__TARGET_AVX512 void moe_ep__avx512_widen(moe_ep_weight_format f, const void* src, int64_t n,
                                                               float* dst) {
    int64_t i = 0;
    if (f == MOE_EP_WEIGHT_FORMAT_BF16) {
        const uint16_t* s = (const uint16_t*)src;
        for (; i + 16 <= n; i += 16)
            _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(const void*)(s + i))), 16)));
    } else if (f == MOE_EP_WEIGHT_FORMAT_FP16) {
        const uint16_t* s = (const uint16_t*)src;
        for (; i + 16 <= n; i += 16)
            _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(const void*)(s + i))));
    } else if (f == MOE_EP_WEIGHT_FORMAT_INT8) {
        const int8_t* s = (const int8_t*)src;
        for (; i + 16 <= n; i += 16)
            _mm512_storeu_ps(dst + i, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                _mm_loadu_si128((const __m128i*)(const void*)(s + i)))));
    }
    if (i < n) moe_ep__widen_portable(f, (const unsigned char*)src + i * moe_ep__format_bytes(f), n - i, dst + i);
}

#ifdef MOE_EP__AVX512_BF16
/* >>AVX512-BF16: the BF16_DOT arithmetic, 12 rows x 32 columns, one vdpbf16ps per row and
   16 columns for each pair of k (the bits of moe_ep__dot_pair, lane by lane). */
#define MOE_EP__K_DOT(r) { int32_t pair; \
    memcpy(&pair, a + (int64_t)kk * MOE_EP__VMR + (r), sizeof pair); \
    { __m512bh av = (__m512bh)_mm512_set1_epi32(pair); \
      c##r##a = _mm512_dpbf16_ps(c##r##a, b0, av); c##r##b = _mm512_dpbf16_ps(c##r##b, b1, av); } }
#define MOE_EP__KERNEL_DOT(ROWS, n) \
    MOE_EP_PRIVATE MOE_EP__TARGET_AVX512_BF16 void moe_ep__avx512_dot##n(int kc, const float* a, const float* b, \
        const float* cin, int64_t ldc, float* cout, int64_t ldo, const moe_ep__epilogue* ep) { \
        int kk; \
        ROWS(MOE_EP__K_DECL) \
        if (cin) { ROWS(MOE_EP__K_LOAD) } else { ROWS(MOE_EP__K_ZERO) } \
        for (kk = 0; kk < kc; ++kk) { \
            __m512bh b0 = (__m512bh)_mm512_load_si512((const void*)(b + (int64_t)kk * MOE_EP__VNR)); \
            __m512bh b1 = (__m512bh)_mm512_load_si512((const void*)(b + (int64_t)kk * MOE_EP__VNR + MOE_EP__VW)); \
            ROWS(MOE_EP__K_DOT) \
        } \
        if (!ep) { ROWS(MOE_EP__K_STORE) return; } \
        if (ep->bias) { MOE_EP__K_BIAS_LOAD ROWS(MOE_EP__K_BIAS) } \
        if (ep->gated == 1) { ROWS(MOE_EP__K_SWIGLU) } \
        else if (ep->gated == 2) { MOE_EP__K_CLAMP_SETUP ROWS(MOE_EP__K_CLAMPED) } \
        else { ROWS(MOE_EP__K_STORE) } \
    }
MOE_EP__KERNEL_DOT(MOE_EP__ROWS1, 1)
MOE_EP__KERNEL_DOT(MOE_EP__ROWS2, 2)
MOE_EP__KERNEL_DOT(MOE_EP__ROWS3, 3)
MOE_EP__KERNEL_DOT(MOE_EP__ROWS4, 4)
MOE_EP__KERNEL_DOT(MOE_EP__ROWS5, 5)
MOE_EP__KERNEL_DOT(MOE_EP__ROWS6, 6)
MOE_EP__KERNEL_DOT(MOE_EP__ROWS7, 7)
MOE_EP__KERNEL_DOT(MOE_EP__ROWS8, 8)
MOE_EP__KERNEL_DOT(MOE_EP__ROWS9, 9)
MOE_EP__KERNEL_DOT(MOE_EP__ROWS10, 10)
MOE_EP__KERNEL_DOT(MOE_EP__ROWS11, 11)
MOE_EP__KERNEL_DOT(MOE_EP__ROWS12, 12)
#undef MOE_EP__K_DOT
#undef MOE_EP__KERNEL_DOT

MOE_EP_PRIVATE void moe_ep__avx512_dot_micro(int rows, int kc, const float* a, const float* b, const float* cin,
                                             int64_t ldc, float* cout, int64_t ldo, const moe_ep__epilogue* ep) {
    static const moe_ep__kernel_fn kernels[13] = {
        NULL, moe_ep__avx512_dot1, moe_ep__avx512_dot2, moe_ep__avx512_dot3, moe_ep__avx512_dot4,
        moe_ep__avx512_dot5, moe_ep__avx512_dot6, moe_ep__avx512_dot7, moe_ep__avx512_dot8,
        moe_ep__avx512_dot9, moe_ep__avx512_dot10, moe_ep__avx512_dot11, moe_ep__avx512_dot12
    };
    kernels[rows](kc, a, b, cin, ldc, cout, ldo, ep);
}

/* 16 lanes of vdpbf16ps, for the check that this CPU's instruction is the emulation's. */
MOE_EP_PRIVATE MOE_EP__TARGET_AVX512_BF16 void moe_ep__avx512_dot_lanes(const float* acc, const uint32_t* x,
                                                                         const uint32_t* w, float* out) {
    __m512bh xv = (__m512bh)_mm512_loadu_si512((const void*)x), wv = (__m512bh)_mm512_loadu_si512((const void*)w);
    _mm512_storeu_ps(out, _mm512_dpbf16_ps(_mm512_loadu_ps(acc), wv, xv));
}
#endif

static const moe_ep__path moe_ep__path_avx512 = {
    MOE_EP_KERNEL_AVX512, 12, 32, moe_ep__avx512_micro, moe_ep__avx512_widen, 32, moe_ep__avx512_strip,
    { NULL, NULL, moe_ep__avx512_micro_BF16, moe_ep__avx512_micro_FP16, moe_ep__avx512_micro_INT8 }, NULL
};
#ifdef MOE_EP__AVX512_BF16
static const moe_ep__path moe_ep__path_avx512_bf16 = {
    MOE_EP_KERNEL_AVX512_BF16, 12, 32, moe_ep__avx512_micro, moe_ep__avx512_widen, 32, moe_ep__avx512_strip,
    { NULL, NULL, NULL, NULL, NULL }, moe_ep__avx512_dot_micro
};
#endif
#undef MOE_EP__VP
#undef MOE_EP__VT
#undef MOE_EP__VMR
#undef MOE_EP__VNR
#undef MOE_EP__V
#undef MOE_EP__VW
#undef MOE_EP__VSET1
#undef MOE_EP__VZERO
#undef MOE_EP__VLOAD
#undef MOE_EP__VLOADA
#undef MOE_EP__VSTORE
#undef MOE_EP__VFMA
#undef MOE_EP__VFNMA
#undef MOE_EP__VMUL
#undef MOE_EP__VADD
#undef MOE_EP__VDIV
#undef MOE_EP__VMIN
#undef MOE_EP__VMAX
#undef MOE_EP__VSUB
#undef MOE_EP__VPOW2
#undef MOE_EP__VBCAST
#undef MOE_EP__VWIDEN_BF16
#undef MOE_EP__VWIDEN_FP16
#undef MOE_EP__VWIDEN_INT8
#endif /* AVX-512 */

#ifdef MOE_EP__AVX2
/* >>AVX2: MR 6 rows x NR 16 columns (two ymm per row). */
#define MOE_EP__VP moe_ep__avx2
#define MOE_EP__VT MOE_EP__TARGET_AVX2
#define MOE_EP__VMR 6
#define MOE_EP__VNR 16
#define MOE_EP__V __m256
#define MOE_EP__VW 8
#define MOE_EP__VSET1 _mm256_set1_ps
#define MOE_EP__VZERO _mm256_setzero_ps
#define MOE_EP__VLOAD _mm256_loadu_ps
#define MOE_EP__VLOADA _mm256_load_ps
#define MOE_EP__VSTORE _mm256_storeu_ps
#define MOE_EP__VFMA _mm256_fmadd_ps
#define MOE_EP__VFNMA _mm256_fnmadd_ps
#define MOE_EP__VMUL _mm256_mul_ps
#define MOE_EP__VADD _mm256_add_ps
#define MOE_EP__VDIV _mm256_div_ps
#define MOE_EP__VMIN _mm256_min_ps
#define MOE_EP__VMAX _mm256_max_ps
#define MOE_EP__VSUB _mm256_sub_ps
#define MOE_EP__VPOW2(n) _mm256_castsi256_ps(_mm256_slli_epi32( \
    _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23))
#define MOE_EP__VBCAST(p) _mm256_broadcast_ss(p)
#define MOE_EP__VWIDEN_BF16(p) _mm256_castsi256_ps(_mm256_slli_epi32( \
    _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(const void*)(p))), 16))
#define MOE_EP__VWIDEN_FP16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(const void*)(p)))
#define MOE_EP__VWIDEN_INT8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(const void*)(p))))
MOE_EP__X86_MATH
MOE_EP__NARROW_KERNELS(BF16)
#ifdef MOE_EP__AVX2_F16C
MOE_EP__NARROW_KERNELS(FP16)
#define MOE_EP__AVX2_MICRO_FP16 moe_ep__avx2_micro_FP16
#else
#define MOE_EP__AVX2_MICRO_FP16 NULL
#endif
MOE_EP__NARROW_KERNELS(INT8)
MOE_EP__KERNEL(MOE_EP__ROWS1, 1)
MOE_EP__KERNEL(MOE_EP__ROWS2, 2)
MOE_EP__KERNEL(MOE_EP__ROWS3, 3)
MOE_EP__KERNEL(MOE_EP__ROWS4, 4)
MOE_EP__KERNEL(MOE_EP__ROWS5, 5)
MOE_EP__KERNEL(MOE_EP__ROWS6, 6)
MOE_EP__STRIP

MOE_EP_PRIVATE void moe_ep__avx2_micro(int rows, int kc, const float* a, const float* b, const float* cin,
                                       int64_t ldc, float* cout, int64_t ldo, const moe_ep__epilogue* ep) {
    static const moe_ep__kernel_fn kernels[7] = {
        NULL, moe_ep__avx2_kernel1, moe_ep__avx2_kernel2, moe_ep__avx2_kernel3, moe_ep__avx2_kernel4,
        moe_ep__avx2_kernel5, moe_ep__avx2_kernel6
    };
    kernels[rows](kc, a, b, cin, ldc, cout, ldo, ep);
}

MOE_EP_PRIVATE MOE_EP__TARGET_AVX2 void moe_ep__avx2_widen(moe_ep_weight_format f, const void* src, int64_t n,
                                                           float* dst) {
    int64_t i = 0;
    if (f == MOE_EP_WEIGHT_FORMAT_BF16) {
        const uint16_t* s = (const uint16_t*)src;
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(const void*)(s + i))), 16)));
#ifdef MOE_EP__AVX2_F16C
    } else if (f == MOE_EP_WEIGHT_FORMAT_FP16) {
        const uint16_t* s = (const uint16_t*)src;
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(const void*)(s + i))));
#endif
    } else if (f == MOE_EP_WEIGHT_FORMAT_INT8) {
        const int8_t* s = (const int8_t*)src;
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                _mm_loadl_epi64((const __m128i*)(const void*)(s + i)))));
    }
    if (i < n) moe_ep__widen_portable(f, (const unsigned char*)src + i * moe_ep__format_bytes(f), n - i, dst + i);
}

static const moe_ep__path moe_ep__path_avx2 = {
    MOE_EP_KERNEL_AVX2, 6, 16, moe_ep__avx2_micro, moe_ep__avx2_widen, 16, moe_ep__avx2_strip,
    { NULL, NULL, moe_ep__avx2_micro_BF16, MOE_EP__AVX2_MICRO_FP16, moe_ep__avx2_micro_INT8 }, NULL
};
#undef MOE_EP__VP
#undef MOE_EP__VT
#undef MOE_EP__VMR
#undef MOE_EP__VNR
#undef MOE_EP__V
#undef MOE_EP__VW
#undef MOE_EP__VSET1
#undef MOE_EP__VZERO
#undef MOE_EP__VLOAD
#undef MOE_EP__VLOADA
#undef MOE_EP__VSTORE
#undef MOE_EP__VFMA
#undef MOE_EP__VFNMA
#undef MOE_EP__VMUL
#undef MOE_EP__VADD
#undef MOE_EP__VDIV
#undef MOE_EP__VMIN
#undef MOE_EP__VMAX
#undef MOE_EP__VSUB
#undef MOE_EP__VPOW2
#undef MOE_EP__VBCAST
#undef MOE_EP__VWIDEN_BF16
#undef MOE_EP__VWIDEN_FP16
#undef MOE_EP__VWIDEN_INT8
#endif /* AVX2 */

#ifdef MOE_EP__NEON
/* >>NEON: MR 6 rows x NR 16 columns (four q registers per row). */
#define MOE_EP__VP moe_ep__neon
#define MOE_EP__VT
#define MOE_EP__VMR 6
#define MOE_EP__VNR 16
/* exp(x) for x clamped to [-87, 88], as above. */
MOE_EP_PRIVATE float32x4_t moe_ep__neon_vexp(float32x4_t x) {
    float32x4_t n, r, p;
    x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.0f)), vdupq_n_f32(88.0f));
    n = vsubq_f32(vfmaq_f32(vdupq_n_f32(12582912.0f), x, vdupq_n_f32(1.44269504088896341f)), vdupq_n_f32(12582912.0f));
    r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
    r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
    p = vdupq_n_f32(1.9875691500e-4f);
    p = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), p, r);
    p = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), p, r);
    p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0f)), p, vmulq_f32(r, r));
    return vmulq_f32(p, vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23)));
}

MOE_EP_PRIVATE float32x4_t moe_ep__neon_vswiglu(float32x4_t g, float32x4_t u) {
    float32x4_t e = moe_ep__neon_vexp(vnegq_f32(g));
    return vmulq_f32(vdivq_f32(g, vaddq_f32(vdupq_n_f32(1.0f), e)), u);
}

MOE_EP_PRIVATE float32x4_t moe_ep__neon_vswiglu_clamped(float32x4_t g, float32x4_t u, float32x4_t nalpha,
                                                        float32x4_t limit, float32x4_t nlimit) {
    float32x4_t e, one = vdupq_n_f32(1.0f);
    g = vminq_f32(g, limit);
    u = vmaxq_f32(vminq_f32(u, limit), nlimit);
    e = moe_ep__neon_vexp(vmulq_f32(g, nalpha));
    return vmulq_f32(vaddq_f32(u, one), vdivq_f32(g, vaddq_f32(one, e)));
}

/* Four vectors of accumulators per row (NR = 16). */
#define MOE_EP__K_DECL(r) float32x4_t c##r##0, c##r##1, c##r##2, c##r##3;
#define MOE_EP__K_ZERO(r) c##r##0 = vdupq_n_f32(0.0f); c##r##1 = c##r##0; c##r##2 = c##r##0; c##r##3 = c##r##0;
#define MOE_EP__K_LOAD(r) c##r##0 = vld1q_f32(cin + (r) * ldc); c##r##1 = vld1q_f32(cin + (r) * ldc + 4); \
    c##r##2 = vld1q_f32(cin + (r) * ldc + 8); c##r##3 = vld1q_f32(cin + (r) * ldc + 12);
#define MOE_EP__K_FMA(r) { float32x4_t av = vld1q_dup_f32(a + (int64_t)kk * MOE_EP__VMR + (r)); \
    c##r##0 = vfmaq_f32(c##r##0, av, b0); c##r##1 = vfmaq_f32(c##r##1, av, b1); \
    c##r##2 = vfmaq_f32(c##r##2, av, b2); c##r##3 = vfmaq_f32(c##r##3, av, b3); }
#define MOE_EP__K_STORE(r) vst1q_f32(cout + (r) * ldo, c##r##0); vst1q_f32(cout + (r) * ldo + 4, c##r##1); \
    vst1q_f32(cout + (r) * ldo + 8, c##r##2); vst1q_f32(cout + (r) * ldo + 12, c##r##3);
#define MOE_EP__K_SWIGLU(r) vst1q_f32(cout + (r) * ldo, moe_ep__neon_vswiglu(c##r##0, c##r##2)); \
    vst1q_f32(cout + (r) * ldo + 4, moe_ep__neon_vswiglu(c##r##1, c##r##3));
#define MOE_EP__K_CLAMPED(r) \
    vst1q_f32(cout + (r) * ldo, moe_ep__neon_vswiglu_clamped(c##r##0, c##r##2, nalpha, limit, nlimit)); \
    vst1q_f32(cout + (r) * ldo + 4, moe_ep__neon_vswiglu_clamped(c##r##1, c##r##3, nalpha, limit, nlimit));
#define MOE_EP__K_BIAS_LOAD float32x4_t bias0 = vld1q_f32(ep->bias), bias1 = vld1q_f32(ep->bias + 4), \
    bias2 = vld1q_f32(ep->bias + 8), bias3 = vld1q_f32(ep->bias + 12);
#define MOE_EP__K_BIAS(r) c##r##0 = vaddq_f32(c##r##0, bias0); c##r##1 = vaddq_f32(c##r##1, bias1); \
    c##r##2 = vaddq_f32(c##r##2, bias2); c##r##3 = vaddq_f32(c##r##3, bias3);
#define MOE_EP__K_SCALE_LOAD float32x4_t s0 = vld1q_f32(ep->scale), s1 = vld1q_f32(ep->scale + 4), \
    s2 = vld1q_f32(ep->scale + 8), s3 = vld1q_f32(ep->scale + 12), \
    bias0 = ep->bias ? vld1q_f32(ep->bias) : vdupq_n_f32(0.0f), bias1 = ep->bias ? vld1q_f32(ep->bias + 4) : bias0, \
    bias2 = ep->bias ? vld1q_f32(ep->bias + 8) : bias0, bias3 = ep->bias ? vld1q_f32(ep->bias + 12) : bias0;
#define MOE_EP__K_SCALE(r) c##r##0 = vfmaq_f32(bias0, c##r##0, s0); c##r##1 = vfmaq_f32(bias1, c##r##1, s1); \
    c##r##2 = vfmaq_f32(bias2, c##r##2, s2); c##r##3 = vfmaq_f32(bias3, c##r##3, s3);
#define MOE_EP__K_CLAMP_SETUP float32x4_t nalpha = vdupq_n_f32(-ep->alpha), limit = vdupq_n_f32(ep->limit), \
    nlimit = vdupq_n_f32(-ep->limit);
#define MOE_EP__K_PANEL const float* bk = b + (int64_t)kk * MOE_EP__VNR; \
    float32x4_t b0 = vld1q_f32(bk), b1 = vld1q_f32(bk + 4), b2 = vld1q_f32(bk + 8), b3 = vld1q_f32(bk + 12);
#define MOE_EP__K_PANEL_BF16 const uint16_t* bk = (const uint16_t*)(const void*)b + (int64_t)kk * MOE_EP__VNR; \
    float32x4_t b0 = vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(bk), 16)), \
    b1 = vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(bk + 4), 16)), \
    b2 = vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(bk + 8), 16)), \
    b3 = vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(bk + 12), 16));
#define MOE_EP__K_PANEL_FP16 const uint16_t* bk = (const uint16_t*)(const void*)b + (int64_t)kk * MOE_EP__VNR; \
    float32x4_t b0 = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(bk))), \
    b1 = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(bk + 4))), \
    b2 = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(bk + 8))), \
    b3 = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(bk + 12)));
#define MOE_EP__K_PANEL_INT8 const int8_t* bk = (const int8_t*)(const void*)b + (int64_t)kk * MOE_EP__VNR; \
    int8x16_t q = vld1q_s8(bk); \
    int16x8_t lo = vmovl_s8(vget_low_s8(q)), hi = vmovl_s8(vget_high_s8(q)); \
    float32x4_t b0 = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))), b1 = vcvtq_f32_s32(vmovl_s16(vget_high_s16(lo))), \
    b2 = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))), b3 = vcvtq_f32_s32(vmovl_s16(vget_high_s16(hi)));
/* the router strip's macros */
#define MOE_EP__V float32x4_t
#define MOE_EP__VW 4
#define MOE_EP__VSET1 vdupq_n_f32
#define MOE_EP__VLOAD vld1q_f32
#define MOE_EP__VSTORE vst1q_f32
#define MOE_EP__VFMA3(a, b, c) vfmaq_f32(c, a, b)
MOE_EP__KERNEL(MOE_EP__ROWS1, 1)
MOE_EP__KERNEL(MOE_EP__ROWS2, 2)
MOE_EP__KERNEL(MOE_EP__ROWS3, 3)
MOE_EP__KERNEL(MOE_EP__ROWS4, 4)
MOE_EP__KERNEL(MOE_EP__ROWS5, 5)
MOE_EP__KERNEL(MOE_EP__ROWS6, 6)
MOE_EP__NARROW_KERNELS(BF16)
MOE_EP__NARROW_KERNELS(FP16)
MOE_EP__NARROW_KERNELS(INT8)
MOE_EP__STRIP

MOE_EP_PRIVATE void moe_ep__neon_micro(int rows, int kc, const float* a, const float* b, const float* cin,
                                       int64_t ldc, float* cout, int64_t ldo, const moe_ep__epilogue* ep) {
    static const moe_ep__kernel_fn kernels[7] = {
        NULL, moe_ep__neon_kernel1, moe_ep__neon_kernel2, moe_ep__neon_kernel3, moe_ep__neon_kernel4,
        moe_ep__neon_kernel5, moe_ep__neon_kernel6
    };
    kernels[rows](kc, a, b, cin, ldc, cout, ldo, ep);
}

/* bf16: the bits shifted up; fp16: fcvtl (exact, as vcvtph2ps); int8: widened twice, converted. */
MOE_EP_PRIVATE void moe_ep__neon_widen(moe_ep_weight_format f, const void* src, int64_t n, float* dst) {
    int64_t i = 0;
    if (f == MOE_EP_WEIGHT_FORMAT_BF16) {
        const uint16_t* s = (const uint16_t*)src;
        for (; i + 4 <= n; i += 4) vst1q_f32(dst + i, vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(s + i), 16)));
    } else if (f == MOE_EP_WEIGHT_FORMAT_FP16) {
        const uint16_t* s = (const uint16_t*)src;
        for (; i + 4 <= n; i += 4) vst1q_f32(dst + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(s + i))));
    } else if (f == MOE_EP_WEIGHT_FORMAT_INT8) {
        const int8_t* s = (const int8_t*)src;
        for (; i + 8 <= n; i += 8) {
            int16x8_t h = vmovl_s8(vld1_s8(s + i));
            vst1q_f32(dst + i, vcvtq_f32_s32(vmovl_s16(vget_low_s16(h))));
            vst1q_f32(dst + i + 4, vcvtq_f32_s32(vmovl_s16(vget_high_s16(h))));
        }
    }
    if (i < n) moe_ep__widen_portable(f, (const unsigned char*)src + i * moe_ep__format_bytes(f), n - i, dst + i);
}

static const moe_ep__path moe_ep__path_neon = {
    MOE_EP_KERNEL_NEON, 6, 16, moe_ep__neon_micro, moe_ep__neon_widen, 8, moe_ep__neon_strip,
    { NULL, NULL, moe_ep__neon_micro_BF16, moe_ep__neon_micro_FP16, moe_ep__neon_micro_INT8 }, NULL
};
#endif /* NEON */

/* >>portable: the same chains in plain C.
   acc[j] = fmaf(av, bk[j], acc[j]) for one row of NR. Without hardware FMA the row's double
   sums are formed in one loop the compiler can vectorise, and only a row where one of
   them would round twice (moe_ep__fmaf's rare case) is redone element by element. */
MOE_EP_PRIVATE void moe_ep__fma_row(float* acc, float av, const float* bk) {
    int j;
#ifdef MOE_EP__HW_FMA
    for (j = 0; j < MOE_EP__PNR; ++j) acc[j] = moe_ep__fmaf(av, bk[j], acc[j]);
#else
    double sum[MOE_EP__PNR];
    int rare = 0;
    for (j = 0; j < MOE_EP__PNR; ++j) {
        uint64_t u;
        sum[j] = (double)av * (double)bk[j] + (double)acc[j];
        memcpy(&u, &sum[j], sizeof u);
        rare |= ((uint32_t)u & 0x1FFFFFFFu) == 0x10000000u || !(sum[j] >= FLT_MIN || sum[j] <= -FLT_MIN);
    }
    if (rare)
        for (j = 0; j < MOE_EP__PNR; ++j) acc[j] = moe_ep__fmaf(av, bk[j], acc[j]);
    else
        for (j = 0; j < MOE_EP__PNR; ++j) acc[j] = (float)sum[j];
#endif
}

/* The epilogue of one row of finished (or, without ep, unfinished) sums. */
MOE_EP_PRIVATE void moe_ep__finish_row(const moe_ep__epilogue* ep, float* acc, float* out) {
    int j;
    if (ep && ep->scale)
        for (j = 0; j < MOE_EP__PNR; ++j) acc[j] = moe_ep__fmaf(acc[j], ep->scale[j], ep->bias ? ep->bias[j] : 0.0f);
    else if (ep && ep->bias)
        for (j = 0; j < MOE_EP__PNR; ++j) acc[j] += ep->bias[j];
    if (ep && ep->gated == 1)
        for (j = 0; j < MOE_EP__PNR / 2; ++j) out[j] = moe_ep__act(MOE_EP_ACTIVATION_SWIGLU, acc[j], acc[j + MOE_EP__PNR / 2]);
    else if (ep && ep->gated == 2)
        for (j = 0; j < MOE_EP__PNR / 2; ++j)
            out[j] = moe_ep__swiglu_clamped(acc[j], acc[j + MOE_EP__PNR / 2], ep->alpha, ep->limit);
    else
        for (j = 0; j < MOE_EP__PNR; ++j) out[j] = acc[j];
}

/* A full tile gets constant loop bounds, so that the compiler can keep its MR x NR sums in
   registers. */
MOE_EP_PRIVATE void moe_ep__portable_full(int kc, const float* a, const float* b, const float* cin, int64_t ldc,
                                          float* cout, int64_t ldo, const moe_ep__epilogue* ep) {
    float acc[MOE_EP__PMR][MOE_EP__PNR];
    int r, j, kk;
    for (r = 0; r < MOE_EP__PMR; ++r)
        for (j = 0; j < MOE_EP__PNR; ++j) acc[r][j] = cin ? cin[r * ldc + j] : 0.0f;
    for (kk = 0; kk < kc; ++kk) {
        const float* bk = b + (int64_t)kk * MOE_EP__PNR;
        for (r = 0; r < MOE_EP__PMR; ++r) moe_ep__fma_row(acc[r], a[(int64_t)kk * MOE_EP__PMR + r], bk);
    }
    for (r = 0; r < MOE_EP__PMR; ++r) moe_ep__finish_row(ep, acc[r], cout + r * ldo);
}

MOE_EP_PRIVATE void moe_ep__portable_micro(int rows, int kc, const float* a, const float* b, const float* cin,
                                           int64_t ldc, float* cout, int64_t ldo, const moe_ep__epilogue* ep) {
    int r;
    if (rows == MOE_EP__PMR) {
        moe_ep__portable_full(kc, a, b, cin, ldc, cout, ldo, ep);
        return;
    }
    for (r = 0; r < rows; ++r) {    /* a partial tile, one row at a time */
        float acc[MOE_EP__PNR];
        int j, kk;
        for (j = 0; j < MOE_EP__PNR; ++j) acc[j] = cin ? cin[r * ldc + j] : 0.0f;
        for (kk = 0; kk < kc; ++kk)
            moe_ep__fma_row(acc, a[(int64_t)kk * MOE_EP__PMR + r], b + (int64_t)kk * MOE_EP__PNR);
        moe_ep__finish_row(ep, acc, cout + r * ldo);
    }
}

/* The BF16_DOT arithmetic in plain C: acc[j] + x * w[j] for one row of NR, each as
   moe_ep__dot_step. Packed activations and weights are never subnormal (packing reads them
   so) and neither is a sum (it is flushed), so the step is the exact sum rounded once: the
   product is exact in double, and so is the double sum unless the two are far apart
   (TwoSum's error then is not zero); rounding it to float is right unless an inexact sum
   fell on a float tie (moe_ep__fma_row's argument). A row where that happens, or where a
   sum is below FLT_MIN (to be flushed, or rounded as vdpbf16ps rounds there), is redone
   element by element. */
MOE_EP_PRIVATE void moe_ep__dot_row(float* acc, float x, const float* w) {
    double sum[MOE_EP__PNR];
    int j, rare = 0;
    for (j = 0; j < MOE_EP__PNR; ++j) {
        double p = (double)x * (double)w[j], c = (double)acc[j], s = p + c, bv = s - p;
        uint64_t u;
        sum[j] = s;
        memcpy(&u, &s, sizeof u);
        rare |= (((uint32_t)u & 0x1FFFFFFFu) == 0x10000000u) & ((p - (s - bv)) + (c - bv) != 0.0);
        rare |= (s != 0.0) & (s <= FLT_MIN) & (s >= -FLT_MIN);     /* & and |: one vector loop */
    }
    if (rare)
        for (j = 0; j < MOE_EP__PNR; ++j) acc[j] = moe_ep__dot_step(acc[j], x, w[j]);
    else
        for (j = 0; j < MOE_EP__PNR; ++j) acc[j] = (float)sum[j];
}

/* The emulation's micro-kernel: each k pair's weights widened once for the tile's rows, then
   per row the odd k's step and the even k's (as moe_ep__dot_pair). */
MOE_EP_PRIVATE void moe_ep__portable_dot_micro(int rows, int kc, const float* a, const float* b, const float* cin,
                                               int64_t ldc, float* cout, int64_t ldo, const moe_ep__epilogue* ep) {
    float acc[MOE_EP__PMR][MOE_EP__PNR];
    int r, j, kk;
    for (r = 0; r < rows; ++r)
        for (j = 0; j < MOE_EP__PNR; ++j) acc[r][j] = cin ? cin[r * ldc + j] : 0.0f;
    for (kk = 0; kk < kc; ++kk) {
        uint16_t w[2 * MOE_EP__PNR];    /* as packed: the even k, then the odd k (any byte order) */
        float odd[MOE_EP__PNR], even[MOE_EP__PNR];
        memcpy(w, b + (int64_t)kk * MOE_EP__PNR, sizeof w);
        for (j = 0; j < MOE_EP__PNR; ++j) {
            odd[j] = moe_ep__bf16_daz(w[2 * j + 1]);
            even[j] = moe_ep__bf16_daz(w[2 * j]);
        }
        for (r = 0; r < rows; ++r) {
            uint32_t x;
            memcpy(&x, a + (int64_t)kk * MOE_EP__PMR + r, sizeof x);
            moe_ep__dot_row(acc[r], moe_ep__bf16_daz(x >> 16), odd);
            moe_ep__dot_row(acc[r], moe_ep__bf16_daz(x & 0xFFFFu), even);
        }
    }
    for (r = 0; r < rows; ++r) moe_ep__finish_row(ep, acc[r], cout + r * ldo);
}

static const moe_ep__path moe_ep__path_portable = {
    MOE_EP_KERNEL_PORTABLE, MOE_EP__PMR, MOE_EP__PNR, moe_ep__portable_micro, moe_ep__widen_portable, 0, NULL,
    { NULL, NULL, NULL, NULL, NULL }, moe_ep__portable_dot_micro
};

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

/* >>paths: which paths this build has and this CPU runs, best first. */
MOE_EP_PRIVATE const moe_ep__path* moe_ep__path_of(moe_ep_kernel kernel) {
    switch (kernel) {
#ifdef MOE_EP__AVX512
    case MOE_EP_KERNEL_AVX512: return &moe_ep__path_avx512;
#endif
#ifdef MOE_EP__AVX2
    case MOE_EP_KERNEL_AVX2: return &moe_ep__path_avx2;
#endif
#ifdef MOE_EP__NEON
    case MOE_EP_KERNEL_NEON: return &moe_ep__path_neon;
#endif
#ifdef MOE_EP__AVX512_BF16
    case MOE_EP_KERNEL_AVX512_BF16: return &moe_ep__path_avx512_bf16;
#endif
    case MOE_EP_KERNEL_PORTABLE: return &moe_ep__path_portable;
    default: return NULL;
    }
}

/* Whether this CPU runs a path this build has: checked where the path was chosen at run
   time (the CPU model is read once by the compiler's runtime, at startup); a path chosen by
   the compiler's target flags runs wherever the build does. */
#ifdef MOE_EP__AVX512_BF16
/* One lane of vdpbf16ps: x and w hold bf16 pairs, the even k in the low half; the odd k's
   product is added first, then the even k's. */
MOE_EP_PRIVATE float moe_ep__dot_pair(float acc, uint32_t x, uint32_t w) {
    acc = moe_ep__dot_step(acc, moe_ep__bf16_daz(x >> 16), moe_ep__bf16_daz(w >> 16));
    return moe_ep__dot_step(acc, moe_ep__bf16_daz(x & 0xFFFFu), moe_ep__bf16_daz(w & 0xFFFFu));
}

/* Whether this CPU's vdpbf16ps gives moe_ep__dot_pair's bits on lanes where a reading of the
   definition could go either way: the odd k first, each step rounded (and flushed) on its
   own, subnormal inputs (the accumulator too) as zeros, a result that rounds up to FLT_MIN
   kept. A CPU that rounds otherwise runs the BF16_DOT arithmetic on the portable path. */
MOE_EP_PRIVATE bool moe_ep__dot_instruction_agrees(void) {
    static const uint32_t acc_bits[16] = { 0x00800000u, 0x00800000u, 0x3F800000u, 0x3F800000u, 0x00000200u,
                                           0x00800000u, 0x80000000u, 0x80000000u, 0x3F800000u, 0xC2F60000u,
                                           0x7F7FFFFFu, 0x00800001u, 0x3EAAAAABu, 0x00000000u, 0x4B800000u, 0xB3800000u };
    static const uint32_t x[16] = { 0x00009A00u, 0x00009A00u, 0x3380BF80u, 0x00000001u, 0x00002000u,
                                    0xA0002000u, 0x80008000u, 0x00008000u, 0xBF803380u, 0x3F8042F6u,
                                    0x00007F00u, 0x00009A00u, 0xBEAB3EABu, 0x00010001u, 0x3F803F80u, 0x33803380u };
    static const uint32_t w[16] = { 0x00001980u, 0x00001A00u, 0x3F803F80u, 0x00007E80u, 0x00002000u,
                                    0x1F801F80u, 0x3F803F80u, 0x00003F80u, 0x3F803F80u, 0x3F803F80u,
                                    0x00007F00u, 0x00001A00u, 0x3F803F80u, 0x7E807E80u, 0xB3803380u, 0x3F803F80u };
    float acc[16], out[16];
    int i;
    memcpy(acc, acc_bits, sizeof acc);
    moe_ep__avx512_dot_lanes(acc, x, w, out);
    for (i = 0; i < 16; ++i) {
        float want = moe_ep__dot_pair(acc[i], x[i], w[i]);
        if (memcmp(&want, &out[i], sizeof want) != 0) return false;
    }
    return true;
}
#endif

MOE_EP_PRIVATE bool moe_ep__cpu_runs(moe_ep_kernel kernel) {
#ifdef MOE_EP__DISPATCH
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    __builtin_cpu_init();
    if (kernel == MOE_EP_KERNEL_AVX512_BF16)   /* AVX512-BF16: cpuid leaf 7 subleaf 1, eax bit 5 */
        return __builtin_cpu_supports("avx512f") && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) &&
               (eax & (1u << 5)) && moe_ep__dot_instruction_agrees();
    if (kernel == MOE_EP_KERNEL_AVX512) return __builtin_cpu_supports("avx512f") != 0;
    if (kernel == MOE_EP_KERNEL_AVX2)   /* F16C: cpuid leaf 1, ecx bit 29 (clang 14 cannot name it) */
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & (1u << 29));
#elif defined(MOE_EP__AVX512_BF16)
    if (kernel == MOE_EP_KERNEL_AVX512_BF16) return moe_ep__dot_instruction_agrees();
#endif
    (void)kernel;
    return true;
}

MOE_EP_PRIVATE const char* moe_ep__kernel_name(moe_ep_kernel kernel) {
    switch (kernel) {
    case MOE_EP_KERNEL_PORTABLE: return "portable";
    case MOE_EP_KERNEL_AVX2: return "AVX2+FMA";
    case MOE_EP_KERNEL_AVX512: return "AVX-512";
    case MOE_EP_KERNEL_NEON: return "NEON";
    case MOE_EP_KERNEL_CBLAS: return "CBLAS";
    case MOE_EP_KERNEL_AVX512_BF16: return "AVX512-BF16";
    default: return "default";
    }
}

#ifndef MOE_EP_CBLAS
MOE_EP_PRIVATE moe_ep_kernel moe_ep__path_kernel(const moe_ep__path* path) { return path->kernel; }
#endif

/* Whether a path runs the exact arithmetic (every path but AVX512_BF16) or BF16_DOT (dot). */
MOE_EP_PRIVATE bool moe_ep__path_does(const moe_ep__path* path, bool dot) {
    return dot ? path->micro_dot != NULL : path->kernel != MOE_EP_KERNEL_AVX512_BF16;
}

/* The path of desc.kernel for an arithmetic (DEFAULT: the best this build and CPU have);
   NULL with *why set when it cannot run here. The BF16_DOT arithmetic runs on the paths
   with a micro_dot: AVX512_BF16 and the portable emulation. */
MOE_EP_PRIVATE const moe_ep__path* moe_ep__select_path_for(moe_ep_kernel kernel, moe_ep_arithmetic arithmetic,
                                                           const char** why) {
    static const moe_ep_kernel best_first[] = { MOE_EP_KERNEL_AVX512_BF16, MOE_EP_KERNEL_AVX512, MOE_EP_KERNEL_AVX2,
                                                MOE_EP_KERNEL_NEON, MOE_EP_KERNEL_PORTABLE };
    const bool dot = arithmetic == MOE_EP_ARITHMETIC_BF16_DOT;
    size_t i;
    *why = "";
    if (kernel == MOE_EP_KERNEL_DEFAULT) {
        for (i = 0; i < sizeof best_first / sizeof best_first[0]; ++i) {
            const moe_ep__path* path = moe_ep__path_of(best_first[i]);
            if (path && moe_ep__path_does(path, dot) && moe_ep__cpu_runs(best_first[i])) return path;
        }
        return &moe_ep__path_portable;
    }
    if (moe_ep__path_of(kernel) && !moe_ep__path_does(moe_ep__path_of(kernel), dot)) {
        *why = dot ? "the BF16_DOT arithmetic runs on AVX512_BF16 or PORTABLE (its emulation)"
                   : "it runs the BF16_DOT arithmetic only";
        return NULL;
    }
    if (!moe_ep__path_of(kernel)) {
        *why = "this build has no such kernel (MOE_EP_NO_SIMD, MOE_EP_CBLAS, or another architecture or compiler)";
        return NULL;
    }
    if (!moe_ep__cpu_runs(kernel)) {
        *why = kernel == MOE_EP_KERNEL_AVX512_BF16 ? "this CPU lacks AVX512-BF16, or its vdpbf16ps rounds otherwise"
                                                   : "this CPU lacks its instructions";
        return NULL;
    }
    return moe_ep__path_of(kernel);
}

MOE_EP_PRIVATE const moe_ep__path* moe_ep__select_path(moe_ep_kernel kernel, const char** why) {
    return moe_ep__select_path_for(kernel, MOE_EP_ARITHMETIC_EXACT, why);
}

#ifndef MOE_EP_CBLAS
/* >>packing: the user's tensors (through views) into panels of the path and the format. */
/* Output columns per panel: gated panels carry a w1 half and a w3 half. */
MOE_EP_PRIVATE int moe_ep__panel_cols(const moe_ep__path* path, moe_ep_activation act) {
    return moe_ep__gated(act) ? path->nr / 2 : path->nr;
}

MOE_EP_PRIVATE int64_t moe_ep__panel_count(int n, int cols) { return ((int64_t)n + cols - 1) / cols; }

/* Hidden row stride: d_ff rounded up to whole up-projection panels. */
MOE_EP_PRIVATE int64_t moe_ep__hidden_stride(const moe_ep__path* path, const moe_ep_desc* d) {
    int cols = moe_ep__panel_cols(path, d->activation);
    return moe_ep__panel_count(d->d_ff, cols) * cols;
}

/* int8's scale of output channel i: the stored one, or max |w| / 127 over the user's whole
   row (all of d_ff, not this TP rank's slice, so that every TP split quantises alike); 1
   for a row of zeros. */
MOE_EP_PRIVATE float moe_ep__channel_scale(const moe_ep__wview* v, int64_t i) {
    float amax = 0.0f;
    int64_t kk;
    if (v->format == MOE_EP_WEIGHT_FORMAT_INT8) return v->scale[i * v->bias_stride];
    for (kk = -v->k_begin; kk < v->k_full - v->k_begin; ++kk) {
        float w = moe_ep__wget(v, i, kk);
        w = w < 0.0f ? -w : w;
        amax = w > amax ? w : amax;
    }
    return amax > 0.0f ? amax / 127.0f : 1.0f;
}

/* Where packing found a weight that the format cannot hold. */
typedef struct moe_ep__pack_fault {
    const moe_ep__wview* view;
    int64_t row, col;
    float value;
} moe_ep__pack_fault;

/* W [n, k] -> panels of NR columns in format f; with w3, panels of NR/2 columns of each.
   Written in order, reading the panel's NR rows of W side by side. With bias (not NULL),
   the biases of the panels' columns follow in the same order, NR per panel (zero where a
   view has none), and so do int8's scales with scale. Returns false, with *fault, when a
   value cannot be stored: a finite one that rounds to infinity (bf16, fp16), or a NaN or
   infinity (int8, whose scale it would spoil). With pairs (the BF16_DOT arithmetic, bf16) a
   panel holds ceil(k / 2) x NR pairs instead, k = 2i in the low half of pair (i, j), and a
   subnormal weight is stored as a zero of its sign (vdpbf16ps reads it so). */
MOE_EP_PRIVATE bool moe_ep__pack(const moe_ep__path* path, moe_ep_weight_format f, bool pairs, const moe_ep__wview* w,
                                 const moe_ep__wview* w3, int n, int k, void* panels, float* bias, float* scale,
                                 moe_ep__pack_fault* fault) {
    const int nr = path->nr, cols = w3 ? nr / 2 : nr;
    const int64_t np = moe_ep__panel_count(n, cols), esize = moe_ep__format_bytes(f);
    const int64_t kext = pairs ? k + (k & 1) : k;
    int j, kk;
    int64_t p;
    for (p = 0; p < np; ++p) {
        const moe_ep__wview* src[MOE_EP__NR_MAX];
        int64_t row[MOE_EP__NR_MAX];
        float channel_scale[MOE_EP__NR_MAX];
        unsigned char* panel = (unsigned char*)panels + p * kext * nr * esize;
        for (j = 0; j < nr; ++j) {
            int half = j >= cols;
            const moe_ep__wview* v = half ? w3 : w;
            row[j] = p * cols + (j - half * cols);
            src[j] = row[j] < n ? v : NULL;
            if (bias) bias[p * nr + j] = src[j] && v->bias ? v->bias[row[j] * v->bias_stride] : 0.0f;
            channel_scale[j] = src[j] && f == MOE_EP_WEIGHT_FORMAT_INT8 ? moe_ep__channel_scale(v, row[j]) : 1.0f;
            if (scale) scale[p * nr + j] = channel_scale[j];
        }
        for (kk = 0; kk < k; ++kk)
            for (j = 0; j < nr; ++j) {
                const moe_ep__wview* v = src[j];
                unsigned char* dst = panel + (pairs ? ((int64_t)(kk / 2) * nr + j) * 2 + (kk & 1)
                                                    : (int64_t)kk * nr + j) * esize;
                bool overflow = false;
                float value;
                if (!v) continue;   /* calloc'd: zero */
                if (v->format == f && f != MOE_EP_WEIGHT_FORMAT_FP32) {     /* stored: copied as it is */
                    memcpy(dst, (const unsigned char*)v->base + (row[j] * v->row_stride + kk * v->k_stride) * esize,
                           (size_t)esize);
                } else {
                    value = moe_ep__wget(v, row[j], kk);
                    if (f == MOE_EP_WEIGHT_FORMAT_BF16 || f == MOE_EP_WEIGHT_FORMAT_FP16) {
                        uint16_t h = f == MOE_EP_WEIGHT_FORMAT_BF16 ? moe_ep__float_to_bf16(value, &overflow)
                                                                    : moe_ep__float_to_fp16(value, &overflow);
                        memcpy(dst, &h, sizeof h);
                    } else if (f == MOE_EP_WEIGHT_FORMAT_INT8) {
                        overflow = !moe_ep__finite(value);
                        if (!overflow) *(int8_t*)dst = moe_ep__quantize(value, channel_scale[j]);
                    } else {
                        memcpy(dst, &value, sizeof value);
                    }
                    if (overflow) {
                        fault->view = v;
                        fault->row = row[j];
                        fault->col = kk;
                        fault->value = value;
                        return false;
                    }
                }
                if (pairs) {
                    uint16_t h;
                    memcpy(&h, dst, sizeof h);
                    if (!(h & 0x7F80u)) h &= 0x8000u;
                    memcpy(dst, &h, sizeof h);
                }
            }
    }
    return true;
}

/* Rows packed for the kernel: tile t holds rows [t*MR, t*MR + MR) as [kext][MR]. */
MOE_EP_PRIVATE int64_t moe_ep__row_tiles(const moe_ep__path* path, int64_t m) { return (m + path->mr - 1) / path->mr; }

/* Row tiles [t0, t1) of x [m, k] (row stride ldx); rows past m are left as they are. */
MOE_EP_PRIVATE void moe_ep__pack_rows(const moe_ep__path* path, const float* x, int64_t ldx, int64_t m, int k,
                                      int64_t t0, int64_t t1, float* tiles) {
    const int mr = path->mr;
    int64_t t;
    int r, kk;
    for (t = t0; t < t1; ++t) {
        int rows = (int)MOE_EP__MIN((int64_t)mr, m - t * mr);
        float* dst = tiles + t * k * mr;
        for (r = 0; r < rows; ++r) {
            const float* src = x + (t * mr + r) * ldx;
            for (kk = 0; kk < k; ++kk) dst[(int64_t)kk * mr + r] = src[kk];
        }
    }
}

/* BF16_DOT: row tiles [t0, t1) of x [m, k] as bf16 pairs, tile t [ceil(k / 2)][MR] (the
   even k in the low half, a missing odd k zero), rounded as moe_ep__bf16_of_activation. */
MOE_EP_PRIVATE void moe_ep__pack_row_pairs(const moe_ep__path* path, const float* x, int64_t ldx, int64_t m, int k,
                                           int64_t t0, int64_t t1, float* tiles) {
    const int mr = path->mr;
    const int64_t kp = (k + 1) / 2;
    int64_t t, i;
    int r;
    for (t = t0; t < t1; ++t) {
        int rows = (int)MOE_EP__MIN((int64_t)mr, m - t * mr);
        float* dst = tiles + t * kp * mr;
        for (r = 0; r < rows; ++r) {
            const float* src = x + (t * mr + r) * ldx;
            for (i = 0; i < kp; ++i) {
                uint32_t pair = moe_ep__bf16_pair(src[2 * i], 2 * i + 1 < k ? src[2 * i + 1] : 0.0f);
                memcpy(dst + i * mr + r, &pair, sizeof pair);
            }
        }
    }
}

/* BF16_DOT: hidden row tiles [t0, t1) (fp32, [kext][MR], k columns of m rows) as bf16 pairs,
   tile t [kext / 2][MR]. */
MOE_EP_PRIVATE void moe_ep__pair_tiles(const moe_ep__path* path, const float* tiles, int64_t kext, int64_t m, int k,
                                       int64_t t0, int64_t t1, float* pairs) {
    const int mr = path->mr;
    int64_t t, i;
    int r;
    for (t = t0; t < t1; ++t) {
        int rows = (int)MOE_EP__MIN((int64_t)mr, m - t * mr);
        const float* src = tiles + t * kext * mr;
        float* dst = pairs + t * (kext / 2) * mr;
        for (i = 0; i < (k + 1) / 2; ++i)
            for (r = 0; r < rows; ++r) {
                uint32_t pair = moe_ep__bf16_pair(src[2 * i * mr + r], 2 * i + 1 < k ? src[(2 * i + 1) * mr + r] : 0.0f);
                memcpy(dst + i * mr + r, &pair, sizeof pair);
            }
    }
}

/* One product C = act(A . W^T): A in row tiles, W in panels of the format; act COUNT =
   none. C is row-major (row stride ldc) or, with c_kext > 0, row tiles of extent c_kext.
   pairs (BF16_DOT): A and the panels hold bf16 pairs, k counts them, format is FP32 (their
   4-byte elements) and the path's micro_dot multiplies. */
typedef struct moe_ep__gemm_args {
    const moe_ep__path* path;
    const float* a;
    int64_t a_kext, m;
    int k, n;                       /* n: output columns */
    moe_ep_weight_format format;
    const void* panels;
    const float* bias;              /* NR per panel, in panel order; NULL: none */
    const float* scale;             /* int8: NR per panel; else NULL */
    moe_ep_activation act;
    float alpha, limit;             /* clamped SwiGLU's */
    float* c;
    int64_t ldc, c_kext;
    bool pairs;
} moe_ep__gemm_args;

/* The last K slice of one tile: the finished sums go to C, through the activation. */
MOE_EP_PRIVATE void moe_ep__tile_out(const moe_ep__gemm_args* g, moe_ep__micro_fn micro, int rows, int kc,
                                     const float* a, const float* b, const float* cin, int64_t ldc, int64_t row,
                                     int64_t panel) {
    const moe_ep__path* path = g->path;
    const int mr = path->mr, nr = path->nr;
    int cols = moe_ep__panel_cols(path, g->act), r, j;
    int plain = moe_ep__gated(g->act) || g->act == MOE_EP_ACTIVATION_COUNT;
    int64_t col = panel * cols;
    int ncols = (int)MOE_EP__MIN((int64_t)cols, (int64_t)g->n - col);
    float tile[MOE_EP__MR_MAX * MOE_EP__NR_MAX];
    moe_ep__epilogue ep;
    ep.bias = g->bias ? g->bias + panel * nr : NULL;
    ep.scale = g->scale ? g->scale + panel * nr : NULL;
    ep.gated = g->act == MOE_EP_ACTIVATION_SWIGLU ? 1 : g->act == MOE_EP_ACTIVATION_SWIGLU_CLAMPED ? 2 : 0;
    ep.alpha = g->alpha;
    ep.limit = g->limit;
    if (ncols == cols && plain && g->c_kext == 0) {
        micro(rows, kc, a, b, cin, ldc, g->c + row * g->ldc + col, g->ldc, &ep);
        return;
    }
    micro(rows, kc, a, b, cin, ldc, tile, nr, &ep);
    if (g->c_kext > 0) {            /* row is a multiple of MR here */
        float* dst = g->c + row * g->c_kext + col * mr;
        for (j = 0; j < ncols; ++j)
            for (r = 0; r < rows; ++r) {
                float v = tile[r * nr + j];
                dst[(int64_t)j * mr + r] = plain ? v : moe_ep__act(g->act, v, 0.0f);
            }
        return;
    }
    for (r = 0; r < rows; ++r) {
        float* dst = g->c + (row + r) * g->ldc + col;
        for (j = 0; j < ncols; ++j) {
            float v = tile[r * nr + j];
            dst[j] = plain ? v : moe_ep__act(g->act, v, 0.0f);
        }
    }
}

/* A product is cut into work items: a block of NCP column panels x a block of MC rows,
   column blocks outermost so that threads taking consecutive items share the weights. */
MOE_EP_PRIVATE int64_t moe_ep__mc(const moe_ep__path* path) { return 16 * (int64_t)path->mr; }
MOE_EP_PRIVATE int64_t moe_ep__ncp(const moe_ep__path* path) { return 128 / path->nr; }
MOE_EP_PRIVATE int64_t moe_ep__row_blocks(const moe_ep__path* path, int64_t m) {
    return (m + moe_ep__mc(path) - 1) / moe_ep__mc(path);
}

MOE_EP_PRIVATE int64_t moe_ep__gemm_items(const moe_ep__gemm_args* g) {
    int64_t panels = moe_ep__panel_count(g->n, moe_ep__panel_cols(g->path, g->act)), ncp = moe_ep__ncp(g->path);
    return (panels + ncp - 1) / ncp * moe_ep__row_blocks(g->path, g->m);
}

/* A hint that bytes [0, n) from p will be read soon (prefetches never fault). */
MOE_EP_PRIVATE void moe_ep__prefetch(const unsigned char* p, int64_t n) {
#if defined(__GNUC__) || defined(__clang__)
    int64_t i;
    for (i = 0; i < n; i += 64) __builtin_prefetch(p + i, 0, 1);
#else
    (void)p;
    (void)n;
#endif
}

/* A thread's scratch: the MC x NCP*NR sums waiting between K slices, then one KC x NR
   weight slice widened to fp32. */
MOE_EP_PRIVATE int64_t moe_ep__scratch_floats(const moe_ep__path* path) {
    return moe_ep__mc(path) * moe_ep__ncp(path) * path->nr + (int64_t)MOE_EP__KC * path->nr;
}

/* One work item, on the calling thread. While the row tiles of a block run over one weight
   slice (from L1 after the first), the next slice is fetched, a share per tile, so that
   memory and arithmetic overlap. A narrow format's slice is widened once into the scratch.
   A block of one row tile (decode) takes its panels one at a time, each K slice after the
   other, so the weights stream in memory order; otherwise each K slice meets every panel of
   the block. Either way every chain runs its K slices in order. */
typedef struct moe_ep__item {
    int64_t jc, ic, jn, mn, tiles;
    moe_ep__micro_fn narrow;        /* the format's in-register kernel for this block, or NULL */
    float* scratch;                 /* MC x NCP*NR sums, then the widened slice */
} moe_ep__item;

MOE_EP_PRIVATE void moe_ep__item_slice(const moe_ep__gemm_args* g, const moe_ep__item* it, int64_t pc, int kc,
                                       int64_t jr) {
    const moe_ep__path* path = g->path;
    const int64_t mr = path->mr, nr = path->nr, ld = moe_ep__ncp(path) * nr, K = g->k;
    const int64_t esize = moe_ep__format_bytes(g->format);
    const unsigned char* base = (const unsigned char*)g->panels;
    const unsigned char* src = base + ((it->jc + jr) * K + pc) * nr * esize;
    const int last = pc + kc == K;
    const unsigned char* next = jr + 1 < it->jn ? src + K * nr * esize
                              : !last ? base + (it->jc * K + pc + kc) * nr * esize : NULL;
    const int64_t share = (kc * nr * esize + it->tiles - 1) / it->tiles;
    const float* b = (const float*)(const void*)src;
    moe_ep__micro_fn micro = it->narrow ? it->narrow : g->pairs ? path->micro_dot : path->micro;
    int64_t ir;
    if (g->format != MOE_EP_WEIGHT_FORMAT_FP32 && !it->narrow) {
        float* wide = it->scratch + moe_ep__mc(path) * ld;
        path->widen(g->format, src, kc * nr, wide);
        b = wide;
    }
    for (ir = 0; ir < it->mn; ir += mr) {
        int rows = (int)MOE_EP__MIN(mr, it->mn - ir);
        const float* a = g->a + (it->ic + ir) * g->a_kext + pc * mr;
        float* part = it->scratch + ir * ld + jr * nr;
        const float* cin = pc == 0 ? NULL : part;
        if (next && it->tiles > 1) moe_ep__prefetch(next + ir / mr * share, share);
        if (last) moe_ep__tile_out(g, micro, rows, kc, a, b, cin, ld, it->ic + ir, it->jc + jr);
        else micro(rows, kc, a, b, cin, ld, part, ld, NULL);
    }
}

MOE_EP_PRIVATE void moe_ep__gemm_item(const moe_ep__gemm_args* g, int64_t item, float* scratch) {
    const moe_ep__path* path = g->path;
    const int64_t mr = path->mr, mc = moe_ep__mc(path), ncp = moe_ep__ncp(path), K = g->k;
    const int64_t row_blocks = moe_ep__row_blocks(path, g->m);
    const int64_t panels = moe_ep__panel_count(g->n, moe_ep__panel_cols(path, g->act));
    /* a narrow format's block of at most NARROW_ROWS rows reads its panels as they are stored */
    moe_ep__micro_fn narrow = g->m <= MOE_EP__NARROW_ROWS ? path->micro_narrow[g->format] : NULL;
    /* a single row tile of fp32 (or so read) weights keeps its sums in registers over the whole K */
    const int64_t kc_max = g->m <= mr && (g->format == MOE_EP_WEIGHT_FORMAT_FP32 || narrow) ? K : MOE_EP__KC;
    moe_ep__item it;
    int64_t pc, jr;
    it.jc = item / row_blocks * ncp;
    it.ic = item % row_blocks * mc;
    it.jn = MOE_EP__MIN(ncp, panels - it.jc);
    it.mn = MOE_EP__MIN(mc, g->m - it.ic);
    it.tiles = (it.mn + mr - 1) / mr;
    it.narrow = narrow;
    it.scratch = scratch;
    if (it.tiles == 1) {
        for (jr = 0; jr < it.jn; ++jr)
            for (pc = 0; pc < K; pc += kc_max) moe_ep__item_slice(g, &it, pc, (int)MOE_EP__MIN(kc_max, K - pc), jr);
        return;
    }
    for (pc = 0; pc < K; pc += kc_max)
        for (jr = 0; jr < it.jn; ++jr) moe_ep__item_slice(g, &it, pc, (int)MOE_EP__MIN(kc_max, K - pc), jr);
}

/* Threads for a product of m x k x n: tiny ones are not worth waking a team. */
MOE_EP_PRIVATE int moe_ep__kernel_threads(const moe_ep_context* ctx, int64_t m, int k, int n) {
    return (double)m * k * n < 65536.0 ? 1 : ctx->num_threads;
}
#endif /* !MOE_EP_CBLAS */

/* A workspace of at least `need` floats, aligned; *raw is the allocation. */
MOE_EP_PRIVATE float* moe_ep__workspace(moe_ep_context* ctx, float** raw, int64_t* capacity, int64_t need) {
    if (need > *capacity) {
        float* fresh = (float*)moe_ep__calloc(&ctx->desc.allocator, need + MOE_EP__ALIGN / (int64_t)sizeof(float),
                                              sizeof(float));
        if (!fresh) return NULL;
        moe_ep_free(&ctx->desc.allocator, *raw);
        *raw = fresh;
        *capacity = need;
    }
    return moe_ep__aligned(*raw);
}

#ifdef MOE_EP_CBLAS
/* The CBLAS path: x [m, d] . [w1; w3]^T in one sgemm, the activation, then . w2^T.
   Its results depend on the BLAS: most split and order the k sums by the matrix shape
   and thread count, so the bitwise guarantees above do not hold on this path. */
MOE_EP_PRIVATE moe_ep_result moe_ep__ffn(moe_ep_context* ctx, int local_expert, const float* rows, int64_t m,
                                         float* out) {
    const moe_ep_desc* d = &ctx->desc;
    int pairs = moe_ep__gated(d->activation) ? 2 : 1, F = d->d_ff, D = d->d_model;
    const float* bias_up = ctx->bias_up[local_expert];
    const float* bias_down = ctx->bias_down[local_expert];
    int64_t ld_pre = (int64_t)pairs * F, r0;
    const int64_t chunk = 1 << 20;  /* rows per call: BLAS sizes are int */
    float* pre = moe_ep__workspace(ctx, &ctx->hidden, &ctx->hidden_capacity,
                                   MOE_EP__MIN(m, chunk) * (ld_pre + F));
    if (!pre) return moe_ep__fail(ctx, MOE_EP_ERROR_OUT_OF_MEMORY, MOE_EP_LOG_ITEM_OUT_OF_MEMORY,
                                  "out of memory for %lld rows of workspace",
                                  (long long)m);
    for (r0 = 0; r0 < m; r0 += chunk) {
        int mc = (int)MOE_EP__MIN(chunk, m - r0);
        float* hidden = pre + (int64_t)mc * ld_pre;
        int r;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mc, (int)ld_pre, D, 1.0f, rows + r0 * D, D,
                    (const float*)ctx->packed_up[local_expert], D, 0.0f, pre, (int)ld_pre);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(ctx->num_threads) if (ctx->num_threads > 1 && mc > 1)
#endif
        for (r = 0; r < mc; ++r) {
            float* g = pre + (int64_t)r * ld_pre;
            const float* u = pairs == 2 ? g + F : g;
            float* h = hidden + (int64_t)r * F;
            int j;
            if (bias_up)
                for (j = 0; j < ld_pre; ++j) g[j] += bias_up[j];
            if (d->activation == MOE_EP_ACTIVATION_SWIGLU_CLAMPED)
                for (j = 0; j < F; ++j) h[j] = moe_ep__swiglu_clamped(g[j], u[j], d->swiglu_alpha, d->swiglu_limit);
            else
                for (j = 0; j < F; ++j) h[j] = moe_ep__act(d->activation, g[j], u[j]);
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mc, D, F, 1.0f, hidden, F,
                    (const float*)ctx->packed_down[local_expert], F, 0.0f, out + r0 * D, D);
        if (bias_down)
            for (r = 0; r < mc; ++r) {
                float* y = out + (r0 + r) * D;
                int i;
                for (i = 0; i < D; ++i) y[i] += bias_down[i];
            }
    }
    return MOE_EP_OK;
}
#else
/* One team for the whole FFN: pack x, the up products (with the activation), the down product. */
typedef struct moe_ep__ffn_args {
    const float* x;
    int64_t ldx;
    int d_model;
    float* x_tiles;                 /* x's row tiles; BF16_DOT: then the hidden rows' pairs */
    moe_ep__gemm_args up, down;
    float* scratch;
} moe_ep__ffn_args;

/* Row tiles [t0, t1) of x into the up product's A: floats, or bf16 pairs (BF16_DOT). */
MOE_EP_PRIVATE void moe_ep__ffn_pack(const moe_ep__ffn_args* f, int64_t t0, int64_t t1) {
    if (f->up.pairs) moe_ep__pack_row_pairs(f->up.path, f->x, f->ldx, f->up.m, f->d_model, t0, t1, f->x_tiles);
    else moe_ep__pack_rows(f->up.path, f->x, f->ldx, f->up.m, f->up.k, t0, t1, f->x_tiles);
}

/* The stages: pack x, the up product (with the activation), (BF16_DOT: the hidden rows as
   bf16 pairs, over x's tiles), the down product. In a team every thread calls this and
   `omp for` shares the loops out, its closing barrier ordering the stages; products go by
   work item to whichever thread is free, so a busy core does not hold the others up. Which
   thread computes an element never changes its value. Alone (team 0) it runs the same
   loops on the calling thread. */
MOE_EP_PRIVATE void moe_ep__ffn_stages(const moe_ep__ffn_args* f, float* scratch, int team) {
    const moe_ep__path* path = f->up.path;
    int64_t i, tiles = moe_ep__row_tiles(path, f->up.m), up_items = moe_ep__gemm_items(&f->up);
    int64_t down_items = moe_ep__gemm_items(&f->down);
    if (!team) {
        moe_ep__ffn_pack(f, 0, tiles);
        for (i = 0; i < up_items; ++i) moe_ep__gemm_item(&f->up, i, scratch);
        if (f->down.pairs) moe_ep__pair_tiles(path, f->up.c, f->up.c_kext, f->up.m, f->up.n, 0, tiles, f->x_tiles);
        for (i = 0; i < down_items; ++i) moe_ep__gemm_item(&f->down, i, scratch);
        return;
    }
#ifdef _OPENMP
#pragma omp for schedule(static)
    for (i = 0; i < tiles; ++i) moe_ep__ffn_pack(f, i, i + 1);
#pragma omp for schedule(dynamic, 1)
    for (i = 0; i < up_items; ++i) moe_ep__gemm_item(&f->up, i, scratch);
    if (f->down.pairs) {
#pragma omp for schedule(static)
        for (i = 0; i < tiles; ++i) moe_ep__pair_tiles(path, f->up.c, f->up.c_kext, f->up.m, f->up.n, i, i + 1, f->x_tiles);
    }
#pragma omp for schedule(dynamic, 1)
    for (i = 0; i < down_items; ++i) moe_ep__gemm_item(&f->down, i, scratch);
#endif
}

MOE_EP_PRIVATE moe_ep_result moe_ep__ffn(moe_ep_context* ctx, int local_expert, const float* rows, int64_t m,
                                         float* out) {
    const moe_ep_desc* d = &ctx->desc;
    const moe_ep__path* path = ctx->path;
    int threads = moe_ep__kernel_threads(ctx, m, d->d_model, d->d_ff);
    int64_t ldh = moe_ep__hidden_stride(path, d), tiled = moe_ep__row_tiles(path, m) * path->mr;
    int64_t scratch_floats = moe_ep__scratch_floats(path);
    const bool pairs = d->arithmetic == MOE_EP_ARITHMETIC_BF16_DOT;
    /* BF16_DOT counts k in pairs: x's, the hidden rows' (ldh is even) */
    const int k_up = pairs ? (d->d_model + 1) / 2 : d->d_model, k_down = pairs ? (d->d_ff + 1) / 2 : d->d_ff;
    const int64_t x_kext = pairs ? MOE_EP__MAX((int64_t)k_up, ldh / 2) : d->d_model;
    moe_ep__ffn_args f;
    memset(&f, 0, sizeof f);
    f.x_tiles = moe_ep__workspace(ctx, &ctx->kernel_rows, &ctx->kernel_rows_capacity, tiled * x_kext);
    f.scratch = moe_ep__workspace(ctx, &ctx->kernel_scratch, &ctx->kernel_scratch_capacity,
                                  ctx->num_threads * scratch_floats);
    f.up.c = moe_ep__workspace(ctx, &ctx->hidden, &ctx->hidden_capacity, tiled * ldh);
    if (!f.x_tiles || !f.scratch || !f.up.c)
        return moe_ep__fail(ctx, MOE_EP_ERROR_OUT_OF_MEMORY, MOE_EP_LOG_ITEM_OUT_OF_MEMORY,
                            "out of memory for %lld rows of workspace",
                            (long long)m);
    f.x = rows;
    f.ldx = d->d_model;
    f.d_model = d->d_model;
    f.up.path = path; f.up.format = pairs ? MOE_EP_WEIGHT_FORMAT_FP32 : d->weight_format; f.up.pairs = pairs;
    f.up.a = f.x_tiles; f.up.a_kext = k_up; f.up.m = m; f.up.k = k_up; f.up.n = d->d_ff;
    f.up.panels = moe_ep__aligned_bytes(ctx->packed_up[local_expert]); f.up.act = d->activation;
    f.up.bias = ctx->bias_up[local_expert]; f.up.scale = ctx->scale_up[local_expert];
    f.up.alpha = d->swiglu_alpha; f.up.limit = d->swiglu_limit;
    f.up.ldc = 0; f.up.c_kext = ldh;
    f.down.path = path; f.down.format = f.up.format; f.down.pairs = pairs;
    f.down.a = pairs ? f.x_tiles : f.up.c; f.down.a_kext = pairs ? ldh / 2 : ldh; f.down.m = m; f.down.k = k_down;
    f.down.n = d->d_model;
    f.down.panels = moe_ep__aligned_bytes(ctx->packed_down[local_expert]); f.down.act = MOE_EP_ACTIVATION_COUNT;
    f.down.bias = ctx->bias_down[local_expert]; f.down.scale = ctx->scale_down[local_expert];
    f.down.alpha = 0.0f; f.down.limit = 0.0f;
    f.down.c = out; f.down.ldc = d->d_model; f.down.c_kext = 0;
#ifdef _OPENMP
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
        moe_ep__ffn_stages(&f, f.scratch + omp_get_thread_num() * scratch_floats, 1);
        return MOE_EP_OK;
    }
#endif
    moe_ep__ffn_stages(&f, f.scratch, 0);
    (void)threads;
    return MOE_EP_OK;
}
#endif

/* >>router kernel: moe_ep__router_logits. Each sum runs i = 0, 1, ..., d_model - 1 from
   zero, one fused multiply-add per step (as every path and target can, SAME BITS
   EVERYWHERE), as one token alone would, so the bits depend on neither the block of
   tokens nor the path. The vector paths keep the sums of 8 tokens x 2 vectors of experts
   in registers while that strip of W^T streams by (the path's router_strip); experts past
   the last whole strip, and the portable path, run the same sums one expert at a time,
   their block of sums in L1. */
MOE_EP_PRIVATE void moe_ep__router_logits(const moe_ep__path* path, const float* x, int64_t rows, int D,
                                          const float* wt, int E, float* logits) {
    int64_t r, i, e = 0;
    if (path->strip > 0)
        for (; e + path->strip <= E; e += path->strip) path->router_strip(x, rows, D, wt, E, (int)e, logits);
    if (e == E) return;
    for (r = 0; r < rows; ++r)
        for (i = e; i < E; ++i) logits[r * E + i] = 0.0f;
    for (i = 0; i < D; ++i) {
        const float* w = wt + i * E;
        for (r = 0; r < rows; ++r) {
            float xv = x[r * D + i];
            float* acc = logits + r * E;
            int64_t c;
            for (c = e; c < E; ++c) acc[c] = moe_ep__fmaf(xv, w[c], acc[c]);
        }
    }
}

MOE_EP_API const char* moe_ep_kernel_path(void) {
#if defined(MOE_EP_CBLAS)
    return "CBLAS";
#else
    const char* why;
    return moe_ep__kernel_name(moe_ep__select_path(MOE_EP_KERNEL_DEFAULT, &why)->kernel);
#endif
}

MOE_EP_API const char* moe_ep_kernel_string(moe_ep_kernel kernel) { return moe_ep__kernel_name(kernel); }

MOE_EP_API int64_t moe_ep_weight_bytes(const moe_ep_context* ctx) {
    if (!ctx) return 0;
    return ctx->weight_bytes + (ctx->shared ? ctx->shared->weight_bytes : 0);
}

MOE_EP_API moe_ep_result moe_ep_expert_ffn(moe_ep_context* ctx, int local_expert, const float* rows,
                                           int64_t row_count, float* out) {
    if (!ctx) return MOE_EP_ERROR_INVALID_ARGUMENT;
    if (local_expert < 0 || local_expert >= ctx->local_experts)
        return moe_ep__fail(ctx, MOE_EP_ERROR_INVALID_ARGUMENT, MOE_EP_LOG_ITEM_FFN_ARGS,
                            "local_expert (%d) must be in [0, %d)",
                            local_expert, ctx->local_experts);
    if (row_count < 0 || row_count > moe_ep__max_tokens(ctx))
        return moe_ep__fail(ctx, MOE_EP_ERROR_INVALID_ARGUMENT, MOE_EP_LOG_ITEM_FFN_ARGS,
                            "moe_ep_expert_ffn: row_count (%lld) must be in [0, %lld]", (long long)row_count,
                            (long long)moe_ep__max_tokens(ctx));
    if (row_count > 0 && (!rows || !out))
        return moe_ep__fail(ctx, MOE_EP_ERROR_INVALID_ARGUMENT, MOE_EP_LOG_ITEM_FFN_ARGS,
                            "rows and out must not be NULL");
    if (!ctx->packed_up)
        return moe_ep__fail(ctx, MOE_EP_ERROR_INVALID_ARGUMENT, MOE_EP_LOG_ITEM_FFN_NO_WEIGHTS,
                            "no expert weights: the context uses expert_fn");
    if (row_count == 0) return MOE_EP_OK;
    return moe_ep__ffn(ctx, local_expert, rows, row_count, out);
}

/* Copy (CBLAS: as nn.Linear matrices, gate and up stacked, the biases after them) or
   pack one expert's weights (the biases, then int8's scales, after the panels, in panel
   order). A value the format cannot hold is a named error. */
MOE_EP_PRIVATE moe_ep_result moe_ep__pack_expert(moe_ep_context* ctx, int l, moe_ep__validator* v) {
    const moe_ep_desc* d = &ctx->desc;
    const moe_ep_allocator* a = &d->allocator;
    moe_ep__wview gate, up, down;
    int gated = moe_ep__gated(d->activation);
    int64_t F = d->d_ff, D = d->d_model;
    bool up_bias, down_bias;
    moe_ep__expert_views(ctx, l, &gate, &up, &down);
    up_bias = gate.bias || (gated && up.bias);
    down_bias = down.bias != NULL;
#ifdef MOE_EP_CBLAS
    {
        int64_t pairs = gated ? 2 : 1, i, kk;
        const moe_ep__wview* views[3];
        float* dst[3];
        float* bias[3];
        int64_t n[3], k[3], t;
        float* up_floats = (float*)moe_ep__calloc(a, pairs * F * D + (up_bias ? pairs * F : 0), sizeof(float));
        float* down_floats = (float*)moe_ep__calloc(a, D * F + (down_bias ? D : 0), sizeof(float));
        ctx->packed_up[l] = up_floats;
        ctx->packed_down[l] = down_floats;
        if (!up_floats || !down_floats) return MOE_EP_ERROR_OUT_OF_MEMORY;
        views[0] = &gate; dst[0] = up_floats; bias[0] = up_bias ? up_floats + pairs * F * D : NULL; n[0] = F; k[0] = D;
        views[1] = gated ? &up : NULL; dst[1] = up_floats + F * D; bias[1] = up_bias ? up_floats + pairs * F * D + F : NULL;
        n[1] = F; k[1] = D;
        views[2] = &down; dst[2] = down_floats; bias[2] = down_bias ? down_floats + D * F : NULL; n[2] = D; k[2] = F;
        for (t = 0; t < 3; ++t)     /* the [n, k] weight as an nn.Linear matrix, its biases (0 where none) */
            for (i = 0; views[t] && i < n[t]; ++i) {
                for (kk = 0; kk < k[t]; ++kk) dst[t][i * k[t] + kk] = moe_ep__wget(views[t], i, kk);
                if (bias[t]) bias[t][i] = views[t]->bias ? views[t]->bias[i * views[t]->bias_stride] : 0.0f;
            }
        ctx->bias_up[l] = up_bias ? up_floats + pairs * F * D : NULL;
        ctx->bias_down[l] = down_bias ? down_floats + D * F : NULL;
        ctx->weight_bytes += (int64_t)sizeof(float) * (pairs * F * D + (up_bias ? pairs * F : 0) + D * F +
                                                       (down_bias ? D : 0));
        (void)v;
    }
#else
    {
        const moe_ep__path* path = ctx->path;
        const moe_ep_weight_format f = d->weight_format;
        const bool pairs = d->arithmetic == MOE_EP_ARITHMETIC_BF16_DOT;     /* k rounded up to even */
        const int64_t nr = path->nr, esize = moe_ep__format_bytes(f);
        const int64_t up_panels = moe_ep__panel_count(d->d_ff, moe_ep__panel_cols(path, d->activation));
        const int64_t down_panels = moe_ep__panel_count(d->d_model, (int)nr);
        const int64_t up_bytes = moe_ep__round_up(up_panels * (pairs ? D + (D & 1) : D) * nr * esize, MOE_EP__ALIGN);
        const int64_t down_bytes = moe_ep__round_up(down_panels * (pairs ? F + (F & 1) : F) * nr * esize, MOE_EP__ALIGN);
        const int64_t up_extra = up_panels * nr * ((up_bias ? 1 : 0) + (f == MOE_EP_WEIGHT_FORMAT_INT8 ? 1 : 0));
        const int64_t down_extra = down_panels * nr * ((down_bias ? 1 : 0) + (f == MOE_EP_WEIGHT_FORMAT_INT8 ? 1 : 0));
        moe_ep__pack_fault fault;
        unsigned char *up_base, *down_base;
        float *up_tail, *down_tail, *up_scale, *down_scale;
        bool ok;
        ctx->packed_up[l] = moe_ep__calloc(a, up_bytes + (int64_t)sizeof(float) * up_extra + MOE_EP__ALIGN, 1);
        ctx->packed_down[l] = moe_ep__calloc(a, down_bytes + (int64_t)sizeof(float) * down_extra + MOE_EP__ALIGN, 1);
        if (!ctx->packed_up[l] || !ctx->packed_down[l]) return MOE_EP_ERROR_OUT_OF_MEMORY;
        ctx->weight_bytes += up_bytes + down_bytes + (int64_t)sizeof(float) * (up_extra + down_extra);
        up_base = moe_ep__aligned_bytes(ctx->packed_up[l]);
        down_base = moe_ep__aligned_bytes(ctx->packed_down[l]);
        up_tail = (float*)(void*)(up_base + up_bytes);
        down_tail = (float*)(void*)(down_base + down_bytes);
        ctx->bias_up[l] = up_bias ? up_tail : NULL;
        ctx->bias_down[l] = down_bias ? down_tail : NULL;
        up_scale = f == MOE_EP_WEIGHT_FORMAT_INT8 ? up_tail + (up_bias ? up_panels * nr : 0) : NULL;
        down_scale = f == MOE_EP_WEIGHT_FORMAT_INT8 ? down_tail + (down_bias ? down_panels * nr : 0) : NULL;
        ctx->scale_up[l] = up_scale;
        ctx->scale_down[l] = down_scale;
        ok = moe_ep__pack(path, f, pairs, &gate, gated ? &up : NULL, d->d_ff, d->d_model, up_base,
                          up_bias ? up_tail : NULL, up_scale, &fault) &&
             moe_ep__pack(path, f, pairs, &down, NULL, d->d_model, d->d_ff, down_base, down_bias ? down_tail : NULL,
                          down_scale, &fault);
        if (!ok) {
            moe_ep__check(v, false, MOE_EP_LOG_ITEM_DESC_WEIGHT_NOT_CONVERTIBLE,
                          "moe_ep_desc.experts[%d].%s: element (%lld, %lld) of the nn.Linear-shaped weight (%g) "
                          "cannot be stored as %s (%s)", (int)(moe_ep__local_weights(ctx, l) - d->experts),
                          fault.view->name, (long long)fault.row, (long long)(fault.col + fault.view->k_begin),
                          (double)fault.value, moe_ep__format_name(f),
                          f == MOE_EP_WEIGHT_FORMAT_INT8 ? "int8 needs finite weights"
                          : f == MOE_EP_WEIGHT_FORMAT_FP16 ? "its magnitude rounds above fp16's largest, 65504"
                          : "its magnitude rounds above bf16's largest");
            return MOE_EP_ERROR_INVALID_ARGUMENT;
        }
    }
#endif
    return MOE_EP_OK;
}

#if defined(__clang__)
#pragma STDC FP_CONTRACT DEFAULT
#endif
#endif /* MOE_EP_IMPL_INCLUDED */
#endif /* MOE_EP_IMPLEMENTATION */

/*
------------------------------------------------------------------------------
This software is available under 2 licenses -- choose whichever you prefer.
------------------------------------------------------------------------------
ALTERNATIVE A - MIT License
Copyright (c) 2026 the moe_ep authors
Permission is hereby granted, free of charge, to any person obtaining a copy of
this software and associated documentation files (the "Software"), to deal in
the Software without restriction, including without limitation the rights to
use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies
of the Software, and to permit persons to whom the Software is furnished to do
so, subject to the following conditions:
The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.
THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
------------------------------------------------------------------------------
ALTERNATIVE B - Public Domain (www.unlicense.org)
This is free and unencumbered software released into the public domain.
Anyone is free to copy, modify, publish, use, compile, sell, or distribute this
software, either in source code form or as a compiled binary, for any purpose,
commercial or non-commercial, and by any means.
In jurisdictions that recognize copyright laws, the author or authors of this
software dedicate any and all copyright interest in the software to the public
domain. We make this dedication for the benefit of the public at large and to
the detriment of our heirs and successors. We intend this dedication to be an
overt act of relinquishment in perpetuity of all present and future rights to
this software under copyright law.
THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN
ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION
WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
------------------------------------------------------------------------------
*/
