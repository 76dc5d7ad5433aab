"""What the "did it help?" evaluation costs: seconds per 100 eval prompts answered by both models (base and
tuned, the evaluation's own batched generation), on a trained run.

    python bench/eval_cost.py --run json1 [--prompts 100] [--max-new-tokens 96]

The run's eval prompts are repeated until there are `--prompts` of them; both models answer them as
`python -m lib evaluate` does (lib/model/generation.py generate_answers, eval.batch_size, the run's
generation settings, max_new_tokens as given). Prints the seconds, the new tokens and the seconds per 100
prompts; run it alone on the machine (other processes on the same cores make the figure meaningless).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's generation.max_new_tokens")
    a = ap.parse_args(argv)

    from lib.data.readers import read_examples
    from lib.model.generation import eval_conversations, generate_answers
    from lib.model.loading import load_tuned_model
    from lib.run.config import load_config
    from lib.run.paths import run_paths

    paths = run_paths(a.run)
    cfg = load_config(paths.config)
    settings = cfg.generation if a.max_new_tokens is None else dataclasses.replace(
        cfg.generation, max_new_tokens=a.max_new_tokens)
    chosen = eval_conversations(read_examples(paths.eval_data))
    prompts = [chosen[i % len(chosen)][1] for i in range(a.prompts)]
    model, tokenizer = load_tuned_model(cfg, paths.adapter)
    out = {"run": a.run, "model": cfg.model.name_or_path, "prompts": len(prompts), "batch_size": cfg.eval.batch_size,
           "max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample}
    for name in ("base", "tuned"):
        started = time.perf_counter()
        if name == "base":
            with model.disable_adapter():
                answers = generate_answers(model, tokenizer, prompts, settings, cfg.eval.batch_size, progress=False,
                                           max_length=cfg.train.max_length)
        else:
            answers = generate_answers(model, tokenizer, prompts, settings, cfg.eval.batch_size, progress=False,
                                       max_length=cfg.train.max_length)
        out[f"{name}_seconds"] = round(time.perf_counter() - started, 1)
        out[f"{name}_new_tokens"] = sum(len(tokenizer(x["text"])["input_ids"]) for x in answers)
    out["seconds_per_100_prompts_both_models"] = round(
        (out["base_seconds"] + out["tuned_seconds"]) * 100 / len(prompts), 1)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
