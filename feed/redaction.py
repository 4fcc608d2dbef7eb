"""Secrets never appear in logs, at any level.

:func:`install` (called by the CLI's logging setup, :func:`feed.cli.setup_logging`)
wraps the logging record factory, so every record any logger creates — ours,
``websockets`` (whose DEBUG output lists every request header), ``httpx``,
uvicorn — is redacted once, before any handler or formatter sees it:

- the **value of a secret header** in ``Name: value`` lines (to the end of the
  line), in ``'Name': 'value'`` / ``('name', 'value')`` reprs and in JSON
  (``"name": "value"``), for the names in :data:`SECRET_NAMES` (``X-Api-Key``,
  ``Authorization``, ``Cookie``, ``X-Security-Hash`` …, any case);
- the **value of a secret query parameter** (``api_key=``, ``access_token=`` …)
  in URLs;
- **every registered secret value** wherever it appears
  (:func:`register_secret`: source options such as ``api_key``, ``password``,
  ``client_secret``, ``hmac_secret``, ``session``, ``app_key``; ``ODDSFEED_API_KEYS``,
  ``ODDSFEED_JWT_SECRETS``; a push client's key) — values shorter than
  :data:`MIN_SECRET_CHARS` are not registered (they would redact ordinary words).

Each is replaced by :data:`REDACTED`. The message is formatted once
(``record.getMessage()``); when redaction changes it, the record's ``args``
are redacted one by one (keeping their shape for formatters that read them),
or, if a secret spans several args (``"> %s: %s" % (name, value)``), the
record's message becomes the redacted text with no args. An exception's
traceback text (``exc_text``) and ``stack_info`` are redacted too.

Cost: a record is only built for a logger/level that is enabled, so the
regular expressions run on emitted lines only.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable
from typing import Any

__all__ = ["MIN_SECRET_CHARS", "REDACTED", "SECRET_NAMES", "SECRET_OPTION_KEYS", "install", "redact",
           "register_secret", "register_secrets", "uninstall"]

REDACTED = "***"
#: shortest value :func:`register_secret` accepts, characters
MIN_SECRET_CHARS = 4

#: header and parameter names whose values are secrets (compared case-insensitively; ``-`` and ``_`` alike)
SECRET_NAMES = (
    "x-api-key", "api-key", "apikey", "api_key", "authorization", "proxy-authorization", "cookie", "set-cookie",
    "x-security-hash", "x-signature", "x-auth-token", "x-authentication", "x-application", "x-session-token",
    "access_token", "refresh_token", "id_token", "client_secret", "hmac_secret", "password", "session",
    "session_token", "app_key", "secret", "token",
)
#: ``--source`` option keys whose values are secrets (registered by the CLI)
SECRET_OPTION_KEYS = frozenset({
    "api_key", "apikey", "key", "password", "client_secret", "hmac_secret", "secret", "token", "session",
    "app_key", "access_token",
})

_names = "|".join(sorted({"[-_]".join(re.escape(p) for p in re.split("[-_]", n)) for n in SECRET_NAMES},
                         key=len, reverse=True))
# 'Name': 'value' / ("name", "value") / "name": "value" — a quoted value after a quoted name
_QUOTED = re.compile(r"""(?i)(?<![\w-])((?:%s)['"]\s*[:=,]\s*)(['"])(.*?)(\2)""" % _names)
# Name: value — a header line; the value runs to the end of the line
_LINE = re.compile(r"""(?im)(?<![\w-])((?:%s)\s*:[ \t]*)(?!['"\s])([^\r\n]+)""" % _names)
# ?name=value&… — a query parameter or a key=value pair
_PARAM = re.compile(r"""(?i)(?<![\w-])((?:%s)=)(?!['"])([^&\s'",;#)}\]]+)""" % _names)

_secrets: set[str] = set()
_lock = threading.Lock()
_pattern: re.Pattern[str] | None = None
_installed: Any = None  # the record factory we replaced, while installed


def register_secret(value: str | None) -> None:
    """Redact ``value`` wherever it appears in a log record from now on (values shorter
    than :data:`MIN_SECRET_CHARS` are ignored)."""
    global _pattern
    if not value or len(value) < MIN_SECRET_CHARS:
        return
    with _lock:
        if value in _secrets:
            return
        _secrets.add(value)
        _pattern = re.compile("|".join(re.escape(s) for s in sorted(_secrets, key=len, reverse=True)))


def register_secrets(values: Iterable[str | None]) -> None:
    """:func:`register_secret` for each of ``values``, compiling the pattern once (not once per value:
    thousands of tenant keys made that quadratic — a minute at startup, seconds of a blocked loop
    on a reload)."""
    global _pattern
    new = {v for v in values if v and len(v) >= MIN_SECRET_CHARS}
    with _lock:
        if new <= _secrets:
            return
        _secrets.update(new)
        _pattern = re.compile("|".join(re.escape(s) for s in sorted(_secrets, key=len, reverse=True)))


def redact(text: str) -> str:
    """``text`` with every registered secret and every secret header/parameter value replaced."""
    pattern = _pattern
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    text = _QUOTED.sub(lambda m: m.group(1) + m.group(2) + REDACTED + m.group(4), text)
    text = _LINE.sub(lambda m: m.group(1) + REDACTED, text)
    return _PARAM.sub(lambda m: m.group(1) + REDACTED, text)


def _redact_arg(a: object) -> object:
    return redact(a) if isinstance(a, str) else a


def redact_record(record: logging.LogRecord) -> None:
    """Redact one record in place (see the module docstring)."""
    try:
        text = record.getMessage()
    except Exception:  # a broken format: logging reports it later; leave the record alone
        return
    clean = redact(text)
    if clean != text:
        msg, args = record.msg, record.args
        new_msg = redact(msg) if isinstance(msg, str) else msg
        if isinstance(args, tuple):
            new_args: Any = tuple(_redact_arg(a) for a in args)
        elif isinstance(args, dict):
            new_args = {k: _redact_arg(v) for k, v in args.items()}
        else:
            new_args = args
        record.msg, record.args = new_msg, new_args
        try:
            ok = record.getMessage() == clean
        except Exception:
            ok = False
        if not ok:  # a secret spans several args (or the redacted args broke the format)
            record.msg, record.args = clean, None
    if record.exc_info and not record.exc_text:
        record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
    elif record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


def install() -> None:
    """Redact every log record of this process from now on (idempotent)."""
    global _installed
    with _lock:
        if _installed is not None:
            return
        inner = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = inner(*args, **kwargs)
            redact_record(record)
            return record
        _installed = inner
        logging.setLogRecordFactory(factory)


def uninstall() -> None:
    """Undo :func:`install` (tests)."""
    global _installed
    with _lock:
        if _installed is not None:
            logging.setLogRecordFactory(_installed)
            _installed = None
