"""The control plane over real gRPC: a `ControlServer` on a free loopback port serving a small recording target, its
`ControlClient`, and the CLI handlers end to end."""

from __future__ import annotations

import argparse
import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from longhaul.config import load_config
from longhaul.control import (
    ActorStatus,
    ControlClient,
    ControlError,
    ControlServer,
    RunStatus,
    address_file,
    format_status,
    status_from_proto,
    status_to_proto,
    write_address_file,
)
from longhaul.control_cli import add_control_commands, cmd_pause, cmd_resume, cmd_scale, cmd_status, cmd_stop
from longhaul.net import free_port
from longhaul.v1 import control_pb2 as pb
from longhaul.v1 import control_pb2_grpc as pb_grpc

MAX_ACTORS = 8

STATUS = RunStatus(
    run_name="exp1", state="running", policy_version=42, learner_step=120, total_steps=1000, target_actors=3,
    actors=[
        ActorStatus(actor_id="actor-0", state="running", appended=1_234, weight_version=41, pid=4242),
        ActorStatus(actor_id="actor-1", state="draining", appended=7, weight_version=40, pid=4243),
        ActorStatus(actor_id="actor-2", state="starting", appended=0, weight_version=0, pid=0),
    ],
    buffer_undelivered=37, buffer_pending=8, reward_mean=0.53125, success_rate=0.40625, staleness_mean=1.75,
    tokens_per_second=6712.5, uptime_s=3723.0,
)
"""Values exact in binary floating point, so a round trip can be compared with ==."""


class RecordingRun:
    """A `ControlTarget` that records every call; `refusal` set makes every method raise it."""

    def __init__(self, status: RunStatus = STATUS):
        self.state = status.state
        self.target_actors = status.target_actors
        self._status = status
        self.calls: list[tuple] = []
        self.refusal: Exception | None = None
        self._lock = threading.Lock()  # methods run on gRPC server threads

    def _record(self, *call) -> None:
        with self._lock:
            self.calls.append(call)
        if self.refusal is not None:
            raise self.refusal

    def status(self) -> RunStatus:
        if self.refusal is not None:
            raise self.refusal
        with self._lock:
            return dataclasses.replace(self._status, state=self.state, target_actors=self.target_actors)

    def scale(self, actors: int) -> tuple[int, int]:
        self._record("scale", actors)
        with self._lock:
            previous, self.target_actors = self.target_actors, actors
        return previous, actors

    def pause(self) -> None:
        self._record("pause")
        self.state = "paused"

    def resume(self) -> None:
        self._record("resume")
        self.state = "running"

    def stop(self, drain: bool) -> None:
        self._record("stop", drain)
        self.state = "stopping" if drain else "stopped"


@pytest.fixture
def run() -> RecordingRun:
    return RecordingRun()


@pytest.fixture
def server(run: RecordingRun) -> Iterator[ControlServer]:
    with ControlServer(run, port=0, max_actors=MAX_ACTORS) as server:
        yield server


@pytest.fixture
def client(server: ControlServer) -> Iterator[ControlClient]:
    with ControlClient(server.address, timeout_s=5.0) as client:
        yield client


# ----------------------------------------------------------------------------------------------- status and scale


def test_status_round_trips_every_field_exactly(client):
    assert client.status() == STATUS


def test_status_converts_to_proto_and_back_unchanged():
    message = status_to_proto(STATUS)
    assert message.actors[0].pid == 4242 and message.tokens_per_second == 6712.5
    assert status_from_proto(pb.StatusResponse.FromString(message.SerializeToString())) == STATUS


def test_status_of_a_run_with_no_actors_yet(run, client):
    run._status = dataclasses.replace(STATUS, actors=[])
    assert client.status().actors == []


@pytest.mark.parametrize("actors", [0, 5, MAX_ACTORS])
def test_scale_within_bounds_returns_previous_and_new_target(run, client, actors):
    assert client.scale(actors) == (3, actors)
    assert run.calls == [("scale", actors)]
    assert client.status().target_actors == actors


@pytest.mark.parametrize("actors", [-1, MAX_ACTORS + 1, 2**31 - 1])
def test_scale_out_of_bounds_is_rejected_naming_actors_and_never_reaches_the_run(run, client, actors):
    with pytest.raises(ControlError, match=rf"^scale: actors: must be between 0 and {MAX_ACTORS}, got {actors}$") \
            as error:
        client.scale(actors)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.field == "actors"
    assert run.calls == []


def test_rejection_names_the_field_in_trailing_metadata_like_the_tool_service(server):
    from longhaul.actors.tool_service import FIELD_METADATA_KEY

    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as error:
        pb_grpc.ControlServiceStub(channel).Scale(pb.ScaleRequest(actors=-1), timeout=5)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(error.value.trailing_metadata())[FIELD_METADATA_KEY] == "actors"


def test_scale_rejects_a_non_integer_before_sending(run, client):
    with pytest.raises(ControlError, match="actors: must be int, got float"):
        client.scale(2.0)
    assert run.calls == []


# ----------------------------------------------------------------------------------------- commands reach the run


def test_pause_resume_and_stop_reach_the_run_and_return_its_new_state(run, client):
    assert client.pause() == "paused"
    assert client.resume() == "running"
    assert client.stop() == "stopping"
    assert run.calls == [("pause",), ("resume",), ("stop", True)]


def test_stop_without_drain_passes_drain_false(run, client):
    assert client.stop(drain=False) == "stopped"
    assert run.calls == [("stop", False)]


@pytest.mark.parametrize("command", ["status", "scale", "pause", "resume", "stop"])
def test_a_refusal_by_the_run_reaches_the_client_as_its_message(run, client, command):
    run.refusal = RuntimeError("run is stopped")
    call = {"status": client.status, "scale": lambda: client.scale(2), "pause": client.pause,
            "resume": client.resume, "stop": client.stop}[command]
    with pytest.raises(ControlError, match=rf"^{command} refused by the run: run is stopped$") as error:
        call()
    assert error.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_server_keeps_serving_after_a_refusal(run, client):
    run.refusal = RuntimeError("run is stopped")
    with pytest.raises(ControlError):
        client.scale(2)
    run.refusal = None
    assert client.scale(2) == (3, 2)


# ----------------------------------------------------------------------------------------------- no run listening


def test_client_pointed_at_no_server_fails_within_its_timeout_saying_what_to_do():
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with ControlClient(address, timeout_s=2.0) as client, pytest.raises(ControlError) as error:
        client.status()
    assert time.monotonic() - started < 2.0 + 1.0
    assert error.value.code == grpc.StatusCode.UNAVAILABLE
    assert f"no run is listening on {address}: is `longhaul train` running?" in str(error.value)
    assert "control.address" in str(error.value)


def test_stopped_server_refuses_calls_as_no_run_listening(run):
    server = ControlServer(run, max_actors=MAX_ACTORS).start()
    address = server.address
    server.stop()
    with ControlClient(address, timeout_s=2.0) as client, pytest.raises(ControlError, match="no run is listening"):
        client.pause()
    assert run.calls == []


def test_a_second_server_on_a_taken_port_fails_to_start(server, run):
    with pytest.raises(OSError, match="is another run using the port"):
        ControlServer(run, port=server.port).start()


def test_negative_max_actors_is_refused_at_construction(run):
    with pytest.raises(ValueError, match="max_actors must be >= 0"):
        ControlServer(run, max_actors=-1)


# ---------------------------------------------------------------------------------------------------------- format


def test_format_status_shows_the_key_figures_and_one_line_per_actor():
    text = format_status(STATUS)
    for figure in ("exp1", "running", "v42", "120/1000", "12%", "0.531", "40.6%", "1.75", "37 undelivered",
                   "8 pending", "6,712 tokens/s", "target 3", "1h02m"):
        assert figure in text, figure
    actor_lines = text.splitlines()[-3:]
    assert [line.split()[0] for line in actor_lines] == ["actor-0", "actor-1", "actor-2"]
    assert "pid 4242" in actor_lines[0] and "appended 1234" in actor_lines[0] and "v41" in actor_lines[0]
    assert "draining" in actor_lines[1] and "pid -" in actor_lines[2]


# ------------------------------------------------------------------------------------------------------------- CLI


def _args(command: str, address: str | None, **extra) -> argparse.Namespace:
    return argparse.Namespace(command=command, address=address, timeout=5.0, **extra)


def test_cli_commands_run_end_to_end_against_the_server(run, server, capsys):
    config = load_config()
    assert cmd_status(config, _args("status", server.address)) == 0
    assert capsys.readouterr().out.strip() == format_status(STATUS)
    assert cmd_scale(config, _args("scale", server.address, actors=5)) == 0
    assert "3 -> 5" in capsys.readouterr().out
    assert cmd_pause(config, _args("pause", server.address)) == 0
    assert capsys.readouterr().out.strip() == "run is paused"
    assert cmd_resume(config, _args("resume", server.address)) == 0
    assert capsys.readouterr().out.strip() == "run is running"
    assert cmd_stop(config, _args("stop", server.address, no_drain=True)) == 0
    assert "run is stopped" in capsys.readouterr().out
    assert run.calls == [("scale", 5), ("pause",), ("resume",), ("stop", False)]


def test_cli_reads_the_address_the_driver_wrote_for_the_run(server, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_address_file(address_file("exp1"), server.address)
    assert (tmp_path / "runs" / "exp1" / "control.address").read_text().strip() == server.address
    assert cmd_status(load_config(overrides=["run_name=exp1"]), _args("status", None)) == 0
    assert "run exp1: running" in capsys.readouterr().out


def test_cli_without_an_address_says_how_to_find_it(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cmd_status(load_config(overrides=["run_name=exp2"]), _args("status", None)) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no control address for run 'exp2'" in captured.err and "--address HOST:PORT" in captured.err


def test_cli_prints_a_refusal_to_stderr_and_exits_1(run, server, capsys):
    run.refusal = RuntimeError("run is stopped")
    assert cmd_scale(load_config(), _args("scale", server.address, actors=2)) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == "longhaul scale: scale refused by the run: run is stopped"


def test_cli_parses_the_control_commands():
    parser = argparse.ArgumentParser(prog="longhaul")
    add_control_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["scale", "--actors", "4", "--address", "127.0.0.1:1"])
    assert (args.fn, args.actors, args.address, args.timeout) == (cmd_scale, 4, "127.0.0.1:1", 5.0)
    assert parser.parse_args(["stop", "--no-drain"]).no_drain is True
    assert parser.parse_args(["stop"]).no_drain is False
    with pytest.raises(SystemExit):
        parser.parse_args(["scale"])  # --actors is required
    with pytest.raises(SystemExit):
        parser.parse_args(["status", "--timeout", "0"])
