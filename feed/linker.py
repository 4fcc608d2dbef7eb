"""The linker: runs the event matcher (:mod:`feed.matching`) against the
event records the ingest registers in Redis, and stores the links so every
API node serves the same canonical ids.

One linker writes at a time: each ingest process (``oddsfeed ingest``,
``oddsfeed run``) runs a :class:`Linker`, and the one holding the Redis
lease (renewed every step, ``lease_ms`` long) links; the others wait to
take over. A new leader starts from the stored links (canonical ids stay
as they were) and links only what is new or changed — changed also since
the previous leader's last step: the links are stored with the fingerprint
(:func:`record_fingerprint`) of the record each was scored on (in its
canonical summary's ``scored``, written in the same transaction), and a
member whose record no longer has it (or whose link was stored without one)
is scored again as a live change is (:meth:`feed.matching.Matcher.restore`).

Each step (every ``interval_s``):

1. reload ``mappings.yaml`` when its modification time changed — a file
   that does not parse keeps the previous overrides and logs why; changed
   overrides re-link every event from scratch (first seen first);
2. when the events version moved, link the new and changed records;
3. when any link or canonical summary changed, rewrite them all at once
   (:meth:`feed.store.Store.save_links`, which bumps the links version the
   API nodes watch).

Canonical summary JSON (``of:{links}:canon``): ``{"event_id": "ev:…",
"sport", "name", "home", "away", "competition", "start_time" (ms),
"venue", "country", "members": [record ids], "confidence": lowest link
confidence of a member, "scored": {record id: fingerprint of the record its
link was scored on}}`` (``scored`` is the linker's own: the API nodes do not
read it).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path

import msgspec

from feed.aio import wait_event
from feed.errors import ConfigError, StoreError
from feed.matching import CanonicalEvent, EventRecord, Link, Matcher, Overrides, participants, record_id
from feed.models import Delta, Market
from feed.store import Store, StoredLink

logger = logging.getLogger(__name__)

__all__ = ["CanonicalSummary", "EventRegistrar", "Linker", "StoredSummary", "load_overrides", "record_fingerprint"]

_RECORD_DECODER = msgspec.json.Decoder(EventRecord)


class CanonicalSummary(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the API serves of one canonical event (see the module docstring)."""

    event_id: str
    sport: str | None = None
    name: str | None = None
    home: str | None = None
    away: str | None = None
    competition: str | None = None
    start_time: int | None = None
    venue: str | None = None
    country: str | None = None
    members: list[str] = []
    confidence: float = 1.0


class StoredSummary(CanonicalSummary, kw_only=True, omit_defaults=True):
    """A canonical summary as the linker stores it: the served fields and
    ``scored``, member record id → :func:`record_fingerprint` of the record
    its link was scored on (a member missing from it: unknown, scored again
    by the next leader). :data:`SUMMARY_DECODER` ignores ``scored``."""

    scored: dict[str, str] = {}


SUMMARY_DECODER = msgspec.json.Decoder(CanonicalSummary)
_STORED_DECODER = msgspec.json.Decoder(StoredSummary)
_ENCODER = msgspec.json.Encoder()


def record_fingerprint(rec: EventRecord) -> str:
    """A compact digest of every field of an event record: 16 hex digits
    (64-bit BLAKE2b of its msgspec JSON). Equal records give equal
    fingerprints; any change of a field (names, sides, start time, sport,
    competition …) gives another (but for a 2**-64 collision)."""
    return hashlib.blake2b(_ENCODER.encode(rec), digest_size=8).hexdigest()


def _scored_on(links: Mapping[str, StoredLink], canon: Mapping[str, bytes]) -> dict[str, str]:
    """What stored links were scored on, from the stored canonical summaries
    (:meth:`feed.store.Store.load_links`): record id → fingerprint, for each
    link whose canonical event's summary lists it in ``scored`` (a summary
    that does not decode, or a link stored without one: left out)."""
    out: dict[str, str] = {}
    for cid, raw in canon.items():
        try:
            fps = _STORED_DECODER.decode(raw).scored
        except msgspec.MsgspecError:
            continue
        for rid, fp in fps.items():
            link = links.get(rid)
            if link is not None and link.c == cid:
                out[rid] = fp
    return out


class EventRegistrar:
    """The ingest side: turns stored markets' event fields into event
    records (:class:`feed.matching.EventRecord`, one per event, per race
    for racing) and registers the new and changed ones in Redis for the
    linker. ``source``: the source name."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.known: dict[str, bytes] = {}
        self.pending: dict[str, bytes] = {}
        # flushes never overlap: one that fails puts its records back, and one that wrote newer
        # records of the same events meanwhile would be undone by them
        self._lock = asyncio.Lock()

    def note(self, deltas: Iterable[Delta], markets: Mapping[str, Market]) -> None:
        """Look at the markets whose header a batch of deltas set or changed."""
        for d in deltas:
            if d.kind != "image" and d.header is None:
                continue
            m = markets.get(d.market_id)
            if m is None or m.event_id is None:
                continue
            rid = record_id(m.event_id, m.sport, m.start_time)
            rec = EventRecord(event_id=rid, source=self.source, sport=m.sport, start_time=m.start_time,
                              name=m.event_name, competition=m.competition, venue=m.venue, country=m.country_code)
            raw = _ENCODER.encode(rec)
            if self.known.get(rid) != raw:
                self.known[rid] = raw
                self.pending[rid] = raw

    async def flush(self, store: Store, now_ms: int) -> None:
        """Register what changed (kept for the next call when Redis fails:
        raises StoreError). Calls never overlap (a second waits for the first)."""
        if not self.pending:
            return
        async with self._lock:
            if not self.pending:
                return
            pending, self.pending = self.pending, {}
            try:
                await store.register_events(pending, now_ms)
            except StoreError:
                pending.update(self.pending)  # (newer records noted meanwhile win)
                self.pending = pending
                raise


def load_overrides(path: Path) -> Overrides:
    """Read ``mappings.yaml`` (YAML, see :class:`feed.matching.Overrides`).
    Raises ConfigError saying what to fix."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return Overrides.from_data(data, str(path))


def summary_of(ev: CanonicalEvent, matcher: Matcher) -> CanonicalSummary:
    """The served summary of a canonical event: its anchor's description,
    with the first member's home/away as the sides (and gaps filled from
    the other members)."""
    members = [matcher.records[m] for m in ev.members]
    anchor = ev.anchor
    sides = participants(anchor)
    home, away = sides if sides is not None else (None, None)

    def first(attr: str) -> str | None:
        v = getattr(anchor, attr)
        if v:
            return str(v)
        return next((str(getattr(r, attr)) for r in members if getattr(r, attr)), None)

    starts = [r.start_time for r in members if r.start_time is not None]
    return CanonicalSummary(
        event_id=ev.canonical_id, sport=first("sport"), name=anchor.name or first("name"), home=home, away=away,
        competition=first("competition"), start_time=anchor.start_time if anchor.start_time is not None
        else (min(starts) if starts else None), venue=first("venue"), country=first("country"),
        members=list(ev.members),
        confidence=min((matcher.links[m].confidence for m in ev.members), default=1.0))


class Linker:
    """Links event records to canonical events under a Redis lease (see the module docstring).

    mappings: path of ``mappings.yaml`` (None: no overrides); interval_s:
    step period; lease_ms: how long a leader's lease lasts unrenewed.
    Raises ConfigError from :meth:`start` when ``mappings`` is given but
    does not load.
    """

    def __init__(self, store: Store, *, mappings: Path | None = None, interval_s: float = 1.0,
                 lease_ms: int = 5000, tolerance_ms: int | None = None) -> None:
        self.store = store
        self.mappings = mappings
        self.interval_s = interval_s
        self.lease_ms = lease_ms
        self.tolerance_ms = tolerance_ms
        self.owner = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.overrides = Overrides()
        self.matcher = self._matcher()
        self.leader = False
        self.steps = 0
        self.reloads = 0
        self.last_error: str | None = None
        self._mtime: float | None = None
        self._events_ver = -1
        self._saved: tuple[dict[str, StoredLink], dict[str, bytes]] | None = None
        self._seeded = False
        self._stop = asyncio.Event()

    def _matcher(self) -> Matcher:
        if self.tolerance_ms is None:
            return Matcher(self.overrides)
        return Matcher(self.overrides, tolerance_ms=self.tolerance_ms)

    def start(self) -> None:
        """Load the overrides once (a bad file at start is a ConfigError)."""
        if self.mappings is not None:
            self.overrides = load_overrides(self.mappings)
            self._mtime = self._stat()
            self.matcher = self._matcher()

    def stop(self) -> None:
        self._stop.set()

    def _stat(self) -> float | None:
        try:
            return self.mappings.stat().st_mtime if self.mappings is not None else None
        except OSError:
            return None

    async def run(self) -> None:
        """Step until :meth:`stop`; Redis failures (and any other error of a step) are logged
        and retried every ``interval_s``: never raises."""
        while not self._stop.is_set():
            try:
                await self.step()
                self.last_error = None
            except StoreError as exc:
                if self.last_error != str(exc):
                    logger.warning("linker: %s; retrying", exc)
                self.last_error = str(exc)
            except Exception as exc:  # a bug (or a provider's record nobody foresaw) must not end the ingest
                logger.exception("linker: a step failed; retrying")
                self.last_error = f"internal error: {type(exc).__name__}: {exc}"
            await wait_event(self._stop, self.interval_s)

    async def step(self) -> bool:
        """One step (see the module docstring); True when links were written."""
        self.steps += 1
        if not await self.store.take_lease(self.owner, self.lease_ms):
            if self.leader:
                logger.info("linker: another process holds the lease now")
            self.leader = False
            self._seeded = False
            return False
        if not self.leader:
            logger.info("linker: linking events (lease %s)", self.owner)
            self.leader = True
        relink = self._reload_overrides()
        ver = await self.store.events_version()
        if ver == self._events_ver and not relink and self._seeded:
            return False
        rows = await self.store.load_events()
        records = []
        for _, rid, raw in rows:
            try:
                records.append(_RECORD_DECODER.decode(raw))
            except msgspec.MsgspecError:
                logger.warning("linker: unreadable event record %s skipped", rid)
        if relink:
            self.matcher = self._matcher()
            self.matcher.link_all(records)
        elif not self._seeded:
            _, stored, canon = await self.store.load_links()
            scored = _scored_on(stored, canon)
            changed = {r.event_id for r in records
                       if r.event_id in stored and scored.get(r.event_id) != record_fingerprint(r)}
            self.matcher = self._matcher()
            again = self.matcher.restore(records, {k: Link(v.c, v.p, v.m, v.r) for k, v in stored.items()},
                                         changed=changed)
            if again:
                logger.info("linker: %d linked records changed since their links were scored (or were stored "
                            "without saying): scored again", len(again))
            self.matcher.link_all(records)
        else:
            self.matcher.link_all(records)
        self._seeded = True
        self._events_ver = ver
        return await self._save()

    def _reload_overrides(self) -> bool:
        if self.mappings is None:
            return False
        mtime = self._stat()
        if mtime == self._mtime:
            return False
        self._mtime = mtime
        try:
            new = load_overrides(self.mappings)
        except ConfigError as exc:
            logger.error("linker: %s; keeping the previous overrides", exc)
            return False
        changed = new.fingerprint() != self.overrides.fingerprint()
        self.overrides = new
        if changed:
            self.reloads += 1
            logger.info("linker: %s changed; re-linking every event", self.mappings)
        return changed

    async def _save(self) -> bool:
        m = self.matcher
        links = {rid: StoredLink(l.canonical_id, l.confidence, l.method, l.reversed) for rid, l in m.links.items()}
        canon = {cid: _ENCODER.encode(StoredSummary(
            **msgspec.structs.asdict(summary_of(ev, m)),
            scored={rid: record_fingerprint(m.records[rid]) for rid in ev.members})) for cid, ev in m.events.items()}
        if self._saved is not None and self._saved == (links, canon):
            return False
        if await self.store.save_links(links, canon, owner=self.owner) < 0:
            # the lease ran out during this step (a stall longer than lease_ms) and another linker
            # may lead now: writing would overwrite its links with this step's older view
            logger.warning("linker: the lease ran out during a step; its links were not written")
            self.leader = False
            self._seeded = False
            self._saved = None
            return False
        self._saved = (links, canon)
        return True
