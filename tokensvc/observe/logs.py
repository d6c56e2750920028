"""Log set-up of the service: JSON lines on stderr, one object per record.

A worker process of ``serve --workers N`` tags every line with its ``worker`` number, so
the start-up lines each worker repeats can be told apart from the parent's.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from tokensvc.observe.tracing import current_trace_id

# attributes every LogRecord has; anything else on a record came from `extra=`
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the record's ``extra``
    fields as keys of their own (e.g. the audit events' event, subject, session_id, jti),
    trace id. Never a token: the code logs session ids and jtis only."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key in _RECORD_ATTRS or key in entry or key.startswith("_"):
                continue
            scalar = value is None or isinstance(value, str | int | float | bool)
            entry[key] = value if scalar else str(value)
        trace_id = entry.get("trace_id") or current_trace_id()
        if trace_id:
            entry["trace_id"] = trace_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str, worker: int | None = None) -> None:
    """JSON lines on stderr at ``level``; ``worker`` (1..N) adds ``"worker": N`` to each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    if worker is not None:

        def tag(record: logging.LogRecord) -> bool:
            record.worker = worker
            return True

        handler.addFilter(tag)
    logging.basicConfig(level=level, handlers=[handler], force=True)
