"""Secrets out of anything written: storage URLs keep their user and host, never their password."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


def mask_url(url: str | None) -> str | None:
    """A URL safe to print or write: the password replaced by ***."""
    if not url or "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


# scheme://user:password@ anywhere in a text (a YAML dump, a log line); the user and host stay.
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][\w+.-]*://[^\s:/@'\"]+:)(?P<password>[^\s@'\"]+)(?=@)")


def scrub_text(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ***."""
    return _URL_PASSWORD.sub(r"\g<head>***", text)


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
