"""QLoRA supervised fine-tuning, one module per pipeline stage.

    python -m lib pipeline --run demo --data data/examples/socratic_questions.jsonl --profile tiny

Stages: data (01), model (02), train (03), evaluate (04), plots (05), merge and chat (06).
Shared: config (RunConfig and profiles), paths (run directories), tiny (the offline tiny model),
realmodel (SmolLM2 offline, GGUF files as input; resolve_model), summary (the before/after summary).
"""

__version__ = "0.1.0"


def _drop_kernels_noise(record) -> bool:
    return "kernels-community" not in record.getMessage()


def _quiet_bitsandbytes() -> None:
    """bitsandbytes warns on import (CPUs with AVX512-BF16) that the optional `kernels` package is
    missing; it falls back to its own kernel, so the message is noise. Installed here, before any
    `import transformers` can import bitsandbytes."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_kernels_noise)


_quiet_bitsandbytes()


def _quiet_library_deprecations() -> None:
    """peft reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model; the
    FutureWarning is addressed to peft, not to users of this project."""
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


_quiet_library_deprecations()
