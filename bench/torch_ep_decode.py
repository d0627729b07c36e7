"""The PyTorch anchor for bench_lowlat: the plain PyTorch expert-parallel MoE layer (the
GPU anchor torch_ep_moe.py of the benchmark protocol: softmax top-k router, argsort permute,
all_to_all_single count exchange and dispatch, per-expert SwiGLU matmuls, all_to_all_single
combine, weighted index_add) at decode sizes, bf16, NCCL.

Configs: bench_lowlat's: seed-64e-top2 (d_model 2048, d_ff 1408, 64 experts, top-2) at 1, 16
and 128 tokens per rank, and the DeepSeek-V3 decode shape (d_model 7168, 256 experts,
top-8, 128 tokens) with d_ff 256 as bench_lowlat has it and its plain softmax router (not
DeepSeek's grouped sigmoid one). Median of 20 event-timed layers after 3 warm-ups, the
largest over ranks.

Run: python3 -m torch.distributed.run --nproc_per_node=N torch_ep_decode.py"""
import statistics
import torch
import torch.distributed as dist
import torch.nn.functional as F

dist.init_process_group("nccl")
rank, world = dist.get_rank(), dist.get_world_size()
torch.cuda.set_device(rank % torch.cuda.device_count())
dev, dt = torch.device("cuda"), torch.bfloat16

CONFIGS = [  # name, tokens per rank, d_model, d_ff, experts, top_k
    ("deepseek-v3-decode (d_ff 256)", 128, 7168, 256, 256, 8),
    ("seed-64e-top2", 1, 2048, 1408, 64, 2),
    ("seed-64e-top2", 16, 2048, 1408, 64, 2),
    ("seed-64e-top2", 128, 2048, 1408, 64, 2),
]


def layer(x, gate, w1, w3, w2, E, k):
    El = E // world
    T, d = x.shape
    probs = torch.softmax((x @ gate.t()).float(), dim=-1)
    topw, topi = probs.topk(k, dim=-1)
    topw = topw / topw.sum(-1, keepdim=True)
    flat = topi.reshape(-1)
    order = flat.argsort(stable=True)
    xs = x[order // k]
    counts = torch.bincount(flat, minlength=E)
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts)
    send_split = counts.view(world, El).sum(1).tolist()
    rc = recv_counts.view(world, El)
    recv_split = rc.sum(1).tolist()
    rx = torch.empty(sum(recv_split), d, device=dev, dtype=dt)
    dist.all_to_all_single(rx, xs, recv_split, send_split)
    eid = torch.repeat_interleave(torch.arange(El, device=dev).repeat(world), rc.reshape(-1))
    perm = eid.argsort(stable=True)
    xe = rx[perm]
    per_e = rc.sum(0).tolist()
    out = torch.empty_like(xe)
    off = 0
    for e in range(El):
        n = per_e[e]
        if n:
            h = xe[off:off + n]
            out[off:off + n] = (F.silu(h @ w1[e].t()) * (h @ w3[e].t())) @ w2[e].t()
        off += n
    ry = torch.empty_like(out)
    ry[perm] = out
    ys = torch.empty_like(xs)
    dist.all_to_all_single(ys, ry, send_split, recv_split)
    y = torch.zeros_like(x, dtype=torch.float32)
    y.index_add_(0, order // k, ys.float() * topw.reshape(-1)[order, None])
    return y.to(dt)


rows = []
weights = {}
for name, T, d, ff, E, k in CONFIGS:
    El = E // world
    if name not in weights:
        g = torch.Generator(device=dev).manual_seed(1234 + rank)
        weights = {name: (
            torch.randn(E, d, device=dev, dtype=dt, generator=torch.Generator(device=dev).manual_seed(7)) * d ** -0.5,
            torch.randn(El, ff, d, device=dev, dtype=dt, generator=g) * d ** -0.5,
            torch.randn(El, ff, d, device=dev, dtype=dt, generator=g) * d ** -0.5,
            torch.randn(El, d, ff, device=dev, dtype=dt, generator=g) * ff ** -0.5)}
    gate, w1, w3, w2 = weights[name]
    x = torch.randn(T, d, device=dev, dtype=dt, generator=torch.Generator(device=dev).manual_seed(99 + rank))
    for _ in range(3):
        layer(x, gate, w1, w3, w2, E, k)
    torch.cuda.synchronize()
    ts = []
    for _ in range(20):
        dist.barrier()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        layer(x, gate, w1, w3, w2, E, k)
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) * 1e3)
    t = torch.tensor([statistics.median(ts)], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    rows.append((name, T, t.item()))
if rank == 0:
    print(f"torch EP MoE layer, decode, world={world} torch={torch.__version__} {torch.cuda.get_device_name()}")
    for r in rows:
        print(f"torch-ep {r[0]} T={r[1]} us/layer {r[2]:.1f}")
dist.destroy_process_group()
