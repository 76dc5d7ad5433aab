"""QLoRA supervised fine-tuning, a folder per pipeline stage over a shared core.

    python -m lib pipeline --run demo --data data/examples/socratic_questions.jsonl --profile tiny

Folders, in the pipeline's order (each imports only the ones before it): run (the shared core: settings,
config, the stage registry, the run directory, the machine, the model's files), data (01 prepare data),
model (02 configure the QLoRA model), train (03 train), evaluate (04 evaluate, 05 plot), ship (06 merge,
chat, export, push). On top: notebook.py (what the notebooks call first) and __main__.py (the CLI).
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
    """peft reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model, and older
    bitsandbytes (0.46, the lowest allowed) calls torch's deprecated `_check_is_size` at every 4-bit matmul on
    the CPU: the FutureWarnings are addressed to those libraries, not to users of this project."""
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*_check_is_size will be removed.*", category=FutureWarning)


_quiet_library_deprecations()
