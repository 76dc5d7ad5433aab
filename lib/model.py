"""02: the QLoRA model: quantization, LoRA, attention, memory estimate, model summary.

    from lib.model import configure, estimate_memory, load_model_config, load_model_and_tokenizer
    est = estimate_memory(load_model_config(cfg), cfg)   # before any weight is loaded
    summary = configure("demo")                           # writes model/summary.json and config.yaml
    model, tokenizer = load_model_and_tokenizer(cfg)      # base model, quantized, ready for LoRA
    model = add_lora(model, cfg)                          # a peft model with trainable adapters

The compute dtype follows the hardware: bf16 at CUDA compute capability >= 8, fp16 on older
GPUs (a T4), fp32 on the CPU, where bitsandbytes runs NF4 too. Evaluation and merging call
`load_model_and_tokenizer(cfg, for_training=False)` (no k-bit training preparation, eval mode)
and `load_model_and_tokenizer(cfg, adapter=path)` for the base model with a trained adapter.

The memory estimate needs only the model's config: the model is built on the meta device
(no memory, no weights) to count every linear layer exactly, then each part is sized by hand:
4-bit weights and their quantization constants, the LoRA parameters, their gradients and
optimizer states, activations with and without gradient checkpointing, and the logits tiles of
TRL's fused LM head. It is compared with the chosen GPU, with suggestions when it does not fit.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
from pathlib import Path

from .config import load_config, save_config, set_value
from .errors import ConfigError
from .paths import require, run_paths
from .realmodel import resolve_model
from .tokenization import apply_prompt_format, ensure_chat_template

logger = logging.getLogger(__name__)


GIB = 1024**3
# Usable memory of the GPUs the estimate is compared with (GiB, as nvidia-smi shows them).
GPUS = {"T4": 15.0, "A100-40GB": 40.0, "A100-80GB": 80.0, "H100": 80.0}
ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
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
# Hardware and dtypes


def device_info() -> dict:
    """What this process trains on: device type, GPU name, compute capability, memory."""
    import torch

    if torch.cuda.is_available():
        idx = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
        props = torch.cuda.get_device_properties(idx)
        return {
            "device": "cuda",
            "index": idx,
            "name": props.name,
            "capability": list(torch.cuda.get_device_capability(idx)),
            "memory_gb": round(props.total_memory / GIB, 2),
            "count": torch.cuda.device_count(),
        }
    return {"device": "cpu", "name": "CPU", "capability": None, "memory_gb": None, "count": 0}


def _bf16_ok(info: dict) -> bool:
    return info["device"] == "cuda" and info["capability"][0] >= 8


def compute_dtype_name(cfg, info: dict | None = None) -> str:
    """quant.compute_dtype resolved: bfloat16 at compute capability >= 8, float16 on older GPUs, float32 on CPU."""
    info = info or device_info()
    if cfg.quant.compute_dtype != "auto":
        return cfg.quant.compute_dtype
    if info["device"] == "cuda":
        return "bfloat16" if _bf16_ok(info) else "float16"
    return "float32"


def precision(cfg, info: dict | None = None) -> str:
    """train.precision resolved to bf16, fp16 or fp32 (mixed precision of the trainer)."""
    info = info or device_info()
    p = cfg.train.precision
    if p == "auto":
        if info["device"] != "cuda":
            return "fp32"
        return "bf16" if _bf16_ok(info) else "fp16"
    if info["device"] == "cuda" and p == "bf16" and not _bf16_ok(info):
        raise ConfigError(
            f"train.precision: bf16 needs compute capability >= 8, but {info['name']} has "
            f"{'.'.join(map(str, info['capability']))}: use fp16 (or auto)"
        )
    if info["device"] != "cuda" and p == "fp16":
        raise ConfigError("train.precision: fp16 mixed precision needs a GPU; use fp32 (or auto) on the CPU")
    return p


def _torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def attn_implementation(cfg, info: dict | None = None) -> str:
    """model.attn_implementation resolved: 'auto' is flash_attention_2 where installed and supported, else sdpa."""
    info = info or device_info()
    want = cfg.model.attn_implementation
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if want == "auto":
        if has_flash and _bf16_ok(info):
            return "flash_attention_2"
        want = "sdpa"
    if want.startswith("flash_attention"):
        if not has_flash and want == "flash_attention_2":
            raise ConfigError(
                "model.attn_implementation: flash_attention_2 is not installed (pip install flash-attn "
                "--no-build-isolation, on an Ampere or newer GPU); use sdpa or auto"
            )
        if info["device"] != "cuda":
            raise ConfigError(f"model.attn_implementation: {want} needs a GPU; use sdpa on the CPU")
    elif want not in ("sdpa", "eager"):
        raise ConfigError(
            f"model.attn_implementation: '{want}' is not one of auto, sdpa, eager, flash_attention_2"
        )
    if want == "sdpa" and cfg.train.batching == "padding_free":
        from .attention import register

        return register()  # sdpa per packed sequence: exact, and no (sum of lengths)^2 mask
    return want


# --------------------------------------------------------------------------------------------
# Quantization and LoRA configuration


def quantization_config(cfg, info: dict | None = None):
    """The BitsAndBytesConfig of quant.mode: 4bit (NF4/FP4, double quantization), 8bit, or None."""
    from transformers import BitsAndBytesConfig

    mode = cfg.quant.mode
    if mode == "none":
        return None
    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if mode == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quant.quant_type,
            bnb_4bit_use_double_quant=cfg.quant.double_quant,
            bnb_4bit_compute_dtype=_torch_dtype(compute_dtype_name(cfg, info)),
            bnb_4bit_quant_storage="uint8",
        )
    raise ConfigError(f"quant.mode: '{mode}' is not one of 4bit, 8bit, none")


def target_modules(cfg):
    """lora.target_modules as peft wants it: 'all-linear', or a list of module names."""
    spec = cfg.lora.target_modules.strip()
    if spec.lower() in ("all-linear", "all_linear", "all"):
        return "all-linear"
    if spec.lower() in ("attention", "attn"):
        return list(ATTENTION_MODULES)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ConfigError("lora.target_modules: empty; use all-linear, attention, or module names")
    return names


def check_target_modules(cfg, model_config=None) -> None:
    """Raise ConfigError when a name in lora.target_modules is no linear layer of the base model.

    Uses the model's config only (layers built on the meta device), so a bad name is refused
    before any setting is saved or any weights load.
    """
    targets = target_modules(cfg)
    if targets == "all-linear":
        return
    linears, _total = _cached_layers(model_config or load_model_config(cfg), cfg.model.trust_remote_code)
    names = {n for n, *_ in linears} | {n.split(".")[-1] for n, *_ in linears} | {"lm_head"}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ConfigError(f"lora.target_modules: {', '.join(missing)} not in this model; its linear layers are "
                          f"{', '.join(sorted({n.split('.')[-1] for n, *_ in linears}))} (or use all-linear)")


def lora_config(cfg):
    """The peft LoraConfig of the run."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        bias=cfg.lora.bias,
        target_modules=target_modules(cfg),
        task_type="CAUSAL_LM",
    )


# --------------------------------------------------------------------------------------------
# Memory estimate from the config alone


def load_model_config(cfg):
    """The base model's transformers config (a few KB; no weights)."""
    from transformers import AutoConfig

    from .config import hf_token

    name = resolve_model(cfg.model.name_or_path)
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=cfg.model.trust_remote_code, token=hf_token())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name_or_path: cannot load the config of '{cfg.model.name_or_path}' ({_first_line(e)})") from None


def _first_line(e) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def _linear_layers(model_config, trust_remote_code=False):
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


def _cached_layers(model_config, trust_remote_code=False):
    key = (model_config.to_json_string(use_diff=False), trust_remote_code)
    if key not in _LAYER_CACHE:
        linears, _head, total = _linear_layers(model_config, trust_remote_code)
        _LAYER_CACHE.clear()  # one model at a time
        _LAYER_CACHE[key] = (linears, total)
    return _LAYER_CACHE[key]


def _match_targets(linears, targets) -> list:
    if targets == "all-linear":
        return list(linears)
    return [lin for lin in linears if lin[0].split(".")[-1] in targets or lin[0] in targets]


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


def _architecture(model_config) -> dict:
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


def estimate_memory(model_config, cfg, gpu: str | None = None, suggest: bool = True) -> dict:
    """Training memory per GPU from the model config alone (GiB), and whether it fits.

    Returns parts (weights, quantization constants, LoRA, gradients, optimizer, activations,
    logits, overhead), total, activations with and without checkpointing, the GPU compared with,
    a comparison with every known GPU, and suggestions when it does not fit.
    """
    info = device_info()
    arch = _architecture(model_config)
    linears, total_params = _cached_layers(model_config, cfg.model.trust_remote_code)
    quantized = sum(i * o for _, i, o in linears)
    other = total_params - quantized  # embeddings, norms, an untied LM head: kept in 16/32 bits
    targets = _match_targets(linears, target_modules(cfg))
    lora_params = sum(cfg.lora.r * (i + o) for _, i, o in targets)

    cdt = compute_dtype_name(cfg, info) if info["device"] == "cuda" else (
        cfg.quant.compute_dtype if cfg.quant.compute_dtype != "auto" else "bfloat16")
    # Without a GPU here, size for the GPU the estimate is compared with: 16-bit compute.
    act_bytes = 4 if cdt == "float32" else 2
    mode = cfg.quant.mode
    if mode == "4bit":
        weight_bytes = quantized * 0.5
        if cfg.quant.double_quant:
            const_bytes = quantized / BLOCKSIZE_4BIT * 1 + quantized / (BLOCKSIZE_4BIT * NESTED_BLOCKSIZE) * 4
        else:
            const_bytes = quantized / BLOCKSIZE_4BIT * 4
        other_bytes = other * 4  # prepare_model_for_kbit_training upcasts them to fp32
    elif mode == "8bit":
        weight_bytes = quantized * 1.0
        const_bytes = sum(o for _, _, o in linears) * 4  # one fp32 scale per output row
        other_bytes = other * 4
    else:
        weight_bytes = quantized * act_bytes
        const_bytes = 0
        other_bytes = other * act_bytes
    lora_bytes = lora_params * 4  # adapters train in fp32 (mixed precision keeps fp32 master weights)
    grad_bytes = lora_params * 4
    optim_bytes = lora_params * _optimizer_bytes_per_param(cfg.train.optim)

    tokens = cfg.train.per_device_train_batch_size * cfg.train.max_length
    per_tok_layer = activation_elements_per_token_layer(arch)
    lora_act = sum(i for _, i, _ in targets) if cfg.lora.dropout > 0 else 0  # dropout copies of the inputs
    lora_act += len(targets) * cfg.lora.r
    per_layer = per_tok_layer + lora_act / max(arch["num_layers"], 1)
    act_no_ckpt = tokens * arch["num_layers"] * per_layer * act_bytes
    # With checkpointing: each layer's input is kept, one layer at a time is recomputed in backward.
    act_ckpt = tokens * arch["num_layers"] * arch["hidden_size"] * act_bytes + tokens * per_layer * act_bytes
    activations = act_ckpt if cfg.model.gradient_checkpointing else act_no_ckpt
    # Fused LM head: one (tokens x vocab) tile in forward, recomputed in backward; plus the hidden states.
    logits = (min(tokens, LOGITS_TOKEN_CHUNK) * min(arch["vocab_size"], LOGITS_VOCAB_CHUNK) * act_bytes * 2
              + tokens * arch["hidden_size"] * 4)
    logits_unfused = tokens * arch["vocab_size"] * 4  # what a plain fp32 (tokens x vocab) logits tensor takes

    parts = {
        "weights": weight_bytes + other_bytes,
        "quant_constants": const_bytes,
        "lora": lora_bytes,
        "gradients": grad_bytes,
        "optimizer": optim_bytes,
        "activations": activations,
        "logits": logits,
    }
    subtotal = sum(parts.values())
    parts["overhead"] = CUDA_CONTEXT_GIB * GIB + FRAGMENTATION * subtotal
    total = subtotal + parts["overhead"]

    gpu_name, gpu_mem = _chosen_gpu(cfg, info, gpu)
    gb = {k: v / GIB for k, v in parts.items()}
    est = {
        "model": cfg.model.name_or_path,
        "architecture": arch,
        "params_total": total_params,
        "params_quantized": quantized if mode != "none" else 0,
        "params_unquantized": other if mode != "none" else total_params,
        "lora_params": lora_params,
        "lora_modules": len(targets),
        "quant_mode": mode,
        "activation_dtype": "float32" if act_bytes == 4 else "16-bit",
        "tokens_per_step": tokens,
        "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "parts_gb": {k: round(v, 4) for k, v in gb.items()},
        "total_gb": round(total / GIB, 3),
        "parts_bytes": {k: int(round(v)) for k, v in parts.items()},
        "total_bytes": int(round(total)),
        "activations_gb": {
            "with_checkpointing": round(act_ckpt / GIB, 4),
            "without_checkpointing": round(act_no_ckpt / GIB, 4),
        },
        "logits_unfused_gb": round(logits_unfused / GIB, 4),
        "gpu": gpu_name,
        "gpu_memory_gb": gpu_mem,
        "fits": None if gpu_mem is None else total / GIB <= gpu_mem,
        "gpus": {name: {"memory_gb": mem, "fits": total / GIB <= mem} for name, mem in GPUS.items()},
        "suggestions": [],
        "notes": ("Per GPU (each DDP process holds a full copy). Sequences assumed max_length long; "
                  "padding-free batches of shorter examples need less. Weights in "
                  + {"4bit": "4 bits (+ quantization constants), other parameters fp32",
                     "8bit": "8 bits, other parameters fp32", "none": "the compute dtype"}[mode] + "."),
    }
    if suggest and (est["fits"] is False or (gpu_mem is not None and total / GIB > 0.9 * gpu_mem)):
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


def _suggestions(model_config, cfg, est, gpu_name, gpu_mem) -> list[str]:
    """Changes that make it fit, each with the total it gives (estimated again, not guessed)."""
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

    def total_with(changes):
        c = copy.deepcopy(cfg)
        for k, v in changes:
            set_value(c, k, v)
        return estimate_memory(model_config, c, gpu=gpu_name, suggest=False)["total_gb"]

    out = []
    for changes in tries:
        t = total_with(changes)
        what = ", ".join(f"{k}={v}" for k, v in changes)
        fits = gpu_mem is not None and t <= gpu_mem
        out.append(f"set {what}: about {t:.1f} GB" + (" (fits)" if fits else ""))
    if len(tries) > 1:
        t = total_with([kv for changes in tries for kv in changes])
        fits = gpu_mem is not None and t <= gpu_mem
        out.append(f"all of these together: about {t:.1f} GB" + (" (fits)" if fits else ""))
    else:
        t = est["total_gb"] if not tries else total_with(tries[0])
    bigger = [n for n, g in est["gpus"].items() if g["fits"] and (gpu_mem is None or g["memory_gb"] > gpu_mem)]
    if bigger:
        out.append(f"or, as it is, a larger GPU: {', '.join(bigger)}")
    if gpu_mem is not None and t > gpu_mem:
        out.append(f"or a smaller base model: even with these changes it needs more than {gpu_name}'s {gpu_mem:g} GB")
    return out


def format_estimate(est: dict) -> str:
    """The estimate as a small readable table."""
    lines = [f"Memory estimate for {est['model']} ({est['params_total'] / 1e6:.1f}M parameters, "
             f"{est['quant_mode']}, {est['tokens_per_step']} tokens per micro-batch):"]
    for k, v in est["parts_gb"].items():
        lines.append(f"  {k:<16} {v:9.3f} GB")
    lines.append(f"  {'total':<16} {est['total_gb']:9.3f} GB")
    a = est["activations_gb"]
    lines.append(f"  activations: {a['without_checkpointing']:.3f} GB without gradient checkpointing, "
                 f"{a['with_checkpointing']:.3f} GB with it")
    if est["gpu"]:
        verdict = "fits" if est["fits"] else "does NOT fit"
        lines.append(f"  {verdict} on {est['gpu']} ({est['gpu_memory_gb']} GB)")
    lines.append("  " + ", ".join(f"{n}: {'yes' if g['fits'] else 'no'}" for n, g in est["gpus"].items()))
    for s in est["suggestions"]:
        lines.append(f"  suggestion: {s}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Loading


def _device_map(info: dict):
    if info["device"] == "cuda":
        return {"": info["index"]}
    return {"": "cpu"}


def load_tokenizer(cfg, path: str | None = None):
    """The tokenizer of the base model (or of `path`), with a pad token and a chat template."""
    from transformers import AutoTokenizer

    from .config import hf_token

    name = path or resolve_model(cfg.model.name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.model.trust_remote_code, token=hf_token())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name_or_path: cannot load the tokenizer of '{name}' ({_first_line(e)})") from None
    if tok.pad_token is None:
        # Labels are built explicitly (padding is -100), so eos as pad does not stop the model learning eos.
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    try:
        # The base model's tokenizer gets data.prompt_format; a saved adapter's keeps the template it was trained with.
        fmt = "auto" if path is not None else getattr(cfg.data, "prompt_format", "auto")
        if fmt == "auto" and ensure_chat_template(tok):
            logger.warning("%s has no chat template: using a plain one that ends each turn with eos", name)
        elif fmt != "auto":
            apply_prompt_format(tok, fmt)
    except ValueError as e:
        raise ConfigError(f"model.name_or_path: {e}") from None
    return tok


def load_model_and_tokenizer(cfg, for_training: bool = True, adapter=None):
    """The base model (quantized per quant.mode) and its tokenizer.

    for_training: prepare_model_for_kbit_training (frozen base, fp32 norms, gradient
    checkpointing if asked); otherwise eval mode. adapter: a folder with a trained peft adapter
    to load on top (trainable when for_training). Without an adapter, add one with add_lora().
    """
    import torch
    from transformers import AutoModelForCausalLM

    from .config import hf_token

    info = device_info()
    name = resolve_model(cfg.model.name_or_path)
    tokenizer = load_tokenizer(cfg)
    qconf = quantization_config(cfg, info)
    dtype = _torch_dtype(compute_dtype_name(cfg, info)) if info["device"] == "cuda" else torch.float32
    kwargs = dict(
        dtype=dtype,
        attn_implementation=attn_implementation(cfg, info),
        trust_remote_code=cfg.model.trust_remote_code,
        device_map=_device_map(info),
        token=hf_token(),
    )
    if qconf is not None:
        kwargs["quantization_config"] = qconf
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name_or_path: cannot load '{cfg.model.name_or_path}' ({_first_line(e)})") from None
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if for_training:
        keep_4bit_layout_for_training(model)
        gc_kwargs = {"use_reentrant": False}
        if qconf is not None:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=cfg.model.gradient_checkpointing,
                gradient_checkpointing_kwargs=gc_kwargs,
            )
        elif cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        if cfg.model.gradient_checkpointing:
            model.config.use_cache = False
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=for_training)
    if not for_training:
        model.eval()
    return model, tokenizer


def keep_4bit_layout_for_training(model) -> int:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, a Linear4bit run in eval mode without gradients (an evaluation
    during training) repacks its weights for a kernel that has no backward; training after that
    silently gets wrong gradients through the frozen base layers. Returns the layers changed.
    """
    n = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def add_lora(model, cfg):
    """Wrap the base model with the run's LoRA adapters (fp32 trainable weights)."""
    from peft import get_peft_model

    targets = target_modules(cfg)
    if targets != "all-linear":
        names = {n.split(".")[-1] for n, _ in model.named_modules()}
        missing = [t for t in targets if t not in names]
        if missing:
            import torch

            linear = sorted({n.split(".")[-1] for n, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear) or "Linear" in type(m).__name__}
                            - {"lm_head"})
            raise ConfigError(
                f"lora.target_modules: {', '.join(missing)} not in this model; its linear layers are "
                f"{', '.join(linear)} (or use all-linear)"
            )
    return get_peft_model(model, lora_config(cfg))  # peft's FutureWarning: silenced in lib/__init__.py


def parameter_counts(model) -> dict:
    """Trainable and total parameters (a 4-bit parameter counts as the weights it packs)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":  # packed: two 4-bit weights a byte
            qs = getattr(p, "quant_state", None)
            n = _prod(qs.shape) if qs is not None else n * 2
        total += n
        if p.requires_grad:
            trainable += n
    return {"trainable_params": trainable, "total_params": total,
            "trainable_percent": round(100.0 * trainable / max(total, 1), 4)}


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


# --------------------------------------------------------------------------------------------
# The stage


def update_config(run: str, overrides=()):
    """Load outputs/<run>/config.yaml, apply overrides (as from a notebook or --set), save it back.

    Every setting is checked (ranges, and what training will need: layer names, optimizer,
    scheduler...) before config.yaml is rewritten; a bad one leaves it as it was."""
    from .config import apply_overrides
    from .train import check_settings

    paths = run_paths(run)
    require(paths, "config")
    cfg = load_config(paths.config)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
        check_settings(cfg, paths)
        save_config(cfg, paths.config)
    return cfg


def build_summary(cfg, model, footprint: int, est: dict) -> dict:
    """What notebook 02 reports about a loaded model with its LoRA adapters."""
    import transformers

    info = device_info()
    counts = parameter_counts(model)
    lora_modules = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")})
    q = cfg.quant
    return {
        "model": cfg.model.name_or_path,
        "resolved_path": resolve_model(cfg.model.name_or_path),
        "architecture": type(model.get_base_model()).__name__,
        **counts,
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout, "bias": cfg.lora.bias,
                 "target_modules": lora_modules, "adapted_layers": est["lora_modules"]},
        "quantization": {"mode": q.mode, "quant_type": q.quant_type if q.mode == "4bit" else None,
                         "double_quant": q.double_quant if q.mode == "4bit" else None,
                         "compute_dtype": compute_dtype_name(cfg, info)},
        "precision": precision(cfg, info),
        "attn_implementation": attn_implementation(cfg, info),
        "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "device": info,
        "weights_footprint_gb": round(footprint / GIB, 6),
        "memory_estimate": est,
        "model_repr": repr(model.get_base_model()),
        "transformers_version": transformers.__version__,
    }


def write_summary(paths, cfg, model, footprint: int, model_config) -> dict:
    """Write model/summary.json for a loaded LoRA model (atomically)."""
    summary = build_summary(cfg, model, footprint, estimate_memory(model_config, cfg))
    if summary["trainable_params"] <= 0:
        raise ConfigError("the LoRA configuration leaves no trainable parameters: check lora.target_modules")
    paths.model_summary.parent.mkdir(parents=True, exist_ok=True)
    tmp = paths.model_summary.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    tmp.replace(paths.model_summary)
    return summary


def configure(run: str, overrides=()) -> dict:
    """02: apply and save overrides, load the quantized model with LoRA, write model/summary.json.

    Returns the summary: parameter counts, quantization, LoRA, the memory estimate, the model.
    """
    from transformers import set_seed

    paths = run_paths(run)
    cfg = update_config(run, overrides)
    model_config = load_model_config(cfg)
    estimate_memory(model_config, cfg)  # fails early (before loading weights) on a bad setting
    model, _tokenizer = load_model_and_tokenizer(cfg, for_training=True)
    footprint = model.get_memory_footprint()
    set_seed(cfg.train.seed)
    model = add_lora(model, cfg)
    summary = write_summary(paths, cfg, model, footprint, model_config)
    save_config(cfg, paths.config)
    del model
    return summary


def _quant_text(q: dict) -> str:
    if q["mode"] == "4bit":
        return (f"4-bit {q['quant_type'].upper()}{' + double quantization' if q['double_quant'] else ''}, "
                f"{q['compute_dtype']} compute")
    return f"{q['mode']}, {q['compute_dtype']} compute"


def model_table(summary: dict):
    """The summary's key facts as a two-column pandas DataFrame."""
    import pandas as pd

    est = summary["memory_estimate"]
    rows = [
        ("model", f"{summary['model']} ({summary['architecture']})"),
        ("device", summary["device"]["name"]),
        ("quantization", _quant_text(summary["quantization"])),
        ("training precision", summary["precision"]),
        ("attention", summary["attn_implementation"]),
        ("gradient checkpointing", summary["gradient_checkpointing"]),
        ("LoRA", f"r={summary['lora']['r']}, alpha={summary['lora']['alpha']}, dropout={summary['lora']['dropout']}, "
                 f"bias={summary['lora']['bias']}"),
        ("LoRA targets", f"{summary['lora']['adapted_layers']} layers: {','.join(summary['lora']['target_modules'])}"),
        ("trainable parameters", f"{summary['trainable_params']:,} ({summary['trainable_percent']:.3f}%)"),
        ("total parameters", f"{summary['total_params']:,}"),
        ("weights in memory", f"{summary['weights_footprint_gb']:.4f} GB"),
        ("estimated training memory", f"{est['total_gb']:.2f} GB" + (f" on {est['gpu']}" if est["gpu"] else "")),
    ]
    return pd.DataFrame(rows, columns=["", "value"]).set_index("")


def read_summary(run: str) -> dict:
    paths = run_paths(run)
    require(paths, "model_summary")
    return json.loads(Path(paths.model_summary).read_text(encoding="utf-8"))
