"""Writes `longhaul.json`, the Grafana dashboard of a longhaul run, from the panel list below.

    python infra/grafana/dashboard.py          # rewrites infra/grafana/longhaul.json next to this file

The JSON is what users import (Grafana 10/11: Dashboards → New → Import); this script is how it is edited, so that
every panel has the same shape and the PromQL stays readable. `tests/test_dashboard.py` checks that the committed JSON
equals this script's output and that every metric its queries name exists in longhaul's metric registries.

Conventions of the queries:
- Every query is restricted to the runs picked in the `run` variable (`run` is the label the driver puts on every
  target in `prometheus_targets.json`).
- Buffer gauges mirror server-side state, and every process that imports the buffer exports them (an actor's stay
  at 0): they are read with `max by (run)`, which is the state Redis reported most recently to any process.
- Rates use Grafana's `$__rate_interval`, which is at least four scrape intervals.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RUN = 'run=~"$run"'
RATE = "$__rate_interval"


@dataclass
class Panel:
    title: str
    queries: list[tuple[str, str]]
    """(PromQL, legend) pairs."""
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 8
    height: int = 8
    description: str = ""
    options: dict = field(default_factory=dict)


def rate(metric: str, by: str = "run", selector: str = "") -> str:
    matchers = RUN + (f", {selector}" if selector else "")
    return f"sum by ({by}) (rate({metric}{{{matchers}}}[{RATE}]))"


def quantile(q: float, histogram: str, by: str = "run") -> str:
    keep = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({keep}) (rate({histogram}_bucket{{{RUN}}}[{RATE}])))"


def mean_of(histogram: str, by: str = "run") -> str:
    return (f"sum by ({by}) (rate({histogram}_sum{{{RUN}}}[{RATE}])) / "
            f"sum by ({by}) (rate({histogram}_count{{{RUN}}}[{RATE}]))")


def gauge(metric: str, how: str = "max", by: str = "run", selector: str = "") -> str:
    matchers = RUN + (f", {selector}" if selector else "")
    return f"{how} by ({by}) ({metric}{{{matchers}}})"


def quantiles(histogram: str, by: str = "run", legend: str = "{{run}}", qs=(0.5, 0.99)) -> list[tuple[str, str]]:
    return [(quantile(q, histogram, by), f"p{round(q * 100)} {legend}") for q in qs]


ROWS: list[tuple[str, list[Panel]]] = [
    ("Overview", [
        Panel("Policy version", [(gauge("longhaul_learner_policy_version"), "{{run}}")], kind="stat", width=4,
              height=4, description="Version of the learner's weights (one per optimizer step)."),
        Panel("Live actors", [(gauge("longhaul_pool_actors", "sum", selector='state="running"'), "{{run}}")],
              kind="stat", width=4, height=4, description="Rollout actors running (the elastic pool's view)."),
        Panel("Generated tokens/s", [(rate("longhaul_actor_generated_tokens_total"), "{{run}}")], kind="stat",
              width=4, height=4),
        Panel("Learner steps/min", [(f"60 * {rate('longhaul_learner_steps_total')}", "{{run}}")], kind="stat",
              width=4, height=4),
        Panel("Undelivered trajectories", [(gauge("longhaul_buffer_undelivered"), "{{run}}")], kind="stat",
              width=4, height=4),
        Panel("Targets up", [(f'sum by (component) (up{{job="longhaul", {RUN}}})', "{{component}}")], kind="stat",
              width=4, height=4, description="Processes Prometheus scrapes successfully, by component."),
    ]),
    ("Throughput", [
        Panel("Actor generated tokens/s", [
            (rate("longhaul_actor_generated_tokens_total"), "{{run}}"),
            (rate("longhaul_actor_generated_tokens_total", "run, instance"), "{{instance}}"),
        ], unit="short", description="Tokens sampled by the policy (loss-mask 1), all actors and per actor."),
        Panel("Episodes/s by finish reason", [
            (rate("longhaul_actor_episodes_total", "finish_reason"), "{{finish_reason}}"),
            (rate("longhaul_actor_episode_failures_total"), "raised {{run}}"),
        ], unit="short"),
        Panel("Learner tokens/s", [
            (rate("longhaul_learner_tokens_total"), "scored {{run}}"),
            (rate("longhaul_learner_trained_tokens_total"), "trained {{run}}"),
        ], unit="short", description="Tokens the learner scored (prompts and observations included) and trained on."),
        Panel("Episode slots in use", [
            (gauge("longhaul_actor_episodes_in_flight", "sum"), "in flight {{run}}"),
            # busy_seconds rises by one per second per running episode: its rate is the average slots busy.
            (rate("longhaul_actor_episode_busy_seconds"), "busy (average) {{run}}"),
        ], description="Episodes running now, and slots busy on average over the interval; against "
                       "actors × actor.episodes_in_flight the rest is idle (the admission rule held them)."),
        Panel("Admission wait", quantiles("longhaul_actor_admission_wait_seconds"), unit="s",
              description="Time a group waited for the staleness admission rule (the learner is behind)."),
        Panel("Trajectories trained/s", [(rate("longhaul_learner_trajectories_total"), "{{run}}")]),
    ]),
    ("Episodes", [
        Panel("Turns per episode", [
            *quantiles("longhaul_episode_turns", qs=(0.5, 0.9, 0.99)),
            (mean_of("longhaul_episode_turns"), "mean {{run}}"),
        ]),
        Panel("Tool calls per episode", [
            *quantiles("longhaul_episode_tool_calls", qs=(0.5, 0.9, 0.99)),
            (mean_of("longhaul_episode_tool_calls"), "mean {{run}}"),
        ]),
        Panel("Episode wall time", [*quantiles("longhaul_actor_episode_seconds", qs=(0.5, 0.9, 0.99))], unit="s",
              description="First turn to appended."),
        Panel("Tool calls per episode (distribution)", [
            (f"sum by (le) (increase(longhaul_episode_tool_calls_bucket{{{RUN}}}[{RATE}]))", "{{le}}"),
        ], kind="heatmap"),
    ]),
    ("Tools", [
        Panel("Tool calls/s by tool and status", [(rate("longhaul_tool_calls_total", "tool, status"),
                                                   "{{tool}} {{status}}")],
              description="As the agents see them (client side, in the actors): ok or the ToolError kind."),
        Panel("Tool call latency (client)", [
            *quantiles("longhaul_tool_call_seconds", "tool", "{{tool}}"),
        ], unit="s", description="Slot wait, every attempt and the backoff between them."),
        Panel("Tool errors (share of calls)", [
            (rate("longhaul_tool_calls_total", "tool", 'status!~"ok|cancelled"') + " / "
             + rate("longhaul_tool_calls_total", "tool"), "{{tool}}"),
        ], unit="percentunit"),
        Panel("Server requests/s by code", [(rate("longhaul_tool_server_requests_total", "tool, code"),
                                             "{{tool}} {{code}}")]),
        Panel("Server latency", [*quantiles("longhaul_tool_server_latency_seconds", "tool", "{{tool}}")], unit="s",
              description="From receiving a call to answering it, simulated latency included."),
        Panel("Server in flight / failed RPC attempts", [
            (gauge("longhaul_tool_server_in_flight", "sum"), "in flight {{run}}"),
            (rate("longhaul_tool_call_attempts_total", "tool, code", 'code!="OK"'),
             "failed attempts {{tool}} {{code}}"),
        ]),
    ]),
    ("Buffer", [
        Panel("Depth", [
            (gauge("longhaul_buffer_stream_length"), "stream {{run}}"),
            (gauge("longhaul_buffer_undelivered"), "undelivered {{run}}"),
            (gauge("longhaul_buffer_pending"), "pending {{run}}"),
            (gauge("longhaul_buffer_history_size"), "history {{run}}"),
        ], description="stream = undelivered + pending (delivered, not yet acknowledged) + replay history."),
        Panel("Rates", [
            (rate("longhaul_buffer_appended_total"), "appended {{run}}"),
            (rate("longhaul_buffer_delivered_total", "source"), "delivered {{source}}"),
            (rate("longhaul_buffer_committed_total"), "committed {{run}}"),
            (rate("longhaul_buffer_replayed_total"), "replayed {{run}}"),
            (rate("longhaul_buffer_duplicates_total"), "duplicates {{run}}"),
        ], unit="short"),
        Panel("Appended bytes/s", [(rate("longhaul_buffer_appended_bytes_total"), "{{run}}")], unit="Bps"),
        Panel("Dead letters", [
            (gauge("longhaul_buffer_dead_letter_length"), "stream length {{run}}"),
            (f"60 * {rate('longhaul_buffer_dead_letters_total', 'field')}", "new/min {{field}}"),
        ], description="Invalid payloads moved to the dead-letter stream, by the field that failed validation "
                       "(`longhaul dead-letters` lists them)."),
        Panel("Admission decisions/s", [(rate("longhaul_buffer_admission_total", "result"), "{{result}}")],
              description="Episodes admitted or rejected by the staleness rule; many rejects: the learner is behind."),
        Panel("Operation latency p99", [
            (quantile(0.99, "longhaul_buffer_op_seconds", "op"), "{{op}}"),
        ], unit="s"),
        Panel("Rate limiter", [
            *quantiles("longhaul_buffer_rate_limiter_wait_seconds", "side", "wait {{side}}"),
            (rate("longhaul_buffer_rate_limiter_timeouts_total", "side"), "timeouts/s {{side}}"),
        ], unit="s"),
    ]),
    ("Staleness & importance weights", [
        Panel("Staleness at delivery (versions)", [
            (f"sum by (le) (increase(longhaul_buffer_staleness_versions_bucket{{{RUN}}}[{RATE}]))", "{{le}}"),
        ], kind="heatmap", description="Per trajectory: learner version minus its newest token's version."),
        Panel("Staleness quantiles", [
            *quantiles("longhaul_buffer_staleness_versions", qs=(0.5, 0.9, 0.99)),
            (gauge("longhaul_learner_staleness_mean", "avg"), "batch mean {{run}}"),
        ]),
        Panel("Over-stale trajectories/s", [(rate("longhaul_buffer_stale_total", "action"), "{{action}}")],
              description="Older than max_staleness at train time: dropped or down-weighted, per the policy."),
        Panel("Importance weights", [(gauge("longhaul_learner_importance_weight", "avg", "stat"), "{{stat}}")],
              description="Token importance weights π_θ/μ of the last step: mean and quantiles."),
        Panel("Clipped / masked share", [
            (gauge("longhaul_learner_clipped_fraction", "avg"), "clipped {{run}}"),
            (gauge("longhaul_learner_masked_fraction", "avg"), "masked {{run}}"),
        ], unit="percentunit"),
    ]),
    ("Scheduler", [
        Panel("Selected trajectories/s", [
            (rate("longhaul_scheduler_selected_total", "source"), "{{source}}"),
            (rate("longhaul_scheduler_retired_total"), "retired untrained {{run}}"),
        ], description="learner.sampler uniform | bandit: fresh and replayed picks, and fresh ones never picked."),
        Panel("Fresh share and candidates", [
            (gauge("longhaul_scheduler_fresh_share"), "fresh share {{run}}"),
            (gauge("longhaul_scheduler_candidates"), "candidates {{run}}"),
        ]),
        Panel("Uses per selected trajectory", [
            *quantiles("longhaul_scheduler_reuse_count", qs=(0.5, 0.99)),
            (mean_of("longhaul_scheduler_reuse_count"), "mean {{run}}"),
        ]),
        # Only the learner sets these; other processes that import the buffer export them at 0, so a sum reads
        # the learner's value (a max would hide negative rewards).
        Panel("Bandit: predicted vs realised selection reward", [
            (gauge("longhaul_scheduler_predicted_reward", "sum"), "predicted {{run}}"),
            (gauge("longhaul_scheduler_realised_reward", "sum"), "realised {{run}}"),
            (gauge("longhaul_scheduler_scorer_loss", "sum"), "scorer loss {{run}}"),
        ]),
        Panel("Selection time", [*quantiles("longhaul_scheduler_select_seconds")], unit="s"),
    ]),
    ("Learner", [
        Panel("Step time", [
            *quantiles("longhaul_learner_step_seconds"),
            *quantiles("longhaul_learner_batch_wait_seconds", legend="batch wait {{run}}"),
        ], unit="s"),
        Panel("Loss", [(gauge("longhaul_learner_loss", "avg"), "{{run}}")]),
        Panel("Reward (batch mean)", [(gauge("longhaul_learner_reward_mean", "avg"), "{{run}}")]),
        Panel("Entropy (batch mean)", [(gauge("longhaul_learner_entropy_mean", "avg"), "{{run}}")]),
        Panel("Gradient norm (before clipping)", [(gauge("longhaul_learner_grad_norm", "avg"), "{{run}}")]),
        Panel("Learning rate", [(gauge("longhaul_learner_learning_rate", "avg"), "{{run}}")], unit="sci"),
        Panel("Partial groups/min", [(f"60 * {rate('longhaul_learner_partial_groups_total')}", "{{run}}")]),
        Panel("Checkpoint time", [*quantiles("longhaul_learner_checkpoint_seconds")], unit="s"),
        Panel("Policy version", [
            (gauge("longhaul_learner_policy_version"), "learner {{run}}"),
            (gauge("longhaul_buffer_policy_version"), "published {{run}}"),
        ]),
    ]),
    ("Weight sync", [
        Panel("Weight sync time", [
            *quantiles("longhaul_weight_sync_seconds"),
            (mean_of("longhaul_weight_sync_seconds"), "mean {{run}}"),
        ], unit="s", description="One broadcast of the learner's weights to every actor's engine."),
        Panel("Weight sync bandwidth", [(rate("longhaul_weight_sync_bytes_total"), "{{run}}")], unit="Bps"),
        Panel("Bytes per sync", [
            (f"sum by (run) (increase(longhaul_weight_sync_bytes_total{{{RUN}}}[{RATE}])) / "
             f"sum by (run) (increase(longhaul_weight_sync_seconds_count{{{RUN}}}[{RATE}]))", "{{run}}"),
        ], unit="bytes"),
    ]),
    ("Pool", [
        Panel("Actors by state", [
            (gauge("longhaul_pool_actors", "sum", "state"), "{{state}}"),
            (gauge("longhaul_pool_target_actors"), "target"),
        ], description="Rollout actors in the elastic pool (starting, running, draining) and the size it is asked "
                       "to keep (`longhaul scale`)."),
        Panel("Actor restarts", [(f"sum by (run) (increase(longhaul_pool_actor_restarts_total{{{RUN}}}[{RATE}]))",
                                  "{{run}}")], description="Actors found dead or hung and replaced."),
        Panel("Scale events and group re-forms", [
            (f"sum by (direction) (increase(longhaul_pool_scale_events_total{{{RUN}}}[{RATE}]))", "{{direction}}"),
            (f"sum by (run) (increase(longhaul_pool_group_reforms_total{{{RUN}}}[{RATE}]))", "group re-forms"),
        ], description="Actors added or removed, and weight-transfer groups re-formed for a new membership."),
    ]),
]


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    targets = []
    for index, (expr, legend) in enumerate(panel.queries):
        target = {"refId": chr(ord("A") + index), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend,
                  "range": True}
        if panel.kind == "heatmap":
            target["format"] = "heatmap"
        targets.append(target)
    result = {"id": panel_id, "type": panel.kind, "title": panel.title, "datasource": DATASOURCE,
              "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y}, "targets": targets,
              "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []}}
    if panel.description:
        result["description"] = panel.description
    if panel.kind == "timeseries":
        result["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                             "tooltip": {"mode": "multi", "sort": "desc"}}
    elif panel.kind == "stat":
        result["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                             "colorMode": "value", "graphMode": "area", "textMode": "auto"}
    elif panel.kind == "heatmap":
        result["options"] = {"calculate": False, "cellGap": 1, "yAxis": {"axisPlacement": "left"},
                             "color": {"mode": "scheme", "scheme": "Oranges", "fill": "dark-orange"},
                             "tooltip": {"mode": "single", "yHistogram": True}}
    result["options"] = {**result.get("options", {}), **panel.options}
    return result


def build() -> dict:
    panels, panel_id, y = [], 1, 0
    for title, row in ROWS:
        panels.append({"id": panel_id, "type": "row", "title": title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        panel_id, y, x, row_height = panel_id + 1, y + 1, 0, 0
        for panel in row:
            if x + panel.width > 24:
                x, y, row_height = 0, y + row_height, 0
            panels.append(_panel(panel, panel_id, x, y))
            panel_id, x, row_height = panel_id + 1, x + panel.width, max(row_height, panel.height)
        y += row_height
    run_query = 'label_values(up{job="longhaul"}, run)'
    return {
        "uid": "longhaul-run", "title": "longhaul", "tags": ["longhaul", "rl"], "editable": True,
        "description": "A longhaul run: rollout actors, tools, replay buffer, staleness, learner, weight sync, pool.",
        "schemaVersion": 39, "version": 1, "graphTooltip": 1, "refresh": "10s", "timezone": "browser",
        "time": {"from": "now-1h", "to": "now"}, "fiscalYearStartMonth": 0, "liveNow": False, "links": [],
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []},
            {"name": "run", "label": "run", "type": "query", "datasource": DATASOURCE,
             "query": {"query": run_query, "refId": "run"}, "definition": run_query, "refresh": 2,
             "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "sort": 1, "hide": 0,
             "regex": "", "options": []},
        ]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    path = Path(__file__).with_name("longhaul.json")
    path.write_text(render())
    print(f"wrote {path}")
