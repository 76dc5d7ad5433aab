"""02: the QLoRA model with its adapters: training precision, target-layer checks, the model summary.

    from lib.model.configure import configure, update_config, model_table
    cfg = update_config("demo", {"lora.r": 16})          # checks every setting, then saves config.yaml
    summary = configure("demo")                           # writes model/summary.json and config.yaml
    model_table(summary)                                  # the key facts as a table

Notebook 02 runs configure's steps one cell each: load_model_and_tokenizer (4-bit), with_lora,
write_summary.

Loading lives in lib/model/loading.py (4-bit for training, base + adapter, 16-bit for merging,
merged), the memory estimate in lib/run/memory.py; this module is stage 02 on top of them.
"""

from __future__ import annotations

from lib.model.loading import adapter_variant, add_lora, load_model_and_tokenizer
from lib.run.config import apply_overrides, load_config, save_config
from lib.run.context import trained_problem
from lib.run.errors import ConfigError
from lib.run.formatting import table
from lib.run.hardware import GIB, attn_implementation, compute_dtype_name, device_info
from lib.run.memory import estimate_memory, gpu_source
from lib.run.paths import require, run_paths
from lib.run.realmodel import load_model_config, resolve_model
from lib.run.rundir import write_json
from lib.run.trainer_args import check_settings, precision


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

    paths = run_paths(run)
    require(paths, "config")
    cfg = load_config(paths.config)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
        check_settings(cfg, paths)
        problem = trained_problem(paths, cfg)  # what `train --set` refuses, refused before config.yaml changes
        if problem:
            raise ConfigError(problem)
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
                 "target_modules": lora_modules, "adapted_layers": est["lora_modules"],
                 "variant": adapter_variant(cfg), "use_dora": cfg.lora.use_dora, "use_rslora": cfg.lora.use_rslora,
                 "init": cfg.lora.init, "loraplus_lr_ratio": cfg.lora.loraplus_lr_ratio},
        "quantization": {"mode": q.mode, "quant_type": q.quant_type if q.mode == "4bit" else None,
                         "double_quant": q.double_quant if q.mode == "4bit" else None,
                         "compute_dtype": compute_dtype_name(cfg, info, training=True)},
        "precision": precision(cfg, info),
        "attn_implementation": attn_implementation(cfg, info),
        "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "device": info,
        "weights_footprint_gb": round(footprint / GIB, 6),
        "memory_estimate": est,
        "model_repr": repr(model.get_base_model()),
        "adapted_modules": adapted_modules(model),
        "transformers_version": transformers.__version__,
    }


def write_summary(paths, cfg, model, footprint: int, model_config) -> dict:
    """Write model/summary.json for a loaded LoRA model (atomically)."""
    summary = build_summary(cfg, model, footprint, estimate_memory(model_config, cfg))
    if summary["trainable_params"] <= 0:
        raise ConfigError("the LoRA configuration leaves no trainable parameters: check lora.target_modules")
    write_json(paths.model_summary, summary)
    return summary


def with_lora(model, cfg):
    """The model with the run's LoRA adapters, initialised from train.seed: notebook 02 shows the adapters
    training starts from."""
    from transformers import set_seed

    set_seed(cfg.train.seed)
    return add_lora(model, cfg)


def configure(run: str, overrides=()) -> dict:
    """02, the steps of notebook 02 in one call: apply and save overrides, load the quantized model, attach
    LoRA, write model/summary.json.

    Returns the summary: parameter counts, quantization, LoRA, the memory estimate, the model.
    """
    paths = run_paths(run)
    cfg = update_config(run, overrides)
    model_config = load_model_config(cfg)
    estimate_memory(model_config, cfg)  # fails early (before loading weights) on a bad setting
    model, _tokenizer = load_model_and_tokenizer(cfg, for_training=True)
    footprint = model.get_memory_footprint()
    model = with_lora(model, cfg)
    summary = write_summary(paths, cfg, model, footprint, model_config)
    save_config(cfg, paths.config)
    del model
    return summary


def _quant_text(q: dict) -> str:
    if q["mode"] == "4bit":
        return (f"4-bit {q['quant_type'].upper()}{' + double quantization' if q['double_quant'] else ''}, "
                f"{q['compute_dtype']} compute")
    return f"{q['mode']}, {q['compute_dtype']} compute"


# What each attention implementation is, in a word (notebook 02's table; model.attn_implementation).
ATTENTION_WORDS = {"sdpa": "PyTorch's scaled dot-product attention",
                   "sdpa_packed": "PyTorch's sdpa run on each example of a padding-free row (lib/run/attention.py; "
                                  "the sdpa setting with train.batching padding_free or packing)",
                   "eager": "plain matmul attention", "flash_attention_2": "flash attention 2",
                   "flash_attention_3": "flash attention 3"}


def adapted_modules(model) -> list[dict]:
    """One entry per adapted module type (q_proj, ...): how many layers, the base layer's class and shape
    (in x out), the rank, and the LoRA parameters they train together."""
    kinds: dict[str, dict] = {}
    for name, m in model.named_modules():
        if not hasattr(m, "lora_A") or not len(m.lora_A):
            continue
        base = m.get_base_layer()
        kind = kinds.setdefault(name.rsplit(".", 1)[-1], {
            "module": name.rsplit(".", 1)[-1], "count": 0, "layer": type(base).__name__, "shapes": set(),
            "rank": sorted({int(r) for r in m.r.values()}), "trainable_params": 0})
        kind["count"] += 1
        kind["shapes"].add(f"{getattr(base, 'in_features', '?')} x {getattr(base, 'out_features', '?')}")
        kind["trainable_params"] += sum(p.numel() for n, p in m.named_parameters() if p.requires_grad and "lora_" in n)
    return [{**k, "shapes": sorted(k["shapes"]), "rank": ", ".join(map(str, k["rank"]))} for k in kinds.values()]


def adapted_table(summary: dict):
    """model/summary.json's adapted modules as a table, one row per module type (instead of the model's repr)."""
    import pandas as pd

    rows = [{"module": k["module"], "layers": k["count"], "wraps": k["layer"], "shape (in x out)": ", ".join(k["shapes"]),
             "rank": k["rank"], "trainable parameters": k["trainable_params"]} for k in summary["adapted_modules"]]
    return table(pd.DataFrame(rows).set_index("module"))


def model_table(summary: dict):
    """The summary's key facts as a two-column table (lib.run.formatting.table: long names wrap, never cut)."""
    import pandas as pd

    est = summary["memory_estimate"]
    attn = summary["attn_implementation"]
    rows = [
        ("model", f"{summary['model']} ({summary['architecture']})"),
        ("device", summary["device"]["name"]),
        ("quantization", _quant_text(summary["quantization"])),
        ("training precision", summary["precision"]),
        ("attention", f"{attn}: {ATTENTION_WORDS.get(attn, attn)}"),
        ("gradient checkpointing", summary["gradient_checkpointing"]),
        ("LoRA", f"r={summary['lora']['r']}, alpha={summary['lora']['alpha']}, dropout={summary['lora']['dropout']}, "
                 f"bias={summary['lora']['bias']}"),
        ("adapter variant", summary["lora"].get("variant", "LoRA")),
        ("LoRA targets", f"{summary['lora']['adapted_layers']} layers: {','.join(summary['lora']['target_modules'])}"),
        ("trainable parameters", f"{summary['trainable_params']:,} ({summary['trainable_percent']:.3f}%)"),
        ("total parameters", f"{summary['total_params']:,}"),
        ("weights in memory", f"{summary['weights_footprint_gb']:.4f} GB"),
        ("estimated training memory", f"{est['total_gb']:.2f} GB (an estimate" + (
            f"; {'fits' if est['fits'] else 'does not fit'} on {est['gpu']}, {gpu_source(est)})" if est["gpu"] else ")")),
    ]
    return table(pd.DataFrame(rows, columns=["", "value"]).set_index(""))
