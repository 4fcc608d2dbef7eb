"""The UOF normaliser (feed/normalise/uof.py): pure, no broker needed."""

from __future__ import annotations

import pytest

from feed.book import Book
from feed.errors import FeedDecodeError
from feed.models import Market
from feed.normalise.base import NormalisedBatch
from feed.normalise.uof import (
    MAX_MESSAGE_BYTES,
    PRODUCER_DOWN,
    RECOVERY_REQUESTED,
    UofNormaliser,
    decode_cursor,
    encode_cursor,
    peek_control,
    producer_down_payload,
    recovery_requested_payload,
)
from feed.validate import validate_update

T = 1_760_000_000_000
LIVE = "hi.-.live.odds_change.1.sr:match.1.-"
MID = "uof:sr:match:1:1"
TOTAL = "uof:sr:match:1:18:total=2.5"


def odds(ts: int, *markets: str, product: int = 1, event: str = "sr:match:1", status: int | None = None,
         request_id: int | None = None) -> bytes:
    ses = f'<sport_event_status status="{status}"/>' if status is not None else ""
    req = f' request_id="{request_id}"' if request_id is not None else ""
    return (f'<odds_change product="{product}" event_id="{event}" timestamp="{ts}"{req}>{ses}<odds>'
            f'{"".join(markets)}</odds></odds_change>').encode()


def m1x2(a: float = 2.0, b: float = 3.4, c: float = 3.9, status: int | None = None, active_c: int = 1) -> str:
    st = f' status="{status}"' if status is not None else ""
    return (f'<market id="1"{st}><outcome id="1" odds="{a}" active="1"/><outcome id="2" odds="{b}" active="1"/>'
            f'<outcome id="3" odds="{c}" active="{active_c}"/></market>')


def mtotal(over: float = 1.9, under: float = 1.95) -> str:
    return (f'<market id="18" specifiers="total=2.5" status="1"><outcome id="12" odds="{over}" active="1"/>'
            f'<outcome id="13" odds="{under}" active="1"/></market>')


def feed(n: UofNormaliser, raw: bytes, channel: str = LIVE, recv: int | None = None) -> NormalisedBatch:
    batch = n.feed(raw, recv if recv is not None else T + 10_000, channel)
    for u in batch.updates:
        validate_update(u, T + 10_000)  # every update meets the shared bounds
    return batch


def up(n: UofNormaliser, product: int = 1, ts: int = T) -> None:
    n.feed(f'<snapshot_complete product="{product}" request_id="1" timestamp="{ts}"/>'.encode(), T + 10_000,
           "-.-.-.snapshot_complete.-.-.-.-")


def test_odds_change_image_then_delta() -> None:
    n = UofNormaliser()
    b = feed(n, odds(T + 1, m1x2(), mtotal(), status=1))
    assert b.op == "odds_change" and b.provider_ts == T + 1 and b.in_play is True
    assert [u.market_id for u in b.updates] == [MID, TOTAL]
    u = b.updates[0]
    assert u.image and u.source_ts == T + 1 and u.header is not None
    h = u.header
    assert (h.event_id, h.sport, h.market_type, h.market_type_raw, h.status, h.in_play) == (
        "uof:sr:match:1", "soccer", "match_result", "1", "OPEN", True)
    assert [(s.selection_id, s.price, s.status, s.outcome) for s in u.selections] == [
        ("1", 2.0, "ACTIVE", "home"), ("2", 3.4, "ACTIVE", "draw"), ("3", 3.9, "ACTIVE", "away")]
    tot = b.updates[1].header
    assert tot is not None and (tot.market_type, tot.specifiers) == ("total", {"line": "2.5"})
    assert [s.outcome for s in b.updates[1].selections] == ["over", "under"]
    b = feed(n, odds(T + 2, m1x2(a=2.1, active_c=0)))
    (u,) = b.updates
    assert not u.image and u.header is None
    assert [(s.selection_id, s.price, s.status) for s in u.selections] == [("1", 2.1, "ACTIVE"), ("3", 3.9, "SUSPENDED")]
    assert b.runner_changes == 2


@pytest.mark.parametrize(("code", "status", "reason"), [
    (-1, "SUSPENDED", "suspended"), (0, "INACTIVE", None), (-2, "SUSPENDED", "handed_over"),
    (-3, "SETTLED", None), (-4, "CANCELLED", "cancelled"), (1, "OPEN", None)])
def test_market_status_codes(code: int, status: str, reason: str | None) -> None:
    n = UofNormaliser()
    (u,) = feed(n, odds(T + 1, m1x2(status=code))).updates
    assert u.header is not None and (u.header.status, u.header.suspend_reason) == (status, reason)


def test_bet_stop_duplicates_and_out_of_order() -> None:
    n = UofNormaliser()
    feed(n, odds(T + 1, m1x2(), mtotal()))
    stop = f'<bet_stop product="1" event_id="sr:match:1" timestamp="{T + 3}" groups="all"/>'.encode()
    b = feed(n, stop, "hi.-.live.bet_stop.1.sr:match.1.-")
    assert {(u.market_id, u.header.status, u.header.suspend_reason) for u in b.updates if u.header} == {
        (MID, "SUSPENDED", "bet_stop"), (TOTAL, "SUSPENDED", "bet_stop")}
    again = feed(n, stop, "hi.-.live.bet_stop.1.sr:match.1.-")  # a duplicate
    assert again.updates == [] and again.stale
    late = feed(n, odds(T + 2, m1x2(a=5.0)))  # generated before the bet stop, arrived after it
    assert late.updates == [] and late.stale and n.dropped["stale"] == 3
    b = feed(n, odds(T + 4, m1x2(a=2.2)))  # the next odds_change re-opens
    assert b.updates[0].header is not None and b.updates[0].header.status == "OPEN"


STOP = "hi.-.live.bet_stop.1.sr:match.1.-"


def stop(ts: int) -> bytes:
    return f'<bet_stop product="1" event_id="sr:match:1" timestamp="{ts}" groups="all"/>'.encode()


def settle(ts: int, market: str = '<market id="1"><outcome id="1" result="1"/><outcome id="2" result="0"/>'
                                 '<outcome id="3" result="0"/></market>') -> bytes:
    return (f'<bet_settlement product="1" event_id="sr:match:1" timestamp="{ts}" certainty="2"><outcomes>'
            f'{market}</outcomes></bet_settlement>').encode()


def in_play(b: NormalisedBatch) -> dict[str, tuple[str, bool, int]]:
    return {u.market_id: (u.header.status, u.header.in_play, u.source_ts) for u in b.updates if u.header}


def test_a_late_status_does_not_take_the_event_out_of_play() -> None:
    """An odds_change from before the event went live, arriving after it (the queue reordered them),
    does not make its markets "not in play" (the flake of test_faults_end_equal_to_truth)."""
    n = UofNormaliser()
    feed(n, odds(T + 1, m1x2(), mtotal(), status=0))
    assert in_play(feed(n, odds(T + 3, m1x2(a=2.2), mtotal(), status=1))) == {
        MID: ("OPEN", True, T + 3), TOTAL: ("OPEN", True, T + 3)}
    late = feed(n, odds(T + 2, m1x2(a=2.1), status=0))
    assert late.stale and late.updates == [] and late.in_play is True
    assert in_play(feed(n, stop(T + 4), STOP)) == {MID: ("SUSPENDED", True, T + 4), TOTAL: ("SUSPENDED", True, T + 4)}
    assert in_play(feed(n, settle(T + 5))) == {MID: ("SETTLED", True, T + 5)}


def test_a_late_status_reaches_the_markets_whose_later_parts_came_first() -> None:
    """The odds_change taking the event live arrives after a bet_cancel and a bet_stop generated after
    it: its market parts are stale, but the markets are in play from then on (a header change, at
    their own time; a closed market too, since it closed after going live)."""
    n = UofNormaliser()
    feed(n, odds(T + 1, m1x2(), mtotal(), status=0))
    cancel = f'<bet_cancel product="1" event_id="sr:match:1" timestamp="{T + 3}"><market id="18" ' \
             f'specifiers="total=2.5"/></bet_cancel>'
    assert in_play(feed(n, cancel.encode(), "lo.-.live.bet_cancel.1.sr:match.1.-")) == {
        TOTAL: ("CANCELLED", False, T + 3)}
    assert in_play(feed(n, stop(T + 4), STOP)) == {MID: ("SUSPENDED", False, T + 4)}
    b = feed(n, odds(T + 2, m1x2(a=2.1), mtotal(), status=1))
    # (the bet_stop moved the cancelled market's time too: it names every market of the event)
    assert in_play(b) == {MID: ("SUSPENDED", True, T + 4), TOTAL: ("CANCELLED", True, T + 4)}
    assert all(not u.image and not u.selections for u in b.updates)
    assert b.stale and n.dropped["stale"] == 2


def test_a_settlement_overtaken_by_the_final_status_is_kept_as_in_play() -> None:
    """The event's final odds_change (status 4: not live) overtakes the last bet_settlement: the
    settlement is applied (not dropped as older than the header change the final made) and the
    settled market keeps "in play" as of its settlement; a market settled before keeps it too."""
    n = UofNormaliser()
    feed(n, odds(T + 1, m1x2(), mtotal(), status=1))
    feed(n, stop(T + 2), STOP)
    total = ('<market id="18" specifiers="total=2.5"><outcome id="12" result="1"/><outcome id="13" result="0"/>'
             '</market>')
    assert in_play(feed(n, settle(T + 3, total))) == {TOTAL: ("SETTLED", True, T + 3)}
    final = f'<odds_change product="1" event_id="sr:match:1" timestamp="{T + 5}"><sport_event_status status="4"/>' \
            f'</odds_change>'
    assert in_play(feed(n, final.encode())) == {MID: ("SUSPENDED", False, T + 5)}  # the open one follows
    b = feed(n, settle(T + 4))  # generated before the final
    assert not b.stale and in_play(b) == {MID: ("SETTLED", True, T + 5)}
    assert {s.status for s in b.updates[0].selections} == {"WINNER", "LOSER"}


def test_settlement_cancel_and_rollback() -> None:
    n = UofNormaliser()
    feed(n, odds(T + 1, m1x2(), mtotal()))
    settle = (f'<bet_settlement product="1" event_id="sr:match:1" timestamp="{T + 2}" certainty="2"><outcomes>'
              f'<market id="1"><outcome id="1" result="1"/><outcome id="2" result="0"/>'
              f'<outcome id="3" result="0" void_factor="1"/></market></outcomes></bet_settlement>').encode()
    (u,) = feed(n, settle, "lo.-.live.bet_settlement.1.sr:match.1.-").updates
    assert u.header is not None and u.header.status == "SETTLED"
    assert [(s.selection_id, s.status, s.price) for s in u.selections] == [
        ("1", "WINNER", 2.0), ("2", "LOSER", 3.4), ("3", "VOID", 3.9)]
    # a recovery's odds_change of the settled market: its results stand, the header travels (closed market)
    b = feed(n, odds(T + 3, m1x2(a=2.2, status=-3)))
    assert [(s.selection_id, s.status) for u in b.updates for s in u.selections] == [("1", "WINNER")]
    assert b.updates[0].header is not None and b.updates[0].header.status == "SETTLED"
    cancel = f'<bet_cancel product="1" event_id="sr:match:1" timestamp="{T + 4}"><market id="18" ' \
             f'specifiers="total=2.5"/></bet_cancel>'
    (c,) = feed(n, cancel.encode(), "lo.-.live.bet_cancel.1.sr:match.1.-").updates
    assert c.header is not None and (c.header.status, c.header.suspend_reason) == ("CANCELLED", "bet_cancel")
    assert {s.status for s in c.selections} == {"VOID"}
    rollback = cancel.replace("bet_cancel", "rollback_bet_cancel").replace(str(T + 4), str(T + 5))
    (r,) = feed(n, rollback.encode(), "lo.-.live.rollback_bet_cancel.1.sr:match.1.-").updates
    assert r.header is not None and r.header.status == "OPEN" and {s.status for s in r.selections} == {"ACTIVE"}


def test_fixture_change_moves_every_market_of_the_event() -> None:
    n = UofNormaliser()
    feed(n, odds(T + 1, m1x2(), mtotal()))
    b = feed(n, f'<fixture_change product="3" event_id="sr:match:1" timestamp="{T + 2}" start_time="{T + 3_600_000}"'
                f'/>'.encode(), "hi.pre.-.fixture_change.1.sr:match.1.-")
    assert {u.market_id for u in b.updates} == {MID, TOTAL}
    assert all(u.header is not None and u.header.start_time == T + 3_600_000 for u in b.updates)


def test_alive_cursor_and_recovery_bookkeeping() -> None:
    n = UofNormaliser()
    alive = b'<alive product="1" timestamp="%d" subscribed="1"/>'
    b = feed(n, alive % (T + 1), "-.-.-.alive.-.-.-.-")
    assert b.heartbeat and b.cursor is None  # not recovered yet: nothing vouches for the cursor
    feed(n, recovery_requested_payload(1, T + 1, 42, None), RECOVERY_REQUESTED)
    b = feed(n, b'<snapshot_complete product="1" request_id="41" timestamp="%d"/>' % (T + 2),
             "-.-.-.snapshot_complete.-.-.-.-")
    assert b.cursor is None and 1 not in n.up  # an older request's end
    b = feed(n, b'<snapshot_complete product="1" request_id="42" timestamp="%d"/>' % (T + 3),
             "-.-.-.snapshot_complete.-.-.-.-")
    assert b.cursor == "1=%d" % (T + 3)
    b = feed(n, alive % (T + 4), "-.-.-.alive.-.-.-.-")
    assert decode_cursor(b.cursor) == {1: T + 4}
    b = feed(n, b'<alive product="1" timestamp="%d" subscribed="0"/>' % (T + 5), "-.-.-.alive.-.-.-.-")
    assert b.requests == ["recovery:1"] and b.cursor is None and 1 not in n.up
    assert decode_cursor(encode_cursor({3: 5, 1: 7})) == {1: 7, 3: 5}
    assert decode_cursor("garbage;1=x") == {}


def test_producer_down_suspends_and_unconfirms_that_producers_markets() -> None:
    n = UofNormaliser()
    feed(n, odds(T + 1, m1x2(), mtotal()))
    feed(n, odds(T + 1, m1x2(), product=3, event="sr:match:2"), "hi.pre.-.odds_change.1.sr:match.2.-")
    settle = (f'<bet_settlement product="1" event_id="sr:match:1" timestamp="{T + 2}"><outcomes><market id="18" '
              f'specifiers="total=2.5"><outcome id="12" result="1"/><outcome id="13" result="0"/></market>'
              f'</outcomes></bet_settlement>').encode()
    feed(n, settle)
    b = feed(n, producer_down_payload(1, T + 5, "alive_violation"), PRODUCER_DOWN)
    assert b.op == "producer_down" and b.unconfirm == [MID]  # not the settled one, not producer 3's
    (u,) = b.updates
    assert u.header is not None and (u.header.status, u.header.suspend_reason) == ("SUSPENDED", "producer_down")
    # the recovery's odds_change re-images it
    (u,) = feed(n, odds(T + 6, m1x2(), request_id=9)).updates
    assert u.image and u.header is not None and u.header.status == "OPEN" and len(u.selections) == 3
    with pytest.raises(FeedDecodeError) as e:  # the provider cannot send oddsfeed's own messages
        n.feed(producer_down_payload(3, T + 5, "x"), T + 10_000, LIVE)
    assert e.value.reason == "unknown_type"


@pytest.mark.parametrize(("raw", "reason"), [
    (b"<odds_change", "invalid_xml"),
    (b"not xml", "invalid_xml"),
    (b'<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;">]><alive product="1" timestamp="1"/>',
     "invalid_xml"),
    (b'<?xml version="1.0"?><!doctype x SYSTEM "file:///etc/passwd"><alive product="1" timestamp="1"/>',
     "invalid_xml"),
    (b'<gossip product="1" timestamp="1"/>', "unknown_type"),
    (b'<alive product="x" timestamp="1"/>', "invalid_schema"),
    (b'<alive product="1"/>', "invalid_schema"),
    (b'<alive product="1" timestamp="%d"/>' % (T + 3_600_000), "clock_skew"),
    (b"<alive " + b'a="b" ' * (MAX_MESSAGE_BYTES // 6) + b"/>", "too_large"),
])
def test_rejected_whole(raw: bytes, reason: str) -> None:
    n = UofNormaliser()
    with pytest.raises(FeedDecodeError) as e:
        n.feed(raw, T + 10_000, "-.-.-.alive.-.-.-.-")
    assert e.value.reason == reason and e.value.raw
    assert n.markets == {} and n.cursor == {}


def test_a_bad_market_is_rejected_alone_and_re_imaged_next() -> None:
    n = UofNormaliser()
    feed(n, odds(T + 1, m1x2(), mtotal()))
    b = feed(n, odds(T + 2, m1x2(a=0.5), mtotal(over=2.0)))
    assert [u.market_id for u in b.updates] == [TOTAL]
    assert [(r.reason, r.market_id) for r in b.rejected] == [("invalid_price", MID)]
    b = feed(n, odds(T + 3, '<market id="1"><outcome id="1" odds="abc"/></market>'))
    assert [(r.reason, r.market_id) for r in b.rejected] == [("invalid_price", MID)]
    (u,) = feed(n, odds(T + 4, m1x2(a=2.5))).updates
    assert u.image  # its next update re-images it (a change of it was lost)


def test_restore_continues_and_peek_control() -> None:
    n = UofNormaliser()
    b = feed(n, odds(T + 1, m1x2(), mtotal()))
    markets = [Market(market_id=u.market_id, source="uof", source_ts=u.source_ts, selections=u.selections,
                      **{f: getattr(u.header, f) for f in u.header.__struct_fields__})
               for u in b.updates if u.header is not None]
    r = UofNormaliser()
    r.restore(markets, "1=%d;3=%d" % (T, T - 5))
    assert r.cursor == {1: T, 3: T - 5} and r.up == set()
    assert feed(r, odds(T + 1, m1x2(a=9.0))).stale  # not newer than what is stored
    (u,) = feed(r, odds(T + 2, m1x2(a=2.1))).updates
    assert not u.image and [s.selection_id for s in u.selections] == ["1"]
    assert r.markets[TOTAL].specifiers == "total=2.5"
    c = peek_control(b'<alive product="3" timestamp="5" subscribed="0"/>')
    assert c is not None and (c.op, c.product, c.subscribed) == ("alive", 3, False)
    assert peek_control(odds(T, m1x2())) is None and peek_control(b"<alive") is None


CANCEL = "lo.-.live.bet_cancel.1.sr:match.1.-"


def cancel(ts: int, op: str = "bet_cancel", window: str = "",
           market: str = '<market id="1" void_reason="1"/>') -> bytes:
    return f'<{op} product="1" event_id="sr:match:1" timestamp="{ts}"{window}>{market}</{op}>'.encode()


@pytest.mark.parametrize("window", [f' start_time="{T - 20_000}" end_time="{T - 10_000}"',
                                    f' start_time="{T - 20_000}"', f' end_time="{T - 10_000}"'])
def test_a_windowed_bet_cancel_leaves_the_market_trading(window: str, caplog: pytest.LogCaptureFixture) -> None:
    """A bet_cancel with start_time / end_time voids only the bets placed in that window: the market
    keeps trading (not CANCELLED, outcomes not VOID); nothing applies, counted and logged. Its
    rollback undoes only that window's cancel: a whole-market cancel stays until its own rollback."""
    n = UofNormaliser()
    feed(n, odds(T + 1, m1x2(), mtotal(), status=1))
    caplog.set_level("INFO", logger="feed.normalise.uof")
    b = feed(n, cancel(T + 2, window=window), CANCEL)
    assert b.updates == [] and not b.stale and n.dropped["windowed_cancel"] == 1
    assert "bet_cancel of sr:match:1" in caplog.text and "not applied" in caplog.text
    m = n.markets[MID]
    assert (m.status, {s.status for s in m.sels.values()}) == ("OPEN", {"ACTIVE"})
    b = feed(n, cancel(T + 3, window=window, market='<market id="7"/>'), CANCEL)  # a market never seen
    assert b.updates == [] and "uof:sr:match:1:7" not in n.markets
    (u,) = feed(n, odds(T + 4, m1x2(a=2.2))).updates  # its prices go on as deltas
    assert not u.image and [(s.selection_id, s.price, s.status) for s in u.selections] == [("1", 2.2, "ACTIVE")]
    # a whole-market cancel, then a windowed rollback (not its own): still cancelled; its own rollback restores
    (c,) = feed(n, cancel(T + 5), CANCEL).updates
    assert c.header is not None and c.header.status == "CANCELLED" and {s.status for s in c.selections} == {"VOID"}
    b = feed(n, cancel(T + 6, "rollback_bet_cancel", window), "lo.-.live.rollback_bet_cancel.1.sr:match.1.-")
    assert b.updates == [] and n.dropped["windowed_cancel_rollback"] == 1 and n.markets[MID].status == "CANCELLED"
    (r,) = feed(n, cancel(T + 7, "rollback_bet_cancel"), "lo.-.live.rollback_bet_cancel.1.sr:match.1.-").updates
    assert r.header is not None and r.header.status == "OPEN" and {s.status for s in r.selections} == {"ACTIVE"}


def test_rollback_bet_settlement_suspends_until_the_next_odds_change() -> None:
    """A rolled-back settlement: the market is SUSPENDED (settlement_rolled_back), its outcomes
    SUSPENDED with their prices and without the settlement's factors; the next odds_change re-opens."""
    n = UofNormaliser()
    feed(n, odds(T + 1, m1x2(), status=1))
    s = ('<market id="1"><outcome id="1" result="1"/><outcome id="2" result="0" void_factor="0.5"/>'
         '<outcome id="3" result="0"/></market>')
    feed(n, settle(T + 2, s))
    rb = b'<rollback_bet_settlement product="1" event_id="sr:match:1" timestamp="%d"><market id="1"/>' \
         b'</rollback_bet_settlement>' % (T + 3)
    (u,) = feed(n, rb, "lo.-.live.rollback_bet_settlement.1.sr:match.1.-").updates
    assert u.header is not None
    assert (u.header.status, u.header.suspend_reason) == ("SUSPENDED", "settlement_rolled_back")
    assert [(s.selection_id, s.status, s.price, s.void_factor) for s in u.selections] == [
        ("1", "SUSPENDED", 2.0, None), ("2", "SUSPENDED", 3.4, None), ("3", "SUSPENDED", 3.9, None)]
    (u,) = feed(n, odds(T + 4, m1x2())).updates
    assert u.header is not None and u.header.status == "OPEN" and {s.status for s in u.selections} == {"ACTIVE"}


def test_parts_of_the_same_millisecond_apply_in_arrival_order_and_a_redelivery_does_not() -> None:
    """A bet_stop generated in the millisecond of the odds_change before it suspends the market (it
    was dropped as stale: the market stayed OPEN); the same message delivered again changes
    nothing; another message of that millisecond applies; an older one is stale."""
    n = UofNormaliser()
    first = odds(T + 1, m1x2(), mtotal(), status=0)
    feed(n, first)
    b = feed(n, stop(T + 1), STOP)
    assert in_play(b) == {MID: ("SUSPENDED", False, T + 1), TOTAL: ("SUSPENDED", False, T + 1)} and not b.stale
    for again, channel in ((first, LIVE), (stop(T + 1), STOP)):  # redeliveries (a nack, requeue)
        b = feed(n, again, channel)
        assert b.updates == [] and b.stale
    assert n.markets[MID].status == "SUSPENDED" and n.dropped["stale"] == 4
    (u,) = feed(n, odds(T + 1, m1x2(a=2.3))).updates  # a later message of the same ms re-opens
    assert u.header is not None and u.header.status == "OPEN" and [s.price for s in u.selections] == [2.3]
    assert feed(n, odds(T, m1x2(a=9.0))).stale  # older: stale
    fixture = b'<fixture_change product="3" event_id="sr:match:1" timestamp="%d" start_time="%d"/>'
    feed(n, fixture % (T + 5, T + 3_600_000), "hi.pre.-.fixture_change.1.sr:match.1.-")
    b = feed(n, fixture % (T + 5, T + 7_200_000), "hi.pre.-.fixture_change.1.sr:match.1.-")
    assert {u.header.start_time for u in b.updates if u.header} == {T + 7_200_000}
    assert feed(n, fixture % (T + 5, T + 7_200_000), "hi.pre.-.fixture_change.1.sr:match.1.-").stale


PRE = "hi.pre.-.odds_change.1.sr:match.1.-"


def test_a_prematch_producers_status_does_not_take_a_live_event_out_of_play() -> None:
    """Ctrl (product 3) says 0 after LiveOdds (product 1) said 1: the event stays in play, its state
    LIVE — in arrival order, and when Ctrl's later status arrives before LiveOdds' earlier one.
    LiveOdds' own "not in play" does take it out; Ctrl's status of an event not live applies."""
    n = UofNormaliser()
    feed(n, odds(T + 1, m1x2(), product=3, status=0), PRE)
    b = feed(n, odds(T + 2, mtotal(), status=1))
    assert in_play(b) == {TOTAL: ("OPEN", True, T + 2), MID: ("OPEN", True, T + 2)}
    assert [(s.status, s.in_play) for s in b.event_states] == [("LIVE", True)]
    b = feed(n, odds(T + 3, m1x2(status=-2), product=3, status=0), PRE)  # Ctrl hands its market over
    assert in_play(b) == {MID: ("SUSPENDED", True, T + 3)} and b.in_play is True and b.event_states == []
    assert n.dropped["prematch_status"] == 1 and n.states["uof:sr:match:1"].status == "LIVE"
    b = feed(n, odds(T + 4, status=3))  # LiveOdds: ended
    assert in_play(b) == {MID: ("SUSPENDED", False, T + 4), TOTAL: ("OPEN", False, T + 4)}
    # reordered: Ctrl's 0 of T+12 arrives before LiveOdds' 1 of T+11
    r = UofNormaliser()
    feed(r, odds(T + 10, m1x2(), mtotal(), product=3, status=0), PRE)
    feed(r, odds(T + 12, m1x2(a=2.2), product=3, status=0), PRE)
    b = feed(r, odds(T + 11, mtotal(over=2.0), status=1))  # its market part is newer for TOTAL only
    assert in_play(b) == {TOTAL: ("OPEN", True, T + 11), MID: ("OPEN", True, T + 12)}
    assert r.events["sr:match:1"].in_play is True


def test_a_live_producers_market_without_a_status_is_in_play_until_one_is_known() -> None:
    """sport_event_status is optional (minOccurs=0): a LiveOdds market of an event whose status is
    not known reads in play (a Ctrl one not); once a status is known every market reads it."""
    n = UofNormaliser()
    (u,) = feed(n, odds(T + 1, m1x2())).updates
    assert u.header is not None and u.header.in_play is True
    other = odds(T + 1, m1x2(), product=3, event="sr:match:2")
    (u,) = feed(n, other, "hi.pre.-.odds_change.1.sr:match.2.-").updates
    assert u.header is not None and u.header.in_play is False
    b = feed(n, odds(T + 2, mtotal(), status=0))  # the event's status: not started; the other market follows
    assert in_play(b) == {TOTAL: ("OPEN", False, T + 2), MID: ("OPEN", False, T + 2)}
    (u,) = feed(n, odds(T + 3, '<market id="18" specifiers="total=3.5"><outcome id="12" odds="1.5"/></market>')).updates
    assert u.header is not None and u.header.in_play is False  # a new market inherits the known status


@pytest.mark.parametrize(("code", "state"), [(2, "SUSPENDED"), (7, "INTERRUPTED")])
def test_a_suspended_or_interrupted_match_stays_in_play(code: int, state: str) -> None:
    """Status 2 ("the match will continue") and 7 (an interruption of a few minutes) are a match under
    way: its markets stay in play (judged by the in-play limits), the state says so too."""
    n = UofNormaliser()
    feed(n, odds(T + 1, m1x2(), status=1))
    b = feed(n, odds(T + 2, m1x2(a=2.2), status=code))
    assert in_play(b) == {} and b.updates[0].selections and b.in_play is True
    assert [(s.status, s.in_play) for s in b.event_states] == [(state, True)]
    assert n.markets[MID].header is not None and n.markets[MID].header.in_play is True
    b = feed(n, odds(T + 3, m1x2(), status=3))
    assert in_play(b) == {MID: ("OPEN", False, T + 3)} and b.event_states[0].in_play is False


FINAL = b'<odds_change product="1" event_id="sr:match:1" timestamp="%d"><sport_event_status status="4"/></odds_change>'
RB_SETTLE = "lo.-.live.rollback_bet_settlement.1.sr:match.1.-"


def rollback_settle(ts: int) -> bytes:
    return (b'<rollback_bet_settlement product="1" event_id="sr:match:1" timestamp="%d"><market id="1"/>'
            b'</rollback_bet_settlement>' % ts)


def restarted(*before: tuple[bytes, str]) -> tuple[UofNormaliser, Book]:
    """Feed ``before`` into a normaliser and a book, then restore a new normaliser from the book's
    markets (a restart): the normaliser and the book."""
    n, book = UofNormaliser(), Book()
    for raw, channel in before:
        for u in feed(n, raw, channel).updates:
            book.apply(u, 0, "s1")
    r = UofNormaliser()
    r.restore(list(book.markets.values()), "1=%d" % T)
    return r, book


def into(book: Book, b: NormalisedBatch) -> NormalisedBatch:
    for u in b.updates:
        assert book.apply(u, 0, "s1") is not None
    return b


def test_a_restored_market_takes_a_settlement_older_than_its_stored_time() -> None:
    """The final status (T+5) moves the suspended market's stored source_ts past its own last part
    (the bet_stop at T+2); after a restart the settlement of T+4 (generated before the final,
    replayed by the recovery or redelivered) is applied, not dropped as older than T+5 (a lost
    settlement: the market stayed SUSPENDED); applied again it changes nothing. An odds_change up
    to the stored time is still taken as applied; a part newer than it makes the market's own time
    known again."""
    r, book = restarted((odds(T + 1, m1x2(), mtotal(), status=1), LIVE), (stop(T + 2), STOP), (FINAL % (T + 5), LIVE))
    assert (book.markets[MID].source_ts, book.markets[MID].status) == (T + 5, "SUSPENDED")
    assert feed(r, odds(T + 3, m1x2(a=9.0))).stale  # an odds_change: taken as applied (the recovery re-images)
    b = into(book, feed(r, settle(T + 4)))
    assert not b.stale and in_play(b) == {MID: ("SETTLED", False, T + 5)}  # source_ts never goes back
    assert [(s.selection_id, s.status) for s in b.updates[0].selections] == [
        ("1", "WINNER"), ("2", "LOSER"), ("3", "LOSER")]
    assert book.markets[MID].status == "SETTLED"
    again = feed(r, settle(T + 4))  # a duplicate: nothing changes
    assert again.updates == [] and r.markets[MID].status == "SETTLED"
    assert {s.status for s in r.markets[MID].sels.values()} == {"WINNER", "LOSER"}
    # a bet_stop of T+3: older than the settlement applied since the restore (stale for it), the total's own
    # (it applies: suspended already, nothing to emit)
    dropped = r.dropped["stale"]
    b = feed(r, stop(T + 3), STOP)
    assert not b.stale and b.updates == [] and r.dropped["stale"] == dropped + 1
    assert (r.markets[TOTAL].status, r.markets[TOTAL].unsure) == ("SUSPENDED", T + 3)
    # a part newer than the stored time makes the market's own time known again: a settlement up to it is stale
    (u,) = into(book, feed(r, odds(T + 6, mtotal(over=2.0)))).updates
    assert not u.image and r.markets[TOTAL].unsure is None
    b = feed(r, settle(T + 5, '<market id="18" specifiers="total=2.5"><outcome id="12" result="1"/></market>'))
    assert b.stale and b.updates == [] and r.markets[TOTAL].status == "OPEN"


def test_a_restored_market_replays_a_settlement_and_its_rollback_in_their_order() -> None:
    """After a restart, a recovery replays a settlement (T+3) and its rollback (T+4), both older than
    the stored time (T+5, moved by the final status): the market ends rolled back, as before the
    restart; a rollback only undoes a close made since the restore (a market stored settled keeps it)."""
    r, _ = restarted((odds(T + 1, m1x2(), status=1), LIVE), (stop(T + 2), STOP), (FINAL % (T + 5), LIVE))
    assert feed(r, rollback_settle(T + 3), RB_SETTLE).stale  # nothing settled since the restore: nothing to undo
    assert in_play(feed(r, settle(T + 3))) == {MID: ("SETTLED", False, T + 5)}
    b = feed(r, rollback_settle(T + 4), RB_SETTLE)
    assert in_play(b) == {MID: ("SUSPENDED", False, T + 5)} and r.markets[MID].reason == "settlement_rolled_back"
    assert feed(r, settle(T + 3)).stale  # older than the rollback
    assert feed(r, rollback_settle(T + 4), RB_SETTLE).stale  # again: not settled, nothing to undo
    # a whole-market cancel (older than the stored time) and its rollback, in their order
    b = feed(r, cancel(T + 4), CANCEL)
    assert in_play(b) == {MID: ("CANCELLED", False, T + 5)} and {s.status for s in b.updates[0].selections} == {"VOID"}
    (u,) = feed(r, cancel(T + 4, "rollback_bet_cancel"), "lo.-.live.rollback_bet_cancel.1.sr:match.1.-").updates
    assert u.header is not None and (u.header.status, u.header.suspend_reason) == (
        "SUSPENDED", "settlement_rolled_back")
    # a market stored settled, then a start time change: its stored time stays the settlement's (a start time
    # change does not move a closed market's time), so the rollback of that settlement applies after the restart
    # (test_a_start_time_change_never_blocks_the_rollback_of_a_close)
    fixture = b'<fixture_change product="3" event_id="sr:match:1" timestamp="%d" start_time="%d"/>' % (
        T + 4, T + 3_600_000)
    r, _ = restarted((odds(T + 1, m1x2(), status=1), LIVE), (settle(T + 2), LIVE),
                     (fixture, "hi.pre.-.fixture_change.1.sr:match.1.-"))
    assert r.markets[MID].status == "SETTLED" and r.markets[MID].ts == T + 2
    assert feed(r, settle(T + 2)).stale  # a settlement up to its stored time is taken as applied
    assert not feed(r, rollback_settle(T + 3), RB_SETTLE).stale and r.markets[MID].status == "SUSPENDED"


CTRL_STOP = "hi.pre.-.bet_stop.1.sr:match.1.-"


def test_a_prematch_status_never_takes_a_live_producers_market_out_of_play() -> None:
    """Ctrl's (product 3) status 0 as the first status known of the event: a market LiveOdds prices
    stays in play (LiveOdds' odds are live odds; it went back to "not in play", judged by the
    pre-match limits) — whether Ctrl's status comes before or after LiveOdds' odds, through a Ctrl
    bet_stop, and for a market LiveOdds settles. Ctrl's own market reads Ctrl's status; LiveOdds'
    own "not started" does take the LiveOdds market out of play, its "live" back in."""
    n = UofNormaliser()
    (u,) = feed(n, odds(T + 1, m1x2())).updates  # LiveOdds, no status yet: in play
    assert u.header is not None and u.header.in_play is True
    b = feed(n, odds(T + 2, mtotal(), product=3, status=0), PRE)  # Ctrl's 0: the first status known
    assert in_play(b) == {TOTAL: ("OPEN", False, T + 2)}  # the LiveOdds market is not moved
    assert n.markets[MID].header is not None and n.markets[MID].header.in_play is True
    b = feed(n, settle(T + 3))  # settled by LiveOdds: in play as of its close
    assert in_play(b) == {MID: ("SETTLED", True, T + 3)}
    # the other order: Ctrl's 0 first, then LiveOdds' odds; a Ctrl bet_stop does not re-attribute it
    r = UofNormaliser()
    feed(r, odds(T + 1, mtotal(), product=3, status=0), PRE)
    (u,) = feed(r, odds(T + 2, m1x2())).updates
    assert u.header is not None and u.header.in_play is True
    ctrl_stop = f'<bet_stop product="3" event_id="sr:match:1" timestamp="{T + 3}" groups="all"/>'.encode()
    assert in_play(feed(r, ctrl_stop, CTRL_STOP)) == {
        MID: ("SUSPENDED", True, T + 3), TOTAL: ("SUSPENDED", False, T + 3)}
    b = feed(r, odds(T + 4, status=0))  # LiveOdds' own status: not started
    assert in_play(b) == {MID: ("SUSPENDED", False, T + 4)} and r.states["uof:sr:match:1"].status == "NOT_STARTED"
    b = feed(r, odds(T + 5, status=1))  # LiveOdds: live (every market)
    assert in_play(b) == {MID: ("SUSPENDED", True, T + 5), TOTAL: ("SUSPENDED", True, T + 5)}


FIXTURE = "hi.pre.-.fixture_change.1.sr:match.1.-"


def fixture_change(ts: int, start: int) -> bytes:
    return b'<fixture_change product="3" event_id="sr:match:1" timestamp="%d" start_time="%d"/>' % (ts, start)


def test_a_start_time_change_never_blocks_the_rollback_of_a_close() -> None:
    """A settled (cancelled) market, then a start-time change, then a restart: the rollback generated
    after the settlement (cancel) but delivered after the start-time change applies — it was compared
    with the stored time the start-time change had moved and dropped (the market stayed SETTLED: a
    lost change). The start-time change still reaches the closed market; a rollback older than a
    later settlement of the market is still stale."""
    start = T + 3_600_000
    r, book = restarted((odds(T + 1, m1x2(), status=1), LIVE), (settle(T + 2), LIVE),
                        (fixture_change(T + 4, start), FIXTURE))
    assert (book.markets[MID].status, book.markets[MID].start_time) == ("SETTLED", start)
    b = into(book, feed(r, rollback_settle(T + 3), RB_SETTLE))
    assert not b.stale and in_play(b) == {MID: ("SUSPENDED", True, T + 3)}
    assert (book.markets[MID].status, book.markets[MID].suspend_reason) == ("SUSPENDED", "settlement_rolled_back")
    assert {s.status for s in book.markets[MID].selections} == {"SUSPENDED"}
    # without a restart: the same, in the book
    n, book = UofNormaliser(), Book()
    for raw, channel in ((odds(T + 1, m1x2(), status=1), LIVE), (cancel(T + 2), CANCEL),
                         (fixture_change(T + 4, start), FIXTURE)):
        into(book, feed(n, raw, channel))
    b = into(book, feed(n, cancel(T + 3, "rollback_bet_cancel"), "lo.-.live.rollback_bet_cancel.1.sr:match.1.-"))
    assert in_play(b) == {MID: ("OPEN", True, T + 3)} and book.markets[MID].status == "OPEN"
    # a cancelled market, restarted: its rollback applies too
    r, book = restarted((odds(T + 1, m1x2(), status=1), LIVE), (cancel(T + 2), CANCEL),
                        (fixture_change(T + 4, start), FIXTURE))
    b = into(book, feed(r, cancel(T + 3, "rollback_bet_cancel"), "lo.-.live.rollback_bet_cancel.1.sr:match.1.-"))
    assert in_play(b) == {MID: ("SUSPENDED", True, T + 3)} and book.markets[MID].suspend_reason == "cancel_rolled_back"
    # settled, rolled back, settled again, then the start-time change: the old rollback (redelivered after
    # the restart) belongs to the first settlement, undone already: stale, the market stays settled
    r, book = restarted((odds(T + 1, m1x2(), status=1), LIVE), (settle(T + 2), LIVE),
                        (rollback_settle(T + 3), RB_SETTLE), (settle(T + 4), LIVE),
                        (fixture_change(T + 6, start), FIXTURE))
    assert book.markets[MID].status == "SETTLED"
    assert feed(r, rollback_settle(T + 3), RB_SETTLE).stale and r.markets[MID].status == "SETTLED"


def test_a_market_first_seen_in_an_odds_change_older_than_the_events_bet_stop_is_stopped() -> None:
    """An event-wide bet_stop (T+5), then an odds_change generated before it (T+3, another producer)
    naming a market not seen yet: that market is suspended by the bet_stop as the markets the stop
    reached are (it was served OPEN at T+3's prices, the event stopped), and stamped with it (a part
    between them is stale, the stop again a duplicate); one generated after the stop opens it."""
    n = UofNormaliser()
    feed(n, odds(T + 1, m1x2(), status=1))
    feed(n, stop(T + 5), STOP)
    b = feed(n, odds(T + 3, mtotal(), product=3), PRE)
    assert in_play(b) == {TOTAL: ("SUSPENDED", True, T + 5)} and n.markets[TOTAL].reason == "bet_stop"
    assert [s.price for s in b.updates[0].selections] == [1.9, 1.95]  # its prices are kept (suspended)
    assert feed(n, odds(T + 4, mtotal(over=2.5), product=3), PRE).stale
    assert feed(n, stop(T + 5), STOP).stale  # a redelivery of the stop
    other = '<market id="18" specifiers="total=3.5"><outcome id="12" odds="1.5"/><outcome id="13" odds="2.5"/></market>'
    b = feed(n, odds(T + 5, other, product=3), PRE)  # of the stop's ms (after it): not stopped
    assert in_play(b) == {"uof:sr:match:1:18:total=3.5": ("OPEN", True, T + 5)}
    (u,) = feed(n, odds(T + 6, mtotal(over=2.0))).updates  # the next odds_change re-opens it
    assert u.header is not None and u.header.status == "OPEN"
