"""python -m analysis confirm: a study's front run again with several seeds on the held-out test split,
through the real CLI on the tiny model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from src.paths import PROJECT_ROOT
from tests.conftest import TINY, run_cli, write_jsonl


def test_confirm_reruns_the_front_with_seeds_on_the_test_split(tmp_path, data_root, held_out_root, cache_dir):
    root = tmp_path / "data"
    root.mkdir()
    for name in ("train.jsonl", "validation.jsonl"):
        shutil.copyfile(data_root / name, root / name)
    test_rows = [{**json.loads(line), "id": f"test-{i}"}
                 for i, line in enumerate((held_out_root / "validation.jsonl").read_text().splitlines())]
    write_jsonl(root / "test1.jsonl", test_rows)
    journal = tmp_path / "studies.journal"
    common = [f"data.root={root}", f"paths.cache_dir={cache_dir}", "logger=none", f"paths.study_storage={journal}"]
    proc = run_cli(["-m", *TINY, *common, f"hydra.sweep.dir={tmp_path / 'search'}", "lora.r=2,4",
                    "hydra.sweeper.study_name=search"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    searched = [json.loads(p.read_text()) for p in sorted((tmp_path / "search").glob("*/result.json"))]
    for record in searched:  # the search evaluated on the validation split only
        tdir = Path(record["trial"]["dir"])
        ids = [json.loads(x)["id"] for x in (tdir / "per_example.jsonl").read_text().splitlines()]
        assert all(i.startswith("val-") for i in ids), ids

    out = tmp_path / "confirm"
    cmd = [sys.executable, "-m", "analysis", "confirm", str(tmp_path / "search"), "--seeds", "2", "--out", str(out),
           "--no-png", "--no-quality-floor", "--override", "logger=none",
           "--override", f"paths.study_storage={journal}"]
    done = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    link = json.loads((out / "confirm.json").read_text())
    assert link["confirms"] == "search" and link["study"] == "search-confirm" and link["test_file"] == "test1.jsonl"
    assert link["seeds"] == [1, 2] and link["configurations"]
    records = [json.loads(p.read_text()) for p in (out / "sweep").glob("*/result.json")]
    assert len(records) == 2 * len(link["configurations"])
    assert all(r["status"] == "completed" for r in records)
    assert sorted({r["config"]["train"]["seed"] for r in records}) == [1, 2]
    for r in records:
        assert r["config"]["data"]["eval_on"] == "test_file" and r["config"]["data"]["test_file"] == "test1.jsonl"
        assert r["trial"]["study"]["name"] == "search-confirm"
        ids = [json.loads(x)["id"] for x in (Path(r["trial"]["dir"]) / "per_example.jsonl").read_text().splitlines()]
        assert all(i.startswith("test-") for i in ids), ids
        assert "eval/rougeL" in r["intervals"]
    report = (out / "report" / "report.md").read_text()
    assert "## Pareto front" in report and report in done.stdout
    # the seeds of one configuration are merged into one row (mean ± standard deviation)
    assert " ± " in report[report.index("## Pareto front"):]

    refused = subprocess.run([*cmd[:4], str(tmp_path / "search"), "--seeds", "0", "--out", str(tmp_path / "x"),
                              "--no-png", "--no-quality-floor", "--dry-run"],
                             cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--seeds: give at least 1" in refused.stderr
