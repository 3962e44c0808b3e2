"""Data: read and check JSON Lines records, build chat prompts, fit them to the token budget.

Checks run before any model loads (the parent calls ``check_files``), and every error names the
config field and the fix. Truncation and dropping are explicit policies whose counts are reported.
Error messages never quote a record's text: clinical notes must not reach logs.
"""

from __future__ import annotations

import errno
import json
import random
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Stands in for the source text while the chat template is rendered, so the prompt can be split
# around it and the source alone truncated.
_SENTINEL = "\u2063PARETUNE_SOURCE\u2063"
# A truncated dialogue keeps at least this many tokens before the summary itself is cut.
_MIN_SOURCE_TOKENS = 32
# Texts are cut to (max_seq_len + 1) * this many characters before tokenizing, so a pathological
# example (a 50 MB field) costs what the token budget allows, not its size. Generous on purpose: the
# cut must leave more tokens than the budget keeps, or the kept tokens would change; SmolLM2's
# longest token is 81 characters, English prose averages about 4.
_MAX_CHARS_PER_TOKEN = 128
_BOM = b"\xef\xbb\xbf"


class DataError(ValueError):
    """A data file or record is unusable; the message names the file, line, field and fix."""


@dataclass(frozen=True)
class Record:
    id: str
    source: str
    summary: str
    header: str | None


@dataclass
class Example:
    """One tokenized record: prompt (+ target for training and eval loss)."""
    id: str
    prompt_ids: list[int]
    target_ids: list[int]
    reference: str
    truncated: bool

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.target_ids

    @property
    def labels(self) -> list[int]:
        return [-100] * len(self.prompt_ids) + self.target_ids


@dataclass
class SplitStats:
    file: str
    records: int = 0
    used: int = 0
    truncated: int = 0
    dropped: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _field_error(path: Path, lineno: int, key: str, field: str, problem: str) -> DataError:
    return DataError(f"{path}:{lineno}: {problem} '{field}' (set data.{key} to the field that holds it)")


def file_problem(path: Path, key: str | None = None) -> str | None:
    """What stops ``path`` from being read as a data file, with the fix; None when it is a regular file.

    Only ``stat`` is used: a FIFO must be named, never opened (opening one blocks until a writer comes).
    """
    field = f"data.{key}" if key else "data.train_file / data.eval_file"
    try:
        st = path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{path} is a symlink loop; point the link at the real file, or set {field} to it"
        if exc.errno == errno.EACCES:
            return (f"{path} cannot be reached (permission denied on a folder above it); make the folder "
                    "searchable by the user running the trial, or copy the file elsewhere")
        if path.is_symlink():
            return f"{path} is a broken symlink; point the link at an existing file, or set {field} to one"
        return (f"{path} does not exist; set data.root=<folder> (or the environment variable "
                f"PARETUNE_DATA_DIR) and {field}=<file name>")
    if stat.S_ISDIR(st.st_mode):
        return f"{path} is a directory, not a file; set {field} to a JSON Lines file inside it"
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "special")
        # The file is read twice (checked here, loaded again by the worker): a stream would be consumed.
        return (f"{path} is {kind}, not a regular file; data files are read more than once, so write "
                f"the data to a regular file and set {field} to it")
    return None


def _read(path: Path) -> bytes:
    problem = file_problem(path)
    if problem:
        raise DataError(problem)
    try:
        return path.read_bytes()
    except PermissionError:
        raise DataError(f"{path} cannot be read (permission denied); make it readable by the user running "
                        f"the trial (chmod u+r, or copy it to a file you own)") from None
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror or type(exc).__name__}); check the file "
                        "and the disk, or copy it elsewhere") from None


def load_records(path: Path, dcfg: Any) -> list[Record]:
    """Read and check every record of one JSON Lines file."""
    raw = _read(path)
    # A byte order mark (Excel and Notepad's "UTF-8 with BOM") carries no data: accept it.
    raw = raw.removeprefix(_BOM)
    if not raw.strip():
        raise DataError(f"{path} is empty; it needs one JSON object per line")
    records: list[Record] = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {exc.start}); re-encode the file "
                            "as UTF-8") from None
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            hint = " (this looks like CSV: convert it to JSON Lines)" if lineno == 1 and "," in text else ""
            raise DataError(f"{path}:{lineno}: not a JSON object{hint}; data files are JSON Lines, "
                            "one object per line") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        records.append(_record(obj, path, lineno, dcfg))
    if not records:
        raise DataError(f"{path} has no records")
    dup = [k for k, n in Counter(r.id for r in records).items() if n > 1]
    if dup:
        raise DataError(f"{path}: duplicated ids {dup[:5]}{' ...' if len(dup) > 5 else ''}; ids must be "
                        "unique (or set data.id_field=null to number the lines)")
    return records


def _unicode(value: str, path: Path, lineno: int, key: str, field: str) -> str:
    """``value`` if it is valid Unicode; JSON's escapes can spell a lone surrogate that UTF-8 cannot hold."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(f"{path}:{lineno}: field '{field}' (data.{key}) holds a lone surrogate escape "
                        f"(\\u{ord(value[exc.start]):04x}) at character {exc.start}, which is not valid "
                        "Unicode; fix that escape (or re-export the file as UTF-8)") from None
    return value


def _record(obj: dict[str, Any], path: Path, lineno: int, dcfg: Any) -> Record:
    def text_field(key: str, field: str) -> str:
        if field not in obj:
            raise _field_error(path, lineno, key, field, "missing field")
        value = obj[field]
        if not isinstance(value, str) or not value.strip():
            raise _field_error(path, lineno, key, field, "empty or non-text field")
        return _unicode(value.strip(), path, lineno, key, field)

    if dcfg.id_field is None:
        rid = str(lineno)
    else:
        value = obj.get(dcfg.id_field, "")
        # null, true or a list would become the id "None", "True", "[...]": refuse rather than guess
        if value is None or isinstance(value, bool | list | dict):
            raise _field_error(path, lineno, "id_field", dcfg.id_field,
                               f"{'null' if value is None else type(value).__name__} id in field")
        rid = _unicode(str(value).strip(), path, lineno, "id_field", dcfg.id_field)
    if not rid:
        raise _field_error(path, lineno, "id_field", dcfg.id_field, "missing field")
    header = text_field("header_field", dcfg.header_field) if dcfg.header_field else None
    return Record(rid, text_field("source_field", dcfg.source_field),
                  text_field("summary_field", dcfg.summary_field), header)


def split_paths(dcfg: Any) -> dict[str, Path]:
    try:
        root = Path(dcfg.root).expanduser().resolve()
    except (RuntimeError, OSError):  # Python 3.11 reports a symlink loop as RuntimeError
        raise DataError(f"data.root: {dcfg.root} is a symlink loop; point data.root (or PARETUNE_DATA_DIR) "
                        "at the real folder") from None
    # data.eval_on=test_file: the held-out test split is what this trial evaluates on (analysis confirm).
    evaluated = dcfg.test_file if str(dcfg.get("eval_on", "eval_file")) == "test_file" else dcfg.eval_file
    return {"train": root / dcfg.train_file, "eval": root / evaluated}


def check_files(dcfg: Any, eval_examples: int | None = None) -> dict[str, int]:
    """Read and check both splits without a tokenizer: cheap, run by the parent before a worker starts.

    With ``eval_examples`` (eval.num_examples), also refuse an eval file that holds fewer records:
    scoring fewer examples than asked would make trials look comparable when they are not.
    """
    paths = split_paths(dcfg)
    counts = {split: len(load_records(p, dcfg)) for split, p in paths.items()}
    if eval_examples is not None and eval_examples > counts["eval"]:
        key = "data.test_file" if str(dcfg.get("eval_on", "eval_file")) == "test_file" else "data.eval_file"
        raise DataError(f"eval.num_examples={eval_examples}, but {paths['eval']} ({key}) has only "
                        f"{counts['eval']} records; set eval.num_examples={counts['eval']} or less, or "
                        "use a larger eval file")
    return counts


class PromptBuilder:
    """Renders records through the model's chat template and fits them into ``max_seq_len`` tokens."""

    def __init__(self, tokenizer: Any, instruction: str, max_seq_len: int, truncation: str) -> None:
        self.tok = tokenizer
        self.instruction = instruction
        self.max_seq_len = max_seq_len
        self.truncation = truncation
        eos = tokenizer.eos_token_id
        if eos is None:
            raise DataError("the tokenizer has no eos token; the model cannot learn where a summary ends")
        self.eos_id = int(eos)

    def _encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def _prompt_parts(self, header: str | None) -> tuple[list[int], list[int]]:
        user = self.instruction.format(header=header or "summary") + "\n\n" + _SENTINEL
        if getattr(self.tok, "chat_template", None):
            rendered = self.tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                    add_generation_prompt=True)
        else:  # plain causal LM without a chat template
            rendered = user + "\n\nSummary:\n"
        before, after = rendered.split(_SENTINEL)
        return self._encode(before), self._encode(after)

    def build(self, rec: Record) -> Example | None:
        """Tokenize one record; None when the drop policy skips it."""
        before, after = self._prompt_parts(rec.header)
        # No more of a text than the budget can use is tokenized; a text cut here is truncated.
        limit = (self.max_seq_len + 1) * _MAX_CHARS_PER_TOKEN
        source = self._encode(rec.source[:limit])
        target = self._encode(rec.summary[:limit])
        if len(rec.summary) <= limit:
            target.append(self.eos_id)  # a summary cut short does not end: no end marker to learn
        overflow = len(before) + len(source) + len(after) + len(target) - self.max_seq_len
        truncated = overflow > 0 or len(rec.source) > limit or len(rec.summary) > limit
        if truncated:
            if self.truncation == "drop":
                return None
            # overflow <= 0 only when a text was cut by characters and its tokens then fit the budget
            cut_source = min(max(overflow, 0), max(0, len(source) - _MIN_SOURCE_TOKENS))
            source = source[: len(source) - cut_source]
            rest = overflow - cut_source
            if rest > 0:  # the summary alone is too long: it is cut too, and loses its end marker
                target = target[: max(1, len(target) - rest)]
            if len(before) + len(source) + len(after) + len(target) > self.max_seq_len:
                raise DataError(f"train.max_seq_len={self.max_seq_len} cannot hold the prompt template "
                                f"({len(before) + len(after)} tokens) plus a summary; raise it")
        return Example(rec.id, before + source + after, target, rec.summary, truncated)

    def build_all(self, records: list[Record], stats: SplitStats) -> list[Example]:
        out = []
        for rec in records:
            ex = self.build(rec)
            if ex is None:
                stats.dropped += 1
                continue
            stats.truncated += int(ex.truncated)
            out.append(ex)
        stats.used = len(out)
        return out


def load_splits(dcfg: Any, builder: PromptBuilder, eval_examples: int, seed: int,
                ) -> tuple[list[Example], list[Example], dict[str, Any]]:
    """Train examples (shuffled with the seed, optionally capped) and the first eval examples.

    The eval subset is the first ``eval_examples`` records of the eval file, independent of the
    seed, so every trial and the untuned baseline are scored on the same examples.
    """
    paths = split_paths(dcfg)
    train_recs = load_records(paths["train"], dcfg)
    random.Random(seed).shuffle(train_recs)
    if dcfg.max_train_examples:
        train_recs = train_recs[: dcfg.max_train_examples]
    eval_recs = load_records(paths["eval"], dcfg)[:eval_examples]
    train_stats = SplitStats(str(paths["train"]), records=len(train_recs))
    eval_stats = SplitStats(str(paths["eval"]), records=len(eval_recs))
    train = builder.build_all(train_recs, train_stats)
    evals = builder.build_all(eval_recs, eval_stats)
    if not train:
        raise DataError(f"every training example was dropped by data.truncation=drop at train.max_seq_len="
                        f"{builder.max_seq_len}; raise train.max_seq_len or use data.truncation=truncate")
    if not evals:
        raise DataError("every eval example was dropped; raise train.max_seq_len or use data.truncation=truncate")
    counts = {"train": train_stats.as_dict(), "eval": eval_stats.as_dict(),
              "truncation": builder.truncation, "max_seq_len": builder.max_seq_len}
    return train, evals, counts
