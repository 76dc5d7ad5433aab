"""Replay against forgetting on SmolLM2-135M-Instruct: 0%, 10% and 25% of general data mixed into training.

    python bench/replay.py                      # smol profile, CPU: three runs, about 25 minutes on 2 cores
    python bench/replay.py --set train.max_steps=2 --set eval.generate_examples=2 --replay-tokens 8 --shares 0,0.25
        # a quick check of the script: 5 minutes on 2 cores (the tiny profile cannot serve: its random model's
        # answers are empty, so there is nothing to replay, and the script says so)

The general data are the base model's own answers to general prompts, made by the forgetting check itself:
the 40 prompts of data/general_prompts.jsonl are split in two, the first `eval.general_examples` (the
profile's) measure forgetting as ever, and the base model's answers to the others (an evaluation of the 0%
run with `eval.general_prompts` pointed at them and longer answers, eval/forgetting_base.jsonl) become the
replay set, so no prompt that measures forgetting is ever trained on. Each replay run mixes the replay set
into the task data (the profile's data.path) with data.mix_weights, keeping every task example exactly
once (interleave_under when the replay set is larger than the share needs, interleave_over when it must
repeat), and never evaluates on it (its eval_fraction is 0), so the task's eval loss is comparable. The
table: the share of replay examples in the training split, the forgetting ratio and mean KL(base || tuned)
on the held-out general prompts, the task's eval loss, base and tuned, and the evaluation's first task score
(eval/verdict.json) where one fits the references. Figures: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

GENERAL = REPO_ROOT / "data" / "general_prompts.jsonl"


def _train(run: str) -> None:
    from lib.run.stages import stage

    module, function = stage("train").run.split(":")
    getattr(__import__(module, fromlist=[function]), function)(run, overrides=[], retrain=True)


def replay_rows(forgetting_base: Path) -> list[dict]:
    """The base model's answers as training records ({"messages": prompt turns + the answer}); the answers
    cut at the token limit are left out (they would teach stopping mid-sentence) unless too few stopped."""
    rows = [json.loads(line) for line in forgetting_base.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if r.get("answer", "").strip()]
    if not rows:
        raise SystemExit(f"{forgetting_base}: the base model gave no answer with text: nothing to replay")
    stopped = [r for r in rows if r.get("stopped")]
    keep = stopped if len(stopped) >= max(4, len(rows) // 3) else rows
    return [{"messages": r["messages"] + [{"role": "assistant", "content": r["answer"]}]} for r in keep]


def mix_for(task_train: int, replay: int, share: float) -> tuple[list, str]:
    """The weights and strategy that keep every task example once and give the replay set `share` of the split."""
    weights = [round(100 * (1 - share)), round(100 * share)]
    # the source that runs out first sets the size under interleave_under: the task must be that one
    task_first = task_train * 100 / weights[0] <= replay * 100 / weights[1]
    return weights, "interleave_under" if task_first else "interleave_over"


def _row(name: str, share: float, result: dict, report: dict) -> dict:
    f = result.get("forgetting") or {}
    ppl = result["perplexity"]
    sources = {s["source"]: s for s in report.get("sources") or []}
    replay = next((s for n, s in sources.items() if n.startswith("replay")), None)
    return {"run": name, "replay_share_asked": share, "replay_share": replay["share"] if replay else 0.0,
            "train_examples": report["counts"]["train"], "forgetting_ratio": f.get("ratio"), "mean_kl": f.get("mean_kl"),
            "task_eval_loss_base": ppl["base"]["loss"], "task_eval_loss_tuned": ppl["tuned"]["loss"],
            "task_score": next(({k: r[k] for k in ("metric", "base", "tuned", "ci95", "n", "verdict")}
                                for r in (result.get("verdict") or {}).get("rows", []) if r.get("kind") == "task"), None)}


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="smol")
    ap.add_argument("--shares", default="0,0.1,0.25", help="replay shares of the training split")
    ap.add_argument("--run", default="bench-replay")
    ap.add_argument("--replay-tokens", type=int, default=128, help="longest base answer of the replay set")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting for every run, e.g. train.max_steps=4 (a quick check of the script)")
    args = ap.parse_args(argv)
    from lib.data.prepare import run_prepare
    from lib.evaluate.evaluation import run_evaluate
    from lib.run.config import make_config
    from lib.run.paths import run_paths

    cfg = make_config(args.profile, run=args.run)
    measured = cfg.eval.general_examples or 16
    prompts = GENERAL.read_text(encoding="utf-8").splitlines()
    work = run_paths(args.run).root.parent / f"{args.run}-data"
    work.mkdir(parents=True, exist_ok=True)
    pool = work / "general_pool.jsonl"
    pool.write_text("\n".join(prompts[measured:]) + "\n", encoding="utf-8")
    task = cfg.data.path
    base = f"{args.run}-0"
    report = run_prepare(base, task, profile=args.profile, overwrite=True, overrides=args.overrides)
    _train(base)
    run_evaluate(base, overrides=[f"eval.general_prompts={pool}", "eval.general_examples=null",
                                  f"eval.general_max_new_tokens={args.replay_tokens}"], progress=False)
    replay = work / "replay.jsonl"
    rows = replay_rows(run_paths(base).forgetting_base)
    replay.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    measure = [f"eval.general_prompts={GENERAL}", f"eval.general_examples={measured}"]
    table = [_row(base, 0.0, run_evaluate(base, overrides=measure, progress=False), report)]
    for share in [float(s) for s in args.shares.split(",") if float(s) > 0]:
        name = f"{args.run}-{round(share * 100)}"
        weights, how = mix_for(report["counts"]["train"], len(rows), share)
        sources = json.dumps([{"path": task}, {"path": str(replay), "eval_fraction": 0}])
        mixed = run_prepare(name, profile=args.profile, overwrite=True,
                            overrides=[*args.overrides, f"data.sources={sources}", f"data.mix_weights={weights}",
                                       f"data.mix_strategy={how}"])
        _train(name)
        table.append(_row(name, share, run_evaluate(name, overrides=measure, progress=False), mixed))
    print(f"\nreplay ({len(rows)} general answers by the base model), profile {args.profile}:")
    print("| replay asked | replay share | train examples | forgetting ratio | mean KL | task eval loss base | tuned "
          "| task score base -> tuned |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in table:
        score = r["task_score"]
        score = (f"{score['metric']} {score['base']:.0%} -> {score['tuned']:.0%} (n={score['n']}, {score['verdict']})"
                 if score else "none fits the references (free text)")
        print(f"| {r['replay_share_asked']:.0%} | {r['replay_share']:.1%} | {r['train_examples']} | "
              f"{_num(r['forgetting_ratio'], '.2f')} | {_num(r['mean_kl'], '.3f')} | {r['task_eval_loss_base']:.3f} | "
              f"{r['task_eval_loss_tuned']:.3f} | {score} |")
    (work / "replay_results.json").write_text(json.dumps(table, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
