"""Tenants: what each API key or JWT may do and see, and its limits (DESIGN §8).

A tenants file (``--tenants FILE`` / ``ODDSFEED_TENANTS_FILE``, TOML) names
the API's customers. Each ``[tenant.<name>]`` lists its credentials and
rights; ``[default]`` (optional) applies to every other accepted credential
(the ``ODDSFEED_API_KEYS`` keys and JWTs whose ``sub`` no tenant lists)::

    [default]                      # optional; absent = no restriction, no limits
    max_connections = 20

    [tenant.acme]
    keys = ["ak_live_…"]           # API keys, as sent (or key_sha256 = ["<64 hex>"])
    subjects = ["acme-frontend"]   # JWT "sub" values that are this tenant
    scopes = ["read", "stream", "price_check"]   # what it may do (absent = everything)
    sports = ["soccer", "tennis"]  # what it may see (absent = all)
    sources = ["betfair"]
    bookmakers = ["betfair", "pinnacle"]
    max_connections = 100          # open SSE + WebSocket streams, per API node
    max_subscriptions = 200        # subscriptions over all its streams, per API node
    price_checks_per_s = 50        # token bucket, per API node (a batch leg counts one)
    price_check_burst = 100        # bucket size (default: price_checks_per_s rounded up, at least 1)

**Scopes** (permissions): ``read`` — the REST data endpoints (markets,
events, sports, sources, history); ``stream`` — ``/v1/stream`` and
``/v1/ws``; ``price_check`` — ``POST /v1/price-check[/batch]``. A request
outside its scopes gets ``403 {"error":"forbidden","message":…}`` (a
WebSocket: a refused handshake, HTTP 403 with the same body).

**Visibility.** ``sports`` / ``sources`` / ``bookmakers`` are allow-lists
on the markets' ``sport`` / ``source`` / ``bookmaker`` (a market without a
bookmaker is not visible to a tenant with a bookmaker list). A request's
filter is intersected with them: values outside them are dropped, and a
filter that keeps none of its values of one kind gets 403 saying which
values the tenant may use; a market the tenant may not see answers like an
unknown one (REST 404, price check ``UNKNOWN_MARKET``), lists and counts
leave it out, and best-price views and checks consider only visible books.

**JWTs** (:mod:`streaming.auth` verifies them): ``sub`` selects the tenant
(the one whose ``subjects`` lists it, else ``[default]``); a ``scope``
claim (an OAuth space-separated string, or a list of strings) narrows it
further: its permission words (``read``, ``stream``, ``price_check``),
when it has any, replace the tenant's scopes by their intersection, and
``sport:<x>`` / ``source:<x>`` / ``bookmaker:<x>`` words narrow what it
sees (intersected with the tenant's lists). Other words (``openid`` …) are
ignored. A token cannot widen its tenant.

**Limits** are counted per tenant (every key and subject of a tenant
share them; credentials under ``[default]`` are counted each on its own:
per API key, per JWT ``sub``) and **per API node** — with N nodes behind a
balancer, a tenant may hold up to N× (set them per node). Over
``max_connections`` a new stream gets ``429 {"error":"too_many_connections"}``;
over ``max_subscriptions`` an SSE stream gets 429 and a WebSocket
``subscribe`` an ``error {code:"too_many_subscriptions"}``; over the price-check
rate ``429 {"error":"rate_limited","retry_after_ms":n}`` with ``Retry-After``
(whole seconds, rounded up). A batch larger than the burst can never pass:
``422 {"error":"batch_over_burst"}`` says to split it.

**Reload.** The file is checked once a second (:data:`RELOAD_CHECK_S`; size,
mtime, then content) and re-read when it changed. A file that does not parse
or validate is logged and counted (``oddsfeed_tenants_reloads_total{result="error"}``)
and the previous configuration stays in force. After a reload, each open
stream whose tenant entry changed or vanished is closed (``tenant
configuration changed; reconnect``) so that it reconnects under the new
entry (a revoked key then gets 401); new requests use the new file at once.
At startup a bad file is a :class:`~feed.errors.ConfigError`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import time
import tomllib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from feed import redaction
from feed.errors import AuthError, ConfigError, OddsfeedError
from feed.models import Market
from streaming.encoding import error_message

if TYPE_CHECKING:
    from streaming.hub import Connection
    from streaming.state import Filter

__all__ = ["ANONYMOUS", "ForbiddenError", "Grant", "LimitError", "PERMISSIONS", "Principal", "RELOAD_CHECK_S",
           "TenantSpec", "Tenants", "TenantsFile", "grant_of", "load_tenants_file"]

logger = logging.getLogger(__name__)

#: what a credential may do: REST data reads, streams, price checks
PERMISSIONS: tuple[str, ...] = ("read", "stream", "price_check")
#: seconds between checks of the tenants file for a change
RELOAD_CHECK_S = 1.0
#: the ASGI scope key under which :class:`streaming.auth.AuthMiddleware` puts the request's Grant
SCOPE_KEY = "oddsfeed.grant"
#: the tenant label of credentials not named in the file (metrics, logs)
DEFAULT = "default"

NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class ForbiddenError(AuthError):
    """A valid credential asked for something its tenant may not do or see; ``str()`` says what
    it may use instead (HTTP 403)."""


class LimitError(OddsfeedError):
    """A tenant limit was reached (HTTP 429). ``code``: ``too_many_connections``,
    ``too_many_subscriptions`` or ``rate_limited``; ``retry_after_s``: when a retry can pass
    (rate limits only, seconds), else None."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s


class TenantSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One ``[tenant.<name>]`` (or ``[default]``) section; see the module docstring.
    Lists of names are exact, case-sensitive values; limits are per API node; None = no limit."""

    keys: list[Name] = []
    key_sha256: list[Annotated[str, msgspec.Meta(pattern="^[0-9a-fA-F]{64}$")]] = []
    subjects: list[Name] = []
    scopes: list[str] | None = None
    sports: list[Name] | None = None
    sources: list[Name] | None = None
    bookmakers: list[Name] | None = None
    max_connections: NonNegative | None = None
    max_subscriptions: NonNegative | None = None
    price_checks_per_s: Annotated[float, msgspec.Meta(gt=0, le=1e6)] | None = None
    price_check_burst: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] | None = None


class TenantsFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The whole file: ``[default]`` and ``[tenant.<name>]`` sections."""

    default: TenantSpec | None = None
    tenant: dict[Name, TenantSpec] = {}


def load_tenants_file(path: str) -> tuple[TenantsFile, bytes]:
    """Parse and check the tenants file at ``path``: (its content, its bytes).
    Raises ConfigError saying what to fix (unreadable, not TOML, an unknown
    field, a wrong type, an unknown scope, a key or subject named twice)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError(f"tenants file {path}: {exc.strerror or exc}") from None
    return parse_tenants(raw, path), raw


def parse_tenants(raw: bytes, where: str = "tenants file") -> TenantsFile:
    """See :func:`load_tenants_file`."""
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: not valid TOML ({exc})") from None
    try:
        parsed = msgspec.convert(data, TenantsFile, strict=True)
    except msgspec.ValidationError as exc:
        # msgspec writes a tenant's section as `$.tenant[...]`: name the section that is wrong
        for name, section in (data.get("tenant") or {}).items() if isinstance(data.get("tenant"), dict) else ():
            try:
                msgspec.convert(section, TenantSpec, strict=True)
            except msgspec.ValidationError as inner:
                raise ConfigError(f"{where}: [{_section(str(name))}]: {inner}") from None
        raise ConfigError(f"{where}: {exc} (sections are [default] and [tenant.<name>])") from None
    keys: dict[bytes, str] = {}
    subjects: dict[str, str] = {}
    for name, spec in [(DEFAULT, parsed.default)] * (parsed.default is not None) + list(parsed.tenant.items()):
        assert spec is not None
        if name == DEFAULT and spec is not parsed.default:
            raise ConfigError(f"{where}: a tenant may not be named {DEFAULT!r} (that is the [default] section)")
        if spec is parsed.default and (spec.keys or spec.key_sha256 or spec.subjects):
            raise ConfigError(f"{where}: [default] applies to credentials no tenant names; "
                              "list keys and subjects under [tenant.<name>]")
        bad = sorted(set(spec.scopes or ()) - set(PERMISSIONS))
        if bad:
            raise ConfigError(f"{where}: [{_section(name)}] scopes {bad} unknown; use {', '.join(PERMISSIONS)}")
        for digest in [hashlib.sha256(k.encode()).digest() for k in spec.keys] + \
                      [bytes.fromhex(h) for h in spec.key_sha256]:
            if digest in keys:
                raise ConfigError(f"{where}: one API key is listed by [{_section(keys[digest])}] and "
                                  f"[{_section(name)}]; give each key to one tenant")
            keys[digest] = name
        for sub in spec.subjects:
            if sub in subjects:
                raise ConfigError(f"{where}: subject {sub!r} is listed by [{_section(subjects[sub])}] and "
                                  f"[{_section(name)}]")
            subjects[sub] = name
    return parsed


def _digests(spec: TenantSpec) -> set[bytes]:
    return {hashlib.sha256(k.encode()).digest() for k in spec.keys} | {bytes.fromhex(h) for h in spec.key_sha256}


def _must_close(was: TenantSpec | None, now: TenantSpec | None) -> bool:
    """Whether a changed entry must close its streams: what it may do or see changed, or one of
    its credentials was taken away (a key rotation that adds one, or a new limit, does not)."""
    if was is None or now is None:
        return True
    if (was.scopes, was.sports, was.sources, was.bookmakers) != (now.scopes, now.sports, now.sources, now.bookmakers):
        return True
    return not (_digests(was) <= _digests(now) and set(was.subjects) <= set(now.subjects))


def _section(name: str) -> str:
    return DEFAULT if name == DEFAULT else f"tenant.{name}"


class Principal:
    """The live counts of one tenant (or one unnamed credential) on this node: open streams,
    subscriptions, the price-check token bucket, and its stream connections (closed when its
    tenant entry changes). Mutated only on the event loop."""

    __slots__ = ("identity", "tenant", "spec", "connections", "subscriptions", "tokens", "refilled_at", "conns",
                 "limited", "credential")

    def __init__(self, identity: str, tenant: str, spec: TenantSpec | None,
                 limited: dict[tuple[str, str], int] | None = None, credential: bytes | str | None = None) -> None:
        self.identity = identity
        #: a [default] principal's credential (an API key's SHA-256, a JWT sub): a reload that gives it
        #: to a tenant closes its streams
        self.credential = credential
        self.tenant = tenant
        self.spec = spec
        self.connections = 0
        self.subscriptions = 0
        self.tokens = float(self._burst())
        self.refilled_at = time.monotonic()
        #: its open stream connections (hub Connections)
        self.conns: set[Connection] = set()
        #: refusals by (tenant, limit: connections | subscriptions | price_checks), shared by the
        #: principals of one Tenants (a counter that outlives any one principal)
        self.limited: dict[tuple[str, str], int] = {} if limited is None else limited

    def _burst(self) -> int:
        spec = self.spec
        if spec is None or spec.price_checks_per_s is None:
            return 0
        return spec.price_check_burst or max(1, math.ceil(spec.price_checks_per_s))

    def _refuse(self, limit: str, code: str, message: str, retry_after_s: float | None = None) -> LimitError:
        key = (self.tenant, limit)
        self.limited[key] = self.limited.get(key, 0) + 1
        return LimitError(code, message, retry_after_s)

    def admit_connection(self, subscriptions: int = 0) -> None:
        """Check that one more stream (holding ``subscriptions`` subscriptions, 1 for SSE) may
        open. Raises LimitError (``too_many_connections`` / ``too_many_subscriptions``)."""
        spec = self.spec
        if spec is None:
            return
        if spec.max_connections is not None and self.connections >= spec.max_connections:
            raise self._refuse("connections", "too_many_connections",
                               f"tenant {self.tenant} has {self.connections} of its {spec.max_connections} streams "
                               "open on this node; close one first")
        if subscriptions:
            self.admit_subscription(subscriptions)
        # reserved now, in the same step as the check (an ASGI send or accept may suspend before
        # the hub counts the connection): Hub.connect(principal=…, reserved_subs=…) takes the
        # reservation over; a path that never connects calls release()
        self.connections += 1
        self.subscriptions += subscriptions

    def release(self, subscriptions: int = 0) -> None:
        """Undo :meth:`admit_connection`'s reservation (the stream never opened)."""
        self.connections -= 1
        self.subscriptions -= subscriptions

    def admit_subscription(self, n: int = 1) -> None:
        """Check that ``n`` more subscriptions may be made. Raises LimitError (``too_many_subscriptions``)."""
        spec = self.spec
        if spec is not None and spec.max_subscriptions is not None \
                and self.subscriptions + n > spec.max_subscriptions:
            raise self._refuse("subscriptions", "too_many_subscriptions",
                               f"tenant {self.tenant} has {self.subscriptions} of its {spec.max_subscriptions} "
                               "subscriptions on this node; close a stream or unsubscribe one first")

    def take_price_checks(self, n: int, now: float | None = None) -> None:
        """Take ``n`` price checks from the token bucket (``price_checks_per_s``,
        ``price_check_burst``). Raises LimitError (``rate_limited``, with ``retry_after_s``)."""
        spec = self.spec
        if spec is None or spec.price_checks_per_s is None:
            return
        rate = spec.price_checks_per_s
        burst = self._burst()
        t = time.monotonic() if now is None else now
        self.tokens = min(float(burst), self.tokens + (t - self.refilled_at) * rate)
        self.refilled_at = t
        if n > burst:  # no wait makes it pass: not a rate limit but a request to fix (HTTP 422)
            raise self._refuse("price_checks", "batch_over_burst",
                               f"a batch of {n} checks exceeds tenant {self.tenant}'s burst of {burst}; "
                               f"split it into batches of at most {burst}", None)
        if self.tokens < n:
            wait = (n - self.tokens) / rate
            raise self._refuse("price_checks", "rate_limited",
                               f"tenant {self.tenant} may make {rate:g} price checks per second (burst {burst}); "
                               f"retry in {math.ceil(wait * 1000)} ms", wait)
        self.tokens -= n

    def idle(self, now: float) -> bool:
        """Holds nothing: no stream, no subscription, a full token bucket (forgetting it loses nothing)."""
        if self.connections or self.subscriptions or self.conns:
            return False
        spec = self.spec
        if spec is None or spec.price_checks_per_s is None:
            return True
        return self.tokens + (now - self.refilled_at) * spec.price_checks_per_s >= self._burst()

    def __repr__(self) -> str:
        return f"Principal({self.identity!r}, conns={self.connections}, subs={self.subscriptions})"


class Grant(msgspec.Struct, frozen=True, kw_only=True):
    """What one authenticated request may do and see: ``permissions`` (a subset of
    :data:`PERMISSIONS`), allow-lists (None = all) and the :class:`Principal` its limits count
    against (None: no limits)."""

    tenant: str
    permissions: frozenset[str]
    sports: frozenset[str] | None = None
    sources: frozenset[str] | None = None
    bookmakers: frozenset[str] | None = None
    principal: Principal | None = None

    @property
    def restricted(self) -> bool:
        """Whether it hides any market."""
        return self.sports is not None or self.sources is not None or self.bookmakers is not None

    def require(self, permission: str) -> None:
        """Raises ForbiddenError unless ``permission`` is granted."""
        if permission not in self.permissions:
            allowed = ", ".join(sorted(self.permissions)) or "nothing"
            raise ForbiddenError(f"this credential (tenant {self.tenant}) may not use {_WHAT[permission]} "
                                 f"(scope {permission}); it may use: {allowed}")

    def visible(self, m: Market) -> bool:
        """Whether the tenant may see market ``m``."""
        return ((self.sports is None or m.sport in self.sports)
                and (self.sources is None or m.source in self.sources)
                and (self.bookmakers is None or m.bookmaker in self.bookmakers))

    def restrict(self, f: Filter) -> Filter:
        """``f`` narrowed to what the tenant may see. Raises ForbiddenError when a kind of
        value (sport, source, bookmaker) keeps none of the values the filter asked for."""
        if not self.restricted:
            return f
        changes: dict[str, frozenset[str]] = {}
        for kind, allowed in (("sport", self.sports), ("source", self.sources), ("bookmaker", self.bookmakers)):
            if allowed is None:
                continue
            asked: frozenset[str] | None = getattr(f, kind)
            if asked is None:
                changes[kind] = allowed
                continue
            kept = asked & allowed
            if not kept:
                raise ForbiddenError(f"tenant {self.tenant} may not see {kind} {', '.join(sorted(asked))}; "
                                     f"it may see {kind} {', '.join(sorted(allowed)) or '(none)'}")
            changes[kind] = kept
        return msgspec.structs.replace(f, **changes, visible=(self.sports, self.sources, self.bookmakers))


_WHAT = {"read": "the REST data endpoints", "stream": "streams (/v1/stream, /v1/ws)",
         "price_check": "price checks"}

#: the grant of every request when authentication is off: everything, no limits
ANONYMOUS = Grant(tenant="anonymous", permissions=frozenset(PERMISSIONS))


def grant_of(scope: Any) -> Grant:
    """The Grant :class:`streaming.auth.AuthMiddleware` gave this request (ASGI scope, or
    anything with a ``scope`` attribute such as a Starlette Request), :data:`ANONYMOUS` when
    authentication is off."""
    s = scope if isinstance(scope, dict) else scope.scope
    return s.get(SCOPE_KEY, ANONYMOUS)


def _narrow(mine: frozenset[str] | None, words: Iterable[str], prefix: str) -> frozenset[str] | None:
    asked = frozenset(w[len(prefix):] for w in words if w.startswith(prefix) and len(w) > len(prefix))
    if not asked:
        return mine
    return asked if mine is None else mine & asked


def scope_words(claim: object) -> list[str]:
    """A JWT ``scope`` claim's words (a space-separated string or a list of strings). Raises
    AuthError for any other type."""
    if claim is None:
        return []
    if isinstance(claim, str):
        return claim.split()
    if isinstance(claim, list) and all(isinstance(w, str) for w in claim):
        return [w for x in claim for w in x.split()]
    raise AuthError("invalid token: scope must be a space-separated string or a list of strings")


class Tenants:
    """The tenants of one API node: who a credential is and what it may do (see the module
    docstring). ``path``: the tenants file (None: only ``[default]``-less unnamed credentials,
    i.e. no restriction — then this object only identifies principals)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.file = TenantsFile()
        self._stat: tuple[int, int] | None = None
        self._raw: bytes | None = None
        self.by_key: dict[bytes, str] = {}
        self.by_subject: dict[str, str] = {}
        self.principals: dict[str, Principal] = {}
        #: file reloads by result: ok / error (an unchanged file is not counted)
        self.reloads: dict[str, int] = {"ok": 0, "error": 0}
        #: refusals by (tenant, limit), for ``oddsfeed_tenant_limited_total``
        self.limited: dict[tuple[str, str], int] = {}
        self.last_error: str | None = None
        #: called after each reload that installed a changed file (the API node's hub: resumes
        #: of restricted credentials from before it are not recovered)
        self.on_change: Callable[[], None] | None = None
        if path is not None:
            parsed, raw = load_tenants_file(path)
            self._install(parsed, raw, self._stat_of(path))

    @property
    def has_keys(self) -> bool:
        """Whether the file names any API key (authentication must then be on)."""
        return bool(self.by_key)

    @staticmethod
    def _stat_of(path: str) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _install(self, parsed: TenantsFile, raw: bytes, stat: tuple[int, int] | None) -> list[Principal]:
        """Use ``parsed``; the principals whose entry changed or vanished (their streams must go)."""
        old = self.file
        self.file, self._raw, self._stat = parsed, raw, stat
        by_key: dict[bytes, str] = {}
        by_subject: dict[str, str] = {}
        for name, spec in parsed.tenant.items():
            for k in spec.keys:
                by_key[hashlib.sha256(k.encode()).digest()] = name
            for h in spec.key_sha256:
                by_key[bytes.fromhex(h)] = name
            for sub in spec.subjects:
                by_subject[sub] = name
        self.by_key, self.by_subject = by_key, by_subject
        # the keys never reach a log line, even when a client sends one somewhere odd (feed.redaction)
        redaction.register_secrets(k for spec in parsed.tenant.values() for k in spec.keys)
        changed: list[Principal] = []
        for identity, p in list(self.principals.items()):
            now_spec = parsed.tenant.get(p.tenant) if p.tenant != DEFAULT else parsed.default
            was = old.tenant.get(p.tenant) if p.tenant != DEFAULT else old.default
            if was != now_spec and not _must_close(was, now_spec):
                # only limits changed, or credentials were added: the streams stay, the new limits
                # apply from now on (the bucket keeps what it holds, up to the new burst)
                p.spec = now_spec
                p.tokens = min(p.tokens, float(p._burst()))
                continue
            moved = p.tenant == DEFAULT and ((isinstance(p.credential, bytes) and p.credential in by_key)
                                             or (isinstance(p.credential, str) and p.credential in by_subject))
            if now_spec != was or (p.tenant != DEFAULT and now_spec is None) or moved:
                changed.append(p)
                del self.principals[identity]
        return changed

    def _principal(self, identity: str, tenant: str, credential: bytes | str | None = None) -> Principal:
        p = self.principals.get(identity)
        if p is None:
            spec = self.file.tenant.get(tenant) if tenant != DEFAULT else self.file.default
            p = self.principals[identity] = Principal(identity, tenant, spec, self.limited, credential)
        return p

    def current(self, grant: Grant) -> Grant | None:
        """``grant`` re-checked after an await (a stream waiting for admission): the same grant
        when its principal is still in force (re-registered if :meth:`prune` forgot it meanwhile,
        or the principal that replaced it); None when its tenant entry changed or the credential
        moved meanwhile (its filter was narrowed by the old entry: the request must be retried)."""
        p = grant.principal
        if p is None:
            return grant
        live = self.principals.get(p.identity)
        if live is p:
            return grant
        spec = self.file.tenant.get(p.tenant) if p.tenant != DEFAULT else self.file.default
        moved = p.tenant == DEFAULT and ((isinstance(p.credential, bytes) and p.credential in self.by_key)
                                         or (isinstance(p.credential, str) and p.credential in self.by_subject))
        if spec != p.spec or moved or (p.tenant != DEFAULT and spec is None):
            return None
        if live is None:
            self.principals[p.identity] = p
            return grant
        return msgspec.structs.replace(grant, principal=live)

    def _grant(self, tenant: str, identity: str, words: list[str] | None = None,
               credential: bytes | str | None = None) -> Grant:
        spec = self.file.tenant.get(tenant) if tenant != DEFAULT else self.file.default
        principal = self._principal(identity, tenant, credential)
        perms = frozenset(PERMISSIONS if spec is None or spec.scopes is None else spec.scopes)
        sports = frozenset(spec.sports) if spec is not None and spec.sports is not None else None
        sources = frozenset(spec.sources) if spec is not None and spec.sources is not None else None
        books = frozenset(spec.bookmakers) if spec is not None and spec.bookmakers is not None else None
        if words:
            asked = frozenset(w for w in words if w in PERMISSIONS)
            if asked:
                perms &= asked
            sports = _narrow(sports, words, "sport:")
            sources = _narrow(sources, words, "source:")
            books = _narrow(books, words, "bookmaker:")
        return Grant(tenant=tenant, permissions=perms, sports=sports, sources=sources, bookmakers=books,
                     principal=principal)

    def for_key(self, digest: bytes) -> Grant | None:
        """The grant of an API key (its SHA-256 ``digest``) named in the file, or None."""
        name = self.by_key.get(digest)
        return None if name is None else self._grant(name, "tenant:" + name)

    def for_unnamed_key(self, digest: bytes) -> Grant:
        """The grant of an accepted API key the file does not name (``[default]``, counted per key)."""
        return self._grant(DEFAULT, "key:" + digest.hex()[:16], credential=digest)

    def for_jwt(self, claims: dict[str, Any]) -> Grant:
        """The grant of a verified JWT's claims (``sub``, ``scope``). Raises AuthError for a
        ``scope`` claim of the wrong type."""
        words = scope_words(claims.get("scope"))
        sub = claims.get("sub")
        sub = sub if isinstance(sub, str) else None
        name = self.by_subject.get(sub) if sub is not None else None
        if name is not None:
            return self._grant(name, "tenant:" + name, words)
        return self._grant(DEFAULT, "sub:" + (sub or ""), words, credential=sub)

    def check_reload(self) -> list[Principal] | None:
        """Re-read the file when it changed (see the module docstring). None when nothing
        changed or the new file is bad (logged, counted); else the principals whose streams
        must be closed."""
        if self.path is None:
            return None
        stat = self._stat_of(self.path)
        if stat == self._stat:
            return None
        try:
            parsed, raw = load_tenants_file(self.path)
        except ConfigError as exc:
            if str(exc) != self.last_error:
                logger.error("tenants file not reloaded, the previous one stays in force: %s", exc)
            self.last_error = str(exc)
            self._stat = stat  # do not re-read an unchanged bad file every second
            self.reloads["error"] += 1
            return None
        self.last_error = None
        if raw == self._raw:
            self._stat = stat
            return None
        changed = self._install(parsed, raw, stat)
        self.reloads["ok"] += 1
        if self.on_change is not None:
            self.on_change()
        logger.info("tenants file reloaded: %d tenants%s; %d tenants' streams closed", len(parsed.tenant),
                    " and [default]" if parsed.default is not None else "", len(changed))
        return changed

    def prune(self, now: float | None = None) -> int:
        """Forget principals that hold nothing (:meth:`Principal.idle`): one per API key or JWT
        subject ever seen would otherwise accumulate. Returns how many were forgotten."""
        t = time.monotonic() if now is None else now
        idle = [k for k, p in self.principals.items() if p.idle(t)]
        for k in idle:
            del self.principals[k]
        return len(idle)

    def step(self) -> None:
        """One check of :meth:`watch`: reload when changed, close the streams of tenants whose
        entry changed (an ``error {code:"tenant_changed"}`` first, then WebSocket close 1012
        "service restart": reconnect), forget idle principals."""
        for p in self.check_reload() or ():
            for conn in list(p.conns):
                conn.close(1012, "tenant configuration changed; reconnect", error_message(
                    "tenant_changed", "this credential's tenant configuration changed; reconnect"))
        self.prune()

    async def watch(self, interval_s: float = RELOAD_CHECK_S) -> None:
        """:meth:`step` every ``interval_s`` until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.step()
            except Exception:  # never let the watcher die on a surprise: the old config stays
                logger.exception("tenants file check failed")
