"""The tool service: the gRPC server that answers an agent's `search`, `open` and `answer` calls over the simulated
search world, and the asyncio client a rollout actor makes those calls with.

The contract is `proto/longhaul/v1/tools.proto`. One server holds one `SearchWorld` and serves every actor; each call
is stateless, so any server generated from the same `WorldConfig` answers it identically, and a restarted server is
indistinguishable from the old one. Task answers never leave the server: actors list tasks without answers and get
grades back.

Server. A `grpc.aio` server whose handlers run on one event loop. The tools we emulate are slow remote services
(`simulated_latency_s`), and on an event loop a call that waits costs a coroutine, not a thread: 1000 calls waiting
on a slow tool are 1000 timers, where a thread-pool server would queue all but `server_workers` of them and turn the
emulated latency into queueing delay that no real tool has. The world's own work (BM25 scoring, page lookups) is
CPU-bound, so it runs on a pool of `server_workers` threads: a slow search then never stalls the loop that accepts
calls, applies deadlines and cancels the calls whose client gave up. Every request is validated before it reaches the
world; a rejection carries a status message that starts with the offending field and names it in the trailing
metadata key `longhaul-field`.

Client. `ToolClient` promises an agent loop one thing: a call returns within about `deadline_s` of being made, with
the world's answer or a `ToolError` whose message can be shown to the agent as the tool's observation. The deadline
covers the whole call: the wait for one of `max_concurrency` slots, every attempt and the backoff between them.
Only UNAVAILABLE (no server, or a server restarting) is retried, with exponential backoff, at most `max_attempts`
times in all; every other failure is final on the first attempt, because retrying a bad argument or a missing document
gives the same answer, and retrying a timeout would break the deadline.

Run a server as its own process (it prints `longhaul tool server listening on HOST:PORT` once it accepts calls and
stops cleanly on SIGTERM or SIGINT); with `--metrics-port` it also serves Prometheus /metrics (the
`longhaul_tool_server_*` families) and prints `longhaul tool server metrics on HOST:PORT` before that:

    python -m longhaul.actors.tool_service --port 50051 [--metrics-port 0] [--config run.yaml] [--set world.seed=3 ...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, TypeVar

import grpc
from prometheus_client import Counter, Gauge, Histogram

from longhaul.actors.search_world import Grade, SearchHit, SearchWorld, UnknownDocument, UnknownTask
from longhaul.config import ConfigError, ToolServiceConfig, WorldConfig, load_config
from longhaul.v1 import tools_pb2 as pb
from longhaul.v1 import tools_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# Bounds of the request fields (mirrored in the comments of tools.proto). They exist to keep a runaway model
# generation from costing the server real work: a 1 MB "query" is a bug upstream, never a search.
MAX_QUERY_CHARS = 1024
MAX_TOP_K = 50  # ToolServiceConfig.search_top_k has the same upper bound
MAX_ID_CHARS = 128
MAX_ANSWER_CHARS = 4096
MAX_READ_DOC_IDS = 1024  # far more pages than an episode of max_turns opens
MAX_LIST_LIMIT = 1000
SPLITS = ("train", "test")
# Ids are what `search` hands out; anything else (quotes, spaces, a pasted URL with a query string) is the model
# mangling one, and saying so beats a plain "not found".
_ID_PATTERN = re.compile(rf"[A-Za-z0-9_.:/-]{{1,{MAX_ID_CHARS}}}")

TRUNCATION_MARKER = "\n[... page cut here: {shown} of {total} characters shown]"
"""Appended to a page longer than `max_page_chars`, so an agent that reads only the text knows it was cut."""

FIELD_METADATA_KEY = "longhaul-field"
"""Trailing metadata key naming the request field a rejected call got wrong."""

# Client backoff between UNAVAILABLE attempts: BASE·2^(attempt−1), capped, times a jitter in [0.5, 1] so that the
# actors of a fleet do not come back in lockstep after a server restart. The channel's own reconnect backoff is
# pinned to the same range: gRPC fails calls fast while its connection is backing off, so a channel left at its
# default (1 s initial) would fail every retry we make in the first second after a restart.
_BACKOFF_BASE_S = 0.1
_BACKOFF_CAP_S = 2.0

ToolName = Literal["search", "open", "answer", "list_tasks"]
ErrorKind = Literal["timeout", "not_found", "invalid_argument", "unavailable", "internal"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# Server side, in the process that serves the world.
SERVER_REQUESTS = Counter(
    "longhaul_tool_server_requests", "Tool calls answered by this server, by gRPC status code", ["tool", "code"]
)
SERVER_LATENCY = Histogram(
    "longhaul_tool_server_latency_seconds", "Time from receiving a tool call to answering it (simulated latency "
    "included)", ["tool"], buckets=_LATENCY_BUCKETS,
)
SERVER_IN_FLIGHT = Gauge("longhaul_tool_server_in_flight", "Tool calls this server is answering now")
# Client side, in each actor process.
CLIENT_CALLS = Counter(
    "longhaul_tool_calls", "Tool calls made by this process, by outcome (ok or a ToolError kind)", ["tool", "status"]
)
CLIENT_CALL_SECONDS = Histogram(
    "longhaul_tool_call_seconds", "Wall time of a tool call as the agent sees it (slot wait, attempts and backoff)",
    ["tool"], buckets=_LATENCY_BUCKETS,
)
CLIENT_ATTEMPTS = Counter(
    "longhaul_tool_call_attempts", "RPC attempts made by this process, by gRPC status code", ["tool", "code"]
)


# ----------------------------------------------------------------------------------------------------------- server


class _Rejected(Exception):
    """A request the server refuses; becomes a gRPC status naming the field."""

    def __init__(self, code: grpc.StatusCode, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.code = code
        self.field = field


def _invalid(field: str, reason: str) -> _Rejected:
    return _Rejected(grpc.StatusCode.INVALID_ARGUMENT, field, reason)


def _shown(value: str, limit: int = 60) -> str:
    """A value quoted for an error message, cut so that a huge bad value does not become a huge message."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"... ({len(value)} characters)"


def _check_id(field: str, value: str) -> None:
    if not value:
        raise _invalid(field, "must not be empty")
    if not _ID_PATTERN.fullmatch(value):
        raise _invalid(
            field, f"malformed {_shown(value)}: an id is 1 to {MAX_ID_CHARS} letters, digits, '_', '-', '.', ':' "
            "or '/'; copy it exactly as it was given"
        )


def latency_sampler(config: ToolServiceConfig) -> Callable[[], float]:
    """The simulated latency of successive calls, in seconds: `simulated_latency_s` every time (`constant`), or
    draws from a lognormal with that median and log-standard-deviation `simulated_latency_sigma`, from a generator
    seeded with `simulated_latency_seed`: the same seed gives the same sequence."""
    median, sigma = config.simulated_latency_s, config.simulated_latency_sigma
    if config.simulated_latency == "constant" or median == 0 or sigma == 0:
        return lambda: median
    rng = random.Random(config.simulated_latency_seed)
    # lognormvariate(0, σ) has median e^0 = 1, so scaling by the median keeps `simulated_latency_s` the median.
    return lambda: median * rng.lognormvariate(0.0, sigma)


def truncate_page(text: str, max_chars: int) -> tuple[str, bool]:
    """The page as `open` returns it: whole, or its first `max_chars` characters and `TRUNCATION_MARKER`."""
    if len(text) <= max_chars:
        return text, False
    return text[:max_chars] + TRUNCATION_MARKER.format(shown=max_chars, total=len(text)), True


class ToolServicer(pb_grpc.ToolServiceServicer):
    """The ToolService over one `SearchWorld`.

    `in_flight` and `max_in_flight` count the calls being answered (simulated latency included), for tests and
    benchmarks that check a client's concurrency limit from the server side. Call `close()` after the server stopped.
    """

    def __init__(self, world: SearchWorld, config: ToolServiceConfig):
        self.world = world
        self.config = config
        self.in_flight = 0
        self.max_in_flight = 0
        self._latency = latency_sampler(config)
        self._workers = ThreadPoolExecutor(config.server_workers, thread_name_prefix="longhaul-tool-server")

    def close(self) -> None:
        """Stop the world's worker threads (waiting for the calls on them to finish)."""
        self._workers.shutdown(wait=True)

    async def Search(self, request: pb.SearchRequest, context: grpc.aio.ServicerContext) -> pb.SearchResponse:
        return await self._answer_call("search", self._search, request, context)

    async def Open(self, request: pb.OpenRequest, context: grpc.aio.ServicerContext) -> pb.OpenResponse:
        return await self._answer_call("open", self._open, request, context)

    async def Answer(self, request: pb.AnswerRequest, context: grpc.aio.ServicerContext) -> pb.AnswerResponse:
        return await self._answer_call("answer", self._grade, request, context)

    async def ListTasks(self, request: pb.ListTasksRequest,
                        context: grpc.aio.ServicerContext) -> pb.ListTasksResponse:
        return await self._answer_call("list_tasks", self._list_tasks, request, context)

    async def _answer_call(self, tool: ToolName, handler: Callable, request, context: grpc.aio.ServicerContext):
        """Run `handler(request)` on a worker thread after the simulated latency, and account for the call."""
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        SERVER_IN_FLIGHT.inc()
        try:
            latency = self._latency()  # drawn on the event loop, in arrival order: reproducible from the seed
            if latency > 0:
                await asyncio.sleep(latency)
            return await asyncio.get_running_loop().run_in_executor(self._workers, handler, request)
        except _Rejected as exc:
            code = exc.code
            context.set_trailing_metadata(((FIELD_METADATA_KEY, exc.field),))
            await context.abort(exc.code, str(exc))
        except asyncio.CancelledError:
            # The client went away or its deadline passed: gRPC cancels the handler, nobody reads an answer.
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code = grpc.StatusCode.INTERNAL
            log.exception("tool server: %s failed on %s", tool, _shown(str(request), 200))
            await context.abort(code, f"internal error in the tool server ({type(exc).__name__}: {exc})")
        finally:
            self.in_flight -= 1
            SERVER_IN_FLIGHT.dec()
            SERVER_REQUESTS.labels(tool, code.name).inc()
            SERVER_LATENCY.labels(tool).observe(time.perf_counter() - started)

    # The handlers below run on worker threads; they only read the world.

    def _search(self, request: pb.SearchRequest) -> pb.SearchResponse:
        query = request.query
        if not query.strip():
            raise _invalid("query", "must not be empty: search for some words")
        if len(query) > MAX_QUERY_CHARS:
            raise _invalid("query", f"too long: at most {MAX_QUERY_CHARS} characters, got {len(query)}")
        top_k = request.top_k if request.HasField("top_k") else self.config.search_top_k
        if not 1 <= top_k <= MAX_TOP_K:
            raise _invalid("top_k", f"must be between 1 and {MAX_TOP_K}, got {top_k}")
        hits = self.world.search(query, top_k)
        return pb.SearchResponse(hits=[
            pb.SearchHit(doc_id=hit.doc_id, title=hit.title, snippet=hit.snippet, score=hit.score) for hit in hits
        ])

    def _open(self, request: pb.OpenRequest) -> pb.OpenResponse:
        _check_id("doc_id", request.doc_id)
        try:
            page = self.world.open(request.doc_id)
        except UnknownDocument as exc:
            raise _Rejected(
                grpc.StatusCode.NOT_FOUND, "doc_id",
                f"no document has the id {_shown(request.doc_id)}; open only ids returned by search",
            ) from exc
        text, truncated = truncate_page(page, self.config.max_page_chars)
        # SearchWorld.open documents a page as its title, a blank line, then its body.
        title, blank_line, _ = page.partition("\n\n")
        return pb.OpenResponse(doc_id=request.doc_id, title=title if blank_line else None, text=text,
                               truncated=truncated, total_chars=len(page))

    def _grade(self, request: pb.AnswerRequest) -> pb.AnswerResponse:
        _check_id("task_id", request.task_id)
        if len(request.answer) > MAX_ANSWER_CHARS:
            raise _invalid("answer", f"too long: at most {MAX_ANSWER_CHARS} characters, got {len(request.answer)}")
        if len(request.read_doc_ids) > MAX_READ_DOC_IDS:
            raise _invalid("read_doc_ids", f"too many: at most {MAX_READ_DOC_IDS}, got {len(request.read_doc_ids)}")
        for doc_id in request.read_doc_ids:
            _check_id("read_doc_ids", doc_id)
        try:
            grade = self.world.grade(request.task_id, request.answer, request.read_doc_ids)
        except UnknownTask as exc:
            raise _Rejected(grpc.StatusCode.NOT_FOUND, "task_id", f"no task has the id {_shown(request.task_id)}") \
                from exc
        return pb.AnswerResponse(exact_match=grade.exact_match, f1=grade.f1, evidence_recall=grade.evidence_recall)

    def _list_tasks(self, request: pb.ListTasksRequest) -> pb.ListTasksResponse:
        if request.split and request.split not in SPLITS:
            raise _invalid("split", f"must be 'train', 'test' or empty for all, got {_shown(request.split)}")
        if request.offset < 0:
            raise _invalid("offset", f"must be >= 0, got {request.offset}")
        if not 1 <= request.limit <= MAX_LIST_LIMIT:
            raise _invalid("limit", f"must be between 1 and {MAX_LIST_LIMIT}, got {request.limit}")
        tasks = self.world.tasks(request.split or None)
        page = tasks[request.offset:request.offset + request.limit]
        # Built field by field from an allow-list: a task's answer and evidence documents must never reach an actor.
        return pb.ListTasksResponse(total=len(tasks), tasks=[
            pb.TaskInfo(task_id=task.task_id, question=task.question, hops=task.hops, split=task.split)
            for task in page
        ])


async def start_server(servicer: ToolServicer, port: int = 0, *,
                       host: str = "127.0.0.1") -> tuple[grpc.aio.Server, int]:
    """Serve `servicer` on `host:port` (0 picks a free port) in the running event loop; return the server and port.

    The server has no authentication: keep it on loopback, or on a network only the run's machines reach.
    """
    server = grpc.aio.server(options=[
        # gRPC sets SO_REUSEPORT by default, which lets a second server bind a port already in use and silently
        # take half its connections. A port collision must fail here instead.
        ("grpc.so_reuseport", 0),
    ])
    pb_grpc.add_ToolServiceServicer_to_server(servicer, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:  # grpcio raises on a failed bind (older versions returned 0)
        raise OSError(f"tool server cannot listen on {host}:{port} ({exc}); is the port in use? pass port 0 "
                      "to pick a free one") from exc
    if bound == 0:
        raise OSError(f"tool server cannot listen on {host}:{port}; is the port in use? pass port 0 to pick a free one")
    await server.start()
    return server, bound


async def serve(tools: ToolServiceConfig, world: WorldConfig | SearchWorld, port: int = 0, *,
                host: str = "127.0.0.1") -> tuple[grpc.aio.Server, int]:
    """Start a tool server for `world` (a config to generate it from, or a world already built) on loopback in the
    running event loop; return the server and its port. Stop it with `await server.stop(grace_s)`."""
    if isinstance(world, WorldConfig):
        world = SearchWorld.generate(world)
    return await start_server(ToolServicer(world, tools), port, host=host)


# ----------------------------------------------------------------------------------------------------------- client


class ToolError(Exception):
    """A tool call that did not produce the world's answer. `str(error)` is written for the agent: it is the
    observation the agent loop shows in place of the tool's result.

    kind: timeout (no answer within the deadline), not_found (no such document or task), invalid_argument (a bad
    argument; `field` names it), unavailable (no server after every attempt), internal (a server bug; see its log).
    """

    def __init__(self, kind: ErrorKind, message: str, *, tool: str, field: str | None = None, attempts: int = 0):
        super().__init__(message)
        self.kind = kind
        self.tool = tool
        self.field = field
        self.attempts = attempts
        """RPC attempts made before giving up (0: the call never reached the network)."""


@dataclass(frozen=True, slots=True)
class Page:
    """A document as `open` returns it."""

    doc_id: str
    text: str
    """The page, or its first `max_page_chars` characters followed by `TRUNCATION_MARKER` when `truncated`."""
    truncated: bool
    total_chars: int
    """Length of the whole page."""
    title: str | None = None


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """A task as an actor sees it: no answer, no evidence documents."""

    task_id: str
    question: str
    hops: int
    split: str


@dataclass(frozen=True, slots=True)
class TaskPage:
    tasks: list[TaskInfo]
    total: int
    """Tasks in the requested split."""
    next_offset: int | None
    """Offset of the next page; None after the last one."""


_T = TypeVar("_T")


def _check_arg(tool: str, field: str, value: object, expected: type, *, optional: bool = False) -> None:
    """Type check before building a request: protobuf's own errors do not name the field."""
    if value is None and optional:
        return
    # bool is an int to Python but never a count here.
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ToolError("invalid_argument", f"{tool}: {field}: must be {expected.__name__}, got "
                        f"{type(value).__name__}", tool=tool, field=field)


def _check_int32(tool: str, field: str, value: int) -> None:
    if not -(2**31) <= value < 2**31:
        raise ToolError("invalid_argument", f"{tool}: {field}: out of range, got {value}", tool=tool, field=field)


class ToolClient:
    """Async client of one tool server. Construct it inside the event loop that will use it, and close it (or use
    `async with`): the channel belongs to that loop.

    Every method returns the world's answer or raises `ToolError`; a caller's cancellation propagates unchanged.
    """

    def __init__(self, address: str, config: ToolServiceConfig = ToolServiceConfig()):
        self.address = address
        self.config = config
        self._channel = grpc.aio.insecure_channel(address, options=[
            ("grpc.initial_reconnect_backoff_ms", int(_BACKOFF_BASE_S * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(_BACKOFF_CAP_S * 1000)),
            # (Not grpc.min_reconnect_backoff_ms: gRPC core uses it as the connect timeout, which must stay long.)
            # Retries are ours alone (counted, bounded, inside the deadline); gRPC's transparent retries would hide
            # attempts from the count and the metrics.
            ("grpc.enable_retries", 0),
        ])
        self._stub = pb_grpc.ToolServiceStub(self._channel)
        self._slots = asyncio.Semaphore(config.max_concurrency)

    async def __aenter__(self) -> ToolClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls still in flight fail (as CANCELLED, reported as internal)."""
        await self._channel.close()

    async def search(self, query: str, top_k: int | None = None) -> list[SearchHit]:
        """The world's top hits for `query`, best first. `top_k` None uses the server's `search_top_k`."""
        _check_arg("search", "query", query, str)
        _check_arg("search", "top_k", top_k, int, optional=True)
        if top_k is not None:
            _check_int32("search", "top_k", top_k)
        response = await self._call("search", self._stub.Search, pb.SearchRequest(query=query, top_k=top_k))
        return [SearchHit(doc_id=h.doc_id, title=h.title, snippet=h.snippet, score=h.score) for h in response.hits]

    async def open(self, doc_id: str) -> Page:
        """The page of `doc_id`, cut at the server's `max_page_chars`."""
        _check_arg("open", "doc_id", doc_id, str)
        response = await self._call("open", self._stub.Open, pb.OpenRequest(doc_id=doc_id))
        return Page(doc_id=response.doc_id, text=response.text, truncated=response.truncated,
                    total_chars=response.total_chars, title=response.title if response.HasField("title") else None)

    async def answer(self, task_id: str, answer: str, read_doc_ids: Sequence[str] = ()) -> Grade:
        """Grade `answer` to task `task_id`, and the evidence among `read_doc_ids` (the pages opened before it)."""
        _check_arg("answer", "task_id", task_id, str)
        _check_arg("answer", "answer", answer, str)
        if isinstance(read_doc_ids, str):  # would iterate as single characters
            raise ToolError("invalid_argument", "answer: read_doc_ids: must be a sequence of ids, got str",
                            tool="answer", field="read_doc_ids")
        for doc_id in read_doc_ids:
            _check_arg("answer", "read_doc_ids", doc_id, str)
        response = await self._call("answer", self._stub.Answer, pb.AnswerRequest(
            task_id=task_id, answer=answer, read_doc_ids=read_doc_ids))
        return Grade(exact_match=response.exact_match, f1=response.f1, evidence_recall=response.evidence_recall)

    async def list_tasks(self, split: str | None = None, offset: int = 0, limit: int = 100) -> TaskPage:
        """Tasks `offset` to `offset + limit` of `split` ("train", "test", or None for all), without answers."""
        _check_arg("list_tasks", "split", split, str, optional=True)
        _check_arg("list_tasks", "offset", offset, int)
        _check_arg("list_tasks", "limit", limit, int)
        _check_int32("list_tasks", "offset", offset)
        _check_int32("list_tasks", "limit", limit)
        response = await self._call("list_tasks", self._stub.ListTasks,
                                    pb.ListTasksRequest(split=split or "", offset=offset, limit=limit))
        tasks = [TaskInfo(task_id=t.task_id, question=t.question, hops=t.hops, split=t.split) for t in response.tasks]
        end = offset + len(tasks)
        return TaskPage(tasks=tasks, total=response.total, next_offset=end if tasks and end < response.total else None)

    async def all_tasks(self, split: str | None = None, page_size: int = MAX_LIST_LIMIT) -> list[TaskInfo]:
        """Every task of `split`, fetched page by page."""
        tasks: list[TaskInfo] = []
        offset: int | None = 0
        while offset is not None:
            page = await self.list_tasks(split, offset, page_size)
            tasks.extend(page.tasks)
            offset = page.next_offset
        return tasks

    async def _call(self, tool: ToolName, rpc: Callable[..., Awaitable[_T]], request) -> _T:
        """One tool call: a concurrency slot, then up to `max_attempts` attempts, all within `deadline_s`."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.config.deadline_s
        status = "internal"
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    await self._slots.acquire()
            except TimeoutError:
                raise self._timeout(tool, attempts=0) from None
            try:
                response = await self._attempts(tool, rpc, request, deadline)
            finally:
                self._slots.release()
            status = "ok"
            return response
        except ToolError as exc:
            status = exc.kind
            raise
        except asyncio.CancelledError:
            status = "cancelled"  # the caller gave up on the call: not a tool failure, and not ours to convert
            raise
        finally:
            CLIENT_CALLS.labels(tool, status).inc()
            CLIENT_CALL_SECONDS.labels(tool).observe(loop.time() - started)

    async def _attempts(self, tool: ToolName, rpc: Callable[..., Awaitable[_T]], request, deadline: float) -> _T:
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise self._timeout(tool, attempts=attempt - 1)
            try:
                response = await rpc(request, timeout=remaining)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                CLIENT_ATTEMPTS.labels(tool, code.name).inc()
                if code == grpc.StatusCode.UNAVAILABLE and attempt < self.config.max_attempts:
                    backoff = min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2 ** (attempt - 1)) * random.uniform(0.5, 1)
                    if loop.time() + backoff < deadline:
                        await asyncio.sleep(backoff)
                        continue
                raise self._error(tool, exc, attempt) from exc
            CLIENT_ATTEMPTS.labels(tool, grpc.StatusCode.OK.name).inc()
            return response

    def _timeout(self, tool: str, attempts: int) -> ToolError:
        return ToolError("timeout", f"{tool} timed out: no answer within {self.config.deadline_s:g} s. The tool may be "
                         "busy; try again, or try something else", tool=tool, attempts=attempts)

    def _error(self, tool: str, exc: grpc.aio.AioRpcError, attempts: int) -> ToolError:
        code, details = exc.code(), exc.details() or ""
        field = dict(exc.trailing_metadata() or ()).get(FIELD_METADATA_KEY)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return self._timeout(tool, attempts)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return ToolError("invalid_argument", f"{tool}: {details}", tool=tool, field=field, attempts=attempts)
        if code == grpc.StatusCode.NOT_FOUND:
            return ToolError("not_found", f"{tool}: {details}", tool=tool, field=field, attempts=attempts)
        if code == grpc.StatusCode.UNAVAILABLE:
            # gRPC's details ("failed to connect to all addresses; ...") stay on the chained cause, for logs.
            return ToolError("unavailable", f"{tool} is unavailable: the tool server did not answer after {attempts} "
                             "attempt(s). Try again later", tool=tool, attempts=attempts)
        return ToolError("internal", f"{tool} failed with an internal error ({code.name}: {details})", tool=tool,
                         attempts=attempts)


# ----------------------------------------------------------------------------------------- a server as a process


LISTENING_LINE = "longhaul tool server listening on "
"""What `main()` prints on stdout, followed by host:port, once the server accepts calls."""

METRICS_LINE = "longhaul tool server metrics on "
"""What `main()` prints on stdout, followed by host:port, once /metrics is served (before `LISTENING_LINE`)."""


class ToolServerProcess:
    """A tool server in a child process (`python -m longhaul.actors.tool_service`), owned by this object.

    `start()` launches it with these configs and waits for its listening line; `stop()` sends SIGTERM and waits
    for it to drain its calls (SIGKILL after `tools.shutdown_grace_s` plus a margin); `kill()` sends SIGKILL.
    A stopped server can be started again on the same port (`port` is then fixed to the first one bound).

    The child also serves Prometheus /metrics on `metrics_host` (a free port unless `metrics_port` is given; None
    serves none): `metrics_address` is where to scrape it, for the run's Prometheus targets. Like `port`, the metrics
    port stays fixed across restarts, so a target listed once stays valid.
    """

    def __init__(self, tools: ToolServiceConfig, world: WorldConfig, port: int = 0, *,
                 startup_timeout_s: float = 120.0, metrics_host: str | None = "127.0.0.1", metrics_port: int = 0):
        self.tools = tools
        self.world = world
        self.port = port
        self.startup_timeout_s = startup_timeout_s
        self.metrics_host = metrics_host
        self.metrics_port = metrics_port
        self._process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        if self.port == 0:
            raise RuntimeError("tool server process not started: call start() first")
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_address(self) -> str | None:
        """host:port of the server's Prometheus /metrics; None when started with `metrics_host=None`."""
        if self.metrics_host is None:
            return None
        if self.metrics_port == 0:
            raise RuntimeError("tool server process not started: call start() first")
        return f"{self.metrics_host}:{self.metrics_port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> ToolServerProcess:
        if self._process is not None and self._process.poll() is None:
            raise RuntimeError(f"tool server already running (pid {self._process.pid})")
        # Values are JSON, which load_config's YAML reads back exactly.
        overrides = [f"{section}.{key}={json.dumps(value)}"
                     for section, config in (("tools", self.tools), ("world", self.world))
                     for key, value in config.model_dump(mode="json").items()]
        command = [sys.executable, "-m", "longhaul.actors.tool_service", "--port", str(self.port)]
        if self.metrics_host is not None:
            command += ["--metrics-host", self.metrics_host, "--metrics-port", str(self.metrics_port)]
        for override in overrides:
            command += ["--set", override]
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=None, text=True,
            start_new_session=True,  # a Ctrl-C meant for the driver must not kill the server out of order
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            ready, _, _ = select.select([self._process.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = self._process.stdout.readline() if ready else ""
            if line.startswith(METRICS_LINE):
                self.metrics_port = int(line[len(METRICS_LINE):].strip().rpartition(":")[2])
                continue
            if line.startswith(LISTENING_LINE):
                self.port = int(line[len(LISTENING_LINE):].strip().rpartition(":")[2])
                return self
            if not ready or time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"tool server (pid {self.pid}) did not start within {self.startup_timeout_s}s; "
                                   "its stderr is above")
            if line == "" and self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise RuntimeError(f"tool server exited with code {code} during start; its stderr is above")

    def stop(self) -> int | None:
        """SIGTERM, then wait for a clean exit; return the exit code (None if it was not running)."""
        if self._process is None:
            return None
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(self.tools.shutdown_grace_s + 10)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        code = self._process.returncode
        self._close()
        return code

    def kill(self) -> None:
        """SIGKILL the server: no drain. For crash tests."""
        if self._process is not None and self._process.poll() is None:
            os.kill(self._process.pid, signal.SIGKILL)
            self._process.wait()
        self._close()

    def _close(self) -> None:
        if self._process is not None and self._process.stdout is not None:
            self._process.stdout.close()
        self._process = None

    def __enter__(self) -> ToolServerProcess:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


async def serve_until_signalled(tools: ToolServiceConfig, world: WorldConfig, host: str, port: int) -> None:
    started = time.perf_counter()
    servicer = ToolServicer(SearchWorld.generate(world), tools)
    log.info("world generated in %.1fs", time.perf_counter() - started)
    server, bound = await start_server(servicer, port, host=host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"{LISTENING_LINE}{host}:{bound}", flush=True)
    await stop.wait()
    log.info("stopping: refusing new calls, %.1fs for %d in flight", tools.shutdown_grace_s, servicer.in_flight)
    await server.stop(tools.shutdown_grace_s)
    servicer.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run a tool server in this process until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m longhaul.actors.tool_service", description=main.__doc__)
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default loopback; the server has no authentication)")
    parser.add_argument("--config", help="run config YAML; its `tools` and `world` sections are used")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="config override, e.g. world.seed=3 or tools.simulated_latency_s=0.5 (repeatable)")
    parser.add_argument("--metrics-port", type=int,
                        help="serve Prometheus /metrics on this port (0: a free one, printed on start)")
    parser.add_argument("--metrics-host", help="address /metrics binds (default: --host)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.set)
    except ConfigError as exc:
        parser.error(str(exc))
    if args.metrics_port is not None:
        from prometheus_client import start_http_server

        metrics_host = args.metrics_host or args.host
        metrics_server, _ = start_http_server(args.metrics_port, addr=metrics_host)
        print(f"{METRICS_LINE}{metrics_host}:{metrics_server.server_port}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C during the drain: leave without a traceback
        asyncio.run(serve_until_signalled(config.tools, config.world, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
