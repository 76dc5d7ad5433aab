"""What this process computes on: the device, its GPU's compute capability, and whether the CPU has
native bfloat16 arithmetic. Every dtype decision (lib.loading, lib.trainer_args) reads these.

    from lib.hardware import device_info, bf16_ok, cpu_bf16
    info = device_info()          # {"device": "cuda" | "cpu", "name", "capability", "memory_gb", "count", ...}
    bf16_ok(info)                 # a GPU of compute capability >= 8
    cpu_bf16()                    # the CPU has AVX512-BF16 or AMX-BF16 (detected, never guessed)
"""

from __future__ import annotations

import os

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
