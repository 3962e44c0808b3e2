"""A trial's command-line overrides as the command and as a config file that reproduce it.

The config file is a Hydra config group option (``<report>/recommended/<name>.yaml``) in the
experiment style: group choices become ``override /group: option`` in its defaults list, values
become nested keys, so ``python -m src.train --config-dir <report> +recommended=<name>`` composes
exactly what ``python -m src.train <overrides>`` does.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml

from src.overrides import key as override_key
from src.overrides import parse as parse_overrides
from src.paths import PROJECT_ROOT

CONF = PROJECT_ROOT / "conf"
GROUP = "recommended"


# Where the study is recorded is not part of what a trial runs, and its URL may carry a password.
_BOOKKEEPING = ("study.", "hydra.", "hydra/", "paths.study_storage=")


def reproducible(overrides: list[str]) -> list[str]:
    """The overrides that matter for one run: study bookkeeping and Hydra's own settings dropped."""
    return [o for o in overrides if not o.lstrip("+~").startswith(_BOOKKEEPING)]


def command(overrides: list[str]) -> str:
    return " ".join(["python -m src.train", *(shlex.quote(o) for o in reproducible(overrides))])


def _is_group(key: str) -> bool:
    return (CONF / key).is_dir()


def as_config(overrides: list[str], header: str) -> str:
    """The YAML text of the config group option equivalent to ``overrides``."""
    defaults: list[Any] = []
    body: dict[str, Any] = {}
    for o in parse_overrides(reproducible(overrides)):
        key = override_key(o)
        if o.is_delete():
            raise ValueError(f"override '{o.input_line}' deletes a key; a config file cannot say that")
        if _is_group(key):
            defaults.append({f"override /{key}": o.value()})
            continue
        node = body
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = o.value()
    doc: dict[str, Any] = {}
    if defaults:
        doc["defaults"] = [*defaults, "_self_"]
    doc.update(body)
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    return "# @package _global_\n" + "\n".join(lines) + "\n" + yaml.safe_dump(doc, sort_keys=False)


def write(report_dir: Path, name: str, overrides: list[str], header: str) -> tuple[Path, str]:
    """Write ``<report_dir>/recommended/<name>.yaml``; return it and the command that runs it."""
    path = report_dir / GROUP / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(as_config(overrides, header))
    return path, f"python -m src.train --config-dir {shlex.quote(str(report_dir))} +{GROUP}={name}"
