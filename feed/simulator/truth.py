"""The simulators' ground truth, as a log: one JSON line per upstream change.

Off by default. When a simulator is given ``truth_log=PATH`` (``oddsfeed
simulate --truth-log PATH``) it appends, for every change it makes to what it
offers, one line per selection, in the ids oddsfeed gives them::

    {"t_ms": 1767000000123, "source": "esa", "market_id": "bf:1.230000123",
     "selection_id": "47972", "back": 2.5, "lay": 2.52, "price": 2.5,
     "status": "OPEN", "sel_status": "ACTIVE"}

- ``t_ms``: the simulator's wall clock (ms since the epoch) when the change
  became what the upstream offers (ESA and push: the tick that emitted it;
  HTTP providers: the tick that changed the provider's answer);
- ``source``: ``esa`` | ``pinnacle`` | ``theoddsapi`` | ``push`` (the push
  simulator logs ``px:`` ids; a consumer with another ``prefix=`` swaps it);
- ``back`` / ``lay``: best offer of an exchange book (ESA), ``price``: the
  offered decimal price (best back for ESA and push), ``None`` = nothing;
- ``status``: the market's (``OPEN``, ``SUSPENDED``, ``CLOSED``; ``REMOVED``
  with ``selection_id`` null when the market left the upstream),
  ``sel_status``: the selection's (``ACTIVE``, ``REMOVED``, ``WINNER`` …).

The first lines of a log are the simulator's initial state. Lines are
written (and flushed) once per simulator tick, so a reader tailing the file
sees each tick whole. Several simulators of one process share one file
(:func:`open_truth_log` returns one writer per path).
"""

from __future__ import annotations

import os
from typing import Any

import orjson

__all__ = ["TruthLog", "open_truth_log", "record_exchange_market"]


class TruthLog:
    """Appends truth lines to ``path`` (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._file = open(self.path, "ab")  # noqa: SIM115 - kept open for the simulator's life
        self._pending: list[bytes] = []
        self.records = 0

    def record(self, t_ms: int, source: str, market_id: str, selection_id: str | None, *, status: str | None,
               sel_status: str | None = None, back: float | None = None, lay: float | None = None,
               price: float | None = None) -> None:
        """Queue one line (written by :meth:`flush`)."""
        self._pending.append(orjson.dumps({
            "t_ms": t_ms, "source": source, "market_id": market_id, "selection_id": selection_id,
            "back": back, "lay": lay, "price": price, "status": status, "sel_status": sel_status}))
        self.records += 1

    def flush(self) -> None:
        """Write the queued lines and flush the file."""
        if self._pending:
            self._file.write(b"\n".join(self._pending) + b"\n")
            self._pending.clear()
            self._file.flush()

    def close(self) -> None:
        self.flush()
        self._file.close()


_OPEN: dict[str, TruthLog] = {}


def open_truth_log(path: str | os.PathLike[str]) -> TruthLog:
    """The writer for ``path`` (one per resolved path in this process)."""
    key = os.path.realpath(os.fspath(path))
    log = _OPEN.get(key)
    if log is None or log._file.closed:
        log = _OPEN[key] = TruthLog(key)
    return log


def record_exchange_market(log: TruthLog, t_ms: int, mb: Any, keys: Any = None, *, prefix: str = "bf:",
                           source: str = "esa") -> None:
    """Log an exchange market (a :class:`~feed.simulator.wire.MarketBook`):
    every runner, or the runners in ``keys`` ((selection_id, hc) pairs)."""
    from feed.simulator.wire import selection_key

    md = mb.definition or {}
    status = md.get("status")
    statuses = {(r.get("id"), r.get("hc")): r.get("status") for r in md.get("runners", ())}
    runners = mb.runners.values() if keys is None else [mb.runners[k] for k in keys if k in mb.runners]
    for rb in runners:
        back, lay = rb.back(), rb.lay()
        best_back = back[0][0] if back else None
        log.record(t_ms, source, prefix + mb.market_id, selection_key(rb), status=status,
                   sel_status=statuses.get((rb.id, rb.hc)) or statuses.get((rb.id, None)),
                   back=best_back, lay=lay[0][0] if lay else None, price=best_back)
