"""Tool calling end to end on SmolLM2-135M-Instruct (smol profile, CPU): base vs tuned parseable calls.

    python bench/tool_calling.py                 # writes data/tools/weather_tools.jsonl if missing, then
                                                 # prepare + train + evaluate in outputs/bench-tools/
    python bench/tool_calling.py --write-data    # only (re)write the data file

SmolLM2's own template renders no tools, so the run sets data.prompt_format to Qwen2.5's template
(tests/templates/qwen2.5.json), which renders the schemas and writes calls as
`<tool_call>{"name", "arguments"}</tool_call>`. The data: 60 OpenAI-format conversations over three
tools (get_weather, convert_units, get_time): the user asks, the assistant calls a tool, the tool
answers, the assistant answers in words. Evaluation splits each held-out conversation before its call
and counts how often the generated reply holds a call that parses as JSON and names the reference
function (generation_metrics.json: tool_call_parse_rate, tool_name_match_rate). Figures: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

DATA = REPO_ROOT / "data" / "tools" / "weather_tools.jsonl"
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "convert_units", "description": "Convert a value between units",
                                      "parameters": {"type": "object", "properties": {
                                          "value": {"type": "number"}, "from_unit": {"type": "string"},
                                          "to_unit": {"type": "string"}}, "required": ["value", "from_unit", "to_unit"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
]
CITIES = ["Paris", "Oslo", "Rome", "Lima", "Cairo", "Tokyo", "Lagos", "Quito", "Dublin", "Hanoi", "Perth", "Denver",
          "Madrid", "Seoul", "Nairobi", "Lisbon", "Vienna", "Austin", "Mumbai", "Santiago"]
UNITS = [("km", "miles", 0.621), ("miles", "km", 1.609), ("kg", "pounds", 2.205), ("celsius", "fahrenheit", None),
         ("liters", "gallons", 0.264)]


def _conversation(kind: str, k: int, rng: random.Random) -> dict:
    city = CITIES[k % len(CITIES)]
    if kind == "get_weather":
        temp, sky = rng.randint(-5, 35), rng.choice(["clear", "cloudy", "rainy", "windy"])
        ask = rng.choice([f"What is the weather in {city}?", f"Is it cold in {city} right now?",
                          f"How is the weather today in {city}?"])
        args, result = {"city": city}, {"temperature": temp, "sky": sky}
        answer = f"It is {temp} degrees and {sky} in {city}."
    elif kind == "get_time":
        hh, mm = rng.randint(0, 23), rng.choice([0, 15, 30, 45])
        ask = rng.choice([f"What time is it in {city}?", f"Tell me the local time in {city}.",
                          f"Is it late in {city} now?"])
        args, result = {"city": city}, {"time": f"{hh:02d}:{mm:02d}"}
        answer = f"It is {hh:02d}:{mm:02d} in {city}."
    else:
        src, dst, factor = UNITS[k % len(UNITS)]
        value = rng.randint(2, 90)
        out = round(value * 9 / 5 + 32, 1) if factor is None else round(value * factor, 1)
        ask = rng.choice([f"How many {dst} is {value} {src}?", f"Convert {value} {src} to {dst}.",
                          f"What is {value} {src} in {dst}?"])
        args, result = {"value": value, "from_unit": src, "to_unit": dst}, {"result": out}
        answer = f"{value} {src} is {out} {dst}."
    cid = f"call{k:05d}"
    return {"messages": [
        {"role": "user", "content": ask},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": cid, "type": "function", "function": {"name": kind, "arguments": json.dumps(args)}}]},
        {"role": "tool", "tool_call_id": cid, "content": json.dumps(result)},
        {"role": "assistant", "content": answer}], "tools": TOOLS}


def make_records(n: int = 60, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    kinds = ["get_weather", "convert_units", "get_time"]
    return [_conversation(kinds[k % 3], k, rng) for k in range(n)]


def write_data(path: Path = DATA) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in make_records()), encoding="utf-8")
    return path


def run(run_name: str, steps_epochs: float, generate: int) -> dict:
    from lib.data.prepare import run_prepare
    from lib.evaluate.evaluation import run_evaluate
    from lib.run.stages import stage

    template = json.loads((REPO_ROOT / "tests" / "templates" / "qwen2.5.json").read_text())["chat_template"]
    opts = [f"data.prompt_format={template}", "data.eval_fraction=0.2", "train.max_length=512",
            f"train.num_train_epochs={steps_epochs}", f"eval.generate_examples={generate}", "eval.max_examples=16",
            "generation.max_new_tokens=48", "train.eval_steps=1000", "train.save_steps=1000"]
    times = {}
    t0 = time.time()
    run_prepare(run_name, str(DATA), profile="smol", overrides=opts, overwrite=True)
    times["prepare"] = time.time() - t0
    module, function = stage("train").run.split(":")
    t0 = time.time()
    getattr(__import__(module, fromlist=[function]), function)(run_name, overrides=[], retrain=True)
    times["train"] = time.time() - t0
    t0 = time.time()
    result = run_evaluate(run_name, progress=False)
    times["evaluate"] = time.time() - t0
    gen = result["generation"]
    keys = ("tool_call_examples", "tool_call_parse_rate", "tool_name_match_rate", "stop_rate")
    out = {m: {k: gen[m].get(k) for k in keys} for m in ("base", "tuned")}
    out["seconds"] = {k: round(v, 1) for k, v in times.items()}
    out["samples"] = [{"prompt": p["prompt"], "reference": p["reference"], "base": p["base"], "tuned": p["tuned"]}
                      for p in result["predictions"][:3]]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write-data", action="store_true", help="only write the data file")
    ap.add_argument("--run", default="bench-tools")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--generate", type=int, default=12)
    args = ap.parse_args(argv)
    if args.write_data or not DATA.exists():
        print(f"wrote {write_data()}")
        if args.write_data:
            return 0
    print(json.dumps(run(args.run, args.epochs, args.generate), indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
