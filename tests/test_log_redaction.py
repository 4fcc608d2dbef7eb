"""Secrets never appear in logs, at any level (DEBUG included).

Runs the push sources (WebSocket and SSE) against the push simulator with the
CLI's own logging setup at DEBUG — the ``websockets`` client logs every request
header there — through reconnects, a gap resync (REST snapshot) and a refused
key, plus the bundled stream client with an API key against a node that
requires one; then reads every line logged and every record's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from feed.errors import FatalSourceError
from feed.redaction import REDACTED, redact
from feed.settings import Settings
from feed.sources.spec import parse_source_spec
from feed.sources.sse import run_push_sse_source
from feed.sources.ws import run_push_ws_source
from feed.store import Store
from streaming.client import OddsClient
from tests.streaming_helpers import eventually, make_app, serve
from tests.test_push_harness import SIM, push_sim

pytestmark = pytest.mark.timeout(90)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if record.exc_text:
            self.messages.append(record.exc_text)


@contextlib.contextmanager
def cli_logging_at_debug() -> Iterator[tuple[io.StringIO, _Records]]:
    """The CLI's logging setup (``oddsfeed -v``) writing to a buffer; undone afterwards."""
    from feed.cli import setup_logging

    root = logging.getLogger()
    level = root.level
    buf = io.StringIO()
    records = _Records()
    handler = setup_logging(verbose=True, stream=buf)
    root.addHandler(records)
    try:
        yield buf, records
    finally:
        root.removeHandler(handler)
        root.removeHandler(records)
        root.setLevel(level)
        from feed import redaction

        redaction.uninstall()


def test_redact_headers_queries_and_registered_values() -> None:
    from feed.redaction import register_secret

    register_secret("registered-" + "s3cret")
    cases = {
        "> X-Api-Key: abc123": "> X-Api-Key: " + REDACTED,
        "> Authorization: Bearer eyJ.abc.def": "> Authorization: " + REDACTED,
        "{'X-Api-Key': 'abc123', 'User-Agent': 'x'}": "{'X-Api-Key': '" + REDACTED + "', 'User-Agent': 'x'}",
        "[('x-api-key', 'abc123'), ('accept', '*')]": "[('x-api-key', '" + REDACTED + "'), ('accept', '*')]",
        "GET /v1/stream?sport=soccer&access_token=eyJ.a.b&x=1": "GET /v1/stream?sport=soccer&access_token="
                                                                  + REDACTED + "&x=1",
        '{"api_key": "abc123", "sport": "soccer"}': '{"api_key": "' + REDACTED + '", "sport": "soccer"}',
        "cookie: a=1; b=2": "cookie: " + REDACTED,
        "X-Security-Hash: 9f8e": "X-Security-Hash: " + REDACTED,
        "the value registered-s3cret leaked": "the value " + REDACTED + " leaked",
        "nothing secret here: sport=soccer": "nothing secret here: sport=soccer",
    }
    for text, want in cases.items():
        assert redact(text) == want, text


async def test_push_sources_and_the_client_never_log_secrets_at_debug(store: Store, redis_url: str) -> None:
    key = "pk-" + secrets.token_hex(12)
    wrong = "wrong-" + secrets.token_hex(12)
    stream_key = "sk-" + secrets.token_hex(12)
    with cli_logging_at_debug() as (buf, records):
        async with push_sim(api_key=key) as sim:
            for kind, runner, transport in (("push-ws", run_push_ws_source, "ws"),
                                            ("push-sse", run_push_sse_source, "sse")):
                spec = parse_source_spec(f"{kind}={sim.url(transport)},api_key={key},backoff_initial_s=0.05,"
                                         "backoff_max_s=0.3,reorder_ms=100,ping_interval_ms=400")
                clients: list[Any] = []
                task = asyncio.create_task(runner(store, Settings(), spec, on_client=lambda c, i: clients.append(c)))
                try:
                    await eventually(lambda: clients and clients[0].health == ("UP", None), 15,  # noqa: B023
                                     f"{kind} up")
                    client = clients[0]
                    sim.skip(2)  # a gap: resync from the REST snapshot (the key in a header)
                    await eventually(lambda: client.resyncs >= 1, 15, f"{kind} resync")  # noqa: B023
                    assert sim.drop_connections() >= 1  # a reconnect (the key again)
                    await eventually(lambda: client.health == ("UP", None) and client.reconnects >= 1,  # noqa: B023
                                     15, f"{kind} reconnected")
                finally:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                bad = parse_source_spec(f"{kind}={sim.url(transport)},api_key={wrong}")
                with pytest.raises(FatalSourceError):
                    await asyncio.wait_for(runner(store, Settings(), bad), 15)
        settings = Settings(heartbeat_ms=60_000, api_keys=(stream_key,))
        async with serve(make_app(redis_url, settings=settings)) as base:
            for url in (base, base.replace("http://", "ws://")):
                async with OddsClient(url, api_key=stream_key) as odds:
                    assert odds.synced.is_set()
        text = buf.getvalue()
    for secret in (key, wrong, stream_key):
        assert secret not in text, f"a secret was logged:\n{[ln for ln in text.splitlines() if secret in ln][:5]}"
        assert not [m for m in records.messages if secret in m]
    assert "websockets.client" in text and "X-Api-Key: " + REDACTED in text, \
        "DEBUG logging did not run (the test would prove nothing)"
    assert SIM  # the simulator settings the harness uses


def test_no_input_can_forge_a_text_log_line() -> None:
    """A refused request's path was logged raw: ``%0a`` in it wrote a line of the attacker's
    choosing (found by probing the API without credentials). Control characters in a message
    are escaped now; a traceback still gets its own lines."""
    from streaming.auth import AuthError, AuthMiddleware

    with cli_logging_at_debug() as (buf, _):
        AuthMiddleware.deny(AuthError("no credential"), "GET",
                           "/v1/markets/x\n2026-12-05 09:00:00,000 ERROR feed.store: FORGED\r\x00", "1.2.3.4")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("t").exception("failed on %s", "a\nb")
    lines = buf.getvalue().splitlines()
    forged = [ln for ln in lines if "FORGED" in ln]
    assert len(forged) == 1 and forged[0].split(" ", 3)[2] == "INFO"  # one line, the real record's
    assert "x\\n2026" in forged[0] and "\\r\\x00" in forged[0]
    with cli_logging_at_debug() as (buf, _):  # the other line breaks (U+0085 from %C2%85, U+2028/9) and C1
        logging.getLogger("t").info("a\u0085b\u2028c\u2029d\x9be")
    assert buf.getvalue().count("\n") == 1 and len(buf.getvalue().splitlines()) == 1, repr(buf.getvalue())
    assert any(ln.endswith("failed on a\\nb") for ln in lines) and "Traceback (most recent call last):" in lines
