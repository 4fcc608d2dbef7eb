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
generated message was acknowledged (``PushReport.failed == 0``). With
``truth_log`` every odd made is also appended to that file when it is made
(:mod:`feed.simulator.truth`: ``source`` ``webhook``, ids in the receiving
source's ``prefix``, e.g. ``wh:<fixture>:<market>``).

Live mode (``await start()`` … ``await stop()``; ``oddsfeed simulate
--webhook-url``): every ``tick_ms`` the model's changes become messages
(``model``: a shared :class:`~feed.simulator.market_model.MarketModel`, e.g.
the ESA simulator's, stepped by its owner; else an own one stepped here at
``rate_per_s``), delivered one at a time in the order made, each retried
until acknowledged (``max_attempts``; a final 4xx gives up, counted). Its
fault switches (the control port's target ``webhook``) act on the next
deliveries: :meth:`duplicate` (delivered again after its 2xx, alternately
with the same and a new idempotency key), :meth:`reorder` (held back behind
the next ``distance`` deliveries), :meth:`inject_malformed` (bad bodies of
:data:`feed.simulator.push_providers.MALFORMED`, correctly signed: 422
expected), :meth:`bad_signatures` / :meth:`expired` (copies with a corrupted
signature / an old timestamp: 401), :meth:`stall` (nothing delivered for a
while: the messages pile up and go afterwards), :meth:`poison_timestamps`,
:meth:`freeze`, :meth:`clear_faults`; :meth:`control_stats` is the evidence.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import msgspec

from feed.aio import wait_event
from feed.simulator.push_providers import (
    _CANONICAL_SELECTION,
    MALFORMED,
    PushSimConfig,
    PushSimulator,
)
from feed.simulator.truth import TruthLog, open_truth_log
from feed.sources.webhook import sign

if TYPE_CHECKING:
    from feed.simulator.market_model import MarketModel

logger = logging.getLogger(__name__)

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
    oversize_bytes: size of an oversized copy. history: messages the
    projection keeps (batch mode reads them all: keep it above what one run
    makes). truth_log / prefix: the truth log and the receiving source's id
    prefix (its ``prefix=``). tick_ms: live mode's pump interval.
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
    history: int = 1_000_000
    truth_log: str | None = None
    prefix: str = "px"
    tick_ms: int = 50


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

    def __init__(self, config: PusherConfig, *, client: httpx.AsyncClient | None = None,
                 model: MarketModel | None = None) -> None:
        self.config = cfg = config
        self.sim = PushSimulator(PushSimConfig(events=cfg.events, seed=cfg.seed, time_scale=cfg.time_scale,
                                               rate_per_s=cfg.rate_per_s, odds_per_message=cfg.odds_per_message,
                                               history=cfg.history), model=model)
        self.rng = random.Random(cfg.seed)
        self._client = client
        self._secret = cfg.secret.encode()
        self._taken = 0  # history entries already turned into deliveries
        self._initial_sent = False
        self._last_ts = 0
        # live mode (start/stop)
        self.report = PushReport()
        self.frozen = False
        self.last_status: int | None = None
        self._taken_seq = 0
        self._queue: deque[Delivery] = deque()
        self._held: list[list[Any]] = []  # [deliveries still to pass it, delivery]
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._own_client = False
        self._faults: Counter[str] = Counter()  # switch -> uses left
        self._reorder_distance = cfg.reorder_distance
        self._dup_same_key = True
        self._stalled_until = 0.0
        if cfg.truth_log:
            log = _RenamedTruth(open_truth_log(cfg.truth_log), cfg.prefix)
            self.sim._truth = log  # the projection logs every odd it makes from now on
            base = self.sim._base_ms
            for mid, m in self.sim.markets.items():  # the initial state, made before the log was attached
                for sid, odd in m.odds.items():
                    sel = "SUSPENDED" if odd.locked and odd.status == "active" else _CANONICAL_SELECTION[odd.status]
                    log.record(base, "push", mid, sid, status=m.market_status, sel_status=sel,
                               price=odd.price)
            log.flush()

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

    # -- live mode ---------------------------------------------------------------------

    async def start(self) -> None:
        """Live mode (module docstring): the initial state, then the model's changes every ``tick_ms``."""
        if self._client is None:
            self._client = httpx.AsyncClient()
            self._own_client = True
        if not self._initial_sent:
            self._initial_sent = True
            self._initial_state()
            self._queue.extend(self._take_new())
        self._tasks = [asyncio.create_task(self._ticker(), name="webhook-pusher-ticker"),
                       asyncio.create_task(self._sender(), name="webhook-pusher-sender")]
        logger.info("webhook pusher: POST %s (%d markets)", self.config.url, len(self.sim.markets))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._own_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    def _take_new(self) -> list[Delivery]:
        """The projection's messages made since the last call, oldest first."""
        new = []
        for e in reversed(self.sim.history):
            if e.seq <= self._taken_seq:
                break
            new.append(e)
        if new:
            self._taken_seq = new[0].seq
        return [Delivery(e.body, uuid.uuid4().hex, e.entry_id or "") for e in reversed(new)]

    async def _ticker(self) -> None:
        cfg = self.config
        tick = cfg.tick_ms / 1000
        budget = 0.0
        while True:
            await asyncio.sleep(tick)
            if self.frozen:
                continue
            ts = self._next_ts()
            if self.sim.owns_model:
                budget += cfg.rate_per_s * tick
                n = int(budget)
                budget -= n
                if n:
                    self.sim.model.step(ts, n)
            self.sim.publish(ts)
            new = self._take_new()
            if new:
                self._queue.extend(new)
                self._wake.set()

    async def _sender(self) -> None:
        client = self._client
        assert client is not None
        while True:
            if not self._queue:
                self._wake.clear()
                if not await wait_event(self._wake, 0.5):  # quiet: nothing left to swap a held delivery with
                    for _, h in self._held:
                        await self._send_live(client, h, late=True)
                    self._held.clear()
                continue
            wait = self._stalled_until - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            d = self._queue.popleft()
            if self._faults["reorder"] > 0:
                self._faults["reorder"] -= 1
                self._held.append([self._reorder_distance, d])
                continue
            await self._send_live(client, d, late=False)
            due = []
            for h in self._held:
                h[0] -= 1
                if h[0] <= 0:
                    due.append(h)
            for h in due:
                self._held.remove(h)
                await self._send_live(client, h[1], late=True)

    async def _send_live(self, client: httpx.AsyncClient, d: Delivery, *, late: bool) -> None:
        """One delivery with the fault switches in force (bad copies first, a duplicate after)."""
        report = self.report
        while self._faults["malformed"] > 0:
            self._faults["malformed"] -= 1
            body, _ = MALFORMED[report.faults["malformed"] % len(MALFORMED)]
            report.faults["malformed"] += 1
            status, _, _ = await self._attempt(client, body, self.headers(body, uuid.uuid4().hex), report)
            report.fault_answers[("malformed", status)] += 1
        for kind in ("bad_signature", "expired"):
            if self._faults[kind] > 0:
                self._faults[kind] -= 1
                await self._fault(client, kind, d, report)
        report.messages += 1
        report.reordered += late
        status, _ = await self.deliver(client, d, report)
        self.last_status = status
        if not 200 <= status < 300:
            report.failed += 1
            report.failures[d.entry_id] = status
            logger.warning("webhook pusher: gave up on %s (last answer %d)", d.entry_id, status)
            return
        report.acknowledged += 1
        if self._faults["duplicate"] > 0:
            self._faults["duplicate"] -= 1
            report.duplicates_sent += 1
            key = d.key if self._dup_same_key else uuid.uuid4().hex
            self._dup_same_key = not self._dup_same_key
            _, answer = await self.deliver(client, d, report, key=key)
            if answer is not None and answer.get("duplicate") is True:
                report.duplicate_answers += 1

    # -- live fault switches (the control port's target ``webhook``) -------------------

    def duplicate(self, n: int = 1) -> None:
        """The next ``n`` deliveries are delivered again once acknowledged (same key, new key, …)."""
        self._faults["duplicate"] += n

    def reorder(self, n: int = 1, distance: int | None = None) -> None:
        """The next ``n`` deliveries are each held back behind the next ``distance`` ones."""
        if distance is not None:
            self._reorder_distance = max(1, int(distance))
        self._faults["reorder"] += n

    def inject_malformed(self, n: int = 1) -> None:
        """``n`` bad bodies (push MALFORMED, signed) before the next delivery: 422 expected."""
        self._faults["malformed"] += n

    def bad_signatures(self, n: int = 1) -> None:
        """Before each of the next ``n`` deliveries, a copy with a corrupted signature (401 expected)."""
        self._faults["bad_signature"] += n

    def expired(self, n: int = 1) -> None:
        """Before each of the next ``n`` deliveries, a copy stamped ``window_s + 60`` s ago (401 expected)."""
        self._faults["expired"] += n

    def stall(self, seconds: float) -> None:
        """Deliver nothing for ``seconds`` (the messages made meanwhile pile up and go afterwards)."""
        self._stalled_until = time.monotonic() + seconds

    def poison_timestamps(self, values: list[int]) -> None:
        """The next ``len(values)`` odds messages carry these times (see PushSimulator.poison_timestamps)."""
        self.sim.poison_timestamps(values)

    def freeze(self, on: bool = True) -> None:
        """No new messages while frozen (what is queued is still delivered)."""
        self.frozen = on

    def clear_faults(self) -> None:
        self._faults.clear()
        self._stalled_until = 0.0

    def pending_faults(self) -> int:
        return sum(self._faults.values()) + len(self._held) + (time.monotonic() < self._stalled_until)

    def control_stats(self) -> dict[str, Any]:
        """Counters for a harness (the control port's ``stats``)."""
        r = self.report
        return {"queued": len(self._queue), "held": len(self._held), "messages": r.messages,
                "acknowledged": r.acknowledged, "failed": r.failed, "attempts": r.attempts, "retries": r.retries,
                "answers": {str(k): v for k, v in r.answers.items()}, "duplicates_sent": r.duplicates_sent,
                "duplicate_answers": r.duplicate_answers, "reordered": r.reordered, "faults": dict(r.faults),
                "fault_answers": {f"{k}:{st}": v for (k, st), v in r.fault_answers.items()},
                "last_status": self.last_status, "pending_faults": self.pending_faults()}


class _RenamedTruth(TruthLog):
    """A truth log writer that logs the push projection's ``px:`` ids under another prefix."""

    def __init__(self, inner: TruthLog, prefix: str) -> None:
        self._inner = inner
        self.path = inner.path
        self.records = 0
        self._px = "px:"
        self._to = f"{prefix}:"

    def record(self, t_ms: int, source: str, market_id: str, selection_id: str | None, *, status: str | None,
               sel_status: str | None = None, back: float | None = None, lay: float | None = None,
               price: float | None = None) -> None:
        if market_id.startswith(self._px):
            market_id = self._to + market_id[len(self._px):]
        self.records += 1
        self._inner.record(t_ms, "webhook", market_id, selection_id, status=status, sel_status=sel_status,
                           back=back, lay=lay, price=price)

    def flush(self) -> None:
        self._inner.flush()

    def close(self) -> None:
        self._inner.flush()
