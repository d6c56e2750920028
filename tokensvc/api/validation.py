"""Input validation: hard limits on every request field (docs/design.md, Errors).

Every violation is a :class:`~tokensvc.errors.BadRequest` naming the field. Limits are
generous for real use and small enough that no request can cause a slow path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from tokensvc.errors import BadRequest

MAX_TOKEN: Final = 4096
MAX_ID: Final = 256  # subject, client_id, session label, audience entries
MAX_SHORT: Final = 128  # role, acr, amr entries
MAX_REASON: Final = 512
MAX_LIST: Final = 32


def _printable(value: str) -> bool:
    return value.isprintable()


def text(name: str, value: str, *, required: bool = False, limit: int = MAX_ID) -> str:
    """Check one string field.

    Raises:
        BadRequest: empty when required, longer than ``limit``, or with control characters.
    """
    if required and not value:
        raise BadRequest(f"{name} is required")
    if len(value) > limit:
        raise BadRequest(f"{name} is longer than {limit} characters")
    if not _printable(value):
        raise BadRequest(f"{name} contains control characters")
    return value


def text_list(name: str, values: Sequence[str], *, limit: int = MAX_SHORT) -> list[str]:
    """Check a repeated string field: at most MAX_LIST non-empty entries."""
    if len(values) > MAX_LIST:
        raise BadRequest(f"{name} has more than {MAX_LIST} entries")
    for value in values:
        text(name, value, required=True, limit=limit)
    return list(values)


def token(name: str, value: str) -> str:
    """Check a token field: required, at most MAX_TOKEN printable ASCII characters."""
    if not value:
        raise BadRequest(f"{name} is required")
    if len(value) > MAX_TOKEN:
        raise BadRequest(f"{name} is longer than {MAX_TOKEN} characters")
    if not value.isascii() or not value.isprintable():
        raise BadRequest(f"{name} must be printable ASCII")
    return value
