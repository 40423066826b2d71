"""The control plane of a training run: the gRPC `ControlService` the driver serves, and the client the CLI uses.

The contract is `proto/longhaul/v1/control.proto`. The driver implements `ControlTarget` and serves it with
`ControlServer`; `longhaul status`, `scale`, `pause`, `resume` and `stop` (longhaul/control_cli.py) call it through
`ControlClient`. The driver writes the server's address to `<run dir>/control.address` (`write_address_file`) so that
the CLI finds it without being told.

Server. A synchronous `grpc.server` on a few threads: control calls are rare (an operator, a dashboard poll) and
cheap, so a thread each is simpler than an event loop and cannot starve the driver's own loop. Requests are validated
before they reach the target; a rejection carries a status message that starts with the offending field and names it
in the trailing metadata key `longhaul-field`, as the tool service does. Whatever the target raises (scaling a
stopped run, say) becomes FAILED_PRECONDITION with the exception's message, never a traceback on the client: the
traceback goes to the driver's log.

Client. Synchronous, one call at a time, each bounded by `timeout_s`. No retries: an operator reruns a command, and
retrying `scale` or `stop` behind their back could repeat it after the driver already acted. Every failure is a
`ControlError` whose message says what to do next.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, TypeVar

import grpc

from longhaul.v1 import control_pb2 as pb
from longhaul.v1 import control_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

FIELD_METADATA_KEY = "longhaul-field"
"""Trailing metadata key naming the request field a rejected call got wrong. The same key as
`longhaul.actors.tool_service.FIELD_METADATA_KEY`, defined again rather than imported: that module pulls bm25s and
numba (about half a second) into every `longhaul status`."""

ADDRESS_FILE = "control.address"
"""Name of the file in the run directory that holds the control server's host:port."""

RUNS_DIR = Path("runs")
"""Where run directories live, relative to the working directory: `runs/<run_name>/`."""

_SERVER_THREADS = 4
"""Calls served at once. An operator and a dashboard poll rarely overlap; more threads would only hide a target
whose methods block."""

RunState = Literal["running", "paused", "stopping", "stopped"]
ActorState = Literal["starting", "running", "draining", "dead"]


@dataclass(frozen=True, slots=True)
class ActorStatus:
    """One rollout actor as the driver sees it (proto `ActorStatus`)."""

    actor_id: str
    state: ActorState
    appended: int
    """Trajectories this actor appended to the buffer."""
    weight_version: int
    """Policy version of the weights its engine samples with."""
    pid: int
    """0 when not known (e.g. not started yet)."""


@dataclass(frozen=True, slots=True)
class RunStatus:
    """A snapshot of a run (proto `StatusResponse`). Every field is a plain Python value; `actors` lists every actor
    the driver tracks, live or not, so `len(actors)` may differ from `target_actors` while a scale takes effect."""

    run_name: str
    state: RunState
    policy_version: int
    learner_step: int
    total_steps: int
    target_actors: int
    actors: list[ActorStatus]
    buffer_undelivered: int
    """Trajectories appended and not yet read by the learner."""
    buffer_pending: int
    """Read by the learner and not yet committed."""
    reward_mean: float
    success_rate: float
    """Share of recent episodes answered exactly, in [0, 1]."""
    staleness_mean: float
    """Policy versions between sampling and training, over recent batches."""
    tokens_per_second: float
    uptime_s: float


def status_to_proto(status: RunStatus) -> pb.StatusResponse:
    """The proto message of `status`."""
    fields = {f.name: getattr(status, f.name) for f in dataclasses.fields(RunStatus) if f.name != "actors"}
    actors = [pb.ActorStatus(**dataclasses.asdict(actor)) for actor in status.actors]
    return pb.StatusResponse(actors=actors, **fields)


def status_from_proto(message: pb.StatusResponse) -> RunStatus:
    """The `RunStatus` of a proto message."""
    fields = {f.name: getattr(message, f.name) for f in dataclasses.fields(RunStatus) if f.name != "actors"}
    actors = [ActorStatus(**{f.name: getattr(a, f.name) for f in dataclasses.fields(ActorStatus)})
              for a in message.actors]
    return RunStatus(actors=actors, **fields)


class ControlTarget(Protocol):
    """What the control server steers: the driver of a run. Every method is called on a gRPC server thread, possibly
    several at once; the target is responsible for its own thread safety. A method that cannot act in the run's
    current state raises an exception whose message says why (it reaches the operator as is)."""

    def status(self) -> RunStatus:
        """A snapshot of the run; should return within a second (a dashboard polls it)."""
        ...

    def scale(self, actors: int) -> tuple[int, int]:
        """Set the actor target to `actors` (already checked to be in [0, max_actors]); return (previous, new)
        targets. Actors start or drain after it returns."""
        ...

    def pause(self) -> None:
        """Stop sampling new episodes; the learner goes on with what the buffer holds."""
        ...

    def resume(self) -> None:
        """Undo `pause`."""
        ...

    def stop(self, drain: bool) -> None:
        """Begin ending the run (drain: let episodes in flight finish and checkpoint first); return without waiting."""
        ...


# ----------------------------------------------------------------------------------------------------------- server


_R = TypeVar("_R")


class _ControlServicer(pb_grpc.ControlServiceServicer):
    def __init__(self, target: ControlTarget, max_actors: int):
        self.target = target
        self.max_actors = max_actors

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        return status_to_proto(self._act(context, "status", self.target.status))

    def Scale(self, request: pb.ScaleRequest, context: grpc.ServicerContext) -> pb.ScaleResponse:
        if not 0 <= request.actors <= self.max_actors:
            self._reject(context, "actors", f"must be between 0 and {self.max_actors}, got {request.actors}")
        previous, target = self._act(context, "scale", lambda: self.target.scale(request.actors))
        return pb.ScaleResponse(previous=previous, target=target)

    def Pause(self, request: pb.PauseRequest, context: grpc.ServicerContext) -> pb.ControlResponse:
        return self._command(context, "pause", self.target.pause)

    def Resume(self, request: pb.ResumeRequest, context: grpc.ServicerContext) -> pb.ControlResponse:
        return self._command(context, "resume", self.target.resume)

    def Stop(self, request: pb.StopRequest, context: grpc.ServicerContext) -> pb.ControlResponse:
        return self._command(context, "stop", lambda: self.target.stop(request.drain))

    def _command(self, context: grpc.ServicerContext, name: str, action: Callable[[], None]) -> pb.ControlResponse:
        self._act(context, name, action)
        # The state after the command, read back rather than assumed: a stop without drain may already be "stopped".
        return pb.ControlResponse(state=self._act(context, f"status after {name}", self.target.status).state)

    @staticmethod
    def _act(context: grpc.ServicerContext, name: str, action: Callable[[], _R]) -> _R:
        try:
            return action()
        except Exception as exc:
            # The operator gets the reason; the driver's log keeps the traceback.
            log.warning("control: %s refused by the run: %s", name, exc, exc_info=True)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc) or type(exc).__name__)

    @staticmethod
    def _reject(context: grpc.ServicerContext, field: str, reason: str) -> None:
        """Abort the call as INVALID_ARGUMENT: the message starts with the field, the trailing metadata names it."""
        context.set_trailing_metadata(((FIELD_METADATA_KEY, field),))
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {reason}")


class ControlServer:
    """Serves a `ControlTarget` over gRPC on `host:port` (port 0 picks a free one; `address` is the bound one).

    The server has no authentication: keep it on loopback (the default), or on a network only the operators reach.
    """

    def __init__(self, target: ControlTarget, host: str = "127.0.0.1", port: int = 0, max_actors: int = 64):
        if max_actors < 0:
            raise ValueError(f"max_actors must be >= 0, got {max_actors}: no scale request could ever be accepted")
        self.target = target
        self.host = host
        self.port = port
        self.max_actors = max_actors
        self._server: grpc.Server | None = None
        self._workers: ThreadPoolExecutor | None = None

    @property
    def address(self) -> str:
        """host:port the server listens on; the bound port once started."""
        if self._server is None:
            raise RuntimeError("control server not started: call start() first")
        return _join(self.host, self.port)

    def start(self) -> ControlServer:
        """Bind and start serving; return self. Raises OSError if the port cannot be bound."""
        if self._server is not None:
            raise RuntimeError(f"control server already running on {self.address}")
        workers = ThreadPoolExecutor(_SERVER_THREADS, thread_name_prefix="longhaul-control")
        server = grpc.server(
            workers,
            # gRPC sets SO_REUSEPORT by default, which lets a second run bind a port already in use and take half
            # its connections: the operator would then steer one run or the other at random.
            options=[("grpc.so_reuseport", 0)],
        )
        pb_grpc.add_ControlServiceServicer_to_server(_ControlServicer(self.target, self.max_actors), server)
        where = _join(self.host, self.port)
        try:
            bound = server.add_insecure_port(where)
        except RuntimeError as exc:  # grpcio >= 1.85 raises on a failed bind (older versions returned 0)
            raise OSError(f"control server cannot listen on {where} ({exc}); is another run using the port? "
                          "set control.port=0 to pick a free one") from exc
        server.start()
        self.port = bound
        self._server, self._workers = server, workers
        return self

    def stop(self, grace: float | None = 1.0) -> None:
        """Refuse new calls, give calls in flight `grace` seconds (None: until they finish), then stop."""
        if self._server is None:
            return
        self._server.stop(grace).wait()
        self._workers.shutdown(wait=True)  # grpc.Server.stop leaves its executor's threads behind
        self._server = self._workers = None

    def __enter__(self) -> ControlServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # an IPv6 literal needs brackets


def address_file(run_name: str, runs_dir: Path = RUNS_DIR) -> Path:
    """Where the driver of run `run_name` writes its control address, and where the CLI looks for it."""
    return runs_dir / run_name / ADDRESS_FILE


def write_address_file(path: Path, address: str) -> Path:
    """Write `address` to `path` atomically (a CLI reading it concurrently never sees half of it); return `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(address + "\n")
    partial.replace(path)
    return path


# ----------------------------------------------------------------------------------------------------------- client


class ControlError(Exception):
    """A control call that did not get the run's answer. `str(error)` is written for the operator and says what to
    do next. `code` is the gRPC status; `field` names the rejected request field for INVALID_ARGUMENT."""

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, field: str | None = None):
        super().__init__(message)
        self.code = code
        self.field = field


class ControlClient:
    """Synchronous client of one run's control server. Every method returns the run's answer or raises
    `ControlError` within about `timeout_s`. Close it (or use `with`) to release the channel."""

    def __init__(self, address: str, timeout_s: float = 5.0):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}: every call would time out before it is sent")
        self.address = address
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.ControlServiceStub(self._channel)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def status(self) -> RunStatus:
        """A snapshot of the run."""
        return status_from_proto(self._call("status", self._stub.Status, pb.StatusRequest()))

    def scale(self, actors: int) -> tuple[int, int]:
        """Set the run's actor target; return (previous, new) targets."""
        if isinstance(actors, bool) or not isinstance(actors, int):
            raise ControlError(f"scale: actors: must be int, got {type(actors).__name__}", field="actors")
        if not -(2**31) <= actors < 2**31:  # protobuf's own range error does not name the field
            raise ControlError(f"scale: actors: out of range, got {actors}", field="actors")
        response = self._call("scale", self._stub.Scale, pb.ScaleRequest(actors=actors))
        return response.previous, response.target

    def pause(self) -> str:
        """Stop sampling new episodes; return the run's state after it."""
        return self._call("pause", self._stub.Pause, pb.PauseRequest()).state

    def resume(self) -> str:
        """Resume sampling; return the run's state after it."""
        return self._call("resume", self._stub.Resume, pb.ResumeRequest()).state

    def stop(self, drain: bool = True) -> str:
        """End the run (drain: finish episodes in flight and checkpoint first); return the run's state after it."""
        return self._call("stop", self._stub.Stop, pb.StopRequest(drain=drain)).state

    def _call(self, command: str, rpc: Callable, request):
        try:
            return rpc(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise self._error(command, exc) from exc

    def _error(self, command: str, exc: grpc.RpcError) -> ControlError:
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            # gRPC's own details ("failed to connect to all addresses; ...") stay on the chained cause, for logs.
            return ControlError(f"no run is listening on {self.address}: is `longhaul train` running? its control "
                                f"address is printed at start and written to {RUNS_DIR}/<run_name>/{ADDRESS_FILE}",
                                code=code)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ControlError(f"{command}: the run on {self.address} did not answer within {self.timeout_s:g} s; "
                                "its driver may be overloaded or stuck: check its log, or retry with a longer timeout",
                                code=code)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            field = dict(exc.trailing_metadata() or ()).get(FIELD_METADATA_KEY)
            return ControlError(f"{command}: {details}", code=code, field=field)
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            return ControlError(f"{command} refused by the run: {details}", code=code)
        return ControlError(f"{command} failed on {self.address} ({code.name}: {details}); the driver's log has the "
                            "details", code=code)


# ----------------------------------------------------------------------------------------------------------- format


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def format_status(status: RunStatus) -> str:
    """The status as `longhaul status` prints it: a few lines of run figures, then one line per actor."""
    progress = f" ({status.learner_step / status.total_steps:.0%})" if status.total_steps > 0 else ""
    running = sum(actor.state == "running" for actor in status.actors)
    lines = [
        f"run {status.run_name}: {status.state}, up {_duration(status.uptime_s)}",
        f"  policy v{status.policy_version}  step {status.learner_step}/{status.total_steps}{progress}",
        f"  reward {status.reward_mean:.3f}  success {status.success_rate:.1%}  "
        f"staleness {status.staleness_mean:.2f} versions",
        f"  buffer {status.buffer_undelivered} undelivered, {status.buffer_pending} pending  "
        f"{status.tokens_per_second:,.0f} tokens/s",
        f"  actors {running} running of {len(status.actors)} (target {status.target_actors})",
    ]
    width = max((len(actor.actor_id) for actor in status.actors), default=0)
    lines += [f"    {actor.actor_id:<{width}}  {actor.state:<8}  pid {actor.pid or '-':<7}  "
              f"appended {actor.appended:<6}  weights v{actor.weight_version}" for actor in status.actors]
    return "\n".join(lines)
