"""One output convention for every ``tokensvc`` command: a readable table by default,
``--output json`` for one JSON object per line (snake_case keys, numbers as numbers,
times as epoch seconds, unset times as null), for scripts and ``jq``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

from google.protobuf.message import Message

FORMATS = ("table", "json")


def add_output_arg(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "-o",
        "--output",
        choices=FORMATS,
        default="table",
        help="table (readable) or json (one object per line) [default table]",
    )


def _value(field: Any, value: Any) -> Any:
    if field.message_type is not None:
        if field.message_type.full_name == "google.protobuf.Timestamp":
            return value.seconds if value.seconds or value.nanos else None
        return row(value)
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    return value


def row(message: Message) -> dict[str, Any]:
    """A protobuf message as a JSON-ready dict: every field by its proto (snake_case) name,
    integers as numbers (not strings, as protobuf's JSON mapping renders int64)."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if isinstance(value, Sequence) and not isinstance(value, str | bytes):  # repeated
            out[field.name] = [_value(field, item) for item in value]
        else:
            out[field.name] = _value(field, value)
    return out


def _cell(value: Any, key: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and key.endswith(("_at", "_after", "_before")):
        return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(value))
    if isinstance(value, list):
        return ",".join(str(item) for item in value) or "-"
    return str(value)


def emit(rows: Iterable[Mapping[str, Any]], fmt: str, out: TextIO) -> None:
    """Print ``rows`` as a table (header, aligned columns) or as JSON lines."""
    rows = list(rows)
    if fmt == "json":
        for item in rows:
            print(json.dumps(item), file=out, flush=True)
        return
    if not rows:
        print("(none)", file=out)
        return
    columns = list(rows[0])
    cells = [[_cell(item.get(key), key) for key in columns] for item in rows]
    widths = [max(len(key), *(len(line[i]) for line in cells)) for i, key in enumerate(columns)]
    print(
        "  ".join(k.upper().ljust(w) for k, w in zip(columns, widths, strict=True)).rstrip(),
        file=out,
    )
    for line in cells:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip(), file=out)


def emit_one(item: Mapping[str, Any], fmt: str, out: TextIO) -> None:
    """Print one record: as a JSON line, or as a table of its fields, one per line (a record
    holding tokens is too wide for columns)."""
    if fmt == "json":
        emit([item], fmt, out)
        return
    width = max((len(key) for key in item), default=0)
    for key, value in item.items():
        print(f"{key.upper().ljust(width)}  {_cell(value, key)}", file=out)
