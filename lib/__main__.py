"""The command line: the headless twin of the notebooks.

    python -m lib prepare  --run NAME --data PATH_OR_DATASET_ID [--format auto] [--profile P] [--set k=v ...]
    python -m lib train    --run NAME [--set key=value ...] [--retrain]
    torchrun --nproc_per_node N -m lib -- train --run NAME   # several GPUs (the -- is needed: see README)
    python -m lib evaluate --run NAME [--set key=value ...]
    python -m lib plot     --run NAME
    python -m lib merge    --run NAME [--set key=value ...]
    python -m lib chat     --run NAME [--prompt TEXT] [--system TEXT]
    python -m lib export   --run NAME [--quant q8_0] [--set export.key=value ...] [--allow-drift]
    python -m lib push     --run NAME --repo USER/NAME [--private] [--dry-run] [--include adapter,merged,gguf]
    python -m lib pipeline --run NAME --data PATH [--profile P] [--set key=value ...]
    python -m lib summary  --run NAME      # before/after: perplexity, questions, stop rate, one prompt

Exit status 0 on success; bad input (data, configuration, a stage not run yet, a damaged, stale or
half-written result in the run directory, another process writing the same run) prints one line
`error: ...` on stderr and exits 2, with no traceback. A quality gate that fails prints one line
naming the figure and its tolerance and exits 1: the merge check (perplexity drift beyond
merge.tolerance; `--set merge.fail_on_drift=false` accepts it) and the export's parity check
(`--allow-drift` accepts it). Out of memory in training, evaluation or merge prints `error: out of
memory in ...` (where, the peak against the card, the three settings most likely to make this run fit,
the checkpoint kept) and exits 3: the input was fine, the settings do not fit this machine.
"""

from __future__ import annotations

import argparse
import sys

from .errors import QualityGateError, SFTError
from .rundir import is_main_rank


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lib", description="QLoRA supervised fine-tuning, headless.")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, help, data=False, sets=True):
        sp = sub.add_parser(name, help=help)
        sp.add_argument("--run", required=True, help="run name: outputs/<run>/")
        if data:
            sp.add_argument("--data", required=True, help="a local file or folder, or a Hub dataset id")
            sp.add_argument("--format", default="auto", help="record format (default: detect)")
            sp.add_argument("--profile", default=None, help="tiny, smol, t4 or a100 (default: $SFT_PROFILE or tiny)")
        if sets:
            sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help="override a configuration key, e.g. train.learning_rate=1e-4")
        return sp

    pr = add("prepare", "01: load, normalise, split and audit the data", data=True)
    pr.add_argument("--overwrite", action="store_true", help="replace a run trained on other data")
    tr = add("train", "02+03: configure the QLoRA model and train (resumes)")
    tr.add_argument("--retrain", action="store_true", help="start over even if the run has finished")
    add("evaluate", "04: perplexity and generation metrics, base vs tuned")
    add("plot", "05: metric plots", sets=False)
    add("merge", "06: merge the adapter into a 16-bit base and check it")
    ch = add("chat", "06: chat with the tuned model", sets=False)
    ch.add_argument("--prompt", default=None, help="one message; prints one reply (default: a chat loop)")
    ch.add_argument("--system", default=None, help="system prompt")
    ch.add_argument("--merged", action="store_true", help="use merged/ instead of base + adapter")
    ex = add("export", "06: GGUF for llama.cpp / Ollama, a Modelfile and a parity check")
    ex.add_argument("--quant", default=None, help="f16, q8_0, q4_k_m, ... (default: export.quant of the config)")
    ex.add_argument("--allow-drift", action="store_true", help="exit 0 even when the parity check fails")
    pu = add("push", "06: upload adapter, merged model and GGUF with a model card to the Hub", sets=False)
    pu.add_argument("--repo", required=True, help="the Hub repository, user/name")
    pu.add_argument("--private", action="store_true", help="create the repository private")
    pu.add_argument("--dry-run", action="store_true", help="write the folder that would be uploaded, upload nothing")
    pu.add_argument("--include", default=None, help="comma-separated: adapter, merged, gguf (default: those there)")
    add("pipeline", "every stage in order, then the before/after summary", data=True)
    add("summary", "the before/after summary of an evaluated run", sets=False)
    return p


def run_command(args) -> int:
    cmd = args.command
    if cmd in ("prepare", "pipeline"):
        from .data import run_prepare

        run_prepare(args.run, args.data, fmt=args.format, profile=args.profile, overrides=args.overrides,
                    overwrite=getattr(args, "overwrite", False))
    if cmd == "train":
        from .train import run_train

        run_train(args.run, overrides=args.overrides, retrain=args.retrain)
    if cmd == "pipeline":
        from .train import run_train

        run_train(args.run)
    if cmd in ("evaluate", "pipeline"):
        from .evaluate import run_evaluate

        run_evaluate(args.run, overrides=args.overrides if cmd == "evaluate" else ())
    if cmd in ("plot", "pipeline"):
        from .plots import run_plots

        run_plots(args.run)
    if cmd in ("merge", "pipeline"):
        from .merge import run_merge

        run_merge(args.run, overrides=args.overrides if cmd == "merge" else ())
    if cmd == "chat":
        from .chat import run_chat

        run_chat(args.run, prompt=args.prompt, system=args.system, merged=args.merged)
    if cmd in ("summary", "pipeline"):
        from .summary import before_after

        print("\n" + before_after(args.run) + "\n")
    if cmd == "export":
        from .export import run_export

        report = run_export(args.run, quant=args.quant, overrides=args.overrides)
        if not report["ok"] and not args.allow_drift:
            raise QualityGateError(f"parity check failed: {report['failures'][0]} (export/parity.json; "
                                   "--allow-drift accepts it)")
    if cmd == "push":
        from .push import run_push

        run_push(args.run, args.repo, private=args.private, dry_run=args.dry_run,
                 include=args.include.split(",") if args.include else None)
    if cmd == "pipeline":
        from .paths import run_paths

        print(f"done: results in {run_paths(args.run).root}")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run_command(args)
    except SFTError as e:
        if is_main_rank():
            print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_status", 2)
    except QualityGateError as e:  # the job ran, the result missed a stated tolerance
        if is_main_rank():
            print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
