"""Bad input, through the real command line: a clear error naming the field and the fix, before any
worker starts, and nothing already recorded is touched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from src.config import PROJECT_ROOT
from tests.conftest import TINY, run_cli, write_jsonl

GROUPS = sorted(p.name for p in (PROJECT_ROOT / "conf").iterdir()
                if p.is_dir() and p.name not in ("experiment", "hydra"))
GOOD = {"id": "a", "source": "Doctor: hi. Patient: my knee hurts.", "summary": "Knee pain.", "section_header": "CC"}


def _data(root: Path, content: bytes | None) -> Path:
    """A data folder whose train file has ``content`` (None: no train file at all)."""
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "validation.jsonl", [GOOD, {**GOOD, "id": "b"}])  # as many as TINY's eval.num_examples
    if content is not None:
        (root / "train.jsonl").write_bytes(content)
    return root


def _line(**fields: object) -> bytes:
    return (json.dumps({**GOOD, **fields}) + "\n").encode()


DATA_CASES = {
    "missing file": (None, ["data.train_file", "does not exist", "data.root", "PARETUNE_DATA_DIR"]),
    "empty file": (b"", ["train.jsonl", "is empty"]),
    "missing source field": (b'{"id": "a", "summary": "x", "section_header": "CC"}\n',
                             ["missing field 'source'", "data.source_field"]),
    "missing summary field": (b'{"id": "a", "source": "x", "section_header": "CC"}\n',
                              ["missing field 'summary'", "data.summary_field"]),
    "empty source string": (_line(source=""), ["empty or non-text field 'source'"]),
    "empty summary string": (_line(summary="   "), ["empty or non-text field 'summary'"]),
    "invalid UTF-8": (b'{"id": "a", "source": "caf\xe9", "summary": "x", "section_header": "CC"}\n',
                      ["not valid UTF-8"]),
    "duplicated ids": (_line() + _line(), ["duplicated ids ['a']"]),
    "CSV instead of JSONL": (b"id,source,summary\na,hello,hi\n", ["looks like CSV"]),
}


def _earlier_study(tmp_path: Path) -> Path:
    """The journal run_cli points the command at, holding an earlier study with one completed trial."""
    import optuna

    path = tmp_path / "studies" / "paretune.journal"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
        study = optuna.create_study(storage=storage, study_name="earlier", directions=["maximize", "minimize"])
        study.add_trial(optuna.trial.create_trial(params={"lora.r": 8}, values=[0.2, 30.0],
                                                  distributions={"lora.r": optuna.distributions.IntDistribution(
                                                      1, 64)}))
    return path


@pytest.fixture
def recorded(tmp_path: Path) -> Path:
    """An earlier trial's record in the runs folder: bad input must leave it as it was."""
    old = tmp_path / "runs" / "earlier"
    old.mkdir(parents=True)
    (old / "result.json").write_text('{"status": "completed", "note": "earlier"}\n')
    return old / "result.json"


def _refused(tmp_path: Path, recorded: Path, args: list[str], fragments: list[str], code: int = 2) -> None:
    before = recorded.read_bytes()
    journal = _earlier_study(tmp_path)
    journal_before = journal.read_bytes()
    run_dir = tmp_path / "runs" / "new"
    multirun = "-m" in args
    where = f"hydra.sweep.dir={tmp_path / 'runs' / 'sweep'}" if multirun else f"hydra.run.dir={run_dir}"
    quiet = [] if any(a.startswith("logger=") for a in args) else ["logger=none"]
    proc = run_cli([*args, *quiet, where], cwd=tmp_path)
    assert proc.returncode == (1 if multirun else code), proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr  # the reason, not a stack (HYDRA_FULL_ERROR=1 shows one)
    assert not list((tmp_path / "runs").rglob("worker.log"))  # no worker ever started
    assert not [p for p in (tmp_path / "runs").rglob("result.json") if p != recorded]
    assert recorded.read_bytes() == before
    assert journal.read_bytes() == journal_before  # the study storage is untouched too


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_is_refused_before_any_worker(tmp_path, recorded, cache_dir, case):
    content, fragments = DATA_CASES[case]
    root = _data(tmp_path / "data", content)
    _refused(tmp_path, recorded, [*TINY, f"data.root={root}", f"paths.cache_dir={cache_dir}"], fragments)


@pytest.mark.parametrize("group", GROUPS)
def test_an_unknown_option_of_every_group_lists_the_accepted_ones(tmp_path, recorded, data_root, group):
    options = sorted(p.stem for p in (PROJECT_ROOT / "conf" / group).glob("*.yaml"))
    _refused(tmp_path, recorded, [f"{group}=no_such_option", f"data.root={data_root}"],
             [f"Could not find '{group}/no_such_option'", *options], code=1)


CONFIG_CASES = {
    "negative rank": (["lora.r=-1"], ["lora.r: must be >= 1"]),
    "zero batch": (["train.batch_size=0"], ["train.batch_size: must be >= 1"]),
    "huge new tokens": (["eval.max_new_tokens=10000000"], ["eval.max_new_tokens: must be >= 1 and <= 8192"]),
    "huge threads": (["cpu.threads=100000"], ["cpu.threads: must be >= 1 and <= 4096"]),
    "more threads than cores": (["cpu.threads=64"], ["cpu.threads", "cpu.force=true"]),
    "wrong type": (["train.lr=abc"], ["train.lr", "abc"]),
    "wrong bool": (["cpu.force=maybe"], ["cpu.force", "maybe"]),
    "4-bit on a backend without it": (["quant=torchao_int8", "quant.bits=4"],
                                      ["quant.bits: 4 with torchao is refused"]),
    "double quant on 8-bit": (["quant=bnb_int8", "quant.double_quant=true"], ["quant.double_quant"]),
    "neither steps nor epochs": (["train.max_steps=null"], ["set exactly one of them"]),
    "unknown objective": (["objectives=[{name: eval/accuracy, direction: maximize}]"],
                          ["unknown metric 'eval/accuracy'"]),
    "unknown synthetic size": (["model=synthetic", "model.size=5b"],
                               ["model.size: '5b' is not one of model.sizes", "choose one"]),
    "tiny memory limit": (["train.memory_limit_mb=100"], ["train.memory_limit_mb: must be >= 1536"]),
    # Hydra's own message for lora.rank=8 suggests +lora.rank=8, which would otherwise be silently ignored.
    "added key unknown to the schema": (["+lora.rank=8"], ["lora.rank: not a setting of lora",
                                                           "did you mean lora.r?", "remove the `+lora.rank`"]),
    "added key with a typo": (["+train.steps=100"], ["train.steps: not a setting of train",
                                                     "did you mean train.max_steps?"]),
    "added top-level key": (["+lr=0.1"], ["lr: not a setting of the trial config"]),
    "interpolation to nothing": (["train.lr=${nope.x}"], ["train.lr: Interpolation key 'nope.x' not found",
                                                          "fix the value"]),
    "objective not measured": (["eval.metrics=[loss]"], ["'eval/rougeL' is not measured with eval.metrics=['loss']"]),
    "interpolation in a key no rule reads": (["logger.project=${nope.x}"],
                                             ["logger.project: Interpolation key 'nope.x' not found"]),
    "added key inside a list": (["+objectives.0.weight=2"], ["objectives.0.weight: not a setting of objectives.0"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_is_refused_before_any_worker(tmp_path, recorded, data_root, case):
    args, fragments = CONFIG_CASES[case]
    code = 1 if case.startswith("wrong") else 2  # a type error is Hydra's own (exit 1), a rule is ours
    _refused(tmp_path, recorded, [*TINY, f"data.root={data_root}", *args], fragments, code=code)


SWEEP_CASES = {
    "malformed storage URL": (["lora.r=2,4", "hydra.sweeper.storage=mongodb://host/db"],
                              ["hydra.sweeper.storage: unsupported scheme 'mongodb://'"]),
    "unreachable storage": (["lora.r=2,4", "hydra.sweeper.storage=postgresql://u:pw@127.0.0.1:1/db"],
                            ["hydra.sweeper.storage: cannot open postgresql://u:***@127.0.0.1:1/db"]),
    "empty choice": (["hydra/sweeper=optuna", "lora.r=choice()"], ["lora.r=choice()", "empty choice is not legal"]),
    "range low above high": (["hydra/sweeper=optuna", "train.lr=interval(0.1,0.01)"],
                             ["hydra.sweeper.params.train.lr", "swap the bounds"]),
    "bad value in one grid cell": (["lora.r=2,-4"], ["lora.r: must be >= 1", "nothing was run"]),
    "added key swept": (["+lora.rank=8,16"], ["lora.rank: not a setting of lora", "nothing was run"]),
    "interpolation to nothing in a sweep": (["lora.r=2,4", "train.lr=${nope.x}"],
                                            ["train.lr: Interpolation key 'nope.x' not found", "nothing was run"]),
    # 2 layers 8192 wide fit a 16 GB limit; 16 layers are a 14B-parameter model: refused by the plan
    "a grid cell that cannot fit memory": (["model.shape.num_layers=2,16", "model.shape.hidden_size=8192",
                                            "model.shape.intermediate_size=28672", "model.shape.num_heads=64",
                                            "model.shape.num_kv_heads=8", "train.memory_limit_mb=16000"],
                                           ["1 parameter set(s)", "model.shape.num_layers=16",
                                            "train.plan_memory: the planned peak RSS of this trial is",
                                            "(quant=bnb_nf4)", "nothing was run"]),
    # Each extreme fits (2 layers 8192 wide; 16 layers 1024 wide): only their corner, 16 layers 8192 wide,
    # cannot. A search checks its extremes with preflight and every corner with the memory plan.
    "a search corner that cannot fit memory": (["hydra/sweeper=optuna", "model.shape.num_layers=choice(2,16)",
                                                "model.shape.hidden_size=choice(1024,8192)",
                                                "model.shape.intermediate_size=28672", "model.shape.num_heads=64",
                                                "model.shape.num_kv_heads=8", "train.memory_limit_mb=16000"],
                                               ["1 combination(s) of this search's choices and range ends",
                                                "model.shape.num_layers=16 model.shape.hidden_size=8192",
                                                "train.plan_memory: the planned peak RSS of this trial is",
                                                "nothing was run"]),
    "zero jobs per batch": (["lora.r=2,4", "hydra.sweeper.n_jobs=0"], ["hydra.sweeper.n_jobs: must be >= 1"]),
    "failure rate out of range": (["lora.r=2", "hydra.sweeper.max_failure_rate=-1"],
                                  ["hydra.sweeper.max_failure_rate: must be in [0, 1]"]),
    "zero trials": (["hydra/sweeper=optuna", "hydra.sweeper.n_trials=0", "lora.r=choice(2,4)"],
                    ["hydra.sweeper.n_trials: must be >= 1"]),
    "a search with nothing to search": (["hydra/sweeper=optuna"], ["hydra.sweeper.params: nothing to search"]),
    "an interval in a grid": (["train.lr=interval(0.0001,0.001)"], ["a grid needs finite values",
                                                                     "use choice(...) or range(...)"]),
    "cmaes with two objectives": (["hydra/sweeper=optuna", "hydra/sweeper/sampler=cmaes", "lora.r=choice(2,4)"],
                                  ["CmaEsSampler optimises one objective, and 2 are declared",
                                   "hydra/sweeper/sampler=tpe"]),
    "journal where nothing can be created": (["lora.r=2", "hydra.sweeper.storage=/proc/paretune.journal"],
                                             ["cannot use journal file /proc/paretune.journal",
                                              "choose a writable folder"]),
    "journal under a regular file": (["lora.r=2", "hydra.sweeper.storage=/etc/hostname/studies.journal"],
                                     ["cannot use journal file /etc/hostname/studies.journal"]),
    "sqlite scheme typo": (["lora.r=2", "hydra.sweeper.storage=sqlit:///x.db"],
                           ["unsupported scheme 'sqlit://'", "sqlite:///path.db"]),
}


@pytest.mark.parametrize("case", sorted(SWEEP_CASES))
def test_bad_search_is_refused_before_any_trial(tmp_path, recorded, data_root, case):
    args, fragments = SWEEP_CASES[case]
    _refused(tmp_path, recorded, ["-m", *TINY, f"data.root={data_root}", *args], fragments)


def test_an_example_ten_times_the_context_is_shortened_and_counted(tmp_path, cache_dir):
    """Not an error: too-long examples are truncated (or dropped) by data.truncation, and counted."""
    long_source = " ".join(f"Doctor: question {i}? Patient: answer {i}." for i in range(400))
    root = _data(tmp_path / "data", _line(id="long", source=long_source) + _line(id="b"))
    proc = run_cli([*TINY, f"data.root={root}", f"paths.cache_dir={cache_dir}", "logger=none",
                    f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    splits = json.loads((tmp_path / "run" / "result.json").read_text())["data"]["splits"]
    assert splits["train"]["truncated"] == 1 and splits["train"]["dropped"] == 0
