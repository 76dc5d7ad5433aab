"""The profiles: named presets of the whole configuration tree, each a set of differences from the
defaults of lib/run/settings.py (`SFT_PROFILE` or `--profile` chooses one).

    from lib.run.profiles import PROFILES
    PROFILES["smol"]["model.name_or_path"]     # 'HuggingFaceTB/SmolLM2-135M-Instruct'
"""

from __future__ import annotations

# Profiles: differences from the defaults above.
PROFILES: dict[str, dict[str, object]] = {
    # The offline tiny model on the CPU: NF4 with fp32 compute, a couple of epochs in seconds.
    "tiny": {
        "model.name_or_path": "tiny",
        "model.gpu": "T4",
        "quant.compute_dtype": "float32",
        "lora.r": 16,
        "lora.alpha": 32,
        "lora.dropout": 0.0,
        "train.num_train_epochs": 3.0,
        "train.learning_rate": 3e-3,
        "train.lr_scheduler_type": "cosine",
        "train.warmup_ratio": 0.05,
        "train.per_device_train_batch_size": 8,
        "train.gradient_accumulation_steps": 1,
        "train.max_length": 256,
        "train.logging_steps": 5,
        "train.eval_steps": 20,
        "train.save_steps": 20,
        "train.save_total_limit": 2,
        "train.precision": "fp32",
        "eval.generate_examples": 8,
        "eval.sample_prompts": 2,  # the tiny model's answers are noise: a token budget that only shows the feature
        "eval.sample_max_new_tokens": 8,
        "eval.general_examples": 8,
        "eval.general_max_new_tokens": 8,
        "generation.max_new_tokens": 48,
    },
    # A real pretrained instruct model on the CPU: SmolLM2-135M-Instruct (lib/run/realmodel.py), NF4 with
    # bf16 compute in training where the CPU has it (1.46x fp32, the same eval loss to 0.02%), else fp32. A pretrained model wants a ~10x lower learning rate than the random tiny one; small
    # batches give more updates per example. On the Socratic sample data (153 examples) 1.5 epochs
    # (59 steps, ~1.7 minutes on 2 CPU cores) take the greedy answers from 0% to 100% questions and
    # from 12% to 100% stopping on their own (measured; see README).
    "smol": {
        "model.name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "model.gpu": "T4",
        "quant.compute_dtype": "auto",  # bfloat16 in training where the CPU computes it natively
        "lora.r": 16,
        "lora.alpha": 32,
        "lora.dropout": 0.0,
        "train.num_train_epochs": 1.5,
        "train.learning_rate": 3e-4,
        "train.lr_scheduler_type": "cosine",
        "train.warmup_ratio": 0.05,
        "train.per_device_train_batch_size": 4,
        "train.gradient_accumulation_steps": 1,
        "train.max_length": 128,
        "train.logging_steps": 5,
        "train.eval_steps": 20,
        "train.save_steps": 20,
        "train.save_total_limit": 2,
        "train.precision": "fp32",
        "eval.general_examples": 16,  # the forgetting check: 16 prompts of every kind, ~2 minutes on 2 busy cores (20 s cached)
        "generation.max_new_tokens": 96,
        # The merged fp32 model differs from the NF4 base + adapter it is checked against by the NF4
        # rounding of a real model's weights (~5% perplexity here, the merged one being better); the
        # merge itself is exact (logits within 1e-4 of the unmerged adapter).
        "merge.tolerance": 0.1,
    },
    # A free Colab T4 (15 GB): a 0.5B instruct model, fp16, paged 8-bit AdamW, checkpointing.
    "t4": {
        "model.name_or_path": "Qwen/Qwen2.5-0.5B-Instruct",
        "model.gpu": "T4",
        "model.gradient_checkpointing": True,
        "quant.compute_dtype": "float16",
        "train.precision": "fp16",
        "train.optim": "paged_adamw_8bit",
        "train.per_device_train_batch_size": 4,
        "train.gradient_accumulation_steps": 4,
        "train.max_length": 1024,
    },
    # Ampere or newer (A100, H100): bf16, larger batches, flash attention when installed.
    "a100": {
        "model.name_or_path": "Qwen/Qwen2.5-1.5B-Instruct",
        "model.gpu": "A100-80GB",
        "model.attn_implementation": "auto",
        "quant.compute_dtype": "bfloat16",
        "train.precision": "bf16",
        "train.per_device_train_batch_size": 16,
        "train.gradient_accumulation_steps": 1,
        "train.max_length": 2048,
    },
}
PROFILES["ampere"] = PROFILES["a100"]
