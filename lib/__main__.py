"""The command line: the headless twin of the notebooks.

    python -m lib prepare  --run NAME --data PATH_OR_DATASET_ID [--data ...] [--format auto] [--profile P] [--set k=v ...]
    python -m lib train    --run NAME [--set key=value ...] [--retrain]
    torchrun --nproc_per_node N -m lib -- train --run NAME   # several GPUs (the -- is needed: see README)
    python -m lib evaluate --run NAME [--set key=value ...]
    python -m lib plot     --run NAME
    python -m lib merge    --run NAME [--set key=value ...]
    python -m lib chat     --run NAME [--prompt TEXT] [--system TEXT] [--merged] [--tools FILE.json]
    python -m lib export   --run NAME [--quant q8_0] [--set export.key=value ...] [--allow-drift]
    python -m lib push     --run NAME --repo USER/NAME [--private] [--dry-run] [--include adapter,merged,gguf]
    python -m lib pipeline --run NAME --data PATH [--profile P] [--set key=value ...]
    python -m lib summary  --run NAME      # before/after: perplexity, questions, stop rate, one prompt
    python -m lib compare  RUN [RUN ...] [--figure PATH]   # settings that differ, losses, results, answers

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
import importlib
import sys

from lib.run.config import apply_overrides, check_chat_text, load_config
from lib.run.errors import QualityGateError, SFTError, disk_error
from lib.run.paths import outputs_dir, run_paths
from lib.run.rundir import is_main_rank
from lib.run.stages import pipeline_stages, stage


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lib", description="QLoRA supervised fine-tuning, headless.")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, help, data=False, sets=True):
        sp = sub.add_parser(name, help=help)
        sp.add_argument("--run", required=True, help="run name: outputs/<run>/")
        if data:
            sp.add_argument("--data", action="append",
                            help="a local file (also .gz, .bz2, .xz, .zst), a folder of files, a quoted glob "
                                 "('data/*.parquet') or a Hub dataset id; several --data mix several sources "
                                 "(data.mix_weights, data.mix_strategy); none: data.sources or data.path as set")
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
    ev = add("evaluate", "04: did it help? task scores base vs tuned with 95%% intervals, perplexity, forgetting")
    ev.add_argument("--null-control", action="store_true",
                    help="also score the adapter at its initial weights (the base) against the base: every task "
                         "score must show no detectable change (eval/null_control.json)")
    add("plot", "05: metric plots", sets=False)
    add("merge", "06: merge the adapter into a 16-bit base and check it")
    ch = add("chat", "06: chat with the tuned model", sets=False)
    ch.add_argument("--prompt", default=None, help="one message; prints one reply (default: a chat loop)")
    ch.add_argument("--system", default=None, help="system prompt")
    ch.add_argument("--merged", action="store_true", help="use merged/ instead of base + adapter")
    ch.add_argument("--tools", default=None,
                    help="a JSON file of tool schemas; shows the tool call the model makes (not executed)")
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
    co = sub.add_parser("compare", help="runs side by side: settings that differ, losses, results, answers")
    co.add_argument("runs", nargs="+", metavar="RUN", help="run names (outputs/<run>/)")
    co.add_argument("--figure", default=None, help="also draw the loss curves into this PNG file")
    return p


def _data(a):
    """--data: one path, several (sources to mix), or none when --set gives data.sources or data.path."""
    if a.data is None:
        if not any(o.split("=", 1)[0].strip() in ("data.sources", "data.path") for o in a.overrides):
            raise SFTError("--data is required: a file, folder, glob or Hub dataset id (or --set data.sources=[...])")
        return None
    return a.data[0] if len(a.data) == 1 else a.data


def _entry(name: str):
    """The function that runs stage `name`, from the stage registry (imported only now)."""
    module, function = stage(name).run.split(":")
    return getattr(importlib.import_module(module), function)


# How each command's arguments reach its entry point. A stage command runs its registry entry; chat and
# summary read a run and write nothing.
COMMANDS = {
    "prepare": lambda a: _entry("prepare")(a.run, _data(a), fmt=a.format, profile=a.profile, overrides=a.overrides,
                                           overwrite=getattr(a, "overwrite", False)),
    "train": lambda a: _entry("train")(a.run, overrides=a.overrides, retrain=getattr(a, "retrain", False)),
    "evaluate": lambda a: _entry("evaluate")(a.run, overrides=a.overrides, null_control=getattr(a, "null_control", False)),
    "plot": lambda a: _entry("plot")(a.run),
    "merge": lambda a: _entry("merge")(a.run, overrides=a.overrides),
    "export": lambda a: _entry("export")(a.run, quant=a.quant, overrides=a.overrides, allow_drift=a.allow_drift),
    "push": lambda a: _entry("push")(a.run, a.repo, private=a.private, dry_run=a.dry_run,
                                     include=a.include.split(",") if a.include else None),
    "chat": lambda a: importlib.import_module("lib.ship").run_chat(a.run, prompt=a.prompt, system=a.system,
                                                                   merged=a.merged, tools=a.tools),
    "summary": lambda a: print("\n" + importlib.import_module("lib.evaluate").before_after(a.run) + "\n"),
    "compare": lambda a: importlib.import_module("lib.evaluate").run_compare(a.runs, figure=a.figure),
}


def _pipeline(args) -> None:
    """Every pipeline stage in the registry's order (the --set overrides go to prepare, which saves them in
    config.yaml for the stages after it), then the before/after summary."""
    for s in pipeline_stages():
        if s.name == "prepare":
            COMMANDS["prepare"](args)
        else:
            COMMANDS[s.command](argparse.Namespace(run=args.run, overrides=[]))
    COMMANDS["summary"](args)
    print(f"done: results in {run_paths(args.run).root}")


def _refused_early(args) -> None:
    """What can be refused before a stage's imports (torch, transformers, TRL: ~10 s on a small machine): chat's
    text arguments, and --set against the run's config.yaml. The stage checks both again, the same way."""
    if args.command == "chat":
        check_chat_text(args.prompt, args.system)
    config = run_paths(args.run).config if args.command in ("train", "evaluate", "merge") else None
    if not (getattr(args, "overrides", None) and config is not None and config.is_file()):
        return
    try:
        cfg = load_config(config)
    except SFTError:
        return  # a damaged config.yaml: the stage says so, with its own advice
    apply_overrides(cfg, args.overrides)


def run_command(args) -> int:
    _refused_early(args)
    if args.command == "pipeline":
        _pipeline(args)
    else:
        COMMANDS[args.command](args)
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
    except Exception as e:  # a full or read-only disk, memory running out: one line (lib/run/errors.py, lib/model/oom.py)
        where = run_paths(args.run).root if getattr(args, "run", None) else outputs_dir()
        error = disk_error(e, args.command, where) or \
            importlib.import_module("lib.model.oom").stage_out_of_memory(e, args.command, getattr(args, "run", ""))
        if error is None:
            raise
        if is_main_rank():
            print(f"error: {error}", file=sys.stderr)
        return error.exit_status


if __name__ == "__main__":
    sys.exit(main())
