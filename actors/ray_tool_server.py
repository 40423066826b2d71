"""The tool server as a Ray actor, so that a run places it on its cluster like the rollout actors.

The gRPC server runs on the Ray actor's event loop (the same `start_server` as the standalone process). On a cluster
it binds every interface and advertises the node's address, since actors on other nodes call it; on one machine it
stays on loopback (it has no authentication). Its Prometheus /metrics follow the same rule.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class ToolServerHost:
    """Hosts one tool server; create it with `ray.remote(ToolServerHost).options(...).remote(...)`."""

    def __init__(self, config: dict[str, Any]):
        from longhaul.config import LonghaulConfig

        self.config = LonghaulConfig.model_validate(config)
        self._server = None
        self._servicer = None

    async def start(self, port: int = 0, public: bool = False) -> dict[str, Any]:
        """Build the world and serve it. `public`: bind every interface and advertise this node's address (a
        multi-node cluster). Returns the gRPC address, the /metrics address and this process's id."""
        import os

        import ray
        from prometheus_client import start_http_server

        from longhaul.actors.search_world import SearchWorld
        from longhaul.actors.tool_service import ToolServicer, start_server

        config = self.config
        bind, advertised = ("0.0.0.0", ray.util.get_node_ip_address()) if public else ("127.0.0.1", "127.0.0.1")
        self._servicer = ToolServicer(SearchWorld.generate(config.world), config.tools)
        self._server, bound = await start_server(self._servicer, port, host=bind)
        metrics, _ = start_http_server(0, addr=bind)
        log.info("tool server on %s:%d", advertised, bound)
        return {"address": f"{advertised}:{bound}", "port": bound, "metrics": f"{advertised}:{metrics.server_port}",
                "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    async def ping(self) -> int:
        import os

        return os.getpid()

    async def stop(self) -> None:
        """Refuse new calls and give those in flight `tools.shutdown_grace_s` to finish."""
        if self._server is not None:
            await self._server.stop(self.config.tools.shutdown_grace_s)
            self._server = None
        if self._servicer is not None:
            self._servicer.close()
            self._servicer = None


def launch_tool_server(config: dict[str, Any], *, num_cpus: float, port: int = 0, public: bool = False,
                       node_id: str | None = None):
    """Place a `ToolServerHost` (on `node_id` if given: a restart keeps the address actors already use) and start
    it; returns (handle, what `start` returned)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    options: dict[str, Any] = {"num_cpus": num_cpus}
    if node_id is not None:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
    handle = ray.remote(ToolServerHost).options(**options).remote(config)
    return handle, ray.get(handle.start.remote(port, public))
