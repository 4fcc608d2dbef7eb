"""Push consumer over WebSocket (feed.sources.ws) against the push simulator:
real sockets on 127.0.0.1, real Redis, the streaming API for staleness.
The end-to-end scenarios run in tests/test_push_harness.py (both transports). At the
end, the transport-neutral sequencing of PushClient on scripted message
sequences (no network: the logic between transport and normaliser)."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from feed.sources.push import PushClient, Receiver, _LinkLost, default_snapshot_url

pytestmark = pytest.mark.timeout(60)


def test_default_snapshot_url() -> None:
    assert default_snapshot_url("ws://127.0.0.1:9556/push/ws") == "http://127.0.0.1:9556/push/snapshot"
    assert default_snapshot_url("wss://odds.example/v1/stream?x=1") == "https://odds.example/v1/snapshot"


# -- the transport-neutral client logic, on scripted streams ------------------------------------------


def _m(type_: str, seq: int | None = None, **extra: Any) -> bytes:
    body: dict[str, Any] = {"type": type_, **extra}
    if seq is not None:
        body["seq"] = seq
        body.setdefault("entry_id", f"{1718000000000 + seq}-{seq}")
    return json.dumps(body).encode()


class Scripted(PushClient):
    """Each connection plays the next script, then ends (link lost)."""

    def __init__(self, scripts: list[list[bytes]], **kwargs: Any) -> None:
        self.delivered: list[bytes] = []
        self.cursors: list[str | None] = []

        async def on_messages(lines: list[bytes], recv_ms: int) -> None:
            self.delivered.extend(lines)

        super().__init__(url="scripted://", on_messages=on_messages, ping_interval_ms=2000,
                         backoff_initial_s=0.01, backoff_max_s=0.02, **kwargs)
        self.scripts = deque(scripts)

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[Receiver]:
        self.cursors.append(self.cursor)
        if not self.scripts:
            self.stop()
        msgs = deque(self.scripts.popleft() if self.scripts else [])

        async def recv(timeout_s: float) -> list[tuple[bytes, int]]:
            if not msgs:
                raise _LinkLost("script over")
            return [(msgs.popleft(), 0)]
        yield recv

    def seqs(self) -> list[int | None]:
        return [json.loads(m).get("seq") for m in self.delivered if json.loads(m)["type"] not in ("ping", "connected")]


async def test_reordered_messages_are_handed_over_in_order_and_duplicates_pass_once_more() -> None:
    c = Scripted([[_m("connected"), _m("odds", 1), _m("odds", 3), _m("odds", 2), _m("odds", 2), _m("odds", 4)]])
    await asyncio.wait_for(c.run(), 5)
    assert c.seqs() == [1, 2, 3, 2, 4]  # the late copy of 2 goes on: the normaliser drops it by entry id
    assert (c.reordered, c.duplicates, c.resyncs) == (1, 1, 0)
    assert c.cursor == f"{1718000000004}-4"


async def test_a_gap_without_snapshot_url_resumes_from_the_cursor() -> None:
    c = Scripted([[_m("odds", 1), _m("odds", 2), _m("odds", 5), _m("ping", 5)], [_m("odds", 3), _m("odds", 4)]],
                 reorder_ms=10)
    await asyncio.wait_for(c.run(), 5)
    assert c.seqs() == [1, 2, 3, 4]
    assert c.cursors[:2] == [None, f"{1718000000002}-2"]


async def test_a_restarted_provider_counting_from_zero_is_no_gap() -> None:
    c = Scripted([[_m("snapshot", 50, data=[]), _m("odds", 51)],
                  [_m("connected"), _m("snapshot", 3, data=[], entry_id="1718000009000-3"), _m("odds", 4,
                                                                                           entry_id="1718000009001-4")]],
                 snapshot_url="http://127.0.0.1:9/never-called")
    await asyncio.wait_for(c.run(), 5)
    assert c.seqs() == [50, 51, 3, 4] and c.resyncs == 0


async def test_repair_snapshots_are_paced_when_a_market_keeps_being_rejected() -> None:
    """Every batch of a market that stays invalid asks for a repair: before, each one cost a
    REST snapshot (40 messages, 40 GETs — and a provider 429 on it became a reconnect loop).
    Now the first goes at once and the next wait 1, 2, 4 … s."""
    import httpx

    gets: list[float] = []

    def snapshot(request: httpx.Request) -> httpx.Response:
        gets.append(asyncio.get_running_loop().time())
        return httpx.Response(200, content=_m("snapshot", len(gets), markets=[]))

    http = httpx.AsyncClient(transport=httpx.MockTransport(snapshot))
    c = Scripted([[_m("connected")] + [_m("ping") for _ in range(40)]], snapshot_url="http://snapshot/", http=http)
    deliver = c._on_messages

    async def on_messages(lines: list[bytes], recv_ms: int) -> None:
        await deliver(lines, recv_ms)
        c.request_repair()  # every delivery: a market of it was rejected
    c._on_messages = on_messages
    try:
        await asyncio.wait_for(c.run(), 10)
    finally:
        await http.aclose()
    assert 1 <= len(gets) <= 2, f"{len(gets)} snapshots for 41 batches in {c.resyncs} resyncs"


async def test_a_servers_retry_hint_never_exceeds_our_longest_backoff() -> None:
    """An SSE ``retry:`` of days made the reconnect wait days, health DOWN meanwhile (found by the
    ingest audit); the hint counts up to backoff_max_s."""
    c = Scripted([[_m("connected"), _m("odds", 1)], [_m("odds", 2)]])
    c.retry_ms = 10**12
    await asyncio.wait_for(c.run(), 10)
    assert c.seqs() == [1, 2]
