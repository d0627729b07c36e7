#!/usr/bin/env python3
"""Reference vectors from Hugging Face transformers' own MoE blocks.

Each case builds one MoE block from its transformers config, fills it with random fp32
weights (N(0, 0.2^2), fixed seeds), feeds it an fp32 input (N(0, 1)) and records
  - every tensor of the block's state_dict under its own name (fp32),
  - input [T, H] (fp32),
  - output_f64 [T, H]: the block run in float64 on those same fp32-valued weights and input,
  - output_f32 [T, H]: the block run in float32,
  - topk_idx [T, k] (int32) and topk_weight [T, k] (float64): the routing of the float64 run,
    captured from the block's own router (sorted by descending selection score).
Output per case: <case>.bin (raw little-endian arrays, each at an offset that is a multiple
of 8) and <case>.txt (manifest: config values, router_dtype, tensor name/dtype/offset/shape).
See README.md beside this file.

Usage: python3 gen_refs.py [OUTDIR]      (default: the folder of this script)
Optional: --sources DIR  also writes the transformers source of each family's MoE classes.
"""
import copy
import importlib
import inspect
import os
import sys
import traceback

import numpy as np
import torch
import transformers

torch.set_num_threads(1)

T = 24          # tokens per case
H = 32          # hidden_size
I = 24          # expert intermediate size

CASES = [
    # name, module, config class, block class, config kwargs, extra options
    ("mixtral", "mixtral", "MixtralConfig", "MixtralSparseMoeBlock",
     dict(hidden_size=H, intermediate_size=I, num_local_experts=8, num_experts_per_tok=2, hidden_act="silu"),
     dict(keys=["hidden_size", "intermediate_size", "num_local_experts", "num_experts_per_tok",
                "router_jitter_noise", "hidden_act"])),
    ("qwen2_moe", "qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeSparseMoeBlock",
     dict(hidden_size=H, moe_intermediate_size=I, shared_expert_intermediate_size=56, num_experts=8,
          num_experts_per_tok=4, norm_topk_prob=False, hidden_act="silu"),
     dict(keys=["hidden_size", "moe_intermediate_size", "shared_expert_intermediate_size", "num_experts",
                "num_experts_per_tok", "norm_topk_prob", "hidden_act"])),
    ("qwen3_moe", "qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeSparseMoeBlock",
     dict(hidden_size=H, moe_intermediate_size=I, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
          hidden_act="silu"),
     dict(keys=["hidden_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok", "norm_topk_prob",
                "hidden_act"])),
    ("deepseek_v3", "deepseek_v3", "DeepseekV3Config", "DeepseekV3MoE",
     dict(hidden_size=H, intermediate_size=64, moe_intermediate_size=I, n_routed_experts=16,
          num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
          n_shared_experts=1, hidden_act="silu"),
     dict(keys=["hidden_size", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "n_group",
                "topk_group", "routed_scaling_factor", "norm_topk_prob", "n_shared_experts", "hidden_act"],
          bias_scale=0.05)),
    ("deepseek_v3_nogroup", "deepseek_v3", "DeepseekV3Config", "DeepseekV3MoE",
     dict(hidden_size=H, intermediate_size=64, moe_intermediate_size=I, n_routed_experts=16,
          num_experts_per_tok=4, n_group=1, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
          n_shared_experts=1, hidden_act="silu"),
     dict(keys=["hidden_size", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "n_group",
                "topk_group", "routed_scaling_factor", "norm_topk_prob", "n_shared_experts", "hidden_act"],
          bias_scale=0.05)),
    ("gpt_oss", "gpt_oss", "GptOssConfig", "GptOssMLP",
     dict(hidden_size=H, intermediate_size=I, num_local_experts=8, num_experts_per_tok=2),
     dict(keys=["hidden_size", "intermediate_size", "num_local_experts", "num_experts_per_tok", "swiglu_limit",
                "hidden_act"],
          # gate/up weights 4x larger (std 0.8) so that the clamp at swiglu_limit triggers
          param_scale={"experts.gate_up_proj": 0.8})),
    ("llama4", "llama4", "Llama4TextConfig", "Llama4TextMoe",
     dict(hidden_size=H, intermediate_size=I, intermediate_size_mlp=56, num_local_experts=8,
          num_experts_per_tok=1, hidden_act="silu"),
     dict(keys=["hidden_size", "intermediate_size", "num_local_experts", "num_experts_per_tok", "hidden_act"])),
    ("llama4_top2", "llama4", "Llama4TextConfig", "Llama4TextMoe",
     dict(hidden_size=H, intermediate_size=I, intermediate_size_mlp=56, num_local_experts=8,
          num_experts_per_tok=2, hidden_act="silu"),
     dict(keys=["hidden_size", "intermediate_size", "num_local_experts", "num_experts_per_tok", "hidden_act"])),
]

# Where transformers' float64 run computes the router (read in the block's source, see README.md):
# "f32" where the router math is done in float32 even when the block is float64.
ROUTER_DTYPE = {
    "mixtral": "f32",       # softmax(router_logits.float())
    "qwen2_moe": "f32",     # softmax(..., dtype=torch.float)
    "qwen3_moe": "f32",     # softmax(..., dtype=torch.float)
    "deepseek_v3": "f32",   # F.linear(x.type(float32), W.type(float32)), sigmoid in float32
    "deepseek_v3_nogroup": "f32",
    "gpt_oss": "f64",       # linear + bias, topk, softmax in the logits' dtype
    "llama4": "f32",        # sigmoid(router_scores.float()).to(dtype)
    "llama4_top2": "f32",
}


def dtype_tag(t):
    return {torch.float32: "f32", torch.float64: "f64", torch.int32: "i32"}[t.dtype]


def write_case(out_dir, name, header, config_lines, router_dtype, tensors):
    blob = bytearray()
    lines = [header]
    lines += config_lines
    lines.append(f"router_dtype {router_dtype}")
    for tname, t in tensors:
        t = t.detach().contiguous().cpu()
        while len(blob) % 8:
            blob.append(0)
        arr = t.numpy()
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        lines.append(f"tensor {tname} {dtype_tag(t)} {len(blob)} " + " ".join(str(d) for d in t.shape))
        blob += arr.tobytes()
    with open(os.path.join(out_dir, name + ".bin"), "wb") as f:
        f.write(bytes(blob))
    with open(os.path.join(out_dir, name + ".txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return len(blob)


def fmt(v):
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return repr(v)
    return str(v)


class Capture:
    """Records what the block's router hands to its experts (indices and weights)."""

    def __init__(self):
        self.items = []

    def hook(self, tag):
        def f(mod, args, out):
            self.items.append((tag, out))
        return f


def find_router_module(blk):
    for n in ("gate", "router"):
        if hasattr(blk, n):
            return n, getattr(blk, n)
    raise RuntimeError("no router submodule")


def routing_from_capture(case, cap, k, E, Tn):
    """topk_idx [T,k] (int) and topk_weight [T,k] from what the block's router produced."""
    idx = w = None
    for tag, out in cap.items:
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for o in outs:
            if not torch.is_tensor(o):
                continue
            if not o.is_floating_point() and tuple(o.shape) == (Tn, k):
                idx = o
        for o in outs:
            if torch.is_tensor(o) and o.is_floating_point() and tuple(o.shape) == (Tn, k) and idx is not None:
                w = o
    if idx is not None and w is not None:
        return idx.long(), w
    # llama4-style: dense scores [E, T] or [T, E], zero (sigmoid(-inf)) off the top-k
    for tag, out in cap.items:
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for o in outs:
            if torch.is_tensor(o) and o.is_floating_point() and o.dim() == 2 and set(o.shape) == {E, Tn}:
                s = o if tuple(o.shape) == (Tn, E) else o.t()
                if ((s == 0).sum(dim=1) == E - k).all():
                    # select on logits; scores are monotone in logits, so top-k of the scores agrees
                    ww, ii = torch.topk(s, k, dim=1)
                    return ii, ww
    raise RuntimeError(f"{case}: could not capture the routing")


def run_block(blk, x):
    """The block's output [T, H] for x [T, H], and what its router produced."""
    cap = Capture()
    hooks = []
    rname, rmod = find_router_module(blk)
    hooks.append(rmod.register_forward_hook(cap.hook("router")))
    orig = None
    if hasattr(blk, "route_tokens_to_experts"):
        orig = blk.route_tokens_to_experts

        def wrapped(*a, **kw):
            r = orig(*a, **kw)
            cap.items.append(("route_tokens_to_experts", r))
            return r
        blk.route_tokens_to_experts = wrapped
    with torch.no_grad():
        y = blk(x.unsqueeze(0))
    for h in hooks:
        h.remove()
    if orig is not None:
        del blk.route_tokens_to_experts
    if isinstance(y, (tuple, list)):
        y = y[0]
    y = y.reshape(-1, x.shape[-1])
    return y, cap


def sort_routing(idx, w, sel):
    """Sort each token's k choices by descending selection score sel[T,E]."""
    s = torch.gather(sel, 1, idx)
    order = torch.argsort(s, dim=1, descending=True, stable=True)
    return torch.gather(idx, 1, order), torch.gather(w, 1, order)


def selection_scores(case, sd, x, cfg, bias=True, mask_value=float("-inf")):
    """The score each family selects on, float64 (used to order topk_idx and for the reports)."""
    x = x.double()
    if case.startswith("deepseek"):
        logits = (x.float() @ sd["gate.weight"].float().t()).double()
        s = torch.sigmoid(logits.float()).double()
        c = s + (sd["gate.e_score_correction_bias"].double() if bias else 0.0)
        ng, tg, E = cfg.n_group, cfg.topk_group, cfg.n_routed_experts
        gs = c.view(-1, ng, E // ng).topk(2, dim=-1)[0].sum(-1)
        gi = torch.topk(gs, tg, dim=-1)[1]
        gm = torch.zeros_like(gs).scatter_(1, gi, 1.0)
        m = gm.unsqueeze(-1).expand(-1, ng, E // ng).reshape(-1, E)
        return c.masked_fill(m == 0, mask_value)
    if case == "gpt_oss":
        return x @ sd["router.weight"].double().t() + sd["router.bias"].double()
    if case.startswith("llama4"):
        return x @ sd["router.weight"].double().t()
    return x @ sd["gate.weight"].double().t()


def add_reports(report, case, sd, x, cfg, blk, idx, k, E):
    """Bias effect (DeepSeek-V3) and clamp fractions (GPT-OSS), appended to report."""
    if case.startswith("deepseek"):
        nob = torch.topk(selection_scores(case, sd, x, cfg, bias=False), k, dim=1)[1]
        diff = (torch.sort(nob, 1)[0] != torch.sort(idx, 1)[0]).any(dim=1)
        b = sd["gate.e_score_correction_bias"]
        report.append(f"bias: min {float(b.min()):.4f} max {float(b.max()):.4f}; tokens whose expert set "
                      f"differs without the bias: {int(diff.sum())}/{T}")
        zero = torch.topk(selection_scores(case, sd, x, cfg, mask_value=0.0), k, dim=1)[1]
        diff = (torch.sort(zero, 1)[0] != torch.sort(idx, 1)[0]).any(dim=1)
        report.append(f"tokens whose expert set would differ with 0.0 group masking instead of -inf: "
                      f"{int(diff.sum())}/{T}")
    if case == "gpt_oss":
        gu = torch.einsum("th,ehf->tef", x.double(), sd["experts.gate_up_proj"].double()) \
            + sd["experts.gate_up_proj_bias"].double()
        sel_mask = torch.zeros(T, E, dtype=torch.bool).scatter_(1, idx, True)
        gate, up = gu[..., 0::2][sel_mask], gu[..., 1::2][sel_mask]
        lim = float(blk.experts.limit)
        report.append(f"selected (token, expert) pairs: gate > {lim}: {float((gate > lim).double().mean()):.4f}; "
                      f"|up| > {lim}: {float((up.abs() > lim).double().mean()):.4f} "
                      f"(up > {lim}: {float((up > lim).double().mean()):.4f}, "
                      f"up < -{lim}: {float((up < -lim).double().mean()):.4f}); "
                      f"gate < -{lim} (not clamped): {float((gate < -lim).double().mean()):.4f}")


def main():
    args = sys.argv[1:]
    src_dir = None
    if "--sources" in args:
        i = args.index("--sources")
        src_dir = args[i + 1]
        del args[i:i + 2]
    out_dir = args[0] if args else os.path.dirname(os.path.abspath(__file__))
    os.makedirs(out_dir, exist_ok=True)
    print("transformers", transformers.__version__, "torch", torch.__version__, "numpy", np.__version__)
    seen_src = set()
    failed = []
    for ci, (case, mod, cfg_name, blk_name, kw, opt) in enumerate(CASES):
        try:
            one_case(out_dir, src_dir, seen_src, ci, case, mod, cfg_name, blk_name, kw, opt)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            print(f"== {case}: FAILED")
            failed.append(case)
    if src_dir:
        for modname in ("transformers.integrations.moe", "transformers.activations"):
            try:
                mm = importlib.import_module(modname)
                with open(os.path.join(src_dir, modname.split(".")[-1] + ".py"), "w") as f:
                    f.write(inspect.getsource(mm))
            except Exception as e:  # noqa: BLE001
                print(f"no {modname}: {e}")
    if failed:
        print("FAILED:", " ".join(failed))
        sys.exit(1)


def one_case(out_dir, src_dir, seen_src, ci, case, mod, cfg_name, blk_name, kw, opt):
    m = importlib.import_module(f"transformers.models.{mod}.modeling_{mod}")
    c = importlib.import_module(f"transformers.models.{mod}.configuration_{mod}")
    if src_dir and mod not in seen_src:
        seen_src.add(mod)
        os.makedirs(src_dir, exist_ok=True)
        with open(os.path.join(src_dir, f"modeling_{mod}.py"), "w") as f:
            f.write(inspect.getsource(m))
    cfg = getattr(c, cfg_name)(**kw)
    for attr, val in (("_attn_implementation", "eager"), ("_experts_implementation", "eager")):
        try:
            setattr(cfg, attr, val)
        except Exception as e:  # noqa: BLE001
            print(f"   {case}: cannot set {attr}: {e}")
    torch.manual_seed(1000 + ci)
    blk = getattr(m, blk_name)(cfg).float().eval()
    g = torch.Generator().manual_seed(2000 + ci)
    pscale = opt.get("param_scale", {})
    with torch.no_grad():
        for pn, p in blk.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * pscale.get(pn, 0.2))
        for bn, b in blk.named_buffers():
            if b.is_floating_point():
                b.copy_(torch.randn(b.shape, generator=g) * opt.get("bias_scale", 0.05))
    x = torch.randn(T, H, generator=g).float()
    blk64 = copy.deepcopy(blk).double()
    blk32 = copy.deepcopy(blk).float()
    y64, cap = run_block(blk64, x.double())
    y32, cap32 = run_block(blk32, x.clone())
    k = kw["num_experts_per_tok"]
    E = kw.get("num_local_experts", kw.get("num_experts", kw.get("n_routed_experts")))
    sd = {n: v.detach().float().contiguous() for n, v in blk.state_dict().items()}
    idx, w = routing_from_capture(case, cap, k, E, T)
    sel = selection_scores(case, sd, x, cfg)
    idx, w = sort_routing(idx, w.double(), sel)
    print(f"== {case}: {blk_name}, captured routing from {[t for t, _ in cap.items]}, "
          f"weights dtype {[o.dtype for _, out in cap.items for o in (out if isinstance(out, (tuple, list)) else (out,)) if torch.is_tensor(o)]}")
    wf = w.double()
    exact32 = bool((wf == wf.float().double()).all())
    print(f"   routing weights exactly fp32-representable: {exact32} (manifest router_dtype {ROUTER_DTYPE[case]})")
    # own recompute of the selection agrees with the block's?
    mine = torch.topk(sel, k, dim=1)[1]
    agree = (torch.sort(mine, 1)[0] == torch.sort(idx, 1)[0]).all(dim=1)
    print(f"   selection recomputed here == block's: {int(agree.sum())}/{T} tokens")
    idx32, _ = routing_from_capture(case, cap32, k, E, T)
    same32 = (torch.sort(idx32.long(), 1)[0] == torch.sort(idx, 1)[0]).all(dim=1)
    print(f"   float32 run selects the same experts as the float64 run: {int(same32.sum())}/{T} tokens")
    report = []
    try:
        add_reports(report, case, sd, x, cfg, blk, idx, k, E)
    except Exception as e:  # noqa: BLE001
        print(f"   {case}: report failed: {e!r}")
    for r in report:
        print("   " + r)
    cfgd = cfg.to_dict()
    config_lines = []
    for key in opt["keys"]:
        if key in cfgd or hasattr(cfg, key):
            config_lines.append(f"config {key} {fmt(getattr(cfg, key, cfgd.get(key)))}")
        else:
            print(f"   {case}: config has no {key}")
    if case == "gpt_oss":
        ex = blk.experts
        alpha = getattr(ex, "alpha", None)
        if alpha is None:
            print("   gpt_oss: experts have no alpha attribute")
        else:
            config_lines.append(f"config swiglu_alpha {fmt(float(alpha))}")
        if "swiglu_limit" not in cfgd and hasattr(ex, "limit"):
            config_lines.append(f"config swiglu_limit {fmt(float(ex.limit))}")
    config_lines.append(f"config tokens {T}")
    header = (f"# {case}: {blk_name}, transformers {transformers.__version__}, torch {torch.__version__}, "
              f"generated by gen_refs.py")
    tensors = [(n, v) for n, v in sd.items()]
    tensors += [("input", x), ("output_f64", y64.double()), ("output_f32", y32.float()),
                ("topk_idx", idx.to(torch.int32)), ("topk_weight", w.double())]
    lines_extra = ["# " + r for r in report]
    size = write_case(out_dir, case, header + ("\n" + "\n".join(lines_extra) if lines_extra else ""),
                      config_lines, ROUTER_DTYPE[case], tensors)
    rel = float((y32.double() - y64).abs().max() / y64.abs().max())
    print(f"   {size} bytes; |output_f32 - output_f64|/max|output_f64| = {rel:.3g}")
    for n, v in tensors:
        print(f"   {n} {list(v.shape)} {v.dtype}")
    if src_dir:
        with open(os.path.join(src_dir, f"{case}.blocks.txt"), "w") as f:
            for cname, obj in vars(m).items():
                if inspect.isclass(obj) and obj.__module__ == m.__name__ and any(
                        s in cname for s in ("Router", "Gate", "Expert", "Moe", "MoE", "MLP", "Sparse")):
                    try:
                        f.write(f"##### {cname}\n{inspect.getsource(obj)}\n")
                    except Exception as e:  # noqa: BLE001
                        f.write(f"##### {cname}: {e}\n")
            f.write(f"##### config\n{cfg.to_json_string(use_diff=False)}\n")


if __name__ == "__main__":
    main()
