"""``--source SPEC``: which upstream to ingest, in one command-line word.

Form: ``KIND=URL[,key=value…]``, e.g.::

    esa=127.0.0.1:9444,app_key=sim-app-key,session=sim-session
    pinnacle=http://127.0.0.1:9555,user=demo,password=demo
    theoddsapi=http://127.0.0.1:9555/v4,api_key=demo,sport=soccer_epl
    push-ws=ws://127.0.0.1:9556/stream,api_key=demo
    push-sse=http://127.0.0.1:9556/stream,api_key=demo

``name=`` sets the source name (default: the kind); it names the health
record, the resume cursor and the quarantine entries, so two sources of the
same kind need different names. Values may come from the environment with
``$VAR`` (secrets stay out of shell history and process lists).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from feed.errors import ConfigError

KINDS = ("esa", "pinnacle", "theoddsapi", "push-ws", "push-sse")


@dataclass(frozen=True)
class SourceSpec:
    """A parsed ``--source`` value. options: the ``key=value`` pairs."""

    kind: str
    url: str
    name: str
    options: dict[str, str] = field(default_factory=dict, repr=False)  # may hold secrets

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.options.get(key, default)

    def get_float(self, key: str, default: float) -> float:
        raw = self.options.get(key)
        if raw is None:
            return default
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"source {self.name}: {key} must be a number, not {raw!r}") from None

    def __str__(self) -> str:  # never shows option values (they may be secrets)
        return f"{self.name} ({self.kind} {self.url})"


def parse_source_spec(text: str) -> SourceSpec:
    """Parse ``KIND=URL[,key=value…]``; raises ConfigError saying what to fix."""
    kind, sep, rest = text.partition("=")
    kind = kind.strip()
    if not sep or not rest:
        raise ConfigError(f"--source takes KIND=URL[,key=value…] (kinds: {', '.join(KINDS)}), not {text!r}")
    if kind not in KINDS:
        raise ConfigError(f"unknown source kind {kind!r}: use one of {', '.join(KINDS)}")
    url, *pairs = rest.split(",")
    options: dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise ConfigError(f"source option {pair!r} is not key=value")
        if value.startswith("$"):
            env = os.environ.get(value[1:])
            if env is None:
                raise ConfigError(f"source option {key} names ${value[1:]}, which is not set")
            value = env
        options[key.strip()] = value
    name = options.pop("name", kind)
    return SourceSpec(kind=kind, url=url.strip(), name=name, options=options)
