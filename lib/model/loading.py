"""Every way a model is loaded, and where it is placed.

    from lib.model.loading import load_model_and_tokenizer, load_tuned_model, load_merged
    model, tokenizer = load_model_and_tokenizer(cfg)               # 4-bit base, ready for LoRA (02, 03)
    model, tokenizer = load_tuned_model(cfg, paths.adapter)         # 4-bit base + adapter, eval mode (04, chat)
    peft_model = load_16bit_with_adapter(cfg, paths.adapter)        # unquantized base + adapter (merge)
    model, tokenizer = load_merged(paths.merged)                    # a merged folder by path (merge, chat, export)

The compute dtype, the attention kernel and the placement follow the hardware (lib/run/hardware.py): bf16 at CUDA compute capability >= 8, fp16
on older GPUs (a T4); on the CPU, where bitsandbytes runs NF4 too, bf16 for training where the CPU
has native bf16 (AVX512-BF16, AMX) and fp32 for everything else. The tiny and real-model caches
(lib.run.tiny, lib.run.realmodel) are reached through `lib.run.realmodel.resolve_model`; the tokenizer through
lib/data/tokenizer.py.
"""

from __future__ import annotations

from pathlib import Path

from lib.data.tokenizer import load_tokenizer
from lib.run.config import apply_overrides
from lib.run.errors import ConfigError, SFTError, first_line
from lib.run.hardware import (
    attn_implementation,
    compute_dtype_name,
    device_info,
    device_map,
    fsdp_enabled,
    quant_storage_name,
    torch_dtype,
)
from lib.run.realmodel import hf_token, resolve_model
from lib.run.settings import target_modules

# Initialisations that move the principal part of each base weight into A and B (the base keeps the
# residual): their adapters are saved converted to a plain LoRA of the original base (save_adapter).
MUTATING_INITS = ("pissa", "olora")


# --------------------------------------------------------------------------------------------
# Quantization and LoRA configuration


def quantization_config(cfg, info: dict | None = None, training: bool = False):
    """The BitsAndBytesConfig of quant.mode: 4bit (NF4/FP4, double quantization), 8bit, or None; `training`:
    the compute dtype training uses (compute_dtype_name)."""
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
            bnb_4bit_compute_dtype=torch_dtype(compute_dtype_name(cfg, info, training)),
            bnb_4bit_quant_storage=quant_storage_name(cfg, info),
        )
    raise ConfigError(f"quant.mode: '{mode}' is not one of 4bit, 8bit, none")


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
        use_dora=cfg.lora.use_dora,
        use_rslora=cfg.lora.use_rslora,
        # loftq: peft's own LoftQ code needs CUDA and ignores the scaling; loftq_initialise replaces B=0 after.
        init_lora_weights=cfg.lora.init if cfg.lora.init in MUTATING_INITS else True,
    )


def adapter_variant(cfg) -> str:
    """The adapter variant in words: 'LoRA', or e.g. 'DoRA, rsLoRA, OLoRA init, LoRA+ (B lr x16)'."""
    lo = cfg.lora
    parts = ["DoRA" if lo.use_dora else "LoRA"]
    if lo.use_rslora:
        parts.append("rsLoRA (alpha/sqrt(r))")
    if lo.init != "default":
        parts.append({"pissa": "PiSSA", "olora": "OLoRA", "loftq": "LoftQ"}[lo.init] + " init")
    if lo.loraplus_lr_ratio is not None:
        parts.append(f"LoRA+ (B learning rate x{lo.loraplus_lr_ratio:g})")
    return ", ".join(parts)


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
    model = get_peft_model(model, lora_config(cfg))  # peft's FutureWarning: silenced in lib/__init__.py
    if cfg.lora.init == "loftq":
        loftq_initialise(model, resolve_model(cfg.model.name_or_path))
    return model


def loftq_initialise(peft_model, model_path: str, adapter: str = "default") -> int:
    """LoftQ on a bitsandbytes 4-bit base: A and B start as the best rank-r approximation (SVD) of the
    quantization error W - dequant(Q(W)), divided by the LoRA scaling, so that at the start the
    quantized base plus the adapter is as close to the original weights as rank r allows.

    peft's replace_lora_weights_loftq does the same, but on CUDA only (its device is hard-coded) and
    without the scaling (peft issue #1982: exact only at alpha/r = 1); this follows it, reading the
    original weights with peft's loader, on any device. Returns the layers initialised.
    """
    import bitsandbytes as bnb
    import torch
    from peft.tuners.lora import Linear4bit
    from peft.utils.loftq_utils import _SafetensorLoader

    local = model_path if Path(model_path).is_dir() else None
    loader = _SafetensorLoader(peft_model, local)
    prefix, n = "base_model.model.", 0
    for name, module in peft_model.named_modules():
        if not isinstance(module, Linear4bit) or adapter not in module.lora_A:
            continue
        weight = loader.get_tensor(name[len(prefix):] + ".weight").to(module.weight.device, torch.float32)
        quantized = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        u, s, vh = torch.linalg.svd(weight - quantized, full_matrices=False)
        r = module.r[adapter]
        root = torch.sqrt(s[:r])
        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        with torch.no_grad():
            a.copy_((root[:, None] * vh[:r]).to(a.dtype))
            b.copy_((u[:, :r] * root[None, :] / module.scaling[adapter]).to(b.dtype))
        n += 1
    if n == 0:
        raise ConfigError("lora.init=loftq: no 4-bit LoRA layer found (LoftQ needs quant.mode=4bit)")
    return n


# --------------------------------------------------------------------------------------------
# Config and tokenizer


# --------------------------------------------------------------------------------------------
# Models


def _pretrained_kwargs(cfg, info: dict, qconf) -> dict:
    import torch

    dtype = torch_dtype(compute_dtype_name(cfg, info)) if info["device"] == "cuda" else torch.float32
    if fsdp_enabled() and qconf is not None and cfg.quant.mode == "4bit":
        dtype = torch_dtype(quant_storage_name(cfg, info))  # one float dtype throughout: FSDP flattens them together
    kwargs = dict(
        dtype=dtype,
        attn_implementation=attn_implementation(cfg, info),
        trust_remote_code=cfg.model.trust_remote_code,
        device_map=device_map(info),
        token=hf_token(),
    )
    if qconf is not None:
        kwargs["quantization_config"] = qconf
    return kwargs


def _prepare_for_training(model, cfg, quantized: bool):
    """Frozen base, fp32 norms and gradient checkpointing (peft's k-bit preparation when quantized)."""
    keep_4bit_layout_for_training(model)
    gc_kwargs = {"use_reentrant": False}
    if quantized and fsdp_enabled():
        # peft's k-bit preparation upcasts norms and embeddings to fp32: FSDP could no longer flatten a
        # layer's parameters (4-bit weights stored in the compute dtype) into one tensor. Freeze only.
        for p in model.parameters():
            p.requires_grad_(False)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
            model.enable_input_require_grads()
    elif quantized:
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
    return model


def load_model_and_tokenizer(cfg, for_training: bool = True, adapter=None, info: dict | None = None):
    """The base model (quantized per quant.mode) and its tokenizer.

    for_training: prepare_model_for_kbit_training (frozen base, fp32 norms, gradient
    checkpointing if asked); otherwise eval mode. adapter: a folder with a trained peft adapter
    to load on top (trainable when for_training). Without an adapter, add one with add_lora().
    info: the device (device_info(), as a stage's RunContext holds it); resolved here if not given.
    """
    from transformers import AutoModelForCausalLM

    info = info or device_info()
    name = resolve_model(cfg.model.name_or_path)
    tokenizer = load_tokenizer(cfg)
    qconf = quantization_config(cfg, info, training=for_training)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **_pretrained_kwargs(cfg, info, qconf))
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name_or_path: cannot load '{cfg.model.name_or_path}' ({first_line(e)})") from None
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if for_training:
        model = _prepare_for_training(model, cfg, qconf is not None)
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


def load_tuned_model(cfg, adapter_dir, info: dict | None = None):
    """The base model of `cfg` (quantized as configured) with the adapter of `adapter_dir` on top, in
    eval mode, and the tokenizer training saved beside the adapter (the base's if none was saved)."""
    saved = None
    if (Path(adapter_dir) / "tokenizer_config.json").exists():  # checked first: it fails fast
        try:
            saved = load_tokenizer(cfg, path=str(adapter_dir))
        except ConfigError:  # the message would blame model.name_or_path: the adapter folder is at fault
            files = sorted(p.name for p in Path(adapter_dir).iterdir()
                           if p.name.startswith(("tokenizer", "vocab", "merges", "special")))
            raise SFTError(
                f"{adapter_dir}: the tokenizer saved with the adapter cannot be loaded (tokenizer files there: "
                f"{', '.join(files)}): they are incomplete or damaged; train again (--retrain), or copy the "
                "tokenizer files training saved back into it") from None
    model, tokenizer = load_model_and_tokenizer(cfg, for_training=False, adapter=adapter_dir, info=info)
    tokenizer = saved if saved is not None else tokenizer
    model.eval()
    return model, tokenizer


def load_16bit_with_adapter(cfg, adapter_dir, info: dict | None = None):
    """The run's base model unquantized (the compute dtype on a GPU: bf16, or fp16 on a T4; fp32 on
    the CPU) with the adapter on top, unmerged.

    A LoftQ adapter (lora.init=loftq) was made to correct the 4-bit weights: its base is the 4-bit
    model dequantized (what training saw, exactly), not the original weights it would correct twice.
    """
    if cfg.lora.init != "loftq":
        model, _ = load_model_and_tokenizer(apply_overrides(cfg, ["quant.mode=none"]), for_training=False,
                                            adapter=str(adapter_dir), info=info)
        return model
    from peft import PeftModel

    info = info or device_info()
    base, _ = load_model_and_tokenizer(cfg, for_training=False, info=info)
    base = base.dequantize(dtype=torch_dtype(compute_dtype_name(cfg, info)) if info["device"] == "cuda" else None)
    base.is_loaded_in_4bit = False  # transformers' dequantize leaves the flag set
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    return model


def load_merged(path, info: dict | None = None):
    """A merged model folder loaded by path, as any user would: (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto", device_map=device_map(info or device_info()))
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(path))
