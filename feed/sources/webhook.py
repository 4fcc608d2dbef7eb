"""``webhook``: a provider POSTs signed push-format messages to us.

The source runs its own HTTP server (Starlette in uvicorn, no signal
handlers) on the spec's address and accepts
``POST /ingest/webhook/<source name>``; each request body is one message of
``docs/push-format.md`` (``odds``, ``locked-odds``, ``fixture-status``, ``scores``; see
:mod:`feed.normalise.webhook` for why deliveries may come in any order and
more than once). It is I/O only: it authenticates a delivery, hands its
bytes to the pipeline (:meth:`feed.sources.base.Sink.deliver`) and answers
from what the pipeline made of it.

::

    oddsfeed run --source "webhook=127.0.0.1:8091,secret=$WEBHOOK_SECRET"
    # the provider: POST http://127.0.0.1:8091/ingest/webhook/webhook
    #   X-Timestamp: 1767000000            (unix seconds, or ms)
    #   X-Idempotency-Key: <unique per message, the same on every retry>
    #   X-Signature: sha256=<hex HMAC-SHA256(secret, "<X-Timestamp>.<body>")>   (with signature_prefix=sha256=)

Authentication (checked in this order, each failure a JSON ``{"error": code,
"detail": what to fix}``):

1. ``404 unknown_path`` (another path), ``405 method_not_allowed`` (not POST);
2. ``413 body_too_large``: ``Content-Length`` or the bytes read exceed
   ``max_body_bytes`` (read stops there); ``408 body_timeout``: the body
   took longer than ``read_timeout_s``; ``400 unreadable_body`` (the client
   went away), ``400 empty_body``;
3. ``400 missing_header`` (signature, timestamp or idempotency key — the
   ones configured), ``400 bad_timestamp`` (not unix seconds or ms),
   ``400 bad_idempotency_key`` (longer than 256 characters);
4. ``401 bad_signature``: HMAC-SHA256 with the secret over the raw body —
   or, when a timestamp header is used and ``sign_timestamp`` is true (the
   default), over ``<timestamp header value>.<body>`` (the value exactly as
   sent, an ASCII dot, the raw body bytes; Stripe's scheme), so a captured
   body cannot be replayed with a fresh timestamp. The header holds the
   digest in ``signature_encoding`` (``hex``, any case, or ``base64``,
   standard or URL-safe alphabet), after ``signature_prefix`` when set
   (e.g. ``sha256=``). Compared with :func:`hmac.compare_digest`;
5. ``401 timestamp_outside_window``: the timestamp is more than
   ``window_s`` away from our clock (either way). We answer 401, not 408:
   408 means *the server* timed out reading the request, and a stale
   timestamp is an authentication failure (the request may be a replay);
   a provider should not retry it unchanged.

Then, one delivery at a time (the pipeline applies in order):

- an idempotency key already acknowledged → ``200 {"ok": true,
  "duplicate": true}`` and nothing is applied again. Keys are remembered
  until their timestamp leaves the window (receipt + ``window_s`` without a
  timestamp header), at most ``nonce_max`` of them (the oldest are
  forgotten first). Forgetting is safe: a re-applied body is harmless —
  the webhook normaliser drops an ``entry_id`` it applied already, and
  odds older than what is held are dropped (provider time per odd), so a
  late copy can never move a market back;
- the body is rejected whole by the normaliser (bad JSON, unknown type, bad
  price …) → ``422 rejected`` (the provider must fix the message; the body
  is quarantined by the pipeline under the source's name); its key is not
  remembered;
- the store is failing (``Delivered.stored`` False: the change waits in the
  pipeline's ordered backlog, it is not durable yet) → ``503
  store_unavailable`` with ``Retry-After: retry_after_s``; the key is *not*
  remembered, so the provider's retry is accepted, and answered 200 once
  the backlog is stored (the retried body itself is a duplicate of what
  waits in the backlog, or a harmless re-apply);
- otherwise ``200 {"ok": true, "duplicate": false, "deltas": n,
  "rejected_parts": n, "stale": bool}`` — 2xx only once ``deliver`` says
  ``stored``. ``rejected_parts``: markets of the message rejected alone
  (quarantined; the rest applied). ``stale``: the message was older than
  what is held (or an exact re-delivery) and changed nothing.

Health and freshness: the source is UP once listening (DOWN / ``stopped``
when it ends). A webhook provider sends nothing while nothing changes, and
nothing tells us it is alive in between, so there is no heartbeat to
confirm quiet markets: every stored delivery confirms all the source's
markets (``confirms_by_messages=True``, as a stream's message does) — as of
its arrival, or, arriving more than ``ODDSFEED_MAX_STREAM_LAG_MS`` after its
provider time (a retry after a 503, a backlog), as of that time plus the
bound: newer changes may still be queued behind it —, and
they turn stale ``stale_after_s`` (default 60) after the last delivery
(``stale_after_ms`` in the health record). After that long without a
delivery the source reads DEGRADED / ``no_deliveries`` (UP again on the next
one), so an operator sees a provider that stopped calling. Choose
``stale_after_s`` above the provider's longest quiet spell (or have it send
a ``ping`` message with ``emitted_at`` as a keep-alive: it confirms as of that
time; a ping without it, or an exact re-delivery, carries no time and
confirms nothing — docs/push-format.md, ``ping``).

Options (``--source webhook=HOST:PORT,…``; ``http://HOST:PORT`` also read;
port 0 = any free port, see :attr:`WebhookSource.port`):

======================  ==================  ===========================================
option                  default             meaning
======================  ==================  ===========================================
``secret``              —                   the shared HMAC key (or ``secret_env``)
``secret_env``          —                   name of an environment variable holding it
``signature_header``    ``X-Signature``     header carrying the signature
``signature_encoding``  ``hex``             ``hex`` or ``base64``
``signature_prefix``    none                text before the digest, e.g. ``sha256=``
``timestamp_header``    ``X-Timestamp``     ``none`` = no timestamp (no window check)
``sign_timestamp``      ``true``            sign ``<timestamp>.<body>`` (else the body)
``window_s``            300                 accepted clock difference, seconds
``nonce_header``        ``X-Idempotency-Key``  ``none`` = no replay memory
``nonce_max``           100000              idempotency keys remembered at most
``max_body_bytes``      1048576             larger bodies → 413
``read_timeout_s``      10                  time to read a body → 408
``retry_after_s``       2                   ``Retry-After`` of a 503
``stale_after_s``       60                  markets stale this long after a delivery
``prefix``              ``px``              id namespace (the normaliser's)
======================  ==================  ===========================================

The ``X-Security-Hash`` style (hex HMAC-SHA256 of the body alone, no
timestamp, no key): ``signature_header=X-Security-Hash,timestamp_header=none,
nonce_header=none``. GitHub style: ``signature_header=X-Hub-Signature-256,
signature_prefix=sha256=,timestamp_header=none,nonce_header=X-GitHub-Delivery``.

The secret and signatures never reach a log (the secret is registered with
:mod:`feed.redaction`; a bad signature is logged by its length only).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import math
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from feed.asgi_server import LocalServer
from feed.errors import ConfigError
from feed.redaction import register_secret
from feed.sources.base import Delivered, Payload, Sink

if TYPE_CHECKING:
    from feed.settings import Settings
    from feed.sources.spec import SourceSpec

__all__ = [
    "WEBHOOK_OPTIONS",
    "NonceCache",
    "WebhookOptions",
    "WebhookSource",
    "from_spec",
    "parse_timestamp_ms",
    "sign",
    "webhook_options",
]

logger = logging.getLogger(__name__)

#: the options a ``webhook`` source takes (besides ``name``)
WEBHOOK_OPTIONS: frozenset[str] = frozenset({
    "secret", "secret_env", "signature_header", "signature_encoding", "signature_prefix", "timestamp_header",
    "sign_timestamp", "window_s", "nonce_header", "nonce_max", "max_body_bytes", "read_timeout_s",
    "retry_after_s", "stale_after_s", "prefix",
})
#: longest idempotency key accepted, characters
MAX_NONCE_CHARS = 256
#: the path prefix; the source's name follows
PATH_PREFIX = "/ingest/webhook/"

_TIMESTAMP_RE = re.compile(r"^\d{1,16}(?:\.\d{1,9})?$")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def now_ms() -> int:
    """Wall clock, integer ms since the Unix epoch."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class WebhookOptions:
    """A ``webhook`` source's settings (see the module docstring's table).

    host / port: where to listen (port 0: any free port). secret: the HMAC
    key (bytes; never shown by ``repr``). timestamp_header / nonce_header:
    None = not used. Durations in seconds, sizes in bytes.
    """

    host: str
    port: int
    secret: bytes = field(repr=False)
    signature_header: str = "X-Signature"
    signature_encoding: Literal["hex", "base64"] = "hex"
    signature_prefix: str = ""
    timestamp_header: str | None = "X-Timestamp"
    sign_timestamp: bool = True
    window_s: float = 300.0
    nonce_header: str | None = "X-Idempotency-Key"
    nonce_max: int = 100_000
    max_body_bytes: int = 1 << 20
    read_timeout_s: float = 10.0
    retry_after_s: float = 2.0
    stale_after_s: float = 60.0


def _address(spec: SourceSpec) -> tuple[str, int]:
    url = spec.url.strip()
    for scheme in ("http://", "https://"):
        url = url.removeprefix(scheme)
    url = url.split("/", 1)[0]
    if url.startswith("["):  # [::1]:8091
        host, _, port = url[1:].partition("]:")
    else:
        host, sep, port = url.rpartition(":")
        if not sep:
            host, port = url, ""
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"source {spec.name}: webhook needs HOST:PORT to listen on, not {spec.url!r}")
    return host or "127.0.0.1", int(port)


def _bool(spec: SourceSpec, key: str, default: bool) -> bool:
    raw = spec.get(key)
    if raw is None:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ConfigError(f"source {spec.name}: {key} must be true or false, not {raw!r}")


def _positive(spec: SourceSpec, key: str, default: float) -> float:
    value = spec.get_float(key, default)
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"source {spec.name}: {key} must be a positive number")
    return value


def _header_option(spec: SourceSpec, key: str, default: str) -> str | None:
    value = spec.get(key, default) or default
    if value.lower() == "none":
        return None
    if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}", value):
        raise ConfigError(f"source {spec.name}: {key} must be an HTTP header name (or none), not {value!r}")
    return value


def webhook_options(spec: SourceSpec) -> WebhookOptions:
    """Read and check a spec's options; raises ConfigError saying what to fix
    (no secret, an empty environment variable, a bad encoding or number)."""
    host, port = _address(spec)
    secret = spec.get("secret")
    env = spec.get("secret_env")
    if not secret and env:
        secret = os.environ.get(env)
        if not secret:
            raise ConfigError(f"source {spec.name}: secret_env names ${env}, which is not set or empty")
    if not secret:
        raise ConfigError(f"source {spec.name}: webhook needs secret= or secret_env= (the shared HMAC key)")
    register_secret(secret)
    encoding = (spec.get("signature_encoding") or "hex").lower()
    if encoding not in ("hex", "base64"):
        raise ConfigError(f"source {spec.name}: signature_encoding must be hex or base64, not {encoding!r}")
    signature_header = _header_option(spec, "signature_header", "X-Signature")
    if signature_header is None:
        raise ConfigError(f"source {spec.name}: signature_header cannot be none (deliveries must be signed)")
    return WebhookOptions(
        host=host, port=port, secret=secret.encode(),
        signature_header=signature_header,
        signature_encoding="hex" if encoding == "hex" else "base64",
        signature_prefix=spec.get("signature_prefix") or "",
        timestamp_header=_header_option(spec, "timestamp_header", "X-Timestamp"),
        sign_timestamp=_bool(spec, "sign_timestamp", True),
        window_s=_positive(spec, "window_s", 300.0),
        nonce_header=_header_option(spec, "nonce_header", "X-Idempotency-Key"),
        nonce_max=int(_positive(spec, "nonce_max", 100_000)),
        max_body_bytes=int(_positive(spec, "max_body_bytes", 1 << 20)),
        read_timeout_s=_positive(spec, "read_timeout_s", 10.0),
        retry_after_s=_positive(spec, "retry_after_s", 2.0),
        stale_after_s=_positive(spec, "stale_after_s", 60.0),
    )


def signed_bytes(body: bytes, timestamp: str | None) -> bytes:
    """What is signed: ``<timestamp>.<body>`` (timestamp as sent), or the body alone when None."""
    return body if timestamp is None else timestamp.encode("ascii") + b"." + body


def sign(secret: bytes, body: bytes, timestamp: str | None = None, *, encoding: str = "hex",
         prefix: str = "") -> str:
    """The signature header value a provider sends: ``prefix`` + the
    HMAC-SHA256 of :func:`signed_bytes` in ``encoding`` (``hex`` or
    ``base64``). For senders and tests."""
    digest = hmac.new(secret, signed_bytes(body, timestamp), hashlib.sha256).digest()
    text = digest.hex() if encoding == "hex" else base64.b64encode(digest).decode("ascii")
    return prefix + text


def _decode_signature(value: str, encoding: str) -> bytes | None:
    try:
        if encoding == "hex":
            return bytes.fromhex(value)
        padded = value + "=" * (-len(value) % 4)
        if "-" in value or "_" in value:
            return base64.urlsafe_b64decode(padded.encode("ascii"))
        return base64.b64decode(padded.encode("ascii"), validate=True)
    except (ValueError, binascii.Error, UnicodeEncodeError):
        return None


def parse_timestamp_ms(value: str) -> int | None:
    """A timestamp header (unix seconds, or ms when ≥ 10¹¹; a fraction
    allowed) → int ms since the epoch; None when it is not such a number."""
    value = value.strip()
    if not _TIMESTAMP_RE.match(value):
        return None
    number = float(value)
    return round(number * 1000) if number < 1e11 else int(number)


class NonceCache:
    """Idempotency keys acknowledged, each until its expiry (ms since the
    epoch); at most ``max_count`` (the oldest inserted are forgotten first).
    Memory: O(max_count)."""

    def __init__(self, max_count: int = 100_000) -> None:
        self.max_count = max_count
        self._keys: OrderedDict[str, int] = OrderedDict()
        self.evicted_early = 0  # forgotten before they expired (over the cap)

    def __len__(self) -> int:
        return len(self._keys)

    def seen(self, key: str, now: int) -> bool:
        """Whether ``key`` was acknowledged and has not expired at ``now``."""
        self._expire(now)
        expires = self._keys.get(key)
        return expires is not None and expires > now

    def remember(self, key: str, expires_ms: int, now: int) -> None:
        self._expire(now)
        self._keys.pop(key, None)
        self._keys[key] = expires_ms
        while len(self._keys) > self.max_count:
            self._keys.popitem(last=False)
            self.evicted_early += 1

    def _expire(self, now: int) -> None:
        keys = self._keys
        while keys:
            first = next(iter(keys.values()))
            if first > now:
                return
            keys.popitem(last=False)


def _error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


class _Reject(Exception):
    """An answer decided before the body reaches the pipeline."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


class WebhookSource:
    """The ``webhook`` source (module docstring). ``run(sink)`` listens until
    cancelled or :meth:`stop`; :attr:`port` is the bound port once
    :attr:`listening` is set.

    Counters for tests and health: ``accepted`` (2xx, not duplicate),
    ``duplicates``, ``rejected`` (by status code), ``unavailable`` (503s).
    """

    confirms_by_messages = True
    #: a delivery rejected whole is answered 422 and sent again by the provider: nothing is lost
    rejected_messages_redelivered = True

    def __init__(self, name: str, options: WebhookOptions) -> None:
        self.name = name
        self.options = options
        self.stale_after_ms: int | None = int(options.stale_after_s * 1000)
        self.path = PATH_PREFIX + name
        self.port = options.port
        self.listening = asyncio.Event()
        self.accepted = 0
        self.duplicates = 0
        self.unavailable = 0
        self.rejected: dict[int, int] = {}
        self.nonces = NonceCache(options.nonce_max)
        self._sink: Sink | None = None
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._last_delivery = time.monotonic()
        self._idle = False
        self.app = Starlette(
            routes=[Route(PATH_PREFIX + "{name}", self._endpoint, methods=["POST"])],
            exception_handlers={404: self._not_found, 405: self._not_allowed},
        )

    @property
    def url(self) -> str:
        """The URL providers POST to (valid once listening)."""
        host = self.options.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}{self.path}"

    # -- Source ------------------------------------------------------------------------

    async def run(self, sink: Sink) -> None:
        """Listen and serve deliveries into ``sink`` until cancelled or stopped.
        Raises OSError when the address cannot be bound (the supervisor
        retries)."""
        self._sink = sink
        opts = self.options
        server = LocalServer(self.app, opts.host, opts.port, name=f"webhook-{self.name}", timeout_keep_alive=30,
                             timeout_graceful_shutdown=2, server_header=False)
        await server.start()  # (OSError when the address cannot be bound: the supervisor retries)
        self.port = server.port
        try:
            self._last_delivery = time.monotonic()
            sink.set_state("UP", None)
            self.listening.set()
            logger.info("webhook source %s listening on %s", self.name, self.url)
            assert server.task is not None
            await self._watch_idle(sink, server.task)
        finally:
            self.listening.clear()
            await server.stop()
            sink.set_state("DOWN", "stopped")

    async def _watch_idle(self, sink: Sink, serve: asyncio.Task[None]) -> None:
        """Until stopped: DEGRADED / ``no_deliveries`` after ``stale_after_s``
        without a delivery (UP again on the next one, see :meth:`_delivered`)."""
        stale_s = self.options.stale_after_s
        tick = min(1.0, stale_s / 4)
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tick):
                    await self._stop.wait()
            if serve.done():
                serve.result()
                raise OSError(f"webhook server for {self.name} stopped")
            if not self._idle and time.monotonic() - self._last_delivery > stale_s:
                self._idle = True
                sink.set_state("DEGRADED", "no_deliveries")

    def request_repair(self) -> None:
        """No-op: a webhook provider offers no image to fetch. A market with
        a change rejected alone stays unconfirmed (stale) until the provider
        sends an image of it — which the push format only has as a snapshot,
        not accepted here — so the provider must resend it after fixing it."""

    def stop(self) -> None:
        self._stop.set()

    # -- HTTP --------------------------------------------------------------------------

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        self._count(404)
        return _error(404, "unknown_path", f"POST deliveries to {PATH_PREFIX}<source name>")

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        self._count(405)
        headers = dict(exc.headers or {}) if isinstance(exc, HTTPException) else {}
        headers.setdefault("Allow", "POST")
        return _error(405, "method_not_allowed", "deliveries are POSTed", headers)

    def _count(self, status: int) -> None:
        self.rejected[status] = self.rejected.get(status, 0) + 1

    async def _endpoint(self, request: Request) -> Response:
        try:
            return await self._handle(request)
        except _Reject as r:
            self._count(r.response.status_code)
            return r.response

    async def _read_body(self, request: Request) -> bytes:
        cap = self.options.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > cap:
            raise _Reject(_error(413, "body_too_large", f"a delivery is at most {cap} bytes"))
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.options.read_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > cap:
                        raise _Reject(_error(413, "body_too_large", f"a delivery is at most {cap} bytes"))
                    chunks.append(chunk)
        except TimeoutError:
            raise _Reject(_error(408, "body_timeout", f"send the body within {self.options.read_timeout_s:g} s")) \
                from None
        except ClientDisconnect:
            raise _Reject(_error(400, "unreadable_body", "the connection ended before the body")) from None
        body = b"".join(chunks)
        if not body.strip():
            raise _Reject(_error(400, "empty_body", "the body must be one push-format JSON message"))
        return body

    def _header(self, request: Request, name: str) -> str:
        value = request.headers.get(name)
        if value is None or not value.strip():
            raise _Reject(_error(400, "missing_header", f"send the {name} header"))
        return value

    def _authenticate(self, request: Request, body: bytes, recv_ms: int) -> tuple[str | None, int]:
        """Check headers, signature and window; (idempotency key or None,
        when the key may be forgotten in ms). Raises _Reject."""
        opts = self.options
        signature = self._header(request, opts.signature_header)
        stamp: str | None = None
        stamp_ms: int | None = None
        if opts.timestamp_header is not None:
            stamp = self._header(request, opts.timestamp_header).strip()
            stamp_ms = parse_timestamp_ms(stamp)
            if stamp_ms is None:
                raise _Reject(_error(400, "bad_timestamp",
                                     f"{opts.timestamp_header} must be unix time in seconds or milliseconds"))
        nonce: str | None = None
        if opts.nonce_header is not None:
            nonce = self._header(request, opts.nonce_header).strip()
            if len(nonce) > MAX_NONCE_CHARS:
                raise _Reject(_error(400, "bad_idempotency_key",
                                     f"{opts.nonce_header} is at most {MAX_NONCE_CHARS} characters"))
        value = signature.strip()
        prefix = opts.signature_prefix
        ok = False
        if not prefix or value[:len(prefix)].lower() == prefix.lower():
            given = _decode_signature(value[len(prefix):].strip(), opts.signature_encoding)
            signed = signed_bytes(body, stamp if opts.sign_timestamp else None)
            expected = hmac.new(opts.secret, signed, hashlib.sha256).digest()
            ok = given is not None and hmac.compare_digest(given, expected)
        if not ok:
            logger.warning("webhook %s: bad signature (%s header of %d characters) from %s", self.name,
                           opts.signature_header, len(value), request.client.host if request.client else "?")
            what = f"<{opts.timestamp_header}>.<body>" if stamp is not None and opts.sign_timestamp else "the body"
            raise _Reject(_error(401, "bad_signature",
                                 f"{opts.signature_header} must be {prefix or ''}<{opts.signature_encoding} "
                                 f"HMAC-SHA256 of {what} with the shared secret>"))
        window_ms = int(opts.window_s * 1000)
        if stamp_ms is not None and abs(recv_ms - stamp_ms) > window_ms:
            raise _Reject(_error(401, "timestamp_outside_window",
                                 f"{opts.timestamp_header} is {(recv_ms - stamp_ms) / 1000:.0f} s from our clock; "
                                 f"at most {opts.window_s:g} s either way (sign a fresh timestamp, check the clock)"))
        expires = max(recv_ms, stamp_ms or 0) + window_ms
        return nonce, expires

    async def _handle(self, request: Request) -> Response:
        if request.path_params.get("name") != self.name:
            raise _Reject(_error(404, "unknown_path", f"POST deliveries to {PATH_PREFIX}<source name>"))
        body = await self._read_body(request)
        recv_ms = now_ms()
        nonce, expires = self._authenticate(request, body, recv_ms)
        sink = self._sink
        if sink is None or self._stop.is_set():
            raise _Reject(_error(503, "stopping", "the source is not running; retry",
                                 {"Retry-After": _seconds(self.options.retry_after_s)}))
        async with self._lock:  # one delivery at a time: the pipeline applies in order
            if nonce is not None and self.nonces.seen(nonce, now_ms()):
                self.duplicates += 1
                return JSONResponse({"ok": True, "duplicate": True})
            try:
                delivered = await sink.deliver([Payload(recv_ms, body, "")])
            except Exception:  # a pipeline bug: the provider retries, the source stays up
                logger.exception("webhook %s: delivery failed in the pipeline", self.name)
                raise _Reject(_error(500, "internal_error", "the delivery was not applied; retry later")) from None
            self._delivered(sink)
            if delivered.rejected_messages:
                raise _Reject(_rejected(delivered))
            if not delivered.stored:
                self.unavailable += 1
                raise _Reject(_error(503, "store_unavailable",
                                     "accepted but not yet durable (our store is failing); retry the same delivery",
                                     {"Retry-After": _seconds(self.options.retry_after_s)}))
            if nonce is not None:
                self.nonces.remember(nonce, expires, now_ms())
        self.accepted += 1
        return JSONResponse({"ok": True, "duplicate": False, "deltas": delivered.deltas,
                             "rejected_parts": delivered.rejected_parts, "stale": delivered.stale})

    def _delivered(self, sink: Sink) -> None:
        self._last_delivery = time.monotonic()
        if self._idle:
            self._idle = False
            sink.set_state("UP", None)


def _seconds(value: float) -> str:
    return str(max(1, round(value)))


def _rejected(delivered: Delivered) -> Response:
    reasons: Any = getattr(delivered, "reasons", None)  # a pipeline that reports reasons: pass them on
    detail = ("the message was rejected whole (quarantined): it must be one push-format message "
              "(docs/push-format.md) of type odds, locked-odds, fixture-status, scores or ping")
    body: dict[str, Any] = {"error": "rejected", "detail": detail}
    if reasons:
        body["reasons"] = list(reasons)
    return JSONResponse(body, status_code=422)


def from_spec(spec: SourceSpec, settings: Settings) -> WebhookSource:
    """The registry's source factory: ``webhook=HOST:PORT,secret=…[,…]``
    (options in the module docstring). Raises ConfigError."""
    return WebhookSource(spec.name, webhook_options(spec))
