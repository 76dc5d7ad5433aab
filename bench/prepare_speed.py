"""How long the data stage (01 prepare) takes on a large file: 50,000 records by default.

    python bench/prepare_speed.py                          # tiny profile, 50,000 Alpaca-style records
    python bench/prepare_speed.py --records 5000 --profile smol --shape messages --rounds 3
    git worktree add /tmp/before <commit> && python bench/prepare_speed.py --against /tmp/before
                                            # this tree against another checkout, alternated, ratio checked
    python bench/prepare_speed.py --gzip    # the same records read from a .jsonl.gz

With --against, each round runs prepare in a fresh process for this tree and for the other checkout, in
turn (so both see the same machine load), and the script exits 1 when this tree's best time exceeds
--max-ratio (1.2) times the other's: the check that a change kept prepare's speed.

Writes a deterministic file of `--records` records in one of the accepted shapes (into a temporary
folder), then runs the whole prepare stage on it (read, detect, normalise with field accounting,
split, tokenizer audit, write) `--rounds` times in fresh run directories and prints the wall time
of each and the best. Run it alone: other processes on the machine's two cores slow it several
times over. Figures: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

WORDS = ("the river model answer question light energy water planet reason think why how what "
         "history city market number sentence explain describe compare list example step").split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def make_records(n: int, shape: str, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q, a = _sentence(rng, rng.randint(6, 20)), _sentence(rng, rng.randint(10, 60))
        if shape == "alpaca":
            out.append({"instruction": q, "input": _sentence(rng, 8) if i % 3 == 0 else "", "output": a})
        else:
            out.append({"id": i, "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a},
                                              {"role": "user", "content": _sentence(rng, 8)},
                                              {"role": "assistant", "content": _sentence(rng, 20)}]})
    return out


_TIMED = ("import sys, time; sys.path.insert(0, {tree!r}); from lib.data.prepare import run_prepare; "
          "t = time.perf_counter(); run_prepare({run!r}, {data!r}, profile={profile!r}); "
          "print('SECONDS', time.perf_counter() - t)")


def _timed(tree: Path, run: str, data: Path, profile: str, env: dict) -> float:
    """prepare's wall time in a fresh process importing lib from `tree` (imports not counted)."""
    code = _TIMED.format(tree=str(tree), run=run, data=str(data), profile=profile)
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"prepare failed in {tree}:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1].split()[1])


def against(args, data: Path, tmp: str) -> int:
    """This tree and `args.against` alternated, round by round; 1 when this tree is over max_ratio slower."""
    env = dict(os.environ, SFT_OUTPUTS_DIR=str(Path(tmp) / "outputs"))
    trees = {"this tree": REPO_ROOT, "other": Path(args.against).resolve()}
    times = {k: [] for k in trees}
    for name, tree in trees.items():  # warm-up: tokenizer and tiny model caches
        _timed(tree, f"warmup-{len(times[name])}{name[:2]}", REPO_ROOT / "data/examples/socratic_questions.jsonl",
               args.profile, env)
    for k in range(args.rounds):
        for name, tree in trees.items():
            times[name].append(_timed(tree, f"bench{k}-{name[:2]}", data, args.profile, env))
            print(f"round {k + 1}, {name}: {times[name][-1]:.1f} s")
    ratio = min(times["this tree"]) / min(times["other"])
    print(f"prepare, {args.records} {args.shape} records: this tree {min(times['this tree']):.1f} s, "
          f"{trees['other']} {min(times['other']):.1f} s: ratio {ratio:.2f} (limit {args.max_ratio})")
    return 0 if ratio <= args.max_ratio else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=50_000)
    p.add_argument("--shape", choices=("alpaca", "messages"), default="alpaca")
    p.add_argument("--profile", default="tiny")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--gzip", action="store_true", help="write the records as .jsonl.gz")
    p.add_argument("--against", default=None, help="another checkout of this project to compare with")
    p.add_argument("--max-ratio", type=float, default=1.2)
    args = p.parse_args(argv)
    if args.against:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / f"{args.shape}.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in make_records(args.records, args.shape)))
            return against(args, data, tmp)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SFT_OUTPUTS_DIR"] = str(Path(tmp) / "outputs")
        os.environ.setdefault("SFT_CACHE_DIR", str(REPO_ROOT / "outputs" / ".cache"))
        from lib.data.prepare import run_prepare

        data = Path(tmp) / f"{args.shape}.jsonl"
        text = "".join(json.dumps(r) + "\n" for r in make_records(args.records, args.shape))
        if args.gzip:
            data = data.with_name(data.name + ".gz")
            data.write_bytes(gzip.compress(text.encode()))
        else:
            data.write_text(text)
        run_prepare("warmup", str(REPO_ROOT / "data/examples/socratic_questions.jsonl"), profile=args.profile)
        times = []
        for k in range(args.rounds):
            t0 = time.perf_counter()
            run_prepare(f"bench{k}", str(data), profile=args.profile)
            times.append(time.perf_counter() - t0)
            print(f"round {k + 1}: {times[-1]:.1f} s")
    print(f"prepare, {args.records} {args.shape} records, profile {args.profile}: best {min(times):.1f} s "
          f"({args.records / min(times):,.0f} records/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
