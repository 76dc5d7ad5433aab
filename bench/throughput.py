"""Side-by-side training throughput of the batching modes: real tokens per second, padding, memory.

    python bench/throughput.py                        # CPU, the tiny model, 4-bit QLoRA: about a minute
    python bench/throughput.py --rounds 7 --steps 10 --out bench/results.json
    python bench/throughput.py --device cuda --arch qwen2.5-0.5b      # GPU: random weights, real shapes
    # the GPU path, shrunk to a CPU smoke run (the real width and vocabulary, 2 layers):
    python bench/throughput.py --arch qwen2.5-0.5b --layers 2 --max-length 256 --batch-size 4 --rounds 1 --steps 2 --examples 16

The measuring lives in bench/measure.py (its docstring says how each figure is measured); this
file is the command line: options, the side-by-side table, the JSON results. Results: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/throughput.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from bench.measure import ARCHS, MODES, run_benchmark  # noqa: E402

# --------------------------------------------------------------------------------------------
# Output


def format_table(result: dict) -> str:
    gpu = result["peak_tflops"] is not None
    head = ["setup", "real tok/s", "x base", "padding", "peak MiB", "mem x base", "step s", "tok/step", "TFLOP/s"]
    if gpu:
        head.append("MFU")
    head.append("loss diff")
    lines = []
    for r in result["results"]:
        cells = [r["setup"] + (" (default)" if r["default"] else ""), f"{r['tokens_per_s']:,.0f}",
                 f"{r['vs_baseline']:.2f}x", f"{100 * r['padding_share']:.1f}%", f"{r['peak_memory_mib']:,.1f}",
                 "-" if r["memory_vs_baseline"] is None else f"{r['memory_vs_baseline']:.2f}x",
                 f"{r['step_s']:.3f}", f"{r['tokens_per_step']:,.0f}", f"{r['tflops']:.3g}"]
        if gpu:
            cells.append(f"{100 * r['mfu']:.1f}%")
        cells.append(f"{r['loss_diff_vs_padded']:.1e}")
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]

    def fmt(cells):
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ("-" if i == 0 else ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt(head), sep, *(fmt(c) for c in lines)])


def report(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Batching benchmark, {result['date']}: {result['model']} on {result['device']} "
        f"({m['cores']} cores, {m['threads']} threads, torch {m['torch']})",
        f"command: {result['command']}",
        "",
        format_table(result),
        "",
        f"real tok/s: median over {result['settings']['rounds']} rounds of non-padding tokens per second of "
        f"full training steps; x base: median of the per-round ratios to pad_max.",
        f"peak MiB: {result['memory_measure']}.",
        f"loss diff: |loss - loss of the padded batch| on the same {result['exactness']['examples']} examples "
        f"(tolerance {result['exactness']['tolerance']:g}); largest per-token log-prob difference: "
        + ", ".join(f"{k} {v['max_token_diff']:.1e}" for k, v in result["exactness"]["setups"].items()) + ".",
        f"default batching (lib/run/config.py train.batching): {result['default_batching']}; fastest here: "
        f"{result['fastest']}.",
    ]
    est = result["memory_estimate"]
    if "error" in est:
        lines.append(f"memory estimate {est['estimate_gib']:.2f} GiB vs measured pad_max peak "
                     f"{est['measured_pad_max_with_context_gib']:.2f} GiB (with the CUDA context): {est['error']:+.0%}")
    lines.append("targets:")
    for t in result["targets"]:
        v = t["value"]
        v = f"{v:.3g}" if isinstance(v, float) else str(v)
        lines.append(f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}: {v} (goal {t['goal']})")
    return "\n".join(lines)


def _kv(items) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--arch-set: '{item}' is not KEY=VALUE")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Side-by-side training throughput of the batching modes.")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cpu (default) or cuda")
    p.add_argument("--arch", choices=sorted(ARCHS), default=None,
                   help="a random-initialised model of this architecture (default: the tiny model)")
    p.add_argument("--layers", type=int, default=None, help="with --arch: this many layers (a smaller model)")
    p.add_argument("--arch-set", action="append", default=[], metavar="KEY=VALUE",
                   help="with --arch: override a config value, e.g. hidden_size=256")
    p.add_argument("--profile", default=None, help="configuration profile (default: tiny on CPU, t4/a100 on GPU)")
    p.add_argument("--rounds", type=int, default=5, help="rounds; the table shows medians over them")
    p.add_argument("--steps", type=int, default=8, help="batches (timed steps) per setup per round")
    p.add_argument("--batch-size", type=int, default=None, help="examples per step (default: the profile's)")
    p.add_argument("--max-length", type=int, default=1024, help="max_length: truncation and the pad_max length")
    p.add_argument("--examples", type=int, default=400, help="conversations generated (the length-grouping pool)")
    p.add_argument("--median-length", type=float, default=128, help="median conversation length in tokens")
    p.add_argument("--sigma", type=float, default=1.0, help="log-normal shape: larger, longer tail")
    p.add_argument("--modes", nargs="+", choices=MODES, default=MODES, help="setups to compare")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest loss difference to padded batches (default 1e-4 in fp32, 2e-2 in 16-bit)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak TFLOP/s, if not known here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    opts = p.parse_args(argv)
    opts.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        opts.arch_set = _kv(opts.arch_set)
    except ValueError as e:
        p.error(str(e))
    if (opts.layers or opts.arch_set) and not opts.arch:
        p.error("--layers and --arch-set need --arch")
    for name in ("rounds", "steps", "examples", "max_length"):
        if getattr(opts, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    if opts.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the project's loaders pick the GPU whenever one is visible
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if opts.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA GPU is visible", file=sys.stderr)
        return 2
    from lib.run.errors import SFTError

    try:
        result = run_benchmark(opts, log=lambda s: print(s, flush=True))
    except SFTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(report(result))
    if opts.out:
        out = Path(opts.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2), encoding="utf-8")
        print(f"results: {out}")
    return 0 if result["exactness"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
