"""``oddsfeed`` command line: run | ingest | serve | simulate | export-history.

- ``oddsfeed run`` — the main job in one process tree: the embedded Redis
  (unless ``--redis-url``), the simulator as upstream (unless ``--replay``,
  ``--esa`` or ``--source`` is given), ingest, and the API on ``--host``/``--port``;
  ``--sim-push`` also serves the simulator's matches in the push format (with
  live scores and a match clock) and ingests them as the source ``push``.
- ``oddsfeed ingest`` — ingest only (``--replay PATH…`` exits when the
  recordings are consumed and prints a summary; ``--esa HOST:PORT`` streams;
  ``--source KIND=URL,…`` (repeatable) runs any sources together).
- ``oddsfeed serve`` — the API only, on a Redis that an ingest writes.
- ``oddsfeed simulate`` — the local ESA upstream; ``--providers`` also serves
  the Pinnacle- and Odds-API-style HTTP endpoints on ``--providers-port`` and
  the push format (WebSocket and SSE) on ``--push-port`` (with
  ``--uof-amqp-url`` a UOF producer on a RabbitMQ broker, with
  ``--webhook-url`` signed webhook deliveries to that URL).
- ``oddsfeed export-history --out DIR`` — the price history kept in Redis to
  Parquet files (:mod:`feed.history_export`; needs ``oddsfeed[parquet]``).

Errors a user can fix (busy port, unreachable Redis, missing file) end with
one line on stderr and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from feed.errors import ConfigError, OddsfeedError
from feed.settings import Settings, from_env

logger = logging.getLogger("oddsfeed")

#: Set by SIGINT/SIGTERM: long-running commands stop gracefully.
SHUTDOWN = asyncio.Event()


class UsageError(OddsfeedError):
    """A command-line problem the user fixes by changing the command."""


_DEFAULT_SPEED = 1.0


def _speed(value: str) -> float | None:
    if value == "max":
        return None
    try:
        speed = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--speed takes a number > 0 or 'max', not {value!r}") from None
    if speed <= 0:
        raise argparse.ArgumentTypeError("--speed must be > 0 (or 'max')")
    return speed


def _hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {value!r}")
    return host or "127.0.0.1", _port(port)


def _port(value: str) -> int:
    """A TCP port, 0–65535 (0: any free port)."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a port is a number from 0 to 65535, not {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 0 to 65535, not {port}")
    return port


def _positive(value: str) -> int:
    """An integer ≥ 1."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, not {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def _positive_float(value: str) -> float:
    """A number > 0."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, not {value!r}") from None
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, not {value}")
    return x


def _redis_url(value: str) -> str:
    """A Redis URL: redis://, rediss:// or unix:// (what redis-py accepts)."""
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise argparse.ArgumentTypeError(
            f"a Redis URL starts with redis://, rediss:// or unix:// (e.g. redis://127.0.0.1:6379/0), not {value!r}")
    return value


def _instant(value: str) -> int:
    """A point in time: integer ms since the Unix epoch, or ISO-8601 (UTC when
    it names no offset: ``2027-01-15``, ``2027-01-15T08:00:00Z``) → ms since the epoch."""
    from datetime import UTC, datetime, timedelta

    text = value.strip()
    if text.isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ISO-8601 UTC (e.g. 2027-01-15T08:00:00Z) or integer ms since "
                                         f"the Unix epoch, not {value!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    ms = (when - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)  # exact, no float rounding
    if ms < 0:
        raise argparse.ArgumentTypeError(f"must not be before 1970-01-01T00:00:00Z, not {value!r}")
    return ms


def _out_dir(value: str) -> str:
    """A folder for the export (made when missing), not an existing file."""
    if not value or (os.path.exists(value) and not os.path.isdir(value)):
        raise argparse.ArgumentTypeError(f"expected a folder, not {'the file ' if value else ''}{value!r}")
    return value


def _source(value: str) -> Any:
    from feed.sources.spec import parse_source_spec

    try:
        return parse_source_spec(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _kinds_help() -> str:
    """``kind (protocol)`` for every registered source kind."""
    from feed.sources.registry import REGISTRY

    return "; ".join(f"{k.kind} ({k.protocol.split(' ([')[0]})" for k in REGISTRY.values())


def _tenants_file(value: str) -> str:
    """A tenants file that parses and validates (:func:`streaming.tenants.load_tenants_file`)."""
    from streaming.tenants import load_tenants_file

    try:
        load_tenants_file(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _log_format(value: str) -> str:
    if value not in ("text", "json"):
        raise argparse.ArgumentTypeError(f"--log-format is text or json, not {value!r}")
    return value


def _observability_opts(p: argparse.ArgumentParser, *, metrics: bool, run: bool = False) -> None:
    """``--log-format`` (every process command) and, for commands that ingest,
    ``--metrics-port`` / ``--metrics-host`` (the ingest's Prometheus metrics, :mod:`feed.metrics`)."""
    g = p.add_argument_group("observability")
    g.add_argument("--log-format", type=_log_format, default=os.environ.get("ODDSFEED_LOG_FORMAT", "text"),
                   metavar="{text,json}",
                   help="log lines as text (default) or one JSON object per line with ts, level, logger, message "
                        "and trace_id / source / market when known (env ODDSFEED_LOG_FORMAT)")
    if not metrics:
        return
    port_env = os.environ.get("ODDSFEED_METRICS_PORT")
    g.add_argument("--metrics-port", type=_port, default=port_env if port_env is not None else (None if run else 0),
                   help="serve the ingest's Prometheus metrics on http://METRICS_HOST:PORT/metrics; 0 = off "
                        + ("(default: the API port + 1, 8001; skipped with a warning when that port is busy) "
                           if run else "(default 0: off) ")
                        + "(env ODDSFEED_METRICS_PORT)")
    g.add_argument("--metrics-host", default=os.environ.get("ODDSFEED_METRICS_HOST", "127.0.0.1"),
                   help="bind address of the ingest metrics (default 127.0.0.1; env ODDSFEED_METRICS_HOST)")


@contextlib.asynccontextmanager
async def _ingest_metrics(args: argparse.Namespace, settings: Settings) -> AsyncIterator[None]:
    """Serve the ingest metrics while inside (``--metrics-port``; :mod:`feed.metrics`). ``oddsfeed run``
    without the option (or ODDSFEED_METRICS_PORT) uses the API port + 1 and carries on without
    metrics, with a warning, when that port is busy; an explicit busy port is an error."""
    from feed.metrics import bind, serve_metrics

    port = args.metrics_port
    soft = port is None
    if port is None:
        port = settings.port + 1 if 0 < settings.port < 65535 else 0
    sock = None
    if port:
        try:
            sock = bind(args.metrics_host, port)
        except ConfigError as exc:
            if not soft:
                raise
            logger.warning("ingest metrics not served: %s", exc)
    if sock is None:
        yield
        return
    async with serve_metrics(args.metrics_host, port, sock=sock):
        yield


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oddsfeed", description="Live odds feed ingestion and streaming.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def store_opts(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("store")
        g.add_argument("--redis-url", type=_redis_url,
                       help="Redis/Valkey URL (default: start the embedded redis-server)")
        g.add_argument("--redis-cluster", action="store_true", help="--redis-url is a Redis Cluster node")
        g.add_argument("--data-dir", help="embedded Redis data directory (default ./var)")
        g.add_argument("--partitions", type=_positive, help="delta-log partitions (default 1)")

    def api_opts(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("api")
        g.add_argument("--host", help="API bind address (default 127.0.0.1)")
        g.add_argument("--port", type=_port, help="API port (default 8000)")
        g.add_argument("--tenants", type=_tenants_file, metavar="FILE", default=os.environ.get("ODDSFEED_TENANTS_FILE"),
                       help="tenants (TOML): API keys / JWT subjects, scopes, what each may see, limits; "
                            "re-read when it changes (env ODDSFEED_TENANTS_FILE; see README 'Tenants')")

    def source_opts(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("source")
        g.add_argument("--replay", nargs="+", metavar="PATH",
                       help="recordings to replay: Betfair historic files (.bz2, .gz, plain) and oddsfeed recordings "
                            "of any source kind (from --record), files or folders")
        g.add_argument("--speed", type=_speed, default=_DEFAULT_SPEED,
                       help="replay pacing: a multiplier, or 'max' (default 1; Betfair Data Scientists' CSV "
                            "summaries: max)")
        g.add_argument("--keep-clock", action="store_true", help="keep the recording's own pt instead of mapping it onto now")
        g.add_argument("--esa", type=_hostport, metavar="HOST:PORT", help="a Betfair ESA endpoint to stream from")
        g.add_argument("--esa-tls", action="store_true", help="use TLS to the ESA endpoint")
        g.add_argument("--app-key", default=os.environ.get("ODDSFEED_BETFAIR_APP_KEY"), help="ESA app key (env ODDSFEED_BETFAIR_APP_KEY)")
        g.add_argument("--session", default=os.environ.get("ODDSFEED_BETFAIR_SESSION"), help="ESA session token (env ODDSFEED_BETFAIR_SESSION)")
        g.add_argument("--source", type=_source, action="append", metavar="SPEC",
                       help="a source as KIND=URL[,key=value…] (kinds: " + _kinds_help() + "; "
                            "repeat for several; values may be $ENV_VAR; an unknown option is an error "
                            "naming the valid ones), e.g. pinnacle=http://127.0.0.1:9555,user=demo,password=demo")
        g.add_argument("--mappings", metavar="FILE", default=os.environ.get("ODDSFEED_MAPPINGS"),
                       help="event-link overrides (YAML: pin / forbid / aliases), reloaded when the file changes "
                            "(env ODDSFEED_MAPPINGS)")
        g.add_argument("--record", metavar="DIR",
                       help="record every payload each source receives under DIR/<source>/ (gzip when closed; "
                            "esa in the Betfair historic format); replay with --replay DIR")

    def sim_opts(p: argparse.ArgumentParser, prefix: str = "") -> None:
        g = p.add_argument_group("simulator")
        g.add_argument(f"--{prefix}events", type=_positive, default=12, help="synthetic events (default 12)")
        g.add_argument(f"--{prefix}rate", type=_positive_float, default=50.0,
                       help="synthetic price updates per second (default 50)")
        g.add_argument(f"--{prefix}seed", type=int, help="random seed for the synthetic model")
        g.add_argument(f"--{prefix}time-scale", type=_positive_float, default=60.0,
                       help="lifecycle speed-up (default 60)")

    run = sub.add_parser("run", help="the main job: embedded Redis, simulator (or replay), ingest and API")
    store_opts(run)
    api_opts(run)
    source_opts(run)
    sim_opts(run, "sim-")
    run.add_argument("--sim-port", type=_port, default=0, help="simulator port (default: any free port)")
    run.add_argument("--sim-push", action="store_true",
                     help="also serve the simulator's matches in the push format (docs/push-format.md: scores, "
                          "period and match clock of soccer and basketball in play; the Betfair stream has none) "
                          "and ingest them as the source 'push'")

    ingest = sub.add_parser("ingest", help="ingest only: --replay PATH… (exits when done), --esa HOST:PORT or --source SPEC…")
    store_opts(ingest)
    source_opts(ingest)

    record = sub.add_parser("record", help="ingest --source/--esa and record what each source receives: "
                                           "record --source SPEC… --out DIR (same as ingest --record DIR)")
    store_opts(record)
    source_opts(record)
    record.add_argument("--out", required=True, metavar="DIR", help="recording directory")

    serve = sub.add_parser("serve", help="the API only, reading what an ingest writes to Redis")
    store_opts(serve)
    api_opts(serve)
    for p in (run, ingest, record, serve):
        _observability_opts(p, metrics=p is not serve, run=p is run)

    export = sub.add_parser("export-history",
                            help="write the price history kept in Redis to Parquet files under --out DIR "
                                 "(date=YYYY-MM-DD/source=<source>/part-<n>.parquet; "
                                 "pip install 'oddsfeed[parquet]')")
    export.add_argument("--out", dest="export_dir", type=_out_dir, required=True, metavar="DIR",
                        help="dataset folder (made when missing); a re-run replaces the rows of the range it "
                             "exports, keeping every other row (see feed/history_export.py)")
    export.add_argument("--from", dest="from_ms", type=_instant, metavar="TIME",
                        help="first change to export, inclusive: ISO-8601 UTC (2027-01-15T08:00:00Z) or integer "
                             "ms since the epoch (default: the oldest retained)")
    export.add_argument("--to", dest="to_ms", type=_instant, metavar="TIME",
                        help="last change to export, inclusive, as --from (default: the newest)")
    export.add_argument("--market", dest="markets", action="append", metavar="ID",
                        help="a market id to export; repeat for several (default: every market with history)")
    store_opts(export)
    _observability_opts(export, metrics=False)

    sim = sub.add_parser("simulate", help="the local ESA upstream (synthetic markets or recorded files)")
    sim.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    sim.add_argument("--port", type=_port, default=9444, help="port (default 9444)")
    sim.add_argument("--api-port", type=_port, default=9445,
                     help="port of the Betfair identity SSO (login, keepAlive) and Betting API (listMarketCatalogue) "
                          "the live client uses beside the stream (default 9445)")
    sim.add_argument("--replay", nargs="+", metavar="PATH", help="serve recorded files instead of synthetic markets")
    sim.add_argument("--speed", type=_speed, default=1.0, help="recorded pacing multiplier or 'max'")
    sim.add_argument("--providers", action="store_true",
                     help="also serve Pinnacle- and The-Odds-API-style HTTP endpoints from the same markets")
    sim.add_argument("--providers-port", type=_port, default=9555, help="port of the HTTP providers (default 9555)")
    sim.add_argument("--push-port", type=_port, default=9556,
                     help="with --providers: port of the push provider (WebSocket /push/ws, SSE /push/sse; default 9556)")
    sim.add_argument("--cricket-port", type=_port, default=9446,
                     help="with --providers: port of Betfair's sports-data stream (live cricket scores for a "
                          "betfair-cricket source; the ESA simulator's logins work on it; default 9446)")
    sim.add_argument("--race-port", type=_port, default=9447,
                     help="with --providers: port of Betfair's sports-data stream serving race progress, TPD "
                          "(the simulator's in-play horse races, for a betfair-race source; the ESA "
                          "simulator's logins work on it; default 9447)")
    sim.add_argument("--uof-amqp-url", metavar="URL",
                     help="with --providers: also run a Unified-Odds-Feed producer publishing UOF XML to this "
                          "RabbitMQ broker (amqp://…; needs aio-pika), its recovery API on --uof-port "
                          "(feed/simulator/uof.py; default: off)")
    sim.add_argument("--uof-port", type=_port, default=9557, help="port of the UOF recovery API (default 9557)")
    sim.add_argument("--webhook-url", metavar="URL",
                     help="with --providers: also POST the markets as signed push-format webhook deliveries to "
                          "this URL (a webhook source's http://HOST:PORT/ingest/webhook/NAME; "
                          "feed/simulator/webhook_pusher.py; default: off)")
    sim.add_argument("--webhook-secret", default="sim-webhook-secret",
                     help="the webhook deliveries' HMAC secret (default sim-webhook-secret)")
    sim.add_argument("--webhook-prefix", default="px",
                     help="the receiving webhook source's prefix= (the truth log's ids; default px)")
    sim.add_argument("--truth-log", metavar="PATH",
                     help="append every upstream change (ground truth, one JSON line per selection, oddsfeed ids) "
                          "to PATH; see feed/simulator/truth.py (default: off)")
    sim.add_argument("--control-port", type=_port, metavar="PORT",
                     help="serve the simulators' fault switches on 127.0.0.1:PORT (JSON lines; "
                          "see feed/simulator/control.py; default: off)")
    sim_opts(sim)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    return from_env(
        redis_url=getattr(args, "redis_url", None),
        redis_cluster=getattr(args, "redis_cluster", None) or None,
        data_dir=getattr(args, "data_dir", None),
        partitions=getattr(args, "partitions", None),
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        record_dir=getattr(args, "out", None) or getattr(args, "record", None),
        mappings=getattr(args, "mappings", None),
        tenants_file=getattr(args, "tenants", None),
    )


def _linker(settings: Settings, store: Any) -> Any:
    """The event linker of an ingest process (raises ConfigError for a bad mappings file)."""
    from pathlib import Path

    from feed.linker import Linker

    linker = Linker(store, mappings=Path(settings.mappings) if settings.mappings else None,
                    tolerance_ms=settings.match_tolerance_ms)
    linker.start()
    return linker


# --- building blocks ---------------------------------------------------------


@contextlib.asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[Any]:
    """The Store, on ``settings.redis_url`` or on the embedded server (started
    here, or reused when another oddsfeed process already runs it in the same
    data directory)."""
    from feed.embedded_redis import EmbeddedRedis
    from feed.store import Store

    server: EmbeddedRedis | None = None
    url = settings.redis_url
    if url is None:
        candidate = EmbeddedRedis(settings.data_dir)
        if candidate._ping():
            url = candidate.url
            logger.info("using the embedded redis-server already running at %s", url)
        else:
            server = candidate
            url = server.start()  # from the main thread: the server dies with it (see EmbeddedRedis)
    watchdog: asyncio.Task[None] | None = None
    try:
        store = await Store.open(url, partitions=settings.partitions, log_maxlen=settings.log_maxlen,
                                 cluster=settings.redis_cluster, push=settings.log_push)
        if server is not None:
            watchdog = asyncio.create_task(_restart_when_dead(server), name="embedded-redis-watchdog")
        try:
            yield store
        finally:
            await store.close()
    finally:
        if watchdog is not None:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
        if server is not None:
            await asyncio.to_thread(server.stop)


async def _restart_when_dead(server: Any, interval_s: float = 1.0) -> None:
    """Restart the embedded redis-server (same data directory: its
    append-only file brings the data back) whenever it exits; the ingest
    meanwhile queues its writes (docs/architecture.md §26)."""
    from feed.errors import EmbeddedRedisError

    while True:
        await asyncio.sleep(interval_s)
        if server.process is not None and server.process.poll() is None:
            continue
        logger.error("the embedded redis-server exited (code %s); restarting it",
                     server.process.returncode if server.process is not None else "?")
        try:
            server.start()  # on the loop's (main) thread: the child must die with it
        except EmbeddedRedisError as exc:
            logger.error("could not restart the embedded redis-server: %s", exc)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket, or UsageError naming the busy/unavailable address."""
    from feed.aio import listening_socket

    return listening_socket(host, port, 2048, error=UsageError,
                            busy="stop the other process or pick another with --port")


async def serve_api(settings: Settings, store: Any, sock: socket.socket) -> None:
    """Serve the Starlette app on ``sock`` until cancelled."""
    import uvicorn

    from streaming.app import StreamingServer, create_app

    app = create_app(settings, store=store)
    config = uvicorn.Config(app, lifespan="on", log_level="warning", ws_max_size=256 * 1024,
                            timeout_graceful_shutdown=3)
    server = StreamingServer(config, app)
    # signals are ours (SHUTDOWN); uvicorn's hook is a method, typed as a generator context manager
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign, assignment]
    host, port = sock.getsockname()[:2]
    print(f"oddsfeed API on http://{host}:{port}/  (board /, SSE /v1/stream, WebSocket /v1/ws)", flush=True)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    stop = asyncio.create_task(SHUTDOWN.wait())
    try:
        await asyncio.wait({serving, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        server.should_exit = True  # graceful: close connections, run the lifespan shutdown
        stop.cancel()
        await serving


def _progress(ingest: Any, done: int, total: int) -> None:
    s = ingest.stats
    print(f"  replay: {done}/{total} files, {s.messages:,} messages, {s.runner_changes:,} runner changes, "
          f"{s.rejected} rejected", file=sys.stderr, flush=True)


def _print_summary(summary: Any) -> None:
    print("replay finished:")
    for line in summary.lines():
        print(f"  {line}")
    sys.stdout.flush()


async def _esa_source(settings: Settings, store: Any, args: argparse.Namespace, host: str, port: int,
                      app_key: str, session: str, tls: bool) -> None:
    from feed.sources.spec import SourceSpec
    from feed.supervisor import run_source, supervise

    spec = SourceSpec(kind="esa", url=f"{'tls://' if tls else ''}{host}:{port}", name="betfair",
                      options={"app_key": app_key, "session": session})
    await supervise("betfair", lambda: run_source(store, settings, spec), store=store)


def _sim_esa_options(sim: Any) -> str:
    """The ``--source esa=…`` options that log in to simulator ``sim`` the way
    a live Betfair client does (SSO login, keep-alive, listMarketCatalogue)."""
    cfg, api = sim.config, sim.api
    return (f"app_key={cfg.app_key},username={cfg.username},password={cfg.password},"
            f"sso_url={api.url},betting_url={api.betting_url}")


async def _sim_esa_source(settings: Settings, store: Any, sim: Any) -> None:
    """Ingest simulator ``sim`` as the source ``betfair`` through the live
    Betfair path: login → stream → catalogue → names."""
    from feed.sources.spec import parse_source_spec
    from feed.supervisor import run_source, supervise

    spec = parse_source_spec(f"esa=127.0.0.1:{sim.port},name=betfair,{_sim_esa_options(sim)}")
    await supervise("betfair", lambda: run_source(store, settings, spec), store=store)


async def _sim_push_source(settings: Settings, store: Any, sim: Any, args: argparse.Namespace) -> None:
    """Serve the ESA simulator's model in the push format (its own server, any free
    port) and ingest it over WebSocket as the source ``push``, until cancelled."""
    from feed.simulator.push_providers import PushSimConfig, PushSimulator
    from feed.sources.spec import parse_source_spec
    from feed.supervisor import run_source, supervise

    push = PushSimulator(PushSimConfig(events=args.sim_events, rate_per_s=args.sim_rate, seed=args.sim_seed,
                                       time_scale=args.sim_time_scale), model=sim.model)
    await push.start()
    try:
        print(f"simulator (push format, with scores) on {push.url('ws')}", flush=True)
        spec = parse_source_spec(f"push-ws={push.url('ws')},api_key={push.config.api_key},name=push")
        await supervise("push", lambda: run_source(store, settings, spec), store=store)
    finally:
        await push.stop()


async def _replay(store: Any, settings: Settings, args: argparse.Namespace) -> None:
    """``--replay PATH…``: Betfair historic files through the Betfair replay
    (clock mapped onto now unless --keep-clock), oddsfeed recordings of any
    kind through their kind's pipeline (their own clock)."""
    from feed.sources.recording import recording_paths, replay_recordings
    from feed.sources.replay import recording_files
    from feed.supervisor import run_replay

    ours = set(recording_paths(args.replay))
    csvs = [f for f in recording_files(args.replay) if f.suffix.lower() == ".csv" and f not in ours]
    betfair = [f for f in recording_files(args.replay) if f not in ours and f not in csvs]
    if csvs:  # Betfair Data Scientists' market summaries: the betfair-csv kind, to the end of the files
        from feed.pipeline import run_spec
        from feed.sources.spec import SourceSpec

        speed = "max" if args.speed is None or args.speed is _DEFAULT_SPEED else repr(args.speed)  # not given: max
        opts = {"on_end": "stop", "speed": speed, **({"keep_clock": "1"} if args.keep_clock else {})}
        await run_spec(store, settings, SourceSpec(kind="betfair-csv", url=";".join(map(str, csvs)),
                                                   name="betfair-csv", options=opts))
        print(f"replay of {len(csvs)} Betfair CSV file(s) finished", flush=True)
    if betfair:
        summary = await run_replay(store, settings, list(betfair), speed=args.speed,
                                   map_clock=not args.keep_clock, progress=_progress)
        _print_summary(summary)
    if ours:
        done = await replay_recordings(store, settings, sorted(ours), speed=args.speed)
        print("replay of oddsfeed recordings finished:")
        for name, n in done.sources.items():
            print(f"  {name}: {n:,} payloads")
        sys.stdout.flush()


# --- commands ----------------------------------------------------------------


def _run_lock(data_dir: str | Path) -> int:
    """Hold ``data_dir/run.lock`` for this process (an exclusive ``flock``; the
    kernel drops it when the process ends, however it ends): two ``oddsfeed
    run`` in one data directory would share the embedded Redis and overwrite
    each other's sources. Returns the lock's file descriptor (keep it open).
    Raises UsageError naming the other process when the lock is held."""
    import fcntl

    d = Path(data_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / "run.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UsageError(f"another `oddsfeed run` (pid {other}) uses the embedded Redis in {d.resolve()}; stop it, "
                         "or give this one another --data-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


async def cmd_run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    lock = _run_lock(settings.data_dir) if settings.redis_url is None else None
    try:
        async with _ingest_metrics(args, settings):
            return await _cmd_run(args, settings)
    finally:
        if lock is not None:
            os.close(lock)


async def _cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from feed.ingest import tune_gc

    if getattr(args, "sim_push", False) and (args.replay or args.esa or args.source):
        raise UsageError("--sim-push adds a source to the built-in simulator: not with --replay, --esa or --source")
    sock = bind_socket(settings.host, settings.port)
    tune_gc()
    async with open_store(settings) as store:
        linker = _linker(settings, store)
        background: list[asyncio.Task[None]] = [asyncio.create_task(linker.run(), name="linker")]
        api = asyncio.create_task(serve_api(settings, store, sock))
        try:
            if args.replay:
                await _replay(store, settings, args)
                print("serving the replayed markets; Ctrl-C to stop", flush=True)
            elif args.esa or args.source:
                if args.esa:
                    if not (args.app_key and args.session):
                        raise UsageError("--esa needs --app-key and --session (or ODDSFEED_BETFAIR_APP_KEY / ODDSFEED_BETFAIR_SESSION)")
                    background.append(asyncio.create_task(
                        _esa_source(settings, store, args, args.esa[0], args.esa[1], args.app_key, args.session, args.esa_tls)))
                if args.source:
                    from feed.supervisor import run_sources

                    background.append(asyncio.create_task(run_sources(store, settings, args.source)))
            else:
                from feed.simulator.esa_server import Simulator, SimulatorConfig

                sim = Simulator(SimulatorConfig(port=args.sim_port, events=args.sim_events, rate_per_s=args.sim_rate,
                                                seed=args.sim_seed, time_scale=args.sim_time_scale, api_port=0))
                await sim.start()
                print(f"simulator (Betfair ESA protocol) on 127.0.0.1:{sim.port}", flush=True)
                assert sim.api is not None
                print(f"simulator Betfair SSO and Betting API on {sim.api.url}", flush=True)

                async def simulate_and_ingest() -> None:
                    try:
                        await _sim_esa_source(settings, store, sim)
                    finally:
                        await sim.stop()

                background.append(asyncio.create_task(simulate_and_ingest()))
                if args.sim_push:
                    background.append(asyncio.create_task(_sim_push_source(settings, store, sim, args)))
            done, _ = await asyncio.wait({api, *background[1:]} if len(background) > 1 else {api},
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # surface a source's fatal error
        finally:
            SHUTDOWN.set()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await api
    return 0


async def cmd_ingest(args: argparse.Namespace) -> int:
    from feed.ingest import tune_gc

    settings = settings_from_args(args)
    if not args.replay and not args.esa and not args.source:
        raise UsageError(f"{args.command} needs {'' if args.command == 'record' else '--replay PATH…, '}"
                         "--esa HOST:PORT or --source SPEC")
    tune_gc()
    async with _ingest_metrics(args, settings), open_store(settings) as store:
        linker = _linker(settings, store)
        if args.replay:
            await _replay(store, settings, args)
            await linker.step()  # the replayed events linked before this process exits
            return 0
        tasks = [linker.run()]
        if args.esa:
            if not (args.app_key and args.session):
                raise UsageError("--esa needs --app-key and --session (or ODDSFEED_BETFAIR_APP_KEY / ODDSFEED_BETFAIR_SESSION)")
            tasks.append(_esa_source(settings, store, args, args.esa[0], args.esa[1], args.app_key, args.session, args.esa_tls))
        if args.source:
            from feed.supervisor import run_sources

            tasks.append(run_sources(store, settings, args.source))
        async with asyncio.TaskGroup() as tg:
            for coro in tasks:
                tg.create_task(coro)
    return 0


async def cmd_serve(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    sock = bind_socket(settings.host, settings.port)
    async with open_store(settings) as store:
        await serve_api(settings, store, sock)
    return 0


async def cmd_simulate(args: argparse.Namespace) -> int:
    from feed.simulator.esa_server import SimulatorConfig, run_simulator
    from feed.sources.replay import recording_files

    if args.replay:
        recording_files(args.replay)  # raises FileNotFoundError (one line) before any server starts
    if (args.uof_amqp_url or args.webhook_url) and not args.providers:
        raise UsageError("--uof-amqp-url and --webhook-url go with --providers")

    config = SimulatorConfig(host=args.host, port=args.port, events=args.events, rate_per_s=args.rate,
                             seed=args.seed, time_scale=args.time_scale, replay=tuple(args.replay or ()),
                             speed=args.speed, truth_log=args.truth_log, api_port=args.api_port)
    bind_socket(args.host, args.port).close()  # a clear error for a busy port
    bind_socket(args.host, args.api_port).close()
    if args.control_port is not None:
        bind_socket("127.0.0.1", args.control_port).close()
    def ready(sim: Any) -> None:
        print(f"simulator (Betfair ESA protocol) on {args.host}:{sim.port}", flush=True)
        print(f"Betfair identity SSO and Betting API (listMarketCatalogue) on {sim.api.url}:", flush=True)
        print(f"  --source esa={args.host}:{sim.port},{_sim_esa_options(sim)}", flush=True)

    if not args.providers and args.control_port is None:
        await run_simulator(config, started=ready)
        return 0
    from feed.simulator.control import ControlServer
    from feed.simulator.esa_server import Simulator
    from feed.simulator.http_providers import HttpProviders, ProvidersConfig
    from feed.simulator.push_providers import PushSimConfig, PushSimulator

    from feed.simulator.cricket_server import CricketSimConfig, CricketSimulator
    from feed.simulator.race_server import RaceSimConfig, RaceSimulator

    providers = push = control = cricket = race = None
    uof: Any = None
    webhook: Any = None
    if args.providers:
        bind_socket(args.host, args.providers_port).close()
        bind_socket(args.host, args.push_port).close()
        bind_socket(args.host, args.cricket_port).close()
        bind_socket(args.host, args.race_port).close()
    sim = Simulator(config)
    await sim.start()
    ready(sim)
    if args.providers:
        providers = HttpProviders(ProvidersConfig(host=args.host, port=args.providers_port, events=args.events,
                                                  rate_per_s=args.rate, seed=args.seed, time_scale=args.time_scale,
                                                  truth_log=args.truth_log),
                                  model=sim.model)  # the ESA simulator's markets (its own model in replay mode)
        push = PushSimulator(PushSimConfig(host=args.host, port=args.push_port, events=args.events,
                                           rate_per_s=args.rate, seed=args.seed, time_scale=args.time_scale,
                                           truth_log=args.truth_log),
                             model=sim.model)  # the same matches as every other simulator (own model in replay)
        cricket = CricketSimulator(CricketSimConfig(host=args.host, port=args.cricket_port, app_key=sim.config.app_key,
                                                    session_token=sim.config.session_token, seed=args.seed),
                                   sessions=sim.sessions)  # one Betfair login serves both streams
        race = RaceSimulator(RaceSimConfig(host=args.host, port=args.race_port, app_key=sim.config.app_key,
                                           session_token=sim.config.session_token, seed=args.seed),
                             sessions=sim.sessions,  # the same login again
                             model=sim.model)  # the ESA simulator's horse races in play (synthetic ones in replay)
        if args.uof_amqp_url:
            from feed.simulator.uof import UofSimConfig, UofSimulator

            bind_socket(args.host, args.uof_port).close()
            # its own model (UOF events); --time-scale 1: events go in play after 20 s
            uof = UofSimulator(UofSimConfig(amqp_url=args.uof_amqp_url, host=args.host, port=args.uof_port,
                                            events=args.events, rate_per_s=args.rate, seed=args.seed,
                                            live_after_s=20.0 / args.time_scale, truth_log=args.truth_log))
        if args.webhook_url:
            from feed.simulator.webhook_pusher import PusherConfig, WebhookPusher

            webhook = WebhookPusher(PusherConfig(url=args.webhook_url, secret=args.webhook_secret,
                                                 events=args.events, seed=args.seed, time_scale=args.time_scale,
                                                 rate_per_s=args.rate, odds_per_message=10, history=10_000,
                                                 max_attempts=1_000_000, backoff_max_s=1.0,
                                                 truth_log=args.truth_log, prefix=args.webhook_prefix),
                                    model=sim.model)  # the same matches as every other simulator
    try:
        if args.control_port is not None:
            control = ControlServer({"esa": sim, "http": providers, "push": push, "uof": uof, "webhook": webhook},
                                    port=args.control_port)
            await control.start()
            print(f"simulator control (fault switches) on 127.0.0.1:{control.port}", flush=True)
        if providers is None or push is None:
            await asyncio.Event().wait()
            return 0
        await providers.start()
        await push.start()
        url = providers.url
        print(f"HTTP providers on {url}: Pinnacle /v1/fixtures /v2/odds (user demo, password demo), "
              f"The Odds API /v4/sports/{{sport}}/odds (apiKey demo), token POST /v1/token", flush=True)
        fast = "min_interval_s=0,interval_s=2,live_interval_s=1"  # a local simulator: no provider refresh to respect
        print(f"  --source pinnacle={url},user=demo,password=demo,sports=29+33+4,{fast}", flush=True)
        print(f"  --source theoddsapi={url}/v4,api_key=demo,sport=upcoming,markets=h2h+totals,{fast}", flush=True)
        key = push.config.api_key
        print(f"push provider (docs/push-format.md) on {args.host}:{push.port}:", flush=True)
        print(f"  --source push-ws={push.url('ws')},api_key={key}", flush=True)
        print(f"  --source push-sse={push.url('sse')},api_key={key}", flush=True)
        if cricket is not None:
            await cricket.start()
            print(f"Betfair sports-data stream (live cricket scores) on {args.host}:{cricket.port}:", flush=True)
            print(f"  --source betfair-cricket={args.host}:{cricket.port},{_sim_esa_options(sim)}", flush=True)
        if race is not None:
            await race.start()
            print(f"Betfair sports-data stream (race progress, TPD) on {args.host}:{race.port}:", flush=True)
            print(f"  --source betfair-race={args.host}:{race.port},{_sim_esa_options(sim)}", flush=True)
        if uof is not None:
            await uof.start()
            print(f"UOF producer (AMQP exchange {uof.config.exchange}) with its recovery API on {uof.api_url}:",
                  flush=True)
            print(f"  --source uof={args.uof_amqp_url.split('?')[0]}?exchange={uof.config.exchange},"
                  f"api={uof.api_url},token={uof.config.token}", flush=True)
        if webhook is not None:
            await webhook.start()
            print(f"webhook pusher: signed deliveries to {args.webhook_url} (--webhook-secret)", flush=True)
        await asyncio.Event().wait()
    finally:
        if webhook is not None:
            await webhook.stop()
        if uof is not None:
            await uof.stop()
        if race is not None:
            await race.stop()
        if cricket is not None:
            await cricket.stop()
        if control is not None:
            await control.stop()
        if push is not None:
            await push.stop()
        if providers is not None:
            await providers.stop()
        await sim.stop()
    return 0


async def cmd_record(args: argparse.Namespace) -> int:
    if args.replay:
        raise UsageError("record takes live sources (--source SPEC… or --esa HOST:PORT), not --replay")
    return await cmd_ingest(args)


async def cmd_export_history(args: argparse.Namespace) -> int:
    from feed.history_export import export_history, require_pyarrow

    require_pyarrow()  # before any Redis is started: one line naming the extra
    if args.from_ms is not None and args.to_ms is not None and args.from_ms > args.to_ms:
        raise UsageError(f"--from ({args.from_ms} ms) must not be after --to ({args.to_ms} ms)")
    settings = settings_from_args(args)
    async with open_store(settings) as store:
        result = await export_history(store, args.export_dir, start_ms=args.from_ms, end_ms=args.to_ms,
                                      markets=args.markets)
    print(result.summary(), flush=True)
    return 0


COMMANDS = {"run": cmd_run, "ingest": cmd_ingest, "record": cmd_record, "serve": cmd_serve,
            "simulate": cmd_simulate, "export-history": cmd_export_history}


async def _main_async(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def on_signal() -> None:
        if SHUTDOWN.is_set() or args.command not in ("run", "serve"):
            task.cancel()  # second signal, or a command without a graceful path
        SHUTDOWN.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal)
    try:
        return await COMMANDS[args.command](args)
    except asyncio.CancelledError:
        return 0


def _unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _unwrap(inner)
            if isinstance(found, (OddsfeedError, FileNotFoundError)):
                return found
    return exc


def _run(coro: Any) -> int:
    """Run on uvloop when it is installed (``uvicorn[standard]`` brings it):
    a faster event loop for the API and the sources; asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def setup_logging(verbose: bool, stream: Any = None, log_format: str = "text") -> logging.Handler:
    """The CLI's logging: one stream handler on the root logger (stderr unless ``stream``),
    DEBUG with ``-v`` else INFO, and secret redaction on every record of the process
    (:mod:`feed.redaction`: secret header/parameter values and registered secrets never
    reach a log line, at any level). ``log_format="json"``: one JSON object per line
    (:class:`feed.logjson.JsonFormatter`). Returns the handler (tests remove it)."""
    from feed import redaction

    redaction.install()
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "oddsfeed_cli", False)]:  # main() run again in-process
        root.removeHandler(old)
    handler = logging.StreamHandler(stream)
    handler.oddsfeed_cli = True  # type: ignore[attr-defined]
    if log_format == "json":
        from feed.logjson import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        from feed.logjson import TextFormatter

        handler.setFormatter(TextFormatter())
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("feed.ingest").setLevel(logging.WARNING if not verbose else logging.DEBUG)
    logging.getLogger("httpx").setLevel(logging.WARNING if not verbose else logging.DEBUG)  # one line per poll otherwise
    return handler


def register_secrets(args: argparse.Namespace) -> None:
    """Register every secret the command line and the environment carry with
    :mod:`feed.redaction`: secret ``--source`` options, ESA credentials, API keys, JWT secrets."""
    from feed import redaction

    for spec in getattr(args, "source", None) or ():
        redaction.register_secrets(v for k, v in spec.options.items() if k.lower() in redaction.SECRET_OPTION_KEYS)
    redaction.register_secrets([getattr(args, "app_key", None), getattr(args, "session", None)])
    for name in ("ODDSFEED_API_KEYS", "ODDSFEED_JWT_SECRETS"):
        redaction.register_secrets(os.environ.get(name, "").split(","))
    redaction.register_secrets([os.environ.get("ODDSFEED_BETFAIR_APP_KEY"), os.environ.get("ODDSFEED_BETFAIR_SESSION")])


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, log_format=getattr(args, "log_format", "text"))
    register_secrets(args)
    try:
        return _run(_main_async(args))
    except KeyboardInterrupt:
        return 0
    except BaseException as exc:  # noqa: BLE001 - turn user-fixable errors into one line
        inner = _unwrap(exc)
        if isinstance(inner, (OddsfeedError, ConfigError, FileNotFoundError)):
            print(f"oddsfeed: error: {inner}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
