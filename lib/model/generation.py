"""Generation: the settings, batched answers, single replies and streaming, shared by every stage.

    from lib.model.generation import generate_answers, generate_reply, stream_reply, generation_config
    answers = generate_answers(model, tokenizer, conversations, cfg.generation, batch_size=8)  # 04
    reply = generate_reply(model, tokenizer, history, settings=cfg.generation)                 # chat, export
    for piece in stream_reply(model, tokenizer, messages, generation_config(cfg.generation, tokenizer), 120): ...

One set of keyword arguments (`generation_kwargs`) for `model.generate` everywhere: stop at the
chat template's end-of-turn token and eos (`lib.data.templates.stop_token_ids`), sampling knobs
only when sampling, the model's own sampling defaults kept out of greedy decoding. A prompt
longer than `max_length` tokens is cut to its last `max_length` (`cut_prompt`).
"""

from __future__ import annotations

import copy
import dataclasses
import queue
import threading
import warnings
from collections.abc import Iterator

from lib.data.prompts import encode_prompt, prompt_messages
from lib.data.templates import stop_token_ids
from lib.model.oom import in_batches
from lib.run.config import undecodable
from lib.run.errors import SFTError
from lib.run.settings import GenerationSettings

DEFAULT_TIMEOUT = 120.0  # seconds the streamer waits for the next piece of text


def model_device(model):
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return tid
    return 0


def _settings(gen_cfg) -> dict:
    if dataclasses.is_dataclass(gen_cfg):
        return dataclasses.asdict(gen_cfg)
    return dict(gen_cfg or {})


def generation_kwargs(tokenizer, gen_cfg) -> dict:
    """Keyword arguments of `model.generate` for cfg.generation (a GenerationSettings or a dict)."""
    s = _settings(gen_cfg)
    kw = {
        "max_new_tokens": int(s.get("max_new_tokens", 128)),
        "do_sample": bool(s.get("do_sample", False)),
        "repetition_penalty": float(s.get("repetition_penalty", 1.0)),
        "pad_token_id": pad_id(tokenizer),
    }
    stops = stop_token_ids(tokenizer)
    if stops:
        kw["eos_token_id"] = stops
    if kw["do_sample"]:
        kw.update(temperature=float(s.get("temperature", 1.0)), top_k=int(s.get("top_k", 50)),
                  top_p=float(s.get("top_p", 1.0)))
    else:  # greedy: the model's own sampling defaults (a Hub generation_config.json) must not leak in
        kw.update(temperature=None, top_k=None, top_p=None)
    if int(s.get("no_repeat_ngram_size", 0) or 0) > 0:
        kw["no_repeat_ngram_size"] = int(s["no_repeat_ngram_size"])
    return kw


def model_context(model) -> int | None:
    """The positions the model has (max_position_embeddings, ...), or None where its config does not say;
    `model` may also be a config.json as a dict."""
    config = model if isinstance(model, dict) else getattr(model, "config", None)
    values = [config.get(k) if isinstance(config, dict) else getattr(config, k, None)
              for k in ("max_position_embeddings", "n_positions", "max_seq_len")]
    return next((v for v in values if isinstance(v, int) and not isinstance(v, bool)), None)


def check_prompt_fits(model, prompt_length: int) -> None:
    """Refuse (SFTError, one line) a chat prompt that leaves no room in the model's context for a reply, before
    generating: past its positions a model fails (an index error, or a native abort on some kernels)."""
    context = model_context(model)
    if context is not None and prompt_length >= context:
        raise SFTError(f"chat: the prompt is {prompt_length:,} tokens, and the model has {context:,} positions: "
                       "nothing is left for a reply; clear the history, or shorten the system prompt or tool schemas")


def bounded_new_tokens(model, prompt_length: int, max_new_tokens: int) -> int:
    """max_new_tokens cut to what the model's context leaves after the prompt (max_position_embeddings), with
    a warning when it was more: past its positions a model generates garbage or fails, and an unbounded
    setting (2147483647) would run until killed."""
    context = model_context(model)
    if context is None or prompt_length + max_new_tokens <= context:
        return max_new_tokens
    left = max(1, context - prompt_length)
    warnings.warn(f"generation.max_new_tokens={max_new_tokens} is more than the model's context of {context} "
                  f"positions leaves after a prompt of {prompt_length} tokens: cut to {left}", stacklevel=3)
    return left


def cut_prompt(ids: list[int], max_length: int | None, bos_token_id=None) -> list[int]:
    """A prompt's token ids cut to at most `max_length`, keeping the end: the latest turns and the
    generation prompt the answer follows. A leading bos token is kept in front."""
    if max_length is None or len(ids) <= max_length:
        return list(ids)
    if bos_token_id is not None and ids and ids[0] == bos_token_id and max_length > 1:
        return [ids[0]] + list(ids[len(ids) - (max_length - 1):])
    return list(ids[len(ids) - max_length:])


def with_model_stops(stops, base) -> list[int]:
    """`stops` (the template's end-of-turn ids and eos) and then the eos ids of `base`, the model's own generation
    config: GLM-4.x lists the turn openers <|user|> and <|observation|> there, which a model not yet tuned stops on."""
    eos = list(stops or [])
    old = getattr(base, "eos_token_id", None)
    for tid in [old] if isinstance(old, int) else list(old or []):
        if tid not in eos:
            eos.append(tid)
    return eos


def generation_config(settings: GenerationSettings | None, tokenizer, base=None):
    """A transformers GenerationConfig from the run's `generation` settings.

    The same keyword arguments as evaluation uses (`generation_kwargs`: stop at the
    chat template's end-of-turn token and eos, sampling knobs only when sampling), on top of
    `base` (the model's own generation config), whose eos ids are kept too.
    """
    from transformers import GenerationConfig

    gc = GenerationConfig.from_dict(base.to_dict()) if base is not None else GenerationConfig()
    kw = generation_kwargs(tokenizer, settings or GenerationSettings())
    eos = with_model_stops(kw.get("eos_token_id"), base)
    gc.update(**kw)
    gc.eos_token_id = eos or None
    gc.max_length = None  # max_new_tokens decides
    if tokenizer.bos_token_id is not None:
        gc.bos_token_id = tokenizer.bos_token_id
    return gc


def generate_answers(model, tokenizer, conversations, gen_cfg, batch_size: int = 8, desc: str = "generate",
                     progress: bool = True, max_length: int | None = None, tools=None) -> list[dict]:
    """Answer each conversation (a list of messages ending with the user's turn).

    Returns [{"text": answer, "stopped": True if it ended with a stop token, False if it ran into
    max_new_tokens, "prompt_cut": True if the prompt was longer than max_length}] in the order
    given. Prompts are rendered with the tokenizer's chat template, cut to their last `max_length`
    tokens (the context training saw; a long prompt would otherwise cost memory and time without
    bound), and left-padded, so a batch gives the same answers as one prompt at a time. A batch that
    runs out of memory is halved and retried (lib/model/oom.py). `tools`: one list of tool schemas (or None)
    per conversation, rendered by the template as in training (a record's `tools`).
    """
    from tqdm.auto import tqdm

    kw = generation_kwargs(tokenizer, gen_cfg)
    stops = with_model_stops(kw.get("eos_token_id"), getattr(model, "generation_config", None))
    if stops:
        kw["eos_token_id"] = stops
    prompts = prompt_ids(tokenizer, conversations, max_length, tools)
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress) as bar:
            return in_batches(lambda batch: _generate_batch(model, tokenizer, batch, kw), prompts, batch_size,
                              what=desc, progress=bar)
    finally:
        model.train(was_training)


def prompt_ids(tokenizer, conversations, max_length: int | None, tools=None) -> list[tuple[list[int], bool]]:
    """(token ids cut to max_length, whether they were cut) of each conversation's generation prompt."""
    prompts = []
    for k, conv in enumerate(conversations):
        ids = encode_prompt(tokenizer, list(conv), tools[k] if tools else None)  # data's special-token text stays text
        if not ids:
            raise SFTError("an evaluation prompt renders to no tokens")
        prompts.append((cut_prompt(ids, max_length, tokenizer.bos_token_id), len(ids) > (max_length or len(ids))))
    return prompts


def _generate_batch(model, tokenizer, batch, kw) -> list[dict]:
    """One left-padded batch of prompts through model.generate; each answer cut at its first stop id."""
    import torch

    stops = set(kw.get("eos_token_id") or [])
    device = model_device(model)
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, _) in enumerate(batch):  # left padding: every prompt ends where generation starts
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        mask[row, width - len(ids):] = 1
    kw = {**kw, "max_new_tokens": bounded_new_tokens(model, width, kw["max_new_tokens"])}
    with torch.no_grad():
        seqs = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kw)
    out = []
    for tokens, (_, was_cut) in zip(seqs[:, width:].tolist(), batch):
        cut = next((i for i, t in enumerate(tokens) if t in stops), None)
        answer = tokens if cut is None else tokens[:cut]
        out.append({"text": tokenizer.decode(answer, skip_special_tokens=True).strip(),
                    "stopped": cut is not None, "prompt_cut": was_cut})
    return out




def eval_tools(examples, chosen) -> list:
    """The `tools` of each chosen eval example (eval_conversations' rows), None where it has none."""
    return [examples[index].get("tools") or None for index, *_ in chosen]


def eval_conversations(examples):
    """(index, prompt messages, reference) of eval examples that end with an assistant answer (or call
    tools: then the prompt ends before the first call, lib.data.tokenization.prompt_messages)."""
    out = []
    for i, ex in enumerate(examples):
        messages = ex.get("messages")
        if not messages:
            continue
        prompt, reference = prompt_messages(messages)
        if reference is None or not prompt:
            continue
        out.append((i, prompt, reference))
    return out


def conversation(history: list[dict], system: str | None = None) -> list[dict]:
    """The messages the model answers: the system prompt (if any and not already there), then history."""
    msgs = [dict(m) for m in history]
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise SFTError(f"chat history: message {i + 1} is not a {{'role', 'content'}} dict "
                           "with role system, user or assistant")
    if not msgs or msgs[-1]["role"] != "user":
        raise SFTError("chat history: the last message must be the user's")
    for i, m in enumerate(msgs + [{"role": "system", "content": system or ""}]):
        problem = undecodable(m["content"])
        if problem:
            what = "the system prompt" if i == len(msgs) else f"message {i + 1}"
            raise SFTError(f"chat: {what} is {problem}")
    if system and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def _inputs(model, tokenizer, messages, tools=None):
    import torch

    # The template writes bos itself; a special token's text the user typed stays text (as in training).
    ids = torch.tensor([encode_prompt(tokenizer, messages, tools)], device=model.device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def generate_reply(model, tokenizer, history, system=None, settings=None, tools=None) -> dict:
    """One reply with its details: text, token ids, and whether it ended at a stop token."""
    import torch

    gc = generation_config(settings, tokenizer, getattr(model, "generation_config", None))
    inputs = _inputs(model, tokenizer, conversation(history, system), tools)
    check_prompt_fits(model, inputs["input_ids"].shape[1])
    gc.max_new_tokens = bounded_new_tokens(model, inputs["input_ids"].shape[1], gc.max_new_tokens)
    with torch.no_grad():
        out = model.generate(**inputs, generation_config=gc)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    stops = set(gc.eos_token_id or [])
    stopped = bool(new) and new[-1] in stops
    text = tokenizer.decode(new, skip_special_tokens=True)
    return {"text": text.strip(), "token_ids": new, "stopped": stopped, "n_tokens": len(new)}


class _Cancel:
    """A stopping criterion that ends generation when the reader of a stream goes away."""

    def __init__(self):
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_reply(model, tokenizer, messages, gc, timeout, tools=None, info: dict | None = None) -> Iterator[str]:
    """The reply's text piece by piece; `info` (a dict), once the stream ends, says whether the reply was cut:
    {"cut": no stop token and max_new_tokens reached, "max_new_tokens": the limit, "n_tokens": tokens made}."""
    import torch
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    inputs = _inputs(model, tokenizer, messages, tools)
    check_prompt_fits(model, inputs["input_ids"].shape[1])
    gc = copy.copy(gc)
    gc.max_new_tokens = bounded_new_tokens(model, inputs["input_ids"].shape[1], gc.max_new_tokens)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=timeout, skip_special_tokens=True)
    new_ids = _recorded(streamer)
    cancel = _Cancel()
    failure: list[BaseException] = []

    def work():
        try:
            with torch.no_grad():
                model.generate(**inputs, generation_config=gc, streamer=streamer,
                               stopping_criteria=StoppingCriteriaList([cancel]))
        except BaseException as e:  # re-raised in the reader's thread below
            failure.append(e)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        first = True
        for piece in streamer:
            if first:  # the template's newline after the role marker is not part of the answer
                piece = piece.lstrip()
                first = not piece
            if piece:
                yield piece
    except queue.Empty:
        raise SFTError(f"chat: no text from the model for {timeout:g} s (raise the timeout for a slow model)") from None
    finally:
        cancel.event.set()
        thread.join(timeout=timeout)
    if failure:
        raise failure[0]
    if info is not None:
        stopped = bool(new_ids) and new_ids[-1] in set(gc.eos_token_id or [])
        info.update(cut=not stopped and len(new_ids) >= gc.max_new_tokens, max_new_tokens=gc.max_new_tokens,
                    n_tokens=len(new_ids))


def _recorded(streamer) -> list[int]:
    """The generated token ids a streamer receives (the prompt left out), recorded as they come."""
    ids: list[int] = []
    put = streamer.put

    def recording_put(value):
        if not streamer.next_tokens_are_prompt:
            ids.extend(value.reshape(-1).tolist())
        put(value)

    streamer.put = recording_put
    return ids


