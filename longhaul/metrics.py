"""The driver's own metrics: the actor pool, and tool-server restarts. (Each role's metrics live beside it, in
actors/, buffer/ and learner/.)"""

from prometheus_client import Counter, Gauge

POOL_ACTORS = Gauge("longhaul_pool_actors", "Rollout actors in the pool, by state", ["state"])
POOL_TARGET = Gauge("longhaul_pool_target_actors", "Rollout actors the pool is asked to keep")
POOL_RESTARTS = Counter("longhaul_pool_actor_restarts", "Actors found dead or hung and replaced")
POOL_SCALE_EVENTS = Counter("longhaul_pool_scale_events", "Actors added to or removed from the pool", ["direction"])
POOL_REFORMS = Counter("longhaul_pool_group_reforms", "Weight-transfer groups re-formed for a new membership")
TOOL_SERVER_RESTARTS = Counter("longhaul_tool_server_restarts", "Tool servers found dead and restarted by the driver")
