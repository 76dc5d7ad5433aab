"""Adapter variants (lora.use_dora, lora.use_rslora, lora.init, lora.loraplus_lr_ratio) on the tiny model:
each trains, saves, resumes to the same adapter, merges and passes the merge check; the combinations
peft refuses stop before any weight loads; the memory estimate counts DoRA's magnitudes.

Measured when written (tiny model, 4 steps, CPU): merged vs unmerged 16-bit base + adapter within
4e-7 for every variant; PiSSA's converted adapter on the original base reproduces the trained
model within 4e-7; OLoRA on a 4-bit base within ~0.04 (the residual is re-quantized, so the
original base + converted adapter differs from it by NF4 rounding); LoftQ merged into the
dequantized 4-bit base within 3e-3 of the 4-bit adapter model (perplexity drift ~1e-6).
"""

from __future__ import annotations

import math

import pytest
from conftest import SAMPLE, copy_run

from lib.run.config import make_config
from lib.run.errors import ConfigError
from lib.run.paths import run_paths

# A short run: 4 optimizer steps, a checkpoint every 2, no evaluation during training.
SHORT = ["train.max_steps=4", "train.save_steps=2", "train.eval_strategy=no", "train.logging_steps=1",
         "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1", "train.max_length=128",
         "eval.generate_examples=0", "eval.max_examples=8"]

VARIANTS = {
    "dora": ["lora.use_dora=true"],
    "rslora": ["lora.use_rslora=true"],
    "loraplus": ["lora.loraplus_lr_ratio=16"],
    "pissa": ["lora.init=pissa", "quant.mode=none"],
    "olora": ["lora.init=olora"],
    "loftq": ["lora.init=loftq"],
}

MAX_MERGE_DIFF = 1e-4  # merged vs the same 16/32-bit base with the adapter unmerged, fp32


@pytest.fixture(scope="module")
def short_run(session_outputs) -> str:
    from lib.data.prepare import run_prepare

    run_prepare("adapters", str(SAMPLE), profile="tiny", overrides=SHORT)
    return "adapters"


def _tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _stop_at(step):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == step:
                raise KeyboardInterrupt

    return StopAt()


# ------------------------------------------------------------------------------ refused combinations

REFUSED = [
    (["lora.init=pissa"], ("lora.init=pissa", "quant.mode=4bit")),
    (["lora.init=pissa", "quant.mode=8bit"], ("lora.init=pissa", "quant.mode=8bit")),
    (["lora.init=loftq", "quant.mode=none"], ("lora.init=loftq", "quant.mode=none")),
    (["lora.use_dora=true", "lora.init=olora"], ("lora.use_dora", "lora.init=olora")),
    (["lora.use_dora=true", "lora.init=pissa", "quant.mode=none"], ("lora.use_dora", "lora.init=pissa")),
    (["lora.use_dora=true", "lora.init=loftq"], ("lora.use_dora", "lora.init=loftq")),
    (["lora.loraplus_lr_ratio=16", "train.optim=adafactor"], ("lora.loraplus_lr_ratio", "train.optim=adafactor")),
]


@pytest.mark.parametrize("overrides,names", REFUSED, ids=[" ".join(o) for o, _ in REFUSED])
def test_a_refused_combination_names_both_settings(overrides, names):
    with pytest.raises(ConfigError) as e:
        make_config("tiny", overrides=overrides)
    assert all(n in str(e.value) for n in names) and "\n" not in str(e.value)


def test_a_refused_combination_stops_the_cli_before_any_weight_loads(short_run, capsys, monkeypatch):
    import transformers

    from lib.__main__ import main

    def no_weights(*a, **kw):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    paths = run_paths(short_run)
    before = paths.config.read_text()
    assert main(["train", "--run", short_run, "--set", "lora.use_dora=true", "--set", "lora.init=olora"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "lora.use_dora" in err[0] and "lora.init=olora" in err[0]
    assert paths.config.read_text() == before and not paths.checkpoints.exists()


# ------------------------------------------------------------------------------ the peft model


def test_lora_config_and_scaling_follow_the_settings(session_outputs):
    from transformers import set_seed

    from lib.model.loading import add_lora, load_model_and_tokenizer, lora_config

    cfg = make_config("tiny", overrides=["lora.use_dora=true", "lora.use_rslora=true"])
    lc = lora_config(cfg)
    assert lc.use_dora is True and lc.use_rslora is True and lc.init_lora_weights is True
    assert lora_config(make_config("tiny", overrides=["lora.init=olora"])).init_lora_weights == "olora"
    set_seed(0)
    model = add_lora(load_model_and_tokenizer(cfg)[0], cfg)
    layers = [m for m in model.modules() if hasattr(m, "lora_magnitude_vector") and "default" in m.scaling]
    assert layers
    for m in layers:
        assert m.scaling["default"] == pytest.approx(cfg.lora.alpha / math.sqrt(cfg.lora.r))  # not alpha / r
        mag = m.lora_magnitude_vector["default"].weight
        assert mag.requires_grad and mag.shape == (m.out_features,)


def test_dora_memory_estimate_counts_the_magnitudes(session_outputs):
    from transformers import set_seed

    from lib.model.configure import parameter_counts
    from lib.model.loading import add_lora, load_model_and_tokenizer
    from lib.run.memory import estimate_memory
    from lib.run.realmodel import load_model_config

    plain, dora = make_config("tiny"), make_config("tiny", overrides=["lora.use_dora=true"])
    mc = load_model_config(plain)
    a, b = estimate_memory(mc, plain), estimate_memory(mc, dora)
    set_seed(0)
    model = add_lora(load_model_and_tokenizer(dora)[0], dora)
    rows = sum(m.out_features for m in model.modules() if hasattr(m, "lora_magnitude_vector") and m.lora_A)
    assert b["lora_params"] - a["lora_params"] == rows > 0
    assert b["lora_params"] == parameter_counts(model)["trainable_params"]  # the estimate counts what trains
    pa, pb = a["parts_bytes"], b["parts_bytes"]
    assert pb["lora"] - pa["lora"] == pb["gradients"] - pa["gradients"] == 4 * rows
    assert pb["optimizer"] - pa["optimizer"] == 8 * rows  # AdamW: two fp32 moments per magnitude
    assert pa["dora_weight"] == 0 < pb["dora_weight"] and pb["activations"] > pa["activations"]


def test_loftq_starts_closer_to_the_original_weights(session_outputs):
    import bitsandbytes as bnb
    import torch
    from peft.tuners.lora import Linear4bit
    from safetensors.torch import load_file

    from lib.model.loading import add_lora, load_model_and_tokenizer
    from lib.run.realmodel import resolve_model

    cfg = make_config("tiny", overrides=["lora.init=loftq"])  # scaling alpha/r = 2: LoftQ must divide by it
    model = add_lora(load_model_and_tokenizer(cfg)[0], cfg)
    original = load_file(f"{resolve_model('tiny')}/model.safetensors")
    checked = 0
    for name, m in model.named_modules():
        if not isinstance(m, Linear4bit):
            continue
        w = original[name.removeprefix("base_model.model.") + ".weight"].float()
        q = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
        delta = m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
        assert torch.linalg.norm(w - q - delta) < 0.9 * torch.linalg.norm(w - q), name
        checked += 1
    assert checked > 0


def test_loraplus_gives_b_ratio_times_the_learning_rate(short_run):
    import torch

    from lib.data.readers import read_examples
    from lib.model.loading import add_lora, load_model_and_tokenizer
    from lib.train.trainer import build_trainer
    from lib.train.training import encode_dataset

    cfg = make_config("tiny", overrides=SHORT + ["lora.loraplus_lr_ratio=16", "train.lr_scheduler_type=linear",
                                                 "train.warmup_ratio=0"])
    model, tok = load_model_and_tokenizer(cfg)
    model = add_lora(model, cfg)
    ds = encode_dataset(tok, read_examples(run_paths(short_run).train_data)[:8], 128)
    trainer = build_trainer(cfg, model, tok, ds, output_dir=run_paths(short_run).root / "lp-unused")
    trainer.create_optimizer_and_scheduler(num_training_steps=4)
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      torch.optim.AdamW)
    group_of = {id(p): g for g in trainer.optimizer.param_groups for p in g["params"]}
    lr = cfg.train.learning_rate
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert {n.split(".lora_")[1][0] for n, _ in named if ".lora_" in n} == {"A", "B"}
    for n, p in named:
        want = lr * 16 if "lora_B" in n else lr
        assert group_of[id(p)]["initial_lr"] == pytest.approx(want), n
    trainer.optimizer.step()  # no gradients yet: changes nothing, keeps the call order torch expects
    trainer.lr_scheduler.step()  # the schedule scales every group alike: the ratio stays 16
    lrs = {("lora_B" in n): group_of[id(p)]["lr"] for n, p in named}
    assert lrs[True] == pytest.approx(16 * lrs[False]) and lrs[False] == pytest.approx(lr * 3 / 4)


# ------------------------------------------------------------------------------ train, resume, merge


def _logits(model, tok, examples):
    from lib.ship.merge import answer_logits

    return answer_logits(model, tok, examples, 128)


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_resumes_saves_and_merges(short_run, variant):
    import json

    import torch

    from lib.data.readers import read_examples
    from lib.model.loading import load_model_and_tokenizer, load_tuned_model
    from lib.run.config import load_config
    from lib.ship.merge import compare_logits, run_merge
    from lib.train.training import run_train

    whole = copy_run(short_run, f"{variant}-whole")
    run_train(whole, overrides=VARIANTS[variant])
    run = copy_run(short_run, f"{variant}-resumed")
    with pytest.raises(KeyboardInterrupt):
        run_train(run, overrides=VARIANTS[variant], callbacks=[_stop_at(3)])
    summary = run_train(run)
    assert summary["resumed_from"] == "checkpoint-2" and summary["global_step"] == 4
    paths, cfg = run_paths(run), load_config(run_paths(run).config)

    a, b = _tensors(paths.adapter), _tensors(run_paths(whole).adapter)
    assert a.keys() == b.keys() and any("magnitude" in k for k in a) == cfg.lora.use_dora
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    saved = json.loads((paths.adapter / "adapter_config.json").read_text())
    converted = cfg.lora.init in ("pissa", "olora")
    assert saved["r"] == (2 * cfg.lora.r if converted else cfg.lora.r) and saved["init_lora_weights"] is True
    assert saved["use_dora"] == cfg.lora.use_dora and saved["use_rslora"] == cfg.lora.use_rslora
    model_summary = json.loads(paths.model_summary.read_text())["lora"]
    assert (model_summary["use_dora"], model_summary["init"]) == (cfg.lora.use_dora, cfg.lora.init)
    assert model_summary["loraplus_lr_ratio"] == cfg.lora.loraplus_lr_ratio

    examples = read_examples(paths.eval_data)[:4]
    if converted:  # the saved adapter on the original base is the trained model (the last checkpoint's)
        trained, tok = load_model_and_tokenizer(cfg, for_training=False, adapter=paths.checkpoints / "checkpoint-4")
        reference = _logits(trained, tok, examples)
        del trained
        tuned, tok = load_tuned_model(cfg, paths.adapter)
        diff = compare_logits(_logits(tuned, tok, examples), reference)
        assert diff["max_abs_diff"] <= (1e-4 if cfg.quant.mode == "none" else 0.2), diff

    report = run_merge(run)
    lg = report["logits"]
    assert report["ok"] and lg["max_abs_diff_vs_unmerged"] <= MAX_MERGE_DIFF
    if variant in ("pissa", "loftq"):  # merged where training's weights are: exact
        assert lg["max_abs_diff_vs_adapter"] <= 1e-2 and report["relative_drift"] < 1e-4
    assert report["merge_base"] == ("dequantized 4-bit (LoftQ)" if variant == "loftq" else "original weights")
