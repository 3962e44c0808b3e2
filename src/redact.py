"""Secrets out of anything written or printed: storage URLs keep their user and host, never their password.

A password reaches text in many shapes (a URL on the command line, its percent-decoded value in a
driver's message, a Hydra grammar error quoting the override), so there are three layers:

- ``mask_url`` / ``scrub_text``: the password of every ``scheme://user:password@host`` URL, read the way
  SQLAlchemy reads it (everything between ``user:`` and the ``@`` before the host), so passwords with
  ``/``, ``:``, ``#`` or ``%`` are masked too; a ``password=`` query parameter as well.
- ``remember``: the passwords of the storage URLs this process was given (as typed, percent-decoded and
  percent-encoded) are replaced wherever they appear, even outside a URL.
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

# scheme://user:password@ in a text. The password runs to the last "@" of the token (greedy), so a
# raw "@" typed into it cannot leave its tail visible as a "host"; a token ends at whitespace or a quote.
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][\w+.-]*://[^\s:/@'\"]*:)(?P<password>[^\s'\"]*)(?=@)")
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&]password=)(?P<password>[^&\s'\"]+)", re.IGNORECASE)

_secrets: set[str] = set()


def url_password(url: str) -> str | None:
    """The password of a URL as typed (still percent-encoded), or None when it has none."""
    m = _URL_PASSWORD.search(url)
    return m.group("password") if m else None


def remember(text: str | None) -> None:
    """Treat the passwords of every URL in ``text`` as secrets of this process (and its log and files)."""
    if not text:
        return
    found = [m.group("password") for m in _URL_PASSWORD.finditer(text)]
    found += [m.group("password") for m in _QUERY_PASSWORD.finditer(text)]
    for typed in found:
        forms = {typed, unquote(typed), quote(unquote(typed), safe="")}
        # A raw "@", ":" or "/" makes drivers split the password and quote a piece as a host or port.
        forms |= {piece for form in list(forms) for piece in re.split(r"[@:/]", form)}
        _secrets.update(form for form in forms if len(form) >= _MIN_REMEMBERED)


def scrub_text(text: str) -> str:
    """``text`` with every URL password and every remembered secret replaced by ***."""
    if not text:
        return text
    text = _URL_PASSWORD.sub(r"\g<head>" + MASK, text)
    text = _QUERY_PASSWORD.sub(r"\g<head>" + MASK, text)
    for secret in sorted(_secrets, key=len, reverse=True):  # longest first: one may contain another
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def mask_url(url: str | None) -> str | None:
    """A URL safe to print or write: the password replaced by ***."""
    if not url or "://" not in url:
        return url
    return scrub_text(url)


def scrub(obj: Any) -> Any:
    """``obj`` (JSON-like: dicts, lists, strings) with every string scrubbed; other values unchanged."""
    if isinstance(obj, str):
        return scrub_text(obj)
    if isinstance(obj, dict):
        return {scrub(k): scrub(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(scrub(v) for v in obj)
    return obj


def scrub_files(folder: Path, pattern: str = "*.yaml") -> list[Path]:
    """Rewrite the files of ``folder`` that hold a URL password (Hydra's .hydra/ dumps of a command
    line that named a postgresql:// storage); returns the files changed."""
    changed = []
    for path in sorted(folder.glob(pattern)):
        text = path.read_text()
        clean = scrub_text(text)
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
