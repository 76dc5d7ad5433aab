"""The training-memory estimate, from the model's config alone (notebook 02, before any weight loads).

    from lib.run.memory import estimate_memory, format_estimate
    est = estimate_memory(load_model_config(cfg), cfg)   # GiB per part, total, fits, suggestions
    print(format_estimate(est))

The model is built on the meta device (no memory, no weights) to count every linear layer
exactly, then each part is sized by hand: 4-bit weights and their quantization constants, the
LoRA parameters, their gradients and optimizer states, activations with and without gradient
checkpointing, and the logits tiles of TRL's fused LM head. It is compared with the chosen GPU,
with suggestions when it does not fit.
"""

from __future__ import annotations

import copy

from lib.run.config import set_value
from lib.run.errors import ConfigError
from lib.run.hardware import GIB, compute_dtype_name, device_info
from lib.run.settings import target_modules

# Usable memory of the GPUs the estimate is compared with (GiB, as nvidia-smi shows them).
GPUS = {"T4": 15.0, "A100-40GB": 40.0, "A100-80GB": 80.0, "H100": 80.0}
# bitsandbytes 4-bit: one absmax per block of 64 weights; with double quantization the absmax
# values are themselves quantized to 8 bits in blocks of 256, each with an fp32 absmax.
BLOCKSIZE_4BIT = 64
NESTED_BLOCKSIZE = 256
# TRL's fused LM head projects at most this many tokens x vocabulary entries at a time.
LOGITS_TOKEN_CHUNK = 4096
LOGITS_VOCAB_CHUNK = 32768
CUDA_CONTEXT_GIB = 0.5  # CUDA context, kernels, cuBLAS workspace
FRAGMENTATION = 0.10  # allocator slack on top of what the tensors need


# --------------------------------------------------------------------------------------------
# The architecture, from the config


def linear_layers(model_config, trust_remote_code=False):
    """(name, in_features, out_features) of every linear layer, the output embedding apart.

    The model is built on the meta device: shapes only, no memory.
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    model.tie_weights()  # on the meta device tied weights start untied: count the embedding once
    out_emb = model.get_output_embeddings()
    linears, head = [], None
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            w = module.weight
            fan_in, fan_out = (w.shape[1], w.shape[0]) if isinstance(module, torch.nn.Linear) else (w.shape[0], w.shape[1])
            if module is out_emb:
                head = (name, fan_in, fan_out)
            else:
                linears.append((name, int(fan_in), int(fan_out)))
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    return linears, head, int(total)


_LAYER_CACHE: dict = {}


def cached_layers(model_config, trust_remote_code=False):
    """linear_layers' (linears, total parameters), kept for the last model asked about."""
    key = (model_config.to_json_string(use_diff=False), trust_remote_code)
    if key not in _LAYER_CACHE:
        linears, _head, total = linear_layers(model_config, trust_remote_code)
        _LAYER_CACHE.clear()  # one model at a time
        _LAYER_CACHE[key] = (linears, total)
    return _LAYER_CACHE[key]


def match_targets(linears, targets) -> list:
    """The linear layers LoRA adapts for `targets` ('all-linear' or module names)."""
    if targets == "all-linear":
        return list(linears)
    return [lin for lin in linears if lin[0].split(".")[-1] in targets or lin[0] in targets]


def architecture(model_config) -> dict:
    """Hidden size, layers, heads, kv heads, head dim, MLP size and vocabulary of a (text) model config."""
    c = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    h = getattr(c, "hidden_size", None) or getattr(c, "n_embd", None) or c.d_model
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", None)
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head", None)
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or h // heads
    inter = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * h
    return {
        "hidden_size": int(h),
        "num_layers": int(layers),
        "num_heads": int(heads),
        "num_kv_heads": int(kv_heads),
        "head_dim": int(head_dim),
        "intermediate_size": int(inter),
        "vocab_size": int(c.vocab_size),
    }


def activation_elements_per_token_layer(arch: dict) -> int:
    """Values one decoder layer keeps per token for the backward pass (no attention matrix: sdpa/flash).

    Attention block: residual input, norm output, q, k, v (before and after rotary), attention output
    -> 4h + 3q + 3kv (with q = heads x head_dim, kv = kv_heads x head_dim, counting the residual and
    norm outputs of both blocks in the 4h). MLP block (gated): gate, up, activation, product -> 4 x intermediate.
    """
    h, q = arch["hidden_size"], arch["num_heads"] * arch["head_dim"]
    kv = arch["num_kv_heads"] * arch["head_dim"]
    return 4 * h + 3 * q + 3 * kv + 4 * arch["intermediate_size"]


# --------------------------------------------------------------------------------------------
# The parts


def _optimizer_bytes_per_param(optim: str) -> float:
    o = optim.lower()
    if "8bit" in o:
        return 2.0  # two 8-bit states
    if o.startswith("sgd"):
        return 0.0
    if "adafactor" in o:
        return 0.5  # factored second moments: a small fraction
    if "lion" in o:
        return 4.0
    return 8.0  # AdamW: two fp32 states


def _activation_bytes(cfg, info: dict) -> int:
    cdt = compute_dtype_name(cfg, info) if info["device"] == "cuda" else (
        cfg.quant.compute_dtype if cfg.quant.compute_dtype != "auto" else "bfloat16")
    # Without a GPU here, size for the GPU the estimate is compared with: 16-bit compute.
    return 4 if cdt == "float32" else 2


def _weight_parts(cfg, linears, quantized: int, other: int, act_bytes: int) -> tuple[float, float, float]:
    """(quantized weights, quantization constants, other parameters) in bytes, per quant.mode."""
    mode = cfg.quant.mode
    if mode == "4bit":
        if cfg.quant.double_quant:
            const_bytes = quantized / BLOCKSIZE_4BIT * 1 + quantized / (BLOCKSIZE_4BIT * NESTED_BLOCKSIZE) * 4
        else:
            const_bytes = quantized / BLOCKSIZE_4BIT * 4
        return quantized * 0.5, const_bytes, other * 4  # prepare_model_for_kbit_training upcasts the others to fp32
    if mode == "8bit":
        return quantized * 1.0, sum(o for _, _, o in linears) * 4, other * 4  # one fp32 scale per output row
    return quantized * act_bytes, 0, other * act_bytes


def _activation_parts(cfg, arch: dict, targets, act_bytes: int) -> dict:
    """Activations with and without checkpointing, the fused LM head's logits tiles, and unfused logits."""
    tokens = cfg.train.per_device_train_batch_size * cfg.train.max_length
    lora_act = sum(i for _, i, _ in targets) if cfg.lora.dropout > 0 else 0  # dropout copies of the inputs
    lora_act += len(targets) * cfg.lora.r
    if cfg.lora.use_dora:  # DoRA keeps the base and the LoRA outputs of each layer for its magnitude's gradient
        lora_act += sum(2 * o for _, _, o in targets)
    per_layer = activation_elements_per_token_layer(arch) + lora_act / max(arch["num_layers"], 1)
    no_ckpt = tokens * arch["num_layers"] * per_layer * act_bytes
    # With checkpointing: each layer's input is kept, one layer at a time is recomputed in backward.
    ckpt = tokens * arch["num_layers"] * arch["hidden_size"] * act_bytes + tokens * per_layer * act_bytes
    # Fused LM head: one (tokens x vocab) tile in forward, recomputed in backward; plus the hidden states.
    logits = (min(tokens, LOGITS_TOKEN_CHUNK) * min(arch["vocab_size"], LOGITS_VOCAB_CHUNK) * act_bytes * 2
              + tokens * arch["hidden_size"] * 4)
    return {"tokens": tokens, "with": ckpt, "without": no_ckpt, "logits": logits,
            "logits_unfused": tokens * arch["vocab_size"] * 4}  # a plain fp32 (tokens x vocab) logits tensor


def _parts(cfg, linears, total_params, targets, arch, act_bytes) -> tuple[dict, dict]:
    """(bytes per part, overhead included; the activation figures)."""
    quantized = sum(i * o for _, i, o in linears)
    other = total_params - quantized  # embeddings, norms, an untied LM head: kept in 16/32 bits
    weights, consts, others = _weight_parts(cfg, linears, quantized, other, act_bytes)
    lora_params = sum(cfg.lora.r * (i + o) for _, i, o in targets)
    if cfg.lora.use_dora:
        lora_params += sum(o for _, _, o in targets)  # DoRA: one trainable magnitude per output row
    act = _activation_parts(cfg, arch, targets, act_bytes)
    parts = {
        "weights": weights + others,
        "quant_constants": consts,
        "lora": lora_params * 4,  # adapters train in fp32 (mixed precision keeps fp32 master weights)
        "gradients": lora_params * 4,
        "optimizer": lora_params * _optimizer_bytes_per_param(cfg.train.optim),
        "activations": act["with"] if cfg.model.gradient_checkpointing else act["without"],
        "logits": act["logits"],
        "dora_weight": _dora_weight_bytes(cfg, targets, act_bytes),
    }
    parts["overhead"] = CUDA_CONTEXT_GIB * GIB + FRAGMENTATION * sum(parts.values())
    return parts, {**act, "quantized": quantized, "other": other, "lora_params": lora_params}


def _dora_weight_bytes(cfg, targets, act_bytes: int) -> int:
    """DoRA's per-layer temporaries (peft's DoraLinearLayer.forward): to take the row norms of W + s*B@A it
    dequantizes the base weight (compute dtype), builds B@A (fp32) and their sum (fp32), one layer at a
    time: the largest adapted layer counts."""
    if not cfg.lora.use_dora or not targets:
        return 0
    return max(i * o for _, i, o in targets) * (act_bytes + 4 + 4)


# --------------------------------------------------------------------------------------------
# The estimate


def _notes(mode: str) -> str:
    return ("Per GPU (each DDP process holds a full copy; FSDP shards it: multi_gpu). Sequences assumed max_length long; "
            "padding-free batches of shorter examples need less. Weights in "
            + {"4bit": "4 bits (+ quantization constants), other parameters fp32",
               "8bit": "8 bits, other parameters fp32", "none": "the compute dtype"}[mode] + ".")


def _estimate_dict(cfg, arch, total_params, targets, act_bytes, parts, act, gpu_name, gpu_mem) -> dict:
    mode = cfg.quant.mode
    total = sum(parts.values())
    return {
        "model": cfg.model.name_or_path,
        "architecture": arch,
        "params_total": total_params,
        "params_quantized": act["quantized"] if mode != "none" else 0,
        "params_unquantized": act["other"] if mode != "none" else total_params,
        "lora_params": act["lora_params"],
        "lora_modules": len(targets),
        "quant_mode": mode,
        "activation_dtype": "float32" if act_bytes == 4 else "16-bit",
        "tokens_per_step": act["tokens"],
        "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "parts_gb": {k: round(v / GIB, 4) for k, v in parts.items()},
        "total_gb": round(total / GIB, 3),
        "parts_bytes": {k: int(round(v)) for k, v in parts.items()},
        "total_bytes": int(round(total)),
        "activations_gb": {
            "with_checkpointing": round(act["with"] / GIB, 4),
            "without_checkpointing": round(act["without"] / GIB, 4),
        },
        "logits_unfused_gb": round(act["logits_unfused"] / GIB, 4),
        "gpu": gpu_name,
        "gpu_memory_gb": gpu_mem,
        "fits": None if gpu_mem is None else total / GIB <= gpu_mem,
        "gpus": {name: {"memory_gb": mem, "fits": total / GIB <= mem} for name, mem in GPUS.items()},
        "suggestions": [],
        "notes": _notes(mode),
    }


SHARDED_PARTS = ("weights", "quant_constants", "lora", "gradients", "optimizer")  # what FSDP splits over the GPUs


def multi_gpu(parts: dict, num_layers: int, n: int) -> dict:
    """Memory per GPU (GiB) when training on `n` GPUs, from the single-GPU parts (bytes).

    DDP: every GPU holds a full copy (weights, adapter, optimizer) plus a bucket copy of the LoRA
    gradients for the all-reduce. FSDP: weights, quantization constants, LoRA, gradients and optimizer
    states are split n ways, and two decoder layers are gathered whole at a time (the one computing and
    the one prefetched); activations and logits are each GPU's own in both."""
    local = parts["activations"] + parts["logits"]
    ddp = sum(v for k, v in parts.items() if k != "overhead") + parts["gradients"]
    gathered = 2 * (parts["weights"] + parts["quant_constants"]) / max(num_layers, 1)
    fsdp = sum(parts[k] for k in SHARDED_PARTS) / n + gathered + local

    def with_overhead(b):
        return (b * (1 + FRAGMENTATION) + CUDA_CONTEXT_GIB * GIB) / GIB

    return {"gpus": n, "ddp_gb_per_gpu": round(with_overhead(ddp), 4), "fsdp_gb_per_gpu": round(with_overhead(fsdp), 4)}


def estimate_memory(model_config, cfg, gpu: str | None = None, suggest: bool = True, gpus: int | None = None) -> dict:
    """Training memory per GPU from the model config alone (GiB), and whether it fits.

    Returns parts (weights, quantization constants, LoRA, gradients, optimizer, activations,
    logits, overhead), total, activations with and without checkpointing, the GPU compared with,
    a comparison with every known GPU, suggestions when it does not fit, and the memory per GPU
    of DDP and FSDP on `gpus` GPUs (default: those here, at least 2; multi_gpu).
    """
    info = device_info()
    arch = architecture(model_config)
    linears, total_params = cached_layers(model_config, cfg.model.trust_remote_code)
    targets = match_targets(linears, target_modules(cfg))
    act_bytes = _activation_bytes(cfg, info)
    parts, act = _parts(cfg, linears, total_params, targets, arch, act_bytes)
    gpu_name, gpu_mem = _chosen_gpu(cfg, info, gpu)
    est = _estimate_dict(cfg, arch, total_params, targets, act_bytes, parts, act, gpu_name, gpu_mem)
    est["multi_gpu"] = multi_gpu(parts, arch["num_layers"], gpus or max(2, info.get("count") or 0))
    # the card estimated for is this machine's (model.gpu auto, or naming the GPU here), not another one
    est["gpu_here"] = bool(gpu_name) and info["device"] == "cuda" and gpu_name.lower() in str(info.get("name")).lower()
    total_gib = sum(parts.values()) / GIB
    if suggest and (est["fits"] is False or (gpu_mem is not None and total_gib > 0.9 * gpu_mem)):
        est["suggestions"] = _suggestions(model_config, cfg, est, gpu_name, gpu_mem)
    return est


def _chosen_gpu(cfg, info, gpu=None):
    name = gpu or cfg.model.gpu
    if name == "auto":
        if info["device"] == "cuda":
            return info["name"], info["memory_gb"]
        return None, None
    for known, mem in GPUS.items():
        if name.replace(" ", "").lower() == known.lower():
            return known, mem
    raise ConfigError(f"model.gpu: '{name}' is not one of auto, {', '.join(GPUS)}")


def changes_to_try(cfg) -> list[list[tuple]]:
    tries = []
    if not cfg.model.gradient_checkpointing:
        tries.append([("model.gradient_checkpointing", True)])
    if cfg.train.per_device_train_batch_size > 1:
        b = cfg.train.per_device_train_batch_size
        tries.append([("train.per_device_train_batch_size", max(1, b // 2)),
                      ("train.gradient_accumulation_steps", cfg.train.gradient_accumulation_steps * 2)])
    if cfg.train.max_length > 512:
        tries.append([("train.max_length", cfg.train.max_length // 2)])
    if cfg.quant.mode != "4bit":
        tries.append([("quant.mode", "4bit")])
    if "8bit" not in cfg.train.optim:
        tries.append([("train.optim", "paged_adamw_8bit")])
    return tries


def _total_with(model_config, cfg, changes, gpu_name=None) -> float:
    """The estimated total (GB) of `cfg` with `changes` ([(key, value), ...]) applied."""
    c = copy.deepcopy(cfg)
    for k, v in changes:
        set_value(c, k, v)
    return estimate_memory(model_config, c, gpu=gpu_name, suggest=False)["total_gb"]


def ranked_changes(model_config, cfg, limit: int = 3) -> list[tuple[list[tuple], float]]:
    """The single changes of changes_to_try (checkpointing, batch, max_length, 4-bit, paged 8-bit
    optimizer) that save the most memory for this run, each with the total it gives, best first."""
    tries = [(changes, _total_with(model_config, cfg, changes)) for changes in changes_to_try(cfg)]
    return sorted(tries, key=lambda t: t[1])[:limit]


def _suggestions(model_config, cfg, est, gpu_name, gpu_mem) -> list[str]:
    """Changes that make it fit, each with the total it gives (estimated again, not guessed)."""
    tries = changes_to_try(cfg)

    def total_with(changes):
        return _total_with(model_config, cfg, changes, gpu_name)

    def fits(t):
        return " (fits)" if gpu_mem is not None and t <= gpu_mem else ""

    out = []
    for changes in tries:
        t = total_with(changes)
        out.append(f"set {', '.join(f'{k}={v}' for k, v in changes)}: about {t:.1f} GB" + fits(t))
    if len(tries) > 1:
        t = total_with([kv for changes in tries for kv in changes])
        out.append(f"all of these together: about {t:.1f} GB" + fits(t))
    else:
        t = est["total_gb"] if not tries else total_with(tries[0])
    bigger = [n for n, g in est["gpus"].items() if g["fits"] and (gpu_mem is None or g["memory_gb"] > gpu_mem)]
    if bigger:
        out.append(f"or, as it is, a larger GPU: {', '.join(bigger)}")
    if gpu_mem is not None and t > gpu_mem:
        out.append(f"or a smaller base model: even with these changes it needs more than {gpu_name}'s {gpu_mem:g} GB")
    return out


def gpu_source(est: dict) -> str:
    """Which card an estimate is for, in words: this machine's, or the one model.gpu names."""
    return "this machine's GPU" if est.get("gpu_here") else "the card model.gpu names, not this machine"


def format_estimate(est: dict) -> str:
    """The estimate as a small readable table."""
    lines = [f"Memory estimate for {est['model']} ({est['params_total'] / 1e6:.1f}M parameters, "
             f"{est['quant_mode']}, {est['tokens_per_step']} tokens per micro-batch):"]
    for k, v in est["parts_gb"].items():
        if k != "dora_weight" or est["parts_bytes"][k]:  # DoRA's temporaries: only with lora.use_dora
            lines.append(f"  {k:<16} {v:9.3f} GB")
    lines.append(f"  {'total':<16} {est['total_gb']:9.3f} GB")
    a = est["activations_gb"]
    lines.append(f"  activations: {a['without_checkpointing']:.3f} GB without gradient checkpointing, "
                 f"{a['with_checkpointing']:.3f} GB with it")
    if est["gpu"]:
        verdict = "fits" if est["fits"] else "does NOT fit"
        lines.append(f"  estimate: {verdict} on {est['gpu']} ({est['gpu_memory_gb']} GB), {gpu_source(est)}")
    lines.append("  fits on other cards (estimate): "
                 + ", ".join(f"{n}: {'yes' if g['fits'] else 'no'}" for n, g in est["gpus"].items()))
    m = est.get("multi_gpu")
    if m:
        lines.append(f"  on {m['gpus']} GPUs, per GPU: DDP {m['ddp_gb_per_gpu']:.3f} GB (a full copy each; torchrun), "
                     f"FSDP {m['fsdp_gb_per_gpu']:.3f} GB (sharded; configs/accelerate_fsdp_qlora.yaml)")
    for s in est["suggestions"]:
        lines.append(f"  suggestion: {s}")
    return "\n".join(lines)
