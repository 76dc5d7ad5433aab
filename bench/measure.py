"""The measurements of the batching benchmark (the CLI is bench/throughput.py).

One length-skewed set of synthetic conversations (log-normal token lengths: many short, a long
tail cut at --max-length) and one model, loaded with the project's own loaders
(lib.model.configure.load_model_and_tokenizer + add_lora: 4-bit NF4 QLoRA) and stepped by the project's
trainer (lib.train.trainer's GuardedSFTTrainer with sft_config). Every setup runs full training steps
(forward, backward, gradient clipping, optimizer step) on the same examples (--steps batches, a
stratified sample of the lengths), alternating setup by setup within each round (ABCD ABCD ...,
who starts rotating by round), after one excluded warm-up step each; every round repeats the
same work and the table shows medians over the rounds. The batches come from
lib.train.trainer.build_collator:

  pad_max          every batch padded to max_length (the older scripts' baseline)
  pad_longest      padded to the longest sequence of the batch
  group_by_length  batches of similar lengths (transformers' LengthGroupedSampler order), then pad_longest
  padding_free     the batch concatenated into one row with position_ids (TRL), no padding at all
  packing          the round's examples packed into rows of max_length by TRL's best-fit decreasing
                   (pack_dataset, "bfd"), position_ids restarting at each example; the packed rows
                   are dealt into the same number of steps as the other setups, so a step holds about
                   as many tokens as theirs (TRL's trainer takes batch-size rows a step: with the same
                   per_device_train_batch_size, max_length/mean-length times more tokens a step, which
                   any setup gets by raising the batch size)

The exactness check runs one batch through every setup (eval mode, no dropout) and compares
the loss and every per-token log-probability with the padded batch of the same examples: a
difference would mean attention across packed examples.

Peak memory: on CUDA torch.cuda.max_memory_allocated over each setup's steps; on the CPU the
peak of torch's CPU allocator during a step, from the profiler's memory events (one extra
untimed step per setup, on its largest batch): what the step allocates on top of the weights
and optimizer state that live across steps. MFU (GPU): useful FLOPs of a LoRA step (forward
and activation gradients through every weight, weight gradients for the adapters only, causal
attention per example) over the GPU's peak 16-bit tensor-core FLOP/s. Results: bench/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import hashlib
import itertools
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/throughput.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

MODES = ["pad_max", "pad_longest", "group_by_length", "padding_free", "packing"]
BASELINE = "pad_max"
LABELS = {
    "pad_max": "pad to max_length (baseline)",
    "pad_longest": "pad to longest in batch",
    "group_by_length": "length-grouped + pad to longest",
    "padding_free": "padding-free (packed, position_ids)",
    "packing": "packed rows of max_length (TRL bfd), position_ids",
}
# transformers' LengthGroupedSampler sorts mega-batches of 50 batches (for data sets of >= 200 batches).
MEGA_BATCH_MULT = 50

# Random-initialised models of real architectures (shapes from the models' config.json; no download).
ARCHS: dict[str, dict] = {
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False),
}
# Peak dense 16-bit tensor-core TFLOP/s (fp16 on a T4, bf16 on the others), matched in the device name.
PEAK_TFLOPS = {"T4": 65.0, "A100": 312.0, "H100": 989.0, "H200": 989.0}
# Targets of issue 6, checked (and reported, not asserted) at the end.
CPU_TARGETS = {"vs_pad_max": 5.0, "vs_pad_longest": 1.5, "max_padding_share": 0.02}
GPU_TARGETS = {"vs_pad_max": 2.0, "memory_vs_pad_max": 0.7, "estimate_error": 0.15}


# --------------------------------------------------------------------------------------------
# Data: length-skewed synthetic conversations


def _words() -> list[str]:
    """Words of the project's sample data (so that the tiny tokenizer knows them)."""
    text = []
    for p in sorted((REPO_ROOT / "data" / "examples").glob("*")):
        if p.suffix in (".json", ".jsonl", ".csv", ".txt"):
            text.append(p.read_text(encoding="utf-8", errors="replace"))
    words = sorted(set(re.findall(r"[A-Za-z]{2,}", " ".join(text))))
    return words or "why what how does the a of evidence question answer".split()


def synthetic_conversations(n: int, tokenizer, median_tokens: float = 128, sigma: float = 1.0,
                            seed: int = 0) -> list[dict]:
    """n conversations whose token lengths are log-normal (median `median_tokens`, shape `sigma`).

    Lengths like instruction-tuning chat data: most examples short, a long tail (with the
    defaults, half under 128 tokens, one in ten over 460, about one in a hundred over 1024).
    A quarter have two user/assistant turns; answers take about 70% of the tokens.
    """
    rng = random.Random(seed)
    words = _words()
    sample = " ".join(rng.choice(words) for _ in range(400))
    tokens_per_word = len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / 400

    def text(n_tokens):
        return " ".join(rng.choice(words) for _ in range(max(2, round(n_tokens / tokens_per_word))))

    out = []
    for _ in range(n):
        total = max(24.0, rng.lognormvariate(math.log(median_tokens), sigma))
        turns = 2 if rng.random() < 0.25 else 1
        messages = []
        for _t in range(turns):
            share = total / turns - 6  # role and end-of-turn tokens
            messages.append({"role": "user", "content": text(0.3 * share)})
            messages.append({"role": "assistant", "content": text(0.7 * share)})
        out.append({"messages": messages})
    return out


def plan_batches(lengths: list[int], batch_size: int, steps: int, seed: int = 0) -> dict:
    """The batches every round trains on: {"grouped": [[idx, ...], ...], "sequential": [[idx, ...], ...]}.

    The pool is ordered the way transformers' LengthGroupedSampler orders a training set
    (shuffled, then mega-batches of 50 batches sorted by length), and `steps` of its batches are
    picked from the middle of `steps` equal strata of that order: a stratified sample of the
    length distribution. The grouped setup trains on those batches; every other setup on the
    same examples in the pool's own (random) order, batch_size at a time.
    """
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from lib.run.errors import ConfigError

    n_batches = len(lengths) // batch_size
    if n_batches < steps:
        raise ConfigError(f"--examples: {len(lengths)} examples make {n_batches} batches of {batch_size}, "
                          f"fewer than --steps {steps}")
    g = torch.Generator().manual_seed(seed)
    order = get_length_grouped_indices(lengths, batch_size, mega_batch_mult=MEGA_BATCH_MULT, generator=g)
    grouped = [order[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]
    picks = [int((i + 0.5) * n_batches / steps) for i in range(steps)]  # the middle of equal strata
    mine = [grouped[p] for p in picks]
    members = sorted(i for b in mine for i in b)
    sequential = [members[k * batch_size:(k + 1) * batch_size] for k in range(steps)]
    return {"grouped": mine, "sequential": sequential}


# --------------------------------------------------------------------------------------------
# Models


def arch_config(name: str, overrides: dict | None = None) -> dict:
    from lib.run.errors import ConfigError

    if name not in ARCHS:
        raise ConfigError(f"--arch: '{name}' is not one of {', '.join(ARCHS)}")
    d = dict(ARCHS[name])
    d.update(overrides or {})
    return d


def build_arch_model(name: str, overrides: dict | None = None) -> Path:
    """A random-initialised model of architecture `name` (bf16 safetensors) with the tiny tokenizer, cached.

    Nothing is downloaded: the shapes come from ARCHS, the tokenizer (2k tokens, a subset of any
    real vocabulary's ids) from lib.run.tiny. Built on the GPU when there is one (fast init).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lib.run.errors import ConfigError
    from lib.run.paths import cache_dir
    from lib.run.tiny import build_once, tiny_model_path

    d = arch_config(name, overrides)
    tiny = tiny_model_path()
    key = hashlib.sha256(json.dumps([d, tiny.name], sort_keys=True).encode()).hexdigest()[:10]
    target = cache_dir() / f"bench-{name}-{key}"
    if (target / "config.json").exists():
        return target
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    d = dict(d)
    model_type = d.pop("model_type")
    config = AutoConfig.for_model(model_type, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, **d)
    if config.vocab_size < len(tokenizer):
        raise ConfigError(f"--arch-set: vocab_size {config.vocab_size} is smaller than the tokenizer's {len(tokenizer)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def build(path):
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)

    return build_once(target, build)


def bench_config(opts):
    """The RunConfig of the benchmark: a profile, the model, and one micro-batch per optimizer step."""
    from lib.run.config import make_config
    from lib.run.hardware import device_info

    profile = opts.profile
    info = device_info()
    if profile is None:
        if info["device"] == "cuda":
            profile = "a100" if info["capability"][0] >= 8 else "t4"
        else:
            profile = "tiny"
    overrides = {"train.gradient_accumulation_steps": 1, "train.max_length": opts.max_length,
                 "train.eval_strategy": "no", "train.save_strategy": "no", "train.report_to": "none"}
    if opts.batch_size:
        overrides["train.per_device_train_batch_size"] = opts.batch_size
    if opts.model_path is not None:
        overrides["model.name_or_path"] = str(opts.model_path)
        overrides["model.gpu"] = "auto"
    return make_config(profile, run="bench", overrides=overrides)


class Bench:
    """The model, trainer and optimizer every setup shares (one copy of the weights).

    Only the trainer's public API: create_optimizer, get_batch_samples (the loss normaliser
    Trainer.train() passes), training_step(model, inputs, num_items_in_batch) and
    compute_loss_context_manager; accelerate's prepare() wraps the model and optimizer as
    Trainer.train() does (autocast and loss scaling).
    """

    def __init__(self, cfg, workdir):
        from transformers import set_seed

        from lib.model.loading import add_lora, load_model_and_tokenizer
        from lib.train.trainer import build_trainer
        from lib.train.training import encode_dataset

        self.cfg = cfg
        set_seed(cfg.train.seed)
        model, tokenizer = load_model_and_tokenizer(cfg, for_training=True)
        set_seed(cfg.train.seed)
        model = add_lora(model, cfg)
        self.tokenizer = tokenizer
        placeholder = encode_dataset(tokenizer, [{"messages": [{"role": "user", "content": "Hi"},
                                                               {"role": "assistant", "content": "Hello"}]}], None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The project's trainer (non-finite guard, fp32 adapters); batches come from build_collator.
            self.trainer = build_trainer(cfg, model, tokenizer, placeholder, output_dir=workdir)
        tr = self.trainer
        tr.create_optimizer()
        self.model, self.optimizer = tr.accelerator.prepare(tr.model, tr.optimizer)
        self.device = tr.args.device

    def num_items(self, batch):
        """The trained-token count Trainer.train() divides the summed loss by (one micro-batch per step)."""
        return self.trainer.get_batch_samples(iter([batch]), 1, self.device)[1]

    def step(self, batch, num_items=None):
        """One full training step; returns the loss (a tensor)."""
        tr = self.trainer
        if num_items is None:
            num_items = self.num_items(batch)
        loss = tr.training_step(self.model, dict(batch), num_items)
        if self.cfg.train.max_grad_norm and self.cfg.train.max_grad_norm > 0:
            tr.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.train.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def per_token_log_probs(self, batch):
        """Log-probabilities of the trained tokens, in example order (eval mode, no gradient)."""
        import torch

        inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        inputs["use_cache"] = False
        with torch.no_grad(), self.trainer.compute_loss_context_manager():
            out = self.model(**inputs, fused_lm_head=True)
        return out.log_probs[out.label_mask.bool()].float().cpu()


# --------------------------------------------------------------------------------------------
# Measurements


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def real_tokens(batch) -> tuple[int, int]:
    """(non-padding tokens, token slots) of a collated batch."""
    slots = batch["input_ids"].numel()
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum()), slots
    seq_lens = batch["cu_seq_lens_q"].diff()  # padding-free: one row, sequences back to back
    return int(seq_lens.sum()), slots


@contextlib.contextmanager
def _kineto_quiet():
    """Drop the profiler's own start/stop lines (written by C++ to stderr); keep anything else."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode("utf-8", "replace").splitlines(keepends=True):
                if not re.match(r"^(USDT|STAGE|INFO):\S* \S+ \d+:\d+ \S+\.cpp:\d+\]", line):
                    sys.stderr.write(line)


def cpu_step_peak_bytes(fn) -> int:
    """Peak bytes torch's CPU allocator holds during fn(), counting only what fn allocates.

    From the profiler's memory events (torch.profiler.profile(profile_memory=True), read from its
    public Chrome trace export): every allocation and free made while profiling, in time order;
    the weights and optimizer state allocated before are not counted.
    """
    from torch.profiler import ProfilerActivity, profile

    with _kineto_quiet(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory(prefix="bench-trace-") as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text(encoding="utf-8"))["traceEvents"]
    sizes = [e["args"]["Bytes"] for e in sorted(events, key=lambda e: e.get("ts", 0))
             if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]  # 0: CPU
    running = peak = 0
    for size in sizes:
        running += size
        peak = max(peak, running)
    return peak


def lora_step_flops(est: dict, lengths: list[int]) -> float:
    """Useful FLOPs of one QLoRA training step over sequences of `lengths` tokens (padding excluded).

    Per token: forward and activation gradients through every linear weight and the LM head
    (2 + 2 FLOPs per weight), the adapters' forward, activation and weight gradients (2 + 2 + 2
    per adapter weight). Attention: causal QK^T and PV, 2 L^2 heads head_dim per layer forward,
    twice that backward.
    """
    a = est["architecture"]
    base = est["params_quantized"] + a["hidden_size"] * a["vocab_size"]
    per_token = 4 * base + 6 * est["lora_params"]
    attn_fwd = 2 * a["num_heads"] * a["head_dim"] * a["num_layers"]
    return float(sum(n * per_token + 3 * attn_fwd * n * n for n in lengths))


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():
        if key in device_name.upper():
            return value
    return None


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}
    import importlib.metadata as md

    for name in ("transformers", "trl", "peft", "bitsandbytes"):
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            info[name] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


# --------------------------------------------------------------------------------------------
# The benchmark


def run_benchmark(opts, log=print) -> dict:
    """Run every setup side by side; return the results (printed by bench/throughput.py)."""
    import torch

    from lib.run.memory import estimate_memory
    from lib.run.realmodel import load_model_config

    if opts.threads:
        torch.set_num_threads(opts.threads)
    modes = list(dict.fromkeys(opts.modes))
    if BASELINE not in modes:
        modes.insert(0, BASELINE)
    opts.model_path = prepare_arch_model(opts, log)
    cfg = bench_config(opts)
    check_examples(opts, cfg)
    if cfg.train.batching not in modes:
        modes.append(cfg.train.batching)
    bench = make_bench(cfg)
    work = prepare_workload(bench, cfg, opts, modes)
    est = estimate_memory(load_model_config(cfg), cfg)
    log_setup(log, opts, cfg, bench.device, est, work, len(modes))
    timing = time_rounds(bench, work, modes, opts.rounds, log)
    peaks, memory_kind = peak_memory(bench, work, modes, timing["peaks"])
    exact = check_exactness(bench, work.features, work.plan["sequential"][0], work.collators, modes,
                            opts.tolerance, cfg)
    ptf = opts.peak_tflops or (peak_tflops(torch.cuda.get_device_name(bench.device))
                               if bench.device.type == "cuda" else None)
    rows = [result_row(m, cfg.train.batching, timing, peaks, work, est, exact, ptf) for m in modes]
    return assemble_result(opts, cfg, bench.device, rows, work, est, exact, timing, memory_kind, ptf)


def prepare_arch_model(opts, log) -> Path | None:
    """With --arch: the folder of the random-initialised model (built once); else None (the profile's model)."""
    if not opts.arch:
        return None
    overrides = dict(opts.arch_set or {})
    if opts.layers:
        overrides["num_hidden_layers"] = opts.layers
    log(f"building random-initialised {opts.arch} ({overrides or 'full size'}) ...")
    return build_arch_model(opts.arch, overrides)


def check_examples(opts, cfg) -> None:
    """--examples must make at least --steps batches."""
    from lib.run.errors import ConfigError

    bs = cfg.train.per_device_train_batch_size
    if opts.examples // bs < opts.steps:
        raise ConfigError(f"--examples: {opts.examples} examples make {opts.examples // bs} batches of {bs}, "
                          f"fewer than --steps {opts.steps}")


def make_bench(cfg) -> Bench:
    """The shared model and trainer; the trainer's output folder is a temporary one, removed at once."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        return Bench(cfg, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@dataclasses.dataclass
class Workload:
    """The examples every setup trains on, and each setup's collated batches."""

    features: list[dict]
    lengths: list[int]
    plan: dict
    collators: dict
    batches: dict
    data: dict

    def indices(self, mode: str) -> list[list[int]]:
        if mode == "packing":
            return self.plan["packed"]
        return self.plan["grouped" if mode == "group_by_length" else "sequential"]


def pack_examples(features: list[dict], idx: list[int], max_length: int) -> tuple[list[dict], list[list[int]]]:
    """TRL's best-fit-decreasing packing (what SFTTrainer does with packing=True) of features[idx]: the
    packed rows (input_ids, labels, seq_lengths) and the example indices of each row, in row order."""
    from datasets import Dataset
    from trl import pack_dataset

    ds = Dataset.from_dict({
        "input_ids": [features[i]["input_ids"] for i in idx], "labels": [features[i]["labels"] for i in idx],
        "example": [[i] * len(features[i]["input_ids"]) for i in idx]})  # packed alongside: who is where
    packs, members = [], []
    for r in pack_dataset(ds, max_length, "bfd"):
        starts = [0, *itertools.accumulate(r["seq_lengths"])][:-1]
        packs.append({k: r[k] for k in ("input_ids", "labels", "seq_lengths")})
        members.append([r["example"][s] for s in starts])
    return packs, members


def deal(n: int, parts: int) -> list[list[int]]:
    """0..n-1 in `parts` consecutive groups of near-equal size (fewer when n < parts)."""
    parts = max(1, min(parts, n))
    cuts = [round(k * n / parts) for k in range(parts + 1)]
    return [list(range(a, b)) for a, b in zip(cuts, cuts[1:])]


def prepare_workload(bench, cfg, opts, modes) -> Workload:
    """Synthetic conversations, encoded; the batch plan; every setup's collator and batches."""
    from lib.train.trainer import build_collator
    from lib.train.training import encode_dataset

    max_length = cfg.train.max_length
    examples = synthetic_conversations(opts.examples, bench.tokenizer, opts.median_length, opts.sigma, opts.seed)
    ds = encode_dataset(bench.tokenizer, examples, max_length)
    features = [{"input_ids": ids, "labels": lab} for ids, lab in zip(ds["input_ids"], ds["labels"])]
    lengths = [len(f["input_ids"]) for f in features]
    plan = plan_batches(lengths, cfg.train.per_device_train_batch_size, opts.steps, opts.seed)
    collators = {}
    for mode in set(modes) | {"pad_longest"}:
        c = copy.deepcopy(cfg)
        c.train.batching = mode
        collators[mode] = build_collator(c, bench.tokenizer)
    work = Workload(features, lengths, plan, collators, {}, {})
    packed_batches = []
    if "packing" in modes:  # the same examples, packed, dealt into as many steps as the others take
        packs, members = pack_examples(features, sorted(i for b in plan["sequential"] for i in b), max_length)
        groups = deal(len(packs), len(plan["sequential"]))
        plan["packed"] = [[i for j in g for i in members[j]] for g in groups]
        packed_batches = [collators["packing"]([packs[j] for j in g]) for g in groups]
    work.batches = {m: packed_batches if m == "packing" else [collators[m]([features[i] for i in b])
                                                                 for b in work.indices(m)] for m in modes}
    work.data = data_summary(lengths, plan, max_length, opts)
    return work


def data_summary(lengths, plan, max_length, opts) -> dict:
    """Token-length statistics of the generated conversations and of those trained on."""
    used_lengths = [lengths[i] for i in sorted(i for b in plan["sequential"] for i in b)]
    return {
        "examples": len(lengths), "examples_trained": len(used_lengths),
        "length_median": _median(lengths), "length_mean": round(statistics.mean(lengths), 1),
        "length_p90": sorted(lengths)[int(0.9 * (len(lengths) - 1))], "length_max": max(lengths),
        "truncated_share": round(sum(n >= max_length for n in lengths) / len(lengths), 4),
        "trained_length_mean": round(statistics.mean(used_lengths), 1),
        "trained_length_max": max(used_lengths),
        "distribution": f"log-normal, median {opts.median_length} tokens, sigma {opts.sigma}",
    }


def log_setup(log, opts, cfg, device, est, work, n_modes) -> None:
    data = work.data
    log(f"model: {cfg.model.name_or_path if not opts.arch else opts.arch} on {device.type}, "
        f"{est['params_total'] / 1e6:.1f}M parameters, 4-bit QLoRA r={cfg.lora.r} "
        f"({est['lora_params'] / 1e6:.2f}M trainable); batch {cfg.train.per_device_train_batch_size}, "
        f"max_length {cfg.train.max_length}; {opts.rounds} rounds x {opts.steps} steps x {n_modes} setups")
    log(f"data: {data['examples']} conversations, token length median {data['length_median']}, mean "
        f"{data['length_mean']}, p90 {data['length_p90']}, max {data['length_max']} "
        f"({100 * data['truncated_share']:.1f}% cut at max_length); each round trains on "
        f"{data['examples_trained']} of them (mean length {data['trained_length_mean']})")


def time_rounds(bench, work, modes, rounds, log) -> dict:
    """One excluded warm-up step per setup, then `rounds` rounds, setup by setup within each step.

    Returns {"times": {mode: [[step seconds] per round]}, "toks": {mode: [[real, slots] per round]},
    "peaks": {mode: CUDA peak bytes (0 on the CPU)}, "seconds": wall time of the rounds}.
    """
    device = bench.device
    items = {m: [bench.num_items(b) for b in work.batches[m]] for m in modes}  # outside the timed steps
    for m in modes:
        bench.step(work.batches[m][0], items[m][0])
    _sync(device)
    times = {m: [[] for _ in range(rounds)] for m in modes}
    toks = {m: [[0, 0] for _ in range(rounds)] for m in modes}
    peaks = {m: 0 for m in modes}
    started = time.perf_counter()
    for r in range(rounds):
        order = modes[r % len(modes):] + modes[:r % len(modes)]  # rotate who goes first
        for k in range(max(len(b) for b in work.batches.values())):
            for m in (m for m in order if k < len(work.batches[m])):  # packing may take fewer steps
                times[m][r].append(_timed_step(bench, work.batches[m][k], items[m][k], peaks, m))
                real, slots = real_tokens(work.batches[m][k])
                toks[m][r][0] += real
                toks[m][r][1] += slots
        log(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{m} {toks[m][r][0] / sum(times[m][r]):,.0f} tok/s" for m in modes))
    return {"times": times, "toks": toks, "peaks": peaks, "seconds": time.perf_counter() - started}


def _timed_step(bench, batch, num_items, peaks, mode) -> float:
    """Seconds of one training step; on CUDA, raises peaks[mode] to the step's peak allocated memory."""
    import torch

    device = bench.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    bench.step(batch, num_items)
    _sync(device)
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peaks[mode] = max(peaks[mode], torch.cuda.max_memory_allocated(device))
    return seconds


def peak_memory(bench, work, modes, cuda_peaks) -> tuple[dict, str]:
    """Peak bytes per setup and how they were measured (on the CPU: one extra untimed step each)."""
    if bench.device.type == "cuda":
        return dict(cuda_peaks), "torch.cuda.max_memory_allocated (weights, optimizer state and the step)"
    peaks = {}
    for m in modes:
        largest = max(work.batches[m], key=lambda b: b["input_ids"].numel())
        n = bench.num_items(largest)
        peaks[m] = cpu_step_peak_bytes(lambda b=largest, n=n: bench.step(b, n))
    return peaks, ("torch CPU allocator, peak during a step above the resident weights and optimizer "
                   "state (profiler memory events, on each setup's largest batch, untimed)")


def result_row(m, default_mode, timing, peaks, work, est, exact, ptf) -> dict:
    """One row of the table: medians over the rounds, padding, memory, FLOP/s and the loss difference."""
    times, toks = timing["times"], timing["toks"]
    rounds = range(len(times[m]))
    tps = [toks[m][r][0] / sum(times[m][r]) for r in rounds]
    base_tps = [toks[BASELINE][r][0] / sum(times[BASELINE][r]) for r in rounds]
    real = sum(t[0] for t in toks[m])
    slots = sum(t[1] for t in toks[m])
    flops = len(rounds) * sum(lora_step_flops(est, [work.lengths[i] for i in b]) for b in work.indices(m))
    total_time = sum(sum(t) for t in times[m])
    return {
        "setup": m,
        "label": LABELS[m],
        "default": m == default_mode,
        "tokens_per_s": round(_median(tps), 1),
        "vs_baseline": round(_median([t / b for t, b in zip(tps, base_tps)]), 3),
        "padding_share": round(1 - real / slots, 4),
        "peak_memory_mib": round(peaks[m] / 2**20, 2),
        "memory_vs_baseline": round(peaks[m] / peaks[BASELINE], 3) if peaks[BASELINE] else None,
        "step_s": round(_median([x for t in times[m] for x in t]), 4),
        "tokens_per_step": round(real / sum(len(t) for t in times[m]), 1),
        "tflops": round(flops / total_time / 1e12, 4),
        "mfu": round(flops / total_time / (ptf * 1e12), 4) if ptf else None,
        "loss_diff_vs_padded": exact["setups"][m]["loss_diff"],
        "tokens_per_s_rounds": [round(x, 1) for x in tps],
        "real_tokens": real,
        "token_slots": slots,
    }


def assemble_result(opts, cfg, device, rows, work, est, exact, timing, memory_kind, ptf) -> dict:
    """The whole result (what --out writes): settings, machine, rows, checks and targets."""
    import torch

    by = {row["setup"]: row for row in rows}
    result = {
        "date": datetime.date.today().isoformat(),
        "command": "python bench/throughput.py" + (" " + " ".join(opts.argv) if opts.argv else ""),
        "machine": machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": opts.arch or cfg.model.name_or_path,
        "arch_overrides": ({**(opts.arch_set or {}), **({"num_hidden_layers": opts.layers} if opts.layers else {})}
                           if opts.arch else None),
        "profile": cfg.profile,
        "settings": {"batch_size": cfg.train.per_device_train_batch_size, "max_length": cfg.train.max_length,
                     "rounds": opts.rounds, "steps": opts.steps,
                     "examples": opts.examples, "seed": opts.seed, "lora_r": cfg.lora.r,
                     "quant": f"{cfg.quant.mode} {cfg.quant.quant_type}", "optim": cfg.train.optim,
                     "gradient_checkpointing": cfg.model.gradient_checkpointing,
                     "attn_implementation": cfg.model.attn_implementation},
        "default_batching": cfg.train.batching,
        "fastest": max(rows, key=lambda x: x["tokens_per_s"])["setup"],
        "data": work.data,
        "memory_measure": memory_kind,
        "peak_tflops": ptf,
        "timed_seconds": round(timing["seconds"], 1),
        "exactness": exact,
        "results": rows,
        "memory_estimate": _estimate_check(est, by, device),
    }
    result["targets"] = _targets(result, by, cfg.train.batching, device)
    return result


def check_exactness(bench, features, idx, collators, modes, tolerance, cfg) -> dict:
    """Loss and per-token log-probabilities of one batch under every setup vs the padded batch."""
    if tolerance is None:
        from lib.run.hardware import compute_dtype_name

        tolerance = 1e-4 if compute_dtype_name(cfg) == "float32" else 2e-2
    batch = [features[i] for i in idx]
    bench.model.eval()
    try:
        ref = bench.per_token_log_probs(collators["pad_longest"](batch))
        out = {}
        for m in modes:
            if m == "packing":
                cur = _packed_log_probs(bench, features, idx, collators[m], cfg.train.max_length)
            else:
                cur = bench.per_token_log_probs(collators[m](batch))
            if cur.shape != ref.shape:
                out[m] = {"loss_diff": float("inf"), "max_token_diff": float("inf"), "ok": False}
                continue
            loss_diff = abs(float(-cur.mean()) - float(-ref.mean()))
            token_diff = float((cur - ref).abs().max())
            out[m] = {"loss_diff": loss_diff, "max_token_diff": token_diff, "ok": loss_diff <= tolerance}
    finally:
        bench.model.train()
    return {"tolerance": tolerance, "examples": len(batch), "trained_tokens": int(ref.numel()),
            "reference": "pad_longest", "setups": out, "ok": all(v["ok"] for v in out.values())}


def _packed_log_probs(bench, features, idx, collator, max_length):
    """Per-token log-probabilities of features[idx] packed by TRL's bfd into one batch, put back in idx order."""
    import torch

    packs, members = pack_examples(features, idx, max_length)
    flat = bench.per_token_log_probs(collator(packs))
    order = [i for m in members for i in m]
    counts = [sum(x != -100 for x in features[i]["labels"][1:]) for i in order]
    pieces = dict(zip(order, torch.split(flat, counts)))
    return torch.cat([pieces[i] for i in idx])


def _estimate_check(est, by, device) -> dict:
    out = {"estimate_gib": est["total_gb"], "parts_gib": est["parts_gb"], "gpu": est["gpu"]}
    if device.type != "cuda":
        out["note"] = ("not compared on the CPU: the estimate is for a GPU (weights, CUDA context, 16-bit "
                       "activations), the CPU figure is only the step's own allocations")
        return out
    import torch

    free, total = torch.cuda.mem_get_info(device)
    context = max(0, (total - free) - torch.cuda.memory_reserved(device))
    measured = by[BASELINE]["peak_memory_mib"] * 2**20
    out.update({
        "measured_pad_max_allocated_gib": round(measured / 2**30, 3),
        "measured_pad_max_with_context_gib": round((measured + context) / 2**30, 3),
        "cuda_context_gib": round(context / 2**30, 3),
        "error": round(est["total_gb"] / ((measured + context) / 2**30) - 1, 3),
        "note": "the estimate sizes max_length-long sequences, i.e. the pad_max setup; compared with its "
                "peak allocated memory plus the CUDA context",
    })
    return out


def _targets(result, by, default_mode, device) -> list[dict]:
    d = by[default_mode]
    out = []

    def add(name, value, target, ok):
        out.append({"target": name, "value": value, "goal": target, "met": bool(ok)})

    if device.type != "cuda":
        t = CPU_TARGETS
        add("default vs pad_max (real tokens/s)", d["vs_baseline"], f">= {t['vs_pad_max']}x",
            d["vs_baseline"] >= t["vs_pad_max"])
        if "pad_longest" in by:  # like x base: the median of the per-round ratios
            v = round(_median([a / b for a, b in zip(d["tokens_per_s_rounds"],
                                                     by["pad_longest"]["tokens_per_s_rounds"])]), 3)
            add("default vs pad_longest (real tokens/s)", v, f">= {t['vs_pad_longest']}x", v >= t["vs_pad_longest"])
        add("default padding share", d["padding_share"], f"<= {t['max_padding_share']:.0%}",
            d["padding_share"] <= t["max_padding_share"])
    else:
        t = GPU_TARGETS
        add("default vs pad_max (real tokens/s)", d["vs_baseline"], f">= {t['vs_pad_max']}x",
            d["vs_baseline"] >= t["vs_pad_max"])
        add("default peak memory vs pad_max", d["memory_vs_baseline"], f"<= {t['memory_vs_pad_max']}x",
            d["memory_vs_baseline"] is not None and d["memory_vs_baseline"] <= t["memory_vs_pad_max"])
        err = result["memory_estimate"].get("error")
        add("memory estimate vs measured pad_max peak", err, f"within {t['estimate_error']:.0%}",
            err is not None and abs(err) <= t["estimate_error"])
        add("MFU reported", d["mfu"], "a number", d["mfu"] is not None)
    add("default loss equals padded loss", result["exactness"]["setups"][default_mode]["loss_diff"],
        f"<= {result['exactness']['tolerance']:g}", result["exactness"]["setups"][default_mode]["ok"])
    return out
