"""A webhook provider: signs push-format messages and POSTs them to a URL.

The counterpart of :mod:`feed.sources.webhook`. Messages come from the same
synthetic :class:`~feed.simulator.market_model.MarketModel` projection as
the push simulator (:class:`~feed.simulator.push_providers.PushSimulator`,
used here without its server): first the initial state of every market
(``odds`` / ``locked-odds``), then every change (one message per changed odd
by default), ``fixture-status`` when a fixture moves on. Each message is one
delivery: ``POST <url>`` with

- ``X-Timestamp``: unix seconds when the attempt is sent (re-stamped per attempt);
- ``X-Idempotency-Key``: one key per message, the same on every retry;
- ``X-Signature``: ``<prefix><hex|base64 HMAC-SHA256(secret, "<timestamp>.<body>")>``
  (:func:`feed.sources.webhook.sign`; header names, encoding, prefix and
  whether the timestamp is signed follow :class:`PusherConfig`).

Retries: a connection error, a timeout, or an answer of 408, 429 or 5xx is
retried up to ``max_attempts`` times with full-jitter exponential backoff
(``backoff_initial_s`` … ``backoff_max_s``), waiting at least the answer's
``Retry-After`` (capped at ``retry_after_cap_s``); a 2xx is done; any other
4xx is final (the message is wrong, retrying cannot help) and counted.

Fault switches (shares of the messages, 0…1, drawn from a seeded RNG):

- ``duplicate_share``: the message is delivered again after it was
  acknowledged — alternately with the same idempotency key (a replay: the
  source must answer ``duplicate``) and with a new key (a provider's
  re-delivery: the normaliser must drop it);
- ``reorder_share``: the message is held back and delivered after the next
  ``reorder_distance`` messages (out of order);
- ``bad_signature_share`` / ``expired_share`` / ``oversized_share``: before
  the real delivery, a copy is sent with a corrupted signature / a
  timestamp ``window_s + 60`` s old / a body padded past
  ``oversize_bytes`` (expected answers 401 / 401 / 413: never retried, never
  applied).

Truth: :meth:`WebhookPusher.truth` is the final state of every market as
sent (``{market_id: market_view-shaped dict}``, the shape of
:func:`feed.simulator.push_providers.market_view`); it holds once every
generated message was acknowledged (``PushReport.failed == 0``).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec

from feed.simulator.push_providers import PushSimConfig, PushSimulator
from feed.sources.webhook import sign

__all__ = ["Delivery", "PushReport", "PusherConfig", "WebhookPusher"]

#: answers worth retrying (besides connection errors and timeouts)
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class PusherConfig(msgspec.Struct, kw_only=True, frozen=True):
    """Webhook pusher settings.

    url: where to POST. secret: the shared HMAC key. events / seed /
    time_scale / rate_per_s: the synthetic model (as the push simulator).
    odds_per_message: odds in one message (1 = a delivery per changed odd).
    signature_header / signature_encoding (``hex`` | ``base64``) /
    signature_prefix / timestamp_header (None: none sent) / sign_timestamp /
    nonce_header (None: none sent): what the receiving source expects.
    timestamp_ms: send the timestamp in ms instead of seconds. timeout_s:
    per attempt. max_attempts / backoff_initial_s / backoff_max_s /
    retry_after_cap_s: retries (seconds). Fault shares: see the module
    docstring; window_s: the receiver's window (expired copies are older);
    oversize_bytes: size of an oversized copy.
    """

    url: str
    secret: str
    events: int = 6
    seed: int | None = 1
    time_scale: float = 600.0
    rate_per_s: float = 2000.0
    odds_per_message: int = 1
    signature_header: str = "X-Signature"
    signature_encoding: str = "hex"
    signature_prefix: str = ""
    timestamp_header: str | None = "X-Timestamp"
    sign_timestamp: bool = True
    timestamp_ms: bool = False
    nonce_header: str | None = "X-Idempotency-Key"
    timeout_s: float = 5.0
    max_attempts: int = 8
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 2.0
    retry_after_cap_s: float = 30.0
    duplicate_share: float = 0.0
    reorder_share: float = 0.0
    reorder_distance: int = 3
    bad_signature_share: float = 0.0
    expired_share: float = 0.0
    oversized_share: float = 0.0
    window_s: float = 300.0
    oversize_bytes: int = (1 << 20) + 1


@dataclass
class Delivery:
    """One message to deliver: its body and idempotency key."""

    body: bytes
    key: str
    entry_id: str


@dataclass
class PushReport:
    """What a :meth:`WebhookPusher.push` run did.

    messages: generated messages delivered (each counted once). acknowledged:
    of those, answered 2xx. failed: given up (retries exhausted or a final
    4xx), with ``failures`` (entry id → last status, 0 = connection error).
    attempts: HTTP requests made (retries, duplicates and fault copies
    included). answers: status code → count over all requests.
    duplicates_sent / duplicate_answers: re-deliveries made / answered
    ``"duplicate": true``. reordered: messages delivered late. faults:
    fault copies by kind (``bad_signature``, ``expired``, ``oversized``)
    and fault_answers: (kind, status) → count. retries: attempts after a
    first one.
    """

    messages: int = 0
    acknowledged: int = 0
    failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    attempts: int = 0
    retries: int = 0
    answers: Counter[int] = field(default_factory=Counter)
    duplicates_sent: int = 0
    duplicate_answers: int = 0
    reordered: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    fault_answers: Counter[tuple[str, int]] = field(default_factory=Counter)


class WebhookPusher:
    """Generates, signs and POSTs push-format messages (module docstring).

    ``generate(n)`` builds at least ``n`` messages (the initial state first);
    ``await push(deliveries)`` sends them with the fault switches applied;
    ``truth()`` is the state they convey. ``client``: an httpx client to use
    (None: one per :meth:`push` call).
    """

    def __init__(self, config: PusherConfig, *, client: httpx.AsyncClient | None = None) -> None:
        self.config = cfg = config
        self.sim = PushSimulator(PushSimConfig(events=cfg.events, seed=cfg.seed, time_scale=cfg.time_scale,
                                               rate_per_s=cfg.rate_per_s, odds_per_message=cfg.odds_per_message,
                                               history=1_000_000))
        self.rng = random.Random(cfg.seed)
        self._client = client
        self._secret = cfg.secret.encode()
        self._taken = 0  # history entries already turned into deliveries
        self._initial_sent = False
        self._last_ts = 0

    # -- messages ----------------------------------------------------------------------

    def _initial_state(self) -> None:
        """Queue the initial state of every market as odds / locked-odds messages."""
        sim = self.sim
        size = max(self.config.odds_per_message, 1)
        unlocked: list[dict[str, Any]] = []
        locked: list[dict[str, Any]] = []
        for mid, m in sim.markets.items():
            for sid, odd in m.odds.items():
                (locked if odd.locked else unlocked).append(sim._odd_json(mid, sid, odd))
        ts = self._next_ts()
        for type_, odds in (("odds", unlocked), ("locked-odds", locked)):
            for i in range(0, len(odds), size):
                sim._append(type_, {"data": odds[i:i + size]}, ts)

    def _next_ts(self) -> int:
        """The clock, strictly increasing per tick (provider times must order changes)."""
        self._last_ts = max(now_ms(), self._last_ts + 1)
        return self._last_ts

    def generate(self, n: int, *, updates_per_tick: int = 5) -> list[Delivery]:
        """At least ``n`` new messages (fewer only if the model stops
        changing), the initial state first on the first call. Each model tick
        is ``updates_per_tick`` model updates stamped with a strictly
        increasing provider time (ms, the wall clock or just after)."""
        sim = self.sim
        if not self._initial_sent:
            self._initial_sent = True
            self._initial_state()
        idle = 0
        while len(sim.history) - self._taken < n and idle < 10_000:
            before = len(sim.history)
            ts = self._next_ts()
            sim.model.step(ts, updates_per_tick)
            sim.publish(ts)
            idle = idle + 1 if len(sim.history) == before else 0
        entries = list(sim.history)[self._taken:]
        self._taken = len(sim.history)
        return [Delivery(e.body, uuid.uuid4().hex, e.entry_id or "") for e in entries]

    def truth(self) -> dict[str, Any]:
        """The final state of every market as sent (see the module docstring)."""
        return self.sim.truth()

    # -- sending -------------------------------------------------------------------------

    def headers(self, body: bytes, key: str | None, *, at_ms: int | None = None) -> dict[str, str]:
        """The headers of one attempt (timestamp ``at_ms``, default now)."""
        cfg = self.config
        at = now_ms() if at_ms is None else at_ms
        stamp = None
        out = {"Content-Type": "application/json"}
        if cfg.timestamp_header is not None:
            stamp = str(at) if cfg.timestamp_ms else str(at // 1000)
            out[cfg.timestamp_header] = stamp
        if cfg.nonce_header is not None and key is not None:
            out[cfg.nonce_header] = key
        out[cfg.signature_header] = sign(self._secret, body, stamp if cfg.sign_timestamp else None,
                                         encoding=cfg.signature_encoding, prefix=cfg.signature_prefix)
        return out

    async def _attempt(self, client: httpx.AsyncClient, body: bytes, headers: dict[str, str],
                       report: PushReport) -> tuple[int, dict[str, Any] | None, float | None]:
        """One POST: (status or 0 for a connection error, JSON answer, Retry-After seconds)."""
        report.attempts += 1
        try:
            r = await client.post(self.config.url, content=body, headers=headers, timeout=self.config.timeout_s)
        except httpx.TransportError:
            report.answers[0] += 1
            return 0, None, None
        report.answers[r.status_code] += 1
        answer: dict[str, Any] | None = None
        try:
            data = r.json()
            answer = data if isinstance(data, dict) else None
        except ValueError:
            pass
        retry_after = None
        ra = r.headers.get("retry-after")
        if ra is not None and ra.strip().isdigit():
            retry_after = float(ra)
        return r.status_code, answer, retry_after

    async def deliver(self, client: httpx.AsyncClient, d: Delivery, report: PushReport, *,
                      key: str | None = None) -> tuple[int, dict[str, Any] | None]:
        """Deliver one message with retries; (final status, JSON answer).
        ``key``: the idempotency key (default ``d.key``)."""
        cfg = self.config
        attempt = 0
        delay = cfg.backoff_initial_s
        while True:
            attempt += 1
            if attempt > 1:
                report.retries += 1
            status, answer, retry_after = await self._attempt(client, d.body, self.headers(d.body, key or d.key),
                                                              report)
            if 200 <= status < 300:
                return status, answer
            if status != 0 and status not in RETRY_STATUSES:
                return status, answer
            if attempt >= cfg.max_attempts:
                return status, answer
            wait = self.rng.uniform(0, delay)
            if retry_after is not None:
                wait = max(wait, min(retry_after, cfg.retry_after_cap_s))
            delay = min(delay * 2, cfg.backoff_max_s)
            await asyncio.sleep(wait)

    async def _fault(self, client: httpx.AsyncClient, kind: str, d: Delivery, report: PushReport) -> None:
        """Send one bad copy of ``d`` (never retried)."""
        cfg = self.config
        body = d.body
        key = uuid.uuid4().hex
        if kind == "bad_signature":
            headers = self.headers(body, key)
            sig = headers[cfg.signature_header]
            headers[cfg.signature_header] = sig[:-2] + ("00" if not sig.endswith("00") else "11")
        elif kind == "expired":
            headers = self.headers(body, key, at_ms=now_ms() - int((cfg.window_s + 60) * 1000))
        else:  # oversized
            body = body + b" " * max(0, cfg.oversize_bytes - len(body))
            headers = self.headers(body, key)
        report.faults[kind] += 1
        status, _, _ = await self._attempt(client, body, headers, report)
        report.fault_answers[(kind, status)] += 1

    async def push(self, deliveries: list[Delivery]) -> PushReport:
        """Deliver every message once (plus the fault switches' extra
        requests), one request at a time; returns the report."""
        cfg = self.config
        report = PushReport()
        rng = self.rng
        order: list[tuple[Delivery, bool]] = []  # (delivery, delivered late)
        held: list[tuple[int, Delivery]] = []  # (release after this many more, delivery)
        for d in deliveries:
            if cfg.reorder_share and rng.random() < cfg.reorder_share:
                held.append((cfg.reorder_distance, d))
                continue
            order.append((d, False))
            still: list[tuple[int, Delivery]] = []
            for left, h in held:
                if left <= 1:
                    order.append((h, True))
                else:
                    still.append((left - 1, h))
            held = still
        order.extend((h, True) for _, h in held)
        client = self._client or httpx.AsyncClient()
        try:
            dup_same_key = True
            for d, late in order:
                for kind, share in (("bad_signature", cfg.bad_signature_share), ("expired", cfg.expired_share),
                                    ("oversized", cfg.oversized_share)):
                    if share and rng.random() < share:
                        await self._fault(client, kind, d, report)
                report.messages += 1
                report.reordered += late
                status, _ = await self.deliver(client, d, report)
                if 200 <= status < 300:
                    report.acknowledged += 1
                else:
                    report.failed += 1
                    report.failures[d.entry_id] = status
                    continue
                if cfg.duplicate_share and rng.random() < cfg.duplicate_share:
                    report.duplicates_sent += 1
                    key = d.key if dup_same_key else uuid.uuid4().hex
                    dup_same_key = not dup_same_key
                    _, answer = await self.deliver(client, d, report, key=key)
                    if answer is not None and answer.get("duplicate") is True:
                        report.duplicate_answers += 1
        finally:
            if self._client is None:
                await client.aclose()
        return report
