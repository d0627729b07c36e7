"""The PyTorch CPU anchor: the naive MoE forward of HF transformers' MixtralSparseMoeBlock
(loop over experts, index + index_add_), as in the project's anchor script
anchors/cpu/torch_moe_cpu.py, with the token count and repetitions as arguments.

usage: torch_moe_cpu.py [threads] [--tokens T] [--reps N] [--warmup N] [--dtype fp32|bf16]
(--dtype bf16: weights and activations in bfloat16, the bf16 anchor of make bench-edge)
Prints the anchor's line, then `median_ms=... min_ms=... tokens=T` for bench programs.
Run it with OMP_WAIT_POLICY=PASSIVE (see bench/RESULTS.md)."""
import argparse, statistics, time
import torch
import torch.nn as nn
import torch.nn.functional as F

ap = argparse.ArgumentParser()
ap.add_argument("threads", nargs="?", type=int, default=2)
ap.add_argument("--tokens", type=int, default=1024)
ap.add_argument("--reps", type=int, default=10)
ap.add_argument("--warmup", type=int, default=3)
ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
args = ap.parse_args()

T, D, FF, E, K = args.tokens, 1024, 2816, 8, 2
torch.set_num_threads(args.threads)
torch.manual_seed(0)

class Expert(nn.Module):  # MixtralBlockSparseTop2MLP (SwiGLU)
    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(D, FF, bias=False)
        self.w2 = nn.Linear(FF, D, bias=False)
        self.w3 = nn.Linear(D, FF, bias=False)
    def forward(self, h):
        return self.w2(F.silu(self.w1(h)) * self.w3(h))

class MoE(nn.Module):  # MixtralSparseMoeBlock.forward
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList([Expert() for _ in range(E)])
    def forward(self, x):
        router_logits = self.gate(x)
        rw = F.softmax(router_logits, dim=1, dtype=torch.float)
        rw, sel = torch.topk(rw, K, dim=-1)
        rw /= rw.sum(dim=-1, keepdim=True)
        rw = rw.to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(sel, num_classes=E).permute(2, 1, 0)
        for e in range(E):
            idx, top_x = torch.where(mask[e])
            cur = x[None, top_x].reshape(-1, D)
            y = self.experts[e](cur) * rw[top_x, idx, None]
            out.index_add_(0, top_x, y.to(x.dtype))
        return out, router_logits

dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
m = MoE().eval().to(dtype)
x = torch.randn(T, D).to(dtype)
with torch.no_grad():
    for _ in range(args.warmup):
        m(x)
    ts = []
    for _ in range(args.reps):
        t0 = time.perf_counter(); m(x); ts.append(time.perf_counter() - t0)
med = statistics.median(ts)
print(f"torch {torch.__version__} {args.dtype} threads={torch.get_num_threads()} tokens={T} d_model={D} d_ff={FF} experts={E} "
      f"top{K}: median {med*1e3:.3f} ms, min {min(ts)*1e3:.3f} ms over {args.reps} (after {args.warmup} warm-up)")
print(f"median_ms={med*1e3:.6f} min_ms={min(ts)*1e3:.6f} tokens={T}")
