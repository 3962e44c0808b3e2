"""The Pareto report of a small hand-made study: same table from storage and records, golden
Markdown and CSV, recommended configs that reproduce their trial, and the HTML rendered in a real
headless Chromium."""

from __future__ import annotations

import csv
import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from analysis import report, trials
from analysis.__main__ import main
from analysis.summary import summarize
from src.config import PROJECT_ROOT
from tests.report_study import STUDY, write_records, write_study
from tests.system import require

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("PARETUNE_UPDATE_GOLDEN") == "1"   # regenerate the golden files, then review the diff


@pytest.fixture
def handmade(tmp_path: Path) -> tuple[Path, str]:
    storage = str(tmp_path / "studies" / "paretune.journal")
    (tmp_path / "studies").mkdir()
    write_study(tmp_path / "sweep", storage)
    return tmp_path, storage


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs from its golden copy (PARETUNE_UPDATE_GOLDEN=1 regenerates)"


def _report(args: list[str], capsys) -> str:
    assert main(["report", *args]) == 0
    return capsys.readouterr().out


def test_storage_and_records_give_the_same_table(handmade, capsys):
    root, storage = handmade
    _report(["--study", STUDY, "--storage", storage, "--out", str(root / "a"), "--no-png"], capsys)
    _report([str(root / "sweep"), "--out", str(root / "b"), "--no-png"], capsys)
    a, b = (root / "a" / "trials.csv").read_text(), (root / "b" / "trials.csv").read_text()
    assert a == b
    rows = list(csv.DictReader(a.splitlines()))
    assert [r["status"] for r in rows].count("completed") == 7
    # failures and pruned trials are listed with their reasons, not dropped
    failed = {r["trial"]: r["error"] for r in rows if r["status"] != "completed"}
    assert failed == {"4": "worker killed by SIGKILL (often the kernel's out-of-memory killer)",
                      "7": "no better than the median at step 4"}
    strip = re.compile(r"^- Source: .*$", re.M)
    md_a = strip.sub("", (root / "a" / "report.md").read_text().replace(str(root / "a"), "<out>"))
    md_b = strip.sub("", (root / "b" / "report.md").read_text().replace(str(root / "b"), "<out>"))
    assert md_a == md_b


def test_golden_summary_and_csv(handmade, capsys):
    root, storage = handmade
    out = root / "report"
    _report(["--study", STUDY, "--storage", storage, "--out", str(out), "--no-png"], capsys)
    _golden("handmade_report.md", (out / "report.md").read_text().replace(str(root), "<tmp>"))
    _golden("handmade_trials.csv", (out / "trials.csv").read_text())


def test_constraints_change_the_feasible_set_and_bad_ones_stop_early(handmade, capsys):
    root, storage = handmade
    out = _report(["--study", STUDY, "--storage", storage, "--out", str(root / "r"), "--no-png",
                   "--constraint", "cost/peak_rss_mb <= 4500", "--constraint", "eval/rougeL >= baseline + 0.095"],
                  capsys)
    # r=16 (4800 MB) and r=32 are out on memory; r=8 nf4 (0.19) is short of baseline + 0.095 = 0.195
    assert "trial #1,5: cost/peak_rss_mb = 4800, needs <= 4500" in out
    assert "trial #8: eval/rougeL = 0.19, needs >= 0.195" in out
    front = out.split("## Pareto front")[1].split("##")[0]
    assert re.findall(r"^\| (#[\d,]+) \|", front, re.M) == ["#0"]
    with pytest.raises(SystemExit) as exit_:
        main(["report", "--study", STUDY, "--storage", storage, "--constraint", "rougeL >= 1"])
    assert exit_.value.code == 2
    assert "unknown metric 'rougeL'" in capsys.readouterr().err
    assert not (PROJECT_ROOT / "reports" / STUDY).exists()  # nothing was written


def test_unknown_study_lists_the_studies_there(handmade, capsys):
    _, storage = handmade
    with pytest.raises(SystemExit):
        main(["report", "--study", "nope", "--storage", storage])
    err = capsys.readouterr().err
    assert "no study named 'nope'" in err and f"studies there: ['{STUDY}']" in err


def _run(args: list[str], cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "src.train", *args, "--cfg", "job"], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_recommended_configs_reproduce_their_trial(handmade, capsys):
    root, storage = handmade
    out = root / "report"
    text = _report(["--study", STUDY, "--storage", storage, "--out", str(out), "--no-png"], capsys)
    command = r"(python -m src.train [^\n]*)\n"
    knee = re.search(r"\*\*knee\*\*.*?```bash\n" + command + command, text, re.S)
    assert knee, text
    by_overrides = knee.group(1).split()[3:]
    by_config = knee.group(2).split()[3:]
    assert by_overrides == ["sweep=none", "lora.r=16", "train.lr=0.001", "quant=none"]
    assert by_config == ["--config-dir", str(out), "+recommended=knee"]
    assert (out / "recommended" / "knee.yaml").exists()
    assert _run(by_config, root) == _run(by_overrides, root)
    # a config with a group choice other than the default: the nf4 trial
    from analysis import configs

    path, _ = configs.write(out, "nf4", ["sweep=none", "lora.r=8", "train.lr=0.001", "quant=bnb_nf4"], "test")
    assert "override /quant: bnb_nf4" in path.read_text()
    assert _run(["--config-dir", str(out), "+recommended=nf4"], root) == _run(
        ["lora.r=8", "train.lr=0.001", "quant=bnb_nf4"], root)


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        require("Chromium", "Debian package chromium; make setup installs it as root")
    return str(found)


def _drawn_figures(dom: str) -> dict[str, str]:
    """The DOM Chromium built for each figure, keyed by its div id (fig-<name>), with the text of every
    script left out: plotly.js's source and each figure's JSON name the same classes and trace types,
    so without this a figure that never drew would still match."""
    drawn = re.sub(r"<script\b.*?</script>", "", dom, flags=re.S)
    parts = re.split(r'id="fig-([a-z]+)"', drawn)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_html_renders_offline_in_headless_chromium(handmade, capsys):
    """The self-contained HTML, opened with no network, draws every figure with every mark."""
    browser = _chromium()
    root, storage = handmade
    out = root / "report"
    _report(["--study", STUDY, "--storage", storage, "--out", str(out)], capsys)
    page = (out / "report.html").read_text()
    assert "<script src=\"http" not in page  # plotly.js is inline, nothing is fetched
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             f"--user-data-dir={root / 'chromium-profile'}", "--virtual-time-budget=20000"]
    dom = subprocess.run([browser, *flags, "--dump-dom", (out / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=180).stdout
    figs = _drawn_figures(dom)
    assert set(figs) == {"scatter", "parallel", "hypervolume", "cost"}, list(figs)
    # the Markdown summary is rendered as a page: its headings and tables are elements, not source text
    summary = dom[dom.index("<div class=\"summary\">"):dom.index("<section")]
    md = (out / "report.md").read_text()
    headings = [line.lstrip("#").strip() for line in md.splitlines() if line.startswith("## ")]
    assert headings and all(f"<h2>{html.escape(h, quote=False)}</h2>" in summary for h in headings), headings
    assert summary.count("<table>") == sum(1 for i, line in enumerate(md.splitlines()) if line.startswith("|---")
                                           or line.startswith("| ---")) > 0
    assert "<th>" in summary and "<code" in summary and "## " not in summary and "|---" not in summary
    for name, drawn in figs.items():
        assert 'class="main-svg"' in drawn, f"plotly drew no SVG for the {name} figure"
    traces = re.findall(r'<g class="trace scatter.*?(?=<g class="trace scatter|$)', figs["scatter"], re.S)
    points = [len(re.findall(r'<path class="point"', t)) for t in traces]
    # infeasible #6, feasible #3, the front (#2, #1+5, #0, #8), the knee and the cheapest markers
    assert points == [1, 1, 4, 1, 1], points
    # parallel coordinates: one drawn axis per searched parameter and objective, titled
    titles = re.findall(r'<text class="axis-title"[^>]*>([^<]*)</text>', figs["parallel"])
    assert titles == ["lora.r", "quant", "train.lr", "eval/rougeL", "cost/train_s"], titles
    # hypervolume: one line with a marker after each of the 7 completed trials
    hv = figs["hypervolume"]
    assert hv.count('class="js-line"') == 1 and len(re.findall(r'<path class="point"', hv)) == 7
    # cost: 5 bar traces (train, eval, overhead, USD, Wh), each with a bar per completed trial
    bars = figs["cost"]
    assert len(re.findall(r'<g class="trace bars"', bars)) == 5 and len(re.findall(r'<g class="point"', bars)) == 5 * 7
    shot = root / "shot.png"
    subprocess.run([browser, *flags, "--window-size=1100,4000", f"--screenshot={shot}", (out / "report.html").as_uri()],
                   capture_output=True, timeout=180)
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    red = int((np.abs(pixels - np.array([0xD6, 0x27, 0x28])).max(axis=2) < 12).sum())
    assert red > 200, f"only {red} pixels of the front's colour: the scatter did not draw"
    # the PNG figures were written too (kaleido drives the same Chromium)
    assert {p.name for p in (out / "figures").glob("*.png")} == {"scatter.png", "parallel.png", "hypervolume.png",
                                                                 "cost.png"}


def test_compare_puts_both_fronts_on_one_plot(tmp_path, capsys):
    storage = str(tmp_path / "a.journal")
    write_study(tmp_path / "a", storage)
    other = write_records(tmp_path / "b")
    out = tmp_path / "cmp"
    assert main(["compare", STUDY, str(other), "--storage", storage, "--out", str(out), "--no-png"]) == 0
    html = (out / "compare.html").read_text()
    assert html.count('"name":"A: handmade (front)"') == 1 and html.count('"name":"B: handmade (front)"') == 1
    md = (out / "compare.md").read_text()
    assert md.count("| #1,5 | 0.24 | 155 |") == 2  # the same trials on both sides: the same front


def test_compare_sets_two_searches_side_by_side(tmp_path):
    """Trial counts, total trial time, best quality and both hypervolumes on one reference point: B is
    the hand-made study without its best trial (#2), its failure and its pruned trial."""
    a, b = write_records(tmp_path / "a"), write_records(tmp_path / "b")
    for n in (2, 4, 7):
        shutil.rmtree(b / str(n))
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), "--out", str(out), "--no-png"]) == 0
    md = (out / "compare.md").read_text()
    assert "| trials | 9 (7 completed, 1 failed, 1 pruned) | 6 (6 completed) |" in md
    # A: the completed trials' train_s (970 s) and 52 s each, the pruned one's 30 s and the failed one's 20 s
    assert "| total trial time | 1384 s | 982 s (0.71x A) |" in md
    assert "| best eval/rougeL (95% interval) | 0.26 (trial #2) | 0.24 (trial #1,5) |" in md
    [line] = [x for x in md.splitlines() if x.startswith("| hypervolume, shared reference |")]
    hv_a, hv_b = (float(x) for x in line.strip("|").split("|")[1:])
    assert hv_a > hv_b > 0  # the same points, less #2 (on A's front)
    same = tmp_path / "same"
    assert main(["compare", str(a), str(a), "--out", str(same), "--no-png"]) == 0
    [line] = [x for x in (same / "compare.md").read_text().splitlines() if x.startswith("| hypervolume")]
    assert len(set(line.strip("|").split("|")[1:])) == 1


def test_records_of_other_studies_are_left_out(tmp_path):
    write_records(tmp_path / "sweep")
    data = trials.from_records([tmp_path / "sweep"], STUDY)
    assert len(data.rows) == 9
    with pytest.raises(ValueError, match="no result.json of study 'other'"):
        trials.from_records([tmp_path / "sweep"], "other")
    assert report.machine(summarize(data, []))[0].startswith("Test CPU 9000; 2 logical CPUs")
