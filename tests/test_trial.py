"""Whole trials through the real CLI and the worker process, on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from src import hw
from src import metrics as M
from src.results import TrialResult
from src.sweeper import study as S
from tests import wandb_reader
from tests.conftest import SOURCES, SUMMARIES, TINY, run_cli, save_tiny_model


def _sweep(tmp_path: Path, data_root: Path, cache_dir: Path, *args: str, env: dict | None = None):
    sweep_dir = tmp_path / "sweep"
    proc = run_cli(["-m", *TINY, f"data.root={data_root}", f"paths.cache_dir={cache_dir}",
                    f"hydra.sweep.dir={sweep_dir}", *args], cwd=tmp_path, env=env)
    return proc, sweep_dir


def _records(sweep_dir: Path) -> list[TrialResult]:
    paths = sorted(sweep_dir.glob("*/result.json"), key=lambda p: int(p.parent.name))
    return [TrialResult.from_dict(json.loads(p.read_text())) for p in paths]


def _dataset_sentences() -> list[str]:
    return SOURCES + SUMMARIES


@pytest.fixture(scope="module")
def wandb_sweep(tmp_path_factory, data_root, cache_dir):
    """A 2-trial sweep, W&B offline, shared by the checks below."""
    tmp = tmp_path_factory.mktemp("wandb_sweep")
    (tmp / "home").mkdir()
    proc, sweep_dir = _sweep(tmp, data_root, cache_dir, "lora.r=2,4", "logger=wandb",
                             env={"HOME": str(tmp / "home")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, sweep_dir, _records(sweep_dir)


def _eval_ids(tdir: Path) -> list[dict]:
    return [json.loads(x) for x in (tdir / "predictions.jsonl").read_text().splitlines()]


def test_sweep_records_one_complete_result_per_trial(wandb_sweep):
    _, sweep_dir, records = wandb_sweep
    assert [r.status for r in records] == ["completed", "completed"]
    assert [r.config["lora"]["r"] for r in records] == [2, 4]
    for r in records:
        assert set(M.available(["loss", "rouge", "bertscore"])) <= set(r.metrics)
        assert set(r.baseline) == {M.baseline_name(m) for m in M.QUALITY}
        assert set(r.gains) == {M.gain_name(m) for m in M.QUALITY}
        assert list(r.objectives) == ["eval/rougeL", "cost/train_s"]
        assert r.objectives["cost/train_s"] == r.metrics["cost/train_s"]
        assert r.metrics[M.TRAIN_STEPS] == 3 and r.metrics[M.TRAIN_TOKENS] > 0
        assert 0 <= r.metrics["eval/rougeL"] <= 1 and r.metrics[M.COST_PEAK_RSS_MB] > 100
        assert r.metrics[M.COST_USD] > 0 and r.cost_info["energy_source"]
        shares = r.cost_info["interference"]
        assert set(shares["train"]) >= {"others_cpu_share", "steal_share", "busy", "own_cpu_s"}
        assert r.metrics[M.COST_OTHERS_CPU_SHARE] == shares["others_cpu_share"]
        assert len(shares["train"]["step_others_share"]) == 3  # one per step: which were quiet
        assert 0 <= shares["train"]["quiet_steps"] <= 3
        assert 0 < r.metrics[M.COST_TRAIN_S_ROBUST] <= 2 * r.metrics[M.COST_TRAIN_S]
        assert r.data["splits"]["train"]["used"] == 6 and r.data["splits"]["eval"]["used"] == 2
        auto = "tcmalloc" if hw.find_allocator("auto") else "system"  # cpu.allocator=auto, the default
        assert r.cpu["torch_threads"] >= 1 and r.cpu["allocator"] == auto
        assert r.environment["packages"]["torch"].startswith("2.13.0")
        assert "git_commit" in r.environment and r.seed == 42
        tdir = Path(r.trial["dir"])
        assert (tdir / "adapter" / "adapter_config.json").is_file()
        assert len((tdir / "predictions.jsonl").read_text().splitlines()) == 2
        assert len((tdir / "train_log.jsonl").read_text().splitlines()) == 3
        assert r.run["eval_decoder"] == "fast"
        # each example's own numbers, and the untuned model's, beside the record (no text); intervals
        for name in ("per_example.jsonl", "baseline_per_example.jsonl"):
            rows = [json.loads(x) for x in (tdir / name).read_text().splitlines()]
            assert [row["id"] for row in rows] == [ex["id"] for ex in _eval_ids(tdir)]
            assert all(set(row) == {"id", "eval/loss_tokens", *M.QUALITY} for row in rows)
        assert set(r.intervals) == set(M.QUALITY) | set(r.gains)
        for name, (lo, hi) in r.intervals.items():
            value = r.metrics[name] if name in r.metrics else r.gains[name]
            assert lo - 1e-9 <= value <= hi + 1e-9
    # the untuned baseline was scored at most once for both trials
    assert records[1].run["baseline"]["cached"] is True
    assert records[0].baseline == records[1].baseline
    # a bigger rank trains more parameters and saves a bigger adapter
    assert records[1].run["trainable_params"] == 2 * records[0].run["trainable_params"]
    assert records[1].metrics[M.COST_ADAPTER_MB] > records[0].metrics[M.COST_ADAPTER_MB]


def test_sweep_prints_a_table_and_keeps_a_local_log(wandb_sweep):
    proc, sweep_dir, records = wandb_sweep
    assert "2 trials in" in proc.stdout
    table = proc.stdout[proc.stdout.index("2 trials in"):]
    assert "lora.r=2" in table and "lora.r=4" in table and "eval/rougeL" in table
    lines = [json.loads(x) for x in (sweep_dir / "trials.jsonl").read_text().splitlines()]
    assert [x["status"] for x in lines] == ["completed", "completed"]
    assert lines[0]["metrics"] == records[0].metrics


def test_wandb_offline_files_hold_the_metrics_and_no_dataset_text(wandb_sweep):
    _, sweep_dir, records = wandb_sweep
    for r in records:
        files = list(Path(r.trial["dir"]).glob("wandb/offline-run-*/run-*.wandb"))
        assert len(files) == 1
        recs = wandb_reader.records(files[0])
        steps = wandb_reader.history(recs)
        assert [int(s["_step"]) for s in steps] == [1, 2, 3]
        assert all(M.TRAIN_LOSS in s for s in steps)
        summary = wandb_reader.summary(recs)
        logged = {**r.metrics, **r.baseline, **r.gains}
        for name in ("eval/rougeL", "eval/bertscore_f1", "cost/train_s", "baseline/rougeL", "gain/rougeL"):
            assert json.loads(summary[name]) == pytest.approx(logged[name])
        for name in ("eval/rougeL", "gain/rougeL", "eval/loss"):  # the intervals ride along in the summary
            assert json.loads(summary[M.interval_name(name)]) == pytest.approx(r.intervals[name])
        config = wandb_reader.config(recs)
        assert json.loads(config["lora"])["r"] == r.config["lora"]["r"]
        assert json.loads(config["trial"])["id"] == r.trial["id"]
        # the Optuna study is the W&B group; its trial number and params are in the run's config
        study = json.loads(config["study"])
        assert study == {"name": r.trial["study"]["name"], "trial": int(Path(r.trial["dir"]).name),
                         "params": {"lora.r": r.config["lora"]["r"]}}
        assert wandb_reader.run_info(recs).run_group == study["name"]


def test_sweep_is_an_optuna_study_and_summarised_in_wandb(wandb_sweep):
    _, sweep_dir, records = wandb_sweep
    import optuna

    (summary,) = optuna.get_all_study_summaries(S.open_storage(str(sweep_dir.parent / "studies/paretune.journal")))
    study = optuna.load_study(study_name=summary.study_name, storage=S.open_storage(
        str(sweep_dir.parent / "studies/paretune.journal")))
    assert study.study_name == records[0].trial["study"]["name"]
    assert [t.params for t in study.trials] == [{"lora.r": 2}, {"lora.r": 4}]
    for t, r in zip(study.trials, records, strict=True):
        assert t.values == [r.objectives["eval/rougeL"], r.objectives["cost/train_s"]]
        assert Path(t.user_attrs[S.RESULT_PATH]) == Path(r.trial["dir"]) / "result.json"
    (run_file,) = sweep_dir.glob("wandb/offline-run-*/run-*.wandb")
    recs = wandb_reader.records(run_file)
    assert wandb_reader.run_info(recs).run_group == study.study_name
    assert wandb_reader.run_info(recs).job_type == "study"
    (logged,) = wandb_reader.history(recs)
    for key in ("study/trials", "study/pareto", "study/front_table"):  # the scatter plot logs its own table
        assert json.loads(logged[f"{key}/_type"]) == "table-file"
    table_path = json.loads(logged["study/trials/path"])
    table = json.loads((run_file.parent / "files" / table_path).read_text())
    assert [row[0] for row in table["data"]] == [0, 1]
    assert table["columns"][:3] == ["trial", "pareto", "lora.r"]


def test_no_dataset_text_outside_the_predictions_file(wandb_sweep):
    """W&B files, logs, records, configs, the Optuna study and the printed table hold no sentence of
    the data set: every file the sweep wrote is read, except the trials' own predictions.jsonl."""
    proc, sweep_dir, _ = wandb_sweep
    written = [p for p in sweep_dir.parent.rglob("*") if p.is_file() and p.name != "predictions.jsonl"]
    assert any("wandb" in p.parts for p in written) and any(p.name == "worker.log" for p in written)
    assert any(p.name == "paretune.journal" for p in written)  # the study storage is scanned too
    for path, text in [*((p, p.read_bytes().decode("utf-8", "replace")) for p in written),
                       ("stdout", proc.stdout), ("stderr", proc.stderr)]:
        for sentence in _dataset_sentences():
            for fragment in (sentence, sentence[:40]):
                assert fragment not in text, f"{fragment!r} leaked into {path}"


def test_wandb_writes_nothing_outside_the_trial_dirs(wandb_sweep):
    _, sweep_dir, _ = wandb_sweep
    assert not (sweep_dir.parent / "wandb").exists()
    assert list((sweep_dir.parent / "home").rglob("*")) == []  # nothing under $HOME


def test_log_text_opt_in_sends_predictions(tmp_path, data_root, cache_dir):
    proc, sweep_dir = _sweep(tmp_path, data_root, cache_dir, "logger.log_text=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = "".join(p.read_text(errors="replace") for p in sweep_dir.rglob("wandb/**/*.json") if p.is_file())
    assert SUMMARIES[0] in written  # the reference of the first eval example, in the W&B table


def test_logger_none_uses_no_wandb(tmp_path, data_root, cache_dir):
    proc, sweep_dir = _sweep(tmp_path, data_root, cache_dir, "logger=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = _records(sweep_dir)
    assert record.status == "completed"
    assert not list(sweep_dir.rglob("wandb"))


def test_training_lowers_held_out_loss(tmp_path, held_out_root, cache_dir):
    """Eval loss falls on dialogues the adapter never trained on (held_out_root: same template and
    phrasing as the training pairs, no shared pair), so it measures learning that carries over to
    unseen examples (the summary style, frequent words, where a summary ends), not memorisation."""
    train = {json.loads(x)["summary"] for x in (held_out_root / "train.jsonl").read_text().splitlines()}
    held_out = [json.loads(x) for x in (held_out_root / "validation.jsonl").read_text().splitlines()]
    assert not train & {r["summary"] for r in held_out} and not set(SOURCES) & {r["source"] for r in held_out}
    proc, sweep_dir = _sweep(tmp_path, held_out_root, cache_dir, "logger=none", "train.max_steps=12",
                             "train.lr=0.05", "train.warmup_ratio=0", "train.scheduler=constant",
                             "eval.metrics=[loss,rouge]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = _records(sweep_dir)
    assert r.data["splits"]["eval"]["file"] == str(held_out_root / "validation.jsonl")
    assert r.gains["gain/loss"] < -1.0, r.gains
    log = [json.loads(x) for x in (Path(r.trial["dir"]) / "train_log.jsonl").read_text().splitlines()]
    assert log[-1][M.TRAIN_LOSS] < log[0][M.TRAIN_LOSS] - 0.5


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path, data_root, cache_dir):
    proc, sweep_dir = _sweep(tmp_path, data_root, cache_dir, "logger=none",
                             "lora.target_modules=[no_such_layer],[q_proj]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed, completed = _records(sweep_dir)
    assert failed.status == "failed" and completed.status == "completed"
    assert "no_such_layer" in failed.error["message"]
    assert "Traceback" in failed.error["traceback"]
    assert failed.objectives == {} and failed.metrics == {}
    memory = failed.cost_info["peak_rss_mb_by_phase"]  # how far memory got, by phase, up to the failure
    assert {"load", "failed"} <= set(memory["phases"]) and memory["whole"] == max(memory["phases"].values())
    assert "failed: " in proc.stdout  # the sweep table shows the reason


def test_a_worker_past_its_timeout_is_killed_and_recorded(tmp_path, data_root, cache_dir):
    proc, sweep_dir = _sweep(tmp_path, data_root, cache_dir, "logger=none", "train.worker_timeout_s=1")
    # the only trial failed: more than max_failure_rate of the sweep, which says so and exits non-zero
    assert proc.returncode == 1 and "max_failure_rate" in proc.stderr, proc.stderr[-3000:]
    (r,) = _records(sweep_dir)
    assert r.status == "failed" and r.error["type"] == "WorkerDied"
    assert "timeout (train.worker_timeout_s)" in r.error["message"]


@pytest.mark.parametrize("override,fragment", [
    ("lora.r=-1", "lora.r: must be >= 1"),
    ("data.train_file=missing.jsonl", "data.train_file"),
])
def test_bad_input_fails_before_any_worker_starts(tmp_path, data_root, cache_dir, override, fragment):
    proc = run_cli([*TINY, f"data.root={data_root}", f"paths.cache_dir={cache_dir}",
                    f"hydra.run.dir={tmp_path / 'run'}", override], cwd=tmp_path)
    assert proc.returncode == 2
    assert fragment in proc.stderr
    assert not (tmp_path / "run" / "worker.log").exists()


def test_bad_data_fails_before_any_worker_starts(tmp_path, data_root, cache_dir):
    (tmp_path / "train.jsonl").write_text("id,source,summary\n1,a,b\n")
    (tmp_path / "validation.jsonl").write_text((data_root / "validation.jsonl").read_text())
    proc = run_cli([*TINY, f"data.root={tmp_path}", f"paths.cache_dir={cache_dir}",
                    f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode == 2 and "looks like CSV" in proc.stderr
    assert not (tmp_path / "run" / "worker.log").exists()


def test_any_local_hf_model_and_jsonl_data_with_own_field_names(tmp_path, data_root, cache_dir):
    """model=hf loads a local folder; data=jsonl maps other field names; epochs + accumulation +
    gradient checkpointing run through the whole trial."""
    model_dir = save_tiny_model(tmp_path / "my-model", cache_dir, hidden_size=32, num_layers=1, intermediate_size=64)
    notes = tmp_path / "notes"
    notes.mkdir()
    for name in ("train.jsonl", "validation.jsonl"):
        rows = [json.loads(x) for x in (data_root / name).read_text().splitlines()]
        (notes / name).write_text("".join(json.dumps({"note": r["source"], "impression": r["summary"]}) + "\n"
                                          for r in rows))
    proc, sweep_dir = _sweep(
        tmp_path, data_root, cache_dir, "logger=none", "model=hf", f"model.path={model_dir}", "data=jsonl",
        f"data.root={notes}", "data.train_file=train.jsonl", "data.eval_file=validation.jsonl",
        "data.id_field=null", "data.source_field=note", "data.summary_field=impression",
        "train.max_steps=null", "train.epochs=1", "train.grad_accum=2", "train.gradient_checkpointing=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = _records(sweep_dir)
    assert r.status == "completed", r.error
    assert r.run["model"]["origin"] == str(model_dir)
    assert r.metrics[M.TRAIN_STEPS] == 2  # 6 examples, batch 2, 2 micro-batches a step: 1.5 -> 2
    assert r.data["splits"]["train"]["records"] == 6


@pytest.mark.parametrize("steps,profiled", [(5, [3, 4]), (3, [3, 3])])
def test_profiled_trial_writes_where_its_steps_time_went(tmp_path, data_root, cache_dir, steps, profiled):
    """train.profile_steps=2: torch.profiler runs inside the trial's own worker over the steps after the two
    warm-up ones, and writes its operator table beside the record; a trial that ends inside the window
    writes what it profiled."""
    proc, sweep_dir = _sweep(tmp_path, data_root, cache_dir, "logger=none", "train.profile_steps=2",
                             f"train.max_steps={steps}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = _records(sweep_dir)
    assert r.status == "completed" and r.artifacts["profile"] == "profile.txt"
    assert r.run["profiled_steps"] == profiled
    text = (Path(r.trial["dir"]) / "profile.txt").read_text()
    assert f"training steps {profiled[0]}-" in text and "aten::mm" in text and "Self CPU" in text


def test_the_profiler_window_leaves_out_paused_work_and_names_the_steps_it_saw(tmp_path):
    """worker._profiling: steps 3..2+N are recorded; work inside ``paused()`` (the pruning signal) is not;
    a window cut short says where it ended; a trial that never reached the window writes nothing."""
    import torch
    from omegaconf import OmegaConf

    from src import worker

    def trial(name: str, steps: int, trained: int) -> worker.Trial:
        (tmp_path / name).mkdir()
        t = worker.Trial(cfg=OmegaConf.create({"train": {"profile_steps": steps}}), trial_dir=tmp_path / name)
        x = torch.randn(32, 32)
        with worker._profiling(t) as profiled:
            assert profiled is not None
            for _ in range(trained):
                x @ x
                with profiled.paused():
                    torch.relu(x)
                profiled.step()
        return t

    t = trial("whole", 2, 6)
    text = (tmp_path / "whole" / "profile.txt").read_text()
    assert t.run["profiled_steps"] == [3, 4] and "training steps 3-4" in text
    assert "aten::mm" in text and "aten::relu" not in text
    assert trial("cut", 3, 4).run["profiled_steps"] == [3, 4]
    short = trial("short", 2, 2)
    assert "profiled_steps" not in short.run and not (tmp_path / "short" / "profile.txt").exists()
    off = worker.Trial(cfg=OmegaConf.create({"train": {"profile_steps": 0}}), trial_dir=tmp_path)
    with worker._profiling(off) as profiled:
        assert profiled is None
