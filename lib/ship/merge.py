"""Merge the adapter into a 16-bit base, save it, and check the merged model against the adapter.

    python -m lib merge --run demo [--set merge.tolerance=0.02]

    from lib.ship.merge import run_merge
    report = run_merge("demo")          # writes outputs/demo/merged/ and merged/merge_report.json

The base model is reloaded in 16-bit (bf16 where supported, fp16 on older GPUs, fp32 on the CPU),
the adapter applied with peft and `merge_and_unload`ed; merging into a 4-bit (or 8-bit) base is
refused, since its weights would be re-quantized. merged/ holds the model (safetensors), the
tokenizer with the chat template training used, and a generation config whose end-of-sequence
ids include the template's end-of-turn token, so `AutoModelForCausalLM.from_pretrained("merged")`
plus `generate` stops where a reply ends.

The merge check (merged/merge_report.json) reloads merged/ by path and compares it with the
adapter model as training saw it, the 4-bit NF4 base + adapter, on the eval split:
- perplexity of both and the relative drift |ppl_merged - ppl_adapter| / ppl_adapter. The drift is
  mostly the quantization error of the base: the adapter was trained on top of NF4 weights and is
  now added to the original 16-bit weights, which differ from them by that error. A drift beyond
  `merge.tolerance` sets "ok": false and prints a warning.
- the largest logit difference (and the top-1 agreement) over the answer tokens of a few samples,
  against the adapter model and, to isolate the merge arithmetic itself, against the same 16-bit
  base with the adapter applied unmerged (this one should be ~1e-5 in fp32).
- the template round trip: the tokenizer saved in merged/ renders and tokenizes conversations
  exactly as the adapter's tokenizer (the one training used) does.
Everything is written into a temporary folder first, then moved to merged/.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from lib.data.prompts import prompt_messages, render_prompt
from lib.data.tokenization import IGNORE_INDEX, encode_example
from lib.data.tokenizer import load_tokenizer
from lib.evaluate.scoring import check_examples, perplexity
from lib.evaluate.verdict import form_comparison
from lib.model.generation import eval_conversations, generate_answers, generation_config
from lib.model.loading import load_16bit_with_adapter, load_merged, load_tuned_model
from lib.model.oom import out_of_memory
from lib.run.context import open_run
from lib.run.errors import QualityGateError, SFTError
from lib.run.formatting import table
from lib.run.hardware import release
from lib.run.paths import require, run_paths
from lib.run.rundir import (
    check_result,
    check_trained,
    install,
    remove_leftovers,
    run_lock,
    staging,
    write_json,
)
from lib.run.settings import RunConfig

LOGIT_SAMPLES = 4  # eval conversations whose logits are compared position by position

DRIFT_MEANING = (
    "relative_drift = |ppl_merged - ppl_adapter| / ppl_adapter, where the adapter model is the 4-bit "
    "NF4 base + adapter that training used and the merged model is the adapter merged into the "
    "original 16-bit weights. It measures mostly the quantization error of the base (the adapter "
    "learnt on top of NF4 weights, the merge adds it to the unquantized ones); the merge itself "
    "is exact up to rounding, see logits.max_abs_diff_vs_unmerged."
)


class MergeError(SFTError):
    """The adapter cannot be merged as asked (e.g. into a quantized base)."""


def quantization_of(model) -> str | None:
    """'4-bit' / '8-bit' if the model (or a peft model's base) has bitsandbytes-quantized weights."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "is_loaded_in_4bit", False):
        return "4-bit"
    if getattr(base, "is_loaded_in_8bit", False):
        return "8-bit"
    for module in base.modules():
        name = type(module).__name__
        if name in ("Linear4bit", "LinearNF4", "LinearFP4"):
            return "4-bit"
        if name == "Linear8bitLt":
            return "8-bit"
    return None


def merge_adapter(peft_model):
    """merge_and_unload a peft model whose base is 16/32-bit; refuse a quantized base."""
    q = quantization_of(peft_model)
    if q is not None:
        raise MergeError(
            f"refusing to merge the adapter into a {q} quantized base model: the merged weights would be "
            "re-quantized, losing the adapter's precision. Reload the base in 16-bit (fp32 on the CPU) "
            "and merge into that, as `run_merge` (python -m lib merge) does.")
    if not hasattr(peft_model, "merge_and_unload"):
        raise MergeError("merge_adapter expects a peft model (base + adapter)")
    return peft_model.merge_and_unload()


def save_merged(model, tokenizer, out_dir, settings=None) -> Path:
    """Save a merged model in safetensors with the tokenizer (and its chat template) and a
    generation config that stops at the end-of-turn token."""
    out_dir = Path(out_dir)
    model.generation_config = generation_config(settings, tokenizer, getattr(model, "generation_config", None))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if not any(out_dir.glob("*.safetensors")):
        raise MergeError(f"{out_dir}: the merged weights were not saved as safetensors")
    return out_dir


def template_round_trip(reference_tokenizer, tokenizer, examples: list[dict], max_length=None) -> dict:
    """Does `tokenizer` render and tokenize conversations exactly as `reference_tokenizer`?

    Compares, per conversation, the rendered text, the generation prompt, the token ids and the
    trained-token labels. Returns {"ok", "conversations", "mismatches": [...]}.
    """
    mismatches = []
    checked = 0
    for i, ex in enumerate(examples):
        if not ex.get("messages"):
            continue
        checked += 1
        ref = encode_example(reference_tokenizer, ex, max_length)
        new = encode_example(tokenizer, ex, max_length)
        prompt = prompt_messages(ex["messages"])[0]
        render_same = (reference_tokenizer.apply_chat_template(ex["messages"], tokenize=False)
                       == tokenizer.apply_chat_template(ex["messages"], tokenize=False))
        prompt_same = render_prompt(reference_tokenizer, prompt) == render_prompt(tokenizer, prompt)
        for what, same in (("render", render_same), ("generation prompt", prompt_same),
                           ("token ids", ref["input_ids"] == new["input_ids"]),
                           ("labels", ref["labels"] == new["labels"])):
            if not same:
                mismatches.append(f"example {i + 1}: {what} differ")
    return {"ok": not mismatches, "conversations": checked, "mismatches": mismatches[:20]}


def answer_logits(model, tokenizer, examples: list[dict], max_length: int) -> list:
    """Per example, the logits (float32, on the CPU) at the positions that predict a trained token."""
    import torch

    out = []
    for ex in examples:
        enc = encode_example(tokenizer, ex, max_length)
        labels = torch.tensor(enc["labels"])
        ids = torch.tensor([enc["input_ids"]], device=model.device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float().cpu()
        where = (labels[1:] != IGNORE_INDEX).nonzero().flatten()
        out.append(logits[:-1][where])
    return out


def compare_logits(a: list, b: list) -> dict:
    """Largest absolute logit difference and top-1 agreement between two answer_logits results."""
    diffs, agree, n = [], 0, 0
    for x, y in zip(a, b, strict=True):
        if x.numel():
            diffs.append((x - y).abs().max().item())
            agree += (x.argmax(-1) == y.argmax(-1)).sum().item()
            n += x.shape[0]
    scale = max((t.abs().max().item() for t in a if t.numel()), default=0.0)
    return {"max_abs_diff": max(diffs, default=0.0), "top1_agreement": agree / n if n else 1.0,
            "positions": n, "logit_scale": scale}


def _merge_and_save(cfg: RunConfig, adapter_dir, tokenizer, sample_examples, out_dir, info=None) -> tuple[list, str]:
    """Merge into the 16-bit base and save; returns the unmerged base + adapter's answer logits (to
    isolate the merge arithmetic) and the merged dtype."""
    peft_model = load_16bit_with_adapter(cfg, adapter_dir, info=info)
    dtype = peft_model.get_base_model().dtype
    unmerged_logits = answer_logits(peft_model, tokenizer, sample_examples, cfg.train.max_length)
    merged = merge_adapter(peft_model)
    save_merged(merged, tokenizer, out_dir, cfg.generation)
    del merged, peft_model
    release()
    return unmerged_logits, str(dtype).replace("torch.", "")


def _answers(model, tokenizer, eval_examples, cfg) -> list[dict]:
    """Greedy-or-configured answers to the eval prompts (up to eval.generate_examples), as evaluation makes them."""
    import torch

    chosen = eval_conversations(eval_examples)[:max(0, cfg.eval.generate_examples)]
    if not chosen:
        return []
    torch.manual_seed(cfg.train.seed)
    return generate_answers(model, tokenizer, [c[1] for c in chosen], cfg.generation, cfg.eval.batch_size,
                            progress=False, max_length=cfg.train.max_length)


def _score_merged(out_dir, tokenizer, eval_examples, sample_examples, cfg, info=None) -> dict:
    """The merged model as a user gets it (loaded by path): template round trip, perplexity, logits, eos, and
    its answers to the eval prompts (for the task scores of the form it ships in)."""
    max_length = cfg.train.max_length
    merged, merged_tok = load_merged(out_dir, info=info)
    out = {"template": template_round_trip(tokenizer, merged_tok, eval_examples, max_length),
           "ppl": perplexity(merged, merged_tok, eval_examples, cfg.eval.batch_size, max_length),
           "logits": answer_logits(merged, merged_tok, sample_examples, max_length),
           "eos": merged.generation_config.eos_token_id,
           "answers": _answers(merged, merged_tok, eval_examples, cfg)}
    del merged
    release()
    return out


def _score_adapter(cfg, adapter_dir, tokenizer, eval_examples, sample_examples, info=None) -> dict:
    """The adapter model as training saw it (quantized base + adapter): perplexity, logits, quantization."""
    max_length = cfg.train.max_length
    adapter_model, _ = load_tuned_model(cfg, adapter_dir, info=info)
    out = {"ppl": perplexity(adapter_model, tokenizer, eval_examples, cfg.eval.batch_size, max_length),
           "logits": answer_logits(adapter_model, tokenizer, sample_examples, max_length),
           "quant": quantization_of(adapter_model) or "none",
           "answers": _answers(adapter_model, tokenizer, eval_examples, cfg)}
    del adapter_model
    release()
    return out


def merge_and_check(cfg: RunConfig, adapter_dir, eval_examples: list[dict], out_dir,
                    samples: int = LOGIT_SAMPLES, split: str = "eval", info: dict | None = None) -> dict:
    """Merge `adapter_dir` into the 16-bit base of `cfg`, save into `out_dir`, check, write the report.
    info: the device (the stage's RunContext holds it; resolved by the loaders if not given)."""
    out_dir = Path(out_dir)
    sample_examples = eval_examples[:samples]
    tokenizer = load_tokenizer(cfg, path=str(adapter_dir))  # saved by training, with its chat template
    unmerged_logits, dtype = _merge_and_save(cfg, adapter_dir, tokenizer, sample_examples, out_dir, info)
    merged = _score_merged(out_dir, tokenizer, eval_examples, sample_examples, cfg, info)
    adapter = _score_adapter(cfg, adapter_dir, tokenizer, eval_examples, sample_examples, info)
    report = _report(cfg, merged, adapter, unmerged_logits)
    report.update({
        "merged_dtype": dtype,
        "adapter_base_quantization": adapter["quant"],
        # LoftQ adapters correct the 4-bit weights, so they merge into those, dequantized (lib.model.loading)
        "merge_base": "dequantized 4-bit (LoftQ)" if cfg.lora.init == "loftq" else "original weights",
        "base_model": cfg.model.name_or_path,
        "adapter": str(adapter_dir),
        "split": split,
        "examples": len(eval_examples),
        "warnings": report.pop("warnings"),
        "meaning": DRIFT_MEANING,
    })
    if merged["answers"]:  # the task scores of the form it ships in, paired against the adapter's
        chosen = eval_conversations(eval_examples)[:len(merged["answers"])]
        report["task_scores"] = form_comparison(cfg, chosen, eval_examples,
                                                {"adapter": adapter["answers"], "merged": merged["answers"]})
    write_json(out_dir / "merge_report.json", report)
    return report


def _report(cfg, merged: dict, adapter: dict, unmerged_logits) -> dict:
    """The figures of the check and the warnings they raise (in the report's key order)."""
    ppl_merged, ppl_adapter = merged["ppl"], adapter["ppl"]
    drift = abs(ppl_merged["perplexity"] - ppl_adapter["perplexity"]) / ppl_adapter["perplexity"]
    vs_adapter = compare_logits(merged["logits"], adapter["logits"])
    vs_unmerged = compare_logits(merged["logits"], unmerged_logits)
    tol = cfg.merge.tolerance
    warnings_ = []
    if not drift <= tol:
        warnings_.append(
            f"merged model's perplexity drifts {drift:.2%} from the adapter model's "
            f"({ppl_merged['perplexity']:.6g} vs {ppl_adapter['perplexity']:.6g}), beyond merge.tolerance={tol:g}")
    if not merged["template"]["ok"]:
        warnings_.append("the merged tokenizer does not render conversations as training did: "
                         + "; ".join(merged["template"]["mismatches"][:3]))
    eos = merged["eos"]
    return {
        "ok": not warnings_,
        "tolerance": tol,
        "relative_drift": drift,
        "perplexity": {"merged": ppl_merged, "adapter": ppl_adapter},
        "logits": {
            "samples": len(merged["logits"]),
            "positions": vs_adapter["positions"],
            "max_abs_diff_vs_adapter": vs_adapter["max_abs_diff"],
            "top1_agreement_vs_adapter": vs_adapter["top1_agreement"],
            "max_abs_diff_vs_unmerged": vs_unmerged["max_abs_diff"],
            "top1_agreement_vs_unmerged": vs_unmerged["top1_agreement"],
            "max_abs_logit": vs_adapter["logit_scale"],
        },
        "template": merged["template"],
        "eos_token_id": eos if isinstance(eos, list) else [eos],
        "warnings": warnings_,
    }


def run_merge(run: str, overrides=(), gate: bool = True) -> dict:
    """Entry point of notebook 06 and `python -m lib merge`: merge, check, return the report.

    overrides: ["merge.tolerance=0.02", ...] or {"merge.tolerance": 0.02} (None values keep the config's).
    gate: raise QualityGateError (CLI exit 1) when the check fails and merge.fail_on_drift is true;
    notebook 06 passes False to show the report first, and its check cell asserts gate_failure(report).
    """
    paths = run_paths(run)
    with run_lock(paths, "merge"):
        report = _run_merge(paths, run, overrides)
    failure = gate_failure(report)
    if gate and failure:
        raise QualityGateError(failure)
    return report


def gate_failure(report: dict) -> str | None:
    """One line saying which figure missed which tolerance, or None when the check passed or is waived."""
    if report["ok"] or not report.get("fail_on_drift", True):
        return None
    return (f"merge check failed: {report['warnings'][0]}; the merged model is kept in merged/ for inspection; "
            "to accept it anyway set merge.fail_on_drift=false (`--set merge.fail_on_drift=false`)")


def _run_merge(paths, run, overrides) -> dict:
    require(paths, "config", "adapter", "eval_data")
    # what merge reads: the adapter and the prepared data, intact and complete (never eval/: merge does not
    # depend on evaluate, whose results may be interrupted or stale)
    sources = {"prepare": check_result(paths, "prepare"), "train": check_trained(paths)}
    # merge folders of a merge that was killed (as large as the model; no live writer: we hold the lock)
    remove_leftovers(paths.root, r"\.merged-[A-Za-z0-9_]{8}|\.merged-old(-\d+)?")
    ctx = open_run(run, "merge", overrides)
    cfg = ctx.cfg
    examples, split = check_examples(paths, cfg)
    with staging(paths.root, ".merged-") as tmp:
        with out_of_memory("merge", cfg, doing="merging into the 16-bit base or checking the merged model", run=run):
            report = merge_and_check(cfg, paths.adapter, examples, tmp, split=split, info=ctx.device)
        report["fail_on_drift"] = cfg.merge.fail_on_drift
        write_json(tmp / "merge_report.json", report)
        # every file of merged/ in the manifest: readers hash them (a zeroed or truncated weight file is refused)
        files = sorted(f"{paths.merged.name}/{p.relative_to(tmp).as_posix()}" for p in tmp.rglob("*") if p.is_file())
        install(paths, "merge", {paths.merged: tmp}, files, sources)
    lg = report["logits"]
    print(f"merged into {paths.merged} ({report['merged_dtype']}): perplexity {report['perplexity']['merged']['perplexity']:.6g} "
          f"vs adapter {report['perplexity']['adapter']['perplexity']:.6g} (drift {report['relative_drift']:.3%}, "
          f"tolerance {report['tolerance'] * 100:.3g}%); max logit difference {lg['max_abs_diff_vs_adapter']:.3g} "
          f"vs adapter, {lg['max_abs_diff_vs_unmerged']:.2g} vs unmerged")
    if report.get("task_scores"):
        print(report["task_scores"]["sentence"])
    for w in report["warnings"]:
        warnings.warn(f"merge check: {w}", stacklevel=3)
        print(f"WARNING: merge check failed: {w}")
    return report


def _task_rows(ts: dict | None) -> list[tuple]:
    """The merged model's task scores against the adapter's on the same prompts (the form it ships in)."""
    if not ts or not ts.get("rows"):
        return []
    return [(f"task score as merged: {r['metric']}", f"{100 * r['tuned']:.0f}% vs adapter {100 * r['base']:.0f}%",
             f"not checked: {r['difference'] * 100:+.0f} points (95% CI {r['ci95'][0] * 100:+.0f} to "
             f"{r['ci95'][1] * 100:+.0f}, n={r['n']}): {r['verdict']}; the same prompts and decoding, paired")
            for r in ts["rows"]]


def merge_table(report: dict):
    """The merge report for notebook 06: each figure, and what it means (what passes, what would be alarming)."""
    import pandas as pd

    p, lg, dt = report["perplexity"], report["logits"], report.get("merged_dtype", "16-bit")
    tol = f"{report['tolerance'] * 100:.3g}%"
    rows = [
        ("perplexity, adapter model (4-bit base + adapter)", f"{p['adapter']['perplexity']:.6g}",
         "the model as training saw it: the reference"),
        (f"perplexity, merged model ({dt})", f"{p['merged']['perplexity']:.6g}", "the model you ship"),
        ("relative drift", f"{report['relative_drift']:.2%}",
         f"checked: passes up to {tol} (merge.tolerance). The adapter learnt on NF4-rounded weights and now sits "
         f"on the original {dt} ones, so a drift of a few % is the quantization error, expected; tens of % "
         "would mean the merged model is not the trained one"),
        ("max |logit difference| vs adapter model", f"{lg['max_abs_diff_vs_adapter']:.3g}",
         "not checked: the largest gap over all positions and the whole vocabulary; the 4-bit and the full-precision "
         "base differ in every weight, so single logits far apart (even 10 or more) are normal"),
        ("top-1 agreement vs adapter model", f"{lg['top1_agreement_vs_adapter']:.1%}",
         "not checked: positions where both pick the same next token; near-ties flip with the base's rounding, "
         "so 70-90% is usual; far below would be worth a look"),
        (f"max |logit difference| vs unmerged {dt} (merge only)", f"{lg['max_abs_diff_vs_unmerged']:.2g}",
         "checked: the merge arithmetic alone (same base, adapter merged or not); must be below 0.01 (rounding), "
         "more means the merge went wrong"),
        ("template round trip", "identical" if report["template"]["ok"] else "DIFFERENT",
         "checked: the saved tokenizer renders conversations exactly as training did"),
        ("end-of-sequence ids", ", ".join(map(str, report["eos_token_id"])), "where generation stops"),
        *_task_rows(report.get("task_scores")),
        ("check", "ok" if report["ok"] else "FAILED", "drift within tolerance and template identical"),
    ]
    return table(pd.DataFrame(rows, columns=["measure", "value", "what it means"]).set_index("measure"))
