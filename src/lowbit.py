"""ipex-llm's low-bit copy of a model: converted once in a child process, then loaded without fp32.

ipex-llm's ``from_pretrained(load_in_low_bit=...)`` loads the whole model in fp32 and converts it
afterwards, so a trial that loaded it that way peaked at the fp32 model's size. ipex-llm's own answer
is ``save_low_bit`` once and ``load_low_bit`` after: the latter builds the model on the meta device,
swaps in its low-bit layers and reads the saved int4 weights, so nothing fp32 but the layers it keeps
(embeddings, norms, lm_head) is ever allocated. This keeps that copy in the cache and makes it in a
child process: the fp32 model the conversion needs lives and dies there, not in the trial's worker
(the child's peak is recorded beside the trial's facts). Run as ``python -m src.lowbit <model folder>
<type> <out folder>`` by ``saved_copy``; it prints its own peak RSS as JSON.

The copy is keyed by the model folder's path and its files' names, sizes and modification times (not
their content: a copy made with preserved times is taken for the same model), the type, ipex-llm's
version and what stays unconverted. Copies of models that changed are not collected: ``make
clean-cache`` removes them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from src.paths import publish

# Kept in full precision, as bitsandbytes leaves it (and what the cached copy was converted with).
NOT_CONVERTED = ["lm_head"]


def key(folder: Path, qtype: str) -> str:
    stats = {p.name: p.stat() for p in folder.iterdir() if p.is_file()}
    files = sorted((name, st.st_size, st.st_mtime_ns) for name, st in stats.items())
    text = json.dumps([str(folder.resolve()), files, qtype, NOT_CONVERTED, importlib.metadata.version("ipex-llm")])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def local_folder(folder: Path) -> Path:
    """``folder`` itself, or for a hub id (model=hf with model.allow_download) its local snapshot, which
    huggingface_hub downloads when downloads are allowed."""
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(folder)))


def saved_copy(folder: Path, qtype: str, root: Path) -> tuple[Path, dict[str, Any]]:
    """The low-bit copy of ``folder`` under ``root`` (made now if missing, by one worker at a time), and
    how it was obtained."""
    folder = local_folder(folder)
    facts: dict[str, Any] = {"low_bit_copy": "cached"}

    def convert_in_child(tmp: Path) -> None:
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "src.lowbit", str(folder), qtype, str(tmp)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"ipex-llm could not convert {folder} to {qtype} (exit {proc.returncode}): "
                               f"{proc.stderr.strip()[-2000:]}")
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        facts.update(low_bit_copy="converted", conversion_s=round(time.perf_counter() - started, 2),
                     conversion_peak_rss_mb=round(child["peak_rss_mb"], 1))

    return publish(convert_in_child, root / f"{folder.name}-{qtype}-{key(folder, qtype)}"), facts


def convert(folder: Path, qtype: str, out: Path) -> None:
    """Load ``folder`` into ipex-llm's low-bit layers and save them to ``out``."""
    import torch
    from ipex_llm.transformers import AutoModelForCausalLM as IpexModel

    model = IpexModel.from_pretrained(str(folder), load_in_low_bit=qtype, optimize_model=False,
                                      torch_dtype=torch.float32, modules_to_not_convert=NOT_CONVERTED)
    model.save_low_bit(str(out))


def load(folder: Path, qtype: str, root: Path) -> Any:
    """The model with ipex-llm's low-bit layers, loaded from its saved copy; the facts of how are in its
    ``low_bit_facts`` attribute."""
    from ipex_llm.transformers import AutoModelForCausalLM as IpexModel

    saved, facts = saved_copy(folder, qtype, root)
    # optimize_model=False: ipex-llm's inference rewrites (fused attention, its own KV cache) do not
    # support training.
    model = IpexModel.load_low_bit(str(saved), optimize_model=False, modules_to_not_convert=NOT_CONVERTED)
    model.low_bit_facts = facts
    return model


if __name__ == "__main__":
    convert(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
