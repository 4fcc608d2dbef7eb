"""Betfair's sports-data stream: live race progress, TPD (``--source betfair-race=…``).

Betfair's Total Performance Data — horse races tracked by GPS — comes on the
sports-data endpoint (``sports-data-stream-api.betfair.com:443``, TLS) that
also serves cricket (:mod:`feed.sources.betfair_cricket`), with the Exchange
Stream API's protocol and its own subscription op (betfairlightweight
``subscribe_to_races`` / ``RaceStream``, nautilus_trader
``parsing/rcm.py``)::

    client  {"op":"raceSubscription","id":2[,"initialClk":"…","clk":"…"][,"heartbeatMs":…]}
    server  {"op":"status","id":2,"statusCode":"SUCCESS","connectionClosed":false}
    server  {"op":"rcm","id":2,"initialClk":"…","clk":"…","pt":…,"ct":"SUB_IMAGE"}      (no races yet)
    server  {"op":"rcm","id":2,"clk":"…","pt":…,"rc":[{"id":"28587288.1650","mid":"1.173853449",
             "rpc":{"ft":…,"g":"4f","st":12.3,"rt":45.6,"spd":16.9,"prg":804.7,"ord":[…],"J":[]},
             "rrc":[{"ft":…,"id":7390417,"lat":…,"long":…,"spd":17.8,"prg":805.1,"sfq":2.31}]}]}
    server  {"op":"rcm","id":2,"clk":"…","pt":…,"ct":"HEARTBEAT"}

No filter: the subscription covers every race the app key is entitled to.
This module only binds :data:`~feed.sources.esa_protocol.RACE_STREAM` to the
sports-data source (:func:`feed.sources.betfair_cricket.sports_data_from_spec`:
login, heartbeats, reconnect, health are the ``esa`` kind's); the ``rcm``
lines go to the Betfair normaliser, which turns each race into an
:class:`~feed.models.EventState` of event ``bf:<race id>`` with a
:class:`~feed.models.RaceProgress` (status, running clock, leader's gate
and distance, running order, each runner's distance to the finish). A race
belongs to the markets of its meeting's event whose scheduled start is its
HHMM (:func:`feed.taxonomy.race_event_id`).

Resume: as for cricket, a resubscription carries the last stored
``initialClk``/``clk``; a ``RESUB_DELTA`` brings the races' current progress,
a refusal (``INVALID_CLOCK`` / ``INVALID_INPUT``) drops the tokens. A race's
progress is whole in every ``rpc``, so a subscription without resume loses at
most the second until the next one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from feed.sources.betfair_cricket import SportsDataSource, sports_data_from_spec
from feed.sources.esa_protocol import RACE_STREAM

if TYPE_CHECKING:
    from feed.settings import Settings
    from feed.sources.spec import SourceSpec

__all__ = ["from_spec"]


def from_spec(spec: SourceSpec, settings: Settings) -> SportsDataSource:
    """The registry's source factory: ``betfair-race=betfair|HOST:PORT,app_key=…``
    with the options of :func:`feed.sources.betfair_cricket.sports_data_from_spec`
    (``session=`` or ``username=`` + ``password=`` …, ``tls=``, ``heartbeat_ms=``).
    Raises ConfigError for missing or contradictory options."""
    return sports_data_from_spec(spec, settings, RACE_STREAM)
