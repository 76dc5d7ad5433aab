"""Notebook setup shared by the six notebooks (their cell 2).

    from lib.notebook import setup
    setup(mount_drive=False, seed=42)

In Colab it installs the project's pinned packages (never torch: Colab's CUDA build is kept) and,
if asked, mounts Google Drive and keeps the run directories there. Everywhere it seeds the random
generators, quiets library noise, and prints where the results go and on what hardware.
"""

from __future__ import annotations

import os
import subprocess
import sys

from .paths import REPO_ROOT, outputs_dir


def in_colab() -> bool:
    return "google.colab" in sys.modules


def quiet() -> None:
    """Hide messages that say nothing to a user (bitsandbytes' optional CPU kernels, tokenizer forks)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # bitsandbytes' noise: see lib/__init__.py


def _show_short_errors() -> None:
    """In IPython, show a bad-input error (SFTError) as its one-line message, not a traceback."""
    try:
        ip = get_ipython()  # type: ignore[name-defined]  # noqa: F821
    except NameError:
        return
    from .errors import SFTError

    def handler(shell, etype, value, tb, tb_offset=None):
        stb = [f"\x1b[31m{etype.__name__}: {value}\x1b[0m"]
        shell._showtraceback(etype, value, stb)  # an error output (the cell fails), without the traceback
        return stb

    ip.set_custom_exc((SFTError,), handler)
    # Figures from lib are built without pyplot; the inline backend makes a cell's Figure value show.
    ip.run_line_magic("matplotlib", "inline")


def setup(mount_drive: bool = False, seed: int = 42, install: bool = True) -> dict:
    quiet()
    _show_short_errors()
    if in_colab():
        if install:
            # The project's own dependency list; torch is already in Colab and satisfies it, so pip keeps it.
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", str(REPO_ROOT)], check=True)
        if mount_drive:
            from google.colab import drive  # type: ignore

            drive.mount("/content/drive")
            os.environ.setdefault("SFT_OUTPUTS_DIR", "/content/drive/MyDrive/qlora-notebooks/outputs")
    import torch
    from transformers import set_seed

    set_seed(seed)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    info = {"torch": torch.__version__, "device": device, "outputs": str(outputs_dir()),
            "profile": os.environ.get("SFT_PROFILE", "tiny")}
    print(f"torch {info['torch']} on {device}; runs in {info['outputs']}; default profile {info['profile']}")
    return info
