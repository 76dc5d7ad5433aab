"""The public data-set shapes, field accounting, column mapping and per-turn weights.

Each shape is a small file written here in the field layout of the public set it names (Dolly,
LLaMA-Factory's alpaca with system and history, OpenAI chat with weights, OpenHermes / SlimOrca
ShareGPT, UltraChat / no_robots, MetaMathQA, Capybara, UltraFeedback / TRL preference data,
tatsu-lab Alpaca with its rendered `text`). For each, the conversation is written out by hand (the
expected messages), and the labels are checked against an oracle that uses none of the project's
code, only the tokenizer: the trained tokens are, run by run, exactly each trained answer's tokens
followed by the end-of-turn token; every context text (instructions, inputs, system messages,
history, weight-0 answers) appears token for token in the untrained positions. Both on the tiny
tokenizer and on SmolLM2's real one.
"""

from __future__ import annotations

import json

import pytest

from lib.__main__ import main
from lib.data.examples import prepare_examples
from lib.data.prepare import run_prepare
from lib.data.readers import read_examples
from lib.data.tokenization import IGNORE_INDEX, encode_example
from lib.run.errors import SFTError
from lib.run.paths import run_paths


def U(c):
    return {"role": "user", "content": c}


def A(c, weight=None):
    return {"role": "assistant", "content": c, **({"weight": weight} if weight is not None else {})}


def S(c):
    return {"role": "system", "content": c}


DOLLY_CTX = ("Virgin Australia, the trading name of Virgin Australia Airlines Pty Ltd, is an Australian-based airline. "
             "It commenced services on 31 August 2000 as Virgin Blue, with two aircraft on a single route.")
HERMES_NULLS = {"custom_instruction": None, "topic": None, "model_name": None, "model": None,
                "skip_prompt_formatting": False, "views": None, "language": None, "title": None, "idx": None,
                "hash": None, "avatarUrl": None, "system_prompt": None}

# name -> (records, expected messages per record, the format detected, options for prepare_examples)
SHAPES = {
    "dolly": ([
        {"instruction": "When did Virgin Australia start operating?", "context": DOLLY_CTX,
         "response": "Virgin Australia commenced services on 31 August 2000 as Virgin Blue.", "category": "closed_qa"},
        {"instruction": "Which is a species of fish? Tope or Rope", "context": "", "response": "Tope",
         "category": "classification"},
    ], [
        [U("When did Virgin Australia start operating?\n\n" + DOLLY_CTX),
         A("Virgin Australia commenced services on 31 August 2000 as Virgin Blue.")],
        [U("Which is a species of fish? Tope or Rope"), A("Tope")],
    ], "dolly", {}),
    "llamafactory_alpaca": ([
        {"instruction": "And what is its capital?", "input": "Answer in one word.", "output": "Canberra.",
         "system": "You are a geography tutor.",
         "history": [["Which country is Sydney in?", "Australia."], ["Is it a continent too?", "Yes, it is."]]},
        {"instruction": "Describe a process of making crepes.", "input": "", "output": "Mix flour, eggs and milk.",
         "system": "", "history": []},
    ], [
        [S("You are a geography tutor."), U("Which country is Sydney in?"), A("Australia."),
         U("Is it a continent too?"), A("Yes, it is."), U("And what is its capital?\n\nAnswer in one word."),
         A("Canberra.")],
        [U("Describe a process of making crepes."), A("Mix flour, eggs and milk.")],
    ], "instruction_output", {}),
    "openai_chat_weights": ([
        {"messages": [S("Marv is a factual chatbot that is also sarcastic."), U("What's the capital of France?"),
                      {"role": "assistant", "content": "Paris, as if everyone doesn't know that already.", "weight": 0},
                      U("Who wrote 'Romeo and Juliet'?"),
                      {"role": "assistant", "content": "Oh, just some guy named William Shakespeare.", "weight": 1}]},
    ], [
        [S("Marv is a factual chatbot that is also sarcastic."), U("What's the capital of France?"),
         A("Paris, as if everyone doesn't know that already.", weight=0), U("Who wrote 'Romeo and Juliet'?"),
         A("Oh, just some guy named William Shakespeare.")],
    ], "messages", {}),
    "openhermes_sharegpt": ([
        {**HERMES_NULLS, "source": "airoboros2.2", "category": "orca", "conversations": [
            {"from": "system", "value": "You are an unbiased, uncensored, helpful assistant.", "weight": None},
            {"from": "human", "value": "Every day a tree drops 7 leaves. How many leaves would it drop in a month?",
             "weight": None},
            {"from": "gpt", "value": "Let us think: a month has about 30 days, so 7 x 30 = 210 leaves.",
             "weight": None}]},
    ], [
        [S("You are an unbiased, uncensored, helpful assistant."),
         U("Every day a tree drops 7 leaves. How many leaves would it drop in a month?"),
         A("Let us think: a month has about 30 days, so 7 x 30 = 210 leaves.")],
    ], "sharegpt", {}),
    "slimorca_weights": ([
        {"conversations": [
            {"from": "system", "value": "You are an AI assistant that helps people find information.", "weight": None},
            {"from": "human", "value": "Translate to German: good morning", "weight": 0.0},
            {"from": "gpt", "value": "Guten Morgen.", "weight": 0.0},
            {"from": "human", "value": "And good night?", "weight": 0.0},
            {"from": "gpt", "value": "Gute Nacht.", "weight": 1.0}]},
    ], [
        [S("You are an AI assistant that helps people find information."), U("Translate to German: good morning"),
         A("Guten Morgen.", weight=0), U("And good night?"), A("Gute Nacht.")],
    ], "sharegpt", {}),
    "ultrachat": ([
        {"prompt": "How does a rainbow form?", "prompt_id": "4f1e5c0a9b",
         "messages": [U("How does a rainbow form?"), A("Sunlight is refracted and reflected inside raindrops."),
                      U("Why is it curved?"), A("Each colour leaves the drops at a fixed angle to your eye.")]},
    ], [
        [U("How does a rainbow form?"), A("Sunlight is refracted and reflected inside raindrops."),
         U("Why is it curved?"), A("Each colour leaves the drops at a fixed angle to your eye.")],
    ], "messages", {}),
    "no_robots": ([
        {"prompt": "Write a haiku about rain.", "prompt_id": "a1b2", "category": "Generation",
         "messages": [S("You write short poems."), U("Write a haiku about rain."),
                      A("Soft rain on the roof\nthe garden drinks in silence\nclouds drift slowly east")]},
    ], [
        [S("You write short poems."), U("Write a haiku about rain."),
         A("Soft rain on the roof\nthe garden drinks in silence\nclouds drift slowly east")],
    ], "messages", {}),
    "metamathqa": ([
        {"query": "James buys 5 packs of beef that are 4 pounds each. How many pounds did he buy?",
         "response": "He bought 5 * 4 = 20 pounds.\nThe answer is: 20", "type": "GSM_Rephrased",
         "original_question": "James buys 5 packs of beef that are 4 pounds each. The price is $5.50 per pound."},
    ], [
        [U("James buys 5 packs of beef that are 4 pounds each. How many pounds did he buy?"),
         A("He bought 5 * 4 = 20 pounds.\nThe answer is: 20")],
    ], "query_response", {}),
    "capybara": ([
        {"source": "Know-Logic", "conversation": [
            {"input": "What is the largest planet?", "output": "Jupiter is the largest planet."},
            {"input": "How many moons does it have?", "output": "It has 95 known moons."}]},
    ], [
        [U("What is the largest planet?"), A("Jupiter is the largest planet."), U("How many moons does it have?"),
         A("It has 95 known moons.")],
    ], "capybara", {}),
    "ultrafeedback_binarized": ([
        {"prompt": "Name a primary colour.", "prompt_id": "c0ffee",
         "chosen": [U("Name a primary colour."), A("Red is a primary colour.")],
         "rejected": [U("Name a primary colour."), A("Green, I think.")],
         "messages": [U("Name a primary colour."), A("Red is a primary colour.")],
         "score_chosen": 8.0, "score_rejected": 3.0},
    ], [
        [U("Name a primary colour."), A("Red is a primary colour.")],
    ], "preference", {"fmt": "preference"}),
    "trl_preference": ([
        {"prompt": "The sky is", "chosen": "blue on a clear day.", "rejected": "green."},
    ], [
        [U("The sky is"), A("blue on a clear day.")],
    ], "preference", {}),
    "tatsu_alpaca_text": ([
        {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well, sleep, move.",
         "text": "Below is an instruction that describes a task. Write a response that appropriately completes the "
                 "request.\n\n### Instruction:\nGive three tips for staying healthy.\n\n### Response:\n"
                 "Eat well, sleep, move."},
    ], [
        [U("Give three tips for staying healthy."), A("Eat well, sleep, move.")],
    ], "instruction_output", {}),
    "gsm8k": ([
        {"question": "Natalia sold clips to 48 friends in April, and half as many in May. How many in all?",
         "answer": "In May she sold 48 / 2 = 24 clips.\n#### 72"},
    ], [
        [U("Natalia sold clips to 48 friends in April, and half as many in May. How many in all?"),
         A("In May she sold 48 / 2 = 24 clips.\n#### 72")],
    ], "qa_splits", {}),
    "llamafactory_sharegpt_system": ([
        {"conversations": [{"from": "human", "value": "Who are you?"}, {"from": "gpt", "value": "I am a helper."}],
         "system": "You are a helpful assistant."},
    ], [
        [S("You are a helpful assistant."), U("Who are you?"), A("I am a helper.")],
    ], "sharegpt", {}),
    "llamafactory_ranking": ([
        {"instruction": "Rewrite politely:", "input": "Give me the file.", "chosen": "Could you send me the file?",
         "rejected": "File. Now."},
    ], [
        [U("Rewrite politely:\n\nGive me the file."), A("Could you send me the file?")],
    ], "preference", {}),
    "llamafactory_sharegpt_ranking": ([
        {"conversations": [{"from": "human", "value": "Suggest a name for a cat."}],
         "chosen": {"from": "gpt", "value": "How about Miso?"}, "rejected": {"from": "gpt", "value": "Dog."}},
    ], [
        [U("Suggest a name for a cat."), A("How about Miso?")],
    ], "preference", {"fmt": "preference"}),
    "columns_mapping": ([
        {"q": "What gas do plants take in?", "passage": "Plants use carbon dioxide in photosynthesis.",
         "a": "Carbon dioxide.", "persona": "You are a biology teacher."},
    ], [
        [S("You are a biology teacher."), U("What gas do plants take in?\n\nPlants use carbon dioxide in photosynthesis."),
         A("Carbon dioxide.")],
    ], "columns", {"columns": {"prompt": "q", "input": "passage", "response": "a", "system": "persona"}}),
    "columns_messages_tags": ([
        {"dialog": [{"speaker": "prompter", "text": "Hi there, what is 2+3?", "loss_weight": 0},
                    {"speaker": "bot", "text": "It is 5.", "loss_weight": 1}]},
    ], [
        [U("Hi there, what is 2+3?"), A("It is 5.")],
    ], "columns", {"columns": {"messages": "dialog", "role": "speaker", "content": "text", "weight": "loss_weight",
                               "user_tag": "prompter", "assistant_tag": "bot"}}),
    # nvidia/HelpSteer2: prompt, response and five scores; a multi-turn prompt joins its turns with <extra_id_1>
    "helpsteer2": ([
        {"prompt": "What is a delegate in C#?", "response": "A type that holds references to methods.",
         "helpfulness": 3, "correctness": 4, "coherence": 4, "complexity": 2, "verbosity": 1},
        {"prompt": "c#<extra_id_1>Assistant\nC# is a programming language by Microsoft.<extra_id_1>User\n"
                   "what is a delegate", "response": "A delegate is a type that references methods.",
         "helpfulness": 2, "correctness": 3, "coherence": 4, "complexity": 1, "verbosity": 1},
    ], [
        [U("What is a delegate in C#?"), A("A type that holds references to methods.")],
        [U("c#"), A("C# is a programming language by Microsoft.", weight=0), U("what is a delegate"),
         A("A delegate is a type that references methods.")],
    ], "prompt_response", {}),
    # LLaMA-Factory v1 (src/llamafactory/v1): content parts {"type": "text", "value": ...}, a loss_weight a turn
    "llamafactory_v1_parts": ([
        {"messages": [
            {"role": "system", "content": [{"type": "text", "value": "You are a terse tutor."}], "loss_weight": 0.0},
            {"role": "user", "content": [{"type": "text", "value": "Capital of France?"}], "loss_weight": 0.0},
            {"role": "assistant", "content": [{"type": "text", "value": "Paris, obviously."}], "loss_weight": 0.0},
            {"role": "user", "content": [{"type": "text", "value": "And of Spain?"}], "loss_weight": 0.0},
            {"role": "assistant", "content": [{"type": "text", "value": "Madrid."}], "loss_weight": 1.0}],
         "_dataset_name": "tutor"},
    ], [
        [S("You are a terse tutor."), U("Capital of France?"), A("Paris, obviously.", weight=0), U("And of Spain?"),
         A("Madrid.")],
    ], "messages", {}),
    # raw ShareGPT dumps: a conversation may open with the assistant's greeting (dropped, as FastChat does)
    "sharegpt_opens_with_assistant": ([
        {"id": "QWJhYvA_0", "conversations": [
            {"from": "gpt", "value": "Hello! How can I help you today?"},
            {"from": "human", "value": "Summarise: the cat sat on the mat."},
            {"from": "gpt", "value": "A cat sat on a mat."}]},
    ], [
        [U("Summarise: the cat sat on the mat."), A("A cat sat on a mat.")],
    ], "sharegpt", {}),
}


def _write(tmp_path, records, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("shape", list(SHAPES))
def test_public_shape_becomes_the_conversation_written_by_hand(shape, tmp_path):
    records, expected, fmt, opts = SHAPES[shape]
    p = prepare_examples(str(_write(tmp_path, records)), eval_fraction=0.0, **opts)
    assert p.format == fmt
    assert [ex["messages"] for ex in p.train] == expected
    uses = {row["field"]: row["use"] for row in p.fields}
    for rec in records:  # every field of the record is accounted for, none left unused
        assert set(rec) <= set(uses), set(rec) - set(uses)
    assert not any(row["unused_text_records"] for row in p.fields), p.fields  # no text left unused


# ----------------------------------------------------------------------------- labels by position


def _runs(labels):
    """Maximal runs of trained positions: [(start, end)]."""
    out, start = [], None
    for i, lab in enumerate(list(labels) + [IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = i
        elif lab == IGNORE_INDEX and start is not None:
            out.append((start, i))
            start = None
    return out


def _find(ids, piece, allowed):
    """Whether the token ids of `piece` occur contiguously in `ids` at positions all in `allowed`."""
    n = len(piece)
    return any(ids[i:i + n] == piece and all(j in allowed for j in range(i, i + n)) for i in range(len(ids) - n + 1))


def check_labels(tok, eot: str, example: dict, enc: dict | None = None):
    """The oracle: trained runs are the trained answers plus the end-of-turn token, in order; every other
    text of the conversation is present, untrained. `enc`: the encoding to check (default: the example's)."""
    enc = enc or encode_example(tok, example)
    ids, labels = enc["input_ids"], enc["labels"]
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ids, labels))
    eot_id = tok.convert_tokens_to_ids(eot)
    trained = [m for m in example["messages"] if m["role"] == "assistant" and m.get("weight", 1) != 0]
    runs = _runs(labels)
    assert [ids[s:e] for s, e in runs] == [tok(m["content"], add_special_tokens=False)["input_ids"] + [eot_id]
                                           for m in trained]
    untrained = {i for i, lab in enumerate(labels) if lab == IGNORE_INDEX}
    for m in example["messages"]:
        if m in trained:
            continue
        for line in m["content"].split("\n\n"):
            piece = tok(line, add_special_tokens=False)["input_ids"]
            assert _find(ids, piece, untrained), f"{m['role']} text not found untrained: {line!r}"


@pytest.fixture(scope="module")
def tiny_tok(session_outputs):
    from transformers import AutoTokenizer

    from lib.run.tiny import tiny_model_path

    return AutoTokenizer.from_pretrained(tiny_model_path())


@pytest.mark.parametrize("tokenizer, eot", [("tiny_tok", "</s>"), ("smol_tokenizer", "<|im_end|>")])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_trained_tokens_are_exactly_the_answers(shape, tokenizer, eot, tmp_path, request):
    """On the tiny tokenizer and on SmolLM2's real one."""
    tok = request.getfixturevalue(tokenizer)
    records, _, _, opts = SHAPES[shape]
    p = prepare_examples(str(_write(tmp_path, records)), eval_fraction=0.0, **opts)
    for ex in p.train:
        check_labels(tok, eot, ex)


def test_oracle_catches_a_weight_0_answer_that_is_trained(tiny_tok):
    example = {"messages": SHAPES["openai_chat_weights"][1][0]}
    unweighted = {"messages": [{k: v for k, v in m.items() if k != "weight"} for m in example["messages"]]}
    with pytest.raises(AssertionError):  # labels that train the weight-0 answer too fail the oracle
        check_labels(tiny_tok, "</s>", example, enc=encode_example(tiny_tok, unweighted))
    check_labels(tiny_tok, "</s>", example)


# ----------------------------------------------------------------------------- the whole stage


def test_weights_reach_the_audit_and_the_preview(tmp_path, outputs):
    from lib.data.prepare import preview

    records = SHAPES["slimorca_weights"][0] * 2
    report = run_prepare("weights", str(_write(tmp_path, records)), overrides=["data.eval_fraction=0"])
    assert report["counts"]["weight0_answers"] == 2
    shown = preview("weights")
    assert "Guten Morgen." in shown and "«Guten Morgen." not in shown
    assert "«Gute Nacht.</s>»" in shown


def test_field_table_reports_every_field(tmp_path, outputs):
    from lib.data.audit import fields_table

    records = SHAPES["openhermes_sharegpt"][0] * 3
    records[0] = dict(records[0], title="A leaf question")  # text in 1 of 3 records: a warning, not a stop
    report = run_prepare("hermes", str(_write(tmp_path, records)), overrides=["data.eval_fraction=0"])
    table = fields_table(report)
    assert table.loc["conversations", "used as"].startswith("the conversation")
    assert table.loc["source", "used as"].startswith("metadata")
    assert table.loc["title", "used as"].startswith("unused") and table.loc["title", "with text"] == 1
    assert any("field 'title' holds text in 1 of 3 records" in w for w in report["warnings"])
    assert json.loads(run_paths("hermes").data_report.read_text())["fields"] == report["fields"]


def test_preference_audit_says_rejected_is_not_trained(tmp_path, outputs):
    report = run_prepare("pref", str(_write(tmp_path, SHAPES["trl_preference"][0] * 2)),
                         overrides=["data.eval_fraction=0"])
    assert any("field 'rejected' (2 records) is not trained" in w for w in report["warnings"])
    rows = {r["field"]: r for r in report["fields"]}
    assert rows["chosen"]["use"] == "assistant answer (trained)"
    # rejected answers are kept with each example (for a later preference stage), never in the conversation
    ex = read_examples(run_paths("pref").train_data)[0]
    assert ex["metadata"]["rejected"] == "green." and "green." not in json.dumps(ex["messages"])


def test_columns_are_set_from_the_cli_and_saved(tmp_path, outputs):
    records, expected, _, opts = SHAPES["columns_mapping"]
    path = _write(tmp_path, records * 2)
    code = main(["prepare", "--run", "cols", "--data", str(path), "--set",
                 "data.columns={prompt: q, input: passage, response: a, system: persona}",
                 "--set", "data.eval_fraction=0"])
    assert code == 0
    from lib.run.config import load_config

    cfg = load_config(run_paths("cols").config)
    assert cfg.data.columns == opts["columns"] and cfg.data.format == "columns"
    assert [e["messages"] for e in read_examples(run_paths("cols").train_data)] == expected * 2


# ----------------------------------------------------------------------------- refusals

REFUSED = {
    "unused_text_field": ([{"instruction": "Summarise.", "context": "A long passage.", "output": "Short."}] * 3,
                          {}, "line 1: field 'context': holds text in 3 of 3 records and nothing uses it"),
    "weight_half": ([{"messages": [U("Hi"), {"role": "assistant", "content": "Hello", "weight": 0.5}]}],
                    {}, "line 1: field 'messages[2].weight': weight must be 0 (context, not trained) or 1"),
    "weight_1_on_user": ([{"conversations": [{"from": "human", "value": "Hi", "weight": 1},
                                             {"from": "gpt", "value": "Hello", "weight": 1}]}],
                         {}, "field 'conversations[1].weight': weight 1 on a user turn"),
    "ambiguous": ([{"instruction": "Why?", "output": "Because.", "response": "Since."}],
                  {}, "fit several formats (instruction_output, instruction_response): choose one with --format"),
    "ambiguous_ultrafeedback": (SHAPES["ultrafeedback_binarized"][0], {}, "fit several formats (messages, preference)"),
    # (LLaMA-Factory v1's loss_weight is read as the turn's weight: tests/test_public_sets.py)
    "unread_train_flag": ([{"messages": [{"role": "user", "content": "Hi", "train": False},
                                         {"role": "assistant", "content": "Hello", "train": False}]}],
                          {}, "field 'messages[].train': decides what is trained, but nothing reads it"),
    "tool_call_bad_json": ([{"messages": [U("Weather?"), {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris}"}}]}]}],
                           {}, "field 'messages[2].tool_calls[1].function.arguments': the tool call's arguments "
                               "are not valid JSON"),
    "tool_call_args_not_object": ([{"messages": [U("Weather?"), {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": "[1, 2]"}}]}]}],
                                  {}, "the tool call's arguments must be a JSON object, got a list"),
    "tool_call_no_name": ([{"messages": [U("Weather?"), {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"arguments": "{}"}}]}]}],
                          {}, "field 'messages[2].tool_calls[1].function.name': a tool call needs the function's name"),
    "tool_calls_on_user": ([{"messages": [{"role": "user", "content": "Hi", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {}}}]}, A("Hello")]}],
                           {}, "field 'messages[1].tool_calls': tool calls on a user turn"),
    "reasoning_on_user": ([{"messages": [{"role": "user", "content": "Hi", "reasoning_content": "hmm"}, A("Hello")]}],
                          {}, "field 'messages[1].reasoning_content': reasoning on a user turn"),
    "two_reasonings": ([{"messages": [U("2+2?"), {"role": "assistant", "content": "4", "reasoning_content": "Add.",
                                                  "thinking": "Sum."}]}],
                       {}, "two different reasonings (reasoning_content, thinking): keep one"),
    "tools_not_a_list": ([{"messages": [U("Hi"), A("Hello")], "tools": "{\"name\": \"f\"}"}],
                         {}, "field 'tools': expected a list of tool schemas, got an object"),
    "tool_without_name": ([{"messages": [U("Hi"), A("Hello")], "tools": [{"type": "function", "function": {}}]}],
                          {}, "field 'tools[1]': expected a tool schema with a name"),
    "sharegpt_call_bad_json": ([{"conversations": [{"from": "human", "value": "Hi"},
                                                   {"from": "function_call", "value": "get_weather(Paris)"}]}],
                               {}, "field 'conversations[2].value': the tool calls are not valid JSON"),
    "hh_rlhf_implicit_text": ([{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Go"}],
                              {}, "field 'chosen': 'chosen' has no prompt beside it"),
    "ignoring_a_used_field": (SHAPES["dolly"][0], {"ignore_fields": ["context"]},
                              "data.ignore_fields lists 'context', which the dolly format uses"),
    "mapped_field_missing": ([{"q": "Why?", "a": "Because."}], {"columns": {"prompt": "question", "response": "a"}},
                             "line 1: field 'question': missing field"),
    "ultrachat_prompt_differs": ([{"prompt": "A question nobody answers here.", "prompt_id": "x1",
                                   "messages": [U("How does a rainbow form?"), A("Light in raindrops.")]}],
                                 {}, "field 'prompt': holds text in 1 of 1 records and nothing uses it"),
    "format_and_columns": ([{"q": "Why?", "a": "Because."}],
                           {"fmt": "messages", "columns": {"prompt": "q", "response": "a"}},
                           "data.format=messages and data.columns both say how to read the records"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_in_one_line(case, tmp_path):
    records, opts, message = REFUSED[case]
    with pytest.raises(SFTError) as e:
        prepare_examples(str(_write(tmp_path, records)), eval_fraction=0.0, **opts)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_refused_field_is_accepted_once_ignored_or_mapped(tmp_path):
    records = REFUSED["unused_text_field"][0]
    path = _write(tmp_path, records)
    ignored = prepare_examples(str(path), eval_fraction=0.0, ignore_fields=["context"])
    assert ignored.train[0]["messages"][0]["content"] == "Summarise."
    assert ignored.train[0]["metadata"]["context"] == "A long passage."  # kept, not lost
    mapped = prepare_examples(str(path), eval_fraction=0.0,
                              columns={"prompt": "instruction", "input": "context", "response": "output"})
    assert mapped.train[0]["messages"][0]["content"] == "Summarise.\n\nA long passage."


def test_unused_text_in_few_records_is_a_warning_not_a_stop(tmp_path):
    records = [{"instruction": f"Q{i}?", "output": f"A{i}."} for i in range(4)]
    records[2]["note"] = "checked by hand"
    p = prepare_examples(str(_write(tmp_path, records)), eval_fraction=0.0)
    assert any("field 'note' holds text in 1 of 4 records" in w for w in p.notes)


def test_cli_refusal_exits_2_and_writes_nothing(tmp_path, outputs, capsys):
    path = _write(tmp_path, REFUSED["unused_text_field"][0])
    assert main(["prepare", "--run", "ctx", "--data", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "field 'context'" in err and "data.ignore_fields" in err and "\n" not in err
    assert not run_paths("ctx").root.exists()


def test_config_formats_are_the_shapes():
    from lib.data.formats import FORMATS
    from lib.run.settings import CHOICES

    assert CHOICES["data.format"] == ["auto", *FORMATS]


def test_a_record_with_every_answer_at_weight_0_is_dropped_and_counted(tmp_path):
    records = [{"messages": [U("Hi"), A("Hello", weight=0)]}, {"messages": [U("Hi"), A("Hey there")]}]
    p = prepare_examples(str(_write(tmp_path, records)), eval_fraction=0.0)
    assert p.dropped_empty == 1 and [ex["messages"] for ex in p.train] == [[U("Hi"), A("Hey there")]]


def test_ultrafeedback_read_as_messages_once_rejected_is_ignored(tmp_path):
    records = SHAPES["ultrafeedback_binarized"][0]
    path = _write(tmp_path, records)
    with pytest.raises(SFTError, match="field 'rejected': holds text in 1 of 1 records"):
        prepare_examples(str(path), fmt="messages", eval_fraction=0.0)  # chosen is a copy of messages
    p = prepare_examples(str(path), fmt="messages", eval_fraction=0.0, ignore_fields=["rejected"])
    assert [ex["messages"] for ex in p.train] == SHAPES["ultrafeedback_binarized"][1]


def test_columns_from_the_command_line_in_every_spelling():
    from lib.run.config import make_config

    for text in ("prompt=q,response=a", "{prompt: q, response: a}", '{"prompt": "q", "response": "a"}'):
        assert make_config("tiny", overrides=[f"data.columns={text}"]).data.columns == {"prompt": "q", "response": "a"}
    assert make_config("tiny", overrides=["data.ignore_fields=notes, url"]).data.ignore_fields == ["notes", "url"]
    assert make_config("tiny", overrides=["data.columns={}"]).data.columns is None


def test_a_rendering_of_the_record_says_what_else_it_holds(tmp_path):
    """A `text` beside instruction/output that holds them is taken as a rendering; whatever else it holds
    (here a passage the model would never see) is named in the audit, never dropped unmentioned."""
    rec = {"instruction": "Summarise.", "output": "Short.",
           "text": "Passage: the river floods each spring.\n### Instruction:\nSummarise.\n### Response:\nShort."}
    p = prepare_examples(str(_write(tmp_path, [rec])), eval_fraction=0.0)
    line = next(w for w in p.notes if w.startswith("field 'text'"))
    assert "taken as a rendering of the record" in line and "Passage: the river floods each spring." in line
