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
``$VAR`` (secrets stay out of shell history and process lists). The kinds,
their options and the required ones come from
:mod:`feed.sources.registry`: an unknown option or a missing credential is a
ConfigError naming the valid options.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field

from feed.errors import ConfigError
from feed.sources.registry import KINDS, REGISTRY


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
    _check_options(kind, options)
    name = options.pop("name", kind)
    return SourceSpec(kind=kind, url=url.strip(), name=name, options=options)


def _check_options(kind: str, options: dict[str, str]) -> None:
    """Raise ConfigError for an option ``kind`` does not take (naming the
    closest valid one and the list) or a required one that is missing."""
    entry = REGISTRY[kind]
    accepted = entry.accepted
    for key in options:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"source {kind}: unknown option {key!r}{hint}; {kind} takes: "
                              f"{', '.join(sorted(accepted))}")
    for group in entry.required:
        if not any(options.get(k) for k in group):
            need = group[0] if len(group) == 1 else "one of " + ", ".join(group)
            raise ConfigError(f"source {kind}: needs {need}")
