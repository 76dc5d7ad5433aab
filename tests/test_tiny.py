"""The offline tiny model: deterministic, loadable by path, also in 4-bit NF4 on the CPU."""

from __future__ import annotations

import hashlib

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from lib.run import tiny


def _digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in path.iterdir()
            if p.name in ("tokenizer.json", "model.safetensors", "config.json")}


def test_build_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    tiny.build(a)
    tiny.build(b)
    assert _digest(a) == _digest(b) and len(_digest(a)) == 3


def test_cached_and_loaded_by_path():
    from lib.run.realmodel import resolve_model

    path = tiny.tiny_model_path()
    assert tiny.tiny_model_path() == path and resolve_model("tiny") == str(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
    assert tok.chat_template and "<|assistant|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert tok.decode(tok("Pourquoi? 为什么？")["input_ids"]) == "Pourquoi? 为什么？"  # byte-level: any text
    model = AutoModelForCausalLM.from_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    assert 100_000 < n < 1_000_000
    assert model.config.model_type == "llama"


def test_loads_in_4bit_nf4_on_cpu():
    import bitsandbytes as bnb

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny.tiny_model_path(), quantization_config=q, device_map="cpu")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 7 * tiny.MODEL_KWARGS["num_hidden_layers"]
    assert layers[0].weight.quant_state.quant_type == "nf4" and layers[0].weight.quant_state.nested
    ids = torch.tensor([[1, 10, 20, 30, 40]])
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)
