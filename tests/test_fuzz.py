"""Property-based fuzzing of every normaliser and of the book (issue 8, "Trust under faults").

Normalisers (Betfair ESA, Pinnacle, The Odds API, push): each example takes a
provider's real message sequence — the fixtures in ``tests/fixtures/*``, the
built-in Betfair lines below and, for :func:`test_fuzz_betfair_recordings`,
lines of the shared recordings in ``../shared/data/betfair-stream`` — mutates
one or two of its messages (numbers replaced by edge values such as 0, −0.0,
−1, 1.0, 1.001, 1.0099, 1000.01, 1e308, 2**63, huge integers, ``NaN`` /
``Infinity`` / ``1e400`` as raw text; values of another type; dropped keys;
duplicated list items — markets, runners, odds —; deep nesting; truncated,
flipped or BOM-prefixed bytes) and feeds the sequence through
``normaliser.feed`` and every returned update through
:func:`feed.validate.validate_update`. Asserted:

- nothing but :class:`~feed.errors.FeedDecodeError` ever escapes a normaliser
  (or the validator);
- every accepted update satisfies the invariants checked by
  :func:`check_invariants` — written here, independently of
  ``feed/validate.py``: prices finite and 1.01–1000, sizes finite and ≥ 0,
  integers within 0..2**53−1, times plausible, statuses known …;
- the validator never rejects what a normaliser returned: the normalisers
  check the same bounds before they absorb a change into their caches, so a
  market the ingest would quarantine never leaves a normaliser's cache ahead
  of the book.

The book (``feed/book.py``, pure): random sequences of images, deltas,
duplicates and out-of-order updates → ``seq`` strictly increasing per market,
a delta never creates a market, and replaying the emitted deltas with
``feed.models.apply_delta`` gives the book's own state.

Bounded and deterministic for CI (``derandomize=True``, a few hundred
examples per normaliser). ``python benchmarks/fuzz.py --examples 10000`` runs
the same strategies at length and prints a table.
"""

from __future__ import annotations

import bz2
import copy
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feed.book import Book
from feed.errors import FeedDecodeError
from feed.models import Delta, Market, MarketHeader, Selection, apply_delta
from feed.normalise.base import MarketUpdate
from feed.normalise.betfair import BetfairNormaliser
from feed.normalise.pinnacle import PinnacleNormaliser
from feed.normalise.pinnacle import channel as pinnacle_channel
from feed.normalise.push import PushNormaliser
from feed.normalise.theoddsapi import TheOddsApiNormaliser
from feed.validate import validate_update

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_BETFAIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "betfair-stream"

#: examples per normaliser in CI (the whole module stays well under 60 s on a loaded 2-core machine)
CI_EXAMPLES = 250

# --- invariants, stated here independently of feed/validate.py ---------------------------------------------

_YEAR_2100_MS = 4_102_444_800_000  # 2100-01-01T00:00:00Z
_SAFE_INT = 9_007_199_254_740_991  # 2**53 - 1
_SKEW_MS = 30_000  # the normalisers' and the validator's default future-skew bound
_MARKET_STATUSES = {"OPEN", "SUSPENDED", "INACTIVE", "CLOSED", "SETTLED", "CANCELLED"}
_SELECTION_STATUSES = {"ACTIVE", "SUSPENDED", "REMOVED", "WINNER", "LOSER", "PLACED", "VOID", "HIDDEN"}


def _is_number(x: object) -> bool:
    return (type(x) is float or type(x) is int) and math.isfinite(x)  # type: ignore[arg-type, unused-ignore]


def _price_ok(x: object) -> bool:
    return _is_number(x) and 1.01 <= x <= 1000  # type: ignore[operator]


def _size_ok(x: object) -> bool:
    return _is_number(x) and x >= 0  # type: ignore[operator]


def _count_ok(x: object) -> bool:
    return type(x) is int and 0 <= x <= _SAFE_INT


def check_invariants(u: MarketUpdate, recv_ms: int) -> list[str]:
    """What an accepted update must satisfy; the list of violations (empty when fine)."""
    bad: list[str] = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            bad.append(f"{u.market_id}: {what}")

    need(isinstance(u.market_id, str) and 0 < len(u.market_id) <= 1000, "market id")
    need(type(u.source_ts) is int and 0 < u.source_ts <= _YEAR_2100_MS and u.source_ts <= recv_ms + _SKEW_MS,
         f"source_ts {u.source_ts!r} (received {recv_ms})")
    need(u.source_ts_original is None or type(u.source_ts_original) is int and 0 < u.source_ts_original <= _YEAR_2100_MS,
         f"source_ts_original {u.source_ts_original!r}")
    need(u.traded_volume is None or _size_ok(u.traded_volume), f"traded_volume {u.traded_volume!r}")
    need(not u.image or u.header is not None, "an image without a header")
    h = u.header
    if h is not None:
        need(_count_ok(h.version), f"version {h.version!r}")
        need(_count_ok(h.bet_delay_s), f"bet_delay_s {h.bet_delay_s!r}")
        need(h.number_of_winners is None or _count_ok(h.number_of_winners), f"number_of_winners {h.number_of_winners!r}")
        need(h.start_time is None or type(h.start_time) is int and 0 <= h.start_time <= _YEAR_2100_MS,
             f"start_time {h.start_time!r}")
        need(h.traded_volume is None or _size_ok(h.traded_volume), f"header traded_volume {h.traded_volume!r}")
        need(h.status in _MARKET_STATUSES, f"status {h.status!r}")
        need(type(h.in_play) is bool, f"in_play {h.in_play!r}")
    ids = [s.selection_id for s in u.selections]
    need(len(set(ids)) == len(ids), f"selection ids repeated {ids}")
    for s in u.selections:
        need(isinstance(s.selection_id, str) and s.selection_id != "", "selection id")
        need(s.price is None or _price_ok(s.price), f"{s.selection_id} price {s.price!r}")
        for side in (s.back, s.lay):
            for level in side:
                need(len(level) == 2 and _price_ok(level[0]) and _size_ok(level[1]), f"{s.selection_id} level {level!r}")
        need(s.ltp is None or _price_ok(s.ltp), f"{s.selection_id} ltp {s.ltp!r}")
        need(s.bsp is None or _price_ok(s.bsp), f"{s.selection_id} bsp {s.bsp!r}")
        need(s.traded_volume is None or _size_ok(s.traded_volume), f"{s.selection_id} traded_volume {s.traded_volume!r}")
        need(s.max_stake is None or _size_ok(s.max_stake), f"{s.selection_id} max_stake {s.max_stake!r}")
        need(s.sort_priority is None or _count_ok(s.sort_priority), f"{s.selection_id} sort_priority {s.sort_priority!r}")
        need(s.adjustment_factor is None or _is_number(s.adjustment_factor) and 0 <= s.adjustment_factor <= 100,
             f"{s.selection_id} adjustment_factor {s.adjustment_factor!r}")
        need(_is_number(s.handicap) and abs(s.handicap) <= 1000, f"{s.selection_id} handicap {s.handicap!r}")
        need(s.status in _SELECTION_STATUSES, f"{s.selection_id} status {s.status!r}")
    try:  # the wire format can carry it (no NaN turned into null, no unencodable value)
        again = msgspec.json.decode(msgspec.json.encode(u), type=MarketUpdate)
        need(again == u, "does not survive a JSON round trip")
    except (msgspec.EncodeError, msgspec.ValidationError, msgspec.DecodeError, TypeError, ValueError) as exc:
        bad.append(f"{u.market_id}: not encodable: {exc}")
    return bad


# --- seeds: real messages per provider -------------------------------------------------------------------


@dataclass(frozen=True)
class Seed:
    """One provider message with its receive time and what the poller would
    have told the normaliser first (Pinnacle ``expect(endpoint, snapshot)``,
    Odds API ``expect(sport_key)``)."""

    raw: bytes
    recv_ms: int
    expect: tuple[Any, ...] | None = None


@dataclass(frozen=True)
class Target:
    """A normaliser under test: how to make one and the message sequence fed to it."""

    name: str
    make: Callable[[], Any]
    seeds: tuple[Seed, ...]


_BF_NOW = 1_700_000_000_000


def _enc(obj: Any) -> bytes:
    return msgspec.json.encode(obj)


def _md(status: str = "OPEN", version: int = 1, **extra: Any) -> dict[str, Any]:
    md: dict[str, Any] = {
        "status": status, "inPlay": False, "betDelay": 0, "version": version, "eventId": "3000", "eventTypeId": "1",
        "marketType": "OVER_UNDER_25", "marketTime": "2023-11-14T23:00:00.000Z", "numberOfWinners": 1,
        "bettingType": "ODDS", "name": "Over/Under 2.5", "eventName": "A v B",
        "runners": [{"id": 11, "sortPriority": 1, "status": "ACTIVE", "adjustmentFactor": 50.0},
                    {"id": 12, "sortPriority": 2, "status": "ACTIVE", "adjustmentFactor": 50.0, "bsp": "NaN"},
                    {"id": 13, "hc": -0.25, "sortPriority": 3, "status": "ACTIVE"}]}
    md.update(extra)
    return md


def betfair_samples() -> tuple[Seed, ...]:
    """Built-in ESA lines covering both layouts, images, deltas, level and
    price ladders, traded ladders, definitions, catalogues, BSP, settlement."""
    t = _BF_NOW
    lines: list[dict[str, Any]] = [
        {"op": "connection", "connectionId": "002-1"},
        {"op": "mcm", "id": 2, "initialClk": "AAA", "clk": "AAB", "ct": "SUB_IMAGE", "pt": t, "heartbeatMs": 5000,
         "conflateMs": 0, "mc": [
             {"id": "1.10", "img": True, "tv": 1500.5, "marketDefinition": _md(), "rc": [
                 {"id": 11, "atb": [[2.0, 10], [1.99, 5.5]], "atl": [[2.02, 7]], "trd": [[2.0, 100]], "ltp": 2.0,
                  "tv": 100},
                 {"id": 12, "atb": [[3.5, 3]], "atl": [[3.6, 8], [3.7, 1]], "ltp": 3.55},
                 {"id": 13, "hc": -0.25, "atb": [[1.9, 2]]}]},
             {"id": "1.11", "img": True, "marketDefinition": _md(marketType="MATCH_ODDS"), "rc": [
                 {"id": 11, "batb": [[0, 1.5, 20], [1, 1.49, 3]], "batl": [[0, 1.52, 4]]},
                 {"id": 12, "batb": [[0, 4.0, 2]]}]}]},
        {"op": "mcm", "id": 2, "clk": "AAC", "pt": t + 100, "mc": [
            {"id": "1.10", "tv": 1600.0, "rc": [{"id": 11, "atb": [[2.0, 0], [2.02, 4]], "atl": [[2.04, 3]],
                                                 "trd": [[2.02, 50]], "ltp": 2.02, "tv": 150}]}]},
        {"op": "mcm", "id": 2, "clk": "AAD", "pt": t + 200, "mc": [
            {"id": "1.11", "rc": [{"id": 11, "batb": [[0, 1.51, 21], [1, 0, 0]]}, {"id": 12, "batl": [[0, 0, 0]]}]}]},
        {"op": "mcm", "id": 2, "clk": "AAE", "pt": t + 300, "mc": [
            {"id": "1.10", "marketDefinition": _md(status="SUSPENDED", version=2, inPlay=True, betDelay=5,
                                                   suspendReason="goal")}]},
        {"op": "mcm", "id": 2, "clk": "AAF", "ct": "RESUB_DELTA", "pt": t + 400, "mc": [
            {"id": "1.12", "marketDefinition": _md(marketType="WIN", numberOfWinners=3), "rc": [
                {"id": 11, "bdatb": [[0, 5.0, 3], [1, 4.9, 2]], "bdatl": [[0, 5.2, 1]]}]},
            {"id": "1.10", "rc": [{"id": 12, "spn": "Infinity", "spf": 3.4, "atl": [[3.6, 0]]}]}]},
        {"op": "mcm", "id": 2, "clk": "AAG", "ct": "HEARTBEAT", "pt": t + 500},
        {"op": "marketCatalogue", "marketId": "1.10", "marketName": "Over/Under 2.5 Goals",
         "event": {"id": "3000", "name": "A v B"}, "competition": {"id": "1", "name": "League"},
         "runners": [{"selectionId": 11, "runnerName": "Under 2.5 Goals", "handicap": 0},
                     {"selectionId": 12, "runnerName": "Over 2.5 Goals", "handicap": 0}]},
        {"op": "mcm", "id": 2, "clk": "AAH", "pt": t + 600, "mc": [
            {"id": "1.10", "con": True, "rc": [{"id": 11, "atb": [[2.1, 9]], "ltp": 2.1}]},
            {"id": "1.11", "rc": [{"id": 12, "batb": [[0, 4.1, 2.5]]}]}]},
        {"op": "mcm", "id": 2, "clk": "AAI", "pt": t + 700, "mc": [
            {"id": "1.10", "marketDefinition": _md(status="CLOSED", version=3, runners=[
                {"id": 11, "status": "WINNER", "bsp": 2.1, "sortPriority": 1},
                {"id": 12, "status": "LOSER", "bsp": 3.4, "sortPriority": 2},
                {"id": 13, "hc": -0.25, "status": "REMOVED_VACANT", "sortPriority": 3}])}]},
        {"op": "mcm", "id": 2, "status": 503, "pt": t + 800, "ct": "HEARTBEAT"},
    ]
    return tuple(Seed(_enc(line), t + 800 + i) for i, line in enumerate(lines))


def _read_lines(path: Path) -> list[bytes]:
    data = bz2.decompress(path.read_bytes()) if path.suffix == ".bz2" else path.read_bytes()
    return [line for line in data.splitlines() if line.strip()]


def _pt_of(raw: bytes) -> int | None:
    try:
        pt = msgspec.json.decode(raw, type=dict).get("pt")
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
        return None
    return pt if type(pt) is int else None


#: recordings (and how many of their first lines) used by the recording fuzz
_RECORDINGS = (("fixtures/streaming_mcm_SUB_IMAGE.json", 1), ("fixtures/streaming_mcm_RESUB_DELTA.json", 1),
               ("fixtures/streaming_mcm_UPDATE_md.json", 1), ("flumine/1.197931750", 30),
               ("betfair_parser/1.164917629.bz2", 30), ("nautilus_trader/1-206064380.bz2", 30))


def betfair_recorded() -> tuple[Seed, ...] | None:
    """Lines of the shared recordings (None when ``../shared/data`` is absent);
    each received 500 ms after its own ``pt``."""
    if not SHARED_BETFAIR.is_dir():
        return None
    seeds: list[Seed] = []
    for name, n in _RECORDINGS:
        path = SHARED_BETFAIR / name
        if not path.is_file():
            continue
        last = _BF_NOW
        for raw in _read_lines(path)[:n]:
            pt = _pt_of(raw)
            last = pt if pt is not None else last
            seeds.append(Seed(raw, last + 500))
    return tuple(seeds) or None


def pinnacle_seeds() -> tuple[Seed, ...]:
    steps = msgspec.json.decode((FIXTURES / "pinnacle" / "soccer_match.expected.json").read_bytes())["steps"]
    seeds = [Seed((FIXTURES / "pinnacle" / s["body"]).read_bytes(), s["recv_ms"], (s["endpoint"], s["snapshot"]))
             for s in steps]
    seeds.append(Seed((FIXTURES / "pinnacle" / "american_fixtures.json").read_bytes(), 1755353500000, None))
    return tuple(seeds)


def theoddsapi_seeds() -> tuple[Seed, ...]:
    steps = msgspec.json.decode((FIXTURES / "theoddsapi" / "epl.expected.json").read_bytes())["steps"]
    return tuple(Seed((FIXTURES / "theoddsapi" / s["body"]).read_bytes(), s["recv_ms"], ("soccer_epl",)) for s in steps)


def push_seeds() -> tuple[Seed, ...]:
    out: list[Seed] = []
    for name in ("soccer_lifecycle", "racing_formats"):
        out += [Seed(line, 1718000099999) for line in (FIXTURES / "push" / f"{name}.ndjson").read_bytes().splitlines()
                if line.strip()]
    return tuple(out)


def _pinnacle() -> PinnacleNormaliser:
    return PinnacleNormaliser("pinnacle")


def _theoddsapi() -> TheOddsApiNormaliser:
    return TheOddsApiNormaliser("theoddsapi")


TARGETS: dict[str, Target] = {
    "betfair": Target("betfair", BetfairNormaliser, betfair_samples()),
    "pinnacle": Target("pinnacle", _pinnacle, pinnacle_seeds()),
    "theoddsapi": Target("theoddsapi", _theoddsapi, theoddsapi_seeds()),
    "push": Target("push", lambda: PushNormaliser("push"), push_seeds()),
}


def betfair_recordings_target() -> Target | None:
    seeds = betfair_recorded()
    return None if seeds is None else Target("betfair-recorded", BetfairNormaliser, seeds)


# --- mutations --------------------------------------------------------------------------------------------

#: numbers put in place of a number
EDGE_NUMBERS: tuple[Any, ...] = (0, -0.0, -1, 1, 1.0, 1.001, 1.0099, 1.01, 1000, 1000.01, 1e308, -1e308, 2**53,
                                 2**53 - 1, 2**63, 2**64, -2**31, 10**30, 0.5, 1e-300, 4_102_444_800_001,
                                 1_700_000_030_001, -5)
#: raw JSON text put in place of a value (what msgspec would not write)
RAW_TEXT: tuple[bytes, ...] = (b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"1" * 40, b"-0",
                               b'"\\ud800"', b'"\\u0000"', b"2.5e", b"[]]", b'"\\u202e"')
#: values of other types put in place of a value (the lists and dicts here are templates: ``mutated``
#: puts a deep copy in the tree, never the object itself — see ``_paths``)
ODD_VALUES: tuple[Any, ...] = ("", "x", "NaN", "Infinity", "2.5", "-1", "1e308", "0/1", "1/101", "5/2", "evs",
                               "9999-12-31T23:59:59Z", "1969-12-31T23:59:59Z", "2023-11-14T23:00:00Z",
                               "x" * 300, "\u202eevil", None, True, False, [], {}, [1, 2], {"id": 1})
_NEST_DEPTHS = (3, 60, 5000)
_PLACEHOLDER = "\u0000fuzz{}\u0000"

Path_ = tuple[Any, ...]


def _paths(node: Any, path: Path_ = ()) -> list[Path_]:
    """Every path below the root (dict keys / list indexes).

    ``node`` must be a tree — every list and dict in it reached once. A mutation
    that put a shared object in it (``ODD_VALUES``' own ``[1, 2]`` or ``{"id": 1}``)
    let later mutations edit that object in place, so it carried over to later
    examples and could come to contain itself; this walk then never ended,
    each path one key longer than the last (the 24 GB benchmark run). Any such
    aliasing now fails at once."""
    out: list[Path_] = []
    seen: set[int] = set()
    stack = [(node, path)]
    while stack:
        n, p = stack.pop()
        if isinstance(n, (dict, list)):
            assert id(n) not in seen, f"not a tree: the node at {p} is reached twice (a shared or cyclic value)"
            seen.add(id(n))
        if isinstance(n, dict):
            for k, v in n.items():
                out.append((*p, k))
                stack.append((v, (*p, k)))
        elif isinstance(n, list):
            for i, v in enumerate(n):
                out.append((*p, i))
                stack.append((v, (*p, i)))
    return out


def _get(node: Any, path: Path_) -> Any:
    for k in path:
        node = node[k]
    return node


def _set(node: Any, path: Path_, value: Any) -> None:
    _get(node, path[:-1])[path[-1]] = value


@dataclass
class Mutated:
    raw: bytes
    ops: list[str] = field(default_factory=list)


@st.composite
def mutated(draw: st.DrawFn, raw: bytes) -> Mutated:
    """``raw`` with 1–3 structural mutations and maybe a byte-level one."""
    ops: list[str] = []
    try:
        tree = msgspec.json.decode(raw)
    except (msgspec.DecodeError, ValueError):
        tree = None
    raw_subs: dict[str, bytes] = {}
    if tree is not None and isinstance(tree, (dict, list)):
        for _ in range(draw(st.integers(1, 3))):
            paths = _paths(tree)
            if not paths:
                break
            path = paths[draw(st.integers(0, len(paths) - 1))]
            value = _get(tree, path)
            kind = draw(st.sampled_from(("number", "number", "raw", "type", "drop", "duplicate", "nest", "reverse")))
            if kind == "number":
                numbers = [p for p in paths if type(_get(tree, p)) in (int, float)]
                if numbers:
                    path = numbers[draw(st.integers(0, len(numbers) - 1))]
                    new = draw(st.sampled_from(EDGE_NUMBERS))
                    _set(tree, path, new)
                    ops.append(f"number {path}={new!r}")
            elif kind == "raw":
                token = _PLACEHOLDER.format(len(raw_subs))
                raw_subs[token] = draw(st.sampled_from(RAW_TEXT))
                _set(tree, path, token)
                ops.append(f"raw {path}={raw_subs[token]!r}")
            elif kind == "type":
                new = draw(st.sampled_from(ODD_VALUES))
                _set(tree, path, copy.deepcopy(new))  # a copy: later mutations edit the tree in place
                ops.append(f"type {path}={new!r}")
            elif kind == "drop":
                parent = _get(tree, path[:-1])
                del parent[path[-1]]
                ops.append(f"drop {path}")
            elif kind == "duplicate":
                parent = _get(tree, path[:-1])
                if isinstance(parent, list):
                    parent.insert(path[-1], msgspec.json.decode(msgspec.json.encode(value)))
                    ops.append(f"duplicate {path}")
            elif kind == "nest":
                depth = draw(st.sampled_from(_NEST_DEPTHS))
                token = _PLACEHOLDER.format(len(raw_subs))
                raw_subs[token] = b"[" * depth + msgspec.json.encode(value) + b"]" * depth
                _set(tree, path, token)
                ops.append(f"nest {path} depth {depth}")
            elif kind == "reverse" and isinstance(value, list):
                value.reverse()
                ops.append(f"reverse {path}")
        out = msgspec.json.encode(tree)
        for token, text in reversed(raw_subs.items()):  # latest first: a nest's text may hold an earlier token
            out = out.replace(msgspec.json.encode(token), text)
    else:
        out = raw
    if not ops or draw(st.integers(0, 4)) == 0:  # bytes
        kind = draw(st.sampled_from(("truncate", "flip", "bom", "empty")))
        if kind == "truncate" and out:
            cut = draw(st.integers(0, len(out) - 1))
            out = out[:cut]
        elif kind == "flip" and out:
            at = draw(st.integers(0, len(out) - 1))
            out = out[:at] + bytes([draw(st.sampled_from((0x00, 0x22, 0x7b, 0x7d, 0xff, 0xc3)))]) + out[at + 1:]
        elif kind == "bom":
            out = b"\xef\xbb\xbf" + out
        else:
            out = b"{}"
        ops.append(f"bytes {kind}")
    return Mutated(out, ops)


@dataclass
class Case:
    """A target's seed sequence with some messages replaced by mutated ones."""

    target: str
    messages: list[tuple[Seed, bytes, list[str]]]  # (seed, bytes fed, mutations applied)


@st.composite
def cases(draw: st.DrawFn, target: Target) -> Case:
    seeds = target.seeds
    n = len(seeds)
    positions = set(draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=2)))
    messages = []
    for i, seed in enumerate(seeds):
        if i in positions:
            m = draw(mutated(seed.raw))
            messages.append((seed, m.raw, m.ops))
        else:
            messages.append((seed, seed.raw, []))
    return Case(target.name, messages)


# --- running a case -----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What feeding cases did: counters and every problem found."""

    examples: int = 0
    messages: int = 0
    accepted: int = 0  # market updates that passed the validator
    rejected: Counter[str] = field(default_factory=Counter)  # whole messages and markets alone, by reason
    validator_rejected: Counter[str] = field(default_factory=Counter)  # updates a normaliser returned, by reason
    crashes: list[str] = field(default_factory=list)
    invalid_accepted: list[str] = field(default_factory=list)

    def merge(self, other: Outcome) -> None:
        self.examples += other.examples
        self.messages += other.messages
        self.accepted += other.accepted
        self.rejected.update(other.rejected)
        self.validator_rejected.update(other.validator_rejected)
        self.crashes += other.crashes
        self.invalid_accepted += other.invalid_accepted


def _channel(normaliser: Any, seed: Seed) -> str:
    """The payload channel the seed's body answers (what ``expect`` says)."""
    if seed.expect is None:
        return ""
    if isinstance(normaliser, PinnacleNormaliser):
        return pinnacle_channel(seed.expect[0], None, snapshot=seed.expect[1])
    return str(seed.expect[0])


def run_case(target: Target, case: Case) -> Outcome:
    """Feed ``case`` to a fresh normaliser; never raises."""
    out = Outcome(examples=1)
    normaliser = target.make()
    for seed, raw, ops in case.messages:
        out.messages += 1
        where = f"{target.name} {ops or 'unmutated'} raw[:300]={raw[:300]!r}"
        try:
            batch = normaliser.feed(raw, seed.recv_ms, _channel(normaliser, seed))
        except FeedDecodeError as exc:
            out.rejected[exc.reason] += 1
            if not isinstance(exc.reason, str) or not isinstance(exc.raw, bytes):
                out.crashes.append(f"malformed FeedDecodeError {exc!r}: {where}")
            continue
        except Exception as exc:  # noqa: BLE001 - exactly what the fuzz is looking for
            out.crashes.append(f"{type(exc).__name__}: {exc}: {where}")
            continue
        for rej in batch.rejected:
            if not isinstance(rej, FeedDecodeError) or not (rej.market_id is None or isinstance(rej.market_id, str)):
                out.crashes.append(f"malformed rejection {rej!r}: {where}")
                continue
            out.rejected[rej.reason] += 1
        for u in batch.updates:
            try:
                validate_update(u, seed.recv_ms)
            except FeedDecodeError as exc:
                out.validator_rejected[exc.reason] += 1
                continue
            except Exception as exc:  # noqa: BLE001
                out.crashes.append(f"validator {type(exc).__name__}: {exc}: {where}")
                continue
            out.accepted += 1
            for problem in check_invariants(u, seed.recv_ms):
                out.invalid_accepted.append(f"{problem}: {where}")
    return out


def assert_clean(out: Outcome) -> None:
    assert not out.crashes, out.crashes[0]
    assert not out.invalid_accepted, out.invalid_accepted[0]
    assert not out.validator_rejected, (
        f"the validator rejected updates a normaliser returned (its cache took a change the ingest would "
        f"quarantine): {dict(out.validator_rejected)}")


_SETTINGS = settings(max_examples=CI_EXAMPLES, derandomize=True, deadline=None, database=None,
                     suppress_health_check=list(HealthCheck), print_blob=True)


# --- tests --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_unmutated_seeds_are_clean_and_accepted(name: str) -> None:
    """The seeds themselves go through without a rejection (so the fuzz starts from valid traffic)."""
    target = TARGETS[name]
    out = run_case(target, Case(name, [(s, s.raw, []) for s in target.seeds]))
    assert_clean(out)
    assert out.accepted > 0
    assert not out.rejected or name == "push", dict(out.rejected)  # (push: the golden file's own bad odd)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_normaliser(name: str) -> None:
    target = TARGETS[name]
    total = Outcome()

    @_SETTINGS
    @given(case=cases(target))
    def run(case: Case) -> None:
        out = run_case(target, case)
        total.merge(out)
        assert_clean(out)

    run()
    assert total.examples >= CI_EXAMPLES // 2 and total.accepted > 0 and total.rejected


def test_fuzz_betfair_recordings() -> None:
    target = betfair_recordings_target()
    if target is None:
        pytest.skip(f"needs the shared recordings at {SHARED_BETFAIR} (../shared/data beside the project); not present "
                    "— the built-in Betfair lines are fuzzed by test_fuzz_normaliser[betfair]")
    total = Outcome()

    @settings(_SETTINGS, max_examples=CI_EXAMPLES // 2)
    @given(case=cases(target))
    def run(case: Case) -> None:
        out = run_case(target, case)
        total.merge(out)
        assert_clean(out)

    run()
    assert total.accepted > 0


def test_every_normaliser_only_raises_feed_decode_error_on_classic_bad_inputs() -> None:
    """The catalogue's bad inputs (research/reliability.md c5), to every normaliser."""
    bad = [b"", b"{", b"\xef\xbb\xbf{}", b"\xff\xfe", b"[" * 100_000, b'{"a":' * 5000, b"NaN", b"null", b"[]", b"{}",
           b'"x"', b"1e400", b'{"op":"mcm","mc":[' + b"[" * 50_000 + b"]}",
           b'[{"id":"e1","sport_key":"soccer_epl","commence_time":1e308}]',
           b'{"sportId":29,"leagues":[{"id":1,"events":[{"id":1,"periods":[{"number":0,"cutoff":"' + b"9" * 5000 + b'"}]}]}]}',
           b'{"type":"odds","entry_id":"1-1","data":[' + b'{"fixture":{"id":"f"},"market":{"id":"m"},"selection":{"id":"s"},"price":2},' * 200 + b'1]}']
    for target in TARGETS.values():
        for raw in bad:
            n = target.make()
            try:
                n.feed(raw, 1_755_349_200_000)
            except FeedDecodeError:
                pass


def test_commence_time_1e308_is_a_rejection_not_an_overflow() -> None:
    """Issue 8 / defect 3: ``"commence_time": 1e308`` used to raise OverflowError
    in iso_to_ms and kill the ingest."""
    body = msgspec.json.decode((FIXTURES / "theoddsapi" / "01_snapshot.json").read_bytes())
    body[0]["commence_time"] = 1e308
    n = TheOddsApiNormaliser()
    batch = n.feed(msgspec.json.encode(body), 1755349200000)
    assert [e.reason for e in batch.rejected] == ["invalid_time"]
    assert batch.updates and all(u.market_id.startswith("toa:a1b2") for u in batch.updates)


# --- the book ----------------------------------------------------------------------------------------------

_MARKETS = ("m1", "m2", "m3")
_SEL_IDS = ("a", "b", "c")


# (strategies built once, here: built inside the composites, hypothesis re-created and re-validated
# them on every draw, which took most of the test's time; the examples drawn are the same)
_PRICES = st.sampled_from((None, 1.5, 2.0, 3.25, 10.0))
_SEL_ID = st.sampled_from(_SEL_IDS)
_SIZES = st.sampled_from((1.0, 5.0))
_SEL_STATUSES = st.sampled_from(("ACTIVE", "SUSPENDED", "WINNER", "LOSER"))


@st.composite
def _selection(draw: st.DrawFn) -> Selection:
    price = draw(_PRICES)
    return Selection(selection_id=draw(_SEL_ID), price=price,
                     back=[(price, draw(_SIZES))] if price else [],
                     status=draw(_SEL_STATUSES))


def _unique(sels: list[Selection]) -> list[Selection]:
    return list({s.selection_id: s for s in sels}.values())


_HEADERS = st.builds(MarketHeader, status=st.sampled_from(("OPEN", "SUSPENDED", "CLOSED", "SETTLED")),
                     version=st.integers(0, 3), in_play=st.booleans(),
                     traded_volume=st.sampled_from((None, 10.0, 20.0)))
_N_UPDATES = st.integers(1, 40)
_KINDS = st.sampled_from(("image", "delta", "delta", "delta", "duplicate", "old"))
_TS_STEP = st.integers(0, 50)
_AGE = st.integers(1, 500)
_BOOLS = st.booleans()
_SELECTIONS = st.lists(_selection(), max_size=3)
_ONE_IN_FOUR = st.integers(0, 3)
_MARKET_IDS = st.sampled_from(_MARKETS)
_TRADED = st.sampled_from((None, 1.0, 2.0))


@st.composite
def _updates(draw: st.DrawFn) -> list[MarketUpdate]:
    out: list[MarketUpdate] = []
    ts = 1_000_000
    for _ in range(draw(_N_UPDATES)):
        kind = draw(_KINDS)
        if kind == "duplicate" and out:
            out.append(out[draw(st.integers(0, len(out) - 1))])
            continue
        ts += draw(_TS_STEP)
        when = ts - draw(_AGE) if kind == "old" else ts
        image = kind == "image" or kind == "old" and draw(_BOOLS)
        sels = _unique(draw(_SELECTIONS))
        header = draw(_HEADERS) if image or draw(_ONE_IN_FOUR) == 0 else None
        out.append(MarketUpdate(
            market_id=draw(_MARKET_IDS), source="fuzz", image=image, header=header, selections=sels,
            source_ts=when, received_at=when + 5,
            traded_volume=draw(_TRADED) if header is None else None))
    return out


@settings(max_examples=300, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(updates=_updates())
def test_fuzz_book(updates: list[MarketUpdate]) -> None:
    book = Book()
    replayed: dict[str, Market | None] = {}
    last_seq: dict[str, int] = {}
    for i, u in enumerate(updates):
        known = u.market_id in book.markets
        d: Delta | None = book.apply(u, 2_000_000 + i)
        if not u.image and not known:
            assert d is None and u.market_id not in book.markets, "a delta created a market"
        if d is None:
            continue
        assert d.market_id == u.market_id
        assert d.seq > last_seq.get(d.market_id, 0), (d.seq, last_seq.get(d.market_id))
        last_seq[d.market_id] = d.seq
        replayed[d.market_id] = apply_delta(replayed.get(d.market_id), d)
        assert replayed[d.market_id] == book.markets[d.market_id], f"replay differs after update {i}"
    assert set(replayed) == set(book.markets)
    for mid, m in book.markets.items():
        assert replayed[mid] == m and m.seq == last_seq[mid]
