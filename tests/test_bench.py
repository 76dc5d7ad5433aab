"""The batching benchmark (bench/measure.py, CLI bench/throughput.py) on a few steps: it runs, it is exact, it counts padding.

No timing assertions: the figures live in bench/RESULTS.md.
"""

from __future__ import annotations

import json

import pytest

from bench import measure
from bench import throughput as bench


def test_plan_gives_every_setup_the_same_examples():
    from lib.run.errors import ConfigError

    lengths = [(i * 37) % 300 + 5 for i in range(160)]
    plan = measure.plan_batches(lengths, batch_size=4, steps=5, seed=0)
    grouped = sorted(i for b in plan["grouped"] for i in b)
    sequential = [i for b in plan["sequential"] for i in b]
    assert grouped == sequential  # the same examples; the ungrouped setups see them in the pool's order
    assert len(set(sequential)) == 5 * 4
    assert all(len(b) == 4 for b in plan["grouped"] + plan["sequential"])
    # Length-grouped batches are tighter, and a stratified sample from long to short.
    def spread(batches):
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)

    assert spread(plan["grouped"]) < spread(plan["sequential"])
    longest = [max(lengths[i] for i in b) for b in plan["grouped"]]
    assert longest == sorted(longest, reverse=True) and longest[-1] < longest[0]
    with pytest.raises(ConfigError):
        measure.plan_batches(lengths[:8], batch_size=4, steps=3)


def test_lora_flops_and_peak_lookup():
    est = {"architecture": {"hidden_size": 8, "vocab_size": 10, "num_heads": 2, "head_dim": 4, "num_layers": 3},
           "params_quantized": 100, "lora_params": 5}
    # per token: 4 * (100 + 8 * 10) + 6 * 5 = 750; attention: 3 * (2 * 2 * 4 * 3) * L^2 = 144 L^2
    assert measure.lora_step_flops(est, [2, 3]) == 750 * 5 + 144 * (4 + 9)
    assert measure.peak_tflops("Tesla T4") == 65.0
    assert measure.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert measure.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert measure.peak_tflops("NVIDIA H200") == 989.0
    assert measure.peak_tflops("NVIDIA GeForce GTX 1080") is None


@pytest.mark.slow  # trains a few steps per batching mode (~38 s on 2 CPU cores)
def test_benchmark_runs_exact_and_counts_padding(outputs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    out = tmp_path / "bench.json"
    rc = bench.main(["--rounds", "2", "--steps", "2", "--batch-size", "4", "--max-length", "128",
                     "--examples", "32", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    result = json.loads(out.read_text())
    rows = {r["setup"]: r for r in result["results"]}
    assert set(rows) == set(bench.MODES)
    assert result["default_batching"] == "padding_free" and rows["padding_free"]["default"]
    assert result["exactness"]["ok"], result["exactness"]
    for m, e in result["exactness"]["setups"].items():
        assert e["loss_diff"] <= 1e-4 and e["max_token_diff"] <= 1e-3, (m, e)
    assert rows["padding_free"]["padding_share"] == 0.0
    assert rows["pad_max"]["padding_share"] > 0.2  # log-normal lengths, median ~128, padded to 128
    assert rows["pad_max"]["padding_share"] >= rows["pad_longest"]["padding_share"] > 0.0
    # Every setup trained on the same examples: the same real tokens, fewer slots without padding.
    assert len({r["real_tokens"] for r in rows.values()}) == 1
    assert rows["pad_max"]["token_slots"] == 2 * 2 * 4 * 128  # rounds x steps x batch x max_length
    assert rows["padding_free"]["token_slots"] == rows["padding_free"]["real_tokens"]
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["peak_memory_mib"] > 0 and r["tflops"] > 0
        assert r["mfu"] is None  # CPU: no peak figure to compare with
    assert rows["pad_max"]["vs_baseline"] == 1.0
    assert "padding_free (default)" in printed and "pad_max" in printed and "targets:" in printed
    assert {t["target"] for t in result["targets"]} >= {"default padding share", "default loss equals padded loss"}


@pytest.mark.slow  # builds and trains a random-initialised architecture
def test_arch_path_smoke(outputs, tmp_path, monkeypatch):
    """The GPU path (a random-initialised real architecture) on the CPU, shrunk to seconds."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    opts = bench.parse_args([
        "--arch", "qwen2.5-0.5b", "--layers", "1", "--arch-set", "hidden_size=64", "--arch-set",
        "intermediate_size=128", "--arch-set", "num_attention_heads=4", "--arch-set", "vocab_size=4096",
        "--rounds", "1", "--steps", "2", "--batch-size", "2", "--max-length", "256", "--median-length", "48",
        "--examples", "8",
        "--modes", "pad_max", "padding_free",
    ])
    result = measure.run_benchmark(opts, log=lambda s: None)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(opts.model_path)
    assert config.model_type == "qwen2" and config.num_hidden_layers == 1 and config.vocab_size == 4096
    assert result["model"] == "qwen2.5-0.5b" and result["arch_overrides"]["num_hidden_layers"] == 1
    assert result["exactness"]["ok"]
    rows = {r["setup"]: r for r in result["results"]}
    assert set(rows) == {"pad_max", "padding_free"}
    assert rows["padding_free"]["padding_share"] == 0.0 < rows["pad_max"]["padding_share"]
    assert result["memory_estimate"]["estimate_gib"] > 0
    # A second run reuses the cached model folder.
    assert measure.build_arch_model("qwen2.5-0.5b", result["arch_overrides"]) == opts.model_path


def test_bad_options_exit_2(capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--layers", "2"])
    assert e.value.code == 2
    assert "--arch" in capsys.readouterr().err
    assert bench.main(["--steps", "9", "--examples", "16", "--batch-size", "8"]) == 2
    assert "error: --examples" in capsys.readouterr().err


def test_vs_trl_summary_ratios_are_per_round_medians():
    from bench import vs_trl

    def run(tokens, seconds, loss=2.0):
        return {"train_s": seconds, "real_tokens": tokens, "slots": tokens + 100, "batches": 12, "steps": 12,
                "train_loss": loss, "last_loss": loss - 0.5, "peak_rss_mib": 2000.0 + seconds, "compute": "c"}

    runs = {"project": [run(1000, 10), run(1000, 20)],        # 100 and 50 tok/s
            "trl_default": [run(1000, 20), run(1000, 20)],    # 50 and 50
            "trl_fastest": [run(1000, 10), run(1000, 40)]}    # 100 and 25
    rows = {r["setup"]: r for r in vs_trl.summarise(runs)}
    p = rows["project"]
    assert p["tokens_per_s"] == 75 and p["tokens_per_s_rounds"] == [100, 50]
    assert p["x_trl_default"] == 1.5  # median of 2.0 and 1.0 (each round side by side)
    assert p["x_trl_fastest"] == 1.5  # median of 1.0 and 2.0
    assert rows["trl_default"]["x_trl_default"] == 1.0
    assert p["peak_rss_mib"] == 2020 and abs(p["padding_share"] - 100 / 1100) < 1e-12
    table = vs_trl.format_table(list(rows.values()))
    assert "| project " in table and "1.50x" in table and table.count("\n") == 4


def test_profile_costs_count_nested_operators_once():
    from types import SimpleNamespace as NS

    from bench import profile_step

    def ev(name, start, end):
        return NS(name=name, time_range=NS(start=start, end=end))

    events = [ev("ChunkedLogProbFunction", 0, 30), ev("aten::mm", 5, 25),          # a matmul inside the LM head
              ev("MatMul4Bit", 40, 60), ev("bitsandbytes::dequantize_4bit", 41, 45), ev("aten::mm", 46, 59),
              ev("aten::mm", 70, 80),                                                  # a LoRA matmul
              ev("Optimizer.step#AdamW.step", 85, 95)]
    table = {name: (s, share) for name, s, share in profile_step.cost_table(events, 100.0)}
    assert table["LM head + loss"][1] == 0.30 and table["4-bit layers (dequantize + matmul)"][1] == 0.20
    assert table["  of which 4-bit dequantize"][1] == 0.04
    assert table["LoRA and other matmuls"][1] == 0.10 and table["optimizer"][1] == 0.10
    assert abs(table["other (norms, activations, rotary, casts, autograd)"][1] - 0.30) < 1e-12


def test_replay_keeps_every_task_example_once_at_the_asked_share(tmp_path):
    """bench/replay.py's mix: the task source sets the size, whichever strategy that takes."""
    from bench.replay import mix_for, replay_rows
    from lib.data.sources import mix

    for task_n, replay_n, share in [(153, 21, 0.1), (153, 21, 0.25), (40, 200, 0.25)]:
        weights, how = mix_for(task_n, replay_n, share)
        task, replay = [{"t": i} for i in range(task_n)], [{"r": i} for i in range(replay_n)]
        out = mix([task, replay], [float(w) for w in weights], how, 0)
        assert sorted(ex["t"] for ex in out if "t" in ex) == list(range(task_n))
        assert abs(sum("r" in ex for ex in out) / len(out) - share) < 0.01
    base = tmp_path / "forgetting_base.jsonl"
    prompt = [{"role": "user", "content": "Name a colour."}]
    base.write_text("".join(json.dumps({"messages": prompt, "answer": a, "stopped": s}) + "\n"
                            for a, s in [("Blue.", True), ("Red", False), ("  ", True)] * 5))
    rows = replay_rows(base)
    assert rows == [{"messages": prompt + [{"role": "assistant", "content": "Blue."}]}] * 5  # stopped, not blank
