"""One stage run's context: the run's folders, its configuration and the machine it runs on, resolved once.

    from lib.context import open_run
    ctx = open_run("demo", "evaluate", overrides=["eval.max_examples=8"])
    ctx.cfg, ctx.paths, ctx.device, ctx.compute_dtype, ctx.attn_implementation

Every stage after prepare starts here instead of re-deriving these itself: the configuration is
config.yaml with the stage's overrides applied (lib/config.py's one "None keeps" rule), the device,
compute dtype and attention kernel are resolved once (lib/loading.py's rules), and the loaders are
handed `ctx.device` so that nothing below asks again. A missing config.yaml names the notebook to run
first (lib/stages.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import apply_overrides, load_config
from .loading import attn_implementation, compute_dtype_name, device_info
from .paths import RunPaths, require, run_paths
from .settings import RunConfig


@dataclass(frozen=True)
class RunContext:
    run: str
    stage: str  # the stage (a name of lib/stages.py) or reader (chat) this context serves
    paths: RunPaths
    cfg: RunConfig
    device: dict  # lib.loading.device_info(): device type, GPU name, compute capability, memory
    compute_dtype: str  # quant.compute_dtype resolved for this device
    attn_implementation: str  # model.attn_implementation resolved for this device and batching

    def describe(self) -> str:
        """One line: where and how this stage computes."""
        return (f"{self.stage} of run {self.run} on {self.device['name']} ({self.device['device']}), "
                f"{self.compute_dtype} compute, attention {self.attn_implementation}")


def open_run(run: str, stage: str, overrides=()) -> RunContext:
    """The context of `stage` on `run`: config.yaml with `overrides` applied, the device and precision resolved."""
    paths = run_paths(run)
    require(paths, "config")
    cfg = apply_overrides(load_config(paths.config), overrides or [])
    info = device_info()
    return RunContext(run, stage, paths, cfg, info, compute_dtype_name(cfg, info), attn_implementation(cfg, info))
