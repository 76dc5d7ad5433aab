"""The offline tiny model: a locally trained tokenizer and a random-initialised Llama.

    python -m lib.run.tiny            # builds (once) and prints the path

Nothing is downloaded. A byte-level BPE tokenizer is trained with `tokenizers` on the project's
own sample data (data/examples), with distinct <pad>, <s> and </s> tokens and a chat template
whose end-of-turn token is </s>; a Llama-architecture model of a few hundred thousand parameters
is initialised from a fixed seed. Both are saved with `save_pretrained` and loaded back by path
through the same `from_pretrained` code that loads a real model. The build is deterministic and
cached under `outputs/.cache/tiny-<hash>/`, the hash covering the corpus and every setting here.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from lib.run.paths import REPO_ROOT, cache_dir
from lib.run.rundir import staging

SEED = 1234
VOCAB_SIZE = 2048
MODEL_KWARGS = dict(
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    initializer_range=0.02,
)
SPECIAL = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# Each turn: a role token, a newline, the content, the end-of-turn token (</s>), a newline.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
VERSION = 1  # bump when the build below changes

_FALLBACK_CORPUS = """\
What makes a good question? How do we know what we know? Why does ice float on water?
Which assumptions are we making, and what evidence would change our mind?
The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ?
"""


def _corpus_files() -> list[Path]:
    root = REPO_ROOT / "data" / "examples"
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in {".json", ".jsonl", ".csv", ".txt"})


def _strings(x, out: list[str]) -> None:
    if isinstance(x, str):
        out.append(x)
    elif isinstance(x, dict):
        for k, v in x.items():
            out.append(str(k))
            _strings(v, out)
    elif isinstance(x, list):
        for v in x:
            _strings(v, out)


def _corpus() -> list[str]:
    """Text of the sample data, as lines (JSON escapes decoded so that Unicode is learnt as such)."""
    lines = [_FALLBACK_CORPUS]
    for p in _corpus_files():
        raw = p.read_text(encoding="utf-8", errors="replace")
        if p.suffix in (".json", ".jsonl"):
            try:
                docs = [json.loads(raw)] if p.suffix == ".json" else [json.loads(ln) for ln in raw.splitlines() if ln.strip()]
            except ValueError:
                docs = None
            if docs is not None:
                _strings(docs, lines)
                continue
        lines.extend(raw.splitlines())
    return lines


def _fingerprint(corpus: list[str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([VERSION, SEED, VOCAB_SIZE, MODEL_KWARGS, SPECIAL, ROLE_TOKENS, CHAT_TEMPLATE]).encode())
    for line in corpus:
        h.update(line.encode("utf-8", "replace"))
        h.update(b"\n")
    return h.hexdigest()[:12]


def build_tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[SPECIAL["pad_token"], SPECIAL["bos_token"], SPECIAL["eos_token"], *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=MODEL_KWARGS["max_position_embeddings"],
        **SPECIAL,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


def build(path: Path) -> Path:
    """Build the tokenizer and the random-initialised model into `path`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    corpus = _corpus()
    tokenizer = build_tokenizer(corpus)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **MODEL_KWARGS,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_once(target: Path, build_fn) -> Path:
    """Build a model folder with `build_fn(tmp_path)` unless `target` holds one; atomic, race-safe."""
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    with staging(target.parent, ".build-") as tmp:
        build_fn(tmp)
        try:
            os.replace(tmp, target)  # atomic; another process may have won the race
        except OSError:
            if not (target / "config.json").exists():
                raise
    return target


def tiny_model_path() -> Path:
    """The cached tiny model folder, built on first use."""
    return build_once(cache_dir() / f"tiny-{_fingerprint(_corpus())}", build)


if __name__ == "__main__":
    print(tiny_model_path())
