"""An ingest whose clock runs ahead of an API node's must not make its prices
read younger than they are (trust audit of the price check, architecture §65).

Ages and the health lease are the node's clock minus times the ingest stamped
with its own. With the ingest host 30 s ahead, a dead ingest's last record read
alive — and its markets 0 ms old — for 30 s plus the lease: ``OK`` answers on
prices nobody confirmed.
"""

from __future__ import annotations

from feed.models import CLOCK_SKEW, MAX_CLOCK_SKEW_MS, Market, Selection, SourceHealth
from feed.settings import Settings
from streaming.pricecheck import PriceCheckRequest, check
from streaming.state import NodeState, now_ms

SKEW_MS = 30_000
REQ = PriceCheckRequest(market_id="bf:1.1", selection_id="1", side="back", price=2.0)


def _state(stamped_at: int) -> NodeState:
    st = NodeState(Settings(), 1)
    m = Market(market_id="bf:1.1", source="t", in_play=True, seq=5, received_at=stamped_at - 500,
               source_ts=stamped_at - 500, session="s1",
               selections=[Selection(selection_id="1", price=2.0, back=[(2.0, 10.0)])])
    st.markets[m.market_id] = m
    st.loaded = True
    st.set_health([SourceHealth(source="t", state="UP", last_message_at=stamped_at, updated_at=stamped_at,
                                lease_ms=5000, session="s1")])
    return st


def test_records_stamped_ahead_of_the_node_make_the_source_down_not_fresh() -> None:
    now = now_ms()
    st = _state(now + SKEW_MS)  # the ingest's clock is 30 s ahead
    r = check(st, REQ, now)
    assert r.reason == "SOURCE_DOWN" and CLOCK_SKEW in r.message, r
    assert st.age_stale(st.markets["bf:1.1"], now)[1] is True
    h = st.source_health("t", now)
    assert h is not None and h.state == "DOWN" and h.reason == CLOCK_SKEW


def test_a_skewed_ingest_that_dies_stays_down_until_a_record_within_the_bound_comes() -> None:
    now = now_ms()
    st = _state(now + SKEW_MS)
    # the ingest died at once; 31 s later (node time) its last record is no longer ahead of the
    # node's clock and its lease (5 s, its clock) has not run out: read at that moment alone it
    # would be alive and current — the node remembers it saw the source's clock ahead
    later = now + SKEW_MS + 1_000
    r = check(st, REQ, later)
    assert r.reason == "SOURCE_DOWN" and CLOCK_SKEW in r.message, r
    # the same record read again (no new one) keeps it so; a new record within the bound clears it
    st.set_health([st.health["t"]])
    assert check(st, REQ, later).reason == "SOURCE_DOWN"
    fresh = now_ms()
    st.set_health([SourceHealth(source="t", state="UP", last_message_at=fresh, updated_at=fresh, lease_ms=5000,
                                session="s1")])
    assert "t" not in st.skewed
    h = st.source_health("t", fresh)
    assert h is not None and h.state == "UP"


def test_a_skew_within_the_bound_is_tolerated() -> None:
    now = now_ms()
    st = _state(now + MAX_CLOCK_SKEW_MS // 2)
    assert check(st, REQ, now).reason == "OK"


def test_stamps_made_while_the_clock_ran_ahead_are_corrected_after_the_clocks_agree() -> None:
    """The skewed ingest died and a new one (true clock, new session) took over: its first record
    cleared the skew — and the markets the old one stamped 30 s ahead read 0 ms old, answering
    OK on prices nobody confirmed (review, §65). Their stamps are now read less the skew seen."""
    now = now_ms()
    st = _state(now + SKEW_MS)  # seen alive and 30 s ahead: the market stamped now + 29.5 s
    later = now + 13_000  # it died; 13 s on, a new ingest with a true clock writes its first record
    st.set_health([SourceHealth(source="t", state="UP", last_message_at=later, updated_at=later, lease_ms=5000,
                                session="s2")], now=later)
    assert "t" not in st.skewed  # the source itself is trusted again
    age, stale = st.age_stale(st.markets["bf:1.1"], later)
    assert age >= 13_000 and stale, (age, stale)  # the market's real age, not 0
    r = check(st, REQ, later)
    assert r.reason == "STALE" and r.age_ms is not None and r.age_ms >= 13_000, r


def test_a_market_stamped_ahead_of_the_node_is_not_answered_ok() -> None:
    """A market stamped more than the bound ahead of the node's clock (its source not, or no
    longer, known to be skewed) streams stale; the price check dropped that flag and said OK."""
    now = now_ms()
    st = _state(now)
    m = st.markets["bf:1.1"]
    st.markets["bf:1.1"] = type(m)(**{**{f: getattr(m, f) for f in m.__struct_fields__},
                                      "received_at": now + 5_000})
    assert st.age_stale(st.markets["bf:1.1"], now)[1] is True
    r = check(st, REQ, now)
    assert r.reason == "STALE" and "ahead of this node's clock" in r.message, r


def test_a_market_stamped_ahead_streams_stale_even_when_its_provider_time_bounds_its_age() -> None:
    """A skewed ingest's market carries a receipt 29.5 s ahead and a true provider time; the
    backlog bound (``max_lag_ms``) took its age from the provider time and the stream marker said
    fresh, while the price check said STALE (found by the ``ingest_clock_ahead`` fault row)."""
    now = now_ms()
    st = _state(now)
    m = st.markets["bf:1.1"]
    st.markets["bf:1.1"] = type(m)(**{**{f: getattr(m, f) for f in m.__struct_fields__},
                                      "received_at": now + 29_500, "source_ts": now - 50})
    st.set_health([SourceHealth(source="t", state="UP", last_message_at=now - 500, updated_at=now - 500,
                                lease_ms=5000, session="s1", max_lag_ms=1000)])
    assert st.age_stale(st.markets["bf:1.1"], now)[1] is True
    assert check(st, REQ, now).reason == "STALE"
