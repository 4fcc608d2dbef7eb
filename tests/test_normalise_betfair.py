"""BetfairNormaliser and Book on small hand-written ESA lines."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from feed.book import Book
from feed.errors import FeedDecodeError
from feed.models import Delta, Market, Selection
from feed.normalise.base import NormalisedBatch
from feed.normalise.betfair import BetfairNormaliser, decode_cursor

MID = "1.100"


def raw(msg: dict[str, Any]) -> bytes:
    return msgspec.json.encode(msg)  # (orjson cannot write integers beyond 64 bits)


def mcm(*mc: dict[str, Any], pt: int = 1000, **extra: Any) -> bytes:
    return raw({"op": "mcm", "id": 2, "clk": "AAA", "pt": pt, "mc": list(mc), **extra})


def definition(status: str = "OPEN", runners: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    if runners is None:
        runners = [{"id": 1, "sortPriority": 1, "status": "ACTIVE"}, {"id": 2, "sortPriority": 2, "status": "ACTIVE"}]
    md = {"status": status, "inPlay": False, "betDelay": 0, "version": 1, "eventId": "30000",
          "eventTypeId": "7", "marketType": "WIN", "marketTime": "2024-01-01T12:00:00.000Z",
          "numberOfWinners": 1, "runners": runners}
    md.update(extra)
    return md


def image_line(pt: int = 1000, market: str = MID, **md: Any) -> bytes:
    return mcm({"id": market, "img": True, "marketDefinition": definition(**md),
                "rc": [{"id": 1, "atb": [[2.0, 10], [1.9, 5]], "atl": [[2.1, 7]], "ltp": 2.0, "tv": 50},
                       {"id": 2, "atb": [[4.0, 3]], "atl": [[4.2, 8], [4.4, 1]]}]}, pt=pt)


class Pipe:
    """BetfairNormaliser → Book, as the ingest wires them."""

    def __init__(self) -> None:
        self.normaliser = BetfairNormaliser()
        self.book = Book()

    def feed(self, line: bytes, recv_ms: int = 5) -> tuple[NormalisedBatch, list[Delta | None]]:
        batch = self.normaliser.feed(line, recv_ms)
        return batch, [self.book.apply(u, stored_at=recv_ms + 1) for u in batch.updates]

    def market(self, market_id: str = MID) -> Market:
        return self.book.markets["bf:" + market_id]

    def sel(self, selection_id: str, market_id: str = MID) -> Selection:
        s = self.market(market_id).selection(selection_id)
        assert s is not None, selection_id
        return s


# --- images and deltas ------------------------------------------------------


def test_image_then_delta() -> None:
    p = Pipe()
    batch, (d1,) = p.feed(image_line())
    (u,) = batch.updates
    assert u.image and u.market_id == "bf:" + MID and u.source == "betfair" and u.source_ts == 1000
    assert d1 is not None and d1.kind == "image" and d1.seq == 1
    s1 = p.sel("1")
    assert s1.back == [(2.0, 10.0), (1.9, 5.0)] and s1.lay == [(2.1, 7.0)]
    assert s1.price == 2.0 and s1.ltp == 2.0 and s1.traded_volume == 50
    assert p.sel("2").back == [(4.0, 3.0)] and p.sel("2").lay == [(4.2, 8.0), (4.4, 1.0)]
    m = p.market()
    assert (m.status, m.sport, m.market_type, m.event_id) == ("OPEN", "horse_racing", "win", "bf:30000")

    batch, (d2,) = p.feed(mcm({"id": MID, "rc": [{"id": 1, "atb": [[2.02, 3]], "atl": [[2.1, 9]]}]}, pt=1100))
    (u,) = batch.updates
    assert not u.image and u.header is None and [s.selection_id for s in u.selections] == ["1"]
    assert d2 is not None and d2.kind == "delta" and d2.seq == 2 and [s.selection_id for s in d2.selections] == ["1"]
    s1 = p.sel("1")
    assert s1.back == [(2.02, 3.0), (2.0, 10.0), (1.9, 5.0)] and s1.lay == [(2.1, 9.0)] and s1.price == 2.02
    assert p.market().source_ts == 1100 and p.market().seq == 2


def test_size_zero_deletes_a_price() -> None:
    p = Pipe()
    p.feed(image_line())
    p.feed(mcm({"id": MID, "rc": [{"id": 1, "atb": [[2.0, 0]], "atl": [[2.1, 0], [2.2, 4]]},
                                  {"id": 2, "atb": [[9.0, 0]]}]}, pt=1100))  # 9.0 absent: no-op
    assert p.sel("1").back == [(1.9, 5.0)] and p.sel("1").lay == [(2.2, 4.0)]
    assert p.sel("2").back == [(4.0, 3.0)]


def _level_image(ladder: str = "batb") -> bytes:
    other = "batl" if ladder == "batb" else "bdatl"
    return mcm({"id": MID, "img": True, "marketDefinition": definition(),
                "rc": [{"id": 1, ladder: [[0, 2.0, 10], [1, 1.9, 5], [2, 1.8, 1]], other: [[0, 2.1, 7]]}]})


@pytest.mark.parametrize("ladder", ["batb", "bdatb"])
def test_size_zero_deletes_a_level(ladder: str) -> None:
    p = Pipe()
    p.feed(_level_image(ladder))
    assert p.sel("1").back == [(2.0, 10.0), (1.9, 5.0), (1.8, 1.0)]
    p.feed(mcm({"id": MID, "rc": [{"id": 1, ladder: [[1, 1.9, 0]]}]}, pt=1100))
    assert p.sel("1").back == [(2.0, 10.0), (1.8, 1.0)]
    # Betfair re-sends every changed position: the ladder shifting up
    p.feed(mcm({"id": MID, "rc": [{"id": 1, ladder: [[0, 1.8, 1], [2, 0, 0]]}]}, pt=1200))
    assert p.sel("1").back == [(1.8, 1.0)]


def test_zero_triple_empties_a_level_ladder() -> None:
    p = Pipe()
    p.feed(mcm({"id": MID, "img": True, "marketDefinition": definition(),
                "rc": [{"id": 1, "batb": [[0, 2.0, 10]], "batl": [[0, 2.1, 7], [1, 2.2, 3]]}]}))
    p.feed(mcm({"id": MID, "rc": [{"id": 1, "batb": [[0, 0, 0]], "batl": [[0, 0, 0], [1, 0, 0]]}]}, pt=1100))
    s = p.sel("1")
    assert s.back == [] and s.lay == [] and s.price is None


def test_full_ladders_win_over_level_ladders() -> None:
    p = Pipe()
    p.feed(mcm({"id": MID, "img": True, "marketDefinition": definition(),
                "rc": [{"id": 1, "batb": [[0, 2.0, 10]], "bdatb": [[0, 2.02, 1]]}]}))
    assert p.sel("1").back == [(2.02, 1.0)]  # display over best offers
    p.feed(mcm({"id": MID, "rc": [{"id": 1, "atb": [[1.5, 4]]}]}, pt=1100))
    assert p.sel("1").back == [(1.5, 4.0)]  # full ladder once carried


def test_img_mid_stream_replaces_the_market() -> None:
    p = Pipe()
    p.feed(image_line())
    line = mcm({"id": MID, "img": True, "marketDefinition": definition(runners=[{"id": 3, "status": "ACTIVE"}]),
                "rc": [{"id": 3, "atb": [[3.0, 1]]}]}, pt=2000)
    batch, (d,) = p.feed(line)
    assert batch.updates[0].image
    assert d is not None and d.kind == "image" and d.seq == 2
    assert [s.selection_id for s in p.market().selections] == ["3"]
    assert p.sel("3").back == [(3.0, 1.0)]
    # the old ladders are gone from the cache too: a delta for runner 1 starts empty
    p.feed(mcm({"id": MID, "rc": [{"id": 1, "atl": [[5.0, 2]]}]}, pt=2100))
    assert p.sel("1").back == [] and p.sel("1").lay == [(5.0, 2.0)]


def test_sub_image_replaces_every_market_it_carries() -> None:
    p = Pipe()
    p.feed(image_line())
    p.feed(image_line(market="1.200"))
    line = raw({"op": "mcm", "id": 2, "ct": "SUB_IMAGE", "initialClk": "I", "clk": "C", "pt": 3000,
                "heartbeatMs": 5000, "conflateMs": 0,
                "mc": [{"id": MID, "marketDefinition": definition(), "rc": [{"id": 2, "atb": [[6.0, 1]]}]}]})
    batch, (d,) = p.feed(line)
    assert batch.full_image and decode_cursor(batch.cursor).initial_clk == "I" and batch.provider_ts == 3000
    assert batch.updates[0].image and d is not None and d.kind == "image"
    assert p.sel("1").back == [] and p.sel("2").back == [(6.0, 1.0)]


# --- marketDefinition ---------------------------------------------------------


def test_definition_status_inplay_delay_version_and_removals() -> None:
    p = Pipe()
    p.feed(image_line())
    runners = [{"id": 1, "sortPriority": 1, "status": "ACTIVE", "adjustmentFactor": 60.0},
               {"id": 2, "sortPriority": 2, "status": "REMOVED", "adjustmentFactor": 12.5,
                "removalDate": "2024-01-01T11:00:00.000Z"},
               {"id": 3, "sortPriority": 3, "status": "REMOVED_VACANT"}]
    batch, (d,) = p.feed(mcm({"id": MID, "marketDefinition": definition(
        "SUSPENDED", runners, inPlay=True, betDelay=5, version=7, suspendReason="x")}, pt=1100))
    assert d is not None and d.kind == "delta" and d.header is not None
    m = p.market()
    assert (m.status, m.in_play, m.bet_delay_s, m.version) == ("SUSPENDED", True, 5, 7)
    assert p.sel("2").status == "REMOVED" and p.sel("2").adjustment_factor == 12.5
    assert p.sel("3").status == "REMOVED"
    assert p.sel("1").status == "ACTIVE" and p.sel("1").adjustment_factor == 60.0


@pytest.mark.parametrize(("results", "expected"), [
    (("WINNER", "LOSER"), "SETTLED"),
    (("PLACED", "LOSER"), "SETTLED"),
    (("LOSER", "LOSER"), "CLOSED"),  # e.g. voided: closed without a winner
    (("ACTIVE", "ACTIVE"), "CLOSED"),
])
def test_closed_with_winner_or_placed_is_settled(results: tuple[str, str], expected: str) -> None:
    p = Pipe()
    p.feed(image_line())
    runners = [{"id": 1, "status": results[0], "bsp": 2.1}, {"id": 2, "status": results[1], "bsp": "NaN"}]
    p.feed(mcm({"id": MID, "marketDefinition": definition("CLOSED", runners, inPlay=True)}, pt=1100))
    assert p.market().status == expected
    assert (p.sel("1").status, p.sel("2").status) == results
    assert p.sel("1").bsp == 2.1 and p.sel("2").bsp is None


def test_bsp_projection_strings_are_accepted() -> None:
    p = Pipe()
    p.feed(image_line())
    batch, (d,) = p.feed(mcm({"id": MID, "rc": [
        {"id": 1, "spn": "NaN", "spf": "Infinity", "atb": [[2.04, 1]]},
        {"id": 2, "spn": 4.1, "spf": "NaN", "spb": [[1.01, 5]], "spl": [[1000, 2]]},
    ]}, pt=1100))
    assert batch.runner_changes == 2 and d is not None
    assert p.sel("1").back[0] == (2.04, 1.0)


def test_ltp_zero_means_no_trade() -> None:
    p = Pipe()
    p.feed(image_line())
    p.feed(mcm({"id": MID, "rc": [{"id": 1, "ltp": 0}]}, pt=1100))
    assert p.sel("1").ltp is None


# --- envelopes ----------------------------------------------------------------


def test_status_503_is_surfaced() -> None:
    p = Pipe()
    batch, deltas = p.feed(raw({"op": "mcm", "id": 2, "status": 503}))
    assert batch.degraded is True and batch.updates == [] and deltas == []
    batch, _ = p.feed(raw({"op": "mcm", "id": 2, "clk": "AAAAAAAA", "status": 503, "pt": 5, "ct": "HEARTBEAT"}))
    assert batch.degraded is True and batch.heartbeat and batch.provider_ts == 5
    batch, _ = p.feed(raw({"op": "mcm", "id": 3, "clk": "AAAAAAAB", "pt": 6, "ct": "HEARTBEAT"}))
    assert batch.degraded is False  # an mcm without status says the stream is healthy again


def test_heartbeat() -> None:
    p = Pipe()
    batch, deltas = p.feed(raw({"op": "mcm", "id": 2, "clk": "AAA", "pt": 1471370165625, "ct": "HEARTBEAT"}))
    assert (batch.op, batch.heartbeat, decode_cursor(batch.cursor).clk, batch.degraded) == ("mcm", True, "AAA", False)
    assert batch.updates == [] and deltas == []


@pytest.mark.parametrize("line", [
    {"op": "connection", "connectionId": "002-051134157842-432409"},
    {"op": "status", "id": 1, "statusCode": "SUCCESS", "connectionClosed": False},
    {"op": "ccm", "id": 2, "pt": 5, "cc": [{"eventId": "1", "marketId": MID}]},
])
def test_other_ops_carry_no_odds(line: dict[str, Any]) -> None:
    batch = BetfairNormaliser().feed(raw(line), 5)
    assert batch.op == line["op"] and batch.updates == []


def test_unknown_keys_are_ignored() -> None:
    p = Pipe()
    md = definition(priceLadderDefinition={"type": "CLASSIC"}, keyLineDefinition=None, raceType="Chase")
    md["runners"][0]["futureField"] = [1, 2]
    line = raw({"op": "mcm", "clk": None, "pt": 1000, "newTopLevel": {"a": 1},
                "mc": [{"id": MID, "marketDefinition": md, "_stream_id": 2001,
                        "rc": [{"id": 1, "atb": [[2.0, 1]], "xyz": 3}]}]})
    batch, (d,) = p.feed(line)
    assert d is not None and p.sel("1").back == [(2.0, 1.0)]


def test_message_without_pt_takes_recv_ms() -> None:
    n = BetfairNormaliser()
    line = raw({"op": "mcm", "mc": [{"id": MID, "marketDefinition": definition()}]})
    (u,) = n.feed(line, 777).updates
    assert (u.source_ts, u.source_ts_original, u.received_at) == (777, None, 777)
    (u,) = n.feed(mcm({"id": MID, "rc": [{"id": 1, "ltp": 2.0}]}, pt=1000), 800).updates
    assert (u.source_ts, u.source_ts_original) == (1000, None)


def test_handicap_selection_ids() -> None:
    p = Pipe()
    runners = [{"id": 47972, "hc": -0.25, "status": "ACTIVE"}, {"id": 47972, "hc": 0.25, "status": "ACTIVE"},
               {"id": 47973, "hc": 0, "status": "ACTIVE"}, {"id": 47974, "hc": 1.5, "status": "ACTIVE"}]
    p.feed(mcm({"id": MID, "marketDefinition": definition(runners=runners, marketType="ASIAN_HANDICAP"),
                "rc": [{"id": 47972, "hc": -0.25, "atb": [[1.9, 10]]}, {"id": 47972, "hc": 0.25, "atb": [[2.1, 5]]},
                       {"id": 47973, "atb": [[3.0, 1]]}]}))
    assert [s.selection_id for s in p.market().selections] == ["47972:-0.25", "47972:0.25", "47973", "47974:1.5"]
    assert p.sel("47972:-0.25").handicap == -0.25 and p.sel("47972:-0.25").back == [(1.9, 10.0)]
    p.feed(mcm({"id": MID, "rc": [{"id": 47972, "hc": -0.25, "atb": [[1.92, 2]]}]}, pt=1100))
    assert p.sel("47972:-0.25").back == [(1.92, 2.0), (1.9, 10.0)]
    assert p.sel("47972:0.25").back == [(2.1, 5.0)]


# --- rejections: right reason, nothing applied --------------------------------

_GOOD_RC = {"id": 1, "atb": [[5.0, 9]], "ltp": 5.0}  # would show up on runner 1 if applied

#: messages rejected whole (the envelope cannot be read): FeedDecodeError raised
BAD_LINES: list[tuple[str, bytes, str]] = [
    ("truncated", mcm({"id": MID, "rc": [_GOOD_RC]})[:-12], "invalid_json"),
    ("not json", b"mcm 1.100 5.0", "invalid_json"),
    ("NaN literal", mcm({"id": MID, "rc": [_GOOD_RC]}).replace(b"5.0", b"NaN", 1), "invalid_json"),
    ("pt is a string", mcm({"id": MID, "rc": [_GOOD_RC]}, pt="soon"), "invalid_schema"),  # type: ignore[arg-type]
    ("mc is an object", raw({"op": "mcm", "pt": 1100, "mc": {"id": MID}}), "invalid_schema"),
    ("no op", raw({"pt": 1100, "mc": [{"id": MID, "rc": [_GOOD_RC]}]}), "invalid_schema"),
    ("heartbeatMs 2**63", mcm({"id": MID, "rc": [_GOOD_RC]}, heartbeatMs=2**63), "invalid_number"),
    ("negative status", mcm({"id": MID, "rc": [_GOOD_RC]}, status=-1), "invalid_number"),
]

#: markets rejected alone (in batch.rejected, the rest of the message applies)
BAD_MARKETS: list[tuple[str, dict[str, Any], str]] = [
    ("runner id is a string", {"id": MID, "rc": [_GOOD_RC, {"id": "two", "atb": [[2.0, 1]]}]}, "invalid_schema"),
    ("ladder is a string", {"id": MID, "rc": [_GOOD_RC, {"id": 2, "atl": "2.0"}]}, "invalid_schema"),
    ("atb price 0.5", {"id": MID, "rc": [_GOOD_RC, {"id": 2, "atb": [[0.5, 3]]}]}, "invalid_price"),
    ("atb price 1.0099", {"id": MID, "rc": [_GOOD_RC, {"id": 2, "atb": [[1.0099, 3]]}]}, "invalid_price"),
    ("atl price 1001", {"id": MID, "rc": [_GOOD_RC, {"id": 2, "atl": [[1001, 3]]}]}, "invalid_price"),
    ("atl price 1000.01", {"id": MID, "rc": [_GOOD_RC, {"id": 2, "atl": [[1000.01, 3]]}]}, "invalid_price"),
    ("atb size -1", {"id": MID, "rc": [_GOOD_RC, {"id": 2, "atb": [[2.0, -1]]}]}, "invalid_size"),
    ("atb size 1e308", {"id": MID, "rc": [_GOOD_RC, {"id": 2, "atb": [[2.0, 1e308]]}]}, "invalid_size"),
    ("trd size -0.5", {"id": MID, "rc": [_GOOD_RC, {"id": 2, "trd": [[2.0, -0.5]]}]}, "invalid_size"),
    ("batb price 0.5", {"id": MID, "rc": [_GOOD_RC, {"id": 2, "batb": [[0, 0.5, 3]]}]}, "invalid_price"),
    ("bdatl price 0.5", {"id": MID, "rc": [_GOOD_RC, {"id": 2, "bdatl": [[1, 0.5, 3]]}]}, "invalid_price"),
    ("ltp 0.5", {"id": MID, "rc": [_GOOD_RC, {"id": 2, "ltp": 0.5}]}, "invalid_price"),
    ("ltp 1.001", {"id": MID, "rc": [_GOOD_RC, {"id": 2, "ltp": 1.001}]}, "invalid_price"),
    ("runner tv -1", {"id": MID, "rc": [_GOOD_RC, {"id": 2, "tv": -1}]}, "invalid_size"),
    ("market tv -1", {"id": MID, "tv": -1, "rc": [_GOOD_RC]}, "invalid_size"),
    ("runner id 2**53", {"id": MID, "rc": [_GOOD_RC, {"id": 2**53, "ltp": 2.0}]}, "invalid_number"),
    ("hc 1e6", {"id": MID, "rc": [_GOOD_RC, {"id": 2, "hc": 1e6, "ltp": 2.0}]}, "invalid_number"),
    ("negative version", {"id": MID, "marketDefinition": definition(version=-1), "rc": [_GOOD_RC]}, "invalid_number"),
    ("negative betDelay", {"id": MID, "marketDefinition": definition(betDelay=-5), "rc": [_GOOD_RC]}, "invalid_number"),
    ("version 2**63", {"id": MID, "marketDefinition": definition(version=2**63), "rc": [_GOOD_RC]}, "invalid_number"),
    ("negative numberOfWinners", {"id": MID, "marketDefinition": definition(numberOfWinners=-1), "rc": [_GOOD_RC]},
     "invalid_number"),
    ("sortPriority -2**31", {"id": MID, "marketDefinition": definition(
        runners=[{"id": 1, "sortPriority": -2**31}, {"id": 2}]), "rc": [_GOOD_RC]}, "invalid_number"),
    ("adjustmentFactor 1e6", {"id": MID, "marketDefinition": definition(
        runners=[{"id": 1, "adjustmentFactor": 1e6}, {"id": 2}]), "rc": [_GOOD_RC]}, "invalid_number"),
    ("bsp -0.0", {"id": MID, "marketDefinition": definition(
        runners=[{"id": 1, "bsp": -0.0}, {"id": 2}]), "rc": [_GOOD_RC]}, "invalid_price"),
    ("bsp 1e6", {"id": MID, "marketDefinition": definition(
        runners=[{"id": 1, "bsp": 1e6}, {"id": 2}]), "rc": [_GOOD_RC]}, "invalid_price"),
    ("marketTime year 9999", {"id": MID, "marketDefinition": definition(marketTime="9999-01-01T00:00:00Z"),
                              "rc": [_GOOD_RC]}, "invalid_time"),
    ("marketTime before 1970", {"id": MID, "marketDefinition": definition(marketTime="1969-12-31T23:59:59Z"),
                                "rc": [_GOOD_RC]}, "invalid_time"),
]

_OTHER = "1.200"


def _other_image() -> bytes:
    return mcm({"id": _OTHER, "img": True, "marketDefinition": definition(), "rc": [{"id": 1, "atb": [[3.0, 1]]}]})


def _assert_cache_untouched(p: Pipe, before: Market) -> None:
    """The next change shows the market as it was: nothing of the rejected change was absorbed."""
    _, ds = p.feed(mcm({"id": MID, "rc": [{"id": 1, "tv": 51}]}, pt=1200))
    assert ds and ds[0] is not None
    after = p.sel("1")
    old = before.selection("1")
    assert old is not None
    assert (after.back, after.lay, after.ltp) == (old.back, old.lay, old.ltp)
    assert p.sel("2") == before.selection("2")
    m = p.market()
    assert (m.version, m.bet_delay_s, m.start_time, m.number_of_winners) == (
        before.version, before.bet_delay_s, before.start_time, before.number_of_winners)


@pytest.mark.parametrize(("line", "reason"), [(b, r) for _, b, r in BAD_LINES], ids=[n for n, _, _ in BAD_LINES])
def test_bad_line_is_rejected_with_reason_and_nothing_applied(line: bytes, reason: str) -> None:
    p = Pipe()
    p.feed(image_line())
    before = p.market()
    with pytest.raises(FeedDecodeError) as info:
        p.feed(line)
    assert info.value.reason == reason, str(info.value)
    assert info.value.raw == line
    assert sorted(p.normaliser.markets) == [MID]
    _assert_cache_untouched(p, before)


@pytest.mark.parametrize(("change", "reason"), [(c, r) for _, c, r in BAD_MARKETS], ids=[n for n, _, _ in BAD_MARKETS])
def test_bad_market_is_rejected_alone_and_nothing_of_it_applied(change: dict[str, Any], reason: str) -> None:
    """Issue 8: one bad market of a message is rejected alone (``batch.rejected``,
    with its id and the message's bytes); the other market of the message
    applies; the bad market's cache is untouched; every update returned
    passes feed.validate."""
    from feed.validate import validate_update

    p = Pipe()
    p.feed(image_line())
    p.feed(_other_image())
    before = p.market()
    line = mcm(change, {"id": _OTHER, "rc": [{"id": 1, "atb": [[3.5, 2]]}]}, pt=1100)
    batch, _ = p.feed(line)
    assert [(e.reason, e.market_id) for e in batch.rejected] == [(reason, "bf:" + MID)], [str(e) for e in batch.rejected]
    assert batch.rejected[0].raw == line
    assert [u.market_id for u in batch.updates] == ["bf:" + _OTHER]
    for u in batch.updates:
        validate_update(u, 5)
    assert p.sel("1", _OTHER).back == [(3.5, 2.0), (3.0, 1.0)]
    _assert_cache_untouched(p, before)


def test_delta_for_unknown_market_is_rejected() -> None:
    n = BetfairNormaliser()
    batch = n.feed(mcm({"id": MID, "rc": [{"id": 1, "batb": [[0, 4.7, 4.33]]}]}), 5)
    assert [(e.reason, e.market_id) for e in batch.rejected] == [("unknown_market", "bf:" + MID)]
    assert batch.updates == [] and n.markets == {}


def test_many_markets_two_without_definition_only_those_two_rejected() -> None:
    """A SUB_IMAGE of 137 markets, 2 of them lacking a marketDefinition (as
    real captures do): 135 apply, the 2 are rejected (``unknown_market``),
    the message is not lost whole."""
    n = BetfairNormaliser()
    mcs = [{"id": f"1.{i}", "img": True, "marketDefinition": definition(), "rc": [{"id": 1, "batb": [[0, 2.0, 5]]}]}
           for i in range(137)]
    for i in (17, 99):
        del mcs[i]["marketDefinition"]
    batch = n.feed(mcm(*mcs, ct="SUB_IMAGE"), 5)
    assert sorted(e.market_id for e in batch.rejected) == ["bf:1.17", "bf:1.99"]
    assert {e.reason for e in batch.rejected} == {"unknown_market"}
    assert len(batch.updates) == 135 and all(u.image for u in batch.updates)
    assert "1.17" not in n.markets and len(n.markets) == 135
    assert batch.full_image


def test_market_first_seen_mid_stream_with_definition_is_built_from_it() -> None:
    """A recording that starts mid-stream: no ``img``, but a marketDefinition
    → an image built from the definition (and its runner changes), as
    betfairlightweight builds its cache."""
    p = Pipe()
    batch, (d,) = p.feed(mcm({"id": MID, "marketDefinition": definition(version=7),
                              "rc": [{"id": 1, "atb": [[2.0, 4]]}]}, ct="RESUB_DELTA"))
    (u,) = batch.updates
    assert u.image and d is not None and d.kind == "image"
    m = p.market()
    assert m.version == 7 and [s.selection_id for s in m.selections] == ["1", "2"]
    assert p.sel("1").back == [(2.0, 4.0)] and p.sel("2").back == []


def test_a_market_defined_earlier_in_the_same_message_is_known() -> None:
    n = BetfairNormaliser()
    batch = n.feed(mcm({"id": MID, "marketDefinition": definition()}, {"id": MID, "rc": [{"id": 1, "atb": [[2.0, 4]]}]}), 5)
    assert batch.rejected == [] and len(batch.updates) == 2


@pytest.mark.parametrize("pt", [0, -5, 2**63, 4_102_444_800_001, 10**30, 5 + 30_001])
def test_absurd_or_future_pt_rejects_each_market_as_clock_skew(pt: int) -> None:
    p = Pipe()
    p.feed(image_line())
    before = p.market()
    batch, _ = p.feed(mcm({"id": MID, "rc": [_GOOD_RC]}, {"id": "1.999", "marketDefinition": definition()}, pt=pt))
    assert sorted((e.reason, e.market_id) for e in batch.rejected) == [("clock_skew", "bf:1.100"), ("clock_skew", "bf:1.999")]
    assert batch.updates == [] and "1.999" not in p.normaliser.markets
    _assert_cache_untouched(p, before)


def test_pt_within_the_skew_is_accepted() -> None:
    n = BetfairNormaliser(max_future_skew_ms=1000)
    assert n.feed(image_line(pt=2000), 1000).updates
    assert n.feed(mcm({"id": MID, "rc": [_GOOD_RC]}, pt=2001), 1000).rejected[0].reason == "clock_skew"


def test_non_json_line_fragment_is_invalid_json() -> None:
    """A line that begins mid-object (a recorder split a line, as in the
    shared RECORDED-1.173718164) is not JSON: reason ``invalid_json``, not
    ``invalid_schema``."""
    with pytest.raises(FeedDecodeError) as info:
        BetfairNormaliser().feed(b' "Europe/London", "version": 3392177615}, "_stream_id": 2001}]}', 5)
    assert info.value.reason == "invalid_json", str(info.value)


# --- Book ---------------------------------------------------------------------


def test_book_dedupes_a_repeated_update() -> None:
    n, book = BetfairNormaliser(), Book()
    (img,) = n.feed(image_line(), 5).updates
    assert book.apply(img) is not None
    assert book.apply(img) is None  # same image again
    (u,) = n.feed(mcm({"id": MID, "rc": [{"id": 1, "atb": [[2.02, 3]]}]}, pt=1100), 6).updates
    d = book.apply(u)
    assert d is not None and d.seq == 2
    assert book.apply(u) is None  # same delta again
    assert book.dropped["duplicate"] == 2 and book.markets["bf:" + MID].seq == 2


def test_book_drops_out_of_order_updates() -> None:
    n, book = BetfairNormaliser(), Book()
    book.apply(n.feed(image_line(pt=2000), 5).updates[0])
    (late,) = n.feed(mcm({"id": MID, "rc": [{"id": 1, "atb": [[2.02, 3]]}]}, pt=1999), 6).updates
    assert book.apply(late) is None and book.dropped["out_of_order"] == 1
    assert book.markets["bf:" + MID].selection("1").back[0] == (2.0, 10.0)
    (same_ts,) = n.feed(mcm({"id": MID, "rc": [{"id": 1, "atb": [[2.04, 1]]}]}, pt=2000), 7).updates
    assert book.apply(same_ts) is not None  # equal source_ts is not older


def test_book_drops_a_delta_before_any_image() -> None:
    n, book = BetfairNormaliser(), Book()
    (img,) = n.feed(image_line(), 5).updates
    (u,) = n.feed(mcm({"id": MID, "rc": [{"id": 1, "atb": [[2.02, 3]]}]}, pt=1100), 6).updates
    assert book.apply(u) is None and book.dropped["no_image"] == 1 and book.markets == {}
    assert book.apply(img) is not None


def test_book_seq_strictly_increases() -> None:
    p = Pipe()
    seqs = []
    lines = [image_line()] + [mcm({"id": MID, "rc": [{"id": 1 + i % 2, "ltp": 2.0 + i / 100}]}, pt=1000 + i)
                              for i in range(1, 20)]
    lines.append(image_line(pt=3000, version=2))
    lines.append(mcm({"id": MID, "marketDefinition": definition("SUSPENDED", version=3)}, pt=3001))
    for line in lines:
        _, deltas = p.feed(line)
        seqs += [d.seq for d in deltas if d is not None]
    assert seqs == list(range(1, len(lines) + 1))
    assert p.market().seq == len(lines)


def _closed_pipe() -> Pipe:
    p = Pipe()
    p.feed(image_line())
    runners = [{"id": 1, "status": "WINNER"}, {"id": 2, "status": "LOSER"}]
    p.feed(mcm({"id": MID, "marketDefinition": definition("CLOSED", runners)}, pt=1100))
    assert p.market().status == "SETTLED"
    return p


def _settle_bsp(p: Pipe) -> Delta | None:
    runners = [{"id": 1, "status": "WINNER", "bsp": 2.2}, {"id": 2, "status": "LOSER", "bsp": 5.0}]
    _, (d,) = p.feed(mcm({"id": MID, "marketDefinition": definition("CLOSED", runners)}, pt=1300))
    return d


def test_book_takes_only_definitions_after_close() -> None:
    p = _closed_pipe()
    _, (d,) = p.feed(mcm({"id": MID, "rc": [{"id": 1, "atb": [[9.0, 1]], "ltp": 9.0}]}, pt=1200))
    assert d is None and p.book.dropped["closed"] == 1
    assert p.sel("1").ltp == 2.0 and p.sel("1").back == [(2.0, 10.0), (1.9, 5.0)]
    d = _settle_bsp(p)
    assert d is not None and p.sel("1").bsp == 2.2 and p.sel("2").bsp == 5.0


def test_book_after_close_a_definition_does_not_bring_back_dropped_prices() -> None:
    """Price traffic after the close is dropped by the Book, but the
    normaliser's cache keeps it; the next definition (here the BSP
    reconciliation) re-sends runner 1 whole and the dropped ltp/ladder reach
    the book after all — only for runners the definition happens to touch."""
    p = _closed_pipe()
    p.feed(mcm({"id": MID, "rc": [{"id": 1, "atb": [[9.0, 1]], "ltp": 9.0}]}, pt=1200))
    assert _settle_bsp(p) is not None
    s = p.sel("1")
    assert s.bsp == 2.2
    assert (s.ltp, s.back, s.price) == (2.0, [(2.0, 10.0), (1.9, 5.0)], 2.0)


def test_market_catalogue_names_the_market_and_runners() -> None:
    """flumine's recorder writes ``op: marketCatalogue`` beside the stream: names arrive after the image."""
    from feed.book import Book
    from feed.normalise.betfair import BetfairNormaliser

    n, book = BetfairNormaliser(), Book()
    image = (b'{"op":"mcm","pt":1000,"mc":[{"id":"1.5","marketDefinition":{"status":"OPEN","eventId":"9",'
             b'"eventTypeId":"4339","marketType":"WIN","runners":[{"id":11,"status":"ACTIVE"},'
             b'{"id":12,"status":"ACTIVE"}]},"rc":[{"id":11,"atb":[[2.0,5]]}]}]}')
    catalogue = (b'{"op":"marketCatalogue","marketId":"1.5","marketName":"OR 280m",'
                 b'"runners":[{"selectionId":11,"runnerName":"1. Fast"},{"selectionId":12,"runnerName":"2. Slow"}],'
                 b'"event":{"id":"9","name":"Sheffield"},"competition":{"id":"3","name":"Greyhounds"}}')
    for line in (image, catalogue):
        for u in n.feed(line, 2000).updates:
            book.apply(u)
    m = book.markets["bf:1.5"]
    assert (m.name, m.event_name, m.competition) == ("OR 280m", "Sheffield", "Greyhounds")
    assert [s.name for s in m.selections] == ["1. Fast", "2. Slow"]
    assert m.selection("11").back == [(2.0, 5.0)]
    assert m.seq == 2


def test_traded_ladder_gives_the_volume_when_tv_is_not_subscribed() -> None:
    """EX_TRADED without EX_TRADED_VOL: ``trd`` is the only volume source (size 0 deletes a price)."""
    from feed.normalise.betfair import BetfairNormaliser

    n = BetfairNormaliser()
    image = (b'{"op":"mcm","pt":1,"mc":[{"id":"1.7","marketDefinition":{"status":"OPEN","eventId":"1",'
             b'"runners":[{"id":5,"status":"ACTIVE"}]},"rc":[{"id":5,"trd":[[2.0,10.5],[2.02,4]]}]}]}')
    sel = n.feed(image, 1).updates[0].selections[0]
    assert sel.traded_volume == 14.5
    sel = n.feed(b'{"op":"mcm","pt":2,"mc":[{"id":"1.7","rc":[{"id":5,"trd":[[2.02,0],[1.99,1]]}]}]}', 2).updates[0].selections[0]
    assert sel.traded_volume == 11.5
    # once the stream sends tv, tv wins
    sel = n.feed(b'{"op":"mcm","pt":3,"mc":[{"id":"1.7","rc":[{"id":5,"tv":99,"trd":[[3.0,1]]}]}]}', 3).updates[0].selections[0]
    assert sel.traded_volume == 99


# --- LINE markets: ladder "prices" are line positions, never decimal odds -------------------------

LINE_MID = "1.500"


def _line_definition(**extra: Any) -> dict[str, Any]:
    md = definition(runners=[{"id": 1001, "sortPriority": 1, "status": "ACTIVE"}], bettingType="LINE",
                    marketType="INNINGS_RUNS", eventTypeId="4", lineMinUnit=0.5, lineMaxUnit=400.5, lineInterval=1.0,
                    priceLadderDefinition={"type": "LINE_RANGE"})
    md.update(extra)
    return md


def _line_image(**extra: Any) -> dict[str, Any]:
    # EX_BEST_OFFERS_DISP: "back" the line at 155.5 runs, "lay" it at 156.5 (both at evens)
    return {"id": LINE_MID, "img": True, "marketDefinition": _line_definition(**extra),
            "rc": [{"id": 1001, "bdatb": [[0, 155.5, 40.0]], "bdatl": [[0, 156.5, 25.0]], "ltp": 156.5}]}


def test_a_line_market_is_never_served_as_decimal_odds() -> None:
    """Betfair LINE markets trade at evens; their ladders hold line
    positions. Served as they were, 155.5 runs read as ``price`` 155.5 and a
    back check at 155.5 passed. The market is rejected once
    (``unsupported_market``, with its id: counted and quarantined by the
    ingest) and its later changes are left out without another report —
    even positions below 1.01, which are no bad odds."""
    p = Pipe()
    batch, _ = p.feed(mcm(_line_image(), {"id": MID, "img": True, "marketDefinition": definition(),
                                          "rc": [{"id": 1, "atb": [[2.0, 10]]}]}))
    assert [u.market_id for u in batch.updates] == ["bf:" + MID]  # the message's other market applies
    assert [(e.reason, e.market_id) for e in batch.rejected] == [("unsupported_market", "bf:" + LINE_MID)]
    assert "LINE" in str(batch.rejected[0])
    assert "bf:" + LINE_MID not in p.book.markets
    assert LINE_MID not in p.normaliser.markets and p.normaliser.unsupported == {LINE_MID: "LINE"}
    later = [
        mcm({"id": LINE_MID, "rc": [{"id": 1001, "bdatb": [[0, 157.5, 12.0]], "ltp": 157.5}]}, pt=1100),
        mcm({"id": LINE_MID, "rc": [{"id": 1001, "atb": [[0.5, 3]], "atl": [[1.5, 2]], "ltp": 0.5}]}, pt=1200),
        mcm({"id": LINE_MID, "marketDefinition": _line_definition(status="SUSPENDED")}, pt=1300),
        mcm({"id": LINE_MID, "marketDefinition": definition(runners=[{"id": 1001}])}, pt=1350),  # no bettingType
        mcm(_line_image(), pt=1400, ct="SUB_IMAGE"),  # the image after a resubscription
    ]
    for line in later:
        batch, _ = p.feed(line)
        assert batch.updates == [] and batch.rejected == [], line
    assert "bf:" + LINE_MID not in p.book.markets
    # first seen with positions below 1.01 (the typed decode fails on them): still a line market, not bad odds
    n = BetfairNormaliser()
    batch = n.feed(mcm({"id": "1.501", "img": True, "marketDefinition": _line_definition(lineMinUnit=0.5),
                        "rc": [{"id": 1001, "atb": [[0.5, 3]], "atl": [[1.5, 2]]}]},
                       {"id": MID, "img": True, "marketDefinition": definition(), "rc": [{"id": 1, "atb": [[2.0, 1]]}]}),
                   5)
    assert [(e.reason, e.market_id) for e in batch.rejected] == [("unsupported_market", "bf:1.501")]
    assert [u.market_id for u in batch.updates] == ["bf:" + MID]
    batch = n.feed(mcm({"id": "1.501", "rc": [{"id": 1001, "atb": [[0.5, 0], [1.5, 4]]}]}, pt=1100), 6)
    assert batch.updates == [] and batch.rejected == []


def test_a_line_market_is_counted_and_quarantined_once_by_the_ingest() -> None:
    """Through the ingest: one ``unsupported_market`` rejection (counted,
    queued for the quarantine), one request for a fresh image (as for any
    rejected change) — and not one more per later change or image of the
    market, so a live line market cannot make the source resubscribe in a loop."""
    from feed.ingest import Ingest
    from feed.sources.base import Payload

    ingest = Ingest(None, source="betfair")  # type: ignore[arg-type]  # feed() needs no store
    ingest.feed([Payload(5, mcm(_line_image(), ct="SUB_IMAGE", initialClk="i1"))])
    assert ingest.stats.rejected_by_reason == {"unsupported_market": 1} and ingest.take_lost()
    for i in range(3):
        ingest.feed([Payload(6 + i, mcm({"id": LINE_MID, "rc": [{"id": 1001, "bdatb": [[0, 150.5 + i, 9.0]]}]},
                                        pt=1100 + i))])
    ingest.feed([Payload(10, mcm(_line_image(), pt=1200, ct="SUB_IMAGE", initialClk="i2"))])
    assert ingest.stats.rejected_by_reason == {"unsupported_market": 1} and not ingest.take_lost()
    assert ingest.pending == 0


@pytest.mark.parametrize("betting_type", ["LINE", "RANGE"])
def test_a_market_turning_into_a_line_market_is_rejected_and_served_again_as_odds(betting_type: str) -> None:
    p = Pipe()
    p.feed(image_line())
    batch, _ = p.feed(mcm({"id": MID, "marketDefinition": definition(bettingType=betting_type, version=2),
                           "rc": [{"id": 1, "atb": [[155.5, 3]]}]}, pt=1100))
    # market_id set: the ingest unconfirms the market it holds (it reads stale), nothing of 155.5 is served
    assert [(e.reason, e.market_id) for e in batch.rejected] == [("unsupported_market", "bf:" + MID)]
    assert batch.updates == [] and p.sel("1").price == 2.0 and MID not in p.normaliser.markets
    # a definition of another betting type serves it again, as an image (nothing of the line ladder kept)
    batch, (d,) = p.feed(mcm({"id": MID, "marketDefinition": definition(bettingType="ODDS", version=3),
                              "rc": [{"id": 1, "atb": [[2.2, 4]]}]}, pt=1200))
    assert batch.rejected == [] and d is not None and d.kind == "image"
    assert p.sel("1").back == [(2.2, 4.0)] and p.market().version == 3
    assert p.normaliser.unsupported == {}


def test_asian_handicap_markets_are_odds_markets() -> None:
    p = Pipe()
    batch, _ = p.feed(mcm({"id": MID, "img": True,
                           "marketDefinition": definition(bettingType="ASIAN_HANDICAP_DOUBLE_LINE"),
                           "rc": [{"id": 1, "hc": -0.25, "atb": [[1.95, 10]]}]}))
    assert batch.rejected == [] and p.sel("1:-0.25").price == 1.95


# --- a market twice in one image (moved to another event): the higher version only ------------------


def _copy(version: int, event: str, back11: list[list[float]], back12: list[list[float]]) -> dict[str, Any]:
    runners = [{"id": 11, "sortPriority": 1, "status": "ACTIVE"}, {"id": 12, "sortPriority": 2, "status": "ACTIVE"}]
    return {"id": "1.77", "img": True, "marketDefinition": definition(runners=runners, version=version, eventId=event),
            "rc": [{"id": 11, "bdatb": back11}, {"id": 12, "bdatb": back12}]}


def _current() -> dict[str, Any]:
    return _copy(2000, "30000002", [[0, 3.0, 50.0], [1, 2.9, 80.0]], [[0, 1.6, 70.0]])


def _stale() -> dict[str, Any]:
    return _copy(1990, "30000001", [[0, 4.5, 20.0], [1, 4.4, 30.0]], [[0, 1.3, 90.0]])


def _assert_current(p: Pipe) -> None:
    m = p.market("1.77")
    assert (m.event_id, m.version) == ("bf:30000002", 2000)
    assert p.sel("12", "1.77").back == [(1.6, 70.0)]
    # the next delta, for the current copy: level 0 of runner 11 moves; level 1 is the current copy's
    p.feed(mcm({"id": "1.77", "rc": [{"id": 11, "bdatb": [[0, 3.05, 40.0]]}]}, pt=1100))
    assert p.sel("11", "1.77").back == [(3.05, 40.0), (2.9, 80.0)]


@pytest.mark.parametrize("order", ["current_first", "stale_first"])
def test_a_market_twice_in_an_image_keeps_only_the_higher_version(order: str) -> None:
    """betcode-org/betfair#295: a market moved to another event is in the
    image twice; only the copy with the higher ``version`` is current. The
    stale copy coming second won: old event, old definition, and ladder
    levels that later deltas (changed levels only) never cleared; coming
    first, it was served for a moment. Now it is ignored whole, in either order."""
    copies = [_current(), _stale()] if order == "current_first" else [_stale(), _current()]
    p = Pipe()
    batch, deltas = p.feed(mcm(*copies, ct="SUB_IMAGE", initialClk="i1"))
    _assert_current(p)
    assert len(batch.updates) == 1 and len(deltas) == 1  # nothing of the stale copy, not even for a moment
    assert batch.rejected == [] and p.normaliser.stale_copies == 1


@pytest.mark.parametrize("order", ["current_first", "stale_first"])
def test_a_market_twice_in_a_historic_first_line_keeps_only_the_higher_version(order: str) -> None:
    """Historic files carry no ``img``: the first sight of a market is its image."""
    copies = [_current(), _stale()] if order == "current_first" else [_stale(), _current()]
    p = Pipe()
    for c in copies:
        del c["img"]
    batch, _ = p.feed(raw({"op": "mcm", "clk": "1", "pt": 1000, "mc": copies}))
    _assert_current(p)
    assert len(batch.updates) == 1 and p.normaliser.stale_copies == 1


@pytest.mark.parametrize("order", ["current_first", "stale_first"])
def test_a_market_twice_in_a_segmented_image_keeps_only_the_higher_version(order: str) -> None:
    """With segmentation the two copies may come in different segments of one image."""
    first, second = (_current(), _stale()) if order == "current_first" else (_stale(), _current())
    p = Pipe()
    p.feed(mcm(first, {"id": MID, "img": True, "marketDefinition": definition(), "rc": []},
               ct="SUB_IMAGE", segmentType="SEG_START", initialClk="i1"))
    batch, _ = p.feed(mcm(second, ct="SUB_IMAGE", segmentType="SEG_END", pt=1001))
    _assert_current(p)
    if order == "current_first":
        assert batch.updates == [] and p.normaliser.stale_copies == 1  # the later, stale copy is ignored
    # the run is over: a later message starts afresh (a new version is applied as usual)
    p.feed(mcm(_copy(2001, "30000002", [[0, 3.1, 5.0]], [[0, 1.7, 5.0]]), pt=1200))
    assert p.market("1.77").version == 2001 and p.sel("11", "1.77").back == [(3.1, 5.0)]


# --- a draw runner is a three-way result; "Away @ Home" names the away side first (audit) ----------


def _nba_first_line(market_type: str, runners: list[dict[str, Any]], rc: list[dict[str, Any]],
                    names: bool = True) -> bytes:
    """The first line of the NBA recording 1-166811431 ("Cleveland Cavaliers @
    Minnesota Timberwolves", historic layout: names on the definition) with
    another market type and runners; ``names=False``: as the live stream sends
    it (no event, market or runner names)."""
    import bz2
    import json

    from tests.conftest import require_shared_data

    with bz2.open(require_shared_data() / "nautilus_trader" / "1-166811431.bz2") as f:
        line = json.loads(f.readline())
    mc = line["mc"][0]
    md = mc["marketDefinition"]
    md["marketType"], md["runners"], mc["rc"] = market_type, [dict(r) for r in runners], rc
    if not names:
        md.pop("eventName"), md.pop("name")
        for r in md["runners"]:
            r.pop("name", None)
    return raw(line)


_NBA_HALF_TIME = [{"status": "ACTIVE", "sortPriority": 1, "id": 60424, "name": "Cleveland Cavaliers"},
                  {"status": "ACTIVE", "sortPriority": 2, "id": 237478, "name": "Minnesota Timberwolves"},
                  {"status": "ACTIVE", "sortPriority": 3, "id": 58805, "name": "The Draw"}]
_NBA_RECV = 1577499783086 + 50  # just after the recording's first pt
_NBA_HALF_TIME_RC = [{"id": 60424, "atb": [[2.30, 50]]}, {"id": 237478, "atb": [[1.95, 50]]},
                     {"id": 58805, "atb": [[15.0, 20]]}]


@pytest.mark.parametrize("names", [True, False])
def test_a_basketball_market_with_the_draw_is_three_way(names: bool) -> None:
    """A basketball HALF_TIME market listing The Draw was keyed
    ``moneyline:period=1h`` (basketball has no draws): its 3-way home 1.95 was
    the best first-half moneyline next to Pinnacle's 2-way 1.80, and a bet at
    1.95 passed the best-price check. Live (no names) its third runner tells."""
    p = Pipe()
    p.feed(_nba_first_line("HALF_TIME", _NBA_HALF_TIME, _NBA_HALF_TIME_RC, names), _NBA_RECV)
    m = p.market("1.166811431")
    assert (m.sport, m.market_type, m.specifiers) == ("basketball", "match_result", {"period": "1h"})
    if names:  # "Away @ Home": the second-named side is home
        assert {s.selection_id: s.outcome for s in m.selections} == {"60424": "away", "237478": "home",
                                                                     "58805": "draw"}
    else:  # no names, and the runner order of an NBA event starts with the away side: no guess
        assert [s.outcome for s in m.selections] == [None, None, None]


def test_a_three_way_basketball_price_is_never_the_best_moneyline() -> None:
    from streaming.aggregate import market_views
    from tests.test_aggregate import NOW, mkt, sel, state

    p = Pipe()
    p.feed(_nba_first_line("HALF_TIME", _NBA_HALF_TIME, _NBA_HALF_TIME_RC), _NBA_RECV)
    bf = msgspec.structs.replace(p.market("1.166811431"), received_at=NOW, source_ts=NOW, event_id="a:e")
    pn = msgspec.structs.replace(mkt("pn:1", "pinnacle", [sel("home", 1.80), sel("away", 2.05)], mtype="moneyline",
                                     specs={"period": "1h"}, event="a:e"), sport="basketball")
    st = state(bf, pn)
    views = {v.market: v for v in market_views(st, st.markets.values(), NOW)}
    assert set(views) == {"match_result:period=1h", "moneyline:period=1h"}
    home = views["moneyline:period=1h"].outcomes[0]
    assert home.outcome == "home" and home.best is not None and (home.best.price, home.best.bookmaker) == (
        1.80, "pinnacle")
    assert {b.bookmaker for o in views["moneyline:period=1h"].outcomes for b in o.books} == {"pinnacle"}


def _live(market_type: str, sport_id: str, runners: list[dict[str, Any]], rc: list[dict[str, Any]]) -> bytes:
    md = definition(runners=runners, marketType=market_type, eventTypeId=sport_id, eventId="33000001")
    return mcm({"id": "1.200", "img": True, "marketDefinition": md, "rc": rc})


def _catalogue(event: str, market_name: str, names: dict[int, str]) -> bytes:
    return raw({"op": "marketCatalogue", "marketId": "1.200", "marketName": market_name,
                "event": {"id": "33000001", "name": event},
                "runners": [{"selectionId": k, "runnerName": v, "handicap": 0.0} for k, v in names.items()]})


def test_an_away_at_home_match_odds_gets_no_side_from_the_runner_order() -> None:
    """NHL MATCH_ODDS from the live stream (no names): "home, away, draw" by
    sortPriority served the Bruins' (away, listed first) 2.60 as the home
    price until the catalogue came, and for good if it never did."""
    p = Pipe()
    runners = [{"id": 1111, "sortPriority": 1, "status": "ACTIVE"}, {"id": 2222, "sortPriority": 2, "status": "ACTIVE"},
               {"id": 58805, "sortPriority": 3, "status": "ACTIVE"}]
    p.feed(_live("MATCH_ODDS", "7524", runners, [{"id": 1111, "atb": [[2.6, 10]]}, {"id": 2222, "atb": [[2.2, 10]]},
                                                 {"id": 58805, "atb": [[4.3, 10]]}]))
    m = p.market("1.200")
    assert m.market_type == "match_result" and [s.outcome for s in m.selections] == [None, None, None]
    p.feed(_catalogue("Boston Bruins @ New York Rangers", "Match Odds",
                      {1111: "Boston Bruins", 2222: "New York Rangers", 58805: "The Draw"}), 6)
    m = p.market("1.200")
    assert {s.selection_id: s.outcome for s in m.selections} == {"1111": "away", "2222": "home", "58805": "draw"}


def test_team_a_of_an_away_at_home_event_is_the_away_side() -> None:
    """TEAM_A_OVER_UNDER_nn was ``team=home`` whatever the event: in "Boston
    Bruins @ New York Rangers" Team A (first named) is the Bruins, away. Live,
    before the event's name is known, the market passes through unmapped."""
    p = Pipe()
    runners = [{"id": 47972, "sortPriority": 1, "status": "ACTIVE"}, {"id": 47973, "sortPriority": 2, "status": "ACTIVE"}]
    p.feed(_live("TEAM_A_OVER_UNDER_25", "7524", runners, [{"id": 47972, "atb": [[1.9, 10]]},
                                                           {"id": 47973, "atb": [[2.0, 10]]}]))
    assert (p.market("1.200").market_type, p.market("1.200").specifiers) == ("raw:team_a_over_under_25", None)
    p.feed(_catalogue("Boston Bruins @ New York Rangers", "Boston Bruins Over/Under 2.5 Goals",
                      {47972: "Under 2.5 Goals", 47973: "Over 2.5 Goals"}), 6)
    m = p.market("1.200")
    assert (m.market_type, m.specifiers) == ("team_total", {"team": "away", "line": "2.5"})
    assert {s.selection_id: s.outcome for s in m.selections} == {"47972": "under", "47973": "over"}
    # "Home v Away" (and soccer without a name): Team A is home
    p = Pipe()
    p.feed(_live("TEAM_A_OVER_UNDER_25", "1", runners, []))
    assert p.market("1.200").specifiers == {"team": "home", "line": "2.5"}


# --- an EACH_WAY market's terms: the definition's eachWayDivisor (audit: never read) ----------------


def test_an_each_way_market_carries_its_fraction_from_the_definition() -> None:
    """ESA's market definition carries ``eachWayDivisor`` (EACH_WAY only: the place part pays
    1/divisor of the odds). It was never read, so a live EACH_WAY market at 1/4 and one at 1/5
    were one market key (``each_way:places=3``): a price of other terms served as this one's.
    The catalogue's names, arriving later, keep the terms."""
    p = Pipe()
    p.feed(image_line(marketType="EACH_WAY", numberOfWinners=3, eachWayDivisor=4.0))
    m = p.market()
    assert (m.market_type, m.specifiers) == ("each_way", {"places": "3", "ew_fraction": "1/4"})
    p.feed(raw({"op": "marketCatalogue", "marketId": MID, "marketName": "Each Way",
                "runners": [{"selectionId": 1, "runnerName": "Militia"}, {"selectionId": 2, "runnerName": "Hasty"}]}))
    m = p.market()
    assert (m.market_type, m.specifiers) == ("each_way", {"places": "3", "ew_fraction": "1/4"})
    assert m.selection("1") is not None and m.selection("1").name == "Militia"  # type: ignore[union-attr]
    # new terms (an integer on the wire) move the key
    p.feed(mcm({"id": MID, "marketDefinition": definition(marketType="EACH_WAY", numberOfWinners=3,
                                                          eachWayDivisor=5, version=2)}, pt=1100))
    assert p.market().specifiers == {"places": "3", "ew_fraction": "1/5"}


def test_the_recorded_limited_overs_cricket_match_odds_is_two_way() -> None:
    """The recording 1.200806927 (Netherlands v Papua New Guinea, an ODI: two runners, ids
    alone, no draw) was keyed ``match_result`` — a two-way price as the three-way market's —
    and its runners took home / away from the 1X2 order. Now ``moneyline``, the key of
    UOF's cricket winner (340); no side is guessed from the order of a two-way market."""
    import json

    from tests.conftest import require_shared_data

    with open(require_shared_data() / "flumine" / "1.200806927", "rb") as f:
        first = f.readline()
    md = json.loads(first)["mc"][0]["marketDefinition"]
    assert (md["eventTypeId"], md["marketType"], len(md["runners"])) == ("4", "MATCH_ODDS", 2)
    p = Pipe()
    p.feed(first, 1657018212979 + 50)
    m = p.market("1.200806927")
    assert (m.sport, m.market_type, m.specifiers) == ("cricket", "moneyline", None)
    assert [s.outcome for s in m.selections] == [None, None]
