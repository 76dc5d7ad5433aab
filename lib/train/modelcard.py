"""The model card: the README.md of a run's adapter folder (written by training) and of the repository a run is
pushed to, one text for both: what the model is and how it was made (base, data and its hash, adapter variant,
training figures, configuration), how well it does (the evaluation, merge and GGUF figures, on the Hub), and
how to load it.

    from lib.train.modelcard import model_card
    model_card(cfg, paths, training=summary)              # adapter/README.md, at the end of training
    model_card(cfg, paths, parts=["merged", "adapter"])   # push/README.md; 'REPO' stands for the repository id
"""

from __future__ import annotations

from lib.data.readers import recorded_data_hash
from lib.model.loading import MUTATING_INITS, adapter_variant
from lib.run.config import to_dict
from lib.run.formatting import num
from lib.run.rundir import is_pending, read_json, unusable


def _read(path):
    """A figure file for the model card: None when the stage has not run (a damaged one is an error)."""
    return read_json(path, "rerun the stage that writes it") if path.exists() else None


def _figures(paths, stage: str, path, verify=None):
    """A stage's figure file for the pushed card, or None when that stage's results are missing, interrupted,
    damaged or stale (of an earlier adapter or merge): left out, and said. verify: the files hashed (the
    figure file by default, not a model's weights)."""
    if not path.exists() and not is_pending(paths, stage):
        return None
    problem = unusable(paths, stage, verify=verify or [path.relative_to(paths.root).as_posix()])
    if problem:
        print(f"note: the model card leaves out the figures of {path.relative_to(paths.root)}: {problem}")
        return None
    return _read(path)


def _fmt(x, spec=".4f"):
    return format(x, spec) if isinstance(x, (int, float)) else "n/a"


def model_card(cfg, paths, parts=("adapter",), training: dict | None = None) -> str:
    """README.md for `parts` (of adapter, merged, gguf) of the run at `paths`.

    training: the summary of the training that just ended, for the adapter's own card (the evaluation and
    merge figures the run may hold are an earlier adapter's, so they are left out); None for a pushed
    repository, whose figures are all read from the run."""
    import yaml

    pushed = training is None
    training = (_read(paths.training_summary) or {}) if pushed else training
    lines = [*_front_matter(cfg, parts), f"# {cfg.run}" if pushed else f"# LoRA adapter: {cfg.run}", "",
             _description(cfg), "", *_facts(cfg, paths, parts), *_training_lines(training)]
    if pushed:
        lines += _evaluation_lines(paths) + _parity_lines(_figures(paths, "export", paths.parity) or {})
    lines += _use_lines(parts, pushed)
    lines += ["## Configuration", "", "```yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True).rstrip(),
              "```", ""]
    return "\n".join(lines)


def _front_matter(cfg, parts) -> list[str]:
    """The Hub's metadata; base_model only for a model the Hub knows (it refuses a card naming another)."""
    import yaml

    tags = ["qlora", "sft", "trl", "peft", "lora"] + (["gguf", "llama.cpp", "ollama"] if "gguf" in parts else [])
    front = {"library_name": "transformers" if "merged" in parts else "peft", "tags": tags}
    if cfg.model.name_or_path != "tiny":
        front["base_model"] = cfg.model.name_or_path
    return ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]


def _description(cfg) -> str:
    q = cfg.quant
    quant = f"{q.mode} {q.quant_type}" if q.mode == "4bit" else q.mode
    return (f"Supervised fine-tuning of `{cfg.model.name_or_path}` with QLoRA ({quant}, LoRA r={cfg.lora.r}, "
            f"alpha={cfg.lora.alpha}, targets {cfg.lora.target_modules}), loss on assistant tokens only.")


def _facts(cfg, paths, parts) -> list[str]:
    base = cfg.model.name_or_path
    return [f"- base model: `{base}`" + (" (built offline by lib/run/tiny.py)" if base == "tiny" else ""),
            f"- adapter: {adapter_variant(cfg)}" + _init_note(cfg),
            f"- data: `{cfg.data.path}` (format {cfg.data.format}), data hash `{recorded_data_hash(paths)}`",
            f"- contents: {', '.join(parts)}"]


def _init_note(cfg) -> str:
    if cfg.lora.init in MUTATING_INITS:
        return (f"; saved converted to a plain LoRA of rank {2 * cfg.lora.r} on the original base (peft's "
                "path_initial_model_for_weight_conversion)")
    if cfg.lora.init == "loftq":
        return "; made for the 4-bit NF4 base: merge it into the dequantized 4-bit weights (lib.ship.merge does)"
    return ""


def _training_lines(summary: dict) -> list[str]:
    """The figures of logs/training_summary.json (none when the run has not been trained)."""
    if not summary:
        return []
    best = summary.get("best_eval_loss")
    return [
        f"- steps: {summary.get('global_step')}, epochs: {summary.get('epoch')}, "
        f"tokens trained on: {summary.get('train_tokens')}",
        f"- eval loss: {num(summary.get('initial_eval_loss'))} before, {num(summary.get('final_eval_loss'))} after"
        + (f", best {best:.4f}" if isinstance(best, float) else ""),
        f"- trainable parameters: {summary.get('trainable_params')} of {summary.get('total_params')}",
        f"- adapter from step {summary.get('adapter_from_step')}"
        + (f" (stopped early at step {summary['stopped_at_step']})" if summary.get("stopped_early") else ""),
        f"- libraries: {', '.join(f'{k} {v}' for k, v in summary.get('versions', {}).items())}",
    ]


def _evaluation_lines(paths) -> list[str]:
    ppl = _figures(paths, "evaluate", paths.perplexity, verify=True) or {}  # all of eval/ checked: one set
    gen = (_read(paths.generation_metrics) or {}) if ppl else {}
    merge = _figures(paths, "merge", paths.merge_report) or {}
    lines = ["", "## Evaluation", "", "| model | perplexity (eval answers) |", "|---|---|"]
    for m in ("base", "tuned", "merged"):
        if isinstance(ppl.get(m), dict):
            lines.append(f"| {m} | {_fmt(ppl[m].get('perplexity'))} |")
    tuned = gen.get("tuned") if isinstance(gen, dict) else None
    if isinstance(tuned, dict):
        lines += ["", f"Generated answers ({gen.get('examples')} eval prompts): BLEU {_fmt(tuned.get('bleu'), '.1f')}, "
                      f"ROUGE-L {_fmt(tuned.get('rouge_l'), '.3f')}, stop rate {_fmt(tuned.get('stop_rate'), '.0%')}."]
    if merge:
        lines += ["", f"Merge check: perplexity drift of the merged model from the adapter model "
                      f"{_fmt(merge.get('relative_drift'), '.3%')} (tolerance {_fmt(merge.get('tolerance'), 'g')}), "
                      f"{'ok' if merge.get('ok') else 'FAILED'}."]
    return lines


def _parity_lines(parity: dict) -> list[str]:
    lines = []
    if parity:
        p, g, s = parity.get("perplexity", {}), parity.get("greedy", {}), parity.get("stop_rate", {})
        lines += ["", f"## GGUF parity ({parity.get('gguf')}, llama.cpp vs transformers)", "",
                  "| figure | llama.cpp | transformers | tolerance |", "|---|---|---|---|",
                  f"| perplexity | {_fmt(p.get('llama_cpp', {}).get('perplexity'))} | "
                  f"{_fmt(p.get('transformers', {}).get('perplexity'))} | drift {_fmt(p.get('relative_drift'), '.2%')} "
                  f"<= {_fmt(p.get('tolerance'), 'g')} |",
                  f"| greedy answers identical over {g.get('tokens')} tokens | {_fmt(g.get('agreement'), '.0%')} | | "
                  f">= {_fmt(g.get('min_agreement'), 'g')} |",
                  f"| stop rate | {_fmt(s.get('llama_cpp'), '.0%')} | {_fmt(s.get('transformers'), '.0%')} | "
                  f"difference <= {_fmt(s.get('tolerance'), 'g')} |",
                  f"| prompts tokenized identically | {parity.get('prompt_tokens', {}).get('identical')} of "
                  f"{parity.get('prompts')} | | all |", "",
                  f"Check: {'ok' if parity.get('ok') else 'FAILED: ' + '; '.join(parity.get('failures', []))}."]
    return lines


def _use_lines(parts, pushed: bool) -> list[str]:
    lines = ["", "## Use", ""]
    if "merged" in parts:
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained('REPO')",
                  "tokenizer = AutoTokenizer.from_pretrained('REPO')  # with the chat template used in training",
                  "```", ""]
    if "adapter" in parts and pushed:
        lines += ["The LoRA adapter alone: `PeftModel.from_pretrained(base, 'REPO', subfolder='adapter')`.", ""]
    elif "adapter" in parts:
        lines += ["```python", "from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer",
                  "model = AutoPeftModelForCausalLM.from_pretrained('adapter')",
                  "tokenizer = AutoTokenizer.from_pretrained('adapter')  # with the chat template used in training",
                  "```", ""]
    if "gguf" in parts:
        lines += ["GGUF: `llama-cli -m <file>.gguf`, or Ollama: download the .gguf and Modelfile, then "
                  "`ollama create NAME -f Modelfile`.", ""]
    return lines
