"""The untuned model's scores, computed once per (model, data, eval settings) and cached, so every
trial can report its gain over not fine-tuning at all without paying for that evaluation again."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

from src import metrics as M
from src import quant
from src.results import atomic_write_json

log = logging.getLogger(__name__)


def cache_key(cfg: Any, eval_file: Path) -> tuple[str, dict[str, Any]]:
    """Everything that changes the untuned model's eval scores, and its hash."""
    model = {k: cfg.model[k] for k in ("name", "source", "gguf_file", "path")}
    if str(cfg.model.source) == "tiny":  # random weights: the seed and shape are the model
        model.update(shape=dict(cfg.model.shape), seed=cfg.train.seed)
    if quant.active(cfg.quant):  # scored on the quantized base it trains on (fp32 bases keep their old key)
        model["precision"] = precision(cfg.quant)
    material = {
        "model": model,
        "eval_file_sha256": hashlib.sha256(eval_file.read_bytes()).hexdigest(),
        "data": {k: cfg.data[k] for k in ("id_field", "source_field", "summary_field", "header_field",
                                          "instruction", "truncation")},
        "max_seq_len": cfg.train.max_seq_len,
        "eval": {k: cfg.eval[k] for k in ("num_examples", "max_new_tokens", "metrics", "bertscore_package",
                                          "bertscore_num_layers", "decoder")},
    }
    material = json.loads(json.dumps(material, default=str))
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]
    return digest, material


def precision(q: Any) -> str:
    """The base weights the untuned model was scored with: fp32, or the quantized ones a trial trains on."""
    if not quant.active(q):
        return "fp32"
    return f"{q.method} {quant.resolved_type(q)}" + (" double-quant" if q.double_quant else "")


def get_or_compute(cache_dir: Path, cfg: Any, eval_file: Path,
                   compute: Callable[[], tuple[dict[str, float], list[dict[str, Any]]]],
                   ) -> tuple[dict[str, float], dict[str, Any]]:
    """Baseline metrics (named baseline/...) and facts about them: cached or not, seconds spent, the
    base's ``precision`` (a quantized trial's untuned model is its quantized base), and
    ``per_example``, the untuned model's own value of each metric per eval example (ids and numbers,
    eval/... names, as the trial's per_example.jsonl), for paired intervals of the gains."""
    digest, material = cache_key(cfg, eval_file)
    label = precision(cfg.quant)
    path = cache_dir / "baselines" / f"{digest}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # concurrent workers wait for the first one's result
        if path.is_file():
            stored = json.loads(path.read_text())
            return stored["metrics"], {"cached": True, "key": digest, "seconds": 0.0,
                                       "per_example": stored.get("per_example", []), "precision": label}
        log.info("scoring the untuned model once for these eval settings (cached as %s)", digest)
        start = time.perf_counter()
        scores, per_example = compute()
        seconds = time.perf_counter() - start
        metrics = {M.baseline_name(k): v for k, v in scores.items() if k in M.QUALITY}
        atomic_write_json(path, {"metrics": metrics, "key": material, "seconds": seconds, "per_example": per_example})
    return metrics, {"cached": False, "key": digest, "seconds": seconds, "per_example": per_example,
                     "precision": label}


def gains(metrics: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    return {M.gain_name(k): metrics[k] - baseline[M.baseline_name(k)]
            for k in M.QUALITY if k in metrics and M.baseline_name(k) in baseline}
