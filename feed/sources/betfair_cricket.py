"""Betfair's sports-data stream: live cricket scores (``--source betfair-cricket=…``).

Betfair serves race (TPD, ``rcm``) and cricket (``ccm``) data on its own
endpoint, ``sports-data-stream-api.betfair.com:443`` (TLS), speaking the
Exchange Stream API's protocol: the same ``connection`` / ``authentication``
(the account's app key and session) / ``status`` handshake, CRLF-framed
JSON, ``clk`` tokens and ``HEARTBEAT`` messages, with its own subscription
op (betfairlightweight ``subscribe_to_cricket_matches``, flumine
``CricketDataStream``)::

    client  {"op":"cricketSubscription","id":2[,"initialClk":"…","clk":"…"][,"heartbeatMs":…]}
    server  {"op":"status","id":2,"statusCode":"SUCCESS","connectionClosed":false}
    server  {"op":"ccm","id":2,"initialClk":"…","clk":"…","pt":…,"ct":"SUB_IMAGE"[,"cc":[…]]}
    server  {"op":"ccm","id":2,"clk":"…","pt":…,"cc":[{"eventId":"31573045","marketId":"1.200806927",
             "fixtureInfo":{…},"homeTeam":{…},"awayTeam":{…},"matchStats":{…},"incidentListWrapper":{…}}]}
    server  {"op":"ccm","id":2,"clk":"…","pt":…,"ct":"HEARTBEAT"}

The subscription takes no filter (Betfair's clients send ``op`` and ``id``
only): it covers every match the app key is entitled to. This module is
I/O only and owns nothing of the protocol: it is an
:class:`~feed.sources.esa.EsaSource` whose client speaks
:data:`~feed.sources.esa_protocol.CRICKET_STREAM` (the sans-I/O protocol,
the reconnect/backoff/heartbeat/health glue, the login and keep-alive are
the ``esa`` kind's), and the ``ccm`` lines go to the Betfair normaliser,
which turns them into :class:`~feed.models.EventState` s of event
``bf:<eventId>`` (the id the match's markets carry on the ``esa`` source).

Resume: the cursor is the last stored ``initialClk``/``clk`` (stored with the
states, so also after a restart); a resubscription carries it. Betfair does
not document resume on this stream, so both answers are handled: a
``RESUB_DELTA`` (what the simulator sends), or a fresh ``SUB_IMAGE`` from a
server that ignores the tokens (the states it repeats say nothing new and are
not stored again); a refusal (``INVALID_CLOCK`` / ``INVALID_INPUT``) drops
the cursor and subscribes without it.
"""

from __future__ import annotations

import ssl as _ssl
from typing import TYPE_CHECKING

from feed.errors import ConfigError
from feed.sources.esa import EsaSource, endpoint, login_of
from feed.sources.esa_protocol import CRICKET_STREAM, StreamKind

if TYPE_CHECKING:
    from feed.settings import Settings
    from feed.sources.spec import SourceSpec

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "CricketSource", "SportsDataSource", "cricket_endpoint", "from_spec",
           "sports_data_from_spec"]

#: Betfair's sports-data stream endpoint (TLS).
DEFAULT_HOST = "sports-data-stream-api.betfair.com"
DEFAULT_PORT = 443


class SportsDataSource(EsaSource):
    """One subscription on the sports-data stream (``cricketSubscription``
    here, ``raceSubscription`` in :mod:`feed.sources.betfair_race`) as a
    :class:`~feed.sources.base.Source`: an :class:`EsaSource` without the
    Betting API catalogue (scores and race progress need no names)."""


#: the cricket source's class (the sports-data source speaking :data:`CRICKET_STREAM`)
CricketSource = SportsDataSource


def cricket_endpoint(spec: SourceSpec) -> tuple[str, int, bool]:
    """``(host, port, tls)`` of a sports-data source (cricket or race):
    ``betfair-cricket=betfair`` is Betfair's endpoint
    (:data:`DEFAULT_HOST`:443, TLS); otherwise ``[tls://|tcp://]HOST:PORT`` as
    for ``esa``, TLS on by default for a ``*.betfair.com`` host (``tls=false``
    turns it off)."""
    if spec.url in ("betfair", "default", ""):
        host, port, tls = DEFAULT_HOST, DEFAULT_PORT, True
    else:
        host, port, tls = endpoint(spec)
    raw = spec.get("tls")
    if raw is None:
        tls = tls or host.endswith(".betfair.com")
    elif raw.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ConfigError(f"source {spec.name}: tls must be true or false, not {raw!r}")
    return host, port, tls


def sports_data_from_spec(spec: SourceSpec, settings: Settings, stream: StreamKind) -> SportsDataSource:
    """A source on the sports-data stream subscribing as ``stream`` says:
    ``<kind>=betfair|HOST:PORT,app_key=…`` with the ``esa`` kind's login
    options (:func:`feed.sources.esa.login_of`: ``session=`` or
    ``username=`` + ``password=`` [+ ``cert_file=``/``key_file=``],
    ``sso_url=``, ``cert_sso_url=``, ``keep_alive_s=``)
    ``[,tls=true][,heartbeat_ms=…]`` (``heartbeat_ms`` absent: not
    requested, the server's 5 s applies). Raises ConfigError for missing or
    contradictory options."""
    host, port, tls = cricket_endpoint(spec)
    login, _ = login_of(spec, host)
    raw_hb = spec.get("heartbeat_ms")
    heartbeat_ms = int(spec.get_float("heartbeat_ms", 0)) if raw_hb is not None else None
    if heartbeat_ms is not None and heartbeat_ms <= 0:
        raise ConfigError(f"source {spec.name}: heartbeat_ms must be > 0")
    return SportsDataSource(spec.name, host=host, port=port, app_key=login.credentials.app_key,
                            session_token=spec.get("session") or "",
                            ssl=_ssl.create_default_context() if tls else None,
                            stream=stream, heartbeat_ms=heartbeat_ms, segmentation=None, login=login)


def from_spec(spec: SourceSpec, settings: Settings) -> SportsDataSource:
    """The registry's source factory: ``betfair-cricket=betfair|HOST:PORT,
    app_key=…`` and the options of :func:`sports_data_from_spec`."""
    return sports_data_from_spec(spec, settings, CRICKET_STREAM)
