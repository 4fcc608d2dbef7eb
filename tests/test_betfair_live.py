"""Live Betfair, for real: login, keep-alive, re-login, and names from the catalogue.

Everything runs on real sockets on 127.0.0.1: the simulator speaks Betfair's
identity SSO (login, certificate login over TLS with a client certificate,
keepAlive, logout), the Betting API's JSON-RPC ``listMarketCatalogue`` and the
Exchange Stream API; the ingest stores into the session's real Redis.

- interactive and certificate login; a refused login is fatal and never retried;
- keep-alives hold a session that would otherwise expire;
- an expired session (Betting API ``INVALID_SESSION_INFORMATION``, keepAlive
  ``NO_SESSION``, the stream's ``NO_SESSION`` status or a refused
  authentication) is one new login, then the stream resumes with its ``clk``;
- catalogue requests never weigh more than the limit and are batched;
- catalogue failures never hold up prices: prices are stored at once, names
  fill in when the Betting API answers again;
- a market first seen over ESA is stored with its real names (event,
  competition, market, runners) after one catalogue round trip, and the
  live stream itself carries none.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from feed.errors import ConfigError
from feed.models import Market
from feed.pipeline import Pipeline, run_spec
from feed.redaction import install, uninstall
from feed.settings import Settings
from feed.simulator import Simulator
from feed.sources.base import Source
from feed.sources.betfair_api import (
    CATALOGUE_PROJECTION,
    BetfairApiError,
    BetfairLogin,
    BettingApi,
    CatalogueFetcher,
    Credentials,
    definitions_in,
    markets_per_request,
)
from feed.sources.esa import EsaClient, EsaSource
from feed.sources.http_limits import SourceAuthError
from feed.sources.spec import parse_source_spec
from feed.store import Store
from tests.streaming_helpers import cancel_and_wait, eventually

APP_KEY, USER, PASSWORD = "sim-app-key", "sim-user", "sim-password"


async def live_sim(make_sim: Any, *, frozen: bool = True, **overrides: Any) -> Simulator:
    """A simulator that also serves the SSO and the Betting API; ``frozen``:
    its markets stand still (no lifecycle: a market closed before its
    catalogue arrives is, as on Betfair, never named)."""
    sim: Simulator = await make_sim(api_port=0, **overrides)
    assert sim.api is not None
    if frozen:
        sim.freeze()
    return sim


def login_for(sim: Simulator, **overrides: Any) -> BetfairLogin:
    assert sim.api is not None
    args: dict[str, Any] = {"sso_url": sim.api.url, **overrides}
    creds = args.pop("credentials", Credentials(app_key=APP_KEY, username=USER, password=PASSWORD))
    return BetfairLogin(creds, **args)


@contextlib.asynccontextmanager
async def fetching(sim: Simulator, deliver: Any = None, **args: Any
                   ) -> AsyncIterator[tuple[BettingApi, CatalogueFetcher]]:
    """A catalogue fetcher on the simulator's Betting API, its loop running (no pause between
    requests unless ``args`` says); stopped, and its client and login closed, afterwards."""
    assert sim.api is not None
    login = login_for(sim)
    api = BettingApi(login, url=sim.api.betting_url)
    fetcher = CatalogueFetcher(api, deliver or (lambda lines: asyncio.sleep(0)), **{"min_interval_s": 0.0, **args})
    task = asyncio.create_task(fetcher.run())
    try:
        yield api, fetcher
    finally:
        await cancel_and_wait(task, "the fetcher")
        await api.aclose()
        await login.aclose()


def spec_for(sim: Simulator, *extra: str) -> str:
    assert sim.api is not None
    return ",".join([f"esa=127.0.0.1:{sim.port}", "name=bf-live", f"app_key={APP_KEY}", f"username={USER}",
                     f"password={PASSWORD}", f"sso_url={sim.api.url}", f"betting_url={sim.api.betting_url}",
                     "heartbeat_ms=500", *extra])


@contextlib.asynccontextmanager
async def running(store: Store, spec_text: str, **catalogue_args: Any
                  ) -> AsyncIterator[tuple[EsaSource, Pipeline, asyncio.Task[None]]]:
    """Run ``spec_text`` through the registry and the pipeline into ``store``."""
    got: list[tuple[Source, Pipeline]] = []

    def on_source(source: Source, pipeline: Pipeline) -> None:
        assert isinstance(source, EsaSource)
        source.catalogue_args.update(catalogue_args)
        got.append((source, pipeline))

    task = asyncio.create_task(run_spec(store, Settings(), parse_source_spec(spec_text), on_source=on_source))
    try:
        await eventually(lambda: got or task.done(), what="the source built")
        assert got, task.exception()
        source, pipeline = got[0]
        assert isinstance(source, EsaSource)
        yield source, pipeline, task
    finally:
        await cancel_and_wait(task, "the source")


async def stored(store: Store, source: str = "bf-live") -> dict[str, Market]:
    return {m.market_id: m for m in await store.load_all_markets() if m.source == source}


def expected_names(sim: Simulator) -> dict[str, dict[str, Any]]:
    """What Betfair's catalogue says of every open market (the model's names)."""
    assert sim.model is not None
    out = {}
    for mid, mb in sim.books.items():
        md = mb.definition or {}
        if md.get("status") == "CLOSED":
            continue
        comp = sim.model.competition_of(mid)
        out["bf:" + mid] = {"event_name": md["eventName"], "name": md["name"],
                            "competition": comp[1] if comp else None,
                            "runners": {str(r["id"]): r["name"] for r in md["runners"]}}
    return out


def names_of(m: Market) -> dict[str, Any]:
    return {"event_name": m.event_name, "name": m.name, "competition": m.competition,
            "runners": {s.selection_id: s.name for s in m.selections}}


# -- login, keep-alive, logout --------------------------------------------------------------------


async def test_interactive_login_keep_alive_and_logout(make_sim) -> None:
    sim = await live_sim(make_sim)
    assert sim.api is not None
    login = login_for(sim)
    try:
        token = await login.token()
        assert sim.sessions.check(token) is None and sim.api.logins == 1
        assert await login.token() == token and sim.api.logins == 1  # held, not a login per call
        await login.keep_alive()
        assert sim.api.keep_alives == 1 and login.keep_alives == 1
        await login.logout()
        assert sim.api.logouts == 1 and sim.sessions.check(token) == "INVALID_SESSION_INFORMATION"
    finally:
        await login.aclose()


async def test_a_refused_login_is_fatal_and_never_retried(make_sim) -> None:
    sim = await live_sim(make_sim)
    assert sim.api is not None
    login = login_for(sim, credentials=Credentials(app_key=APP_KEY, username=USER, password="wrong"))
    try:
        with pytest.raises(SourceAuthError) as info:
            await login.token()
        assert info.value.code == "INVALID_USERNAME_OR_PASSWORD" and "wrong" not in str(info.value)
        with pytest.raises(SourceAuthError):
            await login.token()
        assert sim.api.failed_logins == 1  # remembered: a retry could lock the account
    finally:
        await login.aclose()


def _self_signed(tmp_path: Path, name: str) -> tuple[str, str]:
    """A throwaway self-signed certificate for 127.0.0.1 and its key (PEM paths)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


async def test_certificate_login_over_tls_with_a_client_certificate(make_sim, tmp_path: Path) -> None:
    server_cert, server_key = _self_signed(tmp_path, "sso")
    client_cert, client_key = _self_signed(tmp_path, "client")
    sim = await live_sim(make_sim, cert_tls=(server_cert, server_key, client_cert))
    assert sim.api is not None
    creds = Credentials(app_key=APP_KEY, username=USER, password=PASSWORD, cert_file=client_cert,
                        key_file=client_key)
    login = login_for(sim, credentials=creds, cert_sso_url=sim.api.cert_url, verify=server_cert)
    try:
        token = await login.token()
        assert sim.api.cert_logins == 1 and sim.api.logins == 0 and sim.sessions.check(token) is None
    finally:
        await login.aclose()
    # the same login without TLS: Betfair answers CERT_AUTH_REQUIRED (fatal: configuration)
    plain = login_for(sim, credentials=creds, cert_sso_url=sim.api.url, verify=server_cert)
    try:
        with pytest.raises(SourceAuthError, match="CERT_AUTH_REQUIRED"):
            await plain.token()
    finally:
        await plain.aclose()
    # and no client certificate: the TLS listener refuses the handshake (retryable transport failure)
    bare = login_for(sim, credentials=Credentials(app_key=APP_KEY, username=USER, password=PASSWORD),
                     sso_url=sim.api.cert_url, verify=server_cert)
    try:
        with pytest.raises(BetfairApiError) as info:
            await bare.token()
        assert info.value.code == "transport"
    finally:
        await bare.aclose()
    assert sim.api.cert_logins == 1


async def test_keep_alives_hold_a_session_that_would_expire(make_sim) -> None:
    sim = await live_sim(make_sim, session_ttl_s=0.6)
    login = login_for(sim, keep_alive_s=0.15)
    stop = asyncio.Event()
    task = asyncio.create_task(login.run_keep_alive(stop))
    try:
        token = await login.token()
        await eventually(lambda: login.keep_alives >= 6, what="six keep-alives (> 1.5 × the session's life)")
        assert sim.sessions.check(token) is None and login.logins == 1 and login.current == token
        stop.set()
        await task
        await eventually(lambda: sim.sessions.check(token) is not None, what="the session to expire unattended")
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        await login.aclose()


async def test_an_expired_session_is_one_new_login_for_the_betting_api_and_keep_alive(make_sim) -> None:
    sim = await live_sim(make_sim)
    assert sim.api is not None
    login = login_for(sim)
    api = BettingApi(login, url=sim.api.betting_url)
    ids = sorted(sim.books)[:3]
    try:
        first = await login.token()
        sim.expire_sessions()
        entries = await api.list_market_catalogue(ids)  # INVALID_SESSION_INFORMATION → login → repeat
        assert {e["marketId"] for e in entries} == set(ids)
        assert [c.answer for c in sim.api.catalogue_requests] == ["INVALID_SESSION_INFORMATION", "ok"]
        assert login.logins == 2 and login.current != first
        sim.expire_sessions()
        await login.keep_alive()  # NO_SESSION → login
        assert login.logins == 3 and sim.sessions.check(login.current) is None
        # many callers who saw the same stale token: one login between them
        sim.expire_sessions()
        stale = login.current
        await asyncio.gather(*(login.relogin(stale) for _ in range(5)))
        assert login.logins == 4
    finally:
        await api.aclose()
        await login.aclose()


# -- the catalogue: weights, batches --------------------------------------------------------------


def test_request_weights_follow_betfairs_table() -> None:
    assert markets_per_request(CATALOGUE_PROJECTION) == 200  # MARKET_DESCRIPTION weighs 1
    assert markets_per_request([*CATALOGUE_PROJECTION, "RUNNER_METADATA"]) == 100
    assert markets_per_request(["EVENT", "RUNNER_DESCRIPTION"]) == 1000  # weightless: maxResults caps it
    assert markets_per_request(CATALOGUE_PROJECTION, max_weight=10) == 10


async def test_catalogue_requests_never_exceed_the_weight_limit_and_are_batched(make_sim) -> None:
    sim = await live_sim(make_sim, events=16, max_weight=10)
    assert sim.api is not None
    got: list[dict[str, Any]] = []

    async def deliver(lines: list[bytes]) -> None:
        got.extend(orjson.loads(line) for line in lines)

    async with fetching(sim, deliver, max_weight=10) as (api, fetcher):
        open_ids = [mid for mid, mb in sim.books.items() if (mb.definition or {}).get("status") != "CLOSED"]
        assert len(open_ids) > 10
        for mid, mb in sim.books.items():
            fetcher.observe(mid, (mb.definition or {}).get("version"))
        await eventually(lambda: fetcher.pending == 0 and len(got) == len(open_ids), what="every catalogue")
        assert {e["op"] for e in got} == {"marketCatalogue"}
        assert fetcher.requests == [10] * (len(sim.books) // 10) + ([len(sim.books) % 10] if len(sim.books) % 10 else [])
        calls = list(sim.api.catalogue_requests)
        assert calls and all(c.weight <= 10 and c.answer == "ok" for c in calls)
        assert len(calls) == math.ceil(len(sim.books) / 10)
        # the same versions again: nothing to fetch; a new version: that market alone
        for mid, mb in sim.books.items():
            fetcher.observe(mid, (mb.definition or {}).get("version"))
        fetcher.observe(open_ids[0], 1 + ((sim.books[open_ids[0]].definition or {}).get("version") or 0))
        await eventually(lambda: len(sim.api.catalogue_requests) == len(calls) + 1, what="one refresh")
        assert sim.api.catalogue_requests[-1].markets == 1
        # the simulator enforces Betfair's limit: 11 markets at weight 1 is TOO_MUCH_DATA
        with pytest.raises(BetfairApiError, match="TOO_MUCH_DATA"):
            await api.list_market_catalogue(open_ids[:11])


async def test_a_market_the_catalogue_leaves_out_is_asked_for_again_and_a_closed_one_never(make_sim) -> None:
    # Betfair's Betting API lists a new market a moment after the stream shows it: an answer that
    # leaves out an open market must not leave it nameless for good (seen as a flake of
    # test_event_linking: one event's markets never named)
    sim = await live_sim(make_sim, events=4)
    assert sim.api is not None
    got: list[str] = []

    async def deliver(lines: list[bytes]) -> None:
        got.extend(orjson.loads(line)["marketId"] for line in lines)

    async with fetching(sim, deliver, missing_retry_s=(0.2, 0.4)) as (_, fetcher):
        versions = {mid: (mb.definition or {}).get("version") for mid, mb in sim.books.items()
                    if (mb.definition or {}).get("status") != "CLOSED"}
        late, shut = sorted(versions)[:2]
        sim.api.unlisted.add(late)
        for mid, version in versions.items():
            fetcher.observe(mid, version, closed=mid == shut)  # the stream shows `shut` CLOSED

        def asked(mid: str) -> list[Any]:
            return [c for c in sim.api.catalogue_requests if mid in c.ids]

        await eventually(lambda: len(asked(late)) >= 2, what="the left-out market asked for again")
        assert late not in got and all(late not in c.returned for c in asked(late))
        sim.api.unlisted.discard(late)  # the API lists it now
        await eventually(lambda: late in got, what="the left-out market named once listed")
        assert sorted(got) == sorted(set(versions) - {shut})  # each once; the closed market never asked
        assert asked(shut) == []

        # bounded: a market never listed is asked for once plus once per retry delay, then rests
        never = sorted(versions)[2]
        sim.api.unlisted.add(never)
        before = len(asked(never))  # (named above)
        fetcher.observe(never, (versions[never] or 0) + 1)
        await eventually(lambda: fetcher.pending == 0 and fetcher.retrying == 0 and len(asked(never)) >= before + 3,
                         what="the asks of a market never listed")
        assert len(asked(never)) == before + 1 + 2  # nothing wanted or scheduled: no further ask can come


async def test_a_market_closed_while_its_catalogue_is_asked_for_is_not_asked_again(make_sim) -> None:
    sim = await live_sim(make_sim, events=2)
    assert sim.api is not None
    mid, mb = next(iter(sim.books.items()))
    version = (mb.definition or {}).get("version") or 0
    async with fetching(sim, missing_retry_s=(0.05, 0.1)) as (api, fetcher):
        asked = api.list_market_catalogue

        async def closing_meanwhile(ids: Any, projection: Any = CATALOGUE_PROJECTION) -> list[dict[str, Any]]:
            fetcher.observe(mid, version + 1, closed=True)  # the stream shows it closed while we ask
            sim.api.unlisted.add(mid)  # (and Betfair no longer lists it)
            return await asked(ids, projection)
        api.list_market_catalogue = closing_meanwhile  # type: ignore[method-assign]
        fetcher.observe(mid, version)
        await eventually(lambda: fetcher.requests and fetcher.pending == 0, what="the one request")
        assert fetcher.retrying == 0  # nothing scheduled: a closed market is never asked for again
        assert fetcher.requests == [1] and fetcher.missing == 0


async def test_a_cancel_in_the_same_loop_turn_as_a_wake_still_stops_the_fetcher() -> None:
    # asyncio.wait_for on 3.11 returns the result and drops the cancel when both land in one loop
    # turn: the fetcher's retry wait used it, and a source's teardown then waited for it forever
    login = BetfairLogin(Credentials(app_key=APP_KEY, username=USER, password=PASSWORD), sso_url="http://127.0.0.1:9")
    api = BettingApi(login, url="http://127.0.0.1:9")  # (never called: nothing is due)
    fetcher = CatalogueFetcher(api, lambda lines: asyncio.sleep(0))
    fetcher._missing["1.1"] = (1, 1, 1e18)  # a left-out market to ask for again much later: the timed wait
    task = asyncio.create_task(fetcher.run())
    try:
        for _ in range(5):
            await asyncio.sleep(0)  # (into its wait)
        fetcher._wake.set()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        assert done and task.cancelled(), "the fetcher went on after its cancel"
    finally:
        if not task.done():
            task.cancel()
        await api.aclose()
        await login.aclose()


def test_a_definition_says_whether_its_market_is_closed() -> None:
    line = orjson.dumps({"op": "mcm", "mc": [
        {"id": "1.1", "marketDefinition": {"version": 7, "status": "CLOSED"}},
        {"id": "1.2", "marketDefinition": {"version": 3, "status": "OPEN"}},
        {"id": "1.3", "rc": [{"id": 1, "atb": [[2.0, 5.0]]}]}]})
    assert definitions_in(line) == [("1.1", 7, True), ("1.2", 3, False)]


# -- the whole live path into Redis ---------------------------------------------------------------


async def test_a_market_first_seen_over_esa_carries_its_real_names_within_one_catalogue_round_trip(
        make_sim, store: Store) -> None:
    sim = await live_sim(make_sim, events=12)
    assert sim.api is not None
    want = expected_names(sim)
    async with running(store, spec_for(sim)) as (source, pipeline, task):
        async def named() -> bool:
            markets = await stored(store)
            return set(markets) == set(want) and all(names_of(markets[k]) == v for k, v in want.items())

        await eventually(named, what="every stored market named as the catalogue names it")
        assert source.fetcher is not None and source.login is not None
        assert source.fetcher.requests == [len(sim.books)]  # one request for the whole image, one round trip
        assert [c.answer for c in sim.api.catalogue_requests] == ["ok"]
        assert all(c.weight <= 200 for c in sim.api.catalogue_requests)
        assert sim.api.logins == 1 and source.login.logins == 1
        markets = await stored(store)
        soccer = [m for m in markets.values() if m.sport == "soccer"]
        assert soccer and all(m.competition for m in soccer)
        assert all(m.event_name and m.name and all(s.name for s in m.selections) for m in markets.values())
        assert pipeline.ingest.rejected_messages == 0
        assert not task.done()


async def test_the_live_stream_carries_no_names(make_sim) -> None:
    sim = await live_sim(make_sim)
    lines: list[bytes] = []

    async def on_lines(batch: list[bytes], recv_ms: int) -> None:
        lines.extend(batch)

    client = EsaClient(host="127.0.0.1", port=sim.port, app_key=APP_KEY, session_token="sim-session",
                       market_filter={}, market_data_filter={"fields": ["EX_MARKET_DEF", "EX_BEST_OFFERS"]},
                       on_lines=on_lines)
    task = asyncio.create_task(client.run())
    try:
        await eventually(lambda: any(b'"marketDefinition"' in line for line in lines), what="the image")
        for line in lines:
            for mc in orjson.loads(line).get("mc") or ():
                md = mc.get("marketDefinition")
                if md is not None:
                    assert "eventName" not in md and "name" not in md
                    assert all("name" not in r for r in md["runners"])
        assert all(mb.definition and mb.definition.get("eventName") for mb in sim.books.values())  # kept for the catalogue
    finally:
        client.stop()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize("fault", ["TOO_MANY_REQUESTS", 503])
async def test_catalogue_failures_never_hold_up_prices(make_sim, store: Store, fault: str | int) -> None:
    sim = await live_sim(make_sim, events=6)
    assert sim.api is not None
    sim.fail_catalogue(10_000, fault)
    want = expected_names(sim)
    async with running(store, spec_for(sim), backoff_initial_s=0.05, backoff_max_s=0.2) as (source, pipeline, task):
        async def priced() -> bool:
            markets = await stored(store)
            return set(markets) == set(want) and all(
                any(s.back for s in m.selections) for m in markets.values() if m.status == "OPEN")

        await eventually(priced, what="every market stored with its prices")
        assert source.fetcher is not None
        await eventually(lambda: source.fetcher is not None and source.fetcher.failures >= 3,
                         what="three failed catalogue requests")
        markets = await stored(store)
        assert all(m.event_name is None and m.name is None for m in markets.values())  # no names yet, prices yes
        health = await store.get_health("bf-live")
        assert health is not None and health.state == "UP"
        sim.api.clear_faults()

        async def named() -> bool:
            now = await stored(store)
            return all(names_of(now[k]) == v for k, v in want.items())

        await eventually(named, what="names filled in once the Betting API answers")
        answers = [c.answer for c in sim.api.catalogue_requests]
        assert answers[-1] == "ok" and set(answers[:-1]) == {fault if isinstance(fault, str) else f"http_{fault}"}
        assert not task.done()


@pytest.mark.parametrize("how", ["stream NO_SESSION", "authentication refused"])
async def test_an_expired_session_on_the_stream_logs_in_again_and_resumes(make_sim, store: Store, how: str) -> None:
    sim = await live_sim(make_sim, events=4)
    assert sim.api is not None
    async with running(store, spec_for(sim)) as (source, pipeline, task):
        await eventually(lambda: source.client is not None and source.client.health == ("UP", None),
                         what="streaming")
        assert source.client is not None and source.login is not None
        first = source.login.current
        subscriptions = len(sim.subscriptions)
        if how == "stream NO_SESSION":
            sim.expire_sessions(notify="NO_SESSION")
        else:
            sim.expire_sessions()
            sim.drop_connections()
        await eventually(lambda: len(sim.subscriptions) > subscriptions and source.client is not None
                         and source.client.health == ("UP", None), what="subscribed again after a new login")
        assert source.login.logins == 2 and sim.api.logins == 2 and source.login.current != first
        resub = sim.subscriptions[-1]
        assert resub.get("initialClk") and resub.get("clk")  # resumed where it was, not a fresh image
        assert not task.done()

        async def stored_up() -> bool:  # the health publisher persists it on its next beat (≤ 1 s)
            health = await store.get_health("bf-live")
            return health is not None and health.state == "UP"
        await eventually(stored_up, what="the stored health record UP again")


# -- options ----------------------------------------------------------------------------------------


async def test_the_market_filter_options_become_the_subscription_filter(make_sim, store: Store) -> None:
    sim = await live_sim(make_sim, events=12)
    text = spec_for(sim, "event_types=1+7", "countries=GB+IE", "market_types=MATCH_ODDS+WIN", "catalogue=false")
    async with running(store, text) as (source, pipeline, task):
        await eventually(lambda: sim.subscriptions, what="a subscription")
        assert sim.subscriptions[0]["marketFilter"] == {
            "eventTypeIds": ["1", "7"], "countryCodes": ["GB", "IE"], "marketTypes": ["MATCH_ODDS", "WIN"]}
        assert source.catalogue is None and source.fetcher is None


def test_spec_errors_name_what_to_fix() -> None:
    from feed.sources.esa import from_spec

    for text, message in [
        ("esa=127.0.0.1:1,app_key=k,username=u,password=p", "needs sso_url"),
        ("esa=127.0.0.1:1,app_key=k,username=u", "needs session= or username= and password="),
        ("esa=127.0.0.1:1,app_key=k,session=s,cert_file=a.pem", "go together"),
        ("esa=127.0.0.1:1,app_key=k,session=s,catalogue=maybe", "catalogue must be true or false"),
        ("esa=127.0.0.1:1,app_key=k,session=s,keep_alive_s=-1", "keep_alive_s must be >= 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            from_spec(parse_source_spec(text), Settings())
    with pytest.raises(ConfigError, match="did you mean"):
        parse_source_spec("esa=127.0.0.1:1,app_key=k,session=s,event_type=1")
    # a stream that is not Betfair's never defaults to Betfair's hosts: no keep-alive, no catalogue
    source = from_spec(parse_source_spec("esa=127.0.0.1:1,app_key=k,session=s"), Settings())
    assert source.catalogue is None and source.login is not None and source.login.keep_alive_s == 0
    source = from_spec(parse_source_spec("esa=stream-api.betfair.com:443,app_key=k,session=s,tls=true"), Settings())
    assert source.catalogue is not None and source.catalogue.url == "https://api.betfair.com/exchange/betting/json-rpc/v1"
    assert source.login is not None and source.login.sso_url == "https://identitysso.betfair.com"


async def test_passwords_and_session_tokens_never_reach_the_logs(make_sim, store: Store, caplog) -> None:
    install()
    try:
        caplog.set_level(logging.DEBUG)
        sim = await live_sim(make_sim, events=3)
        async with running(store, spec_for(sim)) as (source, pipeline, task):
            await eventually(lambda: source.fetcher is not None and source.fetcher.delivered > 0,
                             what="a catalogue delivered")
            assert source.login is not None
            token = source.login.current
            sim.expire_sessions(notify="NO_SESSION")
            await eventually(lambda: source.login is not None and source.login.logins == 2, what="a new login")
            tokens = [token, source.login.current]
        text = "\n".join(r.getMessage() for r in caplog.records)
        assert "logged in" in text
        for secret in (PASSWORD, APP_KEY, *tokens):
            assert secret and secret not in text
    finally:
        uninstall()

