"""Out of memory: batches that back off by themselves, and one clear stop when nothing smaller is left.

    from lib.model.oom import in_batches, out_of_memory
    rows = in_batches(score, examples, batch_size=8, what="perplexity (tuned)")   # halves the batch on OOM
    with out_of_memory("evaluation", cfg, run="demo"):                           # OutOfMemoryError (exit 3)
        ...

`in_batches` runs a function over consecutive batches; on an out-of-memory error it frees the cache,
halves the batch and retries the same examples, down to a batch of 1 (then the error goes on, marked
with what was running). The results are those of running with the smaller batch from the start.

`out_of_memory` turns any out-of-memory error of a stage into OutOfMemoryError, whose message names the
stage and what it was doing, the measured peak against the card's memory (torch.cuda), the three
settings most likely to make this run fit (ranked by the memory estimate, lib/run/memory.py) and the
checkpoint that was kept.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

from lib.run.errors import ConfigError, OutOfMemoryError
from lib.run.hardware import GIB, release
from lib.run.memory import changes_to_try, ranked_changes
from lib.run.realmodel import load_model_config

logger = logging.getLogger(__name__)

# Messages of out-of-memory errors that torch does not raise as torch.OutOfMemoryError.
OOM_MESSAGES = ("CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "out of memory", "can't allocate memory",
                "Cannot allocate memory", "not enough memory")


def is_oom(e: BaseException) -> bool:
    """An out-of-memory error of torch (CUDA, or another accelerator's, or the CPU allocator's)."""
    import torch

    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):  # MemoryError: Python's, the CPU's memory
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in OOM_MESSAGES)


def in_batches(run_batch, items: list, batch_size: int, what: str = "batch", progress=None) -> list:
    """run_batch(batch) -> a list of one result per item, over consecutive batches of `items`; on out of
    memory the batch is halved and the same items retried, down to 1. Returns the results in order.

    progress: a tqdm bar counting items (optional)."""
    out: list = []
    i, size = 0, max(1, batch_size)
    while i < len(items):
        batch = items[i:i + size]
        try:
            results = run_batch(batch)
        except Exception as e:
            if not is_oom(e):
                raise
            if size == 1:
                e.oom_doing = (f"{what}, a batch of 1" + (f" (backed off from {batch_size})" if batch_size > 1 else ""))
                raise
            size = max(1, size // 2)
            release()
            logger.warning("%s: out of memory with a batch of %d; retrying with %d", what, len(batch), size)
            continue
        out.extend(results)
        i += len(batch)
        if progress is not None:
            progress.update(len(batch))
    return out


def memory_figures() -> str:
    """The measured peak against the card's memory, or why they are unavailable."""
    import torch

    if not torch.cuda.is_available():
        return f"peak and card memory unavailable (no CUDA device in this process); the machine's memory: {ram()}"
    idx = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(idx)
    peak = torch.cuda.max_memory_allocated(idx) / GIB
    reserved = torch.cuda.max_memory_reserved(idx) / GIB
    return (f"peak {peak:.2f} GiB allocated ({reserved:.2f} GiB reserved) of the {props.name}'s "
            f"{props.total_memory / GIB:.2f} GiB")


def ram() -> str:
    """'3.1 GiB available of 16.0 GiB' (Linux), or why unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = dict(line.split(":", 1) for line in f)
        kib = {k: int(v.split()[0]) for k, v in info.items() if k in ("MemAvailable", "MemTotal")}
        return f"{kib['MemAvailable'] / 2**20:.1f} GiB available of {kib['MemTotal'] / 2**20:.1f} GiB"
    except (OSError, ValueError, KeyError):
        return "available memory unknown"


def stage_out_of_memory(e: BaseException, command: str, run: str) -> OutOfMemoryError | None:
    """The one-line OutOfMemoryError for memory that ran out outside a stage's own out_of_memory block
    (e.g. the CPU's while preparing data or exporting); None for any other error."""
    if not is_oom(e):
        return None
    release()
    return OutOfMemoryError(f"out of memory in {command}: {memory_figures()}. Nothing was installed: the run's "
                            f"earlier results are kept. Free memory (close other programs, restart a notebook's "
                            f"kernel) or use a machine with more, then rerun: python -m lib {command} --run {run}")


def _fmt(changes, total=None) -> str:
    text = ", ".join(f"{k}={v}" for k, v in changes)
    return text + (f" (estimate {total:.1f} GB)" if total is not None else "")


def training_fixes(cfg, evaluating: bool = False) -> list[str]:
    """The three settings most likely to make this run's training fit, ranked by the memory estimate."""
    out = []
    if evaluating and cfg.train.per_device_eval_batch_size > 1:
        out.append(_fmt([("train.per_device_eval_batch_size", cfg.train.per_device_eval_batch_size // 2)]))
    try:
        ranked = ranked_changes(load_model_config(cfg), cfg)
    except (ConfigError, OSError, ValueError, KeyError, AttributeError):  # no config to estimate from
        ranked = [(c, None) for c in changes_to_try(cfg)]
    out += [_fmt(changes, total) for changes, total in ranked]
    return out[:3]


def inference_fixes(cfg, stage: str, run: str | None) -> list[str]:
    """Settings that make evaluation or the merge check fit when even a batch of 1 does not."""
    out = []
    if stage == "merge":
        out.append(f"merge on the CPU, where the 16-bit base fits in RAM: `CUDA_VISIBLE_DEVICES= python -m lib merge "
                   f"--run {run or cfg.run}`")
    out.append(f"train.max_length={max(1, cfg.train.max_length // 2)} (examples and prompts are cut to it; "
               f"now {cfg.train.max_length})")
    if stage == "evaluation":
        out.append(f"generation.max_new_tokens={max(1, cfg.generation.max_new_tokens // 2)} "
                   f"(now {cfg.generation.max_new_tokens}), or eval.generate_examples=0")
    if cfg.quant.mode != "4bit" and stage != "merge":
        out.append("quant.mode=4bit")
    if cfg.model.attn_implementation == "eager":
        out.append("model.attn_implementation=sdpa (eager attention keeps the whole attention matrix)")
    return out[:3]


def oom_message(stage: str, doing: str, fixes: list[str] | None = None, kept: str | None = None) -> str:
    """The one message of an out-of-memory stop (see the module docstring)."""
    msg = f"out of memory in {stage}, {doing}: {memory_figures()}."
    if fixes:
        msg += " Most likely to make this run fit: " + "; ".join(f"({i}) {f}" for i, f in enumerate(fixes, 1)) + "."
    else:
        msg += (" Every memory setting of this run is already at its lowest: use a GPU with more memory, FSDP "
                "over several GPUs (configs/accelerate_fsdp_qlora.yaml), or a smaller base model.")
    if kept:
        msg += " " + kept
    return msg + " (In a notebook, restart the kernel to give the memory back before running again.)"


@contextmanager
def out_of_memory(stage: str, cfg, doing=None, kept=None, run: str | None = None):
    """Turn an out-of-memory error inside the block into OutOfMemoryError with the full message.

    doing: a string, or a callable giving one at the time of the error (what the stage was doing);
    kept: a callable giving the sentence about the checkpoint kept (training)."""
    try:
        yield
    except Exception as e:
        if not is_oom(e):
            raise
        where = getattr(e, "oom_doing", None) or (doing() if callable(doing) else doing) or "running"
        evaluating = "evaluat" in where
        fixes = (training_fixes(cfg, evaluating) if stage == "training" else inference_fixes(cfg, stage, run))
        message = oom_message(stage, where, fixes, kept() if callable(kept) else kept)
    else:
        return
    release()
    raise OutOfMemoryError(message) from None
