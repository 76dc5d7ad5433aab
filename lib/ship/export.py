"""Export (notebook 06): merged/ -> a GGUF for llama.cpp, Ollama and LM Studio, a Modelfile, a parity check.

    python -m lib export --run demo [--quant q8_0] [--set export.parity_tokens=16] [--allow-drift]

    from lib.ship.export import run_export
    from lib.ship.parity import parity_table
    report = run_export("demo", quant="q4_k_m")   # export/demo-q4_k_m.gguf, export/Modelfile, export/parity.json

The stage wires the steps, each in its own module: llama.cpp's converter and quantizer make the
GGUF (lib/ship/llamacpp.py), an Ollama `Modelfile` goes beside it (lib/ship/ollama.py: FROM the GGUF, the chat
template as an Ollama template, a `stop` per end-of-turn token of the run, the system prompt the data
used, the generation settings), and `parity.json` compares the GGUF in llama.cpp with merged/ in
transformers on the eval prompts (lib/ship/parity.py). Everything is built in a temporary folder and moved
into export/ as one set when complete (lib/run/rundir.py); the log of the converter and quantizer is
logs/export.log. A parity figure beyond its tolerance (`export.*`) is printed, sets "ok": false, and
raises QualityGateError once the results are installed (the CLI exits 1) unless allow_drift.
"""

from __future__ import annotations

import time
from pathlib import Path

from lib.evaluate.scoring import check_examples
from lib.run.config import apply_overrides, load_config
from lib.run.errors import MissingStageError, QualityGateError
from lib.run.paths import require, run_paths
from lib.run.rundir import (
    check_result,
    inputs,
    install,
    remove_leftovers,
    run_lock,
    staging,
    write_atomic,
    write_json,
)
from lib.run.stages import stage
from lib.ship.llamacpp import QUANT_TYPES, ExportError, build_gguf, converter_dir, llama_cpp_version
from lib.ship.ollama import check_modelfile_values, modelfile_text
from lib.ship.parity import check_parity


def gguf_name(run: str, quant: str) -> str:
    return f"{run}-{quant}.gguf"


def run_export(run: str, quant: str | None = None, overrides=(), allow_drift: bool = False,
               progress: bool = True) -> dict:
    """Entry point of notebook 06's export section and `python -m lib export`: returns the parity report.

    Writes export/<run>-<quant>.gguf, export/Modelfile and export/parity.json, then raises
    QualityGateError when the parity check failed (the CLI exits 1), unless `allow_drift`.
    """
    paths = run_paths(run)
    with run_lock(paths, "export"):  # first: a second export touches nothing of the running one's (its log)
        cfg, quant = _export_settings(paths, quant, overrides)
        examples, _ = check_examples(paths, cfg)
        log_path = write_atomic(paths.export_log, "")
        remove_leftovers(paths.root, r"\.export-\w{8}")  # staging folders of a killed export
        with staging(paths.root, ".export-") as tmp:
            started = time.time()
            name = build_gguf(paths.merged, tmp, gguf_name(run, quant), quant, log_path)
            print(f"parity check: llama.cpp vs transformers on {cfg.export.parity_examples} eval prompts...", flush=True)
            report = check_parity(paths.merged, tmp / name, cfg, examples, quant, progress=progress)
            report["seconds"] = round(time.time() - started, 1)
            modelfile = modelfile_text(name, _merged_tokenizer(paths.merged), cfg, report["add_bos"])
            _install_export(paths, tmp, name, modelfile, report)
    _print_export(paths.export / name, report)
    if not report["ok"] and not allow_drift:
        raise QualityGateError(f"parity check failed: {report['failures'][0]} (export/parity.json; "
                               "--allow-drift accepts it)")
    return report


def _export_settings(paths, quant: str | None, overrides) -> tuple:
    """The run's configuration and GGUF type, after checking that export can run: a fresh merged
    model, a known type, llama.cpp and its converter."""
    require(paths, "config")
    if not (paths.merged / "config.json").exists():
        raise MissingStageError(f"{paths.merged} holds no merged model: {stage('merge').first(paths.root.name)}")
    # every file of merged/ as merge wrote it (hashed: zeroed weights would pass the parity check, as garbage
    # converts to the same garbage), and not a merge of an earlier adapter
    check_result(paths, "merge")
    cfg = apply_overrides(load_config(paths.config), overrides or [])  # its one "None keeps" rule
    check_modelfile_values(cfg)  # an unwritable system prompt is refused before any export work
    quant = (quant or cfg.export.quant).lower()
    if quant not in QUANT_TYPES:
        raise ExportError(f"unknown quantization type '{quant}' (one of {', '.join(QUANT_TYPES)})")
    llama_cpp_version()
    converter_dir()
    return cfg, quant


def _install_export(paths, tmp: Path, name: str, modelfile: str, report: dict) -> None:
    """The GGUF, its Modelfile and parity.json moved into export/ as one set, with a manifest (lib/run/rundir.py)."""
    (tmp / "Modelfile").write_text(modelfile, encoding="utf-8")
    write_json(tmp / "parity.json", report)
    moves = {paths.export / f: tmp / f for f in (name, "Modelfile", "parity.json")}
    install(paths, "export", moves, [p.relative_to(paths.root).as_posix() for p in moves], inputs(paths, "merge"))


def _print_export(gguf: Path, report: dict) -> None:
    p = report["perplexity"]
    print(f"exported {gguf} ({report['gguf_mb']} MB): perplexity {p['llama_cpp']['perplexity']:.6g} "
          f"llama.cpp vs {p['transformers']['perplexity']:.6g} transformers (drift {p['relative_drift']:.2%}), "
          f"greedy agreement {report['greedy']['agreement']:.0%} over {report['greedy']['tokens']} tokens, stop rate "
          f"{report['stop_rate']['llama_cpp']:.0%} vs {report['stop_rate']['transformers']:.0%}")
    if report.get("task_scores"):
        print(report["task_scores"]["sentence"])
    for f in report["failures"]:
        print(f"WARNING: parity check failed: {f}")


def _merged_tokenizer(folder):
    """The tokenizer (with the chat template) exactly as merged/ holds it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))

