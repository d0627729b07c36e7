/* moe_ep_cuda_gemm.cuh -- the Hopper grouped expert GEMM of moe_ep's GPU layer -- MIT or public domain

   Included by moe_ep_cuda_kernels.cuh (its declarations always, its kernel where that file's
   kernels are built); nothing here is for users. One persistent kernel computes every local
   expert's projection:

       out[r, :] = epilogue(rows[r, :] . W_l^T)     for each row r of expert l

   rows: bf16 [a_rows, k] (row stride lda), grouped by expert: expert l owns rows
   first_row[l] .. first_row[l + 1] - 1 (first_row: device, experts + 1 entries, so that the
   counts can come from a kernel and the host never reads them). W: bf16, expert l's matrix
   is rows l * w_rows .. of a [experts * w_rows, k] tensor (nn.Linear layout: one row per
   output). Accumulation in fp32. Epilogues (mode):
     0 plain:  out [rows, n] = acc (+ bias), bf16 or fp32;
     1 gated:  out [rows, n] = act(acc_gate + b_gate, acc_up + b_up), the gate from W rows
               0 .. n - 1, the up product from rows up_offset .. up_offset + n - 1
               (SwiGLU and the clamped SwiGLU: moe_ep__cuda_k_act's formulas, applied to the
               fp32 sums, before any rounding);
     2 act:    out = act(acc + bias) (GELU, ReLU).

   Why written by hand: the library is headers that nvcc compiles with nothing else, and the
   machines that build it (CI, a GPU box without network access) cannot be assumed to have
   CUTLASS. The kernel is the textbook Hopper shape, small enough to read whole:
   - a persistent grid of one block per SM walks a tile list made on the device from
     first_row (BM = 128 rows of one expert x 2 x 128 output columns), so no host
     synchronisation and no per-expert launch: the layer can live in a CUDA graph;
   - one producer thread feeds a 4-stage shared-memory ring with the bulk tensor copy
     engine (cp.async.bulk.tensor, 128-byte swizzle, mbarrier completion): one A tile
     (128 rows x 64) and two W tiles (128 x 64 each) per stage. The rows are already
     grouped by expert by the dispatch, so the "gather" is the A tile's row coordinate;
     rows past an expert's end (the next expert's, or beyond the buffer: zeros) are
     computed and never stored;
   - two consumer warpgroups, 64 rows each, issue wgmma m64n128k16 (bf16 in, fp32 out) for
     both W tiles from shared memory, one k-tile in flight behind the next;
   - the epilogue applies bias and activation in fp32 and stores straight from registers.
   The gate and up products of the gated mode come from the same block, so SwiGLU needs no
   intermediate in device memory.

   Built only for sm_90a (nvcc -gencode=arch=compute_90a,code=sm_90a); other targets compile
   an empty kernel, and moe_ep__cuda_k_gemm_ready says 0 there: callers keep cuBLAS. */
#ifndef MOE_EP_CUDA_GEMM_CUH_INCLUDED
#define MOE_EP_CUDA_GEMM_CUH_INCLUDED

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct moe_ep__cuda_k_gemm_args {
    const void* a;              /* bf16 rows [a_rows, lda] (first k used); a_rows bounds every read */
    int64_t a_rows, lda;
    const void* w;              /* bf16 [experts * w_rows, k], rows contiguous */
    int64_t w_rows;
    const int64_t* first_row;   /* device [experts + 1], ascending; the last is the rows' end */
    int experts, k, n;          /* n: output columns */
    int mode;                   /* 0 plain, 1 gated, 2 activation on each column (see above) */
    int up_offset;              /* mode 1: W row of the first up product within an expert */
    int activation;             /* moe_ep__cuda_k_act's codes: 1 SwiGLU, 2 GELU, 3 ReLU, 4 clamped SwiGLU */
    float alpha, limit;         /* the clamped SwiGLU's */
    const void* bias;           /* bf16 [experts, bias_ld] or NULL: mode 1 gate at 0, up at up_offset */
    int64_t bias_ld;
    void* out;                  /* [a_rows, ldo]: row r of the input gives row r of the output */
    int64_t ldo;
    int out_f32;                /* 1: fp32 output, else bf16 */
} moe_ep__cuda_k_gemm_args;

/* 1 when the grouped GEMM runs on the current device (compute capability 9.0, this build
   has sm_90a code, the driver has the tensor-map call), 0 when it does not. Runs a probe
   kernel and waits for it: call it when creating a layer, not per forward. */
int moe_ep__cuda_k_gemm_ready(void);
/* Queues the GEMM on stream; cudaErrorInvalidValue (as int) for shapes it does not take:
   k, n, lda, ldo and up_offset multiples of 8, 16-byte aligned a and w, 1..1024 experts. */
int moe_ep__cuda_k_gemm(const moe_ep__cuda_k_gemm_args* g, void* stream);

#ifdef __cplusplus
}
#endif
#endif /* MOE_EP_CUDA_GEMM_CUH_INCLUDED */

#ifdef MOE_EP_CUDA_KERNELS_IMPLEMENTATION
#ifndef MOE_EP_CUDA_GEMM_IMPL_INCLUDED
#define MOE_EP_CUDA_GEMM_IMPL_INCLUDED

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MOE_EP__GG_SM90A 1
#endif

namespace moe_ep_cuda_gemm {

constexpr int BM = 128, BN = 128, BK = 64, STAGES = 4, THREADS = 384, MAX_EXPERTS = 1024;
constexpr uint32_t TILE_BYTES = BN * BK * 2;            /* one 128 x 64 bf16 tile; A's too (BM == BN) */
constexpr uint32_t STAGE_BYTES = 3 * TILE_BYTES;        /* A, W tile 0, W tile 1 */
constexpr size_t SMEM_BYTES = 1024 + (size_t)STAGES * STAGE_BYTES + 2 * STAGES * 8 + (MAX_EXPERTS + 1) * 4;

struct params {
    const int64_t* first_row;
    int experts, k_tiles, n, n_tiles, mode, up_offset, out_f32;
    int64_t w_rows, bias_ld, ldo;
    const __nv_bfloat16* bias;
    void* out;
    moe_ep__cuda_k_act act;
};

#ifdef MOE_EP__GG_SM90A
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void bar_init(uint64_t* b, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(b)), "r"(count) : "memory");
}
__device__ __forceinline__ void bar_wait(uint64_t* b, uint32_t parity) {
    uint32_t done;
    do {
        asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                     " selp.u32 %0, 1, 0, p;\n}" : "=r"(done) : "r"(smem_addr(b)), "r"(parity) : "memory");
    } while (!done);
}
__device__ __forceinline__ void bar_arrive(uint64_t* b) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(b)) : "memory");
}
__device__ __forceinline__ void bar_expect(uint64_t* b, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(b)), "r"(bytes) : "memory");
}
/* a 2-D box (BK columns from col, BN rows from row) of map into dst, counted on bar */
__device__ __forceinline__ void tma_load(void* dst, const CUtensorMap* map, uint64_t* bar, int col, int row) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];"
                 ::"r"(smem_addr(dst)), "l"((uint64_t)(uintptr_t)map), "r"(smem_addr(bar)), "r"(col), "r"(row)
                 : "memory");
}

/* A shared-memory matrix descriptor for a K-major tile of 128-byte rows in the 128-byte
   swizzle: 8-row groups 1024 bytes apart (the leading offset is unused in this layout). */
__device__ __forceinline__ uint64_t smem_desc(const void* p) {
    return (uint64_t)((smem_addr(p) & 0x3FFFF) >> 4) | ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)1 << 62);
}

#define MOE_EP__GG_D8(b) "+f"(d[b]), "+f"(d[b + 1]), "+f"(d[b + 2]), "+f"(d[b + 3]), \
                         "+f"(d[b + 4]), "+f"(d[b + 5]), "+f"(d[b + 6]), "+f"(d[b + 7])
/* d[64] += A (64 x 16, descriptor a) . B (128 x 16, descriptor b)^T, asynchronously */
__device__ __forceinline__ void wgmma_128(float* d, uint64_t a, uint64_t b) {
    asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
                 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
                 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
                 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
                 "%64, %65, p, 1, 1, 0, 0;\n}"
                 : MOE_EP__GG_D8(0), MOE_EP__GG_D8(8), MOE_EP__GG_D8(16), MOE_EP__GG_D8(24),
                   MOE_EP__GG_D8(32), MOE_EP__GG_D8(40), MOE_EP__GG_D8(48), MOE_EP__GG_D8(56)
                 : "l"(a), "l"(b), "r"(1));
}
#undef MOE_EP__GG_D8
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }
/* keeps the compiler from moving accumulator reads across a wait */
__device__ __forceinline__ void reg_fence(float* d) {
#pragma unroll
    for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

/* Tile t of the list: expert l, its first row, the rows left in the expert from there, and
   the column tile nt. Tiles run expert by expert, the row tiles of one column tile together
   (blocks that run at once share W tiles in L2). */
struct tile {
    int expert, nt;
    int64_t row, rows;
};
__device__ __forceinline__ tile find_tile(const params& p, const int* tile_end, int t) {
    int lo = 0, hi = p.experts - 1;
    while (lo < hi) {
        int mid = (lo + hi) >> 1;
        if (tile_end[mid] > t) hi = mid;
        else lo = mid + 1;
    }
    tile r;
    int local = t - (lo ? tile_end[lo - 1] : 0);
    int64_t first = p.first_row[lo], count = p.first_row[lo + 1] - first;
    int m_tiles = (int)((count + BM - 1) / BM), mt = local % m_tiles;
    r.expert = lo;
    r.nt = local / m_tiles;
    r.row = first + (int64_t)mt * BM;
    r.rows = count - (int64_t)mt * BM;
    return r;
}

__device__ __forceinline__ float bias_at(const params& p, int expert, int col) {
    return p.bias ? __bfloat162float(p.bias[(int64_t)expert * p.bias_ld + col]) : 0.0f;
}

__device__ __forceinline__ void store2(const params& p, int64_t row, int col, float v0, float v1) {
    if (p.out_f32) {
        *(float2*)((float*)p.out + row * p.ldo + col) = make_float2(v0, v1);
    } else {
        *(__nv_bfloat162*)((__nv_bfloat16*)p.out + row * p.ldo + col) = __floats2bfloat162_rn(v0, v1);
    }
}

/* Register j of a warpgroup's m64n128 accumulator holds row 16 * warp + lane / 4 + 8 * ((j / 2) % 2),
   column 8 * (j / 4) + 2 * (lane % 4) + j % 2. Mode 0 and 2: one accumulator, columns from col0. */
__device__ __forceinline__ void store_columns(const params& p, const tile& tl, int row0, int lane, const float* acc,
                                              int col0) {
    using moe_ep_cuda_kernels::act_f;
#pragma unroll
    for (int j = 0; j < 64; j += 2) {
        int r = row0 + lane / 4 + 8 * ((j / 2) % 2), col = col0 + 8 * (j / 4) + 2 * (lane % 4);
        if (r < tl.rows && col < p.n) {
            float v0 = acc[j] + bias_at(p, tl.expert, col), v1 = acc[j + 1] + bias_at(p, tl.expert, col + 1);
            if (p.mode == 2) {
                v0 = act_f(p.act, v0, 0.0f);
                v1 = act_f(p.act, v1, 0.0f);
            }
            store2(p, tl.row + r, col, v0, v1);
        }
    }
}
/* Mode 1: the gate from acc0, the up product from acc1. */
__device__ __forceinline__ void store_gated(const params& p, const tile& tl, int row0, int lane, const float* acc0,
                                            const float* acc1) {
    using moe_ep_cuda_kernels::act_f;
#pragma unroll
    for (int j = 0; j < 64; j += 2) {
        int r = row0 + lane / 4 + 8 * ((j / 2) % 2), col = tl.nt * BN + 8 * (j / 4) + 2 * (lane % 4);
        if (r < tl.rows && col < p.n) {
            float g0 = acc0[j] + bias_at(p, tl.expert, col), g1 = acc0[j + 1] + bias_at(p, tl.expert, col + 1);
            float u0 = acc1[j] + bias_at(p, tl.expert, p.up_offset + col);
            float u1 = acc1[j + 1] + bias_at(p, tl.expert, p.up_offset + col + 1);
            store2(p, tl.row + r, col, act_f(p.act, g0, u0), act_f(p.act, g1, u1));
        }
    }
}
#endif /* MOE_EP__GG_SM90A */

__global__ void __launch_bounds__(THREADS, 1)
grouped_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_w, const params p) {
#ifdef MOE_EP__GG_SM90A
    extern __shared__ uint8_t raw[];
    uint8_t* ring = (uint8_t*)(((uintptr_t)raw + 1023) & ~(uintptr_t)1023);
    uint64_t* full = (uint64_t*)(ring + (size_t)STAGES * STAGE_BYTES);
    uint64_t* empty = full + STAGES;
    int* tile_end = (int*)(empty + STAGES);     /* tiles of experts 0..l, inclusive */
    const int wg = threadIdx.x / 128, tid = threadIdx.x % 128;
    if (threadIdx.x < 32) {     /* the tile list: one warp scans the experts' tile counts */
        int carry = 0;
        for (int l0 = 0; l0 < p.experts; l0 += 32) {
            int l = l0 + (int)threadIdx.x, t = 0;
            if (l < p.experts) {
                int64_t count = p.first_row[l + 1] - p.first_row[l];
                t = count > 0 ? (int)((count + BM - 1) / BM) * p.n_tiles : 0;
            }
            for (int o = 1; o < 32; o <<= 1) {
                int v = __shfl_up_sync(0xffffffffu, t, o);
                if ((int)threadIdx.x >= o) t += v;
            }
            if (l < p.experts) tile_end[l] = carry + t;
            carry += __shfl_sync(0xffffffffu, t, 31);
        }
    }
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) {
            bar_init(&full[s], 1);
            bar_init(&empty[s], 8);     /* one arrival per consumer warp */
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    const int total = tile_end[p.experts - 1];
    if (wg == 0) {      /* producer */
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
        if (tid == 0) {
            int it = 0;
            for (int t = blockIdx.x; t < total; t += gridDim.x) {
                tile tl = find_tile(p, tile_end, t);
                int wbase = (int)((int64_t)tl.expert * p.w_rows);
                int b0 = wbase + (p.mode == 1 ? tl.nt * BN : tl.nt * 2 * BN);
                int b1 = p.mode == 1 ? wbase + p.up_offset + tl.nt * BN : b0 + BN;
                for (int kt = 0; kt < p.k_tiles; ++kt, ++it) {
                    int s = it % STAGES;
                    uint8_t* st = ring + (size_t)s * STAGE_BYTES;
                    bar_wait(&empty[s], ((it / STAGES) & 1) ^ 1);
                    bar_expect(&full[s], STAGE_BYTES);
                    tma_load(st, &map_a, &full[s], kt * BK, (int)tl.row);
                    tma_load(st + TILE_BYTES, &map_w, &full[s], kt * BK, b0);
                    tma_load(st + 2 * TILE_BYTES, &map_w, &full[s], kt * BK, b1);
                }
            }
        }
    } else {            /* consumers: warpgroup 1 rows 0..63 of a tile, warpgroup 2 rows 64..127 */
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
        const int half = wg - 1, warp = tid / 32, lane = tid % 32;
        int it = 0;
        for (int t = blockIdx.x; t < total; t += gridDim.x) {
            tile tl = find_tile(p, tile_end, t);
            float acc0[64], acc1[64];
#pragma unroll
            for (int i = 0; i < 64; ++i) acc0[i] = acc1[i] = 0.0f;
            int prev = -1;
            for (int kt = 0; kt < p.k_tiles; ++kt, ++it) {
                int s = it % STAGES;
                uint8_t* st = ring + (size_t)s * STAGE_BYTES;
                bar_wait(&full[s], (it / STAGES) & 1);
                uint64_t da = smem_desc(st + half * 64 * 128), d0 = smem_desc(st + TILE_BYTES),
                         d1 = smem_desc(st + 2 * TILE_BYTES);
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < BK / 16; ++kk) {  /* 16 columns are 32 bytes: 2 in the descriptor's units */
                    wgmma_128(acc0, da + 2 * kk, d0 + 2 * kk);
                    wgmma_128(acc1, da + 2 * kk, d1 + 2 * kk);
                }
                wgmma_commit();
                wgmma_wait<1>();    /* the previous k-tile's products are done: its stage is free */
                if (prev >= 0 && lane == 0) bar_arrive(&empty[prev]);
                prev = s;
            }
            wgmma_wait<0>();
            reg_fence(acc0);
            reg_fence(acc1);
            if (prev >= 0 && lane == 0) bar_arrive(&empty[prev]);
            if (p.mode == 1) {
                store_gated(p, tl, half * 64 + warp * 16, lane, acc0, acc1);
            } else {
                store_columns(p, tl, half * 64 + warp * 16, lane, acc0, tl.nt * 2 * BN);
                store_columns(p, tl, half * 64 + warp * 16, lane, acc1, tl.nt * 2 * BN + BN);
            }
        }
    }
#else
    (void)map_a;
    (void)map_w;
    (void)p;
#endif
}

__global__ void probe_kernel(int* out) {
#ifdef MOE_EP__GG_SM90A
    *out = 1;
#else
    *out = 0;
#endif
}

static PFN_cuTensorMapEncodeTiled_v12000 lookup_encode(void) {
    void* f = NULL;
    cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
        return NULL;
    return (PFN_cuTensorMapEncodeTiled_v12000)f;
}

/* the driver's call, looked up once per process (a C++ static: initialised once, thread-safe) */
static PFN_cuTensorMapEncodeTiled_v12000 encode_fn(void) {
    static const PFN_cuTensorMapEncodeTiled_v12000 fn = lookup_encode();
    return fn;
}

/* rows x cols bf16 with a row stride of ld elements, read in 64 x 128 boxes */
static bool encode(CUtensorMap* map, const void* ptr, int64_t rows, int64_t cols, int64_t ld) {
    PFN_cuTensorMapEncodeTiled_v12000 fn = encode_fn();
    cuuint64_t dims[2] = { (cuuint64_t)cols, (cuuint64_t)rows };
    cuuint64_t strides[1] = { (cuuint64_t)ld * 2 };
    cuuint32_t box[2] = { BK, BN }, steps[2] = { 1, 1 };
    return fn && fn(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, (void*)(uintptr_t)ptr, dims, strides, box, steps,
                    CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                    CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

} /* namespace moe_ep_cuda_gemm */

extern "C" int moe_ep__cuda_k_gemm_ready(void) {
    using namespace moe_ep_cuda_gemm;
    int dev = 0, major = 0, minor = 0, *flag = NULL, got = 0;
    if (cudaGetDevice(&dev) == cudaSuccess &&
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess && major == 9 &&
        minor == 0 && encode_fn() &&
        cudaFuncSetAttribute(grouped_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)SMEM_BYTES) ==
            cudaSuccess &&
        cudaMalloc((void**)&flag, sizeof(int)) == cudaSuccess) {
        probe_kernel<<<1, 1>>>(flag);
        if (cudaMemcpy(&got, flag, sizeof(int), cudaMemcpyDeviceToHost) != cudaSuccess) got = 0;
        cudaFree(flag);
    }
    (void)cudaGetLastError();
    return got;
}

extern "C" int moe_ep__cuda_k_gemm(const moe_ep__cuda_k_gemm_args* g, void* stream) {
    using namespace moe_ep_cuda_gemm;
    CUtensorMap map_a, map_w;
    params p;
    int sms = 0, dev = 0;
    bool gated = g->mode == 1;
    if (g->experts < 1 || g->experts > MAX_EXPERTS || g->k < 8 || g->k % 8 || g->n < 8 || g->n % 8 ||
        g->lda % 8 || g->ldo % 8 || g->lda < g->k || g->ldo < g->n || g->up_offset % 8 || g->mode < 0 ||
        g->mode > 2 || (uintptr_t)g->a % 16 || (uintptr_t)g->w % 16 || (gated && g->up_offset < g->n) ||
        g->w_rows < (gated ? (int64_t)g->up_offset + g->n : (int64_t)g->n) ||
        (int64_t)g->experts * g->w_rows > INT32_MAX || g->a_rows > INT32_MAX)
        return (int)cudaErrorInvalidValue;
    if (g->a_rows <= 0) return 0;
    if (!encode(&map_a, g->a, g->a_rows, g->k, g->lda) ||
        !encode(&map_w, g->w, (int64_t)g->experts * g->w_rows, g->k, g->k))
        return (int)cudaErrorInvalidValue;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
        return (int)cudaGetLastError();
    p.first_row = g->first_row;
    p.experts = g->experts;
    p.k_tiles = (g->k + BK - 1) / BK;
    p.n = g->n;
    p.n_tiles = gated ? (g->n + BN - 1) / BN : (g->n + 2 * BN - 1) / (2 * BN);
    p.mode = g->mode;
    p.up_offset = g->up_offset;
    p.out_f32 = g->out_f32;
    p.w_rows = g->w_rows;
    p.bias_ld = g->bias_ld;
    p.ldo = g->ldo;
    p.bias = (const __nv_bfloat16*)g->bias;
    p.out = g->out;
    p.act.activation = g->activation;
    p.act.alpha = g->alpha;
    p.act.limit = g->limit;
    p.act.bias = NULL;
    p.act.first_row = NULL;
    p.act.groups = 0;
    grouped_kernel<<<sms, THREADS, SMEM_BYTES, (cudaStream_t)stream>>>(map_a, map_w, p);
    return (int)cudaGetLastError();
}

#endif /* MOE_EP_CUDA_GEMM_IMPL_INCLUDED */
#endif /* MOE_EP_CUDA_KERNELS_IMPLEMENTATION */
