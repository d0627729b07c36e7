/* nccl_mpi_demo -- one process per GPU: the NCCL id is shared over MPI, the layer runs on
   the GPUs, and rank 0 checks the result against the core's CPU layer.

       mpirun -np 2 ./nccl_mpi_demo [--tokens N] [--bf16] [--direct] [--iters N]
       mpirun -np 8 ./nccl_mpi_demo --seed [--iters N]

   Every rank picks the GPU of its local rank (MPI_Comm_split_type), rank 0 makes the NCCL
   unique id and broadcasts it, every rank joins the communicator, wraps it in the moe_ep
   NCCL transport and builds the GPU layer with its own experts. Weights come from fixed
   seeds, so any rank can rebuild any expert; rank 0 gathers every rank's tokens, routing
   and output, and runs the same tokens with the same routing through the CPU layer on
   one rank. Exit status 0 when the relative error is within the dtype's tolerance
   (fp32 1e-5, bf16 1e-2). --direct sizes the layer for T tokens (max_tokens) and asks for
   the direct path (stores into the peers' memory through CUDA IPC): the layer fails to
   build where the GPUs cannot map each other's memory.

   --seed is the seed scenario at full size: 64 experts, top-2, bf16, 4096 tokens per rank,
   d_model 2048, d_ff 1408, max_tokens set (so the direct path where the GPUs allow it,
   else NCCL). It also prints the traffic matrix (rows each rank sends to each rank) and,
   with --iters N (default 20 with --seed, else 0), the time per layer call: the median
   over N calls of the slowest rank's time, each call started together on all ranks. */
#define MOE_EP_IMPLEMENTATION
#include "../moe_ep_cuda.h"
#include "../transports/moe_ep_nccl.h"

#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

static int D_MODEL = 256, D_FF = 384, EXPERTS = 16, TOP_K = 2;

static int cmp_double(const void* a, const void* b) {
    double x = *(const double*)a, y = *(const double*)b;
    return x < y ? -1 : x > y;
}

static float value(unsigned long long seed, size_t i, float scale, int bf16) {
    unsigned long long z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
    float v;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    v = scale * ((float)(z >> 40) / 8388608.0f - 1.0f);
    if (bf16) {   /* round to a bf16 value, so both paths see the same numbers */
        uint32_t u;
        memcpy(&u, &v, 4);
        u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
        memcpy(&v, &u, 4);
    }
    return v;
}

/* n values from `seed` in fp32, or (bf16) their top halves */
static void* make(unsigned long long seed, size_t n, float scale, int bf16, float* as_float) {
    size_t i;
    void* out = malloc(n * (bf16 ? 2 : 4) + 4);
    for (i = 0; i < n; ++i) {
        float v = value(seed, i, scale, bf16);
        if (as_float) as_float[i] = v;
        if (bf16) {
            uint32_t u;
            memcpy(&u, &v, 4);
            ((uint16_t*)out)[i] = (uint16_t)(u >> 16);
        } else {
            ((float*)out)[i] = v;
        }
    }
    return out;
}

static float to_float(const void* p, size_t i, int bf16) {
    if (bf16) {
        uint32_t u = (uint32_t)((const uint16_t*)p)[i] << 16;
        float v;
        memcpy(&v, &u, 4);
        return v;
    }
    return ((const float*)p)[i];
}

int main(int argc, char** argv) {
    int rank, world, local_rank, devices = 0, i, bf16 = 0, direct = 0, seed = 0, iters = -1, T = 500, e, l,
        mine_count = 0;
    MPI_Comm node;
    ncclUniqueId id;
    ncclComm_t comm;
    cudaStream_t stream;
    moe_ep_transport transport;
    moe_ep_cuda_layer* layer = NULL;
    moe_ep_cuda_expert_weights* mine;
    void** host_weights;
    size_t es, n, wsize;
    void *router, *xh, *yh, *x = NULL, *y = NULL;
    int32_t* idx;
    float* weight;
    moe_ep_result res;
    int ok = 1;
    double t0, t1, first_ms;

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    for (i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "--tokens") == 0 && i + 1 < argc) T = atoi(argv[++i]);
        else if (strcmp(argv[i], "--bf16") == 0) bf16 = 1;
        else if (strcmp(argv[i], "--direct") == 0) direct = 1;
        else if (strcmp(argv[i], "--seed") == 0) seed = 1;
        else if (strcmp(argv[i], "--iters") == 0 && i + 1 < argc) iters = atoi(argv[++i]);
    }
    if (seed) {
        D_MODEL = 2048;
        D_FF = 1408;
        EXPERTS = 64;
        TOP_K = 2;
        T = 4096;
        bf16 = 1;
    }
    if (iters < 0) iters = seed ? 20 : 0;
    wsize = (size_t)D_MODEL * D_FF;
    mine = (moe_ep_cuda_expert_weights*)calloc((size_t)EXPERTS, sizeof *mine);
    host_weights = (void**)calloc(3 * (size_t)EXPERTS, sizeof(void*));
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node);
    MPI_Comm_rank(node, &local_rank);
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
        if (rank == 0) printf("nccl_mpi_demo: no GPU, skipped\n");
        MPI_Finalize();
        return 0;
    }
    cudaSetDevice(local_rank % devices);
    cudaStreamCreate(&stream);
    if (rank == 0) ncclGetUniqueId(&id);
    MPI_Bcast(&id, (int)sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD);
    if (ncclCommInitRank(&comm, world, id, rank) != ncclSuccess) {
        fprintf(stderr, "rank %d: ncclCommInitRank failed\n", rank);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    moe_ep_nccl_transport_create(&(moe_ep_nccl_desc){ .comm = comm, .stream = stream, .timeout_ms = 60000 }, &transport);

    /* this rank's experts under the default (contiguous) placement, from their seeds */
    {
        int* owner = (int*)malloc(sizeof(int) * (size_t)EXPERTS);
        moe_ep_placement_compute(NULL, EXPERTS, world, owner);
        for (e = 0, l = 0; e < EXPERTS; ++e) {
            if (owner[e] != rank) continue;
            host_weights[3 * l] = make(100 + 3 * (unsigned long long)e, wsize, 1.7f / sqrtf((float)D_MODEL), bf16, NULL);
            host_weights[3 * l + 1] = make(101 + 3 * (unsigned long long)e, wsize, 1.7f / sqrtf((float)D_MODEL), bf16, NULL);
            host_weights[3 * l + 2] = make(102 + 3 * (unsigned long long)e, wsize, 1.7f / sqrtf((float)D_FF), bf16, NULL);
            mine[l].w1 = host_weights[3 * l];
            mine[l].w3 = host_weights[3 * l + 1];
            mine[l].w2 = host_weights[3 * l + 2];
            ++l;
        }
        mine_count = l;
        free(owner);
    }
    router = make(7, (size_t)EXPERTS * D_MODEL, 3.0f / sqrtf((float)D_MODEL), bf16, NULL);
    res = moe_ep_cuda_layer_create(&(moe_ep_cuda_layer_desc){
        .d_model = D_MODEL, .d_ff = D_FF, .num_experts = EXPERTS, .top_k = TOP_K, .transport = &transport,
        .stream = stream, .timeout_ms = 60000,
        .logger = { moe_ep_log_stderr, NULL },
        .dtype = bf16 ? MOE_EP_CUDA_DTYPE_BF16 : MOE_EP_CUDA_DTYPE_F32, .max_tokens = direct || seed ? T : 0,
        .direct = direct ? MOE_EP_CUDA_DIRECT_ON : seed ? MOE_EP_CUDA_DIRECT_DEFAULT : MOE_EP_CUDA_DIRECT_OFF,
        .router_weight = router, .experts = mine }, &layer);
    if (res != MOE_EP_OK) {
        fprintf(stderr, "rank %d: moe_ep_cuda_layer_create: %s\n", rank, moe_ep_result_string(res));
        MPI_Abort(MPI_COMM_WORLD, 1);
    }

    es = bf16 ? 2 : 4;
    n = (size_t)T * D_MODEL;
    xh = make(1000 + (unsigned long long)rank, n, 1.0f, bf16, NULL);
    yh = malloc(n * es + 4);
    idx = (int32_t*)malloc(sizeof(int32_t) * (size_t)T * TOP_K + 4);
    weight = (float*)malloc(sizeof(float) * (size_t)T * TOP_K + 4);
    cudaMalloc(&x, n * es + 16);
    cudaMalloc(&y, n * es + 16);
    cudaMemcpy(x, xh, n * es, cudaMemcpyHostToDevice);
    MPI_Barrier(MPI_COMM_WORLD);
    t0 = MPI_Wtime();
    res = moe_ep_cuda_forward(layer, &(moe_ep_cuda_forward_args){ .tokens = T, .x = x, .y = y, .topk_idx = idx,
                                                                    .topk_weight = weight });
    cudaStreamSynchronize(stream);
    t1 = MPI_Wtime();
    first_ms = (t1 - t0) * 1e3;
    if (res != MOE_EP_OK) {
        fprintf(stderr, "rank %d: forward: %s\n", rank, moe_ep_cuda_layer_last_error(layer));
        ok = 0;
    }
    cudaMemcpy(yh, y, n * es, cudaMemcpyDeviceToHost);

    /* the traffic matrix: rows each rank sends to each rank (k-slots to the owners) */
    {
        int64_t* row = (int64_t*)calloc((size_t)world, sizeof(int64_t));
        int64_t* all = rank == 0 ? (int64_t*)malloc(sizeof(int64_t) * (size_t)world * (size_t)world) : NULL;
        moe_ep_context* ctx = moe_ep_cuda_layer_context(layer);
        int q;
        for (i = 0; ok && i < T * TOP_K; ++i) {
            int o = moe_ep_expert_owner(ctx, idx[i]);
            if (o >= 0 && o < world) row[o]++;
        }
        MPI_Gather(row, world, MPI_INT64_T, all, world, MPI_INT64_T, 0, MPI_COMM_WORLD);
        if (rank == 0) {
            printf("nccl_mpi_demo: traffic matrix, rows sent by rank (row) to rank (column), %d B each:\n      ",
                   D_MODEL * (int)(bf16 ? 2 : 4));
            for (q = 0; q < world; ++q) printf(" %7d", q);
            printf("\n");
            for (i = 0; i < world; ++i) {
                printf("  %3d ", i);
                for (q = 0; q < world; ++q) printf(" %7lld", (long long)all[i * world + q]);
                printf("\n");
            }
        }
        free(row);
        free(all);
    }

    /* the time per layer call: each call started together on all ranks, the slowest rank's time */
    if (iters > 0 && res == MOE_EP_OK) {
        double* ms = (double*)malloc(sizeof(double) * (size_t)iters);
        int it;
        for (it = 0; it < iters && res == MOE_EP_OK; ++it) {
            double mine_ms, worst_ms;
            cudaStreamSynchronize(stream);
            MPI_Barrier(MPI_COMM_WORLD);
            t0 = MPI_Wtime();
            res = moe_ep_cuda_forward(layer, &(moe_ep_cuda_forward_args){ .tokens = T, .x = x, .y = y });
            cudaStreamSynchronize(stream);
            mine_ms = (MPI_Wtime() - t0) * 1e3;
            MPI_Allreduce(&mine_ms, &worst_ms, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
            ms[it] = worst_ms;
        }
        if (res != MOE_EP_OK) {
            fprintf(stderr, "rank %d: timed forward: %s\n", rank, moe_ep_cuda_layer_last_error(layer));
            ok = 0;
        } else if (rank == 0) {
            qsort(ms, (size_t)iters, sizeof(double), cmp_double);
            printf("nccl_mpi_demo: time per layer call (host clock, slowest rank, %d calls): median %.3f ms, "
                   "min %.3f ms\n", iters, ms[iters / 2], ms[0]);
        }
        free(ms);
    }

    /* rank 0: the CPU layer on one rank over everyone's tokens and routing */
    {
        float *all_y = NULL, *ref = NULL, *all_x = NULL, *yf = (float*)malloc(sizeof(float) * n);
        int32_t* all_idx = NULL;
        float* all_w = NULL;
        for (i = 0; i < (int)n; ++i) yf[i] = to_float(yh, (size_t)i, bf16);
        if (rank == 0) {
            all_y = (float*)malloc(sizeof(float) * n * (size_t)world);
            ref = (float*)malloc(sizeof(float) * n * (size_t)world);
            all_x = (float*)malloc(sizeof(float) * n * (size_t)world);
            all_idx = (int32_t*)malloc(sizeof(int32_t) * (size_t)T * TOP_K * (size_t)world);
            all_w = (float*)malloc(sizeof(float) * (size_t)T * TOP_K * (size_t)world);
        }
        MPI_Gather(yf, (int)n, MPI_FLOAT, all_y, (int)n, MPI_FLOAT, 0, MPI_COMM_WORLD);
        MPI_Gather(idx, T * TOP_K, MPI_INT32_T, all_idx, T * TOP_K, MPI_INT32_T, 0, MPI_COMM_WORLD);
        MPI_Gather(weight, T * TOP_K, MPI_FLOAT, all_w, T * TOP_K, MPI_FLOAT, 0, MPI_COMM_WORLD);
        if (rank == 0) {
            moe_ep_expert_weights* experts = (moe_ep_expert_weights*)calloc((size_t)EXPERTS, sizeof *experts);
            float** full = (float**)calloc(3 * (size_t)EXPERTS, sizeof(float*));
            float* router_f = (float*)malloc(sizeof(float) * (size_t)EXPERTS * (size_t)D_MODEL);
            moe_ep_context* ctx = NULL;
            double num = 0.0, den = 0.0, err;
            int r;
            for (r = 0; r < world; ++r) free(make(1000 + (unsigned long long)r, n, 1.0f, bf16, all_x + (size_t)r * n));
            free(make(7, (size_t)EXPERTS * D_MODEL, 3.0f / sqrtf((float)D_MODEL), bf16, router_f));
            for (e = 0; e < EXPERTS; ++e) {
                for (i = 0; i < 3; ++i) full[3 * e + i] = (float*)malloc(sizeof(float) * wsize);
                free(make(100 + 3 * (unsigned long long)e, wsize, 1.7f / sqrtf((float)D_MODEL), bf16, full[3 * e]));
                free(make(101 + 3 * (unsigned long long)e, wsize, 1.7f / sqrtf((float)D_MODEL), bf16, full[3 * e + 1]));
                free(make(102 + 3 * (unsigned long long)e, wsize, 1.7f / sqrtf((float)D_FF), bf16, full[3 * e + 2]));
                experts[e].w1 = full[3 * e];
                experts[e].w3 = full[3 * e + 1];
                experts[e].w2 = full[3 * e + 2];
            }
            res = moe_ep_create(&(moe_ep_desc){ .d_model = D_MODEL, .d_ff = D_FF, .num_experts = EXPERTS, .top_k = TOP_K,
                                                .router_weight = router_f, .experts = experts }, &ctx);
            if (res == MOE_EP_OK)
                res = moe_ep_forward(ctx, &(moe_ep_forward_args){ .tokens = (int64_t)T * world, .x = all_x, .y = ref,
                                                                  .routing_in = true, .topk_idx = all_idx, .topk_weight = all_w });
            {
                size_t j;
                for (j = 0; j < n * (size_t)world; ++j) {
                    double diff = (double)all_y[j] - (double)ref[j];
                    num += diff * diff;
                    den += (double)ref[j] * (double)ref[j];
                }
            }
            err = all_y[0] == all_y[0] ? sqrt(num / den) : INFINITY;
            ok = ok && res == MOE_EP_OK && err <= (bf16 ? 1e-2 : 1e-5);
            printf("nccl_mpi_demo: %d ranks, %d tokens each, %s, %s path, E=%d top-%d d=%d ff=%d: first layer call "
                   "%.2f ms, relative error vs the CPU layer %.2e: %s\n", world, T, bf16 ? "bf16" : "fp32",
                   moe_ep_cuda_layer_direct(layer) ? "direct" : "NCCL", EXPERTS, TOP_K, D_MODEL, D_FF, first_ms,
                   err, ok ? "ok" : "FAILED");
            moe_ep_destroy(ctx);
            for (i = 0; i < 3 * EXPERTS; ++i) free(full[i]);
            free(full);
            free(experts);
            free(router_f);
        }
        free(yf); free(all_y); free(ref); free(all_x); free(all_idx); free(all_w);
    }
    MPI_Bcast(&ok, 1, MPI_INT, 0, MPI_COMM_WORLD);

    moe_ep_cuda_layer_destroy(layer);
    moe_ep_nccl_transport_destroy(&transport);
    ncclCommDestroy(comm);
    cudaStreamDestroy(stream);
    for (i = 0; i < 3 * mine_count; ++i) free(host_weights[i]);
    free(host_weights);
    free(mine);
    cudaFree(x);
    cudaFree(y);
    free(xh); free(yh); free(idx); free(weight); free(router);
    MPI_Comm_free(&node);
    MPI_Finalize();
    return ok ? 0 : 1;
}
