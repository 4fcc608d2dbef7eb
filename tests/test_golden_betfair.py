"""Golden tests: every shared Betfair recording, our normaliser + book vs betfairlightweight.

For each file under ``../shared/data/betfair-stream`` that
:func:`feed.sources.replay.read_messages` accepts, every line goes through
``BetfairNormaliser`` + ``Book`` and, independently, through
betfairlightweight (:mod:`golden`). After 1/3 and 2/3 of the lines and at the
end, every market and selection must agree: best three back and lay levels
(price and size), ltp, selection status, adjustment factor, BSP, market
status, in-play, bet delay and version. Lines betfairlightweight cannot
process must be rejected or ignored by us, and our rejected lines must be
exactly the expected ones, with the expected reason.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from conftest import BETFAIR_DATA, require_shared_data
from golden import DEPTH, GoldenDecoder, LineResult, MarketView, SelectionView

from feed.book import Book
from feed.errors import FeedDecodeError
from feed.models import Market
from feed.normalise.betfair import BetfairNormaliser
from feed.sources.replay import read_messages, recording_files
from feed.validate import MAX_TIME_MS

#: receive time given to our normaliser: after every recording's ``pt``
#: (which is kept as source_ts), so that no recorded time reads as future skew
RECV_MS = MAX_TIME_MS

pytestmark = pytest.mark.shared_data

#: file → {0-based line index: rejection reason}: the line was rejected whole,
#: or some of its markets were (``batch.rejected``, all for this reason).
#: Every other line of every file must be accepted whole. unknown_market
#: markets are deltas for markets the file never defined (betfairlightweight
#: builds a cache from them): exactly those markets are rejected.
EXPECTED_REJECTIONS: dict[str, dict[int, str]] = {
    # the last line is the tail of a line split by the recorder (not JSON)
    "fixtures/RECORDED-1.173718164": {3: "invalid_json"},
    "fixtures/streaming_mcm_RESUB_DELTA.json": {0: "unknown_market"},
    "fixtures/streaming_mcm_UPDATE_tv.json": {0: "unknown_market"},
    "fixtures/streaming_mcm_update.json": {0: "unknown_market"},
}

#: files whose lines betfairlightweight cannot process, and how
EXPECTED_BFLW_FAILURES: dict[str, dict[int, str]] = {
    "fixtures/RECORDED-1.173718164": {3: "invalid_json"},
    # {"op":"mcm","id":2,"status":503}: MarketStream.on_update reads data["pt"]
    "fixtures/streaming_503.json": {0: "error"},
}


def _files() -> list[str]:
    if not BETFAIR_DATA.is_dir():
        return ["<shared data missing>"]
    return [str(p.relative_to(BETFAIR_DATA)) for p in recording_files([BETFAIR_DATA])]


class Ours:
    """Our pipeline: BetfairNormaliser → Book, recording each line's fate."""

    def __init__(self) -> None:
        self.normaliser = BetfairNormaliser()
        self.book = Book()
        self.rejected: dict[int, FeedDecodeError] = {}  # lines rejected whole
        self.rejected_markets: dict[int, list[FeedDecodeError]] = {}  # markets rejected alone, by line
        self.updates: dict[int, int] = {}

    def feed(self, index: int, raw: bytes) -> None:
        try:
            batch = self.normaliser.feed(raw, recv_ms=RECV_MS)  # source_ts = pt
        except FeedDecodeError as exc:
            self.rejected[index] = exc
            return
        if batch.rejected:
            self.rejected_markets[index] = batch.rejected
        self.updates[index] = len(batch.updates)
        for update in batch.updates:
            self.book.apply(update, stored_at=1)

    def rejections(self) -> dict[int, str]:
        """Line → reason, for lines rejected whole or in part."""
        out = {i: e.reason for i, e in self.rejected.items()}
        for i, errors in self.rejected_markets.items():
            out[i] = "+".join(sorted({e.reason for e in errors}))
        return out

    def rejected_market_ids(self, bflw: dict[int, LineResult]) -> set[str]:
        """Raw ids of every market a rejection (whole or alone) kept from us."""
        ids = {m for j in self.rejected for m in bflw[j].markets}
        ids |= {(e.market_id or "").removeprefix("bf:") for errors in self.rejected_markets.values() for e in errors}
        return ids

    def snapshot(self) -> dict[str, MarketView]:
        return {mid.removeprefix("bf:"): _view(m) for mid, m in self.book.markets.items()}


def _view(m: Market) -> MarketView:
    return MarketView(
        status=m.status,
        in_play=m.in_play,
        bet_delay=m.bet_delay_s,
        version=m.version,
        selections={
            s.selection_id: SelectionView(
                status=s.status,
                back=tuple((float(p), float(v)) for p, v in s.back[:DEPTH]),
                lay=tuple((float(p), float(v)) for p, v in s.lay[:DEPTH]),
                ltp=s.ltp,
                adjustment_factor=s.adjustment_factor,
                bsp=s.bsp,
            )
            for s in m.selections
        },
    )


def _diff(ours: dict[str, MarketView], gold: dict[str, MarketView], where: str, only_ours: bool) -> list[str]:
    out: list[str] = []
    ids = sorted(ours) if only_ours else sorted(set(ours) | set(gold))
    for mid in ids:
        o, g = ours.get(mid), gold.get(mid)
        if o is None or g is None:
            out.append(f"{where} market {mid}: ours={'present' if o else 'missing'} bflw={'present' if g else 'missing'}")
            continue
        for f in ("status", "in_play", "bet_delay", "version"):
            if getattr(o, f) != getattr(g, f):
                out.append(f"{where} market {mid} {f}: ours={getattr(o, f)!r} bflw={getattr(g, f)!r}")
        for sid in sorted(set(o.selections) | set(g.selections)):
            os_, gs = o.selections.get(sid), g.selections.get(sid)
            if os_ is None or gs is None:
                out.append(f"{where} market {mid} selection {sid}: ours={os_} bflw={gs}")
                continue
            for f in ("status", "back", "lay", "ltp", "adjustment_factor", "bsp"):
                if getattr(os_, f) != getattr(gs, f):
                    out.append(f"{where} market {mid} selection {sid} {f}: "
                               f"ours={getattr(os_, f)!r} bflw={getattr(gs, f)!r}")
    return out


def _replay(name: str, messages: list[bytes]) -> tuple[Ours, GoldenDecoder, dict[int, LineResult], list[str], int]:
    """Feed ``messages`` to both sides; compare after 1/3, 2/3 and all lines.

    Returns our side, the golden decoder, bflw's per-line results, the
    differences found and how many selections were compared."""
    n = len(messages)
    checkpoints = sorted({n // 3, 2 * n // 3, n} - {0})
    ours, gold = Ours(), GoldenDecoder()
    bflw: dict[int, LineResult] = {}
    compared = 0
    problems: list[str] = []
    for i, raw in enumerate(messages):
        ours.feed(i, raw)
        bflw[i] = gold.feed(raw)
        if i + 1 in checkpoints:
            rejected_markets = ours.rejected_market_ids(bflw)
            o, g = ours.snapshot(), gold.snapshot()
            if rejected_markets:
                # bflw also applied what we rejected (a delta for a market
                # never defined): compare only the markets we hold
                assert set(g) - set(o) <= rejected_markets, (name, set(g) - set(o))
            problems += _diff(o, g, f"{name} after line {i + 1}/{n}", only_ours=bool(rejected_markets))
            compared += sum(len(v.selections) for v in o.values())
    return ours, gold, bflw, problems, compared


@pytest.mark.parametrize("name", _files())
def test_recording_matches_betfairlightweight(name: str) -> None:
    root = require_shared_data()
    messages = read_messages(root / name)
    if messages is None:
        pytest.skip(f"{name} is not a stream recording")
    ours, gold, bflw, problems, compared = _replay(name, messages)
    assert not problems, f"{len(problems)} differences, first ones:\n" + "\n".join(problems[:25])

    # rejected lines: exactly the expected ones, with the expected reason
    assert ours.rejections() == EXPECTED_REJECTIONS.get(name, {})
    # and each one is a line bflw could not process, or exactly the markets
    # it built from a delta (the line's other markets applied)
    for i, exc in ours.rejected.items():
        assert exc.reason != "unknown_market", (i, exc)
        assert bflw[i].outcome != "ok", (i, exc, bflw[i])
    for i, errors in ours.rejected_markets.items():
        assert {e.reason for e in errors} == {"unknown_market"}, (i, [str(e) for e in errors])
        assert bflw[i].outcome == "ok", (i, bflw[i])
        assert sorted(e.market_id for e in errors) == sorted(f"bf:{m}" for m in bflw[i].created_from_delta), i
    # lines bflw could not process: rejected by us, or ignored (no update)
    failed = {i: r.outcome for i, r in bflw.items() if r.outcome != "ok"}
    assert failed == EXPECTED_BFLW_FAILURES.get(name, {}), {i: bflw[i] for i in failed}
    for i in failed:
        assert i in ours.rejected or ours.updates.get(i) == 0, (i, bflw[i])
    # no price-only change after a close in these recordings: our book's
    # "definitions only after CLOSED" rule is then not exercised here
    assert gold.changes_after_close == {}, gold.changes_after_close
    if any(ours.updates.values()):
        assert compared > 0


def _without(messages: list[bytes], keys: tuple[str, ...]) -> list[bytes]:
    """The messages with ``keys`` removed from every runner change (in memory)."""
    out = []
    for raw in messages:
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            out.append(raw)
            continue
        if isinstance(msg, dict):
            for mc in msg.get("mc") or ():
                for rc in mc.get("rc") or ():
                    for key in keys:
                        rc.pop(key, None)
        out.append(orjson.dumps(msg))
    return out


def test_level_ladders_match_when_full_ladders_are_removed() -> None:
    """The recordings that carry level ladders (``batb``/``bdatb``) also carry
    ``atb``/``atl``, which then win. Replayed without ``atb``/``atl``, the
    level ladders become canonical: size-0 level deletes, ``[0,0,0]`` and
    level shifts are compared against bflw too."""
    root = require_shared_data()
    covered: dict[str, set[int]] = {}
    problems: list[str] = []
    for name in _files():
        messages = read_messages(root / name)
        if not messages or not any(b'"batb"' in m or b'"bdatb"' in m for m in messages):
            continue
        if name in EXPECTED_REJECTIONS:
            continue
        _, gold, _, found, compared = _replay(f"{name} (no atb/atl)", _without(messages, ("atb", "atl")))
        problems += found
        covered[name] = set(gold.ladder.values())
        assert compared > 0, name
    assert not problems, f"{len(problems)} differences, first ones:\n" + "\n".join(problems[:25])
    # display ladders (flumine greyhounds) and best-offer ladders (raw capture) both exercised
    assert {1, 2} <= set().union(*covered.values()), covered


def test_expectation_tables_name_existing_files() -> None:
    root = require_shared_data()
    for name in set(EXPECTED_REJECTIONS) | set(EXPECTED_BFLW_FAILURES):
        assert (root / name).is_file(), name


def test_recorded_split_line_is_quarantined_as_invalid_json() -> None:
    """RECORDED-1.173718164's last line is the tail of a recorder line
    (starts with ``"Europe/London", ...``): not JSON, so ``invalid_json``,
    nothing applied."""
    root = require_shared_data()
    messages = read_messages(root / "fixtures/RECORDED-1.173718164")
    assert messages is not None and len(messages) == 4
    normaliser = BetfairNormaliser()
    for raw in messages[:3]:
        normaliser.feed(raw, RECV_MS)
    before = {k: dict(r.atb) for k, r in normaliser.markets["1.173718164"].runners.items()}
    with pytest.raises(FeedDecodeError) as info:
        normaliser.feed(messages[3], RECV_MS)
    assert messages[3].lstrip().startswith(b'"Europe/London"')
    after = {k: dict(r.atb) for k, r in normaliser.markets["1.173718164"].runners.items()}
    assert after == before
    assert info.value.reason == "invalid_json", str(info.value)


def test_resub_delta_alone_rejects_only_the_markets_without_definition() -> None:
    """A RESUB_DELTA for markets never imaged: bflw builds 43 caches from it,
    41 of them from deltas alone (no marketDefinition). We reject exactly
    those 41 (``unknown_market``, each alone) and build the other 2 from
    their definitions, as bflw does, and they match bflw."""
    root = require_shared_data()
    (raw,) = read_messages(root / "fixtures/streaming_mcm_RESUB_DELTA.json") or []
    ours, gold, bflw, problems, compared = _replay("RESUB_DELTA", [raw])
    result = bflw[0]
    assert result.outcome == "ok" and len(gold.caches) == 43 and len(result.created_from_delta) == 41
    assert not ours.rejected and len(ours.rejected_markets[0]) == 41
    assert {e.reason for e in ours.rejected_markets[0]} == {"unknown_market"}
    assert sorted(ours.normaliser.markets) == sorted(set(result.markets) - set(result.created_from_delta))
    assert len(ours.normaliser.markets) == 2
    assert not problems and compared > 0


def test_golden_decoder_reads_bflw_ladders_like_its_own_snap() -> None:
    """Sanity check of the golden decoder: where a runner carries only one
    ladder kind, our ladder choice equals bflw's own MarketBook
    ``ex.availableToBack``/``availableToLay`` (bflw picks per runner)."""
    root = require_shared_data()
    for name, kind in (("fixtures/streaming_mcm_SUB_IMAGE.json", "batb"),
                       ("betfair_parser/1.164917629.bz2", "atb")):
        gold = GoldenDecoder()
        for raw in read_messages(root / name) or []:
            gold.feed(raw)
        views = gold.snapshot()
        checked = 0
        for book in gold.listener.snap():
            for rb in book["runners"]:
                sel = views[book["marketId"]].selections[str(rb["selectionId"])]
                back = tuple((lv["price"], lv["size"]) for lv in rb["ex"]["availableToBack"][:DEPTH])
                lay = tuple((lv["price"], lv["size"]) for lv in rb["ex"]["availableToLay"][:DEPTH])
                assert (sel.back, sel.lay) == (back, lay), (name, rb["selectionId"])
                checked += bool(back or lay)
        assert checked, name
        assert set(gold.ladder.values()) == {{"batb": 1, "atb": 3}[kind]}


def test_every_file_is_covered() -> None:
    """Guard against the golden test silently covering nothing."""
    root = require_shared_data()
    files = recording_files([root])
    replayable = [p for p in files if read_messages(p) is not None]
    assert len(replayable) >= 20, [str(Path(p).relative_to(root)) for p in files]


def test_golden_decoder_compares_pre_close_prices_after_close() -> None:
    """The recordings carry no price change after a close; this exercises the
    golden rule on synthetic lines: bflw applies the change, the golden view
    keeps the pre-close ladders/ltp, and our book agrees."""
    md = {"status": "OPEN", "inPlay": False, "betDelay": 0, "version": 1,
          "runners": [{"id": 1, "status": "ACTIVE"}, {"id": 2, "status": "ACTIVE"}]}
    closed = {**md, "status": "CLOSED", "runners": [{"id": 1, "status": "WINNER"}, {"id": 2, "status": "LOSER"}]}
    lines = [
        {"op": "mcm", "pt": 1, "mc": [{"id": "1.5", "marketDefinition": md,
                                       "rc": [{"id": 1, "atb": [[2.0, 5]], "ltp": 2.0}]}]},
        {"op": "mcm", "pt": 2, "mc": [{"id": "1.5", "marketDefinition": closed}]},
        {"op": "mcm", "pt": 3, "mc": [{"id": "1.5", "rc": [{"id": 1, "atb": [[3.0, 1]], "ltp": 3.0}]}]},
    ]
    ours, gold, _, problems, compared = _replay("synthetic", [orjson.dumps(m) for m in lines])
    assert not problems and compared == 6  # 2 selections at each of 3 checkpoints
    assert gold.changes_after_close == {"1.5": 1}
    assert gold.caches["1.5"].runner_dict[(1, 0)].last_price_traded == 3.0  # bflw took it
    view = gold.snapshot()["1.5"]
    assert view.status == "SETTLED" and view.selections["1"].ltp == 2.0 and view.selections["1"].back == ((2.0, 5.0),)
    assert ours.book.dropped["closed"] == 1
