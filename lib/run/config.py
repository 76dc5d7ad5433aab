"""The run configuration: made from a profile, overridden, validated, saved and loaded as config.yaml.

    from lib.run.config import make_config, save_config, load_config
    cfg = make_config("tiny", overrides=["train.learning_rate=1e-3"])

The fields themselves (the `RunConfig` tree, help texts, ranges, choices, profiles) are in
lib/run/settings.py. Every field carries a help text (`field_help()` lists them). A profile is a named preset of the
whole tree; the environment variable SFT_PROFILE picks the default one. `--set key=value`
overrides convert to the field's type and reject unknown keys. The Hugging Face token is never
part of the configuration: `hf_token()` reads it from the environment, a `.env` file or Colab
secrets, and nothing writes it into a run directory.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import stat
import types
import typing
from pathlib import Path

import yaml

from lib.run.errors import ConfigError, MissingStageError, SFTError
from lib.run.paths import check_run_name
from lib.run.profiles import PROFILES
from lib.run.rundir import write_atomic
from lib.run.settings import CHOICES, INT_MAX, RunConfig, check_columns, check_task_scores
from lib.run.stages import stage


def default_profile() -> str:
    return os.environ.get("SFT_PROFILE") or "tiny"


def _field_map(cfg: RunConfig) -> dict[str, tuple[object, dataclasses.Field]]:
    """'section.key' (or top-level 'key') -> (owning object, dataclass field)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            for sf in dataclasses.fields(value):
                out[f"{f.name}.{sf.name}"] = (value, sf)
        else:
            out[f.name] = (cfg, f)
    return out


def field_help(cfg: RunConfig | None = None) -> dict[str, str]:
    """Every configurable key with its help text."""
    out = {}
    for k, (_, f) in _field_map(cfg or RunConfig()).items():
        out[k] = f.metadata.get("help", "") + (f" Allowed: {allowed(f)}." if allowed(f) else "")
    return out


_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict, "list": list}


def _base_types(annotation) -> tuple[list[type], bool]:
    """The concrete types a field annotation allows and whether None is allowed."""
    if isinstance(annotation, str):
        parts = [p.strip() for p in annotation.split("|")]
        return [_TYPES[p] for p in parts if p in _TYPES], "None" in parts
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return [a for a in args if a is not type(None)], type(None) in args
    return [annotation], False


def convert_value(key: str, raw, annotation):
    """Convert a string (or YAML scalar) to the field's type, or raise ConfigError naming the key."""
    allowed, nullable = _base_types(annotation)
    says_none = isinstance(raw, str) and raw.strip().lower() in ("none", "null", "~")
    if raw is None or (says_none and (nullable or str not in allowed)):
        if nullable:
            return None
        raise ConfigError(f"{key}: None is not allowed (expected {allowed[0].__name__})")
    for t in allowed:
        if t in (dict, list):
            return _convert_collection(key, raw, t)
        try:
            if t is bool:
                if isinstance(raw, bool):
                    return raw
                s = str(raw).strip().lower()
                if s in ("true", "1", "yes", "on"):
                    return True
                if s in ("false", "0", "no", "off"):
                    return False
                raise ValueError("not a boolean (true/false)")
            if t is int:
                if isinstance(raw, bool):
                    raise ValueError("a boolean is not an integer")
                if isinstance(raw, float) and raw.is_integer():
                    return int(raw)
                return int(str(raw).strip())
            if t is float:
                if isinstance(raw, bool):
                    raise ValueError("a boolean is not a number")
                return float(str(raw).strip()) if not isinstance(raw, (int, float)) else float(raw)
            if t is str:
                if isinstance(raw, (list, dict)):
                    raise TypeError("a list or mapping is not a string")
                return str(raw)
        except (TypeError, ValueError):
            continue  # try the next allowed type
    names = " or ".join(t.__name__ for t in allowed)
    raise ConfigError(f"{key}: cannot use {raw!r} (expected {names})")


def flag(name: str, value) -> bool:
    """A switch that may delete something (--retrain): True or False (None: False), else refused naming it."""
    if value is None or isinstance(value, bool):
        return bool(value)
    raise ConfigError(f"{name}: expected True or False, got {value!r}; nothing was changed")


def _convert_collection(key: str, raw, kind: type):
    """A mapping or list setting: as given (YAML, a notebook), or from `--set` text: YAML flow
    (`{prompt: question, response: answer}`, `[notes, url]`), `prompt=question,response=answer`, or
    `notes,url`. Values must be strings; an empty one means None."""
    value = raw
    if isinstance(raw, str):
        text = raw.strip()
        if text[:1] in "{[":
            try:
                value = yaml.load(text, Loader=PlainLoader)
            except yaml.YAMLError as e:
                raise ConfigError(f"{key}: cannot read {raw!r} ({str(e).splitlines()[0]})") from None
        elif kind is dict:
            pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ConfigError(f"{key}: expected role=field pairs, e.g. prompt=question,response=answer; got {raw!r}")
            value = {k.strip(): v.strip() for k, v in pairs}
        else:
            value = [p.strip() for p in text.split(",") if p.strip()]
    if not isinstance(value, kind):
        raise ConfigError(f"{key}: expected {'a mapping' if kind is dict else 'a list'}, got {raw!r}")
    if key in ("data.mix_weights", "data.sources"):  # numbers and objects, checked by lib/data/sources.py
        return copy.deepcopy(value) or None
    items = value.items() if kind is dict else enumerate(value)
    bad = [v for _, v in items if not isinstance(v, str) or not v.strip()][:1] if value else []  # [None] counts
    if bad or (kind is dict and any(not isinstance(k, str) for k in value)):
        raise ConfigError(f"{key}: every {'field name' if kind is dict else 'entry'} must be a non-empty string, "
                          f"got {(bad or [next(k for k in value if not isinstance(k, str))])[0]!r}")
    return copy.deepcopy(value) or None


def set_value(cfg: RunConfig, key: str, raw) -> None:
    fields = _field_map(cfg)
    if key not in fields:
        close = [k for k in fields if k.split(".")[-1] == key.split(".")[-1]]
        hint = f" (did you mean {', '.join(close)}?)" if close else " (see field_help() for the keys)"
        raise ConfigError(f"unknown configuration key '{key}'{hint}")
    owner, f = fields[key]
    setattr(owner, f.name, convert_value(key, raw, f.type))


def apply_overrides(cfg: RunConfig, overrides) -> RunConfig:
    """A copy of cfg with ['section.key=value', ...] (as from `--set`) or {'section.key': value} applied.

    The one "None keeps" rule: a None value (a notebook parameter left at None) keeps the current
    value of any key; the string form `key=none` is how a nullable key is set to None. Unknown keys
    are refused either way. The original is left unchanged, also when an override is rejected.
    """
    cfg = copy.deepcopy(cfg)
    items = overrides.items() if isinstance(overrides, dict) else overrides or []
    for item in items:
        if isinstance(item, str):
            if "=" not in item:
                raise ConfigError(f"override '{item}' is not of the form key=value")
            key, raw = item.split("=", 1)
        else:
            key, raw = item
        if raw is None and key.strip() in _field_map(cfg):
            continue
        if key.strip() == "run" and raw != cfg.run:  # the run directory is named once: --run / RUN
            raise ConfigError(f"'run' cannot be overridden (run={raw!r}): the run is named by --run "
                              f"({cfg.run!r}); use --run {raw} to work on that run")
        set_value(cfg, key.strip(), raw)
    validate(cfg)
    return cfg


def make_config(profile: str | None = None, run: str | None = None, overrides=None) -> RunConfig:
    """A fresh RunConfig from a profile (default: $SFT_PROFILE or 'tiny'), then overrides."""
    profile = profile or default_profile()
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile '{profile}' (profiles: {', '.join(sorted(PROFILES))})")
    cfg = RunConfig()
    cfg.profile = profile
    for key, value in PROFILES[profile].items():
        set_value(cfg, key, value)
    if run is not None:
        cfg.run = run
    return apply_overrides(cfg, overrides or [])


def undecodable(text: str) -> str | None:
    """What makes `text` unusable as UTF-8 text, or None. Bytes a shell or terminal passed that are
    not UTF-8 arrive as lone surrogates (Python's surrogateescape); they cannot be tokenized or saved."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"character U+{code:04X}"
        return f"not valid UTF-8 text ({byte} at character {e.start + 1}); use UTF-8 text"


def check_chat_text(prompt: str | None, system: str | None) -> None:
    """SFTError naming chat's --prompt or --system when its text is not valid UTF-8 (before any model loads)."""
    for what, text in (("--prompt", prompt), ("--system", system)):
        problem = undecodable(text or "")
        if problem:
            raise SFTError(f"chat: {what} is {problem}")


def allowed(f: dataclasses.Field) -> str:
    """The values a field accepts, in words ("in [0, 1)", ">= 1, or None"); '' if not restricted."""
    r = f.metadata.get("range")
    if r is None:
        return ""
    return f"{r}, or None" if _base_types(f.type)[1] else str(r)


def check_range(key: str, value, f: dataclasses.Field) -> None:
    """Raise ConfigError naming `key` and its allowed values when `value` is out of the field's range.

    Every number must be finite; an int at most INT_MAX; a string must be encodable text (no lone
    surrogates, as a shell passes undecodable bytes)."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        problem = undecodable(value)
        if problem:
            raise ConfigError(f"{key}: {problem}")
        return
    if not isinstance(value, (int, float)):
        return
    r = f.metadata.get("range")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number{f' {allowed(f)}' if r else ''}, got {value}")
    if r is not None and not r.ok(value):
        raise ConfigError(f"{key}: must be {allowed(f)}, got {value!r}")
    if isinstance(value, int) and abs(value) > INT_MAX and not (r is not None and r.hi is not None):
        raise ConfigError(f"{key}: must be at most {INT_MAX}, got {value}")


def validate(cfg: RunConfig) -> RunConfig:
    """Check every field: run name, choices, numeric ranges (Range in the field metadata), text, and the
    cross-field rules (check_best_model)."""
    check_run_name(cfg.run)
    fields = _field_map(cfg)
    for key, choices in CHOICES.items():
        owner, f = fields[key]
        value = getattr(owner, f.name)
        if value not in choices:
            raise ConfigError(f"{key}: '{value}' is not one of {', '.join(choices)}")
    for key, (owner, f) in fields.items():
        check_range(key, getattr(owner, f.name), f)
    problem = check_columns(cfg.data.columns) or check_task_scores(cfg.eval.scores, cfg.eval.scorer)
    if problem:
        raise ConfigError(problem)
    fmt = cfg.data.prompt_format
    if fmt not in ("auto", "qa", "alpaca", "chatml") and "{{" not in fmt and "{%" not in fmt:
        raise ConfigError(f"data.prompt_format: '{fmt}' is not one of auto, qa, alpaca, chatml, nor a Jinja template")
    check_best_model(cfg)
    check_adapter(cfg)
    return cfg


def check_best_model(cfg: RunConfig, has_eval: bool = True) -> None:
    """The cross-field rules of train.load_best_model_at_end (and of early stopping, which needs it): it
    needs evaluations (an evaluation split, has_eval, and eval_strategy steps or epoch) and a checkpoint
    at every evaluation."""
    t = cfg.train
    if t.early_stopping_patience is not None and not t.load_best_model_at_end:
        raise ConfigError("train.early_stopping_patience needs train.load_best_model_at_end=true (the best "
                          "checkpoint is what early stopping keeps)")
    if t.early_stopping_threshold and t.early_stopping_patience is None:
        raise ConfigError("train.early_stopping_threshold needs train.early_stopping_patience (early stopping is off)")
    if t.best_metric == "task_score" and (cfg.eval.sample_prompts <= 0 or t.eval_strategy == "no"):
        raise ConfigError("train.best_metric=task_score needs eval prompts answered at each evaluation: "
                          "eval.sample_prompts above 0 and train.eval_strategy steps or epoch")
    if not t.load_best_model_at_end:
        return
    eval_strategy = t.eval_strategy if has_eval else "no"
    if eval_strategy == "no":
        raise ConfigError("train.load_best_model_at_end needs an evaluation split and train.eval_strategy steps or epoch")
    if t.save_strategy != eval_strategy:
        raise ConfigError("train.load_best_model_at_end: train.save_strategy must equal train.eval_strategy "
                          f"(now {t.save_strategy} and {eval_strategy})")
    if eval_strategy == "steps" and t.save_steps % t.eval_steps:
        raise ConfigError(f"train.load_best_model_at_end: train.save_steps ({t.save_steps}) must be a multiple "
                          f"of train.eval_steps ({t.eval_steps})")


# The optimizers LoRA+ (lora.loraplus_lr_ratio) can build itself: peft's create_loraplus_optimizer takes
# an optimizer class, which transformers' Trainer.get_optimizer_cls_and_kwargs gives for these names.
LORAPLUS_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit",
                       "paged_adamw_32bit", "paged_adamw", "sgd", "adagrad", "rmsprop")


def adapter_conflict(cfg: RunConfig) -> str | None:
    """Why peft (or bitsandbytes) cannot train, save or merge this adapter combination, naming both
    settings; None when it can. Checked in validate(), so nothing loads before it is refused."""
    lo, q = cfg.lora, cfg.quant
    if lo.init == "pissa" and q.mode != "none":
        return (f"lora.init=pissa with quant.mode={q.mode}: peft computes PiSSA's SVD on 16/32-bit weights and "
                "refuses bitsandbytes ones; use quant.mode=none, or lora.init=olora on a quantized base")
    if lo.init == "loftq" and q.mode != "4bit":
        return (f"lora.init=loftq with quant.mode={q.mode}: LoftQ cancels the 4-bit quantization error, so it "
                "needs quant.mode=4bit")
    if lo.use_dora and lo.init in ("pissa", "olora"):
        return (f"lora.use_dora with lora.init={lo.init}: peft converts a {lo.init}-initialised adapter for the "
                "original base from A and B only and drops DoRA's magnitudes, so the saved adapter could not be merged; use one "
                "of the two")
    if lo.use_dora and lo.init == "loftq":
        return ("lora.use_dora with lora.init=loftq: DoRA's magnitudes are computed before LoftQ replaces A and "
                "B, so they would not match; use one of the two")
    if lo.loraplus_lr_ratio is not None and cfg.train.optim not in LORAPLUS_OPTIMIZERS:
        return (f"lora.loraplus_lr_ratio with train.optim={cfg.train.optim}: LoRA+ builds the optimizer itself "
                f"and supports {', '.join(LORAPLUS_OPTIMIZERS)}")
    return None


def check_adapter(cfg: RunConfig) -> None:
    problem = adapter_conflict(cfg)
    if problem:
        raise ConfigError(problem)


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict, source: str = "config") -> RunConfig:
    """Build a RunConfig from a nested dict (as in config.yaml); unknown keys are an error."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(d).__name__}")
    cfg = RunConfig()
    flat = []
    for key, value in d.items():
        if isinstance(value, dict):
            flat.extend((f"{key}.{k}", v) for k, v in value.items())
        else:
            flat.append((key, value))
    try:
        for key, value in flat:
            set_value(cfg, key, value)
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def save_config(cfg: RunConfig, path) -> Path:
    """Write config.yaml atomically (rundir.write_atomic)."""
    path = Path(path)
    if path.is_dir() or path.suffix not in (".yaml", ".yml"):
        path = path / "config.yaml"
    header = "# Run configuration. Edit and rerun a stage, or override with `--set section.key=value`.\n"
    return write_atomic(path, header + yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))


MAX_DEPTH = 20  # config.yaml is two levels deep (section, key); lists and mappings as values add one or two
MAX_CONFIG_BYTES = 1 << 20


class PlainLoader(yaml.SafeLoader):
    """YAML without anchors and aliases, at most MAX_DEPTH levels deep, refused before anything is built.

    config.yaml never needs them; an alias bomb (2 KB that expand to gigabytes) or a nesting thousands of
    levels deep would otherwise cost minutes and gigabytes, or end in a RecursionError."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(None, None, "YAML anchors and aliases (&name, *name) are not allowed",
                                              event.start_mark)
        depth = getattr(self, "_depth", 0)
        if depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep",
                                              event.start_mark)
        self._depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth


def _config_text(path: Path) -> str:
    """The text of config.yaml: a regular file (a FIFO in its place would block the read forever), at most
    MAX_CONFIG_BYTES, UTF-8; anything else is a ConfigError naming the file (and line)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the file ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: not a regular file (a FIFO, device or folder); config.yaml must be a file")
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {st.st_size} bytes, more than a configuration holds "
                              f"({MAX_CONFIG_BYTES} at most)")
        raw = f.read(MAX_CONFIG_BYTES + 1)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not valid UTF-8 "
                          f"(byte 0x{raw[e.start]:02x}); save the file as UTF-8") from None


def load_config(path) -> RunConfig:
    path = Path(path)
    if path.is_dir():
        path = path / "config.yaml"
    if not path.exists():
        raise MissingStageError(f"{path} not found: {stage('prepare').first(path.parent.name)}")
    try:
        d = yaml.load(_config_text(path), Loader=PlainLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: {where}invalid YAML ({what})") from None
    return from_dict(d, source=str(path))


