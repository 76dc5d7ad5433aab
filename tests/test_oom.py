"""Out of memory (lib/model/oom.py): batches that back off give the results of the smaller batch, and a stage that
runs out stops with one message (where, peak vs card, three settings for this run, the checkpoint kept).
The error is injected on the CPU as torch raises it on a GPU: torch.OutOfMemoryError from inside forward."""

from __future__ import annotations

import json
import shutil

import pytest

from lib.run.config import make_config
from lib.run.errors import OutOfMemoryError
from lib.run.paths import REPO_ROOT, run_paths


class OOMAbove:
    """A forward pre-hook on the input embeddings: raises torch.OutOfMemoryError for batches larger than
    `limit` rows (as a GPU would for big batches), and records the batch sizes it saw."""

    def __init__(self, module, limit: int):
        self.limit, self.sizes = limit, []
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        import torch

        rows = args[0].shape[0]
        self.sizes.append(rows)
        if rows > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (injected, {rows} rows)")


@pytest.fixture(scope="module")
def tuned(session_outputs):
    """The tiny 4-bit model with random LoRA adapters, eval mode, and 12 eval conversations."""
    from conftest import tiny_lora_model

    from lib.data.examples import prepare_examples

    model, tok = tiny_lora_model(make_config("tiny"))
    model.eval()
    prepared = prepare_examples(str(REPO_ROOT / "data" / "examples" / "socratic_dialogues.json"), eval_fraction=0.0)
    return model, tok, prepared.train[:12]


def error_line(capsys) -> str:
    """The one `error:` line of the CLI's stderr (progress bars aside), with no traceback anywhere."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


# ------------------------------------------------------------------------------ back-off


def test_is_oom_knows_torch_out_of_memory_and_nothing_else():
    import torch

    from lib.model.oom import in_batches, is_oom

    assert is_oom(torch.OutOfMemoryError("x")) and is_oom(torch.cuda.OutOfMemoryError("x"))
    assert is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) and not is_oom(ValueError("x"))
    calls = []

    def shape_error(batch):
        calls.append(len(batch))
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        in_batches(shape_error, list(range(8)), 8)
    assert calls == [8]  # another error is not retried with a smaller batch


def test_perplexity_backs_off_to_the_result_of_the_smaller_batch(tuned):
    from lib.evaluate.scoring import perplexity

    model, tok, examples = tuned
    reference = perplexity(model, tok, examples, batch_size=2, max_length=256, progress=False)
    full = perplexity(model, tok, examples, batch_size=8, max_length=256, progress=False)
    hook = OOMAbove(model.get_input_embeddings(), limit=2)
    try:
        backed = perplexity(model, tok, examples, batch_size=8, max_length=256, progress=False)
    finally:
        hook.handle.remove()
    assert hook.sizes[:3] == [8, 4, 2] and set(hook.sizes[3:]) == {2}  # halved twice, then kept at 2
    assert sum(hook.sizes[2:]) == len(examples)  # every example scored exactly once after backing off
    assert backed == reference  # the very same sums: loss, perplexity, tokens, examples
    assert backed["loss"] == pytest.approx(full["loss"], rel=1e-6) and backed["tokens"] == full["tokens"]


def test_generation_backs_off_to_the_same_greedy_tokens(tuned):
    from lib.model.generation import eval_conversations, generate_answers

    model, tok, examples = tuned
    convs = [c for _, c, _ in eval_conversations(examples)][:6]
    settings = {"max_new_tokens": 12, "do_sample": False, "repetition_penalty": 1.0}
    seen = []
    original = model.generate

    def recording(*args, **kwargs):  # the real generate; records the new token ids of each call
        out = original(*args, **kwargs)
        width = kwargs["input_ids"].shape[1]
        seen.extend(out[:, width:].tolist())
        return out

    model.generate = recording
    try:
        generate_answers(model, tok, convs, settings, batch_size=1, progress=False)
        one_by_one, seen[:] = list(seen), []
        hook = OOMAbove(model.get_input_embeddings(), limit=1)
        try:
            backed = generate_answers(model, tok, convs, settings, batch_size=4, progress=False)
        finally:
            hook.handle.remove()
    finally:
        del model.generate
    assert hook.sizes[:3] == [4, 2, 1]
    assert len(backed) == len(convs) and seen == one_by_one  # the same greedy tokens, prompt by prompt


def test_evaluation_at_a_batch_of_one_stops_with_the_message(trained_run, monkeypatch, capsys):
    """Even a batch of 1 runs out: one line from the CLI, exit 3, the stage and batch named, nothing written."""
    from conftest import copy_run

    import lib.evaluate.evaluation as evaluate
    from lib.__main__ import main

    run = copy_run(trained_run, "oom-eval")
    paths = run_paths(run)
    shutil.rmtree(paths.eval_dir, ignore_errors=True)
    real_load = evaluate.load_tuned_model

    def load_then_fill_the_card(cfg, adapter, info=None):
        model, tok = real_load(cfg, adapter, info=info)
        OOMAbove(model.get_input_embeddings(), limit=0)
        return model, tok

    monkeypatch.setattr(evaluate, "load_tuned_model", load_then_fill_the_card)
    assert main(["evaluate", "--run", run]) == 3
    msg = error_line(capsys)
    assert msg.startswith("error: out of memory in evaluation, perplexity (tuned), a batch of 1 (backed off from 8): ")
    assert "peak and card memory unavailable (no CUDA device" in msg  # not invented on the CPU
    assert "(1) train.max_length=128" in msg and "(2) generation.max_new_tokens=24" in msg and "(4)" not in msg
    assert not paths.perplexity.exists()


# ------------------------------------------------------------------------------ the stop


def test_out_of_memory_in_training_keeps_the_checkpoint_and_resumes(prepared_run, monkeypatch, capsys):
    """OOM at step 8 of 10 (checkpoints every 5): exit 3 with the step, the three settings the estimate ranks
    first for this run, checkpoint-5 kept whole; rerunning resumes from it and finishes."""
    from conftest import copy_run
    from transformers import TrainerCallback

    import lib.train.training as train
    from lib.__main__ import main
    from lib.run.config import load_config
    from lib.run.memory import estimate_memory, ranked_changes
    from lib.run.realmodel import load_model_config
    from lib.train.checkpoints import checkpoint_problem

    class FillTheCardAtStep8(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            if state.global_step == 7:
                OOMAbove(model.get_input_embeddings(), limit=0)

    run = copy_run(prepared_run, "oom-train")
    paths = run_paths(run)
    for p in (paths.checkpoints, paths.adapter, paths.logs):
        shutil.rmtree(p, ignore_errors=True)
    real_build = train.build_trainer
    monkeypatch.setattr(train, "build_trainer", lambda *a, callbacks=(), **kw: real_build(
        *a, callbacks=[*callbacks, FillTheCardAtStep8()], **kw))
    sets = ["--set", "train.max_steps=10", "--set", "train.save_steps=5", "--set", "train.eval_steps=5"]
    assert main(["train", "--run", run, *sets]) == 3
    msg = error_line(capsys)
    assert msg.startswith("error: out of memory in training, step 8 of 10 (micro-batches of 8 sequences of up to "
                          "256 tokens): peak and card memory unavailable")
    cfg = load_config(paths.config)
    ranked = ranked_changes(load_model_config(cfg), cfg)
    now = estimate_memory(load_model_config(cfg), cfg, suggest=False)["total_gb"]
    assert len(ranked) == 3 and [t for _, t in ranked] == sorted(t for _, t in ranked) and ranked[0][1] < now
    for i, (changes, _total) in enumerate(ranked, 1):
        assert f"({i}) {changes[0][0]}={changes[0][1]}" in msg
    assert "(4)" not in msg
    assert f"The last good checkpoint is kept: {paths.checkpoints / 'checkpoint-5'} (step 5)" in msg
    assert sorted(p.name for p in paths.checkpoints.glob("checkpoint-*")) == ["checkpoint-5"]
    assert checkpoint_problem(paths.checkpoints / "checkpoint-5") is None
    assert not paths.adapter.exists() and not paths.training_summary.exists()

    monkeypatch.setattr(train, "build_trainer", real_build)
    assert main(["train", "--run", run]) == 0
    summary = json.loads(paths.training_summary.read_text())
    assert summary["resumed_from"] == "checkpoint-5" and summary["global_step"] == 10


def test_out_of_memory_in_the_merge_names_the_cpu_merge(trained_run, monkeypatch, capsys):
    from conftest import copy_run

    import lib.ship.merge as merge
    from lib.__main__ import main

    run = copy_run(trained_run, "oom-merge")
    paths = run_paths(run)
    shutil.rmtree(paths.merged, ignore_errors=True)
    real_load = merge.load_16bit_with_adapter

    def load_then_fill_the_card(cfg, adapter, info=None):
        model = real_load(cfg, adapter, info=info)
        OOMAbove(model.get_input_embeddings(), limit=0)
        return model

    monkeypatch.setattr(merge, "load_16bit_with_adapter", load_then_fill_the_card)
    assert main(["merge", "--run", run]) == 3
    msg = error_line(capsys)
    assert msg.startswith("error: out of memory in merge, ")
    assert f"(1) merge on the CPU, where the 16-bit base fits in RAM: `CUDA_VISIBLE_DEVICES= python -m lib merge --run {run}`" in msg
    assert not paths.merged.exists() and not list(paths.root.glob(".merged-*"))  # nothing half-written


def test_a_stage_block_turns_out_of_memory_into_the_project_error_and_leaves_others():
    import torch

    from lib.model.oom import out_of_memory

    cfg = make_config("tiny", overrides={"generation.max_new_tokens": 40})
    with pytest.raises(OutOfMemoryError) as e:
        with out_of_memory("evaluation", cfg, doing="generate (tuned), a batch of 1", run="r"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
    assert e.value.exit_status == 3 and str(e.value).startswith(
        "out of memory in evaluation, generate (tuned), a batch of 1: peak and card memory unavailable")
    assert "(2) generation.max_new_tokens=20 (now 40)" in str(e.value)
    with pytest.raises(KeyError):  # not an out-of-memory error: untouched
        with out_of_memory("evaluation", cfg):
            raise KeyError("x")
