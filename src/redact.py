"""Secrets out of anything written or printed: storage URLs keep their user and host, never their password.

A password reaches text in many shapes (a URL on the command line, its percent-decoded value in a
driver's message, a Hydra grammar error quoting the override), so there are three layers:

- ``mask_url`` / ``scrub_text``: the password of every ``scheme://user:password@host`` URL, read the way
  SQLAlchemy reads it (everything between ``user:`` and the ``@`` before the host), so passwords with
  ``/``, ``:``, ``#`` or ``%`` are masked too; a ``password=`` query parameter as well.
- ``remember``: the passwords of the storage URLs this process was given, as SQLAlchemy parses them
  (so spaces and quotes too), as typed, percent-decoded and percent-encoded. In printed text (stdout,
  stderr, logs) they are replaced wherever they appear, with the pieces a driver may quote as a host;
  in records and configs only inside strings that hold a URL, so a config value that happens to
  contain the same letters (a cache path, a package name) is never changed.
- ``guard_process``: stdout, stderr and every log record go through ``scrub_text``, so neither Hydra's
  own error messages nor a library's log line can print a password.

Files are scrubbed where they are written (``scrub`` on records, ``scrub_files`` on Hydra's dumps).
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote, unquote

MASK = "***"
STORAGE_ENV = "PARETUNE_STUDY_STORAGE"
# Shorter strings are not replaced outside URLs: a 3-letter password would mangle ordinary words,
# and the URL pattern still masks it wherever it appears as a URL.
_MIN_REMEMBERED = 6
# Pieces of a password (see remember) are masked in printed text only, where a mangled word costs
# nothing; four characters already identify a piece of a password.
_MIN_PIECE = 4

# scheme://user:password@ in a text. The password runs to the last "@" of the token (greedy), so a
# raw "@" typed into it cannot leave its tail visible as a "host"; a token ends at whitespace or a quote.
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][\w+.-]*://[^\s:/@'\"]*:)(?P<password>[^\s'\"]*)(?=@)")
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&]password=)(?P<password>[^&\s'\"]+)", re.IGNORECASE)

# SQLAlchemy's own reading of user:password@ (sqlalchemy.engine.url._parse_url): up to the first "@".
_SQLALCHEMY_USERINFO = re.compile(r"[\w+]+://[^:/@\s'\"]*:([^@]*)@")

_secrets: set[str] = set()   # whole passwords, in every form: replaced in any text
_pieces: set[str] = set()    # pieces of them between "@", ":" and "/": replaced in printed text only


def _sqlalchemy_password(value: str) -> str | None:
    """The password SQLAlchemy would send for ``value`` (a storage URL, maybe in Hydra's quotes)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    try:
        password = make_url(value).password
    except (ArgumentError, ValueError):
        return None
    return None if password is None else str(password)


def remember(text: str | None) -> None:
    """Treat the passwords of every URL in ``text`` (a command-line argument, an environment value, a
    storage setting) as secrets of this process."""
    if not text or "://" not in text:
        return
    found = [m.group("password") for m in _URL_PASSWORD.finditer(text)]
    found += [m.group("password") for m in _QUERY_PASSWORD.finditer(text)]
    found += _SQLALCHEMY_USERINFO.findall(text)  # as typed, spaces and quotes included
    # The value as a whole (after "key=" when it is an override): SQLAlchemy's own reading, which the
    # pattern cannot follow when a password holds a space or a quote.
    for value in {text, text.split("=", 1)[-1]}:
        parsed = _sqlalchemy_password(value) if "://" in value else None
        if parsed:
            found.append(parsed)
    for typed in found:
        forms = {typed, unquote(typed), quote(unquote(typed), safe="")}
        _secrets.update(form for form in forms if len(form) >= _MIN_REMEMBERED)
        # A raw "@", ":", "/", "#", "?" or "&" makes drivers split the password and quote a piece as a
        # host, port, database or query.
        _pieces.update(piece for form in forms for piece in re.split(r"[/#@:%?&=\s]+", form)
                       if len(piece) >= _MIN_PIECE)


def forget() -> None:
    """Drop every remembered secret (for tests)."""
    _secrets.clear()
    _pieces.clear()


def _replace_all(text: str, secrets: set[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):  # longest first: one may contain another
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def scrub_text(text: str) -> str:
    """Printed text (a log line, stderr) with every URL password, every remembered password and every
    piece of one replaced by ***."""
    if not text:
        return text
    text = _replace_all(text, _secrets)
    text = _URL_PASSWORD.sub(r"\g<head>" + MASK, text)
    text = _QUERY_PASSWORD.sub(r"\g<head>" + MASK, text)
    return _replace_all(text, _pieces)


def _scrub_value(text: str) -> str:
    """A string of a record or config: only one that holds a URL is changed (its password masked)."""
    if "://" not in text:
        return text
    # A remembered password where a URL holds it (after "user:", before "@"), even with a space or a
    # quote the pattern below stops at; the user, host and database keep their names.
    for secret in sorted(_secrets, key=len, reverse=True):
        text = text.replace(f":{secret}@", f":{MASK}@").replace(f"password={secret}", f"password={MASK}")
    text = _URL_PASSWORD.sub(r"\g<head>" + MASK, text)
    return _QUERY_PASSWORD.sub(r"\g<head>" + MASK, text)


def mask_url(url: str | None) -> str | None:
    """A URL safe to print or write: the password replaced by ***."""
    if not url or "://" not in url:
        return url
    remember(url)  # a storage URL: its password as SQLAlchemy reads it (a space or a quote included)
    return _scrub_value(url)


def scrub(obj: Any) -> Any:
    """``obj`` (JSON-like: dicts, lists, strings) with the password of every URL it holds masked;
    strings without a URL and other values are unchanged."""
    if isinstance(obj, str):
        return _scrub_value(obj)
    if isinstance(obj, dict):
        return {scrub(k): scrub(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(scrub(v) for v in obj)
    return obj


def scrub_yaml(text: str) -> str:
    """A YAML dump with the password of every URL it holds masked. Parsed, not read line by line: YAML
    folds a long value (at a space in a password, say) over several lines."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return scrub_text(text)  # not YAML after all: mask every remembered piece, whatever else changes
    clean = scrub(data)
    return text if clean == data else yaml.safe_dump(clean, sort_keys=False, allow_unicode=True, width=1 << 16)


def scrub_files(folder: Path, pattern: str = "*.yaml") -> list[Path]:
    """Rewrite the files of ``folder`` that hold a URL password (Hydra's .hydra/ dumps of a command
    line that named a postgresql:// storage); returns the files changed."""
    changed = []
    for path in sorted(folder.glob(pattern)):
        text = path.read_text()
        clean = scrub_yaml(text)
        if clean != text:
            path.write_text(clean)
            changed.append(path)
    return changed


class _ScrubbingStream(io.TextIOBase):
    """A text stream that scrubs what is written through it, then hands it to the real stream.

    ``buffer`` (raw bytes) is the real stream's: only the trial's worker writes there, and it guards
    its own output."""

    def __init__(self, inner: TextIO) -> None:
        self._inner = inner

    def write(self, s: str) -> int:
        self._inner.write(scrub_text(s))
        return len(s)

    def flush(self) -> None:
        self._inner.flush()

    def isatty(self) -> bool:
        return self._inner.isatty()

    def fileno(self) -> int:
        return self._inner.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._inner.encoding

    @property
    def buffer(self) -> Any:
        return getattr(self._inner, "buffer", self._inner)


def _scrubbed_records(make: Any) -> Any:
    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record: logging.LogRecord = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logging's own problem to report
            return record
        record.msg, record.args = scrub_text(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = scrub_text(logging.Formatter().formatException(record.exc_info))
        return record

    factory.paretune_scrubbing = True  # type: ignore[attr-defined]
    return factory


def guard_process(argv: list[str] | None = None) -> None:
    """Remember the storage passwords of this command (its arguments and PARETUNE_STUDY_STORAGE) and
    scrub stdout, stderr and every log record from here on. Call first thing in an entry point."""
    for arg in sys.argv if argv is None else argv:
        remember(arg)
    remember(os.environ.get(STORAGE_ENV))
    if not isinstance(sys.stdout, _ScrubbingStream):
        sys.stdout = _ScrubbingStream(sys.stdout)
    if not isinstance(sys.stderr, _ScrubbingStream):
        sys.stderr = _ScrubbingStream(sys.stderr)
    make = logging.getLogRecordFactory()
    if not getattr(make, "paretune_scrubbing", False):
        logging.setLogRecordFactory(_scrubbed_records(make))
