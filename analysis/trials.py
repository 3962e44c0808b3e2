"""Trials of a study as one table, read from the Optuna storage or from result.json files.

Both sources give the same rows: the storage's user attrs point at each trial's result.json (the
full record), and a record names its study, trial number and searched params. Failed, pruned and
interrupted trials are rows too, with their reasons.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from src import metrics as M
from src import overrides as src_overrides
from src import results
from src.redact import scrub

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
    # What the trial took: its worker's wall time (its record's timings); without a record, its start
    # to its end in the study (a stale trial, found lost later, has none).
    seconds: float | None = None

    def config_key(self) -> str:
        """Identical configurations share this key (repeats of one setting, with any seed, are merged by it)."""
        if self.record is not None and isinstance(self.record.get("config"), dict):
            config = {k: v for k, v in self.record["config"].items() if k not in _NOT_CONFIGURATION}
            if isinstance(config.get("train"), dict):  # other seeds are repeats of one configuration
                config["train"] = {k: v for k, v in config["train"].items() if k != "seed"}
        else:
            config = {"params": {k: v for k, v in self.params.items() if k != "train.seed"}}
        return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class StudyData:
    name: str
    objectives: list[tuple[str, str]]   # (metric, "maximize" | "minimize"), in declared order
    rows: list[TrialRow]
    source: str                          # where it was read from, for the report
    study: Any = None                    # the optuna.Study when read from a storage
    # (path, why) of each record that could not be read: reported, never silently dropped.
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    @property
    def completed(self) -> list[TrialRow]:
        return [r for r in self.rows if r.status == "completed" and r.values is not None]


def safe(value: Any) -> Any:
    """``value`` with every storage password masked (strings, and strings inside lists and dicts).

    Every override, param, error and source a report shows passes through here when the rows are
    built, so no writer downstream can put a database password into a report file."""
    return scrub(value)


def _numbers(record: dict[str, Any], group: str) -> str | None:
    values = record.get(group, {})
    if values is None:
        values = {}
    if not isinstance(values, dict):
        return f"'{group}' is not a mapping"
    for key, v in values.items():
        if group == "objectives" and v is None:
            continue
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
            return f"{group}[{str(key)!r}] is not a finite number"
    return None


def check_record(record: Any) -> str | None:
    """Why ``record`` is not a usable trial record, or None. Names fields only, never their text."""
    if not isinstance(record, dict):
        return "not a trial record (the JSON is not an object)"
    if not isinstance(record.get("status"), str):
        return "not a trial record (no 'status')"
    trial = record.get("trial", {})
    if not isinstance(trial, dict):
        return "'trial' is not a mapping"
    overrides = trial.get("overrides", [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        return "'trial.overrides' is not a list of strings"
    study = trial.get("study") or {}
    if not isinstance(study, dict) or not isinstance(study.get("params") or {}, dict):
        return "'trial.study' is not a mapping with a 'params' mapping"
    for key, number in (("trial.study.trial", study.get("trial")), ("trial.job_num", trial.get("job_num"))):
        if number is not None and (not isinstance(number, int) or isinstance(number, bool)):
            return f"'{key}' is not a whole number"
    for group in ("metrics", "baseline", "objectives"):
        if (why := _numbers(record, group)) is not None:
            return why
    error = record.get("error")
    if error is not None and not isinstance(error, dict):
        return "'error' is not a mapping"
    return None


def read_record(path: str | Path) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None), or (None, why it cannot be used): missing, cut short, not JSON, wrong shape."""
    record, why = results.load(Path(path))
    if record is None:
        return None, why
    why = check_record(record)
    return (None, why) if why else (record, None)


def _study(record: dict[str, Any]) -> dict[str, Any]:
    """The record's ``trial.study`` block (name, trial number, params), empty when it has none."""
    return (record.get("trial") or {}).get("study") or {}


def _objectives(record: dict[str, Any]) -> list[tuple[str, str]] | None:
    declared = (record.get("config") or {}).get("objectives") if isinstance(record.get("config"), dict) else None
    if not isinstance(declared, list) or not declared:
        return None
    out = []
    for o in declared:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str) or \
                str(o.get("direction")).lower() not in ("maximize", "minimize"):
            return None
        out.append((o["name"], str(o["direction"]).lower()))
    return out


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
    return dict(src_overrides.texts(overrides, skip=("study.", "hydra.")))


def from_storage(study_name: str, storage: str) -> StudyData:
    """Every trial of ``study_name`` in ``storage`` (journal file path or database URL)."""
    import optuna
    from optuna.trial import TrialState

    from src.sweeper import pruning
    from src.sweeper import study as S

    store = S.open_storage(storage)
    try:
        study = optuna.load_study(study_name=study_name, storage=store)
    except KeyError:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(store))
        raise ValueError(f"no study named '{study_name}' in {safe(storage)}; studies there: {names}; "
                         "give one of them to --study, or the storage that holds it to --storage") from None
    names = list(study.metric_names or [f"objective_{i}" for i in range(len(study.directions))])
    directions = [d.name.lower() for d in study.directions]
    states = {TrialState.COMPLETE: "completed", TrialState.FAIL: "failed", TrialState.PRUNED: "pruned",
              TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}
    rows = []
    unreadable: list[tuple[str, str]] = []
    seen: set[str] = set()
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        path = attrs.get(S.RESULT_PATH)
        if attrs.get(S.REPEAT_OF) is not None and path in seen:
            continue  # a repeat whose values were reused (on_repeat=reuse): the same record, not a measurement
        if path:
            seen.add(path)
        record, why = read_record(attrs[S.RESULT_PATH]) if attrs.get(S.RESULT_PATH) else (None, None)
        if why is not None and t.state not in (TrialState.RUNNING, TrialState.WAITING):
            # The study's own attrs still give this trial's metrics; the record's extras are lost.
            unreadable.append((str(attrs[S.RESULT_PATH]), why))
        if record is not None:
            metrics, baseline = dict(record.get("metrics") or {}), dict(record.get("baseline") or {})
        else:
            metrics, baseline = _split_metrics(attrs.get(S.METRICS, {}))
        overrides = list(attrs.get(S.OVERRIDES) or (record or {}).get("trial", {}).get("overrides", []))
        status = states[t.state]
        error = attrs.get(S.ERROR) or ((record or {}).get("error") or {}).get("message")
        if t.state == TrialState.PRUNED and not error:
            error = pruning.reason(max(pruning.signal_values(t), default=None))
        rows.append(TrialRow(
            number=t.number, status=status, params=safe(dict(t.params)), overrides=safe(overrides),
            metrics=metrics, baseline=baseline,
            values=list(t.values) if t.state == TrialState.COMPLETE and t.values else None,
            error=safe(error) if status != "completed" else None, result_path=attrs.get(S.RESULT_PATH),
            record=record, seconds=_seconds(t, record)))
    return StudyData(study_name, list(zip(names, directions, strict=True)), rows,
                     f"study '{study_name}' in {safe(storage)}", study, unreadable)


def _gather(paths: list[Path]) -> tuple[list[tuple[Path, dict[str, Any]]], list[tuple[str, str]]]:
    """Every result.json under ``paths``: the readable records, and (path, why) of the others."""
    files: list[Path] = []
    for path in paths:
        if not path.exists():
            raise ValueError(f"{path} does not exist; give sweep folders or result.json files "
                             "(or --study NAME to read the study from --storage)")
        files.extend(results.record_files(path, recursive=True))
    records, unreadable = [], []
    for f in files:
        record, why = read_record(f)
        if record is not None and _objectives(record) is None:
            record, why = None, "declares no objectives (config.objectives)"
        if record is None:
            unreadable.append((str(f), why or "unreadable"))
        else:
            records.append((f, record))
    return records, unreadable


def describe_unreadable(unreadable: list[tuple[str, str]]) -> str:
    """``N (path: why; ...)``: how the reports name the records they could not use."""
    return f"{len(unreadable)} ({'; '.join(f'{path}: {why}' for path, why in unreadable)})"


def from_records(paths: Iterable[Path], study_name: str | None = None) -> StudyData:
    """Trials from result.json files, or every result.json under the given folders.

    With ``study_name``, only the records of that study; without it, the records must come from one
    study (or from sweeps with the same objectives). Records that cannot be read (cut short by a
    crash, edited by hand) are listed in ``unreadable``; with none readable at all, this refuses."""
    paths = list(paths)
    records, unreadable = _gather(paths)
    if study_name is not None:
        records = [(f, r) for f, r in records if _study(r).get("name") == study_name]
    if not records:
        also = f"; unreadable records: {describe_unreadable(unreadable)}" if unreadable else ""
        raise ValueError(f"no {'readable ' if unreadable else ''}result.json"
                         f"{' of study ' + repr(study_name) if study_name else ''} under "
                         f"{[str(p) for p in paths]}{also}")
    declared = {json.dumps(_objectives(r)) for _, r in records}
    if len(declared) != 1:
        raise ValueError("these records declare different objectives; report one study at a time (--study NAME)")
    objectives = _objectives(records[0][1]) or []
    names = [n for n, _ in objectives]
    rows = []
    for index, (path, r) in enumerate(records):
        trial = r.get("trial") or {}
        study = _study(r)
        number: Any = study.get("trial")
        if number is None:
            number = trial.get("job_num") if trial.get("job_num") is not None else index
        overrides = [o for o in trial.get("overrides", []) if not o.startswith("study.")]
        params = dict(study.get("params") or _params_from_overrides(overrides))
        rows.append(TrialRow(
            number=int(number), status=str(r.get("status")), params=safe(params), overrides=safe(overrides),
            metrics=dict(r.get("metrics") or {}), baseline=dict(r.get("baseline") or {}),
            values=_objective_values(r, names), error=safe(_reason(r)), result_path=str(path.resolve()), record=r,
            seconds=_wall(r)))
    rows.sort(key=lambda row: row.number)
    names_seen = {_study(r).get("name") for _, r in records}
    name = study_name or (next(iter(names_seen)) if len(names_seen) == 1 and None not in names_seen else None)
    return StudyData(name or "trials", objectives, rows, ", ".join(str(p) for p in paths),
                     unreadable=unreadable)


def metric_names(data: StudyData) -> list[str]:
    """Every metric some trial measured, in the project's canonical order."""
    seen = {k for r in data.rows for k in r.metrics}
    order = [*M.ALWAYS, *M.QUALITY, M.EVAL_GEN_TOKENS_PER_S]
    return [m for m in order if m in seen] + sorted(seen - set(order))


def per_example(row: TrialRow) -> list[dict[str, Any]]:
    """The trial's per-example scores (per_example.jsonl beside its record: ids and numbers), or []
    when the record predates them or the file cannot be read."""
    name = ((row.record or {}).get("artifacts") or {}).get("per_example")
    if not name or not row.result_path:
        return []
    try:
        return results.read_jsonl(Path(row.result_path).parent / name)
    except (OSError, ValueError):
        return []


def _seconds(t: Any, record: dict[str, Any] | None) -> float | None:
    from src.sweeper import study as S

    wall = _wall(record or {})
    if wall is not None or t.user_attrs.get(S.STALE):  # a lost trial ends when another sweep notices
        return wall
    if t.datetime_complete is None or t.datetime_start is None:
        return None
    return float((t.datetime_complete - t.datetime_start).total_seconds())


def _wall(record: dict[str, Any]) -> float | None:
    """The worker's own wall time, from its record."""
    return _number((record.get("timings") or {}).get("worker_wall_s"))


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _reason(record: dict[str, Any]) -> str | None:
    """Why a trial did not complete: its error, or the step the study's pruner stopped it at."""
    from src.sweeper import pruning

    message = (record.get("error") or {}).get("message")
    if record.get("status") == "pruned" and not message:
        return pruning.reason(pruning.record_step(record))
    return message
