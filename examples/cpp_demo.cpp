// cpp_demo -- moe_ep from C++: the implementation compiled as C++ in this file, four ranks
// as threads (the pthreads transport), and the same layer on one rank; the outputs must be
// the same bits. C++ has no C99 compound literals or (before C++20) designated
// initialisers, so the descs are zeroed structs filled field by field.
//
//     ./cpp_demo            exit status 0 when the outputs match
#define MOE_EP_IMPLEMENTATION
#include "../transports/moe_ep_pthreads.h"
#include "example_util.h"

#include <cstdio>
#include <cstring>
#include <vector>

namespace {

const int kRanks = 4, kExperts = 16, kTopK = 2, kTokensPerRank = 48, kDModel = 64, kDFF = 96;

struct Layer {
    std::vector<float> x, y, router, weights;
    std::vector<moe_ep_expert_weights> experts;
};

// The desc both runs share; a rank run hands in only its own experts.
moe_ep_desc layer_desc(const Layer& layer, const moe_ep_expert_weights* experts, int experts_count,
                       const moe_ep_transport* transport) {
    moe_ep_desc desc;
    std::memset(&desc, 0, sizeof desc);
    desc.d_model = kDModel;
    desc.d_ff = kDFF;
    desc.num_experts = kExperts;
    desc.top_k = kTopK;
    desc.normalize_topk = true;
    desc.num_threads = 1;
    desc.router_weight = layer.router.data();
    desc.experts = experts;
    desc.experts_count = experts_count;     // this rank's experts, in local order
    desc.transport = transport;
    return desc;
}

moe_ep_result forward(moe_ep_context* ctx, const float* x, float* y, int64_t tokens) {
    moe_ep_forward_args args;
    std::memset(&args, 0, sizeof args);
    args.tokens = tokens;
    args.x = x;
    args.y = y;
    return moe_ep_forward(ctx, &args);
}

moe_ep_result rank_main(const moe_ep_transport* transport, void* user_data) {
    Layer* layer = static_cast<Layer*>(user_data);
    const int rank = transport->rank, per_rank = kExperts / kRanks;
    moe_ep_desc desc = layer_desc(*layer, &layer->experts[(size_t)rank * per_rank], per_rank, transport);
    moe_ep_context* ctx = NULL;
    moe_ep_result res = moe_ep_create(&desc, &ctx);
    const size_t offset = (size_t)rank * kTokensPerRank * kDModel;
    if (res == MOE_EP_OK) res = forward(ctx, &layer->x[offset], &layer->y[offset], kTokensPerRank);
    if (res != MOE_EP_OK) std::fprintf(stderr, "rank %d: %s\n", rank, ctx ? moe_ep_last_error(ctx) : "create failed");
    moe_ep_destroy(ctx);
    return res;
}

}  // namespace

int main() {
    const size_t tokens = (size_t)kRanks * kTokensPerRank, per_expert = 3 * (size_t)kDModel * kDFF;
    unsigned long long seed = 7;
    Layer layer;
    layer.x.resize(tokens * kDModel);
    layer.y.assign(tokens * kDModel, -1.0f);
    layer.router.resize((size_t)kExperts * kDModel);
    layer.weights.resize(per_expert * kExperts);
    example_fill(layer.x.data(), layer.x.size(), 1.0f, &seed);
    example_fill(layer.router.data(), layer.router.size(), 1.0f / kDModel, &seed);
    example_fill(layer.weights.data(), layer.weights.size(), 1.0f / kDModel, &seed);
    for (int e = 0; e < kExperts; ++e) {
        moe_ep_expert_weights w;
        std::memset(&w, 0, sizeof w);
        w.w1 = &layer.weights[(size_t)e * per_expert];
        w.w3 = w.w1 + (size_t)kDModel * kDFF;
        w.w2 = w.w3 + (size_t)kDModel * kDFF;
        layer.experts.push_back(w);
    }

    moe_ep_pthreads_desc world_desc;
    std::memset(&world_desc, 0, sizeof world_desc);
    world_desc.world_size = kRanks;
    world_desc.timeout_ms = 60000;
    moe_ep_pthreads_world* world = NULL;
    moe_ep_result res = moe_ep_pthreads_world_create(&world_desc, &world);
    if (res == MOE_EP_OK) res = moe_ep_pthreads_run(world, rank_main, &layer, NULL);
    moe_ep_pthreads_world_destroy(world);
    if (res != MOE_EP_OK) {
        std::fprintf(stderr, "cpp_demo: the %d-rank layer failed: %s\n", kRanks, moe_ep_result_string(res));
        return 1;
    }

    std::vector<float> y1(tokens * kDModel, -1.0f);
    moe_ep_desc desc = layer_desc(layer, layer.experts.data(), kExperts, NULL);
    moe_ep_context* single = NULL;
    res = moe_ep_create(&desc, &single);
    if (res == MOE_EP_OK) res = forward(single, layer.x.data(), y1.data(), (int64_t)tokens);
    if (res != MOE_EP_OK) {
        std::fprintf(stderr, "cpp_demo: the one-rank layer failed: %s\n", single ? moe_ep_last_error(single) : "");
        moe_ep_destroy(single);
        return 1;
    }
    moe_ep_destroy(single);

    const bool same = std::memcmp(layer.y.data(), y1.data(), sizeof(float) * y1.size()) == 0;
    std::printf("moe_ep %s from C++: %d experts on %d ranks, top-%d, %zu tokens\n", moe_ep_version(), kExperts, kRanks,
                kTopK, tokens);
    std::printf("output fingerprint: %016llx\n", example_fingerprint(layer.y.data(), layer.y.size()));
    std::printf("output of %d ranks vs 1 rank: %s\n", kRanks, same ? "bitwise identical" : "DIFFERENT");
    return same ? 0 : 1;
}
