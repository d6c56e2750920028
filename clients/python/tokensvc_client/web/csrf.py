"""CSRF defence for every state-changing request (anything but GET, HEAD, OPTIONS).

Two checks, both required (OWASP's "defence in depth" pairing, and the IETF BFF draft's
advice for cookie-based sessions):

1. **Where it comes from.** ``Origin``, when sent, must be one of the backend's own
   origins; ``Sec-Fetch-Site``, when sent, must be ``same-origin``; at least one of them
   must be present (every current browser sends ``Origin`` on such requests). This
   refuses a form or ``fetch`` from another origin -- including a *same-site* one (another
   port or subdomain), which ``SameSite`` cookies do not stop.
2. **Something another origin cannot send.** Either the custom header
   (``x-tokensvc-csrf``, any value): a cross-origin page can only send it after a CORS
   preflight, which this backend never grants; or, for classic HTML forms, the
   double-submit token: the form field ``csrf_token`` equal to the ``__Host-`` CSRF cookie
   (HttpOnly; the server renders it into its forms with
   :func:`~tokensvc_client.web.context.csrf_token`).

A refusal is 403 with a stable reason code (:class:`CsrfReason`) and is logged, and passed
to the backend's audit hook, without any cookie value.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs

from tokensvc_client.web.settings import WebSettings

__all__ = ["SAFE_METHODS", "CsrfReason", "CsrfRefusal", "check_request", "form_field"]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
FORM_TYPE = "application/x-www-form-urlencoded"


class CsrfReason(enum.StrEnum):
    """Why a state-changing request was refused (the ``reason`` of the 403 answer)."""

    #: neither ``Origin`` nor ``Sec-Fetch-Site``: cannot tell where it comes from
    ORIGIN_MISSING = "origin_missing"
    #: ``Origin`` is not one of the backend's own (``null`` included)
    ORIGIN_MISMATCH = "origin_mismatch"
    #: ``Sec-Fetch-Site`` is ``cross-site``, ``same-site`` or ``none``
    CROSS_SITE = "cross_site_request"
    #: neither the custom header nor a form field with the token
    TOKEN_MISSING = "csrf_token_missing"
    #: a form token that does not equal the CSRF cookie (or no cookie)
    TOKEN_MISMATCH = "csrf_token_mismatch"


@dataclass(frozen=True, slots=True)
class CsrfRefusal:
    """A refused request, as logged and audited: nothing secret in it.

    Attributes:
        reason: the stable reason code.
        method / path: of the request.
        origin / fetch_site: the ``Origin`` and ``Sec-Fetch-Site`` headers as sent
            (truncated), to tell an attack from a misconfigured origin list.
    """

    reason: CsrfReason
    method: str
    path: str
    origin: str
    fetch_site: str


def check_origin(headers: Mapping[str, str], settings: WebSettings) -> CsrfReason | None:
    """Check 1: the request comes from one of the backend's own origins."""
    origin = headers.get("origin")
    fetch_site = headers.get("sec-fetch-site")
    if origin is None and fetch_site is None:
        return CsrfReason.ORIGIN_MISSING
    if origin is not None and origin.lower() not in settings.origins:
        return CsrfReason.ORIGIN_MISMATCH
    if fetch_site is not None and fetch_site.lower() != "same-origin":
        return CsrfReason.CROSS_SITE
    return None


def check_token(
    headers: Mapping[str, str],
    submitted: str | None,
    cookie_token: str | None,
    settings: WebSettings,
) -> CsrfReason | None:
    """Check 2: the custom header, or a form token equal to the CSRF cookie."""
    if headers.get(settings.csrf_header):
        return None
    if submitted is None:
        return CsrfReason.TOKEN_MISSING
    if not cookie_token or not hmac.compare_digest(
        submitted.encode("utf-8"), cookie_token.encode("utf-8")
    ):
        return CsrfReason.TOKEN_MISMATCH
    return None


def check_request(
    headers: Mapping[str, str],
    submitted: str | None,
    cookie_token: str | None,
    settings: WebSettings,
) -> CsrfReason | None:
    """Both checks for a state-changing request; ``None`` to let it through."""
    return check_origin(headers, settings) or check_token(
        headers, submitted, cookie_token, settings
    )


def needs_form(headers: Mapping[str, str], settings: WebSettings) -> bool:
    """Whether the token must be read from the body: a urlencoded form without the
    custom header."""
    content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return content_type == FORM_TYPE and not headers.get(settings.csrf_header)


def form_field(body: bytes, field_name: str) -> str | None:
    """The one value of ``field_name`` in a urlencoded body; ``None`` if absent, repeated
    or not text."""
    try:
        values = parse_qs(body.decode("utf-8"), keep_blank_values=True).get(field_name, [])
    except (UnicodeDecodeError, ValueError):
        return None
    return values[0] if len(values) == 1 else None


def refusal(reason: CsrfReason, method: str, path: str, headers: Mapping[str, str]) -> CsrfRefusal:
    """The loggable record of a refusal (header values cut to 200 characters)."""
    return CsrfRefusal(
        reason=reason,
        method=method,
        path=path[:200],
        origin=headers.get("origin", "")[:200],
        fetch_site=headers.get("sec-fetch-site", "")[:200],
    )
