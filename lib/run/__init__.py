"""The shared core every stage stands on: a run's settings and folder, and the model and machine it runs on.

It imports no other folder of lib/. What is here: the configuration (`settings`: every key; `profiles`: the
presets; `config`: config.yaml made, overridden, validated, saved), the stage registry (`stages`), the
run directory (`paths`, `rundir`: locks, atomic installs, manifests), one stage run's context (`context`),
the errors (`errors`), how numbers read (`formatting`), the machine (`hardware`: device, dtype, attention
kernel; `attention`: the packed-sequence kernel), where a model's files come from (`tiny`, `realmodel`),
what training will accept of a configuration (`trainer_args`), the memory estimate (`memory`) and the
figures of a run (`figures`). These live here, not in a stage's folder, because prepare (01) already needs
them: the tokenizer's model, the check that training accepts the settings, the token-length figure.

Public steps (what the notebooks call):

    from lib.run import run_paths, load_config, num                       # every notebook
    from lib.run import load_model_config, estimate_memory, format_estimate   # 02: the memory estimate
"""

from lib.run.config import load_config
from lib.run.formatting import num
from lib.run.memory import estimate_memory, format_estimate
from lib.run.paths import run_paths
from lib.run.realmodel import load_model_config

__all__ = ["estimate_memory", "format_estimate", "load_config", "load_model_config", "num", "run_paths"]
