"""Betfair ESA ``mcm`` lines for ingest tests: a market image, a best-back change, a heartbeat.

Every line is one ``op: mcm`` message as the Exchange Stream API sends it (``pt``: the
provider's publish time, integer ms since the Unix epoch; ``clk`` derived from it), for
:meth:`feed.ingest.Ingest.feed_lines`. Market ids are Betfair's (``1.1``); the ingest names
them ``bf:1.1``. Runner 1 carries the price under test, runner 2 a fixed ladder.
"""

from __future__ import annotations

from typing import Any

import orjson


def line(*mc: dict[str, Any], pt: int, ct: str | None = None) -> bytes:
    """One ``mcm`` line with market changes ``mc`` (none: a bare message) and change type ``ct``."""
    msg: dict[str, Any] = {"op": "mcm", "id": 2, "clk": f"c{pt}", "pt": pt}
    if ct:
        msg["ct"] = ct
    if mc:
        msg["mc"] = list(mc)
    return orjson.dumps(msg)


def image(market: str, back: float, *, pt: int) -> bytes:
    """An in-play MATCH_ODDS image of ``market``: runner 1 best back ``back`` (decimal odds)."""
    md = {"status": "OPEN", "inPlay": True, "betDelay": 0, "version": 1, "eventId": "30000", "eventTypeId": "1",
          "marketType": "MATCH_ODDS", "marketTime": "2027-01-15T12:00:00.000Z", "numberOfWinners": 1,
          "runners": [{"id": 1, "sortPriority": 1, "status": "ACTIVE"}, {"id": 2, "sortPriority": 2, "status": "ACTIVE"}]}
    return line({"id": market, "img": True, "marketDefinition": md,
                 "rc": [{"id": 1, "atb": [[back, 10]], "atl": [[back + 0.1, 7]]},
                        {"id": 2, "atb": [[4.0, 3]], "atl": [[4.2, 8]]}]}, pt=pt)


def price(market: str, back: float, *, pt: int) -> bytes:
    """Runner 1 of ``market`` backed at ``back`` (a delta)."""
    return line({"id": market, "rc": [{"id": 1, "atb": [[back, 12]]}]}, pt=pt)


def heartbeat(*, pt: int) -> bytes:
    """A ``ct: HEARTBEAT`` line (confirms the stream's markets as of ``pt``)."""
    return line(pt=pt, ct="HEARTBEAT")
