"""What this process computes on and how: the device, its GPU's compute capability, whether the CPU has
native bfloat16 arithmetic, and what follows from them: the compute dtype, the attention kernel and the
placement of weights. Every stage that loads a model (lib.model.loading, lib.run.trainer_args, lib.run.context) asks here.

    from lib.run.hardware import device_info, bf16_ok, cpu_bf16
    info = device_info()          # {"device": "cuda" | "cpu", "name", "capability", "memory_gb", "count", ...}
    bf16_ok(info)                 # a GPU of compute capability >= 8
    cpu_bf16()                    # the CPU has AVX512-BF16 or AMX-BF16 (detected, never guessed)
    compute_dtype_name(cfg, info, training=True)   # "bfloat16" | "float16" | "float32"
    attn_implementation(cfg, info)                 # "sdpa", "flash_attention_2", the packed-sdpa kernel, ...
"""

from __future__ import annotations

import gc
import importlib.util
import os

from lib.run.attention import register as register_packed_sdpa
from lib.run.errors import ConfigError

GIB = 1024**3


def cpu_bf16() -> bool:
    """The CPU multiplies bfloat16 natively: AVX512-BF16 or AMX tiles, as torch's CPU feature check
    (cpuinfo) reports them. SFT_CPU_BF16=0 or 1 overrides the check (tests, or a CPU it misreads)."""
    forced = os.environ.get("SFT_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(bool(getattr(torch.cpu, p)()) for p in probes if hasattr(torch.cpu, p))
    except RuntimeError:  # a torch build without the cpuinfo probes: no native bf16 known
        return False


def device_info() -> dict:
    """What this process runs on: device type, GPU name, compute capability, memory; on the CPU,
    whether it computes bfloat16 natively (cpu_bf16)."""
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
    return {"device": "cpu", "name": "CPU", "capability": None, "memory_gb": None, "count": 0,
            "cpu_bf16": cpu_bf16()}


def bf16_ok(info: dict) -> bool:
    """bf16 compute is supported: a GPU of compute capability >= 8."""
    return info["device"] == "cuda" and info["capability"][0] >= 8


def fsdp_enabled() -> bool:
    """This process was started by `accelerate launch` with an FSDP config (configs/accelerate_fsdp_qlora.yaml)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").strip().lower() in ("1", "true", "yes")

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
