#!/usr/bin/env python3
"""Tiny random MoE models, written by transformers' own save_pretrained, with references.

Each model is a whole <Family>ForCausalLM (1 to 4 decoder layers, hidden size 32, a few
experts, dense and MoE layers mixed as its config implies), its parameters overwritten with
random values (fixed seeds), saved with model.save_pretrained(). A forward pass over T random
tokens captures the input of every MoE block (the decoder layer's `mlp` / `feed_forward`);
the block is then run again on that input
  - in float64 (a deep copy .double(): the stored weights, exactly widened): output_f64,
  - in float32: output_f32,
  - in the model's own dtype (bf16 models): output_model.
Quantised variants (FP8 E4M3 with block scales, MXFP4) are written from the fp32 model with
the published formulas (quantise_fp8, quantise_mxfp4 below); their references come from the
model with the dequantised weights (what a loader must reproduce exactly), plus
output_orig_f64: the unquantised block on the same input (the format's error).
transformers 5.17's save_pretrained writes the per-expert names of the published checkpoints
for Mixtral (block_sparse_moe.experts.N.w1), Qwen2/3-MoE and DeepSeek (mlp.experts.N.gate_proj)
and the fused ones (experts.gate_up_proj) for GPT-OSS and Llama-4. <model>_fused holds the same
weights under the fused names of transformers 5's modules (rename_fused below), written with
safetensors and an index file (3 shards), so it shares the reference of the model it comes from.

Output, per model: OUTDIR/<model>/config.json, model.safetensors or model-0000i-of-0000n.
safetensors + model.safetensors.index.json, reference.safetensors (tensors
layers.<L>.input [T, H] f32, layers.<L>.output_f64 [T, H] f64, layers.<L>.output_f32 [T, H]
f32, optional layers.<L>.output_model, layers.<L>.output_orig_f64; metadata: generator
versions, moe_layers, dense_layers, tokens).

Usage: python3 gen_models.py OUTDIR [--sources DIR]
"""
import copy
import importlib
import inspect
import json
import os
import shutil
import sys
import traceback

import torch
import transformers
from safetensors.torch import load_file, save_file

torch.set_num_threads(4)

T = 24          # tokens
H = 32          # hidden_size
VOCAB = 64

COMMON = dict(hidden_size=H, vocab_size=VOCAB, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, hidden_act="silu", tie_word_embeddings=False)

# name, module, config class, model class, config kwargs, options
MODELS = [
    ("mixtral", "mixtral", "MixtralConfig", "MixtralForCausalLM",
     dict(COMMON, head_dim=8, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
          num_hidden_layers=2),
     dict(dtype=torch.float32, renamed=True)),
    ("qwen2_moe", "qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
     dict(COMMON, intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=56,
          num_experts=8, num_experts_per_tok=4, norm_topk_prob=False, num_hidden_layers=3,
          decoder_sparse_step=1, mlp_only_layers=[1]),
     dict(dtype=torch.float32, renamed=True)),
    ("qwen3_moe", "qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
     dict(COMMON, head_dim=8, intermediate_size=40, moe_intermediate_size=24, num_experts=8,
          num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=4, decoder_sparse_step=2),
     dict(dtype=torch.bfloat16, max_shard_size="40KB")),
    ("deepseek_v3", "deepseek_v3", "DeepseekV3Config", "DeepseekV3ForCausalLM",
     dict(COMMON, intermediate_size=40, moe_intermediate_size=24, n_routed_experts=16, num_experts_per_tok=4,
          n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, n_shared_experts=1,
          first_k_dense_replace=1, num_hidden_layers=3, q_lora_rank=16, kv_lora_rank=16,
          qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4),
     dict(dtype=torch.float32, renamed=True, fp8="deepseek_v3_fp8", fp8_block=[16, 16])),
    ("deepseek_v2", "deepseek_v2", "DeepseekV2Config", "DeepseekV2ForCausalLM",
     dict(COMMON, intermediate_size=40, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
          n_shared_experts=2, first_k_dense_replace=1, num_hidden_layers=2, routed_scaling_factor=1.5,
          topk_method="greedy", norm_topk_prob=False, q_lora_rank=None, kv_lora_rank=16,
          qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4),
     dict(dtype=torch.float32)),
    ("gpt_oss", "gpt_oss", "GptOssConfig", "GptOssForCausalLM",
     dict(COMMON, head_dim=8, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
          num_hidden_layers=2, sliding_window=8),
     dict(dtype=torch.float32, mxfp4="gpt_oss_mxfp4", param_scale={"experts.gate_up_proj": 0.8})),
    ("llama4", "llama4", "Llama4TextConfig", "Llama4ForCausalLM",
     dict(COMMON, head_dim=8, intermediate_size=24, intermediate_size_mlp=56, num_local_experts=8,
          num_experts_per_tok=1, num_hidden_layers=2, interleave_moe_layer_step=2, attention_chunk_size=16),
     dict(dtype=torch.float32)),
]

MOE_MODULE = {"llama4": "feed_forward"}


def is_moe_block(mod):
    return hasattr(mod, "experts")


def moe_blocks(model):
    """{layer index: MoE block module} from the model's own decoder layers."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        for attr in ("mlp", "feed_forward"):
            m = getattr(layer, attr, None)
            if m is not None and is_moe_block(m):
                out[i] = m
    return out


def randomise(model, seed, opt):
    g = torch.Generator().manual_seed(seed)
    pscale = opt.get("param_scale", {})
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name:
                v = 1.0 + 0.1 * r
            elif "embed_tokens" in name:
                v = r
            else:
                v = r * next((s for k, s in pscale.items() if name.endswith(k)), 0.2)
            p.copy_(v.to(p.dtype))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_((torch.randn(b.shape, generator=g) * 0.05).to(b.dtype))


def capture_inputs(model, ids):
    """The input of every MoE block in one forward pass: {layer: x [T, H] in the model dtype}."""
    blocks = moe_blocks(model)
    seen = {}
    hooks = []
    for i, blk in blocks.items():
        def pre(mod, args, kwargs, i=i):
            x = args[0] if args else next(iter(kwargs.values()))
            seen[i] = x.detach().reshape(-1, x.shape[-1]).clone()
        hooks.append(blk.register_forward_pre_hook(pre, with_kwargs=True))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return blocks, seen


def block_out(blk, x):
    with torch.no_grad():
        y = blk(x.unsqueeze(0))
    if isinstance(y, (tuple, list)):
        y = y[0]
    return y.reshape(-1, x.shape[-1])


def references(model, ids, orig_model=None):
    """reference tensors for every MoE layer; orig_model: the unquantised model (same names)."""
    blocks, xs = capture_inputs(model, ids)
    ref = {}
    orig_blocks = moe_blocks(orig_model) if orig_model is not None else {}
    for i in sorted(blocks):
        blk, x = blocks[i], xs[i]
        x32 = x.float()
        ref[f"layers.{i}.input"] = x32.contiguous()
        ref[f"layers.{i}.output_f64"] = block_out(copy.deepcopy(blk).double(), x32.double()).contiguous()
        ref[f"layers.{i}.output_f32"] = block_out(copy.deepcopy(blk).float(), x32).contiguous()
        if x.dtype != torch.float32:
            ref[f"layers.{i}.output_model"] = block_out(blk, x).float().contiguous()
        if i in orig_blocks:
            ref[f"layers.{i}.output_orig_f64"] = block_out(copy.deepcopy(orig_blocks[i]).double(),
                                                           x32.double()).contiguous()
    return ref, sorted(blocks)


def write_reference(path, ref, moe_layers, num_layers, extra=None):
    meta = {"generator": "gen_models.py", "transformers": transformers.__version__, "torch": torch.__version__,
            "tokens": str(T), "moe_layers": ",".join(str(i) for i in moe_layers),
            "dense_layers": ",".join(str(i) for i in range(num_layers) if i not in moe_layers)}
    meta.update(extra or {})
    save_file(ref, path, metadata=meta)


# >>naming: the published checkpoints' per-expert names and transformers 5's fused ones.
PER_EXPERT = {  # family: (block module in published checkpoints, gate, up, down)
    "mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
    "qwen2_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "deepseek_v3": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "deepseek_v2": ("mlp", "gate_proj", "up_proj", "down_proj"),
}


def rename_per_expert(sd, family):
    """fused experts.gate_up_proj [E, 2I, H] / experts.down_proj [E, H, I] -> experts.N.<gate|up|down>;
    Mixtral's block module becomes block_sparse_moe as in mistralai/Mixtral-8x7B-v0.1."""
    blk, g, u, d = PER_EXPERT[family]
    out = {}
    for name, t in sd.items():
        if ".mlp." in name and blk != "mlp":
            name2 = name.replace(".mlp.", f".{blk}.")
        else:
            name2 = name
        if name.endswith(".experts.gate_up_proj"):
            base = name2[: -len("gate_up_proj")]
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{base}{e}.{g}.weight"] = t[e, :inter].contiguous()
                out[f"{base}{e}.{u}.weight"] = t[e, inter:].contiguous()
        elif name.endswith(".experts.down_proj"):
            base = name2[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{base}{e}.{d}.weight"] = t[e].contiguous()
        else:
            out[name2] = t.contiguous()
    return out


def rename_fused(sd, family):
    """per-expert experts.N.<gate|up|down>_proj.weight -> fused (the inverse of rename_per_expert)."""
    blk, g, u, d = PER_EXPERT[family]
    groups = {}
    out = {}
    for name, t in sd.items():
        parts = name.split(".")
        if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
            k = parts.index("experts")
            base = ".".join(parts[: k + 1]).replace(f".{blk}.", ".mlp.")
            groups.setdefault(base, {})[(int(parts[k + 1]), parts[k + 2])] = t
        else:
            out[name.replace(f".{blk}.", ".mlp.")] = t
    for base, m in groups.items():
        E = 1 + max(e for e, _ in m)
        out[base + ".gate_up_proj"] = torch.stack([torch.cat([m[(e, g)], m[(e, u)]], 0) for e in range(E)])
        out[base + ".down_proj"] = torch.stack([m[(e, d)] for e in range(E)])
    return out


def write_sharded(out_dir, sd, shards, metadata=None):
    """sd split into `shards` files with an index, as save_pretrained names them."""
    names = list(sd)
    per = (len(names) + shards - 1) // shards
    weight_map = {}
    total = 0
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: sd[n].contiguous() for n in names[s * per:(s + 1) * per]}
        save_file(part, os.path.join(out_dir, fname), metadata={"format": "pt"})
        for n, t in part.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": dict(metadata or {}, total_size=total), "weight_map": weight_map}, f, indent=2)


def saved_state(model_dir):
    """Every tensor save_pretrained wrote, by name."""
    sd = {}
    for f in sorted(os.listdir(model_dir)):
        if f.endswith(".safetensors") and f != "reference.safetensors":
            sd.update(load_file(os.path.join(model_dir, f)))
    return sd


# >>fp8: DeepSeek-V3's published format: weight F8_E4M3 [out, in], weight_scale_inv F32
# [ceil(out/bo), ceil(in/bi)]; w = fp8 * scale_inv per block; scale_inv = amax(block) / 448.
def quantise_fp8(w, block):
    bo, bi = block
    out_dim, in_dim = w.shape
    so, si = -(-out_dim // bo), -(-in_dim // bi)
    scale = torch.zeros(so, si, dtype=torch.float32)
    q = torch.zeros(out_dim, in_dim, dtype=torch.float8_e4m3fn)
    deq = torch.zeros(out_dim, in_dim, dtype=torch.float32)
    for a in range(so):
        for b in range(si):
            blk = w[a * bo:(a + 1) * bo, b * bi:(b + 1) * bi].float()
            s = float(blk.abs().max()) / 448.0
            s = s if s > 0 else 1.0
            scale[a, b] = s
            qb = (blk / scale[a, b]).to(torch.float8_e4m3fn)
            q[a * bo:(a + 1) * bo, b * bi:(b + 1) * bi] = qb
            deq[a * bo:(a + 1) * bo, b * bi:(b + 1) * bi] = qb.float() * scale[a, b]
    return q, scale, deq


def fp8_quantised(name, t):
    """Which tensors DeepSeek-V3's checkpoint stores in FP8: the linear layers' weights, not the
    router, the norms, the embeddings or the head."""
    return (t.dim() == 2 and name.endswith("_proj.weight") and ".gate." not in name)


# >>mxfp4: GPT-OSS's published format (OCP MX): 32 values share one E8M0 scale byte
# (2^(s-127)); each value is FP4 E2M1, two per byte, the lower nibble first. Blocks
# [E, out, in/32, 16] and scales [E, out, in/32], out-major (nn.Linear orientation).
FP4_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def quantise_mxfp4(w_out_in):
    """w [E, out, in] -> (blocks uint8 [E, out, in/32, 16], scales uint8 [E, out, in/32], dequantised [E, out, in])."""
    E, O, I = w_out_in.shape
    g = w_out_in.double().reshape(E, O, I // 32, 32)
    amax = g.abs().amax(-1)
    # the smallest power of two that brings the block into [-6, 6]
    exp = torch.ceil(torch.log2(torch.clamp(amax, min=1e-30) / 6.0)).clamp(-127, 127)
    exp = torch.where(amax > 0, exp, torch.zeros_like(exp))
    scaled = g / torch.pow(2.0, exp).unsqueeze(-1)
    lut = torch.tensor(FP4_VALUES, dtype=torch.float64)
    idx = (scaled.unsqueeze(-1) - lut).abs().argmin(-1)          # nearest value (first on ties)
    idx = torch.where((lut[idx] == 0) & (scaled < 0), torch.full_like(idx, 0), idx)
    nib = idx.to(torch.uint8)
    blocks = (nib[..., 0::2] | (nib[..., 1::2] << 4)).to(torch.uint8)
    scales = (exp + 127).to(torch.uint8)
    deq = (lut[idx] * torch.pow(2.0, exp).unsqueeze(-1)).reshape(E, O, I).float()
    return blocks.contiguous(), scales.contiguous(), deq


def make_model(mod, cfg_name, model_name, kw, ci):
    c = importlib.import_module(f"transformers.models.{mod}.configuration_{mod}")
    m = importlib.import_module(f"transformers.models.{mod}.modeling_{mod}")
    cfg = getattr(c, cfg_name)(**kw)
    for attr, val in (("_attn_implementation", "eager"), ("_experts_implementation", "eager")):
        try:
            setattr(cfg, attr, val)
        except Exception as e:  # noqa: BLE001
            print(f"   cannot set {attr}: {e}")
    torch.manual_seed(1000 + ci)
    model = getattr(m, model_name)(cfg).float().eval()
    return model, m


def one_model(out_root, ci, name, mod, cfg_name, model_name, kw, opt, src_dir):
    model, m = make_model(mod, cfg_name, model_name, kw, ci)
    if src_dir:
        with open(os.path.join(src_dir, f"modeling_{mod}.py"), "w") as f:
            f.write(inspect.getsource(m))
    randomise(model, 2000 + ci, opt)
    dtype = opt["dtype"]
    model = model.to(dtype)
    g = torch.Generator().manual_seed(3000 + ci)
    ids = torch.randint(0, VOCAB, (1, T), generator=g)
    out_dir = os.path.join(out_root, name)
    os.makedirs(out_dir, exist_ok=True)
    if "max_shard_size" in opt:
        model.save_pretrained(out_dir, max_shard_size=opt["max_shard_size"])
    else:
        model.save_pretrained(out_dir)
    for f in os.listdir(out_dir):
        if f == "generation_config.json":
            os.remove(os.path.join(out_dir, f))
    ref, moe_layers = references(model, ids)
    nl = kw["num_hidden_layers"]
    write_reference(os.path.join(out_dir, "reference.safetensors"), ref, moe_layers, nl)
    saved = saved_state(out_dir)
    fused = any(n.endswith("experts.gate_up_proj") for n in saved)
    print(f"   saved {len(saved)} tensors in {sorted(f for f in os.listdir(out_dir))}; fused experts: {fused}")
    print("   names:", " ".join(n for n in sorted(saved) if ".layers.0." in n or ".layers.1." in n))
    for i in moe_layers:
        y64, y32 = ref[f"layers.{i}.output_f64"], ref[f"layers.{i}.output_f32"]
        print(f"   layer {i}: |y32 - y64| / max|y64| = {float((y32.double() - y64).abs().max() / y64.abs().max()):.3g}")

    if opt.get("renamed"):
        # the other naming: <name>_fused where save_pretrained wrote per-expert names, else <name>_experts
        vname = name + ("_experts" if fused else "_fused")
        vdir = os.path.join(out_root, vname)
        os.makedirs(vdir, exist_ok=True)
        shutil.copy(os.path.join(out_dir, "config.json"), vdir)
        shutil.copy(os.path.join(out_dir, "reference.safetensors"), vdir)
        sd = rename_per_expert(saved, mod) if fused else rename_fused(saved, mod)
        write_sharded(vdir, sd, 3)
        print(f"   {vname}: {len(sd)} tensors, 3 shards, {'per-expert' if fused else 'fused'} names")

    if opt.get("fp8"):
        vdir = os.path.join(out_root, opt["fp8"])
        os.makedirs(vdir, exist_ok=True)
        block = opt["fp8_block"]
        per = rename_per_expert(saved, mod) if fused else dict(saved)
        qsd, deq_sd = {}, {}
        for n, t in per.items():
            if fp8_quantised(n, t):
                q, s, d = quantise_fp8(t.float(), block)
                qsd[n] = q
                qsd[n + "_scale_inv"] = s
                deq_sd[n] = d
            else:
                qsd[n] = t
                deq_sd[n] = t
        with open(os.path.join(out_dir, "config.json")) as f:
            cj = json.load(f)
        cj["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": block}
        with open(os.path.join(vdir, "config.json"), "w") as f:
            json.dump(cj, f, indent=2)
        write_sharded(vdir, qsd, 2)
        qmodel = copy.deepcopy(model)
        load_named(qmodel, rename_fused(deq_sd, mod))
        ref, ml = references(qmodel, ids, orig_model=model)
        write_reference(os.path.join(vdir, "reference.safetensors"), ref, ml, nl,
                        {"quantisation": f"fp8 e4m3 block {block[0]}x{block[1]}"})
        for i in ml:
            a, b = ref[f"layers.{i}.output_f64"], ref[f"layers.{i}.output_orig_f64"]
            print(f"   {opt['fp8']} layer {i}: |deq - orig| / max|orig| = {float((a - b).abs().max() / b.abs().max()):.3g}")

    if opt.get("mxfp4"):
        vdir = os.path.join(out_root, opt["mxfp4"])
        os.makedirs(vdir, exist_ok=True)
        qsd, deq_sd = {}, {}
        for n, t in saved.items():
            if n.endswith("experts.gate_up_proj") or n.endswith("experts.down_proj"):
                # GptOssExperts holds [E, in, out]; the checkpoint stores [E, out, in] blocks
                blocks, scales, deq = quantise_mxfp4(t.float().transpose(1, 2).contiguous())
                qsd[n + "_blocks"] = blocks
                qsd[n + "_scales"] = scales
                deq_sd[n] = deq.transpose(1, 2).contiguous()
            else:
                qsd[n] = t
                deq_sd[n] = t
        with open(os.path.join(out_dir, "config.json")) as f:
            cj = json.load(f)
        cj["quantization_config"] = {"quant_method": "mxfp4",
                                     "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                "model.embed_tokens", "lm_head"]}
        with open(os.path.join(vdir, "config.json"), "w") as f:
            json.dump(cj, f, indent=2)
        save_file(qsd, os.path.join(vdir, "model.safetensors"), metadata={"format": "pt"})
        qmodel = copy.deepcopy(model)
        load_named(qmodel, deq_sd)
        ref, ml = references(qmodel, ids, orig_model=model)
        write_reference(os.path.join(vdir, "reference.safetensors"), ref, ml, nl, {"quantisation": "mxfp4"})
        for i in ml:
            a, b = ref[f"layers.{i}.output_f64"], ref[f"layers.{i}.output_orig_f64"]
            print(f"   {opt['mxfp4']} layer {i}: |deq - orig| / max|orig| = {float((a - b).abs().max() / b.abs().max()):.3g}")
        cross_check_mxfp4(vdir, deq_sd)


def load_named(model, sd):
    """Overwrite the model's parameters with sd (model names, as save_pretrained wrote them)."""
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    missing = []
    with torch.no_grad():
        for n, t in sd.items():
            if n in own:
                own[n].copy_(t.to(own[n].dtype))
            else:
                missing.append(n)
    if missing:
        print("   load_named: not in the model:", missing[:8])


def cross_check_mxfp4(vdir, deq_sd):
    """transformers' own dequantisation of the MXFP4 file, if this build can do it on the CPU."""
    try:
        from transformers import AutoModelForCausalLM, Mxfp4Config
        mm = AutoModelForCausalLM.from_pretrained(vdir, quantization_config=Mxfp4Config(dequantize=True),
                                                  dtype=torch.float32)
        own = dict(mm.named_parameters())
        worst = 0.0
        for n, t in deq_sd.items():
            if n.endswith("experts.gate_up_proj") or n.endswith("experts.down_proj"):
                worst = max(worst, float((own[n].float() - t).abs().max()))
        print(f"   transformers' own MXFP4 dequantisation vs gen_models.py: max |diff| = {worst}")
    except Exception as e:  # noqa: BLE001
        print(f"   transformers could not dequantise the MXFP4 file here: {type(e).__name__}: {e}")


def main():
    args = sys.argv[1:]
    src_dir = None
    if "--sources" in args:
        i = args.index("--sources")
        src_dir = args[i + 1]
        del args[i:i + 2]
        os.makedirs(src_dir, exist_ok=True)
    out_root = args[0]
    os.makedirs(out_root, exist_ok=True)
    print("transformers", transformers.__version__, "torch", torch.__version__)
    failed = []
    for ci, (name, mod, cfg_name, model_name, kw, opt) in enumerate(MODELS):
        print(f"== {name}")
        try:
            one_model(out_root, ci, name, mod, cfg_name, model_name, kw, opt, src_dir)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            print(f"== {name}: FAILED")
            failed.append(name)
    if src_dir:
        for modname in ("transformers.integrations.mxfp4", "transformers.integrations.finegrained_fp8",
                        "transformers.conversion_mapping", "transformers.core_model_loading"):
            try:
                mm = importlib.import_module(modname)
                with open(os.path.join(src_dir, modname.split(".")[-1] + ".py"), "w") as f:
                    f.write(inspect.getsource(mm))
            except Exception as e:  # noqa: BLE001
                print(f"no {modname}: {e}")
    if failed:
        print("FAILED:", " ".join(failed))


if __name__ == "__main__":
    main()
