"""Review: the one-record view (``tokensvc issue``/``refresh``/``introspect`` without
``-o json``) printed its cells raw, while every other table goes through ``printable``: a
claim holding a newline, an ANSI escape or U+202E (from a server the operator pointed
``--target`` at, or a token of an older version) forged a line or rewrote the terminal.
Today's server refuses such values at Issue, so this is defence in depth: one escaping
rule for every table cell."""

from __future__ import annotations

import io

from tests.cli.test_cli_escaping import HOSTILE_CN, _clean
from tokensvc.cli.output import emit_one, printable


def test_the_one_record_view_escapes_every_cell():
    out = io.StringIO()
    emit_one({"subject": HOSTILE_CN, "roles": ["a\nb", "\x1b[2J"], "active": True}, "table", out)
    text = out.getvalue()
    lines = text.splitlines()
    assert len(lines) == 3, lines  # one line per field, none forged
    _clean(text.replace("\n", ""))
    assert lines[0].endswith(printable(HOSTILE_CN))
