"""Protobuf timestamps from epoch seconds (shared by the servicer modules)."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp


def ts(seconds: float) -> Timestamp:
    """A Timestamp at ``seconds`` since the epoch, millisecond precision."""
    stamp = Timestamp()
    stamp.FromMilliseconds(int(seconds * 1000))
    return stamp
