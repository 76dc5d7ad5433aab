"""The real-model benchmark: this project's training against plain TRL, on SmolLM2-135M-Instruct.

    python bench/vs_trl.py                              # ~8 min on 2 CPU cores: 4 setups, 2 rounds
    python bench/vs_trl.py --setups project trl_fastest --rounds 1
    python bench/vs_trl.py --setups all --out bench/vs_trl.json    # adds the precision setups

Every setup trains the same model (SmolLM2-135M-Instruct, 4-bit NF4 with double quantization, the
`smol` profile's LoRA: r 16, alpha 32, every linear layer) on the same prepared examples (the
Socratic sample data, `--examples` of them, one epoch of `--steps` steps of `--batch-size`), with
the same learning rate, max_length and seed:

  project                 this project as a user runs it: lib.train.training's steps with the smol profile
                          (padding-free batches, no activation checkpointing, quant.compute_dtype
                          and train.precision as `auto` resolves them on this machine)
  project_fp32            the same with float32 compute and no autocast (the profile before bf16)
  project_bf16_compute    the 4-bit base computes in bfloat16 (bitsandbytes' compute dtype), no autocast
  project_bf16_autocast   bfloat16 compute and bf16 autocast (train.precision bf16)
  trl_default             plain TRL as its documentation shows for conversational data: prompt /
                          completion messages, SFTTrainer(peft_config=LoraConfig(...)) on a model loaded
                          with BitsAndBytesConfig, SFTConfig defaults (activation checkpointing, padding
                          to the longest, bf16 where the CPU has it; use_cpu=True, which a CPU needs)
  trl_fastest             the same with TRL's fastest exact settings: padding_free=True, no checkpointing

Each (setup, round) trains in its own process (a clean peak RSS, no state shared), setups
alternating within a round (who starts rotates by round). Measured: the seconds of trainer.train()
(model loading and tokenizing excluded), the real (non-padding) tokens the trainer's batches held,
the process's peak resident memory (VmHWM: weights, activations and optimizer state), the mean
training loss over the steps and the last step's loss. The table shows medians over the rounds and
ratios to TRL's default and fastest setups. Results: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/vs_trl.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

PROFILE = "smol"
RUN = "vs-trl"
DEFAULT_SETUPS = ["project", "project_fp32", "trl_default", "trl_fastest"]
PROJECT_SETUPS = {
    "project": {},
    "project_fp32": {"quant.compute_dtype": "float32", "train.precision": "fp32"},
    "project_bf16_compute": {"quant.compute_dtype": "bfloat16", "train.precision": "fp32"},
    "project_bf16_autocast": {"quant.compute_dtype": "bfloat16", "train.precision": "bf16"},
}
TRL_SETUPS = {
    "trl_default": {},
    # TRL refuses max_length with padding_free and no packing: the examples are shorter than the
    # profile's max_length (checked in run_trl), so none is cut either way.
    "trl_fastest": {"padding_free": True, "gradient_checkpointing": False, "max_length": None},
}
ALL_SETUPS = [*PROJECT_SETUPS, *TRL_SETUPS]


# --------------------------------------------------------------------------------------------
# One setup, in its own process


def _counting(collator, counter: dict):
    """The collator, counting the real tokens of every batch it makes (attention_mask, else every token)."""
    def collate(features):
        batch = collator(features)
        mask = batch.get("attention_mask")
        counter["real_tokens"] += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        counter["slots"] += int(batch["input_ids"].numel())
        counter["batches"] += 1
        return batch

    return collate


def _timed_train(trainer) -> dict:
    counter = {"real_tokens": 0, "slots": 0, "batches": 0}
    trainer.data_collator = _counting(trainer.data_collator, counter)
    started = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - started
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {"train_s": seconds, **counter, "steps": trainer.state.global_step,
            "train_loss": output.training_loss, "last_loss": losses[-1] if losses else None}


def common_overrides(opts) -> dict:
    return {"train.max_steps": opts.steps, "train.per_device_train_batch_size": opts.batch_size,
            "train.gradient_accumulation_steps": 1, "train.eval_strategy": "no", "train.save_strategy": "no",
            "train.logging_steps": 1, "train.report_to": "none", "train.seed": opts.seed,
            "eval.sample_prompts": 0}  # answers during training: a cost of its own, not of a training step


def project_trainer(setup: str, opts):
    """The project's own training steps (lib.train.training), as `python -m lib train` wires them: (trainer, plan)."""
    from lib.train.training import attach_lora, build_datasets, build_sft_trainer, load_model, plan_training

    run = f"{RUN}-{setup}"  # a run of its own, prepared afresh: no setting left in config.yaml by another setup
    prepare_data(opts, lambda _: None, run)
    plan = plan_training(run, {**common_overrides(opts), **PROJECT_SETUPS[setup]}, retrain=True)
    model, tokenizer = load_model(plan)
    model = attach_lora(model, plan)
    train_ds, _ = build_datasets(plan, tokenizer)
    return build_sft_trainer(plan, model, tokenizer, train_ds, None), plan


def run_project(setup: str, opts) -> dict:
    from lib.run.hardware import compute_dtype_name
    from lib.run.trainer_args import precision

    trainer, plan = project_trainer(setup, opts)
    out = _timed_train(trainer)
    out["compute"] = f"{compute_dtype_name(plan.cfg, training=True)} compute, {precision(plan.cfg)} autocast"
    return out


def trl_dataset(path: Path, n: int):
    """The prepared examples as TRL's conversational prompt/completion records."""
    from datasets import Dataset

    from lib.data.readers import read_examples

    rows = []
    for ex in read_examples(path)[:n]:
        msgs = ex["messages"]
        rows.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
    return Dataset.from_list(rows)


def run_trl(setup: str, opts) -> dict:
    """Plain TRL: BitsAndBytesConfig, LoraConfig and SFTConfig, nothing of this project's training code."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from lib.run.config import make_config
    from lib.run.paths import run_paths
    from lib.run.realmodel import resolve_model

    cfg = make_config(PROFILE, run=RUN)
    name = resolve_model(cfg.model.name_or_path)
    with tempfile.TemporaryDirectory(prefix="vs-trl-") as tmp:
        args = SFTConfig(output_dir=tmp, use_cpu=True, report_to="none", max_steps=opts.steps,
                         per_device_train_batch_size=opts.batch_size, learning_rate=cfg.train.learning_rate,
                         **{"max_length": cfg.train.max_length, **TRL_SETUPS[setup]}, seed=opts.seed,
                         logging_steps=1, save_strategy="no")
        bf16 = args.bf16  # TRL's default here: True where the CPU has bf16
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32)
        model = AutoModelForCausalLM.from_pretrained(name, quantization_config=quant)
        tokenizer = AutoTokenizer.from_pretrained(name)
        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer, peft_config=lora,
                             train_dataset=trl_dataset(run_paths(RUN).train_data, opts.examples))
        longest = max(len(ids) for ids in trainer.train_dataset["input_ids"])
        if longest > cfg.train.max_length:
            raise RuntimeError(f"an example has {longest} tokens, more than max_length {cfg.train.max_length}: "
                               "the setups would not train the same tokens")
        out = _timed_train(trainer)
    out["compute"] = f"{'bfloat16' if bf16 else 'float32'} compute, {'bf16' if bf16 else 'fp32'} autocast"
    return out


def worker(setup: str, opts) -> dict:
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    out = run_project(setup, opts) if setup in PROJECT_SETUPS else run_trl(setup, opts)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["threads"] = torch.get_num_threads()
    return out


# --------------------------------------------------------------------------------------------
# The side-by-side run


def prepare_data(opts, log, run: str = RUN) -> None:
    import contextlib
    import io

    from lib.data.prepare import run_prepare

    data = REPO_ROOT / "data" / "examples" / "socratic_questions.jsonl"
    with contextlib.redirect_stdout(io.StringIO()):
        run_prepare(run, str(data), profile=PROFILE, overrides={"data.max_examples": opts.examples}, overwrite=True)
    log(f"prepared {opts.examples} examples of {data.name} into {os.environ['SFT_OUTPUTS_DIR']}/{run}")


def run_setup(setup: str, opts) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", setup, *opts.passthrough]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-15:])
        raise RuntimeError(f"setup {setup} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len("RESULT "):])


def run_rounds(opts, log) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {s: [] for s in opts.setups}
    for r in range(opts.rounds):
        order = opts.setups[r % len(opts.setups):] + opts.setups[:r % len(opts.setups)]
        for setup in order:
            res = run_setup(setup, opts)
            runs[setup].append(res)
            log(f"round {r + 1}/{opts.rounds} {setup:<22} {res['train_s']:6.1f} s  "
                f"{res['real_tokens'] / res['train_s']:6.1f} real tok/s  loss {res['train_loss']:.4f}  "
                f"peak {res['peak_rss_mib']:,.0f} MiB")
    return runs


def summarise(runs: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for setup, rs in runs.items():
        tps = [r["real_tokens"] / r["train_s"] for r in rs]
        rows.append({"setup": setup, "compute": rs[0]["compute"], "train_s": statistics.median(r["train_s"] for r in rs),
                     "real_tokens": rs[0]["real_tokens"], "padding_share": 1 - rs[0]["real_tokens"] / rs[0]["slots"],
                     "tokens_per_s": statistics.median(tps), "tokens_per_s_rounds": [round(x, 1) for x in tps],
                     "peak_rss_mib": max(r["peak_rss_mib"] for r in rs), "train_loss": rs[0]["train_loss"],
                     "last_loss": rs[0]["last_loss"], "steps": rs[0]["steps"]})
    for row in rows:
        for ref in TRL_SETUPS:
            if ref in runs:  # the median of the per-round ratios (each round's setups ran side by side)
                mine, theirs = runs[row["setup"]], runs[ref]
                ratios = [(a["real_tokens"] / a["train_s"]) / (b["real_tokens"] / b["train_s"])
                          for a, b in zip(mine, theirs)]
                row[f"x_{ref}"] = statistics.median(ratios)
    return rows


def format_table(rows: list[dict]) -> str:
    refs = [r for r in TRL_SETUPS if f"x_{r}" in rows[0]]
    head = ["setup", "compute", "train s", "real tok/s", *(f"x {r}" for r in refs), "padding", "peak RSS MiB",
            "mean loss", "last loss"]
    lines = [[r["setup"], r["compute"], f"{r['train_s']:.1f}", f"{r['tokens_per_s']:,.1f}",
              *(f"{r[f'x_{ref}']:.2f}x" for ref in refs), f"{100 * r['padding_share']:.1f}%",
              f"{r['peak_rss_mib']:,.0f}", f"{r['train_loss']:.4f}",
              "-" if r["last_loss"] is None else f"{r['last_loss']:.4f}"] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]

    def fmt(cells):
        return "| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ("-" if i < 2 else ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt(head), sep, *(fmt(c) for c in lines)])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="This project's training vs plain TRL on SmolLM2-135M-Instruct.")
    p.add_argument("--setups", nargs="+", default=DEFAULT_SETUPS, choices=[*ALL_SETUPS, "all"],
                   help=f"setups to compare (default: {' '.join(DEFAULT_SETUPS)}; all: also the precision ones)")
    p.add_argument("--rounds", type=int, default=2, help="rounds; the table shows medians over them")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per training")
    p.add_argument("--batch-size", type=int, default=4, help="examples per step")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    opts.argv = list(sys.argv[1:] if argv is None else argv)
    opts.setups = list(ALL_SETUPS if "all" in opts.setups else dict.fromkeys(opts.setups))
    opts.examples = opts.steps * opts.batch_size
    opts.passthrough = ["--steps", str(opts.steps), "--batch-size", str(opts.batch_size), "--seed", str(opts.seed),
                        *(["--threads", str(opts.threads)] if opts.threads else [])]
    for name in ("rounds", "steps", "batch_size"):
        if getattr(opts, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU benchmark: the loaders pick a visible GPU
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if opts.worker:
        print("RESULT " + json.dumps(worker(opts.worker, opts)), flush=True)
        return 0
    from bench.measure import machine

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vs-trl-outputs-") as outputs:
        os.environ["SFT_OUTPUTS_DIR"] = outputs
        prepare_data(opts, print)
        runs = run_rounds(opts, lambda s: print(s, flush=True))
    rows = summarise(runs)
    result = {"date": datetime.date.today().isoformat(), "command": "python bench/vs_trl.py " + " ".join(opts.argv),
              "machine": machine(), "settings": {k: getattr(opts, k) for k in ("steps", "batch_size", "examples",
                                                                                 "rounds", "seed", "setups")},
              "wall_s": round(time.perf_counter() - started, 1), "results": rows, "runs": runs}
    print()
    print(format_table(rows))
    print(f"\n{opts.examples} examples, {opts.steps} steps of {opts.batch_size}; medians over {opts.rounds} rounds; "
          f"x: median per-round ratio of real tokens/s; whole run {result['wall_s']:.0f} s")
    if opts.out:
        Path(opts.out).write_text(json.dumps(result, indent=2), encoding="utf-8")
        print(f"results: {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
