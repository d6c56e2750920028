"""Refused gRPC calls, for the tests that check how: each caller asserts the status code
(and, where it matters, the details and trailers) of what these return."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest


def refused(call: Callable[[], object]) -> grpc.RpcError:
    """The :class:`grpc.RpcError` ``call()`` raises (the test fails if it raises none)."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    """The status code of the :class:`grpc.RpcError` ``call()`` raises."""
    return refused(call).code()
