"""Where the time of a training step goes: the torch profiler over steps of the smol profile.

    python bench/profile_step.py                          # SmolLM2, NF4, the project's defaults, 3 steps of 4
    python bench/profile_step.py --setup project_fp32 --steps 3

The model, trainer and batches are the project's own (bench.measure.Bench: lib's loaders, LoRA and
GuardedSFTTrainer; lib.trainer.build_collator's padding-free batches of the prepared Socratic data).
One warm-up step, then `--steps` profiled steps. The table gives, per cost, the CPU time of the
operators that make it (each operator's total, children included, so a cost counts once) as a
share of the profiled steps' wall time:

  LM head + loss      TRL's fused LM head (_ChunkedLogProbFunction: the 49k-vocabulary projection,
                      log-softmax and its backward), forward and backward
  4-bit dequantize    bitsandbytes turning NF4 weights into the compute dtype (forward and backward)
  matmul              every other matrix product (base weights after dequantization, LoRA A and B)
  attention           scaled_dot_product_attention, forward and backward
  optimizer           AdamW's step over the LoRA weights (and zero_grad)
  other               the rest: norms, activations, rotary embeddings, casts, the autograd engine
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

# cost -> operator names (prefix match) whose total time makes it; the first match wins.
COSTS = {
    "LM head + loss": ("_ChunkedLogProbFunction",),
    "4-bit dequantize": ("bitsandbytes::dequantize_4bit", "bitsandbytes::dequantize_blockwise"),
    "attention": ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product",
                  "ScaledDotProduct", "aten::_efficient_attention"),
    "optimizer": ("Optimizer.step", "Optimizer.zero_grad"),
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "MmBackward", "AddmmBackward"),
}


def batches(bench, cfg, n: int, batch_size: int) -> list:
    from lib.paths import run_paths
    from lib.readers import read_examples
    from lib.train import encode_dataset
    from lib.trainer import build_collator

    path = run_paths(RUN).train_data
    features = encode_dataset(bench.tokenizer, read_examples(path), cfg.train.max_length, path)
    collate = build_collator(cfg, bench.tokenizer)
    return [collate([features[i] for i in range(k * batch_size, (k + 1) * batch_size)]) for k in range(n)]


def cost_table(events, wall_us: float) -> list[tuple[str, float, float]]:
    """[(cost, seconds, share of wall)] from the profiler's events: each event is counted once, under the first
    cost whose operator it is, and not again for an enclosing operator of the same cost."""
    spans: dict[str, list[tuple[float, float]]] = {c: [] for c in COSTS}
    for e in events:
        for cost, names in COSTS.items():
            if e.name.startswith(names):
                spans[cost].append((e.time_range.start, e.time_range.end))
                break
    out, counted = [], 0.0
    for cost, ranges in spans.items():
        total, end = 0.0, -1.0
        for start, stop in sorted(ranges):  # union of the ranges: nested ops of a cost count once
            if stop <= end:
                continue
            total += stop - max(start, end)
            end = stop
        counted += total
        out.append((cost, total / 1e6, total / wall_us))
    out.append(("other", max(0.0, wall_us - counted) / 1e6, max(0.0, 1 - counted / wall_us)))
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
    from torch.profiler import ProfilerActivity, profile

    from bench.measure import Bench
    from lib.config import make_config
    from lib.loading import compute_dtype_name
    from lib.trainer_args import precision

    with tempfile.TemporaryDirectory(prefix="profile-outputs-") as outputs:
        os.environ["SFT_OUTPUTS_DIR"] = outputs
        prepare_data(opts, print)
        cfg = make_config(PROFILE, run=RUN, overrides={**common_overrides(opts), **PROJECT_SETUPS[opts.setup]})
        bench = Bench(cfg, str(Path(outputs) / "trainer"))
        work = batches(bench, cfg, opts.steps + 1, opts.batch_size)
    bench.step(work[0])  # warm-up
    tokens = sum(int(b["input_ids"].numel()) for b in work[1:])
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
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
