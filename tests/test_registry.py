"""The source registry: one list of kinds drives the parser, the dispatcher, the help and the README."""

from __future__ import annotations

from pathlib import Path

import pytest

from feed.errors import ConfigError
from feed.sources.poller import HttpOptions, PollerOptions
from feed.sources.registry import HTTP_OPTIONS, POLL_OPTIONS, REGISTRY, readme_table
from feed.sources.spec import parse_source_spec

README = Path(__file__).resolve().parents[1] / "README.md"


def test_poller_option_sets_match_their_dataclasses() -> None:
    assert HTTP_OPTIONS == set(HttpOptions.__dataclass_fields__)
    assert POLL_OPTIONS == set(PollerOptions.__dataclass_fields__)


def test_the_readme_table_of_kinds_is_the_registry() -> None:
    assert readme_table() in README.read_text()


def test_every_kind_loads_its_two_factories() -> None:
    for entry in REGISTRY.values():
        assert callable(entry.load_source()) and callable(entry.load_normaliser()), entry.kind


def test_every_kind_builds_a_source_and_normaliser_from_a_spec() -> None:
    """Each factory pair builds objects that satisfy the seam (no I/O happens until run)."""
    from feed.pipeline import build
    from feed.settings import Settings

    examples = {
        "esa": "esa=127.0.0.1:9444,app_key=a,session=s",
        "pinnacle": "pinnacle=http://127.0.0.1:9,user=u,password=p",
        "theoddsapi": "theoddsapi=http://127.0.0.1:9/v4,api_key=k",
        "push-ws": "push-ws=ws://127.0.0.1:9/push/ws,api_key=k",
        "push-sse": "push-sse=http://127.0.0.1:9/push/sse,api_key=k",
        "webhook": "webhook=127.0.0.1:0,secret=s",
        "uof": "uof=amqp://guest:guest@127.0.0.1:9/,api=http://127.0.0.1:9,token=t",
        "betfair-csv": "betfair-csv=/no/such/file.csv",
        "betfair-cricket": "betfair-cricket=127.0.0.1:9446,app_key=a,session=s",
        "betfair-race": "betfair-race=127.0.0.1:9447,app_key=a,session=s",
    }
    assert set(REGISTRY) <= set(examples), "add an example spec for the new kind"
    for kind in REGISTRY:
        source, pipeline = build(None, Settings(), parse_source_spec(examples[kind]))  # type: ignore[arg-type]
        assert source.name == kind and isinstance(source.confirms_by_messages, bool)
        assert callable(source.run) and callable(source.request_repair) and callable(source.stop)
        assert callable(pipeline.normaliser.feed) and callable(pipeline.normaliser.restore)


@pytest.mark.parametrize(("text", "message"), [
    ("pinnacle=http://x,user=a,bogus_key=1", "unknown option 'bogus_key'"),
    ("theoddsapi=http://x/v4,api_key=k,intervl_s=2", "did you mean interval_s?"),
    ("pinnacle=http://x", "needs one of user, api_key, client_id"),
    ("theoddsapi=http://x/v4", "needs one of api_key, client_id, user"),
    ("esa=127.0.0.1:9444,app_key=a", "needs one of session, username"),
    ("push-ws=ws://x/ws,api_key=k,ping_ms=5", "push-ws takes: api_key, backoff_initial_s"),
    ("nope=http://x", "unknown source kind 'nope'"),
])
def test_bad_source_options_name_what_to_fix(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("(", r"\(")):
        parse_source_spec(text)


def test_good_specs_parse() -> None:
    spec = parse_source_spec("theoddsapi=http://x/v4,api_key=k,name=toa,deadline_s=2,sport=soccer_epl")
    assert (spec.kind, spec.name, spec.get("deadline_s")) == ("theoddsapi", "toa", "2")
    assert parse_source_spec("push-sse=http://x/sse").kind == "push-sse"  # a push feed may authenticate by URL
