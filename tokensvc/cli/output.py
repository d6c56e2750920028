"""One output convention for every ``tokensvc`` command: a readable table by default,
``--output json`` for one JSON object per line (snake_case keys, numbers as numbers,
times as epoch seconds, unset times as null), for scripts and ``jq``.

Table cells hold what callers control (subjects, session labels, certificate common
names in the audit trail): every one goes through :func:`printable`, so a newline cannot
forge a row and an ANSI escape or a bidi override cannot rewrite the operator's terminal.
JSON escapes by itself.
"""

from __future__ import annotations

import argparse
import json
import time
import unicodedata
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


#: Unicode categories shown escaped: controls (C0, DEL, C1), format characters (bidi
#: overrides and isolates, zero-width joiners, ...), surrogates, private use, unassigned,
#: and the line and paragraph separators.
_ESCAPED: frozenset[str] = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_SHORT: dict[str, str] = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape(char: str) -> str:
    if char in _SHORT:
        return _SHORT[char]
    if unicodedata.category(char) not in _ESCAPED:
        return char
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: str) -> str:
    """``text`` safe to print on a terminal, one line: non-printable characters (controls,
    C1, bidi overrides, other format characters, line separators) as Python-style escapes
    (``\\n``, ``\\x1b``, ``\\u202e``), and ``\\`` doubled so an escape is never ambiguous."""
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text  # the common case, fast
    return "".join(_escape(char) for char in text)


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
    columns = [printable(str(key)) for key in rows[0]]
    cells = [[printable(_cell(item.get(key), key)) for key in rows[0]] for item in rows]
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
    width = max((len(printable(key)) for key in item), default=0)
    for key, value in item.items():
        print(f"{printable(key).upper().ljust(width)}  {printable(_cell(value, key))}", file=out)
