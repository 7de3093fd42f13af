"""API keys: made once, shown once, stored as their SHA-256 digest only.

A key is ``ck_<id>_<secret>``, its secret 32 random bytes (URL-safe base64). With that
much entropy a plain SHA-256 digest is what stores it safely (as GitHub and Stripe
tokens are): a slow password hash guards guessable secrets, and these are not.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

PREFIX = "ck_"


@dataclass(frozen=True)
class NewKey:
    """A key as made: its id, the key itself (shown once) and its digest (stored)."""

    key_id: str
    key: str
    digest: str


def new_key() -> NewKey:
    """A fresh API key."""
    key_id = secrets.token_hex(6)
    key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    return NewKey(key_id=key_id, key=key, digest=digest(key))


def digest(key: str) -> str:
    """The stored form of ``key``: its SHA-256, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def looks_like_key(value: str) -> bool:
    """Whether ``value`` has a key's shape (anything else is refused without asking)."""
    return value.startswith(PREFIX) and 16 <= len(value) <= 128 and value.isascii()
