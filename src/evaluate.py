"""Evaluation: teacher-forced eval loss, batched greedy generation, ROUGE and BERTScore.

Generation is batched with left padding and a KV cache and stops at the end-of-turn token; the
caller merges LoRA into the weights first when eval.merge_adapter is on (as the model is deployed).
"""

from __future__ import annotations

import logging
import re
import time
import unicodedata
from dataclasses import dataclass
from typing import Any

import torch

from src import metrics as M
from src.data import Example
from src.loop import collate, target_loss
from src.paths import package_dir

log = logging.getLogger(__name__)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass
class Generation:
    texts: list[str]
    new_tokens: int
    seconds: float


@torch.no_grad()
def eval_loss(model: Any, examples: list[Example], batch_size: int, pad_id: int) -> float:
    """Mean cross-entropy per summary token (token-weighted across batches, padding excluded)."""
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size], pad_id)
        n = int((batch["labels"][:, 1:] != -100).sum())  # the model shifts labels by one
        total += target_loss(model, batch).item() * n
        count += n
    return total / count


@torch.no_grad()
def generate(model: Any, examples: list[Example], max_new_tokens: int, batch_size: int,
             pad_id: int, eos_id: int, tokenizer: Any) -> Generation:
    """Greedy summaries for the prompts, generated ``batch_size`` at a time (left padding)."""
    was_caching = model.config.use_cache
    model.config.use_cache = True
    texts: list[str] = []
    new_tokens = 0
    start = time.perf_counter()
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        width = max(len(ex.prompt_ids) for ex in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, ex in enumerate(chunk):
            ids[j, width - len(ex.prompt_ids):] = torch.tensor(ex.prompt_ids)
            mask[j, width - len(ex.prompt_ids):] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos_id, pad_token_id=pad_id, use_cache=True)
        for row in out[:, width:].tolist():
            if eos_id in row:
                row = row[: row.index(eos_id)]
            new_tokens += len(row) + 1  # +1: the end token (or the cut) also cost a forward pass
            texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    model.config.use_cache = was_caching
    return Generation(texts, new_tokens, time.perf_counter() - start)


def _sentences(text: str) -> str:
    # rougeLsum scores sentence by sentence and expects them separated by newlines. rouge-score can
    # split with nltk, but that needs the punkt data download, which is not available offline.
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


# Scripts written without spaces between words: each character (with its combining marks) is a token,
# as ROUGE for Chinese and Japanese is usually computed. Han, kana, Thai, Lao, Myanmar, Khmer.
_UNSPACED = re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
                       "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff]")


def unicode_words(text: str) -> list[str]:
    """Words of ``text``: runs of letters and digits (Unicode categories L and N) with their combining
    marks (M: Devanagari vowel signs, Arabic and Hebrew vowel points stay inside their word), after NFKC
    (ligatures and full-width forms become plain letters); unspaced scripts give one token a character."""
    words: list[str] = []
    word, alone = "", False
    for ch in unicodedata.normalize("NFKC", text).lower():
        kind = unicodedata.category(ch)[0]
        if kind == "M":
            word += ch if word else ""
        elif kind in "LN":
            if alone or (word and _UNSPACED.match(ch)):
                words.append(word)
                word = ""
            word += ch
            alone = bool(_UNSPACED.match(ch))
        else:
            if word:
                words.append(word)
            word, alone = "", False
    if word:
        words.append(word)
    return words


class UnicodeTokenizer:
    """rouge-score's tokenizer for every script.

    rouge-score's default keeps only a-z and 0-9, so a Chinese, Russian or Arabic summary has no tokens
    and scores 0 even when it equals its reference. This one takes ``unicode_words`` and Porter-stems
    ASCII words longer than 3 letters as the default does, so ASCII text gets exactly the default's
    tokens (and scores)."""

    def __init__(self) -> None:
        from rouge_score import tokenizers

        self._stem = tokenizers.DefaultTokenizer(use_stemmer=True)._stemmer.stem  # noqa: SLF001 - same stemmer

    def tokenize(self, text: str) -> list[str]:
        return [self._stem(w) if len(w) > 3 and w.isascii() else w for w in unicode_words(text)]


def rouge(predictions: list[str], references: list[str]) -> tuple[dict[str, float], list[float]]:
    """Mean ROUGE F1 (stemmed) per variant, and the per-example ROUGE-L F1."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(M.ROUGE_KEYS), tokenizer=UnicodeTokenizer())
    sums = dict.fromkeys(M.ROUGE_KEYS, 0.0)
    per_example = []
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(_sentences(ref), _sentences(pred))
        for k in M.ROUGE_KEYS:
            sums[k] += scores[k].fmeasure
        per_example.append(scores["rougeL"].fmeasure)
    n = len(predictions)
    return {f"eval/{k}": v / n for k, v in sums.items()}, per_example


def bertscore_f1(predictions: list[str], references: list[str], package: str, num_layers: int) -> float:
    """Mean raw BERTScore F1 with the MiniLM model shipped in a PyPI package (no rescale baseline
    exists for it, so the raw F1 is reported; compare it only with other raw MiniLM scores)."""
    from bert_score import score

    folder = package_dir(package)
    if folder is None:
        raise FileNotFoundError(f"eval.bertscore_package: '{package}' is not installed")
    # bert-score gives an empty candidate F1 = 0, but reaches that through a tokenizer method that
    # transformers 5 removed; so empty predictions get their 0 here and only the rest are scored.
    scored = [i for i, p in enumerate(predictions) if p.strip()]
    f1s = [0.0] * len(predictions)
    if scored:
        _, _, f1 = score([predictions[i] for i in scored], [references[i] for i in scored],
                         model_type=str(folder / "model"), num_layers=num_layers, device="cpu",
                         batch_size=32, verbose=False)
        for i, value in zip(scored, f1.tolist(), strict=True):
            f1s[i] = value
    return sum(f1s) / len(f1s)


def evaluate(model: Any, tokenizer: Any, examples: list[Example], ecfg: Any, pad_id: int, eos_id: int,
             loss_batch_size: int, timings: dict[str, float] | None = None,
             ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """All requested eval metrics, and one prediction row per example (kept in the trial dir only).
    ``timings`` receives the seconds spent on the eval loss, on generation and on scoring."""
    families = [str(m) for m in ecfg.metrics]
    out: dict[str, float] = {}
    spent = timings if timings is not None else {}
    if "loss" in families:
        t0 = time.perf_counter()
        out[M.EVAL_LOSS] = eval_loss(model, examples, loss_batch_size, pad_id)
        spent["eval_loss_s"] = time.perf_counter() - t0
    rows: list[dict[str, Any]] = []
    if "rouge" in families or "bertscore" in families:
        gen = generate(model, examples, ecfg.max_new_tokens, ecfg.batch_size, pad_id, eos_id, tokenizer)
        out[M.EVAL_GEN_TOKENS_PER_S] = gen.new_tokens / gen.seconds
        spent["eval_gen_s"] = gen.seconds
        t0 = time.perf_counter()
        refs = [ex.reference for ex in examples]
        rows = [{"id": ex.id, "reference": ex.reference, "prediction": text}
                for ex, text in zip(examples, gen.texts, strict=True)]
        if "rouge" in families:
            scores, per_example = rouge(gen.texts, refs)
            out.update(scores)
            for row, r in zip(rows, per_example, strict=True):
                row["rougeL"] = r
        if "bertscore" in families:
            out[M.EVAL_BERTSCORE_F1] = bertscore_f1(gen.texts, refs, ecfg.bertscore_package,
                                                    ecfg.bertscore_num_layers)
        spent["eval_score_s"] = time.perf_counter() - t0
    return out, rows
