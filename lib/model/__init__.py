"""02 configure a QLoRA model: the 4-bit base, its LoRA adapters, the trainable parameters and memory.

Run by notebook 02_configure_qlora_model (the CLI's `train` checks the same settings). Every way a model is
loaded lives here (`loading`: 4-bit for training, base + adapter, 16-bit for merging, merged), and so does
generation (`generation`: settings, stop ids, batched answers, streaming) and what happens when memory
runs out (`oom`); `configure` is the stage: the model summary and the config.yaml update.

Public steps:

    from lib.model import configure, update_config, model_table      # the stage; settings into config.yaml
    from lib.model import load_model_and_tokenizer, with_lora         # the 4-bit base, then its adapters
    from lib.model import parameter_counts, adapted_table, write_summary
"""

from lib.model.configure import (
    adapted_table,
    configure,
    model_table,
    parameter_counts,
    update_config,
    with_lora,
    write_summary,
)
from lib.model.loading import load_model_and_tokenizer

__all__ = ["adapted_table", "configure", "load_model_and_tokenizer", "model_table", "parameter_counts",
           "update_config", "with_lora", "write_summary"]
