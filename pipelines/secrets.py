"""Secrets: which variables hold them, and removing them from anything that is logged, stored or printed.

One rule for every verb: a variable whose name contains SECRET, TOKEN, PASSWORD or KEY holds a credential
(`AWS_SECRET_ACCESS_KEY`, `MLFLOW_TRACKING_TOKEN`, ...), and so does the `user:password@` part of a URI.
Their values never reach MLflow params, tags or artifacts, run records on storage, job entrypoints or the
console.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit, urlunsplit

SECRET_MARKERS = ("SECRET", "TOKEN", "PASSWORD", "KEY")
# The shortest value looked for in text: shorter ones ("1", "us") would match by accident.
MIN_SECRET_LENGTH = 6
# scheme://user:password@host → scheme://***@host (also user-only credentials such as tokens, and
# passwords with an unescaped "@": everything up to the last "@" before the path is credentials)
_URI_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s]+@")


def is_secret_name(name: str) -> bool:
    """Whether a variable's name looks like it holds a credential (its value must never be shown)."""
    upper = name.upper()
    return any(marker in upper for marker in SECRET_MARKERS)


def secret_values(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """name → value of every secret-looking variable long enough to be searched for. Names first (listing
    os.environ's names is one atomic copy), then each value with `get`: another thread (a library's) may
    remove a variable meanwhile, which made `environ.items()` raise KeyError."""
    values = {name: environ.get(name) for name in list(environ) if is_secret_name(name)}
    return {name: value for name, value in values.items() if value and len(value) >= MIN_SECRET_LENGTH}


def redact(text: str, environ: Mapping[str, str] = os.environ) -> str:
    """`text` with URI credentials and the values of secret-looking variables replaced by ***."""
    text = _URI_CREDENTIALS.sub(r"\g<scheme>***@", text)
    for value in secret_values(environ).values():
        text = text.replace(value, "***")
    return text


def split_uri_credentials(uri: str) -> tuple[str, str, str | None]:
    """(`uri` without its `user[:password]@` part, user, password), the user and password URL-decoded;
    ("uri", "", None) when it carries none. `https://alice:s3cret@host/x` → ("https://host/x", "alice",
    "s3cret"); `postgresql://bob@db/mlflow` → ("postgresql://db/mlflow", "bob", None)."""
    parts = urlsplit(uri)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return uri, "", None
    user, colon, password = userinfo.partition(":")
    clean = urlunsplit(parts._replace(netloc=host))
    return clean, unquote(user), unquote(password) if colon else None
