"""Local upstreams for demos, tests and benchmarks (real protocols, real sockets).

- :class:`Simulator` / :class:`SimulatorConfig` / :func:`run_simulator`: a
  Betfair Exchange Stream API server on 127.0.0.1 (:mod:`.esa_server`), fed by
  the synthetic :class:`MarketModel` (:mod:`.market_model`) or by recorded
  Betfair files (:mod:`.recorded`), with fault switches.
- :class:`HttpProviders` (:mod:`.http_providers`): Pinnacle- and The Odds
  API-style HTTP endpoints; :class:`PushSimulator` (:mod:`.push_providers`):
  the push format over WebSocket and SSE — both driven by the same model.
- :mod:`.ladder`: the Betfair tick ladder. :mod:`.wire`: server-side market
  state and its projection onto ESA deltas.
"""

from feed.simulator.esa_server import Simulator, SimulatorConfig, run_simulator
from feed.simulator.http_providers import HttpProviders, ProvidersConfig, run_http_providers
from feed.simulator.push_providers import PushSimConfig, PushSimulator, run_push_providers
from feed.simulator.ladder import TICKS, snap, tick_index
from feed.simulator.market_model import MarketModel
from feed.sources.esa import default_market_data_filter, default_market_filter

__all__ = [
    "TICKS",
    "HttpProviders",
    "MarketModel",
    "ProvidersConfig",
    "PushSimConfig",
    "PushSimulator",
    "Simulator",
    "SimulatorConfig",
    "default_market_data_filter",
    "default_market_filter",
    "run_http_providers",
    "run_push_providers",
    "run_simulator",
    "snap",
    "tick_index",
]
