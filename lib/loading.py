"""Every way a model is loaded, and where it is placed.

    from lib.loading import load_model_and_tokenizer, load_tuned_model, load_merged
    model, tokenizer = load_model_and_tokenizer(cfg)               # 4-bit base, ready for LoRA (02, 03)
    model, tokenizer = load_tuned_model(cfg, paths.adapter)         # 4-bit base + adapter, eval mode (04, chat)
    peft_model = load_16bit_with_adapter(cfg, paths.adapter)        # unquantized base + adapter (merge)
    model, tokenizer = load_merged(paths.merged)                    # a merged folder by path (merge, chat, export)

The compute dtype follows the hardware (lib/hardware.py): bf16 at CUDA compute capability >= 8, fp16
on older GPUs (a T4); on the CPU, where bitsandbytes runs NF4 too, bf16 for training where the CPU
has native bf16 (AVX512-BF16, AMX) and fp32 for everything else. The tiny and real-model caches
(lib.tiny, lib.realmodel) are reached through `lib.realmodel.resolve_model`.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
from pathlib import Path

from .attention import register as register_packed_sdpa
from .config import apply_overrides, hf_token
from .errors import ConfigError, SFTError, first_line
from .hardware import GIB, bf16_ok, device_info, fsdp_enabled  # noqa: F401 (device_info, bf16_ok: imported from here too)
from .realmodel import resolve_model
from .templates import apply_prompt_format, ensure_chat_template

logger = logging.getLogger(__name__)

ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Initialisations that move the principal part of each base weight into A and B (the base keeps the
# residual): their adapters are saved converted to a plain LoRA of the original base (save_adapter).
MUTATING_INITS = ("pissa", "olora")


# --------------------------------------------------------------------------------------------
# Hardware, dtypes and placement


def device_map(info: dict) -> dict | None:
    """The `device_map` of from_pretrained: the whole model on this process's GPU, or on the CPU; none
    under FSDP, which places (and shards) the weights itself after loading."""
    if fsdp_enabled():
        return None
    if info["device"] == "cuda":
        return {"": info["index"]}
    return {"": "cpu"}


def compute_dtype_name(cfg, info: dict | None = None, training: bool = False) -> str:
    """quant.compute_dtype resolved: bfloat16 at compute capability >= 8, float16 on older GPUs. On the CPU,
    float32, except in training on a CPU with native bfloat16 (hardware.cpu_bf16), where `auto` and an
    explicit bfloat16 train in bfloat16; evaluation, merging and the parity check stay float32 there."""
    info = info or device_info()
    if info["device"] != "cuda":
        wanted = cfg.quant.compute_dtype
        if not training:
            return "float32"
        if wanted == "auto":
            return "bfloat16" if info.get("cpu_bf16") else "float32"
        return wanted
    if cfg.quant.compute_dtype != "auto":
        return cfg.quant.compute_dtype
    return "bfloat16" if bf16_ok(info) else "float16"


def quant_storage_name(cfg, info: dict | None = None) -> str:
    """quant.quant_storage resolved: 'auto' is the compute dtype under FSDP (it shards float tensors of
    one dtype only), uint8 otherwise (bitsandbytes' default; the same bytes either way)."""
    if cfg.quant.quant_storage != "auto":
        return cfg.quant.quant_storage
    return compute_dtype_name(cfg, info) if fsdp_enabled() else "uint8"


def torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}[name]


def attn_implementation(cfg, info: dict | None = None) -> str:
    """model.attn_implementation resolved: 'auto' is flash_attention_2 where installed and supported, else sdpa."""
    info = info or device_info()
    want = cfg.model.attn_implementation
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if want == "auto":
        if has_flash and bf16_ok(info):
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
    if want == "sdpa" and cfg.train.batching in ("padding_free", "packing"):
        return register_packed_sdpa()  # sdpa per packed sequence: exact, and no (sum of lengths)^2 mask
    return want


def release() -> None:
    """Give the memory of models the caller dropped back (a notebook kernel lives on)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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


def load_model_config(cfg):
    """The base model's transformers config (a few KB; no weights)."""
    from transformers import AutoConfig

    name = resolve_model(cfg.model.name_or_path)
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=cfg.model.trust_remote_code, token=hf_token())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name_or_path: cannot load the config of '{cfg.model.name_or_path}' ({first_line(e)})") from None


def load_tokenizer(cfg, path: str | None = None):
    """The tokenizer of the base model (or of `path`), with a pad token and a chat template."""
    from transformers import AutoTokenizer

    name = path or resolve_model(cfg.model.name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.model.trust_remote_code, token=hf_token())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name_or_path: cannot load the tokenizer of '{name}' ({first_line(e)})") from None
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
