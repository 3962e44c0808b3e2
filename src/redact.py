"""Secrets out of anything written: storage URLs keep their user and host, never their password."""

from __future__ import annotations

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
