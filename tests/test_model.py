"""02: quantization and LoRA configuration, the memory estimate (against a hand computation),
loading the tiny model in real 4-bit NF4 on the CPU, and configure() writing model/summary.json."""

from __future__ import annotations

import json

import pytest

from lib.run.config import make_config
from lib.run.errors import ConfigError

CPU = {"device": "cpu", "name": "CPU", "capability": None, "memory_gb": None, "count": 0}
T4 = {"device": "cuda", "index": 0, "name": "Tesla T4", "capability": [7, 5], "memory_gb": 14.6, "count": 1}
A100 = {"device": "cuda", "index": 0, "name": "NVIDIA A100", "capability": [8, 0], "memory_gb": 79.2, "count": 1}


def test_compute_dtype_and_precision_follow_the_hardware():
    from lib.run.hardware import compute_dtype_name
    from lib.run.trainer_args import precision

    cfg = make_config("t4", overrides={"quant.compute_dtype": "auto", "train.precision": "auto"})
    assert compute_dtype_name(cfg, A100) == "bfloat16" and precision(cfg, A100) == "bf16"
    assert compute_dtype_name(cfg, T4) == "float16" and precision(cfg, T4) == "fp16"
    assert compute_dtype_name(cfg, CPU) == "float32" and precision(cfg, CPU) == "fp32"
    with pytest.raises(ConfigError, match="bf16 needs compute capability >= 8"):
        precision(make_config("t4", overrides={"train.precision": "bf16"}), T4)
    # A CPU with native bfloat16 (AVX512-BF16 or AMX) trains the 4-bit base in bfloat16; evaluation,
    # merging and the parity check (training=False) stay float32, as on every other CPU.
    cpu_bf16 = {**CPU, "cpu_bf16": True}
    assert compute_dtype_name(cfg, cpu_bf16, training=True) == "bfloat16"
    assert compute_dtype_name(cfg, cpu_bf16) == "float32"
    assert compute_dtype_name(cfg, {**CPU, "cpu_bf16": False}, training=True) == "float32"
    assert compute_dtype_name(cfg, CPU, training=True) == "float32"  # not detected: never guessed
    fp32 = make_config("smol", overrides={"quant.compute_dtype": "float32"})
    assert compute_dtype_name(fp32, cpu_bf16, training=True) == "float32"  # on request
    assert compute_dtype_name(make_config("smol"), cpu_bf16, training=True) == "bfloat16"  # the profile: auto
    with pytest.raises(ConfigError, match="fp16 mixed precision needs a GPU"):
        precision(make_config("tiny", overrides={"train.precision": "fp16"}), CPU)


def test_quantization_configs():
    import torch

    from lib.model.loading import quantization_config

    q = quantization_config(make_config("tiny"), CPU)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.float32
    q = quantization_config(make_config("t4", overrides={"quant.compute_dtype": "auto"}), T4)
    assert q.bnb_4bit_compute_dtype == torch.float16
    q = quantization_config(make_config("tiny", overrides={"quant.quant_type": "fp4", "quant.double_quant": False}), CPU)
    assert q.bnb_4bit_quant_type == "fp4" and not q.bnb_4bit_use_double_quant
    assert quantization_config(make_config("tiny", overrides={"quant.mode": "8bit"}), CPU).load_in_8bit
    assert quantization_config(make_config("tiny", overrides={"quant.mode": "none"}), CPU) is None


def test_lora_config_targets():
    from lib.model.loading import lora_config

    c = lora_config(make_config("tiny", overrides={"lora.r": 8, "lora.alpha": 16, "lora.dropout": 0.1}))
    assert (c.r, c.lora_alpha, c.lora_dropout, c.bias) == (8, 16, 0.1, "none")
    assert c.target_modules == "all-linear" and c.task_type == "CAUSAL_LM"
    c = lora_config(make_config("tiny", overrides={"lora.target_modules": "attention"}))
    assert set(c.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    c = lora_config(make_config("tiny", overrides={"lora.target_modules": "q_proj, v_proj"}))
    assert set(c.target_modules) == {"q_proj", "v_proj"}


def test_attention_implementation():
    from lib.run.hardware import attn_implementation

    cfg = make_config("tiny")  # padding-free batching: sdpa run per packed sequence
    assert attn_implementation(cfg, CPU) == "sdpa_packed"
    assert attn_implementation(make_config("tiny", overrides={"model.attn_implementation": "auto"}), CPU) == "sdpa_packed"
    padded = make_config("tiny", overrides={"train.batching": "pad_longest"})
    assert attn_implementation(padded, CPU) == "sdpa"
    with pytest.raises(ConfigError):
        attn_implementation(make_config("tiny", overrides={"model.attn_implementation": "flash_attention_2"}), CPU)


# ------------------------------------------------------------------------------ memory estimate

GIB = 1024**3


def _small_llama():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def test_memory_estimate_matches_a_hand_computation(monkeypatch):
    import lib.run.memory as m

    monkeypatch.setattr(m, "device_info", lambda: CPU)
    cfg = make_config("tiny", overrides={
        "quant.compute_dtype": "float32", "lora.r": 8, "lora.dropout": 0.0, "lora.target_modules": "all-linear",
        "train.per_device_train_batch_size": 2, "train.max_length": 128, "train.optim": "adamw_torch",
        "model.gradient_checkpointing": False, "model.gpu": "T4"})
    est = m.estimate_memory(_small_llama(), cfg)

    # By hand. Per layer: q 256x256, k 256x128, v 256x128, o 256x256, gate/up 256x512, down 512x256.
    per_layer = 65536 + 32768 + 32768 + 65536 + 3 * 131072
    quantized = 2 * per_layer  # 1_179_648
    other = 1000 * 256 * 2 + 2 * 2 * 256 + 256  # embeddings, untied LM head, norms: 513_280
    assert est["params_quantized"] == quantized == 1_179_648
    assert est["params_total"] == quantized + other
    lora = 2 * 8 * ((256 + 256) + (256 + 128) * 2 + (256 + 256) + (256 + 512) * 2 + (512 + 256))
    assert est["lora_params"] == lora == 65_536
    weights = quantized * 0.5 + other * 4  # NF4; other parameters fp32 after prepare_model_for_kbit_training
    constants = quantized / 64 + quantized / (64 * 256) * 4  # 8-bit absmax per 64, fp32 absmax per 256 blocks
    tokens = 2 * 128
    per_token_layer = 4 * 256 + 3 * 256 + 3 * 128 + 4 * 512  # 4h + 3q + 3kv + 4I = 4224 values
    per_token_layer += 7 * 8  # the r-wide LoRA A outputs of the 7 adapted modules (no dropout copies)
    activations = tokens * 2 * per_token_layer * 4  # fp32 activations on the CPU config
    logits = tokens * 1000 * 4 * 2 + tokens * 256 * 4  # one fused-head tile fwd + bwd, hidden states
    subtotal = weights + constants + lora * 4 + lora * 4 + lora * 8 + activations + logits
    overhead = 0.5 * GIB + 0.10 * subtotal  # CUDA context and allocator slack
    parts = est["parts_bytes"]
    assert parts["weights"] == round(weights) == 2_642_944
    assert parts["quant_constants"] == round(constants) == 18_720
    assert parts["lora"] == parts["gradients"] == 4 * lora and parts["optimizer"] == 8 * lora
    assert parts["activations"] == activations == 8_765_440
    assert parts["logits"] == logits == 2_310_144
    assert parts["overhead"] == round(overhead)
    assert est["total_bytes"] == round(subtotal + overhead)
    ckpt = tokens * 2 * 256 * 4 + tokens * per_token_layer * 4  # layer inputs + one layer recomputed
    assert est["activations_gb"]["with_checkpointing"] == round(ckpt / GIB, 4)
    assert est["activations_gb"]["without_checkpointing"] == round(activations / GIB, 4)
    assert est["gpu"] == "T4" and est["fits"] is True and est["suggestions"] == []


def test_memory_estimate_of_a_model_too_large_for_a_t4_suggests_fixes(monkeypatch):
    from transformers import LlamaConfig

    import lib.run.memory as m

    monkeypatch.setattr(m, "device_info", lambda: CPU)
    seven_b = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32)
    cfg = make_config("t4", overrides={"model.gradient_checkpointing": False, "train.per_device_train_batch_size": 8,
                                       "train.max_length": 2048, "train.optim": "adamw_torch"})
    est = m.estimate_memory(seven_b, cfg)
    assert 6.7e9 < est["params_total"] < 6.8e9
    nf4 = est["params_quantized"] * (0.5 + 1 / 64 + 4 / 64 / 256) / GIB  # ~0.516 bytes a quantized weight
    assert 2.9 < nf4 < 3.2
    assert est["parts_gb"]["weights"] + est["parts_gb"]["quant_constants"] == pytest.approx(
        nf4 + est["params_unquantized"] * 4 / GIB, abs=1e-3)  # + fp32 embeddings and LM head
    assert est["fits"] is False and est["gpus"]["T4"]["fits"] is False
    text = " ".join(est["suggestions"])
    assert "model.gradient_checkpointing=True" in text and "train.per_device_train_batch_size=4" in text
    with_ckpt = m.estimate_memory(seven_b, make_config("t4", overrides={
        "model.gradient_checkpointing": True, "train.per_device_train_batch_size": 1, "train.max_length": 1024}))
    assert with_ckpt["fits"] is True, m.format_estimate(with_ckpt)
    assert "does NOT fit on T4" in m.format_estimate(est)


def test_unknown_gpu_is_a_config_error():
    from lib.run.memory import estimate_memory

    with pytest.raises(ConfigError, match="model.gpu"):
        estimate_memory(_small_llama(), make_config("tiny", overrides={"model.gpu": "RTX9090"}))


# ------------------------------------------------------------------------------ loading


@pytest.fixture(scope="module")
def tiny_cfg(session_outputs):
    return make_config("tiny")


def test_load_tiny_model_in_4bit_for_training(tiny_cfg):
    import torch

    from lib.model.configure import parameter_counts
    from lib.model.loading import add_lora, load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_cfg, for_training=True)
    assert model.is_loaded_in_4bit
    assert {type(mod).__name__ for mod in model.modules()} >= {"Linear4bit"}
    assert not any(getattr(mod, "support_avx512bf16_for_cpu", False) for mod in model.modules())
    assert tok.pad_token_id is not None and tok.chat_template
    model = add_lora(model, tiny_cfg)
    counts = parameter_counts(model)
    assert 0 < counts["trainable_params"] < counts["total_params"]
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="not in this model"):
        add_lora(load_model_and_tokenizer(tiny_cfg)[0],
                 make_config("tiny", overrides={"lora.target_modules": "c_attn"}))


def test_gradients_are_the_same_after_an_evaluation(tiny_cfg):
    """bitsandbytes repacks 4-bit weights for a backward-less CPU kernel on an eval-mode forward;
    training after an evaluation must still get the true gradients."""
    import torch
    from conftest import tiny_lora_model

    def grads(evaluate_first):
        model, tok = tiny_lora_model(tiny_cfg)
        x = tok(["Why does ice float on water? What do we know"], return_tensors="pt")
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(**x)
            model.train()
        model(**x, labels=x["input_ids"]).loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b)


def test_cpu_bf16_is_detected_and_can_be_overridden(monkeypatch):
    import torch

    from lib.run.hardware import cpu_bf16, device_info

    monkeypatch.delenv("SFT_CPU_BF16", raising=False)
    assert cpu_bf16() == (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    monkeypatch.setenv("SFT_CPU_BF16", "0")
    assert not cpu_bf16() and device_info()["cpu_bf16"] is False
    monkeypatch.setenv("SFT_CPU_BF16", "1")
    assert cpu_bf16() and device_info()["cpu_bf16"] is True


def test_training_load_computes_in_bf16_where_the_cpu_has_it(monkeypatch):
    """The bitsandbytes layers of a training load compute in bfloat16 on a bf16 CPU; the LoRA weights stay
    float32; a load for evaluation computes in float32."""
    import torch
    from bitsandbytes.nn import Linear4bit

    from lib.model.loading import add_lora, load_model_and_tokenizer

    monkeypatch.setenv("SFT_CPU_BF16", "1")
    cfg = make_config("tiny", overrides={"quant.compute_dtype": "auto"})
    model = add_lora(load_model_and_tokenizer(cfg, for_training=True)[0], cfg)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert layers and {m.compute_dtype for m in layers} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    ids = torch.tensor([[5, 6, 7, 8]])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    evaluation = load_model_and_tokenizer(cfg, for_training=False)[0]
    assert {m.compute_dtype for m in evaluation.modules() if isinstance(m, Linear4bit)} == {torch.float32}


def test_load_for_inference_is_in_eval_mode(tiny_cfg):
    from lib.model.loading import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(tiny_cfg, for_training=False)
    assert not model.training and model.is_loaded_in_4bit


def test_configure_writes_summary_and_config(prepared_run):
    import shutil

    from conftest import copy_run

    from lib.model.configure import adapted_table, configure, model_table
    from lib.run.config import load_config
    from lib.run.paths import run_paths

    run = copy_run(prepared_run, "configure")
    paths = run_paths(run)
    if paths.model_summary.exists():
        paths.model_summary.unlink()
    for trained in (paths.checkpoints, paths.adapter):  # the session run may be trained by now: a prepared one here
        shutil.rmtree(trained, ignore_errors=True)
    (paths.root / "stages" / "train.json").unlink(missing_ok=True)
    summary = configure(run, overrides={"lora.r": 8, "lora.target_modules": "attention", "lora.alpha": None})
    assert paths.model_summary.exists()
    saved = json.loads(paths.model_summary.read_text())
    assert saved["trainable_params"] == summary["trainable_params"] > 0
    assert saved["trainable_params"] == saved["memory_estimate"]["lora_params"]  # the estimate counts exactly
    assert saved["lora"]["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert saved["quantization"] == {"mode": "4bit", "quant_type": "nf4", "double_quant": True,
                                     "compute_dtype": "float32"}
    assert "Linear4bit" in saved["model_repr"] and "lora_A" in saved["model_repr"]
    cfg = load_config(paths.config)
    assert cfg.lora.r == 8 and cfg.lora.target_modules == "attention" and cfg.lora.alpha == 32
    shown = model_table(summary).data  # a Styler: long names wrap in their cell, never cut
    assert len(shown) > 5 and "an estimate" in shown.loc["estimated training memory", "value"]
    assert shown.loc["attention", "value"].startswith(summary["attn_implementation"] + ": ")
    kinds = {k["module"]: k for k in summary["adapted_modules"]}  # one entry per module type, not the repr
    assert sorted(kinds) == ["k_proj", "o_proj", "q_proj", "v_proj"] and {k["rank"] for k in kinds.values()} == {"8"}
    assert sum(k["trainable_params"] for k in kinds.values()) == saved["trainable_params"]
    assert len(adapted_table(summary).data) == 4


def test_configure_without_data_names_notebook_01(outputs):
    from lib.model.configure import configure
    from lib.run.errors import MissingStageError

    with pytest.raises(MissingStageError, match="01_prepare_data"):
        configure("nothing-here")
