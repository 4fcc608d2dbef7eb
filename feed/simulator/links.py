"""The simulators' true links: which provider events are the same model event.

Every simulator serves the same :class:`~feed.simulator.market_model.MarketModel`
event under its own id, as its normaliser namespaces it:

- the ESA simulator (Betfair): ``bf:<eventId>`` (:func:`betfair_event_id`);
- the HTTP providers: ``pn:<eventId>`` (Pinnacle) and ``toa:<md5 id>`` (The
  Odds API), soccer / tennis / basketball only
  (:meth:`~feed.simulator.http_providers.HttpProviders.provider_event_id`);
- the push simulator: ``<prefix>:<eventId>``
  (:meth:`~feed.simulator.push_providers.PushSimulator.provider_event_id`).

:func:`true_records` turns a model into the matcher's view of that truth:
for each model event (each race, for racing — a Betfair racing event is a
meeting, see :func:`feed.matching.record_id`) the record id each source
gives it. Compare with the links :class:`feed.linker.Linker` stores.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from feed.matching import record_id
from feed.normalise.base import iso_to_ms
from feed.simulator.market_model import MarketModel

__all__ = ["EventIdOf", "betfair_event_id", "true_records"]

#: (model eventId, model eventTypeId) -> the source's event id, None when it does not offer the event
EventIdOf = Callable[[str, str], "str | None"]

#: model eventTypeId -> canonical sport (feed.taxonomy's keys)
_SPORT = {"1": "soccer", "2": "tennis", "7": "horse_racing", "4339": "greyhound_racing", "7522": "basketball"}


def betfair_event_id(model_event_id: str, sport: str = "") -> str:
    """The event id the ESA simulator's events have once normalised: ``bf:<eventId>``."""
    return f"bf:{model_event_id}"


def true_records(model: MarketModel, sources: Mapping[str, EventIdOf]) -> dict[str, dict[str, str]]:
    """``{model record: {source name: record id}}`` for every event the model
    holds now. The model record is ``model:<eventId>`` (per race for
    racing: ``model:<eventId>/<start ms>``); ``sources`` maps each source
    name to its event-id function (see the module docstring)."""
    out: dict[str, dict[str, str]] = {}
    for mb in model.books.values():
        md = mb.definition
        if md is None:
            continue
        eid, et = str(md["eventId"]), str(md["eventTypeId"])
        sport = _SPORT.get(et)
        start = iso_to_ms(md.get("marketTime"))
        key = record_id(f"model:{eid}", sport, start)
        recs = out.setdefault(key, {})
        for name, id_of in sources.items():
            pid = id_of(eid, et)
            if pid is not None:
                recs[name] = record_id(pid, sport, start)
    return out
