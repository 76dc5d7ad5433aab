"""Run configuration: profiles, config.yaml round trip, typed overrides, the HF token."""

from __future__ import annotations

import pytest
from conftest import BAD_RANGES

from lib.run.config import apply_overrides, field_help, load_config, make_config, save_config
from lib.run.errors import ConfigError
from lib.run.profiles import PROFILES
from lib.run.realmodel import hf_token
from lib.run.settings import RunConfig


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_profiles_round_trip_through_yaml(profile, tmp_path):
    cfg = make_config(profile, run="x")
    path = save_config(cfg, tmp_path)
    assert path.name == "config.yaml"
    assert load_config(tmp_path) == cfg


def test_profiles_differ_where_they_should():
    tiny, t4, a100 = make_config("tiny"), make_config("t4"), make_config("a100")
    assert tiny.model.name_or_path == "tiny" and tiny.quant.compute_dtype == "float32"
    assert t4.train.precision == "fp16" and t4.train.optim == "paged_adamw_8bit" and t4.model.gradient_checkpointing
    assert a100.train.precision == "bf16" and a100.train.per_device_train_batch_size > t4.train.per_device_train_batch_size
    assert all(q.quant.mode == "4bit" and q.quant.quant_type == "nf4" and q.quant.double_quant for q in (tiny, t4, a100))


def test_sft_profile_picks_the_default(monkeypatch):
    monkeypatch.setenv("SFT_PROFILE", "t4")
    assert make_config().profile == "t4"
    monkeypatch.setenv("SFT_PROFILE", "nope")
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        make_config()


def test_overrides_convert_types():
    cfg = make_config("tiny", overrides=["train.learning_rate=1e-4", "train.max_steps=7", "lora.target_modules=attention",
                                         "model.gradient_checkpointing=true", "train.save_total_limit=None",
                                         "data.system_prompt=Be brief."])
    assert cfg.train.learning_rate == 1e-4 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.model.gradient_checkpointing is True and cfg.train.save_total_limit is None
    assert cfg.data.system_prompt == "Be brief." and cfg.lora.target_modules == "attention"


@pytest.mark.parametrize("override, message", [
    ("train.lr=1", "unknown configuration key 'train.lr'"),
    ("learning_rate=1", "did you mean train.learning_rate"),
    ("train.max_steps=ten", "train.max_steps: cannot use 'ten' (expected int)"),
    ("model.gradient_checkpointing=maybe", "model.gradient_checkpointing: cannot use 'maybe'"),
    ("quant.mode=3bit", "quant.mode: '3bit' is not one of 4bit, 8bit, none"),
    ("lora.r=0", "lora.r: must be at least 1, got 0"),
    ("train.max_length=None", "train.max_length: None is not allowed"),
    ("no-equals-sign", "not of the form key=value"),
])
def test_bad_overrides_are_clear_errors(override, message):
    cfg = make_config("tiny")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        apply_overrides(cfg, [override])
    assert cfg == make_config("tiny")  # the original is left as it was


def test_notebook_none_keeps_the_current_value():
    cfg = apply_overrides(make_config("t4"), {"train.max_length": None, "data.max_examples": None})
    assert cfg.train.max_length == 1024 and cfg.data.max_examples is None
    # One rule for nullable keys too: None keeps a value set before; `key=none` clears it.
    cfg = apply_overrides(make_config("t4", overrides=["data.max_examples=5"]), {"data.max_examples": None})
    assert cfg.data.max_examples == 5
    assert apply_overrides(cfg, ["data.max_examples=none"]).data.max_examples is None
    with pytest.raises(ConfigError, match="unknown configuration key 'train.learning_rat'"):
        apply_overrides(cfg, {"train.learning_rat": None})


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    (tmp_path / "config.yaml").write_text("train:\n  learning_rat: 0.1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"config.yaml: unknown configuration key 'train.learning_rat'"):
        load_config(tmp_path)


def test_every_field_has_help():
    helps = field_help()
    assert len(helps) > 40 and all(h for h in helps.values())


def test_hf_token_sources_and_never_written(tmp_path, monkeypatch):
    for n in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_API_KEY", "HUGGINGFACE_TOKEN"):
        monkeypatch.delenv(n, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("HUGGINGFACE_API_KEY=hf_from_dotenv\n", encoding="utf-8")
    assert hf_token() == "hf_from_dotenv"
    monkeypatch.setenv("HF_TOKEN", "hf_secret_123")
    assert hf_token() == "hf_secret_123"
    path = save_config(make_config("tiny"), tmp_path / "run")
    assert "hf_secret_123" not in path.read_text() and "token" not in {f for f in RunConfig.__dataclass_fields__}


# ----------------------------------------------------------------------------- ranges of every field

def _numeric_fields():
    import dataclasses

    from lib.run.config import _base_types, _field_map

    out = {}
    for key, (_, f) in _field_map(RunConfig()).items():
        kinds = _base_types(f.type)[0]
        if any(t in (int, float) for t in kinds) and bool not in kinds:
            out[key] = f
    assert dataclasses.is_dataclass(RunConfig) and len(out) > 25
    return out


def test_every_numeric_field_has_a_range_in_its_metadata_and_help():
    helps = field_help()
    for key, f in _numeric_fields().items():
        assert f.metadata.get("range") is not None, key
        assert "Allowed: " in helps[key], key


@pytest.mark.parametrize("key", sorted(_numeric_fields()))
def test_every_numeric_field_refuses_non_finite_and_out_of_range_values(key):
    from lib.run.config import _base_types
    from lib.run.settings import INT_MAX

    f = _numeric_fields()[key]
    r, is_int = f.metadata["range"], int in _base_types(f.type)[0]
    cfg = make_config("tiny")
    bad = ["nan", "inf", "-inf"]
    if r.lo is not None:
        bad.append(str(r.lo if r.lo_open else r.lo - 1) if r.lo - 1 not in r.also else str(r.lo - 2))
    if r.hi is not None:
        bad.append(str(r.hi if r.hi_open else r.hi + 1))
    elif is_int:
        bad.append(str(INT_MAX + 1))
    for value in bad:  # an int field refuses nan and inf as not an int
        with pytest.raises(ConfigError, match=rf"^{key}: (must be |cannot use '(nan|inf|-inf)' \(expected int\))"):
            apply_overrides(cfg, [f"{key}={value}"])
    # the bounds themselves, where allowed, and the special values pass
    good = [v for v in (r.lo if not r.lo_open else None, r.hi if not r.hi_open else None, *r.also) if v is not None]
    needs = {"train.early_stopping_patience": ["train.load_best_model_at_end=true"]}  # cross-field rules
    for value in good:
        apply_overrides(cfg, [*needs.get(key, []), f"{key}={value}"])


@pytest.mark.parametrize("override, message", BAD_RANGES, ids=[s for s, _ in BAD_RANGES])
def test_range_messages_name_the_key_and_the_allowed_values(override, message):
    with pytest.raises(ConfigError) as e:
        apply_overrides(make_config("tiny"), [override])
    assert str(e.value) == message


def test_a_non_finite_value_in_config_yaml_names_the_file(tmp_path):
    (tmp_path / "config.yaml").write_text("train:\n  learning_rate: .nan\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"config.yaml: train.learning_rate: must be a finite number"):
        load_config(tmp_path)


@pytest.mark.parametrize("override, got", [("data.ignore_fields=[notes, null]", "None"),
                                           ("data.columns={prompt: null}", "None"), ("data.columns={1: a}", "1")])
def test_a_null_or_non_text_entry_in_a_field_list_is_refused_in_one_line(override, got):
    from lib.run.config import make_config
    from lib.run.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"must be a non-empty string, got {got}$"):
        make_config("tiny", overrides=[override])
