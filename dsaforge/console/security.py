"""Who may use the console, and proof that a form was posted from the console's own page.

- Auth: on 127.0.0.1 the console is the user's own; bound anywhere else it needs a token (given, or generated and
  printed at start). A client shows it as `Authorization: Bearer TOKEN`, or logs in once through /login and gets
  an HttpOnly session cookie (an HMAC of the token, so the token itself is never stored in the browser).
- CSRF: every form carries a hidden `csrf` value equal to the client's `dsaforge_csrf` cookie (double submit; a
  page on another origin can neither read the cookie nor set it), and a POST whose Origin is another site is
  refused. Requests authenticated by the Bearer header are exempt: browsers never add that header by themselves.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from typing import Optional
from urllib.parse import parse_qsl, urlsplit

from starlette.requests import Request

SESSION_COOKIE, CSRF_COOKIE = "dsaforge_session", "dsaforge_csrf"
MAX_FORM_BYTES = 1 << 20
# Paths anyone may reach: the probe, the login page and what it needs to render.
PUBLIC = ("/healthz", "/login", "/static/")


class Forbidden(Exception):
    """A request the console refuses; the message says why (shown on a 403 page)."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Guard:
    def __init__(self, token: Optional[str]) -> None:
        self.token = token
        self._secret = secrets.token_bytes(32)

    @property
    def enabled(self) -> bool:
        return bool(self.token)

    def session_value(self) -> str:
        return hmac.new(self.token.encode(), b"dsaforge-console-session", hashlib.sha256).hexdigest()

    def check_token(self, given: str) -> bool:
        return self.enabled and hmac.compare_digest(given.encode(), self.token.encode())

    def bearer(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        return header.lower().startswith("bearer ") and self.check_token(header[7:].strip())

    def authenticated(self, request: Request) -> bool:
        if not self.enabled:
            return True
        if self.bearer(request):
            return True
        cookie = request.cookies.get(SESSION_COOKIE, "")
        return bool(cookie) and hmac.compare_digest(cookie.encode(), self.session_value().encode())

    @staticmethod
    def is_public(path: str) -> bool:
        return any(path == p or (p.endswith("/") and path.startswith(p)) for p in PUBLIC)


def csrf_token(request: Request) -> tuple[str, bool]:
    """The client's CSRF value, and whether it is new (then the response must set the cookie)."""
    value = request.cookies.get(CSRF_COOKIE, "")
    if len(value) == 43 and value.replace("-", "").replace("_", "").isalnum():
        return value, False
    return secrets.token_urlsafe(32), True


async def read_form(request: Request, guard: Guard) -> list[tuple[str, str]]:
    """The posted fields of a form, after the CSRF and origin checks (urlencoded only: no uploads)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise Forbidden(f"forms must be application/x-www-form-urlencoded, got {ctype or 'no content type'}")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise Forbidden(f"form larger than {MAX_FORM_BYTES} bytes")
    try:
        fields = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise Forbidden("form is not UTF-8") from None
    if guard.bearer(request):
        return fields
    origin = request.headers.get("origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host", ""):
        raise Forbidden(f"cross-site form post from {origin}")
    cookie = request.cookies.get(CSRF_COOKIE, "")
    posted = dict(fields).get("csrf", "")
    if not cookie or not posted or not hmac.compare_digest(cookie.encode(), posted.encode()):
        raise Forbidden("missing or wrong CSRF token: reload the page and submit again")
    return fields
