"""The tokenizer of a run: the base model's (or a saved adapter's), with a pad token and a chat template.
Prepare (01) encodes the data with it; every later stage loads it the same way.

    from lib.data.tokenizer import load_tokenizer
    tok = load_tokenizer(cfg)                              # the base model's, with data.prompt_format applied
    tok = load_tokenizer(cfg, path="outputs/demo/adapter")  # the one saved with an adapter (its template kept)
"""

from __future__ import annotations

import logging

from lib.data.templates import apply_prompt_format, ensure_chat_template
from lib.run.errors import ConfigError, first_line
from lib.run.realmodel import hf_token, resolve_model

logger = logging.getLogger(__name__)


def load_tokenizer(cfg, path: str | None = None):
    """The tokenizer of the base model (or of `path`), with a pad token and a chat template."""
    from transformers import AutoTokenizer

    name = path or resolve_model(cfg.model.name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.model.trust_remote_code, token=hf_token())
    except (OSError, ValueError, ImportError) as e:  # ImportError: it needs sentencepiece or protobuf (transformers 5.0)
        raise ConfigError(f"model.name_or_path: cannot load the tokenizer of '{name}' ({first_line(e)})") from None
    if tok.pad_token is None:
        # Labels are built explicitly (padding is -100), so eos as pad does not stop the model learning eos.
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    try:
        # The base model's tokenizer gets data.prompt_format; a saved adapter's keeps the template it was trained with.
        fmt = "auto" if path is not None else getattr(cfg.data, "prompt_format", "auto")
        if fmt == "auto" and ensure_chat_template(tok):
            logger.warning("%s has no chat template: using a plain one that ends each turn with eos", name)
        elif fmt != "auto":
            apply_prompt_format(tok, fmt)
    except ValueError as e:
        raise ConfigError(f"model.name_or_path: {e}") from None
    return tok
