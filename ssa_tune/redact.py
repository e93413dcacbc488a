"""URLs without their secrets, for everything printed, logged, tagged or exported."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact(url: str | None) -> str | None:
    """`scheme://user:***@host/...`: the password of a database or tracking URL never leaves the process."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if not parts.password:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
