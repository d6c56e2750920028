"""The server's exceptions: one root, a stable code each, one table to gRPC status codes."""

from __future__ import annotations

import grpc
import pytest

from tokensvc import errors
from tokensvc.api.revocation_hub import FeedClosed, TooManyWatchers
from tokensvc.api.status import status_of
from tokensvc.cli.transport import TransportError
from tokensvc.keys.ring import KeyRingError
from tokensvc.proc.ownership import StartupError
from tokensvc.security.tls import TlsFilesError
from tokensvc.store import StoreUnavailable
from tokensvc_client.errors import Reason

FAMILIES = [
    errors.ConfigError,
    StoreUnavailable,
    KeyRingError,
    StartupError,
    TransportError,
    errors.ServiceError,
]


def test_every_family_is_under_the_root_with_a_code_of_its_own() -> None:
    codes = [cls.code for cls in FAMILIES]
    assert all(issubclass(cls, errors.TokensvcError) for cls in FAMILIES)
    assert len(set(codes)) == len(codes) and errors.TokensvcError.code not in codes


def test_the_old_bases_still_catch_them() -> None:
    """``except ValueError`` / ``except RuntimeError`` around them keep working."""
    assert issubclass(errors.ConfigError, ValueError) and issubclass(TransportError, ValueError)
    for cls in (StoreUnavailable, KeyRingError, StartupError):
        assert issubclass(cls, RuntimeError)


@pytest.mark.parametrize(
    ("err", "status"),
    [
        (errors.BadRequest("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotAuthenticated(errors.AuthFailure.REUSED), grpc.StatusCode.UNAUTHENTICATED),
        (errors.Denied(errors.Denial.POLICY, "no"), grpc.StatusCode.PERMISSION_DENIED),
        (errors.SubjectLocked(), grpc.StatusCode.PERMISSION_DENIED),
        (errors.RateLimited("slow down", 1500), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (TooManyWatchers(3), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (StoreUnavailable("down"), grpc.StatusCode.UNAVAILABLE),
        (FeedClosed("reconnecting"), grpc.StatusCode.UNAVAILABLE),
        (errors.ServiceError("?"), grpc.StatusCode.INTERNAL),
        (KeyRingError("bad kek"), grpc.StatusCode.INTERNAL),
        (TlsFilesError("bad pem"), grpc.StatusCode.INTERNAL),
    ],
)
def test_the_status_table(err: errors.TokensvcError, status: grpc.StatusCode) -> None:
    assert status_of(err) is status


def test_a_refusal_carries_its_reason_and_the_callers_message() -> None:
    err = errors.NotAuthenticated(errors.AuthFailure.CERTIFICATE_MISMATCH)
    assert (err.reason, err.message) == (
        errors.AuthFailure.CERTIFICATE_MISMATCH,
        "certificate_mismatch",
    )
    locked = errors.SubjectLocked()
    assert isinstance(locked, errors.Denied) and locked.message == "subject is locked"
    assert not locked.reason.is_callers and errors.Denial.POLICY.is_callers
    assert errors.RateLimited("x", 1001).retry_after == 2


def test_every_verifier_reason_is_an_auth_failure_of_the_same_value() -> None:
    """ListSessions turns the verifier's Reason into an AuthFailure by value."""
    assert {r.value for r in Reason} <= {f.value for f in errors.AuthFailure}


def test_only_guesses_are_counted() -> None:
    normal = {f for f in errors.AuthFailure if not f.is_guess}
    assert normal == {
        errors.AuthFailure.EXPIRED,
        errors.AuthFailure.REVOKED,
        errors.AuthFailure.REUSED,
    }
