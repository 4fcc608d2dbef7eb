"""Dashboards and alerts (issue 12 item 7): deploy/grafana/oddsfeed.json, deploy/prometheus/*.yml
and the compose wiring, checked against real processes on loopback (no Docker).

- **Every query names a metric that exists where it is scraped**: a real API node
  (``make_app``/``serve``) and a real ``oddsfeed ingest --metrics-port`` process against the ESA
  simulator run with an SSE client attached until data has flowed through every hop; then each
  PromQL expression of the dashboard (panel targets and template-variable queries) and of
  alerts.yml is parsed, and every selector it contains must carry ``job="<a job of
  prometheus.yml>"`` and name a series that job's process exposes: ``X_bucket``/``X_sum``/``X_count``
  only of a histogram ``X``, ``_total`` as the counter's exposed name, label matchers and
  ``by (...)`` labels among the series' labels (plus ``job``/``instance``), ``=`` values among
  the values seen. ``up`` is Prometheus' own per-target series.
- **PromQL syntax** (``promtool`` is not installed here; when it is on PATH, ``promtool check
  config`` and ``check rules`` run too). :class:`PromQL` is a small recursive-descent parser of
  the PromQL grammar the files use, and it checks: tokens (strings closed, durations well-formed,
  no stray characters), brackets balanced and nested correctly, operands and binary operators
  alternating (``bool``, ``on``/``ignoring``, ``group_left``/``group_right`` modifiers), function
  names against Prometheus' function list with their argument counts and types (range vector vs
  instant vector vs scalar: ``rate`` of an instant vector or a range on an expression is refused),
  aggregation syntax (``by``/``without`` before or after, parameters of ``topk``/``quantile``/…),
  label matchers (``=``/``!=``/``=~``/``!~`` with a string, regexes compiled by Python's ``re``,
  an approximation of RE2), range/subquery/``offset``/``@`` modifiers, and that a rule's ``expr``
  is an instant vector. It also derives the labels an expression keeps, so ``{{ $labels.x }}`` in
  annotations and ``{{x}}`` in legends must name labels the query still has (``sum by (a)`` keeps
  only ``a``). It does not evaluate anything, check operator precedence beyond operand/operator
  alternation, or know every corner of the grammar (unicode metric names, native-histogram
  functions' semantics, ``@`` edge cases). The checker's own self-test feeds it broken queries.
- alerts.yml structure (groups/rules/alert/expr/for/labels.severity/annotations with summary,
  description, runbook), the dashboard's JSON model (templated Prometheus datasource, unique
  ids/refIds, a grid that does not overlap) and docker-compose.yml: Prometheus and Grafana
  mounting these files, scrape targets matching the services' ports, healthchecks and
  ``depends_on: condition: service_healthy``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest
import yaml

from tests.streaming_helpers import SSEReader, eventually, make_app, serve

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "oddsfeed.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
COMPOSE = ROOT / "docker-compose.yml"

# --- a small PromQL parser ------------------------------------------------------------------

AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
                "topk", "quantile", "limitk", "limit_ratio"}
AGG_WITH_PARAM = {"count_values": "string", "bottomk": "scalar", "topk": "scalar", "quantile": "scalar",
                  "limitk": "scalar", "limit_ratio": "scalar"}
V, M, S, STR = "vector", "matrix", "scalar", "string"
# name: (argument types, how many of the last are optional, variadic last, return type)
FUNCTIONS: dict[str, tuple[tuple[str, ...], int, bool, str]] = {
    **{f: ((V,), 0, False, V) for f in (
        "abs", "ceil", "exp", "floor", "ln", "log2", "log10", "sgn", "sqrt", "timestamp", "sort", "sort_desc",
        "acos", "acosh", "asin", "asinh", "atan", "atanh", "cos", "cosh", "sin", "sinh", "tan", "tanh", "deg",
        "rad", "absent", "histogram_count", "histogram_sum", "histogram_avg", "histogram_stddev",
        "histogram_stdvar")},
    **{f: ((V,), 1, False, V) for f in (
        "day_of_month", "day_of_week", "day_of_year", "days_in_month", "hour", "minute", "month", "year")},
    **{f: ((M,), 0, False, V) for f in (
        "rate", "irate", "increase", "delta", "idelta", "deriv", "changes", "resets", "absent_over_time",
        "avg_over_time", "min_over_time", "max_over_time", "sum_over_time", "count_over_time",
        "stddev_over_time", "stdvar_over_time", "last_over_time", "present_over_time", "mad_over_time")},
    "quantile_over_time": ((S, M), 0, False, V),
    "predict_linear": ((M, S), 0, False, V),
    "holt_winters": ((M, S, S), 0, False, V),
    "double_exponential_smoothing": ((M, S, S), 0, False, V),
    "histogram_quantile": ((S, V), 0, False, V),
    "histogram_fraction": ((S, S, V), 0, False, V),
    "clamp": ((V, S, S), 0, False, V),
    "clamp_min": ((V, S), 0, False, V),
    "clamp_max": ((V, S), 0, False, V),
    "round": ((V, S), 1, False, V),
    "label_replace": ((V, STR, STR, STR, STR), 0, False, V),
    "label_join": ((V, STR, STR, STR), 1, True, V),
    "sort_by_label": ((V, STR), 1, True, V),
    "sort_by_label_desc": ((V, STR), 1, True, V),
    "scalar": ((V,), 0, False, S),
    "vector": ((S,), 0, False, V),
    "time": ((), 0, False, S),
    "pi": ((), 0, False, S),
}
BINARY = {"+", "-", "*", "/", "%", "^", "==", "!=", "<", ">", "<=", ">=", "and", "or", "unless", "atan2"}
COMPARISON = {"==", "!=", "<", ">", "<=", ">="}
SET_OPS = {"and", "or", "unless"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
            "unless", "atan2"}
GRAFANA_DURATIONS = {"$__rate_interval": "5m", "${__rate_interval}": "5m", "$__interval": "1m",
                     "${__interval}": "1m", "$__range": "1h", "${__range}": "1h"}
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series

_TOKEN = re.compile(r"""
    (?P<ws>\s+|\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|`[^`]*`)
  | (?P<duration>(?:\d+(?:ms|[smhdwy]))+)(?![\w.])
  | (?P<number>0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|(?i:inf|nan)(?![\w:]))
  | (?P<ident>[a-zA-Z_][a-zA-Z0-9_:]*)
  | (?P<op>==|!=|=~|!~|<=|>=|[-+*/%^<>=(){}\[\],:@])
""", re.VERBOSE)


class PromQLError(ValueError):
    pass


@dataclass(frozen=True)
class Selector:
    name: str
    matchers: tuple[tuple[str, str, str], ...]
    functions: tuple[str, ...]  # enclosing functions and aggregations, outermost first

    def matcher(self, label: str) -> str | None:
        return next((v for n, op, v in self.matchers if n == label and op == "="), None)


@dataclass
class Aggregation:
    op: str
    by: tuple[str, ...] | None
    without: tuple[str, ...] | None
    selectors: list[Selector]
    functions: tuple[str, ...]


@dataclass
class Parsed:
    type: str
    labels: frozenset[str] | None  # labels the result keeps; None = unknown (no label resolver)
    selectors: list[Selector] = field(default_factory=list)
    aggregations: list[Aggregation] = field(default_factory=list)


LabelResolver = Callable[[Selector], "frozenset[str] | None"]


class PromQL:
    """Parses one expression (module docstring: what it checks). ``labels_of`` gives a
    selector's label names (for the labels an expression keeps), or None when unknown."""

    def __init__(self, text: str, labels_of: LabelResolver | None = None) -> None:
        self.text = text
        self.labels_of = labels_of or (lambda s: None)
        for var, dur in GRAFANA_DURATIONS.items():
            text = text.replace(var, dur)
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None:
                raise PromQLError(f"unexpected character {text[pos]!r} at {pos} in {self.text!r}")
            pos = m.end()
            kind = m.lastgroup or ""
            if kind != "ws":
                self.tokens.append((kind, m.group()))
        self.i = 0
        self.stack: list[str] = []
        self.selectors: list[Selector] = []
        self.aggregations: list[Aggregation] = []

    @classmethod
    def parse(cls, text: str, labels_of: LabelResolver | None = None) -> Parsed:
        p = cls(text, labels_of)
        t, labels = p.expr()
        if p.i != len(p.tokens):
            p.fail("expected an operator or the end")
        return Parsed(t, labels, p.selectors, p.aggregations)

    # tokens
    def peek(self, k: int = 0) -> tuple[str, str]:
        return self.tokens[self.i + k] if self.i + k < len(self.tokens) else ("eof", "")

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok[0] == "eof":
            self.fail("unexpected end of expression")
        self.i += 1
        return tok

    def expect(self, value: str) -> None:
        if self.peek()[1] != value or self.peek()[0] == "string":
            self.fail(f"expected {value!r}")
        self.i += 1

    def fail(self, why: str) -> NoReturn:
        kind, tok = self.peek()
        raise PromQLError(f"{why} at token {self.i} ({tok or 'end'!r}) in {self.text!r}")

    def is_op(self, *values: str) -> bool:
        kind, tok = self.peek()
        return kind in ("op", "ident") and tok in values

    # grammar
    def expr(self) -> tuple[str, frozenset[str] | None]:
        ltype, labels = self.unary()
        while self.is_op(*BINARY):
            op = self.take()[1]
            returns_bool = False
            if self.is_op("bool"):
                if op not in COMPARISON:
                    self.fail("bool only after a comparison")
                self.take()
                returns_bool = True
            on: tuple[str, ...] | None = None
            group = ""
            if self.is_op("on", "ignoring"):
                kw = self.take()[1]
                names = self.label_list()
                on = names if kw == "on" else None
                if self.is_op("group_left", "group_right"):
                    group = self.take()[1]
                    if self.is_op("("):
                        self.label_list()
            elif self.is_op("group_left", "group_right"):
                self.fail("group_left/group_right need on(...) or ignoring(...) first")
            rtype, rlabels = self.unary()
            for t in (ltype, rtype):
                if t not in (V, S):
                    self.fail(f"operand of {op!r} must be an instant vector or a scalar, not a {t}")
            if op in SET_OPS and (ltype != V or rtype != V):
                self.fail(f"{op!r} needs instant vectors on both sides")
            if op in COMPARISON and ltype == S and rtype == S and not returns_bool:
                self.fail("a comparison of two scalars needs bool")
            if ltype == S and rtype == S:
                ltype, labels = S, frozenset()
            else:
                if ltype == S:
                    labels = rlabels
                elif rtype == V:
                    if group == "group_right":
                        labels = rlabels
                    elif op == "or" and labels is not None and rlabels is not None:
                        labels = labels | rlabels
                    elif on is not None and not group and op not in SET_OPS:
                        labels = frozenset(on)
                ltype = V
        return ltype, labels

    def unary(self) -> tuple[str, frozenset[str] | None]:
        if self.is_op("-", "+"):
            self.take()
            t, labels = self.unary()
            if t not in (V, S):
                self.fail("unary minus needs a scalar or an instant vector")
            return t, labels
        return self.postfix(*self.primary())

    def postfix(self, t: str, labels: frozenset[str] | None, selector: bool = False) -> tuple[str, frozenset[str] | None]:
        if self.is_op("["):
            self.take()
            if self.peek()[0] != "duration":
                self.fail("expected a duration in [...]")
            self.take()
            if self.is_op(":"):
                self.take()
                if self.peek()[0] == "duration":
                    self.take()
                if t != V:
                    self.fail("a subquery needs an instant vector")
            elif not selector:
                self.fail("a range [..] applies to a vector selector only (use a subquery [range:step])")
            self.expect("]")
            t = M
        while self.is_op("offset", "@"):
            if self.take()[1] == "offset":
                if self.is_op("-"):
                    self.take()
                if self.peek()[0] != "duration":
                    self.fail("expected a duration after offset")
                self.take()
            elif self.peek()[0] == "number":
                self.take()
            elif self.is_op("start", "end"):
                self.take()
                self.expect("(")
                self.expect(")")
            else:
                self.fail("expected a timestamp, start() or end() after @")
        return t, labels

    def primary(self) -> tuple[str, frozenset[str] | None, bool]:
        kind, tok = self.peek()
        if kind == "number":
            self.take()
            return S, frozenset(), False
        if kind == "string":
            self.take()
            return STR, frozenset(), False
        if kind == "duration":
            self.fail("a duration outside [...] or offset")
        if tok == "(":
            self.take()
            t, labels = self.expr()
            self.expect(")")
            return t, labels, False
        if tok == "{":
            return self.selector("")
        if kind != "ident":
            self.fail("expected an expression")
        if tok in KEYWORDS:
            self.fail(f"keyword {tok!r} where an expression belongs")
        if tok in AGGREGATIONS and (self.peek(1)[1] == "(" or self.peek(1)[1] in ("by", "without")):
            return (*self.aggregation(), False)
        if self.peek(1)[1] == "(" and self.peek(1)[0] == "op":
            return (*self.function(), False)
        self.take()
        return self.selector(tok)

    def label_list(self) -> tuple[str, ...]:
        self.expect("(")
        names: list[str] = []
        while not self.is_op(")"):
            kind, tok = self.take()
            if kind != "ident":
                self.fail("expected a label name")
            names.append(tok)
            if not self.is_op(")"):
                self.expect(",")
        self.take()
        return tuple(names)

    def selector(self, name: str) -> tuple[str, frozenset[str] | None, bool]:
        matchers: list[tuple[str, str, str]] = []
        if self.is_op("{"):
            self.take()
            while not self.is_op("}"):
                kind, label = self.take()
                if kind not in ("ident", "string"):
                    self.fail("expected a label name in {...}")
                label = _unquote(label) if kind == "string" else label
                kind, op = self.take()
                if op not in ("=", "!=", "=~", "!~") or kind != "op":
                    self.fail("expected =, !=, =~ or !~")
                kind, value = self.take()
                if kind != "string":
                    self.fail("a label matcher's value is a quoted string")
                value = _unquote(value)
                if op in ("=~", "!~"):
                    try:
                        re.compile(re.sub(r"\$\{?\w+\}?", ".*", value))  # Grafana variables expand to a regex
                    except re.error as exc:
                        raise PromQLError(f"bad regex {value!r} in {self.text!r}: {exc}") from None
                if label == "__name__" and op == "=":
                    name = name or value
                matchers.append((label, op, value))
                if not self.is_op("}"):
                    self.expect(",")
            self.take()
        if not name and not any(not re.fullmatch(v if op == "=~" else re.escape(v), "") for _, op, v in matchers
                                if op in ("=", "=~")):
            self.fail("a selector needs a metric name or a matcher that does not match the empty string")
        sel = Selector(name, tuple(matchers), tuple(self.stack))
        self.selectors.append(sel)
        return V, self.labels_of(sel), True

    def aggregation(self) -> tuple[str, frozenset[str] | None]:
        op = self.take()[1]
        by = without = None
        if self.is_op("by", "without"):
            kw = self.take()[1]
            by, without = (self.label_list(), None) if kw == "by" else (None, self.label_list())
        first = len(self.selectors)
        self.stack.append(op)
        self.expect("(")
        if op in AGG_WITH_PARAM:
            t, _ = self.expr()
            if t != AGG_WITH_PARAM[op]:
                self.fail(f"the parameter of {op} is a {AGG_WITH_PARAM[op]}")
            self.expect(",")
        t, inner = self.expr()
        if t != V:
            self.fail(f"{op} aggregates an instant vector, not a {t}")
        self.expect(")")
        self.stack.pop()
        if self.is_op("by", "without"):
            if by is not None or without is not None:
                self.fail("by/without given twice")
            kw = self.take()[1]
            by, without = (self.label_list(), None) if kw == "by" else (None, self.label_list())
        self.aggregations.append(Aggregation(op, by, without, self.selectors[first:], tuple(self.stack)))
        if by is not None:
            labels: frozenset[str] | None = frozenset(by)
        elif without is not None:
            labels = None if inner is None else inner - set(without)
        else:
            labels = frozenset()
        if op == "count_values" and labels is not None:
            labels = labels | {"value"}  # its label name is the parameter; not needed here
        elif op in ("topk", "bottomk", "limitk", "limit_ratio"):
            labels = inner
        return V, labels

    def function(self) -> tuple[str, frozenset[str] | None]:
        name = self.take()[1]
        if name not in FUNCTIONS:
            self.fail(f"unknown function {name!r}")
        types, optional, variadic, returns = FUNCTIONS[name]
        self.stack.append(name)
        self.expect("(")
        args: list[tuple[str, frozenset[str] | None]] = []
        while not self.is_op(")"):
            args.append(self.expr())
            if not self.is_op(")"):
                self.expect(",")
        self.take()
        self.stack.pop()
        if not (len(types) - optional <= len(args) and (variadic or len(args) <= len(types))):
            self.fail(f"{name} takes {len(types) - optional}..{'n' if variadic else len(types)} arguments, not {len(args)}")
        for k, (t, _) in enumerate(args):
            want = types[min(k, len(types) - 1)]
            if t != want:
                self.fail(f"argument {k + 1} of {name} must be a {want}, not a {t}")
        if returns == S:
            return S, frozenset()
        labels = next((lab for t, lab in args if t in (V, M)), frozenset())
        if name == "histogram_quantile" and labels is not None:
            labels = labels - {"le"}
        elif name in ("label_replace", "label_join"):
            labels = None  # adds the label its second argument names: not tracked
        return V, labels


def _unquote(s: str) -> str:
    if s[0] == "`":
        return s[1:-1]
    return json.loads('"' + s[1:-1].replace('\\"', '"').replace('"', '\\"') + '"') if s[0] == "'" else json.loads(s)


def template_labels(text: str) -> set[str]:
    """Label names a Go template (``{{ $labels.x }}``) or a Grafana legend (``{{x}}``) uses."""
    out = set(re.findall(r"\$labels\.([a-zA-Z_]\w*)", text))
    out |= set(re.findall(r"\{\{\s*([a-zA-Z_]\w*)\s*\}\}", text))
    return out


def check_templates(text: str) -> None:
    if text.count("{{") != text.count("}}"):
        raise PromQLError(f"unbalanced {{{{ }}}} in {text!r}")


# --- the files -------------------------------------------------------------------------------


@dataclass
class Query:
    where: str
    expr: str
    legend: str = ""
    label_values: str | None = None  # a Grafana label_values(selector, label) variable: the label


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from iter_panels(p.get("panels", []))


def dashboard_queries() -> list[Query]:
    d = dashboard()
    out = []
    for p in iter_panels(d["panels"]):
        for t in p.get("targets", []):
            out.append(Query(f"panel {p['title']!r} {t['refId']}", t["expr"], t.get("legendFormat", "")))
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"\s*label_values\((.*),\s*([a-zA-Z_]\w*)\s*\)\s*", q)
            assert m, f"variable {v['name']}: only label_values(selector, label) queries are checked: {q!r}"
            out.append(Query(f"variable {v['name']}", m.group(1), label_values=m.group(2)))
    return out


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def alert_queries() -> list[Query]:
    return [Query(f"alert {r['alert']}", r["expr"], " ".join(r["annotations"].values())) for r in alert_rules()]


def placeholder_panels() -> list[dict[str, Any]]:
    return [p for p in iter_panels(dashboard()["panels"])
            if p["type"] == "text" and "Not exported yet" in p["options"]["content"]]


def prometheus_jobs() -> dict[str, list[str]]:
    conf = yaml.safe_load(PROMETHEUS.read_text())
    return {j["job_name"]: [t for sc in j["static_configs"] for t in sc["targets"]] for j in conf["scrape_configs"]}


# --- the exposition format ---------------------------------------------------------------------


class Exposition:
    """The families a /metrics answer declares (``# TYPE``) and the label sets of its samples."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.samples: dict[str, list[dict[str, str]]] = {}
        self.points: list[tuple[str, dict[str, str], float]] = []
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(maxsplit=3)
                self.types[name] = kind
            elif line and not line.startswith("#"):
                m = re.match(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)", line)
                assert m, line
                labels = dict(re.findall(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
                self.samples.setdefault(m.group(1), []).append(labels)
                self.points.append((m.group(1), labels, float(m.group(3))))

    def resolve(self, name: str) -> tuple[str, str, str] | None:
        """(family, type, suffix) of a series name as PromQL sees it, or None. A histogram ``X`` is
        queried as ``X_bucket``/``X_sum``/``X_count`` (never ``X``); a summary as ``X``/``X_sum``/``X_count``;
        a counter by its exposed ``_total`` name (the text format's TYPE line carries it)."""
        kind = self.types.get(name)
        if kind is not None and kind != "histogram":
            return name, kind, ""
        for suffix, kinds in (("_bucket", ("histogram",)), ("_sum", ("histogram", "summary")),
                              ("_count", ("histogram", "summary"))):
            base = name.removesuffix(suffix)
            if name.endswith(suffix) and self.types.get(base) in kinds:
                return base, self.types[base], suffix
        return None

    def labels(self, name: str) -> frozenset[str]:
        return frozenset(k for s in self.samples.get(name, []) for k in s)

    def values(self, name: str, label: str) -> set[str]:
        return {s[label] for s in self.samples.get(name, []) if label in s}


UP = "up"  # Prometheus' own series per target: {job, instance}


def check_against(q: Query, processes: dict[str, Exposition]) -> list[str]:
    """Problems of one query against the processes' expositions (by job)."""
    problems: list[str] = []

    def labels_of(sel: Selector) -> frozenset[str] | None:
        job = sel.matcher("job")
        if sel.name == UP:
            return frozenset(TARGET_LABELS)
        if job not in processes or processes[job].resolve(sel.name) is None:
            return None
        return processes[job].labels(sel.name) | TARGET_LABELS

    parsed = PromQL.parse(q.expr, labels_of)
    for sel in parsed.selectors:
        job = sel.matcher("job")
        if job not in processes:
            problems.append(f"{q.where}: {sel.name or sel} needs job=\"<one of {sorted(processes)}>\", has {job!r}")
            continue
        if sel.name == UP:
            continue
        exp = processes[job]
        found = exp.resolve(sel.name)
        if found is None:
            near = sorted(n for n in exp.types if n.startswith(sel.name[:15]))
            problems.append(f"{q.where}: {sel.name} is not exposed by job {job} (similar: {near})")
            continue
        family, kind, suffix = found
        if not exp.samples.get(sel.name):
            problems.append(f"{q.where}: {sel.name} is declared by job {job} but has no series here, so its "
                            "labels went unchecked: make the test produce some")
        if "histogram_quantile" in sel.functions and (kind, suffix) != ("histogram", "_bucket"):
            problems.append(f"{q.where}: histogram_quantile over {sel.name}, not a histogram's _bucket")
        direct = sel.functions[-1] if sel.functions else ""
        if direct in ("rate", "irate", "increase", "resets") and kind not in ("counter", "histogram", "summary"):
            problems.append(f"{q.where}: {direct}() of {sel.name}, a {kind}")
        have = exp.labels(sel.name) | TARGET_LABELS
        for label, op, value in sel.matchers:
            if label not in have and label != "__name__":
                problems.append(f"{q.where}: {sel.name} has no label {label!r} (has {sorted(have)})")
            elif op == "=" and label not in TARGET_LABELS and exp.values(sel.name, label) \
                    and value not in exp.values(sel.name, label):
                problems.append(f"{q.where}: {sel.name}{{{label}={value!r}}} matches none of "
                                f"{sorted(exp.values(sel.name, label))}")
        if q.label_values is not None and q.label_values not in have:
            problems.append(f"{q.where}: label_values of {q.label_values!r}, which {sel.name} does not have")
    for agg in parsed.aggregations:
        have_all = set(TARGET_LABELS)
        for sel in agg.selectors:
            job = sel.matcher("job")
            if job in processes:
                have_all |= processes[job].labels(sel.name)
        for label in (agg.by or ()) + (agg.without or ()):
            if label not in have_all:
                problems.append(f"{q.where}: {agg.op} by/without {label!r}, a label none of its series has")
        if "histogram_quantile" in agg.functions and agg.by is not None and "le" not in agg.by:
            problems.append(f"{q.where}: {agg.op} inside histogram_quantile drops 'le'")
    if parsed.labels is not None:
        missing = template_labels(q.legend) - parsed.labels
        if missing:
            problems.append(f"{q.where}: the legend/annotations use {sorted(missing)}, which the query does not "
                            f"keep (it keeps {sorted(parsed.labels)})")
    return problems


# --- static checks ---------------------------------------------------------------------------


def test_promql_checker_refuses_broken_queries() -> None:
    """The checker is only worth what it refuses."""
    good = ['sum by (le, hop) (rate(x_bucket{job="a", hop!="b"}[5m]))',
            'histogram_quantile(0.99, sum(rate(x_bucket[$__rate_interval])) by (le))',
            'up{job="x"} == 0', 'max by (s) (a{state="DOWN"}) == 1', '-a + 2 * b offset 5m', 'a > bool 1',
            'a / on (x) group_left (y) b', 'a unless b', 'topk(3, a)', 'count_values("v", a)',
            'max_over_time(a[5m:30s])', 'rate(a[1h30m] @ end())', '{__name__="a"}', 'a{s=~"$source"}',
            'label_replace(a, "d", "$1", "s", "(.*)")', 'clamp_min(sum(a), 1)', 'time() - 5', 'vector(1)',
            'sum(rate(a_total[5m])) # a comment']
    for q in good:
        PromQL.parse(q)
    bad = {'sum(rate(a[5m])': r"expected '\)'", 'sum(a))': "expected an operator",
           'rate(a{job="x"]': "expected", 'a{job="x"': "end", 'a{job=x}': "quoted string",
           'a{job=="x"}': "expected =", 'rate(a)': "must be a matrix", 'rate(sum(a)[5m])': "vector selector only",
           'histogram_quantile(a)': "takes", 'histogramquantile(0.9, a)': "unknown function",
           'sum(a[5m])': "aggregates an instant vector", 'a +': "expected an expression", 'a b': "expected an operator",
           'a and 1': "instant vectors on both sides", '1 > 2': "needs bool", '{}': "needs a metric name",
           '{s=~".*"}': "needs a metric name",
           'a{s=~"("}': "bad regex", 'a[5x]': "unexpected character|duration", 'a $foo': "unexpected character",
           'sum by (le (rate(a[5m]))': "expected", 'a offset': "duration", 'a[5m] + 1': "must be an instant",
           'a group_left b': "expected an operator", 'topk(a)': "parameter", '"unterminated': "unexpected character",
           'by (x) sum(a)': "keyword", 'a{s="x"}[5m': r"expected '\]'", 'a < bool b + [5m]': "expected an expression"}
    for q, why in bad.items():
        with pytest.raises(PromQLError, match=why):
            PromQL.parse(q)
    # the labels an expression keeps
    assert PromQL.parse('sum by (a, le) (x)', lambda s: frozenset({"a", "b", "le"})).labels == {"a", "le"}
    assert PromQL.parse('histogram_quantile(0.5, sum by (a, le) (rate(x[5m])))',
                        lambda s: frozenset({"a", "le"})).labels == {"a"}
    assert PromQL.parse('max(x) == 1', lambda s: frozenset({"a"})).labels == frozenset()
    assert PromQL.parse('x == 1', lambda s: frozenset({"a"})).labels == {"a"}
    assert PromQL.parse('sum without (b) (x)', lambda s: frozenset({"a", "b"})).labels == {"a"}
    with pytest.raises(PromQLError, match="unbalanced"):
        check_templates("{{ $labels.x }")
    assert template_labels("p99 {{hop}} on {{ $labels.instance }}") == {"hop", "instance"}


def test_every_query_is_valid_promql() -> None:
    queries = dashboard_queries() + alert_queries()
    assert len(queries) >= 30
    for q in queries:
        parsed = PromQL.parse(q.expr)
        check_templates(q.legend)
        assert parsed.selectors, q
        if q.label_values is not None:
            assert parsed.type == V and len(parsed.selectors) == 1 and not parsed.aggregations, q
        else:
            assert parsed.type == V, f"{q.where}: a graphed or alerting query must be an instant vector"
    for p in placeholder_panels():  # the queries the placeholders propose parse too
        for proposed in (c for c in re.findall(r"`([^`]*)`", p["options"]["content"]) if "(" in c):
            PromQL.parse(proposed.replace('\\"', '"'))


def test_alert_rules_file_is_well_formed() -> None:
    doc = yaml.safe_load(ALERTS.read_text())
    assert set(doc) == {"groups"} and doc["groups"]
    names: set[str] = set()
    for g in doc["groups"]:
        assert set(g) <= {"name", "interval", "rules", "limit"} and g["name"] and g["rules"], g
        for r in g["rules"]:
            assert set(r) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, r
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", r["alert"]) and r["alert"] not in names, r["alert"]
            names.add(r["alert"])
            assert isinstance(r["expr"], str) and r["expr"].strip()
            assert re.fullmatch(r"(?:\d+(?:ms|[smhdwy]))+", str(r["for"])), r
            assert r["labels"]["severity"] in {"critical", "warning", "info"}, r
            ann = r["annotations"]
            assert {"summary", "description", "runbook"} <= ann.keys() and all(ann[k].strip() for k in ann), r
            for text in list(ann.values()) + list(r["labels"].values()):
                check_templates(text)
    # what issue 12 item 7 asks for: source DOWN, lag p99, ingest gone, reader lag, stale share
    by_metric = {name: " ".join(r["expr"] for r in alert_rules() if name in r["expr"])
                 for name in ("oddsfeed_ingest_source_state", "histogram_quantile", "up{job=\"oddsfeed-ingest\"}",
                              "oddsfeed_reader_lag_seconds", "oddsfeed_markets_stale")}
    assert all(by_metric.values()), by_metric
    assert 'state="DOWN"' in by_metric["oddsfeed_ingest_source_state"]


def test_promtool_accepts_the_config_and_rules_when_installed() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed: the PromQL checker above stands in for it")
    for args in (["check", "config", str(PROMETHEUS)], ["check", "rules", str(ALERTS)]):
        res = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr


def test_dashboard_json_model() -> None:
    d = dashboard()
    assert d["uid"] == "oddsfeed" and d["title"] and isinstance(d["schemaVersion"], int)
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    ids, cells = set(), set()
    for p in iter_panels(d["panels"]):
        assert p["id"] not in ids, p["title"]
        ids.add(p["id"])
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another at {(x, y)}"
                cells.add((x, y))
        if p["type"] in ("row", "text"):
            assert "targets" not in p
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(set(refs)) == len(refs), p["title"]
        assert all(t["datasource"] == p["datasource"] and t["expr"].strip() for t in p["targets"]), p["title"]
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    exprs = {p["title"]: " ".join(t["expr"] for t in p.get("targets", [])) for p in iter_panels(d["panels"])}
    everything = " ".join(exprs.values())
    for what in ("oddsfeed_hop_latency_seconds_bucket", "oddsfeed_ingest_feed_lag_seconds_bucket",
                 "oddsfeed_ingest_source_state", "oddsfeed_connections", "oddsfeed_outbox_bytes",
                 "oddsfeed_slow_consumer_total", "oddsfeed_ingest_messages_total", "oddsfeed_ingest_rejected_total"):
        assert what in everything, f"no panel queries {what}"
    assert "histogram_quantile(0.5," in everything and "histogram_quantile(0.99," in everything
    for what in ("oddsfeed_markets_stale", "oddsfeed_price_check_seconds_bucket", "oddsfeed_price_checks_total"):
        assert what in everything, f"no panel queries {what}"
    assert placeholder_panels() == []  # every panel queries a metric the processes export


def _compose() -> tuple[dict[str, Any], dict[str, Any]]:
    """(docker-compose.yml, its services with those of the files it includes, paths made absolute)."""
    main = yaml.safe_load(COMPOSE.read_text())
    services: dict[str, Any] = {}
    for name, svc in main["services"].items():
        services[name] = {**svc, "_dir": ROOT}
    for inc in main.get("include", []):
        path = ROOT / (inc if isinstance(inc, str) else inc["path"])
        for name, svc in yaml.safe_load(path.read_text())["services"].items():
            assert name not in services, f"{name} defined twice"
            services[name] = {**svc, "_dir": path.parent}
    return main, services


def _mounts(svc: dict[str, Any]) -> dict[str, Path]:
    """container path -> host path of a service's bind mounts."""
    out = {}
    for v in svc.get("volumes", []):
        src, dst = v.split(":")[:2]
        if src.startswith((".", "/")):
            out[dst] = (svc["_dir"] / src).resolve()
    return out


def _flag(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_compose_runs_prometheus_and_grafana_with_these_files() -> None:
    _, services = _compose()
    prom, graf = services["prometheus"], services["grafana"]
    for svc in (prom, graf):
        image, _, tag = svc["image"].partition(":")
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{svc['image']}: pin a version"
    assert prom["image"].startswith("prom/prometheus:") and graf["image"].startswith("grafana/grafana:")
    pm = _mounts(prom)
    config_in = _flag([a for c in prom["command"] for a in c.split("=", 1)], "--config.file")
    assert pm[config_in] == PROMETHEUS
    conf = yaml.safe_load(PROMETHEUS.read_text())
    for rule_file in conf["rule_files"]:
        in_container = str(Path(config_in).parent / rule_file)
        assert pm[in_container] == ALERTS and (PROMETHEUS.parent / rule_file).resolve() == ALERTS

    gm = _mounts(graf)
    prov = {dst: src for dst, src in gm.items() if dst.startswith("/etc/grafana/provisioning/")}
    assert prov == {"/etc/grafana/provisioning/datasources": DEPLOY / "grafana/provisioning/datasources",
                    "/etc/grafana/provisioning/dashboards": DEPLOY / "grafana/provisioning/dashboards"}
    (dash_in,) = [dst for dst, src in gm.items() if src == DASHBOARD]
    (provider,) = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/oddsfeed.yml").read_text())["providers"]
    assert provider["type"] == "file" and str(Path(dash_in).parent) == provider["options"]["path"]
    (source,) = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus"
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", source["url"]).groups()  # type: ignore[union-attr]
    assert host == "prometheus" and f"{port}:{port}" in prom["ports"]
    assert graf["depends_on"]["prometheus"]["condition"] == "service_healthy" and "healthcheck" in prom

    # every scrape target is a compose service listening there
    jobs = prometheus_jobs()
    assert set(jobs) == {"oddsfeed-api", "oddsfeed-ingest"}
    for target in jobs["oddsfeed-api"]:
        name, port = target.split(":")
        cmd = services[name]["command"]
        assert cmd[0] == "serve" and _flag(cmd, "--port") == port and _flag(cmd, "--host") == "0.0.0.0"
    assert len(jobs["oddsfeed-api"]) == sum(1 for s in services.values() if s.get("command", [""])[0] == "serve")
    (target,) = jobs["oddsfeed-ingest"]
    name, port = target.split(":")
    cmd = services[name]["command"]
    assert cmd[0] == "ingest" and _flag(cmd, "--metrics-port") == port and _flag(cmd, "--metrics-host") == "0.0.0.0"


def test_compose_start_order_waits_for_healthy_services() -> None:
    _, services = _compose()
    assert services["ingest"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["ingest"]["depends_on"]["simulate"]["condition"] == "service_healthy"
    serve_nodes = [n for n, s in services.items() if s.get("command", [""])[0] == "serve"]
    assert len(serve_nodes) >= 2
    for n in serve_nodes:
        assert services[n]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "/health" in " ".join(services[n]["healthcheck"]["test"])
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on as a map with conditions"
        for dep, cond in deps.items():
            if cond["condition"] == "service_healthy":
                test = services[dep]["healthcheck"]["test"]
                assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, (dep, test)
    assert "redis-cli ping" in " ".join(services["redis"]["healthcheck"]["test"])


# --- against real processes --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_every_queried_metric_exists_on_the_process_it_is_scraped_from(
        redis_url: str, make_sim, tmp_path: Path) -> None:
    """A real API node with an SSE client and a real ingest process against the ESA simulator
    (plus a webhook source sent one bad delivery, so rejects have a series); when deltas have
    gone through every hop, each query of the dashboard and of alerts.yml is checked against the
    /metrics of the job it selects (module docstring)."""
    esa = await make_sim(rate_per_s=100.0, events=4)
    port, hook_port, secret = _free_port(), _free_port(), "dashboards-test-secret"
    rejected: list[int] = []
    log = tmp_path / "ingest.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "feed", "ingest", "--redis-url", redis_url, "--metrics-port", str(port),
            "--source", f"esa=127.0.0.1:{esa.port},app_key={esa.config.app_key},session={esa.config.session_token}",
            "--source", f"webhook=127.0.0.1:{hook_port},secret={secret}",
            cwd=ROOT, stdout=out, stderr=out, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            async with serve(make_app(redis_url)) as base, httpx.AsyncClient(timeout=10) as c, \
                    c.stream("GET", f"{base}/v1/stream") as stream:
                sse = SSEReader(stream)
                assert (await sse.next()).event == "snapshot"

                async def scrape() -> dict[str, Exposition] | None:
                    if proc.returncode is not None:
                        raise AssertionError(f"ingest exited {proc.returncode}:\n{log.read_text()[-3000:]}")
                    try:
                        if not rejected:
                            rejected.append(await _post_bad_delivery(c, hook_port, secret))
                        # one price check, so the answers-by-reason counter has a series
                        await c.post(f"{base}/v1/price-check", json={"market_id": "none", "selection_id": "1",
                                                                      "side": "back", "price": 2.0})
                        ingest = Exposition((await c.get(f"http://127.0.0.1:{port}/metrics")).text)
                    except httpx.HTTPError:
                        return None
                    api = Exposition((await c.get(f"{base}/metrics")).text)
                    flowing = (
                        _value(ingest, "oddsfeed_ingest_feed_lag_seconds_count", source="esa") > 0
                        and _value(ingest, "oddsfeed_ingest_source_state", source="esa", state="UP") == 1
                        and _value(ingest, "oddsfeed_ingest_rejected_total", source="webhook") > 0
                        and all(_value(api, "oddsfeed_hop_latency_seconds_count", hop=h) > 0
                                for h in ("provider_to_received", "received_to_stored", "stored_to_read",
                                          "queued_to_sent"))
                        and _value(api, "oddsfeed_connections", transport="sse") >= 1
                        and _value(api, "oddsfeed_price_checks_total", reason="UNKNOWN_MARKET") >= 1)
                    return {"oddsfeed-api": api, "oddsfeed-ingest": ingest} if flowing else None

                async def read_deltas() -> None:
                    while True:
                        await sse.next(timeout_s=30)

                reading = asyncio.create_task(read_deltas())  # keeps the client consuming: queued_to_sent
                try:
                    processes = await eventually(scrape, 30, "deltas through every hop of ingest and API node")
                finally:
                    reading.cancel()
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 20)

    assert rejected == [422]
    assert set(processes) == set(prometheus_jobs()), "the jobs of prometheus.yml are the processes here"
    problems = [p for q in dashboard_queries() + alert_queries() for p in check_against(q, processes)]
    assert not problems, "\n".join(problems)

    # and the check does refuse what is wrong, against these same expositions
    wrong = {
        'rate(oddsfeed_hop_latency_seconds{job="oddsfeed-api"}[5m])': "is not exposed",        # a histogram's bare name
        'oddsfeed_connections_count{job="oddsfeed-api"}': "is not exposed",                    # not a histogram
        'oddsfeed_ingest_feed_lag_seconds_bucket{job="oddsfeed-api"}': "is not exposed by job oddsfeed-api",
        'oddsfeed_ready': "needs job=",
        'oddsfeed_ready{job="prometheus"}': "needs job=",
        'oddsfeed_outbox_bytes{job="oddsfeed-api", source="esa"}': "has no label 'source'",
        'oddsfeed_slow_consumer_total{job="oddsfeed-api", action="drop"}': "matches none of",
        'histogram_quantile(0.9, sum by (hop) (rate(oddsfeed_hop_latency_seconds_bucket{job="oddsfeed-api"}[5m])))':
            "drops 'le'",
        'histogram_quantile(0.9, rate(oddsfeed_hop_latency_seconds_sum{job="oddsfeed-api"}[5m]))': "not a histogram",
        'rate(oddsfeed_outbox_bytes{job="oddsfeed-api"}[5m])': "rate() of oddsfeed_outbox_bytes, a gauge",
        'sum by (partition) (oddsfeed_ingest_backlog{job="oddsfeed-ingest"})': "a label none of its series has",
    }
    for expr, why in wrong.items():
        found = check_against(Query("wrong", expr), processes)
        assert any(why in p for p in found), (expr, found)
    found = check_against(Query("wrong", 'sum by (source) (oddsfeed_ingest_markets{job="oddsfeed-ingest"})',
                                legend="{{source}} {{instance}}"), processes)
    assert any("use ['instance']" in p for p in found), found

    # the placeholders name metrics that really are missing: when one appears, replace the placeholder
    api = processes["oddsfeed-api"]
    for p in placeholder_panels():
        proposed = re.findall(r"\b(oddsfeed_\w+)\{", p["options"]["content"])
        assert proposed, p["title"]
        for name in proposed:
            assert api.resolve(name) is None, (f"{name} is exported now: turn the {p['title']!r} placeholder "
                                               "into a query (and the stale-share alert in alerts.yml)")


async def _post_bad_delivery(c: httpx.AsyncClient, port: int, secret: str) -> int:
    """One correctly signed webhook delivery the normaliser rejects (not JSON): a 422."""
    import hashlib
    import hmac
    import time

    body, ts = b"this is not json", str(int(time.time()))
    sig = hmac.new(secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    r = await c.post(f"http://127.0.0.1:{port}/ingest/webhook/webhook", content=body,
                     headers={"X-Timestamp": ts, "X-Signature": sig, "X-Idempotency-Key": "bad-1",
                              "Content-Type": "application/json"})
    return r.status_code


def _value(exp: Exposition, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    return sum(v for n, lab, v in exp.points if n == name and labels.items() <= lab.items())
