"""URLs of weights files as the hub module takes them: a pip-style ``#sha256=<hex>`` fragment
(``split_sha256``), and the form messages and logs show them in (``redact_url``): the values of a
query string (``?token=...``, a signed URL's signature) and a ``user:password@`` never appear.
"""
from __future__ import annotations

import re
from urllib.parse import unquote, urldefrag, urlsplit, urlunsplit

__all__ = ["normalise_sha256", "redact_url", "scrub_url", "split_sha256"]

_HEX = re.compile(r"[0-9a-f]{1,64}")


def redact_url(url: str) -> str:
    """``url`` as messages and logs show it: query values and ``user:password@`` hidden.

    ``https://me:pw@host/w.pth?token=abc&v=2`` becomes ``https://***@host/w.pth?token=***&v=***``;
    a ``#sha256=`` fragment stays (a digest is no secret), another fragment is hidden too. A
    secret in the path itself cannot be told from a file name and is shown. Anything that is
    not a URL is returned as it is.
    """
    if "://" not in url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    # Keys name what a value is (token, X-Amz-Signature) and stay; a bare item may be the secret itself.
    query = "&".join(f"{item.split('=', 1)[0]}=***" if "=" in item else "***"
                     for item in parts.query.split("&")) if parts.query else ""
    fragment = parts.fragment if not parts.fragment or parts.fragment.startswith("sha256=") else "***"
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def split_sha256(url: str) -> tuple[str, str | None]:
    """``url`` without a ``#sha256=<hex>`` fragment, and that digest (lower case) or None.

    Raises:
        ValueError: the fragment's digest is not hexadecimal.
    """
    bare, fragment = urldefrag(url)
    if not fragment.startswith("sha256="):
        return url, None
    return bare, normalise_sha256(fragment[len("sha256="):], f"the #sha256= fragment of {redact_url(url)!r}")


def normalise_sha256(value: str, what: str) -> str:
    digest = value.strip().lower()
    if not _HEX.fullmatch(digest):
        raise ValueError(f"{what} must be a sha256 hex digest (or a prefix of one), got {value!r}")
    return digest


def scrub_url(text: str, url: str) -> str:
    """``text`` (an error's own words, which may quote the URL) without the URL's query or user:password."""
    parts = urlsplit(url)
    secrets = [parts.query, parts.netloc.rsplit("@", 1)[0] if "@" in parts.netloc else ""]
    for secret in filter(None, secrets):
        text = text.replace(secret, "***").replace(unquote(secret), "***")
    return text
