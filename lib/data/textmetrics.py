"""Scores of generated answers against references, shared by evaluation (04) and the answers sampled while
training (logs/samples.jsonl): the same functions give both, so a step's figures equal the evaluation's.

    from lib.data.textmetrics import generation_metrics, text_metrics, style_scores
    generation_metrics(answers, references)   # answers: generate_answers() rows; BLEU, ROUGE-L, style, stop rate

BLEU is sacrebleu's corpus BLEU (0-100; characters for CJK references), ROUGE-L the mean F1 of rouge-score
(any script), the stop rate the share of answers that ended with an end-of-turn / eos token rather than at
the length limit, and the Socratic style score the share of answers that end with a question and the
questions per answer.
"""

from __future__ import annotations

import re

from lib.data.toolcalls import tool_call_metrics

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_QUESTION = re.compile(r"[^?？؟]*[?？؟]+")
_QUESTION_END = re.compile(r"[?？؟]+[\"'»”’)\]\s]*$")


class _UnicodeTokenizer:
    """rouge-score's tokenizer for any script: lower-case words (each CJK character its own token),
    with the Porter stemmer on ASCII words as rouge-score does. Equal to its default on English."""

    def __init__(self):
        from rouge_score import tokenizers

        self._default = tokenizers.DefaultTokenizer(use_stemmer=True)

    def tokenize(self, text: str) -> list[str]:
        text = _CJK.sub(lambda m: f" {m.group()} ", text.lower())
        tokens = []
        for word in re.findall(r"[^\W_]+", text):
            tokens.extend(self._default.tokenize(word) if word.isascii() else [word])
        return tokens


def count_questions(text: str) -> int:
    """Questions in a text: stretches with a word in them that end with a question mark (?, ？ or ؟)."""
    return sum(1 for part in _QUESTION.findall(text or "") if re.search(r"[^\W_]", part))


def is_question(text: str) -> bool:
    """An answer "is a question" when its last sentence ends with a question mark."""
    return bool(_QUESTION_END.search((text or "").strip())) and count_questions(text) > 0


def style_scores(answers: list[str]) -> dict:
    """Socratic style: share of answers that end with a question, questions per answer, words per answer."""
    n = max(1, len(answers))
    return {
        "question_rate": sum(is_question(a) for a in answers) / n,
        "questions_per_answer": sum(count_questions(a) for a in answers) / n,
        "mean_words": sum(len(re.findall(r"[^\W_]+", a or "")) for a in answers) / n,
    }


def rouge_l_per_answer(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F1 (rouge-score, any script) of each answer against its reference."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_UnicodeTokenizer())
    return [scorer.score(r or "", p or "")["rougeL"].fmeasure for p, r in zip(predictions, references)]


def text_metrics(predictions: list[str], references: list[str]) -> dict:
    """Corpus BLEU (sacrebleu, 0-100), mean ROUGE-L F1 (rouge-score, 0-1) and the style scores."""
    import sacrebleu

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {"bleu": None, "rouge_l": None, **style_scores([]), "bleu_signature": None}
    cjk = any(_CJK.search(r or "") for r in references)
    bleu = sacrebleu.metrics.BLEU(tokenize="char" if cjk else "13a")
    score = bleu.corpus_score([p or "" for p in predictions], [[r or "" for r in references]])
    rouge = rouge_l_per_answer(predictions, references)
    return {"bleu": score.score, "rouge_l": sum(rouge) / len(rouge), **style_scores(predictions),
            "bleu_signature": str(bleu.get_signature())}


def generation_metrics(predictions: list[dict], references: list[str]) -> dict:
    """text_metrics plus the stop rate, for generate_answers() output; for eval examples whose reference
    is a tool call, the share of answers holding a call that parses as JSON and names the reference
    function (lib/data/toolcalls.py)."""
    out = text_metrics([p["text"] for p in predictions], references)
    out["stop_rate"] = sum(bool(p["stopped"]) for p in predictions) / max(1, len(predictions))
    calls = tool_call_metrics([p["text"] for p in predictions], references)
    if calls is not None:
        out.update(calls)
    return out
