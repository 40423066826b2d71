"""The monitoring artefacts in infra/ agree with the metrics the code exports.

Existence is decided by the real registries: every module that defines longhaul metrics is imported and
`prometheus_client.REGISTRY` is asked which sample names it would expose (a counter `x` as `x_total`, a histogram as
`x_bucket`, `x_sum`, `x_count`), whether or not a labelled child exists yet. Every metric that a Grafana panel, a
template variable, a recording rule or an alert names must be one of those, a recording rule defined beside it, or
`up` (which Prometheus writes per target). `promtool` (Debian's `prometheus` package) additionally parses the config,
the rules and every dashboard query, and runs the rules' unit tests; those checks skip, saying so, without it.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

ROOT = Path(__file__).parent.parent
DASHBOARD = ROOT / "infra" / "grafana" / "longhaul.json"
PROMETHEUS = ROOT / "infra" / "prometheus"
RULES = PROMETHEUS / "rules" / "longhaul.rules.yml"
OPERATIONS = ROOT / "docs" / "operations.md"

METRIC_MODULES = (
    "longhaul.actors.metrics",
    "longhaul.actors.tool_service",
    "longhaul.buffer.metrics",
    "longhaul.learner.metrics",
    "longhaul.metrics",  # the driver's: the elastic pool (longhaul_pool_*)
)
PROMETHEUS_SERIES = {"up"}
"""Series Prometheus itself writes for every target."""

_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("", "_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",),
             "stateset": ("",), "enum": ("",), "gaugehistogram": ("_bucket", "_gsum", "_gcount")}


def _import_metric_modules() -> list:
    modules = []
    for name in METRIC_MODULES:
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as error:
            if error.name != name:
                raise
            pytest.fail(f"{name} does not exist: it defines metrics the dashboard and the rules use")
    return modules


def exported_sample_names() -> set[str]:
    """Every sample name the registry would expose once the longhaul metric modules are imported."""
    _import_metric_modules()
    names = set()
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def longhaul_metric_objects() -> dict[str, MetricWrapperBase]:
    """The metric objects the longhaul modules define, by family name."""
    return {family.name: obj for module in _import_metric_modules() for obj in vars(module).values()
            if isinstance(obj, MetricWrapperBase) for family in obj.describe()}


# ---- PromQL: which metric names does an expression select? -------------------------------------------------------

_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
             "inf", "nan", "start", "end", "atan2"}
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_GRAFANA_VARIABLE = re.compile(r"\$(\{[^}]*\}|\w+)")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_NUMBER = re.compile(r"(?<![\w:.])(0x[0-9a-fA-F]+|\d+(\.\d*)?([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?)(?:[smhdwy]|ms)*"
                     r"(?![\w:])")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """Metric names selected in a PromQL expression (Grafana variables allowed): what is left once strings, label
    matchers, range and subquery brackets, grouping clauses, numbers, durations, keywords and function calls are
    taken out. `{__name__="x"}` selectors are read too."""
    names = set(re.findall(r'__name__\s*=\s*"([^"]+)"', expr))
    text = _GRAFANA_VARIABLE.sub("5m", expr)
    text = _STRING.sub('""', text)
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers (strings already emptied)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # range vectors and subqueries
    text = _GROUPING.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    for match in _IDENTIFIER.finditer(text):
        word, rest = match.group(), text[match.end():]
        if word.lower() in _KEYWORDS or rest.lstrip().startswith("("):
            continue  # a keyword, or a function or aggregation being called
        names.add(word)
    return names


@pytest.mark.parametrize(("expr", "names"), [
    ('sum by (run, le) (rate(longhaul_a_bucket{run=~"$run"}[$__rate_interval]))', {"longhaul_a_bucket"}),
    ("histogram_quantile(0.99, sum by (le) (rate(x_bucket[5m])))", {"x_bucket"}),
    ('a / on (run) group_left (tool) b{x="by (y)"} > 1e3 and c offset 1h', {"a", "b", "c"}),
    ("max_over_time(deriv(g[10m:1m])[1h:]) * 60", {"g"}),
    ('{__name__="longhaul_x", run="r"} or sum without (instance) (y) unless bool z', {"longhaul_x", "y", "z"}),
    ("longhaul:rec:rate5m > 0.5 and 2 < count(up == 0)", {"longhaul:rec:rate5m", "up"}),
])
def test_metric_names_are_read_out_of_promql(expr, names):
    assert metric_names(expr) == names


# ---- the dashboard ------------------------------------------------------------------------------------------------


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # panels inside a collapsed row
    return panels


def _dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    queries = [(f"panel {p['id']} {p['title']!r} target {t.get('refId')}", t["expr"])
               for p in _panels(dashboard) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            inner = re.fullmatch(r"\s*(?:label_values|query_result)\((.*)\)\s*", query)
            expr = inner.group(1) if inner else query
            if inner and query.lstrip().startswith("label_values"):
                expr = expr.rsplit(",", 1)[0] if "," in expr else ""
            if expr:
                queries.append((f"variable {variable['name']}", expr))
    return queries


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_dashboard_is_grafana_json_with_unique_panel_ids_and_a_query_in_every_panel():
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    for panel in panels:
        assert {"type", "title", "gridPos"} <= panel.keys(), panel.get("title")
        if panel["type"] == "row":
            continue
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert 'run=~"$run"' in target["expr"], f"panel {panel['title']!r} ignores the run variable"
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:  # the top level is laid out on Grafana's 24-column grid, without overlaps
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for cell in ((x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                     for y in range(grid["y"], grid["y"] + grid["h"])):
            assert cell not in cells, f"panels {cells[cell]!r} and {panel['title']!r} overlap"
            cells[cell] = panel["title"]


def test_dashboard_has_the_datasource_and_run_variables_and_every_section():
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["run"]["type"] == "query" and variables["run"]["multi"] and variables["run"]["includeAll"]
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    for section in ("Throughput", "Episodes", "Tools", "Buffer", "Staleness & importance weights", "Learner",
                    "Weight sync", "Pool"):
        assert section in rows


def test_committed_dashboard_is_what_its_generator_writes():
    spec = importlib.util.spec_from_file_location("longhaul_dashboard", ROOT / "infra" / "grafana" / "dashboard.py")
    generator = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = generator  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(generator)
    assert DASHBOARD.read_text() == generator.render(), \
        "infra/grafana/longhaul.json differs from its generator: edit infra/grafana/dashboard.py, then run it"


def test_every_metric_the_dashboard_queries_is_exported():
    exported = exported_sample_names() | PROMETHEUS_SERIES
    missing = {f"{where}: {name}" for where, expr in _dashboard_queries(_dashboard())
               for name in metric_names(expr) if name not in exported}
    assert not missing, "the dashboard queries metrics no registry defines:\n" + "\n".join(sorted(missing))


def test_every_metric_the_rules_use_is_exported_or_recorded():
    rules = _rules()
    recorded = {rule["record"] for rule in rules if "record" in rule}
    exported = exported_sample_names() | PROMETHEUS_SERIES | recorded
    missing = {f"{rule.get('record') or rule.get('alert')}: {name}" for rule in rules
               for name in metric_names(rule["expr"]) if name not in exported}
    assert not missing, "rules use metrics no registry defines:\n" + "\n".join(sorted(missing))
    assert all(name.startswith("longhaul:") for name in recorded)
    alerts = {rule["alert"] for rule in rules if "alert" in rule}
    assert {"LonghaulLearnerStalled", "LonghaulActorsDown", "LonghaulDeadLettersRising",
            "LonghaulWeightSyncSlow"} <= alerts


def test_every_longhaul_metric_is_named_longhaul_and_described():
    objects = longhaul_metric_objects()
    assert len(objects) > 40
    for name, obj in objects.items():
        assert name.startswith("longhaul_"), name
        assert obj._documentation.strip(), f"{name} has no help text"


def test_operations_doc_catalogues_every_metric():
    """docs/operations.md has one catalogue row per metric family: name, type and labels as the code defines them;
    and names no metric that does not exist."""
    rows = {m.group(1): (m.group(2).strip(), m.group(3).strip())
            for m in re.finditer(r"^\| `(longhaul_\w+)` \| (\w+) \| ([^|]*) \|", OPERATIONS.read_text(), re.M)}
    objects = longhaul_metric_objects()
    for name, obj in objects.items():
        shown = name + ("_total" if obj._type == "counter" else "")
        assert shown in rows, f"docs/operations.md does not list {shown}"
        labels = ", ".join(f"`{label}`" for label in obj._labelnames) or "–"
        assert rows[shown] == (obj._type, labels), f"docs/operations.md: {shown} is {obj._type} with {labels}"
    listed = {name.removesuffix("_total") for name in rows}
    assert listed <= set(objects), f"docs/operations.md lists unknown metrics: {sorted(listed - set(objects))}"


# ---- promtool -----------------------------------------------------------------------------------------------------

promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                              reason="promtool not installed (Debian: apt-get install prometheus)")


def _promtool(*args: str, cwd: Path) -> None:
    result = subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@promtool
def test_prometheus_config_and_rules_pass_promtool(tmp_path: Path):
    # The config reads targets/*.json and rules/ relative to itself: check a copy beside a driver-written target
    # list (the file the driver writes, in the driver's shape).
    config = tmp_path / "prometheus"
    shutil.copytree(PROMETHEUS, config, ignore=shutil.ignore_patterns("*.json"))
    (config / "targets" / "run.json").write_text(json.dumps(
        [{"targets": ["127.0.0.1:9100"], "labels": {"job": "longhaul", "run": "r", "component": "driver"}}]))
    _promtool("check", "config", "prometheus.yml", cwd=config)
    _promtool("check", "rules", "rules/longhaul.rules.yml", cwd=config)


@promtool
def test_alert_and_recording_rules_pass_their_unit_tests():
    _promtool("test", "rules", "longhaul.test.yml", cwd=PROMETHEUS / "rules")


@promtool
def test_every_dashboard_query_is_valid_promql(tmp_path: Path):
    """Each query, Grafana variables substituted, as a recording rule: promtool parses them all."""
    rules = [{"record": f"dashboard:query:{index}",
              "expr": _GRAFANA_VARIABLE.sub(lambda m: "5m" if "interval" in m.group() or "range" in m.group()
                                            else ".*", expr)}
             for index, (_, expr) in enumerate(_dashboard_queries(_dashboard()))]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _promtool("check", "rules", str(path), cwd=tmp_path)
