"""Local upstreams for demos, tests and benchmarks (real protocols, real sockets).

- :class:`Simulator` / :class:`SimulatorConfig` / :func:`run_simulator`: a
  Betfair Exchange Stream API server on 127.0.0.1 (:mod:`.esa_server`), fed by
  the synthetic :class:`MarketModel` (:mod:`.market_model`) or by recorded
  Betfair files (:mod:`.recorded`), with fault switches; with ``api_port``
  also Betfair's identity SSO and Betting API ``listMarketCatalogue``
  (:mod:`.betfair_api`), where a live client gets its session and the names.
- :mod:`.http_providers` (``HttpProviders``): Pinnacle- and The Odds
  API-style HTTP endpoints; :mod:`.push_providers` (``PushSimulator``, also
  ``python -m feed.simulator.push_providers``): the push format over
  WebSocket and SSE — both driven by the same synthetic model.
- :mod:`.cricket_server` (``CricketSimulator``, also ``python -m
  feed.simulator.cricket_server``): Betfair's sports-data stream
  (``cricketSubscription`` → ``ccm``) on its own port, replaying the real
  recorded cricket stream or a synthetic T20 match.
- :mod:`.uof` (``UofSimulator``): a Unified-Odds-Feed producer — UOF XML on a
  RabbitMQ topic exchange plus the recovery API — with producer faults
  (silent, ``subscribed=0``, failing recoveries) and broker reconnects;
  :mod:`.webhook_pusher` (``WebhookPusher``): signed push-format webhook
  deliveries, in batches or live on a shared model. Both need no import here
  (aio-pika is optional).
- :mod:`.control`: every simulator's fault switches over a TCP control port
  (``oddsfeed simulate --control-port``); :mod:`.truth`: the truth log of
  every upstream change (``--truth-log``), which the fault suite judges by.
- :mod:`.ladder`: the Betfair tick ladder. :mod:`.wire`: server-side market
  state and its projection onto ESA deltas.
"""

from feed.simulator.esa_server import Simulator, SimulatorConfig, run_simulator
from feed.simulator.ladder import TICKS, snap, tick_index
from feed.simulator.market_model import MarketModel
from feed.sources.esa import default_market_data_filter, default_market_filter

__all__ = [
    "TICKS",
    "MarketModel",
    "Simulator",
    "SimulatorConfig",
    "default_market_data_filter",
    "default_market_filter",
    "run_simulator",
    "snap",
    "tick_index",
]
