"""Channels to tokensvc (or any service of the mesh): TLS by default, plaintext only on request.

:func:`channel` and :func:`aio_channel` take the same arguments and build the same
credentials; only the channel type differs.

PEM material is given either as ``bytes`` (the PEM itself) or as a path (``str`` or
``os.PathLike``).

Call credentials (:func:`~tokensvc_client.credentials.token_call_credentials`) are only
sent by gRPC over a secure channel. With ``insecure=True`` and ``call_credentials`` the
channel therefore uses gRPC *local* credentials: no TLS, but gRPC treats the connection as
secure because it only connects to loopback (127.0.0.1, ::1) or Unix sockets -- the same
places the service allows plaintext.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

Pem = bytes | str | os.PathLike[str]
Options = Sequence[tuple[str, Any]]


def _read(pem: Pem | None) -> bytes | None:
    if pem is None or isinstance(pem, bytes):
        return pem
    return Path(pem).read_bytes()


def channel_credentials(
    *,
    ca: Pem | None = None,
    cert: Pem | None = None,
    key: Pem | None = None,
    call_credentials: grpc.CallCredentials | None = None,
) -> grpc.ChannelCredentials:
    """TLS credentials, mutual when ``cert`` and ``key`` are given.

    Args:
        ca: root certificates that sign the server's certificate; ``None`` uses the
            system roots.
        cert: client certificate chain for mTLS.
        key: private key of ``cert``.
        call_credentials: attached to every call made on the channel.

    Raises:
        ValueError: only one of ``cert`` and ``key`` given.
        OSError: a PEM path cannot be read.
    """
    if (cert is None) != (key is None):
        raise ValueError("cert and key must be given together")
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(ca), private_key=_read(key), certificate_chain=_read(cert)
    )
    if call_credentials is not None:
        creds = grpc.composite_channel_credentials(creds, call_credentials)
    return creds


def _credentials(
    insecure: bool,
    ca: Pem | None,
    cert: Pem | None,
    key: Pem | None,
    call_credentials: grpc.CallCredentials | None,
) -> grpc.ChannelCredentials | None:
    """Credentials for a channel; ``None`` means a plaintext channel."""
    if not insecure:
        return channel_credentials(ca=ca, cert=cert, key=key, call_credentials=call_credentials)
    if ca is not None or cert is not None or key is not None:
        raise ValueError("insecure=True contradicts ca/cert/key")
    if call_credentials is None:
        return None
    return grpc.composite_channel_credentials(grpc.local_channel_credentials(), call_credentials)


def channel(
    target: str,
    *,
    ca: Pem | None = None,
    cert: Pem | None = None,
    key: Pem | None = None,
    insecure: bool = False,
    call_credentials: grpc.CallCredentials | None = None,
    options: Options | None = None,
) -> grpc.Channel:
    """A blocking channel to ``target`` ("host:port").

    TLS unless ``insecure=True`` (plaintext; see the module docstring for call
    credentials on such a channel).

    Raises:
        ValueError: contradictory arguments.
    """
    creds = _credentials(insecure, ca, cert, key, call_credentials)
    if creds is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, creds, options=options)


def aio_channel(
    target: str,
    *,
    ca: Pem | None = None,
    cert: Pem | None = None,
    key: Pem | None = None,
    insecure: bool = False,
    call_credentials: grpc.CallCredentials | None = None,
    options: Options | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel to ``target``; arguments as for :func:`channel`."""
    creds = _credentials(insecure, ca, cert, key, call_credentials)
    if creds is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, creds, options=options)
