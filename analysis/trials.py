"""Trials of a study as one table, read from the Optuna storage or from result.json files.

Both sources give the same rows: the storage's user attrs point at each trial's result.json (the
full record), and a record names its study, trial number and searched params. Failed, pruned and
interrupted trials are rows too, with their reasons.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from src import metrics as M

# Config sections that do not change what a trial measures: where files go, how it is tracked,
# which study and trial number it had. Two trials equal outside them ran the same configuration.
_NOT_CONFIGURATION = ("study", "paths", "logger", "trial")


@dataclass
class TrialRow:
    number: int
    status: str                        # completed | failed | pruned | running | waiting
    params: dict[str, Any]             # the searched keys and their values
    overrides: list[str]               # the command-line overrides that reproduce it
    metrics: dict[str, float] = field(default_factory=dict)
    baseline: dict[str, float] = field(default_factory=dict)
    values: list[float] | None = None  # objectives, in declared order (completed trials only)
    error: str | None = None
    result_path: str | None = None
    record: dict[str, Any] | None = None

    def config_key(self) -> str:
        """Identical configurations share this key (repeats of one setting are merged by it)."""
        if self.record is not None and isinstance(self.record.get("config"), dict):
            config = {k: v for k, v in self.record["config"].items() if k not in _NOT_CONFIGURATION}
        else:
            config = {"params": self.params}
        return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class StudyData:
    name: str
    objectives: list[tuple[str, str]]   # (metric, "maximize" | "minimize"), in declared order
    rows: list[TrialRow]
    source: str                          # where it was read from, for the report
    study: Any = None                    # the optuna.Study when read from a storage

    @property
    def completed(self) -> list[TrialRow]:
        return [r for r in self.rows if r.status == "completed" and r.values is not None]


def _read_record(path: str | Path | None) -> dict[str, Any] | None:
    if not path:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _split_metrics(flat: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    metrics = {k: float(v) for k, v in flat.items() if not k.startswith(("gain/", "baseline/"))}
    baseline = {k: float(v) for k, v in flat.items() if k.startswith("baseline/")}
    return metrics, baseline


def _objective_values(record: dict[str, Any], names: list[str]) -> list[float] | None:
    objectives = record.get("objectives") or {}
    if record.get("status") != "completed" or any(n not in objectives for n in names):
        return None
    return [float(objectives[n]) for n in names]


def _params_from_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for o in overrides:
        if "=" in o and not o.startswith(("study.", "hydra.")):
            key, value = o.split("=", 1)
            out[key.lstrip("+~")] = value
    return out


def from_storage(study_name: str, storage: str) -> StudyData:
    """Every trial of ``study_name`` in ``storage`` (journal file path or database URL)."""
    import optuna
    from optuna.trial import TrialState

    from src.sweeper import study as S

    store = S.open_storage(storage)
    try:
        study = optuna.load_study(study_name=study_name, storage=store)
    except KeyError:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(store))
        raise ValueError(f"no study named '{study_name}' in {S.mask_url(storage)}; studies there: {names}") from None
    names = list(study.metric_names or [f"objective_{i}" for i in range(len(study.directions))])
    directions = [d.name.lower() for d in study.directions]
    states = {TrialState.COMPLETE: "completed", TrialState.FAIL: "failed", TrialState.PRUNED: "pruned",
              TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}
    rows = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        record = _read_record(attrs.get(S.RESULT_PATH))
        if record is not None:
            metrics, baseline = dict(record.get("metrics", {})), dict(record.get("baseline", {}))
        else:
            metrics, baseline = _split_metrics(attrs.get(S.METRICS, {}))
        overrides = list(attrs.get(S.OVERRIDES) or (record or {}).get("trial", {}).get("overrides", []))
        status = states[t.state]
        error = attrs.get(S.ERROR) or ((record or {}).get("error") or {}).get("message")
        rows.append(TrialRow(
            number=t.number, status=status, params=dict(t.params), overrides=overrides, metrics=metrics,
            baseline=baseline, values=list(t.values) if t.state == TrialState.COMPLETE and t.values else None,
            error=error if status != "completed" else None, result_path=attrs.get(S.RESULT_PATH), record=record))
    return StudyData(study_name, list(zip(names, directions, strict=True)), rows,
                     f"study '{study_name}' in {S.mask_url(storage)}", study)


def from_records(paths: Iterable[Path], study_name: str | None = None) -> StudyData:
    """Trials from result.json files, or every result.json under the given folders.

    With ``study_name``, only the records of that study; without it, the records must come from one
    study (or from sweeps with the same objectives)."""
    paths = list(paths)
    files: list[Path] = []
    for path in paths:
        if not path.exists():
            raise ValueError(f"{path} does not exist")
        files.extend([path] if path.is_file() else sorted(path.rglob("result.json")))
    records = [(f, r) for f in files if (r := _read_record(f)) is not None]
    if study_name is not None:
        records = [(f, r) for f, r in records if ((r.get("trial") or {}).get("study") or {}).get("name") == study_name]
    if not records:
        raise ValueError(f"no result.json{' of study ' + repr(study_name) if study_name else ''} under "
                         f"{[str(p) for p in paths]}")
    declared = {json.dumps(r.get("config", {}).get("objectives")) for _, r in records}
    if len(declared) != 1:
        raise ValueError("these records declare different objectives; report one study at a time (--study NAME)")
    objectives = [(o["name"], str(o["direction"]).lower()) for o in records[0][1]["config"]["objectives"]]
    names = [n for n, _ in objectives]
    rows = []
    for index, (path, r) in enumerate(records):
        trial = r.get("trial") or {}
        study = trial.get("study") or {}
        number: Any = study.get("trial")
        if number is None:
            number = trial.get("job_num") if trial.get("job_num") is not None else index
        overrides = [o for o in trial.get("overrides", []) if not o.startswith("study.")]
        params = dict(study.get("params") or _params_from_overrides(overrides))
        rows.append(TrialRow(
            number=int(number), status=str(r.get("status")), params=params, overrides=overrides,
            metrics=dict(r.get("metrics", {})), baseline=dict(r.get("baseline", {})),
            values=_objective_values(r, names), error=(r.get("error") or {}).get("message"),
            result_path=str(path.resolve()), record=r))
    rows.sort(key=lambda row: row.number)
    names_seen = {((r.get("trial") or {}).get("study") or {}).get("name") for _, r in records}
    name = study_name or (next(iter(names_seen)) if len(names_seen) == 1 and None not in names_seen else None)
    return StudyData(name or "trials", objectives, rows, ", ".join(str(p) for p in paths))


def metric_names(data: StudyData) -> list[str]:
    """Every metric some trial measured, in the project's canonical order."""
    seen = {k for r in data.rows for k in r.metrics}
    order = [*M.ALWAYS, *M.QUALITY, M.EVAL_GEN_TOKENS_PER_S]
    return [m for m in order if m in seen] + sorted(seen - set(order))
