"""Book: a market id's seq never goes backwards across a prune and a restart (docs/architecture.md §69)."""

from __future__ import annotations

import feed.book
from feed.book import Book
from feed.models import MarketHeader, Selection
from feed.normalise.base import MarketUpdate

NOW = 1_800_000_000_000
HOUR = 3_600_000


def _image(mid: str, price: float, ts: int = NOW) -> MarketUpdate:
    return MarketUpdate(market_id=mid, source="t", image=True, header=MarketHeader(sport="soccer", status="OPEN"),
                        selections=[Selection(selection_id="1", price=price, back=[(price, 10.0)])],
                        source_ts=ts, received_at=ts + 5)


def _price(mid: str, price: float, ts: int) -> MarketUpdate:
    return MarketUpdate(market_id=mid, source="t", image=False, header=None,
                        selections=[Selection(selection_id="1", price=price, back=[(price, 10.0)])],
                        source_ts=ts, received_at=ts + 5)


def _close(mid: str, ts: int) -> MarketUpdate:
    return MarketUpdate(market_id=mid, source="t", image=False, selections=[], source_ts=ts, received_at=ts + 5,
                        header=MarketHeader(sport="soccer", status="CLOSED"))


def test_a_pruned_market_continues_its_seq_however_many_markets_were_pruned_since(monkeypatch) -> None:
    """The book remembered pruned markets' seqs in a map bounded at 100k entries: past that bound
    (here shrunk to 1) a re-imaged market started again at seq 1, below what clients hold. One
    seq floor forgets nothing."""
    monkeypatch.setattr(feed.book, "PRUNED_SEQ_KEPT", 1, raising=False)
    book = Book()
    for u in (_image("a", 2.0), _price("a", 2.2, NOW + 1), _price("a", 2.4, NOW + 2), _close("a", NOW + 3),
              _image("b", 3.0), _close("b", NOW + 3)):
        assert book.apply(u) is not None
    assert sorted(book.prune_closed(NOW + 2 * HOUR, HOUR)) == [("a", 4), ("b", 2)]
    again = book.apply(_image("a", 5.0, NOW + 10))
    assert again is not None and again.kind == "image" and again.seq > 4
    new = book.apply(_image("c", 1.5, NOW + 10))  # a market new to the book starts above the floor too
    assert new is not None and new.seq > 4


def test_restore_seeds_the_floor_and_rebase_reimages_above_the_stores_floor() -> None:
    book = Book()
    book.restore([], seq_floor=7)  # the store's floor (Store.seq_floor) at a restart
    first = book.apply(_image("m", 2.0))
    assert first is not None and first.seq == 8
    d = book.apply(_price("m", 2.2, NOW + 1))
    assert d is not None and d.seq == 9
    # the store refused m (pruned at seq 20 by another writer): one image of the current state above it
    image = book.rebase("m", 20)
    assert image is not None and (image.kind, image.seq) == ("image", 21)
    assert image.market is not None and image.market.seq == 21 and image.market.selections[0].price == 2.2
    assert book.markets["m"] == image.market and book.seq_floor == 20
    d = book.apply(_price("m", 2.4, NOW + 2))
    assert d is not None and d.seq == 22
    n = book.apply(_image("n", 3.0))  # learnt: markets new to the book start above the store's floor
    assert n is not None and n.seq == 21
    assert book.rebase("unknown", 30) is None and book.seq_floor == 30
    # a book already above the floor still moves up: the image replaces deltas never stored
    image = book.rebase("m", 5)
    assert image is not None and image.seq == 23

