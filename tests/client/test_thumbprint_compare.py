"""The one RFC 8705 certificate-thumbprint comparison both sides use."""

from __future__ import annotations

import pytest

from tokensvc_client.peer import holds_bound_certificate

PRINT = "a" * 43


@pytest.mark.parametrize(
    ("bound", "presented", "holds"),
    [
        (PRINT, PRINT, True),
        (PRINT, "b" * 43, False),
        (PRINT, "", False),  # no client certificate
        (PRINT, PRINT[:-1], False),
        ("é" * 43, "é" * 43, True),  # non-ASCII is compared, not a TypeError
    ],
)
def test_holds_bound_certificate(bound: str, presented: str, holds: bool) -> None:
    assert holds_bound_certificate(bound, presented) is holds
