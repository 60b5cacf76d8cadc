"""The review app's auth: the gateway's admin bearer tokens (Settings.admin_tokens), via a login form.

The browser never keeps the token: the login form checks it once and sets a session cookie
"<analyst>.<issued ms>.<hmac(token, analyst.issued)>". Any of the configured tokens may have
signed it, so rotating tokens (a second line in the token file) does not log everyone out, and
removing a token ends its sessions. The analyst's name is inside the MAC, so the audit trail's
"who" cannot be edited without the token. HttpOnly + SameSite=Strict: scripts cannot read the
cookie and other sites cannot make the browser post a label with it. API clients may send
`Authorization: Bearer <token>` instead.
"""
from __future__ import annotations

import hashlib
import hmac
import time

COOKIE = "sg_review_session"
SESSION_MAX_AGE_S = 12 * 3600       # one working day; then log in again
MAX_ANALYST_CHARS = 64


def valid_analyst(name: str) -> bool:
    return 0 < len(name) <= MAX_ANALYST_CHARS and name.isprintable() and "." not in name


def _mac(token: bytes, analyst: str, issued_ms: int) -> str:
    return hmac.new(token, f"seqguard-review:{analyst}.{issued_ms}".encode(), hashlib.sha256).hexdigest()


def token_ok(tokens: list[bytes], sent: str) -> bytes | None:
    """The configured token equal to `sent` (constant-time), or None."""
    s = sent.encode()
    for t in tokens:
        if hmac.compare_digest(s, t):
            return t
    return None


def make_session(token: bytes, analyst: str, now_ms: int | None = None) -> str:
    issued = int(time.time() * 1000) if now_ms is None else now_ms
    return f"{analyst}.{issued}.{_mac(token, analyst, issued)}"


def session_analyst(tokens: list[bytes], cookie: str | None, now_ms: int | None = None) -> str | None:
    """The analyst of a valid, unexpired session cookie, else None."""
    if not cookie:
        return None
    parts = cookie.rsplit(".", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not valid_analyst(parts[0]):
        return None
    analyst, issued, mac = parts[0], int(parts[1]), parts[2]
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if not 0 <= now - issued <= SESSION_MAX_AGE_S * 1000:
        return None
    if any(hmac.compare_digest(_mac(t, analyst, issued), mac) for t in tokens):
        return analyst
    return None


def bearer_ok(tokens: list[bytes], header: str | None) -> bool:
    return bool(header) and header.startswith("Bearer ") and token_ok(tokens, header[7:]) is not None
