#!/usr/bin/env python3
"""Independent float64 NumPy re-implementation of each case in this folder.

Recomputes every case's output from the saved tensors (<case>.bin, <case>.txt) following
the published routing math of each family, and prints the relative error
max|y - output_f64| / max|output_f64| three times:
  block w    : routed by the block's own captured routing (topk_idx, topk_weight), experts,
               weighting and shared experts recomputed here in float64;
  f64 router : every step in float64;
  f32 router : the router steps rounded to float32 where transformers does them in float32
               (router_dtype f32 in the manifest; see README.md), the rest in float64.
It also checks the selection against topk_idx and the weights against topk_weight.
Usage: python3 check_refs.py [DIR]     (default: the folder of this script). Needs numpy only.
Exit status 1 if a case's selection differs, if the "block w" error exceeds 1e-12, or if
the router-recomputed error exceeds 1e-12 (f64 router) / 1e-6 (manifest says f32).
"""
import os
import sys

import numpy as np

F64, F32 = np.float64, np.float32
DT = {"f32": "<f4", "f64": "<f8", "i32": "<i4"}


def load(d, case):
    cfg, tensors, router_dtype = {}, {}, None
    blob = open(os.path.join(d, case + ".bin"), "rb").read()
    for line in open(os.path.join(d, case + ".txt")):
        p = line.split()
        if not p or p[0].startswith("#"):
            continue
        if p[0] == "config":
            try:
                cfg[p[1]] = float(p[2])
            except ValueError:
                cfg[p[1]] = p[2]
        elif p[0] == "router_dtype":
            router_dtype = p[1]
        elif p[0] == "tensor":
            name, dt, off, shape = p[1], p[2], int(p[3]), tuple(int(s) for s in p[4:])
            assert off % 8 == 0, (case, name, off)
            n = int(np.prod(shape))
            tensors[name] = np.frombuffer(blob, dtype=DT[dt], count=n, offset=off).reshape(shape)
    return cfg, tensors, router_dtype


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def silu(z):
    return z * sigmoid(z)


def topk(s, k):
    """Indices of the k largest per row, largest first (stable for ties)."""
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def mlp(x, wg, wu, wd):
    """SwiGLU MLP with nn.Linear layouts [out, in]."""
    return (silu(x @ wg.T.astype(F64)) * (x @ wu.T.astype(F64))) @ wd.T.astype(F64)


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def route(case, cfg, t, x, r32):
    """(idx [T,k], w [T,k]) following the family's router; r32: round like transformers' fp32 router."""
    k = int(cfg["num_experts_per_tok"])
    if case.startswith("deepseek"):
        W, b = t["gate.weight"], t["gate.e_score_correction_bias"].astype(F64)
        if r32:   # F.linear(x.float(), W.float()), sigmoid in fp32
            s = sigmoid((x.astype(F32) @ W.T).astype(F32)).astype(F32)
        else:
            s = sigmoid(x @ W.T.astype(F64))
        c = s.astype(F64) + b                              # selection scores (bias only here)
        E, ng, tg = int(cfg["n_routed_experts"]), int(cfg["n_group"]), int(cfg["topk_group"])
        g = np.sort(c.reshape(-1, ng, E // ng), axis=2)[:, :, -2:].sum(axis=2)   # top-2 sum per group
        keep = np.zeros_like(g, dtype=bool)
        np.put_along_axis(keep, topk(g, tg), True, axis=1)
        c = np.where(np.repeat(keep, E // ng, axis=1), c, -np.inf)
        idx = topk(c, k)
        w = np.take_along_axis(s, idx, axis=1)             # weights from the unbiased scores
        if cfg["norm_topk_prob"]:
            w = w / (w.sum(axis=1, keepdims=True) + (F32(1e-20) if r32 else 1e-20))
        w = w * (F32(cfg["routed_scaling_factor"]) if r32 else cfg["routed_scaling_factor"])
        return idx, w.astype(F64)
    if case == "gpt_oss":
        l = x @ t["router.weight"].T.astype(F64) + t["router.bias"].astype(F64)
        idx = topk(l, k)
        return idx, softmax(np.take_along_axis(l, idx, axis=1))   # softmax over the k chosen logits
    if case.startswith("llama4"):
        l = x @ t["router.weight"].T.astype(F64)
        idx = topk(l, k)
        v = np.take_along_axis(l, idx, axis=1)
        w = sigmoid(v.astype(F32)).astype(F64) if r32 else sigmoid(v)
        return idx, w
    # mixtral, qwen2_moe, qwen3_moe: softmax over all experts, top-k, optional renormalisation
    l = x @ t["gate.weight"].T.astype(F64)
    p = softmax(l.astype(F32)) if r32 else softmax(l)
    idx = topk(p, k)
    w = np.take_along_axis(p, idx, axis=1)
    if case == "mixtral" or cfg.get("norm_topk_prob", 0):
        w = w / w.sum(axis=1, keepdims=True)
    return idx, w.astype(F64)


def expert(case, cfg, t, e, x):
    """One routed expert on rows x (float64)."""
    if case == "gpt_oss":   # [in, out] layout, interleaved gate/up columns, biases, clamped SwiGLU
        alpha, lim = cfg["swiglu_alpha"], cfg["swiglu_limit"]
        gu = x @ t["experts.gate_up_proj"][e].astype(F64) + t["experts.gate_up_proj_bias"][e].astype(F64)
        gate, up = np.minimum(gu[:, 0::2], lim), np.clip(gu[:, 1::2], -lim, lim)
        h = (up + 1.0) * (gate * sigmoid(alpha * gate))
        return h @ t["experts.down_proj"][e].astype(F64) + t["experts.down_proj_bias"][e].astype(F64)
    if case.startswith("llama4"):   # [in, out] layout, gate = first I columns, up = last I
        gu = x @ t["experts.gate_up_proj"][e].astype(F64)
        I = gu.shape[1] // 2
        return (silu(gu[:, :I]) * gu[:, I:]) @ t["experts.down_proj"][e].astype(F64)
    gu = x @ t["experts.gate_up_proj"][e].T.astype(F64)   # [2I, H]: gate rows, then up rows
    I = gu.shape[1] // 2
    return (silu(gu[:, :I]) * gu[:, I:]) @ t["experts.down_proj"][e].T.astype(F64)


def forward(case, cfg, t, r32, routing=None):
    x = t["input"].astype(F64)
    idx, w = routing if routing is not None else route(case, cfg, t, x, r32)
    y = np.zeros_like(x)
    for tok in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[tok, j]
            if case.startswith("llama4"):   # the weight scales the expert's input
                y[tok] += expert(case, cfg, t, e, w[tok, j] * x[tok:tok + 1])[0]
            else:
                y[tok] += w[tok, j] * expert(case, cfg, t, e, x[tok:tok + 1])[0]
    if "shared_expert.gate_proj.weight" in t:
        s = mlp(x, t["shared_expert.gate_proj.weight"], t["shared_expert.up_proj.weight"],
                t["shared_expert.down_proj.weight"])
        if "shared_expert_gate.weight" in t:
            s = sigmoid(x @ t["shared_expert_gate.weight"].T.astype(F64)) * s
        y += s
    if "shared_experts.gate_proj.weight" in t:
        y += mlp(x, t["shared_experts.gate_proj.weight"], t["shared_experts.up_proj.weight"],
                 t["shared_experts.down_proj.weight"])
    return y, idx, w


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    cases = sorted(f[:-4] for f in os.listdir(d) if f.endswith(".txt"))
    bad = 0
    print(f"{'case':22s} {'router':6s} {'block w':>11s} {'f64 router':>11s} {'f32 router':>11s} {'weights':>9s} "
          f"{'out_f32':>9s}  selection")
    for case in cases:
        cfg, t, rd = load(d, case)
        ref = t["output_f64"]
        y64, idx64, w64 = forward(case, cfg, t, False)
        y32, idx32, w32 = forward(case, cfg, t, True)
        yb, _, _ = forward(case, cfg, t, False, (t["topk_idx"], t["topk_weight"]))
        same = all(np.array_equal(np.sort(a, 1), np.sort(t["topk_idx"], 1)) for a in (idx64, idx32))
        order = np.array_equal(idx64, t["topk_idx"])
        wref = t["topk_weight"]
        werr = rel(w32 if rd == "f32" else w64, wref)
        e_used = rel(y32, ref) if rd == "f32" else rel(y64, ref)
        print(f"{case:22s} {rd:6s} {rel(yb, ref):11.3g} {rel(y64, ref):11.3g} {rel(y32, ref):11.3g} {werr:9.2g} "
              f"{rel(t['output_f32'].astype(F64), ref):9.2g}  {'same' if same else 'DIFFERS'}"
              f"{'' if order else ' (order differs)'}")
        if not same or rel(yb, ref) > 1e-12 or e_used > (1e-6 if rd == "f32" else 1e-12):
            bad += 1
    print("columns: max|y - output_f64| / max|output_f64| for y recomputed here in float64 from the saved"
          "\nweights and input, routed by: the block's own topk_idx/topk_weight (block w); this script's"
          "\nrouter in float64 (f64 router); this script's router rounded to float32 where transformers"
          "\nrounds (f32 router). weights: the same measure for this script's topk weights against"
          "\ntopk_weight (router as the manifest says). out_f32: transformers' own float32 run."
          "\nselection: this script's expert sets (both routers) against topk_idx.")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
