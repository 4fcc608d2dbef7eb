"""Structured JSON log lines (``--log-format json``) and the current request's trace id.

:class:`JsonFormatter` is a standard :class:`logging.Formatter`: one JSON
object per line, keys in this order::

    {"ts": "2026-12-04T21:40:00.123Z", "level": "INFO", "logger": "streaming.hub",
     "message": "…", "trace_id": "…", "source": "…", "market": "…", "exc": "…"}

- ``ts``: the record's creation time, ISO 8601 in UTC with milliseconds;
- ``trace_id``: the record's ``extra={"trace_id": …}``, else the trace id of
  the request being handled (:func:`current_trace_id`: set by
  :class:`streaming.tracing.TraceMiddleware` for the task serving the
  request and the tasks it starts, and cleared when the request ends — a
  node-wide task that happened to be started by a request, such as a
  heartbeat loop, does not go on logging that request's id), else absent;
- ``source`` / ``market``: from the record's extras when given
  (``logger.info("…", extra={"source": name, "market": market_id})``);
- ``exc`` / ``stack``: the formatted traceback / stack when the record has one.

Secrets: the CLI installs :mod:`feed.redaction` on the record factory, so the
message and the traceback text are already redacted when the record reaches
a formatter; the formatter redacts them again (idempotent; it may be used
without the CLI) and also redacts the extras, which the record factory does
not see (``extra=`` is set on the record after it is built).
"""

from __future__ import annotations

import json
import logging
import time
from contextvars import ContextVar

from feed.redaction import redact

__all__ = ["EXTRA_KEYS", "TRACE", "JsonFormatter", "Trace", "current_trace_id"]


class Trace:
    """The trace of one request; ``trace_id`` is None once the request has ended."""

    __slots__ = ("trace_id",)

    def __init__(self, trace_id: str | None) -> None:
        self.trace_id = trace_id


#: the trace of the request the current task is handling (None outside a request)
TRACE: ContextVar[Trace | None] = ContextVar("oddsfeed_trace", default=None)


def current_trace_id() -> str | None:
    """The trace id of the request being handled, or None."""
    t = TRACE.get()
    return t.trace_id if t is not None else None

#: record attributes (``extra=``) copied into the JSON object when present
EXTRA_KEYS = ("trace_id", "source", "market")


def _iso_utc(created: float) -> str:
    secs = int(created)
    ms = int((created - secs) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ms:03d}Z"


def _clean(value: object) -> object:
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return redact(str(value))


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": _iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key in EXTRA_KEYS:
            value = record.__dict__.get(key)
            if value is None and key == "trace_id":
                value = current_trace_id()
            if value is not None:
                out[key] = _clean(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = redact(record.exc_text)
        if record.stack_info:
            out["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(out, ensure_ascii=False, default=str)


_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(32), *range(127, 160)] if c != 9}  # C0, DEL, C1 (tab kept)
_CONTROLS.update({10: "\\n", 13: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"})  # (and the line separators)


class TextFormatter(logging.Formatter):
    """The text log line (``--log-format text``): ``asctime level logger: message``, one record
    per line — control characters in the message (a client's ``%0a`` in a logged path, a
    provider's bytes) are escaped (``\\n``, ``\\r``, ``\\x00`` …), so no input can forge a line.
    A traceback still follows on its own lines."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = record.message
        if not message.isprintable():
            record.message = message.translate(_CONTROLS)
        return super().formatMessage(record)
