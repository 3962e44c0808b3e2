"""Knob ratio tables from hand-made trial records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis import ratios
from analysis.__main__ import main


def record(overrides: list[str], tok_s: float, rss: float, rouge: float, status: str = "completed") -> dict:
    return {"status": status, "trial": {"overrides": overrides},
            "metrics": {"train/tokens_per_s": tok_s, "cost/peak_rss_mb": rss, "eval/rougeL": rouge}}


RECORDS = [
    record(["cpu.allocator=system", "quant=none"], 100, 4000, 0.20),
    record(["cpu.allocator=tcmalloc", "quant=none"], 110, 3000, 0.20),
    record(["cpu.allocator=system", "quant=none"], 120, 4200, 0.22),   # a repeat: medians 110 / 4100 / 0.21
    record(["cpu.allocator=tcmalloc", "quant=bnb_nf4"], 99, 5000, 0.18),
]


def test_medians_and_ratios_to_the_reference():
    text = ratios.table(RECORDS, ["cpu.allocator", "quant"], {"cpu.allocator": "system", "quant": "none"})
    lines = text.splitlines()
    assert lines[2].startswith("| system | none | 2 | 110 (1.00x) | 4100 (1.00x) | 0.21 (1.00x) |")
    assert "| tcmalloc | none | 1 | 110 (1.00x) | 3000 (0.73x) | 0.2 (0.95x) |" in text
    assert "| tcmalloc | bnb_nf4 | 1 | 99 (0.90x) | 5000 (1.22x) | 0.18 (0.86x) |" in text


def test_keys_not_on_the_command_line_are_the_default():
    assert ratios.setting(record(["quant=none"], 1, 1, 1), ["cpu.threads", "quant"]) == ("default", "none")


def test_a_missing_reference_is_named():
    with pytest.raises(ValueError, match="reference setting"):
        ratios.table(RECORDS, ["quant"], {"quant": "torchao_int8"})


def test_cli_reads_sweep_dirs_skips_failures_and_rewrites_only_the_marked_block(tmp_path: Path, capsys):
    sweep = tmp_path / "sweep"
    for i, r in enumerate([*RECORDS, record(["cpu.allocator=jemalloc", "quant=none"], 1, 1, 1, "failed")]):
        (sweep / str(i)).mkdir(parents=True)
        (sweep / str(i) / "result.json").write_text(json.dumps(r))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{ratios.BEGIN}\nold table\n{ratios.END}\noutro\n")
    assert main(["ratios", str(sweep), "--keys", "cpu.allocator", "quant", "--reference",
                 "cpu.allocator=system", "quant=none", "--readme", str(readme)]) == 0
    out = capsys.readouterr().out
    assert "jemalloc" not in out and "tcmalloc" in out
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old table" not in text
    assert out.strip() in text


def test_named_blocks_let_one_readme_hold_several_tables():
    a_begin, a_end = ratios.markers("cpu_quant")
    b_begin, b_end = ratios.markers("backends")
    doc = f"x\n{a_begin}\nA\n{a_end}\ny\n{b_begin}\nB\n{b_end}\nz\n"
    out = ratios.replace_block(doc, "new B", "backends")
    assert out == f"x\n{a_begin}\nA\n{a_end}\ny\n{b_begin}\nnew B\n{b_end}\nz\n"
    with pytest.raises(ValueError, match="ratios:knobs:begin"):
        ratios.replace_block(doc, "t", "knobs")
