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
from src.loop import collate
from src.paths import package_dir

log = logging.getLogger(__name__)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass
class Generation:
    texts: list[str]
    new_tokens: int
    seconds: float


def eval_loss(model: Any, examples: list[Example], batch_size: int, pad_id: int) -> float:
    """Mean cross-entropy per summary token (token-weighted across examples, padding excluded), from
    teacher-forced passes over prompt + reference (the hf decoder's loss)."""
    losses = losses_batched(model, examples, batch_size, pad_id)
    return sum(s for s, _ in losses) / sum(c for _, c in losses)


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


def rouge(predictions: list[str], references: list[str]) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Mean ROUGE F1 (stemmed) per variant, and every variant's F1 per example."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(M.ROUGE_KEYS), tokenizer=UnicodeTokenizer())
    sums = dict.fromkeys(M.ROUGE_KEYS, 0.0)
    per_example = []
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(_sentences(ref), _sentences(pred))
        for k in M.ROUGE_KEYS:
            sums[k] += scores[k].fmeasure
        per_example.append({f"eval/{k}": scores[k].fmeasure for k in M.ROUGE_KEYS})
    n = len(predictions)
    return {f"eval/{k}": v / n for k, v in sums.items()}, per_example


def bertscore_f1(predictions: list[str], references: list[str], package: str, num_layers: int) -> list[float]:
    """Raw BERTScore F1 per example with the MiniLM model shipped in a PyPI package (no rescale baseline
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
    return f1s


def decoder_for(model: Any, requested: str) -> str:
    """The decoder that will run: the fast one when asked for and able to drive ``model``, else hf."""
    from src import decode

    return "fast" if requested == "fast" and decode.supported(model) else "hf"


def _loss_and_generation(model: Any, tokenizer: Any, examples: list[Example], ecfg: Any, pad_id: int,
                         eos_id: int, loss_batch_size: int, with_loss: bool, with_gen: bool,
                         spent: dict[str, float]) -> tuple[list[tuple[float, int]] | None, Generation | None]:
    """Per example (summed reference cross-entropy, reference tokens), and the greedy summaries."""
    from src import decode

    if decoder_for(model, str(ecfg.decoder)) == "fast":
        d = decode.run(model, examples, ecfg.max_new_tokens, ecfg.batch_size, pad_id, eos_id, with_loss, with_gen)
        losses = (list(zip(d.loss_sums, d.loss_counts, strict=True))
                  if with_loss and d.loss_sums is not None and d.loss_counts is not None else None)
        gen = None
        if with_gen:
            texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in d.tokens]
            gen = Generation(texts, sum(len(ids) + 1 for ids in d.tokens), d.gen_seconds)
        if with_loss:
            spent["eval_loss_s"] = d.loss_seconds
        spent["eval_prompt_s"] = d.prompt_seconds  # the prompt pass: what no decoding speed-up can remove
        return losses, gen
    losses = None
    if with_loss:
        t0 = time.perf_counter()
        losses = losses_batched(model, examples, loss_batch_size, pad_id)
        spent["eval_loss_s"] = time.perf_counter() - t0
    gen = None
    if with_gen:
        gen = generate(model, examples, ecfg.max_new_tokens, ecfg.batch_size, pad_id, eos_id, tokenizer)
    return losses, gen


@torch.no_grad()
def losses_batched(model: Any, examples: list[Example], batch_size: int, pad_id: int) -> list[tuple[float, int]]:
    """Summed cross-entropy and token count per example, from batched teacher-forced passes."""
    from src.loop import label_logits

    out: list[tuple[float, int]] = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        logits, targets, rows = label_logits(model, collate(chunk, pad_id))
        per_token = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
        sums = torch.zeros(len(chunk), dtype=per_token.dtype).index_add_(0, rows, per_token)
        counts = torch.bincount(rows, minlength=len(chunk))
        out += [(float(s), int(c)) for s, c in zip(sums, counts, strict=True)]
    return out


def evaluate(model: Any, tokenizer: Any, examples: list[Example], ecfg: Any, pad_id: int, eos_id: int,
             loss_batch_size: int, timings: dict[str, float] | None = None,
             ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """All requested eval metrics, and one row per example: its id, reference and prediction (text,
    kept in the trial dir only) and its own value of every metric (numbers, see ``per_example``).
    ``timings`` receives the seconds spent on the eval loss, on generation and on scoring."""
    families = [str(m) for m in ecfg.metrics]
    out: dict[str, float] = {}
    spent = timings if timings is not None else {}
    with_gen = "rouge" in families or "bertscore" in families
    losses, gen = _loss_and_generation(model, tokenizer, examples, ecfg, pad_id, eos_id, loss_batch_size,
                                       "loss" in families, with_gen, spent)
    rows: list[dict[str, Any]] = [{"id": ex.id} for ex in examples]
    if losses is not None:
        out[M.EVAL_LOSS] = sum(s for s, _ in losses) / sum(c for _, c in losses)
        for row, (loss_sum, count) in zip(rows, losses, strict=True):
            row[M.EVAL_LOSS] = loss_sum / count
            row[M.EVAL_LOSS_TOKENS] = count
    if gen is not None:
        out[M.EVAL_GEN_TOKENS_PER_S] = gen.new_tokens / gen.seconds
        spent["eval_gen_s"] = gen.seconds
        t0 = time.perf_counter()
        refs = [ex.reference for ex in examples]
        for row, ex, text in zip(rows, examples, gen.texts, strict=True):
            row.update(reference=ex.reference, prediction=text)
        if "rouge" in families:
            scores, per_example = rouge(gen.texts, refs)
            out.update(scores)
            for row, values in zip(rows, per_example, strict=True):
                row.update(values)
        if "bertscore" in families:
            f1s = bertscore_f1(gen.texts, refs, ecfg.bertscore_package, ecfg.bertscore_num_layers)
            out[M.EVAL_BERTSCORE_F1] = sum(f1s) / len(f1s)
            for row, value in zip(rows, f1s, strict=True):
                row[M.EVAL_BERTSCORE_F1] = value
        spent["eval_score_s"] = time.perf_counter() - t0
    return out, rows


def per_example(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows without their text: example ids and numbers only (safe to keep beside the record)."""
    return [{k: v for k, v in row.items() if k not in ("reference", "prediction")} for row in rows]
