"""Beyond one GPU: DDP and FSDP-QLoRA through Accelerate (configs/), the FSDP loading recipe by value,
the combinations FSDP refuses, and the memory per GPU of each in the estimate.

FSDP itself cannot run here: accelerate refuses an FSDP plugin without an accelerator ("There are
currently no available devices found, must be one of 'XPU', 'CUDA', ..."), so on the CPU the launch
stops with one line; DDP under `accelerate launch` runs for real with 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from lib.run.config import make_config
from lib.run.errors import ConfigError
from lib.run.paths import REPO_ROOT, run_paths

A100 = {"device": "cuda", "index": 0, "name": "NVIDIA A100", "capability": [8, 0], "memory_gb": 80.0, "count": 2}
T4 = {"device": "cuda", "index": 1, "name": "Tesla T4", "capability": [7, 5], "memory_gb": 15.0, "count": 2}


@pytest.fixture()
def fsdp(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")


def test_the_shipped_fsdp_config_is_the_qlora_recipe():
    c = yaml.safe_load((REPO_ROOT / "configs" / "accelerate_fsdp_qlora.yaml").read_text())
    f = c["fsdp_config"]
    assert c["distributed_type"] == "FSDP" and f["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert f["fsdp_cpu_ram_efficient_loading"] is True and f["fsdp_sync_module_states"] is True
    assert f["fsdp_use_orig_params"] is False and f["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert yaml.safe_load((REPO_ROOT / "configs" / "accelerate_ddp.yaml").read_text())["distributed_type"] == "MULTI_GPU"


@pytest.mark.parametrize("info, dtype", [(A100, "bfloat16"), (T4, "float16")])
def test_under_fsdp_4bit_weights_are_stored_in_the_compute_dtype_without_device_map(fsdp, info, dtype):
    import torch

    from lib.model.loading import _pretrained_kwargs, quantization_config

    cfg = make_config("tiny", overrides={"quant.compute_dtype": "auto"})
    q = quantization_config(cfg, info)
    assert q.bnb_4bit_quant_storage == getattr(torch, dtype) == q.bnb_4bit_compute_dtype
    kw = _pretrained_kwargs(cfg, info, q)
    assert kw["device_map"] is None and kw["dtype"] == getattr(torch, dtype)  # one float dtype throughout


def test_without_fsdp_the_storage_stays_uint8_on_this_process_gpu(monkeypatch):
    import torch

    from lib.model.loading import _pretrained_kwargs, quantization_config

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    cfg = make_config("tiny", overrides={"quant.compute_dtype": "auto"})
    q = quantization_config(cfg, T4)
    assert q.bnb_4bit_quant_storage == torch.uint8 and q.bnb_4bit_compute_dtype == torch.float16
    assert _pretrained_kwargs(cfg, T4, q)["device_map"] == {"": 1}


def test_fsdp_loading_on_the_cpu_gives_one_dtype_and_a_frozen_base(fsdp, session_outputs):
    """The real tiny model loaded as under FSDP (the loading half runs on the CPU): NF4 weights stored as
    float32 (the CPU's compute dtype), every tensor float32 (no uint8 for FSDP to refuse), base frozen."""
    import torch

    from lib.model.loading import add_lora, load_model_and_tokenizer

    cfg = make_config("tiny", overrides={"model.gradient_checkpointing": True})
    model, _ = load_model_and_tokenizer(cfg, for_training=True)
    import bitsandbytes as bnb

    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears and all(m.weight.dtype == torch.float32 and m.weight.quant_state is not None for m in linears)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not any(p.requires_grad for p in model.parameters())
    model = add_lora(model, cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("overrides, info, words", [
    ({}, {"device": "cpu", "name": "CPU", "capability": None, "memory_gb": None, "count": 0},
     "FSDP (accelerate launch with an FSDP config) needs GPUs"),
    ({"quant.mode": "8bit"}, A100, "quant.mode=8bit and FSDP"),
    ({"quant.quant_storage": "uint8", "quant.compute_dtype": "auto"}, A100, "quant.quant_storage=uint8 and quant.compute_dtype=bfloat16 under FSDP"),
])
def test_fsdp_refuses_what_it_cannot_shard_in_one_line(fsdp, overrides, info, words):
    from lib.run.trainer_args import check_fsdp

    with pytest.raises(ConfigError) as e:
        check_fsdp(make_config("tiny", overrides=overrides), info)
    assert str(e.value).startswith(words) and "\n" not in str(e.value)


def test_fsdp_on_the_cpu_stops_before_any_weight_loads(fsdp, prepared_run, capsys, monkeypatch):
    import lib.model.loading as loading
    from lib.__main__ import main

    def no_weights(*a, **kw):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(loading, "load_model_and_tokenizer", no_weights)
    before = run_paths(prepared_run).config.read_text()
    assert main(["train", "--run", prepared_run, "--set", "train.max_steps=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: FSDP (accelerate launch with an FSDP config) needs GPUs")
    assert run_paths(prepared_run).config.read_text() == before


def test_the_estimate_gives_ddp_and_fsdp_memory_per_gpu():
    """A 70B Llama (config only, on the meta device): DDP needs it all on each GPU, FSDP splits it so two
    48 GB cards hold it; FSDP's share falls with more GPUs, DDP's does not."""
    from transformers import LlamaConfig

    from lib.run.memory import estimate_memory

    llama70b = LlamaConfig(hidden_size=8192, num_hidden_layers=80, intermediate_size=28672, num_attention_heads=64,
                           num_key_value_heads=8, vocab_size=128256)
    cfg = make_config("t4", overrides={"train.per_device_train_batch_size": 1, "train.max_length": 2048,
                                       "model.gradient_checkpointing": True})
    two, four = (estimate_memory(llama70b, cfg, gpus=n, suggest=False)["multi_gpu"] for n in (2, 4))
    assert two["gpus"] == 2 and two["ddp_gb_per_gpu"] > 48 > two["fsdp_gb_per_gpu"]
    assert four["ddp_gb_per_gpu"] == two["ddp_gb_per_gpu"] and four["fsdp_gb_per_gpu"] < two["fsdp_gb_per_gpu"]
    est = estimate_memory(llama70b, cfg, gpus=2, suggest=False)
    assert est["total_gb"] < two["ddp_gb_per_gpu"]  # DDP adds its gradient bucket to the single-GPU total


@pytest.mark.long  # ~15 s; the launch it reaches is checked in make test (test_the_ddp_configs_reach_...)
def test_accelerate_launch_ddp_with_two_cpu_processes(prepared_run):
    """`accelerate launch --config_file configs/accelerate_ddp.yaml -m lib train` over gloo: one adapter."""
    from conftest import copy_run

    run = copy_run(prepared_run, "accelerate-ddp")
    paths = run_paths(run)
    for p in (paths.checkpoints, paths.adapter, paths.logs, paths.model_summary.parent):
        shutil.rmtree(p, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate_ddp.yaml",
           "--num_processes", "2", "--main_process_port", "29531", "-m", "lib", "train", "--run", run,
           "--set", "train.max_steps=2", "--set", "train.eval_steps=2", "--set", "train.save_steps=2"]
    res = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads(paths.training_summary.read_text())
    assert s["world_size"] == 2 and s["global_step"] == 2
    assert (paths.adapter / "adapter_model.safetensors").exists()
    assert s["epoch"] == pytest.approx(2 * 2 * 8 / 153, abs=0.02)  # each step took a batch per process


@pytest.mark.parametrize("config, extra, nodes, per_node", [
    ("accelerate_ddp.yaml", ["--num_processes", "4"], None, "4"),
    ("accelerate_ddp_2nodes.yaml", ["--num_processes", "16", "--machine_rank", "1", "--main_process_ip", "127.0.0.1"],
     "2", "8"),
])
def test_the_ddp_configs_reach_the_same_torchrun_launch(config, extra, nodes, per_node):
    """One machine with N GPUs, and two machines: accelerate reads each config into torchrun's arguments
    (processes per node, nodes, this node's rank, the head's address) for the same `-m lib train`."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    cmd = ["--config_file", str(REPO_ROOT / "configs" / config), "--main_process_port", "29599", *extra,
           "-m", "lib", "train", "--run", "demo"]
    args = launch_command_parser().parse_args(cmd)
    _validate_launch_command(args)
    assert args.multi_gpu and not args.use_fsdp
    env = prepare_multi_gpu_env(args)
    assert args.nproc_per_node == per_node and getattr(args, "nnodes", None) == nodes
    assert (args.module, args.training_script, args.training_script_args) == (True, "lib", ["train", "--run", "demo"])
    if nodes:
        assert (args.node_rank, args.rdzv_endpoint, args.rdzv_backend) == (1, "127.0.0.1:29599", "static")
    assert env.get("ACCELERATE_MIXED_PRECISION") == "no"


@pytest.mark.parametrize("error, lost", [
    (RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:5514: "
                  "Connection reset by peer. This is typically caused by a remote worker hanging"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x64 and 32x64)"), False),
    (KeyError("input_ids"), False),
])
def test_under_torchrun_a_lost_peer_is_one_line_naming_the_checkpoint_and_a_bug_is_not(tmp_path, monkeypatch,
                                                                                       error, lost):
    """What a process gets when its peer died (gloo's transport error, the launcher's SIGTERM) becomes one
    TrainingError line saying what to do (here no checkpoint yet; the slow two-node test names a real one);
    any other error keeps its type and traceback."""
    import signal

    from lib.run.errors import TrainingError
    from lib.train.nodes import peers_lost_in_one_line

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(TrainingError if lost else type(error)) as e:
        with peers_lost_in_one_line(tmp_path, lambda: 3):
            raise error
    if lost:
        line = str(e.value)
        assert "\n" not in line and line.startswith("training: process 1 of 2 stopped at step 3: Read error")
        assert "Connection reset by peer" in line and "This is typically" not in line
        assert line.endswith("run the same command again on every node: no checkpoint had been saved yet: "
                             "training starts over")
    with pytest.raises(TrainingError, match="its launcher stopped it \\(SIGTERM\\)"):
        with peers_lost_in_one_line(tmp_path):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored
