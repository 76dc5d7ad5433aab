"""Where the time of a training step goes: the torch profiler over steps of the smol profile.

    python bench/profile_step.py                          # SmolLM2, NF4, the project's defaults, 3 steps of 4
    python bench/profile_step.py --setup project_fp32 --steps 3

The model, trainer and batches are the project's own (bench.measure.Bench: lib's loaders, LoRA and
GuardedSFTTrainer; lib.train.trainer.build_collator's padding-free batches of the prepared Socratic data).
One warm-up step, then `--steps` profiled steps. The table gives, per cost, the CPU time of the
operators that make it (each operator's total, children included, so a cost counts once) as a
share of the profiled steps' wall time:

  LM head + loss          TRL's fused LM head (ChunkedLogProbFunction: the 49k-vocabulary projection,
                          log-softmax and its backward), forward and backward
  4-bit layers            bitsandbytes' MatMul4Bit, forward and backward: dequantizing the NF4 weights
                          to the compute dtype (reported as a part) and the matrix products
  attention               scaled_dot_product_attention, forward and backward
  optimizer               AdamW's step over the LoRA weights (and zero_grad)
  LoRA and other matmuls  every other matrix product (the adapters' A and B, forward and backward)
  other                   the rest: norms, activations, rotary embeddings, casts, the autograd engine
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.vs_trl import PROFILE, PROJECT_SETUPS, RUN, common_overrides, prepare_data  # noqa: E402

# cost -> parts of the operator names that make it (the first cost that matches an operator takes it).
COSTS = {
    "LM head + loss": ("ChunkedLogProbFunction",),
    "4-bit layers (dequantize + matmul)": ("MatMul4Bit",),
    "attention": ("ScaledDotProduct", "scaled_dot_product"),
    "optimizer": ("Optimizer.step", "Optimizer.zero_grad"),
    "LoRA and other matmuls": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "MmBackward", "AddmmBackward"),
}
DEQUANTIZE = ("dequantize_4bit", "dequantize_blockwise")  # inside the 4-bit layers; reported as a part of them


def batches(bench, cfg, n: int, batch_size: int) -> list:
    from lib.data.readers import read_examples
    from lib.run.paths import run_paths
    from lib.train.trainer import build_collator
    from lib.train.training import encode_dataset

    path = run_paths(RUN).train_data
    features = encode_dataset(bench.tokenizer, read_examples(path), cfg.train.max_length, path)
    collate = build_collator(cfg, bench.tokenizer)
    return [collate([features[i] for i in range(k * batch_size, (k + 1) * batch_size)]) for k in range(n)]


def _cost_of(name: str) -> str | None:
    return next((cost for cost, parts in COSTS.items() if any(p in name for p in parts)), None)


def _union(spans) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def cost_table(events, wall_us: float) -> list[tuple[str, float, float]]:
    """[(cost, seconds, share of wall)] from the profiler's events. An operator inside another counted one
    (a matmul inside the LM head, a dequantize inside a 4-bit layer) counts once, for the outer one."""
    spans = sorted(((e.time_range.start, e.time_range.end, _cost_of(e.name)) for e in events if _cost_of(e.name)),
                   key=lambda s: (s[0], -s[1]))
    totals = dict.fromkeys(COSTS, 0.0)
    end = float("-inf")
    for start, stop, cost in spans:  # outermost first: a span inside a counted one is skipped
        if stop > end:
            totals[cost] += stop - max(start, end)
            end = stop
    out = [(cost, t / 1e6, t / wall_us) for cost, t in totals.items()]
    deq = _union((e.time_range.start, e.time_range.end) for e in events if any(d in e.name for d in DEQUANTIZE))
    out.insert(2, ("  of which 4-bit dequantize", deq / 1e6, deq / wall_us))
    counted = sum(totals.values())
    out.append(("other (norms, activations, rotary, casts, autograd)", max(0.0, wall_us - counted) / 1e6,
                max(0.0, 1 - counted / wall_us)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Profile training steps of the smol profile.")
    p.add_argument("--setup", default="project", choices=list(PROJECT_SETUPS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--top", type=int, default=15, help="also print the top operators by self time")
    opts = p.parse_args(argv)
    opts.examples = (opts.steps + 1) * opts.batch_size
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch
    import transformers
    from torch.profiler import ProfilerActivity, profile

    from bench.measure import Bench, _kineto_quiet
    from lib.run.config import make_config
    from lib.run.hardware import compute_dtype_name
    from lib.run.trainer_args import precision

    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="profile-outputs-") as outputs:
        os.environ["SFT_OUTPUTS_DIR"] = outputs
        prepare_data(opts, print)
        cfg = make_config(PROFILE, run=RUN, overrides={**common_overrides(opts), **PROJECT_SETUPS[opts.setup]})
        bench = Bench(cfg, str(Path(outputs) / "trainer"))
        work = batches(bench, cfg, opts.steps + 1, opts.batch_size)
    bench.step(work[0])  # warm-up
    tokens = sum(int(b["input_ids"].numel()) for b in work[1:])
    started = time.perf_counter()
    with _kineto_quiet(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in work[1:]:
            bench.step(batch)
    wall = time.perf_counter() - started
    print(f"\n{opts.setup}: {compute_dtype_name(cfg, training=True)} compute, {precision(cfg)} autocast, "
          f"{torch.get_num_threads()} threads; {opts.steps} steps, {tokens} tokens, {wall:.2f} s "
          f"({wall / opts.steps:.2f} s a step; profiler overhead included)\n")
    print("| cost | s | share of the step |\n|---|---:|---:|")
    for cost, seconds, share in cost_table(prof.events(), wall * 1e6):
        print(f"| {cost} | {seconds:.2f} | {100 * share:.0f}% |")
    if opts.top:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=opts.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
