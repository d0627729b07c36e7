"""The PyTorch anchor for the DeepSeek-V3-shaped layer: the forward of transformers'
DeepseekV3MoE (modeling_deepseek_v3.py), fp32, eager experts:

  router   logits = x W^T (DeepseekV3TopkRouter), then route_tokens_to_experts: sigmoid;
           + e_score_correction_bias for the choice only; group score = sum of the two best
           biased scores of each of n_group groups; keep the topk_group best groups (the
           others masked to 0.0); top-k over what is left; the weights gathered from the
           unbiased sigmoid scores, divided by their sum + 1e-20, times routed_scaling_factor
  experts  the eager MixtralExperts loop over the experts that were hit: the token rows by
           torch.where on the one-hot mask, gate_up_proj, silu(gate) * up, down_proj, times
           the routing weight, index_add_ into the output
  shared   + the shared experts' MLP (down(silu(gate(x)) * up(x))) on every token

Weights and input come from a counter-based generator that bench/cpu_bench.c reproduces
bit for bit (bench_hash_floats there), so both programs build the same layer without
moving ~0.8 GB of weights through a file.

OpenBLAS: if its core detection falls back to Prescott, the script sets OPENBLAS_CORETYPE
(SkylakeX with AVX-512, Haswell with AVX2) and starts again; its line names the core used.

usage: torch_deepseek_moe.py [threads] [--tokens T] [--reps N] [--warmup N] [--out PATH]
Prints the anchor's line, then `median_ms=... min_ms=... route_ms=... tokens=T` for bench
programs. --out: write y [T, d_model] float32, then the chosen experts [T, top_k] int32
sorted per token, raw little-endian, for the C bench to compare with its own output."""
import argparse, ctypes, os, statistics, sys, time
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# Debian's torch does its fp32 matmuls in OpenBLAS (libblas.so.3). OpenBLAS 0.3.21 does not know
# recent Intel models and falls back to its Prescott (SSE3) kernels, ~5x slower: name the core,
# as cpu_bench does, unless the caller did.
def openblas_core():
    try:
        f = ctypes.CDLL("libopenblas.so.0").openblas_get_corename
        f.restype = ctypes.c_char_p
        return f().decode()
    except (OSError, AttributeError):
        return "unknown"
if "OPENBLAS_CORETYPE" not in os.environ and openblas_core() == "Prescott":
    flags = open("/proc/cpuinfo").read()
    core = "SkylakeX" if " avx512f" in flags else "Haswell" if " avx2" in flags else None
    if core:
        os.environ["OPENBLAS_CORETYPE"] = core
        os.execv(sys.executable, [sys.executable] + sys.argv)

ap = argparse.ArgumentParser()
ap.add_argument("threads", nargs="?", type=int, default=2)
ap.add_argument("--tokens", type=int, default=1024)
ap.add_argument("--reps", type=int, default=11)
ap.add_argument("--warmup", type=int, default=3)
ap.add_argument("--out", default=None)
args = ap.parse_args()

# DeepSeek-V3's router and expert count, the layer scaled down (as in cpu_bench.c's deepseek section)
T, D, FF, E, K = args.tokens, 1024, 256, 256, 8
N_GROUP, TOPK_GROUP, SHARED_FF, SCALING = 8, 4, 256, 2.5
torch.set_num_threads(args.threads)

# The generator: element i of stream s is splitmix64((s << 40) + i), top 24 bits, centred,
# times scale / 2^23 (scales are powers of two, so every value is exact in fp32).
def hash_floats(n, stream, scale):
    z = (np.uint64(stream) << np.uint64(40)) + np.arange(n, dtype=np.uint64)
    z += np.uint64(0x9E3779B97F4A7C15)
    z ^= z >> np.uint64(30); z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27); z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    u = (z >> np.uint64(40)).astype(np.int64) - (1 << 23)
    return torch.from_numpy(u.astype(np.float32) * np.float32(scale / 8388608.0))

# streams and scales: keep in step with cpu_bench.c (DS_STREAM_*)
S_ROUTER, S_BIAS, S_X, S_SHARED_W1, S_SHARED_W3, S_SHARED_W2 = 1, 2, 3, 4, 5, 6
S_W1, S_W3, S_W2 = 0x100, 0x200, 0x300          # + expert
SC_ROUTER, SC_BIAS, SC_X, SC_W13, SC_W2 = 1 / 32, 1 / 64, 1.0, 1 / 32, 1 / 16

class TopkRouter(nn.Module):  # DeepseekV3TopkRouter
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(hash_floats(E * D, S_ROUTER, SC_ROUTER).view(E, D))
        self.register_buffer("e_score_correction_bias", hash_floats(E, S_BIAS, SC_BIAS))
    def forward(self, h):
        h = h.view(-1, D)
        return F.linear(h.type(torch.float32), self.weight.type(torch.float32))

class Experts(nn.Module):  # MixtralExperts (the eager loop), 3D weights [E, 2F, D] and [E, D, F]
    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.stack([
            torch.cat([hash_floats(FF * D, S_W1 + e, SC_W13), hash_floats(FF * D, S_W3 + e, SC_W13)]).view(2 * FF, D)
            for e in range(E)]))
        self.down_proj = nn.Parameter(torch.stack([hash_floats(D * FF, S_W2 + e, SC_W2).view(D, FF) for e in range(E)]))
        self.num_experts = E
    def forward(self, hidden_states, top_k_index, top_k_weights):
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts)
            expert_mask = expert_mask.permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[token_idx]
            gate, up = F.linear(current_state, self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            current_hidden_states = F.silu(gate) * up
            current_hidden_states = F.linear(current_hidden_states, self.down_proj[expert_idx])
            current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
        return final_hidden_states

class MLP(nn.Module):  # DeepseekV3MLP (Qwen2MoeMLP): the shared experts
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(D, SHARED_FF, bias=False, device="meta")
        self.up_proj = nn.Linear(D, SHARED_FF, bias=False, device="meta")
        self.down_proj = nn.Linear(SHARED_FF, D, bias=False, device="meta")
        self.gate_proj.weight = nn.Parameter(hash_floats(SHARED_FF * D, S_SHARED_W1, SC_W13).view(SHARED_FF, D))
        self.up_proj.weight = nn.Parameter(hash_floats(SHARED_FF * D, S_SHARED_W3, SC_W13).view(SHARED_FF, D))
        self.down_proj.weight = nn.Parameter(hash_floats(D * SHARED_FF, S_SHARED_W2, SC_W2).view(D, SHARED_FF))
    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

class DeepseekV3MoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = Experts()
        self.gate = TopkRouter()
        self.shared_experts = MLP()
        self.n_routed_experts, self.n_group, self.topk_group = E, N_GROUP, TOPK_GROUP
        self.norm_topk_prob, self.routed_scaling_factor, self.top_k = True, SCALING, K

    def route_tokens_to_experts(self, router_logits):
        router_logits = router_logits.sigmoid()
        router_logits_for_choice = router_logits + self.gate.e_score_correction_bias
        group_scores = (
            router_logits_for_choice.view(-1, self.n_group, self.n_routed_experts // self.n_group)
            .topk(2, dim=-1)[0]
            .sum(dim=-1)
        )
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = (
            group_mask.unsqueeze(-1)
            .expand(-1, self.n_group, self.n_routed_experts // self.n_group)
            .reshape(-1, self.n_routed_experts)
        )
        scores_for_choice = router_logits_for_choice.masked_fill(~score_mask.bool(), 0.0)
        topk_indices = torch.topk(scores_for_choice, k=self.top_k, dim=-1, sorted=False)[1]
        topk_weights = router_logits.gather(1, topk_indices)
        if self.norm_topk_prob:
            denominator = topk_weights.sum(dim=-1, keepdim=True) + 1e-20
            topk_weights /= denominator
        topk_weights = topk_weights * self.routed_scaling_factor
        return topk_indices, topk_weights

    def route(self, hidden_states):
        return self.route_tokens_to_experts(self.gate(hidden_states))

    def forward(self, hidden_states):
        residuals = hidden_states
        orig_shape = hidden_states.shape
        router_logits = self.gate(hidden_states)
        topk_indices, topk_weights = self.route_tokens_to_experts(router_logits)
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
        hidden_states = self.experts(hidden_states, topk_indices, topk_weights).view(*orig_shape)
        hidden_states = hidden_states + self.shared_experts(residuals)
        return hidden_states

m = DeepseekV3MoE().eval()
x = hash_floats(T * D, S_X, SC_X).view(T, D)

def timed(fn, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return ts

with torch.no_grad():
    for _ in range(args.warmup):
        y = m(x)
        m.route(x)
    ts = timed(lambda: m(x), args.reps)
    tr = timed(lambda: m.route(x), args.reps)
    y = m(x)
    idx, _ = m.route(x)
med, rmed = statistics.median(ts), statistics.median(tr)
if args.out:
    with open(args.out, "wb") as f:
        f.write(y.contiguous().numpy().astype("<f4").tobytes())
        f.write(torch.sort(idx, dim=-1)[0].numpy().astype("<i4").tobytes())
print(f"torch {torch.__version__} threads={torch.get_num_threads()} tokens={T} d_model={D} d_ff={FF} experts={E} "
      f"top{K} groups {N_GROUP}/{TOPK_GROUP} shared d_ff {SHARED_FF} openblas {openblas_core()}: median {med*1e3:.3f} ms, min {min(ts)*1e3:.3f} ms, "
      f"router {rmed*1e3:.3f} ms over {args.reps} (after {args.warmup} warm-up); checksum sum(y) {y.double().sum().item():.6e} "
      f"sum|y| {y.double().abs().sum().item():.6e}")
print(f"median_ms={med*1e3:.6f} min_ms={min(ts)*1e3:.6f} route_ms={rmed*1e3:.6f} tokens={T}")
