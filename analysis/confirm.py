"""Confirmation on held-out test data: a study's front (or its top K) run again with several seeds,
evaluated on the data's test split, recorded as its own study, and reported with intervals.

A search picks the configurations that looked best on the eval examples, so their eval scores are
optimistic (the winner's curse); the test split, which no search ever reads, gives the unbiased
answer. Each configuration becomes a config group option ``<out>/confirm/<label>.yaml`` (as the
report's recommended configs), and one grid sweep runs ``+confirm=<labels> x train.seed=<seeds>``
with ``data.eval_on=test_file``, as study ``<study>-confirm``; ``confirm.json`` links
it to the study it confirms.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from analysis import configs
from analysis.summary import Group, Summary
from src.paths import PROJECT_ROOT

GROUP = "confirm"
LINK_FILE = "confirm.json"
# A configuration's own seed and evaluation split are what the confirmation replaces (its
# eval.num_examples stays, unless --examples overrides it on the command line).
_REPLACED = ("train.seed=", "data.eval_on=", "data.test_file=")


def chosen(s: Summary, top: int | None) -> list[Group]:
    """The front, or the ``top`` feasible configurations by the first objective."""
    if top is None:
        return list(s.front)
    sign = -1.0 if s.directions[0] == "maximize" else 1.0
    return sorted((g for g in s.groups if g.feasible), key=lambda g: (sign * g.values[0], g.numbers[0]))[:top]


def label(g: Group) -> str:
    return "trial_" + "_".join(str(n) for n in g.numbers)


def test_file(groups: list[Group]) -> str:
    """The test split the configurations' data config names; refused when there is none."""
    files = {((g.rows[0].record or {}).get("config") or {}).get("data", {}).get("test_file") for g in groups}
    if None in files or len(files) != 1:
        raise ValueError("data.test_file is not set in these trials' data config (or differs between them): add a "
                         "held-out file to the data config (conf/data/mts_dialog.yaml has test_file: test1.jsonl), "
                         "or give --test-file")
    return str(files.pop())


def plan(s: Summary, out: Path, seeds: int, top: int | None, test: str | None, examples: int | None,
         extra: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Write the configs and the link file; return the sweep's command and the link."""
    for flag, value in (("--seeds", seeds), ("--top", top), ("--examples", examples)):
        if value is not None and value < 1:
            raise ValueError(f"{flag}: give at least 1, got {value}")
    groups = chosen(s, top)
    if not groups:
        raise ValueError(f"{s.data.name}: no feasible configuration to confirm (see the report's notes)")
    test = test or test_file(groups)
    name = f"{s.data.name}-confirm"
    link: dict[str, Any] = {"confirms": s.data.name, "source": s.data.source, "study": name, "test_file": test,
                            "seeds": list(range(1, seeds + 1)), "configurations": {}}
    for g in groups:
        overrides = [o for o in g.overrides if not o.lstrip("+").startswith(_REPLACED)]
        configs_path = out / GROUP / f"{label(g)}.yaml"
        configs_path.parent.mkdir(parents=True, exist_ok=True)
        configs_path.write_text(configs.as_config(overrides, f"trial {g.label} of study {s.data.name}"))
        link["configurations"][label(g)] = {"trials": g.numbers, "overrides": configs.reproducible(overrides),
                                            "eval": {n: g.mean.get(n) for n in s.objective_names}}
    command = ["python", "-m", "src.train", "-m", "--config-dir", str(out),
               f"+{GROUP}={','.join(link['configurations'])}", f"train.seed={','.join(map(str, link['seeds']))}",
               "data.eval_on=test_file", f"data.test_file={test}",
               *([f"eval.num_examples={examples}"] if examples else []),
               f"hydra.sweeper.study_name={name}", f"hydra.sweep.dir={out / 'sweep'}", *extra]
    link["command"] = " ".join(shlex.quote(c) for c in command)
    (out / LINK_FILE).write_text(json.dumps(link, indent=2))
    return command, link


def run(command: list[str], storage: str | None) -> int:
    """The sweep, in this project's interpreter; the storage travels in the environment, never on a
    command line (its URL may hold a password)."""
    env = dict(os.environ)
    if storage:
        env["PARETUNE_STUDY_STORAGE"] = storage
    return subprocess.run([sys.executable, *command[1:]], cwd=PROJECT_ROOT, env=env).returncode
