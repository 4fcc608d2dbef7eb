"""Push-format messages delivered one by one, in any order (webhooks).

A webhook provider POSTs each message of ``docs/push-format.md`` (``odds``,
``locked-odds``, ``fixture-status``, ``scores`` — a fixture's state newer
than the one held wins; ``ping`` is accepted as a keep-alive)
as its own HTTP request. Unlike a stream, deliveries may arrive out of
order (retries, parallel senders) and more than once, and there is no
``seq`` stream to detect gaps. :class:`PushNormaliser` as such does not fit:
it orders messages by ``entry_id`` and drops any entry at or below the last
one applied *whole* (``out_of_order``), so a delivery overtaken by a later
one would be lost, and it takes a fixture's status / ``is_live`` from every
odd, so a late delivery would move a fixture back (``live`` → ``not_started``).

:class:`WebhookNormaliser` wraps a :class:`PushNormaliser` (same decoding,
validation, canonical mapping and per-market cache) and changes only the
ordering rules:

- **no stream order**: each delivery is applied on its own; the newest-wins
  rule is the provider time of each odd (``timestamp``, else the message's
  ``emitted_at``, else the ``<ms>`` of its ``entry_id`` — a provider time, so
  a retried older delivery without times never beats a newer one; never the
  receive time), ties broken by ``entry_id`` — an odd older than the one
  held for its selection is dropped whole (``stale_odd``, PushNormaliser's
  rule), and a market's ``source_ts`` never goes back, so the book never
  refuses a webhook update as out of order;
- **fixture fields newest-wins** (PushNormaliser's rule): a fixture
  remembers the time of the newest odd or ``fixture-status`` whose fields
  it took; the fixture fields (and the odd's ``is_live``) of an older one
  are ignored (``late_fixture_fields``), so a late delivery cannot move a
  fixture back; a ``scores`` item moves the fixture's in-play flag as a
  ``fixture-status`` does (ordered by the time of the flag's last change);
- **exact duplicates**: the ``entry_id`` of the last ``remember`` applied
  deliveries is kept (not of one with a market rejected alone: its fixed
  re-delivery must apply); a delivery whose ``entry_id`` was applied already
  is dropped without effect (``duplicate``, ``batch.stale``). Even without it a
  re-applied body is harmless (the book drops a change that changes nothing);
- **closed markets as images**: a change of a market that is closed
  (``SETTLED`` / ``CLOSED`` / ``CANCELLED`` after the change) is sent as an
  image of it. The book keeps a closed market's prices and drops changes
  without a new header (a Betfair rule), so when a provider sends one odd per
  delivery the results of the runners after the first would be lost (and a
  ``fixture-status`` that overtakes the odds would close the market before
  its results arrive); late *older* odds are dropped here by their time
  first, so an image never carries them;
- **no snapshots**: a ``snapshot`` message is rejected whole
  (``unsupported_type``): its "these are all the selections" meaning cannot
  be honoured out of order (an old snapshot arriving late would replace
  newer selections);
- **confirmation**: every delivery confirms all the source's markets
  (``Ingest.confirm_by_messages``) as of its arrival — or, when it arrives
  more than ``max_stream_lag_ms`` after its provider time, as of that time
  plus the bound. Its provider time (``batch.provider_ts``, ms) is the
  *oldest* credible time it carries: the smaller of ``emitted_at`` and its
  ``entry_id``'s ``<ms>`` (the provider's time of the entry, as above),
  either alone when the other is missing or not credible (absurd, or more
  than ``max_future_skew_ms`` after receipt). So a late retry without
  ``emitted_at``, or one the provider re-stamps with a fresh ``emitted_at``
  on every attempt, still confirms only as of its entry's time + the bound.
  ``odds`` / ``locked-odds`` / ``fixture-status`` / ``scores`` always carry
  an ``entry_id``; a ``ping`` (or ``connected``) carries none: with a
  credible ``emitted_at`` it confirms as of that (a keep-alive of a quiet
  provider), without one its age is unknown and it confirms **nothing**
  (``provider_ts`` :data:`~feed.normalise.push.UNKNOWN_AGE_MS`; counted as a
  heartbeat and in ``late_messages``; the source's ``no_deliveries`` watch,
  which counts arrivals, still sees it). An exact re-delivery (``duplicate``)
  confirms nothing either: it is a retry, and its first copy confirmed as of
  its own time;
- **cursor**: the greatest ``entry_id`` applied (it never goes back); it is
  not used for resuming (a webhook provider re-delivers by itself) but is
  stored with the data, so a restarted pipeline continues the source's
  upstream session.

``entry_id`` stays required on data messages (the push format); ``seq`` is
optional and ignored (PushNormaliser ignores it too: gap detection lives in
the stream consumers, ``feed/sources/push.py``).

Pure: no I/O, no clock reads. Times are integer ms since the Unix epoch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING

import msgspec
import orjson

from feed.errors import FeedDecodeError
from feed.models import CLOSED_STATUSES, Market
from feed.normalise.base import NormalisedBatch
from feed.normalise.push import PREFIX, UNKNOWN_AGE_MS, PushNormaliser, entry_key
from feed.validate import MAX_FUTURE_SKEW_MS

if TYPE_CHECKING:
    from feed.settings import Settings
    from feed.sources.spec import SourceSpec

__all__ = ["WebhookNormaliser", "from_spec"]

class WebhookNormaliser:
    """Feeds push-format webhook deliveries in any order (module docstring).

    source: the source's name. prefix: id namespace (``px`` →
    ``px:<fixture>:<market>``). remember: how many applied ``entry_id`` s
    are kept to drop exact re-deliveries. :attr:`dropped` counts
    ``duplicate`` and PushNormaliser's ``stale_odd`` and
    ``late_fixture_fields``.
    """

    #: provider times of live deliveries (see Normaliser.live_provider_times): a delivery that
    #: arrives late — a provider's retries after we answered 503, a backlog after an outage —
    #: confirms the source's markets as of its provider time + ``max_stream_lag_ms``, not as of its
    #: arrival (newer changes may still be queued behind it); its provider time is the oldest it
    #: carries (module docstring, *confirmation*)
    live_provider_times = True

    def __init__(self, source: str = "webhook", *, prefix: str = PREFIX,
                 max_future_skew_ms: int = MAX_FUTURE_SKEW_MS, remember: int = 65_536) -> None:
        self.source = source
        self.push = PushNormaliser(source, prefix=prefix, max_future_skew_ms=max_future_skew_ms, ordered=False)
        self.remember = remember
        self._applied: OrderedDict[str, None] = OrderedDict()
        self._cursor_key: tuple[int, int] | None = None
        self._dropped: dict[str, int] = {}
        #: changes of closed markets sent as images (see :meth:`_image_closed`)
        self.closed_images = 0

    @property
    def max_future_skew_ms(self) -> int:
        return self.push.max_future_skew_ms

    @max_future_skew_ms.setter
    def max_future_skew_ms(self, value: int) -> None:
        self.push.max_future_skew_ms = value

    @property
    def dropped(self) -> dict[str, int]:
        """What was dropped without being an error, by reason."""
        out = dict(self.push.dropped)
        for k, v in self._dropped.items():
            out[k] = out.get(k, 0) + v
        return out

    def restore(self, markets: Iterable[Market], cursor: str | None) -> None:
        """Seed the cache from the source's stored markets (a later odd of
        one is a delta of it); each fixture's fields count as set at the
        newest ``source_ts`` of its markets (:meth:`PushNormaliser.restore`).
        ``cursor``: the greatest entry id stored (kept as the cursor's floor;
        not used for ordering)."""
        self.push.restore([m for m in markets if m.source == self.source], None)
        if cursor is not None:
            self._cursor_key = entry_key(cursor)

    def feed(self, raw: bytes, recv_ms: int, channel: str = "") -> NormalisedBatch:
        """Decode and apply one delivered message (``channel`` unused).

        Raises :class:`FeedDecodeError` for a message rejected whole
        (PushNormaliser's reasons, and ``unsupported_type`` for a
        ``snapshot``), having applied nothing; markets rejected alone are in
        ``batch.rejected``. A re-delivered ``entry_id`` returns an empty
        batch with ``stale`` set.
        """
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            msg = None  # the push normaliser says why (invalid_json)
        entry_id: str | None = None
        if isinstance(msg, dict):
            kind = msg.get("type")
            if kind == "snapshot":
                raise FeedDecodeError("unsupported_type", "a webhook cannot carry a snapshot (deliveries may "
                                      "arrive out of order): send odds / locked-odds / fixture-status", raw)
            eid = msg.get("entry_id")
            entry_id = eid if isinstance(eid, str) else None
            if entry_id is not None and kind in ("odds", "locked-odds", "fixture-status") \
                    and entry_id in self._applied:
                self._dropped["duplicate"] = self._dropped.get("duplicate", 0) + 1
                # (a retry, late by definition: its first copy confirmed as of its own time)
                return NormalisedBatch(op=str(kind), stale=True, provider_ts=UNKNOWN_AGE_MS)
        batch = self.push.feed(raw, recv_ms)
        batch.cursor = None
        self._image_closed(batch)
        if entry_id is not None and not batch.heartbeat and not batch.rejected:
            # (a message with a market rejected is not remembered: its fixed re-delivery must apply)
            self._applied[entry_id] = None
            if len(self._applied) > self.remember:
                self._applied.popitem(last=False)
            key = entry_key(entry_id)
            if key is not None and (self._cursor_key is None or key > self._cursor_key):
                self._cursor_key = key
                batch.cursor = entry_id
        return batch

    def _image_closed(self, batch: NormalisedBatch) -> None:
        """Send each change of a closed (settled, cancelled) market as an image
        of it: the book keeps a closed market's prices and drops price-only
        changes, which would lose the results of the runners whose odds
        arrive after the first one settled the market (one odd per delivery,
        or a ``fixture-status`` overtaking the odds)."""
        markets = self.push.markets
        updates = batch.updates
        for i, u in enumerate(updates):
            if u.image:
                continue
            m = markets.get(u.market_id)
            if m is None or m.header is None or m.header.status not in CLOSED_STATUSES:
                continue
            updates[i] = msgspec.structs.replace(u, image=True, header=m.header, selections=list(m.sels.values()))
            self.closed_images += 1


def from_spec(spec: SourceSpec, settings: Settings) -> WebhookNormaliser:
    """The registry's normaliser factory for ``webhook`` sources: options
    ``prefix`` (id namespace, default ``px``)."""
    return WebhookNormaliser(spec.name, prefix=spec.get("prefix") or PREFIX,
                             max_future_skew_ms=settings.max_future_skew_ms)
