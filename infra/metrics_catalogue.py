"""Prints the catalogue of longhaul's Prometheus metrics as a Markdown table, from the metric objects themselves.

    python infra/metrics_catalogue.py        # paste the output into docs/operations.md ("Metric catalogue")

`tests/test_dashboard.py` checks that docs/operations.md lists every metric with the name, type and labels the code
defines, and no metric that does not exist.
"""

from __future__ import annotations

import importlib

from prometheus_client.metrics import MetricWrapperBase

MODULES = ("longhaul.actors.metrics", "longhaul.actors.tool_service", "longhaul.buffer.metrics",
           "longhaul.learner.metrics", "longhaul.metrics")

SERVED_BY = (  # first matching prefix wins
    ("longhaul_tool_server_restarts", "driver"),
    ("longhaul_tool_server_", "tool server"),
    ("longhaul_buffer_appended", "actor"),
    ("longhaul_buffer_admission", "actor"),
    ("longhaul_buffer_rate_limiter", "actor (insert side), driver (sample side)"),
    ("longhaul_buffer_op_seconds", "actor (append), driver (read, commit)"),
    ("longhaul_buffer_", "driver"),
    ("longhaul_scheduler_", "driver (learner)"),
    ("longhaul_learner_", "driver (learner)"),
    ("longhaul_weight_sync_", "driver (learner)"),
    ("longhaul_pool_", "driver (pool)"),
    ("longhaul_", "actor"),  # longhaul_actor_*, longhaul_episode_*, longhaul_tool_call*
)


def rows() -> list[str]:
    lines = ["| metric | type | labels | meaning | served by |", "|---|---|---|---|---|"]
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for obj in vars(module).values():
            if not isinstance(obj, MetricWrapperBase):
                continue
            name = obj._name + ("_total" if obj._type == "counter" else "")
            labels = ", ".join(f"`{label}`" for label in obj._labelnames) or "–"
            meaning = obj._documentation.replace("|", "\\|")
            served_by = next(process for prefix, process in SERVED_BY if name.startswith(prefix))
            lines.append(f"| `{name}` | {obj._type} | {labels} | {meaning} | {served_by} |")
    return lines


if __name__ == "__main__":
    print("\n".join(rows()))
