"""Protobuf timestamps from epoch seconds (shared by the servicer modules)."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp


def ts(seconds: float) -> Timestamp:
    """A Timestamp at ``seconds`` since the epoch, millisecond precision."""
    return ts_ms(int(seconds * 1000))


def ts_ms(ms: int) -> Timestamp:
    """A Timestamp at ``ms`` milliseconds since the epoch."""
    stamp = Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp
